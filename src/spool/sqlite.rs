//! The embedded queue: one SQLite database (WAL, `synchronous = FULL`, so a
//! commit is on disk before 250), for a single node without Redis. Same
//! semantics as the Redis back end: bodies written in chunks before the
//! commit (orphans removed at start), leases with expiry and takeover,
//! deferred with due times, a per-destination index for the fast drain,
//! hold/release/bounce/delete.

use std::str::FromStr;
use std::time::Duration;

use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use super::{AdminAction, Envelope, Lease, MessageState, QueueId, QueueStats, Spool, SpoolBody, SpoolError};
use crate::config::QueueConfig;
use crate::metrics::METRICS;

/// How often a blocked `lease` looks for new entries.
const POLL: Duration = Duration::from_millis(50);

pub struct SqliteSpool {
    pool: SqlitePool,
    config: QueueConfig,
}

fn failed(op: &'static str, e: impl std::fmt::Display) -> SpoolError {
    METRICS.queue_errors.with_label_values(&[op]).inc();
    SpoolError::Unavailable(format!("{op}: {e}"))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
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
        let pool =
            SqlitePoolOptions::new().max_connections(8).acquire_timeout(config.timeout).connect_lazy_with(options);
        Ok(SqliteSpool { pool, config: config.clone() })
    }

    async fn envelope_of(&self, id: &str) -> Result<Option<(Envelope, MessageState)>, SpoolError> {
        let row = sqlx::query("SELECT envelope, state, due FROM queue_messages WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| failed("load", e))?;
        Ok(row.and_then(|r| decode(r.get(0), r.get(1), r.get(2))))
    }
}

fn decode(envelope: String, state: String, due: i64) -> Option<(Envelope, MessageState)> {
    let env: Envelope = serde_json::from_str(&envelope).ok()?;
    let state = match state.as_str() {
        "held" => MessageState::Held,
        "deferred" => MessageState::Deferred { due },
        _ => MessageState::Active,
    };
    Some((env, state))
}

fn lease_of(id: String, generation: i64) -> Lease {
    Lease { id: QueueId::from(id), shard: 0, entry: generation.to_string() }
}

#[async_trait::async_trait]
impl Spool for SqliteSpool {
    async fn prepare(&self) -> Result<(), SpoolError> {
        crate::domains::sqlite::MIGRATOR.run(&self.pool).await.map_err(|e| failed("prepare", e))?;
        // Bodies of messages that were never committed (a crash mid-DATA).
        sqlx::query("DELETE FROM queue_bodies WHERE id NOT IN (SELECT id FROM queue_messages)")
            .execute(&self.pool)
            .await
            .map_err(|e| failed("prepare", e))?;
        Ok(())
    }

    fn open_body(&self, id: &QueueId) -> Box<dyn SpoolBody> {
        Box::new(SqliteBody {
            pool: self.pool.clone(),
            id: id.clone(),
            buf: Vec::new(),
            written: 0,
            chunk: self.config.chunk_size,
        })
    }

    async fn ping(&self) -> Result<(), SpoolError> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ()).map_err(|e| failed("ping", e))
    }

    async fn lease(&self, consumer: &str, count: usize, block: Duration) -> Result<Vec<Lease>, SpoolError> {
        let until = tokio::time::Instant::now() + block;
        loop {
            // A read first: polling must not take the write lock for nothing.
            let waiting: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM queue_messages WHERE state = 'ready' AND lease_owner IS NULL)",
            )
            .fetch_one(&self.pool)
            .await
            .map_err(|e| failed("lease", e))?;
            if !waiting {
                if tokio::time::Instant::now() >= until {
                    return Ok(Vec::new());
                }
                tokio::time::sleep(POLL).await;
                continue;
            }
            let rows = sqlx::query(
                "UPDATE queue_messages SET lease_owner = ?, lease_until = ?, generation = generation + 1 \
                 WHERE id IN (SELECT id FROM queue_messages WHERE state = 'ready' AND lease_owner IS NULL \
                 ORDER BY received_at LIMIT ?) RETURNING id, generation",
            )
            .bind(consumer)
            .bind(now_ms() + self.config.lease.as_millis() as i64)
            .bind(count as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| failed("lease", e))?;
            if !rows.is_empty() || tokio::time::Instant::now() >= until {
                return Ok(rows.into_iter().map(|r| lease_of(r.get(0), r.get(1))).collect());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn take_over(&self, consumer: &str, _idle: Duration, count: usize) -> Result<Vec<Lease>, SpoolError> {
        let rows = sqlx::query(
            "UPDATE queue_messages SET lease_owner = ?, lease_until = ?, generation = generation + 1 \
             WHERE id IN (SELECT id FROM queue_messages WHERE state = 'ready' AND lease_owner IS NOT NULL \
             AND lease_until < ? LIMIT ?) RETURNING id, generation",
        )
        .bind(consumer)
        .bind(now_ms() + self.config.lease.as_millis() as i64)
        .bind(now_ms())
        .bind(count as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| failed("takeover", e))?;
        Ok(rows.into_iter().map(|r| lease_of(r.get(0), r.get(1))).collect())
    }

    async fn renew(&self, consumer: &str, lease: &Lease) -> Result<(), SpoolError> {
        sqlx::query("UPDATE queue_messages SET lease_until = ?, lease_owner = ? WHERE id = ? AND generation = ?")
            .bind(now_ms() + self.config.lease.as_millis() as i64)
            .bind(consumer)
            .bind(lease.id.as_str())
            .bind(lease.entry.parse::<i64>().unwrap_or(-1))
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| failed("renew", e))
    }

    async fn envelope(&self, lease: &Lease) -> Result<Option<Envelope>, SpoolError> {
        Ok(self.envelope_of(lease.id.as_str()).await?.map(|(e, _)| e))
    }

    async fn read_body(&self, lease: &Lease, offset: u64, len: usize) -> Result<Vec<u8>, SpoolError> {
        let end = offset + len as u64;
        let rows = sqlx::query(
            "SELECT offset, data FROM queue_bodies WHERE id = ? AND offset < ? AND offset + length(data) > ? ORDER BY offset",
        )
        .bind(lease.id.as_str())
        .bind(end as i64)
        .bind(offset as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| failed("body", e))?;
        let mut out = Vec::with_capacity(len);
        for r in rows {
            let start: i64 = r.get(0);
            let data: Vec<u8> = r.get(1);
            let from = offset.saturating_sub(start as u64) as usize;
            let to = ((end - start as u64) as usize).min(data.len());
            if from < to {
                out.extend_from_slice(&data[from..to]);
            }
        }
        Ok(out)
    }

    async fn complete(&self, lease: &Lease, _destinations: &[String]) -> Result<(), SpoolError> {
        let mut tx = self.pool.begin().await.map_err(|e| failed("complete", e))?;
        for sql in [
            "DELETE FROM queue_messages WHERE id = ?",
            "DELETE FROM queue_bodies WHERE id = ?",
            "DELETE FROM queue_destinations WHERE id = ?",
        ] {
            sqlx::query(sql).bind(lease.id.as_str()).execute(&mut *tx).await.map_err(|e| failed("complete", e))?;
        }
        tx.commit().await.map_err(|e| failed("complete", e))
    }

    async fn defer(&self, lease: &Lease, env: &Envelope, due: i64, destinations: &[String]) -> Result<(), SpoolError> {
        let json = serde_json::to_string(env).map_err(|e| failed("defer", e))?;
        let mut tx = self.pool.begin().await.map_err(|e| failed("defer", e))?;
        // A message held meanwhile stays held (its envelope keeps the flag).
        sqlx::query(
            "UPDATE queue_messages SET envelope = json_set(?, \
             '$.held', json(CASE WHEN json_extract(envelope, '$.held') THEN 'true' ELSE 'false' END), \
             '$.bounce_requested', json(CASE WHEN json_extract(envelope, '$.bounce_requested') THEN 'true' ELSE 'false' END)), \
             state = CASE WHEN json_extract(envelope, '$.held') THEN 'held' ELSE 'deferred' END, \
             due = ?, lease_owner = NULL, lease_until = NULL WHERE id = ?",
        )
        .bind(json)
        .bind(due)
        .bind(lease.id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(|e| failed("defer", e))?;
        for d in destinations {
            sqlx::query("INSERT OR IGNORE INTO queue_destinations (destination, id) VALUES (?, ?)")
                .bind(d)
                .bind(lease.id.as_str())
                .execute(&mut *tx)
                .await
                .map_err(|e| failed("defer", e))?;
        }
        tx.commit().await.map_err(|e| failed("defer", e))
    }

    async fn hand_back(&self, lease: &Lease) -> Result<(), SpoolError> {
        sqlx::query("UPDATE queue_messages SET lease_owner = NULL, lease_until = NULL WHERE id = ? AND generation = ?")
            .bind(lease.id.as_str())
            .bind(lease.entry.parse::<i64>().unwrap_or(-1))
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| failed("hand_back", e))
    }

    async fn schedule_due(&self, now: i64, batch: usize) -> Result<usize, SpoolError> {
        let done = sqlx::query(
            "UPDATE queue_messages SET state = 'ready' WHERE id IN \
             (SELECT id FROM queue_messages WHERE state = 'deferred' AND due <= ? LIMIT ?)",
        )
        .bind(now)
        .bind(batch as i64)
        .execute(&self.pool)
        .await
        .map_err(|e| failed("schedule", e))?;
        Ok(done.rows_affected() as usize)
    }

    async fn release(&self, destination: &str, limit: usize) -> Result<usize, SpoolError> {
        let mut tx = self.pool.begin().await.map_err(|e| failed("release", e))?;
        let done = sqlx::query(
            "UPDATE queue_messages SET state = 'ready' WHERE state = 'deferred' AND id IN \
             (SELECT id FROM queue_destinations WHERE destination = ? LIMIT ?)",
        )
        .bind(destination)
        .bind(limit as i64)
        .execute(&mut *tx)
        .await
        .map_err(|e| failed("release", e))?;
        sqlx::query(
            "DELETE FROM queue_destinations WHERE destination = ? AND id IN \
             (SELECT id FROM queue_messages WHERE state = 'ready')",
        )
        .bind(destination)
        .execute(&mut *tx)
        .await
        .map_err(|e| failed("release", e))?;
        tx.commit().await.map_err(|e| failed("release", e))?;
        Ok(done.rows_affected() as usize)
    }

    async fn deferred_destinations(&self) -> Result<Vec<String>, SpoolError> {
        let rows = sqlx::query(
            "SELECT DISTINCT d.destination FROM queue_destinations d JOIN queue_messages m ON m.id = d.id \
             WHERE m.state = 'deferred' ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| failed("scan", e))?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    async fn skip(&self, lease: &Lease) -> Result<(), SpoolError> {
        self.hand_back(lease).await
    }

    async fn locate(&self, id: &QueueId) -> Result<Option<Lease>, SpoolError> {
        let row = sqlx::query("SELECT generation FROM queue_messages WHERE id = ?")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| failed("locate", e))?;
        Ok(row.map(|_| Lease { id: id.clone(), shard: 0, entry: String::new() }))
    }

    async fn admin(&self, id: &QueueId, action: AdminAction) -> Result<bool, SpoolError> {
        let sql = match action {
            AdminAction::Hold => {
                "UPDATE queue_messages SET envelope = json_set(envelope, '$.held', json('true')), \
                 state = CASE WHEN lease_owner IS NULL THEN 'held' ELSE state END WHERE id = ?"
            }
            AdminAction::Release => {
                "UPDATE queue_messages SET envelope = json_set(envelope, '$.held', json('false')), state = 'ready' \
                 WHERE id = ? AND state = 'held'"
            }
            AdminAction::Bounce => {
                "UPDATE queue_messages SET envelope = json_set(envelope, '$.bounce_requested', json('true'), '$.held', json('false')), \
                 state = 'ready' WHERE id = ?"
            }
            AdminAction::Delete => "DELETE FROM queue_messages WHERE id = ?",
        };
        let done = sqlx::query(sql).bind(id.as_str()).execute(&self.pool).await.map_err(|e| failed("admin", e))?;
        if action == AdminAction::Delete {
            for sql in ["DELETE FROM queue_bodies WHERE id = ?", "DELETE FROM queue_destinations WHERE id = ?"] {
                sqlx::query(sql).bind(id.as_str()).execute(&self.pool).await.map_err(|e| failed("admin", e))?;
            }
        }
        Ok(done.rows_affected() > 0)
    }

    async fn stats(&self, by_destination: bool) -> Result<QueueStats, SpoolError> {
        let r = sqlx::query(
            "SELECT COUNT(*), \
             COALESCE(SUM(state = 'ready' AND lease_owner IS NULL), 0), \
             COALESCE(SUM(state = 'ready' AND lease_owner IS NOT NULL), 0), \
             COALESCE(SUM(state = 'deferred'), 0), COALESCE(SUM(state = 'held'), 0), MIN(received_at) \
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
            let rows = sqlx::query(
                "SELECT d.destination, COUNT(*) FROM queue_destinations d JOIN queue_messages m ON m.id = d.id \
                 WHERE m.state = 'deferred' GROUP BY 1 ORDER BY 1",
            )
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
}

struct SqliteBody {
    pool: SqlitePool,
    id: QueueId,
    buf: Vec<u8>,
    /// Bytes already written as chunks.
    written: u64,
    chunk: usize,
}

impl SqliteBody {
    async fn flush_chunk(&mut self, exec: impl sqlx::SqliteExecutor<'_>) -> Result<(), SpoolError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        sqlx::query("INSERT INTO queue_bodies (id, offset, data) VALUES (?, ?, ?)")
            .bind(self.id.as_str())
            .bind(self.written as i64)
            .bind(self.buf.as_slice())
            .execute(exec)
            .await
            .map_err(|e| failed("append", e))?;
        self.written += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }
}

#[async_trait::async_trait]
impl SpoolBody for SqliteBody {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), SpoolError> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= self.chunk {
            let pool = self.pool.clone();
            self.flush_chunk(&pool).await?;
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>, env: &Envelope) -> Result<(), SpoolError> {
        let started = std::time::Instant::now();
        let json = serde_json::to_string(env).map_err(|e| failed("enqueue", e))?;
        let mut tx = self.pool.begin().await.map_err(|e| failed("enqueue", e))?;
        self.flush_chunk(&mut *tx).await?;
        sqlx::query("INSERT INTO queue_messages (id, envelope, received_at, state) VALUES (?, ?, ?, 'ready')")
            .bind(self.id.as_str())
            .bind(json)
            .bind(env.received_at)
            .execute(&mut *tx)
            .await
            .map_err(|e| failed("enqueue", e))?;
        tx.commit().await.map_err(|e| failed("enqueue", e))?;
        METRICS.queue_enqueue_seconds.observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    async fn abort(self: Box<Self>) {
        let _ = sqlx::query("DELETE FROM queue_bodies WHERE id = ?").bind(self.id.as_str()).execute(&self.pool).await;
    }
}
