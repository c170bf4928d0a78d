//! `Destination`: a small scripted SMTP server on 127.0.0.1 that the relay
//! delivers to, for the replies smtp-sink cannot give. The local part of the
//! RCPT address picks the reply (`temp…` → 451, `perm…` → 550, else 250);
//! `set_fail_all_temp(true)` makes every RCPT a 451. A message is recorded
//! only after its `250 … queued` reply is decided, with at least one accepted
//! recipient. After `stop()` (or drop) the port refuses connections and open
//! sessions are cut, as when a real destination goes down.
//!
//! STARTTLS (RFC 3207): `start_tls(&pki)` offers it with the `TestPki`
//! server certificate (rustls, ring); `start_tls_broken()` offers it but
//! closes the connection after its 220; `start_tls_refused()` offers it and
//! answers 454. `Received::tls` says whether the message came encrypted.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

use super::pki::TestPki;

/// How often the accept loop looks at the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(20);
/// How long `start_on` keeps retrying a busy port.
const BIND_RETRY: Duration = Duration::from_secs(5);
/// An idle session is dropped after this (RFC 5321 §4.5.3.2 asks for 5 min;
/// tests never wait that long).
const SESSION_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest command line read; RFC 5321 §4.5.3.1.4 says 512, clients with
/// ESMTP parameters send more.
const MAX_COMMAND_LINE: u64 = 64 * 1024;
/// DATA is read in pieces of at most this, so a long line needs no long buffer.
const MAX_DATA_CHUNK: u64 = 64 * 1024;

const HOSTNAME: &str = "dest.test";

/// One message as the destination accepted it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// Argument of the last EHLO/HELO ("" if none).
    pub helo: String,
    /// The reverse path, inside `<>` ("" for the null sender).
    pub mail_from: String,
    /// The ESMTP parameters of MAIL FROM as sent (e.g. `SIZE=120 SMTPUTF8`).
    pub mail_params: String,
    /// Accepted recipients only, inside `<>`, in RCPT order.
    pub rcpts: Vec<String>,
    /// Content after dot-unstuffing, byte for byte (CRLF line endings as
    /// sent), without the final `.CRLF` but with the CRLF ending the last line.
    pub data: Vec<u8>,
    /// The session was encrypted with STARTTLS.
    pub tls: bool,
}

/// What the destination does about STARTTLS.
#[derive(Clone)]
enum Starttls {
    /// Not offered.
    Off,
    /// Offered; the handshake uses this configuration.
    Offer(Arc<ServerConfig>),
    /// Offered; after `220` the connection is closed (a failed handshake).
    Broken,
    /// Offered; the command is answered `454 4.7.0`.
    Refuse,
}

/// A scripted SMTP destination on 127.0.0.1, stopped on drop.
pub struct Destination {
    pub port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    received: Mutex<Vec<Received>>,
    connections: AtomicUsize,
    fail_all_temp: AtomicBool,
    /// Milliseconds between recording a message and answering its final 250.
    final_reply_delay: AtomicU64,
    /// Longest line accepted in DATA, CRLF not counted (0: any), as a
    /// strict server checks RFC 5321 §4.5.3.1.6.
    line_limit: AtomicUsize,
    /// Hang up after each message's final reply, without QUIT (a server
    /// that closed an idle session the client still has cached).
    close_after_message: AtomicBool,
    /// The message of each session, counted from 1, that is recorded and
    /// then answered by hanging up, with no final reply (0: none).
    hang_up_at_message: AtomicUsize,
    stopping: AtomicBool,
    /// Open sessions, so `stop` can cut them.
    sessions: Mutex<HashMap<u64, TcpStream>>,
    next_session: AtomicU64,
    starttls: Starttls,
}

/// A poisoned lock only means a session thread panicked; the data is fine.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Destination {
    /// Listens on an ephemeral port.
    pub fn start() -> Destination {
        Self::start_with(Starttls::Off)
    }

    /// Offers STARTTLS with the server certificate and key of `pki`.
    pub fn start_tls(pki: &TestPki) -> Destination {
        Self::start_with(Starttls::Offer(server_config(pki)))
    }

    /// Offers STARTTLS, answers it `220` and closes the connection: the
    /// client's handshake fails.
    pub fn start_tls_broken() -> Destination {
        Self::start_with(Starttls::Broken)
    }

    /// Offers STARTTLS and refuses it with `454 4.7.0`.
    pub fn start_tls_refused() -> Destination {
        Self::start_with(Starttls::Refuse)
    }

    fn start_with(starttls: Starttls) -> Destination {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 for the destination");
        Self::serve(listener, starttls)
    }

    /// Listens on `port` (one a relay already points to), retrying for a few
    /// seconds while the port is still busy.
    pub fn start_on(port: u16) -> Destination {
        let started = Instant::now();
        loop {
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(listener) => return Self::serve(listener, Starttls::Off),
                Err(_) if started.elapsed() < BIND_RETRY => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => panic!("destination: cannot bind 127.0.0.1:{port} within {BIND_RETRY:?}: {e}"),
            }
        }
    }

    fn serve(listener: TcpListener, starttls: Starttls) -> Destination {
        let port = listener.local_addr().expect("listener address").port();
        listener.set_nonblocking(true).expect("non-blocking listener");
        let shared = Arc::new(Shared {
            received: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            fail_all_temp: AtomicBool::new(false),
            final_reply_delay: AtomicU64::new(0),
            line_limit: AtomicUsize::new(0),
            close_after_message: AtomicBool::new(false),
            hang_up_at_message: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(0),
            starttls,
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("destination-{port}"))
                .spawn(move || accept_loop(listener, shared))
                .expect("spawn destination accept thread")
        };
        Destination { port, shared, acceptor: Some(acceptor) }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// While on, every RCPT gets `451 4.2.0 <addr>: temporarily unavailable`.
    pub fn set_fail_all_temp(&self, on: bool) {
        self.shared.fail_all_temp.store(on, Ordering::SeqCst);
    }

    /// Records each message at once but answers its final `250` only after
    /// `delay` (a slow destination, with the message already taken).
    pub fn set_final_reply_delay(&self, delay: Duration) {
        self.shared.final_reply_delay.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// From now on, a message with a line longer than `limit` octets (CRLF
    /// not counted) is refused `500 5.5.0 Line too long` and not recorded.
    pub fn set_line_limit(&self, limit: usize) {
        self.shared.line_limit.store(limit, Ordering::SeqCst);
    }

    /// From now on, the session ends right after each message's final
    /// reply (the client learns it when it next writes).
    pub fn set_close_after_message(&self, on: bool) {
        self.shared.close_after_message.store(on, Ordering::SeqCst);
    }

    /// From now on, the `n`th message of each session is recorded and then
    /// answered by hanging up, without its final reply: the client cannot
    /// tell whether it was taken (0: never).
    pub fn set_hang_up_at_message(&self, n: usize) {
        self.shared.hang_up_at_message.store(n, Ordering::SeqCst);
    }

    /// Every message received so far, in the order their DATA ended.
    pub fn messages(&self) -> Vec<Received> {
        lock(&self.shared.received).clone()
    }

    /// Waits until at least `n` messages arrived; panics after `timeout`.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let started = Instant::now();
        loop {
            let got = self.messages();
            if got.len() >= n {
                return got;
            }
            if started.elapsed() >= timeout {
                panic!(
                    "destination on port {}: expected at least {n} message(s) within {timeout:?}, got {} \
                     over {} connection(s): {:#?}",
                    self.port,
                    got.len(),
                    self.connections(),
                    got.iter().map(|m| (&m.mail_from, &m.rcpts)).collect::<Vec<_>>()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Closes the listener (the port then refuses connections) and cuts
    /// every open session. Idempotent.
    pub fn stop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for (_, stream) in lock(&self.shared.sessions).drain() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Destination {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Asserts that `got` is one copy for `delivered` alone and one DSN from
/// `<>` to `sender` reporting `bounced` failed with 5.1.1 (and naming no
/// other recipient, such as one still pending). Returns the DSN's text.
pub fn assert_one_copy_and_one_dsn(got: &[Received], delivered: &str, sender: &str, bounced: &str) -> String {
    let copies: Vec<_> = got.iter().filter(|m| !m.mail_from.is_empty()).collect();
    let dsns: Vec<_> = got.iter().filter(|m| m.mail_from.is_empty()).collect();
    assert_eq!(copies.len(), 1);
    assert_eq!(copies[0].rcpts, vec![delivered]);
    assert_eq!(dsns.len(), 1, "one DSN");
    assert_eq!(dsns[0].rcpts, vec![sender]);
    let dsn = String::from_utf8_lossy(&dsns[0].data).into_owned();
    assert!(dsn.contains("multipart/report") && dsn.contains(&format!("Final-Recipient: rfc822; {bounced}")), "{dsn}");
    assert!(dsn.contains("Status: 5.1.1") && dsn.contains("Action: failed"), "{dsn}");
    assert_eq!(dsn.matches("Final-Recipient:").count(), 1, "{dsn}");
    dsn
}

/// Owns the listener: returning drops it, which closes the port.
fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stopping.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                shared.connections.fetch_add(1, Ordering::SeqCst);
                let id = shared.next_session.fetch_add(1, Ordering::SeqCst);
                if let Ok(clone) = stream.try_clone() {
                    lock(&shared.sessions).insert(id, clone);
                }
                let session_shared = Arc::clone(&shared);
                let spawned = std::thread::Builder::new().name(format!("destination-session-{id}")).spawn(move || {
                    // Any I/O error means the client went away: end quietly.
                    let _ = Session::new(&session_shared).run(stream);
                    lock(&session_shared.sessions).remove(&id);
                });
                if spawned.is_err() {
                    lock(&shared.sessions).remove(&id);
                }
            }
            // WouldBlock: nobody waiting. Other errors (EMFILE, aborted
            // handshakes) are transient for a test server: poll again.
            Err(_) => std::thread::sleep(ACCEPT_POLL),
        }
    }
}

/// One client command, parsed from a line without its line ending.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    Ehlo(String),
    Helo(String),
    /// The address inside `<>` and the parameters after it; `None` when
    /// the argument has no `FROM:`.
    Mail(Option<(String, String)>),
    /// The address inside `<>`; `None` when the argument has no `TO:`.
    Rcpt(Option<String>),
    Data,
    Rset,
    Noop,
    Quit,
    StartTls,
    Unknown,
}

impl Command {
    fn parse(line: &str) -> Command {
        let (verb, arg) = match line.split_once(' ') {
            Some((verb, arg)) => (verb, arg.trim()),
            None => (line.trim(), ""),
        };
        match verb.to_ascii_uppercase().as_str() {
            "EHLO" => Command::Ehlo(arg.to_string()),
            "HELO" => Command::Helo(arg.to_string()),
            "MAIL" => Command::Mail(path_after(arg, "FROM:").map(|p| (p, params_after_path(arg)))),
            "RCPT" => Command::Rcpt(path_after(arg, "TO:")),
            "DATA" => Command::Data,
            "RSET" => Command::Rset,
            "NOOP" => Command::Noop,
            "QUIT" => Command::Quit,
            "STARTTLS" => Command::StartTls,
            _ => Command::Unknown,
        }
    }
}

/// `FROM:<a@b> SIZE=1 SMTPUTF8` → `SIZE=1 SMTPUTF8`.
fn params_after_path(arg: &str) -> String {
    arg.split_once('>').map_or("", |(_, rest)| rest).trim().to_string()
}

/// `FROM:<a@b> SIZE=1` → `a@b`. ESMTP parameters after the path are ignored;
/// a space after the colon and a path without `<>` are tolerated.
fn path_after(arg: &str, keyword: &str) -> Option<String> {
    let head = arg.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = arg[keyword.len()..].trim_start();
    let path = match rest.strip_prefix('<') {
        Some(inner) => inner.split('>').next().unwrap_or(""),
        None => rest.split_whitespace().next().unwrap_or(""),
    };
    Some(path.to_string())
}

/// The RCPT reply for `addr`, by its local part (see the module docs).
fn rcpt_reply(addr: &str, fail_all_temp: bool) -> (bool, String) {
    let local = addr.rsplit_once('@').map_or(addr, |(local, _)| local).to_ascii_lowercase();
    if fail_all_temp || local.starts_with("temp") {
        (false, format!("451 4.2.0 <{addr}>: temporarily unavailable"))
    } else if local.starts_with("perm") {
        (false, format!("550 5.1.1 <{addr}>: user unknown"))
    } else {
        (true, "250 2.1.5 Ok".to_string())
    }
}

/// The rustls server side of STARTTLS, with the PKI's certificate.
fn server_config(pki: &TestPki) -> Arc<ServerConfig> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pki.cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("test PKI certificate PEM");
    let key = PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes()).expect("test PKI key PEM");
    let config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("test PKI certificate and key match");
    Arc::new(config)
}

/// A session's socket: in clear, or after STARTTLS.
enum Io {
    Clear(TcpStream),
    Tls(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl Read for Io {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Io::Clear(s) => s.read(buf),
            Io::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Io {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Io::Clear(s) => s.write(buf),
            Io::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Io::Clear(s) => s.flush(),
            Io::Tls(s) => s.flush(),
        }
    }
}

/// What the session loop does after a command.
enum Next {
    Continue,
    Quit,
    /// `220` sent: wrap the socket.
    Handshake(Arc<ServerConfig>),
}

/// One SMTP session's transaction state.
struct Session<'a> {
    shared: &'a Shared,
    helo: String,
    mail_from: Option<String>,
    mail_params: String,
    rcpts: Vec<String>,
    tls: bool,
    /// Messages recorded in this session.
    messages: usize,
    /// Replies not yet written: pipelined replies go out together.
    out: Vec<u8>,
}

impl<'a> Session<'a> {
    fn new(shared: &'a Shared) -> Session<'a> {
        Session {
            shared,
            helo: String::new(),
            mail_from: None,
            mail_params: String::new(),
            rcpts: Vec::new(),
            tls: false,
            messages: 0,
            out: Vec::new(),
        }
    }

    fn reset(&mut self) {
        self.mail_from = None;
        self.rcpts.clear();
    }

    fn reply(&mut self, line: &str) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    fn flush(&mut self, io: &mut Io) -> io::Result<()> {
        io.write_all(&self.out)?;
        self.out.clear();
        io.flush()
    }

    fn run(&mut self, stream: TcpStream) -> io::Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(SESSION_TIMEOUT))?;
        stream.set_write_timeout(Some(SESSION_TIMEOUT))?;
        let mut reader = BufReader::new(Io::Clear(stream));
        self.reply(&format!("220 {HOSTNAME} ESMTP"));
        self.flush(reader.get_mut())?;
        loop {
            let mut line = Vec::new();
            (&mut reader).take(MAX_COMMAND_LINE).read_until(b'\n', &mut line)?;
            if line.is_empty() {
                return Ok(());
            }
            if !line.ends_with(b"\n") {
                self.reply("500 5.5.2 Error: line too long");
                return self.flush(reader.get_mut());
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\r', '\n']);
            let next = self.command(Command::parse(text), &mut reader)?;
            // Replies to pipelined commands go out together once the client's
            // batch is consumed (RFC 2920 §3.2), as Postfix does.
            if !matches!(next, Next::Continue) || reader.buffer().is_empty() {
                self.flush(reader.get_mut())?;
            }
            match next {
                Next::Continue => {}
                Next::Quit => return Ok(()),
                Next::Handshake(config) => {
                    // RFC 3207 §4.2: forget everything learnt in clear; text
                    // pipelined after STARTTLS is dropped with the buffer.
                    let Io::Clear(tcp) = reader.into_inner() else { return Ok(()) };
                    let conn = ServerConnection::new(config).map_err(io::Error::other)?;
                    let mut tls = StreamOwned::new(conn, tcp);
                    while tls.conn.is_handshaking() {
                        tls.conn.complete_io(&mut tls.sock)?;
                    }
                    reader = BufReader::new(Io::Tls(Box::new(tls)));
                    self.tls = true;
                    self.helo.clear();
                    self.reset();
                }
            }
        }
    }

    /// Answers one command.
    fn command(&mut self, command: Command, reader: &mut BufReader<Io>) -> io::Result<Next> {
        match command {
            Command::Ehlo(arg) => {
                self.reset();
                self.helo = arg;
                let mut extensions =
                    vec!["PIPELINING", "SIZE 1000000000", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"];
                if !self.tls && !matches!(self.shared.starttls, Starttls::Off) {
                    extensions.push("STARTTLS");
                }
                let mut text = format!("250-{HOSTNAME}\r\n");
                for (i, ext) in extensions.iter().enumerate() {
                    let sep = if i + 1 == extensions.len() { ' ' } else { '-' };
                    text.push_str(&format!("250{sep}{ext}\r\n"));
                }
                self.out.extend_from_slice(text.as_bytes());
            }
            Command::Helo(arg) => {
                self.reset();
                self.helo = arg;
                self.reply(&format!("250 {HOSTNAME}"));
            }
            Command::StartTls if self.tls => self.reply("554 5.5.1 Error: TLS already active"),
            Command::StartTls => match &self.shared.starttls {
                Starttls::Off => self.reply("502 5.5.2 Error: command not recognized"),
                Starttls::Refuse => self.reply("454 4.7.0 TLS not available due to local problem"),
                Starttls::Broken => {
                    self.reply("220 2.0.0 Ready to start TLS");
                    return Ok(Next::Quit);
                }
                Starttls::Offer(config) => {
                    let config = Arc::clone(config);
                    self.reply("220 2.0.0 Ready to start TLS");
                    return Ok(Next::Handshake(config));
                }
            },
            Command::Mail(None) | Command::Rcpt(None) => self.reply("501 5.5.4 Syntax error in parameters"),
            Command::Mail(Some(_)) if self.mail_from.is_some() => self.reply("503 5.5.1 Error: nested MAIL command"),
            Command::Mail(Some((from, params))) => {
                self.mail_from = Some(from);
                self.mail_params = params;
                self.reply("250 2.1.0 Ok");
            }
            Command::Rcpt(Some(_)) if self.mail_from.is_none() => self.reply("503 5.5.1 Error: need MAIL command"),
            Command::Rcpt(Some(to)) => {
                let (accepted, text) = rcpt_reply(&to, self.shared.fail_all_temp.load(Ordering::SeqCst));
                if accepted {
                    self.rcpts.push(to);
                }
                self.reply(&text);
            }
            Command::Data if self.mail_from.is_none() => self.reply("503 5.5.1 Error: need MAIL command"),
            // A pipelining client sends DATA even when every RCPT failed.
            Command::Data if self.rcpts.is_empty() => self.reply("554 5.5.1 Error: no valid recipients"),
            Command::Data => {
                self.reply("354 End data with <CR><LF>.<CR><LF>");
                self.flush(reader.get_mut())?;
                let data = read_data(reader)?;
                let limit = self.shared.line_limit.load(Ordering::SeqCst);
                if limit > 0 && data.split(|b| *b == b'\n').any(|l| l.strip_suffix(b"\r").unwrap_or(l).len() > limit) {
                    self.reset();
                    self.reply("500 5.5.0 Line too long");
                    return Ok(Next::Continue);
                }
                let message = Received {
                    helo: self.helo.clone(),
                    mail_from: self.mail_from.take().unwrap_or_default(),
                    mail_params: std::mem::take(&mut self.mail_params),
                    rcpts: std::mem::take(&mut self.rcpts),
                    data,
                    tls: self.tls,
                };
                lock(&self.shared.received).push(message);
                self.messages += 1;
                if self.messages == self.shared.hang_up_at_message.load(Ordering::SeqCst) {
                    return Ok(Next::Quit);
                }
                std::thread::sleep(Duration::from_millis(self.shared.final_reply_delay.load(Ordering::SeqCst)));
                self.reply("250 2.0.0 Ok: queued");
                if self.shared.close_after_message.load(Ordering::SeqCst) {
                    return Ok(Next::Quit);
                }
            }
            Command::Rset => {
                self.reset();
                self.reply("250 2.0.0 Ok");
            }
            Command::Noop => self.reply("250 2.0.0 Ok"),
            Command::Quit => {
                self.reply("221 2.0.0 Bye");
                return Ok(Next::Quit);
            }
            Command::Unknown => self.reply("502 5.5.2 Error: command not recognized"),
        }
        Ok(Next::Continue)
    }
}

/// Reads DATA content up to the `CRLF.CRLF` terminator (RFC 5321 §4.1.1.4)
/// and undoes dot-stuffing (§4.5.2). Only CRLF ends a line: a bare LF is
/// content, so `LF.CRLF` does not end the message.
fn read_data(reader: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut data = Vec::new();
    loop {
        let at_line_start = data.is_empty() || data.ends_with(b"\r\n");
        let mut chunk = Vec::new();
        reader.take(MAX_DATA_CHUNK).read_until(b'\n', &mut chunk)?;
        if chunk.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed in DATA"));
        }
        if at_line_start && chunk == b".\r\n" {
            return Ok(data);
        }
        let unstuffed = if at_line_start && chunk.starts_with(b".") { &chunk[1..] } else { &chunk[..] };
        data.extend_from_slice(unstuffed);
    }
}
