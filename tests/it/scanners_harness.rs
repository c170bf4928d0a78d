//! The scanner test harness itself: the private clamd and rspamd of
//! `crate::support::scanners` start, find what they must (EICAR and a hashed file;
//! GTUBE), pass clean mail, and go away and come back on `stop`/`resume`.
//! Raw protocols only: clamd's INSTREAM over TCP, rspamd's HTTP /checkv2.

use std::net::TcpStream;
use std::time::Instant;

use crate::support::scanners::*;

fn mail(subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: sender@sender.example\r\nTo: rcpt@friet.pan\r\nSubject: {subject}\r\n\
         Date: Wed, 25 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{subject}.1@sender.example>\r\n\r\n{body}"
    )
    .into_bytes()
}

const CLEAN_BODY: &str = "Hello,\r\n\r\nthe meeting is at ten tomorrow, in the small room.\r\n\r\nSee you there.\r\n";

/// A multipart message with `content` as a base64 attachment.
fn with_attachment(subject: &str, name: &str, content: &[u8]) -> Vec<u8> {
    let b64 = base64(content);
    let body = format!(
        "--b1\r\nContent-Type: text/plain\r\n\r\nSee the attachment.\r\n\
         --b1\r\nContent-Type: application/octet-stream; name=\"{name}\"\r\n\
         Content-Disposition: attachment; filename=\"{name}\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{b64}\r\n--b1--\r\n"
    );
    format!(
        "From: sender@sender.example\r\nTo: rcpt@friet.pan\r\nSubject: {subject}\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n{body}"
    )
    .into_bytes()
}

fn base64(data: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn eicar_is_68_bytes() {
    assert_eq!(EICAR.len(), 68);
    assert!(EICAR.starts_with(r"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR") && EICAR.ends_with("$H+H*"));
}

#[test]
fn clamd_finds_eicar_in_a_mail_body_and_passes_clean_mail() {
    let t = Instant::now();
    let clamd = ClamdServer::start();
    eprintln!("clamd answered PING {:?} after start", t.elapsed());
    let addr = clamd.addr();
    assert_eq!(clamd_command(&addr, "PING").unwrap(), "PONG");
    assert!(clamd_command(&addr, "VERSION").unwrap().starts_with("ClamAV "));

    let eicar_found = format!("stream: {EICAR_FOUND} FOUND");
    assert_eq!(eicar_found, "stream: Eicar-Test-Signature.UNOFFICIAL FOUND");
    let infected = mail("eicar", &format!("The anti-virus test string follows.\r\n{EICAR}\r\nThat was it.\r\n"));
    let reply = clamd_instream(&addr, &infected, 64 * 1024).unwrap();
    eprintln!("EICAR in a body: {reply}");
    assert_eq!(reply, eicar_found);
    // Many small chunks: the signature spans chunk boundaries.
    assert_eq!(clamd_instream(&addr, &infected, 5).unwrap(), eicar_found);
    // The bare string and a base64 attachment.
    assert_eq!(clamd_instream(&addr, EICAR.as_bytes(), 1024).unwrap(), eicar_found);
    assert_eq!(clamd.scan(&with_attachment("eicar-attached", "eicar.com", EICAR.as_bytes())), eicar_found);

    let clean = mail("clean", CLEAN_BODY);
    let t = Instant::now();
    let reply = clamd_instream(&addr, &clean, 64 * 1024).unwrap();
    eprintln!("clean mail: {reply} in {:?}", t.elapsed());
    assert_eq!(reply, "stream: OK");
    assert_eq!(clamd.scan(b""), "stream: OK");

    // The sigtool hash signature: the file itself and as an attachment.
    let file_found = format!("stream: {TEST_FILE_FOUND} FOUND");
    assert_eq!(clamd.scan(TEST_FILE), file_found);
    assert_eq!(clamd.scan(&with_attachment("file-attached", "test.bin", TEST_FILE)), file_found);
    // One byte more is another file.
    let mut other = TEST_FILE.to_vec();
    other.push(b'x');
    assert_eq!(clamd.scan(&other), "stream: OK");
    assert!(clamd.log().contains("Loaded 2 signatures"), "{}", clamd.log());
}

#[test]
fn clamd_stop_refuses_and_resume_answers_on_the_same_port() {
    let mut clamd = ClamdServer::start();
    let port = clamd.port;
    clamd.stop();
    assert!(TcpStream::connect(clamd.addr()).is_err(), "clamd still listens after stop");
    assert!(clamd_command(&clamd.addr(), "PING").is_err());
    let t = Instant::now();
    clamd.resume();
    eprintln!("clamd resumed in {:?}", t.elapsed());
    assert_eq!(clamd.port, port);
    assert_eq!(clamd_command(&clamd.addr(), "PING").unwrap(), "PONG");
    assert_eq!(clamd.scan(EICAR.as_bytes()), format!("stream: {EICAR_FOUND} FOUND"));
}

fn action(reply: &serde_json::Value) -> &str {
    reply["action"].as_str().unwrap_or_default()
}

#[test]
fn rspamd_rejects_gtube_and_passes_clean_mail() {
    let t = Instant::now();
    let rspamd = RspamdServer::start();
    eprintln!("rspamd answered /ping {:?} after start", t.elapsed());
    assert!(rspamd.url().starts_with("http://127.0.0.1:"));

    // What a relay passes along with the message.
    let envelope = [
        ("IP", "127.0.0.1"),
        ("Helo", "client.example"),
        ("From", "sender@sender.example"),
        ("Rcpt", "rcpt@friet.pan"),
    ];

    // How long a scan takes is measured by scripts/bench-scan.sh
    // (docs/BENCHMARKS.md), not asserted here.
    let clean = mail("clean", CLEAN_BODY);
    let reply = rspamd.checkv2(&clean, &envelope);
    assert_eq!(action(&reply), "no action", "clean mail: {reply}");
    eprintln!("clean mail: score {}", reply["score"]);
    for headers in [&envelope[..], &[], &[("IP", "192.0.2.10"), ("From", "sender@sender.example")]] {
        for _ in 0..3 {
            let reply = rspamd.checkv2(&clean, headers);
            assert_eq!(action(&reply), "no action", "clean mail with {headers:?}: {reply}");
        }
    }

    let spam =
        mail("gtube", &format!("This is the GTUBE, the generic test for unsolicited bulk e-mail:\r\n{GTUBE}\r\n"));
    let reply = rspamd.checkv2(&spam, &envelope);
    eprintln!("GTUBE: {reply}");
    assert_eq!(action(&reply), "reject", "GTUBE: {reply}");
    assert!(reply["symbols"].get("GTUBE").is_some(), "GTUBE: {reply}");
    assert_eq!(action(&rspamd.checkv2(&spam, &[])), "reject");
}

#[test]
fn rspamd_stop_refuses_and_resume_answers_on_the_same_port() {
    // With a local.d file of the test's own: the reject threshold.
    let mut rspamd = RspamdServer::start_with(&[("actions.conf", "reject = 9;\n")]);
    let reply = rspamd.checkv2(&mail("clean", CLEAN_BODY), &[]);
    assert_eq!(reply["required_score"].as_f64(), Some(9.0), "{reply}");
    let port = rspamd.port;
    rspamd.stop();
    assert!(TcpStream::connect(rspamd.addr()).is_err(), "rspamd still listens after stop");
    let t = Instant::now();
    rspamd.resume();
    eprintln!("rspamd resumed in {:?}", t.elapsed());
    assert_eq!(rspamd.port, port);
    let spam = mail("gtube", &format!("{GTUBE}\r\n"));
    let reply = rspamd.checkv2(&spam, &[]);
    assert_eq!(action(&reply), "reject", "GTUBE after resume: {reply}");
}
