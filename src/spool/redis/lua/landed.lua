-- After a commit whose reply never came: 1 when the message is queued (or
-- was, and is delivered already: its tombstone). Otherwise voids the id,
-- so a commit still on its way is refused when it arrives, and answers 0:
-- either way the client's 451 or 250 is the truth.
-- KEYS: msg, done, void   ARGV: void ms
if (redis.call('EXISTS', KEYS[1]) == 1 and redis.call('HGET', KEYS[1], 'staged') ~= '1')
    or redis.call('EXISTS', KEYS[2]) == 1 then
  return 1
end
redis.call('SET', KEYS[3], '1', 'PX', ARGV[1])
return 0
