//! Operating a node: metrics that count exactly, readiness, SIGHUP reload.

use std::time::{Duration, Instant};

use crate::support::prometheus::Prometheus;
use crate::support::sink::SmtpSink;
use crate::support::*;

#[test]
fn metrics_count_a_known_workload_exactly() {
    let sink = SmtpSink::start();
    let dns = Dns::start(&["sender.example"], &[LISTED]);
    let db = TestDb::create(&MysqlServer::shared());
    db.exec(include_str!("../../migrations/mysql/0001_domains.sql"));
    db.add_domain(LISTED, "127.0.0.1", sink.port);
    let relay = Relay::spawn_with_env(
        &base_config(&db.url(), SHARED_REDIS, &dns),
        &[("MXRELAY_DELIVERY_ENABLED", "true"), ("MXRELAY_MESSAGE_SIZE_LIMIT", "10000")],
    );
    let samples = [
        "mxrelay_smtp_connections_total",
        "mxrelay_smtp_messages_total{result=\"accepted\"}",
        "mxrelay_smtp_messages_total{result=\"too_big\"}",
        "mxrelay_smtp_rcpt_total{result=\"accepted\"}",
        "mxrelay_smtp_rcpt_total{result=\"relay_denied\"}",
        "mxrelay_smtp_sessions_total{outcome=\"quit\"}",
        "mxrelay_delivery_recipients_total{result=\"delivered\"}",
        "mxrelay_delivery_attempts_total{result=\"sent\"}",
        "mxrelay_delivery_duration_seconds_count",
        "mxrelay_queue_enqueue_duration_seconds_count",
    ];
    // The start-up port probe is a connection too: let it be counted first.
    wait_until("probe counted", Duration::from_secs(10), || {
        relay.value("mxrelay_smtp_connections_total") >= 1.0 && relay.value("mxrelay_smtp_connections_active") == 0.0
    });
    let before: Vec<f64> = samples.iter().map(|s| relay.value(s)).collect();
    // 3 messages (4 accepted recipients), 2 relay-denied recipients, 1 too big: 4 sessions.
    swaks(&relay.addr(), &["--from", SENDER, "--to", "a@friet.pan,x@other.example", "--helo", "client.example"]);
    swaks(&relay.addr(), &["--from", SENDER, "--to", "b@friet.pan,c@friet.pan", "--helo", "client.example"]);
    swaks(&relay.addr(), &["--from", SENDER, "--to", "d@friet.pan,y@other.example", "--helo", "client.example"]);
    let big = "x".repeat(20_000);
    swaks(&relay.addr(), &["--from", SENDER, "--to", "e@friet.pan", "--helo", "client.example", "--body", &big]);
    sink.wait_for(3, Duration::from_secs(20));
    wait_until("delivery counted", Duration::from_secs(10), || {
        relay.value("mxrelay_delivery_recipients_total{result=\"delivered\"}") - before[6] >= 4.0
    });
    let after: Vec<f64> = samples.iter().map(|s| relay.value(s)).collect();
    let delta: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(delta, vec![4.0, 3.0, 1.0, 5.0, 2.0, 4.0, 4.0, 4.0, 3.0, 3.0], "{samples:?}");
    assert!(relay.value("mxrelay_smtp_received_bytes_total") > 0.0);
}

#[test]
fn draining_fails_readyz_answers_idle_sessions_421_and_lets_a_message_finish() {
    let w = World::start();
    assert!(w.relay.http_get("/readyz").starts_with("HTTP/1.1 200"));
    let mut idle = Raw::ehlo(&w.relay.addr());
    let mut sending = Raw::ehlo(&w.relay.addr());
    assert!(sending.cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("250"));
    assert!(sending.cmd("RCPT TO:<t@friet.pan>").starts_with("250"));
    assert_eq!(sending.code_after("DATA"), 354);
    sending.send("Subject: drain\r\n\r\nfirst half\r\n");
    w.relay.signal("TERM");
    // A session waiting for a command is told once it has waited a second
    // more (a client at work would have said something), and closed.
    let signalled = Instant::now();
    let told = idle.reply();
    assert!(told.starts_with("421 4.3.0 relay.test Service shutting down"), "{told}");
    assert!(signalled.elapsed() >= Duration::from_millis(900), "after DRAIN_IDLE: {:?}", signalled.elapsed());
    assert!(idle.closed());
    // The message being received keeps the node up, unready but alive.
    assert!(w.relay.http_get("/readyz").starts_with("HTTP/1.1 503"));
    assert!(w.relay.http_get("/readyz").contains("draining"));
    assert!(w.relay.http_get("/healthz").starts_with("HTTP/1.1 200"), "alive while draining");
    sending.send("second half\r\n.\r\n");
    let queued = sending.reply();
    assert!(queued.starts_with("250 2.0.0 Ok: queued as"), "{queued}");
    let id = queued.split("queued as ").nth(1).unwrap().trim().to_string();
    // A client that goes on talking is served; once it waits, it is let go.
    assert!(sending.cmd("NOOP").starts_with("250"), "served while it talks");
    assert!(sending.reply().starts_with("421 4.3.0"), "told once it waits");
    assert!(w.queue().ready_ids().contains(&id));
}

#[test]
fn readyz_follows_redis() {
    let dns = Dns::start(&["sender.example"], &[LISTED]);
    let db = TestDb::create(&MysqlServer::shared());
    let mut redis = RedisServer::start();
    let relay = Relay::spawn(&base_config(&db.url(), &redis.url(), &dns));
    assert!(relay.http_get("/readyz").starts_with("HTTP/1.1 200"));
    redis.stop();
    assert!(relay.http_get("/readyz").starts_with("HTTP/1.1 503"));
    redis.resume();
    wait_until("ready again", Duration::from_secs(20), || relay.http_get("/readyz").starts_with("HTTP/1.1 200"));
}

#[test]
fn sighup_applies_live_keys_and_names_those_needing_a_restart() {
    let dns = Dns::start(&["sender.example"], &[LISTED]);
    let db = TestDb::create(&MysqlServer::shared());
    let base = base_config(&db.url(), SHARED_REDIS, &dns);
    let mut relay = Relay::spawn(&format!("message_size_limit = 100000\n{base}"));
    let mut c = Raw::ehlo(&relay.addr());
    assert!(c.cmd(&format!("MAIL FROM:<{SENDER}> SIZE=200000")).starts_with("552"));
    let changed = format!("message_size_limit = 1000000\n{}", base.replace("timeout = \"2s\"", "timeout = \"3s\""));
    relay.rewrite_config(&changed);
    relay.signal("HUP");
    wait_until("reload logged", Duration::from_secs(10), || relay.log().contains("config reloaded"));
    let log = relay.log();
    let warning = log.lines().find(|l| l.contains("need a restart (still running with the old values)")).unwrap_or("");
    assert!(warning.contains("queue.timeout") && !warning.contains("message_size_limit"), "{log}");
    assert!(log.contains("applied: message_size_limit"), "{log}");
    let mut c = Raw::ehlo(&relay.addr());
    assert!(c.cmd(&format!("MAIL FROM:<{SENDER}> SIZE=200000")).starts_with("250"));
    let ehlo = c.cmd("EHLO client.example");
    assert!(ehlo.contains("SIZE 1000000"), "{ehlo}");
    // A broken file is refused and the running configuration kept.
    relay.rewrite_config("message_size_limit = \"lots\"\n");
    relay.signal("HUP");
    wait_until("reload refused", Duration::from_secs(10), || relay.log().contains("config reload failed"));
    let mut c = Raw::ehlo(&relay.addr());
    assert!(c.cmd(&format!("MAIL FROM:<{SENDER}> SIZE=200000")).starts_with("250"));
}

#[test]
fn prometheus_shows_the_received_rate_of_each_node() {
    let dns = Dns::start(&["sender.example"], &[LISTED]);
    let db = TestDb::create(&MysqlServer::shared());
    db.exec(include_str!("../../migrations/mysql/0001_domains.sql"));
    db.add_domain(LISTED, "127.0.0.1", 2526);
    let config = base_config(&db.url(), SHARED_REDIS, &dns);
    let prefix = unique("mxrq");
    let nodes: Vec<Relay> = ["node-a", "node-b"]
        .iter()
        .map(|n| Relay::spawn_in_queue(&config, &[("MXRELAY_NODE_ID", n)], &prefix))
        .collect();
    let targets: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.admin_port)).collect();
    let prom = Prometheus::start(&targets);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        for n in &nodes {
            swaks(&n.addr(), &["--from", SENDER, "--to", "t@friet.pan", "--helo", "client.example"]);
        }
        let result = prom.query("sum by (instance) (rate(mxrelay_smtp_messages_total{result=\"accepted\"}[5s]))");
        let rates: Vec<(String, f64)> = result
            .iter()
            .filter_map(|r| {
                Some((r["metric"]["instance"].as_str()?.to_string(), r["value"][1].as_str()?.parse().ok()?))
            })
            .filter(|(_, v)| *v > 0.0)
            .collect();
        if rates.len() == 2 {
            assert!(targets.iter().all(|t| rates.iter().any(|(i, _)| i == t)), "{rates:?}");
            eprintln!("prometheus: per-node received rate {rates:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no per-node rate for both nodes: {result:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn mail_log_in_json_carries_the_queue_id() {
    let w = World::start_with(&[("MXRELAY_LOG_FORMAT", "json")]);
    let (_, out) = swaks(&w.relay.addr(), &["--from", SENDER, "--to", "t@friet.pan", "--helo", "client.example"]);
    let id = queued_id(&out).unwrap();
    let accepted: Vec<serde_json::Value> = w
        .relay
        .log()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|v| v["fields"]["queue_id"] == id.as_str())
        .collect();
    assert_eq!(accepted.len(), 1, "one 'queue active' event");
    assert!(accepted[0]["fields"]["message"].as_str().unwrap().contains("from=<sender@sender.example>, size="));
}

/// A label's name and the values the README lists for it.
type LabelValues = (String, Vec<String>);

/// The metrics README.md's Operations section promises: every name, and
/// for a metric with one label every value listed after it in
/// parentheses, e.g. `` `mxrelay_smtp_rcpt_total{result}` (accepted, …) ``.
fn readme_metrics() -> Vec<(String, Option<LabelValues>)> {
    let readme = include_str!("../../README.md");
    let start = readme.find("* **Metrics** on").expect("the README's metrics list");
    let section = &readme[start..];
    let section = &section[..section[2..].find("\n* **").map_or(section.len(), |e| e + 2)];
    let mut out = Vec::new();
    for (i, _) in section.match_indices("`mxrelay_") {
        let rest = &section[i + 1..];
        let Some(end) = rest.find('`') else { continue };
        let name = &rest[..end];
        let (metric, label) = match name.split_once('{') {
            Some((m, l)) => (m, Some(l.trim_end_matches('}'))),
            None => (name, None),
        };
        let after = rest[end + 1..].trim_start();
        let values = match label {
            Some(l) if !l.contains(',') && after.starts_with('(') => {
                let list = &after[1..after.find(')').expect("closing parenthesis")];
                let values: Vec<String> =
                    list.split(',').map(|v| v.split_whitespace().collect::<Vec<_>>().join(" ")).collect();
                // A prose remark in parentheses is not a list of values.
                values
                    .iter()
                    .all(|v| v.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
                    .then(|| (l.to_string(), values))
            }
            _ => None,
        };
        out.push((metric.to_string(), values));
    }
    out
}

#[test]
fn every_metric_the_readme_lists_is_exported_with_its_label_values() {
    let w = World::start_with(&[("MXRELAY_DELIVERY_ENABLED", "true")]);
    let exported = w.relay.http_get("/metrics");
    let promised = readme_metrics();
    assert!(promised.len() >= 40, "the README list was not found whole: {promised:?}");
    let mut missing = Vec::new();
    for (metric, values) in &promised {
        if !exported.lines().any(|l| l.starts_with(&format!("# TYPE {metric} "))) {
            missing.push(metric.clone());
        }
        for (label, values) in values.iter() {
            for v in values {
                let sample = format!("{metric}{{{label}=\"{v}\"}}");
                if !exported.lines().any(|l| l.starts_with(&format!("{sample} "))) {
                    missing.push(sample);
                }
            }
        }
    }
    assert!(missing.is_empty(), "promised by the README, not exported by a fresh node: {missing:?}");
}

/// SIGHUP reloads the domain snapshot at once. The periodic refresh is an
/// hour away, so only the signal can make the new domain visible within
/// the test; the domain is checked to be still refused right before it.
#[test]
fn sighup_reloads_the_domain_snapshot_at_once() {
    let w = World::start_with(&[RELOAD_ON_SIGHUP_ONLY]);
    let addr = w.relay.addr();
    assert_eq!(w.relay.value("mxrelay_domains_snapshot_size"), 1.0);
    w.db.add_domain("other.example", "127.0.0.1", 2526);
    let before = rcpt_reply(&addr, "new@other.example");
    assert!(before.starts_with("454 4.7.1 <new@other.example>: Relay access denied"), "before SIGHUP: {before}");
    w.relay.signal("HUP");
    wait_until("other.example accepted after SIGHUP", Duration::from_secs(10), || {
        rcpt_reply(&addr, "new@other.example").starts_with("250")
    });
    assert_eq!(w.relay.value("mxrelay_domains_snapshot_size"), 2.0);
    // Twice: by World::start and here.
    assert_eq!(w.relay.log().matches("domains: reload requested").count(), 2, "{}", w.relay.log());
}

/// SIGTERM or SIGINT with a message half sent: the listener closes (a new
/// connection is refused), the open session still gets its 250 and then
/// `421 4.3.0`, the message is queued, and the node exits 0.
fn stop_signal_drains(sig: &str) {
    let mut w = World::start();
    let addr = w.relay.addr();
    let mut sending = Raw::ehlo(&addr);
    assert!(sending.cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("250"));
    assert!(sending.cmd("RCPT TO:<drain@friet.pan>").starts_with("250"));
    assert_eq!(sending.code_after("DATA"), 354);
    sending.send(&format!("Subject: SIG{sig}\r\n\r\nfirst half\r\n"));
    w.relay.signal(sig);
    // While the listener closes, a connection the kernel had already
    // completed is reset; once it is closed, connections are refused.
    wait_until("new connections refused", Duration::from_secs(10), || match std::net::TcpStream::connect(&addr) {
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => false,
        Err(e) => {
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
            true
        }
    });
    assert_eq!(w.relay.wait_exit(Duration::ZERO), None, "exited with a message half received");
    sending.send("second half\r\n.\r\n");
    let queued = sending.reply();
    assert!(queued.starts_with("250 2.0.0 Ok: queued as"), "SIG{sig}: {queued}");
    let id = queued_id(&queued).unwrap();
    let told = sending.reply();
    assert!(told.starts_with("421 4.3.0 relay.test Service shutting down"), "{told}");
    let status = w.relay.wait_exit(Duration::from_secs(20)).expect("the node exits once the session is done");
    assert_eq!(status.code(), Some(0), "SIG{sig}: {status}");
    assert!(w.queue().ready_ids().contains(&id), "the message accepted while draining is queued");
    assert!(w.relay.log().contains("stopped"), "{}", w.relay.log());
}

#[test]
fn sigterm_refuses_new_connections_lets_the_open_message_finish_and_exits_0() {
    stop_signal_drains("TERM");
}

#[test]
fn sigint_refuses_new_connections_lets_the_open_message_finish_and_exits_0() {
    stop_signal_drains("INT");
}

/// A SIGHUP the moment the node listens (a deploy script reloading right
/// after the start) reloads the node and never kills it: the handlers are
/// installed before anything listens. The window this guards is short: the
/// node is started by hand here and its log polled without pause
/// (`Relay::spawn` polls every 30 ms and would miss it), and the start is
/// repeated, on the embedded store to keep each one quick. Its listeners
/// take port 0: 80 ports picked in advance would race other tests for them.
#[test]
fn sighup_right_after_start_reloads_and_never_kills_the_node() {
    use std::process::{Command, Stdio};
    for attempt in 0..40 {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let mut serve = KillOnDrop(
            Command::new(env!("CARGO_BIN_EXE_mxrelay"))
                .arg("serve")
                .env("MXRELAY_SMTP_LISTEN", "127.0.0.1:0")
                .env("MXRELAY_ADMIN_LISTEN", "127.0.0.1:0")
                .env("MXRELAY_DATA_DIR", dir.path())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        );
        let started = std::time::Instant::now();
        while !std::fs::read_to_string(&log).unwrap_or_default().contains("mxrelay listening") {
            let exited = serve.try_wait().unwrap();
            assert!(exited.is_none() && started.elapsed() < Duration::from_secs(30), "no listener: {exited:?}");
        }
        // At once: spawning kill(1) would take longer than the window.
        // SAFETY: kill(2) on our own child's pid, which has not been reaped.
        assert_eq!(unsafe { libc::kill(serve.id() as libc::pid_t, libc::SIGHUP) }, 0);
        let outcome = wait_until_value("the reload, or the node's end", Duration::from_secs(10), || {
            if std::fs::read_to_string(&log).unwrap_or_default().contains("config reloaded") {
                return Some(Ok(()));
            }
            serve.try_wait().unwrap().map(Err)
        });
        drop(serve);
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(outcome.is_ok(), "start {attempt}: SIGHUP killed the node ({outcome:?}):\n{text}");
    }
}
