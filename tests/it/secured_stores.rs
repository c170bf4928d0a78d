//! The stores as operators secure them: Redis over TLS (`rediss://`)
//! verified against a private CA with an ACL user, MySQL over TLS as an
//! account that must use it; passwords from files (Kubernetes Secrets),
//! and what a wrong one looks like.

use std::time::Duration;

use crate::support::pki::TestPki;
use crate::support::sentinel::{Secured, Sentinels};
use crate::support::sink::SmtpSink;
use crate::support::*;

/// A Redis that speaks TLS on its own port (plain stays for the harness's
/// start check) and knows one ACL user, `app`, with password `pw`; the
/// default user is off.
fn secured_redis(pki: &TestPki) -> (RedisServer, u16) {
    let (cert, key, ca) = (pki.cert.display(), pki.key.display(), pki.ca.display());
    let (cert, key, ca) = (cert.to_string(), key.to_string(), ca.to_string());
    // The TLS port is picked again with the plain one when either was taken.
    let redis = RedisServer::start_with_each(|| {
        let tls = free_port().to_string();
        [
            "--tls-port",
            &tls,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "optional",
            "--user",
            "app",
            "on",
            ">Sup3r-s3cret",
            "~*",
            "&*",
            "+@all",
            "--user",
            "default",
            "off",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    });
    let tls: u16 = redis.arg("--tls-port").unwrap().parse().unwrap();
    wait_port(tls, Duration::from_secs(10));
    (redis, tls)
}

/// smtp-sink as the destination of friet.pan, with DNS and the domain list.
fn destination_dns_and_domains() -> (SmtpSink, Dns, TestDb) {
    let sink = SmtpSink::start();
    let dns = Dns::start(&["sender.example"], &[LISTED]);
    let db = TestDb::create(&MysqlServer::shared());
    db.exec(include_str!("../../migrations/mysql/0001_domains.sql"));
    db.add_domain(LISTED, "127.0.0.1", sink.port);
    (sink, dns, db)
}

/// A whole message to `relay` is answered 451 4.3.0 at the end of DATA.
fn assert_message_gets_451(relay: &Relay, why: &str) {
    let mut c = Raw::ehlo(&relay.addr());
    c.cmd(&format!("MAIL FROM:<{SENDER}>"));
    assert!(c.cmd("RCPT TO:<t@friet.pan>").starts_with("250"));
    assert_eq!(c.code_after("DATA"), 354);
    let reply = c.cmd("Subject: x\r\n\r\nbody\r\n.");
    assert!(reply.starts_with("451 4.3.0"), "{why}: {reply}");
}

#[test]
fn rediss_with_a_private_ca_and_an_acl_user_carries_the_queue_and_a_wrong_password_is_named() {
    let pki = TestPki::localhost();
    let (_redis, tls) = secured_redis(&pki);
    let (sink, dns, db) = destination_dns_and_domains();
    let secrets = tempfile::tempdir().unwrap();
    let (good, bad) = (secrets.path().join("good"), secrets.path().join("bad"));
    std::fs::write(&good, "Sup3r-s3cret\n").unwrap();
    std::fs::write(&bad, "not-the-password\n").unwrap();
    let config = base_config(&db.url(), &format!("rediss://app@127.0.0.1:{tls}/0"), &dns);
    let ca = pki.ca.to_str().unwrap();

    let relay = Relay::spawn_with_env(
        &config,
        &[
            ("MXRELAY_DELIVERY_ENABLED", "true"),
            ("MXRELAY_QUEUE_PASSWORD_FILE", good.to_str().unwrap()),
            ("MXRELAY_QUEUE_TLS_CA_FILE", ca),
        ],
    );
    wait_until("ready over TLS", Duration::from_secs(15), || relay.http_get("/readyz").starts_with("HTTP/1.1 200"));
    let (code, out) = swaks(&relay.addr(), &["--from", SENDER, "--to", "t@friet.pan", "--helo", "client.example"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("250 2.0.0 Ok: queued as"), "{out}");
    let got = sink.wait_for(1, Duration::from_secs(20));
    assert_eq!(got.len(), 1);
    assert!(!relay.log().contains("Sup3r"), "the password never reaches the log:\n{}", relay.log());

    let refused = Relay::spawn_with_env(
        &config,
        &[("MXRELAY_QUEUE_PASSWORD_FILE", bad.to_str().unwrap()), ("MXRELAY_QUEUE_TLS_CA_FILE", ca)],
    );
    let named = "Redis refused the credentials";
    wait_until("the refusal logged at start", Duration::from_secs(15), || refused.log().contains(named));
    let start = refused.log();
    assert!(start.contains("queue not reachable at start") && start.contains("queue.password_file"), "{start}");
    let ready = refused.http_get("/readyz");
    assert!(ready.starts_with("HTTP/1.1 503") && ready.contains(named), "{ready}");
    assert_message_gets_451(&refused, "a refused queue is a temporary failure");

    // Without the CA, Redis's certificate is not trusted: no queue, 503.
    let untrusted = Relay::spawn_with_env(&config, &[("MXRELAY_QUEUE_PASSWORD_FILE", good.to_str().unwrap())]);
    wait_until("an untrusted certificate refused", Duration::from_secs(15), || {
        untrusted.http_get("/readyz").starts_with("HTTP/1.1 503")
            && untrusted.log().contains("queue not reachable at start")
    });
}

/// Sentinel as operators secure it: TLS everywhere
/// (`rediss+sentinel://`), the Sentinels' own password from
/// `queue.sentinel_password_file`, the data server's ACL user from the
/// URL and `queue.password_file`. A wrong Sentinel password is named at
/// start-up and in `/readyz`, and the node answers 451.
#[test]
fn rediss_sentinel_with_passwords_carries_the_queue_and_a_wrong_sentinel_password_is_named() {
    let pki = TestPki::localhost();
    let (_redis, tls) = secured_redis(&pki);
    let secured = Secured {
        ca: pki.ca.clone(),
        cert: pki.cert.clone(),
        key: pki.key.clone(),
        password: "s3ntinel-only".into(),
        data_user: ("app".into(), "Sup3r-s3cret".into()),
    };
    let sentinels = Sentinels::start_with(tls, &[None], 0, Some(secured));
    let (sink, dns, db) = destination_dns_and_domains();
    let secrets = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let path = secrets.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let (data_pw, sentinel_pw, wrong) =
        (file("data", "Sup3r-s3cret\n"), file("sentinel", "s3ntinel-only\n"), file("wrong", "guess\n"));
    let url = sentinels.url().replacen("://", "://app@", 1);
    assert!(url.starts_with("rediss+sentinel://app@127.0.0.1:"), "{url}");
    let config = base_config(&db.url(), &url, &dns);
    let ca = pki.ca.to_str().unwrap();
    let env = |sentinel: &str| {
        vec![
            ("MXRELAY_DELIVERY_ENABLED", "true".to_string()),
            ("MXRELAY_QUEUE_PASSWORD_FILE", data_pw.clone()),
            ("MXRELAY_QUEUE_SENTINEL_PASSWORD_FILE", sentinel.to_string()),
            ("MXRELAY_QUEUE_TLS_CA_FILE", ca.to_string()),
        ]
    };
    let spawn = |env: Vec<(&str, String)>| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Relay::spawn_with_env(&config, &env)
    };

    let relay = spawn(env(&sentinel_pw));
    wait_until("ready through the Sentinels over TLS", Duration::from_secs(20), || {
        relay.http_get("/readyz").starts_with("HTTP/1.1 200")
    });
    assert!(
        relay.log().contains(&format!("primary=127.0.0.1:{tls}")),
        "the TLS port, as the Sentinel names it:\n{}",
        relay.log()
    );
    let (code, out) = swaks(&relay.addr(), &["--from", SENDER, "--to", "t@friet.pan", "--helo", "client.example"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("250 2.0.0 Ok: queued as"), "{out}");
    assert_eq!(sink.wait_for(1, Duration::from_secs(20)).len(), 1);
    let log = relay.log();
    assert!(!log.contains("Sup3r") && !log.contains("s3ntinel-only"), "no password reaches the log:\n{log}");

    let refused = spawn(env(&wrong));
    wait_until("the refusal logged", Duration::from_secs(15), || refused.log().contains("refused the credentials"));
    let start = refused.log();
    assert!(start.contains("queue.sentinel_password_file"), "the key is named:\n{start}");
    let ready = refused.http_get("/readyz");
    assert!(ready.starts_with("HTTP/1.1 503") && ready.contains("queue.sentinel_password_file"), "{ready}");
    assert_message_gets_451(&refused, "refused Sentinels are a temporary failure");
}

/// MySQL over TLS, verified (`ssl-mode=verify_identity`, the private CA),
/// as an account that may only connect with TLS, its password from a
/// file; the same account without TLS gets no domain list, so the node
/// answers 451 rather than relaying blind.
#[test]
fn mysql_over_tls_with_a_password_file_serves_the_domain_list() {
    let pki = TestPki::localhost();
    let (cert, key, ca) = (pki.cert.display(), pki.key.display(), pki.ca.display());
    let maria =
        MariaDb::start_with(&[&format!("--ssl-cert={cert}"), &format!("--ssl-key={key}"), &format!("--ssl-ca={ca}")]);
    let db = TestDb::create(&maria.server);
    db.exec(include_str!("../../migrations/mysql/0001_domains.sql"));
    db.add_domain(LISTED, "127.0.0.1", 2526);
    maria.server.exec(
        "",
        &format!(
            "CREATE USER 'mail'@'127.0.0.1' IDENTIFIED BY 'Db-s3cret' REQUIRE SSL; \
             GRANT ALL ON `{}`.* TO 'mail'@'127.0.0.1'",
            db.name
        ),
    );
    let secrets = tempfile::tempdir().unwrap();
    let password = secrets.path().join("db-password");
    std::fs::write(&password, "Db-s3cret\n").unwrap();
    let dns = Dns::start(&["sender.example"], &[LISTED]);
    let base = format!("mysql://mail@127.0.0.1:{}/{}", maria.server.port, db.name);
    let file = ("MXRELAY_DOMAINS_PASSWORD_FILE", password.to_str().unwrap());

    let tls = format!("{base}?ssl-mode=verify_identity&ssl-ca={ca}");
    let relay = Relay::spawn_with_env(&base_config(&tls, SHARED_REDIS, &dns), &[file]);
    wait_rcpt(&relay.addr(), "t@friet.pan", 250);
    assert!(!relay.log().contains("Db-s3cret"), "{}", relay.log());

    let clear = format!("{base}?ssl-mode=disabled");
    let refused = Relay::spawn_with_env(&base_config(&clear, SHARED_REDIS, &dns), &[file]);
    wait_rcpt(&refused.addr(), "t@friet.pan", 451);
    assert!(refused.log().contains("domain database not reachable at start"), "{}", refused.log());
}
