//! Virus and spam scanning at the end of DATA, for mail to domains with
//! `enable_virus_spam_scan = '1'`: ClamAV's clamd ([`clamd`]) and rspamd
//! ([`rspamd`]), each optional, run side by side with timeouts and a
//! per-node concurrency limit.
//!
//! Invariants: the spool only ever stores what was accepted (a message to
//! be scanned is held in a file in `data_dir/scan` until the verdict, then
//! copied into the spool with the scan headers); a scanner that is down,
//! slow or answers garbage never causes a 5xx: it is `451 4.7.1` under
//! `scan.on_failure = "tempfail"`, or acceptance with a header saying the
//! message was not scanned under `"accept"`. The verdict applies to the
//! whole transaction, whatever the other recipients' domains.

pub mod clamd;
pub mod rspamd;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

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

/// The configured scanners of a node.
pub struct Scanner {
    config: ScanConfig,
    node: String,
    permits: Arc<tokio::sync::Semaphore>,
    http: reqwest::Client,
    dir: PathBuf,
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
        })))
    }

    pub fn max_size(&self) -> u64 {
        self.config.max_size
    }

    /// A fresh file to hold one message until its verdict.
    pub async fn buffer(&self, queue_id: &str) -> Result<ScanBuffer, ScanError> {
        let path = self.dir.join(format!("{queue_id}.eml"));
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| ScanError::Local(format!("cannot create {}: {e}", path.display())))?;
        Ok(ScanBuffer { file: Some(file), path, len: 0 })
    }

    /// Scans the finished buffer with every configured scanner.
    pub async fn scan(&self, buffer: &mut ScanBuffer, env: &Envelope<'_>) -> Verdict {
        if let Err(e) = buffer.finish().await {
            return self.failed(vec![("local", e)]);
        }
        // Waiting for a permit counts against the same timeout.
        let deadline = self.config.timeout;
        let Ok(Ok(_permit)) = tokio::time::timeout(deadline, self.permits.clone().acquire_owned()).await else {
            return self.failed(vec![("local", ScanError::Timeout("no free scanner slot".into()))]);
        };
        let path = buffer.path.clone();
        let clamd = timed("clamd", &self.config.clamd, deadline, clamd::scan(&self.config.clamd, &path));
        let spam =
            timed("rspamd", &self.config.rspamd, deadline, rspamd::scan(&self.http, &self.config.rspamd, &path, env));
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

/// One message on its way to a verdict: a file under `data_dir/scan`,
/// removed when dropped.
pub struct ScanBuffer {
    file: Option<tokio::fs::File>,
    pub path: PathBuf,
    pub len: u64,
}

impl ScanBuffer {
    pub async fn write(&mut self, data: &[u8]) -> Result<(), ScanError> {
        let file = self.file.as_mut().ok_or_else(|| ScanError::Local("buffer already finished".into()))?;
        file.write_all(data).await.map_err(|e| ScanError::Local(e.to_string()))?;
        self.len += data.len() as u64;
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), ScanError> {
        if let Some(mut file) = self.file.take() {
            file.flush().await.map_err(|e| ScanError::Local(e.to_string()))?;
        }
        Ok(())
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
        self.finish().await.map_err(|e| SpoolError::Unavailable(e.to_string()))?;
        let shown = self.path.display().to_string();
        let local = |e: std::io::Error| SpoolError::Unavailable(format!("scan buffer {shown}: {e}"));
        body.write(headers.as_bytes()).await?;
        let mut file = tokio::fs::File::open(&self.path).await.map_err(local)?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut rewrite = subject.map(|s| SubjectRewrite::new(s.to_string()));
        loop {
            let n = file.read(&mut buf).await.map_err(local)?;
            if n == 0 {
                break;
            }
            match rewrite.as_mut() {
                Some(r) if !r.done => body.write(&r.feed(&buf[..n])).await?,
                _ => body.write(&buf[..n]).await?,
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
        let _ = std::fs::remove_file(&self.path);
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
