//! Outbound TLS policy: which security level applies to a recipient domain
//! (Postfix `smtp_tls_security_level` and `smtp_tls_policy_maps`), and the
//! two rustls client configurations STARTTLS (RFC 3207) runs with: one that
//! verifies the server certificate against webpki-roots plus
//! `delivery.tls_ca_file`, one that does not (it still checks the handshake
//! signatures, so the peer holds the key of the certificate it sent).
//!
//! Invariant: a level that requires TLS (`encrypt`, `verify`) never lets
//! mail go out in clear; its failures are temporary (deferred, 4.7.x),
//! never a bounce. Only `may` falls back to clear.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::{ConfigError, DeliveryConfig};

pub use crate::config::TlsPolicy;

/// The level for each recipient domain: `delivery.tls_policy_map` over the
/// default `delivery.tls_policy`. A key matches that domain exactly; a key
/// with a leading dot (`.example.com`) matches every subdomain (not the
/// domain itself), the longest such key winning, as in Postfix's
/// `smtp_tls_policy_maps` with `parent_domain_matches_subdomains`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPolicies {
    default: TlsPolicy,
    exact: BTreeMap<String, TlsPolicy>,
    subdomains: BTreeMap<String, TlsPolicy>,
}

impl TlsPolicies {
    /// One level for every domain.
    pub fn uniform(level: TlsPolicy) -> TlsPolicies {
        TlsPolicies { default: level, exact: BTreeMap::new(), subdomains: BTreeMap::new() }
    }

    /// From the `delivery.tls_policy*` keys (checked at load: every map
    /// key is a domain name, listed once).
    pub fn new(d: &DeliveryConfig) -> TlsPolicies {
        let mut policies = TlsPolicies::uniform(d.tls_policy);
        for (key, level) in &d.tls_policy_map {
            let (table, name) = match key.strip_prefix('.') {
                Some(parent) => (&mut policies.subdomains, parent),
                None => (&mut policies.exact, key.as_str()),
            };
            if let Some(name) = crate::proto::address::normalise_domain(name) {
                table.insert(name, *level);
            }
        }
        policies
    }

    /// The level for mail to `domain` (a recipient domain, A-label).
    pub fn for_domain(&self, domain: &str) -> TlsPolicy {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if let Some(level) = self.exact.get(&domain) {
            return *level;
        }
        // Parents from the nearest up: a.b.example.com → b.example.com → example.com → com.
        let mut rest = domain.as_str();
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(level) = self.subdomains.get(parent) {
                return *level;
            }
            rest = parent;
        }
        self.default
    }
}

/// The trust anchors of `verify`: webpki-roots (Mozilla's list) plus every
/// certificate in `ca_file` (PEM) when it is set.
pub fn trust_anchors(ca_file: &str) -> Result<RootCertStore, ConfigError> {
    let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if ca_file.trim().is_empty() {
        return Ok(roots);
    }
    let problem = |problem: String| {
        ConfigError::new(
            "delivery.tls_ca_file",
            problem,
            "point it at a readable PEM file with one or more CA certificates, or leave it empty",
        )
    };
    let text = std::fs::read(ca_file).map_err(|e| problem(format!("cannot read {ca_file}: {e}")))?;
    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(&text) {
        let cert = cert.map_err(|e| problem(format!("{ca_file} is not valid PEM: {e}")))?;
        roots.add(cert).map_err(|e| problem(format!("a certificate in {ca_file} is not a usable CA: {e}")))?;
        added += 1;
    }
    if added == 0 {
        return Err(problem(format!("{ca_file} holds no PEM certificate")));
    }
    Ok(roots)
}

/// The client configurations STARTTLS uses, built once per node. TLS 1.2
/// and 1.3 only, with the ring provider.
#[derive(Clone)]
pub struct TlsClient {
    verified: Arc<ClientConfig>,
    unverified: Arc<ClientConfig>,
}

impl TlsClient {
    pub fn new(roots: RootCertStore) -> Result<TlsClient, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];
        let verified = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let unverified = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SignaturesOnly { provider }))
            .with_no_client_auth();
        Ok(TlsClient { verified: Arc::new(verified), unverified: Arc::new(unverified) })
    }

    /// What a session to a domain with `level` asks of STARTTLS; `None`
    /// for `none`.
    pub fn request(&self, level: TlsPolicy) -> Option<TlsRequest> {
        match level {
            TlsPolicy::None => None,
            TlsPolicy::May => Some(TlsRequest { config: self.unverified.clone(), required: false, verify: false }),
            TlsPolicy::Encrypt => Some(TlsRequest { config: self.unverified.clone(), required: true, verify: false }),
            TlsPolicy::Verify => Some(TlsRequest { config: self.verified.clone(), required: true, verify: true }),
        }
    }
}

/// STARTTLS as one session should do it.
#[derive(Clone)]
pub struct TlsRequest {
    pub config: Arc<ClientConfig>,
    /// Not offered, refused or failed: the session fails (no clear text).
    pub required: bool,
    /// The certificate is checked against the trust anchors and host name.
    pub verify: bool,
}

/// The name the certificate must match: the relay host or MX host name we
/// connected to, or its IP address when it is an IP literal.
pub fn server_name(host: &str) -> Option<ServerName<'static>> {
    let host = host.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.');
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Some(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(host.to_string()).ok()
}

/// `encrypt` and `may`: any certificate is accepted (opportunistic TLS
/// protects against passive listeners only), but the handshake signatures
/// are checked with the ring provider's algorithms, so the peer must hold
/// the private key of the certificate it presents.
#[derive(Debug)]
struct SignaturesOnly {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SignaturesOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(default: &str, map: &[(&str, &str)]) -> DeliveryConfig {
        DeliveryConfig {
            tls_policy: TlsPolicy::parse(default).unwrap(),
            tls_policy_map: map.iter().map(|(k, v)| (k.to_string(), TlsPolicy::parse(v).unwrap())).collect(),
            ..DeliveryConfig::default()
        }
    }

    #[test]
    fn levels_parse_case_insensitively_and_only_known_ones() {
        assert_eq!(TlsPolicy::parse("Verify"), Some(TlsPolicy::Verify));
        assert_eq!(TlsPolicy::parse(" may "), Some(TlsPolicy::May));
        assert_eq!(TlsPolicy::parse("dane"), None);
        assert_eq!(TlsPolicy::parse(""), None);
        assert!(TlsPolicy::Encrypt.requires_tls() && TlsPolicy::Verify.requires_tls());
        assert!(!TlsPolicy::May.requires_tls() && !TlsPolicy::None.requires_tls());
    }

    #[test]
    fn the_default_is_may() {
        let p = TlsPolicies::new(&DeliveryConfig::default());
        assert_eq!(p.for_domain("example.com"), TlsPolicy::May);
    }

    #[test]
    fn exact_keys_match_only_that_domain() {
        let p = TlsPolicies::new(&config("may", &[("example.com", "verify")]));
        assert_eq!(p.for_domain("example.com"), TlsPolicy::Verify);
        assert_eq!(p.for_domain("EXAMPLE.com."), TlsPolicy::Verify);
        assert_eq!(p.for_domain("mx.example.com"), TlsPolicy::May);
        assert_eq!(p.for_domain("notexample.com"), TlsPolicy::May);
    }

    #[test]
    fn a_leading_dot_matches_subdomains_and_the_nearest_parent_wins() {
        let p = TlsPolicies::new(&config(
            "none",
            &[(".example.com", "encrypt"), (".secure.example.com", "verify"), ("example.com", "may")],
        ));
        assert_eq!(p.for_domain("example.com"), TlsPolicy::May, "the dot form does not match the domain itself");
        assert_eq!(p.for_domain("a.example.com"), TlsPolicy::Encrypt);
        assert_eq!(p.for_domain("a.b.example.com"), TlsPolicy::Encrypt);
        assert_eq!(p.for_domain("secure.example.com"), TlsPolicy::Encrypt);
        assert_eq!(p.for_domain("x.secure.example.com"), TlsPolicy::Verify);
        assert_eq!(p.for_domain("example.net"), TlsPolicy::None);
    }

    #[test]
    fn an_exact_key_beats_a_parent() {
        let p = TlsPolicies::new(&config("may", &[(".example.com", "verify"), ("legacy.example.com", "none")]));
        assert_eq!(p.for_domain("legacy.example.com"), TlsPolicy::None);
        assert_eq!(p.for_domain("new.example.com"), TlsPolicy::Verify);
    }

    #[test]
    fn keys_are_normalised_to_lower_case_a_labels() {
        let p = TlsPolicies::new(&config("may", &[("Bücher.Example", "encrypt"), (".MX.TEST", "none")]));
        assert_eq!(p.for_domain("xn--bcher-kva.example"), TlsPolicy::Encrypt);
        assert_eq!(p.for_domain("a.mx.test"), TlsPolicy::None);
    }

    #[test]
    fn map_keys_may_be_written_with_or_without_quotes() {
        let text = "[delivery]\ntls_policy_map = { example.com = \"verify\", \".example.net\" = \"none\", \"a.test\" = \"may\" }\n";
        let c: crate::config::Config = toml::from_str(text).unwrap();
        let keys: Vec<_> = c.delivery.tls_policy_map.keys().map(String::as_str).collect();
        assert_eq!(keys, [".example.net", "a.test", "example.com"]);
        let e = toml::from_str::<crate::config::Config>("[delivery.tls_policy_map]\n\"x.test\" = 1\n").unwrap_err();
        assert!(e.message().contains("must be a string"), "{e}");
        let e = toml::from_str::<crate::config::Config>("[delivery.tls_policy_map]\n\"x.test\" = \"always\"\n")
            .unwrap_err();
        assert!(e.message().contains("\"always\" (for \"x.test\") is not a TLS security level"), "{e}");
    }

    #[test]
    fn ca_file_problems_name_the_key() {
        assert!(trust_anchors("").is_ok());
        assert_eq!(trust_anchors("/nonexistent/ca.pem").unwrap_err().key, "delivery.tls_ca_file");
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificates here\n").unwrap();
        let e = trust_anchors(empty.to_str().unwrap()).unwrap_err();
        assert!(e.problem.contains("no PEM certificate"), "{e:?}");
    }

    #[test]
    fn server_names_for_hosts_and_ip_literals() {
        assert!(matches!(server_name("mx.example.com"), Some(ServerName::DnsName(_))));
        assert!(matches!(server_name("127.0.0.1"), Some(ServerName::IpAddress(_))));
        assert!(matches!(server_name("[::1]"), Some(ServerName::IpAddress(_))));
        assert!(server_name("not a name").is_none());
    }

    #[test]
    fn requests_follow_the_level() {
        let tls = TlsClient::new(trust_anchors("").unwrap()).unwrap();
        assert!(tls.request(TlsPolicy::None).is_none());
        let may = tls.request(TlsPolicy::May).unwrap();
        assert!(!may.required && !may.verify);
        let encrypt = tls.request(TlsPolicy::Encrypt).unwrap();
        assert!(encrypt.required && !encrypt.verify);
        let verify = tls.request(TlsPolicy::Verify).unwrap();
        assert!(verify.required && verify.verify);
    }
}
