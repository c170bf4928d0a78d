//! `Outbound`: one delivering relay and what it needs, for the outbound
//! TLS tests (`tests/it/outbound_tls.rs` against the scripted destination,
//! `tests/it/outbound_postfix.rs` against a private Postfix).

use std::collections::HashMap;
use std::time::Duration;

use super::*;

/// Longest wait for a delivery or a queue state.
pub const WAIT: Duration = Duration::from_secs(30);

/// DNS (`dest.test` and `wrong.test` → 127.0.0.1), a database listing
/// `domains`, and one delivering relay whose `[delivery]` section ends
/// with `delivery_toml`.
pub struct Outbound {
    pub relay: Relay,
    _db: TestDb,
    _dns: Dns,
}

impl Outbound {
    pub fn start(domains: &[(&str, &str, u16)], delivery_toml: &str) -> Outbound {
        let dns = Dns::start(&["sender.example", "dest.test", "wrong.test"], &[LISTED, "other.example"]);
        let db = TestDb::create(&MysqlServer::shared());
        db.exec(include_str!("../../../migrations/mysql/0001_domains.sql"));
        for (domain, host, port) in domains {
            db.add_domain(domain, host, *port);
        }
        // base_config ends inside [delivery].
        let config = format!("{}{delivery_toml}", base_config(&db.url(), SHARED_REDIS, &dns));
        let relay = Relay::spawn_with_env(&config, &[("MXRELAY_DELIVERY_ENABLED", "true")]);
        Outbound { relay, _db: db, _dns: dns }
    }

    /// Submits one message from bob@friet.pan; its queue id.
    pub fn send(&self, to: &str) -> String {
        let (code, out) =
            swaks(&self.relay.addr(), &["--from", "bob@friet.pan", "--to", to, "--helo", "client.example"]);
        assert_eq!(code, 0, "{out}");
        queued_id(&out).expect("queue id in the transcript")
    }

    /// New sessions counted for one TLS policy and result.
    pub fn tls_count(&self, policy: &str, result: &str) -> f64 {
        self.relay.value(&format!("mxrelay_delivery_tls_total{{policy=\"{policy}\",result=\"{result}\"}}"))
    }

    /// Waits until `id` has been tried `n` times and is still queued.
    pub fn wait_attempts(&self, id: &str, n: u32) -> HashMap<String, String> {
        let mut q = self.relay.queue(SHARED_REDIS);
        wait_until_value(&format!("{n} delivery attempts of {id}"), WAIT, || {
            q.try_envelope(id).filter(|e| e.get("attempts").and_then(|a| a.parse::<u32>().ok()).unwrap_or(0) >= n)
        })
    }

    pub fn wait_queue_empty(&self) {
        let mut q = self.relay.queue(SHARED_REDIS);
        wait_until("queue empty", WAIT, || q.message_count() == 0);
    }
}
