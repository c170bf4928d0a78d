//! The embedded single-node default (SQLite for domains and queue), end to
//! end: accept, relay denied, deliver byte-exact, deferred then delivered,
//! bounce, kill -9 with mail queued and restart: nothing lost.

mod support;

use std::process::Command;
use std::time::Duration;

use support::destination::Destination;
use support::sink::SmtpSink;
use support::*;

struct Embedded {
    _dns: Dns,
    dir: tempfile::TempDir,
    relay: Relay,
}

impl Embedded {
    fn start(env: &[(&str, &str)]) -> Embedded {
        let dns = Dns::start(&["sender.example"], &[LISTED, "named.example"]);
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/mxrelay.db", dir.path().display());
        let mut env = env.to_vec();
        env.push(("MXRELAY_DELIVERY_ENABLED", "true"));
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

/// As the README's quickstart: no configuration at all (only the ports
/// moved off the defaults so tests can run side by side), a domain added
/// with `mxrelay domains add` in the same directory, swaks to it, and the
/// mail reaches smtp-sink.
#[test]
fn readme_quickstart_with_no_configuration() {
    let sink = SmtpSink::start();
    let cwd = tempfile::tempdir().unwrap();
    let (smtp, admin) = (free_port(), free_port());
    let mut serve = Command::new(env!("CARGO_BIN_EXE_mxrelay"))
        .arg("serve")
        .current_dir(cwd.path())
        .env("MXRELAY_SMTP_LISTEN", format!("127.0.0.1:{smtp}"))
        .env("MXRELAY_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .stderr(std::fs::File::create(cwd.path().join("log")).unwrap())
        .spawn()
        .unwrap();
    wait_until("listening", Duration::from_secs(20), || {
        [smtp, admin].iter().all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok())
    });
    let log = std::fs::read_to_string(cwd.path().join("log")).unwrap();
    assert!(log.contains("data in ./mxrelay-data") && log.contains("mxrelay domains add"), "{log}");
    let out = Command::new(env!("CARGO_BIN_EXE_mxrelay"))
        .args(["domains", "add", "example.org", "--relay-host", "127.0.0.1", "--relay-port", &sink.port.to_string()])
        .current_dir(cwd.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = Command::new("kill").args(["-HUP", &serve.id().to_string()]).status();
    wait_until("the domain loaded", Duration::from_secs(10), || {
        http_get(admin, "/metrics").lines().any(|l| l == "mxrelay_domains_snapshot_size 1")
    });
    let (code, out) =
        swaks(&format!("127.0.0.1:{smtp}"), &["--from", "you@example.net", "--to", "someone@example.org"]);
    assert_eq!(code, 0, "{out}");
    let got = sink.wait_for(1, Duration::from_secs(20));
    assert_eq!(got[0].rcpts, vec!["someone@example.org"]);
    let _ = serve.kill();
    let _ = serve.wait();
}
