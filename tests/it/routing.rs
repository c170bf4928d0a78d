//! Routing against a real DNS server (dnsmasq on loopback): MX preference
//! order, A/AAAA fallback without MX, unknown domains, and relay hosts given
//! as addresses or names.

use std::net::SocketAddr;

use crate::support::Dns;
use mxrelay::delivery::route::{Route, RouteError};

fn resolver(dns: &Dns) -> mxrelay::dns::Dns {
    let addr: SocketAddr = dns.addr().parse().unwrap();
    mxrelay::dns::Dns::new(&[addr], std::time::Duration::from_secs(2)).unwrap()
}

fn mx(domain: &str) -> Route {
    Route::Mx { domain: domain.into() }
}

#[tokio::test]
async fn mx_routes_follow_preference_then_fall_back_to_a_records() {
    let dns = Dns::start_with(
        &["plain.example", "mx-a.pref.example", "mx-b.pref.example"],
        &[],
        &[
            "--mx-host=pref.example,mx-b.pref.example,20",
            "--mx-host=pref.example,mx-a.pref.example,10",
            "--host-record=mx-a.pref.example,127.0.0.2",
            "--host-record=mx-b.pref.example,127.0.0.3",
        ],
    );
    let r = resolver(&dns);
    let targets = mx("pref.example").resolve(&r).await.unwrap();
    let hosts: Vec<_> = targets.iter().map(|t| (t.host.as_str(), t.addr.to_string())).collect();
    assert_eq!(hosts[0].0, "mx-a.pref.example", "lowest preference first: {hosts:?}");
    assert!(hosts.iter().any(|(h, a)| *h == "mx-b.pref.example" && a.ends_with(":25")), "{hosts:?}");
    // No MX: the domain's own address, port 25.
    let targets = mx("plain.example").resolve(&r).await.unwrap();
    assert_eq!(targets[0].addr.to_string(), "127.0.0.1:25");
    // RFC 7505 null MX: permanent.
    let null = Dns::start_with(&[], &[], &["--mx-host=null.example,.,0"]);
    let rn = resolver(&null);
    let res = mx("null.example").resolve(&rn).await;
    assert!(matches!(res, Err(RouteError::Permanent("5.1.10", _))), "{res:?}");
    // A domain that does not exist cannot receive mail: permanent.
    assert!(matches!(mx("nx.example").resolve(&r).await, Err(RouteError::Permanent("5.1.2", _))));
}

#[tokio::test]
async fn relay_hosts_are_used_as_given_without_mx_lookup() {
    let dns = Dns::start_with(&["relay.example"], &[], &["--mx-host=relay.example,elsewhere.example,10"]);
    let r = resolver(&dns);
    let by_name = Route::Relay { host: "relay.example".into(), port: 2526 }.resolve(&r).await.unwrap();
    assert_eq!(by_name[0].addr.to_string(), "127.0.0.1:2526", "A record of the host, never its MX");
    let v6 = Route::Relay { host: "::1".into(), port: 2526 }.resolve(&r).await.unwrap();
    assert_eq!(v6[0].addr.to_string(), "[::1]:2526");
    // A relay host without an address is a configuration problem: retry, never bounce.
    assert!(matches!(
        Route::Relay { host: "missing.example".into(), port: 25 }.resolve(&r).await,
        Err(RouteError::Temporary(_))
    ));
}
