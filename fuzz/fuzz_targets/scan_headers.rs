//! The scanner's Subject rewrite (`scan::SubjectRewrite`,
//! `rewrite_headers`) on a message rspamd asked to tag. Input: a byte that
//! sets the piece size, a byte with the template's length, the template
//! (`{subject}` stands for the original), then the message as received.
//!
//! Asserts: fed in pieces (of a size the input picks) it gives the same
//! bytes as in one; the body (after the first empty line) is passed
//! through byte for byte; the header section keeps as many Subject fields
//! as it had (at least one); the first Subject field (with its
//! continuation lines) and only it is replaced by `Subject: ` and the
//! template filled in, CR and LF turned into spaces, or one is added in
//! front; every other line stays as it was, byte for byte (UTF-8 or not),
//! in its place.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxrelay::scan::{HEADER_LIMIT, SubjectRewrite};

fuzz_target!(|data: &[u8]| {
    let [step, template_len, rest @ ..] = data else { return };
    let (template, message) = rest.split_at((*template_len as usize).min(rest.len()));
    let template = String::from_utf8_lossy(template).into_owned();
    // At most 64 pieces: each feed searches all that is held back so far,
    // which is cheap for the session's 64 KiB reads, slow for 1-byte ones.
    let step = (*step as usize + 1).max(message.len() / 64);

    let out = rewrite(&template, &[message]);
    if message.len() <= HEADER_LIMIT {
        let pieces: Vec<&[u8]> = message.chunks(step).collect();
        assert_eq!(rewrite(&template, &pieces), out, "pieces of {step}");
    }

    let (head_in, body_in) = split(message);
    let (head_out, body_out) = split(&out);
    assert_eq!(body_out, body_in, "body changed");
    let subjects = |h: &[u8]| lines(h).iter().filter(|l| is_subject(l)).count();
    assert_eq!(subjects(head_out), subjects(head_in).max(1), "Subject fields");

    let mut expected: Vec<Vec<u8>> = Vec::new();
    let mut original: Option<Vec<u8>> = None;
    let mut replacing = false;
    for line in lines(head_in) {
        let value = line.strip_suffix(b"\r\n").unwrap_or(line);
        if replacing && matches!(line.first(), Some(b' ' | b'\t')) {
            original.as_mut().unwrap().extend_from_slice(value);
            continue;
        }
        replacing = false;
        if original.is_none() && is_subject(line) {
            original = Some(value[8..].trim_ascii_start().to_vec());
            replacing = true;
            expected.push(Vec::new()); // the new Subject goes here
            continue;
        }
        expected.push(line.to_vec());
    }
    let original = original.unwrap_or_default();
    let filled = template.split("{subject}").map(str::as_bytes).collect::<Vec<_>>().join(&original[..]);
    let mut new: Vec<u8> = b"Subject: ".iter().copied().chain(filled).map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }).collect();
    new.extend_from_slice(b"\r\n");
    match expected.iter_mut().find(|l| l.is_empty()) {
        Some(slot) => *slot = new,
        None => expected.insert(0, new),
    }
    let got: Vec<&[u8]> = lines(head_out);
    assert_eq!(got, expected, "header section");
});

fn rewrite(template: &str, pieces: &[&[u8]]) -> Vec<u8> {
    let mut r = SubjectRewrite::new(template.to_string());
    let mut out = Vec::new();
    for piece in pieces {
        out.extend(r.feed(piece));
    }
    out.extend(r.finish());
    out
}

/// Header section (its last CRLF included) and body (after the empty
/// line), RFC 5322 §2.1; no body when there is no empty line.
fn split(m: &[u8]) -> (&[u8], Option<&[u8]>) {
    if let Some(body) = m.strip_prefix(b"\r\n") {
        return (b"", Some(body));
    }
    match m.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(e) => (&m[..e + 2], Some(&m[e + 4..])),
        None => (m, None),
    }
}

fn lines(h: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 0..h.len() {
        if h[i] == b'\n' && i > 0 && h[i - 1] == b'\r' {
            out.push(&h[start..=i]);
            start = i + 1;
        }
    }
    if start < h.len() {
        out.push(&h[start..]);
    }
    out
}

fn is_subject(line: &[u8]) -> bool {
    line.len() >= 8 && line[..8].eq_ignore_ascii_case(b"subject:")
}
