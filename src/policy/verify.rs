//! `verify`: a domain's recipients checked against its own server at RCPT
//! (Postfix's `reject_unverified_recipient`), so that a backup MX refuses
//! unknown users instead of bouncing to forged senders later.
//!
//! The node asks `relay_host` (`MAIL FROM:<>`, `RCPT TO:<addr>`, `QUIT`)
//! through a [`Probe`], and keeps a definite answer (2xx for
//! `verify.positive_expire_time`, 5xx for `verify.negative_expire_time`)
//! in the queue store, shared by every node. A server that gives none
//! (down, 4xx, too slow) leaves the address unverified, answered as
//! `verify.unreachable` says.
//!
//! Invariants: a cached answer needs no probe; one address is probed once
//! at a time on a node (the others wait for its answer) and, where the
//! store's claim allows, once in the cluster; probes are bounded per node
//! and per destination (a probe slot is waited for half of
//! `verify.timeout` at most, so a probe always has the other half); the
//! client never waits longer than `verify.timeout`; an unanswered probe is
//! never cached as an answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;

use crate::config::VerifyConfig;
use crate::domains::DomainRoute;
use crate::metrics::METRICS;
use crate::spool::{Recall, Verification, VerifyCache};

/// A destination that gave no answer is not probed again for this long:
/// while a primary is down, RCPT is answered at once (by
/// `verify.unreachable`) instead of after a connect timeout each.
pub const DOWN_MEMO: Duration = Duration::from_secs(30);
/// How often a node waiting for another node's probe looks for its answer.
const SHARED_POLL: Duration = Duration::from_millis(100);

/// What a probe learnt about one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAnswer {
    /// The server accepted RCPT; who said what (`host[ip]:port said: 250 …`).
    Deliverable(String),
    /// The server refused RCPT with a 5xx.
    Undeliverable(String),
    /// No answer about the address. `down`: the destination itself could
    /// not be reached (connection, greeting, TLS), so it is not asked again
    /// for [`DOWN_MEMO`].
    NoAnswer { why: String, down: bool },
}

/// Asks a domain's own server about one address (implemented by delivery,
/// which knows how to reach destinations).
#[async_trait::async_trait]
pub trait Probe: Send + Sync {
    async fn probe(&self, route: &DomainRoute, address: &str) -> ProbeAnswer;
}

/// What RCPT learns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Deliverable { said: String, cached: bool },
    Undeliverable { said: String, cached: bool },
    Unverified { why: String },
}

pub struct Verifier {
    cache: Arc<dyn VerifyCache>,
    probe: Arc<dyn Probe>,
    config: VerifyConfig,
    /// Probes at once from this node (`verify.concurrency`).
    node: Arc<Semaphore>,
    /// Probes at once per destination (`verify.destination_concurrency`).
    destinations: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Addresses being asked by this node, with the answer to come.
    asking: Mutex<HashMap<String, watch::Receiver<Option<Answer>>>>,
    /// Destinations that gave no answer, until when they are left alone.
    down: Mutex<HashMap<String, Instant>>,
}

/// Takes an address out of [`Verifier::asking`] however its asker ends
/// (answered, or its client went away mid-RCPT).
struct Asking<'a> {
    asking: &'a Mutex<HashMap<String, watch::Receiver<Option<Answer>>>>,
    key: &'a str,
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        self.asking.lock().unwrap_or_else(|e| e.into_inner()).remove(self.key);
    }
}

impl Verifier {
    pub fn new(cache: Arc<dyn VerifyCache>, probe: Arc<dyn Probe>, config: &VerifyConfig) -> Verifier {
        Verifier {
            cache,
            probe,
            node: Arc::new(Semaphore::new(config.concurrency)),
            config: config.clone(),
            destinations: Mutex::new(HashMap::new()),
            asking: Mutex::new(HashMap::new()),
            down: Mutex::new(HashMap::new()),
        }
    }

    /// What an unverified recipient gets (`verify.unreachable`).
    pub fn unreachable(&self) -> crate::config::VerifyUnreachable {
        self.config.unreachable
    }

    /// What `route`'s server says of `address` (as the client wrote it;
    /// `key` is its lower-case form the answer is kept under), within
    /// `verify.timeout`.
    pub async fn check(&self, route: &DomainRoute, address: &str, key: &str) -> Answer {
        let deadline = Instant::now() + self.config.timeout;
        let (sender, mut answer) = {
            let mut asking = self.asking.lock().unwrap_or_else(|e| e.into_inner());
            match asking.get(key) {
                Some(rx) => (None, rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    asking.insert(key.to_string(), rx.clone());
                    (Some(tx), rx)
                }
            }
        };
        let Some(sender) = sender else {
            // This node asks already: its answer serves this RCPT too.
            return match tokio::time::timeout_at(deadline, answer.wait_for(Option::is_some)).await {
                Ok(Ok(a)) => a.clone().unwrap_or_else(|| unverified("no answer")),
                _ => unverified(format!("no answer from {} within verify.timeout", destination(route))),
            };
        };
        let _asking = Asking { asking: &self.asking, key };
        let found = self.ask(route, address, key, deadline).await;
        sender.send_replace(Some(found.clone()));
        found
    }

    /// The cached answer, another node's, or this node's probe.
    async fn ask(&self, route: &DomainRoute, address: &str, key: &str, deadline: Instant) -> Answer {
        loop {
            match tokio::time::timeout_at(deadline, self.cache.recall_or_claim(key, self.config.timeout)).await {
                Err(_) => return unverified("the queue store did not answer in time"),
                Ok(Err(e)) => {
                    tracing::warn!(recipient = address, error = %e, "verify: cache unreachable; probing without it");
                    return self.probe(route, address, key, deadline, false).await;
                }
                Ok(Ok(Recall::Known(v))) if v.deliverable => {
                    return Answer::Deliverable { said: v.reply, cached: true };
                }
                Ok(Ok(Recall::Known(v))) => return Answer::Undeliverable { said: v.reply, cached: true },
                Ok(Ok(Recall::YoursToAsk)) => return self.probe(route, address, key, deadline, true).await,
                Ok(Ok(Recall::BeingAsked)) => {
                    if Instant::now() + SHARED_POLL >= deadline {
                        return unverified(format!(
                            "another node's probe of {} did not finish within verify.timeout",
                            destination(route)
                        ));
                    }
                    tokio::time::sleep(SHARED_POLL).await;
                }
            }
        }
    }

    /// This node's probe, within the limits; a definite answer is kept for
    /// the cluster, and `claimed` is let go of otherwise.
    async fn probe(&self, route: &DomainRoute, address: &str, key: &str, deadline: Instant, claimed: bool) -> Answer {
        let dest = destination(route);
        let outcome = self.probe_within_limits(route, address, &dest, deadline).await;
        let (deliverable, said, expire) = match outcome {
            ProbeAnswer::Deliverable(said) => (true, said, self.config.positive_expire_time),
            ProbeAnswer::Undeliverable(said) => (false, said, self.config.negative_expire_time),
            ProbeAnswer::NoAnswer { why, down } => {
                if down {
                    self.down.lock().unwrap_or_else(|e| e.into_inner()).insert(dest, Instant::now() + DOWN_MEMO);
                }
                if claimed && let Err(e) = self.cache.unclaim(key).await {
                    tracing::debug!(recipient = address, error = %e, "verify: could not let go of the claim");
                }
                return unverified(why);
            }
        };
        let now = chrono::Utc::now().timestamp_millis();
        let answer = Verification {
            address: key.to_string(),
            deliverable,
            reply: said.clone(),
            asked_at: now,
            expires_at: now.saturating_add(expire.as_millis() as i64),
        };
        if let Err(e) = self.cache.remember(&answer).await {
            tracing::warn!(recipient = address, error = %e, "verify: answer not kept in the cache");
        }
        if deliverable {
            Answer::Deliverable { said, cached: false }
        } else {
            Answer::Undeliverable { said, cached: false }
        }
    }

    async fn probe_within_limits(
        &self,
        route: &DomainRoute,
        address: &str,
        dest: &str,
        deadline: Instant,
    ) -> ProbeAnswer {
        let no_answer = |why: String| ProbeAnswer::NoAnswer { why, down: false };
        {
            let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
            match down.get(dest) {
                Some(until) if *until > Instant::now() => {
                    METRICS.recipient_verify_probes.with_label_values(&["skipped"]).inc();
                    return no_answer(format!(
                        "{dest} did not answer a probe within the last {}s",
                        DOWN_MEMO.as_secs()
                    ));
                }
                Some(_) => {
                    down.remove(dest);
                }
                None => {}
            }
        }
        // A slot is waited for half the time at most, so that a probe
        // always has the other half: one started with no time left would
        // fail and mark a destination down that was only busy.
        let Ok(_permits) = tokio::time::timeout_at(deadline - self.config.timeout / 2, self.permits(dest)).await else {
            METRICS.recipient_verify_probes.with_label_values(&["skipped"]).inc();
            tracing::warn!(
                recipient = address,
                destination = dest,
                "verify: every probe slot busy until verify.timeout"
            );
            return no_answer(format!(
                "no probe slot free for {dest} in time (verify.concurrency, verify.destination_concurrency)"
            ));
        };
        let outcome = match tokio::time::timeout_at(deadline, self.probe.probe(route, address)).await {
            Ok(outcome) => outcome,
            Err(_) => ProbeAnswer::NoAnswer {
                why: format!("no answer from {dest} within verify.timeout ({}s)", self.config.timeout.as_secs()),
                down: true,
            },
        };
        let (result, said) = match &outcome {
            ProbeAnswer::Deliverable(said) => ("deliverable", said.as_str()),
            ProbeAnswer::Undeliverable(said) => ("undeliverable", said.as_str()),
            ProbeAnswer::NoAnswer { why, .. } => ("no_answer", why.as_str()),
        };
        METRICS.recipient_verify_probes.with_label_values(&[result]).inc();
        tracing::info!(recipient = address, destination = dest, "verify: probe of <{address}>: {result}: {said}");
        outcome
    }

    /// A slot of the node's and one of the destination's.
    async fn permits(&self, dest: &str) -> (OwnedSemaphorePermit, OwnedSemaphorePermit) {
        let per_destination = {
            let mut all = self.destinations.lock().unwrap_or_else(|e| e.into_inner());
            // Destinations nobody probes now are dropped as the map grows.
            if all.len() > 1000 {
                all.retain(|_, s| s.available_permits() < self.config.destination_concurrency);
            }
            all.entry(dest.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(self.config.destination_concurrency)))
                .clone()
        };
        let destination = per_destination.acquire_owned().await.expect("never closed");
        let node = self.node.clone().acquire_owned().await.expect("never closed");
        (node, destination)
    }
}

fn unverified(why: impl Into<String>) -> Answer {
    Answer::Unverified { why: why.into() }
}

/// `[relay_host]:relay_port`, as delivery names the destination.
fn destination(route: &DomainRoute) -> String {
    crate::domains::destination::Destination::Relay { host: route.relay_host.clone(), port: route.relay_port }.key()
}

/// A remote server's words, made safe for one line of our own reply:
/// printable ASCII only, at most `max` characters.
pub fn printable(text: &str, max: usize) -> String {
    text.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).take(max).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::config::QueueConfig;
    use crate::domains::RecipientCheck;
    use crate::spool::sqlite::SqliteSpool;

    /// A server that answers after `delay`: 250 for `known@…`, 550 for
    /// other addresses, nothing (down) for `down@…`; it counts the probes.
    struct Scripted {
        delay: Duration,
        probes: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Probe for Scripted {
        async fn probe(&self, _route: &DomainRoute, address: &str) -> ProbeAnswer {
            self.probes.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            match address.to_lowercase().split('@').next() {
                Some("known") => ProbeAnswer::Deliverable("250 2.1.5 Ok".into()),
                Some("down") => ProbeAnswer::NoAnswer { why: "connection refused".into(), down: true },
                _ => ProbeAnswer::Undeliverable("550 5.1.1 User unknown".into()),
            }
        }
    }

    fn route() -> DomainRoute {
        DomainRoute {
            domain: "friet.pan".into(),
            relay_host: "192.0.2.1".into(),
            relay_port: 25,
            scan: false,
            recipients: RecipientCheck::Verify,
        }
    }

    /// A verifier over a migrated SQLite cache (migrating takes no part of
    /// any test's timeout).
    async fn verifier(dir: &tempfile::TempDir, delay: Duration, config: VerifyConfig) -> (Verifier, Arc<Scripted>) {
        use crate::spool::Admin;
        let queue =
            QueueConfig { url: format!("sqlite://{}", dir.path().join("q.db").display()), ..Default::default() };
        let spool = SqliteSpool::connect(&queue).unwrap();
        spool.prepare().await.unwrap();
        let probe = Arc::new(Scripted { delay, probes: AtomicUsize::new(0) });
        (Verifier::new(Arc::new(spool), probe.clone(), &config), probe)
    }

    #[tokio::test]
    async fn answers_are_kept_and_concurrent_askers_share_one_probe() {
        let dir = tempfile::tempdir().unwrap();
        let (v, probe) = verifier(&dir, Duration::from_millis(200), VerifyConfig::default()).await;
        let r = route();
        let ask = || v.check(&r, "Known@friet.pan", "known@friet.pan");
        let (a, b, c, d, e) = tokio::join!(ask(), ask(), ask(), ask(), ask());
        for a in [a, b, c, d, e] {
            assert_eq!(a, Answer::Deliverable { said: "250 2.1.5 Ok".into(), cached: false });
        }
        assert_eq!(probe.probes.load(Ordering::SeqCst), 1, "one probe for five askers");
        assert_eq!(
            v.check(&r, "known@friet.pan", "known@friet.pan").await,
            Answer::Deliverable { said: "250 2.1.5 Ok".into(), cached: true }
        );
        let refused = v.check(&r, "nobody@friet.pan", "nobody@friet.pan").await;
        assert_eq!(refused, Answer::Undeliverable { said: "550 5.1.1 User unknown".into(), cached: false });
        assert!(matches!(
            v.check(&r, "nobody@friet.pan", "nobody@friet.pan").await,
            Answer::Undeliverable { cached: true, .. }
        ));
        assert_eq!(probe.probes.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_destination_without_answer_is_not_asked_again_for_a_while_and_nothing_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (v, probe) = verifier(&dir, Duration::ZERO, VerifyConfig::default()).await;
        let r = route();
        assert!(matches!(v.check(&r, "down@friet.pan", "down@friet.pan").await, Answer::Unverified { .. }));
        let again = v.check(&r, "other@friet.pan", "other@friet.pan").await;
        assert!(matches!(&again, Answer::Unverified { why } if why.contains("did not answer a probe")), "{again:?}");
        assert_eq!(probe.probes.load(Ordering::SeqCst), 1, "the down destination is left alone");
        assert!(v.cache.recall(&crate::spool::Scope::All).await.unwrap().is_empty(), "no answer kept");
    }

    #[tokio::test]
    async fn a_probe_slower_than_the_timeout_leaves_the_address_unverified() {
        let dir = tempfile::tempdir().unwrap();
        let config = VerifyConfig { timeout: Duration::from_secs(1), ..Default::default() };
        let (v, _) = verifier(&dir, Duration::from_secs(60), config).await;
        // Waiting for the probe would have answered Deliverable.
        let a = v.check(&route(), "known@friet.pan", "known@friet.pan").await;
        assert!(matches!(&a, Answer::Unverified { why } if why.contains("within verify.timeout")), "{a:?}");
    }

    #[tokio::test]
    async fn probes_past_the_destination_limit_wait_and_give_up_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let config = VerifyConfig { timeout: Duration::from_secs(2), destination_concurrency: 1, ..Default::default() };
        let (v, probe) = verifier(&dir, Duration::from_secs(60), config).await;
        let r = route();
        let (a, b) = tokio::join!(v.check(&r, "a@friet.pan", "a@friet.pan"), v.check(&r, "b@friet.pan", "b@friet.pan"));
        let mut whys: Vec<String> = [a, b]
            .into_iter()
            .map(|x| match x {
                Answer::Unverified { why } => why,
                other => panic!("{other:?}"),
            })
            .collect();
        whys.sort();
        assert!(whys[0].contains("no answer from [192.0.2.1]:25 within verify.timeout"), "{whys:?}");
        assert!(whys[1].contains("no probe slot free for [192.0.2.1]:25 in time"), "{whys:?}");
        assert_eq!(probe.probes.load(Ordering::SeqCst), 1, "one slot for the destination");
    }

    #[test]
    fn remote_words_are_made_one_printable_line() {
        assert_eq!(printable("550 5.1.1 <ü@x>\tno\r\n", 100), "550 5.1.1 <?@x>?no??");
        assert_eq!(printable("abcdef", 3), "abc");
    }
}
