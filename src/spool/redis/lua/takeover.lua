-- Takes over entries idle for ARGV[2] ms from the cursor on (XAUTOCLAIM
-- bumps their delivery count: the old holder's token is void). Returns the
-- next cursor, then entry, id, generation per entry taken. Entries that
-- are not their message's live entry are dropped on the way.
-- KEYS: ready   ARGV: owner, min idle, cursor, count, base
local r = redis.call('XAUTOCLAIM', KEYS[1], GROUP, ARGV[1], ARGV[2], ARGV[3], 'COUNT', ARGV[4])
local out = { r[1] }
for _, e in ipairs(r[2]) do
  if type(e) == 'table' then keep_claimed(KEYS[1], ARGV[5], e[1], e[2], out) end
end
return out
