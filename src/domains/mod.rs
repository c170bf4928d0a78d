//! The listed domains and where their mail goes.
//!
//! A [`DomainStore`] loads the whole `domains` table; [`Domains`] keeps the
//! last good load as an in-memory snapshot that every RCPT is checked
//! against. Invariant: no database query on the SMTP path; a failed refresh
//! keeps the previous snapshot, and a node that never loaded one says so
//! ([`Lookup::NoSnapshot`] → 451 4.3.0, never 250 and never 5xx).

pub mod destination;
#[macro_use]
mod recipient_sql;
pub mod mysql;
pub mod sqlite;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::metrics::METRICS;
use crate::proto::address::normalise_domain;
use crate::shutdown::{Phase, Shutdown};

/// One row of the `domains` table: the seed's `smtp:[relay_host]:relay_port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainRoute {
    /// Lower-case A-labels.
    pub domain: String,
    pub relay_host: String,
    pub relay_port: u16,
    /// `enable_virus_spam_scan = '1'`.
    pub scan: bool,
    /// Which recipients of the domain are accepted (`relay_recipient_checks`).
    pub recipients: RecipientCheck,
}

/// How a domain's recipients are checked at RCPT.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RecipientCheck {
    /// Every recipient (the seed's behaviour, and the default).
    #[default]
    None,
    /// Only the addresses listed in `relay_recipients` (lower case,
    /// `local@domain`), or all of them with `@domain` listed (Postfix
    /// `relay_recipient_maps`).
    Table(Arc<std::collections::HashSet<String>>),
    /// Whatever the domain's own server (`relay_host`) accepts, asked at
    /// RCPT and remembered cluster-wide (Postfix
    /// `reject_unverified_recipient`; see `policy::verify`).
    Verify,
}

/// The methods `relay_recipient_checks.method` may hold.
pub const RECIPIENT_METHODS: [&str; 3] = ["none", "table", "verify"];

/// The recipient tables as stored: (domain, method) rows and addresses.
#[derive(Debug, Clone, Default)]
pub struct RawRecipients {
    pub checks: Vec<(String, String)>,
    pub addresses: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    #[error("domain database unavailable: {0}")]
    Unavailable(String),
    #[error("domain database migration failed: {0}")]
    Migration(String),
    #[error("{0} is already listed")]
    Duplicate(String),
}

/// Opens the store `url` names: `mysql://…` (cluster) or `sqlite://…`
/// (embedded, single node).
pub fn open(url: &str) -> Result<Arc<dyn DomainStore>, DomainError> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(sqlite::SqliteDomains::connect(url)?))
    } else {
        Ok(Arc::new(mysql::MySqlDomains::connect(url, Duration::from_secs(5))?))
    }
}

/// Where the domains live. One file per back end.
#[async_trait::async_trait]
pub trait DomainStore: Send + Sync {
    /// Creates the tables mxrelay needs when absent; never alters existing ones.
    async fn migrate(&self) -> Result<(), DomainError>;
    /// Every row, as stored (normalised by the snapshot).
    async fn load(&self) -> Result<Vec<RawDomain>, DomainError>;
    /// Adds rows in one transaction; a domain already listed fails them all
    /// with [`DomainError::Duplicate`].
    async fn add(&self, rows: &[RawDomain]) -> Result<(), DomainError>;
    /// Removes a domain; `false` when it was not listed.
    async fn remove(&self, domain: &str) -> Result<bool, DomainError>;
    /// The recipient checks and valid recipients; empty when the tables
    /// were never created (a database not migrated yet).
    async fn load_recipients(&self) -> Result<RawRecipients, DomainError>;
    /// Sets how `domain`'s recipients are checked (`none` removes the row).
    async fn set_recipient_check(&self, domain: &str, method: &str) -> Result<(), DomainError>;
    /// Adds addresses (already normalised); those present are kept.
    /// Returns how many were new.
    async fn add_recipients(&self, addresses: &[String]) -> Result<usize, DomainError>;
    /// Removes an address; `false` when it was not listed.
    async fn remove_recipient(&self, address: &str) -> Result<bool, DomainError>;
}

/// A row as the database holds it.
#[derive(Debug, Clone)]
pub struct RawDomain {
    pub domain: String,
    pub relay_host: String,
    pub relay_port: u32,
    pub scan: String,
}

#[derive(Debug)]
pub struct Snapshot {
    routes: HashMap<String, Arc<DomainRoute>>,
    pub loaded_at: Instant,
}

impl Snapshot {
    /// Normalises rows; rows that cannot be used are logged and left out.
    pub fn build(rows: Vec<RawDomain>, recipients: RawRecipients) -> Snapshot {
        let mut tables: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
        let mut verified = std::collections::HashSet::new();
        for (domain, method) in &recipients.checks {
            match (normalise_domain(domain.trim()), method.trim()) {
                (Some(d), "table") => {
                    tables.entry(d).or_default();
                }
                (Some(d), "verify") => {
                    verified.insert(d);
                }
                (Some(_), "none") => {}
                _ => {
                    tracing::warn!(domain = %domain, method = %method, "domains: ignoring a recipient check that is not none, table or verify")
                }
            }
        }
        for address in recipients.addresses {
            let domain = address.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
            if let Some(set) = tables.get_mut(domain) {
                set.insert(address);
            }
        }
        let mut routes = HashMap::with_capacity(rows.len());
        for row in rows {
            let Some(domain) = normalise_domain(row.domain.trim()) else {
                tracing::warn!(domain = %row.domain, "domains: ignoring row with an invalid domain name");
                continue;
            };
            let Ok(relay_port) = u16::try_from(row.relay_port) else {
                tracing::warn!(domain = %row.domain, port = row.relay_port, "domains: ignoring row with an invalid relay_port");
                continue;
            };
            let relay_host = row.relay_host.trim().trim_start_matches('[').trim_end_matches(']').to_string();
            let scan = row.scan.trim() == "1";
            let recipients = match tables.remove(&domain) {
                Some(t) => RecipientCheck::Table(Arc::new(t)),
                None if verified.contains(&domain) => RecipientCheck::Verify,
                None => RecipientCheck::None,
            };
            routes.insert(domain.clone(), Arc::new(DomainRoute { domain, relay_host, relay_port, scan, recipients }));
        }
        Snapshot { routes, loaded_at: Instant::now() }
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn routes(&self) -> impl Iterator<Item = &DomainRoute> {
        self.routes.values().map(|r| r.as_ref())
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Listed(Arc<DomainRoute>),
    Unlisted,
    /// Not in the snapshot, but the last refresh failed: the domain may have
    /// been added since. Answered like Postfix's failed map lookup (451).
    UnlistedStale,
    /// No snapshot was ever loaded: the answer is unknown.
    NoSnapshot,
}

/// The cached view of the domains every node keeps.
pub struct Domains {
    store: Arc<dyn DomainStore>,
    snapshot: RwLock<Option<Arc<Snapshot>>>,
    migrated: AtomicBool,
    /// The last refresh succeeded.
    fresh: AtomicBool,
    reload: Notify,
}

impl Domains {
    pub fn new(store: Arc<dyn DomainStore>) -> Domains {
        Domains {
            store,
            snapshot: RwLock::new(None),
            migrated: AtomicBool::new(false),
            fresh: AtomicBool::new(false),
            reload: Notify::new(),
        }
    }

    /// `domain` must already be normalised (lower-case A-labels).
    pub fn lookup(&self, domain: &str) -> Lookup {
        let guard = self.snapshot.read().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            None => Lookup::NoSnapshot,
            Some(s) => match s.routes.get(domain) {
                Some(route) => Lookup::Listed(route.clone()),
                None if self.fresh.load(Ordering::Relaxed) => Lookup::Unlisted,
                None => Lookup::UnlistedStale,
            },
        }
    }

    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.snapshot.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs migrations (once, when asked) and loads a new snapshot. On
    /// failure the previous snapshot stays.
    pub async fn refresh(&self, migrate: bool) -> Result<usize, DomainError> {
        let result = self.load(migrate).await;
        self.fresh.store(result.is_ok(), Ordering::Relaxed);
        result
    }

    async fn load(&self, migrate: bool) -> Result<usize, DomainError> {
        if migrate && !self.migrated.load(Ordering::Relaxed) {
            self.store.migrate().await.inspect_err(|_| METRICS.database_errors.inc())?;
            self.migrated.store(true, Ordering::Relaxed);
            tracing::info!("domains: database migrations applied");
        }
        let rows = self.store.load().await.inspect_err(|_| METRICS.database_errors.inc())?;
        let recipients = self.store.load_recipients().await.inspect_err(|_| METRICS.database_errors.inc())?;
        let snapshot = Arc::new(Snapshot::build(rows, recipients));
        let n = snapshot.len();
        METRICS.domains_snapshot_size.set(n as i64);
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Some(snapshot);
        Ok(n)
    }

    /// Asks the refresher to reload now (SIGHUP).
    pub fn request_reload(&self) {
        self.reload.notify_one();
    }

    /// Reloads every `interval` and whenever [`Domains::request_reload`] is
    /// called, until the node reaches [`Phase::Stopped`].
    pub async fn run_refresher(self: Arc<Self>, interval: Duration, migrate: bool, mut stop: Shutdown) {
        let mut failing = false;
        while stop.phase() < Phase::Stopped {
            match self.refresh(migrate).await {
                Ok(n) => {
                    if failing {
                        tracing::info!(domains = n, "domains: database reachable again, snapshot reloaded");
                    } else {
                        tracing::debug!(domains = n, "domains: snapshot reloaded");
                    }
                    failing = false;
                }
                Err(e) => {
                    let kept = self.snapshot().map(|s| s.len());
                    tracing::error!(error = %e, kept_snapshot = ?kept, "domains: refresh failed, keeping the last snapshot");
                    failing = true;
                }
            }
            // Retry sooner while no snapshot has ever loaded.
            let wait = if self.snapshot().is_none() { interval.min(Duration::from_secs(2)) } else { interval };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.reload.notified() => tracing::info!("domains: reload requested"),
                () = stop.reached(Phase::Stopped) => {}
            }
        }
        tracing::info!("domains: refresher stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(domain: &str, port: u32) -> RawDomain {
        RawDomain { domain: domain.into(), relay_host: "[192.0.2.1]".into(), relay_port: port, scan: "1".into() }
    }

    #[test]
    fn snapshot_normalises_and_skips_bad_rows() {
        let s = Snapshot::build(
            vec![raw("Friet.PAN", 25), raw("bücher.example", 2525), raw("bad..name", 25), raw("ok.example", 70000)],
            RawRecipients::default(),
        );
        assert_eq!(s.len(), 2);
        let r = &s.routes["friet.pan"];
        assert_eq!((r.relay_host.as_str(), r.relay_port, r.scan), ("192.0.2.1", 25, true));
        assert!(s.routes.contains_key("xn--bcher-kva.example"));
        assert_eq!(r.recipients, RecipientCheck::None, "no row: every recipient, as the seed");
    }

    #[test]
    fn a_table_domain_gets_its_own_addresses_only() {
        let checks = vec![
            ("friet.pan".to_string(), "table".to_string()),
            ("Bücher.example".to_string(), "table".to_string()),
            ("other.example".to_string(), "none".to_string()),
            ("odd.example".to_string(), "sometimes".to_string()),
            ("asked.example".to_string(), "verify".to_string()),
        ];
        let addresses = ["a@friet.pan", "@xn--bcher-kva.example", "b@other.example"].map(String::from).to_vec();
        let s = Snapshot::build(
            vec![
                raw("friet.pan", 25),
                raw("bücher.example", 25),
                raw("other.example", 25),
                raw("odd.example", 25),
                raw("asked.example", 25),
            ],
            RawRecipients { checks, addresses },
        );
        let table = |d: &str| match &s.routes[d].recipients {
            RecipientCheck::Table(t) => {
                let mut v: Vec<&str> = t.iter().map(String::as_str).collect();
                v.sort();
                Some(v.join(","))
            }
            RecipientCheck::None | RecipientCheck::Verify => None,
        };
        assert_eq!(table("friet.pan").as_deref(), Some("a@friet.pan"));
        assert_eq!(table("xn--bcher-kva.example").as_deref(), Some("@xn--bcher-kva.example"));
        assert_eq!(table("other.example"), None, "none: every recipient, its addresses unused");
        assert_eq!(table("odd.example"), None, "an unknown method is ignored (logged)");
        assert_eq!(s.routes["odd.example"].recipients, RecipientCheck::None);
        assert_eq!(s.routes["asked.example"].recipients, RecipientCheck::Verify);
    }
}
