//! Inbound SMTP: the listener with its connection limits, and the session
//! (see [`session`]) that speaks RFC 5321 to each client. Parsing
//! ([`command`], [`data`]) is pure; only the session and listener do I/O.
//! The session is generic over the stream, so TLS can wrap it later.

pub mod command;
pub mod data;
pub mod reply;
pub mod session;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use ipnet::IpNet;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::metrics::METRICS;
use reply::Reply;
use session::{ClientInfo, Session, Shared};

/// `debug_peer_list` entries: addresses/networks or host names (a name
/// also matches its subdomains, as in Postfix).
#[derive(Debug, Clone, Default)]
pub struct DebugPeers {
    nets: Vec<IpNet>,
    names: Vec<String>,
}

impl DebugPeers {
    pub fn new(entries: &[String]) -> DebugPeers {
        let mut peers = DebugPeers::default();
        for e in entries {
            match crate::config::parse_network(e) {
                Some(net) => peers.nets.push(net),
                None => peers.names.push(e.trim().trim_end_matches('.').to_ascii_lowercase()),
            }
        }
        peers
    }

    pub fn matches(&self, ip: IpAddr, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        self.nets.iter().any(|n| n.contains(&ip))
            || self.names.iter().any(|n| name == *n || name.ends_with(&format!(".{n}")))
    }
}

/// Open sessions per client IP, released when a session ends.
#[derive(Default)]
struct PerIp(Mutex<HashMap<IpAddr, usize>>);

struct Slot<'a> {
    per_ip: &'a PerIp,
    ip: IpAddr,
}

impl PerIp {
    fn try_take(&self, ip: IpAddr, limit: Option<usize>) -> Option<Slot<'_>> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if limit.is_some_and(|l| *n >= l) {
            return None;
        }
        *n += 1;
        Some(Slot { per_ip: self, ip })
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut map = self.per_ip.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Accepts connections until `stop` turns true, then waits for open
/// sessions to end (up to `grace`).
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    grace: std::time::Duration,
) {
    let per_ip = Arc::new(PerIp::default());
    let mut config = shared.config();
    let mut debug_peers = Arc::new(DebugPeers::new(&config.debug_peer_list));
    let sessions = Arc::new(tokio::sync::Semaphore::new(config.smtp.max_connections));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while tasks.try_join_next().is_some() {}
        // A reloaded configuration applies from the next connection on.
        let current = shared.config();
        if !Arc::ptr_eq(&current, &config) {
            let (old, new) = (config.smtp.max_connections, current.smtp.max_connections);
            if new > old {
                sessions.add_permits(new - old);
            } else if new < old {
                sessions.forget_permits(old - new);
            }
            debug_peers = Arc::new(DebugPeers::new(&current.debug_peer_list));
            config = current;
        }
        let _ = stream.set_nodelay(true);
        METRICS.smtp_connections.inc();
        let shared = shared.clone();
        let config = config.clone();
        let per_ip = per_ip.clone();
        let debug_peers = debug_peers.clone();
        let permit = sessions.clone().try_acquire_owned();
        tasks.spawn(async move {
            let Ok(_permit) = permit else {
                return refuse(stream, peer, "node_limit", "Error: too many connections").await;
            };
            let ip = canonical(peer.ip());
            let trusted = shared.policy.is_mynetworks(ip);
            let limit = (!trusted).then_some(config.smtp.max_connections_per_ip);
            let Some(_slot) = per_ip.try_take(ip, limit) else {
                return refuse(stream, peer, "ip_limit", &format!("Error: too many connections from {ip}")).await;
            };
            let name = if config.smtp.peername_lookup {
                shared.policy.dns.reverse_name(ip).await.unwrap_or_else(|| "unknown".into())
            } else {
                "unknown".into()
            };
            let client = ClientInfo { ip, debug: debug_peers.matches(ip, &name), name };
            tracing::info!("connect from {}[{}]", client.name, client.ip);
            METRICS.smtp_connections_active.inc();
            let label = format!("{}[{}]", client.name, client.ip);
            let outcome = Session::new(stream, client, shared).run().await;
            METRICS.smtp_connections_active.dec();
            METRICS.smtp_sessions.with_label_values(&[outcome.label()]).inc();
            tracing::info!("disconnect from {label} ({})", outcome.label());
        });
    }
    drop(listener);
    tracing::info!(open = tasks.len(), "SMTP listener closed; waiting for open sessions");
    let _ = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    tasks.abort_all();
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

async fn refuse(mut stream: TcpStream, peer: SocketAddr, reason: &'static str, text: &str) {
    METRICS.smtp_connections_refused.with_label_values(&[reason]).inc();
    tracing::warn!(client = %peer.ip(), reason, "connection refused: {text}");
    let reply = Reply::new(421, "4.7.0", text);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let _ = stream.write_all(reply.render().as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
