//! `relay_users` in the embedded SQLite database (migration 0003).

use sqlx::Row;
use sqlx::sqlite::SqlitePool;

use super::{UserError, UserStore};

pub struct SqliteUsers {
    pool: SqlitePool,
}

impl SqliteUsers {
    pub fn new(pool: SqlitePool) -> SqliteUsers {
        SqliteUsers { pool }
    }
}

fn unavailable(e: sqlx::Error) -> UserError {
    crate::metrics::METRICS.database_errors.inc();
    UserError::Unavailable(e.to_string())
}

#[async_trait::async_trait]
impl UserStore for SqliteUsers {
    async fn password_hash(&self, username: &str) -> Result<Option<String>, UserError> {
        let row = sqlx::query("SELECT password_hash FROM relay_users WHERE username = ?")
            .bind(username)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        row.map(|r| r.try_get::<String, _>(0)).transpose().map_err(unavailable)
    }

    async fn add(&self, username: &str, password_hash: &str) -> Result<(), UserError> {
        match sqlx::query("INSERT INTO relay_users (username, password_hash) VALUES (?, ?)")
            .bind(username)
            .bind(password_hash)
            .execute(&self.pool)
            .await
        {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(UserError::Duplicate(username.into())),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn set_password(&self, username: &str, password_hash: &str) -> Result<bool, UserError> {
        let done = sqlx::query("UPDATE relay_users SET password_hash = ? WHERE username = ?")
            .bind(password_hash)
            .bind(username)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(done.rows_affected() > 0)
    }

    async fn remove(&self, username: &str) -> Result<bool, UserError> {
        let done = sqlx::query("DELETE FROM relay_users WHERE username = ?")
            .bind(username)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(done.rows_affected() > 0)
    }

    async fn list(&self) -> Result<Vec<(String, String)>, UserError> {
        let rows = sqlx::query("SELECT username, created_at FROM relay_users ORDER BY username")
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect::<Result<_, sqlx::Error>>().map_err(unavailable)
    }
}
