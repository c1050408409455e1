-- Admission: all of a request's store work in one atomic call (state/admission_redis.py);
-- concurrent requests share a call (a group commit), each judged on its own, in turn.
-- Prepended, in order: [linkage_common.lua, linkage_record.lua] when a request of the
-- call records linkage evidence, lease_common.lua, quota_windows.lua, then a head that
-- sets A (where this script's ARGV start) and, without linkage, record_request.
--
-- ARGV[A..]: now ('' = the store's clock, TIME), grace (s), n requests; then per request:
-- the number of its arguments that follow, its marker key ('' none: see the loop below),
-- 1 and record_request's arguments (linkage_record.lua) or 0, n ops, then the ops in
-- the pipeline's order (phase, then file order):
--   'q' shadow strategy(f|m|s) nparts part.. nwin (limit seconds)..     a quota rule
--   'b' shadow nparts part.. lease generates pw prompt cw copies cap clamp min ttl
--       nwin (limit seconds)..                                         a budget rule
--   'g' shadow max_accounts(0: none) blocked(0|1)                        a linkage rule
--   'x' 0                                  a rule that denied without the store
-- A key is given as parts joined by the request's escaped cluster id (per: cluster:
-- the id is known only here, after the record); one part means no cluster in it.
-- The first enforced denial stops the request: the budgets reserved before it are
-- released and no quota counts it. Otherwise every quota window that allowed it counts
-- it.
--
-- Returns {now seconds, now micros (or the given now, '0'), events {kind, json, ..},
-- per request {cluster {id, size, blocked} or {}, results} or {'e', error}}: per op,
--   q: {status, denied window (0: none), remaining.., reset..} (once the request
--      counted, when it did; as found when it did not)
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
local GRACE, NREQ = tonumber(ARGV[A + 1]), tonumber(ARGV[A + 2])

local function fmt(x) return string.format('%.17g', x) end

local function escaped(id)   -- as guards/per.py _escaped
  if id ~= '' and string.find(id, '[%%|%z]') then
    return (string.gsub(string.gsub(string.gsub(id, '%%', '%%25'), '|', '%%7C'), '%z', '%%00'))
  end
  return id
end

-- the key at ARGV[i]: n parts joined by the escaped cluster id; returns key, next index
local function key_at(i, cid)
  local n = tonumber(ARGV[i])
  if n == 1 then return ARGV[i + 1], i + 2 end
  local parts = {}
  for j = 1, n do parts[j] = ARGV[i + j] end
  return table.concat(parts, cid), i + n + 1
end

local function windows_at(i)
  local n, wins = tonumber(ARGV[i]), {}
  for j = 1, n do wins[j] = {tonumber(ARGV[i + 2 * j - 1]), tonumber(ARGV[i + 2 * j])} end
  return wins, i + 2 * n + 1
end

local function skip(i, kind)   -- the index after an op's arguments (i: after its kind)
  if kind == 'q' then
    local _, j = key_at(i + 2, '')
    local _, after = windows_at(j)
    return after
  elseif kind == 'b' then
    local _, j = key_at(i + 1, '')
    local _, after = windows_at(j + 10)
    return after
  elseif kind == 'g' then
    return i + 3
  end
  return i + 1
end

local function truncate(x)   -- Python's int(): toward zero
  if x < 0 then return math.ceil(x) end
  return math.floor(x)
end

-- a quota rule: every window must have room for one more
local function quota(i, cid)
  local strategy = ARGV[i]
  local tag, j = key_at(i + 1, cid)
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
  if denied == 0 then hit = {strategy = strategy, keys = keys, wins = wins, out = out} end
  return out, hit, after
end

-- a budget rule: reserve prompt + cap x copies in every window (clamping the cap to what
-- is left when the rule says so); the cap an earlier budget rule settled on (`running`)
-- replaces the rule's own. Returns out, the lease held, the cap to carry on, next index.
local function budget(i, shadow, cid, running)
  local tag, j = key_at(i, cid)
  local leases, deadlines = tag .. ':leases', tag .. ':deadlines'
  local id, generates = ARGV[j], ARGV[j + 1] == '1'
  local pw, prompt, cw = tonumber(ARGV[j + 2]), tonumber(ARGV[j + 3]), tonumber(ARGV[j + 4])
  local copies, cap = tonumber(ARGV[j + 5]), tonumber(ARGV[j + 6])
  local clamp, least, ttl = ARGV[j + 7] == '1', tonumber(ARGV[j + 8]), tonumber(ARGV[j + 9])
  local wins, after = windows_at(j + 10)
  if not generates then cap = 0 elseif running then cap = running end
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
  -- a call resent after a lost reply holds its lease already: never reserve twice, and
  -- never deny for want of the tokens that very lease holds
  local again = redis.call('HEXISTS', leases, id) == 1
  if again then ok = true end
  if ok and not again then
    for w = 1, #wins do
      redis.call('HINCRBY', keys[w], 'reserved', amount)
      redis.call('EXPIRE', keys[w], expiries[w])
      left[w] = left[w] - amount
    end
    redis.call('HSET', leases, id, 'r:' .. string.format('%d', amount) .. ':'
               .. table.concat(keys, ','))
    redis.call('ZADD', deadlines, NOW + ttl, id)
    redis.call('EXPIRE', leases, longest)
    redis.call('EXPIRE', deadlines, longest)
  end
  if ok and generates and not shadow then running = cap end
  local out = {ok and 1 or 0, amount, cap}
  for w = 1, #wins do out[3 + w] = left[w] end
  for w = 1, #wins do out[3 + #wins + w] = fmt(resets[w]) end
  local held = nil
  if ok and not again then held = {leases, deadlines, id} end
  return out, held, running, after
end

-- a linkage rule: on the cluster this call recorded
local function gate(i, cluster)
  local most, blocked = tonumber(ARGV[i]), ARGV[i + 1] == '1'
  local ok = 1
  if cluster then
    if most > 0 and tonumber(cluster[2]) > most then ok = 0 end
    if blocked and tonumber(cluster[3]) > 0 then ok = 0 end
  end
  return {ok}
end

-- one request from ARGV[i]: its record, then its ops; returns {cluster, results}.
-- `held` collects its leases as they are taken (released by the caller on an error).
local function request(i, held)
  local cluster = nil
  if ARGV[i] == '1' then cluster, i = record_request(i + 1) else i = i + 1 end
  local cid = cluster and escaped(cluster[1]) or ''
  local n = tonumber(ARGV[i])
  i = i + 1
  local results, hits = {}, {}
  local running, stopped = nil, false
  for op = 1, n do
    local kind, shadow = ARGV[i], ARGV[i + 1] == '1'
    local out, extra
    if stopped then
      out, i = {-1}, skip(i + 1, kind)
    elseif kind == 'q' then
      out, extra, i = quota(i + 2, cid)
      if extra then hits[#hits + 1] = extra end
    elseif kind == 'b' then
      out, extra, running, i = budget(i + 2, shadow, cid, running)
      if extra then held[#held + 1] = extra end
    elseif kind == 'g' then
      out, i = gate(i + 2, cluster), i + 4
    else
      out, i = {0}, i + 2
    end
    results[op] = out
    if out[1] == 0 and not shadow then stopped = true end
  end
  if stopped then   -- nothing of a denied request stays counted or reserved
    for _, h in ipairs(held) do settle_lease(h[1], h[2], h[3], 0) end
  else
    for _, h in ipairs(hits) do
      local n = #h.wins
      for w = 1, n do
        window_hit(h.strategy, h.keys[w], h.wins[w][1], h.wins[w][2], NOW, 1)
      end
      for w = 1, n do   -- what the headers say: the windows once this request counted
        local left, reset = window_peek(h.strategy, h.keys[w], h.wins[w][1], h.wins[w][2], NOW)
        h.out[2 + w], h.out[2 + n + w] = left, fmt(reset)
      end
    end
  end
  return {cluster or {}, results}
end

-- Per request: its length, its marker key ('' none), then what request() reads. A
-- request whose marker is set was judged by an earlier send of this call (redis-py on
-- Cluster resends after a lost reply): its first answer is given again, nothing is
-- counted twice. A request that fails (a Redis error in one of its ops) gives back the
-- leases it took and answers {'e', message}; the others of the call are unaffected.
local replies, i = {}, A + 3
for r = 1, NREQ do
  local after, marker = i + 1 + tonumber(ARGV[i]), ARGV[i + 1]
  local prior = marker ~= '' and redis.call('GET', marker)
  if prior then
    replies[r] = cjson.decode(prior)
  else
    local held = {}
    local ok, reply = pcall(request, i + 2, held)
    if ok then
      replies[r] = reply
      if marker ~= '' then redis.call('SET', marker, cjson.encode(reply), 'EX', 30) end
    else
      for _, h in ipairs(held) do pcall(settle_lease, h[1], h[2], h[3], 0) end
      replies[r] = {'e', tostring(reply)}
    end
  end
  i = after
end
return {T[1], T[2], EVENTS, replies}
