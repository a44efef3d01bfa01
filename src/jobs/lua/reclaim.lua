-- Takes over entries idle past the visibility timeout (their consumer stopped renewing: it
-- died or hung), scanning on from a cursor (XAUTOCLAIM looks at up to ten times the batch). An entry delivered more than the most attempts (it keeps killing the
-- process that runs it) goes to the dead letters instead.
-- KEYS: 1 stream, 2 dead stream
-- ARGV: 1 consumer, 2 visibility ms, 3 cursor, 4 batch, 5 most deliveries, 6 priority name
local claimed = redis.call('XAUTOCLAIM', KEYS[1], 'workers', ARGV[1], ARGV[2], ARGV[3],
  'COUNT', ARGV[4])
local kept = {}
local dead_kinds = {}
for _, entry in ipairs(claimed[2]) do
  local id = entry[1]
  local pending = redis.call('XPENDING', KEYS[1], 'workers', id, id, 1)
  local deliveries = (pending[1] and pending[1][4]) or 0
  if deliveries > tonumber(ARGV[5]) then
    local job = {}
    local fields = entry[2]
    for i = 1, #fields, 2 do job[fields[i]] = fields[i + 1] end
    redis.call('XADD', KEYS[2], '*', 'id', job.id or '0', 'kind', job.kind or '',
      'priority', ARGV[6], 'attempts', (tonumber(job.attempt) or 0) + 1,
      'payload', job.payload or '',
      'error', 'its replica stopped while running it ' .. (deliveries - 1) .. ' times')
    redis.call('XACK', KEYS[1], 'workers', id)
    redis.call('XDEL', KEYS[1], id)
    table.insert(dead_kinds, job.kind or '')
  else
    table.insert(kept, entry)
  end
end
return {claimed[1], kept, dead_kinds}
