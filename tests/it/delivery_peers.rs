//! The delivery client's promises (README, "What a destination sees")
//! checked against real peers on loopback: Postfix's smtp-sink without
//! ESMTP (HELO fallback; SMTPUTF8 mail to it bounces 5.6.7), with and
//! without 8BITMIME (BODY=8BITMIME passed on only when received with it and
//! offered), a private Postfix smtpd announcing `SIZE` (a message above it
//! is not sent: 5.3.4), `delivery.destination_concurrency` as the peer sees
//! it (counted by a proxy in front of smtp-sink), every A/AAAA address of a
//! relay host tried in turn (dnsmasq), an IPv6 literal relay host, and MX
//! delivery on port 25 of private loopback addresses for mail relayed for
//! `mynetworks` and for DSNs to outside senders (preference order, equal
//! preferences shuffled, A fallback without MX, null MX → 5.1.10).
//!
//! Runs as root, as `scripts/test.sh` does: MX hosts listen on port 25 and
//! Postfix's master starts as root.

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::time::Duration;

use crate::support::destination::Destination;
use crate::support::postfix::{Postfix, PostfixOptions};
use crate::support::proxy::Proxy;
use crate::support::sink::{SinkMessage, SmtpSink};
use crate::support::*;

const WAIT: Duration = Duration::from_secs(30);

/// A database listing `domains` and one relay that delivers; the relay's
/// queue keys are removed from the shared Redis on drop.
struct Delivering {
    relay: Relay,
    _db: TestDb,
}

impl Delivering {
    fn start(dns: &Dns, domains: &[(&str, &str, u16)], env: &[(&str, &str)]) -> Delivering {
        let db = listing(domains);
        let mut env = env.to_vec();
        env.push(("MXRELAY_DELIVERY_ENABLED", "true"));
        let relay = Relay::spawn_with_env(&base_config(&db.url(), SHARED_REDIS, dns), &env);
        Delivering { relay, _db: db }
    }
}

impl Drop for Delivering {
    fn drop(&mut self) {
        // Stopped first: a node reading a queue whose keys vanish logs errors.
        self.relay.kill();
        clear_shared_queue(&self.relay.prefix);
    }
}

/// A fresh database whose `domains` table lists `domains`.
fn listing(domains: &[(&str, &str, u16)]) -> TestDb {
    let db = TestDb::create(&MysqlServer::shared());
    db.exec(include_str!("../../migrations/mysql/0001_domains.sql"));
    for (domain, host, port) in domains {
        db.add_domain(domain, host, *port);
    }
    db
}

fn submit(relay: &Relay, from: &str, to: &str) -> String {
    let (code, out) = swaks(&relay.addr(), &["--from", from, "--to", to, "--helo", "client.example"]);
    assert_eq!(code, 0, "{out}");
    queued_id(&out).unwrap_or_else(|| panic!("no queue id in {out}"))
}

/// Sends one message with raw commands (what swaks cannot: UTF-8 paths,
/// BODY=8BITMIME with 8-bit content); returns the queue id.
fn submit_raw(relay: &Relay, mail: &str, rcpt: &str, content: &[u8]) -> String {
    let mut c = Raw::ehlo(&relay.addr());
    let r = c.cmd(mail);
    assert!(r.starts_with("250"), "{mail}: {r}");
    let r = c.cmd(rcpt);
    assert!(r.starts_with("250"), "{rcpt}: {r}");
    assert_eq!(c.code_after("DATA"), 354);
    c.send_bytes(content);
    c.send(".\r\n");
    let r = c.reply();
    assert!(r.starts_with("250"), "end of data: {r}");
    c.send("QUIT\r\n");
    queued_id(&r).unwrap_or_else(|| panic!("no queue id in {r}"))
}

/// The mail log lines about recipient `rcpt`.
fn lines_for(log: &str, rcpt: &str) -> Vec<String> {
    let needle = format!("to=<{rcpt}>");
    log.lines().filter(|l| l.contains(&needle)).map(str::to_string).collect()
}

#[test]
fn a_peer_without_esmtp_gets_mail_after_helo_and_smtputf8_mail_to_it_bounces_5_6_7() {
    // smtp-sink -e: EHLO is an unknown command (500), HELO works.
    let sink = SmtpSink::start_with(&["-e"]);
    let dns = Dns::start(&["sender.example"], &[LISTED]);
    let d = Delivering::start(&dns, &[(LISTED, "127.0.0.1", sink.port)], &[]);

    submit(&d.relay, "bob@friet.pan", "ascii@friet.pan");
    let got = sink.wait_for(1, WAIT);
    assert_eq!(got[0].rcpts, ["ascii@friet.pan"]);
    assert_eq!((got[0].proto.as_str(), got[0].helo.as_str()), ("SMTP", "relay.test"), "HELO after the refused EHLO");
    assert_eq!(got[0].mail_params, "", "no ESMTP parameter to a server that has none");

    let content = "From: bob@friet.pan\r\nTo: jürgen@friet.pan\r\nSubject: Grüße\r\n\r\nHallo\r\n";
    let id =
        submit_raw(&d.relay, "MAIL FROM:<bob@friet.pan> SMTPUTF8", "RCPT TO:<jürgen@friet.pan>", content.as_bytes());
    // The DSN comes back to bob, through the same HELO-only peer.
    let got = sink.wait_for(2, WAIT);
    // smtp-sink dumps the envelope's non-ASCII octets as '?': "j??rgen@…".
    assert!(
        got.iter().all(|m| !m.rcpts.iter().any(|r| r.ends_with("rgen@friet.pan"))),
        "the UTF-8 message was sent: {got:#?}"
    );
    let dsn = got.iter().find(|m| m.mail_from.is_empty()).unwrap_or_else(|| panic!("no DSN from <>: {got:#?}"));
    assert_eq!(dsn.rcpts, ["bob@friet.pan"]);
    let text = String::from_utf8_lossy(&dsn.content);
    // RFC 6533 §3: the UTF-8 address in 7-bit form, exactly.
    assert!(text.contains("Final-Recipient: utf-8; j\\x{FC}rgen@friet.pan\nAction: failed\nStatus: 5.6.7\n"), "{text}");
    assert!(text.contains("does not support SMTPUTF8"), "{text}");
    assert!(text.contains(&id), "the DSN names the queue id {id}: {text}");
    let lines = lines_for(&d.relay.log(), "jürgen@friet.pan");
    assert_eq!(lines.len(), 1, "one attempt, final: {lines:#?}");
    assert!(lines[0].contains("dsn=5.6.7, status=bounced"), "{}", lines[0]);
}

#[test]
fn body_8bitmime_is_passed_on_when_received_with_it_and_offered() {
    let offers = SmtpSink::start();
    let without = SmtpSink::start_with(&["-8"]);
    let dns = Dns::start(&["sender.example"], &[LISTED, "other.example"]);
    let d = Delivering::start(
        &dns,
        &[(LISTED, "127.0.0.1", offers.port), ("other.example", "127.0.0.1", without.port)],
        &[],
    );
    let eight = "From: bob@friet.pan\r\nSubject: 8-bit\r\n\r\nGrüße aus Köln\r\n".as_bytes();
    submit_raw(&d.relay, "MAIL FROM:<bob@friet.pan> BODY=8BITMIME", "RCPT TO:<eight@friet.pan>", eight);
    submit_raw(&d.relay, "MAIL FROM:<bob@friet.pan> BODY=8BITMIME", "RCPT TO:<eight@other.example>", eight);
    submit(&d.relay, "bob@friet.pan", "seven@friet.pan");

    let got = offers.wait_for(2, WAIT);
    let by_rcpt = |r: &str| got.iter().find(|m| m.rcpts == [r]).unwrap_or_else(|| panic!("{r}: {got:#?}")).clone();
    let (e, s) = (by_rcpt("eight@friet.pan"), by_rcpt("seven@friet.pan"));
    assert!(e.mail_params.split_whitespace().any(|p| p == "BODY=8BITMIME"), "MAIL args: {:?}", e.mail_params);
    assert!(e.content.ends_with(&crate::support::sink::SinkMessage::as_dumped(eight)), "8-bit content unchanged");
    assert!(!s.mail_params.contains("BODY="), "a 7-bit message gets no BODY: {:?}", s.mail_params);
    // A peer without 8BITMIME is not sent the parameter it does not know.
    let got = without.wait_for(1, WAIT);
    assert_eq!(got[0].rcpts, ["eight@other.example"]);
    assert!(!got[0].mail_params.contains("BODY="), "MAIL args: {:?}", got[0].mail_params);
}

#[test]
fn a_message_above_the_size_a_peer_announces_is_not_sent_and_bounces_5_3_4() {
    // Postfix's smtpd announces "SIZE 20000".
    let postfix = Postfix::start(&PostfixOptions {
        domains: &[LISTED],
        main_cf: &["message_size_limit = 20000"],
        ..Default::default()
    });
    let home = SmtpSink::start();
    let dns = Dns::start(&["sender.example"], &[LISTED, "home.example"]);
    let d =
        Delivering::start(&dns, &[(LISTED, "127.0.0.1", postfix.port), ("home.example", "127.0.0.1", home.port)], &[]);
    submit(&d.relay, "bob@home.example", "small@friet.pan");
    let got = postfix.wait_delivered(1, WAIT);
    assert!(String::from_utf8_lossy(&got[0]).contains("Delivered-To: small@friet.pan"));

    let mut big = String::from("From: bob@home.example\r\nSubject: big\r\n\r\n");
    (0..300).for_each(|_| big.push_str(&format!("{}\r\n", "x".repeat(98))));
    let id = submit_raw(&d.relay, "MAIL FROM:<bob@home.example>", "RCPT TO:<big@friet.pan>", big.as_bytes());
    let dsn = home.wait_for(1, WAIT);
    assert_eq!((dsn[0].mail_from.as_str(), dsn[0].rcpts.as_slice()), ("", &["bob@home.example".to_string()][..]));
    let text = String::from_utf8_lossy(&dsn[0].content);
    assert!(text.contains("Final-Recipient: rfc822; big@friet.pan") && text.contains("Status: 5.3.4"), "{text}");
    assert!(text.contains(&id), "{text}");
    let lines = lines_for(&d.relay.log(), "big@friet.pan");
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("dsn=5.3.4, status=bounced (message size") && lines[0].contains("exceeds the limit 20000"),
        "{}",
        lines[0]
    );
    // What Postfix saw: once the relay's cached session is closed (after
    // 2 s idle), the per-session command counts add up to one MAIL only.
    let smtpd = |what: &str| postfix.log().lines().filter(|l| l.contains("postfix/smtpd[") && l.contains(what)).count();
    wait_until("the relay's sessions with Postfix closed", WAIT, || {
        smtpd("]: connect from") == smtpd("]: disconnect from")
    });
    let mails: u32 = postfix
        .log()
        .lines()
        .filter(|l| l.contains("]: disconnect from"))
        .flat_map(|l| {
            l.split_whitespace().filter_map(|w| w.strip_prefix("mail=")).map(str::to_string).collect::<Vec<_>>()
        })
        // "mail=1" or, with refusals, "mail=1/2" (accepted/sent).
        .map(|n| n.rsplit('/').next().unwrap_or("0").parse::<u32>().unwrap_or(0))
        .sum();
    assert_eq!(mails, 1, "MAIL commands Postfix received:\n{}", postfix.log());
    assert_eq!(postfix.delivered().len(), 1);
}

#[test]
fn destination_concurrency_caps_the_sessions_the_peer_sees() {
    const MESSAGES: usize = 8;
    const LIMIT: usize = 2;
    // smtp-sink waits 1 s before answering DATA, so sessions overlap.
    let sink = SmtpSink::start_with(&["-w", "1"]);
    let meter = Proxy::start(&sink.addr());
    let dns = Dns::start(&["sender.example"], &[LISTED]);
    let db = listing(&[(LISTED, "127.0.0.1", meter.port)]);
    let config = base_config(&db.url(), SHARED_REDIS, &dns);
    let prefix = unique("mxrq");
    // Queued first on a node that does not deliver, so the delivering node
    // finds all of them at once and only the limit holds it back.
    let receiver = Relay::spawn_in_queue(&config, &[], &prefix);
    for i in 0..MESSAGES {
        submit(&receiver, SENDER, &format!("c{i}@friet.pan"));
    }
    let limit = LIMIT.to_string();
    let _deliverer = Relay::spawn_in_queue(
        &config,
        &[("MXRELAY_DELIVERY_ENABLED", "true"), ("MXRELAY_DELIVERY_DESTINATION_CONCURRENCY", &limit)],
        &prefix,
    );
    sink.wait_for(MESSAGES, WAIT);
    assert_eq!(meter.max_open(), LIMIT, "most sessions open at once ({} accepted)", meter.connections());
}

#[test]
fn each_address_of_a_relay_host_is_tried_in_turn() {
    // A port free on ::1 (nothing listens there: the AAAA is down) …
    let port = TcpListener::bind("[::1]:0").expect("IPv6 loopback").local_addr().unwrap().port();
    let [a, b] = loopback_block(port, 2);
    let (down, up) = (Ipv4Addr::new(127, a, b, 1), Ipv4Addr::new(127, a, b, 2));
    // … and on one A record; the other A record has smtp-sink.
    let sink = SmtpSink::start_at(IpAddr::V4(up), port, &[]);
    let host = "multi.peers.test";
    let dns = Dns::start_with(
        &["sender.example"],
        &[LISTED],
        &[&format!("--host-record={host},{down}"), &format!("--host-record={host},{up},::1")],
    );
    let d = Delivering::start(&dns, &[(LISTED, host, port)], &[]);
    submit(&d.relay, SENDER, "x@friet.pan");
    let got = sink.wait_for(1, WAIT);
    assert_eq!(got[0].rcpts, ["x@friet.pan"]);

    // The sink has the message before the relay logs the peer's 250.
    let sent = format!("to=<x@friet.pan>, relay={host}[{up}]:{port}");
    wait_until("the delivery logged", WAIT, || d.relay.log().contains(&sent));
    let log = d.relay.log();
    let sent_at = log.find(&sent).unwrap_or_else(|| panic!("no {sent:?} in\n{log}"));
    // AAAA before A (the resolver's order): ::1 is always tried first; the
    // two A records come in the order dnsmasq rotates them to.
    let v6_failure = format!("{host}[::1]:{port}: connect to [::1]:{port} failed");
    let v6_at = log.find(&v6_failure).unwrap_or_else(|| panic!("no {v6_failure:?} in\n{log}"));
    assert!(v6_at < sent_at, "the ::1 failure comes before the delivery:\n{log}");
    let failures: Vec<&str> =
        log.lines().filter(|l| l.contains(&format!("{host}["))).filter(|l| l.contains("failed")).collect();
    for f in &failures {
        assert!(f.contains("[::1]") || f.contains(&format!("[{down}]")), "only down addresses fail: {f}");
    }
    assert!(
        lines_for(&log, "x@friet.pan").iter().all(|l| !l.contains("status=deferred")),
        "delivered in the first attempt:\n{log}"
    );
    let counted = d.relay.value("mxrelay_delivery_attempts_total{result=\"connect_error\"}");
    assert_eq!(counted, failures.len() as f64, "one connect_error per failed address: {failures:#?}");
}

#[test]
fn mx_delivery_for_mynetworks_and_dsns_prefers_low_preference_and_shuffles_equal_ones() {
    const EQUAL: usize = 20;
    const RANKED: usize = 8;
    let [x, y] = loopback_block(25, 4);
    let ip = |h: u8| Ipv4Addr::new(127, x, y, h);
    // Real MX hosts listen on port 25: private loopback addresses make room.
    let sinks: Vec<SmtpSink> = (1..=4).map(|h| SmtpSink::start_at(IpAddr::V4(ip(h)), 25, &[])).collect();
    let (mxa, mxb, mxc, mxd) = (&sinks[0], &sinks[1], &sinks[2], &sinks[3]);
    let mut extra: Vec<String> = (1..=4).map(|h| format!("--host-record=mx{h}.peers.test,{}", ip(h))).collect();
    for i in 0..EQUAL {
        extra.push(format!("--mx-host=eq{i}.example,mx1.peers.test,10"));
        extra.push(format!("--mx-host=eq{i}.example,mx2.peers.test,10"));
    }
    for i in 0..RANKED {
        extra.push(format!("--mx-host=ranked{i}.example,mx1.peers.test,20"));
        extra.push(format!("--mx-host=ranked{i}.example,mx3.peers.test,10"));
    }
    extra.push("--mx-host=far.example,mx4.peers.test,10".into());
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let dns = Dns::start_with(&["sender.example"], &[LISTED], &extra);
    let home = Destination::start();
    let d = Delivering::start(&dns, &[(LISTED, "127.0.0.1", home.port)], &[]);

    // Relayed for mynetworks (127.0.0.9) to domains nobody listed: one
    // domain per message, so each is routed afresh (no cached session).
    let relay_for_mynetworks = |to: &str| {
        let args = ["--local-interface", "127.0.0.9", "--from", SENDER, "--to", to, "--helo", "client.example"];
        let (code, out) = swaks(&d.relay.addr(), &args);
        assert_eq!(code, 0, "{out}");
    };
    (0..EQUAL).for_each(|i| relay_for_mynetworks(&format!("u{i}@eq{i}.example")));
    (0..RANKED).for_each(|i| relay_for_mynetworks(&format!("u{i}@ranked{i}.example")));
    // A DSN to an outside sender goes by the sender domain's MX.
    submit(&d.relay, "bob@far.example", "perm1@friet.pan");

    let count =
        |s: &SmtpSink, domain: &str| s.messages().iter().filter(|m| m.rcpts.iter().any(|r| r.contains(domain))).count();
    wait_until("the equal-preference mail", WAIT, || count(mxa, "@eq") + count(mxb, "@eq") == EQUAL);
    wait_until("the ranked mail", WAIT, || count(mxc, "@ranked") + count(mxa, "@ranked") == RANKED);
    // Each message picks one of two equal MX hosts at random: all 20 on one
    // side happens once in 2^19 runs.
    let (on_a, on_b) = (count(mxa, "@eq"), count(mxb, "@eq"));
    assert!(on_a >= 1 && on_b >= 1, "equal preferences shuffled: {on_a} on mx1, {on_b} on mx2");
    assert_eq!(count(mxc, "@ranked"), RANKED, "the lower preference number always wins while it is up");
    for m in mxa.messages().iter().chain(mxb.messages().iter()) {
        assert_eq!(m.mail_from, "sender@sender.example");
    }
    let got = mxd.wait_for(1, WAIT);
    assert_eq!((got[0].mail_from.as_str(), got[0].rcpts.as_slice()), ("", &["bob@far.example".to_string()][..]));
    let text = String::from_utf8_lossy(&got[0].content);
    assert!(text.contains("Final-Recipient: rfc822; perm1@friet.pan") && text.contains("Status: 5.1.1"), "{text}");
    // Logged once the node has read the sink's 250.
    let line = format!("to=<bob@far.example>, relay=mx4.peers.test[{}]:25", ip(4));
    wait_until("the DSN's delivery logged", WAIT, || d.relay.log().contains(&line));
}

#[test]
fn a_domain_without_mx_gets_mail_at_its_address_and_a_null_mx_bounces_5_1_10() {
    let [x, y] = loopback_block(25, 2);
    let (plain_ip, far_ip) = (Ipv4Addr::new(127, x, y, 1), Ipv4Addr::new(127, x, y, 2));
    let plain = SmtpSink::start_at(IpAddr::V4(plain_ip), 25, &[]);
    let far = SmtpSink::start_at(IpAddr::V4(far_ip), 25, &[]);
    let dns = Dns::start_with(
        &["sender.example"],
        &[LISTED],
        &[
            // No MX: RFC 5321 §5.1, the name's own address.
            &format!("--host-record=plain.example,{plain_ip}"),
            // RFC 7505: "MX 0 ." says the domain takes no mail.
            "--mx-host=nullmx.example,.,0",
            "--mx-host=far.example,mx.far.example,10",
            &format!("--host-record=mx.far.example,{far_ip}"),
        ],
    );
    let d = Delivering::start(&dns, &[], &[]);
    let from_mynetworks = |to: &str| {
        let args =
            ["--local-interface", "127.0.0.9", "--from", "bob@far.example", "--to", to, "--helo", "client.example"];
        let (code, out) = swaks(&d.relay.addr(), &args);
        assert_eq!(code, 0, "{out}");
    };
    from_mynetworks("u@plain.example");
    from_mynetworks("u@nullmx.example");
    let got = plain.wait_for(1, WAIT);
    assert_eq!(got[0].rcpts, ["u@plain.example"]);
    // The DSN for the null MX goes to bob by far.example's MX.
    let got = far.wait_for(1, WAIT);
    assert_eq!((got[0].mail_from.as_str(), got[0].rcpts.as_slice()), ("", &["bob@far.example".to_string()][..]));
    let text = String::from_utf8_lossy(&got[0].content);
    assert!(text.contains("Final-Recipient: rfc822; u@nullmx.example") && text.contains("Status: 5.1.10"), "{text}");
    let lines = lines_for(&d.relay.log(), "u@nullmx.example");
    assert_eq!(lines.len(), 1, "bounced at once, never deferred: {lines:#?}");
    assert!(lines[0].contains("relay=none") && lines[0].contains("dsn=5.1.10, status=bounced"), "{}", lines[0]);
    assert_eq!(plain.messages().len() + far.messages().len(), 2, "nothing else was sent");
}

#[test]
fn an_ipv6_literal_relay_host_is_delivered_to() {
    let port = TcpListener::bind("[::1]:0").expect("IPv6 loopback").local_addr().unwrap().port();
    let sink = SmtpSink::start_at(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), port, &[]);
    let dns = Dns::start(&["sender.example"], &[LISTED]);
    let d = Delivering::start(&dns, &[(LISTED, "::1", port)], &[]);
    submit(&d.relay, SENDER, "six@friet.pan");
    let got = sink.wait_for(1, WAIT);
    assert_eq!(got[0].rcpts, ["six@friet.pan"]);
    // The sink has the message once it sent its 250; the node logs after
    // reading that reply.
    let line = format!("to=<six@friet.pan>, relay=::1[::1]:{port}");
    wait_until("the delivery logged", WAIT, || d.relay.log().contains(&line));
}

/// Outbound CHUNKING (RFC 3030), as Postfix sends since 3.4: a peer that
/// offers it (Postfix's smtpd) gets the content by BDAT, in several chunks
/// (`queue.chunk_size` 4096), not dot-stuffed, and keeps it as sent; a
/// peer without it (smtp-sink) gets DATA.
#[test]
fn to_a_peer_offering_chunking_the_content_goes_by_bdat_as_it_is() {
    let postfix = Postfix::start(&PostfixOptions { domains: &[LISTED], ..Default::default() });
    let home = SmtpSink::start();
    let dns = Dns::start(&["sender.example"], &[LISTED, "home.example"]);
    let d = Delivering::start(
        &dns,
        &[(LISTED, "127.0.0.1", postfix.port), ("home.example", "127.0.0.1", home.port)],
        &[("MXRELAY_QUEUE_CHUNK_SIZE", "4096")],
    );
    let mut body = String::new();
    for i in 0..400 {
        let dot = if i % 7 == 0 { "." } else { "" };
        body.push_str(&format!("{dot}line {i} {}\r\n", "y".repeat(40)));
    }
    let message = format!("From: bob@home.example\r\nSubject: chunked\r\n\r\n{body}");
    for to in ["x@friet.pan", "y@home.example"] {
        // Sent dot-stuffed by DATA into the relay; queued unstuffed.
        let stuffed = message.replace("\r\n.", "\r\n..");
        submit_raw(&d.relay, "MAIL FROM:<bob@home.example>", &format!("RCPT TO:<{to}>"), stuffed.as_bytes());
    }
    let got = postfix.wait_delivered(1, WAIT);
    let text = String::from_utf8_lossy(&got[0]);
    let (_, content) = text.split_once("\n\n").unwrap_or_else(|| panic!("no body in:\n{text}"));
    assert_eq!(content, body.replace("\r\n", "\n"), "Postfix kept the content as sent (its Maildir has LF endings)");
    // Logged when the session ends (the relay keeps it 2 s for reuse).
    let ended =
        |log: &str| log.lines().find(|l| l.contains("disconnect from") && l.contains("mail=1")).map(String::from);
    let session = wait_until_value("Postfix logs the session", Duration::from_secs(20), || ended(&postfix.log()));
    let log = postfix.log();
    let chunks: u32 = session
        .split_whitespace()
        .find_map(|w| w.strip_prefix("bdat="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no BDAT in Postfix's session: {session}\n{log}"));
    assert!(chunks >= 3, "several chunks: {session}");
    assert!(!session.contains("data="), "no DATA: {session}");
    let sink = home.wait_for(1, WAIT);
    let dumped = SinkMessage::as_dumped(message.as_bytes());
    assert!(sink[0].content.ends_with(&dumped), "smtp-sink got it by DATA, whole");
}

/// The DSN extension (RFC 3461) end to end. The relay offers DSN and
/// keeps RET, ENVID, NOTIFY and ORCPT with the message; to a peer that
/// offers DSN (smtp-sink) it passes them on; its own bounces carry
/// `Original-Envelope-Id` and `Original-Recipient`, and honour NOTIFY
/// (NEVER: no bounce). Bad values are refused with 501.
#[test]
fn dsn_parameters_go_to_a_peer_offering_dsn_and_our_bounces_honour_them() {
    let next = SmtpSink::start();
    let no_dsn = SmtpSink::start_with(&["-N"]);
    let home = SmtpSink::start();
    let hard = Destination::start();
    let dns = Dns::start(&["sender.example"], &[LISTED, "home.example", "hard.example", "nodsn.example"]);
    let d = Delivering::start(
        &dns,
        &[
            (LISTED, "127.0.0.1", next.port),
            ("home.example", "127.0.0.1", home.port),
            ("hard.example", "127.0.0.1", hard.port),
            ("nodsn.example", "127.0.0.1", no_dsn.port),
        ],
        &[],
    );
    let mut c = Raw::ehlo(&d.relay.addr());
    assert!(c.cmd("EHLO client.example").contains("250-DSN"), "DSN offered");
    assert!(c.cmd("MAIL FROM:<bob@home.example> RET=SOMETIMES").starts_with("501 5.5.4"));
    assert!(c.cmd("MAIL FROM:<bob@home.example> ENVID=a=b").starts_with("501 5.5.4"));
    assert!(c.cmd("MAIL FROM:<bob@home.example>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<t@friet.pan> NOTIFY=NEVER,SUCCESS").starts_with("501 5.5.4"));
    assert!(c.cmd("RCPT TO:<t@friet.pan> ORCPT=nosemicolon").starts_with("501 5.5.4"));
    c.cmd("RSET");
    let send = |c: &mut Raw, mail: &str, rcpt: &str| {
        assert!(c.cmd(mail).starts_with("250"), "{mail}");
        assert!(c.cmd(rcpt).starts_with("250"), "{rcpt}");
        assert_eq!(c.code_after("DATA"), 354);
        let r = c.cmd("From: bob@home.example\r\nSubject: dsn\r\n\r\nbody\r\n.");
        assert!(r.starts_with("250"), "{r}");
    };
    send(
        &mut c,
        "MAIL FROM:<bob@home.example> RET=hdrs ENVID=QQ314159",
        "RCPT TO:<t@friet.pan> NOTIFY=success,failure ORCPT=rfc822;t+40friet.pan",
    );
    let got = next.wait_for(1, WAIT);
    assert!(got[0].mail_params.contains("RET=HDRS ENVID=QQ314159"), "MAIL: {:?}", got[0].mail_params);
    assert_eq!(got[0].rcpt_params, vec!["NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;t+40friet.pan".to_string()]);

    // A 5xx at the next hop: our bounce names what the sender gave us.
    send(
        &mut c,
        "MAIL FROM:<bob@home.example> ENVID=ENV+2B1",
        "RCPT TO:<perm1@hard.example> NOTIFY=FAILURE ORCPT=rfc822;Original+40hard.example",
    );
    let dsn = home.wait_for(1, WAIT);
    let text = String::from_utf8_lossy(&dsn[0].content);
    assert!(text.contains("Original-Envelope-Id: ENV+1\n"), "{text}");
    assert!(
        text.contains("Original-Recipient: rfc822;Original@hard.example\nFinal-Recipient: rfc822; perm1@hard.example"),
        "{text}"
    );
    assert!(text.contains("Content-Type: text/rfc822-headers") && !text.contains("\nbody\n"), "headers only: {text}");

    // NOTIFY=NEVER: bounced, and no DSN.
    send(&mut c, "MAIL FROM:<bob@home.example>", "RCPT TO:<perm2@hard.example> NOTIFY=NEVER");
    wait_until("the NEVER bounce decided", Duration::from_secs(20), || {
        d.relay.log().contains("no notification to the sender: NOTIFY does not ask for FAILURE")
    });
    assert_eq!(home.messages().len(), 1, "no DSN for NOTIFY=NEVER, none for the success the next hop reports itself");
    assert_eq!(d.relay.value("mxrelay_delivery_dsn_total"), 1.0);

    // NOTIFY=SUCCESS to a next hop without DSN (smtp-sink -N): we say "relayed".
    send(
        &mut c,
        "MAIL FROM:<bob@home.example>",
        "RCPT TO:<s@nodsn.example> NOTIFY=SUCCESS ORCPT=rfc822;s+40nodsn.example",
    );
    assert_eq!(no_dsn.wait_for(1, WAIT)[0].rcpt_params, vec![String::new()], "nothing passed to a peer without DSN");
    let notices = home.wait_for(2, WAIT);
    let text = String::from_utf8_lossy(&notices[1].content);
    assert!(text.contains("Subject: Successful Mail Delivery Report"), "{text}");
    assert!(text.contains("Original-Recipient: rfc822;s@nodsn.example\nFinal-Recipient: rfc822; s@nodsn.example\nAction: relayed\nStatus: 2.0.0"), "{text}");
    assert_eq!(d.relay.value("mxrelay_delivery_relayed_notices_total"), 1.0);
}

/// The DSN parameters reach a real Postfix next hop: asked for NOTIFY=SUCCESS,
/// Postfix's own delivery agent reports the delivery to the sender itself
/// (its log's "sender delivery status notification"), so mxrelay sends no
/// "relayed" notice of its own.
#[test]
fn notify_success_reaches_a_postfix_next_hop_which_reports_the_delivery_itself() {
    let postfix = Postfix::start(&PostfixOptions { domains: &[LISTED], ..Default::default() });
    let dns = Dns::start(&["sender.example"], &[LISTED, "home.example"]);
    let home = DownPort::new();
    let d =
        Delivering::start(&dns, &[(LISTED, "127.0.0.1", postfix.port), ("home.example", "127.0.0.1", home.port)], &[]);
    let mut c = Raw::ehlo(&d.relay.addr());
    assert!(c.cmd("MAIL FROM:<bob@home.example> RET=HDRS ENVID=QQ314159").starts_with("250"));
    assert!(c.cmd("RCPT TO:<t@friet.pan> NOTIFY=SUCCESS ORCPT=rfc822;t+40friet.pan").starts_with("250"));
    assert_eq!(c.code_after("DATA"), 354);
    assert!(c.cmd("Subject: dsn\r\n\r\nbody\r\n.").starts_with("250"));
    postfix.wait_delivered(1, WAIT);
    wait_until("Postfix reports the delivery to the sender", WAIT, || {
        postfix.log().contains("sender delivery status notification")
    });
    assert_eq!(d.relay.value("mxrelay_delivery_relayed_notices_total"), 0.0, "Postfix reports it, not us");
}
