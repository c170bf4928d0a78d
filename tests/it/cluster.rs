//! Several nodes on one queue, with real failures: a node killed with
//! SIGKILL while it holds leases, a destination down at first, Redis
//! killed and restarted from its AOF while a client sends. Every message a
//! node accepted arrives intact; the only duplicates are the killed node's
//! deliveries in flight; every reply during the outage is a 4xx.
//! (The fault-injection suite, tests/it/reliability.rs, measures the same
//! faults under heavier load; these are the cluster's own promises.)

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::support::destination::Destination;
use crate::support::fleet::*;
use crate::support::sink::SmtpSink;
use crate::support::*;

/// Longest wait for a precondition, and for the queue to drain.
const OBSERVE: Duration = Duration::from_secs(30);
const DRAIN: Duration = Duration::from_secs(60);
const DOWN_RCPT: &str = "load@named.example";

#[test]
fn three_nodes_one_killed_while_delivering_destination_down_at_first_nothing_lost() {
    // Records each message at once and answers 250 after 1 s: deliveries
    // stay in flight, so the node killed below holds leases when it dies.
    let up = Destination::start();
    up.set_final_reply_delay(Duration::from_secs(1));
    let down_port = DownPort::new();
    let mut fleet = Fleet::prepare(up.port);
    fleet.db.add_domain("named.example", "127.0.0.1", down_port.port);
    fleet.spawn_nodes(&[], |_| None);
    let load: Vec<_> = fleet
        .nodes
        .iter()
        .flat_map(|n| [inject_to(&n.addr(), 4, 600, 1024, RCPT), inject_to(&n.addr(), 2, 200, 1024, DOWN_RCPT)])
        .collect();
    wait_until("node-b delivering", OBSERVE, || fleet.pending(Some("node-b")).is_some_and(|p| p.len() >= 3));
    fleet.nodes[1].kill(); // SIGKILL
    // Exact: nobody may claim a dead node's entries within queue.lease.
    let in_flight = fleet.pending(Some("node-b")).expect("redis");
    wait_until("node-b's leases taken over", OBSERVE, || fleet.pending(Some("node-b")).is_some_and(|p| p.is_empty()));
    up.set_final_reply_delay(Duration::ZERO);
    finish(load);
    // node-a's and node-c's injectors ran to the end: 2 × (600 + 200).
    let accepted = fleet.accepted();
    assert!(accepted.len() >= 1600, "only {} accepted", accepted.len());
    // The destination that was down comes up.
    let down = Destination::start_on(down_port.release());
    let recovered = Instant::now();
    let drained = fleet.drained(&[0, 2], recovered + DRAIN).expect("queue drained");
    let copies: Vec<Copy> = up.messages().iter().chain(&down.messages()).map(Copy::from_destination).collect();
    let t = tally(&accepted, &fleet.refused(), &copies);
    let takeovers = fleet.metric(&[0, 2], "mxrelay_queue_lease_takeovers_total");
    report(
        "cluster_node_killed",
        &t,
        drained - recovered,
        &format!("in_flight={} takeovers={takeovers}", in_flight.len()),
    );
    assert!(t.lost.is_empty(), "{} accepted messages never delivered: {:?}", t.lost.len(), t.lost);
    assert_eq!(t.truncated, 0, "copies not intact");
    assert!(down.messages().len() >= 400, "{} copies for the destination that was down", down.messages().len());
    assert!(
        takeovers >= in_flight.len() as f64,
        "{} leases of the killed node, {takeovers} taken over",
        in_flight.len()
    );
    assert!(t.duplicated <= in_flight.len(), "{} duplicates, {} in flight at the kill", t.duplicated, in_flight.len());
    let unexplained: Vec<&String> = t.duplicated_ids.iter().filter(|id| !in_flight.contains(*id)).collect();
    assert!(unexplained.is_empty(), "duplicates of messages not in flight at the kill: {unexplained:?}");
}

/// The reply codes in a swaks transcript, in order (`<-` and `<**` lines).
fn reply_codes(transcript: &str) -> Vec<u16> {
    transcript
        .lines()
        .filter_map(|l| l.strip_prefix("<-").or_else(|| l.strip_prefix("<**")))
        .filter_map(|rest| rest.trim_start_matches(['-', '*', ' ']).get(..3)?.parse().ok())
        .collect()
}

#[test]
fn redis_restart_with_aof_loses_no_accepted_message() {
    let sink = SmtpSink::start();
    let dns = Dns::start(&["sender.example"], &[LISTED]);
    let db = TestDb::create(&MysqlServer::shared());
    db.exec(include_str!("../../migrations/mysql/0001_domains.sql"));
    db.add_domain(LISTED, "127.0.0.1", sink.port);
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let relay = Relay::spawn_with_env(
        &base_config(&db.url(), &redis.url(), &dns),
        &[("MXRELAY_DELIVERY_ENABLED", "true"), ("MXRELAY_DELIVERY_RETRY_MIN", "1s")],
    );
    // The sender loop drives the outage: Redis dies after 10 accepted
    // messages and comes back after 3 refused ones; the run ends after 10
    // more accepted. Every reply of every transaction is kept.
    let (mut ids, mut codes, mut refused) = (Vec::new(), Vec::new(), 0);
    let (mut down, mut after) = (false, 0);
    let deadline = Instant::now() + DRAIN;
    for i in 0.. {
        assert!(Instant::now() < deadline, "stuck: {} accepted, {refused} refused, Redis down={down}", ids.len());
        let (_, out) =
            swaks(&relay.addr(), &["--from", SENDER, "--to", &format!("r{i}@friet.pan"), "--helo", "client.example"]);
        codes.extend(reply_codes(&out));
        match queued_id(&out) {
            Some(id) => {
                ids.push(id);
                after += usize::from(refused >= 3);
            }
            None => {
                assert!(out.contains("451 4.3.0"), "not a 451 4.3.0 while Redis is away: {out}");
                refused += 1;
            }
        }
        if ids.len() == 10 && !down && refused == 0 {
            redis.stop();
            down = true;
        } else if down && refused >= 3 {
            redis.resume();
            down = false;
        }
        if after >= 10 {
            break;
        }
    }
    let permanent: Vec<&u16> = codes.iter().filter(|c| **c >= 500).collect();
    assert!(permanent.is_empty(), "5xx replies during a Redis outage: {permanent:?} in {codes:?}");
    let deadline = Instant::now() + DRAIN;
    loop {
        let arrived: HashSet<String> = sink.messages().iter().filter_map(|m| delivered_id(&m.content)).collect();
        let missing: Vec<_> = ids.iter().filter(|id| !arrived.contains(*id)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "accepted but never delivered: {missing:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "redis restart: {} accepted (all delivered), {refused} answered 451 4.3.0 while Redis was down",
        ids.len()
    );
}
