-- Second phase of a replicated commit: the staged message becomes
-- deliverable in one step. 0 when it is not staged (swept meanwhile).
-- Refused after the writer's deadline, as COMMIT is.
-- KEYS: msg, ready, arrivals, staged   ARGV: id, received_at, deadline (unix ms)
if redis.call('HGET', KEYS[1], 'staged') ~= '1' then return 0 end
if now_ms() > tonumber(ARGV[3]) then return 0 end
redis.call('HDEL', KEYS[1], 'staged')
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
publish(KEYS[2], KEYS[1], ARGV[1])
return 1
