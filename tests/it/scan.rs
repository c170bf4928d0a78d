//! Virus and spam scanning per domain (`enable_virus_spam_scan`) with real
//! daemons on loopback: clamd with signatures built in the test (EICAR)
//! and rspamd (GTUBE), swaks as the sender, our scripted destination as
//! the domain's server. Scanned mail is refused while the sender is still
//! connected; clean mail is marked; a scanner that is down is a 451 or an
//! accepted-and-marked message, never a 5xx and never a silent pass.

use std::time::Duration;

use crate::support::destination::Destination;
use crate::support::scanners::{ClamdServer, EICAR, EICAR_FOUND, GTUBE, RspamdServer};
use crate::support::*;

const SCANNED: &str = "scanned.example";
const PLAIN: &str = "plain.example";

/// A delivering relay with a scanned and an unscanned domain, both going
/// to one destination.
struct Setup {
    _dns: Dns,
    _db: TestDb,
    _data: tempfile::TempDir,
    relay: Relay,
    dest: Destination,
}

impl Setup {
    fn start(scan_env: &[(&str, String)]) -> Setup {
        let dns = Dns::start(&["sender.example", "client.example"], &[SCANNED, PLAIN]);
        let db = TestDb::create(&MysqlServer::shared());
        db.exec(include_str!("../../migrations/mysql/0001_domains.sql"));
        let dest = Destination::start();
        db.add_domain(SCANNED, "127.0.0.1", dest.port);
        db.add_domain(PLAIN, "127.0.0.1", dest.port);
        db.exec(&format!("UPDATE domains SET enable_virus_spam_scan = '1' WHERE domain = '{SCANNED}'"));
        let data = tempfile::tempdir().unwrap();
        let data_dir = data.path().display().to_string();
        let mut env: Vec<(&str, &str)> = vec![("MXRELAY_DELIVERY_ENABLED", "true"), ("MXRELAY_DATA_DIR", &data_dir)];
        env.extend(scan_env.iter().map(|(k, v)| (*k, v.as_str())));
        let relay = Relay::spawn_with_env(&base_config(&db.url(), SHARED_REDIS, &dns), &env);
        Setup { _dns: dns, _db: db, _data: data, relay, dest }
    }

    /// swaks to `to` with `body`; returns (exit status, transcript).
    fn send(&self, to: &[&str], body: &str) -> (i32, String) {
        let to = to.join(",");
        swaks(&self.relay.addr(), &["--from", SENDER, "--to", &to, "--ehlo", "client.example", "--body", body])
    }

    fn scan_dir_is_empty(&self) -> bool {
        std::fs::read_dir(self._data.path().join("scan")).map(|d| d.count() == 0).unwrap_or(true)
    }
}

/// The size the node queued message `id` with (its `… size=N, nrcpt=` log line).
fn queued_size(relay: &Relay, id: &str) -> usize {
    let log = relay.log();
    let line = log.lines().find(|l| l.contains(&format!("{id}: client="))).expect("queued line");
    line.split("size=").nth(1).and_then(|v| v.split(',').next()).and_then(|v| v.parse().ok()).expect("size")
}

fn text(r: &destination::Received) -> String {
    String::from_utf8_lossy(&r.data).into_owned()
}

#[test]
fn viruses_are_refused_for_scanned_domains_only() {
    let clamd = ClamdServer::start();
    let s = Setup::start(&[("MXRELAY_SCAN_CLAMD", clamd.addr())]);
    let eicar_body = format!("Here it comes:\n{EICAR}\n");

    let (status, out) = s.send(&[&format!("v@{SCANNED}")], &eicar_body);
    assert_ne!(status, 0);
    // ClamAV names signatures from unsigned databases `….UNOFFICIAL`.
    assert!(out.contains(&format!("554 5.7.1 Error: message content rejected, virus found: {EICAR_FOUND}")), "{out}");

    // The whole transaction: one scanned recipient is enough.
    let (status, out) = s.send(&[&format!("a@{PLAIN}"), &format!("b@{SCANNED}")], &eicar_body);
    assert_ne!(status, 0, "{out}");
    assert!(out.contains("554 5.7.1"), "{out}");

    // Unscanned domain: delivered unchanged.
    let (status, out) = s.send(&[&format!("p@{PLAIN}")], &eicar_body);
    assert_eq!(status, 0, "{out}");
    let got = s.dest.wait_for(1, Duration::from_secs(20));
    let delivered = text(&got[0]);
    assert!(delivered.contains(EICAR), "{delivered}");
    assert!(!delivered.contains("X-Mxrelay-Scan") && !delivered.contains("X-Spam"), "{delivered}");

    // A clean message to the scanned domain is marked.
    let (status, out) = s.send(&[&format!("c@{SCANNED}")], "nothing to see\n");
    assert_eq!(status, 0, "{out}");
    let got = s.dest.wait_for(2, Duration::from_secs(20));
    let clean = text(&got[1]);
    assert!(clean.starts_with("X-Mxrelay-Scan: clamd: clean by node test-node\r\nReceived: "), "{clean}");

    assert_eq!(s.relay.value("mxrelay_scan_total{result=\"virus\",scanner=\"clamd\"}"), 2.0);
    assert_eq!(s.relay.value("mxrelay_smtp_messages_total{result=\"virus\"}"), 2.0);
    let log = s.relay.log();
    assert!(log.contains("scan: refused virus: 554 5.7.1"), "{log}");
    // Once the queue is empty, every message that was queued has arrived:
    // the two accepted ones, and no refused one.
    let mut q = s.relay.queue(SHARED_REDIS);
    wait_until("queue empty", Duration::from_secs(20), || q.message_count() == 0);
    assert_eq!(s.dest.messages().len(), 2, "a refused message was delivered");
    wait_until("scan buffers removed", Duration::from_secs(10), || s.scan_dir_is_empty());
}

#[test]
fn spam_is_refused_and_clean_mail_gets_the_scan_headers() {
    let clamd = ClamdServer::start();
    let rspamd = RspamdServer::start();
    let s = Setup::start(&[("MXRELAY_SCAN_CLAMD", clamd.addr()), ("MXRELAY_SCAN_RSPAMD", rspamd.url())]);

    let (status, out) = s.send(&[&format!("g@{SCANNED}")], &format!("Buy now\n{GTUBE}\n"));
    assert_ne!(status, 0);
    assert!(out.contains("554 5.7.1 Error: message rejected as spam"), "{out}");

    let (status, out) = s.send(&[&format!("h@{SCANNED}")], "Hello,\n\nthe meeting is at ten tomorrow.\n\nBob\n");
    assert_eq!(status, 0, "{out}");
    let got = s.dest.wait_for(1, Duration::from_secs(20));
    let clean = text(&got[0]);
    let headers = clean.split("\r\n\r\n").next().unwrap();
    assert!(headers.contains("X-Mxrelay-Scan: clamd: clean, rspamd: no action by node test-node"), "{headers}");
    assert!(headers.contains("X-Spam-Status: No, score="), "{headers}");
    assert!(s.relay.value("mxrelay_scan_total{result=\"reject\",scanner=\"rspamd\"}") >= 1.0);
    assert!(s.relay.value("mxrelay_scan_duration_seconds_count{scanner=\"rspamd\"}") >= 2.0);
}

#[test]
fn a_scanner_that_is_down_is_a_tempfail_or_an_accepted_and_marked_message() {
    let mut clamd = ClamdServer::start();
    let s = Setup::start(&[("MXRELAY_SCAN_CLAMD", clamd.addr())]);
    clamd.stop();
    let (status, out) = s.send(&[&format!("t@{SCANNED}")], "clamd is down\n");
    assert_ne!(status, 0);
    assert!(out.contains("451 4.7.1 Error: message could not be scanned, try again later"), "{out}");
    // Unscanned domains are not affected.
    let (status, out) = s.send(&[&format!("p@{PLAIN}")], "not scanned anyway\n");
    assert_eq!(status, 0, "{out}");
    assert!(s.relay.value("mxrelay_scan_errors_total{scanner=\"clamd\"}") >= 1.0);
    clamd.resume();
    let (status, out) = s.send(&[&format!("t@{SCANNED}")], "clamd is back\n");
    assert_eq!(status, 0, "{out}");
    drop(s);

    let mut clamd = ClamdServer::start();
    let s = Setup::start(&[("MXRELAY_SCAN_CLAMD", clamd.addr()), ("MXRELAY_SCAN_ON_FAILURE", "accept".into())]);
    clamd.stop();
    let (status, out) = s.send(&[&format!("a@{SCANNED}")], &format!("{EICAR}\n"));
    assert_eq!(status, 0, "{out}");
    let got = s.dest.wait_for(1, Duration::from_secs(20));
    let marked = text(&got[0]);
    assert!(marked.starts_with("X-Mxrelay-Scan: not scanned (clamd: unreachable: clamd at "), "{marked}");
}

#[test]
fn messages_over_the_scan_size_limit_are_accepted_unscanned_with_a_header() {
    let clamd = ClamdServer::start();
    let s = Setup::start(&[("MXRELAY_SCAN_CLAMD", clamd.addr()), ("MXRELAY_SCAN_MAX_SIZE", "4096".into())]);
    let big = format!("{EICAR}\n{}", "0123456789abcdef\n".repeat(1000));
    let (status, out) = s.send(&[&format!("big@{SCANNED}")], &big);
    assert_eq!(status, 0, "{out}");
    let got = s.dest.wait_for(1, Duration::from_secs(20));
    let delivered = text(&got[0]);
    // The queued size counts the header the node added: delivery reads it all.
    assert_eq!(queued_size(&s.relay, &queued_id(&out).unwrap()), got[0].data.len());
    assert!(
        delivered
            .starts_with("X-Mxrelay-Scan: not scanned (message over scan.max_size) by node test-node\r\nReceived: "),
        "{delivered}"
    );
    assert_eq!(delivered.matches("0123456789abcdef\r\n").count(), 1000, "content lost in the switch to the spool");
    assert_eq!(delivered.matches("Received: from client.example").count(), 1);
    wait_until("scan buffers removed", Duration::from_secs(10), || s.scan_dir_is_empty());
}

#[test]
fn rspamd_actions_below_reject_mark_tag_or_defer() {
    // Thresholds so low that every message reaches the action under test.
    let rewrite = RspamdServer::start_with(&[(
        "actions.conf",
        "reject = 50; rewrite_subject = -100; greylist = null; add_header = null;",
    )]);
    let s = Setup::start(&[("MXRELAY_SCAN_RSPAMD", rewrite.url())]);
    let (status, out) = swaks(
        &s.relay.addr(),
        &[
            "--from",
            SENDER,
            "--to",
            &format!("r@{SCANNED}"),
            "--ehlo",
            "client.example",
            "--header",
            "Subject: cheap watches",
            "--body",
            "hello\n",
        ],
    );
    assert_eq!(status, 0, "{out}");
    let got = s.dest.wait_for(1, Duration::from_secs(20));
    let tagged = text(&got[0]);
    assert_eq!(queued_size(&s.relay, &queued_id(&out).unwrap()), got[0].data.len(), "size after the rewrite");
    let headers = tagged.split("\r\n\r\n").next().unwrap();
    assert!(headers.contains("X-Spam-Status: Yes, score="), "{headers}");
    assert!(headers.contains("X-Spam-Flag: YES"), "{headers}");
    // rspamd's own subject template (`*** SPAM *** %s`), as it answered.
    assert!(headers.contains("\r\nSubject: *** SPAM *** cheap watches\r\n"), "{headers}");
    assert_eq!(headers.matches("Subject:").count(), 1, "{headers}");
    drop(s);

    let greylist = RspamdServer::start_with(&[(
        "actions.conf",
        "reject = 50; greylist = -100; add_header = null; rewrite_subject = null;",
    )]);
    let s = Setup::start(&[("MXRELAY_SCAN_RSPAMD", greylist.url())]);
    let (status, out) = s.send(&[&format!("g@{SCANNED}")], "hello\n");
    assert_ne!(status, 0);
    assert!(out.contains("451 4.7.1 Error: message deferred by the spam filter, try again later"), "{out}");
}

#[test]
fn clamd_over_a_unix_socket() {
    let sockets = tempfile::tempdir().unwrap();
    let socket = sockets.path().join("clamd.sock");
    let clamd = ClamdServer::start_with(&[&format!("LocalSocket {}", socket.display())]);
    wait_until("clamd's unix socket", Duration::from_secs(10), || socket.exists());
    // memory_limit 0: the message waits in a file, read from there for clamd.
    let s = Setup::start(&[
        ("MXRELAY_SCAN_CLAMD", format!("unix:{}", socket.display())),
        ("MXRELAY_SCAN_MEMORY_LIMIT", "0".into()),
    ]);
    let (status, out) = s.send(&[&format!("u@{SCANNED}")], &format!("{EICAR}\n"));
    assert_ne!(status, 0);
    assert!(out.contains(&format!("virus found: {EICAR_FOUND}")), "{out}");
    drop(clamd);
}

/// A port that accepts connections and then answers `answer` after reading
/// whatever comes (None: never answers): a broken scanner, for the cases a
/// real daemon cannot be made to show.
fn broken_scanner(answer: Option<&'static [u8]>) -> (String, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handle = std::thread::spawn(move || {
        listener.set_nonblocking(false).unwrap();
        let started = std::time::Instant::now();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            stream.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            let mut buf = [0u8; 65536];
            while let Ok(n) = std::io::Read::read(&mut stream, &mut buf) {
                if n == 0 {
                    break;
                }
            }
            match answer {
                Some(a) => {
                    let _ = std::io::Write::write_all(&mut stream, a);
                }
                None => std::thread::sleep(Duration::from_secs(5)),
            }
            if started.elapsed() > Duration::from_secs(30) {
                return;
            }
        }
    });
    (addr, handle)
}

#[test]
fn slow_or_garbled_scanners_tempfail_and_never_pass_silently() {
    // clamd that answers nonsense.
    let (garbage, _g) = broken_scanner(Some(b"I am not clamd\0"));
    let s = Setup::start(&[("MXRELAY_SCAN_CLAMD", garbage)]);
    let (status, out) = s.send(&[&format!("x@{SCANNED}")], "hello\n");
    assert_ne!(status, 0);
    assert!(out.contains("451 4.7.1 Error: message could not be scanned"), "{out}");
    assert!(s.relay.log().contains("bad answer: clamd answered"), "{}", s.relay.log());
    drop(s);

    // rspamd that answers HTTP with something that is not its JSON.
    let (html, _h) = broken_scanner(Some(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\n<html>"));
    let s = Setup::start(&[("MXRELAY_SCAN_RSPAMD", format!("http://{html}"))]);
    let (status, out) = s.send(&[&format!("y@{SCANNED}")], "hello\n");
    assert_ne!(status, 0);
    assert!(out.contains("451 4.7.1"), "{out}");
    drop(s);

    // A scanner that never answers: cut at scan.timeout.
    let (silent, _s) = broken_scanner(None);
    let s = Setup::start(&[("MXRELAY_SCAN_CLAMD", silent), ("MXRELAY_SCAN_TIMEOUT", "1s".into())]);
    let started = std::time::Instant::now();
    let (status, out) = s.send(&[&format!("z@{SCANNED}")], "hello\n");
    assert_ne!(status, 0);
    assert!(out.contains("451 4.7.1"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(10), "scan.timeout not applied");
    assert!(s.relay.log().contains("timed out: clamd"), "{}", s.relay.log());
    assert_eq!(s.dest.connections(), 0, "nothing may be delivered");
}

/// rspamd's `soft reject` (threshold so low every message reaches it):
/// `451 4.7.1` while the sender is connected, nothing delivered.
#[test]
fn rspamd_soft_reject_is_a_451() {
    let rspamd = RspamdServer::start_with(&[(
        "actions.conf",
        "reject = 50; soft_reject = -100; greylist = null; add_header = null; rewrite_subject = null;",
    )]);
    let s = Setup::start(&[("MXRELAY_SCAN_RSPAMD", rspamd.url())]);
    let (status, out) = s.send(&[&format!("s@{SCANNED}")], "hello\n");
    assert_ne!(status, 0);
    assert!(out.contains("451 4.7.1 Error: message deferred by the spam filter, try again later"), "{out}");
    assert_eq!(s.relay.value("mxrelay_scan_total{result=\"soft_reject\",scanner=\"rspamd\"}"), 1.0);
    // An unscanned domain is not asked about.
    let (status, out) = s.send(&[&format!("p@{PLAIN}")], "hello\n");
    assert_eq!(status, 0, "{out}");
    let got = s.dest.wait_for(1, Duration::from_secs(20));
    assert_eq!(got[0].rcpts, vec![format!("p@{PLAIN}")], "the soft-rejected message was delivered");
}

/// rspamd's `add header`: accepted and delivered with the spam headers
/// (`X-Spam-Status: Yes`, `X-Spam-Score`, `X-Spam-Flag: YES`), the subject
/// left alone.
#[test]
fn rspamd_add_header_marks_the_delivered_message() {
    let rspamd = RspamdServer::start_with(&[(
        "actions.conf",
        "reject = 50; add_header = -100; greylist = null; rewrite_subject = null;",
    )]);
    // memory_limit 0: rspamd is sent the file, which then goes to the queue.
    let s = Setup::start(&[("MXRELAY_SCAN_RSPAMD", rspamd.url()), ("MXRELAY_SCAN_MEMORY_LIMIT", "0".into())]);
    let (status, out) = swaks(
        &s.relay.addr(),
        &[
            "--from",
            SENDER,
            "--to",
            &format!("a@{SCANNED}"),
            "--ehlo",
            "client.example",
            "--header",
            "Subject: quarterly report",
            "--body",
            "hello\n",
        ],
    );
    assert_eq!(status, 0, "{out}");
    let got = s.dest.wait_for(1, Duration::from_secs(20));
    let delivered = text(&got[0]);
    let headers = delivered.split("\r\n\r\n").next().unwrap();
    assert!(headers.starts_with("X-Mxrelay-Scan: rspamd: add header by node test-node\r\n"), "{headers}");
    let status_line = headers.lines().find(|l| l.starts_with("X-Spam-Status: ")).unwrap_or_else(|| panic!("{headers}"));
    assert!(status_line.starts_with("X-Spam-Status: Yes, score="), "{headers}");
    let score: f64 = headers
        .lines()
        .find_map(|l| l.strip_prefix("X-Spam-Score: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no numeric X-Spam-Score: {headers}"));
    assert!(status_line.contains(&format!("score={score:.2} ")), "score differs between the headers: {headers}");
    assert!(headers.contains("\r\nX-Spam-Flag: YES\r\n"), "{headers}");
    assert!(headers.contains("\r\nSubject: quarterly report\r\n"), "{headers}");
    assert_eq!(queued_size(&s.relay, &queued_id(&out).unwrap()), got[0].data.len());
    assert_eq!(s.relay.value("mxrelay_scan_total{result=\"add_header\",scanner=\"rspamd\"}"), 1.0);
}

/// rspamd down with `scan.on_failure = accept`: scanned while it runs,
/// then accepted and delivered marked as not scanned once it is killed.
#[test]
fn rspamd_down_with_on_failure_accept_still_accepts() {
    let mut rspamd = RspamdServer::start();
    let s = Setup::start(&[("MXRELAY_SCAN_RSPAMD", rspamd.url()), ("MXRELAY_SCAN_ON_FAILURE", "accept".into())]);
    let (status, out) = s.send(&[&format!("up@{SCANNED}")], "Hello,\n\nthe meeting is at ten tomorrow.\n\nBob\n");
    assert_eq!(status, 0, "{out}");
    let got = s.dest.wait_for(1, Duration::from_secs(20));
    assert!(text(&got[0]).starts_with("X-Mxrelay-Scan: rspamd: no action by node test-node\r\n"), "{}", text(&got[0]));

    rspamd.stop();
    let (status, out) = s.send(&[&format!("down@{SCANNED}")], &format!("Buy now\n{GTUBE}\n"));
    assert_eq!(status, 0, "rspamd down with on_failure = accept: {out}");
    let got = s.dest.wait_for(2, Duration::from_secs(20));
    let marked = text(&got[1]);
    assert_eq!(got[1].rcpts, vec![format!("down@{SCANNED}")]);
    assert!(marked.starts_with("X-Mxrelay-Scan: not scanned (rspamd: "), "{marked}");
    assert!(marked.lines().next().unwrap().ends_with(" by node test-node"), "{marked}");
    assert!(!marked.contains("X-Spam-"), "spam headers without a scan: {marked}");
    assert!(s.relay.value("mxrelay_scan_errors_total{scanner=\"rspamd\"}") >= 1.0);
}
