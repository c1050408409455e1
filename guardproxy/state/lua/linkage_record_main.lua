-- record(account, evidence, now, pairs) on its own (linkage_common.lua and
-- linkage_record.lua are prepended): arguments from ARGV[ARG] as record_request reads them.
-- Returns {cluster id, size, linked_to_blocked (0/1), event kind, event JSON, ...}.
local out = record_request(ARG)
for _, e in ipairs(EVENTS) do out[#out + 1] = e end
return out
