//! The PROXY protocol reader (`smtp::proxy::parse`, `looks_like_header`).
//! Input: a mode byte, then either a raw header (mode 0–3), or the parts
//! of a header to build: v1 (mode 4–5), v2 (mode 6–7).
//!
//! Asserts: raw bytes never panic, and whatever parses as a header also
//! looks like one from its first bytes; a header built from addresses and
//! ports parses to exactly the source address and port sent (never the
//! destination's, ports in network order), whatever TLVs follow; v1
//! `UNKNOWN`, v2 `LOCAL` and v2 `PROXY` with an unspecified family leave
//! the socket's address (`Local`).
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use mxrelay::smtp::proxy::{Proxied, V2_SIGNATURE, looks_like_header, parse};

fuzz_target!(|data: &[u8]| {
    let [mode, rest @ ..] = data else { return };
    match mode % 8 {
        0..=3 => {
            if parse(rest).is_ok() {
                assert!(looks_like_header(rest), "parsed but not recognised: {rest:?}");
            }
        }
        4 | 5 => v1(rest),
        _ => v2(rest),
    }
});

fn v1(parts: &[u8]) {
    let [kind, rest @ ..] = parts else { return };
    let (src, header) = match kind % 3 {
        0 => {
            let Some(a) = take::<12>(rest) else { return };
            let src = SocketAddr::new(Ipv4Addr::from(<[u8; 4]>::try_from(&a[..4]).unwrap()).into(), port(&a[8..10]));
            let dst = SocketAddr::new(Ipv4Addr::from(<[u8; 4]>::try_from(&a[4..8]).unwrap()).into(), port(&a[10..12]));
            (src, format!("PROXY TCP4 {} {} {} {}\r\n", src.ip(), dst.ip(), src.port(), dst.port()))
        }
        1 => {
            let Some(a) = take::<36>(rest) else { return };
            let src = SocketAddr::new(Ipv6Addr::from(<[u8; 16]>::try_from(&a[..16]).unwrap()).into(), port(&a[32..34]));
            let dst =
                SocketAddr::new(Ipv6Addr::from(<[u8; 16]>::try_from(&a[16..32]).unwrap()).into(), port(&a[34..36]));
            (src, format!("PROXY TCP6 {} {} {} {}\r\n", src.ip(), dst.ip(), src.port(), dst.port()))
        }
        _ => {
            assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Ok(Proxied::Local));
            return;
        }
    };
    assert!(looks_like_header(header.as_bytes()));
    assert_eq!(parse(header.as_bytes()), Ok(Proxied::Client(src)), "{header:?}");
}

fn v2(parts: &[u8]) {
    let [command, family, rest @ ..] = parts else { return };
    let local = command & 1 == 0;
    let ipv6 = family & 1 == 1;
    let protocol = 1 + (family >> 1) % 2; // stream or datagram
    let len = if ipv6 { 36 } else { 12 };
    if rest.len() < len {
        return;
    }
    let (addresses, tlvs) = rest.split_at(len);
    let tlvs = &tlvs[..tlvs.len().min(512)];
    let mut h = V2_SIGNATURE.to_vec();
    h.push(0x20 | u8::from(!local));
    h.push(if ipv6 { 0x20 } else { 0x10 } | protocol);
    h.extend_from_slice(&((len + tlvs.len()) as u16).to_be_bytes());
    h.extend_from_slice(addresses);
    h.extend_from_slice(tlvs);
    let src = if ipv6 {
        let ip: [u8; 16] = addresses[..16].try_into().unwrap();
        SocketAddr::new(IpAddr::from(ip), port(&addresses[32..34]))
    } else {
        let ip: [u8; 4] = addresses[..4].try_into().unwrap();
        SocketAddr::new(IpAddr::from(ip), port(&addresses[8..10]))
    };
    assert!(looks_like_header(&h));
    let want = if local { Proxied::Local } else { Proxied::Client(src) };
    assert_eq!(parse(&h), Ok(want), "{h:?}");

    let mut unspec = V2_SIGNATURE.to_vec();
    unspec.extend_from_slice(&[0x21, 0x00]);
    unspec.extend_from_slice(&(tlvs.len() as u16).to_be_bytes());
    unspec.extend_from_slice(tlvs);
    assert_eq!(parse(&unspec), Ok(Proxied::Local), "{unspec:?}");
}

fn take<const N: usize>(bytes: &[u8]) -> Option<&[u8]> {
    bytes.get(..N)
}

fn port(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
