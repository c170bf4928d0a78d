//! Builds the bounce for a failed message: an RFC 3464 delivery status
//! notification inside an RFC 6522 `multipart/report`, as raw CRLF message
//! bytes ready to enqueue. Pure: no I/O, no clock, no randomness.
//!
//! Invariant: a DSN is never built for the null sender (`MAIL FROM:<>`),
//! since bouncing a bounce can loop (RFC 5321 §4.5.5). Callers check first;
//! `build` also asserts it in debug builds. Every value we write into a header
//! or status field is printable ASCII (CR, LF and other controls become
//! spaces, so a remote reply cannot inject fields; a UTF-8 recipient is
//! written in RFC 6533's 7-bit `utf-8;` form), no line is longer than
//! 998 octets (longer ones are truncated) and the output has no bare LF.

use chrono::{DateTime, Utc};

/// RFC 5322 §2.1.1: a line is at most 998 octets, excluding the CRLF.
const MAX_LINE: usize = 998;
/// Most of the failed message's header section we return to the sender.
const MAX_ORIGINAL_HEADERS: usize = 64 * 1024;

/// One recipient a notification reports on (failed, delayed or relayed).
pub struct DsnRecipient<'a> {
    /// As the client sent it, no brackets.
    pub address: &'a str,
    /// Enhanced status code (RFC 3463), e.g. "5.1.1", or "4.4.7" for expiry.
    pub status: &'a str,
    /// Host name the reply came from, when there was one.
    pub remote_mta: Option<&'a str>,
    /// The remote reply text, or our own reason.
    pub diagnostic: &'a str,
    /// RFC 3461 `ORCPT`, decoded (`rfc822;bob@example.org`).
    pub original: Option<String>,
}

/// What a notification reports for its recipients (RFC 3464 `Action:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// A permanent failure; `expired`: the reason is `max_queue_lifetime`.
    Failed { expired: bool },
    /// A delay warning (`delivery.delay_warning_time`): the recipients are
    /// still being tried until this time.
    Delayed { until: DateTime<Utc> },
    /// Delivered to a next hop that does not offer DSN, for a recipient
    /// whose NOTIFY asked for SUCCESS (RFC 3461 §4.2): no further notice
    /// will come.
    Relayed,
}

pub struct DsnInput<'a> {
    /// Our `myhostname`.
    pub reporting_mta: &'a str,
    pub queue_id: &'a str,
    /// Envelope sender of the failed message; never empty (see module doc).
    pub original_sender: &'a str,
    pub arrival_date: DateTime<Utc>,
    pub failed: &'a [DsnRecipient<'a>],
    /// The failed message's header section, excluding the blank line.
    pub original_headers: &'a [u8],
    /// What the notification reports.
    pub report: Report,
    /// RFC 3461 `ENVID` of the message, decoded.
    pub envid: Option<String>,
    pub now: DateTime<Utc>,
}

/// The complete bounce message (headers and body) for `input`.
pub fn build(input: &DsnInput<'_>) -> Vec<u8> {
    debug_assert!(!input.original_sender.is_empty(), "DSN for the null sender");
    let host = clean(input.reporting_mta);
    let text = explanation(input, &host);
    let status = delivery_status(input, &host);
    let headers = original_headers(input.original_headers);
    let parts = [text.0.as_bytes(), status.0.as_bytes(), &headers];
    let boundary = boundary(input.queue_id, &host, &parts);
    let (qid, millis) = (clean(input.queue_id), input.now.timestamp_millis());

    let mut out = Lines::default();
    out.line(&format!("From: Mail Delivery System <MAILER-DAEMON@{host}>"));
    out.line(&format!("To: <{}>", clean(input.original_sender)));
    out.line(match input.report {
        Report::Failed { .. } => "Subject: Undelivered Mail Returned to Sender",
        Report::Delayed { .. } => "Subject: Delayed Mail (still being retried)",
        Report::Relayed => "Subject: Successful Mail Delivery Report",
    });
    out.line(&format!("Date: {}", input.now.to_rfc2822()));
    out.line(&format!("Message-ID: <{qid}.{millis}.dsn@{host}>"));
    // RFC 3834 §5: marks the message as automatic so responders stay quiet.
    out.line("Auto-Submitted: auto-replied");
    out.line("MIME-Version: 1.0");
    out.line("Content-Type: multipart/report; report-type=delivery-status;");
    out.line(&format!("\tboundary=\"{boundary}\""));
    out.line("");
    out.line("This is a MIME-encapsulated message.");
    let types = ["text/plain; charset=us-ascii", "message/delivery-status", "text/rfc822-headers"];
    let mut out = out.0.into_bytes();
    for (content_type, body) in types.iter().zip(parts) {
        let head = format!("\r\n--{boundary}\r\nContent-Type: {content_type}\r\n\r\n");
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(body);
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// Message text under construction: each line truncated to `MAX_LINE`
/// octets and ended with CRLF.
#[derive(Default)]
struct Lines(String);

impl Lines {
    fn line(&mut self, line: &str) {
        self.0.push_str(&line[..line.floor_char_boundary(MAX_LINE)]);
        self.0.push_str("\r\n");
    }
}

/// The human-readable part.
fn explanation(input: &DsnInput<'_>, host: &str) -> Lines {
    let mut text = Lines::default();
    text.line(&format!("This is the mail system at host {host}."));
    text.line("");
    match input.report {
        Report::Relayed => {
            text.line("Your message was relayed to the following recipients' mail");
            text.line("system, which does not send delivery notifications of its own:");
            text.line("no further notice will come from there.");
        }
        Report::Delayed { until } => {
            text.line("Your message could not be delivered yet to one or more of its");
            text.line("recipients. It is still in the queue and will be tried again");
            text.line(&format!("until {}; you do not need to send it again.", until.to_rfc2822()));
            text.line("The reason for each recipient follows.");
        }
        Report::Failed { expired } => {
            text.line("Your message could not be delivered to one or more of its recipients.");
            if expired {
                text.line("It stayed in the queue for the longest time allowed without");
                text.line("being accepted, so delivery has been given up.");
            } else {
                text.line("The receiving side refused it permanently.");
            }
            text.line("The reason for each recipient follows; the headers of your");
            text.line("message are attached. For help, write to the postmaster of");
            text.line(&format!("{host} and include this report."));
        }
    }
    // A failure names the host that refused; the other reports give the reason alone.
    let failed = matches!(input.report, Report::Failed { .. });
    for rcpt in input.failed {
        let (address, diagnostic) = (clean(rcpt.address), clean(rcpt.diagnostic));
        text.line("");
        match rcpt.remote_mta.filter(|_| failed) {
            Some(mta) => text.line(&format!("<{address}>: host {} said: {diagnostic}", clean(mta))),
            None => text.line(&format!("<{address}>: {diagnostic}")),
        }
    }
    text
}

/// The `message/delivery-status` part (RFC 3464 §2).
fn delivery_status(input: &DsnInput<'_>, host: &str) -> Lines {
    let mut status = Lines::default();
    if let Some(envid) = &input.envid {
        status.line(&format!("Original-Envelope-Id: {}", clean(envid)));
    }
    status.line(&format!("Reporting-MTA: dns; {host}"));
    status.line(&format!("X-Mxrelay-Queue-ID: {}", clean(input.queue_id)));
    status.line(&format!("Arrival-Date: {}", input.arrival_date.to_rfc2822()));
    for rcpt in input.failed {
        status.line("");
        if let Some(original) = &rcpt.original {
            status.line(&format!("Original-Recipient: {}", clean(original)));
        }
        status.line(&format!("Final-Recipient: {}", final_recipient(rcpt.address)));
        match input.report {
            Report::Delayed { until } => {
                status.line("Action: delayed");
                status.line(&format!("Status: {}", status_code(rcpt.status, true)));
                status.line(&format!("Will-Retry-Until: {}", until.to_rfc2822()));
            }
            Report::Failed { expired } => {
                status.line("Action: failed");
                status.line(&format!("Status: {}", status_code(rcpt.status, expired)));
            }
            Report::Relayed => {
                status.line("Action: relayed");
                status.line("Status: 2.0.0");
            }
        }
        if let Some(mta) = rcpt.remote_mta {
            status.line(&format!("Remote-MTA: dns; {}", clean(mta)));
        }
        status.line(&format!("Diagnostic-Code: smtp; {}", clean(rcpt.diagnostic)));
    }
    status
}

/// The caller's code if it is a valid RFC 3463 failure code, else a generic one.
fn status_code(code: &str, expired: bool) -> &str {
    let mut fields = code.split('.');
    let class_ok = matches!(fields.next(), Some("4" | "5"));
    let rest_ok = fields.clone().count() == 2
        && fields.all(|f| (1..=3).contains(&f.len()) && f.bytes().all(|b| b.is_ascii_digit()));
    match (class_ok && rest_ok, expired) {
        (true, _) => code,
        (false, true) => "4.4.7",
        (false, false) => "5.0.0",
    }
}

/// Header lines with CRLF endings, stopping at a blank line or at
/// `MAX_ORIGINAL_HEADERS`; over-long lines are truncated, stray CRs blanked.
/// Other bytes (8-bit included) are copied as they arrived.
fn original_headers(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in raw.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let line = &line[..line.len().min(MAX_LINE)];
        if line.is_empty() || out.len() + line.len() + 2 > MAX_ORIGINAL_HEADERS {
            break;
        }
        out.extend(line.iter().map(|&b| if b == b'\r' { b' ' } else { b }));
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// `{queue_id}/{host}` reduced to RFC 2046 `bchars`, suffixed until it occurs
/// in none of the parts.
fn boundary(queue_id: &str, host: &str, parts: &[&[u8]]) -> String {
    let base: String = format!("{queue_id}/{host}")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "'()+_,-./:=?".contains(*c))
        .take(60)
        .collect();
    let mut boundary = base.clone();
    let mut n = 0;
    while parts.iter().any(|p| memchr::memmem::find(p, boundary.as_bytes()).is_some()) {
        n += 1;
        boundary = format!("{base}={n}");
    }
    boundary
}

/// Printable ASCII only: controls (CR, LF, tab, …) become spaces so a value
/// cannot start a new field; non-ASCII becomes '?' since the report is 7-bit.
/// `rfc822; addr`, or for an address with non-ASCII characters (received
/// with SMTPUTF8) RFC 6533 §3's `utf-8; ` with the 7-bit utf-8-addr-xtext
/// form: every character but QCHAR (printable ASCII except `+`, `=`, `\`)
/// as `\x{HEX}`, so the field stays ASCII and still names the address
/// exactly (`clean` would turn `ü` into `?`).
fn final_recipient(address: &str) -> String {
    if address.is_ascii() {
        return format!("rfc822; {}", clean(address));
    }
    let mut out = String::from("utf-8; ");
    for c in address.chars() {
        match c {
            '!'..='~' if !matches!(c, '+' | '=' | '\\') => out.push(c),
            c => out.push_str(&format!("\\x{{{:02X}}}", u32::from(c))),
        }
    }
    out
}

fn clean(value: &str) -> String {
    value
        .chars()
        .map(|c| match c {
            ' '..='~' => c,
            c if c.is_control() => ' ',
            _ => '?',
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn render(failed: &[DsnRecipient<'_>], headers: &[u8], expired: bool) -> String {
        let input = DsnInput {
            reporting_mta: "relay.example.net",
            queue_id: "Q1",
            original_sender: "alice@example.com",
            arrival_date: Utc.with_ymd_and_hms(2024, 5, 1, 10, 0, 0).unwrap(),
            failed,
            original_headers: headers,
            report: Report::Failed { expired },
            envid: None,
            now: Utc.with_ymd_and_hms(2024, 5, 2, 10, 0, 0).unwrap(),
        };
        String::from_utf8(build(&input)).unwrap()
    }

    #[test]
    fn a_delay_warning_says_delayed_and_until_when() {
        let late = DsnRecipient {
            status: "4.4.1",
            remote_mta: None,
            original: Some("rfc822;Bob@Example.org".into()),
            ..rcpt("bob@example.org", "connect failed")
        };
        let until = Utc.with_ymd_and_hms(2024, 5, 6, 10, 0, 0).unwrap();
        let input = DsnInput {
            reporting_mta: "relay.example.net",
            queue_id: "Q1",
            original_sender: "alice@example.com",
            arrival_date: Utc.with_ymd_and_hms(2024, 5, 1, 10, 0, 0).unwrap(),
            failed: &[late],
            original_headers: HEADERS,
            report: Report::Delayed { until },
            envid: Some("QQ314159".into()),
            now: Utc.with_ymd_and_hms(2024, 5, 1, 14, 0, 0).unwrap(),
        };
        let out = String::from_utf8(build(&input)).unwrap();
        assert!(out.contains("Subject: Delayed Mail (still being retried)\r\n"));
        assert!(
            out.contains("Action: delayed\r\nStatus: 4.4.1\r\nWill-Retry-Until: Mon, 6 May 2024 10:00:00 +0000\r\n")
        );
        assert!(out.contains("you do not need to send it again") && !out.contains("Action: failed"));
        assert!(out.contains("Original-Envelope-Id: QQ314159\r\nReporting-MTA: dns; relay.example.net\r\n"), "{out}");
        assert!(out.contains("Original-Recipient: rfc822;Bob@Example.org\r\nFinal-Recipient: rfc822; bob@example.org"));
    }

    fn rcpt<'a>(address: &'a str, diagnostic: &'a str) -> DsnRecipient<'a> {
        DsnRecipient { address, status: "5.1.1", remote_mta: Some("mx.example.org"), diagnostic, original: None }
    }

    const HEADERS: &[u8] = b"From: alice@example.com\r\nSubject: hi\r\n";

    #[test]
    fn has_three_parts_and_closing_boundary() {
        let out = render(&[rcpt("bob@example.org", "550 5.1.1 no such user")], HEADERS, false);
        assert!(out.contains("To: <alice@example.com>\r\n"));
        assert!(out.contains("Auto-Submitted: auto-replied\r\n"));
        assert!(out.contains("boundary=\"Q1/relay.example.net\""));
        for ct in ["text/plain; charset=us-ascii", "message/delivery-status", "text/rfc822-headers"] {
            assert!(out.contains(&format!("--Q1/relay.example.net\r\nContent-Type: {ct}\r\n\r\n")));
        }
        assert!(out.ends_with("\r\n--Q1/relay.example.net--\r\n"));
        assert!(out.contains("Reporting-MTA: dns; relay.example.net\r\nX-Mxrelay-Queue-ID: Q1\r\n"));
        assert!(out.contains("\r\n\r\nFrom: alice@example.com\r\nSubject: hi\r\n"));
    }

    #[test]
    fn one_status_group_per_recipient() {
        let own =
            DsnRecipient { address: "c@x.org", status: "bogus", remote_mta: None, diagnostic: "no MX", original: None };
        let out = render(&[rcpt("b@x.org", "550 5.1.1 unknown"), own], HEADERS, false);
        assert!(out.contains(
            "\r\n\r\nFinal-Recipient: rfc822; b@x.org\r\nAction: failed\r\nStatus: 5.1.1\r\n\
             Remote-MTA: dns; mx.example.org\r\nDiagnostic-Code: smtp; 550 5.1.1 unknown\r\n"
        ));
        assert!(out.contains(
            "\r\n\r\nFinal-Recipient: rfc822; c@x.org\r\nAction: failed\r\nStatus: 5.0.0\r\n\
             Diagnostic-Code: smtp; no MX\r\n"
        ));
        assert!(out.contains("<b@x.org>: host mx.example.org said: 550 5.1.1 unknown\r\n"));
    }

    #[test]
    fn a_utf8_recipient_is_named_exactly_in_7_bit_form() {
        let out = render(&[rcpt("jürgen+a=b@bücher.example", "does not support SMTPUTF8")], HEADERS, false);
        assert!(out.contains("Final-Recipient: utf-8; j\\x{FC}rgen\\x{2B}a\\x{3D}b@b\\x{FC}cher.example\r\n"), "{out}");
        // Even a control character cannot break the field.
        let out = render(&[rcpt("é\r\nBcc: x@y", "no")], HEADERS, false);
        assert!(out.contains("Final-Recipient: utf-8; \\x{E9}\\x{0D}\\x{0A}Bcc:\\x{20}x@y\r\n"), "{out}");
        assert!(out.is_ascii());
    }

    #[test]
    fn crlf_injection_is_neutralised() {
        let out = render(&[rcpt("b@x.org\r\nBcc: evil@x", "550 no\r\nSubject: pwned\nX: y")], HEADERS, false);
        assert!(!out.contains("\r\nBcc:") && !out.contains("\r\nSubject: pwned") && !out.contains("\nX: y"));
        assert!(out.contains("Final-Recipient: rfc822; b@x.org  Bcc: evil@x\r\n"));
    }

    #[test]
    fn lines_stay_short_and_end_in_crlf() {
        let long = "x".repeat(5000);
        let headers = format!("Subject: {long}\nX-Bare: lf\rcr\r\n\r\nbody");
        let out = render(&[rcpt("b@x.org", &long)], headers.as_bytes(), false);
        for line in out.split("\r\n") {
            assert!(line.len() <= MAX_LINE && !line.contains(['\r', '\n']), "{line:.40}");
        }
        assert!(out.contains("X-Bare: lf cr\r\n") && !out.contains("body"));
    }

    #[test]
    fn original_headers_are_bounded() {
        let headers = "X-Filler: 0123456789012345678901234567890123456789\r\n".repeat(2000);
        let out = render(&[rcpt("b@x.org", "550")], headers.as_bytes(), false);
        let included = out.matches("X-Filler:").count();
        assert!(included > 1000 && included * 52 <= MAX_ORIGINAL_HEADERS);
    }

    #[test]
    fn boundary_avoids_content() {
        let out = render(&[rcpt("b@x.org", "550")], b"X-Evil: --Q1/relay.example.net--\r\n", false);
        assert!(out.contains("boundary=\"Q1/relay.example.net=1\""));
        assert!(out.ends_with("\r\n--Q1/relay.example.net=1--\r\n"));
    }

    #[test]
    fn expiry_is_explained() {
        let expired = DsnRecipient { status: "4.4.7", remote_mta: None, ..rcpt("b@x.org", "expired") };
        let out = render(&[expired], HEADERS, true);
        assert!(out.contains("longest time allowed") && out.contains("Status: 4.4.7\r\n"));
        assert!(!render(&[rcpt("b@x.org", "550")], HEADERS, false).contains("longest time allowed"));
    }
}
