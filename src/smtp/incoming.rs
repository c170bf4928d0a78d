//! A message body on its way into the spool (or, for a domain that is
//! scanned, into the scan buffer first): decodes DATA or BDAT content,
//! enforces `message_size_limit`, counts `Received:` headers and
//! remembers the first failure.
//!
//! Invariant: after a failure, content is still read (to resynchronise
//! with the client) but nothing more is stored, and the partial body is
//! aborted, never committed.

use std::sync::Arc;

use super::data::{DataDecoder, Framing, HeaderScan};
use crate::proto::reply::Reply;
use crate::scan::{ScanBuffer, Scanner};
use crate::spool::{Enqueue, QueueId, SpoolBody};

/// A message body on its way into the spool: enforces the size limit,
/// counts `Received:` headers and remembers the first failure. After a
/// failure, content is still read (to resynchronise) but not stored.
pub(super) struct Incoming {
    pub(super) id: QueueId,
    pub(super) body: Option<Box<dyn SpoolBody>>,
    /// While the message waits for a scan verdict, it goes here instead of
    /// the spool (which only stores what was accepted).
    pub(super) scan: Option<(Arc<Scanner>, ScanBuffer)>,
    pub(super) spool: Arc<dyn Enqueue>,
    pub(super) decoder: DataDecoder,
    pub(super) headers: HeaderScan,
    pub(super) received_header_len: u64,
    pub(super) size: u64,
    pub(super) limit: u64,
    pub(super) forbid_bare_newline: bool,
    pub(super) failure: Option<(Reply, &'static str)>,
    pub(super) decoded: Vec<u8>,
}

impl Incoming {
    /// A body for message `id`, in the scan buffer if `scan` is given,
    /// else straight in the spool. `forbid_bare_newline` refuses a bare
    /// LF or CR (`smtpd_forbid_bare_newline`) rather than rewriting it.
    pub(super) fn new(
        id: QueueId,
        spool: Arc<dyn Enqueue>,
        scan: Option<(Arc<Scanner>, ScanBuffer)>,
        framing: Framing,
        forbid_bare_newline: bool,
        limit: u64,
    ) -> Incoming {
        Incoming {
            body: if scan.is_some() { None } else { Some(spool.open_body(&id)) },
            scan,
            spool,
            decoder: DataDecoder::new(framing, !forbid_bare_newline),
            headers: HeaderScan::default(),
            received_header_len: 0,
            size: 0,
            limit,
            forbid_bare_newline,
            failure: None,
            decoded: Vec::new(),
            id,
        }
    }

    /// BDAT LAST: what the decoder still holds is the end of the body.
    pub(super) async fn finish_chunks(&mut self) {
        let mut tail = Vec::new();
        self.decoder.finish(&mut tail);
        self.decoded.extend_from_slice(&tail);
        self.store().await;
    }

    /// The client went away or the transaction was reset: nothing is kept.
    pub(super) async fn abort(mut self) {
        if let Some(body) = self.body.take() {
            body.abort().await;
        }
    }

    /// Decodes `input`; returns the end-of-data position, if found.
    pub(super) async fn feed(&mut self, input: &[u8]) -> Option<usize> {
        let end = self.decoder.feed(input, &mut self.decoded);
        self.store().await;
        end
    }

    pub(super) async fn store(&mut self) {
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
    pub(super) async fn write(&mut self, data: &[u8]) {
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

    pub(super) async fn fail(&mut self, reply: Reply, label: &'static str) {
        self.failure = Some((reply, label));
        self.scan = None;
        if let Some(body) = self.body.take() {
            body.abort().await;
        }
    }
}
