//! Replies the delivery client reads from a destination
//! (`delivery::client::parse_reply_line`, `parse_extensions`,
//! `RemoteReply`). Input: what the server sent, any number of replies in
//! a row (as after a PIPELINING batch); read as the client reads it, line
//! by line at most 4096 bytes, at most 100 lines a reply.
//!
//! Asserts: a line parses exactly when it starts with three digits from
//! 200 to 599, its continuation mark is the fourth byte `-`, its text has
//! no line ending; a reply's code is its last line's; the enhanced status
//! is always `class.subject.detail` digits of the reply's own class; EHLO keywords are case-insensitive and SIZE is the number that
//! follows it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxrelay::delivery::client::{RemoteReply, parse_extensions, parse_reply_line};

const REPLY_LINE_LIMIT: usize = 4096;
const REPLY_LINES_LIMIT: usize = 100;

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    'replies: while !input.is_empty() {
        let mut text = Vec::new();
        for _ in 0..REPLY_LINES_LIMIT {
            let window = &input[..input.len().min(REPLY_LINE_LIMIT)];
            let n = window.iter().position(|&b| b == b'\n').map_or(window.len(), |i| i + 1);
            let (raw, rest) = input.split_at(n);
            input = rest;
            let Some(line) = parse_reply_line(raw) else {
                assert!(!starts_with_code(raw), "refused {raw:?}");
                break 'replies;
            };
            assert!(starts_with_code(raw), "took {raw:?}");
            assert_eq!(raw[..3], *line.code.to_string().as_bytes());
            assert_eq!(line.more, raw.get(3) == Some(&b'-'), "{raw:?}");
            assert!(!line.text.ends_with(char::is_whitespace) && !line.text.contains('\n'));
            text.push(line.text);
            if !line.more {
                check_reply(RemoteReply { code: line.code, text: text.join(" ") });
                continue 'replies;
            }
            if input.is_empty() {
                break 'replies;
            }
        }
        break;
    }
});

fn starts_with_code(raw: &[u8]) -> bool {
    raw.len() >= 3
        && raw[..3].iter().all(u8::is_ascii_digit)
        && (200..600)
            .contains(&(u16::from(raw[0] - b'0') * 100 + u16::from(raw[1] - b'0') * 10 + u16::from(raw[2] - b'0')))
}

fn check_reply(reply: RemoteReply) {
    assert!(reply.is_success() == (200..400).contains(&reply.code));
    assert!(reply.is_permanent() == (reply.code >= 500));
    let enhanced = reply.enhanced();
    let parts: Vec<&str> = enhanced.split('.').collect();
    assert!(
        parts.len() == 3 && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())),
        "{enhanced:?}"
    );
    assert_eq!(parts[0], (reply.code / 100).to_string(), "{enhanced:?} for {}", reply.code);
    if reply.text.split_whitespace().next() != Some(enhanced.as_str()) {
        assert_eq!(enhanced, format!("{}.0.0", reply.code / 100));
    }
    assert!(reply.to_string().starts_with(&format!("{} ", reply.code)));

    let ext = parse_extensions(&reply.text);
    let lower = parse_extensions(&reply.text.to_ascii_lowercase());
    assert_eq!(
        (ext.pipelining, ext.size, ext.eight_bit, ext.smtputf8, ext.starttls),
        (lower.pipelining, lower.size, lower.eight_bit, lower.smtputf8, lower.starttls),
        "keyword case in {:?}",
        reply.text
    );
    let words: Vec<&str> = reply.text.split_whitespace().collect();
    match words.iter().rposition(|w| w.eq_ignore_ascii_case("SIZE")) {
        Some(i) => assert_eq!(ext.size, Some(words.get(i + 1).and_then(|n| n.parse().ok()).unwrap_or(0))),
        None => assert_eq!(ext.size, None),
    }
}
