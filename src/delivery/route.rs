//! Where a recipient's mail goes. A listed domain goes to
//! `[relay_host]:relay_port` exactly like Postfix's `smtp:[host]:port` (no MX
//! lookup; the host's A/AAAA addresses, each in turn). Anything else (mail
//! relayed for `mynetworks`, bounces to outside senders) goes by MX
//! (preference order, equal preferences shuffled, A/AAAA fallback, RFC 7505
//! null MX → permanent failure).

use std::net::SocketAddr;

use crate::dns::{Dns, Mx};

/// The destination a recipient domain goes to (defined with the domain
/// list, which decides it; resolving it to addresses is delivery's).
pub use crate::domains::destination::Destination as Route;

/// Why no address could be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// DNS failed or the relay host has no address yet: retry later.
    Temporary(String),
    /// `(enhanced status, text)`: the domain cannot receive mail.
    Permanent(&'static str, String),
}

/// One address to try, with the name it came from (for logs and DSNs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub addr: SocketAddr,
}

impl Route {
    /// The addresses to try, in order.
    pub async fn resolve(&self, dns: &Dns) -> Result<Vec<Target>, RouteError> {
        match self {
            Route::Relay { host, port } => {
                let ips = dns.addresses(host).await.map_err(|e| RouteError::Temporary(e.to_string()))?;
                if ips.is_empty() {
                    return Err(RouteError::Temporary(format!("relay host {host} has no A/AAAA record")));
                }
                Ok(ips.into_iter().map(|ip| Target { host: host.clone(), addr: SocketAddr::new(ip, *port) }).collect())
            }
            Route::Mx { domain } => {
                let hosts = match dns.mx(domain).await.map_err(|e| RouteError::Temporary(e.to_string()))? {
                    Mx::Hosts(h) => h,
                    Mx::None => vec![domain.clone()],
                    Mx::Null => {
                        return Err(RouteError::Permanent(
                            "5.1.10",
                            format!("{domain} does not accept mail (null MX)"),
                        ));
                    }
                    Mx::NoDomain => {
                        return Err(RouteError::Permanent("5.1.2", format!("Host or domain name not found: {domain}")));
                    }
                };
                let mut targets = Vec::new();
                let mut failure = None;
                for host in hosts {
                    match dns.addresses(&host).await {
                        Ok(ips) => targets.extend(
                            ips.into_iter().map(|ip| Target { host: host.clone(), addr: SocketAddr::new(ip, 25) }),
                        ),
                        Err(e) => failure = Some(e.to_string()),
                    }
                }
                match (targets.is_empty(), failure) {
                    (false, _) => Ok(targets),
                    (true, Some(e)) => Err(RouteError::Temporary(e)),
                    (true, None) => {
                        Err(RouteError::Permanent("5.1.2", format!("no address for the mail exchangers of {domain}")))
                    }
                }
            }
        }
    }
}
