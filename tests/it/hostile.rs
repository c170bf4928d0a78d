//! Hostile clients, each attack with a bounded count: an AUTH flood from
//! many addresses (peak RSS within the verifier memory, and the attempts
//! past the verifiers' queue answered 454: the real binary, a process of
//! its own to measure), a connection flood on the binary where a client
//! from elsewhere that authenticates (inside TLS) still relays from a
//! reserved slot and one that does not is closed at MAIL; and on an
//! in-process node, bare-CR smuggling through to the destination, 1,500
//! pipelined recipients, an idle-connection flood (a trusted client still
//! served while stress mode is on; stress mode cutting the idle ones), and
//! a 64 KB line folded for a strict destination.

use std::io::Write;
use std::time::{Duration, Instant};

use mxrelay::users::verifier::{QUEUE, THREADS};

use crate::support::destination::Destination;
use crate::support::in_process::InProcessWorld;
use crate::support::pki::{TestPki, TlsClient};
use crate::support::*;

/// Argon2's default memory cost (19 MiB) times the verifier threads.
const VERIFIER_MEMORY_KB: u64 = THREADS as u64 * 19 * 1024;
/// Sessions of the AUTH flood, each with one attempt in flight: three
/// times what the verifiers take in at once (THREADS running, QUEUE
/// waiting), so that with every first attempt sent together the queue
/// overflows unless the node verifies two thirds of them (34 rounds of
/// Argon2 on its 4 threads) before it has read the rest of the lines
/// already waiting in its sockets.
const FLOOD_SESSIONS: usize = 3 * (THREADS + QUEUE);
/// What else the AUTH flood may add: the sessions' buffers, the
/// allocator's slack, the debug build.
const MARGIN_KB: u64 = 48 * 1024;

fn status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the node's /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// `mxrelay users add` against the domain database at `url`.
fn users_add(url: &str, user: &str, password: &str) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mxrelay"))
        .args(["users", "add", user])
        .env("MXRELAY_DOMAINS_URL", url)
        .env("MXRELAY_QUEUE_URL", SHARED_REDIS)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(format!("{password}\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn an_auth_flood_from_many_addresses_stays_within_the_verifier_memory() {
    let w = World::start_with(&[
        ("MXRELAY_AUTH_ENABLED", "true"),
        ("MXRELAY_AUTH_TLS_ONLY", "false"),
        ("MXRELAY_SMTP_AUTH_FAILURE_LIMIT", "1000"),
    ]);
    users_add(&w.db.url(), "bob", "right");
    let pid = w.relay.pid();
    // One verification first, so that idle includes the code paths.
    let mut c = Raw::ehlo(&w.relay.addr());
    assert!(c.cmd("AUTH PLAIN AGJvYgB3cm9uZw==").starts_with("535"));
    let idle = status_kb(pid, "VmRSS:");
    // FLOOD_SESSIONS sessions from half as many addresses, all greeted
    // first; then each sends 3 wrong AUTH PLAIN at once, all sessions
    // together, and only then are the replies read.
    let addr = w.relay.addr();
    let mut sessions: Vec<Raw> = (0..FLOOD_SESSIONS)
        .map(|i| {
            let mut c = Raw::connect_from(&format!("127.0.1.{}", 10 + i % (FLOOD_SESSIONS / 2)), &addr);
            assert_eq!(c.code(), 220);
            c.send("EHLO flood.example\r\n");
            assert_eq!(c.code(), 250);
            c
        })
        .collect();
    for c in &mut sessions {
        c.send("AUTH PLAIN AGJvYgB3cm9uZw==\r\nAUTH PLAIN AGJvYgB3cm9uZw==\r\nAUTH PLAIN AGJvYgB3cm9uZw==\r\n");
    }
    let replies: Vec<String> =
        sessions.iter_mut().flat_map(|c| (0..3).map(|_| c.reply()).collect::<Vec<_>>()).collect();
    let failed = "535 5.7.8 Error: authentication failed\r\n";
    let refused = "454 4.7.0 Temporary authentication failure\r\n";
    let unexpected: Vec<&String> = replies.iter().filter(|r| *r != failed && *r != refused).collect();
    assert!(unexpected.is_empty(), "{unexpected:?}");
    let busy = replies.iter().filter(|r| *r == refused).count();
    assert!(busy >= 1, "no attempt of {} answered 454 4.7.0: the verifiers' queue never overflowed", replies.len());
    let peak = status_kb(pid, "VmHWM:");
    eprintln!("auth flood: idle {idle} kB, peak {peak} kB, 454 for {busy} of {} attempts", replies.len());
    assert!(
        peak <= idle + VERIFIER_MEMORY_KB + MARGIN_KB,
        "peak RSS {peak} kB, idle {idle} kB: more than the verifiers' {VERIFIER_MEMORY_KB} kB + {MARGIN_KB} kB"
    );
    assert_eq!(w.relay.value("mxrelay_smtp_auth_verifier_busy_total"), busy as f64);
    // The verifiers drop their buffers after 10 s without work.
    wait_until("RSS back near idle", Duration::from_secs(40), || status_kb(pid, "VmRSS:") <= idle + MARGIN_KB);
    // And the right password still works.
    let mut c = Raw::ehlo(&w.relay.addr());
    assert!(c.cmd("AUTH PLAIN AGJvYgByaWdodA==").starts_with("235"));
}

#[test]
fn pipelined_recipients_past_the_limit_keep_the_transaction() {
    let w = InProcessWorld::start();
    let mut c = Raw::ehlo(&w.relay.addr());
    let mut batch = format!("MAIL FROM:<{SENDER}>\r\n");
    for i in 0..1500 {
        batch.push_str(&format!("RCPT TO:<r{i}@friet.pan>\r\n"));
    }
    batch.push_str("DATA\r\n");
    c.send(&batch);
    assert!(c.reply().starts_with("250 2.1.0"));
    let replies: Vec<String> = (0..1500).map(|_| c.reply()).collect();
    assert!(replies[..1000].iter().all(|r| r.starts_with("250 2.1.5")), "{:?}", &replies[..3]);
    assert!(replies[1000..].iter().all(|r| r.starts_with("452 4.5.3")), "{:?}", &replies[1000..1003]);
    assert!(c.reply().starts_with("354"));
    c.send("Subject: many\r\n\r\nhi\r\n.\r\n");
    let r = c.reply();
    assert!(r.starts_with("250 2.0.0 Ok: queued as"), "{r}");
    let id = queued_id(&r).unwrap();
    assert_eq!(w.queue().recipients(&id).len(), 1000);
    assert!(c.cmd("NOOP").starts_with("250"), "the session goes on");
}

/// Opens `n` idle sessions (greeting read) from 127.0.2.x, 10 per address.
fn idle_sessions(addr: &str, n: usize) -> Vec<Raw> {
    (0..n)
        .map(|i| {
            let mut c = Raw::connect_from(&format!("127.0.2.{}", 10 + i / 10), addr);
            assert!(c.reply().starts_with("220"), "idle session {i} not greeted");
            c
        })
        .collect()
}

#[test]
fn a_connection_flood_puts_the_node_under_stress_and_leaves_trusted_clients_a_reserved_slot() {
    // Stress from 80 busy slots of 100; its timeout (60 s) far longer than
    // the test, so no idle session is cut and frees a general slot here
    // (stress_mode_cuts_idle_sessions_and_ends_when_they_are_gone cuts them).
    let w = InProcessWorld::start_with(&[
        ("MXRELAY_SMTP_MAX_CONNECTIONS", "100"),
        ("MXRELAY_SMTP_RESERVED_CONNECTIONS_PERCENT", "5"),
        ("MXRELAY_SMTP_STRESS_THRESHOLD_PERCENT", "80"),
        ("MXRELAY_SMTP_COMMAND_TIMEOUT", "300s"),
        ("MXRELAY_SMTP_STRESS_TIMEOUT", "60s"),
    ]);
    let addr = w.relay.addr();
    wait_until("the start's probe sessions closed", Duration::from_secs(10), || {
        w.relay.value("mxrelay_smtp_connections_active") == 0.0
    });
    let _idle = idle_sessions(&addr, 95);
    // Stress started with the 80th slot, before that session's greeting.
    assert_eq!(w.relay.value("mxrelay_smtp_stress"), 1.0);
    assert_eq!(w.relay.value("mxrelay_smtp_stress_episodes_total"), 1.0);
    let log = w.relay.log();
    assert!(log.contains("stress mode on: command and data timeouts shortened"), "{log}");
    // The general slots are full: an untrusted client is refused at once.
    let mut c = Raw::connect_from("127.0.3.1", &addr);
    let r = c.reply();
    assert!(r.starts_with("421 4.7.0"), "{r}");
    // A client in mynetworks (127.0.0.9) gets a reserved slot and relays.
    let mut t = Raw::connect_from("127.0.0.9", &addr);
    assert!(t.reply().starts_with("220"));
    assert!(t.cmd("EHLO trusted.example").starts_with("250"));
    assert!(t.cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("250"));
    assert!(t.cmd("RCPT TO:<t@friet.pan>").starts_with("250"));
    assert_eq!(t.code_after("DATA"), 354);
    let r = t.cmd("Subject: reserved\r\n\r\nhi\r\n.");
    assert!(r.starts_with("250 2.0.0 Ok: queued as"), "{r}");
    assert_eq!(w.queue().recipients(&queued_id(&r).unwrap()), vec!["t@friet.pan"]);
    assert_eq!(w.relay.value("mxrelay_smtp_reserved_slots_total{client=\"mynetworks\"}"), 1.0);
    assert!(w.relay.value("mxrelay_smtp_connections_refused_total{reason=\"node_limit\"}") >= 1.0);
    // Served under stress all along: stress never ended.
    assert_eq!(w.relay.value("mxrelay_smtp_stress"), 1.0);
    assert_eq!(w.relay.value("mxrelay_smtp_stress_episodes_total"), 1.0);
}

/// With AUTH on, clients from elsewhere may take half of the reserve on
/// probation (README: `smtp.reserved_connections_percent`): one that
/// authenticates, inside TLS as `auth.tls_only` wants, relays; one that
/// sends MAIL without AUTH, even inside TLS, gets `421 4.7.0` and is
/// closed; a third finds the probation half taken and is refused at once,
/// while a client in mynetworks still gets the other half.
#[test]
fn under_a_connection_flood_a_client_that_authenticates_relays_from_a_reserved_slot() {
    let pki = TestPki::localhost();
    let (cert, key) = (pki.cert.display().to_string(), pki.key.display().to_string());
    // 40 slots, 4 of them reserved (2 on probation at most); no stress.
    let w = World::start_with(&[
        ("MXRELAY_TLS_CERT", &cert),
        ("MXRELAY_TLS_KEY", &key),
        ("MXRELAY_AUTH_ENABLED", "true"),
        ("MXRELAY_SMTP_MAX_CONNECTIONS", "40"),
        ("MXRELAY_SMTP_RESERVED_CONNECTIONS_PERCENT", "10"),
        ("MXRELAY_SMTP_STRESS_THRESHOLD_PERCENT", "0"),
    ]);
    users_add(&w.db.url(), "alice@sender.example", "correct horse");
    let addr = w.relay.addr();
    wait_until("the start's probe sessions closed", Duration::from_secs(10), || {
        w.relay.value("mxrelay_smtp_connections_active") == 0.0
    });
    let _idle = idle_sessions(&addr, 36);
    let greeted = |from: &str| {
        let mut c = Raw::connect_from(from, &addr);
        let r = c.reply();
        assert!(r.starts_with("220"), "{from}: {r}");
        c
    };
    let (a, b) = (greeted("127.0.3.1"), greeted("127.0.3.2"));
    let mut c = Raw::connect_from("127.0.3.3", &addr);
    let r = c.reply();
    assert!(r.starts_with("421 4.7.0"), "a third client on probation: {r}");
    let mut t = greeted("127.0.0.9");
    assert_eq!(w.relay.value("mxrelay_smtp_reserved_slots_total{client=\"probation\"}"), 2.0);
    assert_eq!(w.relay.value("mxrelay_smtp_reserved_slots_total{client=\"mynetworks\"}"), 1.0);

    let in_tls = |mut c: Raw| {
        assert!(!c.cmd("EHLO client.example").contains("AUTH"), "AUTH offered in clear");
        assert!(c.cmd("STARTTLS").starts_with("220"));
        let mut t = TlsClient::handshake(c.into_tcp(), &pki, "localhost").expect("handshake");
        assert!(t.cmd("EHLO client.example").contains("250-AUTH PLAIN LOGIN"));
        t
    };
    // Authenticated inside TLS: relays to a domain that is not listed.
    let mut a = in_tls(a);
    use base64::Engine;
    let plain = base64::engine::general_purpose::STANDARD.encode("\0alice@sender.example\0correct horse");
    let r = a.cmd(&format!("AUTH PLAIN {plain}"));
    assert!(r.starts_with("235 2.7.0"), "{r}");
    assert!(a.cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("250"));
    let r = a.cmd("RCPT TO:<someone@other.example>");
    assert!(r.starts_with("250 2.1.5"), "{r}");
    assert!(a.cmd("DATA").starts_with("354"));
    let r = a.cmd("Subject: probation\r\n\r\nhi\r\n.");
    assert!(r.starts_with("250 2.0.0 Ok: queued as"), "{r}");
    let id = queued_id(&r).unwrap();
    assert_eq!(w.queue().recipients(&id), vec!["someone@other.example"]);
    let body = String::from_utf8(w.queue().body(&id)).unwrap();
    assert!(body.contains("with ESMTPSA id"), "{body}");

    // MAIL without AUTH in a probation slot, TLS or not: 421, closed.
    let mut b = in_tls(b);
    let r = b.cmd(&format!("MAIL FROM:<{SENDER}>"));
    assert_eq!(r, "421 4.7.0 relay.test Error: too many connections; authenticate first or try later\r\n");
    assert_eq!(b.reply(), "", "the connection was left open");
    assert!(w.relay.log().contains("MAIL without AUTH in a reserved slot: closed"));

    // The client in mynetworks needs no AUTH.
    assert!(t.cmd("EHLO trusted.example").starts_with("250"));
    assert!(t.cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("250"));
    assert!(t.cmd("RCPT TO:<t@friet.pan>").starts_with("250"));
    assert_eq!(t.code_after("DATA"), 354);
    assert!(t.cmd("Subject: trusted\r\n\r\nhi\r\n.").starts_with("250 2.0.0 Ok: queued as"));
}

#[test]
fn stress_mode_cuts_idle_sessions_and_ends_when_they_are_gone() {
    // 8 s between commands normally, 1 s under stress (from 80 busy slots
    // of 100, until fewer than 60 are busy).
    let w = InProcessWorld::start_with(&[
        ("MXRELAY_SMTP_MAX_CONNECTIONS", "100"),
        ("MXRELAY_SMTP_COMMAND_TIMEOUT", "8s"),
        ("MXRELAY_SMTP_STRESS_THRESHOLD_PERCENT", "80"),
        ("MXRELAY_SMTP_STRESS_TIMEOUT", "1s"),
    ]);
    let idle = idle_sessions(&w.relay.addr(), 85);
    let started = Instant::now();
    let cut: Vec<(String, Duration)> = idle
        .into_iter()
        .map(|mut c| std::thread::spawn(move || (c.reply(), started.elapsed())))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert!(cut.iter().all(|(r, _)| r.starts_with("421 4.4.2")), "{:?}", &cut[..3]);
    // Under stress the idle sessions were cut after 1 s, until stress ended;
    // the rest waited the normal 8 s.
    let early = cut.iter().filter(|(_, t)| *t < Duration::from_secs(5)).count();
    assert!(early >= 85 - 59, "only {early} idle sessions cut under stress\n{}", w.relay.log());
    assert!(early < 85, "stress never ended");
    assert_eq!(w.relay.value("mxrelay_smtp_stress_episodes_total"), 1.0);
    assert_eq!(w.relay.value("mxrelay_smtp_stress"), 0.0);
    let log = w.relay.log();
    assert!(log.contains("stress mode on") && log.contains("stress mode off"), "{log}");
}

/// A node delivering to `dest` (the listed domain's relay host).
fn delivering(dest: &Destination, env: &[(&str, &str)]) -> InProcessWorld {
    let mut env = env.to_vec();
    env.push(("MXRELAY_DELIVERY_ENABLED", "true"));
    InProcessWorld::start_to(dest.port, &env)
}

fn send_raw(addr: &str, content: &[u8]) -> String {
    let mut c = Raw::ehlo(addr);
    assert!(c.cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("250"));
    assert!(c.cmd("RCPT TO:<t@friet.pan>").starts_with("250"));
    assert_eq!(c.code_after("DATA"), 354);
    c.send_bytes(content);
    c.send(".\r\n");
    c.reply()
}

#[test]
fn bare_cr_smuggling_reaches_the_destination_as_one_normalised_message() {
    let dest = Destination::start();
    let w = delivering(&dest, &[("MXRELAY_SMTPD_FORBID_BARE_NEWLINE", "false")]);
    let smuggled = b"Subject: cr\r\n\r\nbody\r.\rMAIL FROM:<evil@sender.example>\rRCPT TO:<victim@friet.pan>\rDATA\r\rforged\r.\r\r\n";
    let r = send_raw(&w.relay.addr(), smuggled);
    assert!(r.starts_with("250 2.0.0"), "{r}");
    let got = dest.wait_for(1, Duration::from_secs(20));
    assert_eq!(got.len(), 1, "one message, none forged");
    let data = &got[0].data;
    let lone_cr = data.iter().enumerate().any(|(i, b)| *b == b'\r' && data.get(i + 1) != Some(&b'\n'));
    assert!(!lone_cr, "a bare CR reached the destination: {:?}", String::from_utf8_lossy(data));
    assert!(String::from_utf8_lossy(data).ends_with(
        "body\r\n.\r\nMAIL FROM:<evil@sender.example>\r\nRCPT TO:<victim@friet.pan>\r\nDATA\r\n\r\nforged\r\n.\r\n\r\n"
    ));
    assert_eq!(got[0].rcpts, vec!["t@friet.pan"]);
}

#[test]
fn a_64_kb_line_reaches_a_strict_destination_folded() {
    let dest = Destination::start();
    dest.set_line_limit(998);
    let w = delivering(&dest, &[]);
    let line = "x".repeat(64 * 1024);
    let content = format!("Subject: long\r\n\r\n{line}\r\nend\r\n");
    let r = send_raw(&w.relay.addr(), content.as_bytes());
    assert!(r.starts_with("250 2.0.0"), "{r}");
    let got = dest.wait_for(1, Duration::from_secs(20));
    let data = String::from_utf8(got[0].data.clone()).unwrap();
    assert!(data.split("\r\n").all(|l| l.len() <= 998), "a line over 998 octets was sent");
    let body = data.split_once("\r\n\r\n").unwrap().1;
    assert_eq!(body.replace("\r\n ", ""), format!("{line}\r\nend\r\n"), "folding changed more than the breaks");
    assert_eq!(w.relay.value("mxrelay_delivery_lines_folded_total"), ((64 * 1024 - 998usize).div_ceil(997)) as f64);
}
