-- Moves due ids from the deferred set into the ready stream; the ZREM
-- guard makes it safe on every node at once, and a message that already
-- has a live entry never gets a second.
-- KEYS: deferred, ready   ARGV: now (ms), batch, base
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local moved = 0
for _, id in ipairs(ids) do
  if redis.call('ZREM', KEYS[1], id) == 1 then
    local msg = ARGV[3] .. 'msg:' .. id
    if redis.call('EXISTS', msg) == 1 then
      unindex(ARGV[3], msg, id)
      if not redis.call('HGET', msg, 'entry') then
        publish(KEYS[2], msg, id)
        moved = moved + 1
      end
    end
  end
end
return moved
