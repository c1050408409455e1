-- Quota windows outside admission (quota_windows.lua is prepended):
-- KEYS[1] the rule's key tag ({...} carries the Cluster hash tag); window keys are
-- tag .. ':' .. strategy .. seconds, as in admit.lua.
-- ARGV: op, now ('' = TIME), strategy, then per op:
--   'state' n (limit seconds)..  -> {remaining.., reset..}     (reads; counts nothing)
--   'count' seconds              -> count                      (what the limiter sees)
--   'add'   seconds amount marker marker_ttl -> added (0 when the marker was set already)
local now
if ARGV[2] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[2])
end
local op, strategy, tag = ARGV[1], ARGV[3], KEYS[1]

if op == 'state' then
  local n, out = tonumber(ARGV[4]), {}
  for i = 1, n do
    local limit, seconds = tonumber(ARGV[3 + 2 * i]), tonumber(ARGV[4 + 2 * i])
    local left, reset = window_peek(strategy, tag .. ':' .. strategy .. seconds, limit,
                                    seconds, now)
    out[i], out[n + i] = left, string.format('%.17g', reset)
  end
  return out
end

local seconds = tonumber(ARGV[4])
local key = tag .. ':' .. strategy .. seconds
if op == 'count' then
  return window_count(strategy, key, seconds, now)
end
-- add: the marker first, so two replicas reporting one merge add it once
if redis.call('SET', tag .. ':carried:' .. ARGV[6], '1', 'NX', 'EX', ARGV[7]) == false then
  return 0
end
window_add(strategy, key, seconds, now, tonumber(ARGV[5]))
return tonumber(ARGV[5])
