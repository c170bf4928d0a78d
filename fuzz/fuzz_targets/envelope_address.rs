//! Envelope addresses (`policy::address::parse_path`) and MAIL/RCPT lines
//! with ESMTP parameters through the command parser. Input: a flags byte
//! (bit 0: `strict_rfc821_envelopes`, bit 1: SMTPUTF8 declared, bit 2:
//! RCPT instead of MAIL), then the text after `MAIL FROM:`.
//!
//! Asserts: a parsed mailbox is what policy relies on (local part 1–64
//! octets, ASCII unless SMTPUTF8, no controls, a domain in lower-case
//! A-labels that normalises to itself, or a bracketed literal); `<>` and
//! only `<>` is the null path; turning `strict` off or SMTPUTF8 on never
//! refuses nor changes an address that was accepted; writing a mailbox
//! back in brackets parses to the same mailbox; a MAIL/RCPT command
//! written back from its path and parameters parses to the same command
//! (but for a bracketless path that ends in a tab, which policy refuses).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxrelay::proto::address::{Domain, Path, normalise_domain, parse_path};
use mxrelay::proto::command::{Command, parse};

fuzz_target!(|data: &[u8]| {
    let [flags, rest @ ..] = data else { return };
    let (strict, smtputf8, rcpt) = (flags & 1 == 1, flags & 2 == 2, flags & 4 == 4);
    let Ok(arg) = std::str::from_utf8(rest) else { return };

    check_path(arg, strict, smtputf8);

    let keyword = if rcpt { "RCPT TO:" } else { "MAIL FROM:" };
    let line = format!("{keyword}{arg}");
    let Ok(command) = parse(line.as_bytes()) else { return };
    let (path, params) = match &command {
        Command::Mail { path, params } | Command::Rcpt { path, params } => (path, params),
        other => panic!("{line:?} parsed as {other:?}"),
    };
    check_path(path, strict, smtputf8);
    if path.ends_with('\t') {
        // `MAIL FROM:a\t` is `a`, `MAIL FROM:a\t \x0c` is `a\t` (a path
        // without brackets runs to the first space): never written back
        // the same, and policy refuses it.
        assert!(parse_path(path, false, true).is_err(), "{path:?} accepted");
        return;
    }
    let mut again = format!("{keyword}{path}");
    for (k, v) in params {
        again.push(' ');
        again.push_str(k);
        if let Some(v) = v {
            again.push('=');
            again.push_str(v);
        }
    }
    assert_eq!(parse(again.as_bytes()).as_ref(), Ok(&command), "{line:?} written back as {again:?}");
});

fn check_path(text: &str, strict: bool, smtputf8: bool) {
    let parsed = parse_path(text, strict, smtputf8);
    if parsed.is_ok() {
        assert_eq!(parse_path(text, false, smtputf8), parsed, "lenient refused what strict took");
        assert_eq!(parse_path(text, strict, true), parsed, "SMTPUTF8 changed an accepted address");
    }
    match parsed {
        Ok(Path::Null) => assert!(text == "<>" || text.is_empty() && !strict, "{text:?} is not <>"),
        Ok(Path::Mailbox(m)) => {
            assert!(!m.local.is_empty() && m.local.len() <= 64, "local part {:?}", m.local);
            assert!(smtputf8 || m.raw.is_ascii());
            assert!(!m.raw.chars().any(char::is_control));
            assert!(m.raw.starts_with(&m.local));
            match &m.domain {
                Some(Domain::Name(n)) => {
                    assert!(n.is_ascii() && *n == n.to_ascii_lowercase() && !n.ends_with('.'), "{n:?}");
                    assert_eq!(normalise_domain(n).as_deref(), Some(n.as_str()));
                }
                Some(Domain::Literal(l)) => {
                    assert!(l.starts_with('[') && l.ends_with(']') && m.raw.ends_with(l.as_str()))
                }
                None => assert_eq!(m.raw, m.local),
            }
            let bracketed = format!("<{}>", m.raw);
            assert_eq!(parse_path(&bracketed, true, smtputf8), Ok(Path::Mailbox(m.clone())), "{bracketed:?}");
        }
        Err(_) => {}
    }
}
