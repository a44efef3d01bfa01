-- Stages a cover's bytes unless they are staged already, within two budgets of staged bytes:
-- one for everything, one for each account.
-- KEYS: the bytes' key, the ledger (sorted set: hash -> expiry in ms), the sizes (hash:
-- hash -> "<bytes>:<account>"), the total, the account's total. ARGV: the bytes, the TTL in
-- seconds, the budget, the account's budget, the hash, the account, the prefix of the
-- accounts' totals.
-- Returns {1, generation} staged, {0, generation} staged already, {-1, ''} over a budget;
-- the generation (the staging's expiry in ms) names this staging: the reports of one staged
-- cover share it, and it changes once the cover was rendered, removed and staged again.
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)

local function release(member)
  local held = redis.call('HGET', KEYS[3], member)
  redis.call('HDEL', KEYS[3], member)
  redis.call('ZREM', KEYS[2], member)
  if held then
    local size, account = string.match(held, '^(%d+):(.*)$')
    size = tonumber(size or held) or 0
    redis.call('DECRBY', KEYS[4], size)
    -- An account's total that expired meanwhile stays gone.
    if account and account ~= '' and redis.call('EXISTS', ARGV[7] .. account) == 1 then
      redis.call('DECRBY', ARGV[7] .. account, size)
    end
  end
end

-- What expired gives its bytes back (a few at a time: each call does a little).
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms, 'LIMIT', 0, 64)
for _, member in ipairs(expired) do
  release(member)
end

local ttl = tonumber(ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 1 then
  if not redis.call('ZSCORE', KEYS[2], ARGV[5]) then
    -- Staged outside the ledger (by an older version): account for it, and bound it.
    local left = redis.call('PTTL', KEYS[1])
    if left < 0 then
      redis.call('EXPIRE', KEYS[1], ttl)
      left = ttl * 1000
    end
    local bytes = redis.call('STRLEN', KEYS[1])
    redis.call('ZADD', KEYS[2], now_ms + left, ARGV[5])
    redis.call('HSET', KEYS[3], ARGV[5], bytes .. ':')
    redis.call('INCRBY', KEYS[4], bytes)
  end
  return {0, redis.call('ZSCORE', KEYS[2], ARGV[5])}
end

local size = string.len(ARGV[1])
local total = tonumber(redis.call('GET', KEYS[4]) or '0')
local own = tonumber(redis.call('GET', KEYS[5]) or '0')
if total + size > tonumber(ARGV[3]) or own + size > tonumber(ARGV[4]) then
  return {-1, ''}
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
redis.call('ZADD', KEYS[2], now_ms + ttl * 1000, ARGV[5])
redis.call('HSET', KEYS[3], ARGV[5], size .. ':' .. ARGV[6])
redis.call('INCRBY', KEYS[4], size)
redis.call('INCRBY', KEYS[5], size)
-- An account's total lives while it has something staged.
redis.call('PEXPIRE', KEYS[5], ttl * 1000 + 60000)
return {1, redis.call('ZSCORE', KEYS[2], ARGV[5])}
