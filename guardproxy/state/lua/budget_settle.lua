-- Settle (or release, with actual = 0) one lease, idempotently: the lease record is
-- deleted, so a second settle finds nothing and charges nothing. Reads no clock.
-- KEYS[1] leases hash   KEYS[2] lease deadlines zset
-- ARGV[1] lease id   ARGV[2] actual tokens
-- Returns 1 if this call charged the lease, 0 if it was already settled or unknown.
local rec = redis.call('HGET', KEYS[1], ARGV[1])
if not rec then return 0 end
local state, held, list = string.match(rec, '^(%a):(%d+):?(.*)$')
local actual = tonumber(ARGV[2])
for key in string.gmatch(list, '[^,]+') do
  if redis.call('EXISTS', key) == 1 then
    -- state x: an expired lease whose reservation was already reclaimed
    if state == 'r' then redis.call('HINCRBY', key, 'reserved', -tonumber(held)) end
    if actual > 0 then redis.call('HINCRBY', key, 'used', actual) end
  end
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
