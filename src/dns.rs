//! DNS lookups the relay needs, over hickory-resolver. Nameservers come from
//! `dns.nameservers` (tests point them at a local server) or the system.
//! Invariant: "does not exist" and "could not find out" stay distinct, so a
//! DNS failure is never turned into a permanent rejection.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;

use crate::metrics::METRICS;

#[derive(Debug, thiserror::Error)]
#[error("DNS lookup failed: {0}")]
pub struct DnsError(String);

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
