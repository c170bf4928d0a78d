//! Validation of a loaded [`Config`], key by key and across keys: every
//! problem names its key and the fix. Runs once, at load; what it cannot
//! know without opening files or sockets (certificates, trust anchors,
//! listeners) is checked by the subsystem that opens them, with errors of
//! the same form.

use std::net::SocketAddr;
use std::time::Duration;

use super::{Config, ConfigError, TlsLevel, human, mask_url};

/// Duration keys whose floor is not "more than 0s": where 0 has a meaning
/// (said in the key's doc), or where it must be longer still.
const DURATION_FLOORS: &[(&str, Duration)] = &[
    ("smtp.greet_pause", Duration::ZERO),            // 0: greet at once
    ("smtp.drain_delay", Duration::ZERO),            // 0: close at once
    ("delivery.stop_grace", Duration::ZERO),         // 0: hand back at once
    ("delivery.max_queue_lifetime", Duration::ZERO), // 0: try once (Postfix)
    ("delivery.delay_warning_time", Duration::ZERO), // 0: no delay warnings (Postfix)
    ("smtp.rate_window", Duration::from_secs(1)),
    ("domains.refresh", Duration::from_secs(1)),
    ("queue.lease", Duration::from_secs(1)),
];

impl Config {
    /// Checks every key and every rule across keys; `Err` is every problem.
    pub fn check(&self) -> Result<(), Vec<ConfigError>> {
        let mut errors = Vec::new();
        if self.smtp.proxy_protocol && self.smtp.proxy_networks.is_empty() {
            errors.push(ConfigError::new(
                "smtp.proxy_networks",
                "empty while smtp.proxy_protocol is on: no load balancer could send a PROXY header",
                "list the load balancers' addresses, or set smtp.proxy_protocol = false",
            ));
        }
        if self.tls.cert.is_empty() != self.tls.key.is_empty() {
            errors.push(ConfigError::new(
                "tls.cert",
                "tls.cert and tls.key must be set together",
                "set both PEM file paths, or neither",
            ));
        }
        let needs_cert = self.tls.security_level == TlsLevel::Encrypt || self.tls.implicit_listen.is_some();
        if needs_cert && self.tls.cert.is_empty() {
            errors.push(ConfigError::new(
                "tls.cert",
                "a certificate is needed for tls.security_level = \"encrypt\" or tls.implicit_listen",
                "set tls.cert and tls.key to PEM files",
            ));
        }
        if self.auth.enabled && self.auth.tls_only && self.tls.cert.is_empty() {
            errors.push(ConfigError::new(
                "auth.enabled",
                "AUTH is only offered inside TLS (auth.tls_only) but no certificate is configured",
                "set tls.cert and tls.key, or auth.tls_only = false (passwords in clear)",
            ));
        }
        if !self.scan.rspamd.is_empty()
            && !self.scan.rspamd.starts_with("http://")
            && !self.scan.rspamd.starts_with("https://")
        {
            errors.push(ConfigError::new(
                "scan.rspamd",
                format!("{:?} is not an http:// URL", self.scan.rspamd),
                "use the normal worker's address, e.g. http://127.0.0.1:11333",
            ));
        }
        if !self.scan.clamd.is_empty()
            && !self.scan.clamd.starts_with("unix:")
            && self.scan.clamd.parse::<SocketAddr>().is_err()
        {
            errors.push(ConfigError::new(
                "scan.clamd",
                format!("{:?} is neither ip:port nor unix:/path", self.scan.clamd),
                "use e.g. 127.0.0.1:3310 or unix:/run/clamav/clamd.ctl",
            ));
        }
        if self.scan.concurrency == 0 {
            errors.push(ConfigError::new("scan.concurrency", "must be at least 1", "use e.g. 16"));
        }
        self.check_durations(&mut errors);
        if self.node_id.trim().is_empty() || self.node_id.contains(char::is_whitespace) {
            errors.push(ConfigError::new("node_id", "must be one non-empty word", "set a stable name such as relay-1"));
        }
        if !["mysql://", "mariadb://", "sqlite://"].iter().any(|p| self.domains.url.starts_with(p)) {
            errors.push(ConfigError::new(
                "domains.url",
                format!("unsupported scheme in {:?}", mask_url(&self.domains.url)),
                "use mysql://user:password@host:port/database (cluster) or sqlite://path/mxrelay.db (single node)",
            ));
        }
        let schemes = [
            "redis://",
            "rediss://",
            "redis+sentinel://",
            "rediss+sentinel://",
            "redis+cluster://",
            "rediss+cluster://",
            "sqlite://",
        ];
        if !schemes.iter().any(|p| self.queue.url.starts_with(p)) {
            errors.push(ConfigError::new(
                "queue.url",
                format!("unsupported scheme in {:?}", mask_url(&self.queue.url)),
                "use redis://host:port/db (one Redis), redis+sentinel://host:port,host:port/master (a primary \
                 under Sentinel), redis+cluster://host:port,host:port (a Redis Cluster) or \
                 sqlite://path/mxrelay.db (single node)",
            ));
        }
        if self.queue.tls_cert.is_empty() != self.queue.tls_key.is_empty() {
            let missing = if self.queue.tls_cert.is_empty() { "queue.tls_cert" } else { "queue.tls_key" };
            errors.push(ConfigError::new(
                missing,
                "a client certificate needs both queue.tls_cert and queue.tls_key",
                "set both (PEM files), or neither",
            ));
        }
        let tls_files = !self.queue.tls_ca_file.is_empty() || !self.queue.tls_cert.is_empty();
        if tls_files && !self.queue.url.starts_with("rediss") {
            errors.push(ConfigError::new(
                "queue.tls_ca_file",
                format!("TLS files are set but {:?} is not a rediss URL", mask_url(&self.queue.url)),
                "use rediss://, rediss+sentinel:// or rediss+cluster:// for TLS, or leave queue.tls_ca_file, \
                 tls_cert and tls_key empty",
            ));
        }
        let sentinel_auth = !self.queue.sentinel_user.is_empty() || !self.queue.sentinel_password_file.is_empty();
        if sentinel_auth && !self.queue.url.contains("+sentinel://") {
            let key = if self.queue.sentinel_user.is_empty() {
                "queue.sentinel_password_file"
            } else {
                "queue.sentinel_user"
            };
            errors.push(ConfigError::new(
                key,
                format!("Sentinel credentials are set but {:?} names no Sentinels", mask_url(&self.queue.url)),
                "use redis+sentinel://host:port,host:port/master, or leave queue.sentinel_user and \
                 sentinel_password_file empty",
            ));
        }
        if self.queue.shards == 0 || self.queue.shards > 1024 {
            errors.push(ConfigError::new("queue.shards", "must be 1..=1024", "use a small number such as 4"));
        }
        if self.queue.chunk_size < 4096 {
            errors.push(ConfigError::new("queue.chunk_size", "below 4096 bytes", "use e.g. 262144"));
        }
        if self.queue.prefix.is_empty() || self.queue.prefix.contains(['{', '}', ' ']) {
            errors.push(ConfigError::new(
                "queue.prefix",
                "empty or contains braces/spaces",
                "use a plain word such as mxr",
            ));
        }
        if self.message_size_limit < 1024 || self.message_size_limit > 1 << 30 {
            errors.push(ConfigError::new(
                "message_size_limit",
                format!("{} is outside 1024..=1073741824", self.message_size_limit),
                "use bytes, e.g. 52428800 (50 MiB) or the seed's 524288000",
            ));
        }
        if self.smtpd_recipient_limit == 0 {
            errors.push(ConfigError::new("smtpd_recipient_limit", "must be at least 1", "use e.g. 1000"));
        }
        if self.smtp.max_connections == 0 || self.smtp.max_connections_per_ip == 0 {
            errors.push(ConfigError::new(
                "smtp.max_connections",
                "connection limits must be at least 1",
                "set smtp.max_connections and smtp.max_connections_per_ip to positive numbers",
            ));
        }
        if self.smtp.reserved_connections_percent > 50 {
            errors.push(ConfigError::new(
                "smtp.reserved_connections_percent",
                format!("{} is more than half of the slots", self.smtp.reserved_connections_percent),
                "use a share from 0 to 50, e.g. 5",
            ));
        }
        if self.smtp.stress_threshold_percent > 100 {
            errors.push(ConfigError::new(
                "smtp.stress_threshold_percent",
                format!("{} is more than 100", self.smtp.stress_threshold_percent),
                "use a share from 1 to 100, e.g. 80, or 0 for never",
            ));
        }
        if self.delivery.concurrency == 0 || self.delivery.destination_concurrency == 0 {
            errors.push(ConfigError::new(
                "delivery.concurrency",
                "delivery concurrency limits must be at least 1",
                "set delivery.concurrency and delivery.destination_concurrency to positive numbers",
            ));
        }
        for (key, value) in [
            ("verify.concurrency", self.verify.concurrency),
            ("verify.destination_concurrency", self.verify.destination_concurrency),
        ] {
            if value == 0 {
                errors.push(ConfigError::new(key, "must be at least 1", "use e.g. 20 (all destinations) and 2 (one)"));
            }
        }
        if self.delivery.retry_min > self.delivery.retry_max {
            errors.push(ConfigError::new(
                "delivery.retry_min",
                format!(
                    "{} is above delivery.retry_max ({})",
                    human(self.delivery.retry_min),
                    human(self.delivery.retry_max)
                ),
                "use e.g. retry_min = \"60s\", retry_max = \"1h\"",
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            errors.push(ConfigError::new(
                "log.level",
                format!("{:?} is not a filter", self.log.level),
                "use e.g. \"info\" or \"info,mxrelay=debug\"",
            ));
        }
        self.check_policy_map(&mut errors);
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }

    /// `delivery.tls_policy_map`: each key a domain (`.domain` for its
    /// subdomains), listed once.
    fn check_policy_map(&self, errors: &mut Vec<ConfigError>) {
        let mut seen = std::collections::BTreeSet::new();
        for key in self.delivery.tls_policy_map.keys() {
            let (subdomains, name) = match key.strip_prefix('.') {
                Some(parent) => (true, parent),
                None => (false, key.as_str()),
            };
            let Some(name) = crate::proto::address::normalise_domain(name) else {
                errors.push(ConfigError::new(
                    "delivery.tls_policy_map",
                    format!("{key:?} is not a domain name"),
                    "use quoted keys like \"example.com\" (that domain) or \".example.com\" (its subdomains)",
                ));
                continue;
            };
            if !seen.insert((subdomains, name)) {
                errors.push(ConfigError::new(
                    "delivery.tls_policy_map",
                    format!("{key:?} is listed twice (keys are case-insensitive; Unicode names are A-labels)"),
                    "keep one entry per domain",
                ));
            }
        }
    }

    /// Every duration key with its value.
    pub(super) fn durations(&self) -> [(&'static str, Duration); 26] {
        let (s, d, q, v) = (&self.smtp, &self.delivery, &self.queue, &self.verify);
        [
            ("smtp.command_timeout", s.command_timeout),
            ("smtp.data_timeout", s.data_timeout),
            ("smtp.greet_pause", s.greet_pause),
            ("smtp.drain_delay", s.drain_delay),
            ("smtp.rate_window", s.rate_window),
            ("smtp.stress_timeout", s.stress_timeout),
            ("tls.handshake_timeout", self.tls.handshake_timeout),
            ("scan.timeout", self.scan.timeout),
            ("domains.refresh", self.domains.refresh),
            ("queue.replicas_ack_timeout", q.replicas_ack_timeout),
            ("queue.timeout", q.timeout),
            ("queue.lease", q.lease),
            ("dns.timeout", self.dns.timeout),
            ("delivery.retry_min", d.retry_min),
            ("delivery.retry_max", d.retry_max),
            ("delivery.max_queue_lifetime", d.max_queue_lifetime),
            ("delivery.delay_warning_time", d.delay_warning_time),
            ("delivery.connect_timeout", d.connect_timeout),
            ("delivery.greeting_timeout", d.greeting_timeout),
            ("delivery.command_timeout", d.command_timeout),
            ("delivery.data_timeout", d.data_timeout),
            ("delivery.probe_interval", d.probe_interval),
            ("delivery.stop_grace", d.stop_grace),
            ("verify.positive_expire_time", v.positive_expire_time),
            ("verify.negative_expire_time", v.negative_expire_time),
            ("verify.timeout", v.timeout),
        ]
    }

    /// A zero timeout fails every wait at once and a zero interval spins
    /// (`smtp.command_timeout = "0s"` answered every client 421 right after
    /// the greeting): each duration must be more than 0s, or its floor in
    /// [`DURATION_FLOORS`].
    fn check_durations(&self, errors: &mut Vec<ConfigError>) {
        let defaults = Config::default().durations();
        for ((key, value), (_, default)) in self.durations().into_iter().zip(defaults) {
            let floor = DURATION_FLOORS.iter().find(|(k, _)| *k == key).map(|(_, f)| *f);
            let example = human(default);
            match floor {
                Some(floor) if value < floor => errors.push(ConfigError::new(
                    key,
                    format!("{} is shorter than {}", human(value), human(floor)),
                    format!("must be at least {}; e.g. \"{example}\"", human(floor)),
                )),
                None if value.is_zero() => errors.push(ConfigError::new(
                    key,
                    "0s is not allowed",
                    format!("must be more than 0s; e.g. \"{example}\""),
                )),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::env::{collect_keys, insert_path};

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn zero_command_timeout_is_refused_with_key_variable_and_fix() {
        let e = Config::load_from(None, &env(&[("MXRELAY_SMTP_COMMAND_TIMEOUT", "0s")])).unwrap_err();
        assert_eq!(e.len(), 1, "{e:#?}");
        assert_eq!(
            (e[0].key.as_str(), e[0].env.as_deref()),
            ("smtp.command_timeout", Some("MXRELAY_SMTP_COMMAND_TIMEOUT"))
        );
        assert!(e[0].problem.contains("0s"), "{}", e[0]);
        assert!(e[0].fix.contains("more than 0s") && e[0].fix.contains("\"5m\""), "{}", e[0]);
    }

    #[test]
    fn every_zero_duration_is_refused_unless_zero_means_something() {
        let mut zero = toml::Table::try_from(Config::default()).unwrap();
        let keys: Vec<&str> = Config::default().durations().iter().map(|(k, _)| *k).collect();
        for key in &keys {
            let path: Vec<String> = key.split('.').map(str::to_string).collect();
            insert_path(&mut zero, &path, toml::Value::String("0s".into()));
        }
        let config: Config = toml::Value::Table(zero).try_into().unwrap();
        let refused: Vec<String> = config.check().unwrap_err().into_iter().map(|e| e.key).collect();
        let allowed = [
            "smtp.greet_pause",
            "smtp.drain_delay",
            "delivery.stop_grace",
            "delivery.max_queue_lifetime",
            "delivery.delay_warning_time",
        ];
        for key in keys {
            assert_eq!(refused.iter().any(|k| k == key), !allowed.contains(&key), "{key}: {refused:?}");
        }
    }

    #[test]
    fn every_duration_key_is_checked() {
        // A new Duration field must be added to `durations()`, or its zero passes.
        let mut keys = Vec::new();
        collect_keys(&toml::Table::try_from(Config::default()).unwrap(), &mut Vec::new(), &mut keys);
        let looks_like_duration =
            |v: &toml::Value| v.as_str().is_some_and(|s| humantime_serde::re::humantime::parse_duration(s).is_ok());
        let mut found: Vec<String> =
            keys.iter().filter(|(_, v)| looks_like_duration(v)).map(|(p, _)| p.join(".")).collect();
        let mut listed: Vec<String> = Config::default().durations().iter().map(|(k, _)| k.to_string()).collect();
        found.sort();
        listed.sort();
        assert_eq!(found, listed);
    }

    #[test]
    fn verification_limits_and_unreachable_are_checked_naming_the_key() {
        let e = Config::load_from(
            None,
            &env(&[("MXRELAY_VERIFY_DESTINATION_CONCURRENCY", "0"), ("MXRELAY_VERIFY_TIMEOUT", "0s")]),
        )
        .unwrap_err();
        let mut keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
        keys.sort();
        assert_eq!(keys, ["verify.destination_concurrency", "verify.timeout"], "{e:#?}");
        let e = Config::load_from(None, &env(&[("MXRELAY_VERIFY_UNREACHABLE", "maybe")])).unwrap_err();
        assert_eq!(e[0].key, "verify.unreachable");
        assert!(e[0].to_string().contains("\"tempfail\" (450)"), "{}", e[0]);
        let c = Config::load_from(None, &env(&[("MXRELAY_VERIFY_UNREACHABLE", "tempfail")])).unwrap();
        assert_eq!(c.verify.unreachable, crate::config::VerifyUnreachable::Tempfail);
    }

    #[test]
    fn retry_min_above_retry_max_is_refused() {
        let e = Config::load_from(
            None,
            &env(&[("MXRELAY_DELIVERY_RETRY_MIN", "2h"), ("MXRELAY_DELIVERY_RETRY_MAX", "1h")]),
        )
        .unwrap_err();
        assert_eq!(e.len(), 1, "{e:#?}");
        assert_eq!(e[0].key, "delivery.retry_min");
        assert!(e[0].problem.contains("2h"), "{}", e[0]);
    }
}

#[cfg(test)]
mod policy_map_tests {
    use super::*;
    use crate::config::TlsPolicy;

    #[test]
    fn policy_map_keys_must_be_domains_listed_once() {
        let mut c = Config::default();
        c.domains.url = "sqlite://x.db".into();
        c.queue.url = "sqlite://x.db".into();
        assert!(c.check().is_ok());
        for key in ["bad domain", "..x", "A.test", "a.test", ".a.test"] {
            c.delivery.tls_policy_map.insert(key.into(), TlsPolicy::May);
        }
        let e = c.check().unwrap_err();
        assert!(e.iter().all(|e| e.key == "delivery.tls_policy_map"), "{e:?}");
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e.iter().any(|e| e.problem.contains("listed twice")), "{e:?}");
    }
}
