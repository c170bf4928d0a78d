-- The shared recipient verification cache (spool/redis/verdicts.rs): the
-- answer kept for an address, else the claim to ask for it when no node
-- holds one. KEYS: verified:<address>, verifying:<address>.
-- ARGV: how long the claim holds (ms).
-- Returns {1, answer}, {2, ''} (claimed: ask) or {3, ''} (another node asks).
local answer = redis.call('GET', KEYS[1])
if answer then
  return {1, answer}
end
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then
  return {2, ''}
end
return {3, ''}
