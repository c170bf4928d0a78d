//! The client's real address behind a load balancer (PROXY protocol v1/v2,
//! from allowed and other 127.0.0.x sources) and the per-client abuse
//! limits: connection rate and concurrency, message and recipient rates,
//! slow clients, error counts. Each tripped limit gets a precise reply
//! while other clients are still served. Every node runs in process on the
//! embedded stores; HAProxy is real.

use std::time::{Duration, Instant};

use crate::support::in_process::InProcessWorld;
use crate::support::*;

/// 127.0.0.2 is the load balancer; 127.0.0.9 is in mynetworks.
const BALANCER: &str = "127.0.0.2";
const STRANGER: &str = "127.0.0.3";

fn proxy_world() -> InProcessWorld {
    InProcessWorld::start_with(&[
        ("MXRELAY_SMTP_PROXY_PROTOCOL", "true"),
        ("MXRELAY_SMTP_PROXY_NETWORKS", "127.0.0.2/32"),
    ])
}

fn v2_header(source: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&source);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&port.to_be_bytes());
    h.extend_from_slice(&25u16.to_be_bytes());
    h
}

/// Applies `[smtp]` keys by a reload (SIGHUP's) once the world is up (the start-up
/// probes from 127.0.0.1 must not count against them).
fn set_smtp_limits(w: &mut InProcessWorld, lines: &str) {
    let config = base_config(&w.url, &w.url, &w.dns).replacen("[smtp]\n", &format!("[smtp]\n{lines}\n"), 1);
    w.relay.rewrite_config(&config);
    w.relay.reload();
    wait_until("the reload", Duration::from_secs(10), || w.relay.log().contains("config reloaded; applied: smtp."));
}

/// Relaying to an unlisted domain: allowed only for mynetworks clients.
fn relay_attempt(c: &mut Raw) -> String {
    assert_eq!(c.code(), 220);
    assert!(c.cmd("EHLO lb.example").starts_with("250"));
    assert!(c.cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("250"));
    c.cmd("RCPT TO:<someone@other.example>")
}

#[test]
fn proxy_headers_from_the_balancer_set_the_client_address() {
    let w = proxy_world();
    let addr = w.relay.addr();

    // v1 carrying a mynetworks address: policy sees that address.
    let mut c = Raw::connect_from(BALANCER, &addr);
    c.send("PROXY TCP4 127.0.0.9 127.0.0.1 40000 25\r\n");
    assert!(relay_attempt(&mut c).starts_with("250"), "policy did not use the proxied address");
    assert_eq!(c.code_after("DATA"), 354);
    c.send("Subject: via proxy\r\n\r\nhello\r\n.\r\n");
    let r = c.reply();
    let id = queued_id(&r).expect("queued");
    let body = String::from_utf8(w.queue().body(&id)).unwrap();
    assert!(body.contains("(unknown [127.0.0.9])"), "Received names the balancer: {body}");

    // v1 carrying an outside address: no relaying.
    let mut c = Raw::connect_from(BALANCER, &addr);
    c.send("PROXY TCP4 192.0.2.7 127.0.0.1 40001 25\r\n");
    assert!(relay_attempt(&mut c).starts_with("454 4.7.1"));

    // v2 (binary).
    let mut c = Raw::connect_from(BALANCER, &addr);
    c.send_bytes(&v2_header([127, 0, 0, 9], 40002));
    assert!(relay_attempt(&mut c).starts_with("250"));

    // The balancer without a valid header: dropped without a greeting.
    let mut c = Raw::connect_from(BALANCER, &addr);
    c.send("EHLO not-a-header\r\n");
    assert!(c.closed(), "a connection without a PROXY header was served");

    let log = w.relay.log();
    assert!(log.contains("connect from unknown[127.0.0.9]"), "{log}");
    assert!(log.contains("connect from unknown[192.0.2.7]"), "{log}");
    assert!(log.contains("PROXY protocol: connection dropped"), "{log}");
    assert_eq!(w.relay.value("mxrelay_smtp_proxy_headers_total{result=\"accepted\"}"), 3.0);
}

#[test]
fn proxy_headers_from_elsewhere_are_refused() {
    let w = proxy_world();
    let addr = w.relay.addr();
    for header in [b"PROXY TCP4 127.0.0.9 127.0.0.1 40000 25\r\n".to_vec(), v2_header([127, 0, 0, 9], 40000)] {
        // Sent at once, before the greeting.
        let mut c = Raw::connect_from(STRANGER, &addr);
        c.send_bytes(&header);
        let r = c.reply();
        let r = if r.starts_with("220") { c.reply() } else { r };
        assert!(r.starts_with("421 4.7.0 Error: PROXY header"), "{r:?}");
        assert!(c.closed());
        // Sent after the greeting.
        let mut c = Raw::connect_from(STRANGER, &addr);
        assert_eq!(c.code(), 220);
        c.send_bytes(&header);
        assert!(c.reply().starts_with("421 4.7.0 Error: PROXY header"));
    }
    // The same address without a header is an ordinary client.
    let mut c = Raw::connect_from(STRANGER, &addr);
    assert!(relay_attempt(&mut c).starts_with("454 4.7.1"));
    assert_eq!(w.relay.value("mxrelay_smtp_proxy_headers_total{result=\"untrusted\"}"), 4.0);
}

#[test]
fn connection_limits_answer_421_and_others_are_still_served() {
    let mut w = InProcessWorld::start();
    set_smtp_limits(&mut w, "max_connections_per_ip = 2\nconnection_rate_limit = 6");
    let addr = w.relay.addr();
    let a1 = Raw::connect_from("127.0.0.4", &addr);
    let mut a2 = Raw::connect_from("127.0.0.4", &addr);
    assert_eq!(a2.code(), 220);
    let mut a3 = Raw::connect_from("127.0.0.4", &addr);
    assert!(a3.reply().starts_with("421 4.7.0 Error: too many connections from 127.0.0.4"));
    assert!(a3.closed());
    // Another client is served meanwhile.
    let mut other = Raw::connect_from("127.0.0.5", &addr);
    assert!(relay_attempt(&mut other).starts_with("454"));
    drop((a1, a2));

    // Rate: 6 connections per window from one address, then 421.
    let mut refused = 0;
    for _ in 0..4 {
        let mut c = Raw::connect_from("127.0.0.4", &addr);
        let r = c.reply();
        if r.starts_with("421") {
            assert!(r.contains("too many connections"), "{r}");
            refused += 1;
        }
    }
    assert!(refused >= 1, "7 connections within the window were all served");
    assert!(w.relay.value("mxrelay_smtp_limit_hits_total{limit=\"connection_rate\"}") >= 1.0);
    assert!(w.relay.value("mxrelay_smtp_limit_hits_total{limit=\"connections_per_ip\"}") >= 1.0);
    assert!(w.relay.log().contains("connection refused: Error: too many connections from 127.0.0.4"));
}

#[test]
fn message_recipient_and_error_limits() {
    let mut w = InProcessWorld::start();
    set_smtp_limits(&mut w, "message_rate_limit = 2\nrecipient_rate_limit = 3\nerror_limit = 3");
    let addr = w.relay.addr();
    let mut c = Raw::connect_from("127.0.0.6", &addr);
    assert_eq!(c.code(), 220);
    assert!(c.cmd("EHLO client.example").starts_with("250"));
    assert!(c.cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("250"));
    for n in 1..=3 {
        assert!(c.cmd(&format!("RCPT TO:<r{n}@friet.pan>")).starts_with("250"));
    }
    assert!(c.cmd("RCPT TO:<r4@friet.pan>").starts_with("450 4.7.1 Error: too many recipients from 127.0.0.6"));
    assert!(c.cmd("RSET").starts_with("250"));
    assert!(c.cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("250"));
    assert!(c.cmd("RSET").starts_with("250"));
    assert!(c.cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("450 4.7.1 Error: too much mail from 127.0.0.6"));

    // mynetworks is exempt (as from Postfix's anvil).
    let mut t = Raw::connect_from("127.0.0.9", &addr);
    assert_eq!(t.code(), 220);
    assert!(t.cmd("EHLO client.example").starts_with("250"));
    for _ in 0..3 {
        assert!(t.cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("250"));
        assert!(t.cmd("RSET").starts_with("250"));
    }

    // Errors: the third one closes the session.
    let mut e = Raw::connect_from("127.0.0.7", &addr);
    assert_eq!(e.code(), 220);
    assert!(e.cmd("BOGUS").starts_with("502"));
    assert!(e.cmd("BOGUS").starts_with("502"));
    assert!(e.cmd("BOGUS").starts_with("502"));
    let r = e.reply();
    assert!(r.starts_with("421 4.7.0 relay.test Error: too many errors"), "{r}");
    assert!(e.closed());
    for limit in ["message_rate", "recipient_rate", "errors"] {
        assert!(w.relay.value(&format!("mxrelay_smtp_limit_hits_total{{limit=\"{limit}\"}}")) >= 1.0, "{limit}");
    }
}

#[test]
fn slow_clients_are_cut_off_while_others_are_served() {
    let w = InProcessWorld::start_with(&[
        ("MXRELAY_SMTP_COMMAND_TIMEOUT", "2s"),
        ("MXRELAY_SMTP_DATA_TIMEOUT", "2s"),
        ("MXRELAY_SMTP_MIN_DATA_RATE", "1000"),
    ]);
    let addr = w.relay.addr();
    let dribble = |c: &mut Raw, text: &str| -> (Duration, String) {
        let started = Instant::now();
        for b in text.bytes().cycle() {
            // The relay answers and closes; a write then fails.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.send_bytes(&[b]))).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
            if started.elapsed() > Duration::from_secs(3) {
                break;
            }
        }
        (started.elapsed(), c.reply())
    };

    // A command line trickling in, a byte every 300 ms: each read is within
    // the timeout, the line is not.
    let mut slow = Raw::connect_from("127.0.0.4", &addr);
    assert_eq!(slow.code(), 220);
    let other = std::thread::spawn({
        let addr = addr.clone();
        move || {
            let mut c = Raw::connect_from("127.0.0.5", &addr);
            assert_eq!(c.code(), 220);
            assert!(c.cmd("EHLO client.example").starts_with("250"));
            assert!(c.cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("250"));
            assert!(c.cmd("RCPT TO:<fast@friet.pan>").starts_with("250"));
            assert_eq!(c.code_after("DATA"), 354);
            c.send("Subject: fast\r\n\r\nfast\r\n.\r\n");
            c.reply()
        }
    });
    let (_, r) = dribble(&mut slow, "EHLO very-slow.example");
    assert!(r.starts_with("421 4.4.2"), "slow command line not cut off: {r:?}");
    assert!(other.join().unwrap().starts_with("250 2.0.0 Ok: queued as"));

    // Content below smtpd_min_data_rate: 3 bytes/s against 1000.
    let mut slow = Raw::connect_from("127.0.0.4", &addr);
    assert_eq!(slow.code(), 220);
    assert!(slow.cmd("EHLO client.example").starts_with("250"));
    assert!(slow.cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("250"));
    assert!(slow.cmd("RCPT TO:<slow@friet.pan>").starts_with("250"));
    assert_eq!(slow.code_after("DATA"), 354);
    let (_, r) = dribble(&mut slow, "Subject: slow\r\n\r\nslow body\r\n");
    assert!(r.starts_with("421 4.4.2"), "slow content not cut off: {r:?}");
    assert!(w.relay.value("mxrelay_smtp_limit_hits_total{limit=\"slow_client\"}") >= 2.0);
}

use crate::support::pki::{TestPki, TlsClient};

/// A v2 header with `command` (0 LOCAL, 1 PROXY) and no addresses (AF_UNSPEC).
fn v2_unspec(command: u8) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x20 | command, 0x00, 0, 0]);
    h
}

/// Sends one message for a listed domain; the queued body.
fn queue_one(w: &InProcessWorld, c: &mut Raw) -> String {
    assert_eq!(c.code(), 220);
    assert!(c.cmd("EHLO lb.example").starts_with("250"));
    assert!(c.cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("250"));
    assert!(c.cmd("RCPT TO:<t@friet.pan>").starts_with("250"));
    assert_eq!(c.code_after("DATA"), 354);
    c.send("Subject: local\r\n\r\nhello\r\n.\r\n");
    let r = c.reply();
    let id = queued_id(&r).unwrap_or_else(|| panic!("not queued: {r}"));
    String::from_utf8(w.queue().body(&id)).unwrap()
}

/// v2 LOCAL (a health check), v2 PROXY with AF_UNSPEC and v1 UNKNOWN (bare
/// and with the addresses the spec lets a sender add): the balancer's own
/// socket address stands, in policy, `Received:` and the log.
#[test]
fn proxy_local_and_unknown_headers_keep_the_socket_address() {
    let w = proxy_world();
    let addr = w.relay.addr();
    let headers: [(&str, Vec<u8>); 4] = [
        ("v2 LOCAL", v2_unspec(0)),
        ("v2 PROXY AF_UNSPEC", v2_unspec(1)),
        ("v1 UNKNOWN", b"PROXY UNKNOWN\r\n".to_vec()),
        ("v1 UNKNOWN with addresses", b"PROXY UNKNOWN ffff:f::1 ffff:f::2 40000 25\r\n".to_vec()),
    ];
    for (what, header) in &headers {
        let mut c = Raw::connect_from(BALANCER, &addr);
        c.send_bytes(header);
        let body = queue_one(&w, &mut c);
        let received = body.lines().next().unwrap_or("");
        assert!(received.contains("(unknown [127.0.0.2])"), "{what}: {received}");
        // 127.0.0.2 is not in mynetworks: no relaying on its behalf either.
        let mut c = Raw::connect_from(BALANCER, &addr);
        c.send_bytes(header);
        assert!(relay_attempt(&mut c).starts_with("454 4.7.1"), "{what}");
    }
    assert_eq!(w.relay.value("mxrelay_smtp_proxy_headers_total{result=\"local\"}"), 8.0);
    assert_eq!(w.relay.value("mxrelay_smtp_proxy_headers_total{result=\"invalid\"}"), 0.0);
    let log = w.relay.log();
    assert_eq!(log.matches(" connect from unknown[127.0.0.2]").count(), 8, "{log}");
}

/// A world whose node takes PROXY headers from the balancer (127.0.0.2)
/// and has an implicit-TLS listener with `pki`'s certificate, at the
/// address returned.
fn implicit_tls_behind_balancer(pki: &TestPki) -> (InProcessWorld, String) {
    let (cert, key) = (pki.cert.display().to_string(), pki.key.display().to_string());
    let w = InProcessWorld::start_with(&[
        ("MXRELAY_SMTP_PROXY_PROTOCOL", "true"),
        ("MXRELAY_SMTP_PROXY_NETWORKS", "127.0.0.2/32"),
        ("MXRELAY_TLS_CERT", &cert),
        ("MXRELAY_TLS_KEY", &key),
        ("MXRELAY_TLS_IMPLICIT_LISTEN", "127.0.0.1:0"),
    ]);
    let implicit = w.relay.smtps.expect("the implicit-TLS listener").to_string();
    (w, implicit)
}

/// The PROXY header comes before the TLS handshake on the implicit-TLS
/// listener (as HAProxy's `send-proxy` sends it): the proxied address is
/// the client's, inside TLS, for policy, `Received:` and the log.
#[test]
fn proxy_header_ahead_of_the_implicit_tls_handshake() {
    let pki = TestPki::localhost();
    let (w, implicit) = implicit_tls_behind_balancer(&pki);
    let tls_after = |header: &[u8]| {
        let mut raw = Raw::connect_from(BALANCER, &implicit);
        raw.send_bytes(header);
        let mut t = TlsClient::handshake(raw.into_tcp(), &pki, "localhost").expect("TLS after the PROXY header");
        let greeting = t.reply();
        assert!(greeting.starts_with("220 relay.test ESMTP"), "{greeting}");
        assert!(t.cmd("EHLO lb.example").starts_with("250"));
        assert!(t.cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("250"));
        t
    };

    // v2 from an outside address: a listed domain only.
    let mut t = tls_after(&v2_header([192, 0, 2, 44], 40100));
    assert!(t.cmd("RCPT TO:<someone@other.example>").starts_with("454 4.7.1"));
    assert!(t.cmd("RCPT TO:<t@friet.pan>").starts_with("250"));
    assert!(t.cmd("DATA").starts_with("354"));
    let r = t.cmd("Subject: proxied TLS\r\n\r\nhello\r\n.");
    let id = queued_id(&r).unwrap_or_else(|| panic!("not queued: {r}"));
    let body = String::from_utf8(w.queue().body(&id)).unwrap();
    let received = body.split("\r\n\r\n").next().unwrap();
    assert!(received.contains("(unknown [192.0.2.44])"), "{received}");
    assert!(
        received.contains("(using TLSv1.3 with cipher TLS13_") && received.contains("with ESMTPS id"),
        "{received}"
    );

    // v1 carrying a mynetworks address: relaying allowed, inside TLS.
    let mut t = tls_after(b"PROXY TCP4 127.0.0.9 127.0.0.1 40101 465\r\n");
    let r = t.cmd("RCPT TO:<someone@other.example>");
    assert!(r.starts_with("250"), "policy did not use the proxied address: {r}");

    let log = w.relay.log();
    assert!(log.contains("TLS connection established from unknown[192.0.2.44]: TLSv1.3"), "{log}");
    assert!(log.contains("TLS connection established from unknown[127.0.0.9]: TLSv1.3"), "{log}");
    assert_eq!(w.relay.value("mxrelay_smtp_proxy_headers_total{result=\"accepted\"}"), 2.0);
}

/// A real HAProxy (`send-proxy-v2`, connecting from the balancer's address)
/// in front of the implicit-TLS listener: swaks speaks TLS through it from
/// 127.0.0.5 and from 127.0.0.9 (mynetworks), and the node sees those
/// addresses; HAProxy's own health checks (`check-send-proxy`, v2 LOCAL) to
/// the plain listener keep the balancer's address.
#[test]
fn haproxy_send_proxy_v2_in_front_of_the_implicit_tls_listener() {
    use crate::support::haproxy::Haproxy;
    let pki = TestPki::localhost();
    let (w, implicit) = implicit_tls_behind_balancer(&pki);
    let lb = Haproxy::start(&implicit, BALANCER, w.relay.smtp.port());
    wait_until("a health check from haproxy", Duration::from_secs(20), || {
        w.relay.metric("mxrelay_smtp_proxy_headers_total{result=\"local\"}").is_some_and(|n| n >= 1.0)
    });
    let via_lb = |from: &str, to: &str| {
        swaks(
            &lb.addr(),
            &["--tlsc", "--local-interface", from, "--from", SENDER, "--to", to, "--ehlo", "client.example"],
        )
    };

    let (status, out) = via_lb("127.0.0.5", "t@friet.pan");
    assert_eq!(status, 0, "{out}");
    let id = queued_id(&out).expect("queued");
    let body = String::from_utf8(w.queue().body(&id)).unwrap();
    let received = body.split("\r\n\r\n").next().unwrap();
    assert!(received.contains("(unknown [127.0.0.5])"), "{received}");
    assert!(received.contains("(using TLSv1.3 with cipher TLS13_"), "{received}");
    let (status, out) = via_lb("127.0.0.5", "someone@other.example");
    assert_ne!(status, 0);
    assert!(out.contains("454 4.7.1"), "{out}");
    // The proxied address decides: 127.0.0.9 may relay anywhere.
    let (status, out) = via_lb("127.0.0.9", "someone@other.example");
    assert_eq!(status, 0, "{out}");

    let log = w.relay.log();
    assert!(log.contains("TLS connection established from unknown[127.0.0.5]: TLSv1.3"), "{log}");
    assert!(log.contains("TLS connection established from unknown[127.0.0.9]: TLSv1.3"), "{log}");
    assert!(log.contains(" connect from unknown[127.0.0.2]"), "health checks: {log}");
    assert_eq!(w.relay.value("mxrelay_smtp_proxy_headers_total{result=\"accepted\"}"), 3.0);
    assert_eq!(w.relay.value("mxrelay_smtp_proxy_headers_total{result=\"invalid\"}"), 0.0);
}
