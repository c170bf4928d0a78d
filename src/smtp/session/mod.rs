//! One inbound SMTP session: owns the connection, reads commands and
//! content with bounded buffers and timeouts, asks `policy` at RCPT,
//! streams the body into the spool and answers. One file per stage, each
//! an `impl Session` block: [`hello`] (greeting, EHLO/HELO, STARTTLS,
//! ETRN), [`auth`] (AUTH), [`envelope`] (MAIL, RCPT), [`content`] (DATA,
//! BDAT, the commit); this file holds the state and the command loop.
//!
//! Invariants: `250 … queued as` is sent only after the spool confirmed the
//! commit; a temporary fault is answered with a 4xx; replies to pipelined
//! commands are flushed only when the client's input is drained (RFC 2920);
//! memory per session is bounded by the command-line limit, one read buffer
//! and one spool chunk, whatever the message size; input pipelined behind
//! STARTTLS is discarded and the session starts over inside TLS (RFC 3207
//! §4.2, CVE-2011-0411); a command line must arrive whole within
//! `smtp.command_timeout` and content at `smtp.min_data_rate`, so a
//! slowloris client is cut off. A stopping node answers a session waiting
//! for a command `421 4.3.0` and lets one receiving a message finish it
//! within the grace period.

mod auth;
mod content;
mod envelope;
mod hello;

use std::net::IpAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;

use super::auth::Mechanism;
use super::conn::{Conn, Line, OUTPUT_FLUSH_AT, ReadError};
use super::shared::Shared;
use super::tls::{SmtpStream, TlsInfo};
use crate::config::{Config, TlsLevel};
use crate::metrics::METRICS;
use crate::proto::command::{self, Command};
use crate::proto::reply::Reply;
use crate::shutdown::Phase;
use envelope::Transaction;

#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub ip: IpAddr,
    /// From the PTR record, or `unknown`.
    pub name: String,
    /// Log the transcript (`debug_peer_list`).
    pub debug: bool,
    /// On a PROXY-protocol listener, from an address that may not send a
    /// header: refuse one if it comes.
    pub proxy_guard: bool,
    /// In a reserved slot without being in `mynetworks`: must authenticate
    /// before MAIL.
    pub probation: bool,
}

/// How a session ended, for `mxrelay_smtp_sessions_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Quit,
    Disconnected,
    Timeout,
    TooManyErrors,
    EarlyTalker,
    IoError,
    TlsFailed,
    Refused,
    /// The node is stopping: 421 sent.
    Shutdown,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Quit => "quit",
            Outcome::Disconnected => "disconnected",
            Outcome::Timeout => "timeout",
            Outcome::TooManyErrors => "too_many_errors",
            Outcome::EarlyTalker => "early_talker",
            Outcome::IoError => "io_error",
            Outcome::TlsFailed => "tls_failed",
            Outcome::Refused => "refused",
            Outcome::Shutdown => "shutdown",
        }
    }
}

/// What the client said it is. EHLO makes the session ESMTP (RFC 5321
/// §4.1.1.1); STARTTLS and a new HELO/EHLO start it over.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Greeting {
    None,
    Helo(String),
    Ehlo(String),
}

impl Greeting {
    /// The name given in HELO/EHLO, if any.
    fn name(&self) -> Option<&str> {
        match self {
            Greeting::None => None,
            Greeting::Helo(n) | Greeting::Ehlo(n) => Some(n),
        }
    }

    fn esmtp(&self) -> bool {
        matches!(self, Greeting::Ehlo(_))
    }
}

pub struct Session {
    conn: Conn<SmtpStream>,
    shared: Arc<Shared>,
    config: Arc<Config>,
    client: ClientInfo,
    /// Set once the handshake is done (STARTTLS or implicit TLS).
    tls: Option<TlsInfo>,
    /// The user name and mechanism of a successful AUTH.
    auth: Option<(String, Mechanism)>,
    greeting: Greeting,
    /// Between MAIL and the end of the message (a BDAT transfer in
    /// progress included).
    tx: Option<Transaction>,
    errors: u32,
}

enum Flow {
    Continue,
    Close(Outcome),
}

impl Session {
    pub fn new(stream: SmtpStream, client: ClientInfo, shared: Arc<Shared>, tls: Option<TlsInfo>) -> Session {
        let config = shared.config();
        Session {
            conn: Conn::new(stream, client.debug, shared.shutdown.clone(), shared.slots.stress(&config.smtp)),
            config,
            shared,
            client,
            tls,
            auth: None,
            greeting: Greeting::None,
            tx: None,
            errors: 0,
        }
    }

    fn config(&self) -> &Config {
        &self.config
    }

    pub async fn run(mut self) -> Outcome {
        let outcome = self.serve().await;
        self.reset_transaction().await;
        let _ = self.conn.flush().await;
        let _ = self.conn.stream.shutdown().await;
        outcome
    }

    async fn serve(&mut self) -> Outcome {
        if let Err(outcome) = self.open().await {
            return outcome;
        }
        loop {
            // A draining node serves a client that keeps talking, and lets
            // go of one that waits (see `Conn::fill`); a BDAT transfer may
            // run to its LAST chunk.
            self.conn.stop_at = if self.in_bdat() { Phase::Closing } else { Phase::Draining };
            if self.conn.shutdown.phase() >= Phase::Closing {
                return self.read_failed(ReadError::Shutdown, "command");
            }
            let timeout = self.config().smtp.command_timeout;
            let line = match self.conn.read_line(timeout).await {
                Ok(line) => line,
                Err(e) => return self.read_failed(e, "command"),
            };
            let flow = match line {
                Line::TooLong => {
                    self.reply(Reply::new(500, "5.5.2", "Error: line too long"));
                    Flow::Continue
                }
                Line::Command(bytes) => match command::parse(&bytes) {
                    Ok(cmd) => self.command(cmd).await,
                    Err(e) => {
                        self.reply(e.reply());
                        Flow::Continue
                    }
                },
            };
            if let Flow::Close(outcome) = flow {
                return outcome;
            }
            if self.errors >= self.config().smtp.error_limit {
                METRICS.smtp_limit_hits.with_label_values(&["errors"]).inc();
                tracing::warn!(client = %self.peer(), errors = self.errors, "too many errors, disconnecting");
                self.conn.queue(&Reply::new(
                    421,
                    "4.7.0",
                    format!("{} Error: too many errors", self.config().myhostname),
                ));
                return Outcome::TooManyErrors;
            }
            if self.conn.out.len() >= OUTPUT_FLUSH_AT && self.conn.flush().await.is_err() {
                return Outcome::IoError;
            }
        }
    }

    async fn command(&mut self, cmd: Command) -> Flow {
        if self.in_bdat() && !matches!(cmd, Command::Bdat { .. } | Command::Rset | Command::Quit | Command::Noop) {
            // RFC 3030 §2: only BDAT may follow BDAT until LAST.
            self.reply(Reply::bad_sequence("only BDAT, RSET, NOOP or QUIT may follow a non-LAST BDAT"));
            return Flow::Continue;
        }
        let exempt = matches!(
            cmd,
            Command::Ehlo(_)
                | Command::Helo(_)
                | Command::StartTls
                | Command::Quit
                | Command::Noop
                | Command::Rset
                | Command::Help
        );
        if !exempt && self.tls.is_none() && self.config().tls.security_level == TlsLevel::Encrypt {
            // smtpd_tls_security_level = encrypt
            self.reply(Reply::new(530, "5.7.0", "Must issue a STARTTLS command first"));
            return Flow::Continue;
        }
        match cmd {
            Command::Ehlo(name) | Command::Helo(name) if name.is_empty() => {
                self.reply(Reply::syntax("EHLO hostname"));
            }
            Command::Ehlo(name) => self.hello(Greeting::Ehlo(name)).await,
            Command::Helo(name) => self.hello(Greeting::Helo(name)).await,
            Command::Mail { .. } if self.client.probation && self.auth.is_none() => {
                // A reserved slot is for mynetworks, or for whoever logs in.
                tracing::info!(client = %self.peer(), "MAIL without AUTH in a reserved slot: closed");
                self.conn.queue(&Reply::new(
                    421,
                    "4.7.0",
                    format!(
                        "{} Error: too many connections; authenticate first or try later",
                        self.config().myhostname
                    ),
                ));
                return Flow::Close(Outcome::Refused);
            }
            Command::Mail { path, params } => self.mail(&path, &params).await,
            Command::Rcpt { path, params } => self.rcpt(&path, &params).await,
            Command::Data => return self.data().await,
            Command::Bdat { size, last } => return self.bdat(size, last).await,
            Command::Rset => {
                self.reset_transaction().await;
                self.reply(Reply::ok());
            }
            Command::Noop => self.reply(Reply::ok()),
            Command::Quit => {
                self.conn.queue(&Reply::new(221, "2.0.0", "Bye"));
                return Flow::Close(Outcome::Quit);
            }
            Command::Help => self.reply(Reply::new(
                214,
                "2.0.0",
                "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP (see RFC 5321)",
            )),
            Command::Vrfy => {
                // disable_vrfy_command: nothing about addresses is revealed.
                if self.config().disable_vrfy_command {
                    self.reply(Reply::new(502, "5.5.1", "VRFY command is disabled"));
                } else {
                    self.reply(Reply::new(252, "2.0.0", "Send mail, I will try my best"));
                }
            }
            Command::Expn => self.reply(Reply::new(502, "5.5.1", "EXPN command is disabled")),
            Command::StartTls => return self.starttls().await,
            Command::Auth { mechanism, initial } => {
                return self.authenticate(&mechanism, initial).await;
            }
            Command::Etrn(node) => self.etrn(&node).await,
            Command::Unknown(_) => self.reply(Reply::new(502, "5.5.2", "Error: command not recognized")),
        }
        Flow::Continue
    }

    fn read_failed(&mut self, e: ReadError, during: &str) -> Outcome {
        match e {
            ReadError::Timeout => {
                if !self.conn.inbuf.is_empty() || during != "command" {
                    // Input was trickling in, not idle: a slow client.
                    METRICS.smtp_limit_hits.with_label_values(&["slow_client"]).inc();
                }
                tracing::info!(client = %self.peer(), "timeout after {during}");
                self.conn.queue(&Reply::timeout(&self.config.myhostname));
                Outcome::Timeout
            }
            ReadError::Eof => {
                if during != "command" {
                    tracing::info!(client = %self.peer(), "lost connection during {during}");
                }
                Outcome::Disconnected
            }
            ReadError::Io => Outcome::IoError,
            ReadError::Shutdown => {
                tracing::info!(client = %self.peer(), "node stopping: session closed during {during}");
                self.conn.queue(&Reply::new(421, "4.3.0", format!("{} Service shutting down", self.config.myhostname)));
                Outcome::Shutdown
            }
        }
    }

    fn peer(&self) -> String {
        format!("{}[{}]", self.client.name, self.client.ip)
    }

    fn reply(&mut self, reply: Reply) {
        if reply.is_error() {
            self.errors += 1;
        }
        self.conn.queue(&reply);
    }

    /// The RFC 3848 `with` keyword of this session.
    fn proto(&self) -> String {
        with_keyword(self.greeting.esmtp(), self.tls.is_some(), self.auth.is_some())
    }

    fn log_reject(&self, stage: &str, reply: &Reply, to: Option<&str>) {
        let from = self.tx.as_ref().map(|t| t.sender.to_string()).unwrap_or_default();
        tracing::info!(
            "NOQUEUE: reject: {stage} from {}: {}; from=<{from}> to=<{}> proto={} helo=<{}>",
            self.peer(),
            reply,
            to.unwrap_or(""),
            self.proto(),
            self.greeting.name().unwrap_or("")
        );
    }

    /// RFC 2920 does not allow pipelining to a client that was not offered
    /// it: input already waiting behind this command means it did not wait.
    fn unauth_pipelining(&mut self) -> bool {
        if !self.greeting.esmtp() && !self.conn.inbuf.is_empty() {
            let reply = Reply::new(503, "5.5.0", "Error: improper use of SMTP command pipelining");
            self.log_reject("pipelining", &reply, None);
            self.reply(reply);
            return true;
        }
        false
    }

    /// A BDAT transfer is in progress (between its first chunk and LAST).
    fn in_bdat(&self) -> bool {
        self.tx.as_ref().is_some_and(|t| t.bdat.is_some())
    }

    /// Forgets the transaction; a body received so far is aborted.
    async fn reset_transaction(&mut self) {
        if let Some(incoming) = self.tx.take().and_then(|t| t.bdat) {
            incoming.abort().await;
        }
    }
}

/// RFC 3848 `with` keywords: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA.
fn with_keyword(esmtp: bool, tls: bool, auth: bool) -> String {
    if !esmtp {
        return "SMTP".into();
    }
    format!("ESMTP{}{}", if tls { "S" } else { "" }, if auth { "A" } else { "" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_names_the_client_and_only_ehlo_is_esmtp() {
        assert_eq!(Greeting::None.name(), None);
        assert_eq!(Greeting::Helo("a.example".into()).name(), Some("a.example"));
        assert!(!Greeting::Helo("a.example".into()).esmtp());
        assert!(Greeting::Ehlo("a.example".into()).esmtp());
        assert!(!Greeting::None.esmtp());
    }

    #[test]
    fn with_keywords_follow_rfc_3848() {
        assert_eq!(with_keyword(false, true, true), "SMTP");
        assert_eq!(with_keyword(true, false, false), "ESMTP");
        assert_eq!(with_keyword(true, true, false), "ESMTPS");
        assert_eq!(with_keyword(true, false, true), "ESMTPA");
        assert_eq!(with_keyword(true, true, true), "ESMTPSA");
    }
}
