-- Stores a received message: body, envelope, and either its live entry
-- (ARGV[1] = '0') or, for a commit that waits for replicas, the staged
-- mark (ARGV[1] = '1'; PUBLISH makes it deliverable). A spilled body is
-- committed only when the temporary key holds every byte the writer
-- counted, so a lost chunk never becomes a headless message.
-- A commit that arrives after its writer's deadline (held up in a network
-- partition, say) is refused: the writer has answered 451 by then.
-- KEYS: tmp, body, msg, ready, arrivals, staged, void
-- ARGV: stage, spilled bytes (-1: not spilled), tail, id, received_at, deadline (unix ms), field, value, ...
if redis.call('EXISTS', KEYS[7]) == 1 then
  return redis.error_reply('VOIDED commit arrived after its writer gave up on it')
end
if now_ms() > tonumber(ARGV[6]) then
  return redis.error_reply('LATE commit arrived after its deadline (or the clocks of node and Redis differ)')
end
local spilled = tonumber(ARGV[2])
if spilled >= 0 then
  local stored = redis.call('STRLEN', KEYS[1])
  if stored ~= spilled then
    return redis.error_reply('SHORTBODY ' .. stored .. ' of ' .. spilled .. ' bytes stored')
  end
  if #ARGV[3] > 0 then redis.call('APPEND', KEYS[1], ARGV[3]) end
  redis.call('RENAME', KEYS[1], KEYS[2])
  redis.call('PERSIST', KEYS[2])
else
  redis.call('SET', KEYS[2], ARGV[3])
end
redis.call('HSET', KEYS[3], unpack(ARGV, 7))
if ARGV[1] == '1' then
  redis.call('HSET', KEYS[3], 'staged', '1')
  redis.call('ZADD', KEYS[6], now_ms(), ARGV[4])
  return 'staged'
end
redis.call('ZADD', KEYS[5], ARGV[5], ARGV[4])
return publish(KEYS[4], KEYS[3], ARGV[4])
