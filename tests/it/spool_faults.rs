//! The queue's promises when things go wrong, on both back ends (Redis
//! Streams and the embedded SQLite spool): fencing between lease holders,
//! commits that verify the body, reads that are never short, at most one
//! live entry per message, bounded leases, quarantine of unreadable
//! envelopes, and indexes that do not leak. Each test damages the store
//! for real (deleting keys or rows) where a fault would.

use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use mxrelay::config::QueueConfig;
use mxrelay::spool::{AdminAction, BodyReader, Envelope, Lease, QueueId, Recipient, RecipientState, Spool, SpoolError};

const CHUNK: usize = 4096;
const DEST: &str = "[127.0.0.1]:2526";

/// One back end under test, with the means to damage it as a fault would.
enum Store {
    Redis { prefix: String },
    Sqlite { url: String, _dir: tempfile::TempDir },
}

impl Store {
    fn redis() -> Store {
        Store::Redis { prefix: unique("mxrsf") }
    }

    fn sqlite() -> Store {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("mxrelay.db").display());
        Store::Sqlite { url, _dir: dir }
    }

    fn config(&self, shards: u32) -> QueueConfig {
        let (url, prefix) = match self {
            Store::Redis { prefix } => (SHARED_REDIS.to_string(), prefix.clone()),
            Store::Sqlite { url, .. } => (url.clone(), "mxr".to_string()),
        };
        QueueConfig { url, prefix, shards, chunk_size: CHUNK, lease: Duration::from_secs(1), ..QueueConfig::default() }
    }

    async fn open(&self, shards: u32) -> Arc<dyn Spool> {
        let spool = mxrelay::spool::open(&self.config(shards)).unwrap();
        spool.prepare().await.unwrap();
        spool
    }

    fn redis_conn(&self) -> (redis::Connection, String) {
        let Store::Redis { prefix } = self else { unreachable!() };
        (redis::Client::open(SHARED_REDIS).unwrap().get_connection().unwrap(), prefix.clone())
    }

    fn redis_key(&self, kind: &str, id: &QueueId) -> String {
        let (mut conn, prefix) = self.redis_conn();
        let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}:*:{kind}:{id}")).query(&mut conn).unwrap();
        assert_eq!(keys.len(), 1, "{kind} key of {id}: {keys:?}");
        keys.into_iter().next().unwrap()
    }

    async fn sql(&self, statement: &str, id: &QueueId) {
        let Store::Sqlite { url, .. } = self else { unreachable!() };
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(statement.to_string())).bind(id.as_str()).execute(&pool).await.unwrap();
        pool.close().await;
    }

    /// The chunks of a body still being received vanish (a Redis restart
    /// or failover mid-upload, an expired temporary key).
    async fn lose_first_chunks(&self, id: &QueueId) {
        match self {
            Store::Redis { .. } => {
                let key = self.redis_key("tmp", id);
                let _: () = redis::cmd("DEL").arg(key).query(&mut self.redis_conn().0).unwrap();
            }
            Store::Sqlite { .. } => self.sql("DELETE FROM queue_bodies WHERE id = ? AND offset = 0", id).await,
        }
    }

    /// A stored body loses its end.
    async fn shorten_body(&self, id: &QueueId) {
        match self {
            Store::Redis { .. } => {
                let key = self.redis_key("body", id);
                let _: () = redis::cmd("EVAL")
                    .arg("redis.call('SET', KEYS[1], string.sub(redis.call('GET', KEYS[1]), 1, 100))")
                    .arg(1)
                    .arg(&key)
                    .query(&mut self.redis_conn().0)
                    .unwrap();
            }
            Store::Sqlite { .. } => {
                self.sql(
                    "DELETE FROM queue_bodies WHERE id = ?1 AND offset = (SELECT MAX(offset) FROM queue_bodies WHERE id = ?1)",
                    id,
                )
                .await
            }
        }
    }

    /// The envelope can no longer be decoded.
    async fn corrupt_envelope(&self, id: &QueueId) {
        match self {
            Store::Redis { .. } => {
                let key = self.redis_key("msg", id);
                let _: () = redis::cmd("HSET")
                    .arg(key)
                    .arg("recipients")
                    .arg("{not json")
                    .query(&mut self.redis_conn().0)
                    .unwrap();
            }
            Store::Sqlite { .. } => self.sql("UPDATE queue_messages SET envelope = '{not json' WHERE id = ?", id).await,
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Store::Redis { prefix } = self {
            clear_shared_queue(prefix);
        }
    }
}

fn envelope(id: &QueueId) -> Envelope {
    Envelope {
        id: id.clone(),
        sender: "s@sender.example".into(),
        recipients: vec![Recipient {
            address: "t@friet.pan".into(),
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
        // Deliberately wrong: the spool stores what the writer counted.
        size: 1,
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

fn content(len: usize) -> Vec<u8> {
    (0..len).map(|i| b"0123456789abcdef\r\n"[i % 18]).collect()
}

async fn enqueue(spool: &Arc<dyn Spool>, len: usize) -> QueueId {
    let id = QueueId::new();
    let mut body = spool.open_body(&id);
    for piece in content(len).chunks(1000) {
        body.write(piece).await.unwrap();
    }
    body.commit(&envelope(&id)).await.unwrap();
    id
}

async fn assert_clean(spool: &Arc<dyn Spool>) {
    let audit = spool.audit().await.unwrap();
    assert!(audit.is_clean(), "{audit:?}");
}

fn lost(r: Result<(), SpoolError>) -> bool {
    matches!(r, Err(SpoolError::LeaseLost(_)))
}

async fn both(test: impl AsyncFn(Store)) {
    test(Store::redis()).await;
    test(Store::sqlite()).await;
}

#[tokio::test]
async fn only_the_current_holder_changes_a_message() {
    both(async |store| {
        let spool = store.open(2).await;
        let id = enqueue(&spool, 100).await;
        let old = spool.lease("n1", 10, Duration::from_secs(1)).await.unwrap().remove(0);
        // n1 stops renewing; n2 takes the entry over.
        let new = spool.take_over("n2", Duration::ZERO, 10).await.unwrap().remove(0);
        assert_eq!(*new.id(), id);
        assert_ne!(new, old, "a takeover makes a new token");
        let env = spool.envelope(&new).await.unwrap().unwrap();
        assert!(lost(spool.renew(&old).await), "renewing must not take the entry back");
        assert!(lost(spool.defer(&old, &env, 0, &[DEST.into()]).await));
        assert!(lost(spool.hand_back(&old).await));
        assert!(lost(spool.skip(&old).await));
        assert!(lost(spool.complete(&old).await));
        assert_clean(&spool).await;
        assert_eq!(spool.stats(false).await.unwrap().leased, 1, "still n2's");
        spool.renew(&new).await.unwrap();
        spool.complete(&new).await.unwrap();
        assert!(lost(spool.complete(&new).await), "completed exactly once");
        assert!(spool.locate(&id).await.unwrap().is_none());
        // The same node taking its own entry over also voids its old token.
        enqueue(&spool, 100).await;
        let first = spool.lease("n1", 10, Duration::from_secs(1)).await.unwrap().remove(0);
        let again = spool.take_over("n1", Duration::ZERO, 10).await.unwrap().remove(0);
        assert!(lost(spool.complete(&first).await));
        spool.complete(&again).await.unwrap();
        assert_clean(&spool).await;
    })
    .await;
}

/// Completions sent at once (on the embedded store, grouped into one
/// DELETE) are each fenced by their own lease: a stale holder next to the
/// current one of the same message is refused, every current one
/// completes once.
#[tokio::test]
async fn completions_sent_together_are_fenced_each_by_its_own_lease() {
    both(async |store| {
        let spool = store.open(2).await;
        for _ in 0..30 {
            enqueue(&spool, 3000).await;
        }
        let mut stale = Vec::new();
        while stale.len() < 30 {
            let got = spool.lease("n1", 30 - stale.len(), Duration::from_secs(1)).await.unwrap();
            assert!(!got.is_empty(), "{} of 30 leased", stale.len());
            stale.extend(got);
        }
        let current = spool.take_over("n2", Duration::ZERO, 30).await.unwrap();
        assert_eq!(current.len(), 30);
        let mut completions = tokio::task::JoinSet::new();
        for (i, lease) in stale.iter().take(10).chain(&current).chain(stale.iter().skip(20)).cloned().enumerate() {
            let spool = spool.clone();
            completions.spawn(async move { (i, spool.complete(&lease).await) });
        }
        let mut results = completions.join_all().await;
        results.sort_by_key(|(i, _)| *i);
        for (i, result) in results {
            let is_stale = !(10..40).contains(&i);
            match (is_stale, result) {
                (true, Err(SpoolError::LeaseLost(_))) | (false, Ok(())) => {}
                (is_stale, other) => panic!("completion {i} (stale: {is_stale}): {other:?}"),
            }
        }
        assert_eq!(spool.stats(false).await.unwrap().messages, 0);
        for lease in &current {
            assert!(lost(spool.complete(lease).await), "completed exactly once");
        }
        assert_clean(&spool).await;
    })
    .await;
}

#[tokio::test]
async fn leases_a_node_does_not_hold_are_reclaimed_at_once_with_a_new_token() {
    both(async |store| {
        let spool = store.open(2).await;
        let (a, b) = (enqueue(&spool, 100).await, enqueue(&spool, 100).await);
        // Two reads ran; the node saw only the first (the second's reply was
        // lost, or the node restarted).
        let mut got = spool.lease("n1", 1, Duration::from_secs(1)).await.unwrap();
        got.extend(spool.lease("n1", 1, Duration::from_secs(1)).await.unwrap());
        let (seen, orphan) = (got.remove(0), got.remove(0));
        let held = std::collections::HashSet::from([seen.entry().clone()]);
        // Not idle for queue.lease: a takeover would not find it yet.
        assert!(spool.take_over("n2", Duration::from_secs(60), 10).await.unwrap().is_empty());
        let reclaimed = spool.reclaim("n1", &held, 10).await.unwrap();
        assert_eq!(reclaimed.iter().map(|l| l.id().clone()).collect::<Vec<_>>(), vec![orphan.id().clone()]);
        assert!([a, b].contains(orphan.id()));
        assert_ne!(reclaimed[0], orphan, "a new token");
        assert!(lost(spool.complete(&orphan).await), "the lost read's token is void");
        spool.complete(&reclaimed[0]).await.unwrap();
        spool.complete(&seen).await.unwrap();
        assert!(spool.reclaim("n1", &held, 10).await.unwrap().is_empty());
        assert_clean(&spool).await;
    })
    .await;
}

#[tokio::test]
async fn a_lease_read_never_takes_more_entries_than_asked() {
    both(async |store| {
        let spool = store.open(4).await;
        for _ in 0..12 {
            enqueue(&spool, 50).await;
        }
        let mut held = Vec::new();
        for want in [1, 1, 3, 2, 5] {
            let got = spool.lease("n1", want, Duration::from_millis(100)).await.unwrap();
            assert!(!got.is_empty() && got.len() <= want, "asked {want}, got {}", got.len());
            held.extend(got);
        }
        assert_eq!(spool.stats(false).await.unwrap().leased, held.len() as u64, "nothing leased behind our back");
        let rest = spool.lease("n1", 100, Duration::from_millis(100)).await.unwrap();
        assert_eq!(held.len() + rest.len(), 12);
    })
    .await;
}

#[tokio::test]
async fn a_commit_whose_first_chunks_vanished_is_refused_and_leaves_nothing() {
    both(async |store| {
        let spool = store.open(1).await;
        let id = QueueId::new();
        let mut body = spool.open_body(&id);
        let all = content(3 * CHUNK + 500);
        for piece in all.chunks(1000) {
            body.write(piece).await.unwrap();
        }
        store.lose_first_chunks(&id).await;
        match body.commit(&envelope(&id)).await {
            Err(SpoolError::BodyMismatch { .. }) => {}
            other => panic!("a body without its start must not commit: {other:?}"),
        }
        assert!(spool.locate(&id).await.unwrap().is_none());
        assert_eq!(spool.stats(false).await.unwrap().messages, 0);
        assert!(spool.lease("n1", 10, Duration::from_millis(100)).await.unwrap().is_empty());
    })
    .await;
}

#[tokio::test]
async fn the_stored_size_is_what_was_written_and_a_short_body_is_an_error() {
    both(async |store| {
        let spool = store.open(1).await;
        let len = 2 * CHUNK + 123;
        let id = enqueue(&spool, len).await;
        let lease = spool.lease("n1", 1, Duration::from_secs(1)).await.unwrap().remove(0);
        let env = spool.envelope(&lease).await.unwrap().unwrap();
        assert_eq!(env.size, len as u64, "the writer's count, not the caller's");
        let read = BodyReader::new(spool.clone(), lease.clone(), env.size, 1000).read_all().await.unwrap();
        assert_eq!(read, content(len));
        store.shorten_body(&id).await;
        match BodyReader::new(spool.clone(), lease.clone(), env.size, 1000).read_all().await {
            Err(SpoolError::BodyMismatch { .. }) => {}
            other => panic!("a short body must be an error: {:?}", other.map(|b| b.len())),
        }
        // Deleted while being read: an error too, never an early end.
        let id2 = enqueue(&spool, len).await;
        let l2 = spool.lease("n1", 1, Duration::from_secs(1)).await.unwrap().remove(0);
        assert_eq!(*l2.id(), id2);
        let mut reader = BodyReader::new(spool.clone(), l2.clone(), len as u64, 1000);
        assert!(reader.next_chunk().await.unwrap().is_some());
        assert!(spool.admin(&id2, AdminAction::Delete).await.unwrap());
        assert!(matches!(reader.next_chunk().await, Err(SpoolError::BodyMismatch { .. })));
        assert!(lost(spool.complete(&l2).await), "a deleted message voids its lease");
    })
    .await;
}

#[tokio::test]
async fn held_while_leased_stays_held_and_release_or_bounce_never_add_an_entry() {
    both(async |store| {
        let spool = store.open(2).await;
        let id = enqueue(&spool, 100).await;
        let lease = spool.lease("n1", 1, Duration::from_secs(1)).await.unwrap().remove(0);
        assert!(spool.admin(&id, AdminAction::Hold).await.unwrap());
        // The holder sees the flag and skips: the message is held, not looping.
        assert!(spool.envelope(&lease).await.unwrap().unwrap().held);
        spool.skip(&lease).await.unwrap();
        assert_eq!(spool.stats(false).await.unwrap().held, 1);
        assert!(spool.lease("n1", 10, Duration::from_millis(200)).await.unwrap().is_empty());
        assert_clean(&spool).await;
        assert!(spool.admin(&id, AdminAction::Release).await.unwrap());
        assert!(!spool.admin(&id, AdminAction::Release).await.unwrap(), "released once");
        assert!(spool.admin(&id, AdminAction::Bounce).await.unwrap());
        assert_clean(&spool).await;
        let again = spool.lease("n1", 10, Duration::from_secs(1)).await.unwrap();
        assert_eq!(again.len(), 1, "one live entry: {again:?}");
        // Held, released and bounced while leased: still that one entry.
        assert!(spool.admin(&id, AdminAction::Hold).await.unwrap());
        assert!(spool.admin(&id, AdminAction::Release).await.unwrap(), "a leased held message can be released");
        assert!(spool.admin(&id, AdminAction::Bounce).await.unwrap());
        assert_clean(&spool).await;
        assert!(spool.lease("n2", 10, Duration::from_millis(200)).await.unwrap().is_empty());
        let env = spool.envelope(&again[0]).await.unwrap().unwrap();
        assert!(env.bounce_requested && !env.held);
        spool.complete(&again[0]).await.unwrap();
        assert_eq!(spool.stats(false).await.unwrap().messages, 0);
    })
    .await;
}

#[tokio::test]
async fn the_destination_index_holds_deferred_messages_only() {
    both(async |store| {
        let spool = store.open(2).await;
        let id = enqueue(&spool, 100).await;
        let defer = async |spool: &Arc<dyn Spool>| {
            let l = spool.lease("n1", 1, Duration::from_secs(1)).await.unwrap().remove(0);
            let env = spool.envelope(&l).await.unwrap().unwrap();
            spool.defer(&l, &env, chrono::Utc::now().timestamp_millis() + 60_000, &[DEST.into()]).await.unwrap();
        };
        defer(&spool).await;
        assert_eq!(spool.deferred_destinations().await.unwrap(), vec![DEST.to_string()]);
        assert_eq!(spool.schedule_due(i64::MAX, 100).await.unwrap(), 1);
        assert!(spool.deferred_destinations().await.unwrap().is_empty(), "due again: out of the index");
        defer(&spool).await;
        assert_eq!(spool.release(DEST, 10).await.unwrap(), 1);
        assert!(spool.deferred_destinations().await.unwrap().is_empty(), "released: out of the index");
        defer(&spool).await;
        assert!(spool.admin(&id, AdminAction::Hold).await.unwrap());
        assert!(spool.deferred_destinations().await.unwrap().is_empty(), "held: out of the index");
        assert!(spool.admin(&id, AdminAction::Delete).await.unwrap());
        assert_eq!(spool.stats(true).await.unwrap().deferred_by_destination, vec![]);
        assert_clean(&spool).await;
    })
    .await;
}

#[tokio::test]
async fn an_unreadable_envelope_is_held_and_removed_after_the_queue_lifetime() {
    both(async |store| {
        let spool = store.open(1).await;
        let id = enqueue(&spool, 100).await;
        store.corrupt_envelope(&id).await;
        let lease = spool.lease("n1", 1, Duration::from_secs(1)).await.unwrap().remove(0);
        assert!(matches!(spool.envelope(&lease).await, Err(SpoolError::Corrupt(_))));
        spool.quarantine(&lease).await.unwrap();
        assert_eq!(spool.stats(false).await.unwrap().held, 1);
        assert!(spool.lease("n1", 1, Duration::from_millis(200)).await.unwrap().is_empty(), "not retried");
        let kept = spool.maintain("n1", Duration::from_secs(3600)).await.unwrap();
        assert_eq!(kept.corrupt_removed, 0, "younger than the lifetime");
        let removed = spool.maintain("n1", Duration::ZERO).await.unwrap();
        assert_eq!(removed.corrupt_removed, 1);
        assert_eq!(spool.stats(false).await.unwrap().messages, 0);
    })
    .await;
}

#[tokio::test]
async fn takeover_reaches_idle_entries_behind_many_busy_ones() {
    both(async |store| {
        let spool = store.open(1).await;
        let mut ids = Vec::new();
        for _ in 0..40 {
            ids.push(enqueue(&spool, 20).await);
        }
        let leases: Vec<Lease> = spool.lease("n1", 40, Duration::from_secs(1)).await.unwrap();
        assert_eq!(leases.len(), 40);
        tokio::time::sleep(Duration::from_millis(700)).await;
        // The oldest 35 are being worked on; the newest 5 are abandoned.
        let mut by_arrival = leases.clone();
        by_arrival.sort_by_key(|l| ids.iter().position(|id| id == l.id()));
        for l in &by_arrival[..35] {
            spool.renew(l).await.unwrap();
        }
        let mut taken = Vec::new();
        for _ in 0..5 {
            taken.extend(spool.take_over("n2", Duration::from_millis(500), 1).await.unwrap());
        }
        let idle: Vec<&QueueId> = by_arrival[35..].iter().map(|l| l.id()).collect();
        assert_eq!(taken.len(), 5, "{taken:?}");
        assert!(taken.iter().all(|l| idle.contains(&l.id())), "only abandoned entries are taken: {taken:?}");
    })
    .await;
}

/// A private Redis, for the tests that flush or pause it.
fn private_spool(redis: &RedisServer, env: impl FnOnce(&mut QueueConfig)) -> Arc<dyn Spool> {
    let mut config = QueueConfig {
        url: redis.url(),
        prefix: "mxr".into(),
        shards: 2,
        chunk_size: CHUNK,
        lease: Duration::from_secs(1),
        timeout: Duration::from_secs(1),
        ..QueueConfig::default()
    };
    env(&mut config);
    mxrelay::spool::open(&config).unwrap()
}

fn redis_cmd(redis: &RedisServer, args: &[&str]) -> redis::Value {
    let mut conn = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut conn).unwrap()
}

#[tokio::test]
async fn redis_that_lost_its_data_is_read_again_without_a_restart() {
    let redis = RedisServer::start();
    let spool = private_spool(&redis, |_| {});
    spool.prepare().await.unwrap();
    let before = enqueue(&spool, 100).await;
    redis_cmd(&redis, &["FLUSHALL"]);
    // Nothing read yet since the loss: every read path finds the group missing.
    spool.ping().await.expect("ping recreates the group");
    redis_cmd(&redis, &["FLUSHALL"]);
    let s = spool.stats(false).await.expect("stats recreates the group");
    assert_eq!(s.messages, 0);
    redis_cmd(&redis, &["FLUSHALL"]);
    // A stream made by a bare XADD, as a commit of the old code did.
    redis_cmd(&redis, &["XADD", "mxr:{q0}:ready", "*", "id", "stray"]);
    assert!(spool.lease("n1", 10, Duration::from_millis(200)).await.is_ok(), "lease recreates the group");
    redis_cmd(&redis, &["FLUSHALL"]);
    let after = enqueue(&spool, 100).await;
    let got = spool.lease("n1", 10, Duration::from_secs(1)).await.unwrap();
    assert_eq!(got.iter().map(|l| l.id()).collect::<Vec<_>>(), vec![&after]);
    assert!(spool.locate(&before).await.unwrap().is_none(), "lost with the data, as expected");
    spool.complete(&got[0]).await.unwrap();
}

#[tokio::test]
async fn a_commit_whose_reply_was_lost_is_found_queued_once() {
    let redis = RedisServer::start();
    let proxy = crate::support::proxy::Proxy::start(&format!("127.0.0.1:{}", redis.port));
    let spool = private_spool(&redis, |c| c.url = format!("redis://{}/", proxy.addr()));
    spool.prepare().await.unwrap();
    enqueue(&spool, 10).await; // the scripts are loaded
    let id = QueueId::new();
    let mut body = spool.open_body(&id);
    body.write(b"Subject: late\r\n\r\nbody\r\n").await.unwrap();
    // The commit runs, its reply does not come within queue.timeout (1 s):
    // the node must find out that it landed rather than answer 451, and
    // count it for the operator.
    let recovered = || mxrelay::metrics::METRICS.queue_commits_recovered.get();
    let before = recovered();
    proxy.hold_replies();
    let healer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        proxy.heal();
        proxy
    });
    body.commit(&envelope(&id)).await.expect("landed, so 250");
    assert_eq!(recovered(), before + 1, "mxrelay_queue_commits_recovered_total");
    let _proxy = healer.await.unwrap();
    let s = spool.stats(false).await.unwrap();
    assert_eq!((s.messages, s.ready), (2, 2), "queued once");
    assert!(spool.locate(&id).await.unwrap().is_some());
}

#[tokio::test]
async fn a_commit_that_reaches_redis_after_its_deadline_is_refused() {
    let redis = RedisServer::start();
    let spool = private_spool(&redis, |_| {});
    spool.prepare().await.unwrap();
    enqueue(&spool, 10).await;
    let id = QueueId::new();
    let mut body = spool.open_body(&id);
    body.write(b"Subject: held up\r\n\r\nbody\r\n").await.unwrap();
    // Writes wait 1.7 s, beyond the commit's deadline (queue.timeout, 1 s):
    // the writer gives up, and the commit must not land after its 451.
    redis_cmd(&redis, &["CLIENT", "PAUSE", "1700", "WRITE"]);
    assert!(body.commit(&envelope(&id)).await.is_err());
    redis_cmd(&redis, &["SET", "after-the-pause", "1"]); // a write: returns once the pause is over
    assert!(spool.locate(&id).await.unwrap().is_none(), "a refused commit landed later");
    assert_eq!(spool.stats(false).await.unwrap().messages, 1);
}

#[tokio::test]
async fn half_committed_messages_and_gone_consumers_are_cleaned_up() {
    let redis = RedisServer::start();
    let spool = private_spool(&redis, |_| {});
    spool.prepare().await.unwrap();
    // A replicated commit that crashed between its two phases, 10 min ago.
    let old = chrono::Utc::now().timestamp_millis() - 600_000;
    redis_cmd(&redis, &["HSET", "mxr:{q0}:msg:gone", "id", "gone", "staged", "1"]);
    redis_cmd(&redis, &["SET", "mxr:{q0}:body:gone", "x"]);
    redis_cmd(&redis, &["ZADD", "mxr:{q0}:staged", &old.to_string(), "gone"]);
    // A node that ran once and is gone for good, and one that owns an entry.
    enqueue(&spool, 10).await;
    enqueue(&spool, 10).await;
    let _kept = spool.lease("busy", 1, Duration::from_secs(1)).await.unwrap();
    for shard in ["mxr:{q0}:ready", "mxr:{q1}:ready"] {
        redis_cmd(&redis, &["XGROUP", "CREATECONSUMER", shard, "delivery", "gone-pod"]);
    }
    tokio::time::sleep(Duration::from_millis(10_500)).await; // 10 × queue.lease idle
    let done = spool.maintain("me", Duration::from_secs(86400)).await.unwrap();
    assert_eq!(done.staged_removed, 1);
    assert_eq!(redis_cmd(&redis, &["EXISTS", "mxr:{q0}:msg:gone", "mxr:{q0}:body:gone"]), redis::Value::Int(0));
    let consumers = |shard: &str| format!("{:?}", redis_cmd(&redis, &["XINFO", "CONSUMERS", shard, "delivery"]));
    let all = consumers("mxr:{q0}:ready") + &consumers("mxr:{q1}:ready");
    assert!(!all.contains("gone-pod"), "{all}");
    assert!(all.contains("busy"), "a consumer that owns an entry stays: {all}");
    assert!(done.consumers_pruned >= 2, "{done:?}");
}

#[tokio::test]
async fn wait_for_replicas_has_its_own_connection_and_refused_mail_is_withdrawn() {
    let primary = RedisServer::start();
    let mut replica = RedisServer::replica_of(&primary);
    let spool = private_spool(&primary, |c| {
        c.min_replicas_ack = 1;
        c.replicas_ack_timeout = Duration::from_secs(5);
    });
    spool.prepare().await.unwrap();
    wait_until("replica in sync", Duration::from_secs(20), || {
        format!("{:?}", redis_cmd(&primary, &["INFO", "replication"])).contains("state=online")
    });
    let id = enqueue(&spool, 100).await;
    assert!(spool.locate(&id).await.unwrap().is_some());
    replica.stop();
    wait_until("replica gone", Duration::from_secs(20), || {
        format!("{:?}", redis_cmd(&primary, &["INFO", "replication"])).contains("connected_slaves:0")
    });
    let commits: Vec<_> = (0..10)
        .map(|_| {
            let spool = spool.clone();
            tokio::spawn(async move {
                let id = QueueId::new();
                let mut body = spool.open_body(&id);
                body.write(b"Subject: x\r\n\r\ny\r\n").await.unwrap();
                body.commit(&envelope(&id)).await
            })
        })
        .collect();
    // While ten commits wait for a replica (blocked in WAIT, as Redis counts
    // them), the rest of the node's traffic does not wait behind them.
    let blocked = || {
        let info = format!("{:?}", redis_cmd(&primary, &["INFO", "clients"]));
        info.split("blocked_clients:")
            .nth(1)
            .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next()?.parse::<u32>().ok())
    };
    // (Polled with an async sleep: the commits run on this runtime.)
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    while blocked() != Some(10) {
        assert!(std::time::Instant::now() < deadline, "ten commits never waited for the replica: {:?}", blocked());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    spool.ping().await.unwrap();
    spool.stats(false).await.unwrap();
    assert_eq!(blocked(), Some(10), "the commits are still waiting for their replica");
    assert!(commits.iter().all(|c| !c.is_finished()), "the commits are still waiting for their replica");
    for c in commits {
        assert!(matches!(c.await.unwrap(), Err(SpoolError::NotReplicated { wanted: 1, got: 0 })));
    }
    // Nothing refused is left to deliver.
    let s = spool.stats(false).await.unwrap();
    assert_eq!((s.messages, s.ready), (1, 1), "{s:?}");
    let audit = spool.audit().await.unwrap();
    assert!(audit.is_clean() && audit.messages == 1, "{audit:?}");
}

/// An embedded queue written before the one envelope codec (the serde form:
/// recipients as an array, flags as booleans, `bounce_requested`) is read
/// after the upgrade: migration 0005 turns its rows into the fields, flags
/// included, and the message is delivered as before.
#[tokio::test]
async fn an_embedded_queue_from_before_the_one_codec_is_converted_on_open() {
    let store = Store::sqlite();
    let Store::Sqlite { url, .. } = &store else { unreachable!() };
    let spool = store.open(1).await;
    let id = enqueue(&spool, 100).await;
    let mut old = envelope(&id);
    (old.size, old.attempts, old.held, old.bounce_requested) = (100, 2, true, true);
    old.recipients[0].last_reply = Some("451 4.3.0 \"later\"".into());
    // The row as the earlier version wrote it, and migration 0005 not run.
    let pool = sqlx::SqlitePool::connect(url).await.unwrap();
    sqlx::query("UPDATE queue_messages SET envelope = ?, state = 'held' WHERE id = ?")
        .bind(serde_json::to_string(&old).unwrap())
        .bind(id.as_str())
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 5").execute(&pool).await.unwrap();
    let reopened = store.open(1).await;
    let form: String = sqlx::query_scalar("SELECT json_type(envelope, '$.recipients') FROM queue_messages")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(form, "text", "recipients are a field (JSON text) now");
    pool.close().await;
    let listed = reopened.list().await.unwrap();
    assert_eq!(listed, vec![(old.clone(), mxrelay::spool::MessageState::Held)]);
    // Released, it is leased with both flags read back as they were.
    assert!(reopened.admin(&id, AdminAction::Release).await.unwrap());
    let lease = reopened.lease("n1", 1, Duration::from_secs(1)).await.unwrap().remove(0);
    let env = reopened.envelope(&lease).await.unwrap().unwrap();
    assert!(env.bounce_requested && !env.held, "{env:?}");
    assert_eq!((env.attempts, env.recipients.clone()), (old.attempts, old.recipients.clone()));
    reopened.complete(&lease).await.unwrap();
    assert_clean(&reopened).await;
}
