//! This node's state per destination, shared by its deliveries: the
//! connection limit (`delivery.destination_concurrency` sessions), the
//! cache of idle sessions, and which destinations it knows to have
//! deferred mail (for the fast drain).
//!
//! Invariants: a cached session is only handed out for the destination
//! and TLS level it was opened for, after it answered RSET, and never
//! after [`CONNECTION_CACHE_TIME`]; at most `destination_concurrency`
//! sessions wait per key.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::client::Connection;
use super::tls::TlsPolicy;
use crate::metrics::METRICS;

/// How long an idle session is kept for the next message to the same
/// destination (Postfix `smtp_connection_cache_time_limit`).
const CONNECTION_CACHE_TIME: Duration = Duration::from_secs(2);

pub(super) struct Pool {
    concurrency: usize,
    /// Per-destination connection limits.
    slots: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Open sessions waiting for the next message to their destination,
    /// by destination and TLS level ([`session_key`]).
    idle: Mutex<HashMap<String, Vec<(Connection, Instant)>>>,
    /// Destinations known to have deferred mail (from the prober's scan and
    /// this node's own deferrals): a success there triggers the fast drain.
    deferred: Mutex<HashSet<String>>,
}

/// Sessions are cached per destination and TLS level, so a session opened
/// under a weaker level (say `may`, fallen back to clear) never carries
/// mail for a domain that requires TLS on the same relay host.
pub(super) fn session_key(destination: &str, level: TlsPolicy) -> String {
    format!("{destination} tls={level}")
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pool {
    pub(super) fn new(concurrency: usize) -> Pool {
        Pool {
            concurrency,
            slots: Mutex::new(HashMap::new()),
            idle: Mutex::new(HashMap::new()),
            deferred: Mutex::new(HashSet::new()),
        }
    }

    /// The connection limit of destination `key`.
    pub(super) fn slots(&self, key: &str) -> Arc<Semaphore> {
        locked(&self.slots).entry(key.to_string()).or_insert_with(|| Arc::new(Semaphore::new(self.concurrency))).clone()
    }

    /// A cached session for `key` ([`session_key`]), if any: as it is
    /// when its last transaction ended cleanly (no round trip; a session
    /// the server closed meanwhile is found out by the next transaction,
    /// which then takes a new one), else once it answers RSET.
    pub(super) async fn checkout(&self, key: &str) -> Option<Connection> {
        loop {
            let (mut conn, parked) = locked(&self.idle).get_mut(key)?.pop()?;
            if parked.elapsed() > CONNECTION_CACHE_TIME {
                tokio::spawn(conn.quit());
                continue;
            }
            if conn.clean || conn.reset().await.is_ok() {
                METRICS.delivery_connections_reused.inc();
                return Some(conn);
            }
        }
    }

    /// Keeps a session for the next message to the same `key`, or ends it
    /// when enough wait already.
    pub(super) async fn park(&self, key: &str, conn: Connection) {
        let full = {
            let mut cache = locked(&self.idle);
            let list = cache.entry(key.to_string()).or_default();
            if list.len() < self.concurrency {
                list.push((conn, Instant::now()));
                None
            } else {
                Some(conn)
            }
        };
        if let Some(conn) = full {
            conn.quit().await;
        }
    }

    /// Closes cached sessions idle for longer than the cache time.
    pub(super) fn prune(&self) {
        let mut cache = locked(&self.idle);
        for list in cache.values_mut() {
            let (stale, keep): (Vec<_>, Vec<_>) =
                std::mem::take(list).into_iter().partition(|(_, t)| t.elapsed() > CONNECTION_CACHE_TIME);
            *list = keep;
            for (conn, _) in stale {
                tokio::spawn(conn.quit());
            }
        }
        cache.retain(|_, l| !l.is_empty());
    }

    /// Ends every cached session (on stop).
    pub(super) async fn close_all(&self) {
        let cached: Vec<Connection> =
            locked(&self.idle).drain().flat_map(|(_, l)| l.into_iter().map(|(c, _)| c)).collect();
        for conn in cached {
            conn.quit().await;
        }
    }

    /// Destinations this node just deferred mail for, as none took any.
    pub(super) fn deferred_to(&self, keys: impl IntoIterator<Item = String>) {
        locked(&self.deferred).extend(keys);
    }

    /// The prober's scan: exactly these destinations have deferred mail.
    pub(super) fn deferred_are(&self, keys: impl IntoIterator<Item = String>) {
        *locked(&self.deferred) = keys.into_iter().collect();
    }

    /// `key` took mail: whether it was known to have deferred mail (then
    /// it no longer is, until the next deferral or scan).
    pub(super) fn recovered(&self, key: &str) -> bool {
        locked(&self.deferred).remove(key)
    }
}
