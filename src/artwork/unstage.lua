-- Removes a staged cover and gives its bytes back to the budget (see stage.lua).
-- KEYS: the bytes' key, the ledger, the sizes, the total. ARGV: the hash.
redis.call('DEL', KEYS[1])
local size = redis.call('HGET', KEYS[3], ARGV[1])
if size then
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('DECRBY', KEYS[4], tonumber(size))
end
return 1
