//! The embedded single-node default (SQLite for domains and queue), end to
//! end: accept, relay denied, deliver byte-exact, deferred then delivered,
//! bounce, kill -9 with mail queued and restart: nothing lost.

use std::process::Command;
use std::time::Duration;

use crate::support::destination::{Destination, assert_one_copy_and_one_dsn};
use crate::support::sink::SmtpSink;
use crate::support::*;

struct Embedded {
    _dns: Dns,
    dir: tempfile::TempDir,
    relay: Relay,
}

impl Embedded {
    fn start(env_overrides: &[(&str, &str)]) -> Embedded {
        let dns = Dns::start(&["sender.example"], &[LISTED, "named.example"]);
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/mxrelay.db", dir.path().display());
        // Only the SIGHUP of `add_domain` loads a new domain.
        let mut env = vec![("MXRELAY_DELIVERY_ENABLED", "true"), RELOAD_ON_SIGHUP_ONLY];
        env.extend_from_slice(env_overrides);
        let relay = Relay::spawn_with_env(&base_config(&url, &url, &dns), &env);
        Embedded { _dns: dns, dir, relay }
    }

    fn url(&self) -> String {
        format!("sqlite://{}/mxrelay.db", self.dir.path().display())
    }

    /// `mxrelay domains add` against the embedded store, then SIGHUP.
    fn add_domain(&self, domain: &str, port: u16) {
        let out = Command::new(env!("CARGO_BIN_EXE_mxrelay"))
            .args(["domains", "add", domain, "--relay-host", "127.0.0.1", "--relay-port", &port.to_string()])
            .env("MXRELAY_DOMAINS_URL", self.url())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        self.relay.signal("HUP");
        let addr = self.relay.addr();
        wait_until("domain listed", Duration::from_secs(10), || {
            let mut c = Raw::ehlo(&addr);
            c.cmd("MAIL FROM:<bob@friet.pan>");
            !c.cmd(&format!("RCPT TO:<probe@{domain}>")).starts_with("454")
        });
    }

    fn queue_stats(&self) -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_mxrelay"))
            .args(["queue", "stats", "--json"])
            .env("MXRELAY_QUEUE_URL", self.url())
            .env("MXRELAY_DOMAINS_URL", self.url())
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

const MESSAGE: &str = "From: bob@friet.pan\r\nSubject: embedded\r\n\r\n.leading dot\r\nbody\r\n";

#[test]
fn embedded_accepts_delivers_defers_and_bounces() {
    // The scripted destination keeps every byte (smtp-sink drops CRs).
    let sink = Destination::start();
    let down = DownPort::new();
    let e = Embedded::start(&[("MXRELAY_DELIVERY_RETRY_MIN", "120s"), ("MXRELAY_DELIVERY_RETRY_MAX", "1h")]);
    e.add_domain(LISTED, sink.port);
    e.add_domain("named.example", down.port);

    // Accepted and delivered byte-exact.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("m.eml");
    std::fs::write(&data, MESSAGE.strip_suffix("\r\n").unwrap()).unwrap();
    let (code, out) = swaks(
        &e.relay.addr(),
        &[
            "--from",
            "bob@friet.pan",
            "--to",
            "t@friet.pan",
            "--helo",
            "client.example",
            "--data",
            data.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{out}");
    let got = sink.wait_for(1, Duration::from_secs(20));
    assert_relayed_exactly(&got[0].data, MESSAGE.as_bytes(), &queued_id(&out).unwrap());

    // Relay denied.
    let (_, out) = swaks(&e.relay.addr(), &["--from", SENDER, "--to", "x@other.example", "--helo", "client.example"]);
    assert!(out.contains("454 4.7.1"), "{out}");

    // Deferred while the destination is down, delivered fast when it is up.
    let (code, out) = swaks(
        &e.relay.addr(),
        &["--from", "bob@friet.pan", "--to", "ok@named.example,perm9@named.example", "--helo", "client.example"],
    );
    assert_eq!(code, 0, "{out}");
    wait_until("deferred", Duration::from_secs(20), || e.queue_stats()["deferred"] == 1);
    let dest = Destination::start_on(down.release());
    let got = dest.wait_for(1, Duration::from_secs(20));
    assert_eq!(got[0].rcpts, vec!["ok@named.example"]);
    // perm9 bounced: the DSN goes to bob@friet.pan, i.e. to the sink.
    let got = sink.wait_for(2, Duration::from_secs(20));
    let dsn = got.iter().find(|m| m.mail_from.is_empty()).expect("a DSN");
    assert_eq!(dsn.rcpts, vec!["bob@friet.pan"]);
    assert!(String::from_utf8_lossy(&dsn.data).contains("Final-Recipient: rfc822; perm9@named.example"));
    wait_until("queue empty", Duration::from_secs(20), || e.queue_stats()["messages"] == 0);
}

#[test]
fn embedded_kill_9_with_mail_queued_loses_nothing() {
    let down = DownPort::new();
    let mut e = Embedded::start(&[("MXRELAY_QUEUE_LEASE", "2s")]);
    e.add_domain(LISTED, down.port);
    let mut ids = Vec::new();
    for i in 0..20 {
        let (_, out) =
            swaks(&e.relay.addr(), &["--from", SENDER, "--to", &format!("k{i}@friet.pan"), "--helo", "client.example"]);
        ids.push(queued_id(&out).unwrap_or_else(|| panic!("{out}")));
    }
    e.relay.kill(); // SIGKILL
    let dest = Destination::start_on(down.release());
    e.relay.start();
    let got = dest.wait_for(20, Duration::from_secs(60));
    let delivered: std::collections::HashSet<String> = got
        .iter()
        .filter_map(|m| {
            String::from_utf8_lossy(&m.data)
                .split(" id ")
                .nth(1)
                .map(|s| s.split(|c: char| c.is_whitespace() || c == ';').next().unwrap_or("").to_string())
        })
        .collect();
    for id in &ids {
        assert!(delivered.contains(id), "{id} was lost");
    }
    eprintln!("embedded kill -9: {} accepted, all delivered after restart ({} deliveries)", ids.len(), got.len());
}

/// As the README's quickstart: no configuration at all, a domain added
/// with `mxrelay domains add` in the same directory, SIGHUP, swaks to it,
/// and the mail reaches smtp-sink. Only moved off the defaults: the
/// listeners, to ports the system picks (tests run side by side), and the
/// periodic domain refresh, an hour away so that only the SIGHUP can load
/// the domain in time.
#[test]
fn readme_quickstart_with_no_configuration() {
    let sink = SmtpSink::start();
    let cwd = tempfile::tempdir().unwrap();
    let log = cwd.path().join("log");
    let mut serve = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_mxrelay"))
            .arg("serve")
            .current_dir(cwd.path())
            .env("MXRELAY_SMTP_LISTEN", "127.0.0.1:0")
            .env("MXRELAY_ADMIN_LISTEN", "127.0.0.1:0")
            .env(RELOAD_ON_SIGHUP_ONLY.0, RELOAD_ON_SIGHUP_ONLY.1)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let log = || std::fs::read_to_string(&log).unwrap_or_default();
    let (smtp, admin) = wait_until_value("listening", Duration::from_secs(20), || {
        assert!(serve.try_wait().unwrap().is_none(), "mxrelay serve exited:\n{}", log());
        listening_addrs(&log())
    });
    wait_until("the note on the embedded store", Duration::from_secs(10), || {
        log().contains("data in ./mxrelay-data") && log().contains("mxrelay domains add")
    });
    let out = Command::new(env!("CARGO_BIN_EXE_mxrelay"))
        .args(["domains", "add", "example.org", "--relay-host", "127.0.0.1", "--relay-port", &sink.port.to_string()])
        .current_dir(cwd.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = Command::new("kill").args(["-HUP", &serve.id().to_string()]).status();
    wait_until("the domain loaded", Duration::from_secs(10), || {
        http_get(admin.port(), "/metrics").lines().any(|l| l == "mxrelay_domains_snapshot_size 1")
    });
    let (code, out) = swaks(&smtp.to_string(), &["--from", "you@example.net", "--to", "someone@example.org"]);
    assert_eq!(code, 0, "{out}");
    let got = sink.wait_for(1, Duration::from_secs(20));
    assert_eq!(got[0].rcpts, vec!["someone@example.org"]);
}

impl Embedded {
    /// `mxrelay ARGS…` against the embedded store; (success, stdout and stderr).
    fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_mxrelay"))
            .args(args)
            .env("MXRELAY_QUEUE_URL", self.url())
            .env("MXRELAY_DOMAINS_URL", self.url())
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let (ok, out) = self.cli(args);
        assert!(ok, "{args:?}: {out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }

    /// Delivery attempts of message `id` so far.
    fn attempts(&self, id: &str) -> u64 {
        self.json(&["queue", "show", id, "--json"])["envelope"]["attempts"].as_u64().unwrap()
    }

    fn send(&self, from: &str, to: &str) -> String {
        let (code, out) = swaks(&self.relay.addr(), &["--from", from, "--to", to, "--helo", "client.example"]);
        assert_eq!(code, 0, "{out}");
        queued_id(&out).unwrap_or_else(|| panic!("{out}"))
    }
}

/// The operator's queue commands on the embedded store (no Redis, no
/// MySQL): stats, list (by state and domain), show, hold, flush, bounce,
/// delete and release, with their effect on delivery.
#[test]
fn embedded_queue_commands_stats_list_show_hold_flush_bounce_delete_release() {
    let home = Destination::start();
    let down = DownPort::new();
    let e = Embedded::start(&[
        ("MXRELAY_DELIVERY_RETRY_MIN", "120s"),
        ("MXRELAY_DELIVERY_RETRY_MAX", "1h"),
        ("MXRELAY_DELIVERY_PROBE_INTERVAL", "1h"),
    ]);
    e.add_domain(LISTED, home.port);
    e.add_domain("named.example", down.port);
    let ids: Vec<String> =
        ["a", "b", "c"].iter().map(|l| e.send("bob@friet.pan", &format!("{l}@named.example"))).collect();
    wait_until("3 deferred", Duration::from_secs(20), || e.queue_stats()["deferred"] == 3);

    let s = e.queue_stats();
    assert!(s["messages"] == 3 && s["held"] == 0, "{s}");
    let dest_key = format!("[127.0.0.1]:{}", down.port);
    assert_eq!(s["deferred_by_destination"][0], serde_json::json!([dest_key, 3]), "{s}");
    let (ok, out) = e.cli(&["queue", "stats"]);
    assert!(ok && out.contains("deferred 3") && out.contains(&dest_key), "{out}");
    assert_eq!(e.json(&["queue", "list", "--state", "deferred", "--json"]).as_array().unwrap().len(), 3);
    assert!(e.json(&["queue", "list", "--domain", "friet.pan", "--json"]).as_array().unwrap().is_empty());
    let (ok, out) = e.cli(&["queue", "list"]);
    assert!(ok && ids.iter().all(|id| out.contains(id)) && out.contains("3 message(s)"), "{out}");
    let (ok, out) = e.cli(&["queue", "show", &ids[0], "--body"]);
    assert!(ok && out.contains("state     deferred") && out.contains("attempts  1"), "{out}");
    assert!(out.contains("<a@named.example> pending (4.4.1 connect to"), "{out}");
    assert!(out.contains("--- message ---\nReceived: from client.example"), "{out}");

    // hold: out of the deferred set, not retried by a flush.
    let (ok, out) = e.cli(&["queue", "hold", &ids[0]]);
    assert!(ok, "{out}");
    let s = e.queue_stats();
    assert!(s["held"] == 1 && s["deferred"] == 2, "{s}");
    let held = e.json(&["queue", "list", "--state", "held", "--json"]);
    assert_eq!(held.as_array().unwrap().len(), 1, "{held}");
    assert_eq!(held[0]["envelope"]["id"], ids[0].as_str(), "{held}");
    let (ok, out) = e.cli(&["queue", "flush"]);
    assert!(ok && out.contains("released 2 deferred message(s)"), "{out}");
    wait_until("the flushed messages tried again", Duration::from_secs(20), || {
        e.attempts(&ids[1]) == 2 && e.attempts(&ids[2]) == 2 && e.queue_stats()["deferred"] == 2
    });
    assert_eq!(e.attempts(&ids[0]), 1, "a held message was retried");

    // bounce: a DSN to the sender (friet.pan, i.e. home) instead of a delivery.
    let (ok, out) = e.cli(&["queue", "bounce", &ids[1]]);
    assert!(ok, "{out}");
    let dsn = home.wait_for(1, Duration::from_secs(20));
    assert_eq!((dsn[0].mail_from.as_str(), dsn[0].rcpts.clone()), ("", vec!["bob@friet.pan".to_string()]));
    assert!(String::from_utf8_lossy(&dsn[0].data).contains("bounced by the administrator"));

    // delete: gone, never delivered.
    let (ok, out) = e.cli(&["queue", "delete", &ids[2]]);
    assert!(ok, "{out}");
    let (ok, out) = e.cli(&["queue", "show", &ids[2]]);
    assert!(!ok && out.contains("is not in the queue"), "{out}");
    let (ok, out) = e.cli(&["queue", "delete", "no-such-id"]);
    assert!(!ok && out.contains("not found"), "{out}");

    // release: delivered once the destination is up.
    let up = Destination::start_on(down.release());
    let (ok, out) = e.cli(&["queue", "release", &ids[0]]);
    assert!(ok, "{out}");
    let got = up.wait_for(1, Duration::from_secs(20));
    assert_eq!(got[0].rcpts, vec!["a@named.example"]);
    wait_until("queue empty", Duration::from_secs(20), || e.queue_stats()["messages"] == 0);
    assert_eq!(up.messages().len(), 1, "the deleted or the bounced message was delivered");
    assert_eq!(home.messages().len(), 1);
}

/// Fast drain on the embedded store: with a backoff far longer than the
/// test, only the destination coming back can release its deferred mail.
#[test]
fn embedded_a_down_primary_is_drained_fast_once_it_is_back() {
    let down = DownPort::new();
    let e = Embedded::start(&[("MXRELAY_DELIVERY_RETRY_MIN", "120s"), ("MXRELAY_DELIVERY_RETRY_MAX", "1h")]);
    e.add_domain(LISTED, down.port);
    for i in 0..20 {
        e.send(SENDER, &format!("m{i}@friet.pan"));
    }
    wait_until("all deferred", Duration::from_secs(20), || e.queue_stats()["deferred"] == 20);
    let dest = Destination::start_on(down.release());
    let got = dest.wait_for(20, Duration::from_secs(20));
    let mut rcpts: Vec<String> = got.iter().flat_map(|m| m.rcpts.clone()).collect();
    rcpts.sort();
    rcpts.dedup();
    assert_eq!(rcpts.len(), 20, "{rcpts:?}");
    let log = e.relay.log();
    assert!(log.contains("destination accepts mail again: releasing its deferred messages"), "{log}");
    wait_until("queue empty", Duration::from_secs(10), || e.queue_stats()["messages"] == 0);
}

/// ETRN on the embedded store: only a trusted client may ask, and only the
/// named domain's deferred mail is released; `queue flush` the rest.
#[test]
fn embedded_etrn_and_queue_flush_release_deferred_mail() {
    let (down_a, down_b) = (DownPort::new(), DownPort::new());
    let e = Embedded::start(&[
        ("MXRELAY_DELIVERY_RETRY_MIN", "120s"),
        ("MXRELAY_DELIVERY_RETRY_MAX", "1h"),
        ("MXRELAY_DELIVERY_PROBE_INTERVAL", "1h"),
    ]);
    e.add_domain(LISTED, down_a.port);
    e.add_domain("named.example", down_b.port);
    e.send(SENDER, "a@friet.pan");
    e.send(SENDER, "b@named.example");
    wait_until("both deferred", Duration::from_secs(20), || e.queue_stats()["deferred"] == 2);
    let a = Destination::start_on(down_a.release());
    let b = Destination::start_on(down_b.release());

    let mut untrusted = Raw::ehlo(&e.relay.addr());
    assert!(untrusted.cmd("ETRN friet.pan").starts_with("459 4.7.1"));
    let mut trusted = Raw::connect_from("127.0.0.9", &e.relay.addr());
    assert_eq!(trusted.code(), 220);
    assert_eq!(trusted.code_after("EHLO client.example"), 250);
    let r = trusted.cmd("ETRN friet.pan");
    assert!(r.starts_with("253 2.0.0"), "{r}");
    let got = a.wait_for(1, Duration::from_secs(10));
    assert_eq!(got[0].rcpts, vec!["a@friet.pan"]);
    wait_until("friet.pan's message gone", Duration::from_secs(10), || {
        e.queue_stats()["messages"].as_u64().unwrap() <= 1
    });
    assert_eq!(e.queue_stats()["deferred"], 1, "ETRN released another domain's mail");
    assert_eq!(b.connections(), 0, "ETRN released another domain's mail");

    let (ok, out) = e.cli(&["queue", "flush"]);
    assert!(ok && out.contains("released 1 deferred message(s)"), "{out}");
    b.wait_for(1, Duration::from_secs(10));
    wait_until("queue empty", Duration::from_secs(10), || e.queue_stats()["messages"] == 0);
}

/// Per-recipient results on the embedded store: the 2xx one is delivered
/// once, the 5xx one bounced in one DSN to the sender, the 4xx one retried
/// alone (retry_min 1s) and still pending.
#[test]
fn embedded_partial_delivery_retries_only_pending_and_bounces_the_5xx_ones() {
    let dest = Destination::start();
    let e = Embedded::start(&[]);
    e.add_domain(LISTED, dest.port);
    let id = e.send("bob@friet.pan", "ok@friet.pan,temp1@friet.pan,perm1@friet.pan");
    let got = dest.wait_for(2, Duration::from_secs(20));
    assert_one_copy_and_one_dsn(&got, "ok@friet.pan", "bob@friet.pan", "perm1@friet.pan");

    wait_until("three attempts", Duration::from_secs(30), || e.attempts(&id) >= 3);
    let shown = e.json(&["queue", "show", &id, "--json"]);
    let rcpts = shown["envelope"]["recipients"].as_array().unwrap();
    let state = |a: &str| rcpts.iter().find(|r| r["address"] == a).unwrap()["state"].as_str().unwrap().to_string();
    assert_eq!(
        (state("ok@friet.pan").as_str(), state("temp1@friet.pan").as_str(), state("perm1@friet.pan").as_str()),
        ("delivered", "pending", "bounced"),
        "{shown}"
    );
    assert_eq!(dest.messages().len(), 2, "only the pending recipient is retried");
    let log = e.relay.log();
    assert!(log.matches("to=<temp1@friet.pan>").count() >= 3, "{log}");
    assert_eq!(log.matches("to=<ok@friet.pan>").count(), 1, "ok was sent again: {log}");
}

/// `delivery.max_queue_lifetime` on the embedded store: mail still
/// deferred after it is bounced (`4.4.7`) to the sender and removed.
#[test]
fn embedded_mail_still_undeliverable_after_max_queue_lifetime_is_bounced() {
    let home = Destination::start();
    let e = Embedded::start(&[("MXRELAY_DELIVERY_MAX_QUEUE_LIFETIME", "2s")]);
    let down = DownPort::new();
    e.add_domain(LISTED, home.port);
    e.add_domain("named.example", down.port);
    let id = e.send("bob@friet.pan", "x@named.example");
    let got = home.wait_for(1, Duration::from_secs(30));
    assert_eq!((got[0].mail_from.as_str(), got[0].rcpts.clone()), ("", vec!["bob@friet.pan".to_string()]));
    let dsn = String::from_utf8_lossy(&got[0].data);
    assert!(dsn.contains("Final-Recipient: rfc822; x@named.example") && dsn.contains("Status: 4.4.7"), "{dsn}");
    wait_until("expired message removed", Duration::from_secs(10), || e.queue_stats()["messages"] == 0);
    let (ok, out) = e.cli(&["queue", "show", &id]);
    assert!(!ok && out.contains("is not in the queue"), "{out}");
    assert!(e.relay.log().contains("message expired after"), "{}", e.relay.log());
}

#[test]
fn embedded_a_message_still_deferred_after_delay_warning_time_gets_one_delayed_dsn() {
    let home = Destination::start();
    let e = Embedded::start(&[("MXRELAY_DELIVERY_DELAY_WARNING_TIME", "2s")]);
    let down = DownPort::new();
    e.add_domain(LISTED, home.port);
    e.add_domain("named.example", down.port);
    let id = e.send("bob@friet.pan", "x@named.example");
    let got = home.wait_for(1, Duration::from_secs(30));
    let dsn = String::from_utf8_lossy(&got[0].data);
    assert!(dsn.contains("Action: delayed") && dsn.contains("Will-Retry-Until: "), "{dsn}");
    let now = e.attempts(&id);
    wait_until("three more attempts", Duration::from_secs(30), || e.attempts(&id) >= now + 3);
    assert_eq!(home.messages().len(), 1, "one warning per message, also across attempts stored in SQLite");
}
