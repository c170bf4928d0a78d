-- Makes up to ARGV[1] deferred messages of one destination due now (fast
-- drain, probes, `queue flush`); ids no longer deferred are dropped from
-- the index on the way.
-- KEYS: dest index, deferred, ready, dests   ARGV: limit, base, destination
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
local moved = 0
for _, id in ipairs(ids) do
  local msg = ARGV[2] .. 'msg:' .. id
  if redis.call('ZREM', KEYS[2], id) == 1 and redis.call('EXISTS', msg) == 1 then
    unindex(ARGV[2], msg, id)
    if not redis.call('HGET', msg, 'entry') then
      publish(KEYS[3], msg, id)
      moved = moved + 1
    end
  end
  redis.call('ZREM', KEYS[1], id)
end
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SREM', KEYS[4], ARGV[3]) end
return moved
