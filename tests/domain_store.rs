//! One behaviour suite for every `DomainStore` back end: MySQL/MariaDB and
//! the embedded SQLite.

mod support;

use std::sync::Arc;

use mxrelay::domains::{DomainError, DomainStore, Domains, Lookup, RawDomain};
use support::*;

fn row(domain: &str, host: &str, port: u32, scan: &str) -> RawDomain {
    RawDomain { domain: domain.into(), relay_host: host.into(), relay_port: port, scan: scan.into() }
}

async fn behaves_like_a_domain_store(store: Arc<dyn DomainStore>) {
    store.migrate().await.unwrap();
    store.migrate().await.expect("migrations are idempotent");
    assert!(store.load().await.unwrap().is_empty());
    store.add(&[row("friet.pan", "127.0.0.1", 2526, "1"), row("xn--bcher-kva.example", "::1", 25, "0")]).await.unwrap();
    match store.add(&[row("friet.pan", "10.0.0.1", 25, "1")]).await {
        Err(DomainError::Duplicate(d)) => assert_eq!(d, "friet.pan"),
        other => panic!("duplicate accepted: {other:?}"),
    }
    let domains = Arc::new(Domains::new(store.clone()));
    assert_eq!(domains.lookup("friet.pan"), Lookup::NoSnapshot);
    assert_eq!(domains.refresh(false).await.unwrap(), 2);
    match domains.lookup("friet.pan") {
        Lookup::Listed(r) => assert_eq!((r.relay_host.as_str(), r.relay_port, r.scan), ("127.0.0.1", 2526, true)),
        other => panic!("{other:?}"),
    }
    match domains.lookup("xn--bcher-kva.example") {
        Lookup::Listed(r) => assert!(!r.scan && r.relay_host == "::1"),
        other => panic!("{other:?}"),
    }
    assert_eq!(domains.lookup("other.example"), Lookup::Unlisted);
    assert!(store.remove("friet.pan").await.unwrap());
    assert!(!store.remove("friet.pan").await.unwrap());
    domains.refresh(false).await.unwrap();
    assert_eq!(domains.lookup("friet.pan"), Lookup::Unlisted);
}

#[tokio::test]
async fn mysql_domain_store() {
    let db = TestDb::create(&MysqlServer::shared());
    behaves_like_a_domain_store(mxrelay::domains::open(&db.url()).unwrap()).await;
}

#[tokio::test]
async fn sqlite_domain_store() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("mxrelay.db").display());
    behaves_like_a_domain_store(mxrelay::domains::open(&url).unwrap()).await;
}
