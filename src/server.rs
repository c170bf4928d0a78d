//! `mxrelay serve`: wires config, domains, spool, policy, the SMTP and admin
//! listeners and signals together. [`Node::bind`] opens the stores and binds
//! every listener (port 0 allowed: the bound addresses are exposed), and
//! [`Node::run`] serves until its stop future completes; [`serve`] adds the
//! signals. SIGHUP reloads the domain snapshot, the live configuration keys
//! and the TLS certificate ([`Reloader`]); SIGTERM/SIGINT stop the node in
//! one order (see [`crate::shutdown`]): `/readyz` fails and the listeners
//! close at once, idle sessions get 421, sessions receiving a message may
//! finish within the grace period, then delivery hands back what it holds,
//! then the domain refresher and the admin listener stop, and `run` returns.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::{Config, ConfigError};
use crate::delivery::ClusterNames;
use crate::delivery::dialer::Dialer;
use crate::dns::Dns;
use crate::domains::Domains;
use crate::policy::{Policy, Restrictions};
use crate::shutdown::{Phase, Shutdown, Trigger};
use crate::smtp::Listener;
use crate::smtp::shared::Shared;
use crate::spool::Spool;

/// How long a session receiving a message may run on after SIGTERM.
const DRAIN_GRACE: Duration = Duration::from_secs(30);

/// The binary's `serve`: signal handlers, then [`Node::bind`], then
/// [`Node::run`] until SIGTERM or SIGINT.
pub async fn serve(config: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    // Before anything listens: until a handler is installed, SIGHUP's
    // default action kills the process, and an operator (or a script)
    // reloading right after the port opened would stop the node instead.
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let node = Node::bind(config, ConfigSource::process(path)).await?;
    let reloader = node.reloader();
    node.run(async move {
        loop {
            tokio::select! {
                _ = hup.recv() => reloader.reload(),
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
    })
    .await
}

/// A node with its stores open and its listeners bound, not yet serving.
pub struct Node {
    config: Config,
    domains: Arc<Domains>,
    spool: Arc<dyn Spool>,
    shared: Arc<Shared>,
    /// Every node's `myhostname`, and how sessions to destinations are
    /// opened (by deliveries and recipient verification probes).
    cluster: Arc<ClusterNames>,
    dialer: Arc<Dialer>,
    smtp: TcpListener,
    smtps: Option<TcpListener>,
    admin: TcpListener,
    trigger: Trigger,
    shutdown: Shutdown,
    source: ConfigSource,
}

/// Where a reload reads the configuration again: the file and the
/// `MXRELAY_*` overrides the node started with.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    pub file: Option<PathBuf>,
    pub env: Vec<(String, String)>,
}

impl ConfigSource {
    /// The binary's: `file` and this process's environment.
    pub fn process(file: Option<PathBuf>) -> ConfigSource {
        ConfigSource { file, env: std::env::vars().collect() }
    }
}

/// Where a bound node listens.
#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    pub smtp: SocketAddr,
    pub smtps: Option<SocketAddr>,
    pub admin: SocketAddr,
}

/// Applies SIGHUP's reload to a running node (cheap to clone).
#[derive(Clone)]
pub struct Reloader {
    domains: Arc<Domains>,
    shared: Arc<Shared>,
    source: ConfigSource,
}

impl Reloader {
    /// Reloads the domain snapshot, and reads the configuration again (the
    /// node's [`ConfigSource`]) for the live keys and the TLS certificate.
    pub fn reload(&self) {
        self.domains.request_reload();
        reload(&self.shared, &self.source);
    }

    /// Reloads the domain snapshot only.
    pub fn reload_domains(&self) {
        self.domains.request_reload();
    }
}

impl Node {
    /// Validates `config`, opens the domain, user and queue stores, loads
    /// the first domain snapshot and binds the listeners. `source` is what a
    /// reload reads again. A store that cannot be reached
    /// is not fatal (the node answers 451 until it is back); an address that
    /// cannot be bound is.
    pub async fn bind(config: Config, source: ConfigSource) -> anyhow::Result<Node> {
        // Loaded configurations were checked at load; one built in code is here.
        config
            .check()
            .map_err(|errors| anyhow::anyhow!(errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n")))?;
        let domains = Arc::new(Domains::new(crate::domains::open(&config.domains.url)?));
        let spool: Arc<dyn Spool> = crate::spool::open(&config.queue)?;
        if let Err(e) = spool.prepare().await {
            tracing::error!(error = %e, "queue not reachable at start");
        }
        let dns = Dns::new(&config.dns.nameservers, config.dns.timeout)?;
        let cluster = ClusterNames::new(&config.myhostname);
        let dialer = Arc::new(Dialer::new(&config, cluster.clone()));
        let prober = Arc::new(crate::delivery::probe::Prober::new(dialer.clone(), dns.clone()));
        let verifier = crate::policy::verify::Verifier::new(spool.clone(), prober, &config.verify);
        let policy = Policy::new(restrictions(&config), domains.clone(), dns, verifier);
        // First snapshot before listening, so a healthy node never answers 451
        // for want of one; a failure is not fatal (the refresher retries).
        match domains.refresh(config.migrate_on_start).await {
            Ok(n) => tracing::info!(domains = n, "domain snapshot loaded"),
            Err(e) => {
                tracing::error!(error = %e, "domain database not reachable at start; answering 451 until it is")
            }
        }
        let smtp = TcpListener::bind(config.smtp.listen)
            .await
            .with_context(|| format!("smtp.listen: cannot listen on {}", config.smtp.listen))?;
        let smtps = match config.tls.implicit_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("tls.implicit_listen: cannot listen on {addr}"))?,
            ),
            None => None,
        };
        let admin = TcpListener::bind(config.admin.listen)
            .await
            .with_context(|| format!("admin.listen: cannot listen on {}", config.admin.listen))?;
        let (trigger, shutdown) = crate::shutdown::channel();
        let users = crate::users::open(&config.domains.url)?;
        let scanner = crate::scan::Scanner::new(&config.scan, &config.data_dir, &config.node_id)
            .map_err(|e| anyhow::anyhow!("scan: {e}"))?;
        let shared = Arc::new(Shared::new(config.clone(), policy, spool.clone(), users, scanner, shutdown.clone()));
        let node =
            Node { config, domains, spool, shared, cluster, dialer, smtp, smtps, admin, trigger, shutdown, source };
        let addrs = node.addrs()?;
        tracing::info!(
            node = %node.config.node_id,
            smtp = %addrs.smtp,
            smtps = %addrs.smtps.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
            admin = %addrs.admin,
            domains = %crate::config::mask_url(&node.config.domains.url),
            queue = %crate::config::mask_url(&node.config.queue.url),
            "mxrelay listening"
        );
        if node.config.domains.url.starts_with("sqlite:") || node.config.queue.url.starts_with("sqlite:") {
            tracing::info!(
                "single node on the embedded store: data in {} ({}). Add a domain with: \
                 mxrelay domains add example.org --relay-host mail.example.org --relay-port 25",
                node.config.data_dir,
                node.config.domains.url
            );
        }
        Ok(node)
    }

    /// The bound addresses (with the ports the system chose for port 0).
    pub fn addrs(&self) -> std::io::Result<Addrs> {
        Ok(Addrs {
            smtp: self.smtp.local_addr()?,
            smtps: self.smtps.as_ref().map(|l| l.local_addr()).transpose()?,
            admin: self.admin.local_addr()?,
        })
    }

    pub fn reloader(&self) -> Reloader {
        Reloader { domains: self.domains.clone(), shared: self.shared.clone(), source: self.source.clone() }
    }

    /// Serves until `stop` completes, then stops in order: leaving for
    /// `smtp.drain_delay` (`/readyz` fails, all else goes on), draining (the
    /// listeners close, sessions idle for [`crate::shutdown::DRAIN_IDLE`]
    /// get 421), closing
    /// after [`DRAIN_GRACE`] for sessions still receiving, then once every
    /// session and delivery has ended, [`Phase::Stopped`]: the domain
    /// refresher and the admin listener end, and this returns.
    pub async fn run(self, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Node { config, domains, spool, shared, cluster, dialer, smtp, smtps, admin, trigger, shutdown, source: _ } =
            self;
        let admin = tokio::spawn(crate::admin::http::serve(
            admin,
            crate::admin::http::Health { spool: spool.clone(), domains: domains.clone(), shutdown: shutdown.clone() },
        ));
        let refresher = tokio::spawn(domains.clone().run_refresher(
            config.domains.refresh,
            config.migrate_on_start,
            shutdown.clone(),
        ));
        let names = tokio::spawn(cluster.run(spool.clone(), shutdown.clone()));
        let delivery = config.delivery.enabled.then(|| {
            let d = crate::delivery::Delivery::new(
                config.clone(),
                spool.clone(),
                domains.clone(),
                shared.policy.dns.clone(),
                dialer,
            );
            tokio::spawn(d.run(shutdown.clone()))
        });
        let implicit =
            smtps.map(|listener| tokio::spawn(crate::smtp::serve(listener, Listener::ImplicitTls, shared.clone())));
        let plain = tokio::spawn(crate::smtp::serve(smtp, Listener::Smtp, shared));

        stop.await;
        let delay = config.smtp.drain_delay;
        if !delay.is_zero() {
            tracing::info!(
                "stopping: /readyz fails; accepting for smtp.drain_delay ({delay:?}) until load balancers have noticed"
            );
            trigger.advance(Phase::Leaving);
            tokio::time::sleep(delay).await;
        }
        tracing::info!("stopping: no new connections, draining open sessions");
        trigger.advance(Phase::Draining);
        let trigger = Arc::new(trigger);
        let grace = {
            let trigger = trigger.clone();
            tokio::spawn(async move {
                tokio::time::sleep(DRAIN_GRACE).await;
                tracing::info!("stopping: grace period over, closing the sessions still receiving");
                trigger.advance(Phase::Closing);
            })
        };
        let _ = plain.await;
        if let Some(t) = implicit {
            let _ = t.await;
        }
        tracing::info!("stopping: every session ended");
        grace.abort();
        if let Some(d) = delivery {
            let _ = d.await;
            tracing::info!("stopping: delivery stopped");
        }
        trigger.advance(Phase::Stopped);
        let _ = names.await;
        let _ = refresher.await;
        let _ = admin.await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// What [`Config::check`] cannot check without reading files or the
/// subsystems' own parsers: the TLS certificate and key, the CA file of
/// outbound `verify`, and the form of a Redis `queue.url`. Given to
/// [`Config::load_with`] before a node serves, by `check-config` and on
/// SIGHUP; errors name the key.
pub fn file_problems(config: &Config) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    if !config.tls.cert.is_empty()
        && let Err(e) = crate::smtp::tls::load_acceptor(&config.tls)
    {
        errors.push(ConfigError::new(
            "tls.cert",
            e.to_string(),
            "point tls.cert/tls.key at a readable PEM chain and its private key",
        ));
    }
    errors.extend(crate::delivery::tls::trust_anchors(&config.delivery.tls_ca_file).err());
    if let Some(p) = crate::spool::redis::problem(&config.queue) {
        let (text, fix) = if p.key == "queue.url" {
            (
                format!("{:?} {}", crate::config::mask_url(&config.queue.url), p.text),
                "use redis://[user:password@]host:port/db, rediss://… for TLS, \
                 redis+sentinel://[user:password@]host:port,host:port/master[/db], or \
                 redis+cluster://[user:password@]host:port,host:port",
            )
        } else if p.key == "queue.sentinel_password_file" {
            (p.text, "point it at a readable file holding only the Sentinels' password")
        } else {
            (p.text, "point it at a readable PEM file")
        };
        errors.push(ConfigError::new(p.key, text, fix));
    }
    errors
}

fn restrictions(config: &Config) -> Restrictions {
    Restrictions {
        mynetworks: config.mynetworks.clone(),
        reject_unknown_sender_domain: config.reject_unknown_sender_domain,
        reject_unknown_recipient_domain: config.reject_unknown_recipient_domain,
    }
}

/// SIGHUP: re-reads the configuration; live keys apply to new sessions,
/// changed keys that need a restart are named in the log.
fn reload(shared: &Shared, source: &ConfigSource) {
    let new = match Config::load_checked(source.file.as_deref(), &source.env, file_problems) {
        Ok(c) => c,
        Err(errors) => {
            let all: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
            tracing::error!("config reload failed, keeping the running configuration: {}", all.join("; "));
            return;
        }
    };
    let old = shared.config();
    let changed = old.changed_keys(&new);
    let (live, restart): (Vec<String>, Vec<String>) =
        changed.into_iter().partition(|k| crate::config::LIVE_KEYS.contains(&k.as_str()));
    if !restart.is_empty() {
        tracing::warn!(
            "config reload: changed keys that need a restart (still running with the old values): {}",
            restart.join(", ")
        );
    }
    // Keep the old values of the keys that cannot change live.
    let applied = old.with_keys_from(&new, &live);
    shared.policy.set_restrictions(restrictions(&applied));
    // The certificate files are re-read even when their names did not change
    // (a renewed certificate).
    shared.reload_tls(&applied.tls);
    shared.set_config(applied);
    tracing::info!(
        "config reloaded; applied: {}",
        if live.is_empty() { "nothing changed".into() } else { live.join(", ") }
    );
}
