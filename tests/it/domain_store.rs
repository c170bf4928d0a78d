//! One behaviour suite for every `DomainStore` back end, and one for every
//! `UserStore` (SMTP AUTH users, in the same database): MySQL/MariaDB and
//! the embedded SQLite.

use std::sync::Arc;

use crate::support::*;
use mxrelay::domains::{DomainError, DomainStore, Domains, Lookup, RawDomain, RecipientCheck};

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
    behaves_like_a_recipient_store(store.as_ref(), &domains).await;
    assert!(store.remove("friet.pan").await.unwrap());
    assert!(!store.remove("friet.pan").await.unwrap());
    domains.refresh(false).await.unwrap();
    assert_eq!(domains.lookup("friet.pan"), Lookup::Unlisted);
}

/// `relay_recipient_checks` and `relay_recipients`, loaded into the snapshot.
async fn behaves_like_a_recipient_store(store: &dyn DomainStore, domains: &Domains) {
    let table = |d: &str| match domains.lookup(d) {
        Lookup::Listed(r) => match &r.recipients {
            RecipientCheck::Table(t) => {
                let mut v: Vec<String> = t.iter().cloned().collect();
                v.sort();
                Some(v)
            }
            RecipientCheck::None | RecipientCheck::Verify => None,
        },
        other => panic!("{other:?}"),
    };
    let verified = |d: &str| matches!(domains.lookup(d), Lookup::Listed(r) if r.recipients == RecipientCheck::Verify);
    assert_eq!(table("friet.pan"), None, "no check: every recipient");
    let addresses = ["a@friet.pan", "b@friet.pan", "@xn--bcher-kva.example"].map(String::from);
    assert_eq!(store.add_recipients(&addresses).await.unwrap(), 3);
    assert_eq!(store.add_recipients(&addresses[..1]).await.unwrap(), 0, "present ones are kept");
    store.set_recipient_check("friet.pan", "table").await.unwrap();
    store.set_recipient_check("friet.pan", "table").await.expect("setting it again is fine");
    domains.refresh(false).await.unwrap();
    assert_eq!(table("friet.pan"), Some(vec!["a@friet.pan".to_string(), "b@friet.pan".to_string()]));
    assert_eq!(table("xn--bcher-kva.example"), None, "addresses alone change nothing");
    assert!(store.remove_recipient("b@friet.pan").await.unwrap());
    assert!(!store.remove_recipient("b@friet.pan").await.unwrap());
    domains.refresh(false).await.unwrap();
    assert_eq!(table("friet.pan"), Some(vec!["a@friet.pan".to_string()]));
    store.set_recipient_check("friet.pan", "verify").await.unwrap();
    domains.refresh(false).await.unwrap();
    assert_eq!(table("friet.pan"), None, "verify: its addresses are not used");
    assert!(verified("friet.pan"));
    store.set_recipient_check("friet.pan", "none").await.unwrap();
    domains.refresh(false).await.unwrap();
    assert_eq!(table("friet.pan"), None);
    assert!(!verified("friet.pan"));
    assert_eq!(store.load_recipients().await.unwrap().checks, vec![]);
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

/// `relay_users` through the store and `users::verify`, on the database at
/// `url` (migrated by the domain store).
async fn behaves_like_a_user_store(url: &str) {
    use mxrelay::users::{self, UserError};
    mxrelay::domains::open(url).unwrap().migrate().await.unwrap();
    let store = users::open(url).unwrap();
    let hash = users::hash_password("s3cret pass").unwrap();
    store.add("alice@example.org", &hash).await.unwrap();
    match store.add("alice@example.org", &hash).await {
        Err(UserError::Duplicate(u)) => assert_eq!(u, "alice@example.org"),
        other => panic!("duplicate user accepted: {other:?}"),
    }
    assert!(users::verify(store.as_ref(), "alice@example.org", "s3cret pass").await.unwrap());
    assert!(!users::verify(store.as_ref(), "alice@example.org", "wrong").await.unwrap());
    assert!(!users::verify(store.as_ref(), "ALICE@example.org", "s3cret pass").await.unwrap(), "names are exact");
    assert!(!users::verify(store.as_ref(), "nobody", "s3cret pass").await.unwrap());
    assert!(store.set_password("alice@example.org", &users::hash_password("new").unwrap()).await.unwrap());
    assert!(users::verify(store.as_ref(), "alice@example.org", "new").await.unwrap());
    assert!(!store.set_password("nobody", &hash).await.unwrap());
    let listed = store.list().await.unwrap();
    assert_eq!(listed.iter().map(|(u, _)| u.as_str()).collect::<Vec<_>>(), vec!["alice@example.org"]);
    assert!(!listed[0].1.is_empty(), "created_at is shown");
    assert!(store.remove("alice@example.org").await.unwrap());
    assert!(!store.remove("alice@example.org").await.unwrap());
}

#[tokio::test]
async fn mysql_user_store() {
    let db = TestDb::create(&MysqlServer::shared());
    behaves_like_a_user_store(&db.url()).await;
}

#[tokio::test]
async fn sqlite_user_store() {
    let dir = tempfile::tempdir().unwrap();
    behaves_like_a_user_store(&format!("sqlite://{}", dir.path().join("mxrelay.db").display())).await;
}
