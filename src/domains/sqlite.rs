//! The `domains` table in the embedded SQLite database (single node, no
//! MySQL): the same columns and snapshot semantics as the MySQL back end.

use std::str::FromStr;
use std::time::Duration;

use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use super::{DomainError, DomainStore, RawDomain, RawRecipients};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

pub struct SqliteDomains {
    pool: SqlitePool,
}

/// Creates the directory of the database file `url` names, if missing.
pub fn ensure_dir(url: &str) -> std::io::Result<()> {
    let path = url.trim_start_matches("sqlite://").trim_start_matches("sqlite:");
    let path = path.split('?').next().unwrap_or(path);
    match std::path::Path::new(path).parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::create_dir_all(dir),
        _ => Ok(()),
    }
}

impl SqliteDomains {
    /// Opens (creating when absent) the database at `url` (`sqlite://path`).
    pub fn connect(url: &str) -> Result<SqliteDomains, DomainError> {
        ensure_dir(url)
            .map_err(|e| DomainError::Unavailable(format!("cannot create the data directory for {url}: {e}")))?;
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| DomainError::Unavailable(e.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new().max_connections(4).connect_lazy_with(options);
        Ok(SqliteDomains { pool })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

fn unavailable(e: sqlx::Error) -> DomainError {
    DomainError::Unavailable(e.to_string())
}

#[async_trait::async_trait]
impl DomainStore for SqliteDomains {
    async fn migrate(&self) -> Result<(), DomainError> {
        MIGRATOR.run(&self.pool).await.map_err(|e| DomainError::Migration(e.to_string()))
    }

    async fn load(&self) -> Result<Vec<RawDomain>, DomainError> {
        let rows = sqlx::query("SELECT domain, relay_host, relay_port, enable_virus_spam_scan FROM domains")
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        rows.iter()
            .map(|r| {
                Ok(RawDomain {
                    domain: r.try_get(0)?,
                    relay_host: r.try_get(1)?,
                    relay_port: u32::try_from(r.try_get::<i64, _>(2)?).unwrap_or(u32::MAX),
                    scan: r.try_get(3)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(unavailable)
    }

    async fn add(&self, rows: &[RawDomain]) -> Result<(), DomainError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        for row in rows {
            let inserted = sqlx::query(
                "INSERT INTO domains (domain, relay_host, relay_port, enable_virus_spam_scan) VALUES (?, ?, ?, ?)",
            )
            .bind(&row.domain)
            .bind(&row.relay_host)
            .bind(i64::from(row.relay_port))
            .bind(&row.scan)
            .execute(&mut *tx)
            .await;
            match inserted {
                Ok(_) => {}
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                    return Err(DomainError::Duplicate(row.domain.clone()));
                }
                Err(e) => return Err(unavailable(e)),
            }
        }
        tx.commit().await.map_err(unavailable)
    }

    async fn remove(&self, domain: &str) -> Result<bool, DomainError> {
        let done = sqlx::query("DELETE FROM domains WHERE domain = ?")
            .bind(domain)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(done.rows_affected() > 0)
    }

    async fn load_recipients(&self) -> Result<RawRecipients, DomainError> {
        recipient_sql::load(&self.pool).await
    }

    async fn set_recipient_check(&self, domain: &str, method: &str) -> Result<(), DomainError> {
        recipient_sql::set_check(&self.pool, domain, method).await
    }

    async fn add_recipients(&self, addresses: &[String]) -> Result<usize, DomainError> {
        recipient_sql::add(&self.pool, addresses).await
    }

    async fn remove_recipient(&self, address: &str) -> Result<bool, DomainError> {
        recipient_sql::remove(&self.pool, address).await
    }
}

recipient_sql!(
    sqlx::SqlitePool,
    insert_new = "INSERT OR IGNORE INTO relay_recipients (address) VALUES (?)",
    replace = "INSERT OR REPLACE INTO relay_recipient_checks (domain, method) VALUES (?, ?)",
    not_migrated = super::not_migrated
);

/// The recipient tables do not exist yet: a database `mxrelay migrate` has
/// not run on.
fn not_migrated(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.message().contains("no such table"))
}
