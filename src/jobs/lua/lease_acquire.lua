-- Takes the scheduler's lease when it is free (or already this replica's), with a fresh
-- fencing epoch; nil when another replica holds it.
-- KEYS: 1 leader, 2 epoch
-- ARGV: 1 token, 2 TTL ms
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) or redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return redis.call('INCR', KEYS[2])
end
return false
