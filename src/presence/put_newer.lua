-- Writes a device entry unless the entry there holds a play reported later (its
-- now_playing.at); keeps the user's hash for at least `keep` ms more, never shortening it.
-- KEYS[1]: the user's hash. ARGV: field, entry JSON, the entry's play time (ms), keep (ms).
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local ok, entry = pcall(cjson.decode, current)
  if ok and type(entry) == 'table' and type(entry.now_playing) == 'table' then
    local at = tonumber(entry.now_playing.at)
    if at and at > tonumber(ARGV[3]) then
      return 0
    end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4], 'NX')
redis.call('PEXPIRE', KEYS[1], ARGV[4], 'GT')
return 1
