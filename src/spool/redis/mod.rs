//! The queue in Redis Streams (see the data model in the design and in
//! `docs/ARCHITECTURE.md`). Per shard, under the hash tag `{qN}`: `ready`
//! (stream, group `delivery`), `deferred`, `hold`, `arrivals`, `staged`,
//! `corrupt`, `dests` (destinations with deferred mail), `dest:<d>`, and
//! per message `msg:<id>` (envelope; `entry` names its one live stream
//! entry), `body:<id>`, `tmp:<id>` (chunks being received) and `done:<id>`
//! (a short-lived tombstone). Every step that changes a message is one Lua
//! script ([`scripts`]) on one hash slot.
//!
//! Invariants kept here: a lease is fenced by (consumer, delivery count),
//! checked in every script against XPENDING; no path adds a second live
//! entry; a read that finds the consumer group missing (Redis restarted
//! empty) recreates it and retries; the blocking read has a connection of
//! its own, and so does every WAIT ([`body`]).

mod body;
mod cluster;
mod scripts;
mod target;
mod verdicts;

pub use target::{Problem, problem};

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};

use super::{
    Admin, AdminAction, Deliver, Enqueue, Entry, Envelope, Lease, Maintenance, MessageState, QueueAudit, QueueId,
    QueueStats, Read, SpoolBody, SpoolError,
};
use crate::config::QueueConfig;
use crate::metrics::METRICS;
use scripts::*;

/// Consumer group every node reads the ready streams through.
pub const GROUP: &str = "delivery";
/// XAUTOCLAIM rounds per shard in one takeover pass (each scans up to ten
/// times the count of pending entries).
const TAKEOVER_ROUNDS: usize = 4;
/// Ids handled per shard by one maintenance pass.
const MAINTAIN_BATCH: usize = 500;

/// Key names of one shard.
#[derive(Debug, Clone)]
pub struct ShardKeys {
    base: String,
    shard: u32,
}

impl ShardKeys {
    pub fn new(prefix: &str, shard: u32) -> ShardKeys {
        ShardKeys { base: format!("{prefix}:{{q{shard}}}:"), shard }
    }
    pub fn shard(&self) -> u32 {
        self.shard
    }
    /// The shard's key prefix, `{prefix}:{qN}:` (scripts derive per-message
    /// keys from it, always in the same hash slot).
    pub fn base(&self) -> &str {
        &self.base
    }
    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.base)
    }
    pub fn ready(&self) -> String {
        self.key("ready")
    }
    pub fn deferred(&self) -> String {
        self.key("deferred")
    }
    pub fn msg(&self, id: &QueueId) -> String {
        self.key(&format!("msg:{id}"))
    }
    pub fn body(&self, id: &QueueId) -> String {
        self.key(&format!("body:{id}"))
    }
    fn tmp(&self, id: &QueueId) -> String {
        self.key(&format!("tmp:{id}"))
    }
    /// Set shortly when a young message completes (see [`Link::tombstone`]).
    fn done(&self, id: &QueueId) -> String {
        self.key(&format!("done:{id}"))
    }
    /// Messages on hold (`queue hold`, unreadable ones), never delivered until released.
    pub fn hold(&self) -> String {
        self.key("hold")
    }
    /// Every message of the shard by arrival time (ms): counts and oldest age.
    pub fn arrivals(&self) -> String {
        self.key("arrivals")
    }
    /// A commit given up on (see `lua/landed.lua`).
    fn void(&self, id: &QueueId) -> String {
        self.key(&format!("void:{id}"))
    }
    /// Messages stored by the first phase of a replicated commit, by time.
    fn staged(&self) -> String {
        self.key("staged")
    }
    /// Messages whose envelope is unreadable, by arrival.
    fn corrupt(&self) -> String {
        self.key("corrupt")
    }
    /// The nodes' host names, with when each was last seen (shard 0 only).
    fn nodes(&self) -> String {
        self.key("nodes")
    }
    /// Destinations that have deferred messages in this shard.
    fn dests(&self) -> String {
        self.key("dests")
    }
    /// Deferred messages of one destination (for the fast drain).
    pub fn destination(&self, destination: &str) -> String {
        self.key(&format!("dest:{destination}"))
    }
}

/// Why a Redis call failed: it answered with an error (the command did not
/// run, or failed as a whole), or it did not answer (the command may have
/// run).
enum Failure {
    Answered(redis::RedisError),
    NoAnswer(String),
}

impl Failure {
    fn from_redis(e: redis::RedisError) -> Failure {
        // Refused credentials: nothing ran, and nothing will until fixed.
        if refused_credentials(&e) {
            return Failure::Answered(e);
        }
        if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error() {
            Failure::NoAnswer(e.to_string())
        } else {
            Failure::Answered(e)
        }
    }

    fn missing_group(&self) -> bool {
        matches!(self, Failure::Answered(e) if e.code() == Some("NOGROUP") || e.to_string().contains("NOGROUP"))
    }

    fn into_error(self, op: &'static str) -> SpoolError {
        match self {
            Failure::Answered(e) if refused_credentials(&e) => unavailable(
                op,
                format!(
                    "Redis refused the credentials ({e}); set the user and password in queue.url or queue.password_file"
                ),
            ),
            Failure::Answered(e) => unavailable(op, e),
            Failure::NoAnswer(e) => unavailable(op, e),
        }
    }
}

fn refused_credentials(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::AuthenticationFailed || matches!(e.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
}

fn unavailable(op: &'static str, e: impl std::fmt::Display) -> SpoolError {
    METRICS.queue_errors.with_label_values(&[op]).inc();
    SpoolError::Unavailable(format!("{op}: {e}"))
}

/// One Redis operation, bounded by `limit`.
async fn call<T>(limit: Duration, f: impl Future<Output = redis::RedisResult<T>>) -> Result<T, Failure> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Failure::from_redis(e)),
        Err(_) => Err(Failure::NoAnswer("timed out".into())),
    }
}

async fn bounded<T>(
    op: &'static str,
    limit: Duration,
    f: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, SpoolError> {
    call(limit, f).await.map_err(|e| e.into_error(op))
}

/// Evaluates `$call` (a `Result<_, Failure>` future); when the consumer
/// group is missing (Redis lost its data, or started after this node),
/// recreates the groups and evaluates it again.
macro_rules! healing {
    ($spool:expr, $op:literal, $call:expr) => {
        match $call.await {
            Err(e) if e.missing_group() => {
                $spool.recreate_groups($op).await?;
                $call.await.map_err(|e| e.into_error($op))
            }
            r => r.map_err(|e| e.into_error($op)),
        }
    };
}

/// What the receiving side ([`body`]) shares with the spool.
pub(super) struct Link {
    /// The server each shard is written to now (the same one for all but
    /// on a cluster); `None` until the Sentinels or the cluster named one.
    routes: std::sync::RwLock<Vec<Option<Arc<Primary>>>>,
    /// The last [`Primary::epoch`] given out.
    epochs: AtomicU64,
    /// Why the Sentinels named no primary the last time they were asked.
    unrouted: std::sync::Mutex<Option<String>>,
    /// On a Redis Cluster: every shard is its own slot, so no command may
    /// name two shards.
    cluster: bool,
    waiters: Arc<body::WaitPool>,
    config: QueueConfig,
}

/// Writes moved to another server: `from` is `None` for the first one.
struct Moved {
    from: Option<String>,
    to: String,
    /// The shards that moved.
    shards: Vec<u32>,
}

/// Shards held by one primary.
type OnePrimary = (Arc<Primary>, Vec<u32>);

/// One blocking read: reader key, primary, shards.
type BlockingRead = (u32, Arc<Primary>, Vec<u32>);

/// The queue's Redis primary with the node's shared connection to it.
pub(super) struct Primary {
    client: redis::Client,
    conn: ConnectionManager,
    /// New with every new primary: a connection to an earlier one (the
    /// blocking reader's, WAIT's) is dropped, never used again.
    epoch: u64,
    addr: String,
}

impl Link {
    fn new(config: &QueueConfig, cluster: bool) -> Link {
        Link {
            routes: std::sync::RwLock::new(vec![None; config.shards as usize]),
            epochs: AtomicU64::new(0),
            unrouted: std::sync::Mutex::new(None),
            cluster,
            waiters: Arc::new(body::WaitPool::new(config)),
            config: config.clone(),
        }
    }

    /// The primary `shard` is written to.
    fn primary(&self, shard: u32) -> Result<Arc<Primary>, Failure> {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        routes.get(shard as usize).cloned().flatten().ok_or_else(|| {
            let why = if self.cluster {
                format!("no node of the cluster in queue.url has named the primary of shard {shard} yet")
            } else {
                let why = "the Sentinels of queue.url have named no reachable primary yet";
                match self.unrouted.lock().unwrap_or_else(|e| e.into_inner()).as_deref() {
                    Some(e) => format!("{why}: {e}"),
                    None => why.to_string(),
                }
            };
            Failure::Answered(redis::RedisError::from((redis::ErrorKind::Io, "no Redis primary known", why)))
        })
    }

    /// Whether every shard has a primary.
    fn routed(&self) -> bool {
        self.routes.read().unwrap_or_else(|e| e.into_inner()).iter().all(Option::is_some)
    }

    /// Epochs of the primaries written to now.
    fn live_epochs(&self) -> Vec<u64> {
        self.routes.read().unwrap_or_else(|e| e.into_inner()).iter().flatten().map(|p| p.epoch).collect()
    }

    fn conn(&self, shard: u32) -> Result<ConnectionManager, Failure> {
        Ok(self.primary(shard)?.conn.clone())
    }

    fn conn_for(&self, shard: u32, op: &'static str) -> Result<ConnectionManager, SpoolError> {
        self.conn(shard).map_err(|e| e.into_error(op))
    }

    fn open_primary(&self, client: redis::Client, addr: String) -> Result<Arc<Primary>, redis::RedisError> {
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.config.timeout.min(Duration::from_secs(2))))
            .set_response_timeout(Some(self.config.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)?;
        let epoch = self.epochs.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Arc::new(Primary { client, conn, epoch, addr }))
    }

    /// Writes go to `client`'s server from now on, unless they already do.
    /// Returns the move when there was one.
    fn follow(&self, client: redis::Client) -> Result<Option<Moved>, redis::RedisError> {
        let addr = client.get_connection_info().addr().to_string();
        let shards = (0..self.config.shards).map(|_| Some((addr.clone(), client.clone()))).collect();
        Ok(self.follow_shards(shards)?.pop())
    }

    /// Each shard is written to the server given for it from now on (one
    /// connection per server); a shard given `None` stays where it is.
    /// Returns the moves, one per pair of servers.
    fn follow_shards(&self, to: Vec<Option<(String, redis::Client)>>) -> Result<Vec<Moved>, redis::RedisError> {
        let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
        let mut open: HashMap<String, Arc<Primary>> =
            routes.iter().flatten().map(|p| (p.addr.clone(), p.clone())).collect();
        let mut moves: Vec<Moved> = Vec::new();
        for (shard, target) in to.into_iter().enumerate() {
            let Some((addr, client)) = target else { continue };
            let current = routes.get(shard).cloned().flatten();
            if current.as_ref().is_some_and(|p| p.addr == addr) {
                continue;
            }
            let primary = match open.get(&addr) {
                Some(p) => p.clone(),
                None => {
                    let p = self.open_primary(client, addr.clone())?;
                    open.insert(addr.clone(), p.clone());
                    p
                }
            };
            let from = current.map(|p| p.addr.clone());
            match moves.iter_mut().find(|m| m.from == from && m.to == addr) {
                Some(m) => m.shards.push(shard as u32),
                None => moves.push(Moved { from, to: addr, shards: vec![shard as u32] }),
            }
            routes[shard] = Some(primary);
        }
        Ok(moves)
    }

    /// The shards of `shards` grouped by the primary that holds them, in
    /// the order they first appear.
    fn by_primary(&self, shards: &[u32]) -> Result<Vec<OnePrimary>, Failure> {
        let mut groups: Vec<OnePrimary> = Vec::new();
        for &shard in shards {
            let p = self.primary(shard)?;
            match groups.iter_mut().find(|(g, _)| g.epoch == p.epoch) {
                Some((_, members)) => members.push(shard),
                None => groups.push((p, vec![shard])),
            }
        }
        Ok(groups)
    }

    /// How long a completed young message leaves its tombstone: longer than
    /// a node waits for a commit reply and then checks whether it landed.
    fn tombstone(&self) -> Duration {
        (self.config.timeout + self.config.replicas_ack_timeout) * 3
    }
}

pub struct RedisSpool {
    link: Arc<Link>,
    /// The blocking XREADGROUP runs on connections of its own: one for
    /// every shard on one server, one per shard on a cluster.
    reader: tokio::sync::Mutex<Readers>,
    /// XAUTOCLAIM cursor per shard, so takeover reaches the whole pending list.
    cursors: std::sync::Mutex<Vec<String>>,
    /// Shard read first by the next lease or takeover (rotates).
    next_shard: AtomicU32,
}

/// A connection for blocking reads, to the primary of `epoch`; `id` is
/// its CLIENT ID (on a cluster, for CLIENT UNBLOCK).
struct Reader {
    epoch: u64,
    conn: MultiplexedConnection,
    id: i64,
}

/// Reader connections by key: 0 on one server, the shard on a cluster.
type Readers = HashMap<u32, Reader>;

/// Asks the Sentinels for the primary at once and then every
/// [`target::SENTINEL_CHECK`], and moves the node's writes to a new one as
/// soon as they name it (checked with `ROLE`). Ends with the spool.
fn watch_sentinels(link: std::sync::Weak<Link>, mut set: target::SentinelSet) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::error!("queue: Sentinel {} cannot be watched outside the runtime", set.hosts);
        return;
    };
    runtime.spawn(async move {
        let mut failing = false;
        loop {
            let Some(link) = link.upgrade() else { return };
            let timeout = link.config.timeout;
            let asked = tokio::time::timeout(timeout, set.client.async_get_client()).await;
            let asked = asked.map_err(|_| "no answer in time".to_string()).and_then(|r| {
                r.map_err(|e| match refused_credentials(&e) {
                    true => format!(
                        "they, or the primary they name, refused the credentials ({e}); set \
                         queue.sentinel_user and queue.sentinel_password_file for the Sentinels, queue.url or \
                         queue.password_file for the data servers"
                    ),
                    false => e.to_string(),
                })
            });
            *link.unrouted.lock().unwrap_or_else(|e| e.into_inner()) = asked.as_ref().err().cloned();
            match asked {
                Ok(client) => {
                    failing = false;
                    match link.follow(client) {
                        Ok(Some(Moved { from: None, to, .. })) => {
                            tracing::info!(primary = %to, "queue: Sentinel {} names the primary of {}", set.hosts, set.master)
                        }
                        Ok(Some(Moved { from: Some(before), to, .. })) => {
                            METRICS.queue_primary_changes.inc();
                            tracing::warn!(before = %before, primary = %to, "queue: the primary of {} moved (Sentinel failover); writing to the new one", set.master)
                        }
                        Ok(None) => {}
                        Err(e) => tracing::error!(error = %e, "queue: cannot use the primary Sentinel named"),
                    }
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "queue: no primary of {} from Sentinel {}; asking again", set.master, set.hosts);
                }
                Err(e) => tracing::debug!(error = %e, "queue: still no primary from Sentinel"),
            }
            drop(link);
            tokio::time::sleep(target::SENTINEL_CHECK).await;
        }
    });
}

/// A script's fenced answer: 0 means the lease is not current.
fn fenced(lease: &Lease, answer: i64) -> Result<(), SpoolError> {
    if answer == 0 { Err(SpoolError::LeaseLost(lease.id.clone())) } else { Ok(()) }
}

impl RedisSpool {
    /// Connects lazily: a node starts (and answers 451) while Redis is down,
    /// and reconnects by itself when it is back.
    /// Through Sentinel, the primary is asked for at once and then every
    /// [`target::SENTINEL_CHECK`] (see [`watch_sentinels`]).
    pub fn connect(config: &QueueConfig) -> Result<RedisSpool, SpoolError> {
        let endpoint =
            target::Endpoint::open(config).map_err(|p| unavailable("connect", format!("{}: {}", p.key, p.text)))?;
        let link = Arc::new(Link::new(config, matches!(endpoint, target::Endpoint::Cluster(_))));
        match endpoint {
            target::Endpoint::Server(client) => {
                link.follow(client).map_err(|e| unavailable("connect", e))?;
            }
            target::Endpoint::Sentinel(set) => watch_sentinels(Arc::downgrade(&link), set),
            target::Endpoint::Cluster(seeds) => {
                let slots =
                    (0..config.shards).map(|s| cluster::slot(ShardKeys::new(&config.prefix, s).base())).collect();
                cluster::watch(Arc::downgrade(&link), seeds, slots);
            }
        }
        Ok(RedisSpool {
            link,
            reader: tokio::sync::Mutex::new(HashMap::new()),
            cursors: std::sync::Mutex::new(vec!["0-0".to_string(); config.shards as usize]),
            next_shard: AtomicU32::new(0),
        })
    }

    fn config(&self) -> &QueueConfig {
        &self.link.config
    }

    fn conn(&self, shard: u32) -> Result<ConnectionManager, Failure> {
        self.link.conn(shard)
    }

    fn conn_for(&self, shard: u32, op: &'static str) -> Result<ConnectionManager, SpoolError> {
        self.link.conn_for(shard, op)
    }

    /// Runs, in one pipeline per primary, the commands `build` adds for
    /// each of `shards`, and reads each shard's answers as one `T` (in the
    /// order of `shards`). No command names two shards, so this works on a
    /// cluster as on one server.
    async fn each_shard<T: redis::FromRedisValue>(
        &self,
        shards: &[u32],
        build: impl Fn(&mut redis::Pipeline, u32),
    ) -> Result<Vec<T>, Failure> {
        let mut out: Vec<Option<T>> = (0..shards.len()).map(|_| None).collect();
        for (primary, members) in self.link.by_primary(shards)? {
            let mut pipe = redis::pipe();
            let mut counts = Vec::with_capacity(members.len());
            for &shard in &members {
                let before = pipe.len();
                build(&mut pipe, shard);
                counts.push(pipe.len() - before);
            }
            let values: Vec<redis::Value> =
                call(self.config().timeout, pipe.query_async(&mut primary.conn.clone())).await?;
            let mut values = values.into_iter();
            for (shard, count) in members.iter().zip(counts) {
                let answers = redis::Value::Array(values.by_ref().take(count).collect());
                let parsed = redis::from_redis_value(answers).map_err(|e| Failure::Answered(e.into()))?;
                let at = shards.iter().position(|s| s == shard).expect("a shard asked for");
                out[at] = Some(parsed);
            }
        }
        Ok(out.into_iter().map(|t| t.expect("every shard answered")).collect())
    }

    pub fn shard_keys(&self, shard: u32) -> ShardKeys {
        ShardKeys::new(&self.config().prefix, shard)
    }

    /// Every shard once, starting with a different one on each call.
    fn shard_order(&self) -> Vec<u32> {
        let n = self.config().shards;
        let first = self.next_shard.fetch_add(1, Ordering::Relaxed) % n;
        (0..n).map(|i| (first + i) % n).collect()
    }

    fn shard_of(&self, stream_key: &str) -> Option<u32> {
        let start = stream_key.find("{q")? + 2;
        let end = start + stream_key[start..].find('}')?;
        stream_key[start..end].parse().ok()
    }

    /// Runs a script on the primary of the shard of `k`, whose keys it names.
    async fn script<T: redis::FromRedisValue>(
        &self,
        k: &ShardKeys,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, Failure> {
        let mut conn = self.conn(k.shard())?;
        call(self.config().timeout, invocation.invoke_async(&mut conn)).await
    }

    async fn run_script<T: redis::FromRedisValue>(
        &self,
        k: &ShardKeys,
        op: &'static str,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, SpoolError> {
        self.script(k, invocation).await.map_err(|e| e.into_error(op))
    }

    async fn recreate_groups(&self, op: &'static str) -> Result<(), SpoolError> {
        METRICS.queue_groups_recreated.inc();
        tracing::warn!(
            "queue: consumer group {GROUP} missing during {op} (Redis restarted without its data?); recreating it"
        );
        self.create_groups().await
    }

    async fn create_groups(&self) -> Result<(), SpoolError> {
        for shard in 0..self.config().shards {
            let mut conn = self.conn_for(shard, "prepare")?;
            let ready = self.shard_keys(shard).ready();
            match call(self.config().timeout, conn.xgroup_create_mkstream::<_, _, _, ()>(&ready, GROUP, "0")).await {
                Ok(()) => {}
                Err(Failure::Answered(e)) if e.to_string().contains("BUSYGROUP") => {}
                Err(e) => return Err(e.into_error("prepare")),
            }
        }
        Ok(())
    }

    /// Queues written before the `dests` index existed: adds their
    /// destination indexes to it, once per shard (a start-up scan, never a
    /// periodic one). Not on a cluster, which such queues never ran on.
    async fn index_legacy_destinations(&self) -> Result<(), SpoolError> {
        for shard in 0..self.config().shards {
            let mut conn = self.conn_for(shard, "prepare")?;
            let k = self.shard_keys(shard);
            let first_start: bool = bounded("prepare", self.config().timeout, conn.set_nx(k.key("schema"), 2)).await?;
            if !first_start || self.link.cluster {
                continue;
            }
            let prefix = k.destination("");
            let mut cursor: u64 = 0;
            loop {
                let (next, keys): (u64, Vec<String>) = bounded(
                    "prepare",
                    self.config().timeout,
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(format!("{prefix}*"))
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn),
                )
                .await?;
                let names: Vec<&str> = keys.iter().filter_map(|key| key.strip_prefix(&prefix)).collect();
                if !names.is_empty() {
                    bounded("prepare", self.config().timeout, conn.sadd::<_, _, ()>(k.dests(), names)).await?;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(())
    }

    fn leases_from(&self, owner: &str, replies: Vec<Option<redis::streams::StreamReadReply>>) -> Vec<Lease> {
        replies
            .into_iter()
            .flatten()
            .flat_map(|r| r.keys)
            .flat_map(|k| {
                let shard = self.shard_of(&k.key);
                k.ids.into_iter().filter_map(move |e| {
                    let id: String = e.get("id")?;
                    // A new entry (`>`) is delivered for the first time.
                    Some(Lease::new(QueueId::from(id), shard?, e.id, owner, 1))
                })
            })
            .collect()
    }

    /// The blocking reads one lease read waits on: every shard at once on
    /// one server; on a cluster, each shard alone (one slot per command).
    /// Each is (reader key, primary, shards).
    fn blocking_reads(&self, order: &[u32]) -> Result<Vec<BlockingRead>, Failure> {
        if self.link.cluster {
            return order.iter().map(|&s| Ok((s, self.link.primary(s)?, vec![s]))).collect();
        }
        let first = *order.first().unwrap_or(&0);
        Ok(vec![(0, self.link.primary(first)?, order.to_vec())])
    }

    /// The reader connection `key` to `primary`, opened (with its CLIENT ID
    /// asked, for CLIENT UNBLOCK) unless it is open to that primary.
    async fn reader_conn(
        &self,
        readers: &mut Readers,
        key: u32,
        primary: &Primary,
        block: Duration,
    ) -> Result<(), Failure> {
        if readers.get(&key).is_some_and(|r| r.epoch == primary.epoch) {
            return Ok(());
        }
        readers.remove(&key);
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.config().timeout))
            .set_response_timeout(Some(block + self.config().timeout));
        let timeout = self.config().timeout;
        let mut conn = call(timeout, primary.client.get_multiplexed_async_connection_with_config(&config)).await?;
        let id: i64 = if self.link.cluster {
            call(timeout, redis::cmd("CLIENT").arg("ID").query_async(&mut conn)).await?
        } else {
            0
        };
        readers.insert(key, Reader { epoch: primary.epoch, conn, id });
        Ok(())
    }

    /// One lease read: without blocking, up to `count` entries from the
    /// shards in turn; if that finds nothing, a blocking read of one entry
    /// per shard. XREADGROUP's COUNT applies per stream, so a blocking read
    /// that returns more than `count` (entries arrived in several shards at
    /// once) hands the extras back at once: this node never holds a lease
    /// it is not working on.
    async fn read_once(
        &self,
        readers: &mut Readers,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Lease>, Failure> {
        let timeout = self.config().timeout;
        let order = self.shard_order();
        let read = |shard: u32, n: usize| {
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP").arg(GROUP).arg(consumer).arg("COUNT").arg(n);
            cmd.arg("STREAMS").arg(self.shard_keys(shard).ready()).arg(">");
            cmd
        };
        // Per shard, so that an error in one shard (its group missing) does
        // not hide entries another shard already leased to us.
        let mut replies: Vec<Result<Option<redis::streams::StreamReadReply>, Failure>> = Vec::new();
        if count >= order.len() {
            // Busy: one round trip per primary, `count` split over the shards.
            let split = |i: usize| count / order.len() + usize::from(i < count % order.len());
            for (primary, shards) in self.link.by_primary(&order)? {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for shard in &shards {
                    let i = order.iter().position(|s| s == shard).unwrap_or(0);
                    pipe.add_command(read(*shard, split(i)));
                }
                let all: Vec<redis::RedisResult<Option<redis::streams::StreamReadReply>>> =
                    call(timeout, pipe.query_async(&mut primary.conn.clone())).await?;
                replies.extend(all.into_iter().map(|r| r.map_err(Failure::from_redis)));
            }
        } else {
            let mut got = 0;
            for shard in &order {
                if got >= count {
                    break;
                }
                let reply = call(timeout, read(*shard, count - got).query_async(&mut self.conn(*shard)?)).await;
                got += reply
                    .as_ref()
                    .ok()
                    .and_then(|r: &Option<redis::streams::StreamReadReply>| r.as_ref())
                    .map_or(0, |r| r.keys.iter().map(|k| k.ids.len()).sum());
                replies.push(reply);
            }
        }
        let mut leases = Vec::new();
        let mut failure = None;
        for reply in replies {
            match reply {
                Ok(r) => leases.extend(self.leases_from(consumer, vec![r])),
                Err(e) if failure.is_none() => failure = Some(e),
                Err(_) => {}
            }
        }
        match failure {
            // Some shards lost their group: recreate now, keep what was read.
            Some(e) if e.missing_group() && !leases.is_empty() => {
                if let Err(e) = self.recreate_groups("lease").await {
                    tracing::warn!(error = %e, "queue: recreating consumer groups failed");
                }
                return Ok(leases);
            }
            Some(_) if !leases.is_empty() => return Ok(leases),
            Some(e) => return Err(e),
            None => {}
        }
        if !leases.is_empty() || block.is_zero() {
            return Ok(leases);
        }
        let mut leases = self.read_blocking(readers, consumer, &order, block).await?;
        for extra in leases.split_off(count.min(leases.len())) {
            if let Err(e) = self.hand_back(&extra).await {
                tracing::warn!(queue_id = %extra.id, error = %e, "could not hand back an entry read beyond the free slots; taken over after queue.lease");
            }
        }
        Ok(leases)
    }

    /// Waits up to `block` for a new entry in any shard. On a cluster the
    /// shards are read at once, one blocking read each; as soon as one
    /// answers with an entry the others are ended with CLIENT UNBLOCK, and
    /// whatever they read meanwhile is kept (handed back if not wanted).
    async fn read_blocking(
        &self,
        readers: &mut Readers,
        consumer: &str,
        order: &[u32],
        block: Duration,
    ) -> Result<Vec<Lease>, Failure> {
        let timeout = self.config().timeout;
        let reads = self.blocking_reads(order)?;
        for (key, primary, _) in &reads {
            self.reader_conn(readers, *key, primary, block).await?;
        }
        let options = || {
            redis::streams::StreamReadOptions::default()
                .group(GROUP, consumer)
                .count(1)
                .block(block.as_millis().max(1) as usize)
        };
        let mut waiting = tokio::task::JoinSet::new();
        let mut unblock = HashMap::new();
        for (key, primary, shards) in reads {
            let reader = readers.get(&key).expect("just connected");
            let mut conn = reader.conn.clone();
            unblock.insert(key, (reader.id, primary.conn.clone()));
            let keys: Vec<String> = shards.iter().map(|s| self.shard_keys(*s).ready()).collect();
            let options = options();
            waiting.spawn(async move {
                let ids: Vec<&str> = keys.iter().map(|_| ">").collect();
                let reply: Result<Option<redis::streams::StreamReadReply>, Failure> =
                    call(block + timeout, conn.xread_options(&keys, &ids, &options)).await;
                (key, reply)
            });
        }
        let mut leases = Vec::new();
        let mut failure = None;
        while let Some(joined) = waiting.join_next().await {
            let Ok((key, reply)) = joined else { continue };
            unblock.remove(&key);
            match reply {
                Ok(reply) => {
                    let read = self.leases_from(consumer, vec![reply]);
                    if !read.is_empty() && leases.is_empty() {
                        // The others would wait out `block`: end them now.
                        for (id, mut conn) in unblock.values().cloned() {
                            tokio::spawn(async move {
                                let _ = call(
                                    timeout,
                                    redis::cmd("CLIENT").arg("UNBLOCK").arg(id).query_async::<i64>(&mut conn),
                                )
                                .await;
                            });
                        }
                    }
                    leases.extend(read);
                }
                Err(e) => {
                    if matches!(e, Failure::NoAnswer(_)) {
                        // A broken blocking connection is replaced on the next call.
                        readers.remove(&key);
                    }
                    failure.get_or_insert(e);
                }
            }
        }
        match failure {
            Some(e) if leases.is_empty() => Err(e),
            _ => Ok(leases),
        }
    }

    /// The shard of message `id`, if it is committed (staged ones are not).
    async fn shard_holding(&self, id: &QueueId) -> Result<Option<u32>, SpoolError> {
        let shards: Vec<u32> = (0..self.config().shards).collect();
        let found: Vec<(Option<String>, bool)> = self
            .each_shard(&shards, |pipe, shard| {
                pipe.hget(self.shard_keys(shard).msg(id), "staged").exists(self.shard_keys(shard).msg(id));
            })
            .await
            .map_err(|e| e.into_error("locate"))?;
        Ok(found.iter().position(|(staged, exists)| *exists && staged.as_deref() != Some("1")).map(|s| s as u32))
    }

    /// The fencing arguments every lease script starts with.
    fn fence<'a>(inv: &mut redis::ScriptInvocation<'a>, lease: &Lease) {
        inv.arg(&lease.entry.id).arg(&lease.owner).arg(lease.generation);
    }

    async fn audit_shard(&self, shard: u32, audit: &mut QueueAudit) -> Result<(), SpoolError> {
        use std::collections::{BTreeMap, HashSet};
        let k = self.shard_keys(shard);
        let mut conn = self.conn_for(shard, "audit")?;
        let t = self.config().timeout;
        let entries: redis::streams::StreamRangeReply = bounded("audit", t, conn.xrange_all(k.ready())).await?;
        let deferred: HashSet<String> = bounded("audit", t, conn.zrange(k.deferred(), 0, -1)).await?;
        let hold: HashSet<String> = bounded("audit", t, conn.smembers(k.hold())).await?;
        let arrivals: Vec<String> = bounded("audit", t, conn.zrange(k.arrivals(), 0, -1)).await?;
        let mut by_id: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for e in entries.ids {
            let id: String = e.get("id").unwrap_or_default();
            by_id.entry(id).or_default().push(e.id);
        }
        let mut ids: Vec<String> = arrivals.clone();
        ids.extend(by_id.keys().cloned());
        ids.extend(deferred.iter().cloned());
        ids.extend(hold.iter().cloned());
        ids.sort();
        ids.dedup();
        for chunk in ids.chunks(500) {
            let mut pipe = redis::pipe();
            for id in chunk {
                let id = QueueId::from(id.clone());
                pipe.cmd("HMGET")
                    .arg(k.msg(&id))
                    .arg("entry")
                    .arg("size")
                    .arg("staged")
                    .exists(k.msg(&id))
                    .strlen(k.body(&id));
            }
            type Row = ((Option<String>, Option<u64>, Option<String>), bool, u64);
            let rows: Vec<Row> = bounded("audit", t, pipe.query_async(&mut conn)).await?;
            for (id, ((live, size, staged), exists, stored)) in chunk.iter().zip(rows) {
                let entries = by_id.get(id).map(Vec::as_slice).unwrap_or_default();
                if !exists || staged.as_deref() == Some("1") {
                    audit.stale_entries += entries.len() as u64;
                    continue;
                }
                audit.messages += 1;
                let live_entries = match &live {
                    Some(live) => entries.iter().filter(|e| *e == live).count(),
                    None => entries.len(),
                };
                audit.stale_entries += (entries.len() - live_entries) as u64;
                let places = live_entries as u32 + u32::from(deferred.contains(id)) + u32::from(hold.contains(id));
                let qid = QueueId::from(id.clone());
                if places != 1 {
                    audit.misplaced.push((qid.clone(), places));
                }
                if size != Some(stored) {
                    audit.bad_bodies.push(qid);
                }
            }
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Enqueue for RedisSpool {
    fn open_body(&self, id: &QueueId) -> Box<dyn SpoolBody> {
        let shard = rand::random_range(0..self.config().shards);
        Box::new(body::RedisBody::new(self.link.clone(), self.shard_keys(shard), id.clone()))
    }

    async fn release(&self, destination: &str, limit: usize) -> Result<usize, SpoolError> {
        let mut moved = 0;
        for shard in 0..self.config().shards {
            let k = self.shard_keys(shard);
            let mut inv = RELEASE.prepare_invoke();
            inv.key(k.destination(destination)).key(k.deferred()).key(k.ready()).key(k.dests());
            inv.arg(limit).arg(k.base()).arg(destination);
            moved += self.run_script::<usize>(&k, "release", &inv).await?;
        }
        Ok(moved)
    }
}

/// The envelope a message hash holds, when it is the live one for `lease`:
/// `None` for a message gone, staged (not committed), or whose live entry
/// is another.
fn live_envelope(lease: &Lease, fields: &HashMap<String, String>) -> Result<Option<Envelope>, SpoolError> {
    if fields.is_empty() || fields.get("staged").is_some_and(|s| s == "1") {
        return Ok(None);
    }
    if !lease.entry.id.is_empty() && fields.get("entry").is_some_and(|live| *live != lease.entry.id) {
        return Ok(None);
    }
    Envelope::from_fields(fields).map(Some).ok_or_else(|| SpoolError::Corrupt(lease.id.clone()))
}

#[async_trait::async_trait]
impl Read for RedisSpool {
    async fn envelope(&self, lease: &Lease) -> Result<Option<Envelope>, SpoolError> {
        let key = self.shard_keys(lease.entry.shard).msg(&lease.id);
        let fields: std::collections::HashMap<String, String> =
            bounded("load", self.config().timeout, self.conn_for(lease.entry.shard, "load")?.hgetall(key)).await?;
        live_envelope(lease, &fields)
    }

    async fn envelope_and_start(&self, lease: &Lease, len: usize) -> Result<Option<(Envelope, Vec<u8>)>, SpoolError> {
        let k = self.shard_keys(lease.entry.shard);
        let mut pipe = redis::pipe();
        pipe.hgetall(k.msg(&lease.id)).getrange(k.body(&lease.id), 0, len.max(1) as isize - 1);
        let mut conn = self.conn_for(lease.entry.shard, "load")?;
        let (fields, start): (std::collections::HashMap<String, String>, Vec<u8>) =
            bounded("load", self.config().timeout, pipe.query_async(&mut conn)).await?;
        // Read before the size was known: only as much as the body has.
        Ok(live_envelope(lease, &fields)?.map(|env| {
            let start = if (start.len() as u64) > env.size { start[..env.size as usize].to_vec() } else { start };
            (env, start)
        }))
    }

    async fn read_body(&self, lease: &Lease, offset: u64, len: usize) -> Result<Vec<u8>, SpoolError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let key = self.shard_keys(lease.entry.shard).body(&lease.id);
        let end = offset + len as u64 - 1;
        let mut conn = self.conn_for(lease.entry.shard, "body")?;
        bounded("body", self.config().timeout, conn.getrange(key, offset as isize, end as isize)).await
    }
}

#[async_trait::async_trait]
impl Deliver for RedisSpool {
    async fn lease(&self, consumer: &str, count: usize, block: Duration) -> Result<Vec<Lease>, SpoolError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let mut guard = self.reader.lock().await;
        let mut read = self.read_once(&mut guard, consumer, count, block).await;
        if matches!(&read, Err(e) if e.missing_group()) {
            self.recreate_groups("lease").await?;
            read = self.read_once(&mut guard, consumer, count, block).await;
        }
        read.map_err(|e| {
            if matches!(e, Failure::NoAnswer(_)) {
                // A broken blocking connection is replaced on the next call.
                guard.clear();
            }
            e.into_error("lease")
        })
    }

    async fn take_over(&self, consumer: &str, idle: Duration, count: usize) -> Result<Vec<Lease>, SpoolError> {
        let mut taken = Vec::new();
        for shard in self.shard_order() {
            let k = self.shard_keys(shard);
            for _ in 0..TAKEOVER_ROUNDS {
                if taken.len() >= count {
                    return Ok(taken);
                }
                let cursor = self.cursors.lock().unwrap_or_else(|e| e.into_inner())[shard as usize].clone();
                let left = count - taken.len();
                let mut inv = TAKEOVER.prepare_invoke();
                inv.key(k.ready()).arg(consumer).arg(idle.as_millis() as u64).arg(&cursor).arg(left).arg(k.base());
                let reply: Vec<redis::Value> = healing!(self, "takeover", self.script(&k, &inv))?;
                let mut values = reply.into_iter().map(|v| redis::from_redis_value::<String>(v).unwrap_or_default());
                let next = values.next().unwrap_or_else(|| "0-0".into());
                let rest: Vec<String> = values.collect();
                taken.extend(claimed_leases(&rest, shard, consumer));
                let wrapped = next == "0-0";
                self.cursors.lock().unwrap_or_else(|e| e.into_inner())[shard as usize] = next;
                if wrapped {
                    break;
                }
            }
        }
        Ok(taken)
    }

    async fn reclaim(
        &self,
        consumer: &str,
        held: &std::collections::HashSet<Entry>,
        count: usize,
    ) -> Result<Vec<Lease>, SpoolError> {
        let mut taken = Vec::new();
        for shard in self.shard_order() {
            if taken.len() >= count {
                break;
            }
            let k = self.shard_keys(shard);
            let mut inv = RECLAIM.prepare_invoke();
            inv.key(k.ready()).arg(consumer).arg(count - taken.len()).arg(k.base());
            for entry in held.iter().filter(|e| e.shard == shard) {
                inv.arg(&entry.id);
            }
            let reply: Vec<String> = healing!(self, "reclaim", self.script(&k, &inv))?;
            taken.extend(claimed_leases(&reply, shard, consumer));
        }
        Ok(taken)
    }

    async fn renew(&self, lease: &Lease) -> Result<(), SpoolError> {
        let k = self.shard_keys(lease.entry.shard);
        let mut inv = RENEW.prepare_invoke();
        inv.key(k.ready()).key(k.msg(&lease.id));
        Self::fence(&mut inv, lease);
        fenced(lease, self.run_script(&k, "renew", &inv).await?)
    }

    async fn complete(&self, lease: &Lease) -> Result<(), SpoolError> {
        let k = self.shard_keys(lease.entry.shard);
        let mut inv = COMPLETE.prepare_invoke();
        inv.key(k.ready()).key(k.msg(&lease.id)).key(k.body(&lease.id)).key(k.arrivals()).key(k.hold());
        inv.key(k.done(&lease.id));
        Self::fence(&mut inv, lease);
        inv.arg(lease.id.as_str()).arg(self.link.tombstone().as_millis() as u64);
        fenced(lease, self.run_script(&k, "complete", &inv).await?)
    }

    async fn defer(&self, lease: &Lease, env: &Envelope, due: i64, destinations: &[String]) -> Result<(), SpoolError> {
        let k = self.shard_keys(lease.entry.shard);
        let recipients = serde_json::to_string(&env.recipients).map_err(|e| unavailable("defer", e))?;
        let mut inv = DEFER.prepare_invoke();
        inv.key(k.ready()).key(k.msg(&lease.id)).key(k.deferred()).key(k.hold()).key(k.dests());
        for d in destinations {
            inv.key(k.destination(d));
        }
        Self::fence(&mut inv, lease);
        inv.arg(lease.id.as_str()).arg(due).arg(recipients).arg(env.attempts);
        for d in destinations {
            inv.arg(d);
        }
        fenced(lease, self.run_script(&k, "defer", &inv).await?)
    }

    async fn hand_back(&self, lease: &Lease) -> Result<(), SpoolError> {
        let k = self.shard_keys(lease.entry.shard);
        let mut inv = HAND_BACK.prepare_invoke();
        inv.key(k.ready()).key(k.msg(&lease.id));
        Self::fence(&mut inv, lease);
        inv.arg(lease.id.as_str());
        fenced(lease, self.run_script(&k, "hand_back", &inv).await?)
    }

    async fn skip(&self, lease: &Lease) -> Result<(), SpoolError> {
        let k = self.shard_keys(lease.entry.shard);
        let mut inv = SKIP.prepare_invoke();
        inv.key(k.ready()).key(k.msg(&lease.id)).key(k.hold());
        Self::fence(&mut inv, lease);
        inv.arg(lease.id.as_str());
        fenced(lease, self.run_script(&k, "skip", &inv).await?)
    }

    async fn quarantine(&self, lease: &Lease) -> Result<(), SpoolError> {
        let k = self.shard_keys(lease.entry.shard);
        let mut inv = QUARANTINE.prepare_invoke();
        inv.key(k.ready()).key(k.msg(&lease.id)).key(k.hold()).key(k.corrupt()).key(k.arrivals());
        Self::fence(&mut inv, lease);
        inv.arg(lease.id.as_str());
        fenced(lease, self.run_script(&k, "quarantine", &inv).await?)
    }

    async fn schedule_due(&self, now: i64, batch: usize) -> Result<usize, SpoolError> {
        let mut moved = 0;
        for shard in 0..self.config().shards {
            let k = self.shard_keys(shard);
            let mut inv = SCHEDULE.prepare_invoke();
            inv.key(k.deferred()).key(k.ready()).arg(now).arg(batch).arg(k.base());
            moved += self.run_script::<usize>(&k, "schedule", &inv).await?;
        }
        Ok(moved)
    }

    async fn deferred_destinations(&self) -> Result<Vec<String>, SpoolError> {
        let shards: Vec<u32> = (0..self.config().shards).collect();
        let sets: Vec<(Vec<String>,)> = self
            .each_shard(&shards, |pipe, shard| {
                pipe.smembers(self.shard_keys(shard).dests());
            })
            .await
            .map_err(|e| e.into_error("dests"))?;
        let all: std::collections::BTreeSet<String> = sets.into_iter().flat_map(|(set,)| set).collect();
        Ok(all.into_iter().collect())
    }

    async fn cluster_hostnames(&self, hostname: &str, within: Duration) -> Result<Vec<String>, SpoolError> {
        let key = self.shard_keys(0).nodes();
        let now = chrono::Utc::now().timestamp_millis();
        let mut conn = self.link.conn_for(0, "nodes")?;
        let mut pipe = redis::pipe();
        pipe.hset(&key, hostname, now).ignore().hgetall(&key);
        let (seen,): (HashMap<String, i64>,) =
            bounded("nodes", self.config().timeout, pipe.query_async(&mut conn)).await?;
        let cutoff = now - within.as_millis() as i64;
        let (live, gone): (Vec<_>, Vec<_>) = seen.into_iter().partition(|(_, at)| *at >= cutoff);
        if !gone.is_empty() {
            let gone: Vec<String> = gone.into_iter().map(|(name, _)| name).collect();
            let _: redis::RedisResult<i64> = conn.hdel(&key, gone).await;
        }
        Ok(live.into_iter().map(|(name, _)| name).collect())
    }

    async fn maintain(&self, consumer: &str, corrupt_max_age: Duration) -> Result<Maintenance, SpoolError> {
        let c = self.config();
        // A replicated commit finishes within its timeouts; anything staged
        // for much longer was abandoned by a crash, unanswered.
        let staged_age = ((c.timeout + c.replicas_ack_timeout) * 4).max(Duration::from_secs(60));
        let consumer_idle = c.lease * 10;
        let cutoff = chrono::Utc::now().timestamp_millis() - corrupt_max_age.as_millis() as i64;
        let mut done = Maintenance::default();
        for shard in 0..c.shards {
            let k = self.shard_keys(shard);
            let mut inv = MAINTAIN.prepare_invoke();
            inv.key(k.staged()).key(k.ready()).key(k.corrupt()).key(k.arrivals()).key(k.hold());
            inv.arg(staged_age.as_millis() as u64).arg(consumer_idle.as_millis() as u64).arg(consumer);
            inv.arg(cutoff).arg(k.base()).arg(MAINTAIN_BATCH);
            let (staged, pruned, corrupt): (u64, u64, u64) = self.run_script(&k, "maintain", &inv).await?;
            done.staged_removed += staged;
            done.consumers_pruned += pruned;
            done.corrupt_removed += corrupt;
        }
        Ok(done)
    }
}

#[async_trait::async_trait]
impl Admin for RedisSpool {
    async fn prepare(&self) -> Result<(), SpoolError> {
        // Through Sentinel or a cluster, the first answer is a moment away.
        let asked = tokio::time::Instant::now();
        while !self.link.routed() && asked.elapsed() < self.config().timeout {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.create_groups().await?;
        self.index_legacy_destinations().await
    }

    async fn ping(&self) -> Result<(), SpoolError> {
        let shards: Vec<u32> = (0..self.config().shards).collect();
        let pending = |pipe: &mut redis::Pipeline, shard: u32| {
            pipe.cmd("XPENDING").arg(self.shard_keys(shard).ready()).arg(GROUP);
        };
        healing!(self, "ping", self.each_shard::<redis::Value>(&shards, pending)).map(drop)
    }

    async fn locate(&self, id: &QueueId) -> Result<Option<Lease>, SpoolError> {
        Ok(self.shard_holding(id).await?.map(|shard| Lease::located(id.clone(), shard)))
    }

    async fn admin(&self, id: &QueueId, action: AdminAction) -> Result<bool, SpoolError> {
        let Some(shard) = self.shard_holding(id).await? else { return Ok(false) };
        let k = self.shard_keys(shard);
        let mut inv = ADMIN.prepare_invoke();
        inv.key(k.msg(id)).key(k.body(id)).key(k.deferred()).key(k.hold()).key(k.ready()).key(k.arrivals());
        inv.key(k.corrupt());
        inv.arg(action.as_str()).arg(id.as_str()).arg(k.base());
        Ok(self.run_script::<i64>(&k, "admin", &inv).await? == 1)
    }

    async fn flush_all(&self, limit: usize) -> Result<usize, SpoolError> {
        self.schedule_due(i64::MAX, limit).await
    }

    async fn stats(&self, by_destination: bool) -> Result<QueueStats, SpoolError> {
        type Row = (u64, u64, redis::Value, u64, u64, Vec<(String, f64)>);
        let t = self.config().timeout;
        let mut stats = QueueStats::default();
        let mut oldest: Option<i64> = None;
        for shard in 0..self.config().shards {
            let k = self.shard_keys(shard);
            let mut pipe = redis::pipe();
            pipe.zcard(k.arrivals()).xlen(k.ready()).cmd("XPENDING").arg(k.ready()).arg(GROUP);
            pipe.zcard(k.deferred()).scard(k.hold()).zrange_withscores(k.arrivals(), 0, 0);
            let (messages, xlen, pending, deferred, held, first): Row =
                healing!(self, "stats", async { call(t, pipe.query_async(&mut self.conn(shard)?)).await })?;
            // XPENDING summary: [count, first, last, consumers].
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
        let dests = self.deferred_destinations().await?;
        if dests.is_empty() {
            return Ok(stats);
        }
        let shards: Vec<u32> = (0..self.config().shards).collect();
        let counts: Vec<Vec<u64>> = self
            .each_shard(&shards, |pipe, shard| {
                for d in &dests {
                    pipe.zcard(self.shard_keys(shard).destination(d));
                }
            })
            .await
            .map_err(|e| e.into_error("stats"))?;
        stats.deferred_by_destination = dests
            .into_iter()
            .enumerate()
            .map(|(i, d)| (d, counts.iter().map(|per_shard| per_shard[i]).sum()))
            .collect();
        Ok(stats)
    }

    async fn list(&self) -> Result<Vec<(Envelope, MessageState)>, SpoolError> {
        let mut all = Vec::new();
        for shard in 0..self.config().shards {
            let mut conn = self.conn_for(shard, "list")?;
            let k = self.shard_keys(shard);
            let ids: Vec<String> = bounded("list", self.config().timeout, conn.zrange(k.arrivals(), 0, -1)).await?;
            for chunk in ids.chunks(500) {
                let mut pipe = redis::pipe();
                for id in chunk {
                    let id = QueueId::from(id.clone());
                    pipe.hgetall(k.msg(&id)).zscore(k.deferred(), id.as_str());
                }
                let replies: Vec<(std::collections::HashMap<String, String>, Option<f64>)> =
                    bounded("list", self.config().timeout, pipe.query_async(&mut conn)).await?;
                all.extend(replies.into_iter().filter_map(|(fields, due)| listed(&fields, due)));
            }
        }
        all.sort_by_key(|(e, _)| e.received_at);
        Ok(all)
    }

    async fn show(&self, id: &QueueId) -> Result<Option<(Envelope, MessageState)>, SpoolError> {
        let Some(shard) = self.shard_holding(id).await? else { return Ok(None) };
        let k = self.shard_keys(shard);
        let mut pipe = redis::pipe();
        pipe.hgetall(k.msg(id)).zscore(k.deferred(), id.as_str());
        let (fields, due): (std::collections::HashMap<String, String>, Option<f64>) =
            bounded("show", self.config().timeout, pipe.query_async(&mut self.conn_for(shard, "show")?)).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        listed(&fields, due).map(Some).ok_or_else(|| SpoolError::Corrupt(id.clone()))
    }

    async fn audit(&self) -> Result<QueueAudit, SpoolError> {
        let mut audit = QueueAudit::default();
        for shard in 0..self.config().shards {
            self.audit_shard(shard, &mut audit).await?;
        }
        Ok(audit)
    }
}

/// A message's envelope and state from its hash and its deferred score:
/// held (an operator's hold counts while it is leased), deferred, or active.
fn listed(fields: &std::collections::HashMap<String, String>, due: Option<f64>) -> Option<(Envelope, MessageState)> {
    let env = Envelope::from_fields(fields)?;
    let state = match (env.held, due) {
        (true, _) => MessageState::Held,
        (false, Some(due)) => MessageState::Deferred { due: due as i64 },
        (false, None) => MessageState::Active,
    };
    Some((env, state))
}

/// The leases TAKEOVER and RECLAIM answer with: entry, id, generation each.
fn claimed_leases(triples: &[String], shard: u32, owner: &str) -> Vec<Lease> {
    triples
        .chunks_exact(3)
        .map(|t| Lease::new(QueueId::from(t[1].clone()), shard, t[0].clone(), owner, t[2].parse().unwrap_or(0)))
        .collect()
}
