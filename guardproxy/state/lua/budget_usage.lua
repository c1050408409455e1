-- Read one budget subject's current windows, on the store's clock, after reclaiming
-- expired leases (as the next reservation would), so the counts match what it would see.
-- (lease_common.lua is prepended: store_now, reclaim, window_at.)
-- KEYS[1] leases hash   KEYS[2] lease deadlines zset   KEYS[3..] window key prefixes
-- ARGV[1] grace (s)   ARGV[2..] per window: length in seconds
-- Returns {TIME seconds, TIME microseconds, then per window: used, reserved, reset}.
local now, t = store_now()
reclaim(KEYS[1], KEYS[2], now, tonumber(ARGV[1]))
local result = {t[1], t[2]}
for i = 1, #KEYS - 2 do
  local key, reset = window_at(KEYS[2 + i], tonumber(ARGV[1 + i]), now)
  local vals = redis.call('HMGET', key, 'used', 'reserved')
  result[#result + 1] = tonumber(vals[1]) or 0
  result[#result + 1] = tonumber(vals[2]) or 0
  result[#result + 1] = reset
end
return result
