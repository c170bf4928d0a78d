//! SMTP AUTH (RFC 4954) against `relay_users`: PLAIN and LOGIN, offered
//! inside TLS unless `auth.tls_only` is off. Failures count per client
//! address (`smtp.auth_failure_limit`), and a password is never logged,
//! not even in a `debug_peer_list` transcript.

use super::{Flow, Outcome, Session};
use crate::metrics::METRICS;
use crate::proto::reply::Reply;
use crate::smtp::auth::{self, Credentials, Mechanism, SaslError};
use crate::smtp::conn::{Line, ReadError};
use crate::smtp::limits::Event;

impl Session {
    /// AUTH is advertised: enabled, and inside TLS unless `auth.tls_only` is off.
    pub(super) fn auth_offered(&self) -> bool {
        let c = self.config();
        c.auth.enabled && (self.tls.is_some() || !c.auth.tls_only)
    }

    /// RFC 4954 AUTH PLAIN/LOGIN against `relay_users`.
    pub(super) async fn authenticate(&mut self, mechanism: &str, initial: Option<String>) -> Flow {
        let c = self.config.clone();
        if !c.auth.enabled {
            self.reply(Reply::new(503, "5.5.1", "Error: authentication not enabled"));
            return Flow::Continue;
        }
        if self.tls.is_none() && c.auth.tls_only {
            self.reply(Reply::new(538, "5.7.11", "Encryption required for requested authentication mechanism"));
            return Flow::Continue;
        }
        if !self.greeting.esmtp() {
            self.reply(Reply::bad_sequence("send EHLO first"));
            return Flow::Continue;
        }
        if self.auth.is_some() {
            self.reply(Reply::new(503, "5.5.1", "Error: already authenticated"));
            return Flow::Continue;
        }
        if self.tx.is_some() {
            self.reply(Reply::bad_sequence("MAIL transaction in progress"));
            return Flow::Continue;
        }
        let Some(mech) = Mechanism::parse(mechanism) else {
            self.reply(Reply::new(504, "5.5.4", "Error: unsupported authentication mechanism"));
            return Flow::Continue;
        };
        let failures = self.shared.anvil.count(self.client.ip, Event::AuthFailure, c.smtp.rate_window);
        if c.smtp.auth_failure_limit > 0 && failures >= c.smtp.auth_failure_limit {
            METRICS.smtp_limit_hits.with_label_values(&[Event::AuthFailure.label()]).inc();
            METRICS.smtp_auth.with_label_values(&["rate_limited"]).inc();
            tracing::warn!(client = %self.peer(), failures, "AUTH refused: too many failed attempts from this address");
            self.conn.queue(&Reply::new(
                421,
                "4.7.0",
                format!("{} Error: too many failed AUTH attempts from {}", c.myhostname, self.client.ip),
            ));
            return Flow::Close(Outcome::Refused);
        }
        let credentials = match self.sasl_exchange(mech, initial).await {
            Ok(Ok(credentials)) => credentials,
            Ok(Err(e)) => {
                METRICS
                    .smtp_auth
                    .with_label_values(&[if e == SaslError::Cancelled { "aborted" } else { "malformed" }])
                    .inc();
                self.reply(e.reply());
                return Flow::Continue;
            }
            Err(e) => return Flow::Close(self.read_failed(e, "AUTH")),
        };
        match crate::users::verify(self.shared.users.as_ref(), &credentials.username, &credentials.password).await {
            Ok(true) => {
                METRICS.smtp_auth.with_label_values(&["success"]).inc();
                tracing::info!("{}: sasl_method={}, sasl_username={}", self.peer(), mech.name(), credentials.username);
                self.auth = Some((credentials.username, mech));
                self.reply(Reply::new(235, "2.7.0", "Authentication successful"));
            }
            Ok(false) => {
                METRICS.smtp_auth.with_label_values(&["failure"]).inc();
                self.shared.anvil.hit(self.client.ip, Event::AuthFailure, 0, c.smtp.rate_window);
                tracing::warn!(
                    "{}: SASL {} authentication failed, sasl_username={:?}",
                    self.peer(),
                    mech.name(),
                    credentials.username
                );
                self.reply(Reply::new(535, "5.7.8", "Error: authentication failed"));
            }
            Err(e) => {
                METRICS.smtp_auth.with_label_values(&["tempfail"]).inc();
                if matches!(e, crate::users::UserError::Busy) {
                    tracing::warn!(client = %self.peer(), "AUTH: {e}; answered 454");
                } else {
                    tracing::error!(client = %self.peer(), error = %e, "AUTH: user database unavailable");
                }
                self.reply(Reply::new(454, "4.7.0", "Temporary authentication failure"));
            }
        }
        Flow::Continue
    }

    /// The challenge/response rounds of `mech`; the outer error is a broken
    /// connection, the inner one a response that cannot be used.
    async fn sasl_exchange(
        &mut self,
        mech: Mechanism,
        initial: Option<String>,
    ) -> Result<Result<Credentials, SaslError>, ReadError> {
        match mech {
            Mechanism::Plain => {
                let response = match initial {
                    Some(r) => r,
                    None => self.sasl_response("").await?,
                };
                Ok(auth::decode_plain(&response))
            }
            Mechanism::Login => {
                let user = match initial {
                    Some(r) => r,
                    None => self.sasl_response(&auth::challenge("Username:")).await?,
                };
                let username = match auth::decode_text(&user) {
                    Ok(u) if !u.is_empty() => u,
                    Ok(_) => return Ok(Err(SaslError::Malformed)),
                    Err(e) => return Ok(Err(e)),
                };
                let pass = self.sasl_response(&auth::challenge("Password:")).await?;
                Ok(auth::decode_text(&pass).map(|password| Credentials { username, password }))
            }
        }
    }

    /// Sends `334 challenge` and reads the client's one-line answer.
    async fn sasl_response(&mut self, challenge: &str) -> Result<String, ReadError> {
        self.conn.queue(&Reply::new(334, "", challenge));
        // Never log the answer: it carries the password.
        let debug = std::mem::replace(&mut self.conn.debug, false);
        let line = self.conn.read_line(self.config().smtp.command_timeout).await;
        self.conn.debug = debug;
        match line? {
            Line::Command(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
            // Not base64, so answered as a malformed response.
            Line::TooLong => Ok("!".into()),
        }
    }
}
