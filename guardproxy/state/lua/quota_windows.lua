-- Quota windows: the `limits` library's three strategies (limits 5.8, its in-memory
-- storage as the reference), float for float; the twin of state/windows.py, and checked
-- against both and `limits` itself in tests/test_quota_windows.py. Prepended to other
-- scripts: local functions only.
--
-- strategy: 'f' fixed window, 'm' moving window, 's' sliding window counter
-- key: the window's own key (one strategy per key; it carries the hash tag)
-- limit: integer; seconds: the window's length (integer); now: unix seconds (float),
-- given by the caller. All meaning comes from `now` and timestamps stored in the data;
-- EXPIRE only collects garbage (computed from `seconds`, never from `now`).
--
-- Layouts:
--   'f' hash {c = count, x = closes at}: opens at its first hit, closed from `x` on.
--   's' hash {c<i> = count, x<i> = expires at} per epoch-aligned window i =
--       int(now / seconds), expiring 2 windows after its first hit (limits' incr);
--       windows that can no longer be read are deleted when a new one opens (<= 3 kept).
--   'm' sorted set, a member per counted request, score = when it was counted, member
--       = '<score>#<seq, 12 digits>' (unique among equal scores); at most `limit` kept.
--
-- remaining is what limits' get_window_stats reports, except where limits contradicts
-- itself (stats with room that its hit then refuses; see state/windows.py): 0 there.

local function qw_fmt(x) return string.format('%.17g', x) end

local function qw_mod(a, b)   -- Python's float %: the sign of the divisor
  local m = math.fmod(a, b)
  if m ~= 0 and (m < 0) ~= (b < 0) then m = m + b end
  return m
end

local function qw_int(x)      -- Python's int(): toward zero
  if x < 0 then return math.ceil(x) end
  return math.floor(x)
end

local function qw_gc(key, seconds)   -- generous: tests drive `now` faster than real time
  redis.call('EXPIRE', key, 2 * seconds + 60)
end

-- fixed: count and closing time of the open window (0, nil: none)
local function qw_fixed(key, now)
  local v = redis.call('HMGET', key, 'c', 'x')
  local closes = tonumber(v[2])
  if closes and closes > now then return tonumber(v[1]) or 0, closes end
  return 0, nil
end

-- sliding: previous count, limits' previous_ttl (its weight x seconds), current count;
-- the window indices computed as limits' sliding_window_keys does
local function qw_sliding(key, seconds, now)
  local pi, ci = qw_int((now - seconds) / seconds), qw_int(now / seconds)
  local ps, cs = qw_fmt(pi), qw_fmt(ci)
  local v = redis.call('HMGET', key, 'c' .. ps, 'x' .. ps, 'c' .. cs, 'x' .. cs)
  local prev, current = 0, 0
  if v[2] and tonumber(v[2]) > now then prev = tonumber(v[1]) end
  if v[4] and tonumber(v[4]) > now then current = tonumber(v[3]) end
  local ttl = 0
  if prev ~= 0 then ttl = (1 - qw_mod((now - seconds) / seconds, 1)) * seconds end
  return prev, ttl, current
end

-- moving: score bounds for requests made after now - seconds (in limits' stats) and at
-- or after it (in limits' hit)
local function qw_cutoff(seconds, now)
  local cutoff = qw_fmt(now - seconds)
  return '(' .. cutoff, cutoff
end

local function qw_sliding_add(key, seconds, now, amount)
  local pi, ci = qw_int((now - seconds) / seconds), qw_int(now / seconds)
  local cs = qw_fmt(ci)
  local closes = redis.call('HGET', key, 'x' .. cs)
  if closes and tonumber(closes) > now then
    local n = redis.call('HINCRBY', key, 'c' .. cs, amount)
    if n == amount then redis.call('HSET', key, 'x' .. cs, qw_fmt(now + 2 * seconds)) end
  else
    if not closes then   -- a new window: forget those no later call can read
      local all = redis.call('HGETALL', key)
      for j = 1, #all, 2 do
        local f = all[j]
        if string.sub(f, 1, 1) == 'x' then
          local i = tonumber(string.sub(f, 2))
          if i < pi or tonumber(all[j + 1]) <= now then
            redis.call('HDEL', key, f, 'c' .. string.sub(f, 2))
          end
        end
      end
    end
    redis.call('HSET', key, 'c' .. cs, amount, 'x' .. cs, qw_fmt(now + 2 * seconds))
  end
  qw_gc(key, seconds)
end

local function window_peek(strategy, key, limit, seconds, now)
  if strategy == 'f' then
    local count, closes = qw_fixed(key, now)
    return math.max(0, limit - count), closes or now
  elseif strategy == 's' then
    local prev, ttl, current = qw_sliding(key, seconds, now)
    local weighted = prev * ttl / seconds
    local left = limit - math.floor(weighted + current)
    -- limits' hit re-checks floor(weighted + current + 1) once counted
    if left >= 1 and math.floor(weighted + (current + 1)) > limit then left = 0 end
    left = math.max(0, left)
    if prev == 0 and current == 0 then return left, now end
    local reset_in = math.huge
    if prev ~= 0 then reset_in = qw_mod(ttl, seconds / prev) end
    if current ~= 0 then
      local current_ttl = (1 - qw_mod(now / seconds, 1)) * seconds + seconds
      reset_in = math.min(reset_in, qw_mod(current_ttl, seconds))
    end
    return left, now + reset_in
  elseif strategy == 'm' then
    local after, from = qw_cutoff(seconds, now)
    local inside = redis.call('ZCOUNT', key, after, '+inf')
    local left = math.max(0, limit - inside)
    -- limits' hit refuses while the limit-th newest was made at or after the cutoff
    if left > 0 and redis.call('ZCOUNT', key, from, '+inf') >= limit then left = 0 end
    if inside == 0 then return left, now + seconds end
    local oldest = redis.call('ZRANGEBYSCORE', key, after, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    return left, tonumber(oldest[2]) + seconds
  end
  error('unknown window strategy ' .. tostring(strategy))
end

local function window_count(strategy, key, seconds, now)
  if strategy == 'f' then
    local count = qw_fixed(key, now)
    return count
  elseif strategy == 's' then
    local prev, ttl, current = qw_sliding(key, seconds, now)
    return math.floor(prev * ttl / seconds + current)
  elseif strategy == 'm' then
    local after = qw_cutoff(seconds, now)
    return redis.call('ZCOUNT', key, after, '+inf')
  end
  error('unknown window strategy ' .. tostring(strategy))
end

local function window_add(strategy, key, seconds, now, amount)
  if strategy == 'f' then   -- limits' incr: opens a window when none is open
    local n = qw_fixed(key, now) + amount
    if n == amount then
      redis.call('HSET', key, 'c', n, 'x', qw_fmt(now + seconds))
    else
      redis.call('HSET', key, 'c', n)
    end
    qw_gc(key, seconds)
  elseif strategy == 's' then
    qw_sliding_add(key, seconds, now, amount)
  else
    error('window_add: not for strategy ' .. tostring(strategy))
  end
end

local function window_hit(strategy, key, limit, seconds, now, amount)
  if strategy ~= 'm' then return window_add(strategy, key, seconds, now, amount) end
  local after = qw_cutoff(seconds, now)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', after)
  local at = qw_fmt(now)
  local last = redis.call('ZREVRANGEBYSCORE', key, at, at, 'LIMIT', 0, 1)
  local seq = 0
  if last[1] then seq = tonumber(string.match(last[1], '#(%d+)$')) end
  local args = {}
  for n = 1, amount do
    args[#args + 1] = at
    args[#args + 1] = at .. '#' .. string.format('%012d', seq + n)
    if #args >= 1000 or n == amount then
      redis.call('ZADD', key, unpack(args))
      args = {}
    end
  end
  local extra = redis.call('ZCARD', key) - limit
  if extra > 0 then redis.call('ZREMRANGEBYRANK', key, 0, extra - 1) end
  qw_gc(key, seconds)
end

-- Take back `amount` hits counted at `at` (Redis Cluster: a request another slot denied
-- after this one counted it). Never below zero; a window that closed since keeps nothing
-- to take back.
local function window_unhit(strategy, key, seconds, at, amount)
  if strategy == 'f' then
    local v = redis.call('HMGET', key, 'c', 'x')
    local count, closes = tonumber(v[1]) or 0, tonumber(v[2])
    if closes and closes > at and count > 0 then
      redis.call('HSET', key, 'c', math.max(0, count - amount))
    end
  elseif strategy == 's' then
    local field = 'c' .. qw_fmt(qw_int(at / seconds))
    local count = tonumber(redis.call('HGET', key, field) or '0')
    if count > 0 then redis.call('HSET', key, field, math.max(0, count - amount)) end
  elseif strategy == 'm' then
    local t = qw_fmt(at)
    local mine = redis.call('ZREVRANGEBYSCORE', key, t, t, 'LIMIT', 0, amount)
    if #mine > 0 then redis.call('ZREM', key, unpack(mine)) end
  end
end
