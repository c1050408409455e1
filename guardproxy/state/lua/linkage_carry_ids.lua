-- cluster_ids(): every account in a cluster of 2+ and its cluster id, read before and
-- after a rebuild so that usage follows the ids it changed (guardproxy/linkage/carry.py).
-- (linkage_common.lua is prepended for the key layout; ARGV is its header's, unused.)
-- Returns {account, cluster id, account, cluster id, ...}. O(clustered accounts).
local ids = {}
local flat = redis.call('HGETALL', CID)
for i = 1, #flat, 2 do ids[flat[i]] = flat[i + 1] end
local out = {}
local reps = redis.call('HGETALL', REP)
for i = 1, #reps, 2 do
  local id = ids[reps[i + 1]]
  if id then
    out[#out + 1] = reps[i]
    out[#out + 1] = id
  end
end
return out
