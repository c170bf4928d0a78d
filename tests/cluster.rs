//! Several nodes on one queue, with real failures: a node killed with
//! SIGKILL mid-run, a destination down at first, Redis restarted. Every
//! message a node accepted arrives at least once; duplicates are counted.

mod support;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant};

use support::sink::SmtpSink;
use support::*;

/// Queue ids a node logged as accepted (logged after the commit, before 250).
fn queued_ids(relay: &Relay) -> HashSet<String> {
    relay
        .log()
        .lines()
        .filter(|l| l.contains("(queue active)"))
        .filter_map(|l| l.split(": client=").next()?.rsplit(' ').next().map(str::to_string))
        .collect()
}

/// Our queue id from the `Received:` header of a delivered message.
fn delivered_id(content: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(content);
    let after = text.split("(mxrelay node ").nth(1)?.split(" id ").nth(1)?;
    Some(after.split(|c: char| c.is_whitespace() || c == ';').next()?.to_string())
}

fn dns_and_db() -> (Dns, TestDb) {
    let dns = Dns::start(&["sender.example", "mx.named.example"], &[LISTED, "named.example"]);
    let db = TestDb::create(&MysqlServer::shared());
    db.exec(include_str!("../migrations/mysql/0001_domains.sql"));
    (dns, db)
}

#[test]
fn three_nodes_one_killed_destination_down_at_first_nothing_lost() {
    let up = SmtpSink::start();
    let down_port = free_port();
    let (dns, db) = dns_and_db();
    db.add_domain(LISTED, "127.0.0.1", up.port);
    db.add_domain("named.example", "127.0.0.1", down_port);
    let prefix = unique("mxrq");
    let config = base_config(&db.url(), SHARED_REDIS, &dns);
    let env = |node: &'static str| {
        vec![
            ("MXRELAY_DELIVERY_ENABLED", "true"),
            ("MXRELAY_NODE_ID", node),
            ("MXRELAY_QUEUE_LEASE", "5s"),
            ("MXRELAY_DELIVERY_RETRY_MIN", "30s"),
            ("MXRELAY_DELIVERY_RETRY_MAX", "1h"),
        ]
    };
    let mut nodes: Vec<Relay> =
        ["node-a", "node-b", "node-c"].iter().map(|n| Relay::spawn_in_queue(&config, &env(n), &prefix)).collect();
    let started = Instant::now();
    let injectors: Vec<_> = nodes
        .iter()
        .flat_map(|n| [(n.addr(), "load@friet.pan"), (n.addr(), "load@named.example")])
        .map(|(addr, to)| {
            std::thread::spawn(move || {
                Command::new("/usr/sbin/smtp-source")
                    .args(["-s", "5", "-m", "500", "-l", "1024", "-M", "client.example", "-f", SENDER, "-t", to])
                    .arg(addr)
                    .output()
                    .expect("smtp-source")
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    nodes[1].kill(); // SIGKILL, mid-run
    let killed_at = started.elapsed();
    for i in injectors {
        let _ = i.join();
    }
    let accepted: HashSet<String> = nodes.iter().flat_map(queued_ids).collect();
    assert!(accepted.len() > 2000, "only {} accepted", accepted.len());
    // The destination that was down comes up.
    let down = SmtpSink::start_on(down_port);
    let deadline = Instant::now() + Duration::from_secs(120);
    let arrived = loop {
        let mut all = up.messages();
        all.extend(down.messages());
        let ids: Vec<String> = all.iter().filter_map(|m| delivered_id(&m.content)).collect();
        let unique: HashSet<&String> = ids.iter().collect();
        if accepted.iter().all(|id| unique.contains(id)) {
            break ids;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} accepted messages arrived",
            accepted.iter().filter(|i| unique.contains(i)).count(),
            accepted.len()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let mut counts: HashMap<&String, usize> = HashMap::new();
    arrived.iter().for_each(|id| *counts.entry(id).or_default() += 1);
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    eprintln!(
        "cluster: 3 nodes, node-b killed at {:.1}s; {} accepted, all arrived after {:.1}s; {} duplicate deliveries",
        killed_at.as_secs_f64(),
        accepted.len(),
        started.elapsed().as_secs_f64(),
        duplicates
    );
    let takeovers: usize = nodes.iter().map(|n| n.log().matches("taken over by").count()).sum();
    eprintln!("cluster: {takeovers} leases taken over from the killed node");
}

#[test]
fn redis_restart_with_aof_loses_no_accepted_message() {
    let sink = SmtpSink::start();
    let (dns, db) = dns_and_db();
    db.add_domain(LISTED, "127.0.0.1", sink.port);
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let relay = Relay::spawn_with_env(
        &base_config(&db.url(), &redis.url(), &dns),
        &[("MXRELAY_DELIVERY_ENABLED", "true"), ("MXRELAY_DELIVERY_RETRY_MIN", "1s")],
    );
    let addr = relay.addr();
    let sender = std::thread::spawn(move || {
        let mut ids = Vec::new();
        let mut refused = 0;
        for i in 0..60 {
            let (_, out) =
                swaks(&addr, &["--from", SENDER, "--to", &format!("r{i}@friet.pan"), "--helo", "client.example"]);
            match queued_id(&out) {
                Some(id) => ids.push(id),
                None => refused += 1,
            }
            std::thread::sleep(Duration::from_millis(40));
        }
        (ids, refused)
    });
    std::thread::sleep(Duration::from_millis(1000));
    redis.stop();
    std::thread::sleep(Duration::from_millis(1000));
    redis.resume();
    let (ids, refused) = sender.join().unwrap();
    assert!(!ids.is_empty());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let arrived: HashSet<String> = sink.messages().iter().filter_map(|m| delivered_id(&m.content)).collect();
        let missing: Vec<_> = ids.iter().filter(|id| !arrived.contains(*id)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "accepted but never delivered: {missing:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("redis restart: {} accepted (all delivered), {refused} answered 451 while Redis was down", ids.len());
}
