//! Fault injection on a 3-node cluster with real parts: a private Redis
//! with an AOF fsynced on every write, MariaDB, Postfix's smtp-source
//! putting thousands of messages in flight, and a destination recording
//! every copy (smtp-sink, or the scripted destination where the test must
//! make it fail). One test per fault; each reports what was accepted (250),
//! lost, duplicated and truncated and the time to drain, and asserts that
//! nothing accepted is lost or truncated and that duplicates come only from
//! deliveries in flight at the fault. Method and figures: docs/RELIABILITY.md.
//!
//! Faults are driven by observed state (leases held, as XPENDING shows
//! them; the nodes noticing an outage; takeovers), never by a sleep.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::support::destination::Destination;
use crate::support::fleet::*;
use crate::support::proxy::Proxy;
use crate::support::sentinel::{Sentinels, replication_offsets};
use crate::support::sink::SmtpSink;
use crate::support::*;

/// Per node: (smtp-source sessions, messages, payload bytes). The larger
/// messages span three queue chunks.
const MIX: [(u32, u32, usize); 2] = [(5, 600, 1000), (2, 150, 10_000)];
/// Longest wait for a fault's precondition or for the nodes to notice it.
const OBSERVE: Duration = Duration::from_secs(30);
/// Longest time from the end of a fault to an empty queue.
const DRAIN: Duration = Duration::from_secs(45);
const ALL: [usize; 3] = [0, 1, 2];

const TAKEOVERS: &str = "mxrelay_queue_lease_takeovers_total";
const LEASES_LOST: &str = "mxrelay_queue_leases_lost_total";
const BOOKKEEPING_RETRIES: &str = "mxrelay_queue_bookkeeping_retries_total";
const GROUPS_RECREATED: &str = "mxrelay_queue_groups_recreated_total";
const PRIMARY_CHANGES: &str = "mxrelay_queue_primary_changes_total";
const CONNECT_ERRORS: &str = "mxrelay_delivery_attempts_total{result=\"connect_error\"}";
const DEFERRED_ATTEMPTS: &str = "mxrelay_delivery_attempts_total{result=\"deferred\"}";

/// One scenario's outcome, reported before it is judged.
struct Outcome {
    scenario: &'static str,
    tally: Tally,
    copies: Vec<Copy>,
    in_flight: HashSet<String>,
    drained: bool,
}

/// Waits for an empty queue, then counts and reports the scenario.
fn measure(
    scenario: &'static str,
    fleet: &Fleet,
    live: &[usize],
    recovered: Instant,
    copies: impl Fn() -> Vec<Copy>,
    in_flight: &HashSet<String>,
    extra: &str,
) -> Outcome {
    let drained = fleet.drained(live, recovered + DRAIN);
    let copies = copies();
    let tally = tally(&fleet.accepted(), &fleet.refused(), &copies);
    let drain = drained.map_or(DRAIN, |at| at - recovered);
    report(scenario, &tally, drain, &format!("in_flight={} {extra}", in_flight.len()));
    Outcome { scenario, tally, copies, in_flight: in_flight.clone(), drained: drained.is_some() }
}

impl Outcome {
    /// Nothing accepted lost, nothing truncated, every duplicate one of
    /// the messages in flight at the fault, and the queue drained.
    fn check(&self) {
        check(self.scenario, &self.tally, &self.copies, &self.in_flight);
        assert!(self.drained, "{}: queue not empty {DRAIN:?} after the fault", self.scenario);
    }
}

fn check(scenario: &str, t: &Tally, copies: &[Copy], in_flight: &HashSet<String>) {
    assert!(t.lost.is_empty(), "{scenario}: {} accepted messages never delivered: {:?}", t.lost.len(), t.lost);
    let cut: Vec<&Copy> = copies.iter().filter(|c| !c.intact).collect();
    assert!(cut.is_empty(), "{scenario}: {} copies not intact: {:?}", cut.len(), &cut[..cut.len().min(5)]);
    assert!(
        t.duplicated <= in_flight.len(),
        "{scenario}: {} duplicates, {} messages in flight at the fault",
        t.duplicated,
        in_flight.len()
    );
    let unexplained: Vec<&String> = t.duplicated_ids.iter().filter(|id| !in_flight.contains(*id)).collect();
    assert!(
        unexplained.is_empty(),
        "{scenario}: duplicates of messages that were not in flight at the fault: {unexplained:?}"
    );
}

fn sink_copies(sink: &SmtpSink) -> Vec<Copy> {
    sink.messages().iter().map(Copy::from_sink).collect()
}

/// Waits until every node in `nodes` answers `/readyz` with `status`.
fn wait_ready(fleet: &Fleet, nodes: &[usize], status: &str, what: &str) {
    wait_until(what, OBSERVE, || {
        nodes.iter().all(|i| fleet.nodes[*i].http_get("/readyz").starts_with(&format!("HTTP/1.1 {status}")))
    });
}

#[test]
fn node_killed_with_sigkill_and_restarted() {
    let sink = SmtpSink::start();
    let mut fleet = Fleet::prepare(sink.port);
    fleet.spawn_nodes(&[], |_| None);
    let mut load = fleet.inject(&ALL, &MIX);
    wait_until("mail accepted and node-b delivering", OBSERVE, || {
        fleet.accepted().len() >= 600 && fleet.pending(Some("node-b")).is_some_and(|p| p.len() >= 5)
    });
    fleet.nodes[1].kill();
    // Exact: nobody may claim a dead node's entries within queue.lease.
    let in_flight = fleet.pending(Some("node-b")).expect("redis");
    wait_until("node-b's leases taken over", OBSERVE, || fleet.pending(Some("node-b")).is_some_and(|p| p.is_empty()));
    let takeovers = fleet.metric(&[0, 2], TAKEOVERS);
    fleet.nodes[1].start();
    let recovered = Instant::now();
    load.extend(fleet.inject(&[1], &[(4, 200, 1000)]));
    finish(load);
    measure(
        "node_killed_with_sigkill_and_restarted",
        &fleet,
        &ALL,
        recovered,
        || sink_copies(&sink),
        &in_flight,
        &format!("takeovers={takeovers}"),
    )
    .check();
    assert!(
        takeovers >= in_flight.len() as f64,
        "{} leases of the killed node, {takeovers} taken over by the others",
        in_flight.len()
    );
}

#[test]
fn redis_killed_with_sigkill_and_restarted_from_its_aof() {
    let sink = SmtpSink::start();
    let mut fleet = Fleet::prepare(sink.port);
    fleet.spawn_nodes(&[], |_| None);
    let load = fleet.inject(&ALL, &MIX);
    wait_until("mail accepted and in delivery", OBSERVE, || {
        fleet.accepted().len() >= 600 && fleet.pending(None).is_some_and(|p| p.len() >= 10)
    });
    let pause = fleet.pause();
    let in_flight = fleet.pending(None).expect("redis");
    fleet.redis.stop();
    let killed = Instant::now();
    drop(pause);
    wait_ready(&fleet, &ALL, "503", "every node noticing that Redis is gone");
    fleet.redis.resume();
    let recovered = Instant::now();
    let outage = recovered - killed;
    finish(load);
    let retries = fleet.metric(&ALL, BOOKKEEPING_RETRIES);
    measure(
        "redis_killed_with_sigkill_and_restarted_from_its_aof",
        &fleet,
        &ALL,
        recovered,
        || sink_copies(&sink),
        &in_flight,
        &format!("outage={:.1}s bookkeeping_retries={retries}", outage.as_secs_f64()),
    )
    .check();
}

#[test]
fn redis_restarted_empty_new_mail_flows() {
    // A destination slower than the injection keeps mail queued when
    // Redis loses everything.
    let sink = SmtpSink::start_with(&["-w", "1"]);
    let mut fleet = Fleet::prepare(sink.port);
    fleet.spawn_nodes(
        &[("MXRELAY_DELIVERY_DESTINATION_CONCURRENCY", "50"), ("MXRELAY_DELIVERY_CONCURRENCY", "100")],
        |_| None,
    );
    // Frozen while the mail comes in: however the injection's speed
    // compares with delivery's, the queue is full at the wipe.
    sink.freeze();
    finish(fleet.inject(&ALL, &[(4, 250, 1000), (2, 50, 10_000)]));
    wait_until("mail queued and leased", OBSERVE, || {
        fleet.pending(None).is_some_and(|p| p.len() >= 10) && fleet.queued().is_some_and(|n| n >= 100)
    });
    sink.thaw();
    // Wiped while bodies are on the wire (each transaction held 1 s).
    wait_until("transfers in progress at the destination", OBSERVE, || sink.in_progress() >= 10);
    let pause = fleet.pause();
    let in_flight = fleet.pending(None).expect("redis");
    let queued_at_wipe = fleet.queued().expect("redis");
    fleet.restart_redis_empty();
    drop(pause);
    let before = fleet.accepted();
    // No mail until a node has found the groups missing, so that it is the
    // nodes' read paths that recreate them (a commit would too).
    wait_until("consumer groups recreated", OBSERVE, || fleet.metric(&ALL, GROUPS_RECREATED) >= 1.0);
    wait_ready(&fleet, &ALL, "200", "every node ready on the empty Redis");
    let recovered = Instant::now();
    finish(fleet.inject(&ALL, &MIX));
    let drained = fleet.drained(&ALL, recovered + DRAIN);
    let copies = sink_copies(&sink);
    let after: HashSet<String> = fleet.accepted().difference(&before).cloned().collect();
    let mut t = tally(&after, &fleet.refused(), &copies);
    // Copies of mail accepted before the restart are not unacknowledged.
    t.unacknowledged = t.unacknowledged.saturating_sub(copies_of(&before, &copies));
    let delivered: HashSet<&str> = copies.iter().filter_map(|c| c.id.as_deref()).collect();
    let lost_before = before.iter().filter(|id| !delivered.contains(id.as_str())).count();
    let recreated = fleet.metric(&ALL, GROUPS_RECREATED);
    let leases_lost = fleet.metric(&ALL, LEASES_LOST);
    let drain = drained.map_or(DRAIN, |at| at - recovered);
    report(
        "redis_restarted_empty_new_mail_flows",
        &t,
        drain,
        &format!(
            "in_flight={} accepted_before={} queued_at_wipe={queued_at_wipe} lost_before={lost_before} \
             groups_recreated={recreated} leases_lost={leases_lost}",
            in_flight.len(),
            before.len()
        ),
    );
    // `after` excludes the mail accepted before: its delivered copies are
    // not "unacknowledged"; truncation is checked on every copy.
    check("redis_restarted_empty_new_mail_flows", &t, &copies, &in_flight);
    assert!(drained.is_some(), "queue not empty {DRAIN:?} after the restart ({:?} left)", fleet.queued());
    assert!(t.accepted >= 1000, "only {} accepted after the restart", t.accepted);
}

#[test]
fn node_partitioned_from_redis_longer_than_the_lease() {
    let lease = Duration::from_secs(3);
    let sink = SmtpSink::start_with(&["-w", "1"]);
    let mut fleet = Fleet::prepare(sink.port);
    let proxy = Proxy::start(&fleet.redis_addr());
    let via_proxy = format!("redis://{}/", proxy.addr());
    fleet.spawn_nodes(
        &[("MXRELAY_DELIVERY_DESTINATION_CONCURRENCY", "50"), ("MXRELAY_DELIVERY_CONCURRENCY", "100")],
        |i| (i == 2).then(|| via_proxy.clone()),
    );
    let load = fleet.inject(&ALL, &MIX);
    wait_until("mail accepted and node-c delivering", OBSERVE, || {
        fleet.accepted().len() >= 600 && fleet.pending(Some("node-c")).is_some_and(|p| p.len() >= 10)
    });
    proxy.partition();
    let partitioned = Instant::now();
    // Exact: node-c reaches nothing, and its entries cannot be claimed
    // before queue.lease.
    let held = fleet.pending(Some("node-c")).expect("redis");
    // From here on node-c must not finish a copy: its leases are void
    // after queue.lease (it stops at 4/5 of it; one second of margin).
    wait_until("queue.lease and a second passed", OBSERVE, || partitioned.elapsed() >= lease + Duration::from_secs(1));
    let cut_off = copy_counts(&sink);
    wait_until("node-c's leases taken over and delivered", OBSERVE, || {
        let pending = fleet.pending(Some("node-c")).unwrap_or_default();
        // The sink is read only once the cheap condition holds.
        held.iter().all(|id| !pending.contains(id)) && {
            let delivered: HashSet<String> = sink_copies(&sink).into_iter().filter_map(|c| c.id).collect();
            held.iter().any(|id| delivered.contains(id))
        }
    });
    let at_heal = copy_counts(&sink);
    proxy.heal();
    let partition = partitioned.elapsed();
    let recovered = Instant::now();
    let late: Vec<&Copy> =
        at_heal.iter().filter(|(c, n)| **n > cut_off.get(*c).copied().unwrap_or(0)).map(|(c, _)| c).collect();
    let by_c: Vec<&&Copy> = late.iter().filter(|c| c.by == Fleet::hostname(2)).collect();
    finish(load);
    let outcome = measure(
        "node_partitioned_from_redis_longer_than_the_lease",
        &fleet,
        &ALL,
        recovered,
        || sink_copies(&sink),
        &held,
        &format!(
            "partition={:.1}s takeovers={} leases_lost_on_c={} copies_in_window={}",
            partition.as_secs_f64(),
            fleet.metric(&[0, 1], TAKEOVERS),
            fleet.metric(&[2], LEASES_LOST),
            late.len()
        ),
    );
    assert!(by_c.is_empty(), "node-c finished copies after its leases were void: {by_c:?}");
    outcome.check();
    let takeovers = fleet.metric(&[0, 1], TAKEOVERS);
    assert!(takeovers >= held.len() as f64, "{} leases held by node-c, {takeovers} taken over", held.len());
    assert!(fleet.metric(&[2], LEASES_LOST) >= 1.0, "node-c never noticed that it lost its leases");
    assert!(outcome.tally.accepted >= 1000, "only {} accepted", outcome.tally.accepted);
}

/// Distinct ids of `ids` that have a copy.
fn copies_of(ids: &HashSet<String>, copies: &[Copy]) -> usize {
    copies.iter().filter_map(|c| c.id.as_ref()).filter(|id| ids.contains(*id)).collect::<HashSet<_>>().len()
}

/// The sink's copies, counted per (id, delivering node).
fn copy_counts(sink: &SmtpSink) -> HashMap<Copy, usize> {
    let mut counts = HashMap::new();
    for c in sink_copies(sink) {
        *counts.entry(c).or_default() += 1;
    }
    counts
}

#[test]
fn destination_flapping() {
    let mut destination = Destination::start();
    let port = destination.port;
    let mut fleet = Fleet::prepare(port);
    fleet.spawn_nodes(&[], |_| None);
    let load = fleet.inject(&ALL, &[(4, 600, 1000), (2, 100, 10_000)]);
    let mut retired: Vec<Destination> = Vec::new();
    let mut in_flight = HashSet::new();
    let busy = |fleet: &Fleet| fleet.queued() != Some(0);
    for _ in 0..3 {
        wait_until("the destination receiving", OBSERVE, || destination.messages().len() >= 50 || !busy(&fleet));
        // Down: connections refused, open sessions cut mid-transaction.
        let pause = fleet.pause();
        in_flight.extend(fleet.pending(None).expect("redis"));
        destination.stop();
        drop(pause);
        let refused = fleet.metric(&ALL, CONNECT_ERRORS);
        wait_until("connections refused", OBSERVE, || {
            fleet.metric(&ALL, CONNECT_ERRORS) >= refused + 10.0 || !busy(&fleet)
        });
        retired.push(std::mem::replace(&mut destination, Destination::start_on(port)));
        wait_until("the destination receiving again", OBSERVE, || destination.messages().len() >= 50 || !busy(&fleet));
        // Up, but every RCPT answered 451.
        destination.set_fail_all_temp(true);
        let deferred = fleet.metric(&ALL, DEFERRED_ATTEMPTS);
        wait_until("4xx deferrals", OBSERVE, || {
            fleet.metric(&ALL, DEFERRED_ATTEMPTS) >= deferred + 10.0 || !busy(&fleet)
        });
        destination.set_fail_all_temp(false);
    }
    let recovered = Instant::now();
    finish(load);
    let copies = || {
        retired.iter().chain([&destination]).flat_map(|d| d.messages()).map(|m| Copy::from_destination(&m)).collect()
    };
    measure(
        "destination_flapping",
        &fleet,
        &ALL,
        recovered,
        copies,
        &in_flight,
        &format!(
            "flaps=3 connect_errors={} deferred_attempts={}",
            fleet.metric(&ALL, CONNECT_ERRORS),
            fleet.metric(&ALL, DEFERRED_ATTEMPTS)
        ),
    )
    .check();
}

#[test]
fn sigterm_during_delivery_hands_leases_back() {
    // A long lease (30 s): a lease not handed back holds its message
    // until another node takes it over, long after the others drained.
    // Every transaction waits 2 s for the 354, longer than the grace.
    let sink = SmtpSink::start_with(&["-w", "2"]);
    let mut fleet = Fleet::prepare(sink.port);
    fleet.spawn_nodes(
        &[
            ("MXRELAY_QUEUE_LEASE", "30s"),
            ("MXRELAY_DELIVERY_STOP_GRACE", "500ms"),
            ("MXRELAY_DELIVERY_DESTINATION_CONCURRENCY", "50"),
            ("MXRELAY_DELIVERY_CONCURRENCY", "100"),
        ],
        |_| None,
    );
    let load = fleet.inject(&ALL, &[(4, 400, 1000), (2, 100, 10_000)]);
    // More leases than destination slots: some deliveries wait for a slot
    // and cannot finish within the grace period.
    wait_until("node-a delivering with a backlog", OBSERVE, || {
        fleet.accepted().len() >= 600 && fleet.pending(Some("node-a")).is_some_and(|p| p.len() >= 60)
    });
    let pause = fleet.pause();
    let mut in_flight = fleet.pending(Some("node-a")).expect("redis");
    fleet.nodes[0].signal("TERM");
    let terminated = Instant::now();
    drop(pause);
    let pid = fleet.nodes[0].pid();
    wait_until("node-a stopped", OBSERVE, || exited(pid));
    let log = fleet.nodes[0].log();
    let handed_back: HashSet<String> = log
        .lines()
        .filter(|l| l.contains(": handed back to the cluster"))
        .filter_map(|l| l.split(": handed back").next()?.rsplit(' ').next().map(str::to_string))
        .collect();
    in_flight.extend(handed_back.iter().cloned());
    let left = fleet.pending(Some("node-a")).expect("redis");
    // What it still holds, for the failure message: (shard, entry, id).
    let stuck = fleet.pending_entries("node-a");
    let recovered = Instant::now();
    finish(load);
    let stopped_in = recovered - terminated;
    let outcome = measure(
        "sigterm_during_delivery_hands_leases_back",
        &fleet,
        &[1, 2],
        recovered,
        || sink_copies(&sink),
        &in_flight,
        &format!(
            "handed_back={} stopped_in={:.1}s takeovers={}",
            handed_back.len(),
            stopped_in.as_secs_f64(),
            fleet.metric(&[1, 2], TAKEOVERS)
        ),
    );
    // The behaviour first: a lease left behind is what delays its message.
    assert!(!handed_back.is_empty(), "node-a handed nothing back:\n{log}");
    assert!(left.is_empty(), "node-a stopped holding {} leases (shard, stream entry, queue id): {stuck:?}", left.len());
    assert_eq!(fleet.metric(&[1, 2], TAKEOVERS), 0.0, "a lease had to be taken over");
    outcome.check();
    assert!(outcome.tally.accepted >= 1000, "only {} accepted", outcome.tally.accepted);
}

/// A primary with two replicas (AOF on all three) under three Sentinels;
/// the nodes know only the Sentinels (`redis+sentinel://…`) and wait for
/// one replica's acknowledgement before 250 (`queue.min_replicas_ack = 1`).
/// The primary is SIGKILLed under load, at an instant whose writes both
/// replicas hold (paused until they caught up, so that the leases in flight
/// are exactly known); a replica is promoted, every node moves its writes
/// to it by itself, and the mail drains from there.
#[test]
fn redis_primary_killed_under_sentinel_fails_over_to_a_replica() {
    sentinel_failover("redis_primary_killed_under_sentinel_fails_over_to_a_replica", true);
}

/// The same, killed without warning: whatever the primary had not yet
/// replicated is lost with it. Commits were confirmed by a replica before
/// their 250, so no accepted message may be lost; unreplicated delivery
/// results come back as deliveries to redo, so duplicates are counted, not
/// bounded by the leases seen in flight.
#[test]
fn redis_primary_killed_without_warning_under_sentinel_loses_nothing_acknowledged() {
    sentinel_failover("redis_primary_killed_without_warning_under_sentinel_loses_nothing_acknowledged", false);
}

fn sentinel_failover(scenario: &'static str, paused: bool) {
    let sink = SmtpSink::start();
    let mut fleet = Fleet::prepare(sink.port);
    let old = fleet.redis.port;
    let primary = old.to_string();
    let args = ["--appendonly", "yes", "--appendfsync", "always", "--replicaof", "127.0.0.1", &primary];
    let _replicas: Vec<RedisServer> = (0..2).map(|_| RedisServer::start_with(&args)).collect();
    wait_until("both replicas attached", OBSERVE, || replication_offsets(old).is_some_and(|(_, r)| r.len() == 2));
    let sentinels = Sentinels::start(old, 3, 2);
    let url = sentinels.url();
    fleet.spawn_nodes(&[("MXRELAY_QUEUE_MIN_REPLICAS_ACK", "1")], |_| Some(url.clone()));
    wait_ready(&fleet, &ALL, "200", "every node ready on the primary the Sentinels name");
    let load = fleet.inject(&ALL, &MIX);
    wait_until("mail accepted and in delivery", OBSERVE, || {
        fleet.accepted().len() >= 600 && fleet.pending(None).is_some_and(|p| p.len() >= 10)
    });
    let pause = paused.then(|| fleet.pause());
    let in_flight = fleet.pending(None).expect("redis");
    if paused {
        wait_until("the replicas hold every write of the primary", OBSERVE, || {
            replication_offsets(old).is_some_and(|(p, r)| r.len() == 2 && r.iter().all(|o| *o == p))
        });
    }
    fleet.redis.stop();
    let killed = Instant::now();
    drop(pause);
    let promoted = wait_until_value("a replica promoted", OBSERVE, || sentinels.primary_port().filter(|p| *p != old));
    sentinels.no_more_failovers();
    fleet.inspect = vec![format!("redis://127.0.0.1:{promoted}/")];
    wait_until("every node writing to the new primary", OBSERVE, || fleet.metric(&ALL, PRIMARY_CHANGES) >= 3.0);
    wait_ready(&fleet, &ALL, "200", "every node ready on the new primary");
    let recovered = Instant::now();
    finish(load);
    let outcome = measure(
        scenario,
        &fleet,
        &ALL,
        recovered,
        || sink_copies(&sink),
        &in_flight,
        &format!("failover={:.1}s", (recovered - killed).as_secs_f64()),
    );
    if paused {
        outcome.check();
    } else {
        let t = &outcome.tally;
        assert!(t.lost.is_empty(), "{scenario}: {} accepted messages never delivered: {:?}", t.lost.len(), t.lost);
        let cut: Vec<&Copy> = outcome.copies.iter().filter(|c| !c.intact).collect();
        assert!(cut.is_empty(), "{scenario}: {} copies not intact: {:?}", cut.len(), &cut[..cut.len().min(5)]);
        assert!(outcome.drained, "{scenario}: queue not empty {DRAIN:?} after the fault");
    }
    for node in &fleet.nodes {
        assert!(node.log().contains("moved (Sentinel failover)"), "{}", node.log());
    }
}
