//! `mxrelay queue …`: queue commands that work from any node against the
//! shared queue (more come with the operations issue).

use std::sync::Arc;

use crate::config::Config;
use crate::delivery::FLUSH_LIMIT;
use crate::domains::Domains;
use crate::spool::{Admin, AdminAction, BodyReader, Envelope, MessageState, QueueId, QueueStats};

/// The queue, in its operator role, prepared: through Sentinel or on a
/// Redis Cluster, that waits (up to `queue.timeout`) for the primaries to
/// be named.
async fn queue(config: &Config) -> anyhow::Result<Arc<dyn Admin>> {
    let spool: Arc<dyn Admin> = crate::spool::open(&config.queue)?;
    spool.prepare().await?;
    Ok(spool)
}

/// `queue flush [--domain D]` (Postfix `postqueue -f` / `-s D`): makes
/// deferred messages due now. Returns how many were released.
pub async fn flush(config: &Config, domain: Option<&str>) -> anyhow::Result<usize> {
    let spool = queue(config).await?;
    let Some(d) = domain else {
        return Ok(spool.flush_all(FLUSH_LIMIT).await?);
    };
    let name = crate::proto::address::normalise_domain(d.trim_start_matches('@'))
        .ok_or_else(|| anyhow::anyhow!("--domain: {d:?} is not a domain name"))?;
    let domains = Domains::new(crate::domains::open(&config.domains.url)?);
    domains.refresh(false).await?;
    let released = spool.release(&domains.destination_key(&name), FLUSH_LIMIT).await?;
    Ok(released)
}

fn age(received_at: i64) -> String {
    let secs = ((chrono::Utc::now().timestamp_millis() - received_at) / 1000).max(0) as u64;
    humantime_serde::re::humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
}

pub async fn stats(config: &Config) -> anyhow::Result<QueueStats> {
    Ok(queue(config).await?.stats(true).await?)
}

pub fn stats_table(s: &QueueStats) -> String {
    let mut out = format!(
        "messages {}\n  active   {} ready, {} being delivered\n  deferred {}\n  held     {}\noldest   {}\n",
        s.messages,
        s.ready,
        s.leased,
        s.deferred,
        s.held,
        s.oldest_received_at.map_or("-".into(), age)
    );
    if !s.deferred_by_destination.is_empty() {
        out.push_str("deferred by destination:\n");
        for (d, n) in &s.deferred_by_destination {
            out.push_str(&format!("  {n:>8}  {d}\n"));
        }
    }
    out
}

/// `queue list`: messages, optionally only those with a pending recipient
/// in `domain` and/or in `state` (active, deferred, held).
pub async fn list(
    config: &Config,
    domain: Option<&str>,
    state: Option<&str>,
) -> anyhow::Result<Vec<(Envelope, MessageState)>> {
    if let Some(s) = state
        && !matches!(s, "active" | "deferred" | "held")
    {
        anyhow::bail!("--state {s:?} is unknown: use active, deferred or held");
    }
    let domain = domain.map(|d| crate::proto::address::normalise_domain(d).unwrap_or_else(|| d.to_ascii_lowercase()));
    let all = queue(config).await?.list().await?;
    Ok(all
        .into_iter()
        .filter(|(_, st)| state.is_none_or(|s| st.name() == s))
        .filter(|(e, _)| domain.as_ref().is_none_or(|d| e.recipients.iter().any(|r| &r.domain == d)))
        .collect())
}

pub fn list_table(rows: &[(Envelope, MessageState)]) -> String {
    let mut out = format!("{:<36} {:<9} {:>10} {:>8} {:<30} RECIPIENTS\n", "ID", "STATE", "SIZE", "AGE", "SENDER");
    for (e, st) in rows {
        let pending: Vec<&str> = e
            .recipients
            .iter()
            .filter(|r| r.state == crate::spool::RecipientState::Pending)
            .map(|r| r.address.as_str())
            .collect();
        out.push_str(&format!(
            "{:<36} {:<9} {:>10} {:>8} {:<30} {}\n",
            e.id,
            st.name(),
            e.size,
            age(e.received_at),
            format!("<{}>", e.sender),
            pending.join(", ")
        ));
    }
    out.push_str(&format!("{} message(s)\n", rows.len()));
    out
}

/// `queue show ID`: the envelope and state; `body` also returns the message.
pub async fn show(config: &Config, id: &str, body: bool) -> anyhow::Result<(Envelope, MessageState, Option<Vec<u8>>)> {
    let spool = queue(config).await?;
    let qid = QueueId::from(id.to_string());
    let (env, state) = spool.show(&qid).await?.ok_or_else(|| anyhow::anyhow!("{id} is not in the queue"))?;
    let content = if body {
        let lease = spool.locate(&qid).await?.ok_or_else(|| anyhow::anyhow!("{id} left the queue"))?;
        Some(BodyReader::new(spool.clone(), lease, env.size, config.queue.chunk_size).read_all().await?)
    } else {
        None
    };
    Ok((env, state, content))
}

pub fn show_text(e: &Envelope, st: &MessageState) -> String {
    let mut out = format!(
        "id        {}\nstate     {}\nsender    <{}>\nclient    {}[{}] helo={}\nreceived  {} ({} ago) by {}\nsize      {}\nattempts  {}\n",
        e.id,
        st.name(),
        e.sender,
        e.client_name,
        e.client_ip,
        e.helo,
        chrono::DateTime::from_timestamp_millis(e.received_at).map_or("-".into(), |t| t.to_rfc2822()),
        age(e.received_at),
        e.node,
        e.size,
        e.attempts
    );
    if let MessageState::Deferred { due } = st {
        let t = chrono::DateTime::from_timestamp_millis(*due).map_or("-".into(), |t| t.to_rfc2822());
        out.push_str(&format!("next try  {t}\n"));
    }
    out.push_str("recipients:\n");
    for r in &e.recipients {
        let state = serde_json::to_value(r.state).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        out.push_str(&format!("  <{}> {state}", r.address));
        if let Some(reply) = &r.last_reply {
            out.push_str(&format!(" ({reply})"));
        }
        out.push('\n');
    }
    out
}

/// `queue hold|release|bounce|delete ID…`: per id, whether it applied.
pub async fn act(config: &Config, action: AdminAction, ids: &[String]) -> anyhow::Result<Vec<(String, bool)>> {
    let spool = queue(config).await?;
    let mut done = Vec::new();
    for id in ids {
        let ok = spool.admin(&QueueId::from(id.clone()), action).await?;
        if ok {
            tracing::info!(queue_id = %id, "{id}: {} by the administrator", action.as_str());
        }
        done.push((id.clone(), ok));
    }
    Ok(done)
}
