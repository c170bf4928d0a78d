-- Takes over entries idle for ARGV[2] ms from the cursor on (XAUTOCLAIM
-- bumps their delivery count: the old holder's token is void). Returns the
-- next cursor, then entry, id, generation per entry taken. Entries that
-- are not their message's live entry are dropped on the way.
-- KEYS: ready   ARGV: owner, min idle, cursor, count, base
local r = redis.call('XAUTOCLAIM', KEYS[1], GROUP, ARGV[1], ARGV[2], ARGV[3], 'COUNT', ARGV[4])
local out = { r[1] }
for _, e in ipairs(r[2]) do
  if type(e) == 'table' then
    local entry, fields, id = e[1], e[2], nil
    for i = 1, #fields, 2 do
      if fields[i] == 'id' then id = fields[i + 1] end
    end
    local msg = ARGV[5] .. 'msg:' .. (id or '')
    local live = id and redis.call('HGET', msg, 'entry')
    if id and redis.call('EXISTS', msg) == 1 and (live == false or live == entry) then
      local p = redis.call('XPENDING', KEYS[1], GROUP, entry, entry, 1)
      table.insert(out, entry)
      table.insert(out, id)
      table.insert(out, p[1][4])
    else
      redis.call('XACK', KEYS[1], GROUP, entry)
      redis.call('XDEL', KEYS[1], entry)
    end
  end
end
return out
