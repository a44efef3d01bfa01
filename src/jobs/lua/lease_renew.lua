-- Extends the lease only while it is still this replica's: 1, else 0.
-- KEYS: 1 leader
-- ARGV: 1 token, 2 TTL ms
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
