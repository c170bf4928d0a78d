//! `mxrelay queue …`: queue commands that work from any node against the
//! shared queue (more come with the operations issue).

use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::delivery::FLUSH_LIMIT;
use crate::delivery::route::Route;
use crate::domains::Domains;
use crate::domains::mysql::MySqlDomains;
use crate::spool::Spool;
use crate::spool::redis::RedisSpool;

/// `queue flush [--domain D]` (Postfix `postqueue -f` / `-s D`): makes
/// deferred messages due now. Returns how many were released.
pub async fn flush(config: &Config, domain: Option<&str>) -> anyhow::Result<usize> {
    let spool = RedisSpool::connect(&config.queue)?;
    let destinations = match domain {
        Some(d) => {
            let name = crate::policy::address::normalise_domain(d.trim_start_matches('@'))
                .ok_or_else(|| anyhow::anyhow!("--domain: {d:?} is not a domain name"))?;
            let domains = Domains::new(Arc::new(MySqlDomains::connect(&config.domains.url, Duration::from_secs(10))?));
            domains.refresh(false).await?;
            vec![Route::for_domain(&name, &domains).key()]
        }
        None => spool.deferred_destinations().await?,
    };
    let mut released = 0;
    for d in &destinations {
        released += spool.release(d, FLUSH_LIMIT).await?;
    }
    if domain.is_none() {
        // Deferred messages outside any destination index, too.
        released += spool.schedule_due(i64::MAX, FLUSH_LIMIT).await?;
    }
    Ok(released)
}
