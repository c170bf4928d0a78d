//! ESMTP parameters of MAIL and RCPT (`proto::params::mail_params`,
//! `rcpt_params`) and the DSN helpers under them (`proto::dsn`: xtext,
//! `RET`, `ENVID`, `NOTIFY`, `ORCPT`). Input: a flags byte (bit 0: EHLO
//! was said, bit 1: RCPT instead of MAIL), a byte that sets
//! `message_size_limit` (times 1,000), then the parameters after the path
//! (also taken whole as one parameter value).
//!
//! Asserts:
//! * xtext is exactly RFC 3461 §4's grammar; `decode_xtext` gives for any
//!   text (a stored value too) what the RFC's decoding gives, an octet or a
//!   character that is not printable ASCII as `?`, so nothing but printable
//!   ASCII reaches the header fields of our DSNs; any octets, encoded as
//!   xtext, are valid and decode back.
//! * `RET`, `ENVID`, `NOTIFY`, `ORCPT` accept exactly what RFC 3461 allows
//!   (as we apply it: `NOTIFY` words once each, `ORCPT` at most 500
//!   characters), keep `ENVID` and `ORCPT` as sent, and normalise `RET`
//!   and `NOTIFY` to a form they accept unchanged; `notify_wants` answers
//!   from that form.
//! * Through the command parser: after HELO no parameter is taken; a
//!   refusal is one reply line, 501, 552 (a `SIZE` over the limit, the
//!   only one logged as a policy refusal) or 555; what was accepted holds
//!   what the parameters said (the last one of a kind), and written back
//!   as a MAIL or RCPT line parses and checks to the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxrelay::proto::command::{Command, Params, parse};
use mxrelay::proto::dsn::{
    ENVID_MAX, ORCPT_MAX, decode_xtext, notify_wants, parse_envid, parse_notify, parse_orcpt, parse_ret, valid_xtext,
};
use mxrelay::proto::params::{MailParams, RcptParams, mail_params, rcpt_params};
use mxrelay::proto::reply::Reply;

const NOTIFY_WORDS: [&str; 3] = ["SUCCESS", "FAILURE", "DELAY"];

fuzz_target!(|data: &[u8]| {
    let [flags, limit, rest @ ..] = data else { return };
    let (esmtp, rcpt) = (flags & 1 == 1, flags & 2 == 2);
    let size_limit = u64::from(*limit) * 1000;

    check_encoding(rest);
    let Ok(text) = std::str::from_utf8(rest) else { return };
    check_xtext(text);
    check_values(text);

    let line =
        if rcpt { format!("RCPT TO:<r@friet.pan> {text}") } else { format!("MAIL FROM:<s@sender.example> {text}") };
    match parse(line.as_bytes()) {
        Ok(Command::Mail { params, .. }) => check_mail(&params, esmtp, size_limit),
        Ok(Command::Rcpt { params, .. }) => check_rcpt(&params, esmtp),
        Ok(other) => panic!("{line:?} parsed as {other:?}"),
        Err(_) => {}
    }
});

/// Any octets, written as xtext, are valid xtext and decode back.
fn check_encoding(octets: &[u8]) {
    let encoded = encode_xtext(octets);
    assert!(valid_xtext(&encoded), "{encoded:?}");
    assert_eq!(xtext_octets(&encoded), octets);
    assert_eq!(decode_xtext(&encoded), printable(octets), "{encoded:?}");
}

fn check_xtext(s: &str) {
    let valid = xtext_grammar(s);
    assert_eq!(valid_xtext(s), valid, "{s:?}");
    let decoded = decode_xtext(s);
    assert!(decoded.bytes().all(|b| (32..=126).contains(&b)), "{s:?} decoded to {decoded:?}");
    assert_eq!(decoded, decode_reference(s), "{s:?}");
    if valid {
        // Decoded and encoded again (upper-case hex, only what must be
        // encoded), the value stands for the same octets.
        let octets = xtext_octets(s);
        let again = encode_xtext(&octets);
        assert!(valid_xtext(&again) && again.len() <= s.len(), "{s:?} encoded again as {again:?}");
        assert_eq!(xtext_octets(&again), octets);
        assert_eq!(decode_xtext(&again), decoded);
    }
}

/// The whole text as the value of each DSN parameter.
fn check_values(v: &str) {
    match parse_ret(v) {
        Some(ret) => assert!(ret.eq_ignore_ascii_case(v) && (ret == "FULL" || ret == "HDRS")),
        None => assert!(!v.eq_ignore_ascii_case("FULL") && !v.eq_ignore_ascii_case("HDRS")),
    }
    let envid_ok = !v.is_empty() && v.len() <= ENVID_MAX && xtext_grammar(v);
    assert_eq!(parse_envid(v).as_deref(), envid_ok.then_some(v), "ENVID {v:?}");

    let orcpt_ok = v.len() <= ORCPT_MAX
        && v.split_once(';').is_some_and(|(kind, address)| {
            !kind.is_empty()
                && kind.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !address.is_empty()
                && xtext_grammar(address)
        });
    assert_eq!(parse_orcpt(v).as_deref(), orcpt_ok.then_some(v), "ORCPT {v:?}");

    let words: Vec<String> = v.split(',').map(|w| w.trim().to_ascii_uppercase()).collect();
    let notify_ok = words == ["NEVER"]
        || words.iter().all(|w| NOTIFY_WORDS.contains(&w.as_str()))
            && (1..words.len()).all(|i| !words[..i].contains(&words[i]));
    let notify = parse_notify(v);
    assert_eq!(notify.is_some(), notify_ok, "NOTIFY {v:?}: {notify:?}");
    if let Some(n) = &notify {
        check_notify(n);
        let mut given: Vec<&str> = words.iter().map(String::as_str).collect();
        given.sort_unstable();
        let mut kept: Vec<&str> = n.split(',').collect();
        kept.sort_unstable();
        assert_eq!(kept, given, "NOTIFY {v:?} normalised to {n:?}");
    }
}

/// A normalised NOTIFY: `NEVER`, or known words once each, in RFC order;
/// accepted as it is; what `notify_wants` reads.
fn check_notify(n: &str) {
    assert_eq!(parse_notify(n).as_deref(), Some(n), "{n:?} is not stable");
    let list: Vec<&str> = n.split(',').collect();
    if n != "NEVER" {
        let order: Vec<&str> = NOTIFY_WORDS.into_iter().filter(|w| list.contains(w)).collect();
        assert_eq!(list, order, "{n:?}");
    }
    for what in NOTIFY_WORDS {
        assert_eq!(notify_wants(Some(n), what), list.contains(&what), "{n:?} wants {what}?");
    }
}

fn check_mail(params: &Params, esmtp: bool, size_limit: u64) {
    let checked = mail_params(params, esmtp, size_limit);
    if !esmtp && !params.is_empty() {
        assert_eq!(checked.as_ref().map_err(|(r, _)| r.code), Err(555), "{params:?} after HELO");
    }
    let m = match checked {
        Ok(m) => m,
        Err((reply, refusal)) => {
            check_refusal(&reply);
            assert_eq!(refusal, reply.code == 552, "{reply}");
            if reply.code == 552 {
                assert!(
                    params
                        .iter()
                        .any(|(k, v)| k == "SIZE" && v.as_ref().and_then(|v| v.parse::<u64>().ok()) > Some(size_limit))
                );
            }
            return;
        }
    };
    let last = |key: &str| params.iter().rev().find(|(k, _)| k == key).and_then(|(_, v)| v.as_deref());
    assert_eq!(m.dsn_ret.as_deref(), last("RET").and_then(parse_ret), "{params:?}");
    assert_eq!(m.dsn_envid.as_deref(), last("ENVID"), "{params:?}");
    assert_eq!(
        m.eight_bit,
        params.iter().any(|(k, v)| k == "BODY" && v.as_deref().is_some_and(|v| v.eq_ignore_ascii_case("8BITMIME")))
    );
    assert_eq!(m.smtputf8, params.iter().any(|(k, _)| k == "SMTPUTF8"));
    for (key, value) in params {
        match (key.as_str(), value.as_deref()) {
            ("SIZE", Some(v)) => assert!(v.parse::<u64>().is_ok_and(|n| n <= size_limit), "SIZE={v}"),
            ("BODY" | "AUTH" | "RET" | "ENVID", Some(_)) | ("SMTPUTF8", None) => {}
            other => panic!("{other:?} accepted"),
        }
    }

    // Written back: the same MAIL command, checked to the same.
    let mut words = Vec::new();
    if m.eight_bit {
        words.push("BODY=8BITMIME".to_string());
    }
    if m.smtputf8 {
        words.push("SMTPUTF8".to_string());
    }
    words.extend(m.dsn_ret.as_ref().map(|r| format!("RET={r}")));
    words.extend(m.dsn_envid.as_ref().map(|e| format!("ENVID={e}")));
    let line = format!("MAIL FROM:<s@sender.example> {}", words.join(" "));
    let Ok(Command::Mail { params: again, .. }) = parse(line.as_bytes()) else { panic!("{line:?} does not parse") };
    assert_eq!(mail_params(&again, true, 0), Ok::<MailParams, (Reply, bool)>(m), "{line:?}");
}

fn check_rcpt(params: &Params, esmtp: bool) {
    let r = match rcpt_params(params, esmtp) {
        Ok(r) => r,
        Err(reply) => {
            check_refusal(&reply);
            assert!(reply.code != 552, "{reply}");
            return;
        }
    };
    assert!(esmtp || params.is_empty(), "{params:?} after HELO");
    let last = |key: &str| params.iter().rev().find(|(k, _)| k == key).and_then(|(_, v)| v.as_deref());
    assert_eq!(r.notify, last("NOTIFY").and_then(parse_notify), "{params:?}");
    assert_eq!(r.orcpt.as_deref(), last("ORCPT"), "{params:?}");
    assert!(params.iter().all(|(k, v)| (k == "NOTIFY" || k == "ORCPT") && v.is_some()), "{params:?}");
    if let Some(n) = &r.notify {
        check_notify(n);
    }

    let mut words = Vec::new();
    words.extend(r.notify.as_ref().map(|n| format!("NOTIFY={n}")));
    words.extend(r.orcpt.as_ref().map(|o| format!("ORCPT={o}")));
    let line = format!("RCPT TO:<r@friet.pan> {}", words.join(" "));
    let Ok(Command::Rcpt { params: again, .. }) = parse(line.as_bytes()) else { panic!("{line:?} does not parse") };
    assert_eq!(rcpt_params(&again, true), Ok::<RcptParams, Reply>(r), "{line:?}");
}

/// One reply line, the codes a parameter can be refused with.
fn check_refusal(reply: &Reply) {
    assert!(matches!(reply.code, 501 | 552 | 555), "{reply}");
    let rendered = reply.render();
    assert!(rendered.ends_with("\r\n") && !rendered[..rendered.len() - 2].contains(['\r', '\n']), "{rendered:?}");
}

/// RFC 3461 §4: `xtext = *( xchar / hexchar )`, xchar any of 33–126 but
/// `+` and `=`, hexchar `+` and two upper-case hex digits (lower case taken
/// too, as the code says).
fn xtext_grammar(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+' {
            if b.len() < i + 3 || !b[i + 1].is_ascii_hexdigit() || !b[i + 2].is_ascii_hexdigit() {
                return false;
            }
            i += 3;
        } else if (33..=126).contains(&b[i]) && b[i] != b'=' {
            i += 1;
        } else {
            return false;
        }
    }
    true
}

/// The octets a valid xtext stands for.
fn xtext_octets(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+' {
            out.push(hex(b[i + 1]) << 4 | hex(b[i + 2]));
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn hex(d: u8) -> u8 {
    (d as char).to_digit(16).expect("a hex digit") as u8
}

/// `+XX` for what xtext cannot hold as it is.
fn encode_xtext(octets: &[u8]) -> String {
    octets
        .iter()
        .map(|&b| {
            if (33..=126).contains(&b) && b != b'+' && b != b'=' {
                (b as char).to_string()
            } else {
                format!("+{b:02X}")
            }
        })
        .collect()
}

fn printable(octets: &[u8]) -> String {
    octets.iter().map(|&b| if (32..=126).contains(&b) { b as char } else { '?' }).collect()
}

/// What a DSN header field shows for any text: `+XX` (two hex digits) is
/// its octet, anything else the character itself; either as `?` unless
/// printable ASCII.
fn decode_reference(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        let rest = chars.clone().take(2).collect::<Vec<char>>();
        if c == '+' && rest.len() == 2 && rest.iter().all(char::is_ascii_hexdigit) {
            let octet = (rest[0].to_digit(16).unwrap() << 4 | rest[1].to_digit(16).unwrap()) as u8;
            out.push_str(&printable(&[octet]));
            chars.nth(1);
        } else if (' '..='~').contains(&c) {
            out.push(c);
        } else {
            out.push('?');
        }
    }
    out
}
