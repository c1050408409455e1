-- Account linkage in Redis: the helpers every linkage script shares.
-- The semantics are guardproxy/linkage/graph.py's LinkGraph (the reference); this file
-- says only how they are stored. KEYS[1] is the base name, which carries the hash tag:
-- every key below is derived from it, so all of them live in one Redis Cluster slot.
--
--   B:v:<signal>|<digest>  hash   account -> "first last seq"   (a value's sightings; TTL)
--   B:values               set    value ids (<signal>|<digest>) that may exist
--   B:hot                  set    value ids that are hot
--   B:seq                  string sighting counter: the order of sightings (LRU trimming)
--   B:p:<len(a)>:<a><b>    hash   a pair (a < b): "s|<signal>|<digest>" -> 1 (shared),
--                                 "n|<signal>" -> digests shared, "d|<signal>" -> "first last"
--                                 (pair evidence); TTL
--   B:pairs                set    pair ids that may exist
--   B:a:<account>          set    the accounts it is linked to
--   B:adjs                 set    accounts with links
--   B:rep                  hash   account -> representative of its cluster (2+ accounts)
--   B:g:<rep>              set    the cluster's members (2+ accounts)
--   B:cid                  hash   rep -> cluster id (its smallest member)
--   B:roots                set    reps of clusters of 2+
--   B:bin                  hash   rep (or lone account) -> blocked members
--   B:blocked              set    the blocklist (never expires)
--   B:rebuilt              string time of the last rebuild
--   B:n:<len(a)>:<a><signal> zset  digest -> first shown: an account's new values (TTL)
--
-- Clusters are kept by "weighted quick-find": every member points at its rep directly
-- and a merge relabels the smaller cluster, so reading a cluster is O(1) and all merges
-- together cost O(n log n). The id is tracked separately: the smallest member, as the
-- reference's root. Account ids are compared bytewise (lt), as Python compares str:
-- Lua's own '<' follows the server's locale.
--
-- ARGV: now, window, threshold, ttl, max values per account, n, then n triples (signal,
-- weight, fanout; fanout -1 for pair signals), then the script's own arguments from
-- ARGV[7 + 3n].

local B = KEYS[1]
local NOW = tonumber(ARGV[1])
local WINDOW = tonumber(ARGV[2])
local THRESHOLD = tonumber(ARGV[3])
local TTL = tonumber(ARGV[4])
local EPS = 1e-9
local HOT_COUNT_CAP = 64
local ORG = 'org'
local WEIGHT, FANOUT = {}, {}
local CAP = tonumber(ARGV[5])   -- new values an account may show per signal in the window
local NSIG = tonumber(ARGV[6])
for i = 0, NSIG - 1 do
  local s = ARGV[7 + 3 * i]
  WEIGHT[s] = tonumber(ARGV[8 + 3 * i])
  FANOUT[s] = tonumber(ARGV[9 + 3 * i])
end
WEIGHT[ORG] = THRESHOLD
local ARG = 7 + 3 * NSIG
local EVENTS = {}

local VALUES, HOT, SEQ = B .. ':values', B .. ':hot', B .. ':seq'
local PAIRS, ADJS, REP, CID = B .. ':pairs', B .. ':adjs', B .. ':rep', B .. ':cid'
local ROOTS, BIN, BLOCKED, REBUILT = B .. ':roots', B .. ':bin', B .. ':blocked', B .. ':rebuilt'

local function vkey(vid) return B .. ':v:' .. vid end
local function akey(a) return B .. ':a:' .. a end
local function gkey(r) return B .. ':g:' .. r end
local function pkey(p) return B .. ':p:' .. p end

local function lt(a, b)
  if a == b then return false end
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

local function fmt(x) return string.format('%.17g', x) end

-- a pair's id and its two accounts in order
local function pid(a, b)
  if lt(b, a) then a, b = b, a end
  return #a .. ':' .. a .. b, a, b
end

local function split_pid(p)
  local n, rest = string.match(p, '^(%d+):(.*)$')
  n = tonumber(n)
  return string.sub(rest, 1, n), string.sub(rest, n + 1)
end

-- "<signal>|<digest>" (the digest is hex: the last '|' splits)
local function split_vid(vid)
  return string.match(vid, '^(.*)|([^|]*)$')
end

local function parse_seen(raw)
  local f, l, s = string.match(raw, '^(%S+) (%S+) (%S+)$')
  return tonumber(f), tonumber(l), tonumber(s)
end

local function parse_span(raw)
  local f, l = string.match(raw, '^(%S+) (%S+)$')
  return tonumber(f), tonumber(l)
end

local function event(kind, fields)
  EVENTS[#EVENTS + 1] = kind
  EVENTS[#EVENTS + 1] = cjson.encode(fields)
end

local function del_fields(key, fields)
  for i = 1, #fields, 500 do
    redis.call('HDEL', key, unpack(fields, i, math.min(i + 499, #fields)))
  end
end

-- union-find ------------------------------------------------------------------
local function find(a)
  return redis.call('HGET', REP, a) or a
end

local function group(r)
  local m = redis.call('SMEMBERS', gkey(r))
  if #m == 0 then m = {r} end
  return m
end

-- join the clusters of a and b: the new cluster id, its size and the id that
-- disappeared into it (nil: already one)
local function union(a, b)
  local ra, rb = find(a), find(b)
  if ra == rb then return nil end
  local ma, mb = group(ra), group(rb)
  if #ma < #mb then ra, rb, ma, mb = rb, ra, mb, ma end
  local ida = redis.call('HGET', CID, ra) or ra
  local idb = redis.call('HGET', CID, rb) or rb
  local g = gkey(ra)
  if #ma == 1 then
    redis.call('SADD', g, ra)
    redis.call('HSET', REP, ra, ra)
  end
  for _, m in ipairs(mb) do
    redis.call('HSET', REP, m, ra)
    redis.call('SADD', g, m)
  end
  redis.call('DEL', gkey(rb))
  redis.call('SREM', ROOTS, rb)
  redis.call('HDEL', CID, rb)
  redis.call('SADD', ROOTS, ra)
  local id, gone = ida, idb
  if lt(idb, ida) then id, gone = idb, ida end
  redis.call('HSET', CID, ra, id)
  local blocked = tonumber(redis.call('HGET', BIN, rb) or '0')
  if blocked ~= 0 then
    redis.call('HINCRBY', BIN, ra, blocked)
    redis.call('HDEL', BIN, rb)
  end
  return id, #ma + #mb, gone
end

local function cluster(account)
  local rep = find(account)
  local id, size = account, 1
  local n = redis.call('SCARD', gkey(rep))
  if n > 0 then
    id = redis.call('HGET', CID, rep)
    size = n
  end
  -- the account itself counts: a blocked account is linked to a blocked account
  local blocked = tonumber(redis.call('HGET', BIN, rep) or '0')
  return {id, size, blocked > 0 and 1 or 0}
end

-- pairs and links -----------------------------------------------------------------
-- the signals a pair shares now, and their summed weight
local function weight(key)
  local flat = redis.call('HGETALL', key)
  local total, signals = 0, {}
  for i = 1, #flat, 2 do
    local f = flat[i]
    local kind, signal = string.sub(f, 1, 2), string.sub(f, 3)
    if (kind == 'n|' and tonumber(flat[i + 1]) > 0) or kind == 'd|' then
      if not signals[signal] then
        signals[signal] = true
        total = total + (WEIGHT[signal] or 0)
      end
    end
  end
  local names = {}
  for s in pairs(signals) do names[#names + 1] = s end
  return total, names
end

local function link(a, b, w, names)
  redis.call('SADD', akey(a), b)
  redis.call('SADD', akey(b), a)
  redis.call('SADD', ADJS, a, b)
  event('link', {a = a, b = b, weight = w, signals = names, time = NOW})
  local id, size, gone = union(a, b)
  -- absorbed: the id that disappeared (its usage is carried, linkage/carry.py)
  if id then event('merge', {cluster = id, absorbed = gone, size = size}) end
end

local function check(a, b, key)
  if redis.call('SISMEMBER', akey(a), b) == 1 then return end
  local w, names = weight(key)
  if w >= THRESHOLD - EPS then link(a, b, w, names) end
end

local function share(a, b, signal, digest)
  local p, x, y = pid(a, b)
  local key = pkey(p)
  if redis.call('HSETNX', key, 's|' .. signal .. '|' .. digest, '1') == 1 then
    local n = redis.call('HINCRBY', key, 'n|' .. signal, 1)
    redis.call('SADD', PAIRS, p)
    redis.call('EXPIRE', key, TTL)
    if n == 1 then check(x, y, key) end
  end
end

local function withdraw(a, b, signal, digest)
  local p = pid(a, b)
  local key = pkey(p)
  if redis.call('HDEL', key, 's|' .. signal .. '|' .. digest) == 1 then
    if redis.call('HINCRBY', key, 'n|' .. signal, -1) <= 0 then
      redis.call('HDEL', key, 'n|' .. signal)
    end
    if redis.call('EXISTS', key) == 0 then redis.call('SREM', PAIRS, p) end
  end
end

-- pair evidence of a signal (graph.py record_pairs): a new one may link the pair
local function add_pair(a, b, signal)
  local p, x, y = pid(a, b)
  local key, field = pkey(p), 'd|' .. signal
  local raw = redis.call('HGET', key, field)
  if raw then
    local first, last = parse_span(raw)
    redis.call('HSET', key, field, fmt(first) .. ' ' .. fmt(math.max(last, NOW)))
    redis.call('EXPIRE', key, TTL)
  else
    redis.call('HSET', key, field, fmt(NOW) .. ' ' .. fmt(NOW))
    redis.call('EXPIRE', key, TTL)
    redis.call('SADD', PAIRS, p)
    check(x, y, key)
  end
end
