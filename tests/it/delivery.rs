//! Delivery from the shared queue to real SMTP peers: Postfix's smtp-sink,
//! and our scripted destination for per-recipient 4xx/5xx.

use std::time::Duration;

use crate::support::destination::{Destination, assert_one_copy_and_one_dsn};
use crate::support::sink::SmtpSink;
use crate::support::*;

const MESSAGE: &str = "From: bob@friet.pan\r\nTo: t@friet.pan\r\nSubject: delivered\r\n\r\nbody line\r\n.dot line\r\n";

/// DNS, a database with the given domains, and one delivering relay.
struct Cluster {
    _dns: Dns,
    _db: TestDb,
    relays: Vec<Relay>,
}

impl Cluster {
    fn start(nodes: usize, domains: &[(&str, &str, u16)], env: &[(&str, &str)]) -> Cluster {
        Self::start_on(nodes, domains, env, SHARED_REDIS)
    }

    fn start_on(nodes: usize, domains: &[(&str, &str, u16)], env: &[(&str, &str)], redis: &str) -> Cluster {
        let dns = Dns::start(&["sender.example", "mx.named.example"], &[LISTED, "named.example"]);
        let db = TestDb::create(&MysqlServer::shared());
        db.exec(include_str!("../../migrations/mysql/0001_domains.sql"));
        for (d, host, port) in domains {
            db.add_domain(d, host, *port);
        }
        let mut env: Vec<(&str, &str)> = env.to_vec();
        env.push(("MXRELAY_DELIVERY_ENABLED", "true"));
        let config = base_config(&db.url(), redis, &dns);
        let prefix = unique("mxrq");
        let relays = (0..nodes)
            .map(|i| {
                let node = format!("node-{i}");
                let mut e = env.clone();
                e.push(("MXRELAY_NODE_ID", &node));
                Relay::spawn_in_queue(&config, &e, &prefix)
            })
            .collect();
        Cluster { _dns: dns, _db: db, relays }
    }

    fn addr(&self) -> String {
        self.relays[0].addr()
    }
}

#[test]
fn delivers_byte_exact_on_a_non_25_port_and_to_a_named_relay_host() {
    // The scripted destination keeps every byte (smtp-sink drops CRs).
    let sink = Destination::start();
    let named = Destination::start();
    let c =
        Cluster::start(1, &[(LISTED, "127.0.0.1", sink.port), ("named.example", "mx.named.example", named.port)], &[]);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("msg.eml");
    std::fs::write(&data, MESSAGE.strip_suffix("\r\n").unwrap()).unwrap();
    let (code, out) = swaks(
        &c.addr(),
        &[
            "--from",
            "bob@friet.pan",
            "--to",
            "t@friet.pan,u@named.example",
            "--helo",
            "client.example",
            "--data",
            data.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{out}");
    let id = queued_id(&out).unwrap();
    for (s, rcpt) in [(&sink, "t@friet.pan"), (&named, "u@named.example")] {
        let got = s.wait_for(1, Duration::from_secs(20));
        assert_eq!(got.len(), 1);
        let m = &got[0];
        assert_eq!(m.mail_from, "bob@friet.pan");
        assert_eq!(m.rcpts, vec![rcpt]);
        assert_relayed_exactly(&m.data, MESSAGE.as_bytes(), &id);
        let (received, _) = split_our_received(&m.data);
        assert!(received.starts_with("Received: from client.example (unknown [127.0.0.1])\r\n"), "{received}");
    }
    let mut q = c.relays[0].queue(SHARED_REDIS);
    wait_until("message leaves the queue", Duration::from_secs(10), || {
        q.ready_ids().is_empty() && q.message_count() == 0
    });
    let log = c.relays[0].log();
    assert!(log.contains("to=<t@friet.pan>, relay=127.0.0.1[127.0.0.1]") && log.contains("status=sent (250"), "{log}");
    assert!(log.contains("to=<u@named.example>, relay=mx.named.example[127.0.0.1]"), "{log}");
}

#[test]
fn partial_delivery_retries_only_pending_and_bounces_the_5xx_ones() {
    let dest = Destination::start();
    let c = Cluster::start(1, &[(LISTED, "127.0.0.1", dest.port)], &[]);
    let (code, out) = swaks(
        &c.addr(),
        &[
            "--from",
            "bob@friet.pan",
            "--to",
            "ok@friet.pan,temp1@friet.pan,perm1@friet.pan",
            "--helo",
            "client.example",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let id = queued_id(&out).unwrap();
    // The delivered copy (ok) and the DSN to bob for perm1.
    let got = dest.wait_for(2, Duration::from_secs(20));
    assert_one_copy_and_one_dsn(&got, "ok@friet.pan", "bob@friet.pan", "perm1@friet.pan");
    assert_eq!(c.relays[0].value("mxrelay_delivery_dsn_total"), 1.0);
    // temp1 is retried (retry_min 1s) while ok and perm1 are never sent again.
    let mut q = c.relays[0].queue(SHARED_REDIS);
    wait_until("three attempts", Duration::from_secs(30), || {
        q.try_envelope(&id).is_some_and(|e| e["attempts"].parse::<u32>().unwrap_or(0) >= 3)
    });
    let env = q.envelope(&id);
    let rcpts: Vec<serde_json::Value> = serde_json::from_str(&env["recipients"]).unwrap();
    let state = |a: &str| rcpts.iter().find(|r| r["address"] == a).unwrap()["state"].as_str().unwrap().to_string();
    assert_eq!(
        (state("ok@friet.pan").as_str(), state("temp1@friet.pan").as_str(), state("perm1@friet.pan").as_str()),
        ("delivered", "pending", "bounced")
    );
    assert_eq!(dest.messages().len(), 2, "only the pending recipient is retried");
    let retries = c.relays[0].log().matches("to=<temp1@friet.pan>").count();
    assert!(retries >= 3, "temp1 was retried ({retries} attempts logged)");
    assert_eq!(c.relays[0].log().matches("to=<ok@friet.pan>").count(), 1, "ok is never sent again");
}

#[test]
fn a_bounce_is_never_bounced() {
    let dest = Destination::start();
    let c = Cluster::start(1, &[(LISTED, "127.0.0.1", dest.port)], &[]);
    let (code, out) = swaks(&c.addr(), &["--from", "<>", "--to", "perm2@friet.pan", "--helo", "client.example"]);
    assert_eq!(code, 0, "{out}");
    wait_until("bounced", Duration::from_secs(20), || c.relays[0].log().contains("status=bounced"));
    // A DSN would be queued before the bounced message leaves the queue.
    let mut q = c.relays[0].queue(SHARED_REDIS);
    wait_until("queue empty", Duration::from_secs(10), || q.message_count() == 0);
    assert_eq!(c.relays[0].value("mxrelay_delivery_dsn_total"), 0.0);
    assert!(dest.messages().is_empty(), "no DSN for the null sender");
    assert!(c.relays[0].log().contains("not bouncing a message from the null sender"));
}

#[test]
fn a_down_primary_is_drained_fast_once_it_is_back() {
    let down = DownPort::new();
    // Backoff and probes far longer than the test: only the fast drain,
    // which the first message delivered after the outage triggers, can
    // deliver the other 19 in time.
    let c = Cluster::start(
        1,
        &[(LISTED, "127.0.0.1", down.port)],
        &[
            ("MXRELAY_DELIVERY_RETRY_MIN", "120s"),
            ("MXRELAY_DELIVERY_RETRY_MAX", "1h"),
            ("MXRELAY_DELIVERY_PROBE_INTERVAL", "1h"),
        ],
    );
    for i in 0..20 {
        let (code, out) =
            swaks(&c.addr(), &["--from", SENDER, "--to", &format!("m{i}@friet.pan"), "--helo", "client.example"]);
        assert_eq!(code, 0, "the node accepts while the primary is down: {out}");
    }
    let mut q = c.relays[0].queue(SHARED_REDIS);
    wait_until("all deferred", Duration::from_secs(20), || q.ready_ids().is_empty() && q.deferred_count() == 20);
    let dest = Destination::start_on(down.release());
    // A new message to the same destination is tried at once, succeeds,
    // and releases the deferred ones.
    let (code, out) = swaks(&c.addr(), &["--from", SENDER, "--to", "trigger@friet.pan", "--helo", "client.example"]);
    assert_eq!(code, 0, "{out}");
    let started = std::time::Instant::now();
    dest.wait_for(21, Duration::from_secs(20));
    eprintln!(
        "fast drain: 20 deferred messages delivered {:.1}s after the primary came back",
        started.elapsed().as_secs_f64()
    );
    let log = c.relays[0].log();
    assert_eq!(log.matches("releasing its deferred messages").count(), 1, "{log}");
    assert!(log.contains("released=20"), "{log}");
    wait_until("queue empty", Duration::from_secs(10), || q.message_count() == 0 && q.deferred_count() == 0);
}

#[test]
fn sigterm_hands_in_flight_deliveries_back_to_the_cluster() {
    // A destination that waits 6 s before answering DATA keeps deliveries in flight.
    let slow = SmtpSink::start_with(&["-w", "6"]);
    let c = Cluster::start(
        2,
        &[(LISTED, "127.0.0.1", slow.port)],
        &[("MXRELAY_QUEUE_LEASE", "60s"), ("MXRELAY_DELIVERY_STOP_GRACE", "1s")],
    );
    let mut c = c;
    // Only node 0 delivers at first: node 1 starts after the mail is leased.
    c.relays[1].kill();
    for i in 0..3 {
        let (code, out) =
            swaks(&c.addr(), &["--from", SENDER, "--to", &format!("s{i}@friet.pan"), "--helo", "client.example"]);
        assert_eq!(code, 0, "{out}");
    }
    let mut q = c.relays[0].queue(SHARED_REDIS);
    wait_until("node 0 delivering all three", Duration::from_secs(20), || {
        q.leased() == 3 && c.relays[0].value("mxrelay_delivery_destination_connections") >= 1.0
    });
    let started = std::time::Instant::now();
    c.relays[1].start();
    c.relays[0].signal("TERM");
    let got = slow.wait_for(3, Duration::from_secs(40));
    let secs = started.elapsed().as_secs_f64();
    assert!(secs < 30.0, "handed-back mail must not wait for the 60 s lease ({secs:.1}s)");
    assert!(c.relays[0].log().contains("handed back to the cluster"), "{}", c.relays[0].log());
    eprintln!(
        "SIGTERM hand back: 3 in-flight messages delivered by the other node in {secs:.1}s ({} copies at the sink)",
        got.len()
    );
}

#[test]
fn sessions_are_reused_for_the_next_message_to_the_same_destination() {
    let dest = Destination::start();
    let c = Cluster::start(1, &[(LISTED, "127.0.0.1", dest.port)], &[]);
    // One client session, each message sent once the previous one arrived:
    // the next delivery comes well inside the 2 s a session is kept, with
    // no process start (swaks) in between.
    let mut client = Raw::ehlo(&c.addr());
    for i in 0..5 {
        let r = client.message(SENDER, &format!("r{i}@friet.pan"), "Subject: reuse\r\n\r\nbody\r\n");
        assert!(r.starts_with("250 2.0.0"), "{r}");
        dest.wait_for(i + 1, Duration::from_secs(20));
    }
    assert!(dest.connections() < 5, "{} connections for 5 messages", dest.connections());
    assert!(c.relays[0].value("mxrelay_delivery_connections_reused_total") >= 1.0);
}

#[test]
fn a_cached_session_the_server_closed_is_replaced_without_deferring() {
    // The destination hangs up after each message: every cached session
    // the node takes for the next one is found dead at MAIL.
    let dest = Destination::start();
    dest.set_close_after_message(true);
    let c = Cluster::start(1, &[(LISTED, "127.0.0.1", dest.port)], &[]);
    let mut client = Raw::ehlo(&c.addr());
    for i in 0..5 {
        let r = client.message(SENDER, &format!("c{i}@friet.pan"), "Subject: closed\r\n\r\nbody\r\n");
        assert!(r.starts_with("250 2.0.0"), "{r}");
        dest.wait_for(i + 1, Duration::from_secs(20));
    }
    let relay = &c.relays[0];
    wait_until("the fifth delivery logged", Duration::from_secs(10), || relay.log().contains("to=<c4@friet.pan>"));
    assert!(
        relay.value("mxrelay_delivery_connections_reused_total") >= 1.0,
        "a closed session was taken from the cache"
    );
    assert!(!relay.log().contains("status=deferred"), "nothing deferred:\n{}", relay.log());
    let mut rcpts: Vec<String> = dest.messages().iter().flat_map(|m| m.rcpts.clone()).collect();
    rcpts.sort();
    assert_eq!(rcpts, (0..5).map(|i| format!("c{i}@friet.pan")).collect::<Vec<_>>(), "each once");
    assert_eq!(dest.connections(), 5, "a new session for each message");
}

#[test]
fn a_reused_session_lost_after_the_content_is_deferred_not_sent_again_at_once() {
    // The destination records the second message of each session, then
    // hangs up without its final reply: it has the message, the node
    // cannot know. Only a session lost before the content may be replaced
    // at once; this one is deferred, as Postfix does ("may be sent more
    // than once"), and no second copy comes now.
    let dest = Destination::start();
    dest.set_hang_up_at_message(2);
    let c = Cluster::start(
        1,
        &[(LISTED, "127.0.0.1", dest.port)],
        &[
            ("MXRELAY_DELIVERY_RETRY_MIN", "1h"),
            ("MXRELAY_DELIVERY_RETRY_MAX", "1h"),
            ("MXRELAY_DELIVERY_PROBE_INTERVAL", "1h"),
        ],
    );
    let relay = &c.relays[0];
    let mut client = Raw::ehlo(&c.addr());
    for (i, to) in ["h0@friet.pan", "h1@friet.pan"].iter().enumerate() {
        let r = client.message(SENDER, to, "Subject: hang up\r\n\r\nbody\r\n");
        assert!(r.starts_with("250 2.0.0"), "{r}");
        dest.wait_for(i + 1, Duration::from_secs(20));
    }
    wait_until("the second message deferred", Duration::from_secs(20), || {
        relay.log().contains("to=<h1@friet.pan>") && relay.log().contains("status=deferred")
    });
    assert!(relay.value("mxrelay_delivery_connections_reused_total") >= 1.0, "the second went on the cached session");
    let log = relay.log();
    assert!(log.contains("lost connection after end of data"), "{log}");
    let rcpts: Vec<String> = dest.messages().iter().flat_map(|m| m.rcpts.clone()).collect();
    assert_eq!(rcpts, ["h0@friet.pan", "h1@friet.pan"], "one copy each, none sent again at once");
    assert_eq!(dest.connections(), 1);
}

#[test]
fn etrn_and_queue_flush_release_deferred_mail() {
    let (down_a, down_b) = (DownPort::new(), DownPort::new());
    let c = Cluster::start(
        1,
        &[(LISTED, "127.0.0.1", down_a.port), ("named.example", "127.0.0.1", down_b.port)],
        &[
            ("MXRELAY_DELIVERY_RETRY_MIN", "120s"),
            ("MXRELAY_DELIVERY_RETRY_MAX", "1h"),
            ("MXRELAY_DELIVERY_PROBE_INTERVAL", "1h"),
        ],
    );
    for to in ["a@friet.pan", "b@named.example"] {
        let (code, out) = swaks(&c.addr(), &["--from", SENDER, "--to", to, "--helo", "client.example"]);
        assert_eq!(code, 0, "{out}");
    }
    let mut q = c.relays[0].queue(SHARED_REDIS);
    wait_until("both deferred", Duration::from_secs(20), || q.deferred_count() == 2);
    let a = Destination::start_on(down_a.release());
    let b = Destination::start_on(down_b.release());

    let mut untrusted = Raw::ehlo(&c.addr());
    assert!(untrusted.cmd("ETRN friet.pan").starts_with("459 4.7.1"));
    let mut trusted = Raw::connect_from("127.0.0.9", &c.addr());
    assert_eq!(trusted.code(), 220);
    assert_eq!(trusted.code_after("EHLO client.example"), 250);
    let r = trusted.cmd("ETRN friet.pan");
    assert!(r.starts_with("253 2.0.0"), "{r}");
    a.wait_for(1, Duration::from_secs(10));
    assert!(b.messages().is_empty(), "ETRN released only its domain");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mxrelay"))
        .args(["queue", "flush"])
        .env("MXRELAY_QUEUE_PREFIX", &c.relays[0].prefix)
        .env("MXRELAY_QUEUE_URL", SHARED_REDIS)
        .env("MXRELAY_DOMAINS_URL", c._db.url())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("released 1"), "{}", String::from_utf8_lossy(&out.stdout));
    b.wait_for(1, Duration::from_secs(10));
}

#[test]
fn mail_still_undeliverable_after_max_queue_lifetime_is_bounced() {
    let home = Destination::start();
    let down = DownPort::new();
    let c = Cluster::start(
        1,
        &[(LISTED, "127.0.0.1", home.port), ("named.example", "127.0.0.1", down.port)],
        &[("MXRELAY_DELIVERY_MAX_QUEUE_LIFETIME", "2s")],
    );
    let (code, out) =
        swaks(&c.addr(), &["--from", "bob@friet.pan", "--to", "x@named.example", "--helo", "client.example"]);
    assert_eq!(code, 0, "{out}");
    let got = home.wait_for(1, Duration::from_secs(30));
    assert_eq!(got[0].mail_from, "");
    assert_eq!(got[0].rcpts, vec!["bob@friet.pan"]);
    let dsn = String::from_utf8_lossy(&got[0].data);
    assert!(dsn.contains("Final-Recipient: rfc822; x@named.example") && dsn.contains("Status: 4.4.7"), "{dsn}");
    let mut q = c.relays[0].queue(SHARED_REDIS);
    wait_until("expired message removed", Duration::from_secs(10), || q.message_count() == 0);
}

/// A destination that took some recipients and refused one with 4xx (a
/// full mailbox) is up: its later successes do not release that message
/// early (fast drain is for destinations that were down), it waits for
/// its backoff.
#[test]
fn a_recipient_4xx_at_a_destination_that_is_up_waits_for_its_backoff() {
    let dest = Destination::start();
    let c = Cluster::start(
        1,
        &[(LISTED, "127.0.0.1", dest.port)],
        &[
            ("MXRELAY_DELIVERY_RETRY_MIN", "120s"),
            ("MXRELAY_DELIVERY_RETRY_MAX", "1h"),
            ("MXRELAY_DELIVERY_PROBE_INTERVAL", "1h"),
        ],
    );
    let (code, out) =
        swaks(&c.addr(), &["--from", SENDER, "--to", "ok@friet.pan,temp1@friet.pan", "--helo", "client.example"]);
    assert_eq!(code, 0, "{out}");
    let mut q = c.relays[0].queue(SHARED_REDIS);
    wait_until("deferred for temp1", Duration::from_secs(20), || q.deferred_count() == 1);
    for i in 0..3 {
        let (code, out) =
            swaks(&c.addr(), &["--from", SENDER, "--to", &format!("later{i}@friet.pan"), "--helo", "client.example"]);
        assert_eq!(code, 0, "{out}");
        dest.wait_for(2 + i, Duration::from_secs(20));
    }
    // Each later message was delivered and settled before the next was sent.
    wait_until("later messages settled", Duration::from_secs(10), || q.message_count() == 1);
    let log = c.relays[0].log();
    assert_eq!(log.matches("to=<temp1@friet.pan>").count(), 1, "temp1 retried before its backoff:\n{log}");
    assert!(!log.contains("releasing its deferred messages"), "{log}");
    assert_eq!(q.deferred_count(), 1);
}

/// Mail whose destination is the node itself is never relayed to it, the
/// way Postfix refuses it ("mail for … loops back to myself"): a
/// `relay_host` naming the node's own listener, and a peer (Postfix's
/// smtp-sink) that greets with the node's own host name. Both are
/// deferred with 4.4.6, logged and counted; the node takes no second copy
/// and the peer none, so nothing ping-pongs up to `hop_count_limit`.
#[test]
fn mail_that_would_loop_back_to_the_node_is_deferred_not_relayed_to_itself() {
    let echo = SmtpSink::start_with(&["-h", "relay.test"]);
    let dns = Dns::start(&["sender.example"], &["self.example", "echo.example"]);
    let db = TestDb::create(&MysqlServer::shared());
    db.exec(include_str!("../../migrations/mysql/0001_domains.sql"));
    db.add_domain("echo.example", "127.0.0.1", echo.port);
    let relay = Relay::spawn_with_env(
        &base_config(&db.url(), SHARED_REDIS, &dns),
        &[("MXRELAY_DELIVERY_ENABLED", "true"), RELOAD_ON_SIGHUP_ONLY],
    );
    db.add_domain("self.example", "127.0.0.1", relay.port);
    relay.signal("HUP");
    wait_rcpt(&relay.addr(), "probe@self.example", 250);
    for to in ["a@self.example", "b@echo.example"] {
        let (code, out) = swaks(&relay.addr(), &["--from", SENDER, "--to", to, "--helo", "client.example"]);
        assert_eq!(code, 0, "{out}");
    }
    wait_until("both loops counted", Duration::from_secs(20), || {
        relay.value("mxrelay_delivery_attempts_total{result=\"loop\"}") >= 2.0
    });
    let log = relay.log();
    for (to, host) in [("a@self.example", "127.0.0.1"), ("b@echo.example", "127.0.0.1")] {
        let deferred = log.lines().find(|l| l.contains(&format!("to=<{to}>")) && l.contains("status=deferred"));
        let deferred = deferred.unwrap_or_else(|| panic!("{to} deferred:\n{log}"));
        assert!(deferred.contains(&format!("4.4.6 mail for {host} loops back to myself")), "{deferred}");
    }
    assert!(log.contains("correct relay_host of its domain"), "{log}");
    assert_eq!(relay.value("mxrelay_smtp_messages_total{result=\"accepted\"}"), 2.0, "no copy came back to the node");
    assert!(echo.messages().is_empty(), "the peer greeting with our name got no mail");
}

/// The same across the cluster: a `relay_host` naming another node (or a
/// balancer in front of the nodes) is seen by that node's greeting, since
/// every node says its `myhostname` to the shared queue. The delivering
/// node defers the mail; the other node never takes a copy.
#[test]
fn mail_that_would_loop_into_another_node_of_the_cluster_is_deferred() {
    let dns = Dns::start(&["sender.example"], &["peer.example"]);
    let db = TestDb::create(&MysqlServer::shared());
    db.exec(include_str!("../../migrations/mysql/0001_domains.sql"));
    let config = base_config(&db.url(), SHARED_REDIS, &dns);
    let prefix = unique("mxrq");
    // b only receives; a delivers, to b.
    let b = Relay::spawn_in_queue(&config, &[("MXRELAY_MYHOSTNAME", "b.relay.test")], &prefix);
    let a = Relay::spawn_in_queue(
        &config,
        &[("MXRELAY_MYHOSTNAME", "a.relay.test"), ("MXRELAY_DELIVERY_ENABLED", "true")],
        &prefix,
    );
    db.add_domain("peer.example", "127.0.0.1", b.port);
    wait_until("a knows b", Duration::from_secs(20), || {
        a.log().lines().any(|l| l.contains("cluster nodes (by myhostname): a.relay.test, b.relay.test"))
    });
    wait_rcpt(&a.addr(), "probe@peer.example", 250);
    let (code, out) = swaks(&a.addr(), &["--from", SENDER, "--to", "x@peer.example", "--helo", "client.example"]);
    assert_eq!(code, 0, "{out}");
    wait_until("the loop counted", Duration::from_secs(20), || {
        a.value("mxrelay_delivery_attempts_total{result=\"loop\"}") >= 1.0
    });
    let log = a.log();
    let line = log.lines().find(|l| l.contains("loops back to myself: ")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("it greeted with the name of a node of this cluster, b.relay.test"), "{line}");
    assert_eq!(b.value("mxrelay_smtp_messages_total{result=\"accepted\"}"), 0.0, "b took no copy");
}

/// Postfix's `delay_warning_time`: once a message has waited that long,
/// its sender gets one "delayed" DSN (RFC 3464 `Action: delayed`, with
/// `Will-Retry-Until:`), however many attempts follow; delivery goes on.
#[test]
fn a_message_still_deferred_after_delay_warning_time_gets_one_delayed_dsn() {
    let home = Destination::start();
    let down = DownPort::new();
    let c = Cluster::start(
        1,
        &[(LISTED, "127.0.0.1", home.port), ("named.example", "127.0.0.1", down.port)],
        &[("MXRELAY_DELIVERY_DELAY_WARNING_TIME", "2s")],
    );
    let (code, out) =
        swaks(&c.addr(), &["--from", "bob@friet.pan", "--to", "x@named.example", "--helo", "client.example"]);
    assert_eq!(code, 0, "{out}");
    let id = queued_id(&out).unwrap();
    let got = home.wait_for(1, Duration::from_secs(30));
    assert_eq!((got[0].mail_from.as_str(), got[0].rcpts.as_slice()), ("", &["bob@friet.pan".to_string()][..]));
    let dsn = String::from_utf8_lossy(&got[0].data);
    assert!(dsn.contains("Subject: Delayed Mail (still being retried)"), "{dsn}");
    assert!(dsn.contains("Final-Recipient: rfc822; x@named.example\r\nAction: delayed\r\nStatus: 4.4.1"), "{dsn}");
    assert!(dsn.contains("Will-Retry-Until: "), "{dsn}");
    // More attempts follow (retry_min 1 s), and no second warning.
    let mut q = c.relays[0].queue(SHARED_REDIS);
    let attempts_now = q.envelope(&id)["attempts"].parse::<u32>().unwrap();
    wait_until("three more attempts", Duration::from_secs(30), || {
        q.try_envelope(&id).is_some_and(|e| e["attempts"].parse::<u32>().unwrap_or(0) >= attempts_now + 3)
    });
    assert_eq!(home.messages().len(), 1, "one warning per message");
    assert_eq!(c.relays[0].value("mxrelay_delivery_delay_warnings_total"), 1.0);
    assert_eq!(c.relays[0].value("mxrelay_delivery_dsn_total"), 0.0, "a warning is not a bounce");
    assert!(q.envelope(&id)["recipients"].contains("\"delay_warned\":true"), "marked in the queue");
}
