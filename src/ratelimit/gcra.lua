-- One GCRA decision (the pattern of go-redis/redis_rate). KEYS[1] holds the key's theoretical
-- arrival time in microseconds; ARGV[1] is the burst, ARGV[2] the interval in microseconds,
-- ARGV[3] "spend" (count the attempt when allowed) or "peek" (only say whether it would be).
-- Time comes from Redis, so every replica measures with one clock.
-- Returns {allowed (0 or 1), remaining, retry_after_us, reset_after_us}.
local burst = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local time = redis.call("TIME")
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local tat = tonumber(redis.call("GET", KEYS[1])) or now
if tat < now then
  tat = now
end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if now < allow_at then
  return {0, 0, allow_at - now, tat - now}
end
local reset_after = new_tat - now
if ARGV[3] == "peek" then
  return {1, math.floor((now - allow_at) / interval), 0, tat - now}
end
redis.call("SET", KEYS[1], new_tat, "PX", math.ceil(reset_after / 1000))
return {1, math.floor((now - allow_at) / interval), 0, reset_after}
