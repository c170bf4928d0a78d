//! Outbound STARTTLS end to end: a relay delivering to our scripted
//! destination with TLS offered (a `TestPki` certificate), broken, refused
//! or absent, under each `delivery.tls_policy` level. Required TLS that
//! cannot be had defers (4.7.x) and never bounces; only `may` falls back.

use crate::support::destination::Destination;
use crate::support::outbound::{Outbound, WAIT};
use crate::support::pki::TestPki;
use crate::support::*;

const OTHER: &str = "other.example";

/// Every recipient of a queued message is still pending, with a reply
/// containing `text`.
fn assert_pending_with(envelope: &std::collections::HashMap<String, String>, text: &str) {
    let rcpts: Vec<serde_json::Value> = serde_json::from_str(&envelope["recipients"]).unwrap();
    for r in &rcpts {
        assert_eq!(r["state"], "pending", "{r}");
        let reply = r["last_reply"].as_str().unwrap_or_default();
        assert!(reply.contains(text), "last reply {reply:?} lacks {text:?}");
    }
}

#[test]
fn none_sends_in_clear_although_starttls_is_offered_and_the_map_overrides_per_domain() {
    let pki = TestPki::localhost();
    let dest = Destination::start_tls(&pki);
    let s = Outbound::start(
        &[(LISTED, "127.0.0.1", dest.port), (OTHER, "127.0.0.1", dest.port)],
        &format!("tls_policy = \"may\"\n[delivery.tls_policy_map]\n\"{LISTED}\" = \"none\"\n"),
    );
    // One message, two domains on one relay host, two levels: two sessions.
    s.send(&format!("clear@{LISTED},secret@{OTHER}"));
    let got = dest.wait_for(2, WAIT);
    let by_rcpt =
        |rcpt: &str| got.iter().find(|m| m.rcpts == [rcpt]).unwrap_or_else(|| panic!("{rcpt} not delivered: {got:?}"));
    assert!(!by_rcpt(&format!("clear@{LISTED}")).tls, "none: no STARTTLS");
    assert!(by_rcpt(&format!("secret@{OTHER}")).tls, "may: STARTTLS when offered");
    s.wait_queue_empty();
    assert!(s.tls_count("none", "clear") >= 1.0);
    assert!(s.tls_count("may", "tls") >= 1.0);
    let log = s.relay.log();
    let clear_line = log.lines().find(|l| l.contains(&format!("to=<clear@{LISTED}>"))).unwrap();
    assert!(!clear_line.contains("tls=") && clear_line.contains("status=sent (250"), "{clear_line}");
}

#[test]
fn may_delivers_over_tls_and_reuses_the_encrypted_session() {
    let pki = TestPki::localhost();
    let dest = Destination::start_tls(&pki);
    // The default level is may; the certificate's CA is not trusted and
    // does not need to be.
    let s = Outbound::start(&[(LISTED, "127.0.0.1", dest.port)], "");
    // One client session, each message sent once the previous one arrived:
    // the next delivery comes well inside the 2 s a session is kept, with
    // no process start (swaks) in between.
    let mut client = Raw::ehlo(&s.relay.addr());
    for i in 0..4 {
        let r = client.message("bob@friet.pan", &format!("m{i}@{LISTED}"), "Subject: reuse\r\n\r\nbody\r\n");
        assert!(r.starts_with("250 2.0.0"), "{r}");
        dest.wait_for(i + 1, WAIT);
    }
    let got = dest.messages();
    assert!(got.iter().all(|m| m.tls), "every message over TLS: {got:?}");
    assert!(dest.connections() < 4, "{} connections for 4 messages: the TLS session is reused", dest.connections());
    assert!(s.relay.value("mxrelay_delivery_connections_reused_total") >= 1.0);
    s.wait_queue_empty();
    let log = s.relay.log();
    let line = log.lines().find(|l| l.contains(&format!("to=<m0@{LISTED}>"))).unwrap();
    assert!(
        line.contains(&format!("relay=127.0.0.1[127.0.0.1]:{}, delay=", dest.port))
            && line.contains(", tls=TLSv1.3:TLS13_")
            && line.contains(":unverified, status=sent (250"),
        "{line}"
    );
    assert!(s.tls_count("may", "tls") >= 1.0);
}

#[test]
fn may_falls_back_to_clear_when_starttls_fails_or_is_refused() {
    let broken = Destination::start_tls_broken();
    let refused = Destination::start_tls_refused();
    let s = Outbound::start(
        &[(LISTED, "127.0.0.1", broken.port), (OTHER, "127.0.0.1", refused.port)],
        "tls_policy = \"may\"\n",
    );
    s.send(&format!("a@{LISTED},b@{OTHER}"));
    for dest in [&broken, &refused] {
        let got = dest.wait_for(1, WAIT);
        assert!(!got[0].tls);
        assert!(dest.connections() >= 2, "a new connection for the clear retry");
    }
    s.wait_queue_empty();
    assert!(s.tls_count("may", "handshake_failed") >= 1.0);
    assert!(s.tls_count("may", "starttls_refused") >= 1.0);
    assert_eq!(s.tls_count("may", "fallback_clear"), 2.0);
    let log = s.relay.log();
    assert!(log.contains("again in clear (tls_policy may)"), "{log}");
}

#[test]
fn encrypt_defers_when_tls_is_not_offered_or_fails_and_never_falls_back_or_bounces() {
    let plain = Destination::start();
    let broken = Destination::start_tls_broken();
    let s = Outbound::start(
        &[(LISTED, "127.0.0.1", plain.port), (OTHER, "127.0.0.1", broken.port)],
        "tls_policy = \"encrypt\"\n",
    );
    let not_offered = s.send(&format!("x@{LISTED}"));
    let failed = s.send(&format!("y@{OTHER}"));
    assert_pending_with(
        &s.wait_attempts(&not_offered, 2),
        "4.7.4 TLS is required, but was not offered by host 127.0.0.1[127.0.0.1]",
    );
    assert_pending_with(&s.wait_attempts(&failed, 2), "4.7.5 TLS handshake with host 127.0.0.1[127.0.0.1]");
    assert!(plain.messages().is_empty() && broken.messages().is_empty(), "nothing sent in clear");
    let mut q = s.relay.queue(SHARED_REDIS);
    assert_eq!(q.message_count(), 2, "both messages stay queued");
    let log = s.relay.log();
    // The delay is whatever the attempt took: any number.
    let status = format!(
        ", status=deferred (4.7.4 TLS is required, but was not offered by host 127.0.0.1[127.0.0.1]:{})",
        plain.port
    );
    let deferred = log.lines().any(|l| {
        l.split_once(&format!("to=<x@{LISTED}>, relay=none, delay="))
            .and_then(|(_, rest)| rest.split_once(&status))
            .is_some_and(|(delay, _)| delay.parse::<f64>().is_ok())
    });
    assert!(deferred, "{log}");
    assert!(!log.contains("status=bounced") && !log.contains("non-delivery notification"), "{log}");
    assert!(!log.contains("again in clear"), "encrypt never falls back: {log}");
    assert!(s.tls_count("encrypt", "required_missing") >= 2.0);
    assert!(s.tls_count("encrypt", "handshake_failed") >= 2.0);
    // Never counted, so never even exported.
    let sample = |result: &str| format!("mxrelay_delivery_tls_total{{policy=\"encrypt\",result=\"{result}\"}}");
    assert_eq!((s.relay.metric(&sample("clear")), s.relay.metric(&sample("fallback_clear"))), (None, None));
}

#[test]
fn encrypt_delivers_over_tls_without_checking_the_certificate() {
    // Neither trusted nor issued for the host: encrypt does not care.
    let pki = TestPki::new(&["elsewhere.test"]);
    let dest = Destination::start_tls(&pki);
    let s = Outbound::start(&[(LISTED, "127.0.0.1", dest.port)], "tls_policy = \"encrypt\"\n");
    s.send(&format!("e@{LISTED}"));
    assert!(dest.wait_for(1, WAIT)[0].tls);
    s.wait_queue_empty();
    assert!(s.relay.log().contains(":unverified, status=sent (250"), "{}", s.relay.log());
    assert!(s.tls_count("encrypt", "tls") >= 1.0);
}

#[test]
fn verify_delivers_to_an_ip_literal_and_a_named_relay_host_with_the_ca_from_tls_ca_file() {
    let pki = TestPki::localhost();
    let dest = Destination::start_tls(&pki);
    let s = Outbound::start(
        &[(LISTED, "127.0.0.1", dest.port), (OTHER, "dest.test", dest.port)],
        &format!("tls_policy = \"verify\"\ntls_ca_file = \"{}\"\n", pki.ca.display()),
    );
    s.send(&format!("ip@{LISTED},name@{OTHER}"));
    let got = dest.wait_for(2, WAIT);
    assert!(got.iter().all(|m| m.tls), "{got:?}");
    s.wait_queue_empty();
    let log = s.relay.log();
    for rcpt in [format!("ip@{LISTED}"), format!("name@{OTHER}")] {
        let line = log.lines().find(|l| l.contains(&format!("to=<{rcpt}>"))).unwrap();
        assert!(line.contains(":verified, status=sent (250"), "{line}");
    }
    assert!(log.contains("relay=dest.test[127.0.0.1]"), "{log}");
    assert!(s.tls_count("verify", "tls") >= 2.0);
}

#[test]
fn verify_defers_an_untrusted_certificate_and_one_for_another_name() {
    // friet.pan: a certificate from a CA the relay does not know.
    let untrusted = TestPki::localhost();
    let untrusted_dest = Destination::start_tls(&untrusted);
    // other.example: a trusted CA, but the certificate is for another name.
    let misnamed = TestPki::new(&["elsewhere.test"]);
    let misnamed_dest = Destination::start_tls(&misnamed);
    let s = Outbound::start(
        &[(LISTED, "127.0.0.1", untrusted_dest.port), (OTHER, "127.0.0.1", misnamed_dest.port)],
        &format!("tls_policy = \"verify\"\ntls_ca_file = \"{}\"\n", misnamed.ca.display()),
    );
    let a = s.send(&format!("a@{LISTED}"));
    let b = s.send(&format!("b@{OTHER}"));
    assert_pending_with(&s.wait_attempts(&a, 2), "4.7.5 server certificate not verified for host 127.0.0.1[127.0.0.1]");
    assert_pending_with(&s.wait_attempts(&b, 2), "4.7.5 server certificate not verified for host 127.0.0.1[127.0.0.1]");
    assert!(untrusted_dest.messages().is_empty() && misnamed_dest.messages().is_empty());
    let log = s.relay.log();
    assert!(!log.contains("status=bounced") && !log.contains("again in clear"), "{log}");
    assert!(s.tls_count("verify", "verify_failed") >= 4.0);
}

#[test]
fn verify_without_tls_ca_file_trusts_only_the_public_roots() {
    let pki = TestPki::localhost();
    let dest = Destination::start_tls(&pki);
    let s = Outbound::start(&[(LISTED, "127.0.0.1", dest.port)], "tls_policy = \"verify\"\n");
    let id = s.send(&format!("v@{LISTED}"));
    assert_pending_with(
        &s.wait_attempts(&id, 2),
        "4.7.5 server certificate not verified for host 127.0.0.1[127.0.0.1]",
    );
    assert!(dest.messages().is_empty());
    assert!(s.relay.log().contains("UnknownIssuer"), "{}", s.relay.log());
}

#[test]
fn a_bad_tls_setting_is_refused_at_start_naming_the_key() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mxrelay"))
        .arg("check-config")
        .env("MXRELAY_DELIVERY_TLS_POLICY", "secure")
        .env("MXRELAY_DELIVERY_TLS_CA_FILE", "/nonexistent/ca.pem")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("delivery.tls_policy (MXRELAY_DELIVERY_TLS_POLICY): \"secure\" is not a TLS security level"),
        "{text}"
    );
    assert!(
        text.contains("delivery.tls_ca_file (MXRELAY_DELIVERY_TLS_CA_FILE): cannot read /nonexistent/ca.pem"),
        "{text}"
    );
}
