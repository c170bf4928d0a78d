//! The shared recipient verification cache on the embedded store: table
//! `recipient_verifications`, one row per address until it expires.

use std::time::Duration;

use super::{SqliteSpool, failed, now_ms};
use crate::spool::{Recall, Scope, SpoolError, Verification, VerifyCache};

/// One node: its own single flight is the only claim needed, so
/// `recall_or_claim` never answers `BeingAsked`.
#[async_trait::async_trait]
impl VerifyCache for SqliteSpool {
    async fn recall_or_claim(&self, address: &str, _hold: Duration) -> Result<Recall, SpoolError> {
        self.ready().await?;
        Ok(self.recall(&Scope::Address(address.to_string())).await?.pop().map_or(Recall::YoursToAsk, Recall::Known))
    }

    async fn remember(&self, answer: &Verification) -> Result<(), SpoolError> {
        self.ready().await?;
        let mut tx = self.pool.begin().await.map_err(|e| failed("verify_remember", e))?;
        sqlx::query("DELETE FROM recipient_verifications WHERE expires_at <= ?")
            .bind(now_ms())
            .execute(&mut *tx)
            .await
            .map_err(|e| failed("verify_remember", e))?;
        sqlx::query(
            "INSERT OR REPLACE INTO recipient_verifications (address, deliverable, reply, asked_at, expires_at) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&answer.address)
        .bind(answer.deliverable)
        .bind(&answer.reply)
        .bind(answer.asked_at)
        .bind(answer.expires_at)
        .execute(&mut *tx)
        .await
        .map_err(|e| failed("verify_remember", e))?;
        tx.commit().await.map_err(|e| failed("verify_remember", e))
    }

    async fn unclaim(&self, _address: &str) -> Result<(), SpoolError> {
        Ok(())
    }

    async fn recall(&self, scope: &Scope) -> Result<Vec<Verification>, SpoolError> {
        self.ready().await?;
        // Every unexpired answer but for one address: one node's, and only
        // for the operator commands.
        let query = match scope {
            Scope::Address(address) => sqlx::query_as(
                "SELECT address, deliverable, reply, asked_at, expires_at FROM recipient_verifications \
                 WHERE expires_at > ? AND address = ?",
            )
            .bind(now_ms())
            .bind(address.as_str()),
            _ => sqlx::query_as(
                "SELECT address, deliverable, reply, asked_at, expires_at FROM recipient_verifications \
                 WHERE expires_at > ? ORDER BY address",
            )
            .bind(now_ms()),
        };
        let rows: Vec<(String, bool, String, i64, i64)> =
            query.fetch_all(&self.pool).await.map_err(|e| failed("verify_recall", e))?;
        Ok(rows
            .into_iter()
            .filter(|row| scope.covers(&row.0))
            .map(|(address, deliverable, reply, asked_at, expires_at)| Verification {
                address,
                deliverable,
                reply,
                asked_at,
                expires_at,
            })
            .collect())
    }

    async fn forget(&self, scope: &Scope) -> Result<usize, SpoolError> {
        let kept = self.recall(scope).await?;
        let mut tx = self.pool.begin().await.map_err(|e| failed("verify_forget", e))?;
        for answer in &kept {
            sqlx::query("DELETE FROM recipient_verifications WHERE address = ?")
                .bind(&answer.address)
                .execute(&mut *tx)
                .await
                .map_err(|e| failed("verify_forget", e))?;
        }
        tx.commit().await.map_err(|e| failed("verify_forget", e))?;
        Ok(kept.len())
    }
}
