-- Reads, each one consistent snapshot. ARGV[ARG] = what, ARGV[ARG+1] = the account:
--   cluster  -> {id, size, linked_to_blocked}
--   members  -> the cluster's accounts (unsorted)
--   links    -> {a, b, {signal, first, last, ...}, ...} for every link in the cluster
--   graph    -> {{id, {members}, {links as above}}, ...}, {{value id, accounts}, ...}
--   blocked  -> the blocklist

local function members(account)
  local m = redis.call('SMEMBERS', gkey(find(account)))
  if #m == 0 then m = {account} end
  return m
end

-- the evidence a linked pair shares now: per signal, the span of the sightings
local function evidence(a, b)
  local p = pid(a, b)
  local flat = redis.call('HGETALL', pkey(p))
  local spans, out = {}, {}
  for i = 1, #flat, 2 do
    local f = flat[i]
    local kind = string.sub(f, 1, 2)
    if kind == 's|' then
      local signal, digest = split_vid(string.sub(f, 3))
      local seen = redis.call('HMGET', vkey(signal .. '|' .. digest), a, b)
      if seen[1] and seen[2] then
        local fa, la = parse_seen(seen[1])
        local fb, lb = parse_seen(seen[2])
        local first, last = math.max(fa, fb), math.max(la, lb)
        local span = spans[signal]
        if span then
          span[1], span[2] = math.min(span[1], first), math.max(span[2], last)
        else
          spans[signal] = {first, last}
        end
      end
    elseif kind == 'd|' then
      local first, last = parse_span(flat[i + 1])
      out[#out + 1] = string.sub(f, 3)
      out[#out + 1] = fmt(first)
      out[#out + 1] = fmt(last)
    end
  end
  for signal, span in pairs(spans) do
    out[#out + 1] = signal
    out[#out + 1] = fmt(span[1])
    out[#out + 1] = fmt(span[2])
  end
  return out
end

local function links(account)
  local out = {}
  for _, a in ipairs(members(account)) do
    for _, b in ipairs(redis.call('SMEMBERS', akey(a))) do
      if lt(a, b) then
        out[#out + 1] = a
        out[#out + 1] = b
        out[#out + 1] = evidence(a, b)
      end
    end
  end
  return out
end

local what, account = ARGV[ARG], ARGV[ARG + 1]
if what == 'cluster' then return cluster(account) end
if what == 'members' then return members(account) end
if what == 'links' then return links(account) end
if what == 'blocked' then return redis.call('SMEMBERS', BLOCKED) end
local clusters, hot = {}, {}
for _, rep in ipairs(redis.call('SMEMBERS', ROOTS)) do
  clusters[#clusters + 1] = {redis.call('HGET', CID, rep), members(rep), links(rep)}
end
for _, vid in ipairs(redis.call('SMEMBERS', HOT)) do
  local n = redis.call('HLEN', vkey(vid))
  if n > 0 then
    hot[#hot + 1] = vid
    hot[#hot + 1] = n
  end
end
return {clusters, hot}
