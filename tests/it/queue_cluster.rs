//! The queue on a real Redis Cluster (3 primaries, 3 replicas, see
//! [`RedisCluster`]): three nodes spread their shards over the primaries
//! and deliver everything; the admin commands give one cluster-wide
//! answer; a primary killed under load is replaced by its replica and
//! nothing acknowledged is lost.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::support::destination::Destination;
use crate::support::fleet::*;
use crate::support::redis_cluster::RedisCluster;
use crate::support::sink::SmtpSink;
use crate::support::*;

const OBSERVE: Duration = Duration::from_secs(30);
const DRAIN: Duration = Duration::from_secs(60);
const ALL: [usize; 3] = [0, 1, 2];
const PRIMARY_CHANGES: &str = "mxrelay_queue_primary_changes_total";

/// `fleet` inspects the cluster's primaries (each shard where it is).
fn inspect_primaries(fleet: &mut Fleet, cluster: &RedisCluster) {
    fleet.inspect = cluster.primaries().iter().map(|p| format!("redis://127.0.0.1:{p}/")).collect();
}

fn wait_ready(fleet: &Fleet, what: &str) {
    wait_until(what, OBSERVE, || ALL.iter().all(|i| fleet.nodes[*i].http_get("/readyz").starts_with("HTTP/1.1 200")));
}

fn ready_key(fleet: &Fleet, shard: u32) -> String {
    format!("{}:{{q{shard}}}:ready", fleet.prefix)
}

#[test]
fn a_queue_on_a_redis_cluster_spreads_its_shards_over_the_primaries_and_delivers_everything() {
    let cluster = RedisCluster::start(3, 1);
    let sink = SmtpSink::start();
    let mut fleet = Fleet::prepare(sink.port);
    inspect_primaries(&mut fleet, &cluster);
    let url = cluster.url();
    fleet.spawn_nodes(&[], |_| Some(url.clone()));
    wait_ready(&fleet, "every node ready on the cluster");
    let started = Instant::now();
    finish(fleet.inject(&ALL, &[(4, 600, 1000), (2, 100, 10_000)]));
    let drained = fleet.drained(&ALL, Instant::now() + DRAIN);
    let copies: Vec<Copy> = sink.messages().iter().map(Copy::from_sink).collect();
    let t = tally(&fleet.accepted(), &fleet.refused(), &copies);
    report("redis_cluster_no_fault", &t, started.elapsed(), "");
    assert!(drained.is_some(), "queue not empty {DRAIN:?} after the load");
    assert_eq!((t.accepted, t.lost.len(), t.duplicated, t.truncated), (2100, 0, 0, 0), "{t:?}");
    // Each shard lives on the primary that serves its slot, and the shards
    // are on more than one primary.
    let mut owners = HashSet::new();
    for shard in 0..SHARDS {
        let key = ready_key(&fleet, shard);
        let owner = cluster.owner(&key).expect("a primary serves every slot");
        let client = redis::Client::open(format!("redis://127.0.0.1:{owner}/")).unwrap();
        let exists: bool = redis::cmd("EXISTS").arg(&key).query(&mut client.get_connection().unwrap()).unwrap();
        assert!(exists, "{key} is not on {owner}, the primary of its slot");
        owners.insert(owner);
    }
    assert!(owners.len() >= 2, "every shard on one primary: {owners:?}");
    for node in &fleet.nodes {
        assert!(node.log().contains("queue: cluster primary holds shards"), "{}", node.log());
    }
}

#[test]
fn queue_commands_on_a_redis_cluster_answer_for_every_primary() {
    let cluster = RedisCluster::start(3, 1);
    let down = DownPort::new();
    let sink = SmtpSink::start();
    let mut fleet = Fleet::prepare(sink.port);
    fleet.db.add_domain("named.example", "127.0.0.1", down.port);
    inspect_primaries(&mut fleet, &cluster);
    let url = cluster.url();
    fleet.spawn_nodes(&[("MXRELAY_DELIVERY_RETRY_MIN", "1h"), ("MXRELAY_DELIVERY_RETRY_MAX", "1h")], |_| {
        Some(url.clone())
    });
    wait_ready(&fleet, "every node ready on the cluster");
    finish(ALL.iter().map(|i| inject_to(&fleet.nodes[*i].addr(), 2, 8, 500, "x@named.example")).collect());
    let node = &fleet.nodes[0];
    let stats = |node: &Relay| node.cli_json(&["queue", "stats"]);
    wait_until("24 messages deferred", OBSERVE, || stats(node)["deferred"] == 24);
    let s = stats(node);
    assert_eq!((s["messages"].as_u64(), s["held"].as_u64()), (Some(24), Some(0)), "{s}");
    let by_destination: u64 =
        s["deferred_by_destination"].as_array().unwrap().iter().map(|d| d[1].as_u64().unwrap()).sum();
    assert_eq!(by_destination, 24, "{s}");
    let listed = node.cli_json(&["queue", "list"]);
    let ids: Vec<String> =
        listed.as_array().unwrap().iter().map(|m| m["envelope"]["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids.len(), 24, "{listed}");
    // The messages are on several primaries; commands reach each.
    let holder = |id: &str| {
        (0..SHARDS).find_map(|s| {
            let key = format!("{}:{{q{s}}}:msg:{id}", fleet.prefix);
            let owner = cluster.owner(&key)?;
            let client = redis::Client::open(format!("redis://127.0.0.1:{owner}/")).ok()?;
            let exists: bool = redis::cmd("EXISTS").arg(&key).query(&mut client.get_connection().ok()?).ok()?;
            exists.then_some(owner)
        })
    };
    let places: Vec<u16> = ids.iter().map(|id| holder(id).expect("each message on a primary")).collect();
    let distinct: HashSet<u16> = places.iter().copied().collect();
    assert!(distinct.len() >= 2, "all messages on one primary: {distinct:?}");
    let (on_a, on_b) = {
        let first = places[0];
        let other = places.iter().position(|p| *p != first).unwrap();
        (ids[0].clone(), ids[other].clone())
    };
    for id in [&on_a, &on_b] {
        let (ok, out) = fleet.nodes[1].cli(&["queue", "hold", id]);
        assert!(ok, "{out}");
        let (ok, out) = fleet.nodes[2].cli(&["queue", "show", id]);
        assert!(ok && out.contains("state     held"), "{out}");
    }
    let (ok, out) = node.cli(&["queue", "delete", &ids[ids.len() - 1]]);
    assert!(ok, "{out}");
    let s = stats(node);
    assert_eq!(
        (s["messages"].as_u64(), s["held"].as_u64(), s["deferred"].as_u64()),
        (Some(23), Some(2), Some(21)),
        "{s}"
    );
    // A flush makes every deferred message due on every primary (tried
    // again, deferred again: the destination is still down).
    let (ok, out) = node.cli(&["queue", "flush"]);
    assert!(ok && out.contains("released 21 deferred message(s)"), "{out}");
    // The destination comes up: the nodes' probe (or a flush) sends the
    // deferred ones, a release each held one.
    let up = Destination::start_on(down.release());
    let (ok, out) = node.cli(&["queue", "flush"]);
    assert!(ok, "{out}");
    for id in [&on_a, &on_b] {
        let (ok, out) = node.cli(&["queue", "release", id]);
        assert!(ok, "{out}");
    }
    up.wait_for(23, OBSERVE);
    wait_until("the queue empty", OBSERVE, || stats(node)["messages"] == 0);
    assert_eq!(up.messages().len(), 23, "the deleted message was delivered, or one twice");
}

/// The primary holding shard 0 is killed without warning while the nodes
/// receive and deliver; its replica takes over. With min_replicas_ack=1
/// every message answered 250 was on a replica first, so none is lost;
/// delivery results the dead primary had not replicated come back as
/// deliveries to redo (duplicates, counted, not bounded).
#[test]
fn a_redis_cluster_primary_killed_under_load_fails_over_and_loses_nothing_acknowledged() {
    let mut cluster = RedisCluster::start(3, 1);
    let sink = SmtpSink::start();
    let mut fleet = Fleet::prepare(sink.port);
    inspect_primaries(&mut fleet, &cluster);
    let url = cluster.url();
    fleet.spawn_nodes(&[("MXRELAY_QUEUE_MIN_REPLICAS_ACK", "1")], |_| Some(url.clone()));
    wait_ready(&fleet, "every node ready on the cluster");
    let load = fleet.inject(&ALL, &[(4, 400, 1000), (2, 100, 10_000)]);
    wait_until("mail accepted and in delivery", OBSERVE, || {
        fleet.accepted().len() >= 300 && fleet.pending(None).is_some_and(|p| p.len() >= 5)
    });
    let victim = cluster.owner(&ready_key(&fleet, 0)).expect("shard 0's primary");
    let in_flight = fleet.pending(None).expect("redis");
    cluster.node(victim).stop();
    let killed = Instant::now();
    wait_until("a replica promoted in its place", OBSERVE, || {
        let p = cluster.primaries();
        p.len() == 3 && !p.contains(&victim)
    });
    inspect_primaries(&mut fleet, &cluster);
    wait_until("every node writing to the new primary", OBSERVE, || fleet.metric(&ALL, PRIMARY_CHANGES) >= 3.0);
    wait_ready(&fleet, "every node ready after the failover");
    let recovered = Instant::now();
    finish(load);
    let drained = fleet.drained(&ALL, Instant::now() + DRAIN);
    let copies: Vec<Copy> = sink.messages().iter().map(Copy::from_sink).collect();
    let t = tally(&fleet.accepted(), &fleet.refused(), &copies);
    let extra = format!("in_flight={} failover={:.1}s", in_flight.len(), (recovered - killed).as_secs_f64());
    report("redis_cluster_primary_killed", &t, drained.map_or(DRAIN, |d| d - recovered), &extra);
    assert!(t.lost.is_empty(), "{} accepted messages never delivered: {:?}", t.lost.len(), t.lost);
    assert_eq!(t.truncated, 0, "{t:?}");
    assert!(drained.is_some(), "queue not empty {DRAIN:?} after the failover");
    for node in &fleet.nodes {
        assert!(node.log().contains("shards moved to another cluster primary"), "{}", node.log());
        assert!(!node.log().contains("message not queued: 5"), "a 5xx during the failover: {}", node.log());
    }
}
