//! The operator commands against real MariaDB (and Redis): `mxrelay domains …`.

use std::process::Command;

use crate::support::*;

fn mxrelay(db: &TestDb, args: &[&str]) -> (bool, String) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_mxrelay")).args(args).env("MXRELAY_DOMAINS_URL", db.url()).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn domains_add_list_show_remove_import() {
    let db = TestDb::create(&MysqlServer::shared());
    assert!(mxrelay(&db, &["migrate"]).0);

    let (ok, out) = mxrelay(
        &db,
        &[
            "domains",
            "add",
            "Bücher.Example",
            "--relay-host",
            "mail.buecher.example",
            "--relay-port",
            "2525",
            "--no-scan",
        ],
    );
    assert!(ok, "{out}");
    assert_eq!(
        db.exec("SELECT domain, relay_host, relay_port, enable_virus_spam_scan FROM domains"),
        "xn--bcher-kva.example\tmail.buecher.example\t2525\t0\n"
    );
    let (ok, out) = mxrelay(&db, &["domains", "add", "friet.pan", "--relay-host", "[2001:db8::25]"]);
    assert!(ok, "{out}");
    assert_eq!(
        db.exec("SELECT relay_host, relay_port, enable_virus_spam_scan FROM domains WHERE domain = 'friet.pan'"),
        "2001:db8::25\t25\t1\n"
    );

    // Clear errors, nothing written.
    let (ok, out) = mxrelay(&db, &["domains", "add", "FRIET.pan", "--relay-host", "10.0.0.1"]);
    assert!(!ok && out.contains("friet.pan is already listed (relay [2001:db8::25]:25)"), "{out}");
    let (ok, out) = mxrelay(&db, &["domains", "add", "x.example", "--relay-host", "bad host!"]);
    assert!(!ok && out.contains("--relay-host"), "{out}");
    let (ok, out) = mxrelay(&db, &["domains", "add", "x.example", "--relay-host", "10.0.0.1", "--relay-port", "65536"]);
    assert!(!ok && out.contains("--relay-port"), "{out}");
    let (ok, out) = mxrelay(&db, &["domains", "add", "bad..example", "--relay-host", "10.0.0.1"]);
    assert!(!ok && out.contains("not a valid domain name"), "{out}");
    assert_eq!(db.exec("SELECT COUNT(*) FROM domains"), "2\n");

    let (ok, out) = mxrelay(&db, &["domains", "list"]);
    assert!(ok && out.contains("xn--bcher-kva.example (bücher.example)") && out.contains("2001:db8::25"), "{out}");
    let (ok, out) = mxrelay(&db, &["domains", "list", "--json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(ok && rows.len() == 2 && rows[0]["domain"] == "friet.pan" && rows[0]["scan"] == true, "{out}");
    let (ok, out) = mxrelay(&db, &["domains", "show", "bücher.example", "--json"]);
    let row: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(ok && row["relay_port"] == 2525 && row["scan"] == false, "{out}");
    let (ok, out) = mxrelay(&db, &["domains", "show", "nope.example"]);
    assert!(!ok && out.contains("nope.example is not listed"), "{out}");

    let (ok, out) = mxrelay(&db, &["domains", "remove", "friet.pan"]);
    assert!(ok, "{out}");
    let (ok, out) = mxrelay(&db, &["domains", "remove", "friet.pan"]);
    assert!(!ok && out.contains("is not listed"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "domain,relay_host,relay_port,scan\na.example,10.0.0.1,25\nb.example,10.0.0.2,0\n").unwrap();
    let (ok, out) = mxrelay(&db, &["domains", "import", bad.to_str().unwrap()]);
    assert!(!ok && out.contains("line 3") && out.contains("nothing imported"), "{out}");
    let good = dir.path().join("good.csv");
    std::fs::write(&good, "a.example,10.0.0.1,25\nb.example,mail.b.example,2525,0\n").unwrap();
    let (ok, out) = mxrelay(&db, &["domains", "import", good.to_str().unwrap()]);
    assert!(ok && out.contains("imported 2"), "{out}");
    let (ok, out) = mxrelay(&db, &["domains", "import", good.to_str().unwrap()]);
    assert!(!ok && out.contains("a.example is already listed"), "{out}");
    assert_eq!(db.exec("SELECT COUNT(*) FROM domains"), "3\n");
}

fn queue_cmd(relay: &Relay, db: &TestDb, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mxrelay"))
        .arg("queue")
        .args(args)
        .env("MXRELAY_DOMAINS_URL", db.url())
        .env("MXRELAY_QUEUE_PREFIX", &relay.prefix)
        .env("MXRELAY_QUEUE_URL", SHARED_REDIS)
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// DNS, a database relaying friet.pan to 127.0.0.1:`friet` and
/// named.example to 127.0.0.1:`named`, and a delivering node whose
/// deferred mail waits (retries after 120 s, probes hourly) until an
/// operator releases it.
fn deferring_node(friet: u16, named: u16) -> (Dns, TestDb, Relay) {
    let dns = Dns::start(&["sender.example"], &[LISTED, "named.example"]);
    let db = TestDb::create(&MysqlServer::shared());
    db.exec(include_str!("../../migrations/mysql/0001_domains.sql"));
    db.add_domain(LISTED, "127.0.0.1", friet);
    db.add_domain("named.example", "127.0.0.1", named);
    let relay = Relay::spawn_with_env(
        &base_config(&db.url(), SHARED_REDIS, &dns),
        &[
            ("MXRELAY_DELIVERY_ENABLED", "true"),
            ("MXRELAY_DELIVERY_RETRY_MIN", "120s"),
            ("MXRELAY_DELIVERY_RETRY_MAX", "1h"),
            ("MXRELAY_DELIVERY_PROBE_INTERVAL", "1h"),
        ],
    );
    (dns, db, relay)
}

#[test]
fn queue_commands_on_mail_deferred_to_a_down_destination() {
    use crate::support::destination::Destination;
    use std::time::Duration;
    let home = Destination::start();
    let down = DownPort::new();
    let (_dns, db, relay) = deferring_node(home.port, down.port);
    let ids: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|l| {
            let (_, out) = swaks(
                &relay.addr(),
                &["--from", "bob@friet.pan", "--to", &format!("{l}@named.example"), "--helo", "client.example"],
            );
            queued_id(&out).unwrap_or_else(|| panic!("{out}"))
        })
        .collect();
    let mut q = relay.queue(SHARED_REDIS);
    wait_until("3 deferred", Duration::from_secs(20), || q.deferred_count() == 3);
    let dest_key = format!("[127.0.0.1]:{}", down.port);

    let (ok, out) = queue_cmd(&relay, &db, &["stats", "--json"]);
    let s = json(&out);
    assert!(ok && s["messages"] == 3 && s["deferred"] == 3 && s["held"] == 0, "{out}");
    assert_eq!(s["deferred_by_destination"][0], serde_json::json!([dest_key, 3]), "{out}");
    assert!(s["oldest_received_at"].is_i64(), "{out}");
    let (ok, out) = queue_cmd(&relay, &db, &["stats"]);
    assert!(ok && out.contains("deferred 3") && out.contains(&dest_key), "{out}");
    assert_eq!(relay.value("mxrelay_queue_messages{state=\"deferred\"}"), 3.0);
    assert!(relay.value("mxrelay_queue_oldest_message_age_seconds") >= 0.0);

    let (_, out) = queue_cmd(&relay, &db, &["list", "--state", "deferred", "--json"]);
    assert_eq!(json(&out).as_array().unwrap().len(), 3, "{out}");
    let (_, out) = queue_cmd(&relay, &db, &["list", "--domain", "friet.pan", "--json"]);
    assert_eq!(json(&out).as_array().unwrap().len(), 0, "{out}");
    let (ok, out) = queue_cmd(&relay, &db, &["list"]);
    assert!(ok && out.contains(&ids[0]) && out.contains("3 message(s)"), "{out}");
    let (ok, out) = queue_cmd(&relay, &db, &["list", "--state", "bogus"]);
    assert!(!ok && out.contains("--state"), "{out}");

    let (ok, out) = queue_cmd(&relay, &db, &["show", &ids[0], "--body"]);
    assert!(
        ok && out.contains("state     deferred") && out.contains("<a@named.example> pending (4.4.1 connect to"),
        "{out}"
    );
    assert!(
        out.contains("attempts  1")
            && out.contains("next try")
            && out.contains("--- message ---\nReceived: from client.example"),
        "{out}"
    );

    // hold: not retried by a flush; release: delivered once the destination is up.
    let (ok, out) = queue_cmd(&relay, &db, &["hold", &ids[0]]);
    assert!(ok, "{out}");
    let (_, out) = queue_cmd(&relay, &db, &["stats", "--json"]);
    assert!(json(&out)["held"] == 1 && json(&out)["deferred"] == 2, "{out}");
    let (ok, out) = queue_cmd(&relay, &db, &["flush"]);
    assert!(ok && out.contains("released 2"), "{out}");
    wait_until("flushed mail deferred again", Duration::from_secs(20), || q.deferred_count() == 2);
    let (_, out) = queue_cmd(&relay, &db, &["show", &ids[0], "--json"]);
    assert_eq!(json(&out)["envelope"]["attempts"], 1, "a held message is not retried: {out}");

    // bounce: a DSN to the sender instead of a delivery.
    let (ok, out) = queue_cmd(&relay, &db, &["bounce", &ids[1]]);
    assert!(ok, "{out}");
    let dsn = home.wait_for(1, Duration::from_secs(20));
    assert_eq!(dsn[0].rcpts, vec!["bob@friet.pan"]);
    assert!(String::from_utf8_lossy(&dsn[0].data).contains("bounced by the administrator"));

    // delete: gone, never delivered.
    let (ok, out) = queue_cmd(&relay, &db, &["delete", &ids[2]]);
    assert!(ok, "{out}");
    let (ok, out) = queue_cmd(&relay, &db, &["show", &ids[2]]);
    assert!(!ok && out.contains("is not in the queue"), "{out}");
    let (ok, out) = queue_cmd(&relay, &db, &["delete", "no-such-id"]);
    assert!(!ok && out.contains("not found"), "{out}");
    let up = Destination::start_on(down.release());
    let (ok, out) = queue_cmd(&relay, &db, &["release", &ids[0]]);
    assert!(ok, "{out}");
    let got = up.wait_for(1, Duration::from_secs(20));
    assert_eq!(got[0].rcpts, vec!["a@named.example"]);

    wait_until("queue empty", Duration::from_secs(20), || q.message_count() == 0);
    assert_eq!(up.messages().len(), 1, "the deleted and the bounced message were never delivered");
}

/// `queue flush --domain D` (`postqueue -s D`): only D's deferred mail is
/// made due; the other destination's stays deferred, untried.
#[test]
fn queue_flush_domain_releases_only_that_domains_deferred_mail() {
    use crate::support::destination::Destination;
    use std::time::Duration;
    let (down_a, down_b) = (DownPort::new(), DownPort::new());
    let (_dns, db, relay) = deferring_node(down_a.port, down_b.port);
    for to in ["a1@friet.pan", "a2@friet.pan", "b@named.example"] {
        let (code, out) = swaks(&relay.addr(), &["--from", SENDER, "--to", to, "--helo", "client.example"]);
        assert_eq!(code, 0, "{out}");
    }
    let mut q = relay.queue(SHARED_REDIS);
    wait_until("3 deferred", Duration::from_secs(20), || q.deferred_count() == 3);
    let a = Destination::start_on(down_a.release());
    let b = Destination::start_on(down_b.release());

    let (ok, out) = queue_cmd(&relay, &db, &["flush", "--domain", "named.example"]);
    assert!(ok && out.contains("released 1 deferred message(s)"), "{out}");
    let got = b.wait_for(1, Duration::from_secs(20));
    assert_eq!(got[0].rcpts, vec!["b@named.example"]);
    wait_until("named.example's message gone", Duration::from_secs(10), || q.message_count() == 2);
    assert_eq!(q.deferred_count(), 2, "friet.pan's mail left the deferred set");
    assert_eq!(a.connections(), 0, "friet.pan's destination was tried");
    let (_, out) = queue_cmd(&relay, &db, &["list", "--state", "deferred", "--domain", "friet.pan", "--json"]);
    assert_eq!(json(&out).as_array().unwrap().len(), 2, "{out}");

    // Any case, as a domain is written in mail.
    let (ok, out) = queue_cmd(&relay, &db, &["flush", "--domain", "FRIET.pan"]);
    assert!(ok && out.contains("released 2 deferred message(s)"), "{out}");
    let got = a.wait_for(2, Duration::from_secs(20));
    let mut rcpts: Vec<String> = got.iter().flat_map(|m| m.rcpts.clone()).collect();
    rcpts.sort();
    assert_eq!(rcpts, vec!["a1@friet.pan", "a2@friet.pan"]);
    assert_eq!(b.messages().len(), 1, "named.example got a second copy");
    let (ok, out) = queue_cmd(&relay, &db, &["flush", "--domain", "bad..example"]);
    assert!(!ok && out.contains("--domain"), "{out}");
    wait_until("queue empty", Duration::from_secs(10), || q.message_count() == 0);
    clear_shared_queue(&relay.prefix);
}

/// `queue list --state active|held|deferred`: each state lists exactly its
/// messages (delivery off, so queued mail stays active).
#[test]
fn queue_list_by_state_active_and_held() {
    let w = World::start();
    let ids: Vec<String> = ["x", "y", "z"]
        .iter()
        .map(|l| {
            let (_, out) = swaks(
                &w.relay.addr(),
                &["--from", SENDER, "--to", &format!("{l}@friet.pan"), "--helo", "client.example"],
            );
            queued_id(&out).unwrap_or_else(|| panic!("{out}"))
        })
        .collect();
    // The ids listed under `state`, each checked to carry that state.
    let listed = |state: &str| -> Vec<String> {
        let (ok, out) = queue_cmd(&w.relay, &w.db, &["list", "--state", state, "--json"]);
        assert!(ok, "{out}");
        let rows = json(&out);
        let mut ids: Vec<String> = rows
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                assert_eq!(r["state"]["state"], state, "{out}");
                r["envelope"]["id"].as_str().unwrap().to_string()
            })
            .collect();
        ids.sort();
        ids
    };
    let mut all = ids.clone();
    all.sort();
    assert_eq!(listed("active"), all);
    assert!(listed("held").is_empty() && listed("deferred").is_empty());

    let (ok, out) = queue_cmd(&w.relay, &w.db, &["hold", &ids[1]]);
    assert!(ok, "{out}");
    assert_eq!(listed("held"), vec![ids[1].clone()]);
    let mut others = vec![ids[0].clone(), ids[2].clone()];
    others.sort();
    assert_eq!(listed("active"), others);
    let (ok, out) = queue_cmd(&w.relay, &w.db, &["list", "--state", "held"]);
    assert!(ok && out.contains(&ids[1]) && out.contains("held") && out.contains("1 message(s)"), "{out}");
    assert!(!out.contains(&ids[0]) && !out.contains(&ids[2]), "{out}");

    let (ok, out) = queue_cmd(&w.relay, &w.db, &["release", &ids[1]]);
    assert!(ok, "{out}");
    assert!(listed("held").is_empty());
    assert_eq!(listed("active").len(), 3);
}
