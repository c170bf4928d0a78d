//! The `domains` table in MySQL/MariaDB, as the seed created it (MyISAM,
//! latin1) or as our migration creates it (InnoDB, utf8mb4). Read-only
//! except for the migrations, which only create what is absent.

use std::time::Duration;

use sqlx::Row;
use sqlx::mysql::{MySqlPool, MySqlPoolOptions};

use super::{DomainError, DomainStore, RawDomain, RawRecipients};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/mysql");

pub struct MySqlDomains {
    pool: MySqlPool,
}

impl MySqlDomains {
    /// Connects lazily: a node starts (and answers 451) while MySQL is down.
    pub fn connect(url: &str, timeout: Duration) -> Result<MySqlDomains, DomainError> {
        let pool = MySqlPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(timeout)
            .connect_lazy(url)
            .map_err(|e| DomainError::Unavailable(e.to_string()))?;
        Ok(MySqlDomains { pool })
    }

    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }
}

#[async_trait::async_trait]
impl DomainStore for MySqlDomains {
    async fn migrate(&self) -> Result<(), DomainError> {
        MIGRATOR.run(&self.pool).await.map_err(|e| DomainError::Migration(e.to_string()))
    }

    async fn load(&self) -> Result<Vec<RawDomain>, DomainError> {
        // CAST keeps latin1 and utf8mb4 tables alike decodable as text.
        let rows = sqlx::query(
            "SELECT CAST(domain AS CHAR(255)), CAST(relay_host AS CHAR(512)), \
             CAST(relay_port AS UNSIGNED), CAST(enable_virus_spam_scan AS CHAR(1)) FROM domains",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| DomainError::Unavailable(e.to_string()))?;
        rows.iter()
            .map(|r| {
                Ok(RawDomain {
                    domain: r.try_get::<String, _>(0)?,
                    relay_host: r.try_get::<String, _>(1)?,
                    relay_port: u32::try_from(r.try_get::<u64, _>(2)?).unwrap_or(u32::MAX),
                    scan: r.try_get::<Option<String>, _>(3)?.unwrap_or_default(),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(|e| DomainError::Unavailable(e.to_string()))
    }

    async fn add(&self, rows: &[RawDomain]) -> Result<(), DomainError> {
        let unavailable = |e: sqlx::Error| DomainError::Unavailable(e.to_string());
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        for row in rows {
            let inserted = sqlx::query(
                "INSERT INTO domains (domain, relay_host, relay_port, enable_virus_spam_scan) VALUES (?, ?, ?, ?)",
            )
            .bind(&row.domain)
            .bind(&row.relay_host)
            .bind(row.relay_port)
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
        // MyISAM (the seed's table) ignores the transaction; rows are checked
        // for duplicates before any is written (see admin::domains).
        tx.commit().await.map_err(unavailable)
    }

    async fn remove(&self, domain: &str) -> Result<bool, DomainError> {
        let done = sqlx::query("DELETE FROM domains WHERE domain = ?")
            .bind(domain)
            .execute(&self.pool)
            .await
            .map_err(|e| DomainError::Unavailable(e.to_string()))?;
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
    sqlx::MySqlPool,
    insert_new = "INSERT IGNORE INTO relay_recipients (address) VALUES (?)",
    replace = "REPLACE INTO relay_recipient_checks (domain, method) VALUES (?, ?)",
    not_migrated = super::not_migrated
);

/// The recipient tables do not exist yet: a database `mxrelay migrate` has
/// not run on (MySQL's ER_NO_SUCH_TABLE).
fn not_migrated(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("42S02"))
}
