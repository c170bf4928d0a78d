//! Test helpers: real processes on loopback, each named for what it starts
//! and cleaned up on drop. The test command (`scripts/test.sh`) installs and
//! starts the shared MariaDB (127.0.0.1:3306) and Redis (127.0.0.1:6379);
//! helpers that must stop a service start a private one.
#![allow(dead_code)]

pub mod destination;
pub mod fleet;
pub mod haproxy;
pub mod in_process;
pub mod netns;
pub mod outbound;
pub mod pki;
pub mod ports;
pub mod postfix;
pub mod prometheus;
pub mod proxy;
pub mod redis_cluster;
pub mod scanners;
pub mod sentinel;
pub mod sink;

pub use ports::{DownPort, KillOnDrop, free_port, listening_addrs, start_on_free_port, wait_listening};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const SHARED_MYSQL: &str = "mysql://root@127.0.0.1:3306";
pub const SHARED_REDIS: &str = "redis://127.0.0.1:6379/";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A name unique to this test process and call.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{prefix}_{}_{}_{nanos}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

pub fn wait_until_value<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Some(v) = f() {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

pub fn wait_port(port: u16, timeout: Duration) {
    wait_until(&format!("port {port}"), timeout, || TcpStream::connect(("127.0.0.1", port)).is_ok());
}

/// The DNS every world starts: the sender and client names resolve,
/// [`LISTED`] and the other test domains too.
pub fn world_dns() -> Dns {
    Dns::start(&["sender.example", "client.example"], &[LISTED, "other.example", "xn--bcher-kva.example"])
}

/// Waits until RCPT TO:<rcpt> from an untrusted client at `addr` gets `code`.
pub fn wait_rcpt(addr: &str, rcpt: &str, code: u16) {
    wait_until(&format!("RCPT {rcpt} → {code}"), Duration::from_secs(15), || {
        let mut c = Raw::ehlo(addr);
        c.cmd(&format!("MAIL FROM:<{SENDER}>"));
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        r.starts_with(&code.to_string())
    });
}

/// A MySQL/MariaDB server to run SQL against with the real `mysql` client.
#[derive(Clone)]
pub struct MysqlServer {
    pub port: u16,
}

impl MysqlServer {
    pub fn shared() -> MysqlServer {
        MysqlServer { port: 3306 }
    }

    /// Runs SQL; panics with the client's message on failure.
    pub fn exec(&self, db: &str, sql: &str) -> String {
        self.try_exec(db, sql).unwrap_or_else(|e| panic!("mysql failed: {e}\nSQL: {sql}"))
    }

    pub fn try_exec(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new("mysql")
            .args(["-h", "127.0.0.1", "-P", &self.port.to_string(), "-u", "root", "-N", "-B"])
            .args((!db.is_empty()).then_some(db))
            .args(["-e", sql])
            .output()
            .expect("mysql client (scripts/test.sh installs it)");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn url(&self, db: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{db}", self.port)
    }
}

/// A database of its own for one test, dropped at the end.
pub struct TestDb {
    pub server: MysqlServer,
    pub name: String,
}

impl TestDb {
    pub fn create(server: &MysqlServer) -> TestDb {
        let name = unique("mxrt");
        server.exec("", &format!("CREATE DATABASE `{name}`"));
        TestDb { server: server.clone(), name }
    }

    pub fn url(&self) -> String {
        self.server.url(&self.name)
    }

    pub fn exec(&self, sql: &str) -> String {
        self.server.exec(&self.name, sql)
    }

    pub fn add_domain(&self, domain: &str, host: &str, port: u16) {
        self.exec(&format!(
            "INSERT INTO domains (domain, relay_host, relay_port, enable_virus_spam_scan) VALUES ('{domain}', '{host}', {port}, '0')"
        ));
    }
}

impl TestDb {
    /// After a restart of a private server: the table may not exist yet
    /// (the relay migrates it); waits for it, then lists friet.pan.
    pub fn add_domain_when_ready(&self) {
        wait_until("domains table", Duration::from_secs(30), || {
            self.server.try_exec(&self.name, "SELECT 1 FROM domains LIMIT 1").is_ok()
        });
        self.add_domain(LISTED, "127.0.0.1", 2526);
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = self.server.try_exec("", &format!("DROP DATABASE IF EXISTS `{}`", self.name));
    }
}

/// A private MariaDB on an ephemeral port, for tests that stop it.
pub struct MariaDb {
    pub server: MysqlServer,
    dir: tempfile::TempDir,
    child: Option<Child>,
    args: Vec<String>,
}

impl MariaDb {
    pub fn start() -> MariaDb {
        Self::start_with(&[])
    }

    /// With extra `mariadbd` options (TLS files, say).
    pub fn start_with(args: &[&str]) -> MariaDb {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        // A temporary directory of its own: bootstraps running at once in
        // the shared /tmp remove each other's temporary tables (1 in 8
        // failed so, "Unknown table 'mysql.tmp_user_nopasswd,…'").
        let tmp = dir.path().join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        let out = Command::new("mariadb-install-db")
            .args(["--no-defaults", "--auth-root-authentication-method=normal", "--skip-test-db", "--user=root"])
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .output()
            .expect("mariadb-install-db (scripts/test.sh installs it)");
        assert!(
            out.status.success(),
            "mariadb-install-db failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let args = args.iter().map(|a| a.to_string()).collect();
        let mut db = MariaDb { server: MysqlServer { port: 0 }, dir, child: None, args };
        start_on_free_port("mariadbd", |port| {
            db.server.port = port;
            db.try_resume()
        });
        db
    }

    /// Starts the server again on the same port and data.
    pub fn resume(&mut self) {
        if let Err(log) = self.try_resume() {
            panic!("mariadbd did not start again on port {}:\n{log}", self.server.port);
        }
    }

    /// Starts it and waits until it listens itself (a port that answers
    /// could be another server's) and answers; its log if it exits first.
    fn try_resume(&mut self) -> Result<(), String> {
        let d = self.dir.path();
        let log_path = d.join("mariadb.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new("/usr/sbin/mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", d.join("data").display()))
            .arg(format!("--socket={}", d.join("sock").display()))
            .arg(format!("--pid-file={}", d.join("pid").display()))
            .arg(format!("--tmpdir={}", d.join("tmp").display()))
            .arg(format!("--port={}", self.server.port))
            .args(["--bind-address=127.0.0.1", "--user=root", "--skip-log-bin", "--innodb-buffer-pool-size=16M"])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mariadbd");
        // Held by `self` at once: a timeout below panics, and the drop kills it.
        let child = self.child.insert(child);
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        wait_listening("mariadbd", child, self.server.port, Duration::from_secs(60), log)?;
        wait_until("private mariadb", Duration::from_secs(60), || self.server.try_exec("", "SELECT 1").is_ok());
        Ok(())
    }

    /// Kills the server (SIGKILL): an outage, not a shutdown.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A private Redis on an ephemeral port, for tests that stop it.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    args: Vec<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// A replica of `primary`.
    pub fn replica_of(primary: &RedisServer) -> RedisServer {
        Self::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()])
    }

    pub fn start_with(args: &[&str]) -> RedisServer {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        Self::start_with_each(|| args.clone())
    }

    /// As [`RedisServer::start_with`], with the arguments made anew for
    /// each port tried: a second port of its own in them (TLS, cluster bus)
    /// is picked again, with the first, when either was taken.
    pub fn start_with_each(args: impl Fn() -> Vec<String>) -> RedisServer {
        start_on_free_port("redis-server", |port| {
            let mut r = RedisServer { port, dir: tempfile::tempdir().unwrap(), child: None, args: args() };
            r.try_resume().map(|()| r)
        })
    }

    /// The value it was started with after `flag` (`--tls-port`, say).
    pub fn arg(&self, flag: &str) -> Option<&str> {
        let at = self.args.iter().position(|a| a == flag)?;
        self.args.get(at + 1).map(String::as_str)
    }

    /// Starts the server again on the same port and data.
    pub fn resume(&mut self) {
        if let Err(log) = self.try_resume() {
            panic!("redis-server did not start on port {}:\n{log}", self.port);
        }
    }

    /// Starts it and waits until it says it is ready (a port that answers
    /// could be another process's); its log if it exits first.
    fn try_resume(&mut self) -> Result<(), String> {
        let log = self.dir.path().join("redis.log");
        let _ = std::fs::remove_file(&log);
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test.sh installs it)");
        let started = Instant::now();
        let ready = || std::fs::read_to_string(&log).is_ok_and(|l| l.contains("Ready to accept connections"));
        while !ready() {
            if child.try_wait().unwrap().is_some() {
                return Err(std::fs::read_to_string(&log).unwrap_or_default());
            }
            assert!(started.elapsed() < Duration::from_secs(10), "redis-server did not start on {}", self.port);
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child = Some(child);
        wait_port(self.port, Duration::from_secs(10));
        Ok(())
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether a DNS server on 127.0.0.1:`port` answers a query (for
/// `ready.test`, type A) within 200 ms.
fn dns_answers(port: u16) -> bool {
    let Ok(socket) = std::net::UdpSocket::bind("127.0.0.1:0") else { return false };
    let _ = socket.set_read_timeout(Some(Duration::from_millis(200)));
    let mut query = vec![0x4d, 0x58, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["ready", "test"] {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    let mut reply = [0u8; 512];
    socket.send_to(&query, ("127.0.0.1", port)).is_ok()
        && matches!(socket.recv(&mut reply), Ok(n) if n >= 12 && reply[..2] == query[..2] && reply[2] & 0x80 != 0)
}

/// A DNS server on loopback (dnsmasq) serving the tests' own names.
/// Everything not configured is answered NXDOMAIN.
pub struct Dns {
    pub port: u16,
    _dir: tempfile::TempDir,
    child: Child,
}

impl Dns {
    /// `hosts`: names with an A record (127.0.0.1); `mx`: names with an MX.
    pub fn start(hosts: &[&str], mx: &[&str]) -> Dns {
        Self::start_with(hosts, mx, &[])
    }

    /// As [`Dns::start`], plus raw dnsmasq options (e.g. `--mx-host=…`).
    /// Ready once it answers a query; started again on another port when
    /// another test took this one between `free_port` and dnsmasq's bind.
    pub fn start_with(hosts: &[&str], mx: &[&str], extra: &[&str]) -> Dns {
        Self::start_on(free_port, hosts, mx, extra)
    }

    /// As [`Dns::start_with`], on the port `port` gives (53 in a test's
    /// own network namespace, for programs that read `resolv.conf`).
    pub fn start_on(port: impl Fn() -> u16, hosts: &[&str], mx: &[&str], extra: &[&str]) -> Dns {
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let port = port();
            let mut cmd = Command::new("/usr/sbin/dnsmasq");
            cmd.args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
            ])
            .args(["--listen-address=127.0.0.1", "--interface=lo", "--user=root"])
            .arg(format!("--port={port}"))
            .arg(format!("--pid-file={}", dir.path().join("pid").display()))
            .arg(format!("--log-facility={}", dir.path().join("log").display()));
            for h in hosts {
                cmd.arg(format!("--host-record={h},127.0.0.1"));
            }
            for m in mx {
                cmd.arg(format!("--mx-host={m},mx.{m},10"));
                cmd.arg(format!("--host-record=mx.{m},127.0.0.1"));
            }
            cmd.args(extra);
            // Everything else: authoritative "no such domain".
            cmd.arg("--address=/#/");
            let mut child = cmd
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("dnsmasq (scripts/test.sh installs it)");
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(10) {
                if let Some(status) = child.try_wait().unwrap() {
                    let mut err = String::new();
                    let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
                    assert!(err.contains("Address already in use"), "dnsmasq exited with {status}: {err}");
                    break;
                }
                if dns_answers(port) {
                    return Dns { port, _dir: dir, child };
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("dnsmasq did not answer on three ports in a row");
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Dns {
    /// Kills dnsmasq: every query to it then times out.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running `mxrelay serve`, killed on drop.
pub struct Relay {
    /// The SMTP listener's address (127.0.0.1 but in a topology test).
    pub ip: std::net::IpAddr,
    pub port: u16,
    pub admin_port: u16,
    pub prefix: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
    config: String,
    env: Vec<(String, String)>,
    port_retries: u32,
}

/// The override for nodes of tests that change a domain or a recipient and
/// send SIGHUP: the periodic refresh (`domains.refresh`, 1 s in
/// [`base_config`]) an hour away, so only the signal can load the change
/// within the test, and a reload that does not happen fails it.
pub const RELOAD_ON_SIGHUP_ONLY: (&str, &str) = ("MXRELAY_DOMAINS_REFRESH", "1h");

/// Test defaults: 127.0.0.1 is NOT in mynetworks (so the relay rules apply
/// to test clients); 127.0.0.9 is. Delivery is off (receive tests inspect
/// the queue); delivery tests switch it on with `MXRELAY_DELIVERY_ENABLED`.
pub fn base_config(domains_url: &str, queue_url: &str, dns: &Dns) -> String {
    format!(
        r#"node_id = "test-node"
myhostname = "relay.test"
mynetworks = ["127.0.0.9/32"]
[smtp]
peername_lookup = false
command_timeout = "20s"
data_timeout = "60s"
[domains]
url = "{domains_url}"
refresh = "1s"
[queue]
url = "{queue_url}"
timeout = "2s"
[dns]
nameservers = ["{}"]
timeout = "1s"
[delivery]
enabled = false
retry_min = "1s"
retry_max = "4s"
probe_interval = "1s"
connect_timeout = "2s"
"#,
        dns.addr()
    )
}

impl Relay {
    /// Starts with `config` (TOML); ports and the queue prefix are added.
    pub fn spawn(config: &str) -> Relay {
        Self::spawn_with_env(config, &[])
    }

    pub fn spawn_with_env(config: &str, env: &[(&str, &str)]) -> Relay {
        Self::spawn_in_queue(config, env, &unique("mxrq"))
    }

    /// A node of the cluster whose queue prefix is `prefix`.
    pub fn spawn_in_queue(config: &str, env: &[(&str, &str)], prefix: &str) -> Relay {
        Self::spawn_at(std::net::IpAddr::from([127, 0, 0, 1]), (free_port(), free_port()), config, env, prefix)
    }

    /// A node of the cluster `prefix` whose SMTP and admin listeners are
    /// on `ip` (ports 25 and 9425 on an address of a test's own network
    /// namespace, say).
    pub fn spawn_at(
        ip: std::net::IpAddr,
        (port, admin_port): (u16, u16),
        config: &str,
        env: &[(&str, &str)],
        prefix: &str,
    ) -> Relay {
        let mut r = Relay {
            ip,
            port,
            admin_port,
            prefix: prefix.to_string(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            config: config.to_string(),
            env: env.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
            port_retries: 0,
        };
        r.start();
        r
    }

    pub fn start(&mut self) {
        let path = self.dir.path().join("mxrelay.toml");
        std::fs::write(&path, &self.config).unwrap();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_mxrelay"))
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .env("MXRELAY_SMTP_LISTEN", std::net::SocketAddr::new(self.ip, self.port).to_string())
            .env("MXRELAY_ADMIN_LISTEN", std::net::SocketAddr::new(self.ip, self.admin_port).to_string())
            .env("MXRELAY_QUEUE_PREFIX", &self.prefix)
            .envs(self.env.iter().map(|(a, b)| (a, b)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mxrelay binary");
        self.child = Some(child);
        // Ready once both listeners are bound: tests query the admin port
        // (metrics, readiness) as soon as this returns.
        let (ip, port, admin) = (self.ip, self.port, self.admin_port);
        let start = Instant::now();
        while TcpStream::connect((ip, port)).is_err() || TcpStream::connect((ip, admin)).is_err() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                // Another test took a port between `free_port` and the bind:
                // a race of the harness, not of the relay; pick new ones.
                if self.log().contains("Address already in use") && self.port_retries < 3 {
                    self.port_retries += 1;
                    (self.port, self.admin_port) = (free_port(), free_port());
                    return self.start();
                }
                panic!("mxrelay exited with {status}:\n{}", self.log());
            }
            assert!(start.elapsed() < Duration::from_secs(30), "mxrelay did not listen:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    /// Replaces the configuration file (takes effect on SIGHUP or restart).
    pub fn rewrite_config(&mut self, config: &str) {
        self.config = config.to_string();
        std::fs::write(self.dir.path().join("mxrelay.toml"), config).unwrap();
    }

    /// One sample (`name` or `name{labels}` exactly as exported) from
    /// `/metrics`; `None` when the node does not export it.
    pub fn metric(&self, sample: &str) -> Option<f64> {
        metric_sample(&self.http_get("/metrics"), sample)
    }

    /// A sample the node must export (known label values start at 0):
    /// panics naming it when it is absent, rather than reading it as 0.
    pub fn value(&self, sample: &str) -> f64 {
        self.metric(sample).unwrap_or_else(|| panic!("{} exports no sample {sample}", self.addr()))
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("mxrelay.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, sig: &str) {
        Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]).status().unwrap();
    }

    pub fn addr(&self) -> String {
        std::net::SocketAddr::new(self.ip, self.port).to_string()
    }

    pub fn http_get(&self, path: &str) -> String {
        http_get_at(std::net::SocketAddr::new(self.ip, self.admin_port), path)
    }

    /// Runs `mxrelay ARGS…` with this node's configuration file and
    /// environment; returns (success, stdout and stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = self.cli_output(args);
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    }

    /// Runs `mxrelay ARGS… --json` as [`Relay::cli`] and reads its output.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.cli_output(&[args, &["--json"]].concat());
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "mxrelay {args:?}: {stdout}{stderr}");
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("mxrelay {args:?}: {e}: {stdout}{stderr}"))
    }

    fn cli_output(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_mxrelay"))
            .args(args)
            .arg("--config")
            .arg(self.dir.path().join("mxrelay.toml"))
            .env("MXRELAY_QUEUE_PREFIX", &self.prefix)
            .envs(self.env.iter().map(|(a, b)| (a, b)))
            .output()
            .expect("mxrelay binary")
    }

    pub fn queue(&self, redis_url: &str) -> Queue {
        Queue { conn: redis::Client::open(redis_url).unwrap().get_connection().unwrap(), prefix: self.prefix.clone() }
    }
}

impl Drop for Relay {
    /// Kills the node and removes its queue's keys from the shared Redis
    /// (none there when it ran on a private one).
    fn drop(&mut self) {
        self.kill();
        clear_shared_queue(&self.prefix);
        if std::thread::panicking() {
            eprintln!("--- mxrelay log ---\n{}", self.log());
        }
    }
}

/// Read access to one relay's queue keys in Redis.
pub struct Queue {
    conn: redis::Connection,
    pub prefix: String,
}

impl Queue {
    /// Every message id in the ready streams of all shards.
    pub fn ready_ids(&mut self) -> Vec<String> {
        let keys: Vec<String> =
            redis::cmd("KEYS").arg(format!("{}:*:ready", self.prefix)).query(&mut self.conn).unwrap();
        let mut ids = Vec::new();
        for k in keys {
            let entries: redis::streams::StreamRangeReply =
                redis::cmd("XRANGE").arg(&k).arg("-").arg("+").query(&mut self.conn).unwrap();
            for e in entries.ids {
                ids.push(e.get::<String>("id").unwrap());
            }
        }
        ids
    }

    /// The one key of `kind` (`msg`, `body`) of message `id`, in whichever shard holds it.
    pub fn key_of(&mut self, kind: &str, id: &str) -> String {
        let keys: Vec<String> =
            redis::cmd("KEYS").arg(format!("{}:*:{kind}:{id}", self.prefix)).query(&mut self.conn).unwrap();
        assert_eq!(keys.len(), 1, "{kind} of {id}: {keys:?}");
        keys.into_iter().next().unwrap()
    }

    pub fn body(&mut self, id: &str) -> Vec<u8> {
        let k = self.key_of("body", id);
        redis::cmd("GET").arg(k).query(&mut self.conn).unwrap()
    }

    pub fn envelope(&mut self, id: &str) -> std::collections::HashMap<String, String> {
        let k = self.key_of("msg", id);
        redis::cmd("HGETALL").arg(k).query(&mut self.conn).unwrap()
    }

    pub fn recipients(&mut self, id: &str) -> Vec<String> {
        let env = self.envelope(id);
        let rcpts: Vec<serde_json::Value> = serde_json::from_str(&env["recipients"]).unwrap();
        rcpts.iter().map(|r| r["address"].as_str().unwrap().to_string()).collect()
    }

    /// Keys of this relay that are not part of a committed message.
    /// Messages (envelopes) still in the queue.
    pub fn message_count(&mut self) -> usize {
        let keys: Vec<String> =
            redis::cmd("KEYS").arg(format!("{}:*:msg:*", self.prefix)).query(&mut self.conn).unwrap();
        keys.len()
    }

    pub fn deferred_count(&mut self) -> usize {
        let keys: Vec<String> =
            redis::cmd("KEYS").arg(format!("{}:*:deferred", self.prefix)).query(&mut self.conn).unwrap();
        keys.iter().map(|k| redis::cmd("ZCARD").arg(k).query::<usize>(&mut self.conn).unwrap()).sum()
    }

    pub fn try_envelope(&mut self, id: &str) -> Option<std::collections::HashMap<String, String>> {
        let keys: Vec<String> =
            redis::cmd("KEYS").arg(format!("{}:*:msg:{id}", self.prefix)).query(&mut self.conn).unwrap();
        let k = keys.into_iter().next()?;
        redis::cmd("HGETALL").arg(k).query(&mut self.conn).ok()
    }

    /// Entries leased to a node now (pending in the consumer groups).
    pub fn leased(&mut self) -> usize {
        let keys: Vec<String> =
            redis::cmd("KEYS").arg(format!("{}:*:ready", self.prefix)).query(&mut self.conn).unwrap();
        keys.iter()
            .map(|k| {
                let summary: redis::RedisResult<(usize, redis::Value, redis::Value, redis::Value)> =
                    redis::cmd("XPENDING").arg(k).arg("delivery").query(&mut self.conn);
                summary.map_or(0, |s| s.0)
            })
            .sum()
    }

    /// The connection itself, for a test that stages a fault by hand.
    pub fn redis(&mut self) -> &mut redis::Connection {
        &mut self.conn
    }

    pub fn stray_keys(&mut self) -> Vec<String> {
        let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{}:*", self.prefix)).query(&mut self.conn).unwrap();
        keys.into_iter().filter(|k| k.contains(":tmp:")).collect()
    }
}

/// GET `path` from an admin listener on 127.0.0.1:`port`: the whole
/// response, status line first.
pub fn http_get(port: u16, path: &str) -> String {
    http_get_at(std::net::SocketAddr::from(([127, 0, 0, 1], port)), path)
}

/// GET `path` from the admin listener at `addr`.
pub fn http_get_at(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// One sample (`name` or `name{labels}` exactly) from a `/metrics` text.
pub fn metric_sample(metrics: &str, sample: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap_or_else(|e| panic!("sample {sample}: {v:?}: {e}")))
}

/// `swaks` with the given arguments; returns (exit status, transcript).
pub fn swaks(server: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new("swaks")
        .args(["--server", server, "--timeout", "20"])
        .args(args)
        .output()
        .expect("swaks (scripts/test.sh installs it)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// The queue id from a `250 … queued as <id>` in a transcript.
pub fn queued_id(transcript: &str) -> Option<String> {
    transcript.lines().find_map(|l| l.split("queued as ").nth(1).map(|s| s.trim().to_string()))
}

/// A delivered message split into our `Received:` field (the first header
/// with its continuation lines, CRLF included) and everything after it.
/// Panics when the message does not start with a `Received:` field.
pub fn split_our_received(data: &[u8]) -> (String, &[u8]) {
    assert!(data.starts_with(b"Received: from "), "no Received: first: {:?}", String::from_utf8_lossy(data));
    let mut end = 0;
    while let Some(i) = data[end..].windows(2).position(|w| w == b"\r\n") {
        end += i + 2;
        if !matches!(data.get(end), Some(b' ' | b'\t')) {
            break;
        }
    }
    (String::from_utf8(data[..end].to_vec()).expect("our Received: is ASCII"), &data[end..])
}

/// Asserts that `data`, as a destination received it, is our `Received:`
/// field for queue id `id` and then exactly `sent`, byte for byte.
pub fn assert_relayed_exactly(data: &[u8], sent: &[u8], id: &str) {
    let (received, rest) = split_our_received(data);
    assert!(received.contains(&format!(" id {id}")), "{received}");
    assert!(
        rest == sent,
        "relayed content differs from what was sent:\n{:?}\nsent:\n{:?}",
        String::from_utf8_lossy(rest),
        String::from_utf8_lossy(sent)
    );
}

/// One whole (possibly multi-line) SMTP reply from `reader`; what was read
/// up to EOF or an error otherwise.
pub fn read_reply(reader: &mut impl BufRead) -> String {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return all,
            Ok(_) => {}
        }
        all.push_str(&line);
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            return all;
        }
    }
}

/// A raw SMTP client over a socket, for what swaks cannot send.
pub struct Raw {
    reader: BufReader<TcpStream>,
    stream: TcpStream,
}

impl Raw {
    pub fn connect(addr: &str) -> Raw {
        Self::wrap(TcpStream::connect(addr).unwrap())
    }

    /// Connects until the greeting is 220 (earlier sessions may still hold
    /// a connection slot while they close).
    pub fn connect_greeted(addr: &str) -> Raw {
        wait_until_value("a 220 greeting", Duration::from_secs(10), || {
            let mut c = Raw::connect(addr);
            (c.code() == 220).then_some(c)
        })
    }

    /// Connects from a chosen loopback address (e.g. one in mynetworks).
    pub fn connect_from(local: &str, addr: &str) -> Raw {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let local: std::net::SocketAddr = format!("{local}:0").parse().unwrap();
        socket.bind(&local.into()).unwrap();
        let remote: std::net::SocketAddr = addr.parse().unwrap();
        socket.connect(&remote.into()).unwrap();
        Self::wrap(socket.into())
    }

    fn wrap(stream: TcpStream) -> Raw {
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Raw { reader: BufReader::new(stream.try_clone().unwrap()), stream }
    }

    /// Connects and reads the greeting; says EHLO.
    pub fn ehlo(addr: &str) -> Raw {
        let mut c = Raw::connect(addr);
        assert_eq!(c.code(), 220);
        c.send("EHLO client.example\r\n");
        assert_eq!(c.code(), 250);
        c
    }

    pub fn send(&mut self, data: &str) {
        self.send_bytes(data.as_bytes());
    }

    pub fn send_bytes(&mut self, data: &[u8]) {
        self.stream.write_all(data).unwrap();
    }

    /// One whole (possibly multi-line) reply; empty at EOF.
    pub fn reply(&mut self) -> String {
        read_reply(&mut self.reader)
    }

    pub fn code(&mut self) -> u16 {
        let r = self.reply();
        r.get(..3).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no reply code in {r:?}"))
    }

    /// Sends a command and returns the reply code.
    pub fn code_after(&mut self, line: &str) -> u16 {
        self.send(&format!("{line}\r\n"));
        self.code()
    }

    /// Sends a command and returns the whole reply.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(&format!("{line}\r\n"));
        self.reply()
    }

    /// One message in this session: MAIL, RCPT and DATA, each answered as
    /// it must be; the reply to the final dot. `content` ends in CRLF and
    /// has no line starting with a dot.
    pub fn message(&mut self, from: &str, to: &str, content: &str) -> String {
        let r = self.cmd(&format!("MAIL FROM:<{from}>"));
        assert!(r.starts_with("250"), "MAIL: {r}");
        let r = self.cmd(&format!("RCPT TO:<{to}>"));
        assert!(r.starts_with("250"), "RCPT: {r}");
        assert_eq!(self.code_after("DATA"), 354);
        self.send(&format!("{content}.\r\n"));
        self.reply()
    }

    /// The socket, for a TLS handshake after `220 Ready to start TLS`
    /// (nothing is buffered then: the server waits for the ClientHello).
    pub fn into_tcp(self) -> TcpStream {
        assert!(self.reader.buffer().is_empty(), "unread server data before the TLS handshake");
        self.stream
    }

    /// True when the server has closed the connection.
    pub fn closed(&mut self) -> bool {
        let mut buf = [0u8; 1];
        match self.reader.read(&mut buf) {
            Ok(0) => true,
            // Closed with our input unread: the kernel resets.
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }
}

/// Deletes a relay's keys (`prefix:*`) from the shared Redis.
pub fn clear_shared_queue(prefix: &str) {
    if let Ok(mut conn) = redis::Client::open(SHARED_REDIS).and_then(|c| c.get_connection()) {
        let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}:*")).query(&mut conn).unwrap_or_default();
        for chunk in keys.chunks(500) {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(chunk).query(&mut conn);
        }
    }
}

/// The standard test world: DNS, a fresh database with one listed domain,
/// and a relay on the shared Redis (or on one of the test's own).
pub struct World {
    pub dns: Dns,
    pub db: TestDb,
    pub relay: Relay,
    queue_url: String,
}

pub const LISTED: &str = "friet.pan";
pub const SENDER: &str = "sender@sender.example";

impl World {
    pub fn start() -> World {
        Self::start_with(&[])
    }

    /// `env`: `MXRELAY_*` overrides on top of the test configuration.
    pub fn start_with(env: &[(&str, &str)]) -> World {
        Self::start_on(SHARED_REDIS, env)
    }

    /// As [`World::start_with`], queueing in the Redis at `queue_url`:
    /// a test that fills the queue keeps it out of the shared one, which
    /// other tests inspect with KEYS.
    pub fn start_on(queue_url: &str, env: &[(&str, &str)]) -> World {
        let dns = world_dns();
        let db = TestDb::create(&MysqlServer::shared());
        let relay = Relay::spawn_with_env(&base_config(&db.url(), queue_url, &dns), env);
        db.add_domain(LISTED, "127.0.0.1", 2526);
        relay.signal("HUP");
        let world = World { dns, db, relay, queue_url: queue_url.to_string() };
        world.wait_rcpt(&format!("probe@{LISTED}"), 250);
        world
    }

    /// Waits until RCPT TO:<rcpt> from an untrusted client gets `code`.
    pub fn wait_rcpt(&self, rcpt: &str, code: u16) {
        wait_rcpt(&self.relay.addr(), rcpt, code);
    }

    pub fn queue(&self) -> Queue {
        self.relay.queue(&self.queue_url)
    }
}

impl Relay {
    /// Waits up to `timeout` for the node to exit by itself (after a stop
    /// signal); its exit status, or `None` while it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            let status = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if status.is_some() {
                self.child = None;
                return status;
            }
            if start.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The reply to `RCPT TO:<rcpt>` in a new session from an untrusted client.
pub fn rcpt_reply(addr: &str, rcpt: &str) -> String {
    let mut c = Raw::ehlo(addr);
    c.cmd(&format!("MAIL FROM:<{SENDER}>"));
    c.cmd(&format!("RCPT TO:<{rcpt}>"))
}

/// A /24 of loopback (`127.a.b.0`) where `port` is free on `.1` to `.hosts`,
/// for peers that must sit on a fixed port (MX hosts on 25). Each test gets
/// its own block, so tests running at once never meet on one address.
pub fn loopback_block(port: u16, hosts: u8) -> [u8; 2] {
    let seed = std::process::id() as usize * 7919 + COUNTER.fetch_add(1, Ordering::Relaxed) * 104_729;
    for i in 0..1000 {
        let n = seed + i * 6_700_417;
        // 127.100.0.0 to 127.199.255.255: clear of 127.0.0.x that other tests use.
        let block = [100 + (n % 100) as u8, ((n / 100) % 250 + 1) as u8];
        let free =
            (1..=hosts).all(|h| TcpListener::bind((std::net::Ipv4Addr::new(127, block[0], block[1], h), port)).is_ok());
        if free {
            return block;
        }
    }
    panic!("no loopback block with port {port} free");
}
