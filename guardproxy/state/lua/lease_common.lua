-- Shared by the budget scripts (budget_*.lua): budgets.py prepends this file.
-- Every time here comes from the store's own clock (TIME), never from a replica's: two
-- replicas whose clocks disagree still count into the same windows and never reclaim
-- each other's live leases. Redis >= 5 replicates script effects, so TIME is allowed
-- before writes.

-- Now on the store's clock, in seconds, plus TIME's raw {seconds, microseconds}.
local function store_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000, t
end

-- A lease record is "state:amount:windowkey,windowkey" with state r (reserved) or
-- x (expired and reclaimed; kept for a grace period so a late settle still charges).
local function lease_of(rec)
  local state, held, list = string.match(rec, '^(%a):(%d+):?(.*)$')
  return state, tonumber(held), list
end

-- A replica that died mid-request must not hold budget: reclaim expired leases.
local function reclaim(leases, deadlines, now, grace)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', deadlines, '-inf', now)) do
    local rec = redis.call('HGET', leases, id)
    local state, held, list = nil, 0, ''
    if rec then state, held, list = lease_of(rec) end
    if state == 'r' then
      for key in string.gmatch(list, '[^,]+') do
        -- held > 0: Lua writes -0 as "-0", which HINCRBY refuses
        if held > 0 and redis.call('EXISTS', key) == 1 then
          redis.call('HINCRBY', key, 'reserved', -held)
        end
      end
      redis.call('HSET', leases, id, 'x:' .. held .. ':' .. list)
      redis.call('ZADD', deadlines, now + grace, id)
    else
      redis.call('HDEL', leases, id)
      redis.call('ZREM', deadlines, id)
    end
  end
end

-- The current window of a budget window: its key (prefix .. ':' .. index) and reset time.
-- Window lengths are whole seconds, so indexes and resets are whole numbers.
local function window_at(prefix, seconds, now)
  local index = math.floor(now / seconds)
  return prefix .. ':' .. string.format('%d', index), (index + 1) * seconds
end


-- Settle (or release, with actual = 0) one lease, idempotently: the lease record is
-- deleted, so a second settle finds nothing and charges nothing. Reads no clock.
-- leases, deadlines: the subject's leases hash and lease deadlines zset.
-- Returns 1 if this call charged the lease, 0 if it was already settled or unknown.
local function settle_lease(leases, deadlines, id, actual)
  local rec = redis.call('HGET', leases, id)
  if not rec then return 0 end
  local state, held, list = lease_of(rec)
  for key in string.gmatch(list, '[^,]+') do
    if redis.call('EXISTS', key) == 1 then
      -- state x: an expired lease whose reservation was already reclaimed
      if state == 'r' and held > 0 then redis.call('HINCRBY', key, 'reserved', -held) end
      if actual > 0 then redis.call('HINCRBY', key, 'used', actual) end
    end
  end
  redis.call('HDEL', leases, id)
  redis.call('ZREM', deadlines, id)
  return 1
end
