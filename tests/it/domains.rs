//! The domains table: plain-SQL changes are honoured within the refresh
//! interval on a running node, and the seed's own table works unchanged.

use std::process::Command;

use crate::support::*;

#[test]
fn rows_inserted_and_deleted_with_sql_are_honoured_while_running() {
    let w = World::start();
    w.wait_rcpt("a@new.example", 454);
    w.db.exec("INSERT INTO domains (domain, relay_host, relay_port) VALUES ('new.example', 'mail.new.example', 25)");
    w.wait_rcpt("a@new.example", 450); // listed now; no DNS for it → 450 4.1.2, no longer 454
    w.db.exec("DELETE FROM domains WHERE domain = 'friet.pan'");
    w.wait_rcpt("a@friet.pan", 454);
}

#[test]
fn the_seeds_myisam_latin1_table_works_unchanged() {
    let dns = Dns::start(&["sender.example"], &[LISTED]);
    let db = TestDb::create(&MysqlServer::shared());
    // The seed's SQL, verbatim.
    db.exec(
        "CREATE TABLE `domains` (
          `domain` VARCHAR(255) NOT NULL,
          `relay_host` VARCHAR(512) NOT NULL,
          `relay_port` INT(5) UNSIGNED NOT NULL,
          `enable_virus_spam_scan` VARCHAR(1) NOT NULL DEFAULT 1,
          PRIMARY KEY (`domain`)
        ) ENGINE MyISAM DEFAULT CHARSET=latin1;
        INSERT INTO domains (domain, relay_host, relay_port) VALUES ('friet.pan', 'mail.friet.pan', 25);",
    );
    let before = db.exec("SHOW CREATE TABLE domains");
    // Not migrated yet (no tables of ours): served from the seed's table alone.
    let unmigrated =
        Relay::spawn_with_env(&base_config(&db.url(), SHARED_REDIS, &dns), &[("MXRELAY_MIGRATE_ON_START", "false")]);
    wait_rcpt(&unmigrated.addr(), "test@friet.pan", 250);
    assert!(!db.exec("SHOW TABLES").contains("relay_recipients"), "nothing created without the migration");
    drop(unmigrated);
    let relay = Relay::spawn(&base_config(&db.url(), SHARED_REDIS, &dns));
    let mut c = Raw::ehlo(&relay.addr());
    assert!(c.cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("250"));
    let r = c.cmd("RCPT TO:<test@friet.pan>");
    assert!(r.starts_with("250 2.1.5"), "{r}");
    let r = c.cmd("RCPT TO:<test@other.example>");
    assert!(r.starts_with("454 4.7.1"), "{r}");
    assert_eq!(db.exec("SHOW CREATE TABLE domains"), before, "mxrelay altered the seed's table");
}

fn mxrelay(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mxrelay")).args(args).envs(env.iter().copied()).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn migrate_creates_the_table_and_check_config_reports() {
    let db = TestDb::create(&MysqlServer::shared());
    let url = db.url();
    let (ok, out) = mxrelay(&["migrate"], &[("MXRELAY_DOMAINS_URL", &url)]);
    assert!(ok, "{out}");
    assert!(db.exec("SHOW CREATE TABLE domains").contains("InnoDB"));
    let (ok, out) = mxrelay(&["check-config"], &[("MXRELAY_DOMAINS_URL", "mysql://mail:secret@127.0.0.1/mail")]);
    assert!(ok && out.contains("mysql://mail:***@127.0.0.1/mail") && !out.contains("secret"), "{out}");
    let (ok, out) =
        mxrelay(&["check-config"], &[("MXRELAY_SMTP_LISTEN", "nowhere"), ("MXRELAY_MYNETWORKS", "10.0.0.0/33")]);
    assert!(!ok);
    assert!(out.contains("smtp.listen (MXRELAY_SMTP_LISTEN): \"nowhere\" is not an address"), "{out}");
    assert!(out.contains("mynetworks (MXRELAY_MYNETWORKS): \"10.0.0.0/33\""), "{out}");
}
