//! Where the mail for a recipient domain goes, as the domain list says:
//! a listed domain to `[relay_host]:relay_port` (Postfix's
//! `smtp:[host]:port`), anything else by MX. Its [`Destination::key`]
//! names the destination for connection limits, the deferred index, ETRN,
//! `queue flush` and logs; resolving it to addresses is delivery's.

use super::{Domains, Lookup};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    Relay { host: String, port: u16 },
    Mx { domain: String },
}

impl Destination {
    pub fn for_domain(domain: &str, domains: &Domains) -> Destination {
        match domains.lookup(domain) {
            Lookup::Listed(r) => Destination::Relay { host: r.relay_host.clone(), port: r.relay_port },
            _ => Destination::Mx { domain: domain.to_string() },
        }
    }

    /// A stable name for the destination: connection limits, the deferred
    /// index and logs. Never contains braces or spaces.
    pub fn key(&self) -> String {
        let raw = match self {
            Destination::Relay { host, port } => format!("[{host}]:{port}"),
            Destination::Mx { domain } => format!("mx:{domain}"),
        };
        raw.replace(['{', '}', ' '], "_")
    }
}

impl Domains {
    /// The key of the destination mail for `domain` goes to now.
    pub fn destination_key(&self, domain: &str) -> String {
        Destination::for_domain(domain, self).key()
    }
}
