//! SIGHUP: which keys a running node takes over, and the configuration it
//! runs with afterwards. Keys not in [`LIVE_KEYS`] keep their old values
//! until a restart, and the reload names them.

use super::Config;
use super::env::{collect_keys, insert_path};

/// Keys a running node takes over on SIGHUP; every other key needs a restart.
pub const LIVE_KEYS: &[&str] = &[
    "myhostname",
    "mynetworks",
    "message_size_limit",
    "debug_peer_list",
    "hop_count_limit",
    "smtpd_recipient_limit",
    "smtpd_recipient_overshoot_limit",
    "disable_vrfy_command",
    "smtpd_helo_required",
    "strict_rfc821_envelopes",
    "smtpd_forbid_bare_newline",
    "reject_unknown_sender_domain",
    "reject_unknown_recipient_domain",
    "smtp.max_connections",
    "smtp.max_connections_per_ip",
    "smtp.reserved_connections_percent",
    "smtp.stress_threshold_percent",
    "smtp.stress_timeout",
    "smtp.command_timeout",
    "smtp.data_timeout",
    "smtp.error_limit",
    "smtp.greet_pause",
    "smtp.peername_lookup",
    "smtp.proxy_networks",
    "smtp.connection_rate_limit",
    "smtp.message_rate_limit",
    "smtp.recipient_rate_limit",
    "smtp.auth_failure_limit",
    "smtp.rate_window",
    "smtp.min_data_rate",
    "tls.cert",
    "tls.key",
    "tls.security_level",
    "tls.handshake_timeout",
    "auth.enabled",
    "auth.tls_only",
];

impl Config {
    /// Key paths whose values differ between `self` and `other`.
    pub fn changed_keys(&self, other: &Config) -> Vec<String> {
        let flat = |c: &Config| {
            let mut keys = Vec::new();
            collect_keys(&toml::Table::try_from(c).unwrap_or_default(), &mut Vec::new(), &mut keys);
            keys.into_iter().map(|(p, v)| (p.join("."), v)).collect::<std::collections::BTreeMap<_, _>>()
        };
        let (a, b) = (flat(self), flat(other));
        a.keys()
            .chain(b.keys())
            .filter(|k| a.get(*k) != b.get(*k))
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// This configuration with the values of `keys` (dotted paths) taken from `other`.
    pub fn with_keys_from(&self, other: &Config, keys: &[String]) -> Config {
        let (Ok(mut mine), Ok(theirs)) = (toml::Table::try_from(self), toml::Table::try_from(other)) else {
            return self.clone();
        };
        for key in keys {
            let path: Vec<String> = key.split('.').map(str::to_string).collect();
            let value = path.iter().try_fold(&theirs, |t, p| match t.get(p) {
                Some(toml::Value::Table(inner)) => Ok(inner),
                Some(v) => Err(Some(v.clone())),
                None => Err(None),
            });
            if let Err(Some(v)) = value {
                insert_path(&mut mine, &path, v);
            }
        }
        toml::Value::Table(mine).try_into().unwrap_or_else(|_| self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SmtpConfig;

    #[test]
    fn live_keys_are_copied_and_others_kept() {
        let old = Config::default();
        let new = Config {
            message_size_limit: 1234567,
            smtp: SmtpConfig { error_limit: 3, listen: "127.0.0.1:1".parse().unwrap(), ..SmtpConfig::default() },
            ..Config::default()
        };
        let changed = old.changed_keys(&new);
        assert_eq!(changed, ["message_size_limit", "smtp.error_limit", "smtp.listen"]);
        let live: Vec<String> = changed.into_iter().filter(|k| LIVE_KEYS.contains(&k.as_str())).collect();
        let applied = old.with_keys_from(&new, &live);
        assert_eq!((applied.message_size_limit, applied.smtp.error_limit), (1234567, 3));
        assert_eq!(applied.smtp.listen, old.smtp.listen);
    }
}
