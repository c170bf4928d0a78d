//! One behaviour suite for every `Spool` back end: Redis Streams (cluster)
//! and the embedded SQLite queue. Any difference is a bug.

use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use mxrelay::config::QueueConfig;
use mxrelay::spool::{
    AdminAction, Envelope, MessageState, QueueId, Recall, Recipient, RecipientState, Scope, Spool, Verification,
};

fn envelope(id: &QueueId, rcpt: &str, size: usize) -> Envelope {
    Envelope {
        id: id.clone(),
        sender: "s@sender.example".into(),
        recipients: vec![Recipient {
            address: rcpt.into(),
            domain: "friet.pan".into(),
            state: RecipientState::Pending,
            last_reply: None,
            delay_warned: false,
            notify: None,
            orcpt: None,
        }],
        client_ip: "127.0.0.1".into(),
        client_name: "unknown".into(),
        helo: "client.example".into(),
        received_at: chrono::Utc::now().timestamp_millis(),
        size: size as u64,
        node: "test".into(),
        smtputf8: false,
        eight_bit: false,
        attempts: 0,
        held: false,
        bounce_requested: false,
        dsn_ret: None,
        dsn_envid: None,
    }
}

async fn enqueue(spool: &Arc<dyn Spool>, content: &[u8]) -> QueueId {
    let id = QueueId::new();
    let mut body = spool.open_body(&id);
    for piece in content.chunks(64 * 1024) {
        body.write(piece).await.unwrap();
    }
    body.commit(&envelope(&id, "t@friet.pan", content.len())).await.unwrap();
    id
}

async fn read_all(spool: &Arc<dyn Spool>, lease: &mxrelay::spool::Lease, size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < size {
        let piece = spool.read_body(lease, out.len() as u64, 100_000).await.unwrap();
        assert!(!piece.is_empty());
        out.extend(piece);
    }
    out
}

async fn behaves_like_a_spool(spool: Arc<dyn Spool>) {
    spool.prepare().await.unwrap();
    spool.prepare().await.expect("prepare is idempotent");
    let small = b"Subject: one\r\n\r\nbody\r\n".to_vec();
    let big: Vec<u8> = (0..700_000u32).map(|i| b"abcdefghij\r\n"[(i % 12) as usize]).collect();
    let id1 = enqueue(&spool, &small).await;
    let id2 = enqueue(&spool, &big).await;
    // An aborted body leaves nothing behind.
    let mut aborted = spool.open_body(&QueueId::new());
    aborted.write(&vec![0u8; 600_000]).await.unwrap();
    aborted.abort().await;

    let s = spool.stats(true).await.unwrap();
    assert_eq!((s.messages, s.ready, s.leased, s.deferred, s.held), (2, 2, 0, 0, 0), "{s:?}");
    assert!(s.oldest_received_at.is_some());

    let leases = spool.lease("n1", 10, Duration::from_secs(1)).await.unwrap();
    assert_eq!(leases.len(), 2);
    assert!(spool.lease("n1", 10, Duration::from_millis(200)).await.unwrap().is_empty(), "each entry is leased once");
    let l1 = leases.iter().find(|l| *l.id() == id1).unwrap().clone();
    let l2 = leases.iter().find(|l| *l.id() == id2).unwrap().clone();
    assert_eq!(read_all(&spool, &l1, small.len()).await, small);
    assert_eq!(read_all(&spool, &l2, big.len()).await, big, "a chunked body reads back byte-exact");
    let env = spool.envelope(&l1).await.unwrap().unwrap();
    assert_eq!(env.recipients[0].address, "t@friet.pan");
    assert_eq!(spool.stats(false).await.unwrap().leased, 2);
    // A delivery's first read: the envelope and the body's start together,
    // no more than the body holds.
    let (env_again, start) = spool.envelope_and_start(&l1, 1 << 20).await.unwrap().unwrap();
    assert_eq!((env_again, start), (env.clone(), small.clone()));
    let (env2, start) = spool.envelope_and_start(&l2, 100_000).await.unwrap().unwrap();
    assert_eq!((env2.size, start.as_slice()), (big.len() as u64, &big[..100_000]));
    let reader = mxrelay::spool::BodyReader::new(spool.clone(), l2.clone(), env2.size, 100_000);
    assert_eq!(reader.starting_with(start).read_all().await.unwrap(), big, "the rest read after the start");

    // Deferred, with its destination indexed; due later.
    let mut env1 = env.clone();
    env1.attempts = 1;
    env1.recipients[0].last_reply = Some("451 4.0.0 later".into());
    let later = chrono::Utc::now().timestamp_millis() + 60_000;
    spool.defer(&l1, &env1, later, &["[127.0.0.1]:2526".into()]).await.unwrap();
    assert_eq!(spool.stats(false).await.unwrap().deferred, 1);
    assert_eq!(spool.deferred_destinations().await.unwrap(), vec!["[127.0.0.1]:2526".to_string()]);
    assert_eq!(spool.schedule_due(chrono::Utc::now().timestamp_millis(), 100).await.unwrap(), 0, "not due yet");
    assert_eq!(spool.schedule_due(later + 1, 100).await.unwrap(), 1);
    let again = spool.lease("n1", 10, Duration::from_secs(1)).await.unwrap();
    assert_eq!(again.iter().map(|l| l.id()).collect::<Vec<_>>(), vec![&id1]);
    let stored = spool.envelope(&again[0]).await.unwrap().unwrap();
    assert_eq!((stored.attempts, stored.recipients[0].last_reply.as_deref()), (1, Some("451 4.0.0 later")));

    // Fast drain: release by destination.
    spool.defer(&again[0], &env1, later, &["[127.0.0.1]:2526".into()]).await.unwrap();
    assert_eq!(spool.release("[127.0.0.1]:2526", 10).await.unwrap(), 1);
    assert_eq!(spool.release("[127.0.0.1]:2526", 10).await.unwrap(), 0);
    let again = spool.lease("n1", 10, Duration::from_secs(1)).await.unwrap();
    assert_eq!(again.len(), 1);

    // Hand back: available again at once.
    spool.hand_back(&again[0]).await.unwrap();
    let again = spool.lease("n2", 10, Duration::from_secs(1)).await.unwrap();
    assert_eq!(again.len(), 1);

    // A lease not renewed is taken over (queue.lease is 1 s here).
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let taken = spool.take_over("n3", Duration::from_secs(1), 10).await.unwrap();
    assert!(taken.iter().any(|l| *l.id() == id1) && taken.iter().any(|l| *l.id() == id2), "{taken:?}");
    // A renewed lease is not.
    let l = taken.iter().find(|l| *l.id() == id1).unwrap().clone();
    spool.renew(&l).await.unwrap();
    assert!(spool.take_over("n4", Duration::from_secs(1), 10).await.unwrap().is_empty());

    // Done: gone.
    spool.complete(&l).await.unwrap();
    assert!(spool.envelope(&l).await.unwrap().is_none());
    assert!(spool.locate(&id1).await.unwrap().is_none());

    // Operator actions.
    let id3 = enqueue(&spool, &small).await;
    assert!(spool.admin(&id3, AdminAction::Hold).await.unwrap());
    let state =
        |all: Vec<(Envelope, MessageState)>, id: &QueueId| all.into_iter().find(|(e, _)| &e.id == id).map(|(_, s)| s);
    assert_eq!(state(spool.list().await.unwrap(), &id3), Some(MessageState::Held));
    let (shown, held) = spool.show(&id3).await.unwrap().expect("shown");
    assert_eq!((shown.id.clone(), held), (id3.clone(), MessageState::Held), "show agrees with list");
    assert_eq!(spool.stats(false).await.unwrap().held, 1);
    assert!(spool.admin(&id3, AdminAction::Release).await.unwrap());
    assert!(!spool.admin(&id3, AdminAction::Release).await.unwrap(), "not held any more");
    assert_eq!(state(spool.list().await.unwrap(), &id3), Some(MessageState::Active));
    assert!(spool.admin(&id3, AdminAction::Bounce).await.unwrap());
    let lease3 = spool.locate(&id3).await.unwrap().unwrap();
    assert!(spool.envelope(&lease3).await.unwrap().unwrap().bounce_requested);
    assert!(spool.admin(&id3, AdminAction::Delete).await.unwrap());
    assert!(spool.locate(&id3).await.unwrap().is_none());
    assert!(spool.show(&id3).await.unwrap().is_none());
    assert!(!spool.admin(&id3, AdminAction::Delete).await.unwrap());
    assert_eq!(spool.stats(false).await.unwrap().messages, 1, "only the big message is left");
}

/// The shared recipient verification cache: a definite answer is kept
/// until it expires and serves every later lookup; only one asker at a
/// time holds the claim where the store is shared (`cluster`: Redis);
/// operator commands see and forget answers by address and by domain.
async fn keeps_verification_answers(spool: Arc<dyn Spool>, cluster: bool) {
    spool.prepare().await.unwrap();
    let hold = Duration::from_secs(5);
    assert_eq!(spool.recall_or_claim("a@friet.pan", hold).await.unwrap(), Recall::YoursToAsk);
    let second = spool.recall_or_claim("a@friet.pan", hold).await.unwrap();
    assert_eq!(second, if cluster { Recall::BeingAsked } else { Recall::YoursToAsk }, "one asker at a time");
    spool.unclaim("a@friet.pan").await.unwrap();
    assert_eq!(spool.recall_or_claim("a@friet.pan", hold).await.unwrap(), Recall::YoursToAsk, "claim let go");
    let now = chrono::Utc::now().timestamp_millis();
    let answer = |address: &str, deliverable: bool, ttl_ms: i64| Verification {
        address: address.into(),
        deliverable,
        reply: format!(
            "host mx[192.0.2.1]:25 said: {} (in reply to RCPT TO command)",
            if deliverable { 250 } else { 550 }
        ),
        asked_at: now,
        expires_at: now + ttl_ms,
    };
    let a = answer("a@friet.pan", true, 60_000);
    spool.remember(&a).await.unwrap();
    assert_eq!(spool.recall_or_claim("a@friet.pan", hold).await.unwrap(), Recall::Known(a.clone()));
    let b = answer("b@friet.pan", false, 60_000);
    let c = answer("c@other.example", true, 60_000);
    spool.remember(&b).await.unwrap();
    spool.remember(&c).await.unwrap();
    // One that expires at once is never served.
    spool.remember(&answer("gone@friet.pan", true, 300)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(spool.recall_or_claim("gone@friet.pan", hold).await.unwrap(), Recall::YoursToAsk);
    assert_eq!(spool.recall(&Scope::All).await.unwrap(), vec![a.clone(), b.clone(), c.clone()]);
    assert_eq!(spool.recall(&Scope::Domain("friet.pan".into())).await.unwrap(), vec![a.clone(), b.clone()]);
    assert_eq!(spool.recall(&Scope::Address("b@friet.pan".into())).await.unwrap(), vec![b.clone()]);
    assert_eq!(spool.forget(&Scope::Address("b@friet.pan".into())).await.unwrap(), 1);
    assert_eq!(spool.forget(&Scope::Domain("friet.pan".into())).await.unwrap(), 1);
    assert_eq!(spool.recall(&Scope::All).await.unwrap(), vec![c.clone()]);
    assert_eq!(spool.forget(&Scope::All).await.unwrap(), 1);
    assert!(spool.recall(&Scope::All).await.unwrap().is_empty());
}

fn config(url: String, prefix: &str) -> QueueConfig {
    QueueConfig { url, prefix: prefix.into(), lease: Duration::from_secs(1), ..QueueConfig::default() }
}

#[tokio::test]
async fn redis_spool() {
    let prefix = unique("mxrsp");
    let spool = mxrelay::spool::open(&config(SHARED_REDIS.into(), &prefix)).unwrap();
    behaves_like_a_spool(spool.clone()).await;
    keeps_verification_answers(spool, true).await;
    let mut conn = redis::Client::open(SHARED_REDIS).unwrap().get_connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}:*")).query(&mut conn).unwrap();
    assert!(!keys.iter().any(|k| k.contains(":tmp:")), "aborted chunks left: {keys:?}");
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(&keys).query(&mut conn).unwrap();
    }
}

#[tokio::test]
async fn sqlite_spool() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("mxrelay.db").display());
    let spool = mxrelay::spool::open(&config(url.clone(), "mxr")).unwrap();
    behaves_like_a_spool(spool.clone()).await;
    keeps_verification_answers(spool, false).await;
    // Only the big message is left, so only its chunks: the aborted body's
    // are gone (as on Redis, above).
    let db = sqlx::SqlitePool::connect(&url).await.unwrap();
    let (orphans,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM queue_bodies WHERE id NOT IN (SELECT id FROM queue_messages)")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(orphans, 0, "aborted chunks left");
    let (kept,): (i64,) = sqlx::query_as("SELECT COUNT(DISTINCT id) FROM queue_bodies").fetch_one(&db).await.unwrap();
    assert_eq!(kept, 1, "the big message's chunks");
}
