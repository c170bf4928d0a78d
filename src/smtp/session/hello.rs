//! The opening of a session and the commands about the session itself:
//! the greeting (after the early-talker check and, on a PROXY-protocol
//! listener, the check that an untrusted client sent no header),
//! EHLO/HELO, STARTTLS (RFC 3207) and ETRN (RFC 1985).

use tokio::io::AsyncReadExt;

use super::{Flow, Greeting, Outcome, Session};
use crate::config::TlsLevel;
use crate::metrics::METRICS;
use crate::proto::address;
use crate::proto::reply::Reply;
use crate::smtp::tls::SmtpStream;

impl Session {
    /// Up to the greeting: `Err` is how the session ends before it starts.
    pub(super) async fn open(&mut self) -> Result<(), Outcome> {
        let early = self.early_talker().await;
        let mut greeted = false;
        if self.client.proxy_guard {
            // A header counts whether it came before or as the first input.
            if !early {
                self.greet();
                greeted = true;
                if let Err(e) = self.conn.fill(self.config().smtp.command_timeout).await {
                    return Err(self.read_failed(e, "command"));
                }
            }
            if crate::smtp::proxy::looks_like_header(&self.conn.inbuf) {
                METRICS.smtp_proxy_headers.with_label_values(&["untrusted"]).inc();
                METRICS.smtp_connections_refused.with_label_values(&["proxy_untrusted"]).inc();
                tracing::warn!(client = %self.peer(), "PROXY header from an address not in smtp.proxy_networks: refused");
                self.conn.queue(&Reply::new(
                    421,
                    "4.7.0",
                    "Error: PROXY header from an address not in smtp.proxy_networks",
                ));
                return Err(Outcome::Refused);
            }
        }
        if early {
            METRICS.smtp_connections_refused.with_label_values(&["early_talker"]).inc();
            tracing::info!(client = %self.peer(), "reject: early talker (sent before the greeting)");
            self.conn.queue(&Reply::new(554, "5.5.1", "Error: SMTP protocol synchronization"));
            return Err(Outcome::EarlyTalker);
        }
        if !greeted {
            self.greet();
        }
        Ok(())
    }

    /// Postfix `reject_unauth_pipelining` before the greeting: a client that
    /// talks first is not a real MTA.
    async fn early_talker(&mut self) -> bool {
        let pause = self.config().smtp.greet_pause;
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        // The read polled once, without waiting: what arrived stays in the
        // buffer (to recognise a PROXY header). Not a zero timeout, which
        // waits for the timer wheel's next tick (about 1 ms per connection).
        self.conn.inbuf.reserve(64);
        let mut read = std::pin::pin!(self.conn.stream.read_buf(&mut self.conn.inbuf));
        let polled = std::future::poll_fn(|cx| std::task::Poll::Ready(read.as_mut().poll(cx))).await;
        matches!(polled, std::task::Poll::Ready(Ok(n)) if n > 0)
    }

    fn greet(&mut self) {
        let greeting = Reply::new(220, "", format!("{} ESMTP mxrelay", self.config().myhostname));
        self.conn.queue(&greeting);
    }

    /// EHLO or HELO (with a name): a new start, the transaction forgotten;
    /// EHLO lists the extensions on offer.
    pub(super) async fn hello(&mut self, greeting: Greeting) {
        self.reset_transaction().await;
        let esmtp = greeting.esmtp();
        self.greeting = greeting;
        let c = self.config();
        if !esmtp {
            let host = c.myhostname.clone();
            return self.reply(Reply::new(250, "", host));
        }
        let mut lines =
            vec![c.myhostname.clone(), "PIPELINING".into(), format!("SIZE {}", c.message_size_limit), "ETRN".into()];
        if self.starttls_offered() {
            lines.push("STARTTLS".into());
        }
        if self.auth_offered() {
            lines.push(format!("AUTH {}", crate::smtp::auth::MECHANISMS));
        }
        lines.extend(["ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8", "CHUNKING"].map(String::from));
        self.reply(Reply::multi(250, "", lines));
    }

    /// STARTTLS is advertised and accepted: a certificate is loaded, this
    /// session is not in TLS yet, and the level is not `none`.
    fn starttls_offered(&self) -> bool {
        self.tls.is_none() && self.config().tls.security_level != TlsLevel::None && self.shared.tls_acceptor().is_some()
    }

    /// RFC 3207. Input the client pipelined behind STARTTLS was sent in
    /// clear and is thrown away; after the handshake everything learned
    /// before it (HELO, AUTH, transaction) is forgotten.
    pub(super) async fn starttls(&mut self) -> Flow {
        if self.tls.is_some() {
            self.reply(Reply::new(554, "5.5.1", "Error: TLS already active"));
            return Flow::Continue;
        }
        let Some(acceptor) = self.shared.tls_acceptor().filter(|_| self.starttls_offered()) else {
            self.reply(Reply::new(502, "5.5.1", "Error: command not implemented"));
            return Flow::Continue;
        };
        if self.greeting == Greeting::None {
            self.reply(Reply::bad_sequence("send EHLO first"));
            return Flow::Continue;
        }
        if self.tx.is_some() {
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
                self.greeting = Greeting::None;
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

    /// RFC 1985 ETRN from a `mynetworks` client: releases the domain's
    /// deferred messages now, like `mxrelay queue flush --domain`.
    pub(super) async fn etrn(&mut self, node: &str) {
        if self.greeting == Greeting::None {
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
        let key = self.shared.policy.domains.destination_key(&domain);
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
}
