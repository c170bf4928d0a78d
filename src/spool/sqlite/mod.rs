//! The embedded queue: one SQLite database (WAL), for a single node without
//! Redis. Received messages commit with `synchronous = FULL`, grouped
//! (`body.rs`: one transaction and one fsync for every session waiting),
//! so a message is on disk before 250. Delivery's bookkeeping (leases,
//! completions, deferrals) commits with `synchronous = NORMAL`, without an
//! fsync of its own, and the completions waiting at one moment go in one
//! DELETE (`group.rs`). A power loss may undo the last of that bookkeeping,
//! which delivers a message again (a duplicate, as a crash between 250 and
//! the ack can), never loses one, and the next received commit's fsync of
//! the WAL makes it durable too. Same semantics as the Redis back end:
//! bodies written in chunks and counted before the commit (orphans removed
//! at start), one row per message (so never two live entries), leases
//! fenced by owner and generation, expiry and takeover, deferred with due
//! times, a per-destination index kept to deferred messages,
//! hold/release/bounce/delete, quarantine.

use std::str::FromStr;
use std::time::Duration;

use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

mod body;
mod group;
mod verdicts;

use body::{GroupCommit, SqliteBody};
use group::Group;

use super::{
    Admin, AdminAction, Deliver, Enqueue, Entry, Envelope, Lease, Maintenance, MessageState, QueueAudit, QueueId,
    QueueStats, Read, SpoolBody, SpoolError,
};
use crate::config::QueueConfig;
use crate::metrics::METRICS;

/// How often a blocked `lease` looks for new entries.
const POLL: Duration = Duration::from_millis(50);
/// A statement that applies only to the current lease: its binds end with
/// id, owner and generation.
macro_rules! fenced_sql {
    ($sql:literal) => {
        concat!($sql, " WHERE id = ? AND lease_owner = ? AND generation = ?")
    };
}

pub struct SqliteSpool {
    /// `synchronous = FULL`: received messages' commits, operators' changes.
    pool: SqlitePool,
    /// `synchronous = NORMAL`: delivery's bookkeeping and body chunks.
    quick: SqlitePool,
    /// The writer of received messages, started with the first body.
    commits: std::sync::OnceLock<GroupCommit>,
    /// Delivery's completions, grouped into one DELETE, started with the
    /// first.
    completions: std::sync::OnceLock<Group<Lease>>,
    config: QueueConfig,
    /// Migrations ran (at start, or on first use if the file was not
    /// writable then).
    prepared: tokio::sync::OnceCell<()>,
}

fn failed(op: &'static str, e: impl std::fmt::Display) -> SpoolError {
    METRICS.queue_errors.with_label_values(&[op]).inc();
    SpoolError::Unavailable(format!("{op}: {e}"))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn lease_of(id: String, owner: &str, generation: i64) -> Lease {
    // One row per message: the id names its one live entry.
    Lease::new(QueueId::from(id.clone()), 0, id, owner, generation as u64)
}

fn fenced(lease: &Lease, rows: u64) -> Result<(), SpoolError> {
    if rows == 0 { Err(SpoolError::LeaseLost(lease.id.clone())) } else { Ok(()) }
}

fn decode(envelope: &str, state: &str, due: i64) -> Option<(Envelope, MessageState)> {
    let env = Envelope::from_json(envelope)?;
    // Held while leased counts as held, as on Redis.
    let state = match state {
        _ if env.held => MessageState::Held,
        "held" | "corrupt" => MessageState::Held,
        "deferred" => MessageState::Deferred { due },
        _ => MessageState::Active,
    };
    Some((env, state))
}

impl SqliteSpool {
    pub fn connect(config: &QueueConfig) -> Result<SqliteSpool, SpoolError> {
        crate::domains::sqlite::ensure_dir(&config.url).map_err(|e| failed("connect", e))?;
        let options = SqliteConnectOptions::from_str(&config.url)
            .map_err(|e| failed("connect", e))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(config.timeout);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(config.timeout)
            .connect_lazy_with(options.clone());
        let quick = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(config.timeout)
            .connect_lazy_with(options.synchronous(SqliteSynchronous::Normal));
        Ok(SqliteSpool {
            pool,
            quick,
            commits: std::sync::OnceLock::new(),
            completions: std::sync::OnceLock::new(),
            config: config.clone(),
            prepared: tokio::sync::OnceCell::new(),
        })
    }

    async fn ready(&self) -> Result<(), SpoolError> {
        self.prepared
            .get_or_try_init(|| async {
                crate::domains::sqlite::MIGRATOR.run(&self.pool).await.map_err(|e| failed("prepare", e))
            })
            .await
            .map(|_| ())
    }

    /// Runs a statement fenced by `lease` (its binds end with the fence).
    async fn fenced_update(&self, op: &'static str, sql: &'static str, lease: &Lease) -> Result<(), SpoolError> {
        let done = sqlx::query(sql)
            .bind(lease.id.as_str())
            .bind(&lease.owner)
            .bind(lease.generation as i64)
            .execute(&self.quick)
            .await
            .map_err(|e| failed(op, e))?;
        fenced(lease, done.rows_affected())
    }

    fn lease_until(&self) -> i64 {
        now_ms() + self.config.lease.as_millis() as i64
    }
}

/// Starts the writer of delivery's completions on `quick`.
fn start_completions(quick: SqlitePool) -> Group<Lease> {
    Group::start("complete", move |leases: Vec<Lease>| {
        let quick = quick.clone();
        async move { complete_group(&quick, &leases).await }
    })
}

/// Completes every lease of `leases` that is still current, in one DELETE
/// (fenced row by row: id, owner and generation must all match); the
/// others lost theirs. Each message's chunks and index rows go with it
/// (trigger `queue_messages_gone`).
async fn complete_group(quick: &SqlitePool, leases: &[Lease]) -> Vec<Result<(), SpoolError>> {
    let mut query = sqlx::QueryBuilder::new("DELETE FROM queue_messages WHERE rowid IN (SELECT m.rowid FROM (");
    query.push_values(leases, |mut row, lease| {
        row.push_bind(lease.id.as_str()).push_bind(lease.owner.as_str()).push_bind(lease.generation as i64);
    });
    // A join, so that each row is found by its id's index (a row-value IN
    // would scan the table).
    query.push(
        ") AS v JOIN queue_messages m ON m.id = v.column1 AND m.lease_owner = v.column2 \
         AND m.generation = v.column3) RETURNING id, lease_owner, generation",
    );
    match query.build_query_as::<(String, String, i64)>().fetch_all(quick).await {
        Ok(gone) => {
            // By the whole lease: a stale holder of the same message in
            // the same group is answered LeaseLost.
            let gone: std::collections::HashSet<(String, String, i64)> = gone.into_iter().collect();
            leases
                .iter()
                .map(|l| {
                    let key = (l.id.to_string(), l.owner.clone(), l.generation as i64);
                    fenced(l, u64::from(gone.contains(&key)))
                })
                .collect()
        }
        Err(e) => leases.iter().map(|_| Err(failed("complete", &e))).collect(),
    }
}

/// Removes the destination index rows of `ids` (they left the deferred state).
async fn unindex(tx: &mut sqlx::SqliteConnection, ids: &[String]) -> Result<(), sqlx::Error> {
    for id in ids {
        sqlx::query("DELETE FROM queue_destinations WHERE id = ?").bind(id).execute(&mut *tx).await?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl Enqueue for SqliteSpool {
    fn open_body(&self, id: &QueueId) -> Box<dyn SpoolBody> {
        let commits = self.commits.get_or_init(|| body::start_commits(self.pool.clone())).clone();
        Box::new(SqliteBody::new(self.quick.clone(), commits, id.clone(), self.config.chunk_size))
    }

    async fn release(&self, destination: &str, limit: usize) -> Result<usize, SpoolError> {
        let mut tx = self.quick.begin().await.map_err(|e| failed("release", e))?;
        let ids: Vec<String> = sqlx::query_scalar(
            "UPDATE queue_messages SET state = 'ready' WHERE state = 'deferred' AND id IN \
             (SELECT id FROM queue_destinations WHERE destination = ? LIMIT ?) RETURNING id",
        )
        .bind(destination)
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| failed("release", e))?;
        unindex(&mut tx, &ids).await.map_err(|e| failed("release", e))?;
        tx.commit().await.map_err(|e| failed("release", e))?;
        Ok(ids.len())
    }
}

#[async_trait::async_trait]
impl Read for SqliteSpool {
    async fn envelope(&self, lease: &Lease) -> Result<Option<Envelope>, SpoolError> {
        let row = sqlx::query("SELECT envelope, generation FROM queue_messages WHERE id = ?")
            .bind(lease.id.as_str())
            .fetch_optional(&self.quick)
            .await
            .map_err(|e| failed("load", e))?;
        let Some(row) = row else { return Ok(None) };
        if !lease.entry.id.is_empty() && row.get::<i64, _>(1) != lease.generation as i64 {
            return Ok(None);
        }
        Envelope::from_json(row.get::<&str, _>(0)).map(Some).ok_or_else(|| SpoolError::Corrupt(lease.id.clone()))
    }

    async fn envelope_and_start(&self, lease: &Lease, len: usize) -> Result<Option<(Envelope, Vec<u8>)>, SpoolError> {
        // One statement: the envelope and the body's first chunk row.
        let row = sqlx::query(
            "SELECT m.envelope, m.generation, b.data FROM queue_messages m \
             LEFT JOIN queue_bodies b ON b.id = m.id AND b.offset = 0 WHERE m.id = ?",
        )
        .bind(lease.id.as_str())
        .fetch_optional(&self.quick)
        .await
        .map_err(|e| failed("load", e))?;
        let Some(row) = row else { return Ok(None) };
        if !lease.entry.id.is_empty() && row.get::<i64, _>(1) != lease.generation as i64 {
            return Ok(None);
        }
        let env = Envelope::from_json(row.get::<&str, _>(0)).ok_or_else(|| SpoolError::Corrupt(lease.id.clone()))?;
        let want = len.min(env.size as usize);
        let first: Option<Vec<u8>> = row.get(2);
        let start = match first {
            Some(mut data) if data.len() >= want => {
                data.truncate(want);
                data
            }
            // The first chunk holds less than asked (or is gone): read on.
            _ => self.read_body(lease, 0, want).await?,
        };
        Ok(Some((env, start)))
    }

    async fn read_body(&self, lease: &Lease, offset: u64, len: usize) -> Result<Vec<u8>, SpoolError> {
        let end = offset + len as u64;
        let rows = sqlx::query(
            "SELECT offset, data FROM queue_bodies WHERE id = ? AND offset < ? AND offset + length(data) > ? ORDER BY offset",
        )
        .bind(lease.id.as_str())
        .bind(end as i64)
        .bind(offset as i64)
        .fetch_all(&self.quick)
        .await
        .map_err(|e| failed("body", e))?;
        let mut out = Vec::with_capacity(len);
        for r in rows {
            let start: i64 = r.get(0);
            let data: Vec<u8> = r.get(1);
            // Contiguous only: a missing chunk ends the read there (short).
            if start as u64 > offset + out.len() as u64 {
                break;
            }
            let from = (offset + out.len() as u64 - start as u64) as usize;
            let to = ((end - start as u64) as usize).min(data.len());
            if from < to {
                out.extend_from_slice(&data[from..to]);
            }
        }
        Ok(out)
    }
}

#[async_trait::async_trait]
impl Deliver for SqliteSpool {
    async fn lease(&self, consumer: &str, count: usize, block: Duration) -> Result<Vec<Lease>, SpoolError> {
        self.ready().await?;
        let until = tokio::time::Instant::now() + block;
        loop {
            // A read first: polling must not take the write lock for nothing.
            let waiting: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM queue_messages WHERE state = 'ready' AND lease_owner IS NULL)",
            )
            .fetch_one(&self.quick)
            .await
            .map_err(|e| failed("lease", e))?;
            if waiting && count > 0 {
                let rows = sqlx::query(
                    "UPDATE queue_messages SET lease_owner = ?, lease_until = ?, generation = generation + 1 \
                     WHERE id IN (SELECT id FROM queue_messages WHERE state = 'ready' AND lease_owner IS NULL \
                     ORDER BY received_at LIMIT ?) RETURNING id, generation",
                )
                .bind(consumer)
                .bind(self.lease_until())
                .bind(count as i64)
                .fetch_all(&self.quick)
                .await
                .map_err(|e| failed("lease", e))?;
                if !rows.is_empty() {
                    return Ok(rows.into_iter().map(|r| lease_of(r.get(0), consumer, r.get(1))).collect());
                }
            }
            if tokio::time::Instant::now() >= until {
                return Ok(Vec::new());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn take_over(&self, consumer: &str, idle: Duration, count: usize) -> Result<Vec<Lease>, SpoolError> {
        // Renewed at `lease_until - queue.lease`: idle for `idle` when
        // `lease_until <= now + queue.lease - idle`.
        let cutoff = self.lease_until() - idle.as_millis() as i64;
        let rows = sqlx::query(
            "UPDATE queue_messages SET lease_owner = ?, lease_until = ?, generation = generation + 1 \
             WHERE id IN (SELECT id FROM queue_messages WHERE state = 'ready' AND lease_owner IS NOT NULL \
             AND lease_until <= ? ORDER BY lease_until LIMIT ?) RETURNING id, generation",
        )
        .bind(consumer)
        .bind(self.lease_until())
        .bind(cutoff)
        .bind(count as i64)
        .fetch_all(&self.quick)
        .await
        .map_err(|e| failed("takeover", e))?;
        Ok(rows.into_iter().map(|r| lease_of(r.get(0), consumer, r.get(1))).collect())
    }

    /// Leases of this node's previous run (in-process, a lease is never
    /// granted without its caller seeing it); `held` names them by id.
    async fn reclaim(
        &self,
        consumer: &str,
        held: &std::collections::HashSet<Entry>,
        count: usize,
    ) -> Result<Vec<Lease>, SpoolError> {
        let rows =
            sqlx::query("SELECT id, generation FROM queue_messages WHERE state = 'ready' AND lease_owner = ? LIMIT ?")
                .bind(consumer)
                .bind((count + held.len()) as i64)
                .fetch_all(&self.quick)
                .await
                .map_err(|e| failed("reclaim", e))?;
        let mut taken = Vec::new();
        for row in rows {
            let (id, generation): (String, i64) = (row.get(0), row.get(1));
            if taken.len() >= count || held.contains(&Entry { shard: 0, id: id.clone() }) {
                continue;
            }
            let bumped = sqlx::query(
                "UPDATE queue_messages SET lease_until = ?, generation = generation + 1 \
                 WHERE id = ? AND lease_owner = ? AND generation = ? RETURNING generation",
            )
            .bind(self.lease_until())
            .bind(&id)
            .bind(consumer)
            .bind(generation)
            .fetch_optional(&self.quick)
            .await
            .map_err(|e| failed("reclaim", e))?;
            if let Some(row) = bumped {
                taken.push(lease_of(id, consumer, row.get(0)));
            }
        }
        Ok(taken)
    }

    async fn renew(&self, lease: &Lease) -> Result<(), SpoolError> {
        let done = sqlx::query(fenced_sql!("UPDATE queue_messages SET lease_until = ?"))
            .bind(self.lease_until())
            .bind(lease.id.as_str())
            .bind(&lease.owner)
            .bind(lease.generation as i64)
            .execute(&self.quick)
            .await
            .map_err(|e| failed("renew", e))?;
        fenced(lease, done.rows_affected())
    }

    async fn complete(&self, lease: &Lease) -> Result<(), SpoolError> {
        self.completions.get_or_init(|| start_completions(self.quick.clone())).submit(lease.clone()).await
    }

    async fn defer(&self, lease: &Lease, env: &Envelope, due: i64, destinations: &[String]) -> Result<(), SpoolError> {
        let json = env.to_json().map_err(|e| failed("defer", e))?;
        let mut tx = self.quick.begin().await.map_err(|e| failed("defer", e))?;
        // A message held (or bounced) meanwhile keeps that flag.
        let done = sqlx::query(concat!(
            "UPDATE queue_messages SET envelope = json_set(?, \
             '$.held', CASE WHEN json_extract(envelope, '$.held') THEN '1' ELSE '0' END, \
             '$.bounce', CASE WHEN json_extract(envelope, '$.bounce') THEN '1' ELSE '0' END), \
             state = CASE WHEN json_extract(envelope, '$.held') THEN 'held' ELSE 'deferred' END, \
             due = ?, lease_owner = NULL, lease_until = NULL",
            fenced_sql!(""),
            " RETURNING state"
        ))
        .bind(json)
        .bind(due)
        .bind(lease.id.as_str())
        .bind(&lease.owner)
        .bind(lease.generation as i64)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| failed("defer", e))?;
        let Some(state) = done else { return Err(SpoolError::LeaseLost(lease.id.clone())) };
        if state.get::<&str, _>(0) == "deferred" {
            for d in destinations {
                sqlx::query("INSERT OR IGNORE INTO queue_destinations (destination, id) VALUES (?, ?)")
                    .bind(d)
                    .bind(lease.id.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| failed("defer", e))?;
            }
        }
        tx.commit().await.map_err(|e| failed("defer", e))
    }

    async fn hand_back(&self, lease: &Lease) -> Result<(), SpoolError> {
        let sql: &str = fenced_sql!("UPDATE queue_messages SET lease_owner = NULL, lease_until = NULL");
        self.fenced_update("hand_back", sql, lease).await
    }

    async fn skip(&self, lease: &Lease) -> Result<(), SpoolError> {
        // A held message stays held: it leaves the ready state.
        let sql: &str = fenced_sql!(
            "UPDATE queue_messages SET lease_owner = NULL, lease_until = NULL, \
             state = CASE WHEN json_valid(envelope) AND json_extract(envelope, '$.held') THEN 'held' ELSE state END \
            "
        );
        self.fenced_update("skip", sql, lease).await
    }

    async fn quarantine(&self, lease: &Lease) -> Result<(), SpoolError> {
        let sql = fenced_sql!(
            "UPDATE queue_messages SET state = 'corrupt', lease_owner = NULL, lease_until = NULL, \
             envelope = CASE WHEN json_valid(envelope) THEN json_set(envelope, '$.held', '1') ELSE envelope END"
        );
        self.fenced_update("quarantine", sql, lease).await
    }

    async fn schedule_due(&self, now: i64, batch: usize) -> Result<usize, SpoolError> {
        let mut tx = self.quick.begin().await.map_err(|e| failed("schedule", e))?;
        let ids: Vec<String> = sqlx::query_scalar(
            "UPDATE queue_messages SET state = 'ready' WHERE id IN \
             (SELECT id FROM queue_messages WHERE state = 'deferred' AND due <= ? LIMIT ?) RETURNING id",
        )
        .bind(now)
        .bind(batch as i64)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| failed("schedule", e))?;
        unindex(&mut tx, &ids).await.map_err(|e| failed("schedule", e))?;
        tx.commit().await.map_err(|e| failed("schedule", e))?;
        Ok(ids.len())
    }

    async fn deferred_destinations(&self) -> Result<Vec<String>, SpoolError> {
        sqlx::query_scalar("SELECT DISTINCT destination FROM queue_destinations ORDER BY 1")
            .fetch_all(&self.quick)
            .await
            .map_err(|e| failed("dests", e))
    }

    /// The embedded store has one node.
    async fn cluster_hostnames(&self, hostname: &str, _within: Duration) -> Result<Vec<String>, SpoolError> {
        Ok(vec![hostname.to_string()])
    }

    async fn maintain(&self, _consumer: &str, corrupt_max_age: Duration) -> Result<Maintenance, SpoolError> {
        let cutoff = now_ms() - corrupt_max_age.as_millis() as i64;
        let mut tx = self.quick.begin().await.map_err(|e| failed("maintain", e))?;
        let ids: Vec<String> =
            sqlx::query_scalar("DELETE FROM queue_messages WHERE state = 'corrupt' AND received_at < ? RETURNING id")
                .bind(cutoff)
                .fetch_all(&mut *tx)
                .await
                .map_err(|e| failed("maintain", e))?;
        for id in &ids {
            sqlx::query("DELETE FROM queue_bodies WHERE id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(|e| failed("maintain", e))?;
        }
        tx.commit().await.map_err(|e| failed("maintain", e))?;
        Ok(Maintenance { corrupt_removed: ids.len() as u64, ..Maintenance::default() })
    }
}

#[async_trait::async_trait]
impl Admin for SqliteSpool {
    async fn prepare(&self) -> Result<(), SpoolError> {
        self.ready().await?;
        // Bodies of messages that were never committed (a crash mid-DATA).
        sqlx::query("DELETE FROM queue_bodies WHERE id NOT IN (SELECT id FROM queue_messages)")
            .execute(&self.pool)
            .await
            .map_err(|e| failed("prepare", e))?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), SpoolError> {
        self.ready().await?;
        sqlx::query("SELECT 1 FROM queue_messages LIMIT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| failed("ping", e))
    }

    async fn locate(&self, id: &QueueId) -> Result<Option<Lease>, SpoolError> {
        let row = sqlx::query("SELECT generation FROM queue_messages WHERE id = ?")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| failed("locate", e))?;
        Ok(row.map(|_| Lease::located(id.clone(), 0)))
    }

    async fn admin(&self, id: &QueueId, action: AdminAction) -> Result<bool, SpoolError> {
        // One row per message: no action can give it a second live entry. A
        // leased message keeps its lease; its holder skips it when held.
        let sql = match action {
            AdminAction::Hold => {
                "UPDATE queue_messages SET envelope = json_set(envelope, '$.held', '1'), \
                 state = CASE WHEN state = 'deferred' OR (state = 'ready' AND lease_owner IS NULL) THEN 'held' \
                 ELSE state END WHERE id = ? AND json_valid(envelope)"
            }
            AdminAction::Release => {
                "UPDATE queue_messages SET \
                 envelope = CASE WHEN json_valid(envelope) THEN json_set(envelope, '$.held', '0') ELSE envelope END, \
                 state = CASE WHEN state IN ('held', 'corrupt') THEN 'ready' ELSE state END \
                 WHERE id = ? AND (state = 'corrupt' OR (json_valid(envelope) AND json_extract(envelope, '$.held')))"
            }
            AdminAction::Bounce => {
                "UPDATE queue_messages SET envelope = json_set(envelope, '$.bounce', '1', '$.held', '0'), \
                 state = CASE WHEN state IN ('deferred', 'held', 'corrupt') THEN 'ready' ELSE state END \
                 WHERE id = ? AND json_valid(envelope)"
            }
            AdminAction::Delete => "DELETE FROM queue_messages WHERE id = ?",
        };
        let mut tx = self.pool.begin().await.map_err(|e| failed("admin", e))?;
        let done = sqlx::query(sql).bind(id.as_str()).execute(&mut *tx).await.map_err(|e| failed("admin", e))?;
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM queue_messages WHERE id = ?")
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| failed("admin", e))?;
        if state.as_deref() != Some("deferred") {
            unindex(&mut tx, &[id.to_string()]).await.map_err(|e| failed("admin", e))?;
        }
        if action == AdminAction::Delete {
            sqlx::query("DELETE FROM queue_bodies WHERE id = ?")
                .bind(id.as_str())
                .execute(&mut *tx)
                .await
                .map_err(|e| failed("admin", e))?;
        }
        tx.commit().await.map_err(|e| failed("admin", e))?;
        Ok(done.rows_affected() > 0)
    }

    async fn flush_all(&self, limit: usize) -> Result<usize, SpoolError> {
        self.schedule_due(i64::MAX, limit).await
    }

    async fn stats(&self, by_destination: bool) -> Result<QueueStats, SpoolError> {
        let r = sqlx::query(
            "SELECT COUNT(*), \
             COALESCE(SUM(state = 'ready' AND lease_owner IS NULL), 0), \
             COALESCE(SUM(state = 'ready' AND lease_owner IS NOT NULL), 0), \
             COALESCE(SUM(state = 'deferred'), 0), COALESCE(SUM(state IN ('held', 'corrupt')), 0), MIN(received_at) \
             FROM queue_messages",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(|e| failed("stats", e))?;
        let n = |i: usize| r.get::<i64, _>(i) as u64;
        let mut stats = QueueStats {
            messages: n(0),
            ready: n(1),
            leased: n(2),
            deferred: n(3),
            held: n(4),
            oldest_received_at: r.get::<Option<i64>, _>(5),
            deferred_by_destination: Vec::new(),
        };
        if by_destination {
            let rows = sqlx::query("SELECT destination, COUNT(*) FROM queue_destinations GROUP BY 1 ORDER BY 1")
                .fetch_all(&self.pool)
                .await
                .map_err(|e| failed("stats", e))?;
            stats.deferred_by_destination = rows.into_iter().map(|r| (r.get(0), r.get::<i64, _>(1) as u64)).collect();
        }
        Ok(stats)
    }

    async fn list(&self) -> Result<Vec<(Envelope, MessageState)>, SpoolError> {
        let rows = sqlx::query("SELECT envelope, state, due FROM queue_messages ORDER BY received_at")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| failed("list", e))?;
        Ok(rows.into_iter().filter_map(|r| decode(r.get(0), r.get(1), r.get(2))).collect())
    }

    async fn show(&self, id: &QueueId) -> Result<Option<(Envelope, MessageState)>, SpoolError> {
        let row = sqlx::query("SELECT envelope, state, due FROM queue_messages WHERE id = ?")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| failed("show", e))?;
        let Some(r) = row else { return Ok(None) };
        decode(r.get(0), r.get(1), r.get(2)).map(Some).ok_or_else(|| SpoolError::Corrupt(id.clone()))
    }

    async fn audit(&self) -> Result<QueueAudit, SpoolError> {
        let rows = sqlx::query(
            "SELECT m.id, m.state, m.lease_owner IS NOT NULL, \
             CASE WHEN json_valid(m.envelope) THEN CAST(json_extract(m.envelope, '$.size') AS INTEGER) END, \
             (SELECT COALESCE(SUM(length(data)), 0) FROM queue_bodies b WHERE b.id = m.id), \
             (SELECT COUNT(*) FROM queue_destinations d WHERE d.id = m.id) \
             FROM queue_messages m",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| failed("audit", e))?;
        let mut audit = QueueAudit::default();
        for r in rows {
            let id = QueueId::from(r.get::<String, _>(0));
            let state: String = r.get(1);
            let leased: bool = r.get(2);
            audit.messages += 1;
            // One row is one place, unless its columns contradict each other.
            let places = match state.as_str() {
                "ready" => 1,
                "deferred" | "held" | "corrupt" => 1 + u32::from(leased),
                _ => 0,
            };
            if places != 1 {
                audit.misplaced.push((id.clone(), places));
            }
            if state != "deferred" && r.get::<i64, _>(5) > 0 {
                audit.stale_entries += r.get::<i64, _>(5) as u64;
            }
            if state != "corrupt" && r.get::<Option<i64>, _>(3) != Some(r.get::<i64, _>(4)) {
                audit.bad_bodies.push(id);
            }
        }
        Ok(audit)
    }
}
