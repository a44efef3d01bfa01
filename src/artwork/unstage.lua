-- Removes a staged cover and gives its bytes back to the budgets (see stage.lua).
-- KEYS: the bytes' key, the ledger, the sizes, the total. ARGV: the hash, the prefix of the
-- accounts' totals.
redis.call('DEL', KEYS[1])
local held = redis.call('HGET', KEYS[3], ARGV[1])
if held then
  local size, account = string.match(held, '^(%d+):(.*)$')
  size = tonumber(size or held) or 0
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('DECRBY', KEYS[4], size)
  -- An account's total that expired meanwhile stays gone.
  if account and account ~= '' and redis.call('EXISTS', ARGV[2] .. account) == 1 then
    redis.call('DECRBY', ARGV[2] .. account, size)
  end
end
return 1
