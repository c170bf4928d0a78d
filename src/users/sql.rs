//! `relay_users` in SQL: MySQL/MariaDB (migration 0002) and the embedded
//! SQLite database (migration 0003). The two back ends run the same
//! statements and differ only in the pool type and in how `created_at` is
//! read as text, so one definition serves both.

use sqlx::Row;

use super::{UserError, UserStore};

fn unavailable(e: sqlx::Error) -> UserError {
    crate::metrics::METRICS.database_errors.inc();
    UserError::Unavailable(e.to_string())
}

/// A `UserStore` over a pool of one sqlx back end; `$list` selects
/// `(username, created_at as text)` sorted by name.
macro_rules! sql_user_store {
    ($name:ident, $pool:ty, $list:literal) => {
        pub struct $name {
            pool: $pool,
        }

        impl $name {
            pub fn new(pool: $pool) -> $name {
                $name { pool }
            }
        }

        #[async_trait::async_trait]
        impl UserStore for $name {
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
                    Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                        Err(UserError::Duplicate(username.into()))
                    }
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
                let rows = sqlx::query($list).fetch_all(&self.pool).await.map_err(unavailable)?;
                rows.iter()
                    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                    .collect::<Result<_, sqlx::Error>>()
                    .map_err(unavailable)
            }
        }
    };
}

sql_user_store!(
    MySqlUsers,
    sqlx::mysql::MySqlPool,
    "SELECT username, CAST(created_at AS CHAR) FROM relay_users ORDER BY username"
);
sql_user_store!(
    SqliteUsers,
    sqlx::sqlite::SqlitePool,
    "SELECT username, created_at FROM relay_users ORDER BY username"
);
