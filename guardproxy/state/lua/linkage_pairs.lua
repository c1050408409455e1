-- record_pairs(pairs, now): pair evidence (prompt similarity, co-activity) found off the
-- request path. ARGV[ARG..] = (a, b, signal) triples, a ~= b, signal a pair signal.

for i = ARG, #ARGV, 3 do
  local p, a, b = pid(ARGV[i], ARGV[i + 1])
  local key, field = pkey(p), 'd|' .. ARGV[i + 2]
  local raw = redis.call('HGET', key, field)
  if raw then
    local first, last = parse_span(raw)
    redis.call('HSET', key, field, fmt(first) .. ' ' .. fmt(math.max(last, NOW)))
    redis.call('EXPIRE', key, TTL)
  else
    redis.call('HSET', key, field, fmt(NOW) .. ' ' .. fmt(NOW))
    redis.call('EXPIRE', key, TTL)
    redis.call('SADD', PAIRS, p)
    check(a, b, key)
  end
end
return EVENTS
