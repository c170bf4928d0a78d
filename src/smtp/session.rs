//! One inbound SMTP session: owns the stream, reads commands and content
//! with bounded buffers and timeouts, asks `policy` at RCPT, streams the
//! body into the spool and answers.
//!
//! Invariants: `250 … queued as` is sent only after the spool confirmed the
//! commit; a temporary fault is answered with a 4xx; replies to pipelined
//! commands are flushed only when the client's input is drained (RFC 2920);
//! memory per session is bounded by the command-line limit, one read buffer
//! and one spool chunk, whatever the message size; input pipelined behind
//! STARTTLS is discarded and the session starts over inside TLS (RFC 3207
//! §4.2, CVE-2011-0411); a command line must arrive whole within
//! `smtp.command_timeout` and content at `smtp.min_data_rate`, so a
//! slowloris client is cut off.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::auth::{self, Credentials, Mechanism, SaslError};
use super::command::{self, COMMAND_LINE_LIMIT, Command};
use super::data::{DataDecoder, Framing, HeaderScan};
use super::limits::{Anvil, Event, PerIp};
use super::reply::Reply;
use super::slots::{Slots, Stress};
use super::tls::{SmtpStream, TlsInfo};
use crate::config::{Config, TlsConfig};
use crate::metrics::METRICS;
use crate::policy::address::{self, AddressError, Path};
use crate::policy::{Client, Policy, RcptResult, Verdict};
use crate::scan::{Envelope as ScanEnvelope, ScanBuffer, Scanner, Verdict as ScanVerdict};
use crate::shutdown::{Phase, Shutdown};
use crate::spool::{Envelope, QueueId, Recipient, RecipientState, Spool, SpoolBody};
use crate::users::UserStore;

const READ_CHUNK: usize = 64 * 1024;
/// Pending replies are written out once they reach this size even if more
/// pipelined commands wait.
const OUTPUT_FLUSH_AT: usize = 16 * 1024;

/// What every session and listener of a node shares. The configuration and
/// the TLS certificate can be swapped on SIGHUP; a session keeps the ones
/// it started with.
pub struct Shared {
    config: std::sync::RwLock<Arc<Config>>,
    tls: std::sync::RwLock<Option<tokio_rustls::TlsAcceptor>>,
    pub policy: Policy,
    pub spool: Arc<dyn Spool>,
    /// `relay_users` (AUTH may be switched on by SIGHUP, so always open;
    /// the pool connects on first use).
    pub users: Arc<dyn UserStore>,
    /// Connection slots on this node, all listeners together, and stress.
    pub slots: Arc<Slots>,
    pub per_ip: PerIp,
    pub anvil: Anvil,
    /// clamd/rspamd for domains with `enable_virus_spam_scan` (restart to change).
    pub scanner: Option<Arc<Scanner>>,
    /// The node's stop signal.
    pub shutdown: Shutdown,
}

impl Shared {
    pub fn new(
        config: Config,
        policy: Policy,
        spool: Arc<dyn Spool>,
        users: Arc<dyn UserStore>,
        shutdown: Shutdown,
    ) -> Shared {
        let shared = Shared {
            slots: Slots::new(&config.smtp),
            config: std::sync::RwLock::new(Arc::new(config.clone())),
            tls: std::sync::RwLock::new(None),
            policy,
            spool,
            users,
            per_ip: PerIp::default(),
            anvil: Anvil::default(),
            scanner: None,
            shutdown,
        };
        shared.reload_tls(&config.tls);
        shared
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Installs a new configuration for sessions that start from now on.
    pub fn set_config(&self, config: Config) {
        let mut current = self.config.write().unwrap_or_else(|e| e.into_inner());
        self.slots.resize(&config.smtp);
        *current = Arc::new(config);
    }

    /// The acceptor for STARTTLS and the implicit-TLS listener, if a
    /// certificate is loaded.
    pub fn tls_acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        self.tls.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// (Re)reads `tls.cert`/`tls.key`; on failure the loaded certificate
    /// stays in use.
    pub fn reload_tls(&self, config: &TlsConfig) {
        if config.cert.is_empty() {
            *self.tls.write().unwrap_or_else(|e| e.into_inner()) = None;
            return;
        }
        match super::tls::load_acceptor(config) {
            Ok(acceptor) => {
                *self.tls.write().unwrap_or_else(|e| e.into_inner()) = Some(acceptor);
                tracing::info!(cert = %config.cert, "TLS certificate loaded");
            }
            Err(e) => {
                tracing::error!(cert = %config.cert, "TLS certificate not (re)loaded, keeping the previous one: {e}")
            }
        }
    }
}

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

enum ReadError {
    Eof,
    Timeout,
    Io,
    /// The node reached the shutdown phase this read stops at.
    Shutdown,
}

enum Line {
    Command(BytesMut),
    TooLong,
}

/// The socket with its bounded input buffer and pending replies.
struct Conn<S> {
    stream: S,
    inbuf: BytesMut,
    out: Vec<u8>,
    debug: bool,
    shutdown: Shutdown,
    /// Reads give up at this shutdown phase: `Draining` while waiting for a
    /// command, `Closing` while a message is coming in.
    stop_at: Phase,
    /// Under stress, no read waits longer than its timeout.
    stress: Stress,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    async fn flush(&mut self) -> Result<(), ReadError> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await.map_err(|_| ReadError::Io)?;
            self.stream.flush().await.map_err(|_| ReadError::Io)?;
            self.out.clear();
        }
        Ok(())
    }

    fn queue(&mut self, reply: &Reply) {
        let text = reply.render();
        if self.debug {
            tracing::debug!(target: "mxrelay::transcript", "> {}", text.trim_end());
        }
        self.out.extend_from_slice(text.as_bytes());
    }

    /// Reads more input; pending replies go out first, since the client
    /// may be waiting for them before it sends more. Waits at most
    /// `timeout`, or the stress timeout while the node is under stress
    /// (also when stress starts during the wait).
    async fn fill(&mut self, timeout: Duration) -> Result<(), ReadError> {
        self.flush().await?;
        self.inbuf.reserve(READ_CHUNK);
        let mut shutdown = self.shutdown.clone();
        let mut stressed = self.stress.on.clone();
        let started = tokio::time::Instant::now();
        let limits = self.stress.clone();
        let deadline = |on: bool| started + limits.limit(timeout, on);
        let expiry = tokio::time::sleep_until(deadline(*stressed.borrow_and_update()));
        tokio::pin!(expiry);
        let read = self.stream.read_buf(&mut self.inbuf);
        tokio::pin!(read);
        loop {
            tokio::select! {
                read = &mut read => return match read {
                    Err(_) => Err(ReadError::Io),
                    Ok(0) => Err(ReadError::Eof),
                    Ok(_) => Ok(()),
                },
                () = &mut expiry => return Err(ReadError::Timeout),
                Ok(()) = stressed.changed() => {
                    let on = *stressed.borrow_and_update();
                    expiry.as_mut().reset(deadline(on));
                }
                () = shutdown.reached(self.stop_at) => return Err(ReadError::Shutdown),
            }
        }
    }

    /// One command line without its line ending, which must arrive whole
    /// within `timeout`. An overlong line is read to its end and discarded,
    /// never buffered whole.
    async fn read_line(&mut self, timeout: Duration) -> Result<Line, ReadError> {
        let deadline = Instant::now() + timeout;
        let mut discarding = false;
        loop {
            if let Some(pos) = memchr::memchr(b'\n', &self.inbuf) {
                let mut line = self.inbuf.split_to(pos + 1);
                if discarding || line.len() > COMMAND_LINE_LIMIT + 2 {
                    return Ok(Line::TooLong);
                }
                line.truncate(pos);
                if line.last() == Some(&b'\r') {
                    line.truncate(pos - 1);
                }
                if self.debug {
                    tracing::debug!(target: "mxrelay::transcript", "< {}", String::from_utf8_lossy(&line));
                }
                return Ok(Line::Command(line));
            }
            if self.inbuf.len() > COMMAND_LINE_LIMIT + 2 {
                discarding = true;
                self.inbuf.clear();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReadError::Timeout);
            }
            self.fill(left).await?;
        }
    }
}

/// The envelope being built between MAIL and the end of the message.
struct Transaction {
    sender: Path,
    smtputf8: bool,
    eight_bit: bool,
    recipients: Vec<Recipient>,
    /// RCPTs refused for the recipient limit so far.
    overshoot: usize,
    /// Sender checks run once, at the first RCPT that needs them.
    sender_verdict: Option<Verdict>,
}

/// A message body on its way into the spool: enforces the size limit,
/// counts `Received:` headers and remembers the first failure. After a
/// failure, content is still read (to resynchronise) but not stored.
struct Incoming {
    id: QueueId,
    body: Option<Box<dyn SpoolBody>>,
    /// While the message waits for a scan verdict, it goes here instead of
    /// the spool (which only stores what was accepted).
    scan: Option<(Arc<Scanner>, ScanBuffer)>,
    spool: Arc<dyn Spool>,
    decoder: DataDecoder,
    headers: HeaderScan,
    received_header_len: u64,
    size: u64,
    limit: u64,
    forbid_bare_newline: bool,
    failure: Option<(Reply, &'static str)>,
    decoded: Vec<u8>,
}

impl Incoming {
    /// Decodes `input`; returns the end-of-data position, if found.
    async fn feed(&mut self, input: &[u8]) -> Option<usize> {
        let end = self.decoder.feed(input, &mut self.decoded);
        self.store().await;
        end
    }

    async fn store(&mut self) {
        if self.decoded.is_empty() {
            return;
        }
        self.headers.feed(&self.decoded);
        self.size += self.decoded.len() as u64;
        if self.failure.is_none() {
            if self.size - self.received_header_len > self.limit {
                self.fail(Reply::too_big(), "too_big").await;
            } else if self.forbid_bare_newline && self.decoder.bare_newline {
                self.fail(Reply::bare_newline(), "bare_newline").await;
            } else {
                let decoded = std::mem::take(&mut self.decoded);
                self.write(&decoded).await;
                self.decoded = decoded;
            }
        }
        self.decoded.clear();
    }

    /// Writes content to the scan buffer or the spool; a message growing
    /// over `scan.max_size` moves to the spool unscanned, with a header
    /// saying so.
    async fn write(&mut self, data: &[u8]) {
        if let Some((scanner, buffer)) = self.scan.as_mut() {
            if buffer.len + data.len() as u64 <= scanner.max_size() {
                if let Err(e) = buffer.write(data).await {
                    tracing::error!(queue_id = %self.id, error = %e, "scan buffer write failed while receiving");
                    self.fail(Reply::queue_unavailable(), "queue_error").await;
                }
                return;
            }
            let (scanner, buffer) = self.scan.take().expect("matched above");
            tracing::info!(queue_id = %self.id, "{}: not scanned: over scan.max_size", self.id);
            match buffer.into_spool(self.spool.as_ref(), &self.id, &scanner.skipped_header(), None).await {
                Ok(body) => self.body = Some(body),
                Err(e) => {
                    tracing::error!(queue_id = %self.id, error = %e, "queue write failed while receiving");
                    return self.fail(Reply::queue_unavailable(), "queue_error").await;
                }
            }
        }
        if let Some(body) = self.body.as_mut()
            && let Err(e) = body.write(data).await
        {
            tracing::error!(queue_id = %self.id, error = %e, "queue write failed while receiving");
            self.fail(Reply::queue_unavailable(), "queue_error").await;
        }
    }

    async fn fail(&mut self, reply: Reply, label: &'static str) {
        self.failure = Some((reply, label));
        self.scan = None;
        if let Some(body) = self.body.take() {
            body.abort().await;
        }
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
    helo: Option<String>,
    esmtp: bool,
    tx: Option<Transaction>,
    /// A BDAT transfer in progress (between the first chunk and LAST).
    bdat: Option<Incoming>,
    errors: u32,
}

enum Flow {
    Continue,
    Close(Outcome),
}

impl Session {
    pub fn new(stream: SmtpStream, client: ClientInfo, shared: Arc<Shared>, tls: Option<TlsInfo>) -> Session {
        let debug = client.debug;
        Session {
            conn: Conn {
                stream,
                inbuf: BytesMut::with_capacity(4096),
                out: Vec::new(),
                debug,
                shutdown: shared.shutdown.clone(),
                stop_at: Phase::Draining,
                stress: shared.slots.stress(&shared.config().smtp),
            },
            config: shared.config(),
            shared,
            client,
            tls,
            auth: None,
            helo: None,
            esmtp: false,
            tx: None,
            bdat: None,
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
        let early = self.early_talker().await;
        let mut greeted = false;
        if self.client.proxy_guard {
            // A header counts whether it came before or as the first input.
            if !early {
                self.greet();
                greeted = true;
                if let Err(e) = self.conn.fill(self.config().smtp.command_timeout).await {
                    return self.read_failed(e, "command");
                }
            }
            if super::proxy::looks_like_header(&self.conn.inbuf) {
                METRICS.smtp_proxy_headers.with_label_values(&["untrusted"]).inc();
                METRICS.smtp_connections_refused.with_label_values(&["proxy_untrusted"]).inc();
                tracing::warn!(client = %self.peer(), "PROXY header from an address not in smtp.proxy_networks: refused");
                self.conn.queue(&Reply::new(
                    421,
                    "4.7.0",
                    "Error: PROXY header from an address not in smtp.proxy_networks",
                ));
                return Outcome::Refused;
            }
        }
        if early {
            METRICS.smtp_connections_refused.with_label_values(&["early_talker"]).inc();
            tracing::info!(client = %self.peer(), "reject: early talker (sent before the greeting)");
            self.conn.queue(&Reply::new(554, "5.5.1", "Error: SMTP protocol synchronization"));
            return Outcome::EarlyTalker;
        }
        if !greeted {
            self.greet();
        }
        loop {
            // Between transactions, a stopping node takes no new command; a
            // BDAT transfer may run to its LAST chunk.
            self.conn.stop_at = if self.bdat.is_some() { Phase::Closing } else { Phase::Draining };
            if self.conn.shutdown.phase() >= self.conn.stop_at {
                return self.read_failed(ReadError::Shutdown, "command");
            }
            let timeout = self.config().smtp.command_timeout;
            let line = match self.conn.read_line(timeout).await {
                Ok(line) => line,
                Err(e) => return self.read_failed(e, "command"),
            };
            let reply_flow = match line {
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
            if let Flow::Close(outcome) = reply_flow {
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

    /// Postfix `reject_unauth_pipelining` before the greeting: a client that
    /// talks first is not a real MTA.
    async fn early_talker(&mut self) -> bool {
        let pause = self.config().smtp.greet_pause;
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        // Timeout polls the read once before the zero-length timer fires;
        // what arrived stays in the buffer (to recognise a PROXY header).
        self.conn.inbuf.reserve(64);
        matches!(tokio::time::timeout(Duration::ZERO, self.conn.stream.read_buf(&mut self.conn.inbuf)).await, Ok(Ok(n)) if n > 0)
    }

    fn greet(&mut self) {
        let greeting = Reply::new(220, "", format!("{} ESMTP mxrelay", self.config().myhostname));
        self.conn.queue(&greeting);
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

    /// The RFC 3848 `with` keyword: ESMTP, ESMTPS, ESMTPA, ESMTPSA.
    fn proto(&self) -> String {
        if !self.esmtp {
            return "SMTP".into();
        }
        let s = if self.tls.is_some() { "S" } else { "" };
        let a = if self.auth.is_some() { "A" } else { "" };
        format!("ESMTP{s}{a}")
    }

    /// STARTTLS is advertised and accepted: a certificate is loaded, this
    /// session is not in TLS yet, and the level is not `none`.
    fn starttls_offered(&self) -> bool {
        self.tls.is_none() && self.config().tls.security_level != "none" && self.shared.tls_acceptor().is_some()
    }

    /// AUTH is advertised: enabled, and inside TLS unless `auth.tls_only` is off.
    fn auth_offered(&self) -> bool {
        let c = self.config();
        c.auth.enabled && (self.tls.is_some() || !c.auth.tls_only)
    }

    fn log_reject(&self, stage: &str, reply: &Reply, to: Option<&str>) {
        let from = self.tx.as_ref().map(|t| t.sender.to_string()).unwrap_or_default();
        tracing::info!(
            "NOQUEUE: reject: {stage} from {}: {}; from=<{from}> to=<{}> proto={} helo=<{}>",
            self.peer(),
            reply,
            to.unwrap_or(""),
            self.proto(),
            self.helo.as_deref().unwrap_or("")
        );
    }

    /// RFC 2920 does not allow pipelining to a client that was not offered
    /// it: input already waiting behind this command means it did not wait.
    fn unauth_pipelining(&mut self) -> bool {
        if !self.esmtp && !self.conn.inbuf.is_empty() {
            let reply = Reply::new(503, "5.5.0", "Error: improper use of SMTP command pipelining");
            self.log_reject("pipelining", &reply, None);
            self.reply(reply);
            return true;
        }
        false
    }

    async fn command(&mut self, cmd: Command) -> Flow {
        if self.bdat.is_some() && !matches!(cmd, Command::Bdat { .. } | Command::Rset | Command::Quit | Command::Noop) {
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
        if !exempt && self.tls.is_none() && self.config().tls.security_level == "encrypt" {
            // smtpd_tls_security_level = encrypt
            self.reply(Reply::new(530, "5.7.0", "Must issue a STARTTLS command first"));
            return Flow::Continue;
        }
        match cmd {
            Command::Ehlo(name) | Command::Helo(name) if name.is_empty() => {
                self.reply(Reply::syntax("EHLO hostname"));
            }
            Command::Ehlo(name) => {
                self.reset_transaction().await;
                self.helo = Some(name);
                self.esmtp = true;
                let c = self.config();
                let mut lines = vec![
                    c.myhostname.clone(),
                    "PIPELINING".into(),
                    format!("SIZE {}", c.message_size_limit),
                    "ETRN".into(),
                ];
                if self.starttls_offered() {
                    lines.push("STARTTLS".into());
                }
                if self.auth_offered() {
                    lines.push(format!("AUTH {}", auth::MECHANISMS));
                }
                lines.extend(["ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8", "CHUNKING"].map(String::from));
                self.reply(Reply::multi(250, "", lines));
            }
            Command::Helo(name) => {
                self.reset_transaction().await;
                self.helo = Some(name);
                self.esmtp = false;
                let host = self.config().myhostname.clone();
                self.reply(Reply::new(250, "", host));
            }
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

    /// RFC 1985 ETRN from a `mynetworks` client: releases the domain's
    /// deferred messages now, like `mxrelay queue flush --domain`.
    async fn etrn(&mut self, node: &str) {
        if self.helo.is_none() {
            return self.reply(Reply::bad_sequence("send HELO/EHLO first"));
        }
        if self.tx.is_some() {
            return self.reply(Reply::bad_sequence("MAIL transaction in progress"));
        }
        if !self.shared.policy.is_mynetworks(self.client.ip) {
            return self.reply(Reply::new(459, "4.7.1", format!("<{node}>: ETRN is only accepted from mynetworks")));
        }
        let Some(domain) = address::normalise_domain(node.trim_start_matches(['@', '#'])) else {
            return self.reply(Reply::new(458, "4.5.1", format!("Unable to queue messages for node <{node}>")));
        };
        let key = crate::delivery::route::Route::for_domain(&domain, &self.shared.policy.domains).key();
        match self.shared.spool.release(&key, crate::delivery::FLUSH_LIMIT).await {
            Ok(0) => self.reply(Reply::new(251, "2.0.0", format!("OK, no messages waiting for node <{domain}>"))),
            Ok(n) => {
                tracing::info!(client = %self.peer(), domain = %domain, released = n, "ETRN: queue flushed");
                self.reply(Reply::new(253, "2.0.0", format!("OK, {n} pending messages for node <{domain}> started")))
            }
            Err(e) => {
                tracing::error!(error = %e, "ETRN: queue unavailable");
                self.reply(Reply::new(458, "4.3.0", format!("Unable to queue messages for node <{domain}>")))
            }
        }
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

    /// RFC 3207. Input the client pipelined behind STARTTLS was sent in
    /// clear and is thrown away; after the handshake everything learned
    /// before it (HELO, AUTH, transaction) is forgotten.
    async fn starttls(&mut self) -> Flow {
        if self.tls.is_some() {
            self.reply(Reply::new(554, "5.5.1", "Error: TLS already active"));
            return Flow::Continue;
        }
        let Some(acceptor) = self.shared.tls_acceptor().filter(|_| self.starttls_offered()) else {
            self.reply(Reply::new(502, "5.5.1", "Error: command not implemented"));
            return Flow::Continue;
        };
        if self.helo.is_none() {
            self.reply(Reply::bad_sequence("send EHLO first"));
            return Flow::Continue;
        }
        if self.tx.is_some() || self.bdat.is_some() {
            self.reply(Reply::bad_sequence("MAIL transaction in progress"));
            return Flow::Continue;
        }
        if !self.conn.inbuf.is_empty() {
            tracing::warn!(client = %self.peer(), bytes = self.conn.inbuf.len(), "input pipelined after STARTTLS discarded (CVE-2011-0411)");
            self.conn.inbuf.clear();
        }
        self.conn.queue(&Reply::new(220, "2.0.0", "Ready to start TLS"));
        if self.conn.flush().await.is_err() {
            return Flow::Close(Outcome::IoError);
        }
        let stream = std::mem::replace(&mut self.conn.stream, SmtpStream::Detached);
        match stream.handshake(&acceptor, self.config().tls.handshake_timeout).await {
            Ok((stream, info)) => {
                tracing::info!("TLS connection established from {}: {info}", self.peer());
                self.conn.stream = stream;
                self.tls = Some(info);
                self.helo = None;
                self.esmtp = false;
                self.auth = None;
                self.reset_transaction().await;
                Flow::Continue
            }
            Err(e) => {
                tracing::info!(client = %self.peer(), "STARTTLS handshake failed: {e}");
                Flow::Close(Outcome::TlsFailed)
            }
        }
    }

    /// RFC 4954 AUTH PLAIN/LOGIN against `relay_users`.
    async fn authenticate(&mut self, mechanism: &str, initial: Option<String>) -> Flow {
        let c = self.config.clone();
        if !c.auth.enabled {
            self.reply(Reply::new(503, "5.5.1", "Error: authentication not enabled"));
            return Flow::Continue;
        }
        if self.tls.is_none() && c.auth.tls_only {
            self.reply(Reply::new(538, "5.7.11", "Encryption required for requested authentication mechanism"));
            return Flow::Continue;
        }
        if !self.esmtp {
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

    async fn reset_transaction(&mut self) {
        self.tx = None;
        if let Some(body) = self.bdat.take().and_then(|incoming| incoming.body) {
            body.abort().await;
        }
    }

    async fn mail(&mut self, path: &str, params: &[(String, Option<String>)]) {
        if self.helo.is_none() && self.config().smtpd_helo_required {
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
        let mut smtputf8 = false;
        let mut eight_bit = false;
        for (key, value) in params {
            match (key.as_str(), value.as_deref()) {
                ("SIZE", Some(v)) if self.esmtp => match v.parse::<u64>() {
                    Ok(n) if n > self.config().message_size_limit => {
                        let reply = Reply::new(552, "5.3.4", "Message size exceeds fixed limit");
                        self.log_reject("MAIL", &reply, None);
                        return self.reply(reply);
                    }
                    Ok(_) => {}
                    Err(_) => {
                        return self.reply(Reply::new(501, "5.5.4", "Bad message size syntax"));
                    }
                },
                ("BODY", Some(v)) if self.esmtp && v.eq_ignore_ascii_case("8BITMIME") => eight_bit = true,
                ("BODY", Some(v)) if self.esmtp && v.eq_ignore_ascii_case("7BIT") => {}
                ("SMTPUTF8", None) if self.esmtp => smtputf8 = true,
                // RFC 4954 §5: the original submitter; accepted, not trusted.
                ("AUTH", Some(_)) if self.esmtp => {}
                _ => {
                    return self.reply(Reply::new(555, "5.5.4", format!("Unsupported option: {key}")));
                }
            }
        }
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
            overshoot: 0,
            sender_verdict: None,
        });
        self.reply(Reply::new(250, "2.1.0", "Ok"));
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

    async fn rcpt(&mut self, path: &str, params: &[(String, Option<String>)]) {
        let Some((count, smtputf8)) = self.tx.as_ref().map(|t| (t.recipients.len(), t.smtputf8)) else {
            return self.reply(Reply::bad_sequence("need MAIL command"));
        };
        if self.unauth_pipelining() {
            return;
        }
        if let Some((key, _)) = params.first() {
            return self.reply(Reply::new(555, "5.5.4", format!("Unsupported option: {key}")));
        }
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
        let client = Client { ip: self.client.ip, helo: self.helo.clone(), authenticated: self.auth.is_some() };
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

    /// How long to wait for more content, `received` bytes after `started`.
    fn content_wait(&self, started: Instant, received: u64) -> Duration {
        let c = &self.config.smtp;
        content_wait(started.elapsed(), received, c.data_timeout, c.min_data_rate)
    }

    /// Checks that a transaction can take content; `Err` is the reply.
    fn ready_for_content(&self) -> Result<(), Reply> {
        match &self.tx {
            None => Err(Reply::bad_sequence("need MAIL command")),
            Some(tx) if tx.recipients.is_empty() => Err(Reply::new(554, "5.5.1", "Error: no valid recipients")),
            Some(_) => Ok(()),
        }
    }

    /// Opens the spool body and writes our `Received:` header first (it
    /// counts toward the stored size, not toward the hop count).
    async fn begin_incoming(&self, framing: Framing) -> Incoming {
        let id = QueueId::new();
        let mut scan = None;
        let mut failed = false;
        if let Some(scanner) = self.shared.scanner.as_ref().filter(|_| self.wants_scan()) {
            match scanner.buffer(&id.to_string()).await {
                Ok(buffer) => scan = Some((scanner.clone(), buffer)),
                Err(e) => {
                    tracing::error!(queue_id = %id, error = %e, "cannot buffer the message for scanning");
                    failed = true;
                }
            }
        }
        let mut incoming = Incoming {
            body: if scan.is_some() { None } else { Some(self.shared.spool.open_body(&id)) },
            scan,
            spool: self.shared.spool.clone(),
            decoder: DataDecoder::new(framing, !self.config().smtpd_forbid_bare_newline),
            headers: HeaderScan::default(),
            received_header_len: 0,
            size: 0,
            limit: self.config().message_size_limit,
            forbid_bare_newline: self.config().smtpd_forbid_bare_newline,
            failure: None,
            decoded: Vec::new(),
            id,
        };
        let header = self.received_header(&incoming.id);
        incoming.received_header_len = header.len() as u64;
        incoming.size = incoming.received_header_len;
        if failed {
            incoming.fail(Reply::queue_unavailable(), "queue_error").await;
        } else {
            incoming.write(header.as_bytes()).await;
        }
        incoming
    }

    /// `enable_virus_spam_scan` of any accepted recipient's listed domain.
    fn wants_scan(&self) -> bool {
        let Some(tx) = self.tx.as_ref() else { return false };
        tx.recipients.iter().any(|r| {
            matches!(self.shared.policy.domains.lookup(&r.domain), crate::domains::Lookup::Listed(route) if route.scan)
        })
    }

    /// RFC 5321 §4.4 trace header, Postfix's layout, naming this node.
    fn received_header(&self, id: &QueueId) -> String {
        let c = self.config();
        let tx = self.tx.as_ref();
        let with = match tx.is_some_and(|t| t.smtputf8) {
            // RFC 6531 §3.7.3: UTF8SMTP, UTF8SMTPS, UTF8SMTPA, UTF8SMTPSA
            true => self.proto().replacen("ESMTP", "UTF8SMTP", 1),
            false => self.proto(),
        };
        let using = match &self.tls {
            Some(info) => format!("\r\n\t(using {info})"),
            None => String::new(),
        };
        let for_clause = match tx.map(|t| t.recipients.as_slice()) {
            Some([only]) => format!("\r\n\tfor <{}>", only.address),
            _ => String::new(),
        };
        format!(
            "Received: from {} ({} [{}]){}\r\n\tby {} (mxrelay node {}) with {} id {}{}; {}\r\n",
            self.helo.as_deref().unwrap_or("unknown"),
            self.client.name,
            self.client.ip,
            using,
            c.myhostname,
            c.node_id,
            with,
            id,
            for_clause,
            chrono::Local::now().to_rfc2822(),
        )
    }

    async fn data(&mut self) -> Flow {
        if let Err(reply) = self.ready_for_content() {
            self.log_reject("DATA", &reply, None);
            self.reply(reply);
            return Flow::Continue;
        }
        if self.unauth_pipelining() {
            return Flow::Continue;
        }
        self.conn.queue(&Reply::new(354, "", "End data with <CR><LF>.<CR><LF>"));
        self.conn.stop_at = Phase::Closing;
        let mut incoming = self.begin_incoming(Framing::Dot).await;
        let started = Instant::now();
        loop {
            if self.conn.inbuf.is_empty()
                && let Err(e) = self.conn.fill(self.content_wait(started, incoming.size)).await
            {
                if let Some(body) = incoming.body.take() {
                    body.abort().await;
                }
                return Flow::Close(self.read_failed(e, "DATA"));
            }
            let input = std::mem::take(&mut self.conn.inbuf);
            let end = incoming.feed(&input).await;
            self.conn.inbuf = input;
            match end {
                Some(n) => {
                    self.conn.inbuf.advance(n);
                    break;
                }
                None => self.conn.inbuf.clear(),
            }
        }
        self.finish(incoming).await;
        Flow::Continue
    }

    async fn bdat(&mut self, size: u64, last: bool) -> Flow {
        let refusal = if self.bdat.is_none() { self.ready_for_content().err() } else { None };
        if refusal.is_none() && self.bdat.is_none() {
            self.bdat = Some(self.begin_incoming(Framing::Chunked).await);
        }
        // The chunk is read in full even when refused (RFC 3030 §2).
        self.conn.stop_at = Phase::Closing;
        let started = Instant::now();
        let mut remaining = size;
        while remaining > 0 {
            if self.conn.inbuf.is_empty()
                && let Err(e) = self.conn.fill(self.content_wait(started, size - remaining)).await
            {
                return Flow::Close(self.read_failed(e, "BDAT"));
            }
            let take = remaining.min(self.conn.inbuf.len() as u64) as usize;
            let chunk = self.conn.inbuf.split_to(take);
            remaining -= take as u64;
            if let Some(incoming) = self.bdat.as_mut() {
                incoming.feed(&chunk).await;
            }
        }
        if let Some(reply) = refusal {
            self.log_reject("BDAT", &reply, None);
            self.reply(reply);
            return Flow::Continue;
        }
        if last {
            let mut incoming = self.bdat.take().expect("set above");
            let mut tail = Vec::new();
            incoming.decoder.finish(&mut tail);
            incoming.decoded.extend_from_slice(&tail);
            incoming.store().await;
            self.finish(incoming).await;
        } else {
            let n = self.bdat.as_ref().map_or(0, |i| i.size);
            self.reply(Reply::new(250, "2.0.0", format!("Ok: {n} octets received")));
        }
        Flow::Continue
    }

    /// End of content: check what could only be checked at the end, then
    /// commit, and only then say 250.
    async fn finish(&mut self, mut incoming: Incoming) {
        let client_bytes = incoming.size - incoming.received_header_len;
        if incoming.failure.is_none() && incoming.headers.received > self.config().hop_count_limit {
            incoming.fail(Reply::new(554, "5.4.6", "Error: too many hops"), "too_many_hops").await;
        }
        let tx = self.tx.take().expect("content only follows a transaction");
        if let Some((reply, label)) = incoming.failure.take() {
            METRICS.smtp_messages.with_label_values(&[label]).inc();
            self.log_reject("END-OF-MESSAGE", &reply, None);
            tracing::info!(queue_id = %incoming.id, size = client_bytes, "message refused: {reply}");
            return self.reply(reply);
        }
        if let Some((scanner, mut buffer)) = incoming.scan.take() {
            let recipients: Vec<String> = tx.recipients.iter().map(|r| r.address.clone()).collect();
            let (id, ip, sender) = (incoming.id.to_string(), self.client.ip.to_string(), tx.sender.to_string());
            let env = ScanEnvelope {
                queue_id: &id,
                client_ip: &ip,
                client_name: &self.client.name,
                helo: self.helo.as_deref().unwrap_or(""),
                sender: &sender,
                recipients: &recipients,
                user: self.auth.as_ref().map(|(u, _)| u.as_str()),
            };
            match scanner.scan(&mut buffer, &env).await {
                ScanVerdict::Refuse(reply, label) => {
                    METRICS.smtp_messages.with_label_values(&[label]).inc();
                    self.log_reject("END-OF-MESSAGE", &reply, None);
                    return self.reply(reply);
                }
                ScanVerdict::Accept { headers, subject } => {
                    match buffer
                        .into_spool(self.shared.spool.as_ref(), &incoming.id, &headers, subject.as_deref())
                        .await
                    {
                        Ok(body) => incoming.body = Some(body),
                        Err(e) => {
                            METRICS.smtp_messages.with_label_values(&["queue_error"]).inc();
                            tracing::error!(queue_id = %incoming.id, error = %e, "message not queued after scanning: 451");
                            return self.reply(Reply::queue_unavailable());
                        }
                    }
                }
            }
        }
        let Some(body) = incoming.body.take() else {
            return self.reply(Reply::queue_unavailable());
        };
        let envelope = Envelope {
            id: incoming.id.clone(),
            sender: tx.sender.to_string(),
            recipients: tx.recipients,
            client_ip: self.client.ip.to_string(),
            client_name: self.client.name.clone(),
            helo: self.helo.clone().unwrap_or_default(),
            received_at: chrono::Utc::now().timestamp_millis(),
            // What the spool counted: scanning may have added headers.
            size: body.written(),
            node: self.config().node_id.clone(),
            smtputf8: tx.smtputf8,
            eight_bit: tx.eight_bit,
            attempts: 0,
            held: false,
            bounce_requested: false,
        };
        match body.commit(&envelope).await {
            Ok(()) => {
                METRICS.smtp_messages.with_label_values(&["accepted"]).inc();
                METRICS.smtp_received_bytes.inc_by(envelope.size);
                let sasl = match &self.auth {
                    Some((user, mech)) => {
                        format!(", sasl_method={}, sasl_username={user}", mech.name())
                    }
                    None => String::new(),
                };
                tracing::info!(
                    queue_id = %envelope.id,
                    "{}: client={}{sasl}, from=<{}>, size={}, nrcpt={} (queue active)",
                    envelope.id,
                    self.peer(),
                    envelope.sender,
                    envelope.size,
                    envelope.recipients.len()
                );
                self.reply(Reply::new(250, "2.0.0", format!("Ok: queued as {}", envelope.id)));
            }
            Err(e) => {
                METRICS.smtp_messages.with_label_values(&["queue_error"]).inc();
                tracing::error!(queue_id = %envelope.id, error = %e, client = %self.peer(), "message not queued: 451");
                self.reply(Reply::queue_unavailable());
            }
        }
    }
}

/// Postfix `smtpd_min_data_rate`: content may take `data_timeout` plus one
/// second per `min_rate` bytes received; each read still waits at most
/// `data_timeout`. Zero means the client is too slow now.
fn content_wait(elapsed: Duration, received: u64, data_timeout: Duration, min_rate: u64) -> Duration {
    if min_rate == 0 {
        return data_timeout;
    }
    let allowed = data_timeout + Duration::from_secs_f64(received as f64 / min_rate as f64);
    allowed.saturating_sub(elapsed).min(data_timeout)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_must_keep_the_minimum_rate() {
        let t = Duration::from_secs(10);
        // Fresh: one data_timeout.
        assert_eq!(content_wait(Duration::ZERO, 0, t, 500), t);
        // 5000 bytes earned 10 s more; 15 s used: 5 s left.
        assert_eq!(content_wait(Duration::from_secs(15), 5000, t, 500), Duration::from_secs(5));
        // Too slow: nothing left.
        assert_eq!(content_wait(Duration::from_secs(30), 500, t, 500), Duration::ZERO);
        // A fast client never waits longer than data_timeout per read.
        assert_eq!(content_wait(Duration::from_secs(1), 10_000_000, t, 500), t);
        // Off.
        assert_eq!(content_wait(Duration::from_secs(999), 0, t, 0), t);
    }
}
