//! Virus and spam scanning at the end of DATA, for mail to domains with
//! `enable_virus_spam_scan = '1'`: ClamAV's clamd ([`clamd`]) and rspamd
//! ([`rspamd`]), each optional, run side by side with timeouts and a
//! per-node concurrency limit.
//!
//! Invariants: the spool only ever stores what was accepted (a message to
//! be scanned is held until the verdict, then copied into the spool with
//! the scan headers); a message waiting is held in memory when it is small
//! and the node's `scan.memory_limit` allows, else in a file in
//! `data_dir/scan` (bounded memory either way); a scanner that is down,
//! slow or answers garbage never causes a 5xx: it is `451 4.7.1` under
//! `scan.on_failure = "tempfail"`, or acceptance with a header saying the
//! message was not scanned under `"accept"`. The verdict applies to the
//! whole transaction, whatever the other recipients' domains.

pub mod clamd;
pub mod rspamd;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::ScanConfig;
use crate::metrics::METRICS;
use crate::proto::reply::Reply;
use crate::spool::{Enqueue, QueueId, SpoolBody, SpoolError};

/// A scanner failure: always temporary for the sender.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ScanError {
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("bad answer: {0}")]
    Protocol(String),
    #[error("local I/O: {0}")]
    Local(String),
}

/// What rspamd is told about the transaction.
pub struct Envelope<'a> {
    pub queue_id: &'a str,
    pub client_ip: &'a str,
    pub client_name: &'a str,
    pub helo: &'a str,
    pub sender: &'a str,
    pub recipients: &'a [String],
    pub user: Option<&'a str>,
}

/// The decision for the whole transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Store the message with these header lines (CRLF-terminated) first,
    /// and the subject replaced when rspamd asked for it.
    Accept { headers: String, subject: Option<String> },
    /// Refuse with this reply (554 or 451); nothing is stored.
    Refuse(Reply, &'static str),
}

/// A message larger than this waits for its verdict in a file.
const MEMORY_MESSAGE_MAX: u64 = 1024 * 1024;
/// How much of a spilled file is read at a time.
const FILE_PIECE: usize = 64 * 1024;

/// The configured scanners of a node.
pub struct Scanner {
    config: ScanConfig,
    node: String,
    permits: Arc<tokio::sync::Semaphore>,
    http: reqwest::Client,
    dir: PathBuf,
    /// Bytes of waiting messages held in memory now (`scan.memory_limit`).
    in_memory: Arc<AtomicU64>,
}

impl Scanner {
    /// `None` when neither scanner is configured.
    pub fn new(config: &ScanConfig, data_dir: &str, node: &str) -> Result<Option<Arc<Scanner>>, ScanError> {
        if config.clamd.is_empty() && config.rspamd.is_empty() {
            return Ok(None);
        }
        let dir = Path::new(data_dir).join("scan");
        std::fs::create_dir_all(&dir).map_err(|e| ScanError::Local(format!("cannot create {}: {e}", dir.display())))?;
        Ok(Some(Arc::new(Scanner {
            permits: Arc::new(tokio::sync::Semaphore::new(config.concurrency)),
            http: rspamd::client(config.timeout)?,
            config: config.clone(),
            node: node.to_string(),
            dir,
            in_memory: Arc::new(AtomicU64::new(0)),
        })))
    }

    pub fn max_size(&self) -> u64 {
        self.config.max_size
    }

    /// An empty buffer to hold one message until its verdict: in memory
    /// until it grows past [`MEMORY_MESSAGE_MAX`] or the node's
    /// `scan.memory_limit`, then in a file.
    pub async fn buffer(&self, queue_id: &str) -> Result<ScanBuffer, ScanError> {
        Ok(ScanBuffer {
            held: Held::Writing(Vec::new()),
            path: self.dir.join(format!("{queue_id}.eml")),
            len: 0,
            budget: self.in_memory.clone(),
            limit: self.config.memory_limit,
            reserved: 0,
        })
    }

    /// Scans the finished buffer with every configured scanner.
    pub async fn scan(&self, buffer: &mut ScanBuffer, env: &Envelope<'_>) -> Verdict {
        let content = match buffer.finish().await {
            Ok(content) => content,
            Err(e) => return self.failed(vec![("local", e)]),
        };
        // Waiting for a permit counts against the same timeout.
        let deadline = self.config.timeout;
        let Ok(Ok(_permit)) = tokio::time::timeout(deadline, self.permits.clone().acquire_owned()).await else {
            return self.failed(vec![("local", ScanError::Timeout("no free scanner slot".into()))]);
        };
        let clamd = timed("clamd", &self.config.clamd, deadline, clamd::scan(&self.config.clamd, &content));
        let spam = timed(
            "rspamd",
            &self.config.rspamd,
            deadline,
            rspamd::scan(&self.http, &self.config.rspamd, &content, env),
        );
        let (virus, spam) = tokio::join!(clamd, spam);
        let verdict = decide(virus, spam, &self.config, &self.node);
        tracing::info!(queue_id = env.queue_id, "{}: scan: {}", env.queue_id, describe(&verdict));
        verdict
    }

    /// The verdict when a scanner could not answer.
    fn failed(&self, errors: Vec<(&'static str, ScanError)>) -> Verdict {
        decide_failure(&errors, &self.config, &self.node)
    }

    /// The header for a message accepted without scanning because of its size.
    pub fn skipped_header(&self) -> String {
        METRICS.scan.with_label_values(&["all", "skipped_size"]).inc();
        format!("X-Mxrelay-Scan: not scanned (message over scan.max_size) by node {}\r\n", self.node)
    }
}

/// Runs one scanner (`None` when `address` is not configured) within
/// `deadline`, recording how long it took.
async fn timed<T>(
    scanner: &'static str,
    address: &str,
    deadline: std::time::Duration,
    scan: impl Future<Output = Result<T, ScanError>>,
) -> Option<Result<T, ScanError>> {
    if address.is_empty() {
        return None;
    }
    let started = Instant::now();
    let result = tokio::time::timeout(deadline, scan)
        .await
        .unwrap_or_else(|_| Err(ScanError::Timeout(format!("{scanner} at {address}"))));
    METRICS.scan_duration_seconds.with_label_values(&[scanner]).observe(started.elapsed().as_secs_f64());
    Some(result)
}

fn describe(v: &Verdict) -> String {
    match v {
        Verdict::Accept { headers, .. } => {
            format!("accepted ({})", headers.lines().map(str::trim).collect::<Vec<_>>().join("; "))
        }
        Verdict::Refuse(reply, label) => format!("refused {label}: {reply}"),
    }
}

/// Combines the scanners' answers (None: not configured) into one verdict.
pub fn decide(
    virus: Option<Result<clamd::ClamdVerdict, ScanError>>,
    spam: Option<Result<rspamd::RspamdReply, ScanError>>,
    config: &ScanConfig,
    node: &str,
) -> Verdict {
    let mut errors = Vec::new();
    let mut notes = Vec::new();
    match virus {
        Some(Ok(clamd::ClamdVerdict::Virus(name))) => {
            METRICS.scan.with_label_values(&["clamd", "virus"]).inc();
            let reply = Reply::new(554, "5.7.1", format!("Error: message content rejected, virus found: {name}"));
            return Verdict::Refuse(reply, "virus");
        }
        Some(Ok(clamd::ClamdVerdict::Clean)) => {
            METRICS.scan.with_label_values(&["clamd", "clean"]).inc();
            notes.push("clamd: clean".to_string());
        }
        Some(Err(e)) => errors.push(("clamd", e)),
        None => {}
    }
    let mut spam_headers = String::new();
    let mut subject = None;
    match spam {
        Some(Ok(r)) => {
            let label = r.action.replace(' ', "_");
            METRICS.scan.with_label_values(&["rspamd", &label]).inc();
            let is_spam = matches!(r.action.as_str(), "add header" | "rewrite subject");
            match r.action.as_str() {
                "reject" => {
                    let reply =
                        Reply::new(554, "5.7.1", format!("Error: message rejected as spam (score {:.2})", r.score));
                    return Verdict::Refuse(reply, "spam");
                }
                "soft reject" | "greylist" => {
                    let reply = Reply::new(451, "4.7.1", "Error: message deferred by the spam filter, try again later");
                    return Verdict::Refuse(reply, "spam_tempfail");
                }
                _ => {}
            }
            spam_headers.push_str(&format!(
                "X-Spam-Status: {}, score={:.2} required={:.2}\r\nX-Spam-Score: {:.2}\r\n",
                if is_spam { "Yes" } else { "No" },
                r.score,
                r.required_score,
                r.score
            ));
            if is_spam {
                spam_headers.push_str("X-Spam-Flag: YES\r\n");
            }
            if r.action == "rewrite subject" {
                subject = r.subject.clone().or_else(|| Some(format!("{}{{subject}}", config.spam_subject_tag)));
            }
            notes.push(format!("rspamd: {}", r.action));
        }
        Some(Err(e)) => errors.push(("rspamd", e)),
        None => {}
    }
    if !errors.is_empty() {
        return match decide_failure(&errors, config, node) {
            Verdict::Accept { headers, .. } => Verdict::Accept { headers: headers + &spam_headers, subject },
            refuse => refuse,
        };
    }
    let headers = format!("X-Mxrelay-Scan: {} by node {node}\r\n{spam_headers}", notes.join(", "));
    Verdict::Accept { headers, subject }
}

fn decide_failure(errors: &[(&'static str, ScanError)], config: &ScanConfig, node: &str) -> Verdict {
    for (scanner, e) in errors {
        METRICS.scan.with_label_values(&[scanner, "error"]).inc();
        METRICS.scan_errors.with_label_values(&[scanner]).inc();
        tracing::error!(scanner, error = %e, "scanner failed (scan.on_failure = {:?})", config.on_failure);
    }
    let what = errors.iter().map(|(s, e)| format!("{s}: {e}")).collect::<Vec<_>>().join("; ");
    if config.on_failure == crate::config::ScanFailure::Accept {
        let what = what.replace(['\r', '\n'], " ");
        Verdict::Accept { headers: format!("X-Mxrelay-Scan: not scanned ({what}) by node {node}\r\n"), subject: None }
    } else {
        Verdict::Refuse(
            Reply::new(451, "4.7.1", "Error: message could not be scanned, try again later"),
            "scan_tempfail",
        )
    }
}

/// A finished message, as the scanners read it.
#[derive(Debug, Clone)]
pub enum Content {
    Memory(Bytes),
    File(PathBuf),
}

/// Where a waiting message is.
enum Held {
    /// In memory, still being received.
    Writing(Vec<u8>),
    /// In memory, finished.
    Memory(Bytes),
    /// In a file under `data_dir/scan` (open while being received).
    File(Option<tokio::fs::File>),
}

/// One message on its way to a verdict, in memory or in a file (see
/// [`Scanner::buffer`]); the memory it counted against the node's budget
/// is given back, and the file removed, when it is dropped.
pub struct ScanBuffer {
    held: Held,
    path: PathBuf,
    pub len: u64,
    budget: Arc<AtomicU64>,
    limit: u64,
    /// Bytes of `budget` this buffer holds.
    reserved: u64,
}

impl ScanBuffer {
    pub async fn write(&mut self, data: &[u8]) -> Result<(), ScanError> {
        let len = self.len + data.len() as u64;
        if matches!(self.held, Held::Writing(_)) {
            if len <= MEMORY_MESSAGE_MAX && self.reserve(data.len() as u64) {
                if let Held::Writing(memory) = &mut self.held {
                    memory.extend_from_slice(data);
                }
                self.len = len;
                return Ok(());
            }
            self.spill().await?;
        }
        let Held::File(Some(file)) = &mut self.held else {
            return Err(ScanError::Local("buffer already finished".into()));
        };
        file.write_all(data).await.map_err(|e| ScanError::Local(e.to_string()))?;
        self.len = len;
        Ok(())
    }

    /// Counts `n` more bytes against the node's budget, if it has room.
    fn reserve(&mut self, n: u64) -> bool {
        let taken = self
            .budget
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| (used + n <= self.limit).then_some(used + n));
        if taken.is_ok() {
            self.reserved += n;
        }
        taken.is_ok()
    }

    /// Moves what is held in memory into a new file, for the rest to follow.
    async fn spill(&mut self) -> Result<(), ScanError> {
        let Held::Writing(memory) = std::mem::replace(&mut self.held, Held::File(None)) else { return Ok(()) };
        let mut file = tokio::fs::File::create(&self.path)
            .await
            .map_err(|e| ScanError::Local(format!("cannot create {}: {e}", self.path.display())))?;
        file.write_all(&memory).await.map_err(|e| ScanError::Local(e.to_string()))?;
        self.budget.fetch_sub(self.reserved, Ordering::AcqRel);
        self.reserved = 0;
        self.held = Held::File(Some(file));
        Ok(())
    }

    /// Ends the writing; the content for the scanners.
    async fn finish(&mut self) -> Result<Content, ScanError> {
        match &mut self.held {
            Held::Writing(memory) => {
                let content = Bytes::from(std::mem::take(memory));
                self.held = Held::Memory(content.clone());
                Ok(Content::Memory(content))
            }
            Held::Memory(content) => Ok(Content::Memory(content.clone())),
            Held::File(file) => {
                if let Some(mut file) = file.take() {
                    file.flush().await.map_err(|e| ScanError::Local(e.to_string()))?;
                }
                Ok(Content::File(self.path.clone()))
            }
        }
    }

    /// Opens the spool body of `id` and copies the message into it after
    /// `headers`, replacing the Subject when `subject` is set (`{subject}` in
    /// it stands for the original one). On failure the body is aborted.
    pub async fn into_spool(
        mut self,
        spool: &dyn Enqueue,
        id: &QueueId,
        headers: &str,
        subject: Option<&str>,
    ) -> Result<Box<dyn SpoolBody>, SpoolError> {
        let mut body = spool.open_body(id);
        match self.copy_into(headers, subject, body.as_mut()).await {
            Ok(()) => Ok(body),
            Err(e) => {
                body.abort().await;
                Err(e)
            }
        }
    }

    async fn copy_into(
        &mut self,
        headers: &str,
        subject: Option<&str>,
        body: &mut dyn SpoolBody,
    ) -> Result<(), SpoolError> {
        let content = self.finish().await.map_err(|e| SpoolError::Unavailable(e.to_string()))?;
        body.write(headers.as_bytes()).await?;
        let mut rewrite = subject.map(|s| SubjectRewrite::new(s.to_string()));
        let mut copy = async |piece: &[u8]| match rewrite.as_mut() {
            Some(r) if !r.done => body.write(&r.feed(piece)).await,
            _ => body.write(piece).await,
        };
        match content {
            Content::Memory(bytes) => copy(&bytes).await?,
            Content::File(path) => {
                let shown = path.display().to_string();
                let local = |e: std::io::Error| SpoolError::Unavailable(format!("scan buffer {shown}: {e}"));
                let mut file = tokio::fs::File::open(&path).await.map_err(local)?;
                let mut buf = vec![0u8; FILE_PIECE];
                loop {
                    let n = file.read(&mut buf).await.map_err(local)?;
                    if n == 0 {
                        break;
                    }
                    copy(&buf[..n]).await?;
                }
            }
        }
        if let Some(r) = rewrite.as_mut() {
            let rest = r.finish();
            body.write(&rest).await?;
        }
        Ok(())
    }
}

impl Drop for ScanBuffer {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.reserved, Ordering::AcqRel);
        if matches!(self.held, Held::File(_)) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Replaces the first `Subject:` header (with its continuation lines) in
/// the header section; the body is passed through untouched. Bounded: only
/// the header section is held, and at most [`HEADER_LIMIT`] of it.
pub struct SubjectRewrite {
    template: String,
    pending: Vec<u8>,
    done: bool,
}

pub const HEADER_LIMIT: usize = 256 * 1024;

impl SubjectRewrite {
    pub fn new(template: String) -> SubjectRewrite {
        SubjectRewrite { template, pending: Vec::new(), done: false }
    }

    pub fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        if self.done {
            return data.to_vec();
        }
        self.pending.extend_from_slice(data);
        // The header section ends with its last CRLF, before the empty line
        // (RFC 5322 §2.1), which may be the message's first line.
        let end =
            if self.pending.starts_with(b"\r\n") { Some(0) } else { find(&self.pending, b"\r\n\r\n").map(|i| i + 2) };
        match end {
            Some(end) => {
                let rest = self.pending.split_off(end);
                let mut out = rewrite_headers(&self.pending, &self.template);
                out.extend_from_slice(&rest);
                self.pending.clear();
                self.done = true;
                out
            }
            None if self.pending.len() > HEADER_LIMIT => {
                self.done = true;
                std::mem::take(&mut self.pending)
            }
            None => Vec::new(),
        }
    }

    pub fn finish(&mut self) -> Vec<u8> {
        if self.done {
            return Vec::new();
        }
        self.done = true;
        rewrite_headers(&std::mem::take(&mut self.pending), &self.template)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The header section with its Subject replaced (or added when absent).
/// Bytes in, bytes out: headers that are not UTF-8 (raw 8-bit, as old
/// clients send) pass unchanged, and so does the original subject text.
fn rewrite_headers(headers: &[u8], template: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(headers.len() + template.len() + 11);
    let mut original: Option<Vec<u8>> = None;
    // Where the new Subject goes: in the old one's place, else first. (A
    // position, not a marker string, which the headers could contain.)
    let mut at = 0;
    let mut skipping = false;
    for line in split_inclusive_crlf(headers) {
        let continuation = line.first().is_some_and(|b| matches!(b, b' ' | b'\t'));
        let value = line.strip_suffix(b"\r\n").unwrap_or(line);
        if skipping && continuation {
            if let Some(o) = original.as_mut() {
                o.extend_from_slice(value);
            }
            continue;
        }
        skipping = false;
        if original.is_none() && line.get(..8).is_some_and(|p| p.eq_ignore_ascii_case(b"subject:")) {
            original = Some(value[8..].trim_ascii_start().to_vec());
            skipping = true;
            at = out.len();
            continue;
        }
        out.extend_from_slice(line);
    }
    let mut subject = b"Subject: ".to_vec();
    let mut parts = template.split("{subject}");
    subject.extend_from_slice(parts.next().unwrap_or("").as_bytes());
    for part in parts {
        subject.extend_from_slice(original.as_deref().unwrap_or(b""));
        subject.extend_from_slice(part.as_bytes());
    }
    for b in &mut subject {
        if matches!(*b, b'\r' | b'\n') {
            *b = b' ';
        }
    }
    subject.extend_from_slice(b"\r\n");
    out.splice(at..at, subject);
    out
}

/// Lines with their CRLF (the last one may have none).
fn split_inclusive_crlf(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = find(rest, b"\r\n").map_or(rest.len(), |i| i + 2);
        let (line, tail) = rest.split_at(end);
        rest = tail;
        Some(line)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(on_failure: &str) -> ScanConfig {
        let on_failure = match on_failure {
            "accept" => crate::config::ScanFailure::Accept,
            _ => crate::config::ScanFailure::Tempfail,
        };
        ScanConfig { on_failure, ..ScanConfig::default() }
    }

    /// Small messages wait in memory within the node's budget; a big one,
    /// or one the budget has no room for, goes to a file; the memory comes
    /// back and the file goes when the buffer is dropped.
    #[tokio::test]
    async fn small_messages_wait_in_memory_within_the_budget_and_others_in_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let config = ScanConfig { clamd: "127.0.0.1:1".into(), memory_limit: 300_000, ..config("tempfail") };
        let scanner = Scanner::new(&config, dir.path().to_str().unwrap(), "n").unwrap().unwrap();
        let file = |id: &str| dir.path().join("scan").join(format!("{id}.eml"));
        let mut small = scanner.buffer("small").await.unwrap();
        small.write(&[b'a'; 200_000]).await.unwrap();
        assert!(matches!(small.finish().await.unwrap(), Content::Memory(b) if b.len() == 200_000));
        assert!(!file("small").exists(), "no file for a small message");
        // The budget has 100,000 bytes left: the next one spills on the way.
        let mut other = scanner.buffer("other").await.unwrap();
        other.write(&[b'b'; 60_000]).await.unwrap();
        other.write(&[b'c'; 60_000]).await.unwrap();
        assert!(matches!(other.finish().await.unwrap(), Content::File(_)));
        assert_eq!(std::fs::read(file("other")).unwrap().len(), 120_000, "what was in memory went first");
        assert_eq!(scanner.in_memory.load(Ordering::Acquire), 200_000, "the spilled part was given back");
        drop((small, other));
        assert_eq!(scanner.in_memory.load(Ordering::Acquire), 0);
        assert!(!file("other").exists());
        // Over 1 MiB: a file, whatever the budget.
        let config = ScanConfig { memory_limit: 64 << 20, ..config };
        let scanner = Scanner::new(&config, dir.path().to_str().unwrap(), "n").unwrap().unwrap();
        let mut big = scanner.buffer("big").await.unwrap();
        big.write(&vec![b'd'; (MEMORY_MESSAGE_MAX + 1) as usize]).await.unwrap();
        assert!(matches!(big.finish().await.unwrap(), Content::File(_)));
    }

    fn spam(action: &str, score: f64) -> Option<Result<rspamd::RspamdReply, ScanError>> {
        Some(Ok(rspamd::RspamdReply { action: action.into(), score, required_score: 15.0, subject: None }))
    }

    #[test]
    fn a_virus_is_refused_with_its_name() {
        let v = decide(
            Some(Ok(clamd::ClamdVerdict::Virus("Eicar-Test-Signature".into()))),
            None,
            &config("tempfail"),
            "n1",
        );
        match v {
            Verdict::Refuse(r, "virus") => assert_eq!(
                r.to_string(),
                "554 5.7.1 Error: message content rejected, virus found: Eicar-Test-Signature"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rspamd_actions_map_to_replies_and_headers() {
        let c = config("tempfail");
        assert!(matches!(decide(None, spam("reject", 1000.0), &c, "n"), Verdict::Refuse(r, "spam") if r.code == 554));
        assert!(matches!(decide(None, spam("soft reject", 9.0), &c, "n"), Verdict::Refuse(r, _) if r.code == 451));
        assert!(matches!(decide(None, spam("greylist", 5.0), &c, "n"), Verdict::Refuse(r, _) if r.code == 451));
        match decide(Some(Ok(clamd::ClamdVerdict::Clean)), spam("add header", 7.5), &c, "n") {
            Verdict::Accept { headers, subject: None } => {
                assert!(headers.contains("X-Spam-Status: Yes, score=7.50 required=15.00\r\n"), "{headers}");
                assert!(headers.contains("X-Spam-Flag: YES\r\n"));
                assert!(headers.starts_with("X-Mxrelay-Scan: clamd: clean, rspamd: add header by node n\r\n"));
            }
            other => panic!("{other:?}"),
        }
        match decide(None, spam("no action", 0.5), &c, "n") {
            Verdict::Accept { headers, .. } => assert!(headers.contains("X-Spam-Status: No, score=0.50")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failing_scanner_is_never_a_5xx() {
        let err = Some(Err(ScanError::Unreachable("clamd".into())));
        assert!(
            matches!(decide(err.clone(), spam("no action", 0.0), &config("tempfail"), "n"), Verdict::Refuse(r, "scan_tempfail") if r.code == 451)
        );
        match decide(err.clone(), spam("no action", 0.0), &config("accept"), "n") {
            Verdict::Accept { headers, .. } => {
                assert!(
                    headers.starts_with("X-Mxrelay-Scan: not scanned (clamd: unreachable: clamd) by node n\r\n"),
                    "{headers}"
                );
                assert!(headers.contains("X-Spam-Status: No"));
            }
            other => panic!("{other:?}"),
        }
        // A definite virus still wins over the other scanner's failure.
        let v = decide(
            Some(Ok(clamd::ClamdVerdict::Virus("X".into()))),
            Some(Err(ScanError::Timeout("r".into()))),
            &config("accept"),
            "n",
        );
        assert!(matches!(v, Verdict::Refuse(r, "virus") if r.code == 554));
    }

    #[test]
    fn the_subject_is_rewritten_in_the_header_section_only() {
        let msg = b"Received: x\r\nSubject: hello\r\n world\r\nFrom: a\r\n\r\nSubject: body line\r\n";
        let mut r = SubjectRewrite::new("***SPAM*** {subject}".into());
        let mut out = Vec::new();
        for piece in msg.chunks(5) {
            out.extend(r.feed(piece));
        }
        out.extend(r.finish());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Received: x\r\nSubject: ***SPAM*** hello world\r\nFrom: a\r\n\r\nSubject: body line\r\n"
        );
        let added = rewrite_headers(b"From: a\r\n", "[SPAM] {subject}");
        assert_eq!(added, b"Subject: [SPAM] \r\nFrom: a\r\n");
    }

    /// Found by fuzz/fuzz_targets/scan_headers.rs.
    #[test]
    fn the_rewrite_keeps_the_body_and_the_other_headers() {
        let rewrite = |msg: &[u8]| {
            let mut r = SubjectRewrite::new("[SPAM] {subject}".into());
            let mut out = r.feed(msg);
            out.extend(r.finish());
            String::from_utf8_lossy(&out).into_owned()
        };
        // A Subject as the last header gained a second empty line: the
        // body started with one more line than was sent.
        assert_eq!(rewrite(b"From: a\r\nSubject: hi\r\n\r\nbody"), "From: a\r\nSubject: [SPAM] hi\r\n\r\nbody");
        // No header section at all: a Subject line in the body is body.
        assert_eq!(rewrite(b"\r\nSubject: b\r\n\r\n"), "Subject: [SPAM] \r\n\r\nSubject: b\r\n\r\n");
        // A character across the 8th byte panicked (`line[..8]`).
        assert_eq!(rewrite("Subjecté x\r\n\r\n".as_bytes()), "Subject: [SPAM] \r\nSubjecté x\r\n\r\n");
        // Raw 8-bit headers (Latin-1 here) and subject text pass unchanged,
        // where they used to become U+FFFD.
        let mut r = SubjectRewrite::new("[SPAM] {subject}".into());
        let mut out = r.feed(b"From: J\xf6rg\r\nSubject: Gr\xfc\xdfe\r\n\r\nb");
        out.extend(r.finish());
        assert_eq!(out, b"From: J\xf6rg\r\nSubject: [SPAM] Gr\xfc\xdfe\r\n\r\nb");
        // The placeholder the rewrite used could be sent in a header.
        assert_eq!(rewrite(b"X: \0SUBJECT\0\r\nSubject: a\r\n\r\n"), "X: \0SUBJECT\0\r\nSubject: [SPAM] a\r\n\r\n");
    }
}
