//! Outages, for real: private MariaDB and Redis instances are killed and
//! restarted under a running node. Mail is delayed (4xx), never accepted
//! without being stored, and never refused permanently.

use std::time::Duration;

use crate::support::*;

fn rcpt_reply(relay: &Relay, rcpt: &str) -> String {
    let mut c = Raw::ehlo(&relay.addr());
    c.cmd(&format!("MAIL FROM:<{SENDER}>"));
    c.cmd(&format!("RCPT TO:<{rcpt}>"))
}

fn send(relay: &Relay) -> String {
    let mut c = Raw::ehlo(&relay.addr());
    c.cmd(&format!("MAIL FROM:<{SENDER}>"));
    c.cmd("RCPT TO:<t@friet.pan>");
    assert_eq!(c.code_after("DATA"), 354);
    c.send("Subject: fault\r\n\r\nbody\r\n.\r\n");
    c.reply()
}

#[test]
fn mariadb_outage_keeps_the_last_snapshot() {
    let dns = Dns::start(&["sender.example"], &[LISTED, "other.example"]);
    let mut maria = MariaDb::start();
    let db = TestDb::create(&maria.server);
    let relay = Relay::spawn(&base_config(&db.url(), SHARED_REDIS, &dns));
    db.add_domain(LISTED, "127.0.0.1", 2526);
    wait_until("listed", Duration::from_secs(15), || rcpt_reply(&relay, "t@friet.pan").starts_with("250"));
    assert!(rcpt_reply(&relay, "t@other.example").starts_with("454 4.7.1"));

    let errors = relay.value("mxrelay_database_errors_total");
    maria.stop();
    wait_until("refresh failure noticed", Duration::from_secs(20), || {
        rcpt_reply(&relay, "t@other.example").starts_with("451 4.3.0")
    });
    assert!(rcpt_reply(&relay, "t@friet.pan").starts_with("250 2.1.5"), "known domain must keep working");
    assert!(send(&relay).starts_with("250 2.0.0 Ok: queued as"));
    // What an operator sees: failed refreshes counted, the snapshot aging
    // past domains.refresh (1 s here).
    assert!(relay.value("mxrelay_database_errors_total") > errors);
    wait_until("snapshot older than 3 refresh intervals", Duration::from_secs(20), || {
        relay.value("mxrelay_domains_snapshot_age_seconds") >= 3.0
    });
    // Still ready (it serves from the snapshot), saying how old that is.
    let ready = relay.http_get("/readyz");
    let age: u64 = ready
        .split("(domain snapshot ")
        .nth(1)
        .and_then(|r| r.split("s old)").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no snapshot age in {ready}"));
    assert!(ready.starts_with("HTTP/1.1 200") && age >= 3, "{ready}");

    maria.resume();
    wait_until("database back", Duration::from_secs(30), || {
        rcpt_reply(&relay, "t@other.example").starts_with("454 4.7.1")
    });
    wait_until("snapshot fresh again", Duration::from_secs(10), || {
        relay.value("mxrelay_domains_snapshot_age_seconds") < 3.0
    });
}

#[test]
fn a_dns_outage_is_a_451_4_4_3_and_counted() {
    let mut w = World::start();
    let errors = w.relay.value("mxrelay_dns_errors_total");
    w.dns.stop();
    // A sender domain the node has not looked up (and cached) before.
    let mut c = Raw::ehlo(&w.relay.addr());
    assert!(c.cmd("MAIL FROM:<a@uncached.example>").starts_with("250"));
    let r = c.cmd("RCPT TO:<t@friet.pan>");
    assert!(
        r.starts_with("451 4.4.3 <a@uncached.example>: Sender address rejected: Temporary DNS lookup failure"),
        "{r}"
    );
    assert!(w.relay.value("mxrelay_dns_errors_total") > errors);
    assert!(w.relay.log().contains("DNS lookup failed; deferring"));
}

#[test]
fn a_node_without_any_snapshot_answers_451_until_the_database_is_up() {
    let dns = Dns::start(&["sender.example"], &[LISTED]);
    let mut maria = MariaDb::start();
    let db = TestDb::create(&maria.server);
    maria.stop();
    let relay = Relay::spawn(&base_config(&db.url(), SHARED_REDIS, &dns));
    let r = rcpt_reply(&relay, "t@friet.pan");
    assert!(r.starts_with("451 4.3.0"), "{r}");
    assert!(relay.http_get("/readyz").starts_with("HTTP/1.1 503"));
    maria.resume();
    db.add_domain_when_ready();
    wait_until("first snapshot", Duration::from_secs(30), || rcpt_reply(&relay, "t@friet.pan").starts_with("250"));
}

#[test]
fn redis_outage_gives_451_never_250_and_recovers_without_restart() {
    let dns = Dns::start(&["sender.example"], &[LISTED]);
    let mut redis = RedisServer::start();
    let db = TestDb::create(&MysqlServer::shared());
    let relay = Relay::spawn(&base_config(&db.url(), &redis.url(), &dns));
    db.add_domain(LISTED, "127.0.0.1", 2526);
    wait_until("listed", Duration::from_secs(15), || rcpt_reply(&relay, "t@friet.pan").starts_with("250"));
    assert!(send(&relay).starts_with("250 2.0.0"));

    let errors = relay.value("mxrelay_queue_errors_total{op=\"enqueue\"}");
    redis.stop();
    for _ in 0..3 {
        let r = send(&relay);
        assert!(r.starts_with("451 4.3.0"), "{r}");
    }
    assert!(relay.value("mxrelay_queue_errors_total{op=\"enqueue\"}") >= errors + 3.0);
    assert!(relay.http_get("/readyz").starts_with("HTTP/1.1 503"));

    redis.resume();
    wait_until("redis back", Duration::from_secs(20), || send(&relay).starts_with("250 2.0.0"));
    let mut q = relay.queue(&redis.url());
    // The instance keeps nothing on disk: only what was sent after the restart is there.
    assert!(!q.ready_ids().is_empty());
    assert!(q.stray_keys().is_empty());
}

#[test]
fn min_replicas_ack_waits_for_a_replica_and_refuses_without_one() {
    let dns = Dns::start(&["sender.example"], &[LISTED]);
    let primary = RedisServer::start();
    let mut replica = RedisServer::replica_of(&primary);
    let db = TestDb::create(&MysqlServer::shared());
    let relay = Relay::spawn_with_env(
        &base_config(&db.url(), &primary.url(), &dns),
        &[("MXRELAY_QUEUE_MIN_REPLICAS_ACK", "1"), ("MXRELAY_QUEUE_REPLICAS_ACK_TIMEOUT", "300ms")],
    );
    db.add_domain(LISTED, "127.0.0.1", 2526);
    wait_until("listed", Duration::from_secs(15), || rcpt_reply(&relay, "t@friet.pan").starts_with("250"));
    wait_until("replica in sync", Duration::from_secs(20), || send(&relay).starts_with("250 2.0.0"));
    let mut q = relay.queue(&primary.url());
    let before = q.ready_ids().len();

    replica.stop();
    let r = send(&relay);
    assert!(r.starts_with("451 4.3.0"), "{r}");
    assert_eq!(q.ready_ids().len(), before, "an unreplicated message is rolled back");
}
