-- Moves delayed jobs that are due by Redis's clock into their streams, atomically, so two
-- replicas promoting at once never enqueue one job twice. A record that does not parse goes
-- to the dead letters rather than vanishing.
-- KEYS: 1 delayed set, 2-4 streams (critical, default, low), 5 dead stream
-- ARGV: 1 most to move
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(due) do
  local p, id, attempt, kind, payload = string.match(member, '^([0-2])|(%d+)|(%d+)|([^|]*)|(.*)$')
  if p then
    redis.call('XADD', KEYS[2 + tonumber(p)], '*', 'id', id, 'kind', kind, 'attempt', attempt,
      'payload', payload)
  else
    redis.call('XADD', KEYS[5], '*', 'id', '0', 'kind', '', 'priority', 'default',
      'attempts', '0', 'payload', member, 'error', 'unreadable delayed record')
  end
  redis.call('ZREM', KEYS[1], member)
end
return #due
