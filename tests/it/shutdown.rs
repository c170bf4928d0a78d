//! The one stop path with real clients in mid-session, against the binary
//! (the signal is the input): swaks sending a message whose body is held
//! half-way when SIGTERM arrives, and Postfix's smtp-source with many
//! sessions in flight. Every message answered 250 is queued, a session
//! waiting for a command is told 421, and the node exits 0 after logging
//! "stopped" (the refresher after the sessions).

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::support::in_process::InProcessWorld;
use crate::support::*;

/// A TCP forwarder for one client connection that holds back what the
/// client sends after `marker` until released: the client (swaks) is
/// really mid-DATA, with half of its body sent, for as long as the test
/// needs.
struct Gate {
    addr: String,
    held: mpsc::Receiver<()>,
    release: mpsc::Sender<()>,
}

impl Gate {
    fn start(upstream: String, marker: &'static [u8]) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (held_tx, held) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            let (mut client, _) = listener.accept().unwrap();
            let mut server = TcpStream::connect(&upstream).unwrap();
            let (mut client_r, mut server_w) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut server, &mut client);
                let _ = client.shutdown(std::net::Shutdown::Write);
            });
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            let mut holding = true;
            loop {
                let n = match client_r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut chunk = &buf[..n];
                if holding {
                    seen.extend_from_slice(chunk);
                    if let Some(at) = seen.windows(marker.len()).position(|w| w == marker) {
                        let end = at + marker.len();
                        let before = seen.len() - n;
                        let cut = end.saturating_sub(before).min(n);
                        if server_w.write_all(&chunk[..cut]).is_err() {
                            break;
                        }
                        chunk = &chunk[cut..];
                        holding = false;
                        let _ = held_tx.send(());
                        let _ = release_rx.recv();
                    }
                }
                if server_w.write_all(chunk).is_err() {
                    break;
                }
            }
            let _ = server_w.shutdown(std::net::Shutdown::Write);
        });
        Gate { addr, held, release }
    }
}

/// Waits until new connections to `addr` are refused (the listener closed).
fn wait_refused(addr: &str) {
    wait_until("new connections refused", Duration::from_secs(10), || match TcpStream::connect(addr) {
        Ok(_) => false,
        // A connection the kernel completed while the listener closed.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => false,
        Err(e) => {
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
            true
        }
    });
}

#[test]
fn swaks_half_way_through_data_at_sigterm_gets_250_and_quits_and_the_node_exits_0() {
    let mut w = World::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("msg.eml");
    // swaks ends the data with CRLF.CRLF itself.
    std::fs::write(&data, "Subject: slow\r\n\r\nfirst half\r\nsecond half").unwrap();
    let gate = Gate::start(w.relay.addr(), b"first half\r\n");
    let swaks = Command::new("swaks")
        .args(["--server", &gate.addr, "--timeout", "30"])
        .args(["--from", SENDER, "--to", "slow@friet.pan", "--helo", "client.example"])
        .arg("--data")
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("swaks (scripts/test.sh installs it)");
    gate.held.recv_timeout(Duration::from_secs(20)).expect("swaks sent the first half of its body");
    w.relay.signal("TERM");
    wait_refused(&w.relay.addr());
    assert!(w.relay.http_get("/readyz").starts_with("HTTP/1.1 503"), "/readyz fails while draining");
    assert_eq!(w.relay.wait_exit(Duration::ZERO), None, "exited with a message half received");
    gate.release.send(()).unwrap();
    let out = swaks.wait_with_output().unwrap();
    let transcript = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let id = queued_id(&transcript).unwrap_or_else(|| panic!("no 250 for the message: {transcript}"));
    // A client that goes on talking is served to its QUIT.
    assert!(transcript.contains("<-  221 2.0.0 Bye"), "{transcript}");
    let status = w.relay.wait_exit(Duration::from_secs(20)).expect("the node exits once the session is done");
    assert_eq!(status.code(), Some(0), "{status}");
    let mut q = w.queue();
    assert_eq!(q.ready_ids(), vec![id.clone()]);
    let body = String::from_utf8(q.body(&id)).unwrap();
    assert!(body.ends_with("\r\n\r\nfirst half\r\nsecond half\r\n"), "{body:?}");
    let log = w.relay.log();
    let order = ["stopping: no new connections", "stopping: every session ended", "domains: refresher stopped"];
    let at: Vec<usize> = order.iter().map(|m| log.find(m).unwrap_or_else(|| panic!("no {m:?} in\n{log}"))).collect();
    assert!(at.windows(2).all(|p| p[0] < p[1]), "stopped out of order:\n{log}");
    assert!(log.trim_end().ends_with("stopped"), "{log}");
}

#[test]
fn smtp_source_sessions_in_flight_at_sigterm_are_queued_or_told_421_and_none_is_lost() {
    let mut w = World::start();
    // Files, not pipes: its counter must never block on a full pipe.
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
    let mut source = Command::new("/usr/sbin/smtp-source")
        .args(["-c", "-s", "20", "-m", "100000", "-l", "20000", "-M", "client.example"])
        .args(["-f", SENDER, "-t", "load@friet.pan"])
        .arg(w.relay.addr())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("smtp-source (scripts/test.sh installs postfix)");
    // Under load: many messages queued, the 20 sessions busy.
    wait_until("50 messages queued", Duration::from_secs(60), || w.relay.log().matches("(queue active)").count() >= 50);
    w.relay.signal("TERM");
    let status = w.relay.wait_exit(Duration::from_secs(60)).expect("the node exits after draining");
    assert_eq!(status.code(), Some(0), "{status}");
    let finished = wait_until_value("smtp-source ends", Duration::from_secs(30), || source.try_wait().unwrap());
    let out = std::fs::read_to_string(&out_path).unwrap();
    let err = std::fs::read_to_string(&err_path).unwrap();
    assert!(!finished.success(), "smtp-source cannot have sent 100000 messages: {out}");
    // The client's last count of DATA answered 2xx.
    let counted: usize = out.split(['\r', '\n']).filter_map(|s| s.trim().parse().ok()).max().unwrap_or(0);
    let log = w.relay.log();
    let accepted = log.matches("(queue active)").count();
    let ids = w.queue().ready_ids();
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "no message is queued twice");
    assert_eq!(ids.len(), accepted, "every message answered 250 is in the queue");
    assert!(counted <= accepted, "smtp-source counted {counted} messages, the node accepted {accepted}");
    // smtp-source stops at its first failure: a session (or a connection
    // from the listener's backlog) told 421, or a new connection refused by
    // the closed listener. The one other: a connection the kernel completed
    // in the instant between the node's last look at the backlog and the
    // close, which the close resets before any greeting. Never a loss in a
    // session.
    let fatal: Vec<&str> = err.lines().filter(|l| l.contains("fatal:")).collect();
    assert_eq!(fatal.len(), 1, "{err}");
    assert!(
        fatal[0].ends_with("421 4.3.0 relay.test Service shutting down")
            || fatal[0].ends_with("connect: Connection refused")
            || fatal[0].ends_with("lost connection while reading server greeting"),
        "{err}"
    );
    assert!(log.trim_end().ends_with("stopped"), "{log}");
    eprintln!("drain under load: {accepted} queued, smtp-source counted {counted}; smtp-source said:\n{err}");
}

/// `Node::run` in process: the same stop path without a signal, each part
/// ending after the one it serves (sessions, then delivery, then the
/// refresher), and the admin listener closed when it returns.
#[test]
fn an_in_process_node_stops_in_order_and_closes_every_listener() {
    let mut w = InProcessWorld::start_with(&[("MXRELAY_DELIVERY_ENABLED", "true")]);
    let (smtp, admin) = (w.relay.smtp, w.relay.admin);
    let mut idle = Raw::ehlo(&w.relay.addr());
    assert!(w.relay.http_get("/readyz").starts_with("HTTP/1.1 200"));
    w.relay.stop().expect("run returns Ok");
    let told = idle.reply();
    assert!(told.starts_with("421 4.3.0 relay.test Service shutting down"), "{told}");
    assert!(idle.closed());
    for addr in [smtp, admin] {
        let e = TcpStream::connect(addr).expect_err("nothing listens after run returned");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{addr}: {e}");
    }
    let log = w.relay.log();
    let order = [
        "stopping: no new connections",
        "stopping: every session ended",
        "stopping: delivery stopped",
        "domains: refresher stopped",
    ];
    let at: Vec<usize> = order.iter().map(|m| log.find(m).unwrap_or_else(|| panic!("no {m:?} in\n{log}"))).collect();
    assert!(at.windows(2).all(|p| p[0] < p[1]), "stopped out of order:\n{log}");
    assert!(log.trim_end().ends_with("stopped"), "{log}");
}
