//! Model-based test of the spool protocol, on every back end: random
//! interleavings of commit, lease, renew, takeover (every lease expired),
//! defer, complete, hand back, skip, quarantine, hold, release, bounce,
//! delete, scheduling, fast drain and crashed holders, run against a plain
//! model of the queue. After every step: the audit is clean, the queue
//! holds exactly the messages the model holds (each in the place the model
//! says, none completed twice or back after it left), only the current
//! lease changes a message (a stale one gets `LeaseLost` and changes
//! nothing), and a body is read back whole or not at all.
//!
//! Where the back ends differ and no contract says which is right, the
//! model accepts both (each place is marked): how `list` shows a held
//! message that still has its live entry, the hold flag of a quarantined
//! message, a bounce of a quarantined message (not run), and `envelope`
//! with a stale lease of a live message.
//!
//! No step depends on the clock: leases expire through takeovers with
//! `idle = 0`, and due times are far from now. `PROPTEST_CASES` sets the
//! number of cases, `PROPTEST_RNG_SEED` replays a run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use mxrelay::config::QueueConfig;
use mxrelay::spool::{
    AdminAction, BodyReader, Envelope, Lease, MessageState, QueueId, Recipient, RecipientState, Spool, SpoolError,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

/// Cases per back end unless `PROPTEST_CASES` says otherwise.
const CASES: u32 = 64;
/// Longest operation sequence of one case.
const STEPS: usize = 48;
/// Small, so that bodies spill into chunks (Redis) and chunk rows (SQLite).
const CHUNK_SIZE: usize = 4096;
/// Leases the test keeps (current and stale) to act with.
const KEPT_LEASES: usize = 24;
const NODES: [&str; 3] = ["n0", "n1", "n2"];
const DESTINATIONS: [&str; 2] = ["[127.0.0.1]:2526", "mx.b.example"];
/// A takeover count that takes every pending entry.
const ALL: usize = 1000;
const DAY_MS: i64 = 86_400_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Redis,
    Sqlite,
}

/// One of the leases the test holds: preferably a current one.
#[derive(Debug, Clone, Copy)]
struct LeaseRef {
    ix: usize,
    current: bool,
}

/// One of the messages committed so far: preferably one the operation
/// applies to (live; held, for a release).
#[derive(Debug, Clone, Copy)]
struct MsgRef {
    ix: usize,
    apt: bool,
}

#[derive(Debug, Clone)]
enum Op {
    /// A message of `size` bytes, written in pieces of `piece`.
    Commit {
        size: usize,
        piece: usize,
    },
    /// A body written and then aborted (or dropped): nothing of it remains.
    Abandon {
        size: usize,
        piece: usize,
        drop: bool,
    },
    Lease {
        node: usize,
        count: usize,
        block: bool,
    },
    Renew(LeaseRef),
    /// Every lease expires at once (`idle = 0`): `node` takes over `count`.
    TakeOver {
        node: usize,
        count: usize,
    },
    Defer {
        lease: LeaseRef,
        due_now: bool,
        destinations: u8,
    },
    Complete(LeaseRef),
    HandBack(LeaseRef),
    Skip(LeaseRef),
    Quarantine(LeaseRef),
    Hold(MsgRef),
    Release(MsgRef),
    Bounce(MsgRef),
    Delete(MsgRef),
    /// `schedule_due` at a time after the near due times (or after all).
    ScheduleDue {
        far: bool,
    },
    /// `release(destination)`: the fast drain.
    Flush(usize),
    /// The node dies: the test forgets its leases; its entries stay
    /// pending until a takeover.
    Crash(usize),
    /// The whole body through `BodyReader`, with any lease (stale or not).
    ReadBody {
        lease: LeaseRef,
        chunk: usize,
    },
    /// `queue show --body`: located by id, read whole.
    ShowBody {
        msg: MsgRef,
        chunk: usize,
    },
    /// Maintenance with a zero corrupt lifetime: quarantined messages go.
    SweepCorrupt,
}

fn body_size() -> impl Strategy<Value = usize> {
    prop_oneof![
        1 => Just(0usize),
        4 => 1usize..200,
        2 => (CHUNK_SIZE - 2)..(CHUNK_SIZE + 3),
        2 => (2 * CHUNK_SIZE - 2)..(2 * CHUNK_SIZE + 3),
        3 => 200usize..(3 * CHUNK_SIZE + 500),
    ]
}

fn lease_ref() -> impl Strategy<Value = LeaseRef> {
    (any::<u8>(), prop::bool::weighted(0.75)).prop_map(|(ix, current)| LeaseRef { ix: ix as usize, current })
}

fn node() -> impl Strategy<Value = usize> {
    0..NODES.len()
}

fn msg_ref() -> impl Strategy<Value = MsgRef> {
    (any::<u8>(), prop::bool::weighted(0.8)).prop_map(|(ix, apt)| MsgRef { ix: ix as usize, apt })
}

fn read_chunk() -> impl Strategy<Value = usize> {
    prop_oneof![Just(1000usize), Just(CHUNK_SIZE), Just(CHUNK_SIZE + 1), Just(64 * 1024)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        9 => (body_size(), 1usize..6000).prop_map(|(size, piece)| Op::Commit { size, piece }),
        1 => (body_size(), 1usize..6000, any::<bool>()).prop_map(|(size, piece, drop)| Op::Abandon { size, piece, drop }),
        6 => (node(), 1usize..=4, prop::bool::weighted(0.2)).prop_map(|(node, count, block)| Op::Lease { node, count, block }),
        2 => lease_ref().prop_map(Op::Renew),
        2 => (node(), prop_oneof![3 => Just(ALL), 1 => 1usize..=2]).prop_map(|(node, count)| Op::TakeOver { node, count }),
        6 => (lease_ref(), any::<bool>(), 0u8..4).prop_map(|(lease, due_now, destinations)| Op::Defer { lease, due_now, destinations }),
        3 => lease_ref().prop_map(Op::Complete),
        2 => lease_ref().prop_map(Op::HandBack),
        3 => lease_ref().prop_map(Op::Skip),
        1 => lease_ref().prop_map(Op::Quarantine),
        4 => msg_ref().prop_map(Op::Hold),
        3 => msg_ref().prop_map(Op::Release),
        2 => msg_ref().prop_map(Op::Bounce),
        1 => msg_ref().prop_map(Op::Delete),
        2 => any::<bool>().prop_map(|far| Op::ScheduleDue { far }),
        2 => (0..DESTINATIONS.len()).prop_map(Op::Flush),
        1 => node().prop_map(Op::Crash),
        2 => (lease_ref(), read_chunk()).prop_map(|(lease, chunk)| Op::ReadBody { lease, chunk }),
        1 => (msg_ref(), read_chunk()).prop_map(|(msg, chunk)| Op::ShowBody { msg, chunk }),
        1 => Just(Op::SweepCorrupt),
    ]
}

/// A case: the shard count (Redis) and the operations.
fn case() -> impl Strategy<Value = (u32, Vec<Op>)> {
    (2u32..=3, prop::collection::vec(op(), 1..=STEPS))
}

/// Where the model has a message.
#[derive(Debug, Clone, PartialEq)]
enum Place {
    /// Its one live entry: waiting (`None`) or leased with this token.
    Ready(Option<Lease>),
    Deferred {
        due: i64,
        destinations: Vec<String>,
    },
    /// In the hold set.
    Held,
    Completed,
    Deleted,
    /// Removed by maintenance (quarantined).
    Swept,
}

#[derive(Debug)]
struct Msg {
    id: QueueId,
    body: Vec<u8>,
    received_at: i64,
    place: Place,
    /// The operator's hold flag (also set by quarantine).
    held: bool,
    bounce: bool,
    /// Quarantined, not released since.
    corrupt: bool,
    attempts: u32,
    recipients: Vec<Recipient>,
    /// Every token ever granted for it: a grant is always a new one.
    grants: Vec<Lease>,
}

impl Msg {
    fn live(&self) -> bool {
        !matches!(self.place, Place::Completed | Place::Deleted | Place::Swept)
    }

    fn holder(&self) -> Option<&Lease> {
        match &self.place {
            Place::Ready(holder) => holder.as_ref(),
            _ => None,
        }
    }

    fn envelope(&self, node: &str) -> Envelope {
        Envelope {
            id: self.id.clone(),
            sender: "s@sender.example".into(),
            recipients: self.recipients.clone(),
            client_ip: "127.0.0.1".into(),
            client_name: "unknown".into(),
            helo: "client.example".into(),
            received_at: self.received_at,
            size: self.body.len() as u64,
            node: node.into(),
            smtputf8: false,
            eight_bit: false,
            attempts: self.attempts,
            held: false,
            bounce_requested: false,
            dsn_ret: None,
            dsn_envid: None,
        }
    }
}

/// What the test sees of the whole queue, to tell that a step changed nothing.
#[derive(Debug, PartialEq)]
struct Snapshot {
    list: Vec<(Envelope, MessageState)>,
    stats: mxrelay::spool::QueueStats,
    destinations: Vec<String>,
}

/// An operation that needs the current lease.
#[derive(Debug, Clone, Copy)]
enum Fenced {
    Renew,
    Defer { due_now: bool, destinations: u8 },
    Complete,
    HandBack,
    Skip,
    Quarantine,
}

struct Harness {
    backend: Backend,
    spool: Arc<dyn Spool>,
    msgs: Vec<Msg>,
    /// Leases the test holds, current and stale, oldest first.
    leases: Vec<Lease>,
    /// A takeover with a small count may leave a shard's XAUTOCLAIM cursor
    /// mid-list (Redis): the next pass then starts there, so until a full
    /// pass it may not reach every pending entry.
    cursor_moved: bool,
    /// Arrival times and due times are made up around this (a day ago).
    t0: i64,
}

fn fail(what: impl Into<String>) -> Result<(), String> {
    Err(what.into())
}

/// Bytes of message `n`, different for every message and offset.
fn body_of(n: usize, size: usize) -> Vec<u8> {
    let mut x = (n as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn recipients() -> Vec<Recipient> {
    ["t@friet.pan", "u@b.example"]
        .iter()
        .map(|a| Recipient {
            address: (*a).into(),
            domain: a.split('@').nth(1).unwrap_or_default().into(),
            state: RecipientState::Pending,
            last_reply: None,
            delay_warned: false,
            notify: None,
            orcpt: None,
        })
        .collect()
}

impl Harness {
    fn new(backend: Backend, spool: Arc<dyn Spool>) -> Harness {
        let t0 = chrono::Utc::now().timestamp_millis() - DAY_MS;
        Harness { backend, spool, msgs: Vec::new(), leases: Vec::new(), cursor_moved: false, t0 }
    }

    fn index_of(&self, id: &QueueId) -> Option<usize> {
        self.msgs.iter().position(|m| &m.id == id)
    }

    fn is_current(&self, lease: &Lease) -> bool {
        self.index_of(lease.id()).is_some_and(|i| self.msgs[i].holder() == Some(lease))
    }

    /// A lease the test holds: a current one when asked and there is one.
    fn pick(&self, r: LeaseRef) -> Option<Lease> {
        let current: Vec<&Lease> = self.leases.iter().filter(|l| self.is_current(l)).collect();
        if r.current && !current.is_empty() {
            return Some(current[r.ix % current.len()].clone());
        }
        (!self.leases.is_empty()).then(|| self.leases[r.ix % self.leases.len()].clone())
    }

    /// A committed message: preferably one for which `apt` holds.
    fn pick_msg(&self, r: MsgRef, apt: impl Fn(&Msg) -> bool) -> Option<usize> {
        let apt: Vec<usize> = (0..self.msgs.len()).filter(|i| apt(&self.msgs[*i])).collect();
        if r.apt && !apt.is_empty() {
            return Some(apt[r.ix % apt.len()]);
        }
        (!self.msgs.is_empty()).then(|| r.ix % self.msgs.len())
    }

    fn keep(&mut self, lease: Lease) {
        self.leases.push(lease);
        while self.leases.len() > KEPT_LEASES {
            let drop = self.leases.iter().position(|l| !self.is_current(l)).unwrap_or(0);
            self.leases.remove(drop);
        }
    }

    async fn snapshot(&self) -> Result<Snapshot, String> {
        let list = self.spool.list().await.map_err(|e| format!("list: {e}"))?;
        let stats = self.spool.stats(true).await.map_err(|e| format!("stats: {e}"))?;
        let destinations = self.spool.deferred_destinations().await.map_err(|e| format!("destinations: {e}"))?;
        Ok(Snapshot { list, stats, destinations })
    }

    async fn step(&mut self, op: &Op) -> Result<(), String> {
        match *op {
            Op::Commit { size, piece } => self.commit(size, piece).await,
            Op::Abandon { size, piece, drop } => self.abandon(size, piece, drop).await,
            Op::Lease { node, count, block } => self.lease(node, count, block).await,
            Op::TakeOver { node, count } => self.take_over(node, count).await,
            Op::Renew(r) => self.fenced(r, Fenced::Renew).await,
            Op::Defer { lease, due_now, destinations } => {
                self.fenced(lease, Fenced::Defer { due_now, destinations }).await
            }
            Op::Complete(r) => self.fenced(r, Fenced::Complete).await,
            Op::HandBack(r) => self.fenced(r, Fenced::HandBack).await,
            Op::Skip(r) => self.fenced(r, Fenced::Skip).await,
            Op::Quarantine(r) => self.fenced(r, Fenced::Quarantine).await,
            Op::Hold(m) => self.admin(m, AdminAction::Hold).await,
            Op::Release(m) => self.admin(m, AdminAction::Release).await,
            Op::Bounce(m) => self.admin(m, AdminAction::Bounce).await,
            Op::Delete(m) => self.admin(m, AdminAction::Delete).await,
            Op::ScheduleDue { far } => self.schedule_due(far).await,
            Op::Flush(d) => self.flush(d).await,
            Op::Crash(node) => {
                self.leases.retain(|l| l.owner() != NODES[node]);
                Ok(())
            }
            Op::ReadBody { lease, chunk } => match self.pick(lease) {
                Some(lease) => self.read_body(lease, chunk).await,
                None => Ok(()),
            },
            Op::ShowBody { msg, chunk } => self.show_body(msg, chunk).await,
            Op::SweepCorrupt => self.sweep_corrupt().await,
        }
    }

    async fn commit(&mut self, size: usize, piece: usize) -> Result<(), String> {
        let n = self.msgs.len();
        let id = QueueId::new();
        let mut msg = Msg {
            id: id.clone(),
            body: body_of(n, size),
            received_at: self.t0 + n as i64,
            place: Place::Ready(None),
            held: false,
            bounce: false,
            corrupt: false,
            attempts: 0,
            recipients: recipients(),
            grants: Vec::new(),
        };
        let mut body = self.spool.open_body(&id);
        for p in msg.body.chunks(piece) {
            body.write(p).await.map_err(|e| format!("write: {e}"))?;
        }
        if body.written() != size as u64 {
            return fail(format!("written() is {} after {size} bytes", body.written()));
        }
        // The stored size is what was written, whatever the envelope says.
        let mut env = msg.envelope("n0");
        env.size = 0;
        body.commit(&env).await.map_err(|e| format!("commit: {e}"))?;
        msg.place = Place::Ready(None);
        self.msgs.push(msg);
        Ok(())
    }

    async fn abandon(&mut self, size: usize, piece: usize, drop: bool) -> Result<(), String> {
        let mut body = self.spool.open_body(&QueueId::new());
        for p in body_of(1 << 20, size).chunks(piece) {
            body.write(p).await.map_err(|e| format!("write: {e}"))?;
        }
        if !drop {
            body.abort().await;
        }
        Ok(())
    }

    /// Checks a grant (lease or takeover) and records it.
    fn grant(&mut self, node: usize, lease: &Lease, was_leased: bool) -> Result<(), String> {
        if lease.owner() != NODES[node] {
            return fail(format!("granted to {} instead of {}: {lease:?}", lease.owner(), NODES[node]));
        }
        let Some(i) = self.index_of(lease.id()) else { return fail(format!("granted an unknown message: {lease:?}")) };
        let m = &mut self.msgs[i];
        match (&m.place, was_leased) {
            (Place::Ready(None), false) | (Place::Ready(Some(_)), true) => {}
            (place, _) => return fail(format!("granted {lease:?} of a message the model has as {place:?}")),
        }
        if m.grants.contains(lease) {
            return fail(format!("a fencing token was granted twice: {lease:?}"));
        }
        m.grants.push(lease.clone());
        m.place = Place::Ready(Some(lease.clone()));
        self.keep(lease.clone());
        Ok(())
    }

    fn distinct(got: &[Lease], count: usize) -> Result<(), String> {
        let ids: BTreeSet<&str> = got.iter().map(|l| l.id().as_str()).collect();
        if ids.len() != got.len() || got.len() > count {
            return fail(format!("{} leases (count {count}), {} messages: {got:?}", got.len(), ids.len()));
        }
        Ok(())
    }

    async fn lease(&mut self, node: usize, count: usize, block: bool) -> Result<(), String> {
        let waiting: Vec<QueueId> =
            self.msgs.iter().filter(|m| m.place == Place::Ready(None)).map(|m| m.id.clone()).collect();
        let block = if block { Duration::from_millis(5) } else { Duration::ZERO };
        let got = self.spool.lease(NODES[node], count, block).await.map_err(|e| format!("lease: {e}"))?;
        Self::distinct(&got, count)?;
        match self.backend {
            // Oldest first, as many as asked for.
            Backend::Sqlite => {
                let ids: Vec<QueueId> = got.iter().map(|l| l.id().clone()).collect();
                if ids[..] != waiting[..count.min(waiting.len())] {
                    return fail(format!("leased {ids:?}, expected the oldest {count} of {waiting:?}"));
                }
            }
            // Which shard is read first rotates, and COUNT is spread over
            // the shards: some of the waiting, but never none of them.
            Backend::Redis => {
                if got.is_empty() && !waiting.is_empty() {
                    return fail(format!("lease of {count} found nothing while {waiting:?} wait"));
                }
            }
        }
        for l in &got {
            self.grant(node, l, false)?;
        }
        Ok(())
    }

    async fn take_over(&mut self, node: usize, count: usize) -> Result<(), String> {
        let pending: BTreeSet<String> =
            self.msgs.iter().filter(|m| m.holder().is_some()).map(|m| m.id.to_string()).collect();
        let got =
            self.spool.take_over(NODES[node], Duration::ZERO, count).await.map_err(|e| format!("take_over: {e}"))?;
        Self::distinct(&got, count)?;
        let ids: BTreeSet<String> = got.iter().map(|l| l.id().to_string()).collect();
        let everything = count >= ALL && (self.backend == Backend::Sqlite || !self.cursor_moved);
        if everything && ids != pending {
            return fail(format!("takeover with idle 0 took {ids:?}, pending were {pending:?}"));
        }
        if !everything && ids.len() < count.min(pending.len()) && self.backend == Backend::Sqlite {
            return fail(format!("takeover of {count} took {ids:?} of {pending:?}"));
        }
        self.cursor_moved = count < ALL;
        for l in &got {
            self.grant(node, l, true)?;
        }
        Ok(())
    }

    async fn fenced(&mut self, r: LeaseRef, op: Fenced) -> Result<(), String> {
        let Some(lease) = self.pick(r) else { return Ok(()) };
        let Some(i) = self.index_of(lease.id()) else {
            return fail(format!("a lease of an unknown message: {lease:?}"));
        };
        let current = self.is_current(&lease);
        let before = if current { None } else { Some(self.snapshot().await?) };
        let due = if matches!(op, Fenced::Defer { due_now: true, .. }) { self.t0 } else { self.t0 + 10 * DAY_MS };
        let destinations: Vec<String> = match op {
            Fenced::Defer { destinations, .. } => DESTINATIONS
                .iter()
                .enumerate()
                .filter(|(b, _)| destinations & (1 << b) != 0)
                .map(|(_, d)| d.to_string())
                .collect(),
            _ => Vec::new(),
        };
        // The holder's result: one more attempt, a reply per recipient. The
        // flags are left false: the spool keeps the operator's.
        let mut env = self.msgs[i].envelope(lease.owner());
        env.attempts += 1;
        for r in &mut env.recipients {
            r.last_reply = Some(format!("451 4.4.1 attempt {}", env.attempts));
        }
        let result = match op {
            Fenced::Renew => self.spool.renew(&lease).await,
            Fenced::Defer { .. } => self.spool.defer(&lease, &env, due, &destinations).await,
            Fenced::Complete => self.spool.complete(&lease).await,
            Fenced::HandBack => self.spool.hand_back(&lease).await,
            Fenced::Skip => self.spool.skip(&lease).await,
            Fenced::Quarantine => self.spool.quarantine(&lease).await,
        };
        if let Some(before) = before {
            match result {
                Err(SpoolError::LeaseLost(id)) if id == *lease.id() => {}
                other => return fail(format!("{op:?} with stale {lease:?}: {other:?}, expected LeaseLost")),
            }
            let after = self.snapshot().await?;
            if before != after {
                return fail(format!("{op:?} with stale {lease:?} changed the queue:\n{before:#?}\n{after:#?}"));
            }
            return Ok(());
        }
        result.map_err(|e| format!("{op:?} with the current {lease:?}: {e}"))?;
        let m = &mut self.msgs[i];
        match op {
            Fenced::Renew => {}
            Fenced::Complete => m.place = Place::Completed,
            Fenced::HandBack => m.place = Place::Ready(None),
            Fenced::Defer { .. } => {
                m.attempts = env.attempts;
                m.recipients = env.recipients;
                m.place = if m.held { Place::Held } else { Place::Deferred { due, destinations } };
            }
            // Not held (released or bounced since the holder looked): it
            // must stay deliverable, never drop out of every place.
            Fenced::Skip => m.place = if m.held { Place::Held } else { Place::Ready(None) },
            Fenced::Quarantine => {
                m.place = Place::Held;
                m.held = true;
                m.corrupt = true;
            }
        }
        Ok(())
    }

    async fn admin(&mut self, r: MsgRef, action: AdminAction) -> Result<(), String> {
        let apt = |m: &Msg| m.live() && (action != AdminAction::Release || m.held);
        let Some(i) = self.pick_msg(r, apt) else { return Ok(()) };
        let m = &self.msgs[i];
        let live = m.live();
        let expected = live && (action != AdminAction::Release || m.held);
        let id = m.id.clone();
        let applied = self.spool.admin(&id, action).await.map_err(|e| format!("admin {action:?}: {e}"))?;
        if applied != expected {
            return fail(format!(
                "{action:?} of {id} ({:?}, held {}): {applied}, expected {expected}",
                m.place, m.held
            ));
        }
        if !applied {
            return Ok(());
        }
        let m = &mut self.msgs[i];
        match action {
            AdminAction::Hold => {
                m.held = true;
                // Leased: its holder settles it into the hold set.
                if matches!(m.place, Place::Ready(None) | Place::Deferred { .. }) {
                    m.place = Place::Held;
                }
            }
            AdminAction::Release => {
                m.held = false;
                m.corrupt = false;
                if m.place == Place::Held {
                    m.place = Place::Ready(None);
                }
            }
            AdminAction::Bounce => {
                m.bounce = true;
                m.held = false;
                m.corrupt = false;
                if matches!(m.place, Place::Held | Place::Deferred { .. }) {
                    m.place = Place::Ready(None);
                }
            }
            AdminAction::Delete => m.place = Place::Deleted,
        }
        Ok(())
    }

    async fn schedule_due(&mut self, far: bool) -> Result<(), String> {
        let now = if far { self.t0 + 20 * DAY_MS } else { self.t0 + 1 };
        let moved = self.spool.schedule_due(now, 1000).await.map_err(|e| format!("schedule_due: {e}"))?;
        self.undefer(moved, "schedule_due", |due, _| due <= now)
    }

    async fn flush(&mut self, d: usize) -> Result<(), String> {
        let dest = DESTINATIONS[d];
        let moved = self.spool.release(dest, 1000).await.map_err(|e| format!("release: {e}"))?;
        self.undefer(moved, "release", |_, dests| dests.iter().any(|x| x == dest))
    }

    /// Deferred messages that match go back to the ready streams.
    fn undefer(&mut self, moved: usize, op: &str, matches: impl Fn(i64, &[String]) -> bool) -> Result<(), String> {
        let mut expected = 0;
        for m in &mut self.msgs {
            if let Place::Deferred { due, destinations } = &m.place
                && matches(*due, destinations)
            {
                m.place = Place::Ready(None);
                expected += 1;
            }
        }
        if moved != expected {
            return fail(format!("{op} moved {moved}, expected {expected}"));
        }
        Ok(())
    }

    /// A whole body, or an error; never fewer or other bytes.
    async fn read_whole(&self, lease: Lease, i: usize, chunk: usize) -> Result<(), String> {
        let m = &self.msgs[i];
        let read = BodyReader::new(self.spool.clone(), lease.clone(), m.body.len() as u64, chunk).read_all().await;
        match read {
            Ok(bytes) if bytes == m.body => Ok(()),
            Ok(bytes) => fail(format!(
                "body of {} ({:?}) read as {} bytes, {} committed{}",
                m.id,
                m.place,
                bytes.len(),
                m.body.len(),
                if bytes.len() == m.body.len() { " (other bytes)" } else { "" }
            )),
            Err(e) if m.live() => fail(format!("body of live {} ({:?}) unreadable with {lease:?}: {e}", m.id, m.place)),
            Err(_) => Ok(()),
        }
    }

    async fn read_body(&self, lease: Lease, chunk: usize) -> Result<(), String> {
        let Some(i) = self.index_of(lease.id()) else { return fail("a lease of an unknown message") };
        self.read_whole(lease, i, chunk).await
    }

    async fn show_body(&self, r: MsgRef, chunk: usize) -> Result<(), String> {
        let Some(i) = self.pick_msg(r, Msg::live) else { return Ok(()) };
        let m = &self.msgs[i];
        match self.spool.locate(&m.id).await.map_err(|e| format!("locate: {e}"))? {
            Some(lease) if m.live() => self.read_whole(lease, i, chunk).await,
            None if !m.live() => Ok(()),
            found => fail(format!("locate {} ({:?}): {found:?}", m.id, m.place)),
        }
    }

    async fn sweep_corrupt(&mut self) -> Result<(), String> {
        let done = self.spool.maintain(NODES[0], Duration::ZERO).await.map_err(|e| format!("maintain: {e}"))?;
        let mut expected = 0;
        for m in self.msgs.iter_mut().filter(|m| m.corrupt && m.live()) {
            m.place = Place::Swept;
            expected += 1;
        }
        if done.corrupt_removed != expected {
            return fail(format!("maintain removed {} corrupt messages, expected {expected}", done.corrupt_removed));
        }
        Ok(())
    }

    /// The invariants, and the queue against the model.
    async fn check(&self) -> Result<(), String> {
        let audit = self.spool.audit().await.map_err(|e| format!("audit: {e}"))?;
        let live: Vec<&Msg> = self.msgs.iter().filter(|m| m.live()).collect();
        if !audit.is_clean() || audit.messages != live.len() as u64 {
            return fail(format!("audit of {} live messages: {audit:?}", live.len()));
        }
        let snap = self.snapshot().await?;

        let listed: Vec<&QueueId> = snap.list.iter().map(|(e, _)| &e.id).collect();
        let expected: Vec<&QueueId> = live.iter().map(|m| &m.id).collect();
        if listed != expected {
            let gone: Vec<_> =
                self.msgs.iter().filter(|m| !m.live() && listed.contains(&&m.id)).map(|m| (&m.id, &m.place)).collect();
            return fail(format!("queue lists {listed:?}, the model has {expected:?} (back after leaving: {gone:?})"));
        }
        for ((env, state), m) in snap.list.iter().zip(&live) {
            let place_ok = match (&m.place, state) {
                // Held while it still has its live entry (leased, or handed
                // back before its holder skipped it) is listed held.
                (Place::Ready(_), MessageState::Active) => !m.held,
                (Place::Ready(_), MessageState::Held) => m.held,
                (Place::Deferred { due, .. }, MessageState::Deferred { due: listed }) => due == listed && !m.held,
                (Place::Held, MessageState::Held) => true,
                _ => false,
            };
            let flags_ok = env.held == m.held && env.bounce_requested == m.bounce;
            let content_ok =
                env.attempts == m.attempts && env.recipients == m.recipients && env.size == m.body.len() as u64;
            if !place_ok || !flags_ok || !content_ok {
                return fail(format!(
                    "{} is listed {state:?} with {env:?}; the model has {:?}, held {}, bounce {}, corrupt {}, attempts {}",
                    m.id, m.place, m.held, m.bounce, m.corrupt, m.attempts
                ));
            }
        }

        let count = |f: fn(&Place) -> bool| live.iter().filter(|m| f(&m.place)).count() as u64;
        let mut by_destination: BTreeMap<String, u64> = BTreeMap::new();
        for m in &live {
            if let Place::Deferred { destinations, .. } = &m.place {
                for d in destinations {
                    *by_destination.entry(d.clone()).or_default() += 1;
                }
            }
        }
        let s = &snap.stats;
        let expected_stats = (
            live.len() as u64,
            count(|p| *p == Place::Ready(None)),
            count(|p| matches!(p, Place::Ready(Some(_)))),
            count(|p| matches!(p, Place::Deferred { .. })),
            count(|p| *p == Place::Held),
            live.iter().map(|m| m.received_at).min(),
        );
        let stats = (s.messages, s.ready, s.leased, s.deferred, s.held, s.oldest_received_at);
        if stats != expected_stats {
            return fail(format!(
                "stats (messages, ready, leased, deferred, held, oldest) {stats:?}, expected {expected_stats:?}"
            ));
        }
        let dests: Vec<(String, u64)> = by_destination.into_iter().collect();
        if s.deferred_by_destination != dests {
            return fail(format!("deferred by destination {:?}, expected {dests:?}", s.deferred_by_destination));
        }
        let names: Vec<String> = dests.iter().map(|(d, _)| d.clone()).collect();
        if snap.destinations != names {
            return fail(format!("deferred destinations {:?}, expected {names:?}", snap.destinations));
        }

        // The holder reads the envelope; a message that left is gone for
        // every lease. A stale lease of a live message may still read it:
        // the back ends differ (Redis answers after a takeover and after
        // the entry was retired, SQLite only until the next grant).
        for lease in &self.leases {
            let Some(i) = self.index_of(lease.id()) else { return fail("a lease of an unknown message") };
            let m = &self.msgs[i];
            let env = self.spool.envelope(lease).await.map_err(|e| format!("envelope: {e}"))?;
            let ok = match &env {
                Some(env) if self.is_current(lease) => {
                    env.id == m.id
                        && env.held == m.held
                        && env.bounce_requested == m.bounce
                        && env.attempts == m.attempts
                }
                None => !self.is_current(lease),
                Some(_) => m.live(),
            };
            if !ok {
                return fail(format!("envelope with {lease:?} ({:?}, held {}): {env:?}", m.place, m.held));
            }
        }
        Ok(())
    }
}

/// Deletes one case's keys from the shared Redis, however the case ends.
struct SharedKeys(String);

impl Drop for SharedKeys {
    fn drop(&mut self) {
        clear_shared_queue(&self.0);
    }
}

fn open(backend: Backend, shards: u32, dir: &std::path::Path, prefix: &str) -> Arc<dyn Spool> {
    let url = match backend {
        Backend::Redis => SHARED_REDIS.to_string(),
        Backend::Sqlite => format!("sqlite://{}", dir.join("queue.db").display()),
    };
    let config = QueueConfig { url, prefix: prefix.into(), shards, chunk_size: CHUNK_SIZE, ..QueueConfig::default() };
    mxrelay::spool::open(&config).expect("spool")
}

/// Runs `ops` on a fresh queue; the error names the step that broke.
fn run_case(backend: Backend, shards: u32, ops: &[Op]) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let keys = SharedKeys(unique("mxrmodel"));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let result = runtime.block_on(async {
        let spool = open(backend, shards, dir.path(), &keys.0);
        spool.prepare().await.map_err(|e| format!("prepare: {e}"))?;
        let mut h = Harness::new(backend, spool);
        for (n, op) in ops.iter().enumerate() {
            let done = match h.step(op).await {
                Ok(()) => h.check().await,
                Err(e) => Err(e),
            };
            done.map_err(|e| format!("{backend:?}, step {n} {op:?}: {e}"))?;
        }
        Ok(())
    });
    drop(runtime);
    drop(keys);
    result
}

fn config() -> Config {
    let mut config = Config { failure_persistence: None, ..Config::default() };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = CASES;
    }
    if std::env::var_os("PROPTEST_MAX_SHRINK_ITERS").is_none() {
        config.max_shrink_iters = 2000;
    }
    config
}

fn model_test(backend: Backend) {
    let mut runner = TestRunner::new(config());
    let result = runner.run(&case(), |(shards, ops)| run_case(backend, shards, &ops).map_err(TestCaseError::fail));
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, (shards, ops))) => {
            panic!("{backend:?} spool broke the model ({shards} shards); minimal sequence:\n{ops:#?}\n{why}")
        }
        Err(e) => panic!("{backend:?}: {e}"),
    }
}

/// Fixed sequences (minimal cases the model found), each on both back ends.
fn regression(cases: &[&[Op]]) {
    let mut failed = Vec::new();
    for ops in cases {
        for backend in [Backend::Redis, Backend::Sqlite] {
            if let Err(why) = run_case(backend, 2, ops) {
                failed.push(why);
            }
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

const CURRENT: LeaseRef = LeaseRef { ix: 0, current: true };
const FIRST: MsgRef = MsgRef { ix: 0, apt: false };

/// The holder saw the hold flag and skips, but the operator released (or
/// bounced) the message meanwhile: it must stay deliverable.
#[test]
fn a_message_released_before_its_holder_skips_it_stays_deliverable() {
    let commit = Op::Commit { size: 10, piece: 10 };
    let lease = Op::Lease { node: 0, count: 1, block: false };
    regression(&[
        &[commit.clone(), lease.clone(), Op::Hold(FIRST), Op::Release(FIRST), Op::Skip(CURRENT)],
        &[commit.clone(), lease.clone(), Op::Hold(FIRST), Op::Bounce(FIRST), Op::Skip(CURRENT)],
        // The shortest form: a skip of a message that is not held.
        &[commit, lease, Op::Skip(CURRENT)],
    ]);
}

#[test]
fn redis_spool_follows_the_model() {
    model_test(Backend::Redis);
}

#[test]
fn sqlite_spool_follows_the_model() {
    model_test(Backend::Sqlite);
}
