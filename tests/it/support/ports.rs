//! Ports and processes of the harness. A port from [`free_port`] is free
//! when picked, not when a server binds it: another test may take it in
//! between. [`start_on_free_port`] starts a server again on another port
//! when it found its own taken ("Address already in use"), and
//! [`wait_listening`] tells the server's own listener from another
//! process's on the same port. A node needs neither: given port 0 it binds
//! what the system picks and logs it ([`listening_addrs`]). [`KillOnDrop`]
//! holds a process a test starts by hand, so a failing assertion does not
//! leave it running.

use std::net::{SocketAddr, TcpListener};
use std::process::Child;
use std::time::{Duration, Instant};

/// How many ports a server is started on before its harness gives up.
const PORT_ATTEMPTS: usize = 3;

/// A port of 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A loopback port that stays down: bound (without SO_REUSEADDR) but not
/// listening, so a connection to it is refused, as by a destination that
/// is down, and no other test can bind it meanwhile, as one could a port
/// from [`free_port`] left unbound for seconds.
pub struct DownPort {
    socket: socket2::Socket,
    pub port: u16,
}

impl DownPort {
    pub fn new() -> DownPort {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        socket.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into()).expect("bind 127.0.0.1:0");
        let port = socket.local_addr().unwrap().as_socket().expect("an inet address").port();
        DownPort { socket, port }
    }

    /// Frees the port for the test's own listener, to be bound at once.
    pub fn release(self) -> u16 {
        drop(self.socket);
        self.port
    }
}

impl Default for DownPort {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether a server's log says its port was taken.
pub fn port_taken(log: &str) -> bool {
    log.to_ascii_lowercase().contains("address already in use")
}

/// Starts `what` with `start` on a port from [`free_port`]. `start` gives
/// the running server, or the log of one that did not come up: when that
/// says the port was taken (by another test, between the pick and the
/// bind: a race of the harness, not of the server) it is started again on
/// another port; any other failure panics with the log.
pub fn start_on_free_port<T>(what: &str, mut start: impl FnMut(u16) -> Result<T, String>) -> T {
    let mut log = String::new();
    for _ in 0..PORT_ATTEMPTS {
        match start(free_port()) {
            Ok(server) => return server,
            Err(e) if port_taken(&e) => log = e,
            Err(e) => panic!("{what} did not start:\n{e}"),
        }
    }
    panic!("{what} found its port taken {PORT_ATTEMPTS} times in a row:\n{log}");
}

/// Waits until `child` itself listens on TCP `port`, as its own `/proc`
/// shows (a port that accepts connections may be another process's, which
/// took it first); `Err(log())` when `child` exits before. Panics, with
/// `log()`, after `timeout`.
pub fn wait_listening(
    what: &str,
    child: &mut Child,
    port: u16,
    timeout: Duration,
    log: impl Fn() -> String,
) -> Result<(), String> {
    let start = Instant::now();
    loop {
        if listens(child.id(), port) {
            return Ok(());
        }
        if let Some(status) = child.try_wait().unwrap() {
            return Err(format!("{what} exited with {status}:\n{}", log()));
        }
        assert!(start.elapsed() < timeout, "{what} did not listen on port {port} within {timeout:?}:\n{}", log());
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Whether process `pid` holds a TCP socket listening on `port` (any local
/// address, in the process's own network namespace).
fn listens(pid: u32, port: u16) -> bool {
    let suffix = format!(":{port:04X}");
    let inodes: Vec<String> = ["tcp", "tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(|line| match line.split_whitespace().collect::<Vec<_>>()[..] {
                    // sl local_address rem_address st(0A: LISTEN) … uid timeout inode
                    [_, local, _, "0A", _, _, _, _, _, inode, ..] if local.ends_with(&suffix) => {
                        Some(inode.to_string())
                    }
                    _ => None,
                })
                .collect::<Vec<_>>()
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.flatten().filter_map(|fd| std::fs::read_link(fd.path()).ok()).any(|target| {
        let target = target.to_string_lossy();
        inodes.iter().any(|inode| target == format!("socket:[{inode}]"))
    })
}

/// A process a test started itself, killed (SIGKILL) and reaped when this
/// is dropped: at the end of the test, or when an assertion fails first.
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The SMTP and admin addresses in a node's `mxrelay listening` log line
/// (text or JSON): where a node given port 0 listens, once it does.
pub fn listening_addrs(log: &str) -> Option<(SocketAddr, SocketAddr)> {
    // A whole line only: the node may be writing it.
    let line = log.split_inclusive('\n').find(|l| l.ends_with('\n') && l.contains("mxrelay listening"))?;
    let field = |key: &str| -> Option<SocketAddr> {
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(json) => json["fields"][key].as_str()?.parse().ok(),
            Err(_) => line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}=")))?.parse().ok(),
        }
    };
    Some((field("smtp")?, field("admin")?))
}
