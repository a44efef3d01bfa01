-- A failed run: acknowledged and removed from its stream, then either delayed for a retry
-- (due at Redis's TIME + backoff) or appended to the dead letters. Nothing happens unless
-- this consumer still holds the entry (another replica that reclaimed it decides).
-- KEYS: 1 stream, 2 delayed set, 3 dead stream
-- ARGV: 1 entry id, 2 job id, 3 kind, 4 runs so far, 5 payload, 6 error,
--       7 backoff ms (negative: dead), 8 priority index, 9 priority name, 10 consumer
local held = redis.call('XPENDING', KEYS[1], 'workers', ARGV[1], ARGV[1], 1, ARGV[10])
if #held == 0 then
  return 0
end
redis.call('XACK', KEYS[1], 'workers', ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
local backoff = tonumber(ARGV[7])
if backoff < 0 then
  redis.call('XADD', KEYS[3], '*', 'id', ARGV[2], 'kind', ARGV[3], 'priority', ARGV[9],
    'attempts', ARGV[4], 'payload', ARGV[5], 'error', ARGV[6])
  return 2
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], now + backoff,
  ARGV[8] .. '|' .. ARGV[2] .. '|' .. ARGV[4] .. '|' .. ARGV[3] .. '|' .. ARGV[5])
return 1
