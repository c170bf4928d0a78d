-- Prepended to every script of the queue. The keys of one shard share a
-- hash tag, so every key a script touches is in one Redis Cluster slot;
-- `base` is that shard's key prefix, `{prefix}:{qN}:`.
local GROUP = 'delivery'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The stream and its consumer group, when the stream does not exist (a
-- Redis that restarted empty): XADD alone would make a stream no group
-- can read.
local function ensure_group(ready)
  if redis.call('EXISTS', ready) == 0 then
    redis.call('XGROUP', 'CREATE', ready, GROUP, '0', 'MKSTREAM')
  end
end

-- Adds the message's one live entry and records it in the envelope.
local function publish(ready, msg, id)
  ensure_group(ready)
  local entry = redis.call('XADD', ready, '*', 'id', id)
  redis.call('HSET', msg, 'entry', entry)
  return entry
end

-- Whether `entry` is pending to `owner` with delivery count `generation`.
local function pending_to(ready, entry, owner, generation)
  local p = redis.pcall('XPENDING', ready, GROUP, entry, entry, 1)
  if type(p) ~= 'table' or p.err or #p == 0 then return false end
  return p[1][2] == owner and tonumber(p[1][4]) == tonumber(generation)
end

-- Fencing: the lease is current, and its entry is the message's live one
-- (an envelope without `entry` predates fencing and accepts any).
local function holds(ready, msg, entry, owner, generation)
  if not pending_to(ready, entry, owner, generation) then return false end
  local live = redis.call('HGET', msg, 'entry')
  return live == false or live == entry
end

-- Acknowledges and deletes an entry; the message then has no live entry.
local function retire(ready, msg, entry)
  redis.call('XACK', ready, GROUP, entry)
  redis.call('XDEL', ready, entry)
  if redis.call('HGET', msg, 'entry') == entry then redis.call('HDEL', msg, 'entry') end
end

-- Removes a message from the destination indexes its envelope lists (it
-- is leaving the deferred set), and a destination from `dests` once its
-- index is empty.
local function unindex(base, msg, id)
  local list = redis.call('HGET', msg, 'dests')
  if not list then return end
  for d in string.gmatch(list, '[^\n]+') do
    local key = base .. 'dest:' .. d
    redis.call('ZREM', key, id)
    if redis.call('EXISTS', key) == 0 then redis.call('SREM', base .. 'dests', d) end
  end
  redis.call('HDEL', msg, 'dests')
end

-- An entry just claimed (XAUTOCLAIM, XCLAIM) with its fields: when it is
-- its message's live entry, appends entry, id and delivery count to
-- `out`; otherwise (message gone, or a stale second entry) drops it.
local function keep_claimed(ready, base, entry, fields, out)
  local id = nil
  for i = 1, #fields, 2 do
    if fields[i] == 'id' then id = fields[i + 1] end
  end
  local msg = base .. 'msg:' .. (id or '')
  local live = id and redis.call('HGET', msg, 'entry')
  if id and redis.call('EXISTS', msg) == 1 and (live == false or live == entry) then
    local p = redis.call('XPENDING', ready, GROUP, entry, entry, 1)
    table.insert(out, entry)
    table.insert(out, id)
    table.insert(out, p[1][4])
  else
    redis.call('XACK', ready, GROUP, entry)
    redis.call('XDEL', ready, entry)
  end
end
