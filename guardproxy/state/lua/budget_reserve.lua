-- Reserve tokens in every window of one budget subject: all windows or none.
-- All keys share one hash tag, so this is one atomic call on Redis Cluster too.
-- (lease_common.lua is prepended: store_now, reclaim, window_at.)
-- KEYS[1]    leases: hash lease id -> "state:amount:windowkey,windowkey"  (state r|x)
-- KEYS[2]    lease deadlines: zset lease id -> unix time on the store's clock
-- KEYS[3..]  per window, its key PREFIX; the window's hash (fields used, reserved) is
--            prefix .. ':' .. index, the index computed here from the store's clock
-- ARGV[1] amount  ARGV[2] lease id  ARGV[3] lease ttl (s)  ARGV[4] grace (s)
-- ARGV[5..]  per window: limit, length in seconds
-- Returns {1 if reserved else 0, TIME seconds, TIME microseconds,
--          remaining per window (after reserving, or as it was), reset per window}.
-- Idempotent by lease id: a second call with the same id reserves nothing more.
local amount = tonumber(ARGV[1])
local grace = tonumber(ARGV[4])
local n = #KEYS - 2
local now, t = store_now()

reclaim(KEYS[1], KEYS[2], now, grace)

-- The client may resend this call after a timeout although it ran (redis-py retries on
-- timeouts): the lease id already held means it did, and must not be reserved twice.
local again = redis.call('HEXISTS', KEYS[1], ARGV[2]) == 1
local ok = 1
local keys, resets, remaining, expiries = {}, {}, {}, {}
local longest = grace
for i = 1, n do
  local limit, seconds = tonumber(ARGV[3 + 2 * i]), tonumber(ARGV[4 + 2 * i])
  local key, reset = window_at(KEYS[2 + i], seconds, now)
  local vals = redis.call('HMGET', key, 'used', 'reserved')
  local left = limit - (tonumber(vals[1]) or 0) - (tonumber(vals[2]) or 0)
  if left < amount and not again then ok = 0 end
  keys[i], resets[i], remaining[i] = key, reset, left
  -- a window's counts are kept until a grace period after it ends (late settles)
  expiries[i] = math.ceil(reset - now + grace)
  longest = math.max(longest, expiries[i])
end

if ok == 1 and not again then
  for i = 1, n do
    redis.call('HINCRBY', keys[i], 'reserved', amount)
    redis.call('EXPIRE', keys[i], expiries[i])
    remaining[i] = remaining[i] - amount
  end
  redis.call('HSET', KEYS[1], ARGV[2], 'r:' .. string.format('%d', amount) .. ':' .. table.concat(keys, ','))
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[2])
  redis.call('EXPIRE', KEYS[1], longest)
  redis.call('EXPIRE', KEYS[2], longest)
end

local result = {ok, t[1], t[2]}
for i = 1, n do result[3 + i] = remaining[i] end
for i = 1, n do result[3 + n + i] = resets[i] end
return result
