//! Outbound STARTTLS against a real server: a private Postfix smtpd with a
//! `TestPki` certificate, for the `delivery.tls_policy` levels that must
//! succeed (`encrypt`; `verify` with `delivery.tls_ca_file` naming the test
//! CA) and, against the same server, the verification that must fail (a
//! name the certificate does not carry). The failure modes a real server
//! will not produce on demand (broken handshakes, refused STARTTLS) stay in
//! `outbound_tls.rs` with the scripted destination.
//!
//! Runs as root, as `scripts/test.sh` does: Postfix's master starts as root.

use crate::support::outbound::{Outbound, WAIT};
use crate::support::pki::TestPki;
use crate::support::postfix::{Postfix, PostfixOptions};
use crate::support::*;

/// A private Postfix with STARTTLS taking mail for `friet.pan`.
fn postfix_with_tls(pki: &TestPki) -> Postfix {
    Postfix::start(&PostfixOptions { domains: &[LISTED, "other.example"], tls: Some(pki), ..Default::default() })
}

/// The `Received:` header Postfix's smtpd put on a delivered message.
fn postfix_received(message: &[u8]) -> String {
    let text = String::from_utf8_lossy(message);
    let start = text.find("Received: from relay.test").unwrap_or_else(|| panic!("no Received by Postfix:\n{text}"));
    let header: Vec<&str> = text[start..]
        .lines()
        .enumerate()
        .take_while(|(i, l)| *i == 0 || l.starts_with([' ', '\t']))
        .map(|(_, l)| l.trim())
        .collect();
    header.join(" ")
}

#[test]
fn encrypt_delivers_over_starttls_to_postfix() {
    let pki = TestPki::localhost();
    let postfix = postfix_with_tls(&pki);
    let s = Outbound::start(&[(LISTED, "127.0.0.1", postfix.port)], "tls_policy = \"encrypt\"\n");
    s.send("t@friet.pan");
    let got = postfix.wait_delivered(1, WAIT);
    let received = postfix_received(&got[0]);
    assert!(received.contains("by postfix.test (Postfix) with ESMTPS"), "{received}");
    assert!(received.contains("(using TLSv1.3 with cipher"), "{received}");
    assert!(postfix.log().contains("TLS connection established from"), "{}", postfix.log());
    // Postfix may deliver before the relay logs Postfix's 250.
    let sent = wait_until_value("the relay's delivery line", WAIT, || {
        s.relay.log().lines().find(|l| l.contains("to=<t@friet.pan>")).map(str::to_string)
    });
    assert!(
        // Postfix's reply to BDAT LAST counts the bytes: "Ok: 449 bytes queued as".
        sent.contains("tls=TLSv1.3:")
            && sent.contains(":unverified, status=sent (250 2.0.0 Ok: ")
            && sent.contains(" queued as "),
        "{sent}"
    );
    assert_eq!(s.tls_count("encrypt", "tls"), 1.0);
}

#[test]
fn may_the_default_uses_starttls_when_postfix_offers_it() {
    let pki = TestPki::localhost();
    let postfix = postfix_with_tls(&pki);
    let s = Outbound::start(&[(LISTED, "127.0.0.1", postfix.port)], "");
    s.send("m@friet.pan");
    let got = postfix.wait_delivered(1, WAIT);
    let received = postfix_received(&got[0]);
    assert!(received.contains("with ESMTPS") && received.contains("(using TLSv1.3 with cipher"), "{received}");
    assert_eq!(s.tls_count("may", "tls"), 1.0);
    let fallback = s.relay.metric("mxrelay_delivery_tls_total{policy=\"may\",result=\"fallback_clear\"}");
    assert!(fallback.is_none_or(|n| n == 0.0), "no fallback to clear: {fallback:?}");
}

#[test]
fn verify_delivers_to_postfix_whose_certificate_chains_to_tls_ca_file_and_matches_the_name() {
    let pki = TestPki::localhost();
    let postfix = postfix_with_tls(&pki);
    let toml = format!("tls_policy = \"verify\"\ntls_ca_file = \"{}\"\n", pki.ca.display());
    // dest.test is in the certificate; wrong.test (same address) is not.
    let s =
        Outbound::start(&[(LISTED, "dest.test", postfix.port), ("other.example", "wrong.test", postfix.port)], &toml);
    s.send("v@friet.pan");
    let got = postfix.wait_delivered(1, WAIT);
    let received = postfix_received(&got[0]);
    assert!(received.contains("with ESMTPS") && received.contains("(using TLSv1.3 with cipher"), "{received}");
    // Postfix may deliver before the relay logs Postfix's 250.
    let sent = wait_until_value("the relay's delivery line", WAIT, || {
        s.relay.log().lines().find(|l| l.contains("to=<v@friet.pan>")).map(str::to_string)
    });
    assert!(sent.contains(&format!("relay=dest.test[127.0.0.1]:{}", postfix.port)), "{sent}");
    assert!(sent.contains(":verified, status=sent (250 2.0.0 Ok: ") && sent.contains(" queued as "), "{sent}");
    assert_eq!(s.tls_count("verify", "tls"), 1.0);

    // The same server under a name its certificate lacks: deferred 4.7.5,
    // never sent in clear.
    s.send("w@other.example");
    let deferred = wait_until_value("the wrong.test attempt", WAIT, || {
        s.relay.log().lines().find(|l| l.contains("to=<w@other.example>")).map(str::to_string)
    });
    assert!(
        deferred.contains("status=deferred (4.7.5 server certificate not verified for host wrong.test"),
        "{deferred}"
    );
    assert_eq!(s.tls_count("verify", "verify_failed"), 1.0);
    assert_eq!(postfix.delivered().len(), 1, "nothing reached Postfix for wrong.test");
}
