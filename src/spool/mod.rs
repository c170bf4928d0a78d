//! The durable queue shared by all nodes: the message/envelope model and
//! the [`Spool`] trait; one file per back end.
//!
//! Invariant: [`SpoolBody::commit`] returns `Ok` only once the envelope,
//! the whole body and the ready-stream entry are stored together; until
//! then nothing of the message is visible to delivery, and a failed or
//! abandoned body leaves nothing behind but an expiring temporary key.

pub mod redis;
pub mod sqlite;

use std::fmt;

use serde::{Deserialize, Serialize};

/// A message's id in the queue, in logs and in `250 … queued as <id>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QueueId(String);

impl From<String> for QueueId {
    fn from(s: String) -> Self {
        QueueId(s)
    }
}

impl QueueId {
    /// Time-ordered (UUIDv7), so ids sort by arrival.
    pub fn new() -> QueueId {
        QueueId(uuid::Uuid::now_v7().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for QueueId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a recipient stands. Delivery moves it forward; it never goes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecipientState {
    Pending,
    Delivered,
    Bounced,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// The address as the client sent it, without brackets.
    pub address: String,
    /// Lower-case A-label domain (empty for an unqualified address).
    pub domain: String,
    pub state: RecipientState,
    /// The last reply from the destination, for `queue show` and DSNs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reply: Option<String>,
}

/// Everything known about a message besides its body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: QueueId,
    /// Reverse-path without brackets; empty for the null sender `<>`.
    pub sender: String,
    pub recipients: Vec<Recipient>,
    pub client_ip: String,
    pub client_name: String,
    pub helo: String,
    /// Unix time in milliseconds.
    pub received_at: i64,
    /// Body size in bytes, our `Received:` header included.
    pub size: u64,
    /// Node that accepted the message.
    pub node: String,
    pub smtputf8: bool,
    /// `BODY=8BITMIME` was declared.
    pub eight_bit: bool,
    pub attempts: u32,
    /// Put on hold by an operator: not delivered until released.
    #[serde(default)]
    pub held: bool,
    /// An operator asked to bounce what is still pending.
    #[serde(default)]
    pub bounce_requested: bool,
}

impl Envelope {
    /// Reads the envelope from the string fields the spool stores.
    pub fn from_fields(f: &std::collections::HashMap<String, String>) -> Option<Envelope> {
        let get = |k: &str| f.get(k).cloned().unwrap_or_default();
        let num = |k: &str| f.get(k).and_then(|v| v.parse::<i64>().ok());
        Some(Envelope {
            id: QueueId(f.get("id")?.clone()),
            sender: get("sender"),
            recipients: serde_json::from_str(f.get("recipients")?).ok()?,
            client_ip: get("client_ip"),
            client_name: get("client_name"),
            helo: get("helo"),
            received_at: num("received_at")?,
            size: num("size")? as u64,
            node: get("node"),
            smtputf8: get("smtputf8") == "1",
            eight_bit: get("eight_bit") == "1",
            attempts: num("attempts").unwrap_or(0) as u32,
            held: get("held") == "1",
            bounce_requested: get("bounce") == "1",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The queue could not be reached or refused the write: a temporary
    /// fault (451 4.3.0), never a rejection.
    #[error("queue unavailable: {0}")]
    Unavailable(String),
    /// Written, but not acknowledged by enough replicas in time.
    #[error("queue write not acknowledged by {wanted} replica(s) (got {got})")]
    NotReplicated { wanted: u32, got: u32 },
}

/// Opens the queue `config.url` names: `redis://…` (cluster) or
/// `sqlite://…` (embedded, single node).
pub fn open(config: &crate::config::QueueConfig) -> Result<std::sync::Arc<dyn Spool>, SpoolError> {
    if config.url.starts_with("sqlite:") {
        Ok(std::sync::Arc::new(sqlite::SqliteSpool::connect(config)?))
    } else {
        Ok(std::sync::Arc::new(redis::RedisSpool::connect(config)?))
    }
}

/// A queue entry leased to this node: while it holds the lease, no other
/// node delivers the message; a lease not renewed within `queue.lease` is
/// taken over by another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub id: QueueId,
    pub shard: u32,
    /// The stream entry id.
    pub entry: String,
}

/// The queue: receiving (`open_body`) and delivering (the rest).
#[async_trait::async_trait]
pub trait Spool: Send + Sync {
    /// Prepares the queue (consumer groups); safe on every node at once.
    async fn prepare(&self) -> Result<(), SpoolError>;
    /// Starts storing the body of message `id`.
    fn open_body(&self, id: &QueueId) -> Box<dyn SpoolBody>;
    /// Whether the queue answers now (for `/readyz`).
    async fn ping(&self) -> Result<(), SpoolError>;

    /// Up to `count` new entries for `consumer`, waiting up to `block`.
    async fn lease(&self, consumer: &str, count: usize, block: std::time::Duration) -> Result<Vec<Lease>, SpoolError>;
    /// Entries whose holder has not renewed them for `idle`, now leased to `consumer`.
    async fn take_over(
        &self,
        consumer: &str,
        idle: std::time::Duration,
        count: usize,
    ) -> Result<Vec<Lease>, SpoolError>;
    /// Keeps a long delivery's lease alive.
    async fn renew(&self, consumer: &str, lease: &Lease) -> Result<(), SpoolError>;
    /// The envelope, or `None` when the message is gone (deleted meanwhile).
    async fn envelope(&self, lease: &Lease) -> Result<Option<Envelope>, SpoolError>;
    /// Up to `len` bytes of the body from `offset` (fewer at its end).
    async fn read_body(&self, lease: &Lease, offset: u64, len: usize) -> Result<Vec<u8>, SpoolError>;
    /// Every recipient is final: the message leaves the queue. `destinations`
    /// are the destination indexes it may still sit in.
    async fn complete(&self, lease: &Lease, destinations: &[String]) -> Result<(), SpoolError>;
    /// Some recipients wait: store their state and schedule the next attempt
    /// at `due` (unix ms), indexed under each waiting destination.
    async fn defer(
        &self,
        lease: &Lease,
        envelope: &Envelope,
        due: i64,
        destinations: &[String],
    ) -> Result<(), SpoolError>;
    /// Gives an unfinished entry back at once, for any node to take.
    async fn hand_back(&self, lease: &Lease) -> Result<(), SpoolError>;
    /// Moves deferred messages that are due into the ready streams; safe on
    /// every node at once. Returns how many moved.
    async fn schedule_due(&self, now: i64, batch: usize) -> Result<usize, SpoolError>;
    /// Makes up to `limit` deferred messages of `destination` due now (fast
    /// drain when a destination recovers, `queue flush`). Returns how many.
    async fn release(&self, destination: &str, limit: usize) -> Result<usize, SpoolError>;
    /// Destinations that have deferred messages now.
    async fn deferred_destinations(&self) -> Result<Vec<String>, SpoolError>;
    /// Acknowledges an entry whose message is held or gone.
    async fn skip(&self, lease: &Lease) -> Result<(), SpoolError>;

    // Operator commands (`mxrelay queue …`), from any node.
    /// Finds a message by id (the returned lease has no stream entry).
    async fn locate(&self, id: &QueueId) -> Result<Option<Lease>, SpoolError>;
    /// Holds, releases, bounces or deletes one message; `false` if it is not
    /// in a state where that applies (or does not exist).
    async fn admin(&self, id: &QueueId, action: AdminAction) -> Result<bool, SpoolError>;
    /// Counts by state, the oldest arrival, and (when asked, costlier)
    /// deferred counts per destination.
    async fn stats(&self, by_destination: bool) -> Result<QueueStats, SpoolError>;
    /// Every message with its state, oldest first.
    async fn list(&self) -> Result<Vec<(Envelope, MessageState)>, SpoolError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAction {
    Hold,
    Release,
    Bounce,
    Delete,
}

impl AdminAction {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminAction::Hold => "hold",
            AdminAction::Release => "release",
            AdminAction::Bounce => "bounce",
            AdminAction::Delete => "delete",
        }
    }
}

/// Where a message is, for `queue list/show`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum MessageState {
    /// In the ready stream or being delivered.
    Active,
    /// Waiting for its next attempt at `due` (unix ms).
    Deferred {
        due: i64,
    },
    Held,
}

impl MessageState {
    pub fn name(&self) -> &'static str {
        match self {
            MessageState::Active => "active",
            MessageState::Deferred { .. } => "deferred",
            MessageState::Held => "held",
        }
    }
}

/// Cluster-wide queue counts (cheap: a few commands per shard).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    pub messages: u64,
    /// Entries waiting in the ready streams, not yet leased.
    pub ready: u64,
    /// Entries leased to a node (being delivered).
    pub leased: u64,
    pub deferred: u64,
    pub held: u64,
    /// Arrival (unix ms) of the oldest message in the queue.
    pub oldest_received_at: Option<i64>,
    /// Deferred messages per destination.
    pub deferred_by_destination: Vec<(String, u64)>,
}

/// A message body being received, written in bounded pieces.
#[async_trait::async_trait]
pub trait SpoolBody: Send + Sync {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), SpoolError>;
    /// Stores the envelope, the body and the ready entry in one atomic step.
    async fn commit(self: Box<Self>, envelope: &Envelope) -> Result<(), SpoolError>;
    /// Drops what was written so far.
    async fn abort(self: Box<Self>);
}
