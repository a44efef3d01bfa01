-- Moves one dead job back to its stream for a fresh set of attempts, once (the XDEL decides).
-- KEYS: 1 dead stream, 2 stream
-- ARGV: 1 dead entry id, 2 job id, 3 kind, 4 payload
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('XADD', KEYS[2], '*', 'id', ARGV[2], 'kind', ARGV[3], 'attempt', 0, 'payload', ARGV[4])
return 1
