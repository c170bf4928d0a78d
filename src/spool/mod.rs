//! The durable queue shared by all nodes: the message/envelope model and
//! the queue by role ([`Enqueue`] for sessions, [`Deliver`] for delivery
//! workers, [`Admin`] for start-up, health and operator commands, the two
//! last sharing [`Read`]); one file per back end, each implementing every
//! role ([`Spool`]).
//!
//! Invariants, on every back end:
//! * [`SpoolBody::commit`] returns `Ok` only once the envelope, the whole
//!   body (as many bytes as were written) and the message's one live entry
//!   are stored; until then nothing of it is deliverable, and a failed or
//!   abandoned body leaves nothing behind but an expiring temporary key.
//! * A committed message is in exactly one place: its one live ready entry,
//!   the deferred set, or the hold set; it leaves the queue exactly once.
//! * Only the current lease holder ([`Lease`] is a fencing token) changes a
//!   message; a body is never read short ([`BodyReader`]).

mod codec;
pub mod redis;
pub mod sqlite;
pub mod verdicts;

pub use verdicts::{Recall, Scope, Verification, VerifyCache};

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
    /// Time-ordered (UUIDv7, to the millisecond), so ids sort by arrival.
    /// The random part comes from the thread's generator, not a system
    /// call per id.
    pub fn new() -> QueueId {
        let millis = chrono::Utc::now().timestamp_millis().max(0) as u64;
        QueueId(uuid::Builder::from_unix_timestamp_millis(millis, &rand::random()).into_uuid().to_string())
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
    /// A delay warning (`delivery.delay_warning_time`) went to the sender.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delay_warned: bool,
    /// RFC 3461 `NOTIFY` (`NEVER`, or `SUCCESS,FAILURE,DELAY` in part).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<String>,
    /// RFC 3461 `ORCPT` as the client sent it (`rfc822;xtext`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orcpt: Option<String>,
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
    /// RFC 3461 `RET` (`FULL` or `HDRS`).
    #[serde(default)]
    pub dsn_ret: Option<String>,
    /// RFC 3461 `ENVID`, xtext as the client sent it.
    #[serde(default)]
    pub dsn_envid: Option<String>,
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
    /// The store holds fewer (or other) bytes of a body than were written
    /// or than the envelope says: the message is never committed, or never
    /// sent, short.
    #[error("body of {id}: {found} bytes stored, {expected} expected")]
    BodyMismatch { id: QueueId, expected: u64, found: u64 },
    /// This node's lease is no longer the current one: another node took
    /// the message over, or it left the queue. The holder stops at once.
    #[error("lease of {0} lost: another node holds it now, or it left the queue")]
    LeaseLost(QueueId),
    /// The envelope cannot be decoded: no retry can help.
    #[error("envelope of {0} is unreadable")]
    Corrupt(QueueId),
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

/// A queue entry leased to one node: opaque outside the back ends. The
/// lease is a fencing token: the owner plus a generation that every grant
/// (lease, takeover, reclaim) makes new, so two leases are equal only when
/// they are the same grant. Renew, defer, complete, hand back and skip
/// succeed only for the current token and answer [`SpoolError::LeaseLost`]
/// otherwise, so a node that was taken over can never change the message
/// again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    id: QueueId,
    /// Which entry: Redis, the shard and the stream entry id; SQLite, the
    /// message's one row (shard 0, its id).
    entry: Entry,
    /// The consumer (node) the entry is leased to.
    owner: String,
    /// Grant count of the entry (Redis: its delivery count); 0 for
    /// [`Admin::locate`], which leases nothing.
    generation: u64,
}

/// A queue entry, for the set of leases a node holds ([`Deliver::reclaim`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Entry {
    shard: u32,
    /// Empty for [`Admin::locate`]'s lease.
    id: String,
}

impl Lease {
    fn new(id: QueueId, shard: u32, entry: String, owner: &str, generation: u64) -> Lease {
        Lease { id, entry: Entry { shard, id: entry }, owner: owner.to_string(), generation }
    }

    /// A lease on nothing, to read message `id` in `shard` ([`Admin::locate`]).
    fn located(id: QueueId, shard: u32) -> Lease {
        Lease::new(id, shard, String::new(), "", 0)
    }

    /// The message this lease is for.
    pub fn id(&self) -> &QueueId {
        &self.id
    }

    /// The node it is leased to.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The entry it leases.
    pub fn entry(&self) -> &Entry {
        &self.entry
    }
}

/// Findings of [`Admin::audit`]: what breaks the queue's invariants.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct QueueAudit {
    /// Committed messages found.
    pub messages: u64,
    /// Messages in the wrong number of places (each should be in exactly one
    /// of: a live ready entry, the deferred set, the hold set).
    pub misplaced: Vec<(QueueId, u32)>,
    /// Ready entries that are not their message's live entry.
    pub stale_entries: u64,
    /// Messages whose stored body is shorter or longer than their size.
    pub bad_bodies: Vec<QueueId>,
}

impl QueueAudit {
    pub fn is_clean(&self) -> bool {
        self.misplaced.is_empty() && self.stale_entries == 0 && self.bad_bodies.is_empty()
    }
}

/// What one maintenance pass ([`Deliver::maintain`]) removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Maintenance {
    /// Messages left half-committed (stored, never made deliverable).
    pub staged_removed: u64,
    /// Consumers of nodes gone for good (idle, owning nothing).
    pub consumers_pruned: u64,
    /// Unreadable messages past the queue lifetime.
    pub corrupt_removed: u64,
}

/// Receiving: what an SMTP session asks of the queue (store a message;
/// ETRN: make a destination's deferred mail due). Delivery's DSNs and
/// fast drain and `queue flush --domain` use the same two.
#[async_trait::async_trait]
pub trait Enqueue: Send + Sync {
    /// Starts storing the body of message `id`.
    fn open_body(&self, id: &QueueId) -> Box<dyn SpoolBody>;
    /// Makes up to `limit` deferred messages of `destination` due now (fast
    /// drain when a destination recovers, `queue flush`). Returns how many.
    async fn release(&self, destination: &str, limit: usize) -> Result<usize, SpoolError>;
}

/// Reading one message under a [`Lease`]: a delivery's, or the one
/// [`Admin::locate`] gives `queue show`. Shared by both roles.
#[async_trait::async_trait]
pub trait Read: Send + Sync {
    /// The envelope; `None` when the message is gone or this entry is not
    /// its live one; `Corrupt` when it cannot be decoded.
    async fn envelope(&self, lease: &Lease) -> Result<Option<Envelope>, SpoolError>;
    /// Up to `len` bytes of the body from `offset` (fewer at its end). Use
    /// [`BodyReader`], which checks the length against the envelope.
    async fn read_body(&self, lease: &Lease, offset: u64, len: usize) -> Result<Vec<u8>, SpoolError>;
    /// [`Read::envelope`] and the body's first `len` bytes together, in
    /// one round trip where the store can (a delivery's first read); give
    /// the piece to [`BodyReader::starting_with`].
    async fn envelope_and_start(&self, lease: &Lease, len: usize) -> Result<Option<(Envelope, Vec<u8>)>, SpoolError> {
        let Some(env) = self.envelope(lease).await? else { return Ok(None) };
        let start = self.read_body(lease, 0, len.min(env.size as usize)).await?;
        Ok(Some((env, start)))
    }
}

/// Delivering: what the delivery workers of a node do with the queue
/// (lease entries, keep and settle them, schedule and clean up).
#[async_trait::async_trait]
pub trait Deliver: Enqueue + Read {
    /// At most `count` new entries for `consumer` in all, waiting up to `block`.
    async fn lease(&self, consumer: &str, count: usize, block: std::time::Duration) -> Result<Vec<Lease>, SpoolError>;
    /// At most `count` entries whose holder has not renewed them for `idle`,
    /// now leased to `consumer` (the old holder's token is void).
    async fn take_over(
        &self,
        consumer: &str,
        idle: std::time::Duration,
        count: usize,
    ) -> Result<Vec<Lease>, SpoolError>;
    /// At most `count` entries leased to `consumer` that it does not hold
    /// (`held`: the entries of the leases it works on), leased to
    /// it again with a new token: left by a lease read that ran but whose
    /// reply was lost, or by this node's previous run. Without this they
    /// would wait `queue.lease` for a takeover.
    async fn reclaim(
        &self,
        consumer: &str,
        held: &std::collections::HashSet<Entry>,
        count: usize,
    ) -> Result<Vec<Lease>, SpoolError>;
    /// Keeps a long delivery's lease alive; `LeaseLost` when it is not ours.
    async fn renew(&self, lease: &Lease) -> Result<(), SpoolError>;
    /// Every recipient is final: the message leaves the queue.
    async fn complete(&self, lease: &Lease) -> Result<(), SpoolError>;
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
    /// Acknowledges an entry without delivering: the message is held (it
    /// stays held), gone, or lives in another entry.
    async fn skip(&self, lease: &Lease) -> Result<(), SpoolError>;
    /// Takes a message whose envelope is unreadable out of delivery: it is
    /// held (`queue show`/`delete`) until [`Deliver::maintain`] removes it
    /// after the queue lifetime.
    async fn quarantine(&self, lease: &Lease) -> Result<(), SpoolError>;
    /// Moves deferred messages that are due into the ready streams; safe on
    /// every node at once. Returns how many moved.
    async fn schedule_due(&self, now: i64, batch: usize) -> Result<usize, SpoolError>;
    /// Destinations that have deferred messages now (from an index, never a
    /// keyspace scan).
    async fn deferred_destinations(&self) -> Result<Vec<String>, SpoolError>;
    /// Housekeeping, safe on every node at once: removes half-committed
    /// messages, consumers of nodes gone for good (never `consumer`), and
    /// unreadable messages older than `corrupt_max_age`.
    async fn maintain(&self, consumer: &str, corrupt_max_age: std::time::Duration) -> Result<Maintenance, SpoolError>;
    /// Records that a node named `hostname` (its `myhostname`) works on this
    /// queue now, and returns the names of every node that did within
    /// `within`, `hostname` included: a destination that greets with one
    /// of them is the cluster itself.
    async fn cluster_hostnames(&self, hostname: &str, within: std::time::Duration) -> Result<Vec<String>, SpoolError>;
}

/// Operating: start-up, `/readyz` and `/metrics`, and the operator
/// commands (`mxrelay queue …`), from any node.
#[async_trait::async_trait]
pub trait Admin: Enqueue + Read {
    /// Prepares the queue (consumer groups, migrations); safe on every node
    /// at once. Read paths redo what is missing by themselves (a Redis that
    /// came back empty), so a failure here is not fatal.
    async fn prepare(&self) -> Result<(), SpoolError>;
    /// Whether the queue can be read and written now (for `/readyz`).
    async fn ping(&self) -> Result<(), SpoolError>;
    /// Finds a message by id (the returned lease has no stream entry).
    async fn locate(&self, id: &QueueId) -> Result<Option<Lease>, SpoolError>;
    /// Holds, releases, bounces or deletes one message; `false` if it is not
    /// in a state where that applies (or does not exist).
    async fn admin(&self, id: &QueueId, action: AdminAction) -> Result<bool, SpoolError>;
    /// Makes up to `limit` deferred messages due now, whatever their
    /// destination (`queue flush`).
    async fn flush_all(&self, limit: usize) -> Result<usize, SpoolError>;
    /// Counts by state, the oldest arrival, and (when asked, costlier)
    /// deferred counts per destination.
    async fn stats(&self, by_destination: bool) -> Result<QueueStats, SpoolError>;
    /// Every message with its state, oldest first.
    async fn list(&self) -> Result<Vec<(Envelope, MessageState)>, SpoolError>;
    /// One message with its state (`queue show`), without reading the rest.
    async fn show(&self, id: &QueueId) -> Result<Option<(Envelope, MessageState)>, SpoolError>;
    /// Checks the invariants over the whole queue (costly: reads every
    /// entry; for `queue check` and the tests).
    async fn audit(&self) -> Result<QueueAudit, SpoolError>;
}

/// A back end: every role, and the shared recipient verification cache.
/// [`open`] gives one; a node hands each part only the role it needs
/// (`Arc<dyn Spool>` coerces to each).
pub trait Spool: Deliver + Admin + VerifyCache {}

impl<T: Deliver + Admin + VerifyCache> Spool for T {}

/// Reads a message's body chunk by chunk, exactly `size` bytes: a store
/// that holds fewer is an error ([`SpoolError::BodyMismatch`]), never an
/// early end of data, so a body is never sent short.
pub struct BodyReader {
    spool: std::sync::Arc<dyn Read>,
    lease: Lease,
    offset: u64,
    size: u64,
    chunk: usize,
    /// The first piece, read already ([`Read::envelope_and_start`]).
    start: Option<Vec<u8>>,
}

impl BodyReader {
    pub fn new(spool: std::sync::Arc<dyn Read>, lease: Lease, size: u64, chunk: usize) -> BodyReader {
        BodyReader { spool, lease, offset: 0, size, chunk: chunk.max(1), start: None }
    }

    /// A reader whose first piece (`chunk` bytes or the whole body) was
    /// read with the envelope; it is checked like any other.
    pub fn starting_with(mut self, start: Vec<u8>) -> BodyReader {
        self.start = Some(start);
        self
    }

    /// The next piece, or `None` once all `size` bytes were read.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, SpoolError> {
        if self.offset >= self.size {
            return Ok(None);
        }
        let want = (self.size - self.offset).min(self.chunk as u64) as usize;
        let piece = match self.start.take() {
            Some(start) if self.offset == 0 => start,
            _ => self.spool.read_body(&self.lease, self.offset, want).await?,
        };
        if piece.len() != want {
            return Err(SpoolError::BodyMismatch {
                id: self.lease.id.clone(),
                expected: self.size,
                found: self.offset + piece.len() as u64,
            });
        }
        self.offset += want as u64;
        Ok(Some(piece))
    }

    /// The whole body (for `queue show --body`; bounded by the message size).
    pub async fn read_all(mut self) -> Result<Vec<u8>, SpoolError> {
        let mut all = Vec::with_capacity(self.size.min(64 << 20) as usize);
        while let Some(piece) = self.next_chunk().await? {
            all.extend_from_slice(&piece);
        }
        Ok(all)
    }
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
    /// Bytes written so far: the size the message is stored with.
    fn written(&self) -> u64;
    /// Checks that the store holds every byte written, then stores the
    /// envelope (its `size` replaced by [`SpoolBody::written`]) and makes
    /// the message deliverable in one atomic step. `Ok` means committed;
    /// after an error nothing of the message is deliverable.
    async fn commit(self: Box<Self>, envelope: &Envelope) -> Result<(), SpoolError>;
    /// Drops what was written so far.
    async fn abort(self: Box<Self>);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_ids_are_uuid_v7_and_sort_by_arrival() {
        let first = QueueId::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let second = QueueId::new();
        let parsed = uuid::Uuid::parse_str(first.as_str()).unwrap();
        assert_eq!(parsed.get_version_num(), 7);
        assert!(first.as_str() < second.as_str(), "{first} {second}");
        assert_ne!(QueueId::new(), QueueId::new());
    }
}
