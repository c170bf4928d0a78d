//! Recipient validation from a table (Postfix's `relay_recipient_maps`),
//! managed with `mxrelay recipients`: the backup MX refuses unknown users
//! at RCPT, so it never bounces to a forged sender (no backscatter).

use std::time::Duration;

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
        &[("MXRELAY_DELIVERY_ENABLED", "true"), ("MXRELAY_MYNETWORKS", "127.0.0.9/32")],
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
