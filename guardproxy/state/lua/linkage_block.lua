-- block(account, blocked): put an account on the blocklist (ARGV[ARG+1] = '1') or take
-- it off ('0'). Its cluster's count of blocked members follows.

local account, blocked = ARGV[ARG], ARGV[ARG + 1] == '1'
if blocked == (redis.call('SISMEMBER', BLOCKED, account) == 1) then return 0 end
local rep = find(account)
local count = redis.call('HINCRBY', BIN, rep, blocked and 1 or -1)
if count == 0 then redis.call('HDEL', BIN, rep) end
if blocked then
  redis.call('SADD', BLOCKED, account)
else
  redis.call('SREM', BLOCKED, account)
end
return 1
