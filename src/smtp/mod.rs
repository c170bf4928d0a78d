//! Inbound SMTP: the listener with its connection limits, and the session
//! (see [`session`]) that speaks RFC 5321 to each client. Parsing
//! ([`command`], [`data`], [`auth`], [`proxy`]) is pure; only the session
//! and listener do I/O. Per connection, in this order: the PROXY header
//! (from `smtp.proxy_networks` only), TLS on the implicit-TLS listener,
//! the per-client limits ([`limits`]), then the session, which may turn
//! the stream into TLS with STARTTLS ([`tls`]).

pub mod auth;
mod conn;
pub mod data;
mod incoming;
pub mod limits;
pub mod proxy;
pub mod session;
pub mod shared;
pub mod slots;
pub mod tls;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::config::Config;
use crate::metrics::METRICS;
use crate::proto::reply::Reply;
use crate::shutdown::Phase;
use limits::Event;
use session::{ClientInfo, Session};
use shared::Shared;
use slots::Slot;
use tls::SmtpStream;

/// After [`Phase::Closing`], how long sessions may take to end (a commit
/// in progress finishes within the queue's timeouts) before they are cut.
const CLOSE_BACKSTOP: Duration = Duration::from_secs(30);
/// Longest wait for a load balancer's PROXY header.
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Which kind of listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// Plain SMTP; STARTTLS when configured.
    Smtp,
    /// TLS from the first byte (port 465 style).
    ImplicitTls,
}

/// Accepts connections until the node drains, then waits for the open
/// sessions: they end at their next command, or when they are cut at
/// [`Phase::Closing`], never during a commit (a backstop aborts whatever
/// is left [`CLOSE_BACKSTOP`] later).
pub async fn serve(listener: TcpListener, kind: Listener, shared: Arc<Shared>) {
    let mut stop = shared.shutdown.clone();
    let mut config = shared.config();
    let mut peers = Arc::new(Peers::new(&config));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.reached(Phase::Draining) => break,
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
            peers = Arc::new(Peers::new(&current));
            config = current;
        }
        let _ = stream.set_nodelay(true);
        METRICS.smtp_connections.inc();
        let shared = shared.clone();
        let config = config.clone();
        let peers = peers.clone();
        let slot = shared.slots.take();
        tasks.spawn(connection(stream, peer, kind, shared, config, peers, slot));
    }
    // Closing the listener resets the connections the kernel has already
    // completed: each of those is told 421 instead (on the implicit-TLS
    // listener, closed cleanly), so a client sees a reply, not a reset.
    while let Some(stream) = backlogged(&listener) {
        tasks.spawn(shutting_down(stream, kind, config.myhostname.clone()));
    }
    drop(listener);
    tracing::info!(open = tasks.len(), "SMTP listener closed; waiting for open sessions");
    let backstop = async {
        stop.reached(Phase::Closing).await;
        tokio::time::sleep(CLOSE_BACKSTOP).await;
    };
    tokio::select! {
        () = async { while tasks.join_next().await.is_some() {} } => {}
        () = backstop => {
            tracing::warn!(open = tasks.len(), "sessions still open after the shutdown grace period: cut");
            tasks.abort_all();
        }
    }
}

/// Address lists derived from the configuration, rebuilt on reload.
struct Peers {
    debug: DebugPeers,
    proxies: Vec<IpNet>,
}

impl Peers {
    fn new(config: &Config) -> Peers {
        Peers { debug: DebugPeers::new(&config.debug_peer_list), proxies: config.smtp.proxy_networks.clone() }
    }
}

/// One accepted connection: the PROXY header, a reserved slot if `slot`
/// (a general one, taken at accept) is `None` (before any TLS work), TLS
/// for the implicit listener, the per-client limits, then the session.
async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    kind: Listener,
    shared: Arc<Shared>,
    config: Arc<Config>,
    peers: Arc<Peers>,
    slot: Option<Slot>,
) {
    let mut ip = canonical(peer.ip());
    if slot.is_none()
        && !peers.proxies.iter().any(|n| n.contains(&ip))
        && !shared.policy.is_mynetworks(ip)
        && !config.auth.enabled
    {
        // The reserve is for mynetworks (and, with AUTH on, for clients on
        // probation): a client that is neither hears no at once.
        return refuse(stream, ip, "node_limit", "Error: too many connections").await;
    }
    let mut proxy_guard = false;
    if config.smtp.proxy_protocol {
        if peers.proxies.iter().any(|n| n.contains(&ip)) {
            match proxy::read_header(&mut stream, config.smtp.command_timeout.min(PROXY_HEADER_TIMEOUT)).await {
                Ok(proxy::Proxied::Client(addr)) => {
                    METRICS.smtp_proxy_headers.with_label_values(&["accepted"]).inc();
                    ip = canonical(addr.ip());
                }
                Ok(proxy::Proxied::Local) => METRICS.smtp_proxy_headers.with_label_values(&["local"]).inc(),
                Err(e) => {
                    METRICS.smtp_proxy_headers.with_label_values(&["invalid"]).inc();
                    tracing::warn!(balancer = %peer.ip(), error = %e, "PROXY protocol: connection dropped");
                    return;
                }
            }
        } else {
            // A header from anywhere else would let a client pick its own
            // address: the session refuses one (see `ClientInfo::proxy_guard`).
            proxy_guard = true;
        }
    }
    let trusted = shared.policy.is_mynetworks(ip);
    let reserve_open = trusted || config.auth.enabled;
    let Some(slot) = slot.or_else(|| reserve_open.then(|| shared.slots.take_reserved(trusted)).flatten()) else {
        return refuse(stream, ip, "node_limit", "Error: too many connections").await;
    };
    if slot.reserved {
        METRICS.smtp_reserved_slots.with_label_values(&[if trusted { "mynetworks" } else { "probation" }]).inc();
        tracing::info!(client = %ip, trusted, "general slots all busy: reserved slot taken");
    }
    let probation = slot.reserved && !trusted;
    let mut stream = SmtpStream::Plain(stream);
    let mut tls = None;
    if kind == Listener::ImplicitTls {
        let Some(acceptor) = shared.tls_acceptor() else {
            tracing::error!(client = %ip, "implicit TLS connection but no certificate is loaded");
            return;
        };
        match stream.handshake(&acceptor, config.tls.handshake_timeout).await {
            Ok((s, info)) => {
                stream = s;
                tls = Some(info);
            }
            Err(e) => {
                tracing::info!(client = %ip, "TLS handshake failed on the implicit-TLS listener: {e}");
                return;
            }
        }
    }
    if !trusted && !shared.anvil.hit(ip, Event::Connection, config.smtp.connection_rate_limit, config.smtp.rate_window)
    {
        METRICS.smtp_limit_hits.with_label_values(&[Event::Connection.label()]).inc();
        return refuse(stream, ip, "rate_limit", &format!("Error: too many connections from {ip}")).await;
    }
    let limit = (!trusted).then_some(config.smtp.max_connections_per_ip);
    let Some(_slot) = shared.per_ip.try_take(ip, limit) else {
        METRICS.smtp_limit_hits.with_label_values(&["connections_per_ip"]).inc();
        return refuse(stream, ip, "ip_limit", &format!("Error: too many connections from {ip}")).await;
    };
    let name = if config.smtp.peername_lookup {
        shared.policy.dns.reverse_name(ip).await.unwrap_or_else(|| "unknown".into())
    } else {
        "unknown".into()
    };
    let client = ClientInfo { ip, debug: peers.debug.matches(ip, &name), name, proxy_guard, probation };
    tracing::info!("connect from {}[{}]", client.name, client.ip);
    if let Some(info) = &tls {
        tracing::info!("TLS connection established from {}[{}]: {info}", client.name, client.ip);
    }
    METRICS.smtp_connections_active.inc();
    let label = format!("{}[{}]", client.name, client.ip);
    let outcome = Session::new(stream, client, shared.clone(), tls).run().await;
    METRICS.smtp_connections_active.dec();
    METRICS.smtp_sessions.with_label_values(&[outcome.label()]).inc();
    tracing::info!("disconnect from {label} ({})", outcome.label());
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// A connection already waiting in the listener's backlog, if any (never
/// waits for one).
fn backlogged(listener: &TcpListener) -> Option<TcpStream> {
    let waker = std::task::Waker::noop();
    match listener.poll_accept(&mut std::task::Context::from_waker(waker)) {
        std::task::Poll::Ready(Ok((stream, _))) => Some(stream),
        _ => None,
    }
}

/// A connection accepted while the node drains: 421 and close.
async fn shutting_down(stream: TcpStream, kind: Listener, myhostname: String) {
    METRICS.smtp_connections_refused.with_label_values(&["shutting_down"]).inc();
    tracing::info!(client = ?stream.peer_addr().ok(), "connection refused: shutting down");
    if kind == Listener::Smtp {
        let reply = Reply::new(421, "4.3.0", format!("{myhostname} Service shutting down"));
        say_and_close(stream, &reply).await;
    }
}

async fn refuse<S: AsyncWrite + Unpin>(stream: S, ip: IpAddr, reason: &'static str, text: &str) {
    METRICS.smtp_connections_refused.with_label_values(&[reason]).inc();
    tracing::warn!(client = %ip, reason, "connection refused: {text}");
    say_and_close(stream, &Reply::new(421, "4.7.0", text)).await;
}

/// Writes one reply and closes, giving a client that does not read 5 s.
async fn say_and_close<S: AsyncWrite + Unpin>(mut stream: S, reply: &Reply) {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let _ = stream.write_all(reply.render().as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
