//! HAProxy PROXY protocol v1 and v2 on the inbound listeners: the real
//! client address behind a load balancer. Parsing is the `ppp` crate's;
//! here is how much to read and what the result means.
//!
//! The header is read byte-exactly (never past its end), so what follows
//! it (SMTP, or a TLS ClientHello on the implicit-TLS listener) is left on
//! the socket untouched.

use std::net::SocketAddr;
use std::time::Duration;

use ppp::{HeaderResult, v1, v2};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// v2 signature (12 bytes); its first five are what [`looks_like_header`] sees.
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included (HAProxy spec §2.1).
pub const V1_LIMIT: usize = 107;
/// Largest v2 header we read: the 16-byte preamble and the addresses with
/// room for a few TLVs; load balancers send far less.
pub const V2_LIMIT: usize = 16 + 1024;

/// What the header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxied {
    /// Relayed for this client.
    Client(SocketAddr),
    /// The balancer's own connection (v2 LOCAL, v1 UNKNOWN), e.g. a health
    /// check, or a relayed one whose family the balancer left unspecified
    /// (v2 PROXY with AF_UNSPEC, which receivers must accept): the socket's
    /// address stands, as in Postfix.
    Local,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyError {
    #[error("no PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("connection closed before the PROXY header ended")]
    Closed,
    #[error("invalid PROXY header: {0}")]
    Invalid(String),
}

/// Whether `prefix` (the first bytes a client sent) starts like a PROXY
/// header of either version. Balancers send the header in one piece, so
/// six bytes are there when it is one.
pub fn looks_like_header(prefix: &[u8]) -> bool {
    prefix.starts_with(b"PROXY ") || prefix.starts_with(&V2_SIGNATURE[..5])
}

/// Interprets one complete header.
pub fn parse(header: &[u8]) -> Result<Proxied, ProxyError> {
    match HeaderResult::parse(header) {
        HeaderResult::V1(Ok(h)) => Ok(match h.addresses {
            v1::Addresses::Tcp4(a) => Proxied::Client((a.source_address, a.source_port).into()),
            v1::Addresses::Tcp6(a) => Proxied::Client((a.source_address, a.source_port).into()),
            v1::Addresses::Unknown => Proxied::Local,
        }),
        HeaderResult::V2(Ok(h)) => match (h.command, h.addresses) {
            (v2::Command::Local, _) | (v2::Command::Proxy, v2::Addresses::Unspecified) => Ok(Proxied::Local),
            (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                Ok(Proxied::Client((a.source_address, a.source_port).into()))
            }
            (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                Ok(Proxied::Client((a.source_address, a.source_port).into()))
            }
            (v2::Command::Proxy, other) => {
                Err(ProxyError::Invalid(format!("unsupported address family {:?}", other.address_family())))
            }
        },
        HeaderResult::V1(Err(e)) => Err(ProxyError::Invalid(format!("v1: {e}"))),
        HeaderResult::V2(Err(e)) => Err(ProxyError::Invalid(format!("v2: {e}"))),
    }
}

/// Reads exactly one header from `stream` within `timeout`.
pub async fn read_header(stream: &mut TcpStream, timeout: Duration) -> Result<Proxied, ProxyError> {
    let header =
        tokio::time::timeout(timeout, read_bytes(stream)).await.map_err(|_| ProxyError::Timeout(timeout))??;
    parse(&header)
}

async fn read_bytes(stream: &mut TcpStream) -> Result<Vec<u8>, ProxyError> {
    let closed = |_| ProxyError::Closed;
    let mut header = vec![0u8; 5];
    stream.read_exact(&mut header).await.map_err(closed)?;
    if header == b"PROXY" {
        // v1: a text line; byte by byte so nothing after CRLF is consumed.
        while header.last() != Some(&b'\n') {
            if header.len() >= V1_LIMIT {
                return Err(ProxyError::Invalid(format!("v1 header longer than {V1_LIMIT} bytes")));
            }
            header.push(stream.read_u8().await.map_err(closed)?);
        }
        Ok(header)
    } else if header[..] == V2_SIGNATURE[..5] {
        header.resize(16, 0);
        stream.read_exact(&mut header[5..]).await.map_err(closed)?;
        if header[..12] != V2_SIGNATURE[..] {
            return Err(ProxyError::Invalid("bad v2 signature".into()));
        }
        let len = u16::from_be_bytes([header[14], header[15]]) as usize;
        if 16 + len > V2_LIMIT {
            return Err(ProxyError::Invalid(format!("v2 header of {} bytes is over {V2_LIMIT}", 16 + len)));
        }
        header.resize(16 + len, 0);
        stream.read_exact(&mut header[16..]).await.map_err(closed)?;
        Ok(header)
    } else {
        Err(ProxyError::Invalid("no PROXY header where one was expected".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
        h.extend_from_slice(addresses);
        h
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        assert_eq!(
            parse(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n"),
            Ok(Proxied::Client("192.0.2.7:40000".parse().unwrap()))
        );
        assert_eq!(
            parse(b"PROXY TCP6 2001:db8::7 ::1 40000 25\r\n"),
            Ok(Proxied::Client("[2001:db8::7]:40000".parse().unwrap()))
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Ok(Proxied::Local));
        assert!(parse(b"PROXY TCP4 999.0.2.7 127.0.0.1 40000 25\r\n").is_err());
    }

    #[test]
    fn v2_proxy_and_local() {
        let addrs = [192, 0, 2, 9, 127, 0, 0, 1, 0x9c, 0x40, 0, 25];
        assert_eq!(parse(&v2(1, 0x11, &addrs)), Ok(Proxied::Client("192.0.2.9:40000".parse().unwrap())));
        assert_eq!(parse(&v2(0, 0x00, &[])), Ok(Proxied::Local));
        // PROXY with AF_UNSPEC: "the receiver must accept this connection
        // as valid and must use the real connection endpoints".
        assert_eq!(parse(&v2(1, 0x00, &[])), Ok(Proxied::Local));
        // A UNIX socket's path is no client address: refused, by name.
        let unix = parse(&v2(1, 0x31, &[0; 216])).unwrap_err();
        assert!(unix.to_string().contains("unsupported address family"), "{unix}");
        assert!(parse(&v2(1, 0x11, &addrs[..4])).is_err());
    }

    #[test]
    fn recognises_a_header_from_its_first_bytes() {
        assert!(looks_like_header(b"PROXY TCP4"));
        assert!(!looks_like_header(b"PRO"));
        assert!(!looks_like_header(b"\r\n"));
        assert!(looks_like_header(&V2_SIGNATURE[..]));
        assert!(!looks_like_header(b"EHLO x"));
        assert!(!looks_like_header(b""));
    }
}
