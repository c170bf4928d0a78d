-- Resets the idle time of the holder's entry (XCLAIM JUSTID keeps the
-- delivery count, i.e. the token); 0 when the lease is not current.
-- KEYS: ready, msg   ARGV: entry, owner, generation
if not holds(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
redis.call('XCLAIM', KEYS[1], GROUP, ARGV[2], 0, ARGV[1], 'JUSTID')
return 1
