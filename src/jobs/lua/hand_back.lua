-- Hands back entries this consumer took but never started (at a shutdown): idle as if their
-- lease had lapsed, so any replica's next sweep takes them, and their delivery uncounted
-- (RETRYCOUNT one less), so that entries which never ran do not count towards the dead
-- letters.
-- KEYS: 1 stream
-- ARGV: 1 consumer, 2 visibility ms, 3.. entry ids
local handed = 0
for i = 3, #ARGV do
  local held = redis.call('XPENDING', KEYS[1], 'workers', ARGV[i], ARGV[i], 1, ARGV[1])
  if #held > 0 then
    local deliveries = math.max(held[1][4] - 1, 0)
    redis.call('XCLAIM', KEYS[1], 'workers', ARGV[1], 0, ARGV[i], 'IDLE', ARGV[2],
      'RETRYCOUNT', deliveries, 'JUSTID')
    handed = handed + 1
  end
end
return handed
