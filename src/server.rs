//! `mxrelay serve`: wires config, domains, spool, policy, the SMTP and admin
//! listeners and signals together. SIGHUP reloads the domain snapshot, the
//! live configuration keys and the TLS certificate;
//! SIGTERM/SIGINT drain (see [`crate::shutdown`]): stop accepting, answer
//! idle sessions 421, let messages being received finish (bounded), exit.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::{Config, ConfigError};
use crate::dns::Dns;
use crate::domains::Domains;
use crate::policy::{Policy, Restrictions};
use crate::shutdown::Phase;
use crate::smtp::Listener;
use crate::smtp::shared::Shared;
use crate::spool::Spool;

/// How long a session receiving a message may run on after SIGTERM.
const DRAIN_GRACE: Duration = Duration::from_secs(30);

pub async fn serve(config: Config, path: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    // Before anything listens: until a handler is installed, SIGHUP's
    // default action kills the process, and an operator (or a script)
    // reloading right after the port opened would stop the node instead.
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let domains = Arc::new(Domains::new(crate::domains::open(&config.domains.url)?));
    let spool: Arc<dyn Spool> = crate::spool::open(&config.queue)?;
    if let Err(e) = spool.prepare().await {
        // Not fatal: the node answers 451 until Redis is back.
        tracing::error!(error = %e, "queue not reachable at start");
    }
    let dns = Dns::new(&config.dns.nameservers, config.dns.timeout)?;
    let policy = Policy::new(restrictions(&config), domains.clone(), dns);
    // First snapshot before listening, so a healthy node never answers 451
    // for want of one; a failure is not fatal (the refresher retries).
    match domains.refresh(config.migrate_on_start).await {
        Ok(n) => tracing::info!(domains = n, "domain snapshot loaded"),
        Err(e) => {
            tracing::error!(error = %e, "domain database not reachable at start; answering 451 until it is")
        }
    }
    tokio::spawn(domains.clone().run_refresher(config.domains.refresh, config.migrate_on_start));

    let smtp = TcpListener::bind(config.smtp.listen)
        .await
        .with_context(|| format!("smtp.listen: cannot listen on {}", config.smtp.listen))?;
    let smtps = match config.tls.implicit_listen {
        Some(addr) => Some(
            TcpListener::bind(addr).await.with_context(|| format!("tls.implicit_listen: cannot listen on {addr}"))?,
        ),
        None => None,
    };
    let admin = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("admin.listen: cannot listen on {}", config.admin.listen))?;
    let (trigger, shutdown) = crate::shutdown::channel();
    tokio::spawn(crate::admin::http::serve(
        admin,
        crate::admin::http::Health { spool: spool.clone(), domains: domains.clone(), shutdown: shutdown.clone() },
    ));
    tracing::info!(
        node = %config.node_id,
        smtp = %config.smtp.listen,
        smtps = %config.tls.implicit_listen.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        admin = %config.admin.listen,
        domains = %crate::config::mask_url(&config.domains.url),
        queue = %crate::config::mask_url(&config.queue.url),
        "mxrelay listening"
    );
    if config.domains.url.starts_with("sqlite:") || config.queue.url.starts_with("sqlite:") {
        tracing::info!(
            "single node on the embedded store: data in {} ({}). Add a domain with: \
             mxrelay domains add example.org --relay-host mail.example.org --relay-port 25",
            config.data_dir,
            config.domains.url
        );
    }

    let reloader = domains.clone();
    let users = crate::users::open(&config.domains.url)?;
    let scanner = crate::scan::Scanner::new(&config.scan, &config.data_dir, &config.node_id)
        .map_err(|e| anyhow::anyhow!("scan: {e}"))?;
    let shared = Arc::new(Shared::new(config.clone(), policy, spool.clone(), users, scanner, shutdown.clone()));
    let live = shared.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    reloader.request_reload();
                    reload(&live, path.as_deref());
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        tracing::info!("stopping: no new connections, draining open sessions");
        trigger.advance(Phase::Draining);
        tokio::time::sleep(DRAIN_GRACE).await;
        tracing::info!("stopping: grace period over, closing the sessions still receiving");
        trigger.advance(Phase::Closing);
    });
    let delivery = config.delivery.enabled.then(|| {
        let d =
            crate::delivery::Delivery::new(config.clone(), spool.clone(), domains.clone(), shared.policy.dns.clone());
        tokio::spawn(d.run(shutdown.clone()))
    });
    let implicit =
        smtps.map(|listener| tokio::spawn(crate::smtp::serve(listener, Listener::ImplicitTls, shared.clone())));
    crate::smtp::serve(smtp, Listener::Smtp, shared).await;
    if let Some(t) = implicit {
        let _ = t.await;
    }
    if let Some(d) = delivery {
        let _ = d.await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// What [`Config::check`] cannot check without reading files: the TLS
/// certificate and key, and the CA file of outbound `verify`. Given to
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
fn reload(shared: &Shared, path: Option<&std::path::Path>) {
    let new = match Config::load_with(path, file_problems) {
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
