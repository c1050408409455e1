-- rebuild(now): forget sightings and pair evidence older than the window, recompute hot
-- values, pairs, links and clusters from what is left; the blocklist stays.
-- ARGV[ARG] = the least seconds since the last rebuild (0: rebuild whatever).
-- Returns 1 when it rebuilt, 0 when a rebuild was recent enough.

local gap = tonumber(ARGV[ARG])
local last = tonumber(redis.call('GET', REBUILT) or '-inf')
if gap > 0 and NOW - last < gap then return 0 end
redis.call('SET', REBUILT, fmt(NOW))
local horizon = NOW - WINDOW

-- pair evidence that is still live is kept; everything else about pairs is recomputed
local shared = {}   -- pair id -> {signal -> true}
local function mark(p, signal)
  local s = shared[p]
  if not s then s = {}; shared[p] = s end
  s[signal] = true
end
local direct = {}
for _, p in ipairs(redis.call('SMEMBERS', PAIRS)) do
  local key = pkey(p)
  local flat = redis.call('HGETALL', key)
  for i = 1, #flat, 2 do
    if string.sub(flat[i], 1, 2) == 'd|' then
      local _, seen = parse_span(flat[i + 1])
      if seen >= horizon then direct[#direct + 1] = {p, flat[i], flat[i + 1]} end
    end
  end
  redis.call('DEL', key)
end
redis.call('DEL', PAIRS)
for _, d in ipairs(direct) do
  redis.call('HSET', pkey(d[1]), d[2], d[3])
  redis.call('SADD', PAIRS, d[1])
  mark(d[1], string.sub(d[2], 3))
end

-- links and clusters start over; blocked accounts count in their own cluster
for _, a in ipairs(redis.call('SMEMBERS', ADJS)) do redis.call('DEL', akey(a)) end
for _, r in ipairs(redis.call('SMEMBERS', ROOTS)) do redis.call('DEL', gkey(r)) end
redis.call('DEL', ADJS, ROOTS, REP, CID, BIN)
for _, a in ipairs(redis.call('SMEMBERS', BLOCKED)) do redis.call('HSET', BIN, a, 1) end

local function add_share(a, b, signal, digest)
  local p = pid(a, b)
  local key = pkey(p)
  redis.call('HSET', key, 's|' .. signal .. '|' .. digest, '1')
  redis.call('HINCRBY', key, 'n|' .. signal, 1)
  redis.call('SADD', PAIRS, p)
  mark(p, signal)
end

for _, vid in ipairs(redis.call('SMEMBERS', VALUES)) do
  local vk = vkey(vid)
  local signal, digest = split_vid(vid)
  local fanout = FANOUT[signal]
  if signal == ORG then fanout = -1 end
  local flat = redis.call('HGETALL', vk)
  local live, stale = {}, {}
  for i = 1, #flat, 2 do
    local _, seen = parse_seen(flat[i + 1])
    if seen < horizon then stale[#stale + 1] = flat[i] else live[#live + 1] = flat[i] end
  end
  if #live == 0 or fanout == nil then   -- gone, or a signal the settings no longer have
    redis.call('DEL', vk)
    redis.call('SREM', VALUES, vid)
    redis.call('SREM', HOT, vid)
  else
    del_fields(vk, stale)
    if fanout < 0 then   -- org: a star around its smallest member
      local smallest = live[1]
      for i = 2, #live do
        if lt(live[i], smallest) then smallest = live[i] end
      end
      for _, a in ipairs(live) do
        if a ~= smallest then add_share(smallest, a, signal, digest) end
      end
    elseif #live > fanout then
      redis.call('SADD', HOT, vid)
    else
      redis.call('SREM', HOT, vid)
      for i = 1, #live do
        for j = i + 1, #live do add_share(live[i], live[j], signal, digest) end
      end
    end
  end
end

for p, signals in pairs(shared) do
  local total = 0
  for signal in pairs(signals) do total = total + (WEIGHT[signal] or 0) end
  redis.call('EXPIRE', pkey(p), TTL)
  if total >= THRESHOLD - EPS then
    local a, b = split_pid(p)
    redis.call('SADD', akey(a), b)
    redis.call('SADD', akey(b), a)
    redis.call('SADD', ADJS, a, b)
    union(a, b)
  end
end
return 1
