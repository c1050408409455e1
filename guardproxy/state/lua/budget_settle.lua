-- Settle (or release, with actual = 0) one lease: settle_lease in lease_common.lua
-- (prepended). Reads no clock.
-- KEYS[1] leases hash   KEYS[2] lease deadlines zset
-- ARGV[1] lease id   ARGV[2] actual tokens
-- Returns 1 if this call charged the lease, 0 if it was already settled or unknown.
return settle_lease(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]))
