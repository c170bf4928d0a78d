//! Delivery from the shared queue, on every node.
//!
//! A reader leases entries from the ready streams (consumer group
//! `delivery`, one consumer per node) and runs up to `delivery.concurrency`
//! deliveries; each renews its lease while it runs. Entries whose node
//! stopped renewing are taken over after `queue.lease`. A scheduler moves
//! due deferred messages back into the streams, and a prober gives each
//! destination with deferred mail one attempt every
//! `delivery.probe_interval`; the first success to a destination that had
//! deferred mail releases the rest at once (fast drain), bounded by
//! `delivery.destination_concurrency` per success.
//!
//! Invariants: a message leaves the queue only when every recipient is
//! final (delivered or bounced, the bounce queued first); delivery is
//! at-least-once (a crash between the destination's 250 and the ack may
//! duplicate, never lose); a null-sender message is never bounced.

pub mod client;
pub mod dialer;
pub mod dsn;
mod pool;
pub mod probe;
pub mod route;
pub mod tls;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::config::Config;
use crate::dns::Dns;
use crate::domains::Domains;
use crate::metrics::METRICS;
use crate::shutdown::{Phase, Shutdown};
use crate::spool::{BodyReader, Deliver, Entry, Envelope, Lease, QueueId, Recipient, RecipientState, SpoolError};
use client::{BodySource, ClientError, Connection, Outcome, RemoteReply};
use dialer::Dialer;
use pool::{Pool, session_key};
use route::{Route, RouteError};
use tls::TlsPolicy;

/// Most messages one flush (ETRN, `queue flush`) releases per destination.
pub const FLUSH_LIMIT: usize = 1_000_000;
/// Entries read from the queue per XREADGROUP, at most.
const LEASE_BATCH: usize = 100;
/// How long the reader blocks waiting for new entries.
const LEASE_BLOCK: Duration = Duration::from_secs(1);
/// Due deferred messages moved per shard per scheduler tick.
const SCHEDULE_BATCH: usize = 500;
/// How often a node runs the queue's housekeeping.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(30);
/// Longest wait between retries of a delivery result the queue did not take.
const BOOKKEEPING_RETRY_MAX: Duration = Duration::from_secs(2);
/// Most of a failed message read back for the headers of its DSN.
const DSN_HEADER_READ: usize = 64 * 1024;

/// What happened to one recipient in one attempt.
#[derive(Debug, Clone)]
enum Fate {
    /// `tls`: the session's TLS state when it was encrypted; `dsn`: the
    /// next hop offered DSN, so NOTIFY went on with the message.
    Sent {
        reply: String,
        relay: String,
        tls: Option<String>,
        dsn: bool,
    },
    Deferred {
        reason: String,
        relay: Option<String>,
    },
    Bounced {
        status: String,
        reason: String,
        relay: Option<String>,
    },
}

impl Fate {
    fn from_reply(reply: &RemoteReply, relay: &str, tls: Option<&str>, dsn: bool) -> Fate {
        let relay = relay.to_string();
        if reply.is_success() {
            Fate::Sent { reply: reply.to_string(), relay, tls: tls.map(str::to_string), dsn }
        } else if reply.is_permanent() {
            Fate::Bounced { status: reply.enhanced(), reason: reply.to_string(), relay: Some(relay) }
        } else {
            Fate::Deferred { reason: reply.to_string(), relay: Some(relay) }
        }
    }
}

/// How often a node says its host name to the queue and reads the others'.
const CLUSTER_HOSTNAMES_EVERY: Duration = Duration::from_secs(5);
/// A node's host name counts as the cluster's this long after it was last
/// said (a node gone for good drops out).
const CLUSTER_HOSTNAMES_TTL: Duration = Duration::from_secs(600);

/// The `myhostname` of every node of the cluster, this node's first: every
/// node says its own to the queue every [`CLUSTER_HOSTNAMES_EVERY`]
/// (delivering or not) and reads the others'.
pub struct ClusterNames {
    me: String,
    names: std::sync::RwLock<Vec<String>>,
}

impl ClusterNames {
    pub fn new(myhostname: &str) -> Arc<ClusterNames> {
        Arc::new(ClusterNames { me: myhostname.to_string(), names: std::sync::RwLock::new(vec![myhostname.into()]) })
    }

    pub fn names(&self) -> Vec<String> {
        self.names.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Says this node's name and reads the others' until the node stops.
    pub async fn run(self: Arc<Self>, spool: Arc<dyn Deliver>, mut stop: Shutdown) {
        loop {
            match spool.cluster_hostnames(&self.me, CLUSTER_HOSTNAMES_TTL).await {
                Ok(mut names) => {
                    names.retain(|n| *n != self.me);
                    names.sort();
                    names.insert(0, self.me.clone());
                    let mut known = self.names.write().unwrap_or_else(|e| e.into_inner());
                    if *known != names {
                        tracing::info!("cluster nodes (by myhostname): {}", names.join(", "));
                        *known = names;
                    }
                }
                Err(e) => tracing::debug!(error = %e, "could not say this node's host name to the queue"),
            }
            tokio::select! {
                () = tokio::time::sleep(CLUSTER_HOSTNAMES_EVERY) => {}
                () = stop.reached(Phase::Stopped) => return,
            }
        }
    }
}

pub struct Delivery {
    config: Config,
    spool: Arc<dyn Deliver>,
    domains: Arc<Domains>,
    dns: Dns,
    /// Connection limits, cached sessions and known-deferred destinations.
    pool: Pool,
    /// Leases being worked on, to hand back on stop.
    in_flight: Mutex<HashMap<Entry, Lease>>,
    /// How sessions to destinations are opened (TLS levels, loops).
    dialer: Arc<Dialer>,
}

impl Delivery {
    pub fn new(
        config: Config,
        spool: Arc<dyn Deliver>,
        domains: Arc<Domains>,
        dns: Dns,
        dialer: Arc<Dialer>,
    ) -> Arc<Delivery> {
        Arc::new(Delivery {
            pool: Pool::new(config.delivery.destination_concurrency),
            config,
            spool,
            domains,
            dns,
            in_flight: Mutex::new(HashMap::new()),
            dialer,
        })
    }

    fn node(&self) -> &str {
        &self.config.node_id
    }

    /// Runs until `stop` turns true; then lets deliveries finish for a
    /// grace period and hands back the rest. Leases are taken only for free
    /// delivery slots, so every lease this node holds is being worked on
    /// (and renewed).
    pub async fn run(self: Arc<Self>, mut stop: Shutdown) {
        let slots = Arc::new(Semaphore::new(self.config.delivery.concurrency));
        let background = [tokio::spawn(self.clone().schedule_loop()), tokio::spawn(self.clone().probe_loop())];
        let mut tasks = tokio::task::JoinSet::new();
        let mut failing = false;
        // Leases of this node that it does not hold: left by its previous
        // run, and after a read error (the read may have run in Redis).
        let mut reclaim = true;
        let takeover_every = (self.config.queue.lease / 2).max(Duration::from_millis(500));
        let mut next_takeover = Instant::now() + takeover_every;
        while !stop.is_stopping() {
            while tasks.try_join_next().is_some() {}
            let first = tokio::select! {
                permit = slots.clone().acquire_owned() => permit.expect("the slot semaphore is never closed"),
                () = stop.reached(Phase::Draining) => continue,
            };
            let mut permits = vec![first];
            while permits.len() < LEASE_BATCH {
                match slots.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let reclaiming = reclaim;
            let takeover = !reclaiming && Instant::now() >= next_takeover;
            let got = if reclaiming {
                let held: HashSet<Entry> =
                    self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
                self.spool.reclaim(self.node(), &held, permits.len()).await
            } else if takeover {
                next_takeover = Instant::now() + takeover_every;
                self.spool.take_over(self.node(), self.config.queue.lease, permits.len()).await
            } else {
                self.spool.lease(self.node(), permits.len(), LEASE_BLOCK).await
            };
            let leases = match got {
                Ok(l) => {
                    if failing {
                        tracing::info!("delivery: queue reachable again");
                        failing = false;
                    }
                    // More may be left when every slot got one.
                    reclaim = reclaiming && l.len() == permits.len();
                    l
                }
                Err(e) => {
                    if !failing {
                        tracing::error!(error = %e, "delivery: cannot read the queue; retrying");
                        failing = true;
                    }
                    reclaim = true;
                    drop(permits);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        () = stop.reached(Phase::Draining) => {}
                    }
                    continue;
                }
            };
            for (lease, permit) in leases.into_iter().zip(permits) {
                if reclaiming {
                    METRICS.queue_leases_reclaimed.inc();
                    tracing::info!(queue_id = %lease.id(), "{}: leased to {} but not held (a lost read reply or an earlier run): reclaimed", lease.id(), self.node());
                }
                if takeover {
                    METRICS.queue_lease_takeovers.inc();
                    tracing::info!(queue_id = %lease.id(), "{}: lease expired on another node, taken over by {}", lease.id(), self.node());
                }
                self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).insert(lease.entry().clone(), lease.clone());
                let me = self.clone();
                tasks.spawn(async move {
                    me.deliver(&lease).await;
                    me.in_flight.lock().unwrap_or_else(|e| e.into_inner()).remove(lease.entry());
                    drop(permit);
                });
            }
        }
        background.iter().for_each(|t| t.abort());
        tracing::info!(in_flight = tasks.len(), "delivery: stopping, letting deliveries finish");
        let _ =
            tokio::time::timeout(self.config.delivery.stop_grace, async { while tasks.join_next().await.is_some() {} })
                .await;
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        self.pool.close_all().await;
        let left: Vec<Lease> =
            self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).drain().map(|(_, l)| l).collect();
        for lease in left {
            match self.spool.hand_back(&lease).await {
                Ok(()) => tracing::info!(queue_id = %lease.id(), "{}: handed back to the cluster", lease.id()),
                Err(SpoolError::LeaseLost(_)) => {}
                Err(e) => {
                    tracing::warn!(queue_id = %lease.id(), error = %e, "hand back failed; another node takes it over after queue.lease")
                }
            }
        }
    }

    /// Due deferred messages every second; housekeeping (half-committed
    /// messages, consumers of nodes gone, expired unreadable messages)
    /// every [`MAINTENANCE_INTERVAL`].
    async fn schedule_loop(self: Arc<Self>) {
        let mut next_maintenance = Instant::now();
        loop {
            let now = chrono::Utc::now().timestamp_millis();
            match self.spool.schedule_due(now, SCHEDULE_BATCH).await {
                Ok(n) if n > 0 => tracing::debug!(moved = n, "delivery: deferred messages due"),
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "delivery: scheduler could not reach the queue"),
            }
            if Instant::now() >= next_maintenance {
                next_maintenance = Instant::now() + MAINTENANCE_INTERVAL;
                self.maintain().await;
            }
            self.pool.prune();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn maintain(&self) {
        match self.spool.maintain(self.node(), self.config.delivery.max_queue_lifetime).await {
            Ok(m) => {
                for (action, n) in [
                    ("staged_removed", m.staged_removed),
                    ("consumers_pruned", m.consumers_pruned),
                    ("corrupt_removed", m.corrupt_removed),
                ] {
                    if n > 0 {
                        METRICS.queue_maintenance.with_label_values(&[action]).inc_by(n);
                        tracing::info!(count = n, "queue housekeeping: {}", action.replace('_', " "));
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "delivery: housekeeping could not reach the queue"),
        }
    }

    /// One attempt per destination with deferred mail per interval: the
    /// first message tells whether the destination is back.
    async fn probe_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.config.delivery.probe_interval).await;
            match self.spool.deferred_destinations().await {
                Ok(dests) => {
                    for d in &dests {
                        let _ = self.spool.release(d, 1).await;
                    }
                    self.pool.deferred_are(dests);
                }
                Err(e) => tracing::debug!(error = %e, "delivery: prober could not reach the queue"),
            }
        }
    }

    /// One delivery attempt of one message, start to finish: the attempt
    /// runs while its lease is renewed, then its result is stored, retried
    /// until the queue takes it or says the lease is gone.
    async fn deliver(self: &Arc<Self>, lease: &Lease) {
        let guard = LeaseGuard::new(self.config.queue.lease);
        let work = async {
            let settlement = self.attempt(lease, &guard).await;
            self.store(lease, settlement).await
        };
        tokio::select! {
            () = work => {}
            () = self.keep_renewed(lease, &guard) => {}
        }
    }

    /// Renews the lease every third of `queue.lease` for as long as the
    /// delivery runs; a lease found lost ends the renewals (and the
    /// attempt stops before the final dot, see [`LeaseGuard`]).
    async fn keep_renewed(&self, lease: &Lease, guard: &LeaseGuard) {
        loop {
            tokio::time::sleep(self.config.queue.lease / 3).await;
            let sent = Instant::now();
            match self.spool.renew(lease).await {
                Ok(()) => guard.renewed(sent),
                Err(SpoolError::LeaseLost(_)) => {
                    guard.lose();
                    tracing::warn!(queue_id = %lease.id(), "{}: lease lost to another node; stopping this attempt", lease.id());
                    std::future::pending::<()>().await;
                }
                Err(e) => tracing::warn!(queue_id = %lease.id(), error = %e, "lease renewal failed"),
            }
        }
    }

    /// Stores the result of an attempt; a queue that does not answer is
    /// retried within seconds of answering again (the lease, still
    /// renewed, keeps other nodes away meanwhile).
    async fn store(&self, lease: &Lease, settlement: Settlement) {
        let mut wait = Duration::from_millis(250);
        let mut logged = false;
        loop {
            let result = match &settlement {
                Settlement::Complete => self.spool.complete(lease).await,
                Settlement::Defer { env, due, destinations, .. } => {
                    self.spool.defer(lease, env, *due, destinations).await
                }
                Settlement::Skip => self.spool.skip(lease).await,
                Settlement::HandBack => self.spool.hand_back(lease).await,
                Settlement::Quarantine => self.spool.quarantine(lease).await,
            };
            match result {
                Ok(()) => {
                    if let Settlement::Defer { down, .. } = &settlement {
                        self.pool.deferred_to(down.iter().cloned());
                    }
                    if logged {
                        tracing::info!(queue_id = %lease.id(), "{}: delivery result stored after retrying", lease.id());
                    }
                    return;
                }
                Err(SpoolError::LeaseLost(_)) => {
                    METRICS.queue_leases_lost.inc();
                    tracing::warn!(queue_id = %lease.id(), "{}: lease no longer ours; the result of this attempt is dropped (another node has the message, or it left the queue)", lease.id());
                    return;
                }
                Err(e) => {
                    METRICS.queue_bookkeeping_retries.inc();
                    if !logged {
                        tracing::error!(queue_id = %lease.id(), error = %e, "{}: delivery bookkeeping failed; retrying", lease.id());
                        logged = true;
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(BOOKKEEPING_RETRY_MAX);
                }
            }
        }
    }

    async fn attempt(self: &Arc<Self>, lease: &Lease, guard: &LeaseGuard) -> Settlement {
        // The envelope and the body's first piece in one round trip.
        let (mut env, start) = match self.spool.envelope_and_start(lease, self.config.queue.chunk_size).await {
            Ok(Some(read)) => read,
            Ok(None) => {
                tracing::info!(queue_id = %lease.id(), "{}: removed from the queue", lease.id());
                return Settlement::Skip;
            }
            Err(SpoolError::Corrupt(_)) => {
                METRICS.queue_quarantined.inc();
                tracing::error!(queue_id = %lease.id(), "{}: envelope unreadable; put on hold (queue show/delete), removed after delivery.max_queue_lifetime", lease.id());
                return Settlement::Quarantine;
            }
            Err(e) => {
                tracing::warn!(queue_id = %lease.id(), error = %e, "{}: cannot load the message; handing it back", lease.id());
                return Settlement::HandBack;
            }
        };
        if env.held {
            tracing::info!(queue_id = %lease.id(), "{}: on hold, not delivered", lease.id());
            return Settlement::Skip;
        }
        let started = Instant::now();
        let had_deferred = env.attempts > 0;
        // The destination of each pending recipient, once per attempt. One
        // transaction per destination and TLS level: recipient domains
        // sharing a relay host may ask for different levels.
        let mut keys = vec![String::new(); env.recipients.len()];
        let mut groups: BTreeMap<(String, TlsPolicy), (Route, Vec<usize>)> = BTreeMap::new();
        for (i, r) in env.recipients.iter().enumerate() {
            if r.state == RecipientState::Pending {
                let route = Route::for_domain(&r.domain, &self.domains);
                keys[i] = route.key();
                let level = self.dialer.tls_level(&r.domain);
                groups.entry((keys[i].clone(), level)).or_insert_with(|| (route, Vec::new())).1.push(i);
            }
        }
        let mut fates: Vec<(usize, Fate)> = Vec::new();
        let mut recovered = Vec::new();
        for ((key, level), (route, idxs)) in &groups {
            if env.bounce_requested {
                let reason = "bounced by the administrator (mxrelay queue bounce)".to_string();
                fates.extend(
                    idxs.iter()
                        .map(|i| (*i, Fate::Bounced { status: "5.0.0".into(), reason: reason.clone(), relay: None })),
                );
                continue;
            }
            if !guard.valid() {
                let reason = "4.4.2 lease lost to another node before delivery".to_string();
                fates.extend(idxs.iter().map(|i| (*i, Fate::Deferred { reason: reason.clone(), relay: None })));
                continue;
            }
            let slots = self.pool.slots(key);
            let Ok(_slot) = slots.acquire_owned().await else { continue };
            METRICS.delivery_destination_connections.inc();
            let group_fates = self.attempt_route(route, key, *level, &env, (lease, guard, &start), idxs).await;
            METRICS.delivery_destination_connections.dec();
            if group_fates.iter().any(|f| matches!(f, Fate::Sent { .. })) {
                recovered.push(key.clone());
            }
            fates.extend(idxs.iter().copied().zip(group_fates));
        }
        METRICS.delivery_duration_seconds.observe(started.elapsed().as_secs_f64());
        let age = Duration::from_millis((chrono::Utc::now().timestamp_millis() - env.received_at).max(0) as u64);
        let (expired, fates) = expire(fates, age, self.config.delivery.max_queue_lifetime);
        for (i, fate) in &fates {
            self.log_fate(&env.id, &env.recipients[*i], fate, age);
        }
        let bounced: Vec<(usize, Fate)> =
            fates.iter().filter(|(_, f)| matches!(f, Fate::Bounced { .. })).cloned().collect();
        let dsn_queued = bounced.is_empty()
            || match self.notify_sender(lease, &env, &bounced, dsn::Report::Failed { expired }).await {
                Ok(()) => true,
                Err(e) => {
                    // Kept pending: the DSN is written on the next attempt.
                    tracing::error!(queue_id = %env.id, error = %e, "{}: bounce not queued; keeping the recipients for a retry", env.id);
                    false
                }
            };
        self.warn_of_delay(lease, &mut env, &fates, age).await;
        self.report_relayed(lease, &env, &fates).await;
        // Fast drain: a destination that had deferred mail and now accepts.
        // (Before this message is deferred again, so it cannot release itself.)
        for key in &recovered {
            let known = self.pool.recovered(key);
            if had_deferred || known {
                match self.spool.release(key, self.config.delivery.destination_concurrency).await {
                    Ok(n) if n > 0 => {
                        tracing::info!(destination = %key, released = n, "destination accepts mail again: releasing its deferred messages")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(destination = %key, error = %e, "fast drain release failed"),
                }
            }
        }
        env.attempts = env.attempts.saturating_add(1);
        let due = chrono::Utc::now().timestamp_millis() + self.backoff(env.attempts).as_millis() as i64;
        settle(env, &fates, &keys, dsn_queued, &recovered, due)
    }

    /// Postfix's `delay_warning_time`: once a message has waited that long,
    /// one "delayed" DSN for the recipients deferred now that were not
    /// warned of yet (marked in the envelope, so every node warns once).
    /// A warning the queue does not take is tried on the next attempt.
    async fn warn_of_delay(&self, lease: &Lease, env: &mut Envelope, fates: &[(usize, Fate)], age: Duration) {
        let d = &self.config.delivery;
        if d.delay_warning_time.is_zero() || age < d.delay_warning_time || env.sender.is_empty() {
            return;
        }
        let due: Vec<(usize, Fate)> = fates
            .iter()
            .filter(|(i, f)| matches!(f, Fate::Deferred { .. }) && !env.recipients[*i].delay_warned)
            .cloned()
            .collect();
        if due.is_empty() {
            return;
        }
        let until = chrono::DateTime::from_timestamp_millis(env.received_at).unwrap_or_else(chrono::Utc::now)
            + chrono::Duration::from_std(d.max_queue_lifetime).unwrap_or_default();
        match self.notify_sender(lease, env, &due, dsn::Report::Delayed { until }).await {
            Ok(()) => due.iter().for_each(|(i, _)| env.recipients[*i].delay_warned = true),
            Err(e) => {
                tracing::warn!(queue_id = %env.id, error = %e, "{}: delay warning not queued; trying on the next attempt", env.id)
            }
        }
    }

    /// RFC 3461 §4.2: a recipient whose NOTIFY asks for SUCCESS, delivered
    /// to a next hop that does not offer DSN, gets a "relayed" notice from
    /// us, since none will come from there. One that did offer DSN got
    /// the NOTIFY with the message and reports itself.
    async fn report_relayed(&self, lease: &Lease, env: &Envelope, fates: &[(usize, Fate)]) {
        let relayed: Vec<(usize, Fate)> = fates
            .iter()
            .filter(|(i, f)| {
                matches!(f, Fate::Sent { dsn: false, .. })
                    && crate::proto::dsn::notify_wants(env.recipients[*i].notify.as_deref(), "SUCCESS")
            })
            .cloned()
            .collect();
        if relayed.is_empty() {
            return;
        }
        // Best effort: the message itself is delivered whatever happens here.
        if let Err(e) = self.notify_sender(lease, env, &relayed, dsn::Report::Relayed).await {
            tracing::warn!(queue_id = %env.id, error = %e, "{}: relayed notice not queued", env.id);
        }
    }

    /// `retry_min` doubled per attempt up to `retry_max`, ±10 % jitter so a
    /// cluster's retries do not arrive in lockstep.
    fn backoff(&self, attempts: u32) -> Duration {
        retry_delay(self.config.delivery.retry_min, self.config.delivery.retry_max, attempts)
    }

    /// Delivers to one destination; one fate per recipient index.
    async fn attempt_route(
        &self,
        route: &Route,
        destination: &str,
        level: TlsPolicy,
        env: &Envelope,
        (lease, guard, start): (&Lease, &LeaseGuard, &[u8]),
        idxs: &[usize],
    ) -> Vec<Fate> {
        let all = |f: Fate| idxs.iter().map(|_| f.clone()).collect::<Vec<_>>();
        let rcpts: Vec<String> = idxs.iter().map(|i| env.recipients[*i].address.clone()).collect();
        let key = session_key(destination, level);
        if let Some(conn) = self.pool.checkout(&key).await {
            match self.transact(conn, &key, env, (lease, guard, start), &rcpts, true).await {
                Some(fates) => return fates,
                // The cached session was gone (the server closed it, or
                // said 421): nothing was accepted, so a new one tries.
                None => {
                    tracing::debug!(queue_id = %env.id, destination = %destination, "cached session gone; opening a new one")
                }
            }
        }
        let targets = match route.resolve(&self.dns).await {
            Ok(t) => t,
            Err(RouteError::Temporary(e)) => {
                METRICS.delivery_attempts.with_label_values(&["dns_error"]).inc();
                return all(Fate::Deferred { reason: format!("4.4.3 DNS lookup failed: {e}"), relay: None });
            }
            Err(RouteError::Permanent(status, text)) => {
                METRICS.delivery_attempts.with_label_values(&["bounced"]).inc();
                return all(Fate::Bounced { status: status.into(), reason: text, relay: None });
            }
        };
        let mut last_error = String::from("no address to try");
        for target in &targets {
            match self.dialer.open(target, level).await {
                Ok(conn) => {
                    let fates = self.transact(conn, &key, env, (lease, guard, start), &rcpts, false).await;
                    return fates.expect("a new session's transaction always has fates");
                }
                Err(e) => {
                    if let ClientError::Loop { why, .. } = &e {
                        // A configuration error (relay_host names this node,
                        // or a balancer in front of it): the mail waits,
                        // deferred, until the domain's relay_host is corrected.
                        METRICS.delivery_attempts.with_label_values(&["loop"]).inc();
                        tracing::error!(queue_id = %env.id, destination = %destination, "{}: {}[{}]:{}: {e}: {why}; deferred: correct relay_host of its domain", env.id, target.host, target.addr.ip(), target.addr.port());
                    } else {
                        METRICS.delivery_attempts.with_label_values(&["connect_error"]).inc();
                        // One line per address, as Postfix's "connect to …"
                        // lines: the final deferral names only the last one.
                        tracing::info!(queue_id = %env.id, "{}: {}[{}]:{}: {e}", env.id, target.host, target.addr.ip(), target.addr.port());
                    }
                    last_error = format!("{} {e}", e.status());
                }
            }
        }
        all(Fate::Deferred { reason: last_error, relay: None })
    }

    /// One transaction on an open session; the session goes back to the
    /// cache when it ended cleanly. On a `reused` session from the cache,
    /// `None` when it turned out to be gone before any content went out
    /// (lost, or 421 to MAIL), so the server cannot have the message: the
    /// caller opens a new one. Lost once the content began, the attempt
    /// is deferred as on a new session: the server may have the message,
    /// and sending it again at once would make a duplicate of every
    /// such loss (Postfix: "message may be sent more than once").
    async fn transact(
        &self,
        mut conn: Connection,
        key: &str,
        env: &Envelope,
        (lease, guard, start): (&Lease, &LeaseGuard, &[u8]),
        rcpts: &[String],
        reused: bool,
    ) -> Option<Vec<Fate>> {
        let target = conn.target.clone();
        let relay = conn.peer();
        let tls = conn.tls.as_ref().map(|t| t.to_string());
        let all = |f: Fate| rcpts.iter().map(|_| f.clone()).collect::<Vec<_>>();
        if env.smtputf8 && !conn.ext.smtputf8 {
            self.pool.park(key, conn).await;
            return Some(all(Fate::Bounced {
                status: "5.6.7".into(),
                reason: format!("{} does not support SMTPUTF8", target.host),
                relay: Some(relay),
            }));
        }
        if let Some(limit) = conn.ext.size.filter(|l| *l > 0 && env.size > *l) {
            self.pool.park(key, conn).await;
            return Some(all(Fate::Bounced {
                status: "5.3.4".into(),
                reason: format!("message size {} exceeds the limit {limit} of {}", env.size, target.host),
                relay: Some(relay),
            }));
        }
        let mut body = LeasedBody {
            reader: BodyReader::new(self.spool.clone(), lease.clone(), env.size, self.config.queue.chunk_size)
                .starting_with(start.to_vec()),
            guard,
            id: lease.id(),
        };
        let peer_dsn = conn.ext.dsn;
        let fates = match conn.send(env, rcpts, &mut body).await {
            Ok(Outcome::MailRefused(reply)) if reused && reply.code == 421 => return None,
            Err(ClientError::Lost(_)) if reused && !conn.content_started => return None,
            Ok(Outcome::MailRefused(reply)) => all(Fate::from_reply(&reply, &relay, tls.as_deref(), peer_dsn)),
            Ok(Outcome::Replies(replies)) => {
                replies.iter().map(|r| Fate::from_reply(r, &relay, tls.as_deref(), peer_dsn)).collect()
            }
            Err(e) => {
                METRICS.delivery_attempts.with_label_values(&["session_error"]).inc();
                return Some(all(Fate::Deferred { reason: format!("4.4.2 {e}"), relay: Some(relay) }));
            }
        };
        self.pool.park(key, conn).await;
        for f in &fates {
            let label = match f {
                Fate::Sent { .. } => "sent",
                Fate::Deferred { .. } => "deferred",
                Fate::Bounced { .. } => "bounced",
            };
            METRICS.delivery_attempts.with_label_values(&[label]).inc();
        }
        Some(fates)
    }

    fn log_fate(&self, id: &QueueId, r: &Recipient, fate: &Fate, age: Duration) {
        let delay = age.as_secs_f64();
        match fate {
            Fate::Sent { reply, relay, tls, .. } => {
                METRICS.delivery_recipients.with_label_values(&["delivered"]).inc();
                let tls = tls.as_deref().map(|t| format!(", tls={t}")).unwrap_or_default();
                tracing::info!(queue_id = %id, "{id}: to=<{}>, relay={relay}, delay={delay:.1}{tls}, status=sent ({reply})", r.address);
            }
            Fate::Deferred { reason, relay } => {
                METRICS.delivery_recipients.with_label_values(&["deferred"]).inc();
                let relay = relay.as_deref().unwrap_or("none");
                tracing::info!(queue_id = %id, "{id}: to=<{}>, relay={relay}, delay={delay:.1}, status=deferred ({reason})", r.address);
            }
            Fate::Bounced { status, reason, relay } => {
                METRICS.delivery_recipients.with_label_values(&["bounced"]).inc();
                let relay = relay.as_deref().unwrap_or("none");
                tracing::info!(queue_id = %id, "{id}: to=<{}>, relay={relay}, delay={delay:.1}, dsn={status}, status=bounced ({reason})", r.address);
            }
        }
    }

    /// Queues one DSN to the sender: a bounce for the `Bounced` fates, a
    /// delay warning for the `Deferred` ones, or a "relayed" notice for
    /// the `Sent` ones, as `report` says; only for the recipients whose
    /// NOTIFY asks for it, and never for the null sender.
    async fn notify_sender(
        &self,
        lease: &Lease,
        env: &Envelope,
        fates: &[(usize, Fate)],
        report: dsn::Report,
    ) -> Result<(), SpoolError> {
        if env.sender.is_empty() {
            tracing::info!(queue_id = %env.id, "{}: not bouncing a message from the null sender", env.id);
            return Ok(());
        }
        // RFC 3461 NOTIFY: NEVER, or a list without FAILURE (DELAY), asks
        // for no notification of this kind.
        let what = match report {
            dsn::Report::Failed { .. } => "FAILURE",
            dsn::Report::Delayed { .. } => "DELAY",
            dsn::Report::Relayed => "SUCCESS",
        };
        let fates: Vec<&(usize, Fate)> = fates
            .iter()
            .filter(|(i, _)| crate::proto::dsn::notify_wants(env.recipients[*i].notify.as_deref(), what))
            .collect();
        if fates.is_empty() {
            tracing::info!(queue_id = %env.id, "{}: no notification to the sender: NOTIFY does not ask for {what}", env.id);
            return Ok(());
        }
        let headers = self.original_headers(lease, env.size).await?;
        let failed: Vec<dsn::DsnRecipient<'_>> = fates
            .iter()
            .filter_map(|(i, f)| {
                let (status, reason, relay) = match (f, report) {
                    (Fate::Bounced { status, reason, relay }, dsn::Report::Failed { .. }) => {
                        (status.as_str(), reason, relay.as_deref())
                    }
                    // "4.4.1 connect to … failed": the code leads the reason.
                    (Fate::Deferred { reason, relay }, dsn::Report::Delayed { .. }) => {
                        (reason.split_whitespace().next().unwrap_or(""), reason, relay.as_deref())
                    }
                    (Fate::Sent { reply, relay, .. }, dsn::Report::Relayed) => ("2.0.0", reply, Some(relay.as_str())),
                    _ => return None,
                };
                Some(dsn::DsnRecipient {
                    address: &env.recipients[*i].address,
                    status,
                    remote_mta: relay.map(|r| r.split('[').next().unwrap_or(r)),
                    diagnostic: reason,
                    original: env.recipients[*i].orcpt.as_deref().map(crate::proto::dsn::decode_xtext),
                })
            })
            .collect();
        let arrival = chrono::DateTime::from_timestamp_millis(env.received_at).unwrap_or_else(chrono::Utc::now);
        let message = dsn::build(&dsn::DsnInput {
            reporting_mta: &self.config.myhostname,
            queue_id: env.id.as_str(),
            original_sender: &env.sender,
            arrival_date: arrival,
            failed: &failed,
            original_headers: &headers,
            report,
            envid: env.dsn_envid.as_deref().map(crate::proto::dsn::decode_xtext),
            now: chrono::Utc::now(),
        });
        let id = QueueId::new();
        let sender_domain = env.sender.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase()).unwrap_or_default();
        let dsn_env = Envelope {
            id: id.clone(),
            sender: String::new(),
            recipients: vec![Recipient {
                address: env.sender.clone(),
                domain: crate::proto::address::normalise_domain(&sender_domain).unwrap_or(sender_domain),
                state: RecipientState::Pending,
                last_reply: None,
                delay_warned: false,
                notify: None,
                orcpt: None,
            }],
            client_ip: String::new(),
            client_name: "localhost".into(),
            helo: self.config.myhostname.clone(),
            received_at: chrono::Utc::now().timestamp_millis(),
            size: message.len() as u64,
            node: self.config.node_id.clone(),
            // RFC 6533: a sender address in UTF-8 needs SMTPUTF8 to be
            // reached; the returned headers may be 8-bit.
            smtputf8: !env.sender.is_ascii(),
            eight_bit: !message.is_ascii(),
            attempts: 0,
            held: false,
            bounce_requested: false,
            dsn_ret: None,
            dsn_envid: None,
        };
        let mut body = self.spool.open_body(&id);
        body.write(&message).await?;
        body.commit(&dsn_env).await?;
        let kind = match report {
            dsn::Report::Failed { .. } => {
                METRICS.delivery_dsn.inc();
                "non-delivery"
            }
            dsn::Report::Delayed { .. } => {
                METRICS.delivery_delay_warnings.inc();
                "delay"
            }
            dsn::Report::Relayed => {
                METRICS.delivery_relayed_notices.inc();
                "delivery status"
            }
        };
        tracing::info!(queue_id = %id, "{id}: sender {kind} notification: {} (to=<{}>, from=<>)", env.id, env.sender);
        Ok(())
    }

    /// The failed message's header section (bounded), for the DSN.
    async fn original_headers(&self, lease: &Lease, size: u64) -> Result<Vec<u8>, SpoolError> {
        let head_size = size.min(DSN_HEADER_READ as u64);
        let mut reader = BodyReader::new(self.spool.clone(), lease.clone(), head_size, DSN_HEADER_READ);
        let head = reader.next_chunk().await?.unwrap_or_default();
        let end = memchr::memmem::find(&head, b"\r\n\r\n").map_or(head.len(), |p| p + 2);
        Ok(head[..end].to_vec())
    }
}

/// The wait after `attempts` attempts: `min` doubled per attempt after the
/// first, at most `max`, then ±10 % jitter (Postfix's backoff, spread out).
fn retry_delay(min: Duration, max: Duration, attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(20);
    let base = min.saturating_mul(1 << exp).min(max);
    let jitter: f64 = rand::random_range(0.9..1.1);
    // Saturates instead of panicking near `Duration::MAX` (a huge retry_max).
    Duration::try_from_secs_f64(base.as_secs_f64() * jitter).unwrap_or(Duration::MAX)
}

/// Deferrals of a message older than `lifetime` become bounces (4.4.7);
/// returns whether it expired, and the fates to apply.
fn expire(fates: Vec<(usize, Fate)>, age: Duration, lifetime: Duration) -> (bool, Vec<(usize, Fate)>) {
    let expired = age > lifetime;
    let fates = fates
        .into_iter()
        .map(|(i, fate)| match fate {
            Fate::Deferred { reason, relay } if expired => (
                i,
                Fate::Bounced {
                    status: "4.4.7".into(),
                    reason: format!("message expired after {}s in the queue: {reason}", age.as_secs()),
                    relay,
                },
            ),
            f => (i, f),
        })
        .collect();
    (expired, fates)
}

/// What one attempt makes of the message: each recipient with a fate gets
/// its last reply and is delivered, bounced (only once its DSN is queued:
/// `dsn_queued`) or left pending; the message is then complete, or
/// deferred to `due` under the destinations (`keys`, by recipient) still
/// waiting, those of them that took nothing (not in `recovered`) as down.
fn settle(
    mut env: Envelope,
    fates: &[(usize, Fate)],
    keys: &[String],
    dsn_queued: bool,
    recovered: &[String],
    due: i64,
) -> Settlement {
    let mut waiting = BTreeSet::new();
    for (i, fate) in fates {
        let r = &mut env.recipients[*i];
        match fate {
            Fate::Sent { reply, .. } => {
                r.state = RecipientState::Delivered;
                r.last_reply = Some(reply.clone());
            }
            Fate::Deferred { reason, .. } => {
                r.last_reply = Some(reason.clone());
                waiting.insert(keys[*i].clone());
            }
            Fate::Bounced { reason, .. } => {
                r.last_reply = Some(reason.clone());
                if dsn_queued {
                    r.state = RecipientState::Bounced;
                } else {
                    waiting.insert(keys[*i].clone());
                }
            }
        }
    }
    if !env.recipients.iter().any(|r| r.state == RecipientState::Pending) {
        return Settlement::Complete;
    }
    let destinations: Vec<String> = waiting.into_iter().collect();
    let down = destinations.iter().filter(|d| !recovered.contains(d)).cloned().collect();
    Settlement::Defer { env: Box::new(env), due, destinations, down }
}

/// What an attempt leaves for the queue to store.
#[derive(Debug, PartialEq)]
enum Settlement {
    /// Every recipient is final.
    Complete,
    Defer {
        env: Box<Envelope>,
        due: i64,
        /// Every destination with a pending recipient (the spool's index:
        /// ETRN and `queue flush --domain` release by it).
        destinations: Vec<String>,
        /// Those of them that took nothing in this attempt: down, as far
        /// as this node knows. Only these arm the fast drain; a recipient
        /// refused with 4xx by a destination that took others (a full
        /// mailbox) waits for its backoff, not for the next success there.
        down: Vec<String>,
    },
    /// Held, or not this entry's message any more.
    Skip,
    /// Could not even be loaded: any node may try again at once.
    HandBack,
    /// The envelope is unreadable.
    Quarantine,
}

/// This node's view of one lease. It is valid until a renewal reports it
/// lost, or until 4/5 of `queue.lease` has passed since the last renewal
/// the queue confirmed (counted from when that renewal was sent): another
/// node may take an entry over only after a whole `queue.lease` without
/// renewal, so a holder cut off from the queue stops first.
struct LeaseGuard {
    validity: Duration,
    lost: AtomicBool,
    renewed: Mutex<Instant>,
}

impl LeaseGuard {
    fn new(lease: Duration) -> LeaseGuard {
        LeaseGuard { validity: lease * 4 / 5, lost: AtomicBool::new(false), renewed: Mutex::new(Instant::now()) }
    }

    fn renewed(&self, sent: Instant) {
        let mut at = self.renewed.lock().unwrap_or_else(|e| e.into_inner());
        *at = (*at).max(sent);
    }

    fn lose(&self) {
        self.lost.store(true, Ordering::Relaxed);
    }

    fn valid(&self) -> bool {
        !self.lost.load(Ordering::Relaxed)
            && self.renewed.lock().unwrap_or_else(|e| e.into_inner()).elapsed() < self.validity
    }
}

/// The body of a leased message for the outbound client: exactly the
/// stored size, and no end of data (the final dot) unless the lease is
/// still ours, so a node that lost its lease never completes a copy.
struct LeasedBody<'a> {
    reader: BodyReader,
    guard: &'a LeaseGuard,
    id: &'a QueueId,
}

#[async_trait::async_trait]
impl BodySource for LeasedBody<'_> {
    async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, SpoolError> {
        match self.reader.next_chunk().await? {
            None if !self.guard.valid() => {
                METRICS.queue_leases_lost.inc();
                tracing::warn!(queue_id = %self.id, "{}: lease no longer current; transaction abandoned before the final dot", self.id);
                Err(SpoolError::LeaseLost(self.id.clone()))
            }
            piece => Ok(piece),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "[a.example]:25";
    const B: &str = "mx:b.example";

    /// Three pending recipients: two at destination A, one at B.
    fn message() -> (Envelope, Vec<String>) {
        let rcpt = |address: &str, domain: &str| Recipient {
            address: address.into(),
            domain: domain.into(),
            state: RecipientState::Pending,
            last_reply: None,
            delay_warned: false,
            notify: None,
            orcpt: None,
        };
        let env = Envelope {
            id: QueueId::new(),
            sender: "s@sender.example".into(),
            recipients: vec![
                rcpt("x@a.example", "a.example"),
                rcpt("y@a.example", "a.example"),
                rcpt("z@b.example", "b.example"),
            ],
            client_ip: "127.0.0.1".into(),
            client_name: "localhost".into(),
            helo: "client.example".into(),
            received_at: 0,
            size: 10,
            node: "n1".into(),
            smtputf8: false,
            eight_bit: false,
            attempts: 1,
            held: false,
            bounce_requested: false,
            dsn_ret: None,
            dsn_envid: None,
        };
        (env, vec![A.into(), A.into(), B.into()])
    }

    fn sent() -> Fate {
        Fate::Sent { reply: "250 2.0.0 Ok".into(), relay: "a.example[127.0.0.1]:25".into(), tls: None, dsn: false }
    }
    fn deferred() -> Fate {
        Fate::Deferred { reason: "451 4.3.0 try later".into(), relay: None }
    }
    fn bounced() -> Fate {
        Fate::Bounced { status: "5.1.1".into(), reason: "550 5.1.1 no such user".into(), relay: None }
    }
    fn states(s: &Settlement) -> Vec<RecipientState> {
        match s {
            Settlement::Defer { env, .. } => env.recipients.iter().map(|r| r.state).collect(),
            other => panic!("not a deferral: {other:?}"),
        }
    }

    #[test]
    fn every_recipient_final_completes_the_message() {
        let (env, keys) = message();
        let fates = [(0, sent()), (1, bounced()), (2, sent())];
        assert_eq!(settle(env, &fates, &keys, true, &[A.into(), B.into()], 99), Settlement::Complete);
    }

    #[test]
    fn a_deferral_keeps_the_message_under_the_waiting_destination_only() {
        let (env, keys) = message();
        let fates = [(0, sent()), (1, sent()), (2, deferred())];
        let s = settle(env, &fates, &keys, true, &[A.into()], 99);
        assert_eq!(states(&s), [RecipientState::Delivered, RecipientState::Delivered, RecipientState::Pending]);
        let Settlement::Defer { env, due, destinations, down } = s else { unreachable!() };
        assert_eq!((due, destinations, down), (99, vec![B.to_string()], vec![B.to_string()]));
        assert_eq!(env.recipients[2].last_reply.as_deref(), Some("451 4.3.0 try later"));
        assert_eq!(env.recipients[0].last_reply.as_deref(), Some("250 2.0.0 Ok"));
    }

    #[test]
    fn a_destination_that_took_some_mail_is_waiting_but_not_down() {
        // A full mailbox at A: the other recipient there was delivered.
        let (env, keys) = message();
        let fates = [(0, sent()), (1, deferred()), (2, sent())];
        let Settlement::Defer { destinations, down, .. } = settle(env, &fates, &keys, true, &[A.into(), B.into()], 1)
        else {
            panic!("deferred")
        };
        assert_eq!((destinations, down), (vec![A.to_string()], vec![]));
    }

    #[test]
    fn a_bounce_whose_dsn_was_not_queued_stays_pending() {
        let (env, keys) = message();
        let fates = [(0, bounced()), (1, sent()), (2, sent())];
        let s = settle(env, &fates, &keys, false, &[A.into(), B.into()], 5);
        assert_eq!(states(&s), [RecipientState::Pending, RecipientState::Delivered, RecipientState::Delivered]);
        let Settlement::Defer { env, destinations, .. } = s else { unreachable!() };
        assert_eq!(destinations, vec![A.to_string()]);
        assert_eq!(env.recipients[0].last_reply.as_deref(), Some("550 5.1.1 no such user"));
        let (env, keys) = message();
        let fates = [(0, bounced()), (1, sent()), (2, sent())];
        assert_eq!(settle(env, &fates, &keys, true, &[], 5), Settlement::Complete);
    }

    #[test]
    fn recipients_without_a_fate_keep_their_state() {
        // Delivered in an earlier attempt: not part of this one.
        let (mut env, keys) = message();
        env.recipients[0].state = RecipientState::Delivered;
        let s = settle(env, &[(1, sent()), (2, deferred())], &keys, true, &[A.into()], 5);
        assert_eq!(states(&s), [RecipientState::Delivered, RecipientState::Delivered, RecipientState::Pending]);
    }

    #[test]
    fn deferrals_past_the_lifetime_become_4_4_7_bounces() {
        let day = Duration::from_secs(86_400);
        let fates = vec![(0, deferred()), (1, sent()), (2, bounced())];
        let (expired, kept) = expire(fates.clone(), day, day * 5);
        assert!(!expired);
        assert!(matches!(kept[0].1, Fate::Deferred { .. }));
        let (expired, late) = expire(fates, day * 6, day * 5);
        assert!(expired);
        let Fate::Bounced { status, reason, .. } = &late[0].1 else { panic!("{late:?}") };
        assert_eq!(status, "4.4.7");
        assert_eq!(reason, "message expired after 518400s in the queue: 451 4.3.0 try later");
        assert!(matches!(late[1].1, Fate::Sent { .. }));
        assert!(matches!(&late[2].1, Fate::Bounced { status, .. } if status == "5.1.1"));
    }

    /// `min` doubled per attempt after the first, capped at `max`.
    fn base(min: Duration, max: Duration, attempts: u32) -> Duration {
        let mut d = min;
        for _ in 1..attempts {
            d = (d * 2).min(max);
        }
        d.min(max)
    }

    fn within_jitter(got: Duration, base: Duration) -> bool {
        // ±10 %, with a nanosecond of slack for the float conversion.
        let (lo, hi) = (base.mul_f64(0.9), base.mul_f64(1.1));
        got + Duration::from_nanos(1) >= lo && got <= hi + Duration::from_nanos(1)
    }

    #[test]
    fn retry_delay_doubles_from_retry_min_to_retry_max_within_jitter() {
        let (min, max) = (Duration::from_secs(60), Duration::from_secs(3600));
        // 60, 120, 240, 480, 960, 1920, then 3600 for ever (no overflow
        // past the 20th doubling either).
        assert_eq!(base(min, max, 1), min);
        assert_eq!(base(min, max, 6), Duration::from_secs(1920));
        assert_eq!(base(min, max, 7), max);
        for attempts in 0..=200 {
            let expected = base(min, max, attempts.max(1));
            for _ in 0..50 {
                let got = retry_delay(min, max, attempts);
                assert!(within_jitter(got, expected), "attempt {attempts}: {got:?} not within 10 % of {expected:?}");
            }
        }
    }

    #[test]
    fn retry_delay_jitter_varies_over_the_whole_band() {
        let (min, max) = (Duration::from_secs(60), Duration::from_secs(3600));
        let samples: Vec<Duration> = (0..1000).map(|_| retry_delay(min, max, 3)).collect();
        let (lo, hi) = (samples.iter().min().unwrap(), samples.iter().max().unwrap());
        let distinct: HashSet<Duration> = samples.iter().copied().collect();
        assert!(distinct.len() > 900, "only {} distinct delays in 1000", distinct.len());
        // Uniform over 216 s..264 s: 1000 draws all inside 222 s..258 s would
        // happen with probability 0.75^1000.
        assert!(*lo < Duration::from_secs(222) && *hi > Duration::from_secs(258), "band {lo:?}..{hi:?}");
    }

    #[test]
    fn retry_delay_saturates_instead_of_panicking_for_huge_bounds() {
        // With the jitter above 1.0, `Duration::mul_f64` would overflow.
        for attempts in [1, 2, 30, u32::MAX] {
            let got = retry_delay(Duration::MAX, Duration::MAX, attempts);
            assert!(got >= Duration::MAX.mul_f64(0.9), "{got:?}");
        }
    }
}
