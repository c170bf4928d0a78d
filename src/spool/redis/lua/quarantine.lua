-- Takes a message with an unreadable envelope out of delivery: held and
-- marked corrupt, scored by arrival in `corrupt` for its removal after the
-- queue lifetime. 0 when the lease is not current.
-- KEYS: ready, msg, hold, corrupt, arrivals   ARGV: entry, owner, generation, id
if not holds(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
retire(KEYS[1], KEYS[2], ARGV[1])
redis.call('HSET', KEYS[2], 'held', '1', 'corrupt', '1')
redis.call('SADD', KEYS[3], ARGV[4])
local since = redis.call('ZSCORE', KEYS[5], ARGV[4]) or now_ms()
redis.call('ZADD', KEYS[4], since, ARGV[4])
return 1
