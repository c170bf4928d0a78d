-- Leases again to ARGV[1] the entries pending to it that it does not hold
-- (ARGV[4..]): a lease read that ran here but whose reply never reached the
-- node, or the node's previous run. XCLAIM bumps their delivery count, so
-- any token of theirs still around is void. Returns entry, id, generation
-- per entry; entries that are not their message's live entry are dropped.
-- KEYS: ready   ARGV: owner, count, base, held entry...
local held = {}
for i = 4, #ARGV do held[ARGV[i]] = true end
local want = tonumber(ARGV[2])
local out = {}
local pending = redis.call('XPENDING', KEYS[1], GROUP, '-', '+', want + #ARGV - 3, ARGV[1])
for _, p in ipairs(pending) do
  if #out >= want * 3 then break end
  local entry = p[1]
  if not held[entry] then
    local claimed = redis.call('XCLAIM', KEYS[1], GROUP, ARGV[1], 0, entry)
    local e = claimed[1]
    if type(e) == 'table' then
      keep_claimed(KEYS[1], ARGV[3], entry, e[2], out)
    else
      -- The entry is gone from the stream: nothing to deliver.
      redis.call('XACK', KEYS[1], GROUP, entry)
    end
  end
end
return out
