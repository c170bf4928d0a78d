//! SASL PLAIN and LOGIN responses (`smtp::auth::decode`, `decode_text`,
//! `decode_plain`). Input: a mode byte, then a client response line (mode
//! even) or the decoded bytes a client would encode (mode odd).
//!
//! Asserts: `*` and only `*` cancels; surrounding blanks never change the
//! result; `decode_text` is `decode` plus UTF-8; what `decode` accepts
//! re-encodes and decodes to the same bytes; PLAIN credentials have a
//! non-empty user without NUL, come from exactly `authzid NUL user NUL
//! password`, refuse an authzid other than the user, and round-trip.
#![no_main]

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use libfuzzer_sys::fuzz_target;
use mxrelay::smtp::auth::{Credentials, SaslError, decode, decode_plain, decode_text};

fuzz_target!(|data: &[u8]| {
    let [mode, rest @ ..] = data else { return };
    if mode % 2 == 0 {
        let Ok(response) = std::str::from_utf8(rest) else { return };
        response_line(response);
    } else {
        response_line(&STANDARD.encode(rest));
        assert_eq!(decode(&STANDARD.encode(rest)).as_deref(), Ok(rest), "base64 round trip");
        assert_eq!(decode_plain(&STANDARD.encode(rest)), plain_reference(rest));
    }
});

fn response_line(response: &str) {
    let raw = decode(response);
    if response.trim() == "*" {
        assert_eq!(raw, Err(SaslError::Cancelled));
    }
    assert_eq!(decode(&format!(" {response}\t")), raw, "blanks around {response:?}");
    assert_eq!(decode_text(response), raw.clone().and_then(|b| String::from_utf8(b).map_err(|_| SaslError::Malformed)));
    let plain = decode_plain(response);
    match raw {
        Ok(bytes) => {
            assert_eq!(decode(&STANDARD.encode(&bytes)).as_ref(), Ok(&bytes));
            assert_eq!(plain, plain_reference(&bytes));
        }
        Err(e) => assert_eq!(plain, Err(e)),
    }
    if let Ok(c) = plain {
        assert!(!c.username.is_empty() && !c.username.contains('\0') && !c.password.contains('\0'));
        let again = STANDARD.encode(format!("\0{}\0{}", c.username, c.password));
        assert_eq!(decode_plain(&again), Ok(c.clone()));
        let with_authzid = STANDARD.encode(format!("{0}\0{0}\0{1}", c.username, c.password));
        assert_eq!(decode_plain(&with_authzid), Ok(c.clone()));
        let other = STANDARD.encode(format!("{0}x\0{0}\0{1}", c.username, c.password));
        assert_eq!(decode_plain(&other), Err(SaslError::Authzid));
    }
}

/// RFC 4616 §2, as we apply it.
fn plain_reference(raw: &[u8]) -> Result<Credentials, SaslError> {
    let parts: Vec<&[u8]> = raw.split(|&b| b == 0).collect();
    let [authzid, user, password] = parts[..] else { return Err(SaslError::Malformed) };
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| SaslError::Malformed);
    let (authzid, username, password) = (text(authzid)?, text(user)?, text(password)?);
    if username.is_empty() {
        return Err(SaslError::Malformed);
    }
    if !authzid.is_empty() && authzid != username {
        return Err(SaslError::Authzid);
    }
    Ok(Credentials { username, password })
}
