//! Load and size: Postfix's `smtp-source` with 20 concurrent sessions and
//! 10,000 messages (every 250 is in Redis, none twice), and one 200 MB
//! message queued whole. Speed and memory are printed, not asserted:
//! `scripts/bench.sh` measures them on the release build (the peak RSS of
//! the 200 MB message included).

use std::collections::HashSet;
use std::process::Command;
use std::time::Instant;

use crate::support::*;

#[test]
fn smtp_source_20_sessions_10000_messages_all_queued_once() {
    // A Redis of its own: 10,000 messages in the shared one would slow
    // every other test's KEYS.
    let redis = RedisServer::start();
    let w = World::start_on(&redis.url(), &[]);
    let started = Instant::now();
    let out = Command::new("/usr/sbin/smtp-source")
        .args(["-s", "20", "-m", "10000", "-l", "1024", "-M", "client.example"])
        .args(["-f", SENDER, "-t", "load@friet.pan"])
        .arg(w.relay.addr())
        .output()
        .expect("smtp-source (scripts/test.sh installs postfix)");
    let secs = started.elapsed().as_secs_f64();
    assert!(out.status.success(), "smtp-source failed: {}", String::from_utf8_lossy(&out.stderr));
    let mut q = w.queue();
    let ids = q.ready_ids();
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(ids.len(), 10_000, "every message answered 250 is in the queue");
    assert_eq!(unique.len(), ids.len(), "no message is queued twice");
    let accepted = w.relay.log().matches("(queue active)").count();
    assert_eq!(accepted, 10_000);
    eprintln!(
        "smtp-source: 10000 msgs x 1 KiB, 20 sessions: {secs:.2}s = {:.0} msgs/s accepted (debug build)",
        10_000.0 / secs
    );
}

/// Peak resident memory of a process, in KiB (VmHWM).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_200_mb_message_is_queued_whole() {
    let redis = RedisServer::start();
    let w = World::start_on(&redis.url(), &[("MXRELAY_MESSAGE_SIZE_LIMIT", "524288000")]);
    let before = peak_rss_kib(w.relay.pid());
    let mut c = Raw::ehlo(&w.relay.addr());
    assert!(c.cmd(&format!("MAIL FROM:<{SENDER}> SIZE=210000000")).starts_with("250"));
    assert!(c.cmd("RCPT TO:<big@friet.pan>").starts_with("250"));
    assert_eq!(c.code_after("DATA"), 354);
    c.send("Subject: big\r\n\r\n");
    let line = format!("{}\r\n", "0123456789".repeat(10));
    let block = line.repeat(10_000); // ~1 MB
    for _ in 0..200 {
        c.send(&block);
    }
    c.send(".\r\n");
    let r = c.reply();
    assert!(r.starts_with("250 2.0.0 Ok: queued as"), "{r}");
    let id = queued_id(&r).unwrap();
    let peak = peak_rss_kib(w.relay.pid());
    let mut q = w.queue();
    let size: usize = q.envelope(&id)["size"].parse().unwrap();
    assert_eq!(q.body(&id).len(), size);
    let received = size - 200 * block.len() - "Subject: big\r\n\r\n".len();
    assert!((100..1000).contains(&received), "{size} bytes stored: more or less than our Received: and the message");
    eprintln!(
        "200 MB message: peak RSS {} MiB (before: {} MiB; measured by scripts/bench.sh)",
        peak / 1024,
        before / 1024
    );
}
