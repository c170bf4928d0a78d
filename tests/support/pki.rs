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
