//! The socket of one inbound session with its bounded input buffer and
//! its pending replies. Reads wait at most their timeout (shortened while
//! the node is under stress) and give up when the node reaches the
//! shutdown phase the session stops at.
//!
//! Invariants: a command line is never buffered beyond
//! [`COMMAND_LINE_LIMIT`] (an overlong one is read to its end and
//! discarded); replies to pipelined commands go out before the session
//! waits for more input (RFC 2920).

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::slots::Stress;
use crate::proto::command::COMMAND_LINE_LIMIT;
use crate::proto::reply::Reply;
use crate::shutdown::{DRAIN_IDLE, Phase, Shutdown};

const READ_CHUNK: usize = 64 * 1024;
/// Pending replies are written out once they reach this size even if more
/// pipelined commands wait.
pub(super) const OUTPUT_FLUSH_AT: usize = 16 * 1024;

pub(super) enum ReadError {
    Eof,
    Timeout,
    Io,
    /// The node reached the shutdown phase this read stops at.
    Shutdown,
}

pub(super) enum Line {
    Command(BytesMut),
    TooLong,
}

/// The socket with its bounded input buffer and pending replies.
pub(super) struct Conn<S> {
    pub(super) stream: S,
    pub(super) inbuf: BytesMut,
    pub(super) out: Vec<u8>,
    pub(super) debug: bool,
    pub(super) shutdown: Shutdown,
    /// Reads give up at this shutdown phase: `Draining` while waiting for a
    /// command, `Closing` while a message is coming in.
    pub(super) stop_at: Phase,
    /// Under stress, no read waits longer than its timeout.
    pub(super) stress: Stress,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// A session starts out stopping at [`Phase::Draining`] (between
    /// transactions).
    pub(super) fn new(stream: S, debug: bool, shutdown: Shutdown, stress: Stress) -> Conn<S> {
        Conn {
            stream,
            inbuf: BytesMut::with_capacity(4096),
            out: Vec::new(),
            debug,
            shutdown,
            stop_at: Phase::Draining,
            stress,
        }
    }

    pub(super) async fn flush(&mut self) -> Result<(), ReadError> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await.map_err(|_| ReadError::Io)?;
            self.stream.flush().await.map_err(|_| ReadError::Io)?;
            self.out.clear();
        }
        Ok(())
    }

    pub(super) fn queue(&mut self, reply: &Reply) {
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
    ///
    /// Waiting for a command (`stop_at` is `Draining`) on a draining node,
    /// the wait ends with [`ReadError::Shutdown`] after [`DRAIN_IDLE`]: a
    /// client that keeps talking is served to the end of its work. Every
    /// read ends at [`Phase::Closing`].
    pub(super) async fn fill(&mut self, timeout: Duration) -> Result<(), ReadError> {
        self.flush().await?;
        self.inbuf.reserve(READ_CHUNK);
        let (mut draining, mut closing) = (self.shutdown.clone(), self.shutdown.clone());
        let quiet_on_drain = self.stop_at == Phase::Draining;
        let mut stressed = self.stress.on.clone();
        let started = Instant::now();
        let limits = self.stress.clone();
        // The drain's deadline, once the node drains.
        let mut quiet: Option<Instant> = None;
        let deadline = |on: bool, quiet: Option<Instant>| {
            let normal = started + limits.limit(timeout, on);
            quiet.map_or(normal, |q| q.min(normal))
        };
        let expiry = tokio::time::sleep_until(deadline(*stressed.borrow_and_update(), None));
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
                () = &mut expiry => {
                    return Err(if quiet.is_some() { ReadError::Shutdown } else { ReadError::Timeout })
                }
                Ok(()) = stressed.changed() => {
                    let on = *stressed.borrow_and_update();
                    expiry.as_mut().reset(deadline(on, quiet));
                }
                () = draining.reached(self.stop_at), if quiet.is_none() => {
                    if !quiet_on_drain {
                        return Err(ReadError::Shutdown);
                    }
                    quiet = Some(Instant::now() + DRAIN_IDLE);
                    expiry.as_mut().reset(deadline(*stressed.borrow(), quiet));
                }
                () = closing.reached(Phase::Closing) => return Err(ReadError::Shutdown),
            }
        }
    }

    /// One command line without its line ending, which must arrive whole
    /// within `timeout`. An overlong line is read to its end and discarded,
    /// never buffered whole.
    pub(super) async fn read_line(&mut self, timeout: Duration) -> Result<Line, ReadError> {
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncWriteExt, DuplexStream, duplex};
    use tokio::sync::watch;

    use super::*;
    use crate::shutdown::Trigger;

    /// A session's socket over an in-memory pipe; the client end, the
    /// shutdown trigger and the stress switch come back with it.
    fn conn() -> (Conn<DuplexStream>, DuplexStream, Trigger, watch::Sender<bool>) {
        let (server, client) = duplex(1 << 20);
        let (trigger, shutdown) = crate::shutdown::channel();
        let (stressed, on) = watch::channel(false);
        let stress = Stress { on, timeout: Duration::from_millis(50) };
        (Conn::new(server, false, shutdown, stress), client, trigger, stressed)
    }

    fn command(line: Result<Line, ReadError>) -> Vec<u8> {
        match line {
            Ok(Line::Command(b)) => b.to_vec(),
            Ok(Line::TooLong) => b"<too long>".to_vec(),
            Err(_) => b"<error>".to_vec(),
        }
    }

    #[tokio::test]
    async fn pipelined_lines_come_one_by_one_without_their_endings() {
        let (mut c, mut client, _t, _s) = conn();
        client.write_all(b"EHLO a\r\nMAIL FROM:<x@y>\nNOOP\r\n").await.unwrap();
        for want in [&b"EHLO a"[..], b"MAIL FROM:<x@y>", b"NOOP"] {
            assert_eq!(command(c.read_line(Duration::from_secs(5)).await), want);
        }
    }

    #[tokio::test]
    async fn an_overlong_line_is_discarded_and_the_next_one_read() {
        let (mut c, mut client, _t, _s) = conn();
        let long = vec![b'x'; 16 * READ_CHUNK];
        let writer = tokio::spawn(async move {
            client.write_all(&long).await.unwrap();
            client.write_all(b"\r\nQUIT\r\n").await.unwrap();
            client
        });
        assert!(matches!(c.read_line(Duration::from_secs(5)).await, Ok(Line::TooLong)));
        assert!(c.inbuf.capacity() <= 4 * READ_CHUNK, "never buffered whole: {}", c.inbuf.capacity());
        assert_eq!(command(c.read_line(Duration::from_secs(5)).await), b"QUIT");
        let mut client = writer.await.unwrap();
        // Exactly at the limit is still a command.
        let edge = vec![b'y'; COMMAND_LINE_LIMIT];
        client.write_all(&[&edge[..], b"\r\n"].concat()).await.unwrap();
        assert_eq!(command(c.read_line(Duration::from_secs(5)).await), edge);
    }

    #[tokio::test]
    async fn a_line_must_arrive_whole_within_its_timeout() {
        let (mut c, mut client, _t, _s) = conn();
        // A byte at a time keeps the socket busy but never the line whole.
        let drip = tokio::spawn(async move {
            loop {
                client.write_all(b"N").await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let started = Instant::now();
        assert!(matches!(c.read_line(Duration::from_millis(300)).await, Err(ReadError::Timeout)));
        assert!(started.elapsed() < Duration::from_secs(30), "not extended by each byte: {:?}", started.elapsed());
        drip.abort();
    }

    #[tokio::test]
    async fn stress_shortens_a_wait_already_under_way() {
        let (mut c, _client, _t, stressed) = conn();
        let started = Instant::now();
        let flip = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            stressed.send(true).unwrap();
            stressed
        });
        assert!(matches!(c.read_line(Duration::from_secs(300)).await, Err(ReadError::Timeout)));
        assert!(started.elapsed() < Duration::from_secs(60), "{:?}", started.elapsed());
        flip.await.unwrap();
    }

    #[tokio::test]
    async fn replies_go_out_before_the_next_read_and_shutdown_ends_the_wait() {
        let (mut c, mut client, trigger, _s) = conn();
        c.queue(&Reply::new(250, "2.0.0", "Ok"));
        let reader = tokio::spawn(async move {
            let mut got = [0u8; 14];
            client.read_exact(&mut got).await.unwrap();
            (got, client)
        });
        let waiting = tokio::spawn(async move { c.read_line(Duration::from_secs(300)).await.err() });
        let (got, _client) = reader.await.unwrap();
        assert_eq!(&got, b"250 2.0.0 Ok\r\n");
        trigger.advance(Phase::Draining);
        assert!(matches!(waiting.await.unwrap(), Some(ReadError::Shutdown)));
    }
}
