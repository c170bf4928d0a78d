-- Acknowledges an entry without delivering it: a held message moves to
-- the hold set; one released meanwhile gets a fresh entry (it must not be
-- left nowhere); a message gone or living in another entry is left alone.
-- 0 when the entry is not pending to this holder.
-- KEYS: ready, msg, hold   ARGV: entry, owner, generation, id
if not pending_to(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
local live = redis.call('HGET', KEYS[2], 'entry')
redis.call('XACK', KEYS[1], GROUP, ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
if (live == ARGV[1] or live == false) and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HDEL', KEYS[2], 'entry')
  if redis.call('HGET', KEYS[2], 'held') == '1' then
    redis.call('SADD', KEYS[3], ARGV[4])
  else
    publish(KEYS[1], KEYS[2], ARGV[4])
  end
end
return 1
