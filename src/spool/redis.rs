//! The queue in Redis Streams (see the data model in the design): per shard
//! `{prefix}:{qN}:ready` (stream, group `delivery`), `…:deferred` (sorted
//! set), `…:msg:<id>` (envelope hash), `…:body:<id>` (body string). All keys
//! of a message share the shard's hash tag, so every step is one atomic
//! Lua call on one Redis Cluster slot.
//!
//! Receiving costs one round trip for a body up to `queue.chunk_size`
//! (plus one WAIT when `queue.min_replicas_ack` is set). Larger bodies are
//! appended to an expiring temporary key chunk by chunk, so memory stays
//! bounded, and renamed into place by the same commit script.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};

use super::{AdminAction, Envelope, Lease, MessageState, QueueId, QueueStats, Spool, SpoolBody, SpoolError};
use crate::config::QueueConfig;
use crate::metrics::METRICS;

/// Consumer group every node reads the ready streams through.
pub const GROUP: &str = "delivery";
/// A half-received body's temporary key outlives any idle client.
const TMP_BODY_TTL_SECS: i64 = 3600;

/// Stores body, envelope and ready entry atomically; refuses to commit a
/// spilled body whose chunks are gone, so no envelope ever lacks its body.
static COMMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: tmp, body, msg, ready, arrivals   ARGV: spilled, tail, id, received_at, field, value, ...
if ARGV[1] == '1' then
  if redis.call('EXISTS', KEYS[1]) == 0 then
    return redis.error_reply('ERR body chunks expired before commit')
  end
  if #ARGV[2] > 0 then redis.call('APPEND', KEYS[1], ARGV[2]) end
  redis.call('RENAME', KEYS[1], KEYS[2])
  redis.call('PERSIST', KEYS[2])
else
  redis.call('SET', KEYS[2], ARGV[2])
end
redis.call('HSET', KEYS[3], unpack(ARGV, 5))
redis.call('ZADD', KEYS[5], ARGV[4], ARGV[3])
return redis.call('XADD', KEYS[4], '*', 'id', ARGV[3])
"#,
    )
});

/// Undoes a commit that replicas did not acknowledge.
static ROLLBACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: body, msg, ready, arrivals   ARGV: stream entry id, id
redis.call('XDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[2])
return redis.call('DEL', KEYS[1], KEYS[2])
"#,
    )
});

/// Moves due ids from the deferred set into the ready stream; the ZREM
/// guard makes it safe to run on every node at once.
static SCHEDULE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: deferred, ready   ARGV: now (ms), batch
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local moved = 0
for _, id in ipairs(ids) do
  if redis.call('ZREM', KEYS[1], id) == 1 then
    redis.call('XADD', KEYS[2], '*', 'id', id)
    moved = moved + 1
  end
end
return moved
"#,
    )
});

/// Makes a destination's deferred messages due now (fast drain).
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: dest index, deferred, ready   ARGV: limit
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
local moved = 0
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  if redis.call('ZREM', KEYS[2], id) == 1 then
    redis.call('XADD', KEYS[3], '*', 'id', id)
    moved = moved + 1
  end
end
return moved
"#,
    )
});

/// The message is done: ack, remove the entry, the message and its index entries.
static COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: ready, msg, body, arrivals, hold, dest indexes...   ARGV: entry, id, group
redis.call('XACK', KEYS[1], ARGV[3], ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[2])
redis.call('SREM', KEYS[5], ARGV[2])
for i = 6, #KEYS do redis.call('ZREM', KEYS[i], ARGV[2]) end
return 1
"#,
    )
});

/// Stores recipient states and schedules the next attempt.
static DEFER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: ready, msg, deferred, dest indexes...   ARGV: entry, id, group, due, recipients, attempts
redis.call('XACK', KEYS[1], ARGV[3], ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], 'recipients', ARGV[5], 'attempts', ARGV[6])
-- A message put on hold meanwhile stays in the hold set until released.
if redis.call('HGET', KEYS[2], 'held') == '1' then return 2 end
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
for i = 4, #KEYS do redis.call('ZADD', KEYS[i], ARGV[4], ARGV[2]) end
return 1
"#,
    )
});

/// Gives an entry back: a fresh entry any node can read at once.
static HAND_BACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: ready   ARGV: entry, id, group
redis.call('XACK', KEYS[1], ARGV[3], ARGV[1])
if redis.call('XDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('XADD', KEYS[1], '*', 'id', ARGV[2])
end
return 1
"#,
    )
});

/// Acknowledges an entry without touching its message (held, or gone).
static SKIP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: ready   ARGV: entry, group
redis.call('XACK', KEYS[1], ARGV[2], ARGV[1])
return redis.call('XDEL', KEYS[1], ARGV[1])
"#,
    )
});

/// Administrative moves of one message (`mxrelay queue hold|release|bounce|delete`).
static ADMIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: msg, body, deferred, hold, ready, arrivals   ARGV: action, id
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local action, id = ARGV[1], ARGV[2]
if action == 'hold' then
  redis.call('HSET', KEYS[1], 'held', '1')
  redis.call('ZREM', KEYS[3], id)
  redis.call('SADD', KEYS[4], id)
elseif action == 'release' then
  if redis.call('SREM', KEYS[4], id) == 0 then return 0 end
  redis.call('HDEL', KEYS[1], 'held')
  redis.call('XADD', KEYS[5], '*', 'id', id)
elseif action == 'bounce' then
  redis.call('HSET', KEYS[1], 'bounce', '1')
  redis.call('HDEL', KEYS[1], 'held')
  local was_waiting = redis.call('ZREM', KEYS[3], id) + redis.call('SREM', KEYS[4], id)
  if was_waiting > 0 then redis.call('XADD', KEYS[5], '*', 'id', id) end
elseif action == 'delete' then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('ZREM', KEYS[3], id)
  redis.call('SREM', KEYS[4], id)
  redis.call('ZREM', KEYS[6], id)
end
return 1
"#,
    )
});

/// Key names of one shard.
#[derive(Debug, Clone)]
pub struct ShardKeys {
    base: String,
}

impl ShardKeys {
    pub fn new(prefix: &str, shard: u32) -> ShardKeys {
        ShardKeys { base: format!("{prefix}:{{q{shard}}}") }
    }
    pub fn ready(&self) -> String {
        format!("{}:ready", self.base)
    }
    pub fn deferred(&self) -> String {
        format!("{}:deferred", self.base)
    }
    pub fn msg(&self, id: &QueueId) -> String {
        format!("{}:msg:{id}", self.base)
    }
    pub fn body(&self, id: &QueueId) -> String {
        format!("{}:body:{id}", self.base)
    }
    fn tmp(&self, id: &QueueId) -> String {
        format!("{}:tmp:{id}", self.base)
    }
    /// Messages on hold (`queue hold`), never delivered until released.
    pub fn hold(&self) -> String {
        format!("{}:hold", self.base)
    }
    /// Every message of the shard by arrival time (ms): counts and oldest age.
    pub fn arrivals(&self) -> String {
        format!("{}:arrivals", self.base)
    }
    /// Deferred messages of one destination (for the fast drain).
    pub fn destination(&self, destination: &str) -> String {
        format!("{}:dest:{destination}", self.base)
    }
}

pub struct RedisSpool {
    conn: ConnectionManager,
    client: redis::Client,
    /// The blocking XREADGROUP runs on a connection of its own.
    reader: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
    config: QueueConfig,
}

fn unavailable(op: &'static str, e: impl std::fmt::Display) -> SpoolError {
    METRICS.queue_errors.with_label_values(&[op]).inc();
    SpoolError::Unavailable(format!("{op}: {e}"))
}

/// Bounds one Redis operation by `queue.timeout`.
async fn bounded<T>(
    op: &'static str,
    limit: Duration,
    f: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, SpoolError> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(op, e)),
        Err(_) => Err(unavailable(op, "timed out")),
    }
}

impl RedisSpool {
    /// Connects lazily: a node starts (and answers 451) while Redis is down,
    /// and reconnects by itself when it is back.
    pub fn connect(config: &QueueConfig) -> Result<RedisSpool, SpoolError> {
        let client = redis::Client::open(config.url.as_str()).map_err(|e| unavailable("connect", e))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout.min(Duration::from_secs(2))))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .map_err(|e| unavailable("connect", e))?;
        Ok(RedisSpool { conn, client, reader: tokio::sync::Mutex::new(None), config: config.clone() })
    }

    pub fn shard_keys(&self, shard: u32) -> ShardKeys {
        ShardKeys::new(&self.config.prefix, shard)
    }

    fn shard_of(&self, stream_key: &str) -> Option<u32> {
        let start = stream_key.find("{q")? + 2;
        let end = start + stream_key[start..].find('}')?;
        stream_key[start..end].parse().ok()
    }

    fn leases(&self, entries: Vec<(String, redis::streams::StreamId)>) -> Vec<Lease> {
        entries
            .into_iter()
            .filter_map(|(key, e)| {
                let id: String = e.get("id")?;
                Some(Lease { id: QueueId::from(id), shard: self.shard_of(&key)?, entry: e.id })
            })
            .collect()
    }

    async fn run_script<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, SpoolError> {
        let mut conn = self.conn.clone();
        bounded(op, self.config.timeout, invocation.invoke_async(&mut conn)).await
    }
}

#[async_trait::async_trait]
impl Spool for RedisSpool {
    async fn prepare(&self) -> Result<(), SpoolError> {
        let mut conn = self.conn.clone();
        for shard in 0..self.config.shards {
            let ready = self.shard_keys(shard).ready();
            let created: redis::RedisResult<()> = match tokio::time::timeout(
                self.config.timeout,
                conn.xgroup_create_mkstream(&ready, GROUP, "0"),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => return Err(unavailable("prepare", "timed out")),
            };
            match created {
                Ok(()) => {}
                Err(e) if e.to_string().contains("BUSYGROUP") => {}
                Err(e) => return Err(unavailable("prepare", e)),
            }
        }
        Ok(())
    }

    fn open_body(&self, id: &QueueId) -> Box<dyn SpoolBody> {
        let shard = rand::random_range(0..self.config.shards);
        Box::new(RedisBody {
            conn: self.conn.clone(),
            keys: self.shard_keys(shard),
            id: id.clone(),
            buf: Vec::new(),
            spilled: false,
            config: self.config.clone(),
        })
    }

    async fn ping(&self) -> Result<(), SpoolError> {
        let mut conn = self.conn.clone();
        bounded("ping", self.config.timeout, async move { redis::cmd("PING").query_async::<String>(&mut conn).await })
            .await
            .map(|_| ())
    }

    async fn lease(&self, consumer: &str, count: usize, block: Duration) -> Result<Vec<Lease>, SpoolError> {
        let mut guard = self.reader.lock().await;
        if guard.is_none() {
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(self.config.timeout))
                .set_response_timeout(Some(block + self.config.timeout));
            let conn = bounded(
                "lease",
                self.config.timeout,
                self.client.get_multiplexed_async_connection_with_config(&config),
            )
            .await?;
            *guard = Some(conn);
        }
        let conn = guard.as_mut().expect("just connected");
        let keys: Vec<String> = (0..self.config.shards).map(|s| self.shard_keys(s).ready()).collect();
        let ids: Vec<&str> = keys.iter().map(|_| ">").collect();
        let options = redis::streams::StreamReadOptions::default()
            .group(GROUP, consumer)
            .count(count)
            .block(block.as_millis() as usize);
        let read: Result<Option<redis::streams::StreamReadReply>, SpoolError> =
            bounded("lease", block + self.config.timeout, conn.xread_options(&keys, &ids, &options)).await;
        let reply = match read {
            Ok(r) => r,
            Err(e) => {
                // A broken blocking connection is replaced on the next call.
                *guard = None;
                return Err(e);
            }
        };
        let entries = reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids.into_iter().map(move |e| (k.key.clone(), e))).collect())
            .unwrap_or_default();
        Ok(self.leases(entries))
    }

    async fn take_over(&self, consumer: &str, idle: Duration, count: usize) -> Result<Vec<Lease>, SpoolError> {
        let mut conn = self.conn.clone();
        let mut all = Vec::new();
        for shard in 0..self.config.shards {
            let key = self.shard_keys(shard).ready();
            let reply: redis::streams::StreamAutoClaimReply = bounded(
                "takeover",
                self.config.timeout,
                redis::cmd("XAUTOCLAIM")
                    .arg(&key)
                    .arg(GROUP)
                    .arg(consumer)
                    .arg(idle.as_millis() as u64)
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(count)
                    .query_async(&mut conn),
            )
            .await?;
            all.extend(reply.claimed.into_iter().map(|e| (key.clone(), e)));
        }
        Ok(self.leases(all))
    }

    async fn renew(&self, consumer: &str, lease: &Lease) -> Result<(), SpoolError> {
        let mut conn = self.conn.clone();
        let key = self.shard_keys(lease.shard).ready();
        bounded(
            "renew",
            self.config.timeout,
            redis::cmd("XCLAIM")
                .arg(key)
                .arg(GROUP)
                .arg(consumer)
                .arg(0)
                .arg(&lease.entry)
                .arg("JUSTID")
                .query_async::<redis::Value>(&mut conn),
        )
        .await
        .map(|_| ())
    }

    async fn envelope(&self, lease: &Lease) -> Result<Option<Envelope>, SpoolError> {
        let mut conn = self.conn.clone();
        let key = self.shard_keys(lease.shard).msg(&lease.id);
        let fields: std::collections::HashMap<String, String> =
            bounded("load", self.config.timeout, conn.hgetall(key)).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        Envelope::from_fields(&fields)
            .map(Some)
            .ok_or_else(|| SpoolError::Unavailable(format!("envelope of {} is unreadable", lease.id)))
    }

    async fn read_body(&self, lease: &Lease, offset: u64, len: usize) -> Result<Vec<u8>, SpoolError> {
        let mut conn = self.conn.clone();
        let key = self.shard_keys(lease.shard).body(&lease.id);
        let end = offset + len as u64 - 1;
        bounded("body", self.config.timeout, conn.getrange(key, offset as isize, end as isize)).await
    }

    async fn complete(&self, lease: &Lease, destinations: &[String]) -> Result<(), SpoolError> {
        let keys = self.shard_keys(lease.shard);
        let mut inv = COMPLETE.prepare_invoke();
        inv.key(keys.ready()).key(keys.msg(&lease.id)).key(keys.body(&lease.id)).key(keys.arrivals()).key(keys.hold());
        for d in destinations {
            inv.key(keys.destination(d));
        }
        inv.arg(&lease.entry).arg(lease.id.as_str()).arg(GROUP);
        self.run_script::<i64>("complete", &inv).await.map(|_| ())
    }

    async fn defer(&self, lease: &Lease, env: &Envelope, due: i64, destinations: &[String]) -> Result<(), SpoolError> {
        let keys = self.shard_keys(lease.shard);
        let recipients = serde_json::to_string(&env.recipients).map_err(|e| SpoolError::Unavailable(e.to_string()))?;
        let mut inv = DEFER.prepare_invoke();
        inv.key(keys.ready()).key(keys.msg(&lease.id)).key(keys.deferred());
        for d in destinations {
            inv.key(keys.destination(d));
        }
        inv.arg(&lease.entry).arg(lease.id.as_str()).arg(GROUP).arg(due).arg(recipients).arg(env.attempts);
        self.run_script::<i64>("defer", &inv).await.map(|_| ())
    }

    async fn hand_back(&self, lease: &Lease) -> Result<(), SpoolError> {
        let mut inv = HAND_BACK.prepare_invoke();
        inv.key(self.shard_keys(lease.shard).ready()).arg(&lease.entry).arg(lease.id.as_str()).arg(GROUP);
        self.run_script::<i64>("hand_back", &inv).await.map(|_| ())
    }

    async fn schedule_due(&self, now: i64, batch: usize) -> Result<usize, SpoolError> {
        let mut moved = 0;
        for shard in 0..self.config.shards {
            let keys = self.shard_keys(shard);
            let mut inv = SCHEDULE.prepare_invoke();
            inv.key(keys.deferred()).key(keys.ready()).arg(now).arg(batch);
            moved += self.run_script::<usize>("schedule", &inv).await?;
        }
        Ok(moved)
    }

    async fn release(&self, destination: &str, limit: usize) -> Result<usize, SpoolError> {
        let mut moved = 0;
        for shard in 0..self.config.shards {
            let keys = self.shard_keys(shard);
            let mut inv = RELEASE.prepare_invoke();
            inv.key(keys.destination(destination)).key(keys.deferred()).key(keys.ready()).arg(limit);
            moved += self.run_script::<usize>("release", &inv).await?;
        }
        Ok(moved)
    }

    async fn deferred_destinations(&self) -> Result<Vec<String>, SpoolError> {
        let mut conn = self.conn.clone();
        let mut found = std::collections::BTreeSet::new();
        for shard in 0..self.config.shards {
            let prefix = self.shard_keys(shard).destination("");
            let mut cursor: u64 = 0;
            loop {
                let (next, keys): (u64, Vec<String>) = bounded(
                    "scan",
                    self.config.timeout,
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(format!("{prefix}*"))
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn),
                )
                .await?;
                found.extend(keys.iter().filter_map(|k| k.strip_prefix(&prefix)).map(str::to_string));
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(found.into_iter().collect())
    }

    async fn skip(&self, lease: &Lease) -> Result<(), SpoolError> {
        let mut inv = SKIP.prepare_invoke();
        inv.key(self.shard_keys(lease.shard).ready()).arg(&lease.entry).arg(GROUP);
        self.run_script::<i64>("skip", &inv).await.map(|_| ())
    }

    async fn locate(&self, id: &QueueId) -> Result<Option<Lease>, SpoolError> {
        let mut conn = self.conn.clone();
        for shard in 0..self.config.shards {
            let exists: bool =
                bounded("locate", self.config.timeout, conn.exists(self.shard_keys(shard).msg(id))).await?;
            if exists {
                return Ok(Some(Lease { id: id.clone(), shard, entry: String::new() }));
            }
        }
        Ok(None)
    }

    async fn admin(&self, id: &QueueId, action: AdminAction) -> Result<bool, SpoolError> {
        let Some(lease) = self.locate(id).await? else { return Ok(false) };
        let k = self.shard_keys(lease.shard);
        let mut inv = ADMIN.prepare_invoke();
        inv.key(k.msg(id)).key(k.body(id)).key(k.deferred()).key(k.hold()).key(k.ready()).key(k.arrivals());
        inv.arg(action.as_str()).arg(id.as_str());
        Ok(self.run_script::<i64>("admin", &inv).await? == 1)
    }

    async fn stats(&self, by_destination: bool) -> Result<QueueStats, SpoolError> {
        let mut conn = self.conn.clone();
        let mut stats = QueueStats::default();
        let mut oldest: Option<i64> = None;
        for shard in 0..self.config.shards {
            let k = self.shard_keys(shard);
            let mut pipe = redis::pipe();
            pipe.zcard(k.arrivals())
                .xlen(k.ready())
                .cmd("XPENDING")
                .arg(k.ready())
                .arg(GROUP)
                .zcard(k.deferred())
                .scard(k.hold())
                .zrange_withscores(k.arrivals(), 0, 0);
            type Row = (u64, u64, redis::Value, u64, u64, Vec<(String, f64)>);
            let (messages, xlen, pending, deferred, held, first): Row =
                bounded("stats", self.config.timeout, pipe.query_async(&mut conn)).await?;
            // XPENDING summary: [count, first, last, consumers]; NOGROUP before prepare.
            let leased = match pending {
                redis::Value::Array(ref items) => match items.first() {
                    Some(redis::Value::Int(n)) => *n as u64,
                    _ => 0,
                },
                _ => 0,
            };
            stats.messages += messages;
            stats.leased += leased;
            stats.ready += xlen.saturating_sub(leased);
            stats.deferred += deferred;
            stats.held += held;
            if let Some((_, t)) = first.first() {
                let t = *t as i64;
                oldest = Some(oldest.map_or(t, |o| o.min(t)));
            }
        }
        stats.oldest_received_at = oldest;
        if !by_destination {
            return Ok(stats);
        }
        let mut by_dest = std::collections::BTreeMap::new();
        for d in self.deferred_destinations().await? {
            let mut n = 0;
            for shard in 0..self.config.shards {
                let c: u64 =
                    bounded("stats", self.config.timeout, conn.zcard(self.shard_keys(shard).destination(&d))).await?;
                n += c;
            }
            by_dest.insert(d, n);
        }
        stats.deferred_by_destination = by_dest.into_iter().collect();
        Ok(stats)
    }

    async fn list(&self) -> Result<Vec<(Envelope, MessageState)>, SpoolError> {
        let mut conn = self.conn.clone();
        let mut all = Vec::new();
        for shard in 0..self.config.shards {
            let k = self.shard_keys(shard);
            let ids: Vec<String> = bounded("list", self.config.timeout, conn.zrange(k.arrivals(), 0, -1)).await?;
            for chunk in ids.chunks(500) {
                let mut pipe = redis::pipe();
                for id in chunk {
                    let id = QueueId::from(id.clone());
                    pipe.hgetall(k.msg(&id)).zscore(k.deferred(), id.as_str());
                }
                let replies: Vec<(std::collections::HashMap<String, String>, Option<f64>)> =
                    bounded("list", self.config.timeout, pipe.query_async(&mut conn)).await?;
                for (fields, due) in replies {
                    let Some(env) = Envelope::from_fields(&fields) else { continue };
                    let state = match (env.held, due) {
                        (true, _) => MessageState::Held,
                        (false, Some(due)) => MessageState::Deferred { due: due as i64 },
                        (false, None) => MessageState::Active,
                    };
                    all.push((env, state));
                }
            }
        }
        all.sort_by_key(|(e, _)| e.received_at);
        Ok(all)
    }
}

struct RedisBody {
    conn: ConnectionManager,
    keys: ShardKeys,
    id: QueueId,
    buf: Vec<u8>,
    spilled: bool,
    config: QueueConfig,
}

impl RedisBody {
    async fn spill(&mut self) -> Result<(), SpoolError> {
        let tmp = self.keys.tmp(&self.id);
        let mut pipe = redis::pipe();
        pipe.append(&tmp, self.buf.as_slice()).ignore().expire(&tmp, TMP_BODY_TTL_SECS).ignore();
        let mut conn = self.conn.clone();
        bounded("append", self.config.timeout, pipe.query_async::<()>(&mut conn)).await?;
        self.spilled = true;
        self.buf.clear();
        Ok(())
    }
}

#[async_trait::async_trait]
impl SpoolBody for RedisBody {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), SpoolError> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= self.config.chunk_size {
            self.spill().await?;
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>, env: &Envelope) -> Result<(), SpoolError> {
        let started = Instant::now();
        let recipients = serde_json::to_string(&env.recipients).map_err(|e| SpoolError::Unavailable(e.to_string()))?;
        let fields: [(&str, String); 13] = [
            ("id", env.id.to_string()),
            ("sender", env.sender.clone()),
            ("recipients", recipients),
            ("client_ip", env.client_ip.clone()),
            ("client_name", env.client_name.clone()),
            ("helo", env.helo.clone()),
            ("received_at", env.received_at.to_string()),
            ("size", env.size.to_string()),
            ("node", env.node.clone()),
            ("smtputf8", u8::from(env.smtputf8).to_string()),
            ("eight_bit", u8::from(env.eight_bit).to_string()),
            ("attempts", env.attempts.to_string()),
            ("body", self.keys.body(&self.id)),
        ];
        let (body_key, msg_key, ready_key) = (self.keys.body(&self.id), self.keys.msg(&self.id), self.keys.ready());
        let mut invocation = COMMIT.prepare_invoke();
        invocation
            .key(self.keys.tmp(&self.id))
            .key(&body_key)
            .key(&msg_key)
            .key(&ready_key)
            .key(self.keys.arrivals())
            .arg(if self.spilled { "1" } else { "0" })
            .arg(self.buf.as_slice())
            .arg(self.id.as_str())
            .arg(env.received_at);
        for (k, v) in &fields {
            invocation.arg(*k).arg(v.as_str());
        }
        let mut conn = self.conn.clone();
        let committed: Result<String, SpoolError> =
            bounded("enqueue", self.config.timeout, invocation.invoke_async(&mut conn)).await;
        let entry = match committed {
            Ok(entry) => entry,
            Err(e) => {
                // Atomic: nothing of the message is visible; drop the chunks.
                let tmp = self.keys.tmp(&self.id);
                let _ = tokio::time::timeout(self.config.timeout, conn.del::<_, ()>(&tmp)).await;
                return Err(e);
            }
        };
        self.buf = Vec::new();
        if self.config.min_replicas_ack > 0 {
            let wanted = self.config.min_replicas_ack;
            let wait_ms = self.config.replicas_ack_timeout.as_millis() as u64;
            let got: u32 = bounded(
                "wait",
                self.config.timeout + self.config.replicas_ack_timeout,
                redis::cmd("WAIT").arg(wanted).arg(wait_ms).query_async(&mut conn),
            )
            .await
            .unwrap_or(0);
            if got < wanted {
                let mut rollback = ROLLBACK.prepare_invoke();
                rollback
                    .key(&body_key)
                    .key(&msg_key)
                    .key(&ready_key)
                    .key(self.keys.arrivals())
                    .arg(&entry)
                    .arg(self.id.as_str());
                let _ = bounded("rollback", self.config.timeout, rollback.invoke_async::<i64>(&mut conn)).await;
                METRICS.queue_errors.with_label_values(&["wait"]).inc();
                return Err(SpoolError::NotReplicated { wanted, got });
            }
        }
        METRICS.queue_enqueue_seconds.observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    async fn abort(self: Box<Self>) {
        if self.spilled {
            let mut conn = self.conn.clone();
            let tmp = self.keys.tmp(&self.id);
            let _ = tokio::time::timeout(self.config.timeout, conn.del::<_, ()>(&tmp)).await;
        }
    }
}
