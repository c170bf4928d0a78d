//! The `domains` table in MySQL/MariaDB, as the seed created it (MyISAM,
//! latin1) or as our migration creates it (InnoDB, utf8mb4). Read-only
//! except for the migrations, which only create what is absent.

use std::time::Duration;

use sqlx::mysql::{MySqlPool, MySqlPoolOptions};
use sqlx::Row;

use super::{DomainError, DomainStore, RawDomain};

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
}
