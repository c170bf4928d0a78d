//! Receiving into the embedded store: a body written in chunks (rows of
//! `queue_bodies`), then one commit, grouped with the others waiting.
//!
//! Group commit: one writer task per store takes every commit that is
//! waiting when it is free, and stores them all in one transaction, so one
//! fsync (WAL, `synchronous = FULL`) answers many sessions: the chunks
//! written earlier are checked first (a message missing some fails alone,
//! with nothing of it written), then every last piece and every message
//! row go in with one INSERT each. A session gets `Ok` only after the
//! transaction holding its message is on disk.
//!
//! Chunks are written without waiting for an fsync (the `quick` pool,
//! `synchronous = NORMAL`): they mean nothing until their message commits,
//! and that commit's fsync of the WAL makes them durable too.

use sqlx::sqlite::SqlitePool;

use super::failed;
use super::group::Group;
use crate::metrics::METRICS;
use crate::spool::{Envelope, QueueId, SpoolBody, SpoolError};

/// One message's commit, handed to the writer.
pub(super) struct Pending {
    id: QueueId,
    envelope: String,
    received_at: i64,
    size: u64,
    /// The last piece, not written as a chunk yet, and where it starts.
    tail: Vec<u8>,
    offset: u64,
}

/// The handle sessions commit through.
pub(super) type GroupCommit = Group<Pending>;

/// Starts the writer of received messages on `pool` (the store's durable one).
pub(super) fn start_commits(pool: SqlitePool) -> GroupCommit {
    Group::start("enqueue", move |group: Vec<Pending>| {
        let pool = pool.clone();
        async move {
            METRICS.queue_group_commit_messages.observe(group.len() as f64);
            store_group(&pool, &group).await
        }
    })
}

/// One transaction for `group`: a result per message, `Ok` only once the
/// transaction is committed.
async fn store_group(pool: &SqlitePool, group: &[Pending]) -> Vec<Result<(), SpoolError>> {
    let all_failed = |e: &dyn std::fmt::Display| group.iter().map(|_| Err(failed("enqueue", e))).collect();
    let mut tx = match pool.begin().await {
        Ok(tx) => tx,
        Err(e) => return all_failed(&e),
    };
    let mut results = Vec::with_capacity(group.len());
    for pending in group {
        results.push(match pending.offset {
            0 => Ok(()),
            _ => earlier_chunks(&mut tx, pending).await,
        });
    }
    let good: Vec<&Pending> = group.iter().zip(&results).filter(|(_, r)| r.is_ok()).map(|(p, _)| p).collect();
    if let Err(e) = insert(&mut tx, &good).await {
        return all_failed(&e);
    }
    match tx.commit().await {
        Ok(()) => results,
        Err(e) => all_failed(&e),
    }
}

/// The chunks written before the commit hold exactly the bytes before the
/// last piece: the store never holds less than was written.
async fn earlier_chunks(tx: &mut sqlx::SqliteConnection, p: &Pending) -> Result<(), SpoolError> {
    let stored: i64 = sqlx::query_scalar("SELECT COALESCE(SUM(length(data)), 0) FROM queue_bodies WHERE id = ?")
        .bind(p.id.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| failed("enqueue", e))?;
    if stored as u64 != p.offset {
        METRICS.queue_errors.with_label_values(&["short_body"]).inc();
        let found = stored as u64 + p.tail.len() as u64;
        return Err(SpoolError::BodyMismatch { id: p.id.clone(), expected: p.size, found });
    }
    Ok(())
}

/// Every last piece, then every message row, one INSERT each.
async fn insert(tx: &mut sqlx::SqliteConnection, group: &[&Pending]) -> Result<(), sqlx::Error> {
    let tails: Vec<&&Pending> = group.iter().filter(|p| !p.tail.is_empty()).collect();
    if !tails.is_empty() {
        sqlx::QueryBuilder::new("INSERT INTO queue_bodies (id, offset, data) ")
            .push_values(tails, |mut row, p| {
                row.push_bind(p.id.as_str()).push_bind(p.offset as i64).push_bind(p.tail.as_slice());
            })
            .build()
            .execute(&mut *tx)
            .await?;
    }
    if !group.is_empty() {
        sqlx::QueryBuilder::new("INSERT INTO queue_messages (id, envelope, received_at, state) ")
            .push_values(group, |mut row, p| {
                row.push_bind(p.id.as_str()).push_bind(p.envelope.as_str()).push_bind(p.received_at).push_bind("ready");
            })
            .build()
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

async fn write_chunk(
    exec: impl sqlx::SqliteExecutor<'_>,
    id: &QueueId,
    offset: u64,
    data: &[u8],
) -> Result<(), SpoolError> {
    sqlx::query("INSERT INTO queue_bodies (id, offset, data) VALUES (?, ?, ?)")
        .bind(id.as_str())
        .bind(offset as i64)
        .bind(data)
        .execute(exec)
        .await
        .map_err(|e| failed("append", e))?;
    Ok(())
}

pub(super) struct SqliteBody {
    /// For chunks and their removal (`synchronous = NORMAL`).
    quick: SqlitePool,
    commits: GroupCommit,
    id: QueueId,
    buf: Vec<u8>,
    /// Bytes already written as chunks.
    flushed: u64,
    chunk: usize,
    finished: bool,
}

impl SqliteBody {
    pub(super) fn new(quick: SqlitePool, commits: GroupCommit, id: QueueId, chunk: usize) -> SqliteBody {
        SqliteBody { quick, commits, id, buf: Vec::new(), flushed: 0, chunk, finished: false }
    }

    async fn remove_chunks(&self) {
        let _ = sqlx::query("DELETE FROM queue_bodies WHERE id = ?").bind(self.id.as_str()).execute(&self.quick).await;
    }
}

#[async_trait::async_trait]
impl SpoolBody for SqliteBody {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), SpoolError> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= self.chunk {
            write_chunk(&self.quick, &self.id, self.flushed, &self.buf).await?;
            self.flushed += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    fn written(&self) -> u64 {
        self.flushed + self.buf.len() as u64
    }

    async fn commit(mut self: Box<Self>, env: &Envelope) -> Result<(), SpoolError> {
        let started = std::time::Instant::now();
        let size = self.written();
        let envelope = Envelope { size, ..env.clone() }.to_json().map_err(|e| failed("enqueue", e))?;
        let pending = Pending {
            id: self.id.clone(),
            envelope,
            received_at: env.received_at,
            size,
            tail: std::mem::take(&mut self.buf),
            offset: self.flushed,
        };
        let result = self.commits.submit(pending).await;
        self.finished = true;
        match &result {
            Ok(()) => METRICS.queue_enqueue_seconds.observe(started.elapsed().as_secs_f64()),
            Err(_) => self.remove_chunks().await,
        }
        result
    }

    async fn abort(mut self: Box<Self>) {
        self.finished = true;
        self.remove_chunks().await;
    }
}

impl Drop for SqliteBody {
    /// A session cut mid-transfer: its chunks are removed (best effort;
    /// the start-up sweep is the fallback).
    fn drop(&mut self) {
        if self.finished || self.flushed == 0 {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (pool, id) = (self.quick.clone(), self.id.to_string());
            runtime.spawn(async move {
                let _ = sqlx::query("DELETE FROM queue_bodies WHERE id = ?").bind(id).execute(&pool).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::QueueConfig;
    use crate::spool::sqlite::SqliteSpool;
    use crate::spool::{Admin, Enqueue, Recipient, RecipientState};

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
            received_at: 0,
            size: 0,
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

    /// A new store in a temporary directory (gone with the `TempDir`), in
    /// chunks of 1 KiB.
    async fn temp_spool() -> (tempfile::TempDir, std::sync::Arc<SqliteSpool>) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("q.db").display());
        let spool = std::sync::Arc::new(
            SqliteSpool::connect(&QueueConfig { url, chunk_size: 1024, ..Default::default() }).unwrap(),
        );
        spool.prepare().await.unwrap();
        (dir, spool)
    }

    /// Sessions committing at once share one transaction, and one message
    /// whose chunks went missing fails alone.
    #[tokio::test]
    async fn waiting_commits_share_one_transaction_and_a_short_body_fails_alone() {
        let (_dir, spool) = temp_spool().await;
        let mut bodies = Vec::new();
        for i in 0..40 {
            let id = QueueId::new();
            let mut body = spool.open_body(&id);
            body.write(&vec![b'a' + (i % 26) as u8; if i == 7 { 3000 } else { 500 }]).await.unwrap();
            bodies.push((id, body));
        }
        // Message 7's chunks (1024 bytes each) vanish before its commit.
        sqlx::query("DELETE FROM queue_bodies WHERE id = ?")
            .bind(bodies[7].0.as_str())
            .execute(&spool.pool)
            .await
            .unwrap();
        let groups_before = METRICS.queue_group_commit_messages.get_sample_count();
        let mut commits = tokio::task::JoinSet::new();
        for (i, (id, body)) in bodies.into_iter().enumerate() {
            commits.spawn(async move { (i, body.commit(&envelope(&id)).await) });
        }
        let mut results = commits.join_all().await;
        results.sort_by_key(|(i, _)| *i);
        for (i, result) in &results {
            match (i, result) {
                (7, Err(SpoolError::BodyMismatch { expected: 3000, found: 0, .. })) => {}
                (7, other) => panic!("the short body: {other:?}"),
                (_, other) => assert!(other.is_ok(), "{i}: {other:?}"),
            }
        }
        assert_eq!(spool.stats(false).await.unwrap().messages, 39);
        let groups = METRICS.queue_group_commit_messages.get_sample_count() - groups_before;
        assert_eq!(groups, 1, "every commit waiting at once went into one transaction");
    }

    /// Completions waiting at once go into one DELETE, fenced lease by
    /// lease: in the same group as the current holder, a stale holder of
    /// the same message is refused, and each completed message's chunks go
    /// with it.
    #[tokio::test]
    async fn grouped_completions_are_fenced_lease_by_lease() {
        use crate::spool::Deliver;
        let (_dir, spool) = temp_spool().await;
        // Stored directly, not committed: the commit test counts every
        // group commit of this process.
        for _ in 0..30 {
            let id = QueueId::new();
            let mut tx = spool.pool.begin().await.unwrap();
            for (offset, data) in [(0i64, [b'x'; 2048].as_slice()), (2048, [b'y'; 952].as_slice())] {
                write_chunk(&mut *tx, &id, offset as u64, data).await.unwrap();
            }
            insert(
                &mut tx,
                &[&Pending {
                    id: id.clone(),
                    envelope: envelope(&id).to_json().unwrap(),
                    received_at: 0,
                    size: 3000,
                    tail: Vec::new(),
                    offset: 3000,
                }],
            )
            .await
            .unwrap();
            tx.commit().await.unwrap();
        }
        let stale = spool.lease("node", 30, std::time::Duration::ZERO).await.unwrap();
        assert_eq!(stale.len(), 30);
        // The same node takes its own entries over: new generations.
        let current = spool.take_over("node", std::time::Duration::ZERO, 30).await.unwrap();
        assert_eq!(current.len(), 30);
        let mut completions = tokio::task::JoinSet::new();
        for (i, lease) in stale.iter().take(10).chain(&current).cloned().enumerate() {
            let spool = spool.clone();
            completions.spawn(async move { (i, spool.complete(&lease).await) });
        }
        let mut results = completions.join_all().await;
        results.sort_by_key(|(i, _)| *i);
        for (i, result) in results {
            match (i < 10, result) {
                (true, Err(SpoolError::LeaseLost(_))) | (false, Ok(())) => {}
                (stale, other) => panic!("completion {i} (stale: {stale}): {other:?}"),
            }
        }
        assert_eq!(spool.stats(false).await.unwrap().messages, 0);
        let chunks: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM queue_bodies").fetch_one(&spool.pool).await.unwrap();
        assert_eq!(chunks, 0, "the chunks went with their messages");
    }
}
