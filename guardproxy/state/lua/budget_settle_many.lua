-- Settle several leases in one call (a request's budget rules, after its response):
-- settle_lease in lease_common.lua (prepended) for each, in order. Reads no clock.
-- Item i (from 1): KEYS[2i-1] its subject's leases hash, KEYS[2i] its lease deadlines
-- zset; ARGV[2i-1] lease id, ARGV[2i] actual tokens. On Redis Cluster every key of one
-- call must be in one slot: budgets.py sends one call per slot.
-- Returns per item 1 if this call charged the lease, 0 if already settled or unknown.
local result = {}
for i = 1, #ARGV / 2 do
  result[i] = settle_lease(KEYS[2 * i - 1], KEYS[2 * i], ARGV[2 * i - 1],
                           tonumber(ARGV[2 * i]))
end
return result
