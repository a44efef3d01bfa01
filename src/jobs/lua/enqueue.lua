-- Enqueues one job, once per idempotency key: into its priority's stream now, or into the
-- delayed set until Redis's own clock says it is due.
-- KEYS: 1 sequence, 2 stream, 3 delayed set, 4 idempotency key (the sequence when none)
-- ARGV: 1 kind, 2 payload, 3 priority index, 4 delay ms, 5 key TTL s, 6 '1' when keyed
if ARGV[6] == '1' and not redis.call('SET', KEYS[4], '1', 'NX', 'EX', ARGV[5]) then
  return false
end
local id = redis.call('INCR', KEYS[1])
local delay = tonumber(ARGV[4])
if delay > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[3], now + delay,
    ARGV[3] .. '|' .. id .. '|0|' .. ARGV[1] .. '|' .. ARGV[2])
else
  redis.call('XADD', KEYS[2], '*', 'id', id, 'kind', ARGV[1], 'attempt', 0, 'payload', ARGV[2])
end
return id
