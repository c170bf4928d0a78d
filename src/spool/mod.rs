//! The durable queue shared by all nodes: the message/envelope model and
//! the [`Spool`] trait; one file per back end.
//!
//! Invariant: [`SpoolBody::commit`] returns `Ok` only once the envelope,
//! the whole body and the ready-stream entry are stored together; until
//! then nothing of the message is visible to delivery, and a failed or
//! abandoned body leaves nothing behind but an expiring temporary key.

pub mod redis;

use std::fmt;

use serde::{Deserialize, Serialize};

/// A message's id in the queue, in logs and in `250 … queued as <id>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QueueId(String);

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

/// The queue as the receiving side needs it.
#[async_trait::async_trait]
pub trait Spool: Send + Sync {
    /// Prepares the queue (consumer groups); safe on every node at once.
    async fn prepare(&self) -> Result<(), SpoolError>;
    /// Starts storing the body of message `id`.
    fn open_body(&self, id: &QueueId) -> Box<dyn SpoolBody>;
    /// Whether the queue answers now (for `/readyz`).
    async fn ping(&self) -> Result<(), SpoolError>;
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
