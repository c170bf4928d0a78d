//! The envelope: MAIL (its RFC 1869 parameters checked by
//! [`crate::proto::params`]) and RCPT, where `policy` decides, the
//! per-client message and recipient rates, and the recipient limit. The
//! transaction built here also carries the body of a BDAT transfer in
//! progress, so content can only follow MAIL.

use super::Session;
use crate::metrics::METRICS;
use crate::policy::{Client, RcptResult, Verdict};
use crate::proto::address::{self, AddressError, Path};
use crate::proto::params::{self, MailParams, RcptParams};
use crate::proto::reply::Reply;
use crate::smtp::incoming::Incoming;
use crate::smtp::limits::Event;
use crate::spool::{Recipient, RecipientState};

/// The envelope being built between MAIL and the end of the message.
pub(super) struct Transaction {
    pub(super) sender: Path,
    pub(super) smtputf8: bool,
    pub(super) eight_bit: bool,
    pub(super) recipients: Vec<Recipient>,
    /// RFC 3461 `RET` and `ENVID`.
    pub(super) dsn_ret: Option<String>,
    pub(super) dsn_envid: Option<String>,
    /// RCPTs refused for the recipient limit so far.
    overshoot: usize,
    /// Sender checks run once, at the first RCPT that needs them.
    sender_verdict: Option<Verdict>,
    /// A BDAT transfer in progress (between the first chunk and LAST).
    pub(super) bdat: Option<Incoming>,
}

impl Session {
    pub(super) async fn mail(&mut self, path: &str, params: &[(String, Option<String>)]) {
        if self.greeting.name().is_none() && self.config().smtpd_helo_required {
            let reply = Reply::bad_sequence("send HELO/EHLO first");
            self.log_reject("MAIL", &reply, None);
            return self.reply(reply);
        }
        if self.tx.is_some() {
            return self.reply(Reply::bad_sequence("nested MAIL command"));
        }
        if self.unauth_pipelining() {
            return;
        }
        let MailParams { smtputf8, eight_bit, dsn_ret, dsn_envid } =
            match params::mail_params(params, self.greeting.esmtp(), self.config().message_size_limit) {
                Ok(asked) => asked,
                Err((reply, refusal)) => {
                    if refusal {
                        self.log_reject("MAIL", &reply, None);
                    }
                    return self.reply(reply);
                }
            };
        if !self.within_rate(Event::Message, self.config().smtp.message_rate_limit) {
            let reply = Reply::new(450, "4.7.1", format!("Error: too much mail from {}", self.client.ip));
            self.log_reject("MAIL", &reply, None);
            return self.reply(reply);
        }
        let sender = match address::parse_path(path, self.config().strict_rfc821_envelopes, smtputf8) {
            Ok(p) => p,
            Err(e) => {
                let reply = address_reply(e, path, "5.1.7", "sender");
                self.log_reject("MAIL", &reply, None);
                return self.reply(reply);
            }
        };
        self.tx = Some(Transaction {
            sender,
            smtputf8,
            eight_bit,
            recipients: Vec::new(),
            dsn_ret,
            dsn_envid,
            overshoot: 0,
            sender_verdict: None,
            bdat: None,
        });
        self.reply(Reply::new(250, "2.1.0", "Ok"));
    }

    /// Counts one event of this client against `limit` (per
    /// `smtp.rate_window`); `mynetworks` is exempt, as from Postfix's anvil.
    fn within_rate(&self, event: Event, limit: u32) -> bool {
        if limit == 0 || self.shared.policy.is_mynetworks(self.client.ip) {
            return true;
        }
        let ok = self.shared.anvil.hit(self.client.ip, event, limit, self.config().smtp.rate_window);
        if !ok {
            let name = event.label();
            METRICS.smtp_limit_hits.with_label_values(&[name]).inc();
            tracing::warn!(client = %self.peer(), limit, "{name} limit exceeded");
        }
        ok
    }

    /// `452 4.5.3`: the client sends the rest in a later transaction. Only
    /// RCPTs past `smtpd_recipient_overshoot_limit` count as errors, so a
    /// client that pipelines many recipients keeps those accepted.
    fn too_many_recipients(&mut self) {
        METRICS.smtp_rcpt.with_label_values(&["too_many"]).inc();
        let reply = Reply::new(452, "4.5.3", "Error: too many recipients");
        let overshoot = self.tx.as_mut().map_or(0, |t| {
            t.overshoot += 1;
            t.overshoot
        });
        if overshoot == 1 {
            tracing::info!(client = %self.peer(), limit = self.config().smtpd_recipient_limit, "recipient limit reached; further recipients get 452");
        }
        if overshoot > self.config().smtpd_recipient_overshoot_limit {
            self.reply(reply);
        } else {
            self.conn.queue(&reply);
        }
    }

    pub(super) async fn rcpt(&mut self, path: &str, params: &[(String, Option<String>)]) {
        let Some((count, smtputf8)) = self.tx.as_ref().map(|t| (t.recipients.len(), t.smtputf8)) else {
            return self.reply(Reply::bad_sequence("need MAIL command"));
        };
        if self.unauth_pipelining() {
            return;
        }
        let RcptParams { notify, orcpt } = match params::rcpt_params(params, self.greeting.esmtp()) {
            Ok(p) => p,
            Err(reply) => return self.reply(reply),
        };
        if count >= self.config().smtpd_recipient_limit {
            return self.too_many_recipients();
        }
        let mailbox = match address::parse_path(path, self.config().strict_rfc821_envelopes, smtputf8) {
            Ok(Path::Mailbox(m)) => m,
            Ok(Path::Null) => {
                return self.reply(Reply::new(501, "5.1.3", "Bad recipient address syntax"));
            }
            Err(e) => {
                let reply = if e == AddressError::SourceRoute {
                    METRICS.smtp_rcpt.with_label_values(&[RcptResult::RelayDenied.label()]).inc();
                    Reply::new(454, "4.7.1", format!("{path}: Relay access denied"))
                } else {
                    METRICS.smtp_rcpt.with_label_values(&["syntax"]).inc();
                    address_reply(e, path, "5.1.3", "recipient")
                };
                self.log_reject("RCPT", &reply, Some(path));
                return self.reply(reply);
            }
        };
        if !self.within_rate(Event::Recipient, self.config().smtp.recipient_rate_limit) {
            let reply = Reply::new(450, "4.7.1", format!("Error: too many recipients from {}", self.client.ip));
            self.log_reject("RCPT", &reply, Some(path));
            return self.reply(reply);
        }
        let client = Client {
            ip: self.client.ip,
            helo: self.greeting.name().map(String::from),
            authenticated: self.auth.is_some(),
        };
        let shared = self.shared.clone();
        let tx = self.tx.as_mut().expect("checked above");
        let cached = tx.sender_verdict.clone();
        let sender = tx.sender.clone();
        let mut computed = None;
        let verdict = shared
            .policy
            .check_recipient(&client, &mailbox, async || match cached {
                Some(v) => v,
                None => {
                    let v = shared.policy.check_sender(&sender).await;
                    computed = Some(v.clone());
                    v
                }
            })
            .await;
        if let Some(v) = computed {
            tx.sender_verdict = Some(v);
        }
        match verdict {
            Ok(()) => {
                METRICS.smtp_rcpt.with_label_values(&[RcptResult::Accepted.label()]).inc();
                let domain = match &mailbox.domain {
                    Some(address::Domain::Name(n)) => n.clone(),
                    Some(address::Domain::Literal(l)) => l.clone(),
                    None => String::new(),
                };
                if !tx.recipients.iter().any(|r| r.address == mailbox.raw) {
                    tx.recipients.push(Recipient {
                        address: mailbox.raw.clone(),
                        domain,
                        state: RecipientState::Pending,
                        last_reply: None,
                        delay_warned: false,
                        notify,
                        orcpt,
                    });
                }
                self.reply(Reply::new(250, "2.1.5", "Ok"));
            }
            Err((reply, result)) => {
                METRICS.smtp_rcpt.with_label_values(&[result.label()]).inc();
                self.log_reject("RCPT", &reply, Some(&mailbox.raw));
                self.reply(reply);
            }
        }
    }
}

/// The reply for an address that does not parse.
fn address_reply(e: AddressError, path: &str, enhanced: &'static str, role: &str) -> Reply {
    match e {
        AddressError::NeedsSmtputf8 => {
            Reply::new(553, "5.6.7", format!("{path}: Must declare SMTPUTF8 to send Unicode address"))
        }
        AddressError::SourceRoute => Reply::new(501, enhanced, format!("{path}: source routes are not accepted")),
        AddressError::Brackets | AddressError::Syntax => {
            Reply::new(501, enhanced, format!("Bad {role} address syntax"))
        }
    }
}
