//! `Proxy`: a TCP proxy on 127.0.0.1 in front of one upstream (a node's
//! Redis, or a destination whose sessions a test counts), under the test's
//! control. It records the most connections open through it at once
//! (from accept until both directions ended), i.e. what the upstream saw. `partition()` stalls both directions
//! of every connection, open or new, without closing any: nothing is
//! forwarded, not even a close, so the client sees its commands time out as
//! if the packets were dropped on the way. `heal()` resumes forwarding, and
//! what was held back arrives late, as TCP retransmission would deliver it
//! (a stale command a client gave up on reaches the upstream after the heal).
//! `hold_replies()` holds back only what the upstream answers: commands
//! run, their replies come late.
//!
//! Bounds: one buffer of [`BUFFER`] bytes per direction and connection (a
//! stalled direction stops reading, so TCP flow control holds the rest in
//! the sender), at most [`MAX_CONNECTIONS`] connections open at once (more
//! are closed at accept). Plain std threads; everything is cut and joined
//! on drop.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// Bytes held per direction of one connection.
const BUFFER: usize = 16 * 1024;
/// Connections open at once; further ones are closed at accept.
const MAX_CONNECTIONS: usize = 512;
/// How often the accept loop looks at the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(10);
/// Longest wait for the upstream's TCP handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A running proxy; stopped (every connection cut) on drop.
pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    upstream: SocketAddr,
    /// What is held back now; waited on by every pump.
    gate: Mutex<Gate>,
    changed: Condvar,
    stopping: AtomicBool,
    /// Both sockets of every open connection, so drop can cut them.
    open: Mutex<HashMap<u64, Vec<TcpStream>>>,
    next_id: AtomicU64,
    accepted: AtomicUsize,
    /// The most entries `open` ever held at once.
    max_open: AtomicUsize,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// A poisoned lock only means a pump thread panicked; the state is fine.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Proxy {
    /// Listens on an ephemeral port of 127.0.0.1 and forwards to `upstream`
    /// (`host:port`).
    pub fn start(upstream: &str) -> Proxy {
        let upstream: SocketAddr = upstream.parse().expect("proxy upstream as ip:port");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 for the proxy");
        let port = listener.local_addr().expect("proxy listener address").port();
        listener.set_nonblocking(true).expect("non-blocking proxy listener");
        let shared = Arc::new(Shared {
            upstream,
            gate: Mutex::new(Gate::default()),
            changed: Condvar::new(),
            stopping: AtomicBool::new(false),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            accepted: AtomicUsize::new(0),
            max_open: AtomicUsize::new(0),
            threads: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("proxy-{port}"))
                .spawn(move || accept_loop(listener, shared))
                .expect("spawn proxy accept thread")
        };
        Proxy { port, shared, acceptor: Some(acceptor) }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops forwarding in both directions on every connection, current
    /// and new, without closing any.
    pub fn partition(&self) {
        self.set(Gate { both: true, replies: false });
    }

    /// Forwards what the clients send, but holds back every reply (commands
    /// run, their answers are late).
    pub fn hold_replies(&self) {
        self.set(Gate { both: false, replies: true });
    }

    /// Forwards again, starting with what was held back.
    pub fn heal(&self) {
        self.set(Gate::default());
    }

    fn set(&self, gate: Gate) {
        *lock(&self.shared.gate) = gate;
        self.shared.changed.notify_all();
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// The most connections that were open through the proxy at once.
    pub fn max_open(&self) -> usize {
        self.shared.max_open.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for (_, sockets) in lock(&self.shared.open).drain() {
            for s in sockets {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        let threads: Vec<JoinHandle<()>> = std::mem::take(&mut *lock(&self.shared.threads));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// What the proxy holds back.
#[derive(Clone, Copy, Default)]
struct Gate {
    /// Both directions (a partition).
    both: bool,
    /// Upstream to client only.
    replies: bool,
}

impl Gate {
    fn holds(self, down: bool) -> bool {
        self.both || (down && self.replies)
    }
}

impl Shared {
    /// Blocks while the direction (`down`: upstream to client) is held;
    /// false once the proxy is stopping.
    fn wait_forwarding(&self, down: bool) -> bool {
        let mut gate = lock(&self.gate);
        while gate.holds(down) && !self.stopping.load(Ordering::SeqCst) {
            gate = self.changed.wait(gate).unwrap_or_else(|e| e.into_inner());
        }
        !self.stopping.load(Ordering::SeqCst)
    }

    fn spawn(self: &Arc<Self>, name: String, f: impl FnOnce() + Send + 'static) {
        if let Ok(handle) = std::thread::Builder::new().name(name).spawn(f) {
            let mut threads = lock(&self.threads);
            // Keep the list short: finished threads need no join.
            threads.retain(|t| !t.is_finished());
            threads.push(handle);
        }
    }

    fn forget(&self, id: u64) {
        if let Some(sockets) = lock(&self.open).remove(&id) {
            for s in sockets {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stopping.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                if lock(&shared.open).len() >= MAX_CONNECTIONS {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
                if let Ok(clone) = client.try_clone() {
                    let mut open = lock(&shared.open);
                    open.insert(id, vec![clone]);
                    shared.max_open.fetch_max(open.len(), Ordering::SeqCst);
                }
                let conn_shared = Arc::clone(&shared);
                shared.spawn(format!("proxy-conn-{id}"), move || connect(id, client, conn_shared));
            }
            // WouldBlock: nobody waiting; other errors are transient here.
            Err(_) => std::thread::sleep(ACCEPT_POLL),
        }
    }
}

/// Opens the upstream side once forwarding is allowed (a connection made
/// during a partition reaches nothing until the heal), then pumps both ways.
fn connect(id: u64, client: TcpStream, shared: Arc<Shared>) {
    let _ = client.set_nonblocking(false);
    if !shared.wait_forwarding(false) {
        return shared.forget(id);
    }
    let Ok(upstream) = TcpStream::connect_timeout(&shared.upstream, CONNECT_TIMEOUT) else {
        return shared.forget(id);
    };
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let (Ok(client_rx), Ok(upstream_rx), Ok(registered)) =
        (client.try_clone(), upstream.try_clone(), upstream.try_clone())
    else {
        return shared.forget(id);
    };
    match lock(&shared.open).get_mut(&id) {
        Some(sockets) => sockets.push(registered),
        // Dropped meanwhile.
        None => return,
    }
    let done = Arc::new(AtomicUsize::new(0));
    for (down, from, to) in [(false, client_rx, upstream), (true, upstream_rx, client)] {
        let (pump_shared, done) = (Arc::clone(&shared), Arc::clone(&done));
        let name = if down { "down" } else { "up" };
        shared.spawn(format!("proxy-{name}-{id}"), move || {
            let broken = pump(from, to, down, &pump_shared).is_err();
            // A broken side (reset) cuts the whole connection, once the
            // partition allows it to be noticed; otherwise the second pump
            // to reach its end of stream closes it for good.
            let last = done.fetch_add(1, Ordering::SeqCst) == 1;
            if (broken && pump_shared.wait_forwarding(down)) || last {
                pump_shared.forget(id);
            }
        });
    }
}

/// Copies `from` to `to` through one bounded buffer, waiting at the gate
/// before every write and before passing on the end of the stream.
fn pump(mut from: TcpStream, mut to: TcpStream, down: bool, shared: &Shared) -> io::Result<()> {
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = from.read(&mut buf)?;
        if !shared.wait_forwarding(down) {
            return Ok(());
        }
        if n == 0 {
            return to.shutdown(Shutdown::Write);
        }
        to.write_all(&buf[..n])?;
    }
}
