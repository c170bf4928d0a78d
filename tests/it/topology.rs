//! The cluster as operators run it, end to end, in a network namespace of
//! the test's own (see [`Netns`]): a real sending Postfix that resolves
//! three MX records of equal preference (dnsmasq on the namespace's port
//! 53) and picks among them as any internet MTA does; three mxrelay nodes
//! on port 25 of 127.0.0.11, .12 and .13 sharing a private Redis and a
//! private MariaDB; the domain's primary (`relay_host`) a Postfix
//! smtp-sink on 127.0.0.20:25 that records every message.
//!
//! Each scenario prints its figures (`RELIABILITY_REPORT` collects them).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::support::fleet::{delivered_id, queued_ids, report_line};
use crate::support::haproxy::Haproxy;
use crate::support::netns::Netns;
use crate::support::postfix::{Postfix, PostfixOptions};
use crate::support::prometheus::Prometheus;
use crate::support::sink::{SinkMessage, SmtpSink};
use crate::support::*;

const DOMAIN: &str = "customer.example";
const NODES: [[u8; 4]; 3] = [[127, 0, 0, 11], [127, 0, 0, 12], [127, 0, 0, 13]];
const PRIMARY: [u8; 4] = [127, 0, 0, 20];

/// Everything the scenarios run on. Fields drop in order: the programs
/// first, the namespace they live in last.
struct Topology {
    sender: Postfix,
    nodes: Vec<Option<Relay>>,
    primary: Option<SmtpSink>,
    _redis: RedisServer,
    _db: TestDb,
    _mariadb: MariaDb,
    _dns: Dns,
    _ns: Netns,
}

impl Topology {
    /// The namespace, DNS with the three MX records, the stores, the
    /// nodes and the sending Postfix; the primary runs unless `primary_down`.
    fn start(primary_down: bool, env: &[(&str, &str)]) -> Topology {
        let ns = Netns::enter();
        let mut extra = Vec::new();
        for (i, ip) in NODES.iter().enumerate() {
            let [a, b, c, d] = ip;
            extra.push(format!("--mx-host={DOMAIN},mx{}.{DOMAIN},10", i + 1));
            extra.push(format!("--host-record=mx{}.{DOMAIN},{a}.{b}.{c}.{d}", i + 1));
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let hosts = ["sender.example", "client.example", "postfix.test"];
        let dns = Dns::start_on(|| 53, &hosts, &["loop.example"], &extra);
        let mariadb = MariaDb::start();
        let db = TestDb::create(&mariadb.server);
        db.exec(include_str!("../../migrations/mysql/0001_domains.sql"));
        db.add_domain(DOMAIN, &IpAddr::from(PRIMARY).to_string(), 25);
        let redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
        let primary = (!primary_down).then(|| SmtpSink::start_at(PRIMARY.into(), 25, &[]));
        let config = base_config(&db.url(), &redis.url(), &dns);
        let prefix = unique("mxrt");
        let nodes = (0..NODES.len()).map(|i| Some(node(i, &config, &prefix, env))).collect();
        let sender = Postfix::start(&PostfixOptions {
            netns: Some(&ns),
            main_cf: &[
                "smtp_address_preference = ipv4",
                "smtp_connect_timeout = 2s",
                // A deferred message is tried again within seconds.
                "queue_run_delay = 1s",
                "minimal_backoff_time = 1s",
                "maximal_backoff_time = 2s",
            ],
            ..Default::default()
        });
        Topology { sender, nodes, primary, _redis: redis, _db: db, _mariadb: mariadb, _dns: dns, _ns: ns }
    }

    fn live(&self) -> impl Iterator<Item = &Relay> {
        self.nodes.iter().flatten()
    }

    /// `smtp-source` sends `messages` of 1 KiB to the sending Postfix, in
    /// 10 sessions; returns once Postfix has taken them all.
    fn send(&self, messages: u32) {
        let out = std::process::Command::new("/usr/sbin/smtp-source")
            .args(["-s", "10", "-m", &messages.to_string(), "-l", "1024", "-M", "client.example"])
            .args(["-f", SENDER, "-t", &format!("user@{DOMAIN}")])
            .arg(self.sender.addr())
            .output()
            .expect("smtp-source");
        assert!(out.status.success(), "smtp-source into Postfix: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Messages the primary holds, by `Message-Id:`.
    fn primary_messages(&self) -> Vec<SinkMessage> {
        self.primary.as_ref().map(SmtpSink::messages).unwrap_or_default()
    }

    fn at_primary(&self) -> HashMap<String, usize> {
        let mut ids = HashMap::new();
        for m in self.primary_messages() {
            *ids.entry(message_id(&m)).or_insert(0) += 1;
        }
        ids
    }

    /// Waits until the primary holds `n` distinct messages; the time it took.
    fn wait_at_primary(&self, n: usize, timeout: Duration) -> Duration {
        let started = Instant::now();
        wait_until(&format!("{n} messages at the primary"), timeout, || self.at_primary().len() >= n);
        started.elapsed()
    }

    /// `name` summed over the nodes still running, and per node.
    fn per_node(&self, sample: &str) -> Vec<f64> {
        self.nodes.iter().map(|n| n.as_ref().map_or(0.0, |n| n.value(sample))).collect()
    }
}

const ACCEPTED: &str = "mxrelay_smtp_messages_total{result=\"accepted\"}";
const DELIVERED: &str = "mxrelay_delivery_recipients_total{result=\"delivered\"}";

fn node(i: usize, config: &str, prefix: &str, extra: &[(&str, &str)]) -> Relay {
    let (id, host) = (format!("node-{}", i + 1), format!("mx{}.relay.test", i + 1));
    let mut env = vec![
        ("MXRELAY_NODE_ID", id.as_str()),
        ("MXRELAY_MYHOSTNAME", host.as_str()),
        ("MXRELAY_DELIVERY_ENABLED", "true"),
        // Only the prober and the fast drain bring deferred mail back
        // within a test: a retry waits 10 minutes.
        ("MXRELAY_DELIVERY_RETRY_MIN", "10m"),
        ("MXRELAY_DELIVERY_RETRY_MAX", "10m"),
        ("MXRELAY_DELIVERY_PROBE_INTERVAL", "2s"),
        ("MXRELAY_QUEUE_LEASE", "3s"),
    ];
    env.extend_from_slice(extra);
    Relay::spawn_at(NODES[i].into(), (25, 9425), config, &env, prefix)
}

/// A message's `Message-Id:` (smtp-source and swaks write one, and
/// Postfix keeps it): a duplicate has the same one twice.
fn message_id(m: &SinkMessage) -> String {
    let text = String::from_utf8_lossy(&m.content);
    let line = text.lines().find(|l| l.to_ascii_lowercase().starts_with("message-id:"));
    line.unwrap_or_else(|| panic!("no Message-Id in:\n{text}"))[11..].trim().to_string()
}

/// The node that received `content`, from our `Received:` field.
fn received_by(content: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(content);
    Some(text.split("(mxrelay node ").nth(1)?.split(')').next()?.to_string())
}

fn split(shares: &[f64]) -> String {
    shares.iter().map(|s| format!("{s:.0}")).collect::<Vec<_>>().join("/")
}

/// Scenario 1, then 3. Postfix sends 1,000 messages to a domain whose three
/// MX records of equal preference name the three nodes: every one reaches
/// the primary once, and each node took a real share (read from its own
/// `/metrics`; Postfix's choice among the MX records does the spreading).
/// Then the primary goes down: the nodes accept and queue; once it is
/// back, the fast drain delivers everything within seconds, although a
/// retry would wait 10 minutes.
#[test]
fn a_sending_postfix_spreads_mail_over_equal_mx_nodes_and_a_down_primary_drains_fast() {
    let mut t = Topology::start(false, &[]);
    let targets: Vec<String> = t.live().map(|n| format!("{}:{}", n.ip, n.admin_port)).collect();
    let prometheus = Prometheus::start(&targets);
    wait_until("Prometheus scrapes the three nodes", Duration::from_secs(30), || {
        prometheus.by_instance("up").iter().filter(|(_, up)| *up == 1.0).count() == targets.len()
    });
    let started = Instant::now();
    t.send(1000);
    let took = t.wait_at_primary(1000, Duration::from_secs(180));
    let at = t.at_primary();
    let duplicates: usize = at.values().map(|n| n - 1).sum();
    let accepted = t.per_node(ACCEPTED);
    let delivered = t.per_node(DELIVERED);
    report_line(&format!(
        "topology equal_mx: sent=1000 at_primary={} duplicates={duplicates} accepted_per_node={} delivered_per_node={} time={:.1}s (send {:.1}s)",
        at.len(),
        split(&accepted),
        split(&delivered),
        took.as_secs_f64(),
        started.elapsed().as_secs_f64() - took.as_secs_f64(),
    ));
    assert_eq!(duplicates, 0, "no fault, no duplicate");
    assert_eq!(accepted.iter().sum::<f64>(), 1000.0, "the nodes accepted each message once");
    assert_eq!(delivered.iter().sum::<f64>(), 1000.0, "and delivered each once");
    for (i, a) in accepted.iter().enumerate() {
        // Postfix's choice varies more than a fair die (its connection
        // cache reuses a session to one MX): 119 to 527 of 1,000 in 33 runs.
        assert!(*a >= 50.0, "node {} took a real share (at least 5 %): {}", i + 1, split(&accepted));
    }
    scenario_5(&prometheus, &targets, &accepted, &delivered);

    // Scenario 3: the primary is down.
    let sink = t.primary.take().expect("the primary");
    drop(sink);
    let before = t.at_primary().len();
    assert_eq!(before, 0, "the new primary starts empty");
    t.send(200);
    wait_until("200 messages queued on the nodes", Duration::from_secs(60), || {
        t.per_node(ACCEPTED).iter().sum::<f64>() >= 1200.0
    });
    let deferred = t.per_node("mxrelay_delivery_recipients_total{result=\"deferred\"}").iter().sum::<f64>();
    assert!(deferred >= 1.0, "the nodes tried the primary and deferred");
    t.primary = Some(SmtpSink::start_at(PRIMARY.into(), 25, &[]));
    let drained = t.wait_at_primary(200, Duration::from_secs(60));
    let at = t.at_primary();
    let duplicates: usize = at.values().map(|n| n - 1).sum();
    let released = t.live().filter(|n| n.log().contains("releasing its deferred messages")).count();
    report_line(&format!(
        "topology fallback_mx: queued=200 deferred_attempts={deferred:.0} drained={} duplicates={duplicates} drain={:.1}s (primary back to last message) nodes_releasing={released}",
        at.len(),
        drained.as_secs_f64(),
    ));
    assert_eq!(at.len(), 200, "everything queued during the outage arrived");
    assert_eq!(duplicates, 0);
    assert!(released >= 1, "the fast drain, not a retry, delivered it");
}

/// Scenario 2. A node is killed with SIGKILL in the middle of a run of
/// 1,000: the sending Postfix finds its MX record refusing and goes to the
/// other two, and every message a node answered `250` arrives, the killed
/// node's queued ones by lease takeover.
#[test]
fn a_node_killed_under_equal_mx_load_loses_nothing_the_sender_was_told_250() {
    let mut t = Topology::start(false, &[]);
    let sender = {
        let addr = t.sender.addr();
        std::thread::spawn(move || {
            let out = std::process::Command::new("/usr/sbin/smtp-source")
                .args(["-s", "10", "-m", "1000", "-l", "1024", "-M", "client.example"])
                .args(["-f", SENDER, "-t", &format!("user@{DOMAIN}")])
                .arg(addr)
                .output()
                .expect("smtp-source");
            assert!(out.status.success(), "smtp-source into Postfix: {}", String::from_utf8_lossy(&out.stderr));
        })
    };
    // Killed once it has taken a share, while the run goes on.
    let victim = 1;
    wait_until("node 2 took 100 messages", Duration::from_secs(120), || {
        t.nodes[victim].as_ref().is_some_and(|n| n.value(ACCEPTED) >= 100.0)
    });
    let mut killed_node = t.nodes[victim].take().expect("running");
    killed_node.kill();
    // Logged after each commit, before its 250.
    let committed = queued_ids(&killed_node);
    let killed = Instant::now();
    sender.join().expect("smtp-source");
    t.wait_at_primary(1000, Duration::from_secs(180));
    // What Postfix heard: `status=sent (250 2.0.0 Ok: queued as ID)` from mx2.
    let sender_log = t.sender.log();
    let told_250: HashSet<String> = sender_log
        .lines()
        .filter(|l| l.contains(&format!("relay=mx{}.{DOMAIN}[", victim + 1)) && l.contains("status=sent (250"))
        .filter_map(|l| l.split("queued as ").nth(1)?.split(')').next().map(str::to_string))
        .collect();
    // What the killed node committed and was delivered, by our Received:
    // field: its log may miss the last commits, which landed in Redis while
    // the node was killed before it read the reply (so no log line either).
    let killed_name = format!("node-{}", victim + 1);
    let arrived_via_killed: HashSet<String> = t
        .primary_messages()
        .iter()
        .filter(|m| received_by(&m.content).as_deref() == Some(killed_name.as_str()))
        .filter_map(|m| delivered_id(&m.content))
        .collect();
    let unlogged = arrived_via_killed.difference(&committed).count();
    // Committed, but the 250 was lost with the node: Postfix sent those again.
    let unacknowledged = committed.union(&arrived_via_killed).filter(|id| !told_250.contains(*id)).count();
    let drain = killed.elapsed();
    let at = t.at_primary();
    let duplicates: usize = at.values().map(|n| n - 1).sum();
    let accepted = t.per_node(ACCEPTED);
    let takeovers = t.per_node("mxrelay_queue_lease_takeovers_total").iter().sum::<f64>();
    let refused = sender_log.matches("Connection refused").count();
    report_line(&format!(
        "topology node_killed: sent=1000 at_primary={} duplicates={duplicates} told_250_by_killed={} committed_unacknowledged={unacknowledged} (not logged: {unlogged}) accepted_per_node={} takeovers={takeovers:.0} sender_refused_connections={refused} drain={:.1}s (kill to last message)",
        at.len(),
        told_250.len(),
        split(&accepted),
        drain.as_secs_f64(),
    ));
    assert_eq!(at.len(), 1000, "every message Postfix sent arrived, those the killed node took included");
    let arrived: HashSet<String> = t.primary_messages().iter().filter_map(|m| delivered_id(&m.content)).collect();
    assert!(told_250.len() >= 100 && told_250.is_subset(&committed), "{} of {}", told_250.len(), committed.len());
    let missing: Vec<&String> = committed.iter().filter(|id| !arrived.contains(*id)).collect();
    assert!(missing.is_empty(), "committed by the killed node and never delivered: {missing:?}");
    // A duplicate is a copy the killed node sent but could not record (its
    // lease taken over), or a commit whose 250 died with it (Postfix sent
    // the message again, to another node).
    assert!(
        duplicates as f64 <= takeovers + unacknowledged as f64,
        "duplicates {duplicates} > takeovers {takeovers} + unacknowledged commits {unacknowledged}"
    );
}

/// Scenario 4. HAProxy (Debian's), configured as `deploy/haproxy/haproxy.cfg`
/// ships (the addresses made loopback ones), in front of the three nodes:
/// PROXY v2 and a health check on each node's `/readyz`. The client's own
/// address reaches `Received:` and the mail log. Under continuous
/// smtp-source load through HAProxy, SIGTERM on a node takes it out of
/// rotation before it stops accepting (`smtp.drain_delay`): smtp-source,
/// which gives up on any refused connection or unexpected reply, sends
/// every message.
#[test]
fn behind_haproxy_the_client_address_is_kept_and_a_sigterm_drain_costs_no_client_an_error() {
    let drain = [
        ("MXRELAY_SMTP_PROXY_PROTOCOL", "true"),
        ("MXRELAY_SMTP_PROXY_NETWORKS", "127.0.0.1/32"),
        ("MXRELAY_SMTP_DRAIN_DELAY", "3s"),
    ];
    let mut t = Topology::start(false, &drain);
    let config = include_str!("../../deploy/haproxy/haproxy.cfg")
        .replace("192.0.2.25:25", "127.0.0.30:25")
        .replace("10.0.0.1", "127.0.0.1");
    let haproxy = Haproxy::run(&config, 25, tempfile::tempdir().unwrap());
    let front = "127.0.0.30:25";
    wait_until("HAProxy greets for the nodes", Duration::from_secs(20), || {
        std::net::TcpStream::connect(front).is_ok_and(|s| {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut line).is_ok() && line.starts_with("220 ")
        })
    });

    // The client's own address, carried by PROXY v2.
    let (code, out) = swaks(
        front,
        &[
            "--local-interface",
            "127.0.0.77",
            "--from",
            SENDER,
            "--to",
            &format!("a@{DOMAIN}"),
            "--helo",
            "client.example",
        ],
    );
    assert_eq!(code, 0, "{out}");
    t.wait_at_primary(1, Duration::from_secs(20));
    let first = String::from_utf8_lossy(&t.primary_messages()[0].content).to_string();
    assert!(first.contains("from client.example (unknown [127.0.0.77])"), "Received: names the client:\n{first}");
    assert!(t.live().any(|n| n.log().contains("connect from unknown[127.0.0.77]")), "the mail log names the client");

    // Continuous load through HAProxy; SIGTERM on node 1 in the middle.
    let load = std::thread::spawn(move || {
        std::process::Command::new("/usr/sbin/smtp-source")
            .args(["-s", "5", "-m", "3000", "-l", "1024", "-M", "client.example"])
            .args(["-f", SENDER, "-t", &format!("user@{DOMAIN}")])
            .arg(front)
            .output()
            .expect("smtp-source")
    });
    wait_until("500 messages through HAProxy", Duration::from_secs(120), || t.at_primary().len() >= 500);
    let signalled = Instant::now();
    let stopping = t.nodes[0].as_mut().expect("node 1");
    stopping.signal("TERM");
    let status = stopping.wait_exit(Duration::from_secs(60)).expect("node 1 stops");
    let stopped = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{status}");
    let out = load.join().expect("smtp-source");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "no client saw an error: {}\n{stderr}", out.status);
    t.wait_at_primary(3001, Duration::from_secs(120));
    let log = haproxy.log();
    let down = log.lines().position(|l| l.contains("mxrelay/mx1 is DOWN"));
    assert!(down.is_some(), "HAProxy took node 1 out of rotation:\n{log}");
    let node1 = t.nodes[0].take().expect("node 1");
    let node_log = node1.log();

    // Scenario 6 through the balancer: a domain whose relay_host is
    // HAProxy, i.e. the cluster itself. The node that takes the message
    // reaches a node of its cluster and defers it at once: no second copy
    // is accepted anywhere, so nothing ping-pongs up to hop_count_limit.
    t._db.add_domain("loop.example", "127.0.0.30", 25);
    let before: f64 = t.per_node(ACCEPTED).iter().sum();
    wait_until("every node has the new domain", Duration::from_secs(20), || {
        t.live().all(|n| n.value("mxrelay_domains_snapshot_size") == 2.0)
    });
    let (code, out) = swaks(front, &["--from", SENDER, "--to", "x@loop.example", "--helo", "client.example"]);
    assert_eq!(code, 0, "{out}");
    let loops = || t.per_node("mxrelay_delivery_attempts_total{result=\"loop\"}").iter().sum::<f64>();
    wait_until("the loop seen", Duration::from_secs(20), || loops() >= 1.0);
    let after: f64 = t.per_node(ACCEPTED).iter().sum();
    assert_eq!(after - before, 1.0, "the cluster took the message once, never from itself");
    let seen = t
        .live()
        .flat_map(|n| {
            n.log().lines().filter(|l| l.contains("loops back to myself")).map(str::to_string).collect::<Vec<_>>()
        })
        .collect::<Vec<_>>();
    assert!(seen.iter().any(|l| l.contains("name of a node of this cluster")), "{seen:#?}");
    assert!(node_log.contains("until load balancers have noticed"), "{node_log}");
    report_line(&format!(
        "topology haproxy_drain: sent=3001 at_primary={} node1_stopped_after={:.1}s (drain_delay 3s) sessions_told_421_by_node1={} client_errors=0",
        t.at_primary().len(),
        stopped.as_secs_f64(),
        node_log.matches("node stopping: session closed").count(),
    ));
}

/// Scenario 5, on the data of scenario 1: Prometheus has a per-node
/// accepted and delivered rate for every node, and its counters agree with
/// the nodes' own; every panel query of the Grafana dashboard returns data,
/// and every alert rule runs and names only series Prometheus has.
fn scenario_5(prometheus: &Prometheus, targets: &[String], accepted: &[f64], delivered: &[f64]) {
    let counters = |metric: &str| {
        let mut v = prometheus.by_instance(&format!("sum by (instance) ({metric})"));
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    // The counters as scraped after the run match the nodes' (one scrape a second).
    for (metric, own) in [(ACCEPTED, accepted), (DELIVERED, delivered)] {
        let expected: Vec<(String, f64)> = targets.iter().cloned().zip(own.iter().copied()).collect();
        wait_until(&format!("Prometheus has scraped {metric} of every node"), Duration::from_secs(15), || {
            counters(metric) == expected
        });
    }
    for metric in [ACCEPTED, DELIVERED] {
        let rates = prometheus.by_instance(&format!("sum by (instance) (rate({metric}[1m]))"));
        assert_eq!(rates.len(), targets.len(), "a rate per node of {metric}: {rates:?}");
        assert!(rates.iter().all(|(_, r)| *r > 0.0), "{metric}: {rates:?}");
    }
    let total = |metric: &str| {
        prometheus.query(&format!("sum({metric})"))[0]["value"][1].as_str().unwrap().parse::<f64>().unwrap()
    };
    assert_eq!((total(ACCEPTED), total(DELIVERED)), (1000.0, 1000.0), "the sums are the counts");
    let mut empty = Vec::new();
    for expr in crate::deploy::dashboard_exprs() {
        let expr = expr.replace("$__rate_interval", "1m");
        match prometheus.try_query(&expr) {
            Ok(result) if result.is_empty() => empty.push(expr),
            Ok(_) => {}
            Err(e) => panic!("dashboard query {expr}: {e}"),
        }
    }
    assert!(empty.is_empty(), "dashboard queries without data: {empty:#?}");
    for expr in crate::deploy::alert_exprs() {
        prometheus.try_query(&expr).unwrap_or_else(|e| panic!("alert rule {expr}: {e}"));
        for metric in crate::deploy::metric_names(&expr) {
            let series = prometheus.query(&format!("count({{__name__=~\"{metric}(_bucket)?\"}})"));
            assert!(!series.is_empty(), "alert rule {expr}: no series {metric}");
        }
    }
    report_line(&format!(
        "topology prometheus: nodes={} dashboard_queries={} alert_rules={} all with data",
        targets.len(),
        crate::deploy::dashboard_exprs().len(),
        crate::deploy::alert_exprs().len()
    ));
}
