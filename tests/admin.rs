//! The operator commands against real MariaDB (and Redis): `mxrelay domains …`.

mod support;

use std::process::Command;

use support::*;

fn mxrelay(db: &TestDb, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mxrelay"))
        .args(args)
        .env("MXRELAY_DOMAINS_URL", db.url())
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn domains_add_list_show_remove_import() {
    let db = TestDb::create(&MysqlServer::shared());
    assert!(mxrelay(&db, &["migrate"]).0);

    let (ok, out) = mxrelay(&db, &["domains", "add", "Bücher.Example", "--relay-host", "mail.buecher.example", "--relay-port", "2525", "--no-scan"]);
    assert!(ok, "{out}");
    assert_eq!(db.exec("SELECT domain, relay_host, relay_port, enable_virus_spam_scan FROM domains"), "xn--bcher-kva.example\tmail.buecher.example\t2525\t0\n");
    let (ok, out) = mxrelay(&db, &["domains", "add", "friet.pan", "--relay-host", "[2001:db8::25]"]);
    assert!(ok, "{out}");
    assert_eq!(db.exec("SELECT relay_host, relay_port, enable_virus_spam_scan FROM domains WHERE domain = 'friet.pan'"), "2001:db8::25\t25\t1\n");

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
