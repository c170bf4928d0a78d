//! The recipient tables (`relay_recipient_checks`, `relay_recipients`) in
//! SQL. MySQL/MariaDB and the embedded SQLite run the same statements but
//! two (each back end's "insert unless present" and "insert or replace")
//! and tell a table that was never migrated apart differently, so one
//! definition serves both, as `users::sql` does for `relay_users`.

/// A module `recipient_sql` of queries over a pool of type `$pool`; the
/// back end's `DomainStore` methods call them.
macro_rules! recipient_sql {
    ($pool:ty, insert_new = $insert:literal, replace = $replace:literal, not_migrated = $not_migrated:path) => {
        mod recipient_sql {
            use super::super::{DomainError, RawRecipients};

            fn unavailable(e: sqlx::Error) -> DomainError {
                DomainError::Unavailable(e.to_string())
            }

            /// Empty when the tables do not exist yet: every recipient is then
            /// accepted, as before they existed.
            pub async fn load(pool: &$pool) -> Result<RawRecipients, DomainError> {
                let checks = sqlx::query_as::<_, (String, String)>("SELECT domain, method FROM relay_recipient_checks")
                    .fetch_all(pool)
                    .await;
                let checks = match checks {
                    Ok(rows) => rows,
                    Err(e) if $not_migrated(&e) => return Ok(RawRecipients::default()),
                    Err(e) => return Err(unavailable(e)),
                };
                if checks.is_empty() {
                    return Ok(RawRecipients::default());
                }
                let addresses = sqlx::query_scalar("SELECT address FROM relay_recipients")
                    .fetch_all(pool)
                    .await
                    .map_err(unavailable)?;
                Ok(RawRecipients { checks, addresses })
            }

            pub async fn set_check(pool: &$pool, domain: &str, method: &str) -> Result<(), DomainError> {
                let query = if method == "none" {
                    sqlx::query("DELETE FROM relay_recipient_checks WHERE domain = ?").bind(domain)
                } else {
                    sqlx::query($replace).bind(domain).bind(method)
                };
                query.execute(pool).await.map_err(unavailable)?;
                Ok(())
            }

            pub async fn add(pool: &$pool, addresses: &[String]) -> Result<usize, DomainError> {
                let mut tx = pool.begin().await.map_err(unavailable)?;
                let mut added = 0;
                for address in addresses {
                    let done = sqlx::query($insert).bind(address).execute(&mut *tx).await.map_err(unavailable)?;
                    added += done.rows_affected() as usize;
                }
                tx.commit().await.map_err(unavailable)?;
                Ok(added)
            }

            pub async fn remove(pool: &$pool, address: &str) -> Result<bool, DomainError> {
                let done = sqlx::query("DELETE FROM relay_recipients WHERE address = ?")
                    .bind(address)
                    .execute(pool)
                    .await
                    .map_err(unavailable)?;
                Ok(done.rows_affected() > 0)
            }
        }
    };
}
