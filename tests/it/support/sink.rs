//! `SmtpSink`: Postfix's real `smtp-sink` on 127.0.0.1, dumping every mail
//! transaction to its own file (`-d`), killed on drop. `messages()` reads
//! back only transactions smtp-sink has finished, i.e. answered with (or is
//! about to answer with) `250 2.0.0 Ok` after the final dot.
//!
//! Line endings: smtp-sink drops every CR byte of the content (not only the
//! CR of CRLF) and ends dumped lines with LF, so `SinkMessage::content` has
//! LF line endings. Compare it with `SinkMessage::as_dumped(sent)`, never
//! with the CRLF bytes that went over the wire.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

const SMTP_SINK: &str = "/usr/sbin/smtp-sink";
/// How long to wait for smtp-sink to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `start_on` keeps retrying a busy port.
const BIND_RETRY: Duration = Duration::from_secs(5);
/// Ephemeral ports tried by `start` before giving up.
const START_ATTEMPTS: usize = 5;
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// One mail transaction as smtp-sink dumped it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkMessage {
    /// The MAIL FROM address without `<>` and ESMTP parameters ("" for `<>`).
    pub mail_from: String,
    /// The ESMTP parameters after the MAIL FROM path, as sent (`BODY=8BITMIME`).
    pub mail_params: String,
    /// `SMTP` after HELO, `ESMTP` after EHLO (`X-Client-Proto`).
    pub proto: String,
    /// Every RCPT TO address (smtp-sink accepts all), in order, without `<>`;
    /// smtp-sink writes non-ASCII octets of the envelope as `?`.
    pub rcpts: Vec<String>,
    /// The ESMTP parameters after each RCPT TO path (`NOTIFY=…`), as sent.
    pub rcpt_params: Vec<String>,
    /// Argument of the last EHLO/HELO ("" if the client sent none).
    pub helo: String,
    /// Header and body as received, dot-unstuffed, with every CR removed:
    /// compare with `SinkMessage::as_dumped(sent)`.
    pub content: Vec<u8>,
}

impl SinkMessage {
    /// What `content` is for a message sent as `sent` (CRLF lines): smtp-sink
    /// removes every CR byte, so CRLF becomes LF and a bare CR vanishes.
    pub fn as_dumped(sent: &[u8]) -> Vec<u8> {
        sent.iter().copied().filter(|&b| b != b'\r').collect()
    }
}

/// A running `smtp-sink` capturing to a private directory.
pub struct SmtpSink {
    pub port: u16,
    /// The address it listens on (127.0.0.1 unless started with `start_at`).
    pub ip: IpAddr,
    dir: tempfile::TempDir,
    /// Canonical path of the dump directory, as `/proc/<pid>/fd` shows it.
    dump_dir: PathBuf,
    child: Option<Child>,
}

impl SmtpSink {
    /// Starts on an ephemeral port.
    pub fn start() -> SmtpSink {
        Self::start_with(&[])
    }

    /// Starts on an ephemeral port with extra smtp-sink options, e.g.
    /// `["-w", "6"]` to wait 6 s before answering DATA (smtp-sink(1)).
    pub fn start_with(options: &[&str]) -> SmtpSink {
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = super::free_port();
            match Self::try_start(LOCALHOST, port, options) {
                Ok(sink) => return sink,
                // Another process took the port between probe and bind.
                Err(e) => last_error = e,
            }
        }
        panic!("smtp-sink did not start after {START_ATTEMPTS} ports: {last_error}");
    }

    /// Starts on `port` (one a relay already points to), retrying for a few
    /// seconds while the port is still busy.
    pub fn start_on(port: u16) -> SmtpSink {
        let started = Instant::now();
        loop {
            match Self::try_start(LOCALHOST, port, &[]) {
                Ok(sink) => return sink,
                Err(e) if started.elapsed() >= BIND_RETRY => panic!("smtp-sink on 127.0.0.1:{port}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Starts on `ip:port` (any loopback address, e.g. `127.4.0.2:25` for
    /// an MX host), retrying for a few seconds while the port is busy.
    pub fn start_at(ip: IpAddr, port: u16, options: &[&str]) -> SmtpSink {
        let started = Instant::now();
        loop {
            match Self::try_start(ip, port, options) {
                Ok(sink) => return sink,
                Err(e) if started.elapsed() >= BIND_RETRY => panic!("smtp-sink on {ip}:{port}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn try_start(ip: IpAddr, port: u16, options: &[&str]) -> Result<SmtpSink, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let dump = dir.path().join("dump");
        fs::create_dir(&dump).map_err(|e| format!("create {}: {e}", dump.display()))?;
        // smtp-sink writes as the `-u` user after dropping root.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
        fs::set_permissions(&dump, fs::Permissions::from_mode(0o777)).map_err(|e| e.to_string())?;
        let dump_dir = fs::canonicalize(&dump).map_err(|e| e.to_string())?;
        let log_path = dir.path().join("smtp-sink.log");
        let log = fs::File::create(&log_path).map_err(|e| format!("create {}: {e}", log_path.display()))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;

        let mut cmd = Command::new(SMTP_SINK);
        // `-u` is required when running as root, and refused otherwise.
        if running_as_root() {
            cmd.args(["-u", "nobody"]);
        }
        // `-d`: one file per transaction, named by the template plus a random
        // hex id; created at MAIL, written through, closed after the final dot.
        let template = format!("{}/%Y%m%d%H%M%S.", dump_dir.display());
        cmd.arg("-d").arg(&template).args(options).arg(SocketAddr::new(ip, port).to_string()).arg("100");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("{SMTP_SINK} (scripts/test.sh installs postfix): {e}"))?;
        let mut sink = SmtpSink { port, ip, dir, dump_dir, child: Some(child) };
        sink.wait_ready()?;
        Ok(sink)
    }

    /// Waits until smtp-sink greets on its port; an exit (e.g. the port is
    /// busy) is an error carrying its log.
    fn wait_ready(&mut self) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let exited = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                return Err(format!("smtp-sink exited with {status}: {}", self.log().trim()));
            }
            if started.elapsed() >= READY_TIMEOUT {
                return Err(format!("smtp-sink not ready within {READY_TIMEOUT:?}: {}", self.log().trim()));
            }
            if greets(SocketAddr::new(self.ip, self.port)) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> String {
        SocketAddr::new(self.ip, self.port).to_string()
    }

    /// Every finished transaction so far, oldest first (by the time its dump
    /// file was last written, then by name).
    pub fn messages(&self) -> Vec<SinkMessage> {
        let Ok(entries) = fs::read_dir(&self.dump_dir) else { return Vec::new() };
        let files: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        // Listed before looking at open files: a file created after the
        // listing is not read, one listed and not open is closed for good.
        let open = self.open_dump_files();
        let mut found: Vec<(SystemTime, PathBuf, SinkMessage)> = Vec::new();
        for path in files {
            if path.file_name().is_some_and(|name| open.contains(name)) {
                continue;
            }
            // Gone: an aborted transaction smtp-sink just unlinked.
            let Ok(bytes) = fs::read(&path) else { continue };
            let mtime = fs::metadata(&path).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
            if let Some(message) = parse_dump(&bytes) {
                found.push((mtime, path, message));
            }
        }
        found.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        found.into_iter().map(|(_, _, m)| m).collect()
    }

    /// Waits until at least `n` transactions are finished; panics after `timeout`.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<SinkMessage> {
        let started = Instant::now();
        loop {
            let got = self.messages();
            if got.len() >= n {
                return got;
            }
            if started.elapsed() >= timeout {
                panic!(
                    "smtp-sink on port {}: expected at least {n} message(s) within {timeout:?}, got {}: {:#?}\n\
                     --- smtp-sink log ---\n{}",
                    self.port,
                    got.len(),
                    got.iter().map(|m| (&m.mail_from, &m.rcpts)).collect::<Vec<_>>(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills smtp-sink (the port then refuses connections). Transactions in
    /// progress are discarded: their client never saw the final 250.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        // Freeze it first so the set of unfinished files cannot change
        // between looking at it and the kill.
        let _ = Command::new("kill").args(["-STOP", &child.id().to_string()]).stderr(Stdio::null()).status();
        let unfinished = open_files_in(child.id(), &self.dump_dir);
        let _ = child.kill();
        let _ = child.wait();
        for name in unfinished {
            let _ = fs::remove_file(self.dump_dir.join(name));
        }
    }

    /// Freezes smtp-sink (SIGSTOP): connections wait in its listen queue
    /// unanswered, so mail stays queued however fast the relay delivers,
    /// until [`SmtpSink::thaw`].
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen smtp-sink go on (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("smtp-sink running");
        let status = Command::new("kill").args([signal, &child.id().to_string()]).status().expect("kill");
        assert!(status.success(), "kill {signal} smtp-sink");
    }

    /// Transactions in progress now: begun with MAIL, not yet ended.
    pub fn in_progress(&self) -> usize {
        self.open_dump_files().len()
    }

    /// smtp-sink's own output (fatal errors such as a busy port).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("smtp-sink.log")).unwrap_or_default()
    }

    /// Names of dump files smtp-sink holds open: transactions in progress.
    fn open_dump_files(&self) -> HashSet<OsString> {
        match &self.child {
            Some(child) => open_files_in(child.id(), &self.dump_dir),
            None => HashSet::new(),
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Files under `dir` that process `pid` has open, by name. Empty when
/// `/proc/<pid>/fd` cannot be read (then `messages()` relies on the parser
/// rejecting a file cut short).
fn open_files_in(pid: u32, dir: &Path) -> HashSet<OsString> {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { return HashSet::new() };
    fds.filter_map(|fd| fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| target.parent() == Some(dir))
        .filter_map(|target| target.file_name().map(|n| n.to_os_string()))
        .collect()
}

fn running_as_root() -> bool {
    // /proc/self belongs to the effective user.
    fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// True when something on `addr` sends an SMTP greeting.
fn greets(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut greeting = String::new();
    let ok = stream.try_clone().map(BufReader::new).and_then(|mut r| r.read_line(&mut greeting)).is_ok();
    let _ = stream.write_all(b"QUIT\r\n");
    ok && greeting.starts_with("220 ")
}

/// Parses one `-d` dump file (smtp-sink(1), "DUMP FILE FORMAT"):
///
/// ```text
/// X-Client-Addr: 127.0.0.1
/// X-Client-Proto: ESMTP
/// X-Helo-Args: client.example          (only after HELO/EHLO)
/// X-Mail-Args: <a@b.example> SIZE=10
/// X-Rcpt-Args: <c@d.example>           (one per RCPT)
/// Received: from client.example ([127.0.0.1])
///         by smtp-sink (smtp-sink) with ESMTP id 5c89f42e;
///         Wed, 25 Nov 2026 10:37:46 +0000 (UTC)
/// <content, LF lines>
/// <empty line: the LF of the terminating ".CRLF">
/// ```
///
/// `None` for a file that does not have this shape (e.g. cut short).
fn parse_dump(bytes: &[u8]) -> Option<SinkMessage> {
    let mut rest = bytes;
    let mut helo = String::new();
    let mut mail_from = None;
    let mut mail_params = String::new();
    let mut proto = String::new();
    let mut rcpts = Vec::new();
    let mut rcpt_params = Vec::new();
    loop {
        let line = String::from_utf8_lossy(next_line(&mut rest)?).into_owned();
        let (name, value) = line.split_once(": ").unwrap_or((&line, ""));
        match name {
            "X-Client-Addr" => {}
            "X-Client-Proto" => proto = value.to_string(),
            "X-Helo-Args" => helo = value.to_string(),
            "X-Mail-Args" => {
                mail_from = Some(address(value));
                mail_params = value.split_once('>').map_or("", |(_, rest)| rest).trim().to_string();
            }
            "X-Rcpt-Args" => {
                rcpts.push(address(value));
                rcpt_params.push(value.split_once('>').map_or("", |(_, rest)| rest).trim().to_string());
            }
            "Received" => break,
            _ => return None,
        }
    }
    // The `by …` and time-stamp continuation lines of the Received header.
    for _ in 0..2 {
        if !next_line(&mut rest)?.starts_with(b"\t") {
            return None;
        }
    }
    // The terminator's LF is the last byte; without it the file is cut short.
    let content = rest.strip_suffix(b"\n")?.to_vec();
    Some(SinkMessage { mail_from: mail_from?, mail_params, proto, rcpts, rcpt_params, helo, content })
}

/// The next LF-terminated line, without its LF; `None` if there is none.
fn next_line<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let end = rest.iter().position(|&b| b == b'\n')?;
    let line = &rest[..end];
    *rest = &rest[end + 1..];
    Some(line)
}

/// `<a@b> SIZE=10` → `a@b`; a path without `<>` is taken up to the first space.
fn address(args: &str) -> String {
    let args = args.trim_start();
    match args.strip_prefix('<') {
        Some(inner) => inner.split('>').next().unwrap_or("").to_string(),
        None => args.split_whitespace().next().unwrap_or("").to_string(),
    }
}
