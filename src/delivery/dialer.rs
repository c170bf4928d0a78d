//! Opening sessions to destinations: the client's settings (timeouts, the
//! longest line, who this node is, to see loops), the TLS level per
//! recipient domain with the STARTTLS configurations, and `may`'s second
//! try in clear. Deliveries and recipient verification probes both dial
//! through it, so a probe meets a destination exactly as mail does.

use std::sync::Arc;

use super::ClusterNames;
use super::client::{ClientError, Connection, Myself, Settings};
use super::route::Target;
use super::tls::{self, TlsClient, TlsPolicies, TlsPolicy};
use crate::config::Config;
use crate::metrics::METRICS;

pub struct Dialer {
    config: Config,
    /// The TLS level per recipient domain, and the STARTTLS configurations.
    tls_policies: TlsPolicies,
    tls: TlsClient,
    /// The `myhostname` of every node on this queue: a destination
    /// greeting with one of them is the cluster itself.
    cluster: Arc<ClusterNames>,
}

impl Dialer {
    pub fn new(config: &Config, cluster: Arc<ClusterNames>) -> Dialer {
        // The start-up check has read the CA file before `serve` starts;
        // should it fail now anyway, verify against webpki-roots only.
        let roots = tls::trust_anchors(&config.delivery.tls_ca_file).unwrap_or_else(|e| {
            tracing::error!("{e}; verifying against webpki-roots only");
            tls::trust_anchors("").unwrap_or_else(|_| rustls::RootCertStore::empty())
        });
        Dialer {
            tls_policies: TlsPolicies::new(&config.delivery),
            tls: TlsClient::new(roots).expect("the ring provider supports TLS 1.2 and 1.3"),
            cluster,
            config: config.clone(),
        }
    }

    /// The TLS level for mail to `domain`.
    pub fn tls_level(&self, domain: &str) -> TlsPolicy {
        self.tls_policies.for_domain(domain)
    }

    pub fn settings(&self) -> Settings {
        let d = &self.config.delivery;
        Settings {
            connect: d.connect_timeout,
            greeting: d.greeting_timeout,
            command: d.command_timeout,
            data: d.data_timeout,
            line_length_limit: d.line_length_limit,
            myself: Myself {
                hostnames: self.cluster.names(),
                listeners: [Some(self.config.smtp.listen), self.config.tls.implicit_listen]
                    .into_iter()
                    .flatten()
                    .collect(),
            },
        }
    }

    /// A new session to `target` at TLS `level`. With `may`, a STARTTLS
    /// that was refused or failed is followed by one more connection in
    /// clear, as Postfix does; `encrypt` and `verify` never fall back.
    pub async fn open(&self, target: &Target, level: TlsPolicy) -> Result<Connection, ClientError> {
        let (helo, settings) = (&self.config.myhostname, self.settings());
        let request = self.tls.request(level);
        let count = |result: &str| METRICS.delivery_tls.with_label_values(&[level.as_str(), result]).inc();
        match Connection::open(target, helo, &settings, request.as_ref()).await {
            Ok(conn) => {
                match &conn.tls {
                    Some(tls) => {
                        count("tls");
                        tracing::info!(
                            "TLS session established to {}[{}]:{}: {tls}",
                            target.host,
                            target.addr.ip(),
                            target.addr.port()
                        );
                    }
                    None => count("clear"),
                }
                Ok(conn)
            }
            Err(e) => {
                if let Some(result) = e.tls_result() {
                    count(result);
                }
                if level != TlsPolicy::May || !e.is_tls_failure() {
                    return Err(e);
                }
                tracing::info!(
                    "{e}; trying {}[{}]:{} again in clear (tls_policy may)",
                    target.host,
                    target.addr.ip(),
                    target.addr.port()
                );
                let conn = Connection::open(target, helo, &settings, None).await?;
                count("fallback_clear");
                Ok(conn)
            }
        }
    }
}
