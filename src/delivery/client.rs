//! The outbound SMTP client: one session with one destination host.
//!
//! EHLO (HELO when refused), PIPELINING when offered (MAIL, every RCPT and
//! DATA in one write, RFC 2920), SIZE (a message the server says it will
//! not take is not sent), 8BITMIME/SMTPUTF8 awareness, a reply per
//! recipient, and DATA streamed from the spool with dot-stuffing (bounded
//! memory). Every wait has a Postfix-like timeout. STARTTLS will wrap the
//! stream after EHLO (the TLS issue); `Extensions::starttls` records the offer.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::route::Target;
use crate::spool::{Envelope, SpoolError};

/// Longest reply line we read; longer ones are a protocol error.
const REPLY_LINE_LIMIT: usize = 4096;
/// Most lines in one multi-line reply.
const REPLY_LINES_LIMIT: usize = 100;

#[derive(Debug, Clone)]
pub struct Timeouts {
    pub connect: Duration,
    pub greeting: Duration,
    pub command: Duration,
    pub data: Duration,
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
        let looks_enhanced = first.split('.').count() == 3 && first.split('.').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        if looks_enhanced {
            first.to_string()
        } else {
            format!("{}.0.0", self.code / 100)
        }
    }
}

impl std::fmt::Display for RemoteReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
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
}

#[derive(Debug, Clone, Default)]
pub struct Extensions {
    pub pipelining: bool,
    /// `SIZE` limit; `Some(0)` means offered without a limit.
    pub size: Option<u64>,
    pub eight_bit: bool,
    pub smtputf8: bool,
    pub starttls: bool,
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

pub struct Connection {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    pub ext: Extensions,
    pub target: Target,
    timeouts: Timeouts,
}

impl Connection {
    /// Connects, reads the greeting and says EHLO (HELO if EHLO is refused).
    pub async fn open(target: &Target, helo: &str, timeouts: &Timeouts) -> Result<Connection, ClientError> {
        let stream = match tokio::time::timeout(timeouts.connect, TcpStream::connect(target.addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(ClientError::Connect(target.addr.to_string(), e.to_string())),
            Err(_) => return Err(ClientError::Connect(target.addr.to_string(), "timed out".into())),
        };
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        let mut c = Connection {
            reader: BufReader::new(read),
            writer: write,
            ext: Extensions::default(),
            target: target.clone(),
            timeouts: timeouts.clone(),
        };
        let greeting = c.reply(timeouts.greeting, "waiting for the greeting").await?;
        if !greeting.is_success() {
            return Err(ClientError::Refused(greeting));
        }
        c.write(format!("EHLO {helo}\r\n").as_bytes(), "sending EHLO").await?;
        let ehlo = c.reply(timeouts.greeting, "after EHLO").await?;
        if ehlo.is_success() {
            c.ext = parse_extensions(&ehlo.text);
        } else {
            c.write(format!("HELO {helo}\r\n").as_bytes(), "sending HELO").await?;
            let helo_reply = c.reply(timeouts.greeting, "after HELO").await?;
            if !helo_reply.is_success() {
                return Err(ClientError::Refused(helo_reply));
            }
        }
        Ok(c)
    }

    async fn write(&mut self, bytes: &[u8], during: &'static str) -> Result<(), ClientError> {
        match tokio::time::timeout(self.timeouts.command, self.writer.write_all(bytes)).await {
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
                let n = (&mut self.reader)
                    .take(REPLY_LINE_LIMIT as u64)
                    .read_until(b'\n', &mut line)
                    .await
                    .map_err(|_| ClientError::Lost(during))?;
                if n == 0 {
                    return Err(ClientError::Lost(during));
                }
                let line = String::from_utf8_lossy(&line).trim_end().to_string();
                let code = line.get(..3).and_then(|c| c.parse::<u16>().ok()).filter(|c| (200..600).contains(c));
                let Some(code) = code else {
                    return Err(ClientError::Protocol(format!("malformed reply {line:?} {during}")));
                };
                text.push(line.get(4..).unwrap_or("").to_string());
                if line.as_bytes().get(3) != Some(&b'-') {
                    return Ok(RemoteReply { code, text: text.join(" ") });
                }
            }
            Err(ClientError::Protocol(format!("reply too long {during}")))
        };
        match tokio::time::timeout(timeout, read).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout(during)),
        }
    }

    /// One transaction: MAIL, RCPT per recipient, DATA. Per recipient, the
    /// reply that decides its fate.
    pub async fn send(
        &mut self,
        env: &Envelope,
        recipients: &[String],
        body: &mut dyn BodySource,
    ) -> Result<Outcome, ClientError> {
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
        mail.push_str("\r\n");
        let rcpts: Vec<String> = recipients.iter().map(|r| format!("RCPT TO:<{r}>\r\n")).collect();
        let t = self.timeouts.command;
        let (mail_reply, rcpt_replies, data_reply) = if self.ext.pipelining {
            let mut batch = mail.into_bytes();
            rcpts.iter().for_each(|r| batch.extend_from_slice(r.as_bytes()));
            batch.extend_from_slice(b"DATA\r\n");
            self.write(&batch, "sending MAIL/RCPT/DATA").await?;
            let mail_reply = self.reply(t, "after MAIL").await?;
            let mut rcpt_replies = Vec::with_capacity(rcpts.len());
            for _ in &rcpts {
                rcpt_replies.push(self.reply(t, "after RCPT").await?);
            }
            let data_reply = self.reply(t, "after DATA").await?;
            (mail_reply, rcpt_replies, Some(data_reply))
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
            let data_reply = if rcpt_replies.iter().any(RemoteReply::is_success) {
                self.write(b"DATA\r\n", "sending DATA").await?;
                Some(self.reply(t, "after DATA").await?)
            } else {
                None
            };
            (mail_reply, rcpt_replies, data_reply)
        };
        if !mail_reply.is_success() {
            if data_reply.as_ref().is_some_and(|r| r.code == 354) {
                self.write(b".\r\n", "ending empty DATA").await?;
                self.reply(self.timeouts.data, "after end of data").await?;
            }
            return Ok(Outcome::MailRefused(mail_reply));
        }
        let accepted = rcpt_replies.iter().any(RemoteReply::is_success);
        let final_reply = match data_reply {
            Some(r) if r.code == 354 && accepted => {
                self.stream_body(body).await?;
                Some(self.reply(self.timeouts.data, "after end of data").await?)
            }
            Some(r) if r.code == 354 => {
                // A server that said 354 with no recipient: send nothing.
                self.write(b".\r\n", "ending empty DATA").await?;
                self.reply(self.timeouts.data, "after end of data").await?;
                None
            }
            Some(r) if accepted => Some(r),
            _ => None,
        };
        let replies = rcpt_replies
            .into_iter()
            .map(|r| match (&final_reply, r.is_success()) {
                (Some(done), true) => done.clone(),
                _ => r,
            })
            .collect();
        Ok(Outcome::Replies(replies))
    }

    /// Copies the body with dot-stuffing, then `CRLF.CRLF`.
    async fn stream_body(&mut self, body: &mut dyn BodySource) -> Result<(), ClientError> {
        let mut stuffer = DotStuffer::default();
        let mut out = Vec::new();
        while let Some(chunk) = body.next_chunk().await? {
            out.clear();
            stuffer.encode(&chunk, &mut out);
            match tokio::time::timeout(self.timeouts.data, self.writer.write_all(&out)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(ClientError::Lost("sending message content")),
                Err(_) => return Err(ClientError::Timeout("sending message content")),
            }
        }
        out.clear();
        stuffer.finish(&mut out);
        self.write(&out, "ending message content").await
    }

    /// RSET, to reuse the session for another message.
    pub async fn reset(&mut self) -> Result<(), ClientError> {
        self.write(b"RSET\r\n", "sending RSET").await?;
        let r = self.reply(self.timeouts.command, "after RSET").await?;
        if r.is_success() { Ok(()) } else { Err(ClientError::Protocol(format!("RSET refused: {r}"))) }
    }

    pub async fn quit(mut self) {
        if self.write(b"QUIT\r\n", "sending QUIT").await.is_ok() {
            let _ = self.reply(Duration::from_secs(5).min(self.timeouts.command), "after QUIT").await;
        }
        let _ = self.writer.shutdown().await;
    }
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
            "SIZE" => ext.size = Some(words.get(i + 1).and_then(|n| n.parse().ok()).unwrap_or(0)),
            _ => {}
        }
    }
    ext
}

/// RFC 5321 §4.5.2 transparency, streaming: a `.` that starts a line gets a
/// second one. A line start is any byte after LF.
#[derive(Debug)]
pub struct DotStuffer {
    line_start: bool,
    last: Option<u8>,
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer { line_start: true, last: None }
    }
}

impl DotStuffer {
    pub fn encode(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            if self.line_start && b == b'.' {
                out.push(b'.');
            }
            out.push(b);
            self.line_start = b == b'\n';
        }
        if let Some(&b) = input.last() {
            self.last = Some(b);
        }
    }

    /// The end-of-data mark, after a CRLF if the content lacks one.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.last.is_some_and(|b| b != b'\n') {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn extensions() {
        let e = parse_extensions("mx.example PIPELINING SIZE 10240000 8BITMIME SMTPUTF8 STARTTLS");
        assert!(e.pipelining && e.eight_bit && e.smtputf8 && e.starttls);
        assert_eq!(e.size, Some(10240000));
        assert_eq!(parse_extensions("mx SIZE").size, Some(0));
    }

    #[test]
    fn enhanced_codes() {
        let r = RemoteReply { code: 550, text: "5.1.1 <u@x>: user unknown".into() };
        assert_eq!(r.enhanced(), "5.1.1");
        let r = RemoteReply { code: 451, text: "try later".into() };
        assert_eq!(r.enhanced(), "4.0.0");
    }
}
