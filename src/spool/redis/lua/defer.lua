-- Stores the recipients' states and schedules the next attempt, indexed
-- under each waiting destination; a message put on hold meanwhile goes to
-- the hold set instead. 0 when the lease is not current.
-- KEYS: ready, msg, deferred, hold, dests, dest index...
-- ARGV: entry, owner, generation, id, due, recipients, attempts, destination...
if not holds(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
retire(KEYS[1], KEYS[2], ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 0 then return 1 end
redis.call('HSET', KEYS[2], 'recipients', ARGV[6], 'attempts', ARGV[7])
if redis.call('HGET', KEYS[2], 'held') == '1' then
  redis.call('SADD', KEYS[4], ARGV[4])
  return 2
end
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4])
local names = {}
for i = 6, #KEYS do
  local name = ARGV[i + 2]
  redis.call('ZADD', KEYS[i], ARGV[5], ARGV[4])
  redis.call('SADD', KEYS[5], name)
  table.insert(names, name)
end
if #names > 0 then redis.call('HSET', KEYS[2], 'dests', table.concat(names, '\n')) end
return 1
