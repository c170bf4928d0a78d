//! Receiving into Redis: a body written in chunks, then one commit.
//!
//! Receiving costs one round trip for a body up to `queue.chunk_size`.
//! Larger bodies are appended to an expiring temporary key; the writer
//! counts every byte and checks APPEND's answer, and COMMIT renames the key
//! only when it holds exactly that count, so a chunk lost to a restart or a
//! failover gives 451, never a message without its start. The key's TTL is
//! renewed while the transfer is alive, and removed when it is abandoned.
//!
//! With `queue.min_replicas_ack`, the commit has two phases on a
//! connection of its own ([`WaitPool`], so no other traffic of the node
//! waits behind WAIT): the message is stored staged (not deliverable) and
//! WAITed for, then made deliverable and WAITed for again; too few
//! acknowledgements withdraw it and answer 451. Only a message a node
//! took for delivery between the two WAITs cannot be withdrawn: it gets
//! 451 too (its only copy may be the unconfirmed one), so it may arrive
//! twice, never not at all. Staged messages a crash left behind are
//! swept (`maintain`).
//!
//! A commit carries a deadline (now + `queue.timeout`): one that reaches
//! Redis later, held up in a partition, is refused. A commit whose reply
//! never came may still have run in time: the writer then asks whether the message landed
//! (envelope, or the tombstone of one already delivered), which also voids
//! the id when it did not, and answers 250 or 451 accordingly, so a
//! client's retry does not queue a second copy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::scripts::{COMMIT, LANDED, PUBLISH, WITHDRAW};
use super::{Failure, Link, Primary, ShardKeys, bounded, call, unavailable};
use crate::config::QueueConfig;
use crate::metrics::METRICS;
use crate::spool::{Envelope, QueueId, SpoolBody, SpoolError};

/// A half-received body's temporary key; renewed every third of it while
/// the transfer lives, so it only outlives a node that died mid-transfer.
const TMP_BODY_TTL: Duration = Duration::from_secs(600);
/// Connections for commits that WAIT for replicas, at most, per node.
const WAIT_CONNECTIONS: usize = 64;
/// How often a commit whose reply was lost is looked up (each bounded by
/// `queue.timeout`).
const LANDED_CHECKS: u32 = 3;
/// How long a voided id refuses a late commit: longer than any command
/// stays in flight on a connection.
const VOID_TTL: Duration = Duration::from_secs(3600);

pub(in crate::spool) struct RedisBody {
    link: Arc<Link>,
    keys: ShardKeys,
    id: QueueId,
    /// Written but not yet spilled.
    buf: Vec<u8>,
    written: u64,
    /// Bytes the temporary key is known to hold.
    spilled: u64,
    /// A spill was sent (it may have landed even if it failed).
    tmp_used: bool,
    keepalive: Option<tokio::task::AbortHandle>,
    finished: bool,
}

impl RedisBody {
    pub(super) fn new(link: Arc<Link>, keys: ShardKeys, id: QueueId) -> RedisBody {
        RedisBody {
            link,
            keys,
            id,
            buf: Vec::new(),
            written: 0,
            spilled: 0,
            tmp_used: false,
            keepalive: None,
            finished: false,
        }
    }

    fn config(&self) -> &QueueConfig {
        &self.link.config
    }

    async fn spill(&mut self) -> Result<(), SpoolError> {
        let tmp = self.keys.tmp(&self.id);
        self.tmp_used = true;
        let mut pipe = redis::pipe();
        pipe.append(&tmp, self.buf.as_slice()).expire(&tmp, TMP_BODY_TTL.as_secs() as i64).ignore();
        let mut conn = self.link.conn_for(self.keys.shard(), "append")?;
        let (stored,): (u64,) = bounded("append", self.config().timeout, pipe.query_async(&mut conn)).await?;
        let expected = self.spilled + self.buf.len() as u64;
        if stored != expected {
            METRICS.queue_errors.with_label_values(&["short_body"]).inc();
            return Err(SpoolError::BodyMismatch { id: self.id.clone(), expected, found: stored });
        }
        self.spilled = expected;
        self.buf.clear();
        if self.keepalive.is_none() {
            self.keepalive = Some(self.spawn_keepalive(tmp));
        }
        Ok(())
    }

    /// Renews the temporary key's TTL while the transfer lives (a slow
    /// BDAT kept alive with NOOP spills nothing for a long time).
    fn spawn_keepalive(&self, tmp: String) -> tokio::task::AbortHandle {
        let link = self.link.clone();
        let (limit, shard) = (self.config().timeout, self.keys.shard());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(TMP_BODY_TTL / 3).await;
                if let Ok(mut conn) = link.conn(shard) {
                    let _ = call(limit, conn.expire::<_, ()>(&tmp, TMP_BODY_TTL.as_secs() as i64)).await;
                }
            }
        })
        .abort_handle()
    }

    async fn drop_tmp(&mut self) {
        if self.tmp_used
            && let Ok(mut conn) = self.link.conn(self.keys.shard())
        {
            let _ = call(self.config().timeout, conn.del::<_, ()>(self.keys.tmp(&self.id))).await;
        }
        self.tmp_used = false;
    }

    fn invocation<'a>(&'a self, env: &Envelope, stage: bool) -> Result<redis::ScriptInvocation<'a>, SpoolError> {
        // Stored with the size of what was written (SpoolBody::commit).
        let env = Envelope { size: self.written, ..env.clone() };
        let mut fields = env.to_fields().map_err(|e| unavailable("enqueue", e))?;
        fields.push(("body", self.keys.body(&self.id)));
        let k = &self.keys;
        let mut inv = COMMIT.prepare_invoke();
        inv.key(k.tmp(&self.id)).key(k.body(&self.id)).key(k.msg(&self.id)).key(k.ready()).key(k.arrivals());
        inv.key(k.staged()).key(k.void(&self.id));
        let spilled: i64 = if self.tmp_used { self.spilled as i64 } else { -1 };
        inv.arg(if stage { "1" } else { "0" }).arg(spilled).arg(self.buf.as_slice()).arg(self.id.as_str());
        inv.arg(env.received_at).arg(self.deadline());
        for (k, v) in &fields {
            inv.arg(*k).arg(v.as_str());
        }
        Ok(inv)
    }

    /// When a commit sent now must have run (unix ms): after that this
    /// writer has given up on it, so the script refuses it.
    fn deadline(&self) -> i64 {
        chrono::Utc::now().timestamp_millis() + self.config().timeout.as_millis() as i64
    }

    /// The commit script refused the body (a chunk went missing).
    fn refused(&self, e: &redis::RedisError) -> SpoolError {
        if e.code() != Some("SHORTBODY") {
            return unavailable("enqueue", e);
        }
        METRICS.queue_errors.with_label_values(&["short_body"]).inc();
        let found = e.detail().and_then(|d| d.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or(0);
        SpoolError::BodyMismatch { id: self.id.clone(), expected: self.spilled, found }
    }

    /// After a commit without a reply: is the message there (or already
    /// delivered)? If not, the id is voided so that the commit can no
    /// longer land. `None` when Redis cannot tell us.
    async fn landed(&self) -> Option<bool> {
        let k = &self.keys;
        let mut inv = LANDED.prepare_invoke();
        inv.key(k.msg(&self.id)).key(k.done(&self.id)).key(k.void(&self.id)).arg(VOID_TTL.as_millis() as u64);
        for _ in 0..LANDED_CHECKS {
            let asked = match self.link.conn(k.shard()) {
                Ok(mut conn) => call(self.config().timeout, inv.invoke_async::<i64>(&mut conn)).await,
                Err(e) => Err(e),
            };
            match asked {
                Ok(n) => return Some(n == 1),
                Err(_) => tokio::time::sleep(self.config().timeout / 4).await,
            }
        }
        None
    }

    async fn commit_direct(&mut self, env: &Envelope) -> Result<(), SpoolError> {
        let mut conn = self.link.conn_for(self.keys.shard(), "enqueue")?;
        let inv = self.invocation(env, false)?;
        let sent: Result<String, Failure> = call(self.config().timeout, inv.invoke_async(&mut conn)).await;
        match sent {
            Ok(_) => Ok(()),
            Err(Failure::Answered(e)) => {
                let error = self.refused(&e);
                self.drop_tmp().await;
                Err(error)
            }
            Err(Failure::NoAnswer(why)) => match self.landed().await {
                Some(true) => {
                    METRICS.queue_commits_recovered.inc();
                    tracing::warn!(queue_id = %self.id, "{}: commit reply lost ({why}), but the message is queued", self.id);
                    Ok(())
                }
                Some(false) => {
                    self.drop_tmp().await;
                    Err(unavailable("enqueue", why))
                }
                None => Err(unavailable("enqueue", format!("{why}; whether it landed is unknown"))),
            },
        }
    }

    /// Withdraws a message whose replication was not confirmed.
    async fn withdraw(&self) -> Result<Withdrawn, SpoolError> {
        let k = &self.keys;
        let mut inv = WITHDRAW.prepare_invoke();
        inv.key(k.msg(&self.id)).key(k.body(&self.id)).key(k.ready()).key(k.arrivals()).key(k.staged());
        inv.key(k.done(&self.id)).arg(self.id.as_str());
        let mut conn = self.link.conn_for(k.shard(), "withdraw")?;
        Ok(match bounded("withdraw", self.config().timeout, inv.invoke_async::<i64>(&mut conn)).await? {
            0 => Withdrawn::Delivering,
            3 => Withdrawn::Completed,
            _ => Withdrawn::Gone,
        })
    }

    /// Too few replicas confirmed the commit: 451, unless a node already
    /// completed the message (then nothing is left to lose). A message a
    /// node is delivering gets 451 too: if that delivery fails and the
    /// primary dies, only the unconfirmed copy held it, so the client's
    /// retry is what keeps it (a duplicate at worst, never a loss).
    async fn not_replicated(&mut self, got: u32) -> Result<(), SpoolError> {
        let wanted = self.config().min_replicas_ack;
        METRICS.queue_errors.with_label_values(&["wait"]).inc();
        match self.withdraw().await {
            Ok(Withdrawn::Completed) => {
                tracing::info!(queue_id = %self.id, got, wanted, "{}: replicas did not confirm the commit, but a node already completed it: answering 250", self.id);
                Ok(())
            }
            Ok(Withdrawn::Delivering) => {
                tracing::warn!(queue_id = %self.id, got, wanted, "{}: replicas did not confirm the commit and a node already delivers it: answering 451, so the copy may arrive twice", self.id);
                Err(SpoolError::NotReplicated { wanted, got })
            }
            Ok(Withdrawn::Gone) | Err(_) => {
                self.drop_tmp().await;
                Err(SpoolError::NotReplicated { wanted, got })
            }
        }
    }

    async fn commit_replicated(&mut self, env: &Envelope) -> Result<(), SpoolError> {
        let wanted = self.config().min_replicas_ack;
        let ack = self.config().replicas_ack_timeout;
        let limit = self.config().timeout + ack;
        let primary = self.link.primary(self.keys.shard()).map_err(|e| e.into_error("wait"))?;
        let live = self.link.live_epochs();
        let mut waiter = self.link.waiters.get(&primary, &live, self.config().timeout).await?;
        let stage = self.invocation(env, true)?;
        let staged = script_then_wait::<String>(waiter.conn(), &COMMIT, &stage, wanted, ack, limit).await;
        let got = match staged {
            Ok((_, got)) => got,
            Err(Failure::Answered(e)) => {
                let error = self.refused(&e);
                self.drop_tmp().await;
                return Err(error);
            }
            Err(Failure::NoAnswer(why)) => {
                waiter.broken();
                let _ = self.withdraw().await;
                return Err(unavailable("enqueue", why));
            }
        };
        if got < wanted {
            return self.not_replicated(got).await;
        }
        let k = &self.keys;
        let mut publish = PUBLISH.prepare_invoke();
        publish.key(k.msg(&self.id)).key(k.ready()).key(k.arrivals()).key(k.staged());
        publish.arg(self.id.as_str()).arg(env.received_at).arg(self.deadline());
        match script_then_wait::<i64>(waiter.conn(), &PUBLISH, &publish, wanted, ack, limit).await {
            Ok((1, got)) if got >= wanted => Ok(()),
            Ok((1, got)) => self.not_replicated(got).await,
            Ok(_) => Err(unavailable("enqueue", "staged message swept before it was published")),
            Err(e) => {
                if matches!(e, Failure::NoAnswer(_)) {
                    waiter.broken();
                }
                self.not_replicated(0).await
            }
        }
    }
}

/// What withdrawing an unconfirmed commit found.
enum Withdrawn {
    /// Nothing of the message is left (withdrawn, or never on this server).
    Gone,
    /// A node is delivering it: it cannot be taken back.
    Delivering,
    /// A node already delivered (or bounced) it.
    Completed,
}

/// Runs a script and WAITs for its write on one connection, in one round
/// trip. Returns the script's answer and how many replicas acknowledged.
async fn script_then_wait<T: redis::FromRedisValue>(
    conn: &mut MultiplexedConnection,
    script: &redis::Script,
    invocation: &redis::ScriptInvocation<'_>,
    replicas: u32,
    ack: Duration,
    limit: Duration,
) -> Result<(T, u32), Failure> {
    let mut pipe = redis::pipe();
    pipe.invoke_script(invocation).cmd("WAIT").arg(replicas).arg(ack.as_millis() as u64);
    match call(limit, pipe.query_async::<(T, u32)>(conn)).await {
        Err(Failure::Answered(e)) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            // The script did not run: load it and send both again.
            call(limit, script.prepare_invoke().load_async(conn)).await?;
            call(limit, pipe.query_async::<(T, u32)>(conn)).await
        }
        r => r,
    }
}

#[async_trait::async_trait]
impl SpoolBody for RedisBody {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), SpoolError> {
        self.buf.extend_from_slice(bytes);
        self.written += bytes.len() as u64;
        if self.buf.len() >= self.config().chunk_size {
            self.spill().await?;
        }
        Ok(())
    }

    fn written(&self) -> u64 {
        self.written
    }

    async fn commit(mut self: Box<Self>, env: &Envelope) -> Result<(), SpoolError> {
        let started = Instant::now();
        if let Some(k) = self.keepalive.take() {
            k.abort();
        }
        let result = if self.config().min_replicas_ack > 0 {
            self.commit_replicated(env).await
        } else {
            self.commit_direct(env).await
        };
        self.finished = true;
        if result.is_ok() {
            METRICS.queue_enqueue_seconds.observe(started.elapsed().as_secs_f64());
        }
        result
    }

    async fn abort(mut self: Box<Self>) {
        self.drop_tmp().await;
        self.finished = true;
    }
}

impl Drop for RedisBody {
    /// A session cut mid-transfer: stop renewing the temporary key and
    /// delete it (best effort; its TTL is the fallback).
    fn drop(&mut self) {
        if let Some(k) = self.keepalive.take() {
            k.abort();
        }
        if self.finished || !self.tmp_used {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current()
            && let Ok(mut conn) = self.link.conn(self.keys.shard())
        {
            let (tmp, limit) = (self.keys.tmp(&self.id), self.config().timeout);
            runtime.spawn(async move {
                let _ = call(limit, conn.del::<_, ()>(tmp)).await;
            });
        }
    }
}

/// Connections for WAIT: each replicated commit takes one for itself, so
/// WAIT never delays another command of the node.
pub(super) struct WaitPool {
    /// By the epoch of the primary they go to (see [`super::Primary`]): on
    /// a cluster, the primaries of every shard.
    idle: std::sync::Mutex<Vec<(u64, MultiplexedConnection)>>,
    slots: Arc<Semaphore>,
    config: redis::AsyncConnectionConfig,
}

impl WaitPool {
    pub(super) fn new(config: &QueueConfig) -> WaitPool {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout + config.replicas_ack_timeout));
        WaitPool { idle: std::sync::Mutex::new(Vec::new()), slots: Arc::new(Semaphore::new(WAIT_CONNECTIONS)), config }
    }

    /// A connection to `primary`; idle ones to servers no longer in `live`
    /// (epochs) are closed.
    async fn get(self: &Arc<Self>, primary: &Primary, live: &[u64], limit: Duration) -> Result<Waiter, SpoolError> {
        let permit = tokio::time::timeout(limit, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| unavailable("wait", "no WAIT connection free"))?
            .map_err(|e| unavailable("wait", e))?;
        let idle = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.retain(|(epoch, _)| live.contains(epoch));
            idle.iter().rposition(|(epoch, _)| *epoch == primary.epoch).map(|at| idle.swap_remove(at))
        };
        let conn = match idle {
            Some((_, c)) => c,
            None => {
                let connecting = primary.client.get_multiplexed_async_connection_with_config(&self.config);
                bounded("wait", limit, connecting).await?
            }
        };
        Ok(Waiter { conn: Some(conn), epoch: primary.epoch, pool: self.clone(), _permit: permit })
    }
}

/// One WAIT connection, back to the pool on drop unless it broke.
struct Waiter {
    conn: Option<MultiplexedConnection>,
    epoch: u64,
    pool: Arc<WaitPool>,
    _permit: OwnedSemaphorePermit,
}

impl Waiter {
    fn conn(&mut self) -> &mut MultiplexedConnection {
        self.conn.as_mut().expect("present until dropped or broken")
    }

    /// Not reused: a reply may still be in flight on it.
    fn broken(&mut self) {
        self.conn = None;
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            self.pool.idle.lock().unwrap_or_else(|e| e.into_inner()).push((self.epoch, c));
        }
    }
}
