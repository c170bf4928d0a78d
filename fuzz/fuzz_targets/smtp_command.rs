//! One SMTP command line (`smtp::command::parse`), as the session hands it
//! over: the bytes before CRLF. Input: the line.
//!
//! Asserts, besides never panicking: NUL and invalid UTF-8 are told apart
//! (NUL first); trailing blanks and the case of the verb change nothing;
//! what is parsed out is well-formed (HELO/EHLO name one word, upper-case
//! AUTH mechanism and parameter keywords, BDAT size the digits sent, MAIL
//! and RCPT paths and parameter values taken from the line); an error's
//! reply is a 500 or 501.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxrelay::proto::command::{Command, CommandError, parse};

fuzz_target!(|line: &[u8]| {
    let parsed = parse(line);
    if line.contains(&0) {
        assert_eq!(parsed, Err(CommandError::Nul));
        return;
    }
    let Ok(text) = std::str::from_utf8(line) else {
        assert_eq!(parsed, Err(CommandError::NotUtf8));
        return;
    };

    // The session strips CRLF only; blanks before it do not matter.
    assert_eq!(parse(format!("{text} \t ").as_bytes()), parsed, "trailing blanks changed {text:?}");
    // Verbs are case-insensitive (RFC 5321 §2.4).
    let verb_end = text.find([' ', '\t']).unwrap_or(text.len());
    let flipped: String = text[..verb_end]
        .chars()
        .map(|c| if c.is_ascii_uppercase() { c.to_ascii_lowercase() } else { c.to_ascii_uppercase() })
        .chain(text[verb_end..].chars())
        .collect();
    assert_eq!(parse(flipped.as_bytes()), parsed, "verb case changed {text:?}");

    match parsed {
        Ok(Command::Helo(name)) => assert!(!name.is_empty() && !name.contains(char::is_whitespace)),
        Ok(Command::Ehlo(name)) => {
            assert!(!name.is_empty() && !name.contains(char::is_whitespace));
            assert!(text.contains(&name));
        }
        Ok(Command::Mail { path, params } | Command::Rcpt { path, params }) => {
            assert!(!path.is_empty() && text.contains(&path), "path {path:?} not from {text:?}");
            for (key, value) in &params {
                assert!(
                    !key.is_empty() && key.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-')
                );
                if let Some(v) = value {
                    assert!(!v.contains(char::is_whitespace), "value {v:?}");
                }
            }
        }
        Ok(Command::Bdat { size, .. }) => assert!(text.contains(&size.to_string())),
        Ok(Command::Auth { mechanism, initial }) => {
            assert!(!mechanism.is_empty() && mechanism == mechanism.to_ascii_uppercase());
            assert!(initial.is_none_or(|i| !i.is_empty() && !i.contains(char::is_whitespace)));
        }
        Ok(Command::Etrn(domain)) => assert!(!domain.is_empty() && !domain.contains(char::is_whitespace)),
        Ok(Command::Unknown(verb)) => assert_eq!(verb, verb.to_ascii_uppercase()),
        Ok(_) => {}
        Err(e) => assert!(matches!(e.reply().code, 500 | 501), "{e:?}"),
    }
});
