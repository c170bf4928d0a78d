//! `mxrelay domains add|remove|list|show|import`: manage the listed domains
//! without SQL, from any node. Input is validated before anything is
//! written (names as A-labels, relay hosts as addresses or host names,
//! ports 1–65535); nodes pick changes up within `domains.refresh` or on
//! SIGHUP.

use serde::Serialize;

use crate::domains::{DomainStore, RawDomain, Snapshot};
use crate::proto::address::normalise_domain;

/// A validated row, ready to store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DomainRow {
    /// A-labels, lower case.
    pub domain: String,
    /// The same name in Unicode, for people.
    pub display: String,
    pub relay_host: String,
    pub relay_port: u16,
    pub scan: bool,
}

impl DomainRow {
    fn raw(&self) -> RawDomain {
        RawDomain {
            domain: self.domain.clone(),
            relay_host: self.relay_host.clone(),
            relay_port: u32::from(self.relay_port),
            scan: if self.scan { "1" } else { "0" }.into(),
        }
    }
}

/// Checks one row as an operator typed it; the error says what to fix.
pub fn validate(domain: &str, relay_host: &str, relay_port: &str, scan: bool) -> Result<DomainRow, String> {
    let name = normalise_domain(domain.trim().trim_end_matches('.'))
        .ok_or_else(|| format!("domain {domain:?} is not a valid domain name (e.g. example.org or bücher.example)"))?;
    let host = relay_host.trim().trim_start_matches('[').trim_end_matches(']');
    let host = if host.parse::<std::net::IpAddr>().is_ok() {
        host.to_string()
    } else {
        normalise_domain(host.trim_end_matches('.')).ok_or_else(|| {
            format!("--relay-host {relay_host:?} is neither an IP address nor a host name (e.g. 192.0.2.10, 2001:db8::25 or mail.example.org)")
        })?
    };
    let port = relay_port
        .trim()
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("--relay-port {relay_port:?} is not a port number (1-65535)"))?;
    Ok(DomainRow { display: display(&name), domain: name, relay_host: host, relay_port: port, scan })
}

fn display(a_label: &str) -> String {
    let (unicode, result) = idna::domain_to_unicode(a_label);
    if result.is_ok() { unicode } else { a_label.to_string() }
}

/// Every listed domain, sorted.
pub async fn list(store: &dyn DomainStore) -> anyhow::Result<Vec<DomainRow>> {
    let snapshot = Snapshot::build(store.load().await?, Default::default());
    let mut rows: Vec<DomainRow> = snapshot
        .routes()
        .map(|r| DomainRow {
            domain: r.domain.clone(),
            display: display(&r.domain),
            relay_host: r.relay_host.clone(),
            relay_port: r.relay_port,
            scan: r.scan,
        })
        .collect();
    rows.sort_by(|a, b| a.domain.cmp(&b.domain));
    Ok(rows)
}

pub async fn add(store: &dyn DomainStore, rows: &[DomainRow]) -> anyhow::Result<()> {
    // Refuse duplicates (in the input or already listed) before writing any
    // row: the seed's MyISAM table has no transactions.
    let listed = list(store).await?;
    let mut seen = std::collections::HashSet::new();
    for r in rows {
        if !seen.insert(r.domain.as_str()) {
            anyhow::bail!("{} appears twice in the input", r.domain);
        }
        if let Some(old) = listed.iter().find(|l| l.domain == r.domain) {
            anyhow::bail!(
                "{} is already listed (relay [{}]:{}); remove it first with `mxrelay domains remove {}`",
                r.domain,
                old.relay_host,
                old.relay_port,
                r.domain
            );
        }
    }
    let raw: Vec<RawDomain> = rows.iter().map(DomainRow::raw).collect();
    store.add(&raw).await?;
    Ok(())
}

/// Parses `domain,relay_host,relay_port[,scan]` lines (`#` comments and a
/// header line allowed). Every bad line is reported with its number.
pub fn parse_csv(text: &str) -> Result<Vec<DomainRow>, Vec<String>> {
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || (n == 0 && line.to_ascii_lowercase().starts_with("domain,")) {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let scan = match f.get(3).copied() {
            None | Some("") | Some("1") | Some("yes") | Some("true") => Ok(true),
            Some("0") | Some("no") | Some("false") => Ok(false),
            Some(other) => Err(format!("scan {other:?} is not 1/0")),
        };
        let row = match (f.len(), scan) {
            (3 | 4, Ok(scan)) => validate(f[0], f[1], f[2], scan),
            (3 | 4, Err(e)) => Err(e),
            _ => Err("expected domain,relay_host,relay_port[,scan]".into()),
        };
        match row {
            Ok(r) => rows.push(r),
            Err(e) => errors.push(format!("line {}: {e}", n + 1)),
        }
    }
    if errors.is_empty() { Ok(rows) } else { Err(errors) }
}

/// A human-readable table.
pub fn table(rows: &[DomainRow]) -> String {
    let mut out = format!("{:<40} {:<40} {:>5} {}\n", "DOMAIN", "RELAY HOST", "PORT", "SCAN");
    for r in rows {
        let name = if r.display != r.domain { format!("{} ({})", r.domain, r.display) } else { r.domain.clone() };
        out.push_str(&format!(
            "{:<40} {:<40} {:>5} {}\n",
            name,
            r.relay_host,
            r.relay_port,
            if r.scan { "yes" } else { "no" }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_problem() {
        let r = validate("Bücher.Example", "[2001:db8::25]", "2525", true).unwrap();
        assert_eq!(
            (r.domain.as_str(), r.relay_host.as_str(), r.relay_port),
            ("xn--bcher-kva.example", "2001:db8::25", 2525)
        );
        assert_eq!(r.display, "bücher.example");
        assert!(validate("bad..name", "h.example", "25", true).unwrap_err().contains("domain"));
        assert!(validate("ok.example", "bad host!", "25", true).unwrap_err().contains("--relay-host"));
        assert!(validate("ok.example", "h.example", "70000", true).unwrap_err().contains("--relay-port"));
        assert!(validate("ok.example", "h.example", "0", true).is_err());
    }

    #[test]
    fn csv_reports_every_bad_line() {
        let rows =
            parse_csv("domain,relay_host,relay_port,scan\na.example,10.0.0.1,25\nb.example,mail.b.example,2525,0\n")
                .unwrap();
        assert_eq!(rows.len(), 2);
        assert!(!rows[1].scan);
        let errors =
            parse_csv("a.example,10.0.0.1\nb.example,h,99999\n# comment\nc.example,h.example,25,maybe").unwrap_err();
        assert_eq!(errors.len(), 3);
        assert!(errors[0].starts_with("line 1") && errors[1].starts_with("line 2") && errors[2].starts_with("line 4"));
    }
}
