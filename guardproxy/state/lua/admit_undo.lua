-- Redis Cluster: give back what one slot's admission counted for a request that another
-- slot denied (state/admission_redis.py). lease_common.lua and quota_windows.lua are
-- prepended; KEYS[1] routes the call to the slot (every key below is in it).
-- ARGV: at (the slot's admission time), n quotas, then per quota: strategy, tag, nwin,
-- seconds..; then the leases: (leases key, deadlines key, lease id) ..
local at, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local i = 3
for _ = 1, n do
  local strategy, tag, nwin = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  for w = 1, nwin do
    local seconds = tonumber(ARGV[i + 2 + w])
    window_unhit(strategy, tag .. ':' .. strategy .. seconds, seconds, at, 1)
  end
  i = i + 3 + nwin
end
for j = i, #ARGV, 3 do settle_lease(ARGV[j], ARGV[j + 1], ARGV[j + 2], 0) end
return 1
