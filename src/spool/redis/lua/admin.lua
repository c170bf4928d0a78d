-- `mxrelay queue hold|release|bounce|delete` on one message; never adds a
-- second live entry (a message with a live entry is handled through it:
-- its holder skips a held message into the hold set, and delivers a
-- bounce request). 0 when the action does not apply.
-- KEYS: msg, body, deferred, hold, ready, arrivals, corrupt   ARGV: action, id, base
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HGET', KEYS[1], 'staged') == '1' then return 0 end
local action, id = ARGV[1], ARGV[2]
local entry = redis.call('HGET', KEYS[1], 'entry')
if action == 'hold' then
  redis.call('HSET', KEYS[1], 'held', '1')
  if redis.call('ZREM', KEYS[3], id) == 1 then
    unindex(ARGV[3], KEYS[1], id)
    redis.call('SADD', KEYS[4], id)
  elseif entry then
    -- Waiting in the stream, not yet read: held at once. Being delivered:
    -- its holder skips it into the hold set when it sees the flag.
    local p = redis.pcall('XPENDING', KEYS[5], GROUP, entry, entry, 1)
    if type(p) ~= 'table' or p.err or #p == 0 then
      redis.call('XDEL', KEYS[5], entry)
      redis.call('HDEL', KEYS[1], 'entry')
      redis.call('SADD', KEYS[4], id)
    end
  end
elseif action == 'release' then
  if redis.call('HGET', KEYS[1], 'held') ~= '1' then return 0 end
  redis.call('HDEL', KEYS[1], 'held', 'corrupt')
  redis.call('ZREM', KEYS[7], id)
  if redis.call('SREM', KEYS[4], id) == 1 and not entry then publish(KEYS[5], KEYS[1], id) end
elseif action == 'bounce' then
  redis.call('HSET', KEYS[1], 'bounce', '1')
  redis.call('HDEL', KEYS[1], 'held', 'corrupt')
  redis.call('ZREM', KEYS[7], id)
  local waiting = redis.call('ZREM', KEYS[3], id) + redis.call('SREM', KEYS[4], id)
  if waiting > 0 then
    unindex(ARGV[3], KEYS[1], id)
    if not entry then publish(KEYS[5], KEYS[1], id) end
  end
elseif action == 'delete' then
  if entry then
    redis.call('XACK', KEYS[5], GROUP, entry)
    redis.call('XDEL', KEYS[5], entry)
  end
  unindex(ARGV[3], KEYS[1], id)
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('ZREM', KEYS[3], id)
  redis.call('SREM', KEYS[4], id)
  redis.call('ZREM', KEYS[6], id)
  redis.call('ZREM', KEYS[7], id)
end
return 1
