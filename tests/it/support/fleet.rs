//! `Fleet`: the cluster the fault-injection suite (`tests/it/reliability.rs`)
//! breaks. Three nodes on one queue in a private Redis with an AOF fsynced
//! on every write, a fresh MariaDB database listing `friet.pan`, a loopback
//! DNS; load from Postfix's `smtp-source`, and the bookkeeping that turns
//! what the nodes logged and what the destination recorded into figures:
//! accepted (the nodes' `(queue active)` lines, logged after the commit and
//! before the 250), lost, duplicated, truncated, and the time to drain.
//!
//! A delivered copy is identified by the queue id in our `Received:` header
//! and attributed to the node that delivered it by its EHLO name (each node
//! has its own `myhostname`). It is intact when its body is byte for byte
//! what `smtp-source -l N` sends ([`source_body`]); the length is carried in
//! the subject (`-S "reliability l=N"`), so a copy cut short cannot pass.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Output};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::destination::Received;
use super::sink::SinkMessage;
use super::*;

/// Shards of the queue (the product's default, set explicitly: the
/// inspection below reads each shard's stream).
pub const SHARDS: u32 = 4;
/// Small chunks, so the larger messages are written and read in pieces.
pub const CHUNK_SIZE: &str = "4096";
/// Node names; node `i` also says `EHLO <name>.relay.test` when delivering.
pub const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
/// The one recipient of every message.
pub const RCPT: &str = "load@friet.pan";
/// Longest time any Redis inspection of the test may take.
const INSPECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Subject prefix carrying the payload length of a message.
const SUBJECT: &str = "reliability l=";

/// The payload `smtp-source -l len` sends after its headers (CRLF lines, as
/// on the wire): while more than 80 bytes are left, a line of a digit (the
/// line number mod 10) and 77 `X` (80 bytes with its CRLF); then the rest as
/// `X` and a final CRLF. Checked against smtp-source on every run: a model
/// that did not match would make every copy count as truncated.
pub fn source_body(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 2);
    let (mut left, mut line) = (len, 1usize);
    while left > 80 {
        out.push(b'0' + (line % 10) as u8);
        out.extend(std::iter::repeat_n(b'X', 77));
        out.extend_from_slice(b"\r\n");
        left -= 80;
        line += 1;
    }
    out.extend(std::iter::repeat_n(b'X', left));
    out.extend_from_slice(b"\r\n");
    out
}

/// Queue ids a node logged as accepted (logged after the commit, before 250).
pub fn queued_ids(relay: &Relay) -> HashSet<String> {
    relay
        .log()
        .lines()
        .filter(|l| l.contains("(queue active)"))
        .filter_map(|l| l.split(": client=").next()?.rsplit(' ').next().map(str::to_string))
        .collect()
}

/// Queue ids a node answered 451 for after the commit's outcome was unknown
/// (`message not queued: 451`): such a commit may still land.
pub fn refused_ids(relay: &Relay) -> HashSet<String> {
    relay
        .log()
        .lines()
        .filter(|l| l.contains("message not queued: 451"))
        .filter_map(|l| l.split("queue_id=").nth(1)?.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Our queue id from the `Received:` header of a delivered message.
pub fn delivered_id(content: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(content);
    let after = text.split("(mxrelay node ").nth(1)?.split(" id ").nth(1)?;
    Some(after.split(|c: char| c.is_whitespace() || c == ';').next()?.to_string())
}

/// One copy the destination recorded.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Copy {
    /// Our queue id, if the `Received:` header carries one.
    pub id: Option<String>,
    /// The delivering node's EHLO name.
    pub by: String,
    /// Headers as expected and the body exactly as smtp-source sent it.
    pub intact: bool,
}

impl Copy {
    /// From smtp-sink, which drops every CR byte.
    pub fn from_sink(m: &SinkMessage) -> Copy {
        Copy { id: delivered_id(&m.content), by: m.helo.clone(), intact: intact(&m.content, b"\n") }
    }

    /// From the scripted destination, byte for byte as sent.
    pub fn from_destination(m: &Received) -> Copy {
        Copy { id: delivered_id(&m.data), by: m.helo.clone(), intact: intact(&m.data, b"\r\n") }
    }
}

/// Whether `content` (lines ending in `eol`) is our `Received:` header,
/// smtp-source's headers with the subject naming the length, an empty line
/// and exactly the payload of that length.
fn intact(content: &[u8], eol: &[u8]) -> bool {
    let separator = [eol, eol].concat();
    let Some(end) = memchr::memmem::find(content, &separator) else { return false };
    let (head, body) = (&content[..end], &content[end + separator.len()..]);
    let head = String::from_utf8_lossy(head);
    let len = head.lines().find_map(|l| l.strip_prefix("Subject: ")?.strip_prefix(SUBJECT)?.trim().parse().ok());
    let Some(len) = len else { return false };
    let expected = if eol == b"\n" { SinkMessage::as_dumped(&source_body(len)) } else { source_body(len) };
    head.starts_with("Received: from ") && delivered_id(content).is_some() && body == expected.as_slice()
}

/// The figures of one scenario.
#[derive(Debug, Default)]
pub struct Tally {
    pub accepted: usize,
    /// Accepted and never delivered.
    pub lost: Vec<String>,
    /// Copies beyond the first, over all ids.
    pub duplicated: usize,
    pub duplicated_ids: HashSet<String>,
    /// Copies that are not intact.
    pub truncated: usize,
    /// Delivered ids no node logged as accepted: commits whose client got a
    /// 451 (or no answer) but which landed all the same.
    pub unacknowledged: usize,
    /// Of those, the ones a node logged a 451 for.
    pub refused_then_delivered: usize,
    pub copies: usize,
}

pub fn tally(accepted: &HashSet<String>, refused: &HashSet<String>, copies: &[Copy]) -> Tally {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for c in copies {
        if let Some(id) = &c.id {
            *counts.entry(id.as_str()).or_default() += 1;
        }
    }
    let mut lost: Vec<String> = accepted.iter().filter(|id| !counts.contains_key(id.as_str())).cloned().collect();
    lost.sort();
    Tally {
        accepted: accepted.len(),
        lost,
        duplicated: counts.values().map(|n| n - 1).sum(),
        duplicated_ids: counts.iter().filter(|(_, n)| **n > 1).map(|(id, _)| id.to_string()).collect(),
        truncated: copies.iter().filter(|c| !c.intact).count(),
        unacknowledged: counts.keys().filter(|id| !accepted.contains(**id)).count(),
        refused_then_delivered: counts.keys().filter(|id| !accepted.contains(**id) && refused.contains(**id)).count(),
        copies: copies.len(),
    }
}

/// Prints the scenario's summary line (and appends it to the file named by
/// `RELIABILITY_REPORT`, for collecting many runs).
pub fn report(scenario: &str, t: &Tally, drain: Duration, extra: &str) {
    let line = format!(
        "reliability {scenario}: accepted={} lost={} duplicated={} truncated={} unacknowledged={} (451 then delivered: {}) copies={} drain={:.1}s {extra}",
        t.accepted,
        t.lost.len(),
        t.duplicated,
        t.truncated,
        t.unacknowledged,
        t.refused_then_delivered,
        t.copies,
        drain.as_secs_f64()
    );
    report_line(&line);
}

/// Prints `line` and appends it to the file named by `RELIABILITY_REPORT`.
pub fn report_line(line: &str) {
    eprintln!("{line}");
    if let Ok(path) = std::env::var("RELIABILITY_REPORT") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// One smtp-source run: `sessions` in parallel, `messages` in all, payload
/// `len` bytes. `-A`: a 4xx (the node cannot reach Redis) does not stop the
/// run; a refused or cut connection (the node is gone) does.
pub fn inject(addr: &str, sessions: u32, messages: u32, len: usize) -> JoinHandle<Output> {
    inject_to(addr, sessions, messages, len, RCPT)
}

/// [`inject`] with one recipient `rcpt` of the test's choosing.
pub fn inject_to(addr: &str, sessions: u32, messages: u32, len: usize, rcpt: &str) -> JoinHandle<Output> {
    let (addr, rcpt) = (addr.to_string(), rcpt.to_string());
    std::thread::spawn(move || {
        Command::new("/usr/sbin/smtp-source")
            .args(["-A", "-s", &sessions.to_string(), "-m", &messages.to_string(), "-l", &len.to_string()])
            .args(["-S", &format!("{SUBJECT}{len}"), "-M", "client.example", "-f", SENDER, "-t", &rcpt])
            .arg(addr)
            .output()
            .expect("smtp-source (scripts/test.sh installs postfix)")
    })
}

/// Waits for every injector.
pub fn finish(injectors: Vec<JoinHandle<Output>>) {
    for i in injectors {
        let _ = i.join();
    }
}

/// True once process `pid` has exited (a zombie until its parent waits).
pub fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()) == Some("Z"),
        Err(_) => true,
    }
}

/// The cluster: DNS, database, private Redis with AOF, three nodes.
pub struct Fleet {
    pub dns: Dns,
    pub db: TestDb,
    pub redis: RedisServer,
    /// Redis's data directory (given with `--dir`), so a test can empty it.
    redis_dir: tempfile::TempDir,
    pub nodes: Vec<Relay>,
    pub prefix: String,
    /// The Redis servers the test inspects when the queue is no longer on
    /// [`Fleet::redis`]: a replica promoted by Sentinel, or the primaries of
    /// a Redis Cluster (each shard is read where it is).
    pub inspect: Vec<String>,
}

impl Fleet {
    /// Everything but the nodes; `friet.pan` is relayed to 127.0.0.1:`dest_port`.
    pub fn prepare(dest_port: u16) -> Fleet {
        // named.example resolves too, for a test that lists it (the relay
        // answers 450 for a recipient domain without DNS).
        let dns = Dns::start(&["sender.example", "client.example"], &[LISTED, "named.example"]);
        let db = TestDb::create(&MysqlServer::shared());
        db.exec(include_str!("../../../migrations/mysql/0001_domains.sql"));
        db.add_domain(LISTED, "127.0.0.1", dest_port);
        let redis_dir = tempfile::tempdir().expect("redis data directory");
        let dir = redis_dir.path().to_str().expect("utf-8 temp path").to_string();
        let redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always", "--dir", &dir]);
        Fleet { dns, db, redis, redis_dir, nodes: Vec::new(), prefix: unique("mxrq"), inspect: Vec::new() }
    }

    pub fn redis_addr(&self) -> String {
        format!("127.0.0.1:{}", self.redis.port)
    }

    /// Starts the three nodes: delivery on, `queue.lease` 3 s, retries
    /// after 1-2 s, then `env` (later keys win); `queue_url(i)` may point a
    /// node elsewhere than the Redis itself (a proxy).
    pub fn spawn_nodes(&mut self, env: &[(&str, &str)], queue_url: impl Fn(usize) -> Option<String>) {
        let config = base_config(&self.db.url(), &self.redis.url(), &self.dns);
        let shards = SHARDS.to_string();
        for (i, name) in NODES.iter().enumerate() {
            let hostname = format!("{name}.relay.test");
            let url = queue_url(i);
            let mut vars: Vec<(&str, &str)> = vec![
                ("MXRELAY_DELIVERY_ENABLED", "true"),
                ("MXRELAY_NODE_ID", name),
                ("MXRELAY_MYHOSTNAME", &hostname),
                ("MXRELAY_QUEUE_SHARDS", &shards),
                ("MXRELAY_QUEUE_CHUNK_SIZE", CHUNK_SIZE),
                ("MXRELAY_QUEUE_LEASE", "3s"),
                ("MXRELAY_DELIVERY_RETRY_MIN", "1s"),
                ("MXRELAY_DELIVERY_RETRY_MAX", "2s"),
            ];
            if let Some(url) = &url {
                vars.push(("MXRELAY_QUEUE_URL", url));
            }
            vars.extend_from_slice(env);
            self.nodes.push(Relay::spawn_in_queue(&config, &vars, &self.prefix));
        }
    }

    /// The EHLO name node `i` delivers with.
    pub fn hostname(i: usize) -> String {
        format!("{}.relay.test", NODES[i])
    }

    /// Starts `mix` (sessions, messages, payload length) against each of `nodes`.
    pub fn inject(&self, nodes: &[usize], mix: &[(u32, u32, usize)]) -> Vec<JoinHandle<Output>> {
        nodes.iter().flat_map(|i| mix.iter().map(move |(s, m, l)| inject(&self.nodes[*i].addr(), *s, *m, *l))).collect()
    }

    /// Every queue id any node logged as accepted, restarts included.
    pub fn accepted(&self) -> HashSet<String> {
        self.nodes.iter().flat_map(queued_ids).collect()
    }

    /// Every queue id any node answered 451 with an unknown outcome.
    pub fn refused(&self) -> HashSet<String> {
        self.nodes.iter().flat_map(refused_ids).collect()
    }

    /// Sum of one metric sample over `nodes` (which must be running).
    pub fn metric(&self, nodes: &[usize], sample: &str) -> f64 {
        nodes.iter().map(|i| self.nodes[*i].value(sample)).sum()
    }

    /// A connection to each server the queue is on.
    fn connections(&self) -> Option<Vec<redis::Connection>> {
        let urls = if self.inspect.is_empty() { vec![self.redis.url()] } else { self.inspect.clone() };
        urls.iter()
            .map(|url| {
                let client = redis::Client::open(url.as_str()).ok()?;
                let conn = client.get_connection_with_timeout(INSPECT_TIMEOUT).ok()?;
                conn.set_read_timeout(Some(INSPECT_TIMEOUT)).ok()?;
                conn.set_write_timeout(Some(INSPECT_TIMEOUT)).ok()?;
                Some(conn)
            })
            .collect()
    }

    fn connection(&self) -> Option<redis::Connection> {
        self.connections()?.into_iter().next()
    }

    fn ready_key(&self, shard: u32) -> String {
        format!("{}:{{q{shard}}}:ready", self.prefix)
    }

    /// Queue ids leased now (pending in group `delivery`), to `consumer` or
    /// to anyone; `None` when Redis does not answer.
    pub fn pending(&self, consumer: Option<&str>) -> Option<HashSet<String>> {
        let mut ids = HashSet::new();
        for mut conn in self.connections()? {
            for shard in 0..SHARDS {
                let key = self.ready_key(shard);
                let mut cmd = redis::cmd("XPENDING");
                cmd.arg(&key).arg("delivery").arg("-").arg("+").arg(100_000);
                if let Some(c) = consumer {
                    cmd.arg(c);
                }
                // A stream or group that does not exist (yet) holds no
                // lease; a cluster node that does not hold the shard says
                // where it is.
                let entries: Vec<(String, String, u64, u64)> = match cmd.query(&mut conn) {
                    Ok(e) => e,
                    Err(e) if matches!(e.code(), Some("NOGROUP" | "MOVED")) => continue,
                    Err(_) => return None,
                };
                if entries.is_empty() {
                    continue;
                }
                let mut pipe = redis::pipe();
                for (entry, ..) in &entries {
                    pipe.cmd("XRANGE").arg(&key).arg(entry).arg(entry);
                }
                let ranges: Vec<redis::streams::StreamRangeReply> = pipe.query(&mut conn).ok()?;
                for range in ranges {
                    ids.extend(range.ids.iter().filter_map(|e| e.get::<String>("id")));
                }
            }
        }
        Some(ids)
    }

    /// The entries leased to `consumer`, as (shard, stream entry, queue id).
    pub fn pending_entries(&self, consumer: &str) -> Vec<(u32, String, String)> {
        let Some(mut conn) = self.connection() else { return Vec::new() };
        let mut out = Vec::new();
        for shard in 0..SHARDS {
            let key = self.ready_key(shard);
            let entries: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
                .arg(&key)
                .arg("delivery")
                .arg("-")
                .arg("+")
                .arg(100_000)
                .arg(consumer)
                .query(&mut conn)
                .unwrap_or_default();
            for (entry, ..) in entries {
                let range: redis::streams::StreamRangeReply =
                    redis::cmd("XRANGE").arg(&key).arg(&entry).arg(&entry).query(&mut conn).unwrap_or_default();
                let id = range.ids.first().and_then(|e| e.get::<String>("id")).unwrap_or_default();
                out.push((shard, entry, id));
            }
        }
        out
    }

    /// Committed messages (envelopes) in the queue; `None` when Redis does
    /// not answer. Not counted: a replicated commit's first phase whose
    /// client was told 451 (left by a primary that died before withdrawing
    /// it, swept by the nodes' housekeeping).
    pub fn queued(&self) -> Option<usize> {
        let mut queued = 0;
        for mut conn in self.connections()? {
            let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{}:*:msg:*", self.prefix)).query(&mut conn).ok()?;
            if keys.is_empty() {
                continue;
            }
            // Keys a cluster node lists are its own, so one pipeline serves.
            let mut pipe = redis::pipe();
            for k in &keys {
                pipe.hget(k, "staged");
            }
            let staged: Vec<Option<String>> = pipe.query(&mut conn).ok()?;
            queued += staged.iter().filter(|s| s.as_deref() != Some("1")).count();
        }
        Some(queued)
    }

    /// Makes Redis refuse every write until the guard is dropped (CLIENT
    /// PAUSE WRITE: no lease, renewal, ack or commit can happen, scripts
    /// included), so what the test reads meanwhile is the queue at the
    /// instant of the fault it injects under the pause.
    pub fn pause(&self) -> Pause {
        let mut conn = self.connection().expect("redis for CLIENT PAUSE");
        let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(10_000).arg("WRITE").query(&mut conn).expect("CLIENT PAUSE");
        Pause { conn }
    }

    /// SIGKILLs Redis and restarts it with an empty data directory: the
    /// AOF (and with it the whole queue) is gone.
    pub fn restart_redis_empty(&mut self) {
        self.redis.stop();
        empty_dir(self.redis_dir.path());
        self.redis.resume();
    }

    /// Waits until the queue is empty and no live node has a delivery
    /// attempt open; returns when, or `None` at `deadline`.
    pub fn drained(&self, live: &[usize], deadline: Instant) -> Option<Instant> {
        while Instant::now() < deadline {
            let empty = self.queued() == Some(0);
            if empty
                && live.iter().all(|i| self.nodes[*i].value("mxrelay_delivery_destination_connections") == 0.0)
                && self.queued() == Some(0)
            {
                return Some(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

/// Writes refused until dropped (see [`Fleet::pause`]).
pub struct Pause {
    conn: redis::Connection,
}

impl Drop for Pause {
    fn drop(&mut self) {
        // Fails harmlessly when Redis was killed under the pause.
        let _: redis::RedisResult<()> = redis::cmd("CLIENT").arg("UNPAUSE").query(&mut self.conn);
    }
}

fn empty_dir(dir: &Path) {
    for entry in std::fs::read_dir(dir).expect("redis data directory").flatten() {
        let path = entry.path();
        let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
    }
}
