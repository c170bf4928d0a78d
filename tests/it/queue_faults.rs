//! The queue's promises end to end, against running nodes and real peers
//! (swaks, smtp-sink, a private Redis that is flushed, restarted or cut
//! from its replica): a Redis that came back empty is read again without a
//! restart, a body that lost its first chunks is refused, a message the
//! replicas did not confirm is never delivered, a delivery never sends a
//! short body, a node never holds more leases than it works on, the prober
//! scans no keyspace, a DSN to a UTF-8 sender says SMTPUTF8, and the
//! housekeeping of what crashes and bad data leave behind is counted.

use std::time::{Duration, Instant};

use crate::support::destination::Destination;
use crate::support::sink::SmtpSink;
use crate::support::*;

fn send(relay: &Relay, to: &str) -> (i32, String) {
    swaks(&relay.addr(), &["--from", SENDER, "--to", to, "--helo", "client.example"])
}

fn dns_and_db() -> (Dns, TestDb) {
    let dns = Dns::start(&["sender.example", "client.example"], &[LISTED]);
    let db = TestDb::create(&MysqlServer::shared());
    db.exec(include_str!("../../migrations/mysql/0001_domains.sql"));
    (dns, db)
}

fn delivering(db: &TestDb, dns: &Dns, redis_url: &str, env: &[(&str, &str)]) -> Relay {
    let mut env = env.to_vec();
    env.push(("MXRELAY_DELIVERY_ENABLED", "true"));
    Relay::spawn_with_env(&base_config(&db.url(), redis_url, dns), &env)
}

fn info(redis: &RedisServer, section: &str) -> String {
    let mut conn = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    redis::cmd("INFO").arg(section).query(&mut conn).unwrap()
}

#[test]
fn a_redis_that_restarts_empty_is_read_again_without_restarting_the_node() {
    let sink = SmtpSink::start();
    let (dns, db) = dns_and_db();
    db.add_domain(LISTED, "127.0.0.1", sink.port);
    let mut redis = RedisServer::start(); // keeps nothing on disk
    let relay = delivering(&db, &dns, &redis.url(), &[]);
    wait_until("listed", Duration::from_secs(15), || send(&relay, "first@friet.pan").0 == 0);
    sink.wait_for(1, Duration::from_secs(20));

    redis.stop();
    redis.resume(); // empty: no stream, no consumer group
    wait_until("ready again", Duration::from_secs(20), || relay.http_get("/readyz").starts_with("HTTP/1.1 200"));
    // Nothing was sent since: only a read path can have made the groups.
    assert!(relay.value("mxrelay_queue_groups_recreated_total") >= 1.0);
    wait_until("redis back", Duration::from_secs(20), || send(&relay, "again0@friet.pan").0 == 0);
    for i in 1..5 {
        assert_eq!(send(&relay, &format!("again{i}@friet.pan")).0, 0);
    }
    let got = sink.wait_for(6, Duration::from_secs(30));
    assert_eq!(got.len(), 6, "all mail accepted after the empty restart is delivered");
    assert!(relay.http_get("/readyz").starts_with("HTTP/1.1 200"));
    let (ok, out) = relay.cli(&["queue", "stats"]);
    assert!(ok, "queue stats after an empty restart: {out}");
}

#[test]
fn a_node_started_before_redis_becomes_ready_and_delivers_by_itself() {
    let sink = SmtpSink::start();
    let (dns, db) = dns_and_db();
    db.add_domain(LISTED, "127.0.0.1", sink.port);
    let mut redis = RedisServer::start();
    redis.stop();
    let relay = delivering(&db, &dns, &redis.url(), &[]);
    assert!(relay.http_get("/readyz").starts_with("HTTP/1.1 503"));
    redis.resume();
    wait_until("ready", Duration::from_secs(20), || relay.http_get("/readyz").starts_with("HTTP/1.1 200"));
    wait_until("accepted", Duration::from_secs(15), || send(&relay, "late@friet.pan").0 == 0);
    sink.wait_for(1, Duration::from_secs(20));
}

/// Sentinels that do not answer: the start-up log and `/readyz` name
/// `queue.url`, DATA gets 451, and the node becomes ready by itself once a
/// Sentinel answers on that address.
#[test]
fn a_node_whose_sentinels_do_not_answer_names_queue_url_and_becomes_ready_when_they_do() {
    let sink = SmtpSink::start();
    let (dns, db) = dns_and_db();
    db.add_domain(LISTED, "127.0.0.1", sink.port);
    let primary = RedisServer::start();
    let down = DownPort::new();
    let url = format!("redis+sentinel://127.0.0.1:{}/{}", down.port, crate::support::sentinel::MASTER);
    let relay = delivering(&db, &dns, &url, &[]);
    wait_until("the start-up error logged", Duration::from_secs(15), || {
        relay.log().contains("queue not reachable at start")
    });
    assert!(relay.log().contains("the Sentinels of queue.url have named no reachable primary yet"), "{}", relay.log());
    let ready = relay.http_get("/readyz");
    assert!(ready.starts_with("HTTP/1.1 503") && ready.contains("queue.url"), "{ready}");
    assert_ne!(send(&relay, "early@friet.pan").0, 0, "no queue, no 250");
    let _sentinel = crate::support::sentinel::Sentinels::start_on(primary.port, &[down.release()], 0);
    wait_until("ready", Duration::from_secs(20), || relay.http_get("/readyz").starts_with("HTTP/1.1 200"));
    wait_until("accepted", Duration::from_secs(15), || send(&relay, "late@friet.pan").0 == 0);
    sink.wait_for(1, Duration::from_secs(20));
}

/// The same for a Redis Cluster none of whose listed nodes answers.
#[test]
fn a_node_whose_cluster_does_not_answer_names_queue_url_and_answers_451() {
    let (dns, db) = dns_and_db();
    let (destination, down) = (DownPort::new(), DownPort::new());
    db.add_domain(LISTED, "127.0.0.1", destination.port);
    let url = format!("redis+cluster://127.0.0.1:{}", down.port);
    let relay = delivering(&db, &dns, &url, &[]);
    wait_until("the start-up error logged", Duration::from_secs(15), || {
        relay.log().contains("queue not reachable at start")
    });
    assert!(
        relay.log().contains("no node of the cluster in queue.url has named the primary of shard"),
        "{}",
        relay.log()
    );
    let ready = relay.http_get("/readyz");
    assert!(ready.starts_with("HTTP/1.1 503") && ready.contains("queue.url"), "{ready}");
    let (code, transcript) = send(&relay, "early@friet.pan");
    assert_ne!(code, 0, "no queue, no 250: {transcript}");
    assert!(transcript.contains("451 4.3.0"), "{transcript}");
}

#[test]
fn bdat_chunks_lost_before_last_give_451_and_queue_nothing() {
    let w = World::start_with(&[("MXRELAY_QUEUE_CHUNK_SIZE", "4096")]);
    let mut c = Raw::ehlo(&w.relay.addr());
    assert!(c.cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("250"));
    assert!(c.cmd("RCPT TO:<t@friet.pan>").starts_with("250"));
    let head = format!("Subject: chunked\r\n\r\n{}", "0123456789abcde\r\n".repeat(600));
    c.send(&format!("BDAT {}\r\n", head.len()));
    c.send(&head);
    assert!(c.reply().starts_with("250 2.0.0 Ok"));
    let mut q = w.queue();
    let tmp = q.stray_keys();
    assert_eq!(tmp.len(), 1, "the first chunks are in a temporary key: {tmp:?}");
    let mut conn = redis::Client::open(SHARED_REDIS).unwrap().get_connection().unwrap();
    let _: () = redis::cmd("DEL").arg(&tmp).query(&mut conn).unwrap();
    // The next chunk is large enough to be spilled: it recreates the key.
    let more = "fedcba987654321\r\n".repeat(600);
    c.send(&format!("BDAT {}\r\n{more}", more.len()));
    assert!(c.reply().starts_with("250"), "BDAT answers per chunk; the loss shows at LAST");
    c.send("BDAT 7 LAST\r\nthe end");
    let r = c.reply();
    assert!(r.starts_with("451 4.3.0"), "a message without its start must not be queued: {r}");
    assert_eq!(q.message_count(), 0);
    assert!(q.ready_ids().is_empty());
}

#[test]
fn an_abandoned_transfer_leaves_no_temporary_chunks() {
    let w = World::start_with(&[("MXRELAY_QUEUE_CHUNK_SIZE", "4096")]);
    let mut c = Raw::ehlo(&w.relay.addr());
    assert!(c.cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("250"));
    assert!(c.cmd("RCPT TO:<t@friet.pan>").starts_with("250"));
    assert_eq!(c.code_after("DATA"), 354);
    c.send(&format!("Subject: cut\r\n\r\n{}", "0123456789abcde\r\n".repeat(2000)));
    let mut q = w.queue();
    wait_until("chunks spilled", Duration::from_secs(10), || !q.stray_keys().is_empty());
    drop(c); // the client goes away mid-DATA
    wait_until("temporary chunks removed", Duration::from_secs(10), || q.stray_keys().is_empty());
}

#[test]
fn mail_the_replicas_did_not_confirm_is_never_delivered_and_wait_blocks_nothing_else() {
    let sink = SmtpSink::start();
    let (dns, db) = dns_and_db();
    db.add_domain(LISTED, "127.0.0.1", sink.port);
    let primary = RedisServer::start();
    let mut replica = RedisServer::replica_of(&primary);
    let relay = delivering(
        &db,
        &dns,
        &primary.url(),
        &[("MXRELAY_QUEUE_MIN_REPLICAS_ACK", "1"), ("MXRELAY_QUEUE_REPLICAS_ACK_TIMEOUT", "4s")],
    );
    wait_until("replica in sync", Duration::from_secs(30), || send(&relay, "first@friet.pan").0 == 0);
    sink.wait_for(1, Duration::from_secs(20));

    replica.stop();
    wait_until("replica gone", Duration::from_secs(20), || {
        info(&primary, "replication").contains("connected_slaves:0")
    });
    // A client retrying a refused message gets 451 each time, and no copy.
    for _ in 0..3 {
        let (_, out) = send(&relay, "retried@friet.pan");
        assert!(out.contains("451 4.3.0"), "{out}");
    }
    // Twenty at once: all wait for the replica on connections of their own;
    // the node's other Redis traffic (here /readyz) does not wait behind them.
    let addr = relay.addr();
    let senders: Vec<_> = (0..20)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                swaks(&addr, &["--from", SENDER, "--to", &format!("many{i}@friet.pan"), "--helo", "client.example"])
            })
        })
        .collect();
    // Asked while commits are blocked in WAIT (as Redis counts them), and
    // answered while they still are: /readyz did not wait behind them.
    let waiting = || {
        info(&primary, "clients").lines().find_map(|l| l.strip_prefix("blocked_clients:")?.trim().parse::<u32>().ok())
    };
    wait_until("commits waiting for the replica", Duration::from_secs(4), || waiting() >= Some(1));
    assert!(relay.http_get("/readyz").starts_with("HTTP/1.1 200"), "readyz waited behind WAIT");
    assert!(waiting() >= Some(1), "/readyz answered only once no commit was waiting");
    for s in senders {
        let (_, out) = s.join().unwrap();
        assert!(out.contains("451 4.3.0"), "{out}");
    }

    // The replica comes back; one more message goes through. Had any refused
    // message been deliverable, it would have arrived first.
    replica.resume();
    wait_until("replica back", Duration::from_secs(30), || send(&relay, "last@friet.pan").0 == 0);
    let got = sink.wait_for(2, Duration::from_secs(20));
    let rcpts: Vec<&str> = got.iter().flat_map(|m| m.rcpts.iter().map(String::as_str)).collect();
    assert_eq!(rcpts, vec!["first@friet.pan", "last@friet.pan"], "refused mail was delivered");
    let mut q = relay.queue(&primary.url());
    wait_until("queue empty", Duration::from_secs(10), || q.message_count() == 0);
    assert!(q.stray_keys().is_empty());
}

#[test]
fn a_message_deleted_during_its_delivery_is_not_sent_short() {
    // smtp-sink waits 3 s before answering DATA: the body is read after
    // that, but for its first piece (read with the envelope): with pieces
    // of 4 KiB, most of a 20 KB message is read after the delete.
    let sink = SmtpSink::start_with(&["-w", "3"]);
    let (dns, db) = dns_and_db();
    db.add_domain(LISTED, "127.0.0.1", sink.port);
    let relay = delivering(&db, &dns, SHARED_REDIS, &[("MXRELAY_QUEUE_CHUNK_SIZE", "4096")]);
    let body = "twenty kilobytes of text in lines of forty\n".repeat(500);
    let id = wait_until_value("listed", Duration::from_secs(15), || {
        let args = ["--from", SENDER, "--to", "doomed@friet.pan", "--helo", "client.example", "--body", &body];
        queued_id(&swaks(&relay.addr(), &args).1)
    });
    let mut q = relay.queue(SHARED_REDIS);
    wait_until("being delivered", Duration::from_secs(10), || q.leased() == 1);
    let (ok, out) = relay.cli(&["queue", "delete", &id]);
    assert!(ok, "{out}");
    wait_until("the attempt gave up", Duration::from_secs(15), || {
        relay.log().contains("result of this attempt is dropped")
    });
    assert!(sink.messages().is_empty(), "a short copy was delivered: {:?}", sink.messages());
    assert!(relay.log().contains("bytes stored"), "the short read is named:\n{}", relay.log());
}

#[test]
fn a_node_holds_only_the_leases_it_works_on() {
    let sink = SmtpSink::start_with(&["-w", "1"]);
    let (dns, db) = dns_and_db();
    db.add_domain(LISTED, "127.0.0.1", sink.port);
    let relay = delivering(
        &db,
        &dns,
        SHARED_REDIS,
        &[("MXRELAY_DELIVERY_CONCURRENCY", "1"), ("MXRELAY_QUEUE_SHARDS", "4"), ("MXRELAY_QUEUE_LEASE", "3s")],
    );
    wait_until("listed", Duration::from_secs(15), || send(&relay, "m0@friet.pan").0 == 0);
    for i in 1..6 {
        assert_eq!(send(&relay, &format!("m{i}@friet.pan")).0, 0);
    }
    let mut q = relay.queue(SHARED_REDIS);
    let mut most = 0;
    let started = Instant::now();
    while sink.messages().len() < 6 {
        most = most.max(q.leased());
        assert!(started.elapsed() < Duration::from_secs(40), "only {} delivered", sink.messages().len());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(most, 1, "with one delivery slot, at most one lease at a time");
    assert_eq!(relay.value("mxrelay_queue_lease_takeovers_total"), 0.0);
    assert_eq!(sink.messages().len(), 6, "no message twice");
}

#[test]
fn the_prober_finds_deferred_destinations_without_scanning_the_keyspace() {
    let down = DownPort::new();
    let (dns, db) = dns_and_db();
    db.add_domain(LISTED, "127.0.0.1", down.port);
    let redis = RedisServer::start();
    let relay = delivering(
        &db,
        &dns,
        &redis.url(),
        &[("MXRELAY_DELIVERY_RETRY_MIN", "30s"), ("MXRELAY_DELIVERY_RETRY_MAX", "1h"), ("MXRELAY_QUEUE_SHARDS", "1")],
    );
    wait_until("listed", Duration::from_secs(15), || send(&relay, "wait@friet.pan").0 == 0);
    let mut q = relay.queue(&redis.url());
    wait_until("deferred", Duration::from_secs(15), || q.deferred_count() == 1);
    let calls = |name: &str| -> u64 {
        info(&redis, "commandstats")
            .lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{name}:calls=")))
            .and_then(|v| v.split(',').next()?.parse().ok())
            .unwrap_or(0)
    };
    let (scans, probes) = (calls("scan"), calls("smembers"));
    // probe_interval is 1 s, one shard: wait for three probes of the index.
    wait_until("three probes", Duration::from_secs(15), || calls("smembers") >= probes + 3);
    assert_eq!(calls("scan"), scans, "the prober scanned the keyspace");
}

#[test]
fn a_dsn_to_a_utf8_sender_is_sent_with_smtputf8() {
    let dest = Destination::start();
    let dns = Dns::start(&["sender.example", "client.example"], &[LISTED]);
    let db = TestDb::create(&MysqlServer::shared());
    db.exec(include_str!("../../migrations/mysql/0001_domains.sql"));
    db.add_domain(LISTED, "127.0.0.1", dest.port);
    db.add_domain("sender.example", "127.0.0.1", dest.port);
    let relay = delivering(&db, &dns, SHARED_REDIS, &[]);
    wait_until("listed", Duration::from_secs(15), || {
        let mut c = Raw::ehlo(&relay.addr());
        c.cmd("MAIL FROM:<jöe@sender.example> SMTPUTF8");
        c.cmd("RCPT TO:<perm1@friet.pan>").starts_with("250")
    });
    let mut c = Raw::ehlo(&relay.addr());
    assert!(c.cmd("MAIL FROM:<jöe@sender.example> SMTPUTF8").starts_with("250"));
    assert!(c.cmd("RCPT TO:<perm1@friet.pan>").starts_with("250"));
    assert_eq!(c.code_after("DATA"), 354);
    c.send("Subject: refused\r\n\r\nbody\r\n.\r\n");
    assert!(c.reply().starts_with("250"));
    let got = dest.wait_for(1, Duration::from_secs(20));
    let dsn = &got[0];
    assert_eq!((dsn.mail_from.as_str(), dsn.rcpts.clone()), ("", vec!["jöe@sender.example".to_string()]));
    assert!(dsn.mail_params.split_whitespace().any(|p| p == "SMTPUTF8"), "MAIL FROM:<> {}", dsn.mail_params);
}

#[test]
fn a_result_the_queue_could_not_store_is_stored_once_redis_is_back() {
    let dest = Destination::start();
    dest.set_final_reply_delay(Duration::from_millis(1500));
    let (dns, db) = dns_and_db();
    db.add_domain(LISTED, "127.0.0.1", dest.port);
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    // queue.lease stays at its 60 s default: the node must not wait for it.
    let relay = delivering(&db, &dns, &redis.url(), &[]);
    wait_until("listed", Duration::from_secs(15), || send(&relay, "once@friet.pan").0 == 0);
    // The destination has the message; Redis dies before the node can
    // record the delivery, and comes back from its AOF.
    dest.wait_for(1, Duration::from_secs(20));
    redis.stop();
    wait_until("the completion failed", Duration::from_secs(15), || {
        relay.log().contains("delivery bookkeeping failed; retrying")
    });
    redis.resume();
    let back = Instant::now();
    let mut q = relay.queue(&redis.url());
    wait_until("completed after Redis came back", Duration::from_secs(15), || q.message_count() == 0);
    assert!(back.elapsed() < Duration::from_secs(15), "waited for the lease to expire");
    assert!(relay.value("mxrelay_queue_bookkeeping_retries_total") >= 1.0);
    assert!(relay.log().contains("delivery result stored after retrying"), "{}", relay.log());
    assert_eq!(dest.messages().len(), 1, "delivered once");
}

/// What an earlier run, a crash and bad data leave in the queue, as a
/// node finds it: entries still leased to its own name (reclaimed at once,
/// not after the lease), a message whose envelope cannot be read (put on
/// hold, then removed after `delivery.max_queue_lifetime`), a replicated
/// commit that never finished, and the consumer of a node gone for good.
/// Each is counted in its metric and logged.
#[test]
fn leftovers_of_crashes_and_unreadable_mail_are_cleaned_up_and_counted() {
    let sink = SmtpSink::start();
    let (dns, db) = dns_and_db();
    db.add_domain(LISTED, "127.0.0.1", sink.port);
    let config = base_config(&db.url(), SHARED_REDIS, &dns);
    let prefix = unique("mxrq");
    let receiver = Relay::spawn_in_queue(&config, &[], &prefix);
    let good = wait_until_value("listed", Duration::from_secs(15), || queued_id(&send(&receiver, "good@friet.pan").1));
    let bad = queued_id(&send(&receiver, "bad@friet.pan").1).expect("queued");
    let mut q = receiver.queue(SHARED_REDIS);
    let bad_msg = q.key_of("msg", &bad);
    let _: () = redis::cmd("HSET").arg(&bad_msg).arg("recipients").arg("{not json").query(q.redis()).unwrap();
    // Both entries leased to this node's name by a run that died.
    let mut streams: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}:*:ready")).query(q.redis()).unwrap();
    streams.sort();
    for stream in &streams {
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("delivery")
            .arg("test-node")
            .arg("COUNT")
            .arg(10)
            .arg("STREAMS")
            .arg(stream)
            .arg(">")
            .query(q.redis())
            .unwrap();
    }
    assert_eq!(q.leased(), 2);
    // A replicated commit staged two minutes ago and never published, and
    // the consumer of a node that is gone.
    let base = streams[0].strip_suffix("ready").unwrap().to_string();
    let staged_id = "01900000-0000-7000-8000-000000000001";
    let _: () =
        redis::cmd("HSET").arg(format!("{base}msg:{staged_id}")).arg("staged").arg("1").query(q.redis()).unwrap();
    let _: () = redis::cmd("SET").arg(format!("{base}body:{staged_id}")).arg("x").query(q.redis()).unwrap();
    let two_minutes_ago = chrono::Utc::now().timestamp_millis() - 120_000;
    let _: () =
        redis::cmd("ZADD").arg(format!("{base}staged")).arg(two_minutes_ago).arg(staged_id).query(q.redis()).unwrap();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATECONSUMER")
        .arg(&streams[0])
        .arg("delivery")
        .arg("gone-node")
        .query(q.redis())
        .unwrap();
    let gone_since = Instant::now();

    // queue.lease 1 s: a consumer idle for ten leases is gone. The
    // quarantined message is kept for an hour (the housekeeping at start
    // may run after the quarantine), then for no time at the restart.
    let env = [("MXRELAY_DELIVERY_ENABLED", "true"), ("MXRELAY_QUEUE_LEASE", "1s")];
    let lifetime = |t: &str| format!("{config}max_queue_lifetime = \"{t}\"\n"); // in [delivery], the last table
    let mut deliverer = Relay::spawn_in_queue(&lifetime("1h"), &env, &prefix);
    let got = sink.wait_for(1, Duration::from_secs(20));
    assert_eq!(got[0].rcpts, ["good@friet.pan"]);
    // Each count goes up before its log line; the quarantine's and the
    // completion's scripts run after theirs, and retire the leases.
    let quarantined = format!("{bad}: envelope unreadable; put on hold");
    wait_until("the quarantine and the housekeeping logged, both leases settled", Duration::from_secs(10), || {
        let log = deliverer.log();
        log.contains(&quarantined) && log.contains("queue housekeeping: staged removed") && q.leased() == 0
    });
    assert_eq!(deliverer.value("mxrelay_queue_quarantined_total"), 1.0);
    assert_eq!(deliverer.value("mxrelay_queue_maintenance_total{action=\"staged_removed\"}"), 1.0);
    assert_eq!(deliverer.value("mxrelay_queue_leases_reclaimed_total"), 2.0);
    assert_eq!(deliverer.value("mxrelay_queue_lease_takeovers_total"), 0.0, "reclaimed, not taken over");
    let log = deliverer.log();
    for id in [&good, &bad] {
        assert!(log.contains(&format!("{id}: leased to test-node but not held")), "{id} reclaimed:\n{log}");
    }
    assert!(q.try_envelope(staged_id).is_none(), "the staged message is gone");
    assert_eq!(q.envelope(&bad).get("corrupt").map(String::as_str), Some("1"), "kept on hold until its lifetime");

    // Housekeeping at the next start: the quarantined message is past its
    // lifetime (now 0 s), the gone node's consumer idle for over ten leases.
    let ghost_idle = Duration::from_secs(10) - gone_since.elapsed().min(Duration::from_secs(10));
    std::thread::sleep(ghost_idle + Duration::from_millis(500)); // the idle time is the input
    deliverer.kill();
    deliverer.rewrite_config(&lifetime("0s"));
    deliverer.start();
    wait_until("both housekeeping lines", Duration::from_secs(10), || {
        let log = deliverer.log();
        log.contains("queue housekeeping: corrupt removed") && log.contains("queue housekeeping: consumers pruned")
    });
    assert_eq!(deliverer.value("mxrelay_queue_maintenance_total{action=\"corrupt_removed\"}"), 1.0);
    assert_eq!(deliverer.value("mxrelay_queue_maintenance_total{action=\"consumers_pruned\"}"), 1.0);
    assert!(q.try_envelope(&bad).is_none(), "the quarantined message is gone");
    assert_eq!(sink.messages().len(), 1, "only the readable message was delivered");
    assert_eq!(q.message_count(), 0);
}
