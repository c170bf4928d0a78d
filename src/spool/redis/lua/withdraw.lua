-- Undoes a commit the replicas did not acknowledge: 1 when nothing of the
-- message is left, 0 when it can no longer be withdrawn (a node is
-- delivering it), 3 when a node already completed it (its tombstone says
-- so), 2 when this server never had it (a replica promoted before the
-- commit reached it).
-- KEYS: msg, body, ready, arrivals, staged, done   ARGV: id
if redis.call('EXISTS', KEYS[1]) == 0 then
  if redis.call('EXISTS', KEYS[6]) == 1 then return 3 end
  return 2
end
if redis.call('HGET', KEYS[1], 'staged') == '1' then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('ZREM', KEYS[5], ARGV[1])
  return 1
end
local entry = redis.call('HGET', KEYS[1], 'entry')
if not entry then return 0 end
local p = redis.pcall('XPENDING', KEYS[3], GROUP, entry, entry, 1)
if type(p) == 'table' and not p.err and #p > 0 then return 0 end
redis.call('XDEL', KEYS[3], entry)
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[4], ARGV[1])
return 1
