//! `Haproxy`: a real HAProxy in TCP mode on loopback, in front of a node,
//! sending the PROXY protocol (`send-proxy-v2`) from a source address of
//! the test's choosing, with health checks that carry a PROXY header too
//! (`check-send-proxy`: v2 LOCAL, as a balancer's own connection). Runs in
//! the foreground (`-db`) from a configuration in a temporary directory;
//! killed on drop. `scripts/test.sh` installs the Debian package.

use std::process::{Child, Command};
use std::time::Duration;

use super::{start_on_free_port, wait_listening};

pub struct Haproxy {
    /// The frontend clients connect to (127.0.0.1).
    pub port: u16,
    dir: tempfile::TempDir,
    child: Child,
}

impl Haproxy {
    /// Forwards 127.0.0.1:`port` to `upstream` (ip:port), connecting from
    /// `source`; health checks go to `check_port` on the upstream's address.
    pub fn start(upstream: &str, source: &str, check_port: u16) -> Haproxy {
        start_on_free_port("haproxy", |port| {
            // noreuseport: without it HAProxy shares a port another process
            // (another test's HAProxy) listens on, and each gets some clients.
            let config = format!(
                "global\n  noreuseport\n  log stderr format raw local0 info\n\
                 defaults\n  mode tcp\n  log global\n  option tcplog\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
                 frontend front\n  bind 127.0.0.1:{port}\n  default_backend relay\n\
                 backend relay\n  source {source}\n  \
                 server node {upstream} send-proxy-v2 check check-send-proxy port {check_port} inter 300ms\n"
            );
            let mut haproxy = Self::run(&config, port, tempfile::tempdir().expect("temporary directory for haproxy"));
            let log = haproxy.dir.path().join("haproxy.log");
            let log = || std::fs::read_to_string(&log).unwrap_or_default();
            wait_listening("haproxy", &mut haproxy.child, port, Duration::from_secs(10), log)?;
            Ok(haproxy)
        })
    }

    /// Runs `config` (whose frontend listens on `port`); its log (to
    /// stdout or stderr) goes to [`Haproxy::log`].
    pub fn run(config: &str, port: u16, dir: tempfile::TempDir) -> Haproxy {
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).expect("write haproxy.cfg");
        let log = std::fs::File::create(dir.path().join("haproxy.log")).expect("haproxy.log");
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(log.try_clone().expect("haproxy.log"))
            .stderr(log)
            .spawn()
            .expect("haproxy (scripts/test.sh installs it)");
        Haproxy { port, dir, child }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("haproxy.log")).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- haproxy log ---\n{}", self.log());
        }
    }
}
