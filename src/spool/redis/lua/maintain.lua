-- Housekeeping of one shard, safe on every node at once. Returns removed
-- staged messages, pruned consumers, removed corrupt messages.
-- * staged messages older than ARGV[1] ms: their commit never finished, so
--   no client was told 250;
-- * consumers idle for ARGV[2] ms that own no entry (nodes gone for good),
--   never ARGV[3] (this node); checked and deleted in one step, so no entry
--   is ever orphaned;
-- * corrupt messages that arrived before ARGV[4] (unix ms).
-- KEYS: staged, ready, corrupt, arrivals, hold   ARGV: staged age, consumer idle, self, corrupt cutoff, base, batch
local base, batch = ARGV[5], tonumber(ARGV[6])
local staged = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms() - tonumber(ARGV[1]), 'LIMIT', 0, batch)
for _, id in ipairs(staged) do
  if redis.call('HGET', base .. 'msg:' .. id, 'staged') == '1' then
    redis.call('DEL', base .. 'msg:' .. id, base .. 'body:' .. id)
  end
  redis.call('ZREM', KEYS[1], id)
end
local pruned = 0
local consumers = redis.pcall('XINFO', 'CONSUMERS', KEYS[2], GROUP)
if type(consumers) == 'table' and not consumers.err then
  for _, c in ipairs(consumers) do
    local f = {}
    for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
    if f['name'] ~= ARGV[3] and tonumber(f['pending']) == 0 and tonumber(f['idle']) > tonumber(ARGV[2]) then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[2], GROUP, f['name'])
      pruned = pruned + 1
    end
  end
end
local removed = 0
local corrupt = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[4], 'LIMIT', 0, batch)
for _, id in ipairs(corrupt) do
  local msg = base .. 'msg:' .. id
  if redis.call('HGET', msg, 'corrupt') == '1' and not redis.call('HGET', msg, 'entry') then
    redis.call('DEL', msg, base .. 'body:' .. id)
    redis.call('ZREM', KEYS[4], id)
    redis.call('SREM', KEYS[5], id)
    removed = removed + 1
  end
  redis.call('ZREM', KEYS[3], id)
end
return { #staged, pruned, removed }
