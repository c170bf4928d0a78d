//! Envelope address syntax (RFC 5321 §4.1.2, RFC 6531 for UTF-8), pure.
//!
//! The parser records, rather than hides, what open-relay tricks rely on:
//! source routes, `%` and `!` routing in the local part, an `@` inside a
//! quoted local part, address literals and trailing dots, so that policy
//! can refuse them.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Domain {
    /// A host name as lower-case A-labels, without a trailing dot.
    Name(String),
    /// An address literal such as `[192.0.2.1]` or `[IPv6:::1]`, as sent.
    Literal(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    /// The local part as sent (quotes kept).
    pub local: String,
    /// `None` for an unqualified address such as `<postmaster>`.
    pub domain: Option<Domain>,
    /// The address as the client wrote it inside the brackets.
    pub raw: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Path {
    /// `<>`, the null reverse-path of bounces.
    Null,
    Mailbox(Mailbox),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressError {
    /// No angle brackets while `strict_rfc821_envelopes` is on.
    Brackets,
    /// `<@a,@b:user@c>` (RFC 5321 Appendix C): refused, never followed.
    SourceRoute,
    Syntax,
    /// A non-ASCII address without the SMTPUTF8 parameter.
    NeedsSmtputf8,
}

impl Mailbox {
    /// `%` or `!` routing, or an `@` hidden in a quoted local part.
    pub fn has_routing(&self) -> bool {
        self.local.contains(['%', '!', '@'])
    }

    pub fn domain_name(&self) -> Option<&str> {
        match &self.domain {
            Some(Domain::Name(n)) => Some(n),
            _ => None,
        }
    }

    /// Fully qualified: a dotted name or an address literal.
    pub fn is_fqdn(&self) -> bool {
        match &self.domain {
            Some(Domain::Name(n)) => n.contains('.'),
            Some(Domain::Literal(_)) => true,
            None => false,
        }
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Null => f.write_str(""),
            Path::Mailbox(m) => f.write_str(&m.raw),
        }
    }
}

/// Parses a MAIL/RCPT path. `smtputf8` says whether the client declared
/// SMTPUTF8; without it a non-ASCII address is refused.
pub fn parse_path(text: &str, strict: bool, smtputf8: bool) -> Result<Path, AddressError> {
    let inner = match text.strip_prefix('<') {
        Some(rest) => rest.strip_suffix('>').ok_or(AddressError::Syntax)?,
        None if strict => return Err(AddressError::Brackets),
        None => text,
    };
    if inner.is_empty() {
        return Ok(Path::Null);
    }
    if inner.starts_with('@') {
        return Err(AddressError::SourceRoute);
    }
    if !inner.is_ascii() && !smtputf8 {
        return Err(AddressError::NeedsSmtputf8);
    }
    if inner.len() > 254 || inner.chars().any(|c| c.is_control() || c == ' ' && !inner.starts_with('"')) {
        return Err(AddressError::Syntax);
    }
    let (local, domain) = split_at_domain(inner)?;
    check_local(local)?;
    let domain = match domain {
        None => None,
        Some(d) => Some(parse_domain(d).ok_or(AddressError::Syntax)?),
    };
    Ok(Path::Mailbox(Mailbox { local: local.to_string(), domain, raw: inner.to_string() }))
}

/// Splits at the `@` that starts the domain: the last one outside quotes.
fn split_at_domain(s: &str) -> Result<(&str, Option<&str>), AddressError> {
    let mut quoted = false;
    let mut escaped = false;
    let mut at = None;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '@' if !quoted => at = Some(i),
            _ => {}
        }
    }
    if quoted {
        return Err(AddressError::Syntax);
    }
    Ok(match at {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    })
}

fn check_local(local: &str) -> Result<(), AddressError> {
    if local.is_empty() || local.len() > 64 {
        return Err(AddressError::Syntax);
    }
    if local.starts_with('"') {
        return if local.len() >= 2 && local.ends_with('"') { Ok(()) } else { Err(AddressError::Syntax) };
    }
    // dot-atom: atext (RFC 5322 §3.2.3) and UTF-8 (RFC 6531), no empty atoms.
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii();
    if local.split('.').all(|atom| !atom.is_empty() && atom.chars().all(atext)) {
        Ok(())
    } else {
        Err(AddressError::Syntax)
    }
}

/// A host name (converted to lower-case A-labels) or an address literal.
/// A trailing dot is refused: `user@listed.` must not match `listed`.
pub fn parse_domain(d: &str) -> Option<Domain> {
    if let Some(lit) = d.strip_prefix('[') {
        let body = lit.strip_suffix(']')?;
        let ok = match body.get(..5) {
            Some(p) if p.eq_ignore_ascii_case("IPv6:") => body[5..].parse::<std::net::Ipv6Addr>().is_ok(),
            _ => body.parse::<std::net::Ipv4Addr>().is_ok(),
        };
        return ok.then(|| Domain::Literal(d.to_string()));
    }
    normalise_domain(d).map(Domain::Name)
}

/// Lower-case A-label form of a host name, or `None` if it is not one.
/// Used for addresses and for the names in the domains table alike, so the
/// two always compare equal when they name the same domain.
pub fn normalise_domain(d: &str) -> Option<String> {
    if d.is_empty() || d.ends_with('.') || d.starts_with('.') {
        return None;
    }
    let ascii = if d.is_ascii() { d.to_ascii_lowercase() } else { idna::domain_to_ascii(d).ok()? };
    if ascii.len() > 253 {
        return None;
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    ascii.split('.').all(label_ok).then_some(ascii)
}

/// Postfix `reject_invalid_hostname`: the HELO name must be a host name or
/// an address literal.
pub fn valid_helo(name: &str) -> bool {
    parse_domain(name).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mailbox(s: &str) -> Mailbox {
        match parse_path(s, true, true).unwrap() {
            Path::Mailbox(m) => m,
            Path::Null => panic!("null"),
        }
    }

    #[test]
    fn ordinary_addresses() {
        let m = mailbox("<User.Name+tag@Friet.PAN>");
        assert_eq!(m.local, "User.Name+tag");
        assert_eq!(m.domain, Some(Domain::Name("friet.pan".into())));
        assert!(m.is_fqdn() && !m.has_routing());
        assert_eq!(parse_path("<>", true, false), Ok(Path::Null));
        assert!(!mailbox("<postmaster>").is_fqdn());
    }

    #[test]
    fn strict_envelopes_need_brackets() {
        assert_eq!(parse_path("a@b.example", true, false), Err(AddressError::Brackets));
        assert!(parse_path("a@b.example", false, false).is_ok());
    }

    #[test]
    fn relay_tricks_are_visible() {
        assert_eq!(parse_path("<@listed.example:u@other.example>", true, false), Err(AddressError::SourceRoute));
        assert!(mailbox("<a%b.example@listed.example>").has_routing());
        assert!(mailbox("<b.example!a@listed.example>").has_routing());
        assert!(mailbox("<\"a@b.example\"@listed.example>").has_routing());
        assert_eq!(mailbox("<a@[192.0.2.1]>").domain, Some(Domain::Literal("[192.0.2.1]".into())));
        assert_eq!(parse_path("<a@listed.example.>", true, false), Err(AddressError::Syntax));
        assert_eq!(parse_path("<a@[999.1.1.1]>", true, false), Err(AddressError::Syntax));
    }

    #[test]
    fn international_domains_become_a_labels() {
        assert_eq!(mailbox("<a@Bücher.example>").domain_name(), Some("xn--bcher-kva.example"));
        assert_eq!(parse_path("<a@bücher.example>", true, false), Err(AddressError::NeedsSmtputf8));
        assert_eq!(normalise_domain("XN--BCHER-KVA.example").as_deref(), Some("xn--bcher-kva.example"));
    }

    #[test]
    fn helo_names() {
        assert!(valid_helo("mail.example.org"));
        assert!(valid_helo("[127.0.0.1]"));
        assert!(!valid_helo("bad_name!"));
        assert!(!valid_helo("a..b"));
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,80}") {
            let _ = parse_path(&s, true, true);
            let _ = parse_path(&format!("<{s}>"), true, true);
        }
    }
}
