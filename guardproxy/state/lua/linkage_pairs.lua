-- record_pairs(pairs, now): pair evidence (prompt similarity, co-activity) found off the
-- request path. ARGV[ARG..] = (a, b, signal) triples, a ~= b, signal a configured signal
-- (a pair signal, or a value signal whose hot value the pair co-holds: linkage/cohort.py).

for i = ARG, #ARGV, 3 do
  add_pair(ARGV[i], ARGV[i + 1], ARGV[i + 2])
end
return EVENTS
