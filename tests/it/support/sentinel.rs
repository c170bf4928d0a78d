//! `Sentinels`: real `redis-sentinel` processes (Debian's) on loopback
//! watching one primary as [`MASTER`], quick to act (a primary is down
//! after 1 s without an answer, a quorum of 2), for the failover tests.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::*;

/// The name the Sentinels know the primary by.
pub const MASTER: &str = "mxq";

pub struct Sentinels {
    ports: Vec<u16>,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
    secured: Option<Secured>,
}

/// Sentinels as operators secure them: TLS only (to clients, to each
/// other and to the data servers), their own password, and the data
/// servers' ACL user.
pub struct Secured {
    /// The CA, certificate and key of [`super::pki::TestPki`], PEM paths.
    pub ca: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    /// The Sentinels' `requirepass`.
    pub password: String,
    /// The ACL user and password the Sentinels log in to the data servers with.
    pub data_user: (String, String),
}

impl Secured {
    fn conf(&self, port: u16) -> String {
        let (user, pass) = &self.data_user;
        format!(
            "port 0\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
             tls-auth-clients optional\ntls-replication yes\nrequirepass {}\nsentinel sentinel-pass {}\n",
            self.cert.display(),
            self.key.display(),
            self.ca.display(),
            self.password,
            self.password,
        ) + &format!("sentinel auth-user {MASTER} {user}\nsentinel auth-pass {MASTER} {pass}\n")
    }
}

impl Sentinels {
    /// `count` Sentinels watching the primary on `primary_port`; returns
    /// once each knows the primary's `replicas` replicas and the other
    /// Sentinels (what a failover needs).
    pub fn start(primary_port: u16, count: usize, replicas: usize) -> Sentinels {
        Self::start_with(primary_port, &vec![None; count], replicas, None)
    }

    /// As [`Sentinels::start`], one Sentinel on each of `ports`.
    pub fn start_on(primary_port: u16, ports: &[u16], replicas: usize) -> Sentinels {
        Self::start_with(primary_port, &ports.iter().copied().map(Some).collect::<Vec<_>>(), replicas, None)
    }

    /// As [`Sentinels::start_on`], secured as `secured` says (the
    /// primary's `primary_port` being its TLS port); a `None` port is a
    /// free one, picked again when another test takes it first.
    pub fn start_with(
        primary_port: u16,
        ports: &[Option<u16>],
        replicas: usize,
        secured: Option<Secured>,
    ) -> Sentinels {
        let count = ports.len();
        let dir = tempfile::tempdir().unwrap();
        let mut s = Sentinels { ports: Vec::new(), children: Vec::new(), _dir: dir, secured };
        for (i, port) in ports.iter().copied().enumerate() {
            let spawn = |port: u16| s.spawn(i, port, primary_port).map(|child| (child, port));
            let (child, port) = match port {
                Some(port) => spawn(port).unwrap_or_else(|log| panic!("redis-sentinel did not start:\n{log}")),
                None => start_on_free_port("redis-sentinel", spawn),
            };
            s.children.push(child);
            s.ports.push(port);
        }
        wait_until("every Sentinel knows the replicas and the other Sentinels", Duration::from_secs(30), || {
            s.ports.iter().all(|p| {
                let known = |what: &str| s.ask(*p, &["SENTINEL", what, MASTER]).map(|v| v.len());
                known("replicas") == Some(replicas) && known("sentinels") == Some(count - 1)
            })
        });
        s
    }

    /// Sentinel `i` on `port`, once it listens there itself; its log when
    /// it exits first (the port taken, say).
    fn spawn(&self, i: usize, port: u16, primary_port: u16) -> Result<Child, String> {
        let conf = self._dir.path().join(format!("sentinel-{i}.conf"));
        let log = self._dir.path().join(format!("sentinel-{i}.log"));
        let _ = std::fs::remove_file(&log);
        let security = self.secured.as_ref().map(|t| t.conf(port)).unwrap_or_else(|| format!("port {port}\n"));
        std::fs::write(
            &conf,
            security
                + &format!(
                    "bind 127.0.0.1\ndaemonize no\ndir {}\nlogfile sentinel-{i}.log\n\
                     sentinel monitor {MASTER} 127.0.0.1 {primary_port} 2\n\
                     sentinel down-after-milliseconds {MASTER} 1000\n\
                     sentinel failover-timeout {MASTER} 5000\n\
                     sentinel parallel-syncs {MASTER} 2\n",
                    self._dir.path().display()
                ),
        )
        .unwrap();
        let mut child = Command::new("redis-sentinel")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-sentinel (scripts/test.sh installs it)");
        let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
        match wait_listening("redis-sentinel", &mut child, port, Duration::from_secs(10), read_log) {
            Ok(()) => Ok(child),
            Err(e) => {
                let _ = child.wait();
                Err(e)
            }
        }
    }

    fn ask(&self, port: u16, args: &[&str]) -> Option<Vec<redis::Value>> {
        let mut conn = self.client(port).get_connection_with_timeout(Duration::from_secs(2)).ok()?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut conn).ok()
    }

    /// A client of the Sentinel on `port`.
    fn client(&self, port: u16) -> redis::Client {
        match &self.secured {
            None => redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap(),
            Some(t) => {
                let root_cert = Some(std::fs::read(&t.ca).unwrap());
                let certs = redis::TlsCertificates { client_tls: None, root_cert };
                redis::Client::build_with_tls(format!("rediss://:{}@127.0.0.1:{port}/", t.password), certs).unwrap()
            }
        }
    }

    /// `queue.url` for the nodes (`rediss+sentinel://` when secured).
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let scheme = if self.secured.is_some() { "rediss" } else { "redis" };
        format!("{scheme}+sentinel://{}/{MASTER}", hosts.join(","))
    }

    /// Tells every Sentinel to take a primary for down only after a
    /// minute without an answer: called once a test's one failover has
    /// happened, so that the new primary, busy resyncing the other replica
    /// on a loaded machine, is not failed over again (a second promotion,
    /// of a replica still resyncing, loses what the first new primary had
    /// not replicated, which is another scenario than the one measured).
    pub fn no_more_failovers(&self) {
        for p in &self.ports {
            let mut conn = self.client(*p).get_connection_with_timeout(Duration::from_secs(2)).expect("a Sentinel");
            let set: redis::RedisResult<()> = redis::cmd("SENTINEL")
                .arg("SET")
                .arg(MASTER)
                .arg("down-after-milliseconds")
                .arg(60_000)
                .query(&mut conn);
            set.unwrap_or_else(|e| panic!("SENTINEL SET on {p}: {e}"));
        }
    }

    /// The primary's port as the first Sentinel that answers names it.
    pub fn primary_port(&self) -> Option<u16> {
        self.ports.iter().find_map(|p| {
            let addr = self.ask(*p, &["SENTINEL", "get-master-addr-by-name", MASTER])?;
            redis::from_redis_value::<String>(addr.get(1)?.clone()).ok()?.parse().ok()
        })
    }
}

impl Drop for Sentinels {
    /// Stops them; a failing test gets their logs (which failover each
    /// Sentinel saw, voted for and started).
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            for i in 0..self.children.len() {
                let log = std::fs::read_to_string(self._dir.path().join(format!("sentinel-{i}.log")));
                eprintln!("--- sentinel {i} log ---\n{}", log.unwrap_or_default());
            }
        }
    }
}

/// Replication offset of the server on `port` and of each of its
/// replicas (`INFO replication`), to see that they have caught up.
pub fn replication_offsets(port: u16) -> Option<(u64, Vec<u64>)> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(2)).ok()?;
    let info: String = redis::cmd("INFO").arg("replication").query(&mut conn).ok()?;
    let mut primary = None;
    let mut replicas = Vec::new();
    for line in info.lines() {
        if let Some(v) = line.strip_prefix("master_repl_offset:") {
            primary = v.trim().parse().ok();
        } else if line.starts_with("slave") && line.contains("offset=") {
            let offset = line.split(',').find_map(|kv| kv.strip_prefix("offset="))?;
            replicas.push(offset.parse().ok()?);
        }
    }
    Some((primary?, replicas))
}
