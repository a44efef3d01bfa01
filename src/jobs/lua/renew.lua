-- Renews this consumer's lease on entries it still holds: their idle time back to 0 without
-- raising the delivery count (JUSTID). An entry another consumer reclaimed meanwhile is left
-- to that consumer.
-- KEYS: 1 stream
-- ARGV: 1 consumer, 2.. entry ids
local renewed = 0
for i = 2, #ARGV do
  local held = redis.call('XPENDING', KEYS[1], 'workers', ARGV[i], ARGV[i], 1, ARGV[1])
  if #held > 0 then
    redis.call('XCLAIM', KEYS[1], 'workers', ARGV[1], 0, ARGV[i], 'IDLE', 0, 'JUSTID')
    renewed = renewed + 1
  end
end
return renewed
