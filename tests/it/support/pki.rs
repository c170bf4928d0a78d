//! `TestPki`: a throw-away certificate authority and one server certificate
//! it signed (for `localhost`, `mx.test`, `dest.test` and 127.0.0.1), as PEM
//! files in a temporary directory removed on drop. Generated per test with
//! rcgen, so no key material lives in the repository.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

pub struct TestPki {
    dir: tempfile::TempDir,
    /// The CA certificate (PEM), for clients that verify.
    pub ca: PathBuf,
    /// The server certificate chain (PEM).
    pub cert: PathBuf,
    /// The server key (PKCS#8 PEM).
    pub key: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestPki {
    /// A CA named `mxrelay test CA` and a server certificate for `names`
    /// (host names or IP addresses) signed by it.
    pub fn new(names: &[&str]) -> TestPki {
        let dir = tempfile::tempdir().expect("temporary directory for the test PKI");

        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca_params.distinguished_name.push(DnType::CommonName, "mxrelay test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().expect("CA key");
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-signed CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);

        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("server certificate parameters");
        params.distinguished_name.push(DnType::CommonName, "mxrelay test server");
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &issuer).expect("server certificate signed by the CA");

        let pki = TestPki {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            dir,
        };
        std::fs::write(&pki.ca, ca_cert.pem()).expect("write ca.pem");
        std::fs::write(&pki.cert, &pki.cert_pem).expect("write cert.pem");
        std::fs::write(&pki.key, &pki.key_pem).expect("write key.pem");
        pki
    }

    /// The usual set of names for a loopback server.
    pub fn localhost() -> TestPki {
        TestPki::new(&["localhost", "mx.test", "dest.test", "127.0.0.1"])
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl TestPki {
    /// A rustls client configuration that trusts only this CA.
    pub fn client_config(&self) -> std::sync::Arc<rustls::ClientConfig> {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(&self.ca).expect("ca.pem") {
            roots.add(cert.expect("CA certificate")).expect("add CA");
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        std::sync::Arc::new(config)
    }
}

/// An SMTP client inside TLS (after STARTTLS or on an implicit-TLS port).
pub struct TlsClient {
    reader: std::io::BufReader<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>>,
}

impl TlsClient {
    /// Handshakes over `tcp` as a client of `server_name`, verifying the
    /// certificate against `pki`'s CA.
    pub fn handshake(tcp: std::net::TcpStream, pki: &TestPki, server_name: &str) -> std::io::Result<TlsClient> {
        let name = rustls_pki_types::ServerName::try_from(server_name.to_string()).expect("server name");
        let conn = rustls::ClientConnection::new(pki.client_config(), name).map_err(std::io::Error::other)?;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock)?;
        }
        Ok(TlsClient { reader: std::io::BufReader::new(stream) })
    }

    pub fn send(&mut self, data: &str) {
        use std::io::Write;
        let s = self.reader.get_mut();
        s.write_all(data.as_bytes()).expect("TLS write");
        s.flush().expect("TLS flush");
    }

    /// One whole (possibly multi-line) reply; empty at EOF.
    pub fn reply(&mut self) -> String {
        super::read_reply(&mut self.reader)
    }

    pub fn cmd(&mut self, line: &str) -> String {
        self.send(&format!("{line}\r\n"));
        self.reply()
    }
}
