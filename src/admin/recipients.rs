//! `mxrelay recipients check|add|remove|list|import`: which recipients of a
//! listed domain are accepted (Postfix's `relay_recipient_maps`), without
//! SQL, from any node. Addresses are stored as Postfix looks them up: the
//! local part in lower case, the domain as lower-case A-labels; `@domain`
//! accepts every address of the domain. Nodes load them with the domains
//! (`domains.refresh`, or at once on SIGHUP).

use std::sync::Arc;

use serde::Serialize;

use crate::config::Config;
use crate::domains::{DomainStore, RECIPIENT_METHODS};
use crate::proto::address::normalise_domain;
use crate::spool::{Scope, Spool, Verification};

/// `local@domain` or `@domain` as stored; the error says what to fix.
pub fn normalise(address: &str) -> Result<String, String> {
    let address = address.trim().trim_start_matches('<').trim_end_matches('>');
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Err(format!("{address:?} is not an address (user@example.org, or @example.org for all of it)"));
    };
    let domain = normalise_domain(domain.trim_end_matches('.'))
        .ok_or_else(|| format!("{address:?}: {domain:?} is not a valid domain name"))?;
    if local.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{address:?}: the local part has spaces or control characters"));
    }
    Ok(format!("{}@{domain}", local.to_lowercase()))
}

/// A recipient check method as `relay_recipient_checks.method` holds it.
pub fn method(name: &str) -> Result<&'static str, String> {
    RECIPIENT_METHODS
        .iter()
        .find(|m| m.eq_ignore_ascii_case(name.trim()))
        .copied()
        .ok_or_else(|| format!("{name:?} is not a method: use one of {}", RECIPIENT_METHODS.join(", ")))
}

/// The addresses of a CSV file, one per line in the first column; a
/// header line `address`, blank lines and `#` comments are skipped. Every
/// bad line is named.
pub fn parse_csv(text: &str) -> Result<Vec<String>, Vec<String>> {
    let (mut addresses, mut errors) = (Vec::new(), Vec::new());
    for (n, line) in text.lines().enumerate() {
        let first = line.split(',').next().unwrap_or("").trim();
        if first.is_empty() || first.starts_with('#') || (n == 0 && first.eq_ignore_ascii_case("address")) {
            continue;
        }
        match normalise(first) {
            Ok(a) => addresses.push(a),
            Err(e) => errors.push(format!("line {}: {e}", n + 1)),
        }
    }
    if errors.is_empty() { Ok(addresses) } else { Err(errors) }
}

/// What `recipients list` shows.
#[derive(Debug, Serialize)]
pub struct Listing {
    /// Domains with a method other than `none`.
    pub checks: Vec<(String, String)>,
    pub addresses: Vec<String>,
}

/// The checks and addresses, sorted; only those of `domain` when given.
pub async fn list(store: &dyn DomainStore, domain: Option<&str>) -> anyhow::Result<Listing> {
    let raw = store.load_recipients().await?;
    let of = |d: &str| domain.is_none_or(|want| d == want);
    let mut checks: Vec<(String, String)> = raw.checks.into_iter().filter(|(d, _)| of(d)).collect();
    let mut addresses: Vec<String> =
        raw.addresses.into_iter().filter(|a| of(a.rsplit_once('@').map_or("", |(_, d)| d))).collect();
    checks.sort();
    addresses.sort();
    Ok(Listing { checks, addresses })
}

/// A human-readable listing.
pub fn table(listing: &Listing) -> String {
    let mut out = String::new();
    for (domain, method) in &listing.checks {
        out.push_str(&format!("{domain}: {method}\n"));
    }
    for a in &listing.addresses {
        out.push_str(&format!("{a}\n"));
    }
    out
}

/// The shared verification cache (`recipients verify-cache`), in the
/// queue store, prepared (a Sentinel or cluster URL waits for its primaries).
pub async fn verify_cache(config: &Config) -> anyhow::Result<Arc<dyn Spool>> {
    let spool = crate::spool::open(&config.queue)?;
    spool.prepare().await?;
    Ok(spool)
}

/// Which cached answers a `verify-cache` command is about: one address (as
/// it is kept: lower case), a domain's, or all.
pub fn verify_scope(address: Option<&str>, domain: Option<&str>) -> Result<Scope, String> {
    match (address, domain) {
        (Some(_), Some(_)) => Err("name an address or --domain, not both".into()),
        (Some(a), None) => {
            let address = normalise(a)?;
            if address.starts_with('@') {
                return Err(format!("{a:?}: answers are kept per address; use --domain for a whole domain"));
            }
            Ok(Scope::Address(address))
        }
        (None, Some(d)) => normalise_domain(d.trim().trim_start_matches('@').trim_end_matches('.'))
            .map(Scope::Domain)
            .ok_or_else(|| format!("--domain: {d:?} is not a valid domain name")),
        (None, None) => Ok(Scope::All),
    }
}

/// A human-readable listing of cached answers.
pub fn verdicts_table(answers: &[Verification]) -> String {
    let at = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .map_or_else(|| "-".into(), |t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
    };
    let mut out = String::new();
    for a in answers {
        let answer = if a.deliverable { "deliverable" } else { "undeliverable" };
        out.push_str(&format!(
            "{}: {answer} until {} (asked {}): {}\n",
            a.address,
            at(a.expires_at),
            at(a.asked_at),
            a.reply
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_stored_as_postfix_looks_them_up() {
        assert_eq!(normalise("<John.Doe@Bücher.Example>").unwrap(), "john.doe@xn--bcher-kva.example");
        assert_eq!(normalise("@Friet.PAN").unwrap(), "@friet.pan");
        assert!(normalise("nobody").unwrap_err().contains("not an address"));
        assert!(normalise("a@bad..name").unwrap_err().contains("not a valid domain name"));
        assert!(normalise("a b@friet.pan").unwrap_err().contains("spaces"));
        assert_eq!(method("TABLE"), Ok("table"));
        assert_eq!(method("Verify"), Ok("verify"));
        assert_eq!(verify_scope(Some("<Bob@Friet.PAN>"), None), Ok(Scope::Address("bob@friet.pan".into())));
        assert_eq!(verify_scope(None, Some("@Friet.PAN.")), Ok(Scope::Domain("friet.pan".into())));
        assert_eq!(verify_scope(None, None), Ok(Scope::All));
        assert!(verify_scope(Some("@friet.pan"), None).unwrap_err().contains("--domain"));
        assert!(verify_scope(Some("a@friet.pan"), Some("friet.pan")).unwrap_err().contains("not both"));
        assert!(method("verify-sometimes").unwrap_err().contains("none, table, verify"));
    }

    #[test]
    fn csv_skips_the_header_and_names_every_bad_line() {
        let ok = parse_csv("address,comment\nA@friet.pan,first\n\n# later\n@other.example\n").unwrap();
        assert_eq!(ok, ["a@friet.pan", "@other.example"]);
        let errors = parse_csv("a@friet.pan\nnobody\nb@bad..name").unwrap_err();
        assert_eq!(errors.len(), 2);
        assert!(errors[0].starts_with("line 2") && errors[1].starts_with("line 3"));
    }
}
