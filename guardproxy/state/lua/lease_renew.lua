-- Renew a lease that is still reserved (state r) and not yet past its deadline: its
-- deadline becomes now + ttl on the store's clock (never earlier than it already was).
-- Called periodically while a response streams, so a long stream keeps its reservation.
-- KEYS[1] leases hash   KEYS[2] lease deadlines zset
-- ARGV[1] lease id   ARGV[2] ttl (s)   ARGV[3] grace (s)
-- Returns 1 if renewed, 0 if the lease is unknown, settled, expired or reclaimed.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rec = redis.call('HGET', KEYS[1], ARGV[1])
if not rec or string.sub(rec, 1, 2) ~= 'r:' then return 0 end
local deadline = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]))
if not deadline or deadline <= now then return 0 end
local ttl = tonumber(ARGV[2])
if now + ttl > deadline then redis.call('ZADD', KEYS[2], now + ttl, ARGV[1]) end
-- the lease records must outlive the lease by the grace period, so its settle charges
local keep = math.ceil(ttl + tonumber(ARGV[3]))
for k = 1, 2 do
  local left = redis.call('TTL', KEYS[k])
  if left >= 0 and left < keep then redis.call('EXPIRE', KEYS[k], keep) end
end
return 1
