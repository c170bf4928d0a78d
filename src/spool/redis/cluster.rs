//! The queue on a Redis Cluster: which primary holds each shard.
//!
//! Each shard's keys share the hash tag `{qN}`, so a shard is one hash slot
//! and lives on one primary; every command and script of the queue touches
//! one shard, so none crosses slots. A node keeps a connection per primary
//! (the same [`super::Primary`] as for one server) and sends each shard's
//! commands to its primary; pipelines group the shards of one primary.
//!
//! The slot map is read with `CLUSTER NODES` from every known node every
//! [`super::target::SENTINEL_CHECK`]: where views differ (during a
//! failover), the primary with the highest config epoch wins, as in the
//! cluster's own rule. A command sent to a node that no longer holds the
//! slot is refused by that node (`MOVED`, `READONLY`, `CLUSTERDOWN`): a
//! temporary error (451 for a commit), never a write to the wrong node, and
//! the next read of the map moves the shard.

use std::collections::{BTreeSet, HashMap};
use std::sync::Weak;
use std::time::Duration;

use redis::aio::MultiplexedConnection;

use super::Link;
use super::target::{ClusterSeeds, SENTINEL_CHECK};
use crate::metrics::METRICS;

/// Slots of a Redis Cluster.
const SLOTS: u16 = 16384;
/// Longest wait for one node's `CLUSTER NODES` (a dead node must not hold
/// up the others' answers).
const ASK_LIMIT: Duration = Duration::from_secs(1);

/// The hash slot of `key` (CRC16/XMODEM of its hash tag, as Redis computes it).
pub(super) fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = key
        .find('{')
        .and_then(|open| key[open + 1..].find('}').map(|len| (open + 1, len)))
        .filter(|(_, len)| *len > 0)
        .map_or(bytes, |(start, len)| &bytes[start..start + len]);
    crc16::State::<crc16::XMODEM>::calculate(tagged) % SLOTS
}

/// One line of `CLUSTER NODES`, for a primary.
#[derive(Debug, PartialEq)]
struct Serving {
    addr: String,
    epoch: u64,
    slots: Vec<(u16, u16)>,
}

/// The primaries of a `CLUSTER NODES` answer that are not marked failed,
/// with the slots each serves. `asked` replaces an empty address (a node
/// that does not know its own).
fn primaries(text: &str, asked: &str) -> Vec<Serving> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            continue;
        }
        let flags: Vec<&str> = fields[2].split(',').collect();
        if !flags.contains(&"master") || flags.iter().any(|f| matches!(*f, "fail" | "handshake" | "noaddr")) {
            continue;
        }
        // ip:port@cport[,hostname]
        let addr = fields[1].split(['@', ',']).next().unwrap_or_default();
        let addr = if addr.starts_with(':') || addr.is_empty() { asked.to_string() } else { addr.to_string() };
        let Ok(epoch) = fields[6].parse() else { continue };
        let slots = fields[8..]
            .iter()
            .filter(|s| !s.starts_with('[')) // slots being migrated
            .filter_map(|s| match s.split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => s.parse().ok().map(|n| (n, n)),
            })
            .collect();
        out.push(Serving { addr, epoch, slots });
    }
    out
}

/// For each slot of `wanted`, the primary serving it with the highest
/// config epoch in any of `views`; `None` where no view names one.
fn owners(views: &[Vec<Serving>], wanted: &[u16]) -> Vec<Option<String>> {
    wanted
        .iter()
        .map(|slot| {
            views
                .iter()
                .flatten()
                .filter(|p| p.slots.iter().any(|(a, b)| a <= slot && slot <= b))
                .max_by_key(|p| p.epoch)
                .map(|p| p.addr.clone())
        })
        .collect()
}

/// Reads the slot map at once and then every [`SENTINEL_CHECK`], and moves
/// each shard to the primary that holds its slot. Ends with the spool.
pub(super) fn watch(link: Weak<Link>, seeds: ClusterSeeds, shard_slots: Vec<u16>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::error!("queue: the cluster {} cannot be watched outside the runtime", seeds.seeds.join(","));
        return;
    };
    runtime.spawn(async move {
        let mut known: BTreeSet<String> = seeds.seeds.iter().cloned().collect();
        let mut conns: HashMap<String, MultiplexedConnection> = HashMap::new();
        let mut failing = false;
        loop {
            let Some(timeout) = link.upgrade().map(|l| l.config.timeout) else { return };
            let views = ask_all(&seeds, &known, &mut conns, timeout.min(ASK_LIMIT)).await;
            if !views.is_empty() {
                // The seeds and the primaries named now: a node removed
                // from the cluster is no longer asked.
                known = seeds.seeds.iter().cloned().chain(views.iter().flatten().map(|p| p.addr.clone())).collect();
                conns.retain(|addr, _| known.contains(addr));
            }
            let found = owners(&views, &shard_slots);
            let Some(link) = link.upgrade() else { return };
            if found.iter().any(Option::is_none) {
                if !failing {
                    failing = true;
                    let missing: Vec<usize> = found.iter().enumerate().filter(|(_, o)| o.is_none()).map(|(s, _)| s).collect();
                    tracing::warn!(
                        shards = ?missing,
                        "queue: no node of the cluster {} names a primary for every shard; asking again",
                        seeds.seeds.join(",")
                    );
                }
            } else {
                failing = false;
            }
            let routes: Vec<Option<(String, redis::Client)>> = found
                .into_iter()
                .map(|o| o.and_then(|addr| seeds.client(&addr).ok().map(|c| (addr, c))))
                .collect();
            match link.follow_shards(routes) {
                Ok(moves) => {
                    for m in moves {
                        match &m.from {
                            None => tracing::info!(primary = %m.to, shards = ?m.shards, "queue: cluster primary holds shards"),
                            Some(before) => {
                                METRICS.queue_primary_changes.inc();
                                tracing::warn!(before = %before, primary = %m.to, shards = ?m.shards, "queue: shards moved to another cluster primary (failover or resharding); writing to the new one");
                            }
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, "queue: cannot use a primary the cluster named"),
            }
            drop(link);
            tokio::time::sleep(SENTINEL_CHECK).await;
        }
    });
}

/// `CLUSTER NODES` from every known node at once; a node that does not
/// answer within `limit` loses its connection and is asked again next time.
async fn ask_all(
    seeds: &ClusterSeeds,
    known: &BTreeSet<String>,
    conns: &mut HashMap<String, MultiplexedConnection>,
    limit: Duration,
) -> Vec<Vec<Serving>> {
    let mut asking = tokio::task::JoinSet::new();
    for addr in known {
        let addr = addr.clone();
        let conn = conns.remove(&addr);
        let client = seeds.client(&addr).ok();
        asking.spawn(async move {
            let asked = tokio::time::timeout(limit, async {
                let mut conn = match conn {
                    Some(c) => c,
                    None => {
                        client.ok_or("no client")?.get_multiplexed_async_connection().await.map_err(|_| "connect")?
                    }
                };
                let text: String =
                    redis::cmd("CLUSTER").arg("NODES").query_async(&mut conn).await.map_err(|_| "CLUSTER NODES")?;
                Ok::<_, &str>((conn, text))
            })
            .await;
            (addr, asked.ok().and_then(Result::ok))
        });
    }
    let mut views = Vec::new();
    while let Some(joined) = asking.join_next().await {
        let Ok((addr, Some((conn, text)))) = joined else { continue };
        views.push(primaries(&text, &addr));
        conns.insert(addr, conn);
    }
    views
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_hash_tag_as_redis_computes_them() {
        // Values from CLUSTER KEYSLOT.
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("mxq:{q0}:ready"), slot("q0"));
        assert_eq!(slot("123456789"), 12739);
        assert_eq!(slot("a{}b"), slot("a{}b"), "an empty tag hashes the whole key");
    }

    const NODES: &str = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 master - 0 1426238318243 3 connected 10923-16383
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca :30001@31001 myself,master - 0 0 1 connected 0-5460 [5461->-67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1]
aaaa 127.0.0.1:30009@31009,host9 master,fail - 0 0 9 connected 100
";

    #[test]
    fn cluster_nodes_gives_the_live_primaries_and_their_slots() {
        let p = primaries(NODES, "127.0.0.1:30001");
        assert_eq!(p.len(), 3, "the replica and the failed primary are left out: {p:?}");
        assert_eq!(p[2], Serving { addr: "127.0.0.1:30001".into(), epoch: 1, slots: vec![(0, 5460)] });
        assert_eq!(p[0].slots, vec![(5461, 10922)]);
    }

    #[test]
    fn the_highest_config_epoch_wins_where_views_differ() {
        let stale = primaries(NODES, "127.0.0.1:30001");
        let promoted = primaries(
            "bbbb 127.0.0.1:30004@31004 myself,master - 0 0 7 connected 0-5460\n\
             cccc 127.0.0.1:30002@31002 master - 0 0 2 connected 5461-10922\n",
            "127.0.0.1:30004",
        );
        let got = owners(&[stale, promoted], &[0, 100, 6000, 16383]);
        assert_eq!(
            got,
            [Some("127.0.0.1:30004"), Some("127.0.0.1:30004"), Some("127.0.0.1:30002"), Some("127.0.0.1:30003")]
                .map(|o| o.map(String::from))
        );
        assert_eq!(owners(&[], &[5]), [None]);
    }
}
