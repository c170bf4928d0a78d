//! Inbound TLS: the server configuration built from `tls.cert`/`tls.key`
//! (rustls with the ring provider, TLS 1.2 and 1.3 only), and the stream a
//! session speaks over, which STARTTLS turns from plain into TLS in place.
//!
//! The acceptor is rebuilt on SIGHUP; a session keeps the one it started
//! with. What a session knew before the handshake is discarded by the
//! session itself (RFC 3207 §4.2), not here.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate chain {0}: {1}")]
    Cert(String, String),
    #[error("cannot read private key {0}: {1}")]
    Key(String, String),
    #[error("certificate and key do not fit together: {0}")]
    Mismatch(String),
}

/// Builds the acceptor from the PEM files named in `config`.
pub fn load_acceptor(config: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Cert(config.cert.clone(), e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Cert(config.cert.clone(), "no CERTIFICATE block found".into()));
    }
    let key =
        PrivateKeyDer::from_pem_file(&config.key).map_err(|e| TlsError::Key(config.key.clone(), e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Mismatch(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Mismatch(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// What the handshake agreed on, for `Received:` and the mail log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// `TLSv1.3` or `TLSv1.2`.
    pub version: String,
    /// The IANA-style suite name, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
}

impl TlsInfo {
    fn of(conn: &rustls::ServerConnection) -> TlsInfo {
        let version = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
            Some(v) => format!("{v:?}"),
            None => "unknown".to_string(),
        };
        let cipher = conn.negotiated_cipher_suite().and_then(|s| s.suite().as_str()).unwrap_or("unknown").to_string();
        TlsInfo { version, cipher }
    }
}

impl std::fmt::Display for TlsInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} with cipher {}", self.version, self.cipher)
    }
}

/// The client connection, plain or inside TLS.
pub enum SmtpStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Only while a handshake owns the socket; any I/O on it fails.
    Detached,
}

impl SmtpStream {
    /// Runs the server side of a TLS handshake over a plain stream and
    /// counts it in `mxrelay_smtp_tls_handshakes_total`.
    pub async fn handshake(
        self,
        acceptor: &TlsAcceptor,
        timeout: std::time::Duration,
    ) -> Result<(SmtpStream, TlsInfo), String> {
        let SmtpStream::Plain(tcp) = self else {
            return Err("TLS already active".into());
        };
        let result = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
            Err(_) => Err("handshake timed out".into()),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(tls)) => {
                let info = TlsInfo::of(tls.get_ref().1);
                Ok((SmtpStream::Tls(Box::new(tls)), info))
            }
        };
        let label = if result.is_ok() { "ok" } else { "failed" };
        crate::metrics::METRICS.smtp_tls_handshakes.with_label_values(&[label]).inc();
        result
    }
}

fn detached() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "stream detached for a TLS handshake")
}

impl AsyncRead for SmtpStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SmtpStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            SmtpStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            SmtpStream::Detached => Poll::Ready(Err(detached())),
        }
    }
}

impl AsyncWrite for SmtpStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SmtpStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            SmtpStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            SmtpStream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SmtpStream::Plain(s) => Pin::new(s).poll_flush(cx),
            SmtpStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            SmtpStream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SmtpStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            SmtpStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            SmtpStream::Detached => Poll::Ready(Ok(())),
        }
    }
}
