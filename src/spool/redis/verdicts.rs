//! The shared recipient verification cache on Redis. An address's keys
//! live in one shard, chosen by a hash of the address, so each step is on
//! one hash slot (Redis Cluster): `verified:<address>` holds the answer
//! (JSON) and expires with it, `verifying:<address>` is the claim of the
//! node asking now (SET NX PX), and the sorted set `verified` indexes the
//! answers by expiry for the operator commands (never a keyspace scan).

use std::time::Duration;

use redis::AsyncCommands;

use super::scripts::RECALL_OR_CLAIM;
use super::{RedisSpool, ShardKeys, bounded};
use crate::spool::{Recall, Scope, SpoolError, Verification, VerifyCache};

/// Answers read per MGET by the operator commands.
const RECALL_BATCH: usize = 500;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl ShardKeys {
    fn verified(&self, address: &str) -> String {
        format!("{}verified:{address}", self.base())
    }
    fn verifying(&self, address: &str) -> String {
        format!("{}verifying:{address}", self.base())
    }
    fn verified_index(&self) -> String {
        format!("{}verified", self.base())
    }
}

fn decode(json: &str) -> Result<Verification, SpoolError> {
    serde_json::from_str(json).map_err(|e| SpoolError::Unavailable(format!("verify cache: unreadable answer: {e}")))
}

impl RedisSpool {
    /// The shard an address's answer lives in.
    fn verdict_keys(&self, address: &str) -> ShardKeys {
        let shards = self.config().shards.max(1) as u16;
        self.shard_keys(u32::from(crc16::State::<crc16::XMODEM>::calculate(address.as_bytes()) % shards))
    }

    /// The unexpired answers of one shard in `scope`.
    async fn recall_shard(&self, k: &ShardKeys, scope: &Scope) -> Result<Vec<Verification>, SpoolError> {
        let mut conn = self.conn_for(k.shard(), "verify_recall")?;
        let timeout = self.config().timeout;
        let addresses: Vec<String> =
            bounded("verify_recall", timeout, conn.zrangebyscore(k.verified_index(), now_ms(), "+inf")).await?;
        let addresses: Vec<String> = addresses.into_iter().filter(|a| scope.covers(a)).collect();
        let mut found = Vec::with_capacity(addresses.len());
        for batch in addresses.chunks(RECALL_BATCH) {
            let keys: Vec<String> = batch.iter().map(|a| k.verified(a)).collect();
            let values: Vec<Option<String>> =
                bounded("verify_recall", timeout, redis::cmd("MGET").arg(&keys).query_async(&mut conn)).await?;
            for json in values.into_iter().flatten() {
                found.push(decode(&json)?);
            }
        }
        Ok(found)
    }
}

#[async_trait::async_trait]
impl VerifyCache for RedisSpool {
    async fn recall_or_claim(&self, address: &str, hold: Duration) -> Result<Recall, SpoolError> {
        let k = self.verdict_keys(address);
        let mut inv = RECALL_OR_CLAIM.prepare_invoke();
        inv.key(k.verified(address)).key(k.verifying(address));
        inv.arg(hold.as_millis().max(1) as u64);
        let (state, json): (u8, String) = self.run_script(&k, "verify_recall", &inv).await?;
        Ok(match state {
            1 => Recall::Known(decode(&json)?),
            2 => Recall::YoursToAsk,
            _ => Recall::BeingAsked,
        })
    }

    async fn remember(&self, answer: &Verification) -> Result<(), SpoolError> {
        let k = self.verdict_keys(&answer.address);
        let now = now_ms();
        let ttl = (answer.expires_at - now).max(1) as u64;
        let json = serde_json::to_string(answer).map_err(|e| SpoolError::Unavailable(e.to_string()))?;
        let mut conn = self.conn_for(k.shard(), "verify_remember")?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(k.verified(&answer.address))
            .arg(json)
            .arg("PX")
            .arg(ttl)
            .ignore()
            .zadd(k.verified_index(), &answer.address, answer.expires_at)
            .ignore()
            .zrembyscore(k.verified_index(), "-inf", now)
            .ignore()
            .del(k.verifying(&answer.address))
            .ignore();
        bounded("verify_remember", self.config().timeout, pipe.query_async::<()>(&mut conn)).await
    }

    async fn unclaim(&self, address: &str) -> Result<(), SpoolError> {
        let k = self.verdict_keys(address);
        let mut conn = self.conn_for(k.shard(), "verify_unclaim")?;
        bounded("verify_unclaim", self.config().timeout, conn.del::<_, ()>(k.verifying(address))).await
    }

    async fn recall(&self, scope: &Scope) -> Result<Vec<Verification>, SpoolError> {
        let mut found = Vec::new();
        match scope {
            Scope::Address(address) => found = self.recall_shard(&self.verdict_keys(address), scope).await?,
            _ => {
                for shard in 0..self.config().shards {
                    found.extend(self.recall_shard(&self.shard_keys(shard), scope).await?);
                }
            }
        }
        found.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(found)
    }

    async fn forget(&self, scope: &Scope) -> Result<usize, SpoolError> {
        let shards: Vec<ShardKeys> = match scope {
            Scope::Address(address) => vec![self.verdict_keys(address)],
            _ => (0..self.config().shards).map(|s| self.shard_keys(s)).collect(),
        };
        let mut forgotten = 0;
        for k in shards {
            let mut conn = self.conn_for(k.shard(), "verify_forget")?;
            let timeout = self.config().timeout;
            // Expired ones too: the index may still name them.
            let addresses: Vec<String> =
                bounded("verify_forget", timeout, conn.zrange(k.verified_index(), 0, -1)).await?;
            let addresses: Vec<&String> = addresses.iter().filter(|a| scope.covers(a)).collect();
            for batch in addresses.chunks(RECALL_BATCH) {
                let keys: Vec<String> = batch.iter().map(|a| k.verified(a)).collect();
                let mut pipe = redis::pipe();
                pipe.atomic().del(&keys).zrem(k.verified_index(), batch);
                let (deleted, _): (usize, usize) =
                    bounded("verify_forget", timeout, pipe.query_async(&mut conn)).await?;
                forgotten += deleted;
            }
        }
        Ok(forgotten)
    }
}
