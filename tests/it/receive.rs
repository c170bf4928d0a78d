//! Receiving as a closed relay, with swaks and raw sockets against a node
//! run in process on the embedded stores and a DNS server on loopback (the
//! oversize test runs the binary on Redis: it checks Redis for leftovers).

use crate::support::in_process::InProcessWorld;
use crate::support::*;

/// The message swaks sends, byte for byte (with a dot-stuffed line).
const MESSAGE: &str = "From: sender@sender.example\r\nTo: test@friet.pan\r\nSubject: byte-exact\r\n\r\nline one\r\n.leading dot\r\n..two dots\r\n\r\nlast line\r\n";

#[test]
fn listed_domain_is_queued_byte_exact_with_our_received_header() {
    let w = InProcessWorld::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("msg.eml");
    // swaks ends the data with CRLF.CRLF itself.
    std::fs::write(&data, MESSAGE.strip_suffix("\r\n").unwrap()).unwrap();
    let (code, out) = swaks(
        &w.relay.addr(),
        &["--from", SENDER, "--to", "test@friet.pan", "--helo", "client.example", "--data", data.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{out}");
    let id = queued_id(&out).expect("queued as");
    let q = w.queue();
    assert_eq!(q.ready_ids(), vec![id.clone()]);
    let body = q.body(&id);
    let text = String::from_utf8(body).unwrap();
    let (received, rest) = text.split_at(text.find("From: sender").expect("message after header"));
    assert_eq!(rest, MESSAGE, "queued body differs from what was sent");
    assert!(received.starts_with("Received: from client.example (unknown [127.0.0.1])\r\n\tby relay.test (mxrelay node test-node) with ESMTP id "), "{received}");
    assert!(received.contains(&id) && received.contains("for <test@friet.pan>"), "{received}");
    let env = q.envelope(&id);
    assert_eq!(env.sender, SENDER);
    assert_eq!(env.helo, "client.example");
    assert_eq!(env.size, text.len() as u64);
    assert_eq!(q.recipients(&id), vec!["test@friet.pan"]);
}

#[test]
fn unlisted_domain_is_relay_access_denied() {
    let w = InProcessWorld::start();
    let (_, out) =
        swaks(&w.relay.addr(), &["--from", SENDER, "--to", "test@other.example", "--helo", "client.example"]);
    assert!(out.contains("454 4.7.1 <test@other.example>: Relay access denied"), "{out}");
    assert!(w.queue().ready_ids().is_empty());
}

#[test]
fn mixed_recipients_only_listed_accepted_and_case_ignored() {
    let w = InProcessWorld::start();
    let (code, out) = swaks(
        &w.relay.addr(),
        &["--from", SENDER, "--to", "a@friet.pan,b@other.example,c@FRIET.Pan", "--helo", "client.example"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("454 4.7.1 <b@other.example>"), "{out}");
    let id = queued_id(&out).unwrap();
    assert_eq!(w.queue().recipients(&id), vec!["a@friet.pan", "c@FRIET.Pan"]);
}

#[test]
fn mynetworks_client_may_relay_anywhere() {
    let w = InProcessWorld::start();
    let (code, out) = swaks(
        &w.relay.addr(),
        &["--from", SENDER, "--to", "x@unlisted.example", "--helo", "client.example", "--local-interface", "127.0.0.9"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(queued_id(&out).is_some());
}

#[test]
fn vrfy_and_expn_reveal_nothing() {
    let w = InProcessWorld::start();
    let mut c = Raw::ehlo(&w.relay.addr());
    assert!(c.cmd("VRFY test@friet.pan").starts_with("502 5.5.1"));
    assert!(c.cmd("EXPN staff").starts_with("502 5.5.1"));
    assert!(c.cmd("HELP").starts_with("214 2.0.0"));
    assert!(c.cmd("NOOP").starts_with("250 2.0.0"));
    assert!(c.cmd("QUIT").starts_with("221 2.0.0"));
}

#[test]
fn helo_is_required() {
    let w = InProcessWorld::start();
    let mut c = Raw::connect(&w.relay.addr());
    assert_eq!(c.code(), 220);
    assert!(c.cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("503 5.5.1"));
}

#[test]
fn sender_checks() {
    let w = InProcessWorld::start();
    let (_, out) =
        swaks(&w.relay.addr(), &["--from", "user@localhost", "--to", "t@friet.pan", "--helo", "client.example"]);
    assert!(out.contains("504 5.5.2 <user@localhost>: Sender address rejected: need fully-qualified address"), "{out}");
    let (_, out) =
        swaks(&w.relay.addr(), &["--from", "user@nx.example", "--to", "t@friet.pan", "--helo", "client.example"]);
    assert!(out.contains("450 4.1.8 <user@nx.example>: Sender address rejected: Domain not found"), "{out}");
    let (_, out) = swaks(&w.relay.addr(), &["--from", SENDER, "--to", "t@friet.pan", "--helo", "bad_helo!"]);
    assert!(out.contains("501 5.5.2 <bad_helo!>: Helo command rejected: Invalid name"), "{out}");
    // strict_rfc821_envelopes
    let mut c = Raw::ehlo(&w.relay.addr());
    assert!(c.cmd(&format!("MAIL FROM:{SENDER}")).starts_with("501 5.1.7"));
    // The null sender of bounces is accepted.
    assert!(c.cmd("MAIL FROM:<>").starts_with("250 2.1.0"));
    assert!(c.cmd("RCPT TO:<t@friet.pan>").starts_with("250 2.1.5"));
}

#[test]
fn size_declared_too_big_is_552_at_mail() {
    let w = InProcessWorld::start_with(&[("MXRELAY_MESSAGE_SIZE_LIMIT", "100000")]);
    let mut c = Raw::ehlo(&w.relay.addr());
    let ehlo = c.cmd("EHLO client.example");
    for kw in ["PIPELINING", "SIZE 100000", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8", "CHUNKING"] {
        assert!(ehlo.contains(&format!("250-{kw}\r\n")) || ehlo.contains(&format!("250 {kw}\r\n")), "{kw} in {ehlo}");
    }
    assert!(c.cmd(&format!("MAIL FROM:<{SENDER}> SIZE=100001")).starts_with("552 5.3.4"));
    assert!(c.cmd(&format!("MAIL FROM:<{SENDER}> SIZE=100000")).starts_with("250"));
}

#[test]
fn oversize_body_is_read_to_its_end_and_refused() {
    // On Redis: what it checks is that no body chunks stay behind there.
    let w = World::start_with(&[("MXRELAY_MESSAGE_SIZE_LIMIT", "100000")]);
    let mut c = Raw::ehlo(&w.relay.addr());
    c.cmd(&format!("MAIL FROM:<{SENDER}>"));
    c.cmd("RCPT TO:<t@friet.pan>");
    assert_eq!(c.code_after("DATA"), 354);
    let line = format!("{}\r\n", "x".repeat(998));
    for _ in 0..200 {
        c.send(&line);
    }
    c.send(".\r\n");
    assert!(c.reply().starts_with("552 5.3.4"));
    // The session is still in step.
    assert!(c.cmd("NOOP").starts_with("250"));
    assert!(w.queue().ready_ids().is_empty());
    assert!(w.queue().stray_keys().is_empty(), "chunks left behind");
}

#[test]
fn open_relay_tricks_are_refused() {
    let w = InProcessWorld::start();
    let tricks = [
        "<other.example!user@friet.pan>",
        "<user%other.example@friet.pan>",
        "<@friet.pan:user@other.example>",
        "<@friet.pan,@friet.pan:user@other.example>",
        "<\"user@other.example\"@friet.pan>",
        "<user@[127.0.0.1]>",
        "<user@friet.pan.>",
        "<user@other.example@friet.pan>",
        "<user@friet.pan@other.example>",
        "<user@other.example>",
        "<user>",
        "<postmaster>",
        "user@friet.pan",
    ];
    let mut c = Raw::ehlo(&w.relay.addr());
    assert!(c.cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("250"));
    for t in tricks {
        let r = c.cmd(&format!("RCPT TO:{t}"));
        assert!(r.starts_with('4') || r.starts_with('5'), "{t} was accepted: {r}");
        c.cmd("RSET");
        c.cmd(&format!("MAIL FROM:<{SENDER}>"));
    }
}

#[test]
fn international_domain_matches_as_a_labels() {
    let w = InProcessWorld::start();
    w.relay.add_domain("xn--bcher-kva.example", "127.0.0.1", 2526);
    w.wait_rcpt("a@xn--bcher-kva.example", 250);
    let mut c = Raw::ehlo(&w.relay.addr());
    assert!(c.cmd(&format!("MAIL FROM:<{SENDER}> SMTPUTF8")).starts_with("250"));
    let r = c.cmd("RCPT TO:<a@Bücher.example>");
    assert!(r.starts_with("250 2.1.5"), "{r}");
    // Without SMTPUTF8, a UTF-8 address is refused.
    c.cmd("RSET");
    c.cmd(&format!("MAIL FROM:<{SENDER}>"));
    assert!(c.cmd("RCPT TO:<a@bücher.example>").starts_with("553 5.6.7"));
}

#[test]
fn recipient_domain_without_dns_is_450() {
    let w = InProcessWorld::start();
    w.relay.add_domain("nodns.example", "127.0.0.1", 2526);
    w.wait_rcpt("a@nodns.example", 450);
    let mut c = Raw::ehlo(&w.relay.addr());
    c.cmd(&format!("MAIL FROM:<{SENDER}>"));
    let r = c.cmd("RCPT TO:<a@nodns.example>");
    assert!(r.starts_with("450 4.1.2 <a@nodns.example>: Recipient address rejected: Domain not found"), "{r}");
}

#[test]
fn metrics_and_health_endpoints() {
    let w = InProcessWorld::start();
    // Counted from here: the start's RCPT probes may have been denied
    // until the domain snapshot had the listed domain.
    let samples =
        ["mxrelay_smtp_rcpt_total{result=\"relay_denied\"}", "mxrelay_smtp_messages_total{result=\"accepted\"}"];
    let before: Vec<f64> = samples.iter().map(|s| w.relay.value(s)).collect();
    swaks(&w.relay.addr(), &["--from", SENDER, "--to", "t@friet.pan", "--helo", "client.example"]);
    swaks(&w.relay.addr(), &["--from", SENDER, "--to", "t@other.example", "--helo", "client.example"]);
    // Whole samples: `contains("… 1")` would also match 10 or 12.
    let delta: Vec<f64> = samples.iter().zip(&before).map(|(s, b)| w.relay.value(s) - b).collect();
    assert_eq!(delta, vec![1.0, 1.0], "{samples:?}");
    assert_eq!(w.relay.value("mxrelay_domains_snapshot_size"), 1.0);
    assert!(w.relay.http_get("/healthz").starts_with("HTTP/1.1 200"));
    assert!(w.relay.http_get("/readyz").starts_with("HTTP/1.1 200"));
}

#[test]
fn debug_peer_list_logs_the_transcript_of_listed_clients_only() {
    // Both nodes log into this test's one buffer: the unlisted client first.
    let other = InProcessWorld::start_with(&[("MXRELAY_DEBUG_PEER_LIST", "192.0.2.0/24,peer.example")]);
    let (code, out) =
        swaks(&other.relay.addr(), &["--from", SENDER, "--to", "t@friet.pan", "--helo", "client.example"]);
    assert_eq!(code, 0, "{out}");
    assert!(!other.relay.log().contains("< EHLO"), "{}", other.relay.log());
    drop(other);
    let w = InProcessWorld::start_with(&[("MXRELAY_DEBUG_PEER_LIST", "127.0.0.1")]);
    swaks(&w.relay.addr(), &["--from", SENDER, "--to", "t@friet.pan", "--helo", "client.example"]);
    let log = w.relay.log();
    assert!(log.contains("< EHLO client.example") && log.contains("> 250 2.1.5 Ok"), "{log}");
}
