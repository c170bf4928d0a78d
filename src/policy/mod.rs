//! Who may send what to whom: the seed's `smtpd_relay_restrictions` and
//! `smtpd_recipient_restrictions`, evaluated at RCPT (Postfix's
//! `smtpd_delay_reject = yes`), in the seed's order:
//!
//! `permit_mynetworks` → relay check (listed domain, else `454 4.7.1 Relay
//! access denied`; `permit_sasl_authenticated` for AUTH clients) →
//! `reject_invalid_hostname` → `reject_non_fqdn_sender` →
//! `reject_unknown_sender_domain` → `reject_non_fqdn_recipient` →
//! `reject_unknown_recipient_domain`.
//!
//! Invariant: an unlisted domain is never accepted from an untrusted client,
//! and a lookup that could not be made (no domain snapshot, DNS failure)
//! gives a 4xx, never a 5xx and never a 250.

pub mod verify;

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::config::VerifyUnreachable;
use crate::dns::Dns;
use crate::domains::{DomainRoute, Domains, Lookup, RecipientCheck};
use crate::metrics::METRICS;
use crate::proto::address::{self, Mailbox, Path};
use crate::proto::reply::Reply;

/// The restriction switches, from the config.
#[derive(Debug, Clone)]
pub struct Restrictions {
    pub mynetworks: Vec<IpNet>,
    pub reject_unknown_sender_domain: bool,
    pub reject_unknown_recipient_domain: bool,
}

/// What the session knows about the client when policy is asked.
#[derive(Debug, Clone)]
pub struct Client {
    pub ip: IpAddr,
    pub helo: Option<String>,
    /// SMTP AUTH succeeded (`permit_sasl_authenticated`).
    pub authenticated: bool,
}

/// The metric label of a RCPT outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RcptResult {
    Accepted,
    RelayDenied,
    NoSnapshot,
    InvalidHelo,
    NonFqdn,
    UnknownDomain,
    UnknownRecipient,
    Tempfail,
}

impl RcptResult {
    pub fn label(self) -> &'static str {
        match self {
            RcptResult::Accepted => "accepted",
            RcptResult::RelayDenied => "relay_denied",
            RcptResult::NoSnapshot => "no_snapshot",
            RcptResult::InvalidHelo => "invalid_helo",
            RcptResult::NonFqdn => "non_fqdn",
            RcptResult::UnknownDomain => "unknown_domain",
            RcptResult::UnknownRecipient => "unknown_recipient",
            RcptResult::Tempfail => "tempfail",
        }
    }
}

pub type Verdict = Result<(), (Reply, RcptResult)>;

/// Postfix's `relay_recipient_maps`: with a recipient table, only its
/// addresses (or an `@domain` catch-all) are accepted, from the snapshot
/// (no query per recipient). The local part compares without case, as in
/// Postfix's table lookups.
fn in_recipient_table(table: &std::collections::HashSet<String>, rcpt: &Mailbox, domain: &str) -> Verdict {
    let address = format!("{}@{domain}", rcpt.local.to_lowercase());
    let known = table.contains(&address) || table.contains(&format!("@{domain}"));
    let result = if known { "accepted" } else { "rejected" };
    METRICS.recipient_checks.with_label_values(&["table", result]).inc();
    if known {
        return Ok(());
    }
    tracing::info!(recipient = %rcpt.raw, "recipient not in the relay recipient table of {domain}");
    Err((
        Reply::new(
            550,
            "5.1.1",
            format!("<{}>: Recipient address rejected: User unknown in relay recipient table", rcpt.raw),
        ),
        RcptResult::UnknownRecipient,
    ))
}

/// Longest part of a domain server's reply quoted in ours.
const QUOTED_REPLY_LIMIT: usize = 300;

/// Postfix's `reject_unverified_recipient`, in its words: the domain's own
/// server refused the address (550 5.1.1), or did not answer (as
/// `verify.unreachable` says: accepted, or 450 4.1.1).
fn verified(answer: verify::Answer, unreachable: VerifyUnreachable, rcpt: &Mailbox) -> Verdict {
    let (result, verdict) = match answer {
        verify::Answer::Deliverable { said, cached } => {
            if cached {
                tracing::debug!(recipient = %rcpt.raw, "recipient verified before: {said}");
            }
            ("accepted", Ok(()))
        }
        verify::Answer::Undeliverable { said, cached } => {
            let text = format!(
                "<{}>: Recipient address rejected: undeliverable address: {}",
                rcpt.raw,
                verify::printable(&said, QUOTED_REPLY_LIMIT)
            );
            if cached {
                tracing::info!(recipient = %rcpt.raw, "recipient refused by its server before: {said}");
            }
            ("rejected", Err((Reply::new(550, "5.1.1", text), RcptResult::UnknownRecipient)))
        }
        verify::Answer::Unverified { why } => {
            let why = verify::printable(&why, QUOTED_REPLY_LIMIT);
            let verdict = match unreachable {
                VerifyUnreachable::Accept => {
                    tracing::info!(recipient = %rcpt.raw, "recipient accepted unverified (verify.unreachable = accept): {why}");
                    Ok(())
                }
                VerifyUnreachable::Tempfail => Err((
                    Reply::new(
                        450,
                        "4.1.1",
                        format!("<{}>: Recipient address rejected: unverified address: {why}", rcpt.raw),
                    ),
                    RcptResult::Tempfail,
                )),
            };
            ("unverified", verdict)
        }
    };
    METRICS.recipient_checks.with_label_values(&["verify", result]).inc();
    verdict
}

pub struct Policy {
    restrictions: std::sync::RwLock<Arc<Restrictions>>,
    pub domains: Arc<Domains>,
    pub dns: Dns,
    verifier: verify::Verifier,
}

impl Policy {
    pub fn new(restrictions: Restrictions, domains: Arc<Domains>, dns: Dns, verifier: verify::Verifier) -> Policy {
        Policy { restrictions: std::sync::RwLock::new(Arc::new(restrictions)), domains, dns, verifier }
    }

    /// A listed domain's own check of its recipients (`relay_recipient_checks`).
    async fn known_recipient(&self, route: &DomainRoute, rcpt: &Mailbox, domain: &str) -> Verdict {
        match &route.recipients {
            RecipientCheck::None => Ok(()),
            RecipientCheck::Table(table) => in_recipient_table(table, rcpt, domain),
            RecipientCheck::Verify => {
                let key = format!("{}@{domain}", rcpt.local.to_lowercase());
                let answer = self.verifier.check(route, &rcpt.raw, &key).await;
                verified(answer, self.verifier.unreachable(), rcpt)
            }
        }
    }

    fn restrictions(&self) -> Arc<Restrictions> {
        self.restrictions.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Swaps the restrictions (SIGHUP reload).
    pub fn set_restrictions(&self, restrictions: Restrictions) {
        *self.restrictions.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(restrictions);
    }

    pub fn is_mynetworks(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.restrictions().mynetworks.iter().any(|n| n.contains(&ip))
    }

    /// Sender checks; their result is cached per transaction by the session.
    pub async fn check_sender(&self, sender: &Path) -> Verdict {
        let Path::Mailbox(m) = sender else { return Ok(()) };
        if !m.is_fqdn() {
            return Err((
                Reply::new(504, "5.5.2", format!("<{}>: Sender address rejected: need fully-qualified address", m.raw)),
                RcptResult::NonFqdn,
            ));
        }
        if self.restrictions().reject_unknown_sender_domain {
            self.domain_exists(m, "Sender", "4.1.8").await?;
        }
        Ok(())
    }

    /// The RCPT decision. `sender_verdict` is [`Policy::check_sender`]'s
    /// result for this transaction, computed at most once.
    pub async fn check_recipient(
        &self,
        client: &Client,
        rcpt: &Mailbox,
        sender_verdict: impl AsyncFnOnce() -> Verdict,
    ) -> Verdict {
        // permit_mynetworks, permit_sasl_authenticated; a listed domain's
        // recipient table applies to them too (Postfix's
        // smtpd_reject_unlisted_recipient runs after the restrictions).
        if self.is_mynetworks(client.ip) || client.authenticated {
            return match rcpt.domain_name().map(|d| (d, self.domains.lookup(d))) {
                Some((domain, Lookup::Listed(route))) => self.known_recipient(&route, rcpt, domain).await,
                _ => Ok(()),
            };
        }
        // defer_unauth_destination: only listed domains, no routing tricks.
        let denied =
            || (Reply::new(454, "4.7.1", format!("<{}>: Relay access denied", rcpt.raw)), RcptResult::RelayDenied);
        if rcpt.has_routing() {
            return Err(denied());
        }
        let Some(domain) = rcpt.domain_name() else { return Err(denied()) };
        let route = match self.domains.lookup(domain) {
            Lookup::Listed(route) => route,
            Lookup::Unlisted => return Err(denied()),
            Lookup::NoSnapshot | Lookup::UnlistedStale => {
                return Err((Reply::temp_lookup_failure(&format!("<{}>", rcpt.raw)), RcptResult::NoSnapshot));
            }
        };
        // reject_invalid_hostname
        let helo = client.helo.as_deref().unwrap_or("");
        if !address::valid_helo(helo) {
            return Err((
                Reply::new(501, "5.5.2", format!("<{helo}>: Helo command rejected: Invalid name")),
                RcptResult::InvalidHelo,
            ));
        }
        sender_verdict().await?;
        if !rcpt.is_fqdn() {
            return Err((
                Reply::new(
                    504,
                    "5.5.2",
                    format!("<{}>: Recipient address rejected: need fully-qualified address", rcpt.raw),
                ),
                RcptResult::NonFqdn,
            ));
        }
        if self.restrictions().reject_unknown_recipient_domain {
            self.domain_exists(rcpt, "Recipient", "4.1.2").await?;
        }
        self.known_recipient(&route, rcpt, domain).await
    }

    /// Postfix's `450 4.1.x Domain not found`, or `451 4.4.3` when DNS
    /// could not answer.
    async fn domain_exists(&self, m: &Mailbox, role: &str, enhanced: &'static str) -> Verdict {
        let Some(name) = m.domain_name() else { return Ok(()) };
        match self.dns.domain_exists(name).await {
            Ok(true) => Ok(()),
            Ok(false) => Err((
                Reply::new(450, enhanced, format!("<{}>: {role} address rejected: Domain not found", m.raw)),
                RcptResult::UnknownDomain,
            )),
            Err(e) => {
                tracing::warn!(domain = name, error = %e, "DNS lookup failed; deferring");
                Err((
                    Reply::new(
                        451,
                        "4.4.3",
                        format!("<{}>: {role} address rejected: Temporary DNS lookup failure", m.raw),
                    ),
                    RcptResult::Tempfail,
                ))
            }
        }
    }
}
