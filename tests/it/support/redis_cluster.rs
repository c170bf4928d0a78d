//! `RedisCluster`: a real Redis Cluster on loopback, made of
//! `redis-server --cluster-enabled yes` processes joined by
//! `redis-cli --cluster create`, with AOF fsynced on every write and a
//! node timeout of 1 s (a dead primary's replica takes over within a few
//! seconds), for the cluster queue tests.

use std::process::Command;
use std::time::Duration;

use super::*;

pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// `primaries` primaries with `replicas` replicas each; returns once
    /// every node sees the cluster as `ok` with every node in it.
    pub fn start(primaries: usize, replicas: usize) -> RedisCluster {
        let total = primaries * (1 + replicas);
        let nodes: Vec<RedisServer> = (0..total)
            .map(|_| {
                // The bus port is picked again with the client port when
                // another test took either.
                RedisServer::start_with_each(|| {
                    let bus = free_port().to_string();
                    let args = ["--cluster-enabled", "yes", "--cluster-node-timeout", "1000", "--cluster-port", &bus];
                    let aof = ["--appendonly", "yes", "--appendfsync", "always"];
                    args.iter().chain(&aof).map(|a| a.to_string()).collect()
                })
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli (scripts/test.sh installs redis-server, which brings it)");
        assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let cluster = RedisCluster { nodes };
        wait_until("every node sees the cluster ok", Duration::from_secs(30), || {
            cluster.nodes.iter().all(|n| {
                let info = ask(n.port, &["CLUSTER", "INFO"]).unwrap_or_default();
                info.contains("cluster_state:ok") && info.contains(&format!("cluster_known_nodes:{total}"))
            })
        });
        wait_until("every replica attached", Duration::from_secs(30), || {
            cluster.primaries().len() == primaries
                && cluster
                    .primaries()
                    .iter()
                    .all(|p| super::sentinel::replication_offsets(*p).is_some_and(|(_, r)| r.len() == replicas))
        });
        cluster
    }

    /// `queue.url` for the nodes (every node a seed).
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// Ports of the primaries serving slots, as the first live node sees them.
    pub fn primaries(&self) -> Vec<u16> {
        let Some(text) = self.nodes.iter().find_map(|n| ask(n.port, &["CLUSTER", "NODES"])) else { return Vec::new() };
        let mut ports: Vec<u16> = text
            .lines()
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 8 && f[2].contains("master") && !f[2].contains("fail")
            })
            .filter_map(|l| l.split_whitespace().nth(1)?.split(['@', ',']).next()?.rsplit(':').next()?.parse().ok())
            .collect();
        ports.sort();
        ports
    }

    /// The port of the primary that serves `key`'s slot.
    pub fn owner(&self, key: &str) -> Option<u16> {
        let slot: i64 = self.nodes.iter().find_map(|n| {
            let mut conn = connect(n.port)?;
            redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query(&mut conn).ok()
        })?;
        let text = self.nodes.iter().find_map(|n| ask(n.port, &["CLUSTER", "NODES"]))?;
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                return None;
            }
            let serves = f[8..].iter().any(|r| match r.split_once('-') {
                Some((a, b)) => a.parse::<i64>().is_ok_and(|a| a <= slot) && b.parse::<i64>().is_ok_and(|b| slot <= b),
                None => r.parse::<i64>() == Ok(slot),
            });
            serves.then(|| f[1].split(['@', ',']).next()?.rsplit(':').next()?.parse().ok()).flatten()
        })
    }

    /// The node on `port`.
    pub fn node(&mut self, port: u16) -> &mut RedisServer {
        self.nodes.iter_mut().find(|n| n.port == port).expect("a node of the cluster")
    }
}

fn connect(port: u16) -> Option<redis::Connection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
    let conn = client.get_connection_with_timeout(Duration::from_secs(2)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    Some(conn)
}

/// A command's text answer from the node on `port`.
fn ask(port: u16, args: &[&str]) -> Option<String> {
    let mut conn = connect(port)?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut conn).ok()
}
