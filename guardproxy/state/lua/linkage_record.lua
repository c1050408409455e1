-- record(account, evidence, now, pairs): one request's sightings, then its pair evidence
-- (co-held hot values, linkage/cohort.py), then the account's cluster. Functions only:
-- linkage_record_main.lua (alone) and admit.lua (admission) call record_request.

local function seq() return redis.call('INCR', SEQ) end

-- whether the account may show a value of the signal new to it (graph.py _admit): at
-- most CAP first shown within the window
local function admit(account, signal, digest)
  local nk = B .. ':n:' .. #account .. ':' .. account .. signal
  if redis.call('ZSCORE', nk, digest) then return true end
  if redis.call('ZCARD', nk) >= CAP then
    redis.call('ZREMRANGEBYSCORE', nk, '-inf', '(' .. fmt(NOW - WINDOW))
    if redis.call('ZCARD', nk) >= CAP then return false end
  end
  redis.call('ZADD', nk, fmt(NOW), digest)
  redis.call('EXPIRE', nk, TTL)
  return true
end

local function see(account, signal, digest)
  local fanout = FANOUT[signal] or -1   -- -1: org (never hot; a star around its smallest)
  local vid = signal .. '|' .. digest
  local vk = vkey(vid)
  local horizon = NOW - WINDOW
  local raw = redis.call('HGET', vk, account)
  if raw then
    local first, last = parse_seen(raw)
    if last >= horizon then   -- a live member again: the fast path
      redis.call('HSET', vk, account, fmt(first) .. ' ' .. fmt(math.max(last, NOW)) .. ' ' .. seq())
      redis.call('EXPIRE', vk, TTL)
      return
    end
  end
  if fanout >= 0 and not admit(account, signal, digest) then return end
  local hot = redis.call('SISMEMBER', HOT, vid) == 1
  local flat = redis.call('HGETALL', vk)
  local live, stale = {}, {}
  for i = 1, #flat, 2 do
    local _, last, order = parse_seen(flat[i + 1])
    if last < horizon then stale[#stale + 1] = flat[i] else live[#live + 1] = {flat[i], order} end
  end
  if #stale > 0 then   -- stale sightings leave, and so does what they shared
    del_fields(vk, stale)
    if not hot then
      for i, s in ipairs(stale) do
        for j = i + 1, #stale do withdraw(s, stale[j], signal, digest) end
        for _, e in ipairs(live) do withdraw(s, e[1], signal, digest) end
      end
    end
  end
  table.sort(live, function(x, y) return x[2] < y[2] end)
  local members = {}
  for i, e in ipairs(live) do members[i] = e[1] end
  redis.call('HSET', vk, account, fmt(NOW) .. ' ' .. fmt(NOW) .. ' ' .. seq())
  redis.call('EXPIRE', vk, TTL)
  redis.call('SADD', VALUES, vid)
  if fanout < 0 then
    if #members > 0 then
      local smallest = members[1]
      for i = 2, #members do
        if lt(members[i], smallest) then smallest = members[i] end
      end
      share(account, smallest, signal, digest)
    end
    return
  end
  local count = #members + 1
  if count > fanout then
    if not hot then
      redis.call('SADD', HOT, vid)
      for i = 1, #members do
        for j = i + 1, #members do withdraw(members[i], members[j], signal, digest) end
      end
      event('hot', {signal = signal, digest = digest, accounts = count})
    end
    local drop = count - math.max(fanout + 1, HOT_COUNT_CAP)
    if drop > 0 then   -- keep the most recently seen: the oldest go first
      local gone = {}
      for i = 1, drop do gone[i] = members[i] end
      del_fields(vk, gone)
    end
    return
  end
  if hot then   -- back within its fan-out: every live pair counts again
    redis.call('SREM', HOT, vid)
    members[#members + 1] = account
    for i = 1, #members do
      for j = i + 1, #members do share(members[i], members[j], signal, digest) end
    end
    return
  end
  for _, other in ipairs(members) do share(account, other, signal, digest) end
end

-- One request's record from ARGV[i]: account, n, n (a, b, signal) triples, m, then m
-- (signal, digest) pairs. Returns the account's cluster {id, size, blocked} and the
-- index after its arguments (admit.lua goes on reading there).
local function record_request(i)
  local account = ARGV[i]
  local triples = i + 2
  local values = triples + 3 * tonumber(ARGV[i + 1])
  local after = values + 1 + 2 * tonumber(ARGV[values])
  for j = values + 1, after - 1, 2 do
    see(account, ARGV[j], ARGV[j + 1])
  end
  for j = triples, values - 1, 3 do
    add_pair(ARGV[j], ARGV[j + 1], ARGV[j + 2])
  end
  return cluster(account), after
end
