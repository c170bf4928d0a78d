//! Recipient validation from a table (Postfix's `relay_recipient_maps`),
//! managed with `mxrelay recipients`: the backup MX refuses unknown users
//! at RCPT, so it never bounces to a forged sender (no backscatter).

use std::time::Duration;

use crate::support::postfix::{Postfix, PostfixOptions};
use crate::support::sink::SmtpSink;
use crate::support::*;

fn send(relay: &Relay, from: &str, to: &str, extra: &[&str]) -> (i32, String) {
    let mut args = vec!["--from", from, "--to", to, "--helo", "client.example"];
    args.extend_from_slice(extra);
    swaks(&relay.addr(), &args)
}

#[test]
fn a_recipient_table_takes_its_addresses_and_refuses_the_rest_at_rcpt_without_backscatter() {
    let sink = SmtpSink::start();
    let dns = Dns::start(&["sender.example", "forged.example", "client.example"], &[LISTED, "other.example"]);
    let db = TestDb::create(&MysqlServer::shared());
    db.exec(include_str!("../../migrations/mysql/0001_domains.sql"));
    db.add_domain(LISTED, "127.0.0.1", sink.port);
    db.add_domain("other.example", "127.0.0.1", sink.port);
    let relay = Relay::spawn_with_env(
        &base_config(&db.url(), SHARED_REDIS, &dns),
        &[("MXRELAY_DELIVERY_ENABLED", "true"), ("MXRELAY_MYNETWORKS", "127.0.0.9/32"), RELOAD_ON_SIGHUP_ONLY],
    );
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("recipients.csv");
    std::fs::write(&csv, "address,owner\nKnown@Friet.PAN,ops\n# a comment\npostmaster@friet.pan,ops\n").unwrap();
    for args in [&["recipients", "check", "friet.pan", "table"][..], &["recipients", "import", csv.to_str().unwrap()]] {
        let (ok, out) = relay.cli(args);
        assert!(ok, "{args:?}: {out}");
    }
    let (ok, out) = relay.cli(&["recipients", "add", "bad address"]);
    assert!(!ok && out.contains("is not an address"), "{out}");
    let listing = relay.cli_json(&["recipients", "list", "--domain", "friet.pan"]);
    assert_eq!(listing["checks"], serde_json::json!([["friet.pan", "table"]]));
    assert_eq!(listing["addresses"], serde_json::json!(["known@friet.pan", "postmaster@friet.pan"]));
    relay.signal("HUP");
    wait_rcpt(&relay.addr(), "nobody@friet.pan", 550);

    // Listed (any case) is accepted and delivered; a domain without a check
    // takes every recipient, as the seed does.
    for to in ["KNOWN@friet.pan", "anyone@other.example"] {
        let (code, out) = send(&relay, SENDER, to, &[]);
        assert_eq!(code, 0, "{to}: {out}");
    }
    assert_eq!(sink.wait_for(2, Duration::from_secs(20)).len(), 2);
    // Unlisted: 550 at RCPT, with Postfix's words, from any client.
    let (code, out) = send(&relay, SENDER, "nobody@friet.pan", &[]);
    assert_ne!(code, 0);
    assert!(
        out.contains("550 5.1.1 <nobody@friet.pan>: Recipient address rejected: User unknown in relay recipient table"),
        "{out}"
    );
    let (_, out) = send(&relay, SENDER, "nobody@friet.pan", &["--local-interface", "127.0.0.9"]);
    assert!(out.contains("550 5.1.1"), "a mynetworks client is refused too: {out}");

    // Backscatter: 20 messages from a forged sender to unknown users are all
    // refused at RCPT; nothing is queued, so no DSN can ever go out.
    for i in 0..20 {
        let (_, out) = send(&relay, "victim@forged.example", &format!("guess{i}@friet.pan"), &[]);
        assert!(out.contains("550 5.1.1"), "{out}");
    }
    let rejected = relay.value("mxrelay_recipient_checks_total{method=\"table\",result=\"rejected\"}");
    assert!(rejected >= 22.0, "every refusal counted: {rejected}");
    assert_eq!(relay.value("mxrelay_recipient_checks_total{method=\"table\",result=\"accepted\"}"), 1.0);
    assert_eq!(relay.value("mxrelay_smtp_messages_total{result=\"accepted\"}"), 2.0, "nothing else queued");
    assert_eq!(relay.value("mxrelay_delivery_dsn_total"), 0.0, "no DSN");
    assert_eq!(sink.messages().len(), 2);

    // Removing an address, and turning the check off, take effect on SIGHUP.
    let (ok, out) = relay.cli(&["recipients", "remove", "known@friet.pan"]);
    assert!(ok, "{out}");
    relay.signal("HUP");
    wait_rcpt(&relay.addr(), "known@friet.pan", 550);
    let (ok, out) = relay.cli(&["recipients", "check", "friet.pan", "none"]);
    assert!(ok, "{out}");
    relay.signal("HUP");
    wait_rcpt(&relay.addr(), "nobody@friet.pan", 250);
}

/// A private Postfix as the domain's own server: only `known@friet.pan`
/// has a mailbox, so it refuses anyone else at RCPT with its own
/// `550 5.1.1 … User unknown in virtual mailbox table`.
fn primary_with_one_user() -> Postfix {
    Postfix::start(&PostfixOptions {
        domains: &[LISTED],
        main_cf: &["virtual_mailbox_maps = inline:{ known@friet.pan=box/ }"],
        ..Default::default()
    })
}

/// Sessions Postfix ended that carried no message: our probes (a delivery
/// says DATA or BDAT), from its own log.
fn probes_seen(primary: &Postfix) -> usize {
    primary
        .log()
        .lines()
        .filter(|l| l.contains("smtpd[") && l.contains(" disconnect from ") && l.contains(" rcpt="))
        .filter(|l| !l.contains(" data=") && !l.contains(" bdat="))
        .count()
}

/// The reply swaks got to its RCPT, the session ended there.
fn rcpt_via_swaks(relay: &Relay, from: &str, to: &str) -> String {
    let (_, out) = send(relay, from, to, &["--quit-after", "RCPT"]);
    let mut lines = out.lines().skip_while(|l| !l.contains("-> RCPT TO:<"));
    lines.nth(1).unwrap_or_else(|| panic!("no reply to RCPT:\n{out}")).to_string()
}

/// RCPT of `address` at each node until each has checked one recipient
/// by `verify` (until a reload loads the check, RCPT takes anyone).
fn wait_verifying(relays: &[&Relay], address: &str) {
    wait_until("the nodes verify recipients", Duration::from_secs(15), || {
        relays.iter().all(|r| {
            rcpt_reply(&r.addr(), address);
            ["accepted", "rejected", "unverified"]
                .iter()
                .any(|v| r.value(&format!("mxrelay_recipient_checks_total{{method=\"verify\",result=\"{v}\"}}")) > 0.0)
        })
    });
}

#[test]
fn verify_asks_the_primary_postfix_and_every_node_shares_its_answers() {
    let primary = primary_with_one_user();
    let dns = Dns::start(&["sender.example", "forged.example", "client.example"], &[LISTED]);
    let db = TestDb::create(&MysqlServer::shared());
    db.exec(include_str!("../../migrations/mysql/0001_domains.sql"));
    db.add_domain(LISTED, "127.0.0.1", primary.port);
    let config = base_config(&db.url(), SHARED_REDIS, &dns);
    let prefix = unique("mxrv");
    let a = Relay::spawn_in_queue(&config, &[("MXRELAY_DELIVERY_ENABLED", "true"), RELOAD_ON_SIGHUP_ONLY], &prefix);
    let b = Relay::spawn_in_queue(&config, &[("MXRELAY_NODE_ID", "node-b"), RELOAD_ON_SIGHUP_ONLY], &prefix);
    let (ok, out) = a.cli(&["recipients", "check", LISTED, "verify"]);
    assert!(ok, "{out}");
    a.signal("HUP");
    b.signal("HUP");
    // One probe in all: whichever node asked first, the other found its answer.
    wait_verifying(&[&a, &b], "known@friet.pan");
    let deliverable = |r: &Relay| r.value("mxrelay_recipient_verify_probes_total{result=\"deliverable\"}");
    assert_eq!(deliverable(&a) + deliverable(&b), 1.0);
    wait_until("the probe in Postfix's log", Duration::from_secs(10), || probes_seen(&primary) >= 1);

    // The known user is accepted and delivered; the unknown one gets 550
    // at RCPT with Postfix's own words, and nothing is queued for it.
    let (code, out) = send(&a, SENDER, "known@friet.pan", &[]);
    assert_eq!(code, 0, "{out}");
    primary.wait_delivered(1, Duration::from_secs(20));
    let refused = rcpt_via_swaks(&a, SENDER, "nobody@friet.pan");
    assert!(
        refused.contains(
            "550 5.1.1 <nobody@friet.pan>: Recipient address rejected: undeliverable address: host 127.0.0.1[127.0.0.1]:"
        ) && refused.contains("said: 550 5.1.1 <nobody@friet.pan>: Recipient address rejected: User unknown in virtual mailbox table (in reply to RCPT TO command)"),
        "{refused}"
    );
    assert_eq!(a.value("mxrelay_recipient_verify_probes_total{result=\"undeliverable\"}"), 1.0);

    // The other node answers both from the shared cache: no new probe.
    let known = rcpt_via_swaks(&b, SENDER, "Known@Friet.PAN");
    assert!(known.contains("250 2.1.5 Ok"), "{known}");
    assert!(rcpt_via_swaks(&b, SENDER, "nobody@friet.pan").contains("550 5.1.1"));
    assert_eq!(b.value("mxrelay_recipient_checks_total{method=\"verify\",result=\"rejected\"}"), 1.0);
    let probes = |r: &Relay| -> f64 {
        ["deliverable", "undeliverable", "no_answer", "skipped"]
            .iter()
            .map(|v| r.value(&format!("mxrelay_recipient_verify_probes_total{{result=\"{v}\"}}")))
            .sum()
    };
    assert_eq!(probes(&b), deliverable(&b), "node b probed nothing more");

    // The cache as operators see it, and clearing one answer: the next
    // RCPT asks the primary again.
    let shown = a.cli_json(&["recipients", "verify-cache", "show", "--domain", LISTED]);
    let shown: Vec<(String, bool)> = shown
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["address"].as_str().unwrap().to_string(), v["deliverable"].as_bool().unwrap()))
        .collect();
    assert_eq!(shown, [("known@friet.pan".to_string(), true), ("nobody@friet.pan".to_string(), false)]);
    let (ok, out) = b.cli(&["recipients", "verify-cache", "clear", "Nobody@friet.pan"]);
    assert!(ok && out.contains("forgot 1 answer"), "{out}");
    let (ok, out) = b.cli(&["recipients", "verify-cache", "clear"]);
    assert!(!ok && out.contains("--all"), "{out}");
    assert!(rcpt_via_swaks(&b, SENDER, "nobody@friet.pan").contains("550 5.1.1"));
    assert_eq!(b.value("mxrelay_recipient_verify_probes_total{result=\"undeliverable\"}"), 1.0, "asked again");

    // Backscatter: 100 messages from a forged sender to unknown users are
    // refused at RCPT, each after asking the primary; nothing is queued,
    // so no DSN can ever go out.
    let refused: Vec<String> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let a = &a;
                s.spawn(move || {
                    (0..25)
                        .map(|i| send(a, "victim@forged.example", &format!("guess{w}x{i}@friet.pan"), &[]).1)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
    });
    assert_eq!(refused.len(), 100);
    for out in &refused {
        assert!(out.contains("<** 550 5.1.1 <guess") && out.contains("User unknown in virtual mailbox table"), "{out}");
    }
    assert_eq!(a.value("mxrelay_recipient_checks_total{method=\"verify\",result=\"rejected\"}"), 101.0);
    assert_eq!(a.value("mxrelay_smtp_messages_total{result=\"accepted\"}"), 1.0, "only the known user's message");
    assert_eq!(a.value("mxrelay_delivery_dsn_total"), 0.0, "no DSN");
    assert_eq!(b.value("mxrelay_delivery_dsn_total"), 0.0);
    assert_eq!(primary.delivered().len(), 1);
    assert!(
        !primary.log().contains("from=<victim@forged.example>"),
        "nothing of the forged sender reached the primary"
    );
    // At the primary: the first probe, the refusal, the one after the clear
    // and one per forged message; nothing for the answers from the cache.
    assert_eq!(probes(&a) + probes(&b), 103.0);
    wait_until("every probe in Postfix's log", Duration::from_secs(10), || probes_seen(&primary) >= 103);
    assert_eq!(probes_seen(&primary), 103, "{}", primary.log());
}

#[test]
fn verify_with_the_primary_down_accepts_or_answers_450_as_configured() {
    let down = DownPort::new();
    let dns = Dns::start(&["sender.example", "client.example"], &[LISTED]);
    let db = TestDb::create(&MysqlServer::shared());
    db.exec(include_str!("../../migrations/mysql/0001_domains.sql"));
    db.add_domain(LISTED, "127.0.0.1", down.port);
    let config = base_config(&db.url(), SHARED_REDIS, &dns);
    let accepting = Relay::spawn(&config);
    let (ok, out) = accepting.cli(&["recipients", "check", LISTED, "verify"]);
    assert!(ok, "{out}");
    let tempfailing = Relay::spawn_with_env(&config, &[("MXRELAY_VERIFY_UNREACHABLE", "tempfail")]);

    // verify.unreachable = accept (the default): the backup MX takes the
    // mail while the primary is down.
    wait_verifying(&[&accepting], "anyone@friet.pan");
    let (code, out) = send(&accepting, SENDER, "anyone@friet.pan", &[]);
    assert_eq!(code, 0, "{out}");
    assert!(queued_id(&out).is_some(), "{out}");
    // tempfail: 450 4.1.1, and the client keeps its mail.
    let reply = wait_until_value("the tempfailing node verifies", Duration::from_secs(15), || {
        let r = rcpt_reply(&tempfailing.addr(), "anyone@friet.pan");
        r.starts_with("450").then_some(r)
    });
    assert!(
        reply.starts_with("450 4.1.1 <anyone@friet.pan>: Recipient address rejected: unverified address: "),
        "{reply}"
    );
    for relay in [&accepting, &tempfailing] {
        assert!(relay.value("mxrelay_recipient_checks_total{method=\"verify\",result=\"unverified\"}") >= 1.0);
        assert_eq!(relay.value("mxrelay_recipient_checks_total{method=\"verify\",result=\"rejected\"}"), 0.0);
        // A destination without answer is asked again only after a while.
        assert!(relay.value("mxrelay_recipient_verify_probes_total{result=\"no_answer\"}") >= 1.0);
    }
    assert!(
        accepting.log().contains("recipient accepted unverified (verify.unreachable = accept)"),
        "{}",
        accepting.log()
    );
    let shown = accepting.cli_json(&["recipients", "verify-cache", "show"]);
    assert_eq!(shown, serde_json::json!([]), "no answer is kept for a server that gave none");
}
