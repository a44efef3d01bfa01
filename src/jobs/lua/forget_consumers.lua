-- Drops consumers that hold nothing and have not read for a long time (replicas that
-- stopped), so the group's consumer list does not grow with every deploy.
-- KEYS: streams
-- ARGV: 1 minimum idle ms, 2 this consumer
local dropped = 0
for _, key in ipairs(KEYS) do
  for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', key, 'workers')) do
    local info = {}
    for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
    if info.pending == 0 and info.idle > tonumber(ARGV[1]) and info.name ~= ARGV[2] then
      redis.call('XGROUP', 'DELCONSUMER', key, 'workers', info.name)
      dropped = dropped + 1
    end
  end
end
return dropped
