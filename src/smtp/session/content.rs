//! The message content: DATA (RFC 5321 §4.1.1.4) and BDAT (RFC 3030),
//! our `Received:` header, the hop count, scanning for the domains that
//! ask for it, and the commit.
//!
//! Invariant: `250 … queued as` only after the spool confirmed the commit;
//! a refused or broken transfer leaves nothing in the queue.

use std::time::{Duration, Instant};

use bytes::Buf;

use super::envelope::Transaction;
use super::{Flow, Session};
use crate::metrics::METRICS;
use crate::proto::reply::Reply;
use crate::scan::{Envelope as ScanEnvelope, Verdict as ScanVerdict};
use crate::shutdown::Phase;
use crate::smtp::data::Framing;
use crate::smtp::incoming::Incoming;
use crate::spool::{Envelope, QueueId};

impl Session {
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
        let c = self.config();
        let spool = self.shared.spool.clone();
        let mut incoming = Incoming::new(id, spool, scan, framing, c.smtpd_forbid_bare_newline, c.message_size_limit);
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
            self.greeting.name().unwrap_or("unknown"),
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

    pub(super) async fn data(&mut self) -> Flow {
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
                incoming.abort().await;
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
        let tx = self.tx.take().expect("ready for content");
        self.finish(tx, incoming).await;
        Flow::Continue
    }

    pub(super) async fn bdat(&mut self, size: u64, last: bool) -> Flow {
        let refusal = if self.in_bdat() { None } else { self.ready_for_content().err() };
        if refusal.is_none() && !self.in_bdat() {
            let incoming = self.begin_incoming(Framing::Chunked).await;
            self.tx.as_mut().expect("ready for content").bdat = Some(incoming);
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
            if let Some(incoming) = self.tx.as_mut().and_then(|t| t.bdat.as_mut()) {
                incoming.feed(&chunk).await;
            }
        }
        if let Some(reply) = refusal {
            self.log_reject("BDAT", &reply, None);
            self.reply(reply);
            return Flow::Continue;
        }
        if last {
            let mut tx = self.tx.take().expect("ready for content");
            let mut incoming = tx.bdat.take().expect("set above");
            incoming.finish_chunks().await;
            self.finish(tx, incoming).await;
        } else {
            let n = self.tx.as_ref().and_then(|t| t.bdat.as_ref()).map_or(0, |i| i.size);
            self.reply(Reply::new(250, "2.0.0", format!("Ok: {n} octets received")));
        }
        Flow::Continue
    }

    /// End of content: check what could only be checked at the end, then
    /// commit, and only then say 250.
    async fn finish(&mut self, tx: Transaction, mut incoming: Incoming) {
        let client_bytes = incoming.size - incoming.received_header_len;
        if incoming.failure.is_none() && incoming.headers.received > self.config().hop_count_limit {
            incoming.fail(Reply::new(554, "5.4.6", "Error: too many hops"), "too_many_hops").await;
        }
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
                helo: self.greeting.name().unwrap_or(""),
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
            helo: self.greeting.name().unwrap_or_default().to_string(),
            received_at: chrono::Utc::now().timestamp_millis(),
            // What the spool counted: scanning may have added headers.
            size: body.written(),
            node: self.config().node_id.clone(),
            smtputf8: tx.smtputf8,
            eight_bit: tx.eight_bit,
            attempts: 0,
            held: false,
            bounce_requested: false,
            dsn_ret: tx.dsn_ret,
            dsn_envid: tx.dsn_envid,
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
