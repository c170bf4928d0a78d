-- The message is done: it leaves the queue. A message completed soon after
-- it arrived leaves a short-lived tombstone, so a node whose commit reply
-- was lost can still tell that it landed. 0 when the lease is not current.
-- KEYS: ready, msg, body, arrivals, hold, done   ARGV: entry, owner, generation, id, tombstone ms
if not holds(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
local received = tonumber(redis.call('HGET', KEYS[2], 'received_at') or '')
redis.call('XACK', KEYS[1], GROUP, ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[4])
redis.call('SREM', KEYS[5], ARGV[4])
local window = tonumber(ARGV[5])
if received and now_ms() - received < window then
  redis.call('SET', KEYS[6], '1', 'PX', window)
end
return 1
