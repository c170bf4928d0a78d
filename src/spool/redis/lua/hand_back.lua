-- Gives an unfinished entry back: a fresh live entry any node reads at
-- once. 0 when the lease is not current.
-- KEYS: ready, msg   ARGV: entry, owner, generation, id
if not holds(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
retire(KEYS[1], KEYS[2], ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then publish(KEYS[1], KEYS[2], ARGV[4]) end
return 1
