//! SMTP protocol edge cases over raw sockets: smuggling, early talkers,
//! overlong lines, NUL bytes, pipelining, BDAT, limits. Every node here runs
//! in process on the embedded stores (`support::in_process`).

use crate::support::in_process::{InProcessNode, InProcessWorld};
use crate::support::*;

fn start_data(c: &mut Raw) {
    assert!(c.cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("250"));
    assert!(c.cmd("RCPT TO:<t@friet.pan>").starts_with("250"));
    assert_eq!(c.code_after("DATA"), 354);
}

const SMUGGLING: [&str; 4] = ["\n.\n", "\n.\r\n", "\r.\r", "\r\n.\r"];

/// Each body tries to end DATA early and inject a second transaction.
fn smuggled_body(seq: &str) -> String {
    format!(
        "Subject: smuggle\r\n\r\nbefore{seq}MAIL FROM:<evil@sender.example>\r\nRCPT TO:<victim@friet.pan>\r\nDATA\r\nSubject: injected\r\n\r\nevil\r\n"
    )
}

#[test]
fn smuggling_sequences_are_refused_by_default() {
    let w = InProcessWorld::start();
    for seq in SMUGGLING {
        let mut c = Raw::ehlo(&w.relay.addr());
        start_data(&mut c);
        c.send(&smuggled_body(seq));
        c.send(".\r\n");
        // Every sequence holds a bare LF or a bare CR.
        let r = c.reply();
        assert!(r.starts_with("554 5.6.0"), "{seq:?}: {r}");
        // Exactly one reply for the whole DATA: the next one answers NOOP.
        assert!(c.cmd("NOOP").starts_with("250 2.0.0 Ok"), "{seq:?} desynchronised the session");
    }
    assert!(w.queue().ready_ids().is_empty(), "a smuggled message was queued");
}

#[test]
fn bare_cr_in_bdat_is_refused_or_normalised() {
    let body = "Subject: cr\r\n\r\nbody\r.\rMAIL FROM:<evil@sender.example>\r\nend\r";
    let bdat = |c: &mut Raw| {
        assert!(c.cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("250"));
        assert!(c.cmd("RCPT TO:<t@friet.pan>").starts_with("250"));
        c.send(&format!("BDAT {} LAST\r\n{body}", body.len()));
        c.reply()
    };
    let w = InProcessWorld::start();
    let mut c = Raw::ehlo(&w.relay.addr());
    let r = bdat(&mut c);
    assert!(r.starts_with("554 5.6.0"), "{r}");
    assert!(w.queue().ready_ids().is_empty());

    let w = InProcessWorld::start_with(&[("MXRELAY_SMTPD_FORBID_BARE_NEWLINE", "false")]);
    let mut c = Raw::ehlo(&w.relay.addr());
    let r = bdat(&mut c);
    assert!(r.starts_with("250 2.0.0"), "{r}");
    let body = String::from_utf8(w.queue().body(&queued_id(&r).unwrap())).unwrap();
    assert!(body.ends_with("\r\n\r\nbody\r\n.\r\nMAIL FROM:<evil@sender.example>\r\nend\r\n"), "{body:?}");
}

#[test]
fn smuggling_sequences_never_split_a_message_when_normalising() {
    let w = InProcessWorld::start_with(&[("MXRELAY_SMTPD_FORBID_BARE_NEWLINE", "false")]);
    for seq in SMUGGLING {
        let mut c = Raw::ehlo(&w.relay.addr());
        start_data(&mut c);
        c.send(&smuggled_body(seq));
        c.send(".\r\n");
        let r = c.reply();
        assert!(r.starts_with("250 2.0.0"), "{seq:?}: {r}");
        let id = queued_id(&r).unwrap();
        let q = w.queue();
        let body = String::from_utf8(q.body(&id)).unwrap();
        assert!(body.contains("RCPT TO:<victim@friet.pan>"), "the smuggled text stays content");
        let lone = body.replace("\r\n", "");
        assert!(!lone.contains('\n') && !lone.contains('\r'), "bare LF or CR left in {body:?}");
        assert!(c.cmd("NOOP").starts_with("250"));
    }
    assert_eq!(w.queue().ready_ids().len(), SMUGGLING.len(), "one message per DATA, none injected");
}

#[test]
fn early_talker_is_refused() {
    let w = InProcessWorld::start_with(&[("MXRELAY_SMTP_GREET_PAUSE", "300ms")]);
    let mut c = Raw::connect(&w.relay.addr());
    c.send("EHLO client.example\r\n");
    let r = c.reply();
    assert!(r.starts_with("554 5.5.1"), "{r}");
    assert!(c.closed());
}

#[test]
fn overlong_command_and_nul_bytes_get_500_and_the_session_goes_on() {
    let w = InProcessWorld::start();
    let mut c = Raw::ehlo(&w.relay.addr());
    c.send(&format!("NOOP {}\r\n", "x".repeat(5000)));
    assert!(c.reply().starts_with("500 5.5.2"));
    c.send_bytes(b"NOOP\0x\r\n");
    assert!(c.reply().starts_with("500 5.5.2"));
    c.send_bytes(b"MAIL FROM:<\xff@x>\r\n");
    assert!(c.reply().starts_with("500 5.5.2"));
    assert!(c.cmd("NOOP").starts_with("250"));
}

#[test]
fn pipelined_commands_get_one_reply_each_in_order() {
    let w = InProcessWorld::start();
    let mut c = Raw::ehlo(&w.relay.addr());
    c.send(&format!(
        "MAIL FROM:<{SENDER}>\r\nRCPT TO:<a@friet.pan>\r\nRCPT TO:<b@other.example>\r\nRCPT TO:<c@friet.pan>\r\nDATA\r\n"
    ));
    assert!(c.reply().starts_with("250 2.1.0"));
    assert!(c.reply().starts_with("250 2.1.5"));
    assert!(c.reply().starts_with("454 4.7.1"));
    assert!(c.reply().starts_with("250 2.1.5"));
    assert!(c.reply().starts_with("354"));
    c.send("Subject: p\r\n\r\nhi\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<d@friet.pan>\r\nRSET\r\nQUIT\r\n");
    let queued = c.reply();
    assert!(queued.starts_with("250 2.0.0 Ok: queued as"), "{queued}");
    assert!(c.reply().starts_with("250 2.1.0"));
    assert!(c.reply().starts_with("250 2.1.5"));
    assert!(c.reply().starts_with("250 2.0.0"));
    assert!(c.reply().starts_with("221 2.0.0"));
    let id = queued_id(&queued).unwrap();
    assert_eq!(w.queue().recipients(&id), vec!["a@friet.pan", "c@friet.pan"]);
}

#[test]
fn pipelining_without_ehlo_is_refused() {
    let w = InProcessWorld::start();
    let mut c = Raw::connect(&w.relay.addr());
    assert_eq!(c.code(), 220);
    assert_eq!(c.code_after("HELO client.example"), 250);
    c.send(&format!("MAIL FROM:<{SENDER}>\r\nRCPT TO:<a@friet.pan>\r\n"));
    assert!(c.reply().starts_with("503 5.5.0"));
}

#[test]
fn bdat_chunks_make_one_message() {
    let w = InProcessWorld::start();
    let mut c = Raw::ehlo(&w.relay.addr());
    c.cmd(&format!("MAIL FROM:<{SENDER}> BODY=8BITMIME"));
    c.cmd("RCPT TO:<t@friet.pan>");
    let part1 = "Subject: chunks\r\n\r\n.first\r\n";
    let part2 = "second \u{e9}\r\n.\r\n";
    c.send(&format!("BDAT {}\r\n{part1}", part1.len()));
    assert!(c.reply().starts_with("250 2.0.0"));
    c.send(&format!("BDAT {} LAST\r\n{part2}", part2.len()));
    let r = c.reply();
    assert!(r.starts_with("250 2.0.0 Ok: queued as"), "{r}");
    let id = queued_id(&r).unwrap();
    let body = String::from_utf8(w.queue().body(&id)).unwrap();
    assert!(body.ends_with(&format!("{part1}{part2}")), "BDAT content is stored as sent: {body:?}");
    // BDAT without a transaction: the chunk is still consumed.
    c.send("BDAT 6 LAST\r\nNOOP\r\n");
    assert!(c.reply().starts_with("503 5.5.1"));
    assert!(c.cmd("NOOP").starts_with("250"));
}

#[test]
fn recipient_limit_gives_452() {
    let w = InProcessWorld::start_with(&[("MXRELAY_SMTPD_RECIPIENT_LIMIT", "3")]);
    let mut c = Raw::ehlo(&w.relay.addr());
    c.cmd(&format!("MAIL FROM:<{SENDER}>"));
    for i in 0..3 {
        assert!(c.cmd(&format!("RCPT TO:<r{i}@friet.pan>")).starts_with("250"));
    }
    assert!(c.cmd("RCPT TO:<r4@friet.pan>").starts_with("452 4.5.3"));
}

#[test]
fn too_many_received_headers_is_554_5_4_6() {
    let w = InProcessWorld::start_with(&[("MXRELAY_HOP_COUNT_LIMIT", "5")]);
    let mut c = Raw::ehlo(&w.relay.addr());
    start_data(&mut c);
    for i in 0..6 {
        c.send(&format!("Received: from hop{i}.example by x; Tue, 24 Nov 2026 10:00:00 +0000\r\n"));
    }
    c.send("Subject: loop\r\n\r\nbody\r\n.\r\n");
    assert!(c.reply().starts_with("554 5.4.6"));
    start_data(&mut c);
    for i in 0..5 {
        c.send(&format!("Received: from hop{i}.example by x; Tue, 24 Nov 2026 10:00:00 +0000\r\n"));
    }
    c.send("Subject: ok\r\n\r\nbody\r\n.\r\n");
    assert!(c.reply().starts_with("250 2.0.0"));
}

#[test]
fn error_limit_disconnects() {
    let w = InProcessWorld::start_with(&[("MXRELAY_SMTP_ERROR_LIMIT", "3")]);
    let mut c = Raw::ehlo(&w.relay.addr());
    assert!(c.cmd("BOGUS").starts_with("502"));
    assert!(c.cmd("BOGUS").starts_with("502"));
    assert!(c.cmd("BOGUS").starts_with("502"));
    assert!(c.reply().starts_with("421 4.7.0"));
    assert!(c.closed());
}

#[test]
fn per_ip_connection_limit_gives_421_and_others_are_served() {
    let w = InProcessWorld::start_with(&[("MXRELAY_SMTP_MAX_CONNECTIONS_PER_IP", "2")]);
    let _a = Raw::connect_greeted(&w.relay.addr());
    let _b = Raw::connect_greeted(&w.relay.addr());
    let mut c = Raw::connect(&w.relay.addr());
    assert!(c.reply().starts_with("421 4.7.0"));
    // mynetworks is exempt.
    let mut trusted = Raw::connect_from("127.0.0.9", &w.relay.addr());
    assert_eq!(trusted.code(), 220);
}

#[test]
fn idle_client_is_cut_off_with_421() {
    let w = InProcessWorld::start_with(&[("MXRELAY_SMTP_COMMAND_TIMEOUT", "1s")]);
    let mut c = Raw::ehlo(&w.relay.addr());
    // Nothing sent: the next reply is the timeout's.
    assert!(c.reply().starts_with("421 4.4.2"));
    assert!(c.closed());
}

#[test]
fn node_connection_limit_gives_421() {
    let w = InProcessWorld::start_with(&[("MXRELAY_SMTP_MAX_CONNECTIONS", "1")]);
    // The start-up probes' sessions may still be closing: take the one slot.
    let _held = Raw::connect_greeted(&w.relay.addr());
    let mut c = Raw::connect_from("127.0.0.9", &w.relay.addr());
    assert!(c.reply().starts_with("421 4.7.0"), "even mynetworks is refused when the node is full");
}

#[test]
fn dns_failure_defers_never_rejects() {
    // A nameserver that does not answer: sender and recipient checks cannot be made.
    let dns = Dns::start(&[], &[]);
    let store = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/mxrelay.db", store.path().display());
    let relay = InProcessNode::start(
        &base_config(&url, &url, &dns),
        &[("MXRELAY_DNS_NAMESERVERS", "127.0.0.1:9"), ("MXRELAY_DNS_TIMEOUT", "200ms")],
    );
    relay.add_domain(LISTED, "127.0.0.1", 2526);
    let r = wait_until_value("the listed domain in the snapshot", std::time::Duration::from_secs(15), || {
        let r = rcpt_reply(&relay.addr(), "t@friet.pan");
        (!r.starts_with("454")).then_some(r)
    });
    assert!(r.starts_with("451 4.4.3"), "{r}");
}
