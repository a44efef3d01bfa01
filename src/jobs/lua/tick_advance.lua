-- Records a periodic job's last enqueued tick, only for the leader of the current epoch
-- (-1 for a deposed one) and only forwards.
-- KEYS: 1 epoch, 2 the job's tick key
-- ARGV: 1 epoch, 2 tick
if tonumber(redis.call('GET', KEYS[1]) or '0') ~= tonumber(ARGV[1]) then
  return -1
end
local last = tonumber(redis.call('GET', KEYS[2]) or '')
if last == nil or last < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], ARGV[2])
  return 1
end
return 0
