-- Reserve tokens in every window of one budget subject: all windows or none.
-- All keys share one hash tag, so this is one atomic call on Redis Cluster too.
-- KEYS[1]    leases: hash lease id -> "state:amount:windowkey,windowkey"  (state r|x)
-- KEYS[2]    lease deadlines: zset lease id -> unix time
-- KEYS[3..]  one hash per window with fields used, reserved
-- ARGV[1] amount  ARGV[2] lease id  ARGV[3] now  ARGV[4] lease ttl  ARGV[5] grace
-- ARGV[6..]  per window: limit, seconds until the window's key may expire
-- Returns {1 if reserved else 0, remaining per window (after reserving, or as it was)}.
local amount = tonumber(ARGV[1])
local now = tonumber(ARGV[3])
local grace = tonumber(ARGV[5])
local n = #KEYS - 2

local function windows_of(rec)
  local state, held, list = string.match(rec, '^(%a):(%d+):?(.*)$')
  return state, tonumber(held), list
end

-- A replica that died mid-request must not hold budget: reclaim expired leases.
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  local rec = redis.call('HGET', KEYS[1], id)
  local state, held, list = nil, 0, ''
  if rec then state, held, list = windows_of(rec) end
  if state == 'r' then
    for key in string.gmatch(list, '[^,]+') do
      if redis.call('EXISTS', key) == 1 then redis.call('HINCRBY', key, 'reserved', -held) end
    end
    -- keep the record for a grace period, so a late settle still charges real usage
    redis.call('HSET', KEYS[1], id, 'x:' .. held .. ':' .. list)
    redis.call('ZADD', KEYS[2], now + grace, id)
  else
    redis.call('HDEL', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
  end
end

local result = {1}
local longest = grace
for i = 1, n do
  local vals = redis.call('HMGET', KEYS[2 + i], 'used', 'reserved')
  local left = tonumber(ARGV[4 + 2 * i]) - (tonumber(vals[1]) or 0) - (tonumber(vals[2]) or 0)
  result[i + 1] = left
  if left < amount then result[1] = 0 end
  longest = math.max(longest, tonumber(ARGV[5 + 2 * i]))
end
if result[1] == 0 then return result end

local keys = {}
for i = 1, n do
  local key = KEYS[2 + i]
  redis.call('HINCRBY', key, 'reserved', amount)
  redis.call('EXPIRE', key, tonumber(ARGV[5 + 2 * i]))
  result[i + 1] = result[i + 1] - amount
  keys[i] = key
end
redis.call('HSET', KEYS[1], ARGV[2], 'r:' .. amount .. ':' .. table.concat(keys, ','))
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[2])
redis.call('EXPIRE', KEYS[1], longest)
redis.call('EXPIRE', KEYS[2], longest)
return result
