-- Record one ledger entry and evict what falls outside the retention bounds.
-- KEYS[1]  base: every key below is base .. suffix, all under base's hash tag
-- ARGV[1]  the entry as JSON ({"time": …, "fps": ["16 hex digits", …], …})
-- ARGV[2]  its time (Unix seconds)   ARGV[3] max_entries   ARGV[4] max_age (0: none)
-- ARGV[5…] its fingerprints, distinct, 16 hex digits each
-- Returns the entry's sequence number.
local base = KEYS[1]
local entries = base .. ':e'
local function bucket(fp) return base .. ':f:' .. string.sub(fp, 1, 4) end

local seq = redis.call('INCR', base .. ':seq')
redis.call('HSET', entries, seq, ARGV[1])
for i = 5, #ARGV do
  local fp = ARGV[i]
  local key = bucket(fp)
  local held = redis.call('HGET', key, fp)
  if held then redis.call('HSET', key, fp, held .. ' ' .. seq)
  else redis.call('HSET', key, fp, seq) end
end

-- remove sequence number `s` from a posting list "a b c" (oldest first: usually `a`)
local function without(held, s)
  if held == s then return '' end
  if string.sub(held, 1, #s + 1) == s .. ' ' then return string.sub(held, #s + 2) end
  local kept = {}
  for id in string.gmatch(held, '%S+') do
    if id ~= s then kept[#kept + 1] = id end
  end
  return table.concat(kept, ' ')
end

local lo = tonumber(redis.call('GET', base .. ':lo') or seq)
local max_entries = tonumber(ARGV[3])
local max_age = tonumber(ARGV[4])
local cutoff = tonumber(ARGV[2]) - max_age
local budget = 64  -- evictions per call keep each call short; the rest go next time
while lo < seq and budget > 0 do
  local raw = redis.call('HGET', entries, lo)
  if raw then
    local entry = cjson.decode(raw)
    if seq - lo + 1 <= max_entries and (max_age <= 0 or entry.time >= cutoff) then break end
    local s = tostring(lo)
    for _, fp in ipairs(entry.fps) do
      local key = bucket(fp)
      local held = redis.call('HGET', key, fp)
      if held then
        local rest = without(held, s)
        if rest == '' then redis.call('HDEL', key, fp)
        else redis.call('HSET', key, fp, rest) end
      end
    end
    redis.call('HDEL', entries, lo)
    budget = budget - 1
  end
  lo = lo + 1
end
redis.call('SET', base .. ':lo', lo)
return seq
