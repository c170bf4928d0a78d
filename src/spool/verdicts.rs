//! Recipient verification answers, kept in the queue store so that every
//! node of the cluster shares them (Postfix's `verify(8)` cache, but one
//! for all nodes): what a domain's own server said of an address, until the
//! answer expires, and which node is asking it now, so that two nodes
//! asking about one address at once make one probe.
//!
//! Invariant: only a definite answer (the server's 2xx or 5xx) is kept; a
//! server that did not answer leaves nothing behind but an expiring claim.

use serde::{Deserialize, Serialize};

use super::SpoolError;

/// What a domain's server said of one address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    /// `local@domain`, all lower case, the domain as A-labels.
    pub address: String,
    /// The server accepted it (2xx); `false`: it refused it (5xx).
    pub deliverable: bool,
    /// Who said it and how: `host[ip]:port said: 550 5.1.1 …`.
    pub reply: String,
    /// When it was asked and until when the answer holds (unix ms).
    pub asked_at: i64,
    pub expires_at: i64,
}

/// The answer kept for an address, or who asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recall {
    Known(Verification),
    /// Nothing kept and nobody asking: this node asks, and holds the claim.
    YoursToAsk,
    /// Another node asks now: its answer will be kept.
    BeingAsked,
}

/// Which answers an operator command is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Address(String),
    Domain(String),
    All,
}

impl Scope {
    pub fn covers(&self, address: &str) -> bool {
        match self {
            Scope::Address(a) => a == address,
            Scope::Domain(d) => address.rsplit_once('@').is_some_and(|(_, domain)| domain == d),
            Scope::All => true,
        }
    }
}

/// The shared verification cache, on every queue back end.
#[async_trait::async_trait]
pub trait VerifyCache: Send + Sync {
    /// The unexpired answer for `address`; else, when no node is asking,
    /// the claim to ask, held for `hold` at most; else [`Recall::BeingAsked`].
    /// One round trip.
    async fn recall_or_claim(&self, address: &str, hold: std::time::Duration) -> Result<Recall, SpoolError>;
    /// Keeps `answer` until its `expires_at`, and ends the claim on its address.
    async fn remember(&self, answer: &Verification) -> Result<(), SpoolError>;
    /// Ends a claim without an answer (the server gave none).
    async fn unclaim(&self, address: &str) -> Result<(), SpoolError>;
    /// The unexpired answers in `scope`, by address.
    async fn recall(&self, scope: &Scope) -> Result<Vec<Verification>, SpoolError>;
    /// Forgets the answers in `scope`; returns how many were kept.
    async fn forget(&self, scope: &Scope) -> Result<usize, SpoolError>;
}
