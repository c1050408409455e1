-- Admission: all of one request's store work in one atomic call (state/admission_redis.py).
-- Prepended, in order: [linkage_common.lua, linkage_record.lua] when the batch records
-- the request's linkage evidence, lease_common.lua, quota_windows.lua, then a head that
-- sets CLUSTER (the record_request reply, or nil) and A (where this script's ARGV start).
--
-- ARGV[A..]: now ('' = the store's clock, TIME), grace (s), n ops, then
-- the ops in the pipeline's order (phase, then file order):
--   'q' shadow strategy(f|m|s) nparts part.. nwin (limit seconds)..     a quota rule
--   'b' shadow nparts part.. lease generates pw prompt cw copies cap clamp min ttl
--       nwin (limit seconds)..                                         a budget rule
--   'g' shadow max_accounts(0: none) blocked(0|1)                        a linkage rule
--   'x' 0                                  a rule that denied without the store
-- A key is given as parts joined by the request's escaped cluster id (per: cluster:
-- the id is known only here, after the record); one part means no cluster in it.
-- The first enforced denial stops: the budgets reserved before it are released and no
-- quota counts the request. Otherwise every quota window that allowed it counts it.
--
-- Returns {now seconds, now micros (or the given now, twice), cluster {id, size,
-- blocked} or {}, events {kind, json, ...}, results}: per op, in order,
--   q: {status, denied window (0: none), remaining.., reset..}
--   b: {status, amount, cap, remaining.., reset..}
--   g, x: {status}
-- status 1 allowed, 0 denied, -1 not evaluated (an earlier enforced denial). Times are
-- strings: Redis would truncate Lua numbers.

local NOW, T
if ARGV[A] == '' then
  NOW, T = store_now()
else
  NOW = tonumber(ARGV[A])
  T = {ARGV[A], '0'}
end
local GRACE, NOPS = tonumber(ARGV[A + 1]), tonumber(ARGV[A + 2])
local CID = ''
if CLUSTER then
  CID = CLUSTER[1]
  if CID ~= '' and string.find(CID, '[%%|%z]') then   -- as guards/per.py _escaped
    CID = string.gsub(string.gsub(string.gsub(CID, '%%', '%%25'), '|', '%%7C'), '%z', '%%00')
  end
end

local function fmt(x) return string.format('%.17g', x) end

-- the key at ARGV[i]: n parts joined by the escaped cluster id; returns key, next index
local function key_at(i)
  local n = tonumber(ARGV[i])
  if n == 1 then return ARGV[i + 1], i + 2 end
  local parts = {}
  for j = 1, n do parts[j] = ARGV[i + j] end
  return table.concat(parts, CID), i + n + 1
end

local function windows_at(i)
  local n, wins = tonumber(ARGV[i]), {}
  for j = 1, n do wins[j] = {tonumber(ARGV[i + 2 * j - 1]), tonumber(ARGV[i + 2 * j])} end
  return wins, i + 2 * n + 1
end

local function truncate(x)   -- Python's int(): toward zero
  if x < 0 then return math.ceil(x) end
  return math.floor(x)
end

-- a quota rule: every window must have room for one more
local function quota(i, shadow)
  local strategy = ARGV[i]
  local tag, j = key_at(i + 1)
  local wins, after = windows_at(j)
  local keys, out, denied = {}, {1, 0}, 0
  local remaining, resets = {}, {}
  for w = 1, #wins do
    keys[w] = tag .. ':' .. strategy .. wins[w][2]
    local left, reset = window_peek(strategy, keys[w], wins[w][1], wins[w][2], NOW)
    remaining[w], resets[w] = left, reset
    if left < 1 and denied == 0 then denied = w end
  end
  if denied > 0 then out[1], out[2] = 0, denied end
  for w = 1, #wins do out[2 + w] = remaining[w] end
  for w = 1, #wins do out[2 + #wins + w] = fmt(resets[w]) end
  local hit = nil
  if denied == 0 then hit = {strategy = strategy, keys = keys, wins = wins} end
  return out, hit, after
end

-- a budget rule: reserve prompt + cap x copies in every window (clamping the cap to what
-- is left when the rule says so); cap 0 takes the cap an earlier budget rule settled on
local RUNNING_CAP = nil
local function budget(i, shadow)
  local tag, j = key_at(i)
  local leases, deadlines = tag .. ':leases', tag .. ':deadlines'
  local id, generates = ARGV[j], ARGV[j + 1] == '1'
  local pw, prompt, cw = tonumber(ARGV[j + 2]), tonumber(ARGV[j + 3]), tonumber(ARGV[j + 4])
  local copies, cap = tonumber(ARGV[j + 5]), tonumber(ARGV[j + 6])
  local clamp, least, ttl = ARGV[j + 7] == '1', tonumber(ARGV[j + 8]), tonumber(ARGV[j + 9])
  local wins, after = windows_at(j + 10)
  if not generates then cap = 0 elseif RUNNING_CAP then cap = RUNNING_CAP end
  reclaim(leases, deadlines, NOW, GRACE)
  local keys, resets, left, expiries = {}, {}, {}, {}
  local smallest, longest = nil, GRACE
  for w = 1, #wins do
    local key, reset = window_at(tag .. ':w' .. wins[w][2], wins[w][2], NOW)
    local vals = redis.call('HMGET', key, 'used', 'reserved')
    left[w] = wins[w][1] - (tonumber(vals[1]) or 0) - (tonumber(vals[2]) or 0)
    keys[w], resets[w] = key, reset
    expiries[w] = math.ceil(reset - NOW + GRACE)
    longest = math.max(longest, expiries[w])
    if not smallest or left[w] < smallest then smallest = left[w] end
  end
  local amount = math.ceil(pw * prompt + cw * (cap * copies))
  local ok = smallest >= amount
  if not ok and clamp and generates and not shadow and cw > 0 then
    local room = truncate((smallest - pw * prompt) / (cw * copies))
    if least <= room and room < cap then
      local fits = math.ceil(pw * prompt + cw * (room * copies))
      if smallest >= fits then ok, amount, cap = true, fits, room end
    end
  end
  -- a batch resent after a lost reply holds its lease already: never reserve twice
  local again = redis.call('HEXISTS', leases, id) == 1
  if ok and not again then
    for w = 1, #wins do
      redis.call('HINCRBY', keys[w], 'reserved', amount)
      redis.call('EXPIRE', keys[w], expiries[w])
      left[w] = left[w] - amount
    end
    redis.call('HSET', leases, id, 'r:' .. amount .. ':' .. table.concat(keys, ','))
    redis.call('ZADD', deadlines, NOW + ttl, id)
    redis.call('EXPIRE', leases, longest)
    redis.call('EXPIRE', deadlines, longest)
  end
  if ok and generates and not shadow then RUNNING_CAP = cap end
  local out = {ok and 1 or 0, amount, cap}
  for w = 1, #wins do out[3 + w] = left[w] end
  for w = 1, #wins do out[3 + #wins + w] = fmt(resets[w]) end
  local held = nil
  if ok and not again then held = {leases, deadlines, id} end
  return out, held, after
end

-- a linkage rule: on the cluster this call recorded
local function gate(i)
  local most, blocked = tonumber(ARGV[i]), ARGV[i + 1] == '1'
  local ok = 1
  if CLUSTER then
    if most > 0 and tonumber(CLUSTER[2]) > most then ok = 0 end
    if blocked and tonumber(CLUSTER[3]) > 0 then ok = 0 end
  end
  return {ok}, i + 2
end

local results, hits, held = {}, {}, {}
local i, stopped = A + 3, false
for n = 1, NOPS do
  local kind, shadow = ARGV[i], ARGV[i + 1] == '1'
  local out, extra
  if stopped then
    out = {-1}
    if kind == 'q' then   -- skip its arguments
      local _, j = key_at(i + 3)
      _, i = windows_at(j)
    elseif kind == 'b' then
      local _, j = key_at(i + 2)
      _, i = windows_at(j + 10)
    elseif kind == 'g' then i = i + 4
    else i = i + 2 end
  elseif kind == 'x' then
    out, i = {0}, i + 2
  elseif kind == 'q' then
    out, extra, i = quota(i + 2, shadow)
    if extra then hits[#hits + 1] = extra end
  elseif kind == 'b' then
    out, extra, i = budget(i + 2, shadow)
    if extra then held[#held + 1] = extra end
  else
    out, i = gate(i + 2)
  end
  results[n] = out
  if out[1] == 0 and not shadow then stopped = true end
end

if stopped then   -- nothing of a denied request stays counted or reserved
  for _, h in ipairs(held) do settle_lease(h[1], h[2], h[3], 0) end
else
  for _, h in ipairs(hits) do
    for w = 1, #h.wins do
      window_hit(h.strategy, h.keys[w], h.wins[w][1], h.wins[w][2], NOW, 1)
    end
  end
end

local cluster = {}
if CLUSTER then cluster = CLUSTER end
return {T[1], T[2], cluster, EVENTS, results}
