//! RFC 3461, the DSN extension: the MAIL parameters `RET` and `ENVID`, the
//! RCPT parameters `NOTIFY` and `ORCPT`, and their xtext encoding. Pure.
//!
//! Values are kept as the client sent them (xtext stays encoded), so they
//! are passed on unchanged to a next hop that offers DSN, and decoded only
//! for the notifications we write ourselves.

/// Longest `ENVID` (RFC 3461 §4.4: 100 characters).
pub const ENVID_MAX: usize = 100;
/// Longest `ORCPT` value we take (RFC 3461 §4.2: 500 characters).
pub const ORCPT_MAX: usize = 500;

/// xtext (RFC 3461 §4): printable ASCII but `+` and `=`, and `+XX` for any
/// octet as two hex digits (upper case by the RFC; lower case taken too).
pub fn valid_xtext(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                if !(i + 2 < b.len() && b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit()) {
                    return false;
                }
                i += 3;
            }
            b'=' => return false,
            33..=126 => i += 1,
            _ => return false,
        }
    }
    true
}

/// The text an xtext stands for, for a header field of our own DSNs: an
/// octet (`+XX`) or a character that is not printable ASCII becomes `?`.
/// Any text is read so, a stored value that is not xtext too: nothing but
/// printable ASCII ever reaches the header.
pub fn decode_xtext(s: &str) -> String {
    let printable = |b: u8| if (32..=126).contains(&b) { b as char } else { '?' };
    let hex = |b: &u8| (*b as char).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        let octet = match (c, bytes.get(i + 1).and_then(hex), bytes.get(i + 2).and_then(hex)) {
            ('+', Some(high), Some(low)) => Some((high << 4 | low) as u8),
            _ => None,
        };
        match octet {
            Some(b) => {
                out.push(printable(b));
                chars.nth(1); // the two hex digits, ASCII
            }
            None => out.push(if c.is_ascii() { printable(c as u8) } else { '?' }),
        }
    }
    out
}

/// `RET=FULL|HDRS`, in upper case.
pub fn parse_ret(v: &str) -> Option<&'static str> {
    ["FULL", "HDRS"].into_iter().find(|r| r.eq_ignore_ascii_case(v))
}

/// `ENVID=xtext`, at most [`ENVID_MAX`] characters.
pub fn parse_envid(v: &str) -> Option<String> {
    (!v.is_empty() && v.len() <= ENVID_MAX && valid_xtext(v)).then(|| v.to_string())
}

/// `NOTIFY=NEVER`, or a list of `SUCCESS`, `FAILURE`, `DELAY` (each once),
/// in upper case and in that order.
pub fn parse_notify(v: &str) -> Option<String> {
    let words: Vec<String> = v.split(',').map(|w| w.trim().to_ascii_uppercase()).collect();
    if words.len() == 1 && words[0] == "NEVER" {
        return Some("NEVER".into());
    }
    let known = ["SUCCESS", "FAILURE", "DELAY"];
    if words.is_empty() || words.iter().any(|w| !known.contains(&w.as_str())) {
        return None;
    }
    // In a fixed order; a word given twice makes the lists differ in length.
    let kept: Vec<&str> = known.into_iter().filter(|k| words.iter().any(|w| w == k)).collect();
    (kept.len() == words.len()).then(|| kept.join(","))
}

/// `ORCPT=addr-type;xtext` (RFC 3461 §4.2), the type an atom.
pub fn parse_orcpt(v: &str) -> Option<String> {
    let (kind, address) = v.split_once(';')?;
    let atom = !kind.is_empty() && kind.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    (atom && !address.is_empty() && v.len() <= ORCPT_MAX && valid_xtext(address)).then(|| v.to_string())
}

/// Whether a recipient's `NOTIFY` asks for a notification of `what`
/// (`SUCCESS`, `FAILURE` or `DELAY`). Without NOTIFY, failures and delays
/// are reported and successes not (RFC 3461 §4.1).
pub fn notify_wants(notify: Option<&str>, what: &str) -> bool {
    match notify {
        None => what != "SUCCESS",
        Some(list) => list.split(',').any(|w| w == what),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xtext_is_checked_and_decoded() {
        assert!(valid_xtext("QQ314159") && valid_xtext("a+2Bb") && valid_xtext("x+2b"));
        assert!(!valid_xtext("a=b") && !valid_xtext("a b") && !valid_xtext("a+2") && !valid_xtext("a+ZZ"));
        assert!(!valid_xtext("é"));
        assert_eq!(decode_xtext("bob+2Bmail+40example.org"), "bob+mail@example.org");
        assert_eq!(decode_xtext("a+0Ab"), "a?b", "control octets never reach a header");
    }

    #[test]
    fn any_text_decodes_to_printable_ascii() {
        // Found by fuzz/fuzz_targets/esmtp_params.rs: a value that is not
        // xtext (a stored one) kept its control characters, and `+` then a
        // sign and a digit read as an octet (`u8::from_str_radix("+4")`).
        assert_eq!(decode_xtext("a\x01b"), "a?b");
        assert_eq!(decode_xtext("id\r\nBcc: x"), "id??Bcc: x");
        assert_eq!(decode_xtext("é+C3+A9"), "???");
        assert_eq!(decode_xtext("++41"), "+A");
        assert_eq!(decode_xtext("+-1+4"), "+-1+4");
    }

    #[test]
    fn the_parameters_are_validated_and_normalised() {
        assert_eq!(parse_ret("hdrs"), Some("HDRS"));
        assert_eq!(parse_ret("SOME"), None);
        assert_eq!(parse_envid("QQ314159").as_deref(), Some("QQ314159"));
        assert_eq!(parse_envid(&"x".repeat(101)), None);
        assert_eq!(parse_notify("delay,success").as_deref(), Some("SUCCESS,DELAY"));
        assert_eq!(parse_notify("never").as_deref(), Some("NEVER"));
        for bad in ["NEVER,SUCCESS", "SOMETIMES", "", "SUCCESS,SUCCESS"] {
            assert_eq!(parse_notify(bad), None, "{bad}");
        }
        assert_eq!(parse_orcpt("rfc822;bob+40example.org").as_deref(), Some("rfc822;bob+40example.org"));
        assert_eq!(parse_orcpt("rfc822;"), None);
        assert_eq!(parse_orcpt("bob@example.org"), None);
        assert!(notify_wants(None, "FAILURE") && notify_wants(None, "DELAY") && !notify_wants(None, "SUCCESS"));
        assert!(!notify_wants(Some("NEVER"), "FAILURE") && notify_wants(Some("SUCCESS,FAILURE"), "SUCCESS"));
        assert!(!notify_wants(Some("SUCCESS,FAILURE"), "DELAY"));
    }
}
