-- Carry budget usage from subjects to others: when two linked clusters merge, what the
-- cluster whose id disappeared has used in its current windows is added to the same
-- windows of the surviving id (guardproxy/linkage/carry.py). Reads only 'used': tokens
-- still reserved settle under the old subject. (lease_common.lua is prepended.)
-- Idempotent: a target window remembers in field 'from|<source subject>' how much it has
-- taken from that source and adds only the growth since, so a merge reported twice (two
-- replicas) adds once, and a source that grew before a second report adds the growth.
-- KEYS   per carry: its n source window prefixes (unless its amounts are given), then
--        its n target window prefixes; the index is appended from the store's clock
-- ARGV[1] grace (s)   ARGV[2] number of carries, then per carry: n, source subject,
--        given (0|1), then per window: length in seconds, and when given the window
--        index and the source's used tokens (Redis Cluster: the source, in another
--        slot, was read by an earlier call)
-- Returns the tokens added, over every window of every carry.
local now = store_now()
local grace = tonumber(ARGV[1])
local k, a, added = 1, 3, 0
for _ = 1, tonumber(ARGV[2]) do
  local n, source, given = tonumber(ARGV[a]), ARGV[a + 1], ARGV[a + 2] == '1'
  a = a + 3
  local sources = k
  if not given then k = k + n end
  for i = 1, n do
    local seconds = tonumber(ARGV[a])
    a = a + 1
    local used, dst, reset
    if given then
      local index = tonumber(ARGV[a])
      used = tonumber(ARGV[a + 1])
      a = a + 2
      dst = KEYS[k + i - 1] .. ':' .. string.format('%d', index)
      reset = (index + 1) * seconds
    else
      local src = window_at(KEYS[sources + i - 1], seconds, now)
      used = tonumber(redis.call('HGET', src, 'used') or '0')
      dst, reset = window_at(KEYS[k + i - 1], seconds, now)
    end
    local field = 'from|' .. source
    local before = tonumber(redis.call('HGET', dst, field) or '0')
    if used > before then
      redis.call('HINCRBY', dst, 'used', used - before)
      redis.call('HSET', dst, field, used)
      -- kept as a reservation keeps a window: until a grace period after it ends
      redis.call('EXPIRE', dst, math.max(1, math.ceil(reset - now + grace)))
      added = added + used - before
    end
  end
  k = k + n
end
return added
