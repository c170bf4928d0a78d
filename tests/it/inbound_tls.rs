//! Inbound TLS and SMTP AUTH against a node with a test certificate:
//! swaks `--tls`, `openssl s_client`, a rustls client for the STARTTLS
//! injection attempt, AUTH PLAIN/LOGIN against `relay_users`, the
//! implicit-TLS listener, `tls.security_level = encrypt`, and a certificate
//! swapped on SIGHUP. The session tests run on an in-process node with the
//! embedded stores; those that read `relay_users` in MariaDB, stop it, or
//! send SIGHUP run the binary on MariaDB and Redis.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::in_process::InProcessWorld;
use crate::support::pki::{TestPki, TlsClient};
use crate::support::*;

fn tls_env(pki: &TestPki) -> Vec<(&'static str, String)> {
    vec![
        ("MXRELAY_TLS_CERT", pki.cert.display().to_string()),
        ("MXRELAY_TLS_KEY", pki.key.display().to_string()),
        ("MXRELAY_AUTH_ENABLED", "true".into()),
    ]
}

fn world(pki: &TestPki, extra: &[(&'static str, String)]) -> World {
    let mut env = tls_env(pki);
    env.extend(extra.iter().cloned());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    World::start_with(&env)
}

/// As [`world`], on an in-process node with the embedded stores.
fn local_world(pki: &TestPki, extra: &[(&'static str, String)]) -> InProcessWorld {
    let mut env = tls_env(pki);
    env.extend(extra.iter().cloned());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    InProcessWorld::start_with(&env)
}

/// `mxrelay users …` against the in-process world's embedded store.
fn local_users(w: &InProcessWorld, args: &[&str], stdin: &str) -> (bool, String) {
    users_at(&w.url, args, stdin)
}

/// `mxrelay users …` against the world's database; `stdin` is piped in.
fn users(w: &World, args: &[&str], stdin: &str) -> (bool, String) {
    users_at(&w.db.url(), args, stdin)
}

/// `openssl s_client` with `args`, sending `input`; returns its output
/// once the server closed the connection (input ending in QUIT) or
/// s_client gave up (a failed verification). `-ign_eof`: s_client keeps
/// reading replies after our input ends, however long they take. On the
/// implicit-TLS port the input waits for the greeting (a client that talks
/// first is refused); with `-starttls`, s_client reads it only once TLS is
/// up, after its own EHLO exchange.
fn s_client(args: &[&str], input: &str) -> String {
    let mut child = Command::new("openssl")
        .arg("s_client")
        .arg("-ign_eof")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl (scripts/test.sh installs it)");
    let output = Arc::new(Mutex::new(Vec::new()));
    let readers: Vec<_> =
        [Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>, Box::new(child.stderr.take().unwrap())]
            .into_iter()
            .map(|mut pipe| {
                let output = output.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = pipe.read(&mut buf) {
                        output.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                })
            })
            .collect();
    let text = || String::from_utf8_lossy(&output.lock().unwrap()).into_owned();
    let mut stdin = child.stdin.take().unwrap();
    if !args.contains(&"-starttls") {
        wait_until("the greeting, or s_client giving up", Duration::from_secs(20), || {
            text().contains("220 ") || child.try_wait().ok().flatten().is_some()
        });
    }
    // s_client may already have given up (a failed verification).
    let _ = stdin.write_all(input.as_bytes());
    drop(stdin);
    wait_until("s_client to finish", Duration::from_secs(30), || child.try_wait().ok().flatten().is_some());
    readers.into_iter().for_each(|r| r.join().unwrap());
    text()
}

#[test]
fn starttls_with_swaks_and_openssl_records_tls_in_received_and_log() {
    let pki = TestPki::localhost();
    let w = local_world(&pki, &[]);
    let addr = w.relay.addr();

    // Before TLS: STARTTLS offered, AUTH not (auth.tls_only).
    let mut c = Raw::connect(&addr);
    c.code();
    let ehlo = c.cmd("EHLO client.example");
    assert!(ehlo.contains("250-STARTTLS"), "{ehlo}");
    assert!(!ehlo.contains("AUTH"), "AUTH offered in clear: {ehlo}");

    let (status, out) = swaks(&addr, &["--tls", "--from", SENDER, "--to", "tls@friet.pan", "--ehlo", "client.example"]);
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("TLS started"), "{out}");
    let id = queued_id(&out).expect("queued");
    let body = String::from_utf8(w.queue().body(&id)).unwrap();
    let received = body.split("\r\n\r\n").next().unwrap();
    assert!(received.contains("(using TLSv1.3 with cipher TLS13_"), "{received}");
    assert!(received.contains("with ESMTPS id"), "{received}");

    let out = s_client(
        &[
            "-starttls",
            "smtp",
            "-connect",
            &addr,
            "-CAfile",
            pki.ca.to_str().unwrap(),
            "-verify_return_error",
            "-servername",
            "localhost",
        ],
        "EHLO client.example\r\nQUIT\r\n",
    );
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(out.contains("250-AUTH PLAIN LOGIN"), "AUTH must be offered inside TLS: {out}");
    assert!(!out.contains("250-STARTTLS"), "STARTTLS offered again inside TLS: {out}");
    assert!(out.contains("221 2.0.0 Bye"), "{out}");

    let log = w.relay.log();
    assert!(log.contains("TLS connection established from unknown[127.0.0.1]: TLSv1.3 with cipher"), "{log}");
    assert!(w.relay.value("mxrelay_smtp_tls_handshakes_total{result=\"ok\"}") >= 2.0);
}

#[test]
fn commands_pipelined_after_starttls_are_discarded() {
    let pki = TestPki::localhost();
    let w = local_world(&pki, &[]);
    let mut c = Raw::ehlo(&w.relay.addr());
    // CVE-2011-0411: the injected MAIL travels in clear behind STARTTLS.
    c.send("STARTTLS\r\nMAIL FROM:<evil@sender.example>\r\n");
    assert!(c.reply().starts_with("220 2.0.0"));
    let mut t = TlsClient::handshake(c.into_tcp(), &pki, "localhost").expect("handshake");
    // The session starts over: EHLO first, and no transaction exists.
    assert!(t.cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("503 5.5.1"), "HELO state survived STARTTLS");
    assert!(t.cmd("EHLO client.example").starts_with("250"));
    let r = t.cmd("RCPT TO:<t@friet.pan>");
    assert!(r.starts_with("503 5.5.1"), "the injected MAIL was executed: {r}");
    assert!(t.cmd("STARTTLS").starts_with("554 5.5.1"));
    assert!(w.relay.log().contains("input pipelined after STARTTLS discarded"));
}

#[test]
fn auth_plain_and_login_let_a_user_relay_and_nobody_else() {
    let pki = TestPki::localhost();
    let w = world(&pki, &[]);
    let addr = w.relay.addr();
    let (ok, out) = users(&w, &["add", "alice@sender.example"], "correct horse\n");
    assert!(ok, "{out}");
    let (ok, out) = users(&w, &["add", "alice@sender.example"], "again\n");
    assert!(!ok && out.contains("already exists"), "{out}");
    let (ok, out) = users(&w, &["list"], "");
    assert!(ok && out.contains("alice@sender.example"), "{out}");
    let stored = w.db.exec("SELECT password_hash FROM relay_users");
    assert!(stored.contains("$argon2id$") && !stored.contains("correct horse"), "{stored}");

    // AUTH before TLS is refused outright.
    let mut c = Raw::ehlo(&addr);
    assert!(c.cmd("AUTH PLAIN AGFsaWNlAHB3").starts_with("538 5.7.11"));

    let unlisted = ["--from", SENDER, "--to", "someone@other.example", "--ehlo", "client.example"];
    // Unauthenticated: no relaying to a domain that is not listed.
    let (status, out) = swaks(&addr, &[&["--tls"][..], &unlisted[..]].concat());
    assert_ne!(status, 0);
    assert!(out.contains("454 4.7.1"), "{out}");

    for mech in ["PLAIN", "LOGIN"] {
        let auth = ["--auth", mech, "--auth-user", "alice@sender.example", "--auth-password", "correct horse"];
        let (status, out) = swaks(&addr, &[&["--tls"][..], &auth[..], &unlisted[..]].concat());
        assert_eq!(status, 0, "{mech}: {out}");
        assert!(out.contains("235 2.7.0 Authentication successful"), "{out}");
        let id = queued_id(&out).expect("queued");
        let body = String::from_utf8(w.queue().body(&id)).unwrap();
        assert!(body.contains("with ESMTPSA id"), "{body}");
    }

    // Wrong password and unknown user look the same.
    for user in ["alice@sender.example", "mallory@sender.example"] {
        let auth = ["--auth", "PLAIN", "--auth-user", user, "--auth-password", "wrong"];
        let (status, out) = swaks(&addr, &[&["--tls"][..], &auth[..], &unlisted[..]].concat());
        assert_ne!(status, 0);
        assert!(out.contains("535 5.7.8 Error: authentication failed"), "{out}");
    }
    let log = w.relay.log();
    assert!(log.contains("sasl_method=PLAIN, sasl_username=alice@sender.example"), "{log}");
    assert!(log.contains("SASL PLAIN authentication failed, sasl_username=\"mallory@sender.example\""), "{log}");
    assert!(!log.contains("correct horse"), "a password reached the log");
    assert_eq!(w.relay.value("mxrelay_smtp_auth_total{result=\"success\"}"), 2.0);
    assert_eq!(w.relay.value("mxrelay_smtp_auth_total{result=\"failure\"}"), 2.0);

    let (ok, out) = users(&w, &["remove", "alice@sender.example"], "");
    assert!(ok, "{out}");
}

#[test]
fn failed_auth_is_rate_limited_per_client() {
    let pki = TestPki::localhost();
    let w = local_world(&pki, &[("MXRELAY_SMTP_AUTH_FAILURE_LIMIT", "2".into())]);
    let (ok, out) = local_users(&w, &["add", "bob"], "pw\n");
    assert!(ok, "{out}");
    let tls_session = || {
        let mut c = Raw::ehlo(&w.relay.addr());
        assert!(c.cmd("STARTTLS").starts_with("220"));
        let mut t = TlsClient::handshake(c.into_tcp(), &pki, "localhost").unwrap();
        assert!(t.cmd("EHLO client.example").starts_with("250"));
        t
    };
    let mut t = tls_session();
    // PLAIN of "\0bob\0bad" and "\0bob\0pw".
    assert!(t.cmd("AUTH PLAIN AGJvYgBiYWQ=").starts_with("535"));
    assert!(t.cmd("AUTH PLAIN AGJvYgBiYWQ=").starts_with("535"));
    let r = t.cmd("AUTH PLAIN AGJvYgBwdw==");
    assert!(r.starts_with("421 4.7.0"), "third attempt not limited: {r}");
    // A new session from the same address is limited too.
    let mut t = tls_session();
    assert!(t.cmd("AUTH PLAIN AGJvYgBwdw==").starts_with("421 4.7.0"));
    assert!(w.relay.value("mxrelay_smtp_limit_hits_total{limit=\"auth_failures\"}") >= 2.0);
    assert!(w.relay.log().contains("AUTH refused: too many failed attempts"));
}

#[test]
fn implicit_tls_listener_and_encrypt_level() {
    let pki = TestPki::localhost();
    let w = local_world(&pki, &[("MXRELAY_TLS_IMPLICIT_LISTEN", "127.0.0.1:0".into())]);
    // smtpd_tls_security_level = encrypt, switched on live: nothing before STARTTLS.
    let config = format!("{}[tls]\nsecurity_level = \"encrypt\"\n", base_config(&w.url, &w.url, &w.dns));
    w.relay.rewrite_config(&config);
    w.relay.reload();
    wait_until("security_level = encrypt", Duration::from_secs(10), || {
        Raw::ehlo(&w.relay.addr()).cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("530")
    });
    let mut c = Raw::ehlo(&w.relay.addr());
    assert!(c.cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("530 5.7.0 Must issue a STARTTLS command first"));
    let (status, out) =
        swaks(&w.relay.addr(), &["--from", SENDER, "--to", "enc@friet.pan", "--ehlo", "client.example"]);
    assert_ne!(status, 0, "{out}");
    let (status, out) =
        swaks(&w.relay.addr(), &["--tls", "--from", SENDER, "--to", "enc@friet.pan", "--ehlo", "client.example"]);
    assert_eq!(status, 0, "{out}");

    // Port 465 style: TLS from the first byte.
    let implicit = w.relay.smtps.expect("the implicit-TLS listener").to_string();
    let (status, out) =
        swaks(&implicit, &["--tlsc", "--from", SENDER, "--to", "wrapped@friet.pan", "--ehlo", "client.example"]);
    assert_eq!(status, 0, "{out}");
    let id = queued_id(&out).expect("queued");
    assert!(String::from_utf8(w.queue().body(&id)).unwrap().contains("with ESMTPS"));
    // -quiet: no s_client letter commands (a line starting with Q would end
    // the session); -verify_return_error: a greeting proves the chain verified.
    let out = s_client(
        &["-connect", &implicit, "-CAfile", pki.ca.to_str().unwrap(), "-verify_return_error", "-quiet"],
        "QUIT\r\n",
    );
    assert!(out.contains("220 relay.test ESMTP"), "{out}");
    assert!(out.contains("221 2.0.0 Bye"), "{out}");
}

#[test]
fn sighup_loads_a_renewed_certificate() {
    let pki = TestPki::localhost();
    let w = world(&pki, &[]);
    let verify = |ca: &std::path::Path| {
        s_client(
            &[
                "-starttls",
                "smtp",
                "-connect",
                &w.relay.addr(),
                "-CAfile",
                ca.to_str().unwrap(),
                "-verify_return_error",
            ],
            "QUIT\r\n",
        )
    };
    assert!(verify(&pki.ca).contains("Verify return code: 0 (ok)"));
    // A renewed certificate from another CA, written over the same files.
    let renewed = TestPki::localhost();
    std::fs::write(&pki.cert, &renewed.cert_pem).unwrap();
    std::fs::write(&pki.key, &renewed.key_pem).unwrap();
    w.relay.signal("HUP");
    wait_until("the renewed certificate", Duration::from_secs(10), || {
        verify(&renewed.ca).contains("Verify return code: 0 (ok)")
    });
    assert!(!verify(&pki.ca).contains("Verify return code: 0 (ok)"), "the old certificate is still served");
}

/// `mxrelay users …` against the database at `url`; `stdin` is piped in.
fn users_at(url: &str, args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mxrelay"))
        .arg("users")
        .args(args)
        .env("MXRELAY_DOMAINS_URL", url)
        .env("MXRELAY_QUEUE_URL", SHARED_REDIS)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// `AUTH PLAIN` with `user` and `password` as one initial response.
fn auth_plain(user: &str, password: &str) -> String {
    use base64::Engine;
    format!("AUTH PLAIN {}", base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}")))
}

/// The user database (a private MariaDB) killed: AUTH answers `454 4.7.0`,
/// the session goes on (the domain snapshot still serves), and AUTH works
/// again once the database is back.
#[test]
fn auth_with_the_user_database_down_is_454_and_works_again_when_it_is_back() {
    let pki = TestPki::localhost();
    let mut maria = MariaDb::start();
    let db = TestDb::create(&maria.server);
    let dns = Dns::start(&["sender.example", "client.example"], &[LISTED]);
    let env = tls_env(&pki);
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.push(RELOAD_ON_SIGHUP_ONLY);
    let relay = Relay::spawn_with_env(&base_config(&db.url(), SHARED_REDIS, &dns), &env);
    db.add_domain(LISTED, "127.0.0.1", 2526);
    relay.signal("HUP");
    wait_until("friet.pan listed", Duration::from_secs(10), || {
        rcpt_reply(&relay.addr(), "probe@friet.pan").starts_with("250")
    });
    let (ok, out) = users_at(&db.url(), &["add", "carol"], "carol's pw\n");
    assert!(ok, "{out}");
    let tls_session = || {
        let mut c = Raw::ehlo(&relay.addr());
        assert!(c.cmd("STARTTLS").starts_with("220"));
        let mut t = TlsClient::handshake(c.into_tcp(), &pki, "localhost").unwrap();
        assert!(t.cmd("EHLO client.example").starts_with("250"));
        t
    };
    let r = tls_session().cmd(&auth_plain("carol", "carol's pw"));
    assert!(r.starts_with("235 2.7.0"), "database up: {r}");

    maria.stop();
    let mut t = tls_session();
    let r = t.cmd(&auth_plain("carol", "carol's pw"));
    assert!(r.starts_with("454 4.7.0 Temporary authentication failure"), "database down: {r}");
    assert!(t.cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("250"), "the session ends after a 454");
    assert!(t.cmd("RCPT TO:<t@friet.pan>").starts_with("250"));
    assert!(relay.value("mxrelay_smtp_auth_total{result=\"tempfail\"}") >= 1.0);
    assert_eq!(
        relay.value("mxrelay_smtp_auth_total{result=\"failure\"}"),
        0.0,
        "an outage counted as a wrong password"
    );
    assert!(relay.log().contains("AUTH: user database unavailable"), "{}", relay.log());

    maria.resume();
    wait_until("AUTH with the database back", Duration::from_secs(30), || {
        tls_session().cmd(&auth_plain("carol", "carol's pw")).starts_with("235")
    });
    clear_shared_queue(&relay.prefix);
}

/// `mxrelay users passwd` (password on stdin): the old password is refused
/// with 535 from then on and the new one lets the user relay.
#[test]
fn users_passwd_replaces_the_password() {
    let pki = TestPki::localhost();
    let w = world(&pki, &[]);
    let (ok, out) = users(&w, &["add", "dave@sender.example"], "old secret\n");
    assert!(ok, "{out}");
    let relay_as = |password: &str| {
        let auth = ["--auth", "PLAIN", "--auth-user", "dave@sender.example", "--auth-password", password];
        let to = ["--from", SENDER, "--to", "someone@other.example", "--ehlo", "client.example"];
        swaks(&w.relay.addr(), &[&["--tls"][..], &auth[..], &to[..]].concat())
    };
    let (status, out) = relay_as("old secret");
    assert!(status == 0 && out.contains("235 2.7.0"), "{out}");
    let before = w.db.exec("SELECT password_hash FROM relay_users WHERE username = 'dave@sender.example'");

    let (ok, out) = users(&w, &["passwd", "dave@sender.example"], "new secret\n");
    assert!(ok, "{out}");
    let after = w.db.exec("SELECT password_hash FROM relay_users WHERE username = 'dave@sender.example'");
    assert!(after != before && after.contains("$argon2id$") && !after.contains("new secret"), "{after}");
    let (status, out) = relay_as("old secret");
    assert_ne!(status, 0);
    assert!(out.contains("535 5.7.8 Error: authentication failed"), "the old password still works: {out}");
    let (status, out) = relay_as("new secret");
    assert!(status == 0 && out.contains("235 2.7.0"), "the new password is refused: {out}");
    assert!(queued_id(&out).is_some(), "{out}");

    let (ok, out) = users(&w, &["passwd", "nobody@sender.example"], "whatever\n");
    assert!(
        !ok && out.contains("nobody@sender.example does not exist"),
        "passwd for a user that does not exist: {out}"
    );
}

/// `auth.tls_only = false` (`smtpd_tls_auth_only = no`): AUTH is offered and
/// accepted without TLS (no certificate configured at all).
#[test]
fn auth_tls_only_false_allows_auth_in_clear() {
    let w = InProcessWorld::start_with(&[("MXRELAY_AUTH_ENABLED", "true"), ("MXRELAY_AUTH_TLS_ONLY", "false")]);
    let (ok, out) = local_users(&w, &["add", "erin"], "clear pw\n");
    assert!(ok, "{out}");
    let mut c = Raw::connect(&w.relay.addr());
    assert_eq!(c.code(), 220);
    let ehlo = c.cmd("EHLO client.example");
    assert!(ehlo.contains("250-AUTH PLAIN LOGIN") && !ehlo.contains("STARTTLS"), "{ehlo}");
    for mech in ["PLAIN", "LOGIN"] {
        let (status, out) = swaks(
            &w.relay.addr(),
            &[
                "--auth",
                mech,
                "--auth-user",
                "erin",
                "--auth-password",
                "clear pw",
                "--from",
                SENDER,
                "--to",
                "someone@other.example",
                "--ehlo",
                "client.example",
            ],
        );
        assert_eq!(status, 0, "{mech}: {out}");
        assert!(out.contains("235 2.7.0 Authentication successful"), "{out}");
        let id = queued_id(&out).expect("queued");
        let body = String::from_utf8(w.queue().body(&id)).unwrap();
        assert!(body.contains("with ESMTPA id"), "{body}");
    }
    assert_eq!(w.relay.value("mxrelay_smtp_auth_total{result=\"success\"}"), 2.0);
}
