//! What every session and listener of a node shares: the policy, the
//! spool, the user store, the scanner, the connection slots and limits,
//! and the stop signal, built whole by [`Shared::new`]. The configuration
//! and the TLS certificate can be swapped on SIGHUP; a session keeps the
//! ones it started with.

use std::sync::Arc;

use super::limits::{Anvil, PerIp};
use super::slots::Slots;
use crate::config::{Config, TlsConfig};
use crate::policy::Policy;
use crate::scan::Scanner;
use crate::shutdown::Shutdown;
use crate::spool::Enqueue;
use crate::users::UserStore;

/// What every session and listener of a node shares.
pub struct Shared {
    config: std::sync::RwLock<Arc<Config>>,
    tls: std::sync::RwLock<Option<tokio_rustls::TlsAcceptor>>,
    pub policy: Policy,
    pub spool: Arc<dyn Enqueue>,
    /// `relay_users` (AUTH may be switched on by SIGHUP, so always open;
    /// the pool connects on first use).
    pub users: Arc<dyn UserStore>,
    /// Connection slots on this node, all listeners together, and stress.
    pub slots: Arc<Slots>,
    pub per_ip: PerIp,
    pub anvil: Anvil,
    /// clamd/rspamd for domains with `enable_virus_spam_scan` (restart to change).
    pub scanner: Option<Arc<Scanner>>,
    /// The node's stop signal.
    pub shutdown: Shutdown,
}

impl Shared {
    pub fn new(
        config: Config,
        policy: Policy,
        spool: Arc<dyn Enqueue>,
        users: Arc<dyn UserStore>,
        scanner: Option<Arc<Scanner>>,
        shutdown: Shutdown,
    ) -> Shared {
        let shared = Shared {
            slots: Slots::new(&config.smtp),
            config: std::sync::RwLock::new(Arc::new(config.clone())),
            tls: std::sync::RwLock::new(None),
            policy,
            spool,
            users,
            per_ip: PerIp::default(),
            anvil: Anvil::default(),
            scanner,
            shutdown,
        };
        shared.reload_tls(&config.tls);
        shared
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Installs a new configuration for sessions that start from now on.
    pub fn set_config(&self, config: Config) {
        let mut current = self.config.write().unwrap_or_else(|e| e.into_inner());
        self.slots.resize(&config.smtp);
        *current = Arc::new(config);
    }

    /// The acceptor for STARTTLS and the implicit-TLS listener, if a
    /// certificate is loaded.
    pub fn tls_acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        self.tls.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// (Re)reads `tls.cert`/`tls.key`; on failure the loaded certificate
    /// stays in use.
    pub fn reload_tls(&self, config: &TlsConfig) {
        if config.cert.is_empty() {
            *self.tls.write().unwrap_or_else(|e| e.into_inner()) = None;
            return;
        }
        match super::tls::load_acceptor(config) {
            Ok(acceptor) => {
                *self.tls.write().unwrap_or_else(|e| e.into_inner()) = Some(acceptor);
                tracing::info!(cert = %config.cert, "TLS certificate loaded");
            }
            Err(e) => {
                tracing::error!(cert = %config.cert, "TLS certificate not (re)loaded, keeping the previous one: {e}")
            }
        }
    }
}
