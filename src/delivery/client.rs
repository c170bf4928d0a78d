//! The outbound SMTP client: one session with one destination host.
//!
//! EHLO (HELO when refused), STARTTLS when the session asks for it and the
//! server offers it (RFC 3207: after the handshake everything learnt before
//! is forgotten and EHLO is said again), PIPELINING when offered (MAIL,
//! every RCPT and DATA in one write, RFC 2920), SIZE (a message the server
//! says it will not take is not sent), 8BITMIME/SMTPUTF8 awareness, a reply
//! per recipient, and DATA streamed from the spool with dot-stuffing
//! (bounded memory). Every wait has a Postfix-like timeout.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::route::Target;
use super::tls::{TlsRequest, server_name};
use crate::spool::{Envelope, SpoolError};

/// Longest reply line we read; longer ones are a protocol error.
const REPLY_LINE_LIMIT: usize = 4096;
/// Most lines in one multi-line reply.
const REPLY_LINES_LIMIT: usize = 100;

/// How the client waits and what it sends: the `delivery.*` timeouts and
/// the longest line.
#[derive(Debug, Clone)]
pub struct Settings {
    pub connect: Duration,
    pub greeting: Duration,
    pub command: Duration,
    pub data: Duration,
    /// Longer lines are folded when sent (0: never); see [`DotStuffer`].
    pub line_length_limit: usize,
    /// Who this node is, to see mail that would loop back to it.
    pub myself: Myself,
}

/// This node as a destination: its SMTP listeners, and the host names of
/// the cluster's nodes (its own `myhostname` and those the others
/// registered in the shared queue). A session that reaches one of them (a
/// `relay_host` that names the node itself, another node, or a balancer
/// in front of them) is refused before MAIL, as Postfix's "mail for …
/// loops back to myself".
#[derive(Debug, Clone, Default)]
pub struct Myself {
    pub hostnames: Vec<String>,
    pub listeners: Vec<std::net::SocketAddr>,
}

impl Myself {
    /// `peer` (connected from `local`) is one of this node's listeners: the
    /// same address, or the port of a wildcard listener on a loopback
    /// address or on the address the connection came from.
    fn is_listener(&self, peer: std::net::SocketAddr, local: std::net::SocketAddr) -> bool {
        self.listeners.iter().any(|l| {
            l.port() == peer.port()
                && (l.ip() == peer.ip()
                    || (l.ip().is_unspecified() && (peer.ip().is_loopback() || peer.ip() == local.ip())))
        })
    }

    /// The cluster host name the reply names first (a greeting, or the
    /// first line of an EHLO/HELO reply), if it does.
    fn named_in(&self, reply: &RemoteReply) -> Option<&str> {
        let first = reply.text.lines().next().unwrap_or("").split_whitespace().next().unwrap_or("");
        self.hostnames.iter().map(String::as_str).find(|h| !h.is_empty() && first.eq_ignore_ascii_case(h))
    }
}

/// A reply from the remote server, all lines joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteReply {
    pub code: u16,
    pub text: String,
}

impl RemoteReply {
    pub fn is_success(&self) -> bool {
        (200..400).contains(&self.code)
    }
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }
    /// The enhanced status code in the reply, or one derived from the class.
    pub fn enhanced(&self) -> String {
        let first = self.text.split_whitespace().next().unwrap_or("");
        let class = self.code / 100;
        // RFC 3463: the class must be 2, 4 or 5 and agree with the reply's
        // first digit; a "550 2.0.0" keeps its 5 and gets 5.0.0.
        let looks_enhanced = first.split('.').count() == 3
            && first.split('.').all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
            && first.split('.').next() == Some(class.to_string().as_str());
        if looks_enhanced { first.to_string() } else { format!("{class}.0.0") }
    }
}

impl std::fmt::Display for RemoteReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

/// A session that reached this node itself, in Postfix's words.
fn loops_back(target: &Target, why: String) -> ClientError {
    ClientError::Loop { host: target.host.clone(), why }
}

/// A failure of the session itself (not a reply): always temporary.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect to {0} failed: {1}")]
    Connect(String, String),
    #[error("timeout {0}")]
    Timeout(&'static str),
    #[error("lost connection {0}")]
    Lost(&'static str),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("greeting refused: {0}")]
    Refused(RemoteReply),
    #[error("queue read failed: {0}")]
    Spool(#[from] SpoolError),
    /// The session reached this node itself: delivering would loop;
    /// `why` says how it was seen.
    #[error("mail for {host} loops back to myself")]
    Loop { host: String, why: String },
    #[error("TLS is required, but was not offered by host {0}")]
    TlsNotOffered(String),
    #[error("STARTTLS refused by host {host}: {reply}")]
    StartTlsRefused { host: String, reply: RemoteReply },
    #[error("TLS handshake with host {host} failed: {reason}")]
    TlsHandshake { host: String, reason: String },
    #[error("server certificate not verified for host {host}: {reason}")]
    TlsVerify { host: String, reason: String },
}

impl ClientError {
    /// The enhanced status code (RFC 3463) for a session that could not be
    /// set up: 4.7.4 TLS not available, 4.7.5 handshake or certificate
    /// failure, 4.4.1 anything else (no answer from host).
    pub fn status(&self) -> &'static str {
        match self {
            ClientError::TlsNotOffered(_) | ClientError::StartTlsRefused { .. } => "4.7.4",
            ClientError::TlsHandshake { .. } | ClientError::TlsVerify { .. } => "4.7.5",
            ClientError::Loop { .. } => "4.4.6",
            _ => "4.4.1",
        }
    }

    /// STARTTLS was tried and did not give an encrypted session: the case
    /// where `may` tries the host again in clear.
    pub fn is_tls_failure(&self) -> bool {
        matches!(
            self,
            ClientError::StartTlsRefused { .. } | ClientError::TlsHandshake { .. } | ClientError::TlsVerify { .. }
        )
    }

    /// The `result` label of `mxrelay_delivery_tls_total` for a TLS failure.
    pub fn tls_result(&self) -> Option<&'static str> {
        match self {
            ClientError::TlsNotOffered(_) => Some("required_missing"),
            ClientError::StartTlsRefused { .. } => Some("starttls_refused"),
            ClientError::TlsHandshake { .. } => Some("handshake_failed"),
            ClientError::TlsVerify { .. } => Some("verify_failed"),
            _ => None,
        }
    }
}

/// The TLS state of an encrypted session, for the mail log:
/// `TLSv1.3:TLS13_AES_256_GCM_SHA384:verified`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSession {
    pub version: String,
    pub cipher: String,
    /// The certificate chained to a trusted root and matched the host name.
    pub verified: bool,
}

impl std::fmt::Display for TlsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let trust = if self.verified { "verified" } else { "unverified" };
        write!(f, "{}:{}:{trust}", self.version, self.cipher)
    }
}

#[derive(Debug, Clone, Default)]
pub struct Extensions {
    pub pipelining: bool,
    /// `SIZE` limit; `Some(0)` means offered without a limit.
    pub size: Option<u64>,
    pub eight_bit: bool,
    pub smtputf8: bool,
    pub starttls: bool,
    /// RFC 3030 `CHUNKING`: the content goes by BDAT, as it is.
    pub chunking: bool,
    /// RFC 3461 `DSN`: RET, ENVID, NOTIFY and ORCPT are passed on.
    pub dsn: bool,
}

/// Where the message content comes from, piece by piece.
#[async_trait::async_trait]
pub trait BodySource: Send {
    /// The next piece, or `None` at the end.
    async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, SpoolError>;
}

/// What the server answered in one transaction.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// MAIL was refused: the reply applies to every recipient.
    MailRefused(RemoteReply),
    /// Per recipient, in order: the RCPT reply, or for accepted recipients
    /// the reply to the end of data.
    Replies(Vec<RemoteReply>),
}

/// The socket of a session: in clear, or wrapped after STARTTLS.
enum Stream {
    Clear(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Clear(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Clear(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Clear(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Clear(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

pub struct Connection {
    /// Reads are buffered; writes go straight through (each `write` is one
    /// whole command or batch).
    stream: BufReader<Stream>,
    pub ext: Extensions,
    pub target: Target,
    /// `Some` once STARTTLS succeeded.
    pub tls: Option<TlsSession>,
    /// No transaction is open: the last one ended with the server's
    /// answer to its content, or never began (MAIL refused), so the next
    /// MAIL needs no RSET first.
    pub clean: bool,
    /// The current transaction's content began to go out: from then on
    /// the server may have the message, however the session ends (a
    /// lost reply after the end of data means it may get it twice).
    pub content_started: bool,
    settings: Settings,
}

impl Connection {
    /// Connects, reads the greeting and says EHLO (HELO if EHLO is
    /// refused); then STARTTLS when `tls` asks for it: offered → the
    /// handshake and EHLO again; not offered → clear, or an error when TLS
    /// is required.
    pub async fn open(
        target: &Target,
        helo: &str,
        settings: &Settings,
        tls: Option<&TlsRequest>,
    ) -> Result<Connection, ClientError> {
        let stream = match tokio::time::timeout(settings.connect, TcpStream::connect(target.addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(ClientError::Connect(target.addr.to_string(), e.to_string())),
            Err(_) => return Err(ClientError::Connect(target.addr.to_string(), "timed out".into())),
        };
        let _ = stream.set_nodelay(true);
        if let Ok(local) = stream.local_addr()
            && settings.myself.is_listener(target.addr, local)
        {
            return Err(loops_back(target, format!("{} is a listener of this node", target.addr)));
        }
        let mut c = Connection {
            stream: BufReader::new(Stream::Clear(stream)),
            ext: Extensions::default(),
            target: target.clone(),
            tls: None,
            clean: true,
            content_started: false,
            settings: settings.clone(),
        };
        let greeting = c.reply(settings.greeting, "waiting for the greeting").await?;
        if !greeting.is_success() {
            return Err(ClientError::Refused(greeting));
        }
        if let Some(name) = settings.myself.named_in(&greeting) {
            return Err(loops_back(target, format!("it greeted with the name of a node of this cluster, {name}")));
        }
        c.hello(helo).await?;
        match tls {
            Some(request) if c.ext.starttls => c.start_tls(request, helo).await,
            Some(request) if request.required => Err(ClientError::TlsNotOffered(c.peer())),
            _ => Ok(c),
        }
    }

    /// EHLO, or HELO when EHLO is refused; sets the extensions.
    async fn hello(&mut self, helo: &str) -> Result<(), ClientError> {
        let t = self.settings.greeting;
        self.write(format!("EHLO {helo}\r\n").as_bytes(), "sending EHLO").await?;
        let ehlo = self.reply(t, "after EHLO").await?;
        if ehlo.is_success() {
            if let Some(name) = self.settings.myself.named_in(&ehlo) {
                let why = format!("it replied to EHLO with the name of a node of this cluster, {name}");
                return Err(loops_back(&self.target, why));
            }
            self.ext = parse_extensions(&ehlo.text);
            return Ok(());
        }
        self.ext = Extensions::default();
        self.write(format!("HELO {helo}\r\n").as_bytes(), "sending HELO").await?;
        let helo_reply = self.reply(t, "after HELO").await?;
        if !helo_reply.is_success() {
            return Err(ClientError::Refused(helo_reply));
        }
        if let Some(name) = self.settings.myself.named_in(&helo_reply) {
            let why = format!("it replied to HELO with the name of a node of this cluster, {name}");
            return Err(loops_back(&self.target, why));
        }
        Ok(())
    }

    /// RFC 3207: STARTTLS, the handshake (within the greeting timeout, as
    /// Postfix's `smtp_starttls_timeout`), then EHLO again with the
    /// extensions from before forgotten.
    async fn start_tls(mut self, request: &TlsRequest, helo: &str) -> Result<Connection, ClientError> {
        let peer = self.peer();
        self.write(b"STARTTLS\r\n", "sending STARTTLS").await?;
        let reply = self.reply(self.settings.greeting, "after STARTTLS").await?;
        if reply.code != 220 {
            return Err(ClientError::StartTlsRefused { host: peer, reply });
        }
        // Anything after the 220 came in clear before the handshake and
        // could have been injected on the way (RFC 3207 §6): no session.
        if !self.stream.buffer().is_empty() {
            return Err(ClientError::TlsHandshake {
                host: peer,
                reason: "plaintext data after the 220 reply to STARTTLS".into(),
            });
        }
        let Stream::Clear(tcp) = self.stream.into_inner() else {
            return Err(ClientError::Protocol("STARTTLS on a session that is already encrypted".into()));
        };
        let name = match server_name(&self.target.host) {
            Some(name) => name,
            None if request.verify => {
                return Err(ClientError::TlsVerify {
                    host: peer,
                    reason: format!("{:?} is not a name a certificate can match", self.target.host),
                });
            }
            // Not verified: the name only goes into SNI (never for an IP).
            None => self.target.addr.ip().into(),
        };
        let connector = TlsConnector::from(request.config.clone());
        let handshake = tokio::time::timeout(self.settings.greeting, connector.connect(name, tcp)).await;
        let tls = match handshake {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return Err(handshake_error(&e, request.verify, peer)),
            Err(_) => return Err(ClientError::TlsHandshake { host: peer, reason: "timed out".into() }),
        };
        let (_, session) = tls.get_ref();
        self.tls = Some(TlsSession {
            version: match session.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".into(),
                Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".into(),
                other => format!("{other:?}"),
            },
            cipher: session
                .negotiated_cipher_suite()
                .map(|s| s.suite().as_str().map_or_else(|| format!("{:?}", s.suite()), str::to_string))
                .unwrap_or_default(),
            verified: request.verify,
        });
        self.stream = BufReader::new(Stream::Tls(Box::new(tls)));
        self.hello(helo).await?;
        Ok(self)
    }

    /// `host[ip]:port`, as in the mail log.
    pub fn peer(&self) -> String {
        format!("{}[{}]:{}", self.target.host, self.target.addr.ip(), self.target.addr.port())
    }

    async fn write(&mut self, bytes: &[u8], during: &'static str) -> Result<(), ClientError> {
        match tokio::time::timeout(self.settings.command, self.stream.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(ClientError::Lost(during)),
            Err(_) => Err(ClientError::Timeout(during)),
        }
    }

    /// Reads one (possibly multi-line) reply.
    async fn reply(&mut self, timeout: Duration, during: &'static str) -> Result<RemoteReply, ClientError> {
        let read = async {
            let mut text = Vec::new();
            for _ in 0..REPLY_LINES_LIMIT {
                let mut line = Vec::new();
                let n = (&mut self.stream)
                    .take(REPLY_LINE_LIMIT as u64)
                    .read_until(b'\n', &mut line)
                    .await
                    .map_err(|_| ClientError::Lost(during))?;
                if n == 0 {
                    return Err(ClientError::Lost(during));
                }
                let Some(reply_line) = parse_reply_line(&line) else {
                    let line = String::from_utf8_lossy(&line).trim_end().to_string();
                    return Err(ClientError::Protocol(format!("malformed reply {line:?} {during}")));
                };
                text.push(reply_line.text);
                if !reply_line.more {
                    return Ok(RemoteReply { code: reply_line.code, text: text.join(" ") });
                }
            }
            Err(ClientError::Protocol(format!("reply too long {during}")))
        };
        match tokio::time::timeout(timeout, read).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout(during)),
        }
    }

    /// One transaction: MAIL, RCPT per recipient, then the content by DATA,
    /// or by BDAT when the server offers CHUNKING (as Postfix does since
    /// 3.4: no dot-stuffing, the bytes as they are). Per recipient, the
    /// reply that decides its fate.
    pub async fn send(
        &mut self,
        env: &Envelope,
        recipients: &[String],
        body: &mut dyn BodySource,
    ) -> Result<Outcome, ClientError> {
        self.content_started = false;
        let mut mail = format!("MAIL FROM:<{}>", env.sender);
        if self.ext.size.is_some() {
            mail.push_str(&format!(" SIZE={}", env.size));
        }
        if env.eight_bit && self.ext.eight_bit {
            mail.push_str(" BODY=8BITMIME");
        }
        if env.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        if self.ext.dsn {
            if let Some(ret) = &env.dsn_ret {
                mail.push_str(&format!(" RET={ret}"));
            }
            if let Some(envid) = &env.dsn_envid {
                mail.push_str(&format!(" ENVID={envid}"));
            }
        }
        mail.push_str("\r\n");
        // NOTIFY and ORCPT by address, looked up once per message.
        let asked: std::collections::HashMap<&str, &crate::spool::Recipient> = if self.ext.dsn {
            env.recipients.iter().map(|x| (x.address.as_str(), x)).collect()
        } else {
            Default::default()
        };
        let rcpts: Vec<String> = recipients
            .iter()
            .map(|r| {
                let mut line = format!("RCPT TO:<{r}>");
                if let Some(asked) = asked.get(r.as_str()) {
                    if let Some(notify) = &asked.notify {
                        line.push_str(&format!(" NOTIFY={notify}"));
                    }
                    if let Some(orcpt) = &asked.orcpt {
                        line.push_str(&format!(" ORCPT={orcpt}"));
                    }
                }
                line + "\r\n"
            })
            .collect();
        let t = self.settings.command;
        let bdat = self.ext.chunking;
        let (mail_reply, rcpt_replies, data_reply) = if self.ext.pipelining {
            let mut batch = mail.into_bytes();
            rcpts.iter().for_each(|r| batch.extend_from_slice(r.as_bytes()));
            if !bdat {
                batch.extend_from_slice(b"DATA\r\n");
            }
            self.write(&batch, "sending MAIL/RCPT/DATA").await?;
            let mail_reply = self.reply(t, "after MAIL").await?;
            let mut rcpt_replies = Vec::with_capacity(rcpts.len());
            for _ in &rcpts {
                rcpt_replies.push(self.reply(t, "after RCPT").await?);
            }
            let data_reply = if bdat { None } else { Some(self.reply(t, "after DATA").await?) };
            (mail_reply, rcpt_replies, data_reply)
        } else {
            self.write(mail.as_bytes(), "sending MAIL").await?;
            let mail_reply = self.reply(t, "after MAIL").await?;
            let mut rcpt_replies = Vec::new();
            if mail_reply.is_success() {
                for r in &rcpts {
                    self.write(r.as_bytes(), "sending RCPT").await?;
                    rcpt_replies.push(self.reply(t, "after RCPT").await?);
                }
            }
            let data_reply = if !bdat && rcpt_replies.iter().any(RemoteReply::is_success) {
                self.write(b"DATA\r\n", "sending DATA").await?;
                Some(self.reply(t, "after DATA").await?)
            } else {
                None
            };
            (mail_reply, rcpt_replies, data_reply)
        };
        self.clean = false;
        if !mail_reply.is_success() {
            self.clean = true;
            if data_reply.as_ref().is_some_and(|r| r.code == 354) {
                self.write(b".\r\n", "ending empty DATA").await?;
                self.reply(self.settings.data, "after end of data").await?;
            }
            return Ok(Outcome::MailRefused(mail_reply));
        }
        let accepted = rcpt_replies.iter().any(RemoteReply::is_success);
        let final_reply = match data_reply {
            _ if bdat && accepted => Some(self.send_chunks(body).await?),
            Some(r) if r.code == 354 && accepted => {
                self.stream_body(body).await?;
                Some(self.reply(self.settings.data, "after end of data").await?)
            }
            Some(r) if r.code == 354 => {
                // A server that said 354 with no recipient: send nothing.
                self.write(b".\r\n", "ending empty DATA").await?;
                self.reply(self.settings.data, "after end of data").await?;
                None
            }
            Some(r) if accepted => Some(r),
            _ => None,
        };
        // A refused content (or none sent) may leave the transaction open.
        self.clean = final_reply.as_ref().is_some_and(RemoteReply::is_success);
        let replies = rcpt_replies
            .into_iter()
            .map(|r| match (&final_reply, r.is_success()) {
                (Some(done), true) => done.clone(),
                _ => r,
            })
            .collect();
        Ok(Outcome::Replies(replies))
    }

    /// Copies the body with dot-stuffing, then `CRLF.CRLF`, in the same
    /// write as the last piece.
    async fn stream_body(&mut self, body: &mut dyn BodySource) -> Result<(), ClientError> {
        self.content_started = true;
        let mut stuffer = DotStuffer::new(self.settings.line_length_limit);
        let mut out = Vec::new();
        let mut next = body.next_chunk().await?;
        loop {
            out.clear();
            if let Some(piece) = next.take() {
                stuffer.encode(&piece, &mut out);
                next = body.next_chunk().await?;
            }
            let last = next.is_none();
            if last {
                stuffer.finish(&mut out);
            }
            match tokio::time::timeout(self.settings.data, self.stream.write_all(&out)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(ClientError::Lost("sending message content")),
                Err(_) => return Err(ClientError::Timeout("sending message content")),
            }
            if last {
                stuffer.count_folds(&self.peer(), self.settings.line_length_limit);
                return Ok(());
            }
        }
    }

    /// RFC 3030: the content as BDAT chunks, one per piece from the queue
    /// (long lines folded as with DATA, nothing else changed), the last
    /// one `LAST`. A chunk the server refuses ends the transaction: its
    /// reply is the answer for every recipient.
    async fn send_chunks(&mut self, body: &mut dyn BodySource) -> Result<RemoteReply, ClientError> {
        self.content_started = true;
        let mut folder = DotStuffer::without_dots(self.settings.line_length_limit);
        let mut out = Vec::new();
        let mut next = body.next_chunk().await?;
        loop {
            let piece = next.take();
            out.clear();
            if let Some(piece) = &piece {
                folder.encode(piece, &mut out);
                next = body.next_chunk().await?;
            }
            let last = next.is_none();
            if last {
                folder.finish(&mut out);
            }
            let header = format!("BDAT {}{}\r\n", out.len(), if last { " LAST" } else { "" });
            self.write(header.as_bytes(), "sending BDAT").await?;
            match tokio::time::timeout(self.settings.data, self.stream.write_all(&out)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(ClientError::Lost("sending message content")),
                Err(_) => return Err(ClientError::Timeout("sending message content")),
            }
            let reply = self.reply(self.settings.data, "after BDAT").await?;
            if last || !reply.is_success() {
                folder.count_folds(&self.peer(), self.settings.line_length_limit);
                return Ok(reply);
            }
        }
    }

    /// A recipient verification probe (Postfix's `verify(8)` probes):
    /// `MAIL FROM:<>` and `RCPT TO:<address>`, no content. The RCPT reply,
    /// or `Err` with the MAIL reply when the server refused the null sender
    /// (which says nothing of the address). The caller ends with QUIT.
    pub async fn probe_recipient(&mut self, address: &str) -> Result<Result<RemoteReply, RemoteReply>, ClientError> {
        let utf8 = if !address.is_ascii() && self.ext.smtputf8 { " SMTPUTF8" } else { "" };
        self.write(format!("MAIL FROM:<>{utf8}\r\n").as_bytes(), "sending MAIL FROM").await?;
        let mail = self.reply(self.settings.command, "after MAIL FROM").await?;
        if !mail.is_success() {
            return Ok(Err(mail));
        }
        self.write(format!("RCPT TO:<{address}>\r\n").as_bytes(), "sending RCPT TO").await?;
        Ok(Ok(self.reply(self.settings.command, "after RCPT TO").await?))
    }

    /// RSET, to reuse the session for another message.
    pub async fn reset(&mut self) -> Result<(), ClientError> {
        self.write(b"RSET\r\n", "sending RSET").await?;
        let r = self.reply(self.settings.command, "after RSET").await?;
        self.clean = r.is_success();
        if r.is_success() { Ok(()) } else { Err(ClientError::Protocol(format!("RSET refused: {r}"))) }
    }

    pub async fn quit(mut self) {
        if self.write(b"QUIT\r\n", "sending QUIT").await.is_ok() {
            let _ = self.reply(Duration::from_secs(5).min(self.settings.command), "after QUIT").await;
        }
        let _ = self.stream.shutdown().await;
    }
}

/// A failed handshake: a certificate the verifier refused is a
/// verification failure when we verify, anything else a handshake failure.
fn handshake_error(e: &std::io::Error, verify: bool, host: String) -> ClientError {
    let rustls_error = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let reason = rustls_error.map_or_else(|| e.to_string(), |r| r.to_string());
    match rustls_error {
        Some(rustls::Error::InvalidCertificate(_)) if verify => ClientError::TlsVerify { host, reason },
        _ => ClientError::TlsHandshake { host, reason },
    }
}

/// One line of a reply (RFC 5321 §4.2.1) as read, line ending included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyLine {
    pub code: u16,
    /// `250-`: more lines of the same reply follow.
    pub more: bool,
    pub text: String,
}

/// Parses one reply line; `None` when it does not start with a code
/// from 200 to 599. The reply's code is that of its last line.
pub fn parse_reply_line(raw: &[u8]) -> Option<ReplyLine> {
    let line = String::from_utf8_lossy(raw);
    let line = line.trim_end();
    let code = line.get(..3).and_then(|c| c.parse::<u16>().ok()).filter(|c| (200..600).contains(c))?;
    let more = line.as_bytes().get(3) == Some(&b'-');
    Some(ReplyLine { code, more, text: line.get(4..).unwrap_or("").to_string() })
}

/// EHLO keywords (RFC 5321 §4.1.1.1), from the reply text after the first line.
pub fn parse_extensions(text: &str) -> Extensions {
    let mut ext = Extensions::default();
    // `text` joins the lines with spaces; keywords are the upper-case words.
    let words: Vec<&str> = text.split_whitespace().collect();
    for (i, w) in words.iter().enumerate() {
        match w.to_ascii_uppercase().as_str() {
            "PIPELINING" => ext.pipelining = true,
            "8BITMIME" => ext.eight_bit = true,
            "SMTPUTF8" => ext.smtputf8 = true,
            "STARTTLS" => ext.starttls = true,
            "CHUNKING" => ext.chunking = true,
            "DSN" => ext.dsn = true,
            "SIZE" => ext.size = Some(words.get(i + 1).and_then(|n| n.parse().ok()).unwrap_or(0)),
            _ => {}
        }
    }
    ext
}

/// RFC 5321 §4.5.2 transparency, streaming: a `.` that starts a line gets a
/// second one. A line start is any byte after LF. Lines longer than the
/// limit (RFC 5321 §4.5.3.1.6: 998 octets without CRLF) are folded as
/// Postfix's `smtp_line_length_limit` does, by inserting CRLF and a space
/// (a header continuation; in a body, the least damage to MIME), before a
/// UTF-8 character rather than inside one, so no strict destination
/// refuses the message with "line too long".
#[derive(Debug)]
pub struct DotStuffer {
    /// Dot-stuffing and the end-of-data mark (DATA); off for BDAT, which
    /// only folds long lines.
    dots: bool,
    line_start: bool,
    last: Option<u8>,
    /// Octets of the current line so far, CR and LF not counted.
    line_len: usize,
    limit: usize,
    /// Lines folded so far.
    pub folded: usize,
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer::new(0)
    }
}

impl DotStuffer {
    /// `limit`: longest line sent, CRLF not counted (0: no folding).
    pub fn new(limit: usize) -> DotStuffer {
        DotStuffer { dots: true, line_start: true, last: None, line_len: 0, limit, folded: 0 }
    }

    /// For BDAT: long lines folded, nothing else.
    pub fn without_dots(limit: usize) -> DotStuffer {
        DotStuffer { dots: false, ..DotStuffer::new(limit) }
    }

    /// Counts and logs the lines folded in one message.
    fn count_folds(&self, peer: &str, limit: usize) {
        if self.folded > 0 {
            crate::metrics::METRICS.delivery_lines_folded.inc_by(self.folded as u64);
            tracing::info!(peer = %peer, folded = self.folded, limit, "long lines folded");
        }
    }

    pub fn encode(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.reserve(input.len() + input.len() / 64);
        let mut rest = input;
        while !rest.is_empty() {
            // Line by line: a line that cannot need folding (even counting
            // its CRs and a UTF-8 lead byte's whole character) is copied
            // at once, with its stuffing dot; any other goes byte by byte.
            let end = memchr::memchr(b'\n', rest).map_or(rest.len(), |p| p + 1);
            let (line, next) = rest.split_at(end);
            if self.limit == 0 || self.line_len + line.len() + 3 <= self.limit {
                if self.dots && self.line_start && line[0] == b'.' {
                    out.push(b'.');
                }
                out.extend_from_slice(line);
                if line.last() == Some(&b'\n') {
                    self.line_len = 0;
                    self.line_start = true;
                } else {
                    self.line_len += line.len() - memchr::memchr_iter(b'\r', line).count();
                    self.line_start = false;
                }
            } else {
                for &b in line {
                    self.byte(b, out);
                }
            }
            rest = next;
        }
        if let Some(&b) = input.last() {
            self.last = Some(b);
        }
    }

    fn byte(&mut self, b: u8, out: &mut Vec<u8>) {
        match b {
            b'\n' => self.line_len = 0,
            b'\r' => {}
            _ => {
                if self.limit > 0 && self.line_len + utf8_len(b) > self.limit && self.line_len > 0 {
                    out.extend_from_slice(b"\r\n ");
                    self.line_len = 1;
                    self.line_start = false;
                    self.folded += 1;
                }
                self.line_len += 1;
            }
        }
        if self.dots && self.line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        self.line_start = b == b'\n';
    }

    /// A CRLF if the content lacks one at its end, then (DATA) the
    /// end-of-data mark.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.last.is_some_and(|b| b != b'\n') {
            out.extend_from_slice(b"\r\n");
        }
        if self.dots {
            out.extend_from_slice(b".\r\n");
        }
    }
}

/// Octets of the UTF-8 character that `lead` starts (1 for ASCII and for
/// bytes that start none: continuation bytes and invalid ones).
fn utf8_len(lead: u8) -> usize {
    match lead {
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_to_this_node_is_seen_as_a_loop() {
        let addr = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        let me = Myself {
            hostnames: vec!["mx1.example.net".into(), "mx2.example.net".into()],
            listeners: vec![addr("0.0.0.0:25"), addr("10.0.0.5:465")],
        };
        let from = addr("10.0.0.5:40000");
        assert!(me.is_listener(addr("10.0.0.5:25"), from), "this host's own address");
        assert!(me.is_listener(addr("127.0.0.3:25"), from), "any loopback address");
        assert!(me.is_listener(addr("10.0.0.5:465"), from), "a listener's exact address");
        assert!(!me.is_listener(addr("10.0.0.6:25"), from), "another host");
        assert!(!me.is_listener(addr("127.0.0.1:2525"), from), "another port");
        assert!(!me.is_listener(addr("10.0.0.7:465"), from), "the port of a listener bound to one address");
        let reply = |text: &str| RemoteReply { code: 220, text: text.into() };
        assert_eq!(me.named_in(&reply("MX1.example.net ESMTP")), Some("mx1.example.net"), "without case");
        assert!(me.named_in(&reply("mx1.example.net\nPIPELINING\nSIZE 10240000")).is_some(), "EHLO's first line");
        assert_eq!(me.named_in(&reply("mx2.example.net ESMTP")), Some("mx2.example.net"), "another node");
        assert!(me.named_in(&reply("mx9.example.net ESMTP mx1.example.net")).is_none(), "only the first word");
        assert!(Myself::default().named_in(&reply("")).is_none(), "no host name, no loop");
    }

    #[test]
    fn dot_stuffing_and_end() {
        let mut s = DotStuffer::default();
        let mut out = Vec::new();
        s.encode(b".a\r\n..b\r\nc.", &mut out);
        s.encode(b"\r\n.", &mut out);
        s.finish(&mut out);
        assert_eq!(out, b"..a\r\n...b\r\nc.\r\n..\r\n.\r\n");
    }

    #[test]
    fn bdat_content_is_sent_as_it_is() {
        let mut s = DotStuffer::without_dots(0);
        let mut out = Vec::new();
        s.encode(b".a\r\n.\r\nbare\rcr\r\n.", &mut out);
        s.finish(&mut out);
        assert_eq!(out, b".a\r\n.\r\nbare\rcr\r\n.\r\n", "no dot-stuffing, no end mark, a final CRLF");
        let mut s = DotStuffer::without_dots(0);
        let mut out = Vec::new();
        s.encode(b"ends well\r\n", &mut out);
        s.finish(&mut out);
        assert_eq!(out, b"ends well\r\n");
        assert!(parse_extensions("mx.example PIPELINING CHUNKING SIZE 100").chunking);
    }

    fn stuffed(limit: usize, pieces: &[&[u8]]) -> (Vec<u8>, usize) {
        let mut s = DotStuffer::new(limit);
        let mut out = Vec::new();
        for p in pieces {
            s.encode(p, &mut out);
        }
        s.finish(&mut out);
        (out, s.folded)
    }

    proptest::proptest! {
        /// The line-at-once copy changes nothing: the same bytes and folds
        /// as byte by byte, for any split, limit, dots or not.
        #[test]
        fn whole_lines_are_encoded_as_byte_by_byte(
            body in proptest::collection::vec(proptest::prop_oneof![
                proptest::strategy::Just(b'.'), proptest::strategy::Just(b'\r'), proptest::strategy::Just(b'\n'),
                proptest::strategy::Just(b'a'), proptest::strategy::Just(0xC3u8), proptest::strategy::Just(0xF0u8),
                proptest::arbitrary::any::<u8>()], 0..300),
            cut in 0usize..300,
            limit in proptest::prop_oneof![proptest::strategy::Just(0usize), 1usize..20, proptest::strategy::Just(998usize)],
            dots: bool,
        ) {
            let cut = cut.min(body.len());
            let fresh = || if dots { DotStuffer::new(limit) } else { DotStuffer::without_dots(limit) };
            let (mut fast, mut slow) = (fresh(), fresh());
            let (mut a, mut b) = (Vec::new(), Vec::new());
            fast.encode(&body[..cut], &mut a);
            fast.encode(&body[cut..], &mut a);
            fast.finish(&mut a);
            for &x in &body {
                slow.byte(x, &mut b);
            }
            slow.last = body.last().copied();
            slow.finish(&mut b);
            proptest::prop_assert_eq!(a, b);
            proptest::prop_assert_eq!(fast.folded, slow.folded);
        }
    }

    #[test]
    fn long_lines_are_folded_at_the_limit() {
        // A line of exactly the limit is sent as it is.
        let (out, folded) = stuffed(5, &[b"abcde\r\n"]);
        assert_eq!((out.as_slice(), folded), (&b"abcde\r\n.\r\n"[..], 0));
        // Longer: CRLF SPACE, the continuation counting the space; split
        // over chunks the same; a CR before its LF is not a character.
        let (out, folded) = stuffed(5, &[b"abcdefghi", b"jk\r", b"\n.x\r\n"]);
        assert_eq!(out, b"abcde\r\n fghi\r\n jk\r\n..x\r\n.\r\n");
        assert_eq!(folded, 2);
        // A dot after a fold is not at a line start: no stuffing needed.
        assert_eq!(stuffed(3, &[b"abc.d\r\n"]).0, b"abc\r\n .d\r\n.\r\n");
        // Never inside a UTF-8 character: "é" (2 octets) moves to the next line.
        assert_eq!(stuffed(4, &["abcé".as_bytes()]).0, "abc\r\n é\r\n.\r\n".as_bytes());
        // 0: no folding.
        assert_eq!(stuffed(0, &[&[b'x'; 2000]]).0.len(), 2000 + 5);
    }

    #[test]
    fn no_sent_line_exceeds_998_octets() {
        let mut body = vec![b'a'; 65_536];
        body.extend_from_slice(b"\r\n");
        let (out, folded) = stuffed(998, &[&body[..1000], &body[1000..]]);
        assert!(out.split(|b| *b == b'\n').all(|l| l.len() <= 999), "a line over 998 octets + CR");
        assert_eq!(folded, (65_536 - 998usize).div_ceil(997));
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.replace("\r\n ", "").as_bytes(), [&body[..], b".\r\n"].concat());
    }

    #[test]
    fn extensions() {
        let e = parse_extensions("mx.example PIPELINING SIZE 10240000 8BITMIME SMTPUTF8 STARTTLS");
        assert!(e.pipelining && e.eight_bit && e.smtputf8 && e.starttls);
        assert_eq!(e.size, Some(10240000));
        assert_eq!(parse_extensions("mx SIZE").size, Some(0));
    }

    #[test]
    fn reply_lines() {
        let l = parse_reply_line(b"250-mx.example\r\n").unwrap();
        assert_eq!((l.code, l.more, l.text.as_str()), (250, true, "mx.example"));
        let l = parse_reply_line(b"550 5.1.1 unknown\r\n").unwrap();
        assert_eq!((l.code, l.more, l.text.as_str()), (550, false, "5.1.1 unknown"));
        assert_eq!(parse_reply_line(b"250").map(|l| l.more), Some(false));
        assert!(parse_reply_line(b"199 x\r\n").is_none() && parse_reply_line(b"ok\r\n").is_none());
    }

    #[test]
    fn enhanced_codes() {
        let r = RemoteReply { code: 550, text: "5.1.1 <u@x>: user unknown".into() };
        assert_eq!(r.enhanced(), "5.1.1");
        let r = RemoteReply { code: 451, text: "try later".into() };
        assert_eq!(r.enhanced(), "4.0.0");
        let r = RemoteReply { code: 550, text: "2.0.0 nonsense".into() };
        assert_eq!(r.enhanced(), "5.0.0", "a class that disagrees with the code is not used");
        let r = RemoteReply { code: 452, text: "4.5.3 too many".into() };
        assert_eq!(r.enhanced(), "4.5.3");
    }
}
