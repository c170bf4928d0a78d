//! DNS lookups the relay needs, over hickory-resolver. Nameservers come from
//! `dns.nameservers` (tests point them at a local server) or the system.
//! Invariant: "does not exist" and "could not find out" stay distinct, so a
//! DNS failure is never turned into a permanent rejection.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;

use crate::metrics::METRICS;

#[derive(Debug, thiserror::Error)]
#[error("DNS lookup failed: {0}")]
pub struct DnsError(String);

/// What the MX lookup of a domain found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mx {
    /// Exchanges in the order to try.
    Hosts(Vec<String>),
    /// No MX records: fall back to the domain's own A/AAAA (RFC 5321 §5.1).
    None,
    /// RFC 7505 null MX: the domain accepts no mail.
    Null,
    /// The domain does not exist.
    NoDomain,
}

#[derive(Clone)]
pub struct Dns {
    resolver: TokioResolver,
    timeout: Duration,
}

impl Dns {
    pub fn new(nameservers: &[SocketAddr], timeout: Duration) -> Result<Dns, DnsError> {
        let builder = if nameservers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| DnsError(e.to_string()))?
        } else {
            let servers = nameservers
                .iter()
                .map(|a| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = a.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = a.port();
                    NameServerConfig::new(a.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let mut builder = builder;
        let opts = builder.options_mut();
        opts.timeout = timeout;
        opts.attempts = 2;
        opts.ndots = 0;
        let resolver = builder.build().map_err(|e| DnsError(e.to_string()))?;
        Ok(Dns { resolver, timeout })
    }

    /// Postfix `reject_unknown_*_domain`: `Ok(false)` when the name has no
    /// MX, A or AAAA record (or does not exist), `Err` when DNS failed.
    pub async fn domain_exists(&self, name: &str) -> Result<bool, DnsError> {
        let fqdn = format!("{name}.");
        let mx = self.guard(self.resolver.mx_lookup(fqdn.as_str())).await;
        match mx {
            Ok(l) if !l.answers().is_empty() => return Ok(true),
            Ok(_) => {}
            Err(e) if e.is_nx_domain() => return Ok(false),
            Err(e) if e.is_no_records_found() => {}
            Err(e) => return Err(self.failed(e)),
        }
        match self.guard(self.resolver.lookup_ip(fqdn.as_str())).await {
            Ok(l) => Ok(l.iter().next().is_some()),
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => Ok(false),
            Err(e) => Err(self.failed(e)),
        }
    }

    /// MX records of `domain`, by preference (equal preferences shuffled).
    pub async fn mx(&self, domain: &str) -> Result<Mx, DnsError> {
        let fqdn = format!("{domain}.");
        match self.guard(self.resolver.mx_lookup(fqdn.as_str())).await {
            Ok(l) => {
                let mut hosts: Vec<(u16, String)> = l
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(mx) => Some((mx.preference, mx.exchange.to_utf8().trim_end_matches('.').to_string())),
                        _ => None,
                    })
                    .collect();
                if hosts.is_empty() {
                    return Ok(Mx::None);
                }
                // RFC 7505: a single MX with the root as exchange.
                if hosts.len() == 1 && hosts[0].1.is_empty() {
                    return Ok(Mx::Null);
                }
                use rand::seq::SliceRandom;
                hosts.shuffle(&mut rand::rng());
                hosts.sort_by_key(|(pref, _)| *pref);
                Ok(Mx::Hosts(hosts.into_iter().map(|(_, h)| h).filter(|h| !h.is_empty()).collect()))
            }
            Err(e) if e.is_nx_domain() => Ok(Mx::NoDomain),
            Err(e) if e.is_no_records_found() => Ok(Mx::None),
            Err(e) => Err(self.failed(e)),
        }
    }

    /// A and AAAA addresses of `host`; `Ok(empty)` when it has none.
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let fqdn = format!("{}.", host.trim_end_matches('.'));
        match self.guard(self.resolver.lookup_ip(fqdn.as_str())).await {
            Ok(l) => Ok(l.iter().collect()),
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => Ok(vec![]),
            Err(e) => Err(self.failed(e)),
        }
    }

    /// The client's name from its PTR record, or `None`.
    pub async fn reverse_name(&self, ip: IpAddr) -> Option<String> {
        let lookup = self.guard(self.resolver.reverse_lookup(ip)).await.ok()?;
        lookup.answers().iter().find_map(|r| match &r.data {
            RData::PTR(ptr) => Some(ptr.0.to_utf8().trim_end_matches('.').to_string()),
            _ => None,
        })
    }

    async fn guard<T>(&self, f: impl Future<Output = Result<T, NetError>>) -> Result<T, NetError> {
        match tokio::time::timeout(self.timeout * 2, f).await {
            Ok(r) => r,
            Err(_) => Err(NetError::from("DNS lookup timed out")),
        }
    }

    fn failed(&self, e: NetError) -> DnsError {
        METRICS.dns_errors.inc();
        DnsError(e.to_string())
    }
}
