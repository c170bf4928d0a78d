//! `ConnectionMeter`: a TCP forwarder on 127.0.0.1 in front of one real
//! peer (say smtp-sink) that counts the connections open through it at the
//! same time, so a test can see what the peer saw: how many sessions a
//! client held at once. Bytes are copied unchanged in both directions; a
//! connection counts as open from accept until both directions have ended.
//! Plain std threads; the listener and every connection are cut on drop.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the accept loop looks at the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(10);
/// Connections open at once; more are closed at accept (a runaway client
/// would otherwise exhaust threads).
const MAX_CONNECTIONS: usize = 256;

pub struct ConnectionMeter {
    pub port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    upstream: SocketAddr,
    stopping: AtomicBool,
    open_now: AtomicUsize,
    max_open: AtomicUsize,
    accepted: AtomicUsize,
    /// Both sockets of every open connection, so drop can cut them.
    open: Mutex<HashMap<u64, [TcpStream; 2]>>,
    next_id: AtomicU64,
}

/// A poisoned lock only means a pump thread panicked; the map is fine.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ConnectionMeter {
    /// Listens on an ephemeral port of 127.0.0.1, forwarding to `upstream`.
    pub fn start(upstream: SocketAddr) -> ConnectionMeter {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 for the meter");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let port = listener.local_addr().expect("listener address").port();
        let shared = Arc::new(Shared {
            upstream,
            stopping: AtomicBool::new(false),
            open_now: AtomicUsize::new(0),
            max_open: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || accept_loop(listener, shared))
        };
        ConnectionMeter { port, shared, acceptor: Some(acceptor) }
    }

    /// The most connections that were open at the same moment.
    pub fn max_open(&self) -> usize {
        self.shared.max_open.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open_now(&self) -> usize {
        self.shared.open_now.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for ConnectionMeter {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for (_, pair) in lock(&self.shared.open).drain() {
            pair.iter().for_each(|s| {
                let _ = s.shutdown(Shutdown::Both);
            });
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stopping.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                if shared.open_now.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                    continue;
                }
                // Counted before the upstream connects: the client holds a
                // session from its own point of view as soon as it is accepted.
                let now = shared.open_now.fetch_add(1, Ordering::SeqCst) + 1;
                shared.max_open.fetch_max(now, Ordering::SeqCst);
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || {
                    let _ = forward(client, &shared);
                    shared.open_now.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Err(_) => std::thread::sleep(ACCEPT_POLL),
        }
    }
}

/// Copies both ways until both directions end; then forgets the pair.
fn forward(client: TcpStream, shared: &Shared) -> io::Result<()> {
    client.set_nonblocking(false)?;
    let upstream = TcpStream::connect(shared.upstream)?;
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    lock(&shared.open).insert(id, [client.try_clone()?, upstream.try_clone()?]);
    let (mut c_read, mut u_write) = (client.try_clone()?, upstream.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut c_read, &mut u_write);
        let _ = u_write.shutdown(Shutdown::Write);
    });
    let (mut u_read, mut c_write) = (upstream, client);
    let _ = io::copy(&mut u_read, &mut c_write);
    let _ = c_write.shutdown(Shutdown::Both);
    let _ = up.join();
    lock(&shared.open).remove(&id);
    Ok(())
}
