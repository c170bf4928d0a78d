//! Where the queue's Redis primary is: one server (`redis://`, or
//! `rediss://` over TLS, verified against `queue.tls_ca_file` or the
//! system's roots, with a client certificate when one is set), or the
//! primary a set of Sentinels names
//! (`redis+sentinel://[user:password@]host:port,host:port,…/master[/db]`),
//! asked again every [`SENTINEL_CHECK`] so that a node follows a failover
//! by itself.
//!
//! Invariant: a primary is only taken from a Sentinel after it answered
//! `ROLE` as a master (the `redis` crate's `async_master_for` checks), so
//! a node never writes to a server that a failover demoted, once the
//! Sentinels know.

use std::time::Duration;

use redis::IntoConnectionInfo;
use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};

use crate::config::QueueConfig;

/// How often a node asks the Sentinels which server is the primary.
pub(super) const SENTINEL_CHECK: Duration = Duration::from_millis(500);
/// Port of a Sentinel given without one.
const SENTINEL_PORT: u16 = 26379;
const SENTINEL_SCHEME: &str = "redis+sentinel://";

/// What `queue.url` names.
pub(super) enum Endpoint {
    /// One server, always the same.
    Server(redis::Client),
    /// The primary of `master` as the Sentinels see it.
    Sentinel(SentinelSet),
}

pub(super) struct SentinelSet {
    pub(super) sentinel: Sentinel,
    pub(super) master: String,
    /// Credentials and database for the data servers (not the Sentinels).
    pub(super) redis: redis::RedisConnectionInfo,
    /// The Sentinels, for logs.
    pub(super) hosts: String,
}

/// What is wrong with the queue's configuration: the key, and why.
pub struct Problem {
    pub key: &'static str,
    pub text: String,
}

impl Endpoint {
    /// Reads `queue.url` (and the TLS files of `rediss://`).
    pub(super) fn open(config: &QueueConfig) -> Result<Endpoint, Problem> {
        let url = config.url.as_str();
        let problem = |key, text: String| Problem { key, text };
        if url.starts_with(SENTINEL_SCHEME) {
            return Endpoint::parse_sentinel(url).map_err(|e| problem("queue.url", e));
        }
        if !url.starts_with("rediss://") || (config.tls_ca_file.is_empty() && config.tls_cert.is_empty()) {
            return redis::Client::open(url).map(Endpoint::Server).map_err(|e| problem("queue.url", e.to_string()));
        }
        let read = |key: &'static str, path: &str| {
            std::fs::read(path).map_err(|e| problem(key, format!("cannot read {path:?}: {e}")))
        };
        let root_cert = match config.tls_ca_file.as_str() {
            "" => None,
            path => Some(read("queue.tls_ca_file", path)?),
        };
        let client_tls = match (config.tls_cert.as_str(), config.tls_key.as_str()) {
            ("", _) | (_, "") => None,
            (cert, key) => Some(redis::ClientTlsConfig {
                client_cert: read("queue.tls_cert", cert)?,
                client_key: read("queue.tls_key", key)?,
            }),
        };
        let certs = redis::TlsCertificates { client_tls, root_cert };
        redis::Client::build_with_tls(url, certs)
            .map(Endpoint::Server)
            .map_err(|e| problem("queue.tls_ca_file", format!("the TLS files of {url:?} are not usable: {e}")))
    }

    /// Parses a `redis+sentinel://` URL; the error says what is wrong.
    fn parse_sentinel(url: &str) -> Result<Endpoint, String> {
        let rest = url.strip_prefix(SENTINEL_SCHEME).unwrap_or(url);
        let (userinfo, rest) = match rest.rsplit_once('@') {
            Some((u, r)) => (Some(u), r),
            None => (None, rest),
        };
        let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut segments = path.trim_end_matches('/').split('/');
        let master = segments.next().filter(|m| !m.is_empty()).ok_or("names no master (…/mymaster at the end)")?;
        let db = match segments.next() {
            None => 0,
            Some(d) => d.parse::<i64>().map_err(|_| format!("{d:?} is not a database number"))?,
        };
        if segments.next().is_some() {
            return Err("has more than a master and a database after the Sentinels".into());
        }
        let mut sentinels = Vec::new();
        for host in hosts.split(',').map(str::trim) {
            if host.is_empty() {
                return Err("names no Sentinel (host:port,host:port,…)".into());
            }
            let with_port = if has_port(host) { host.to_string() } else { format!("{host}:{SENTINEL_PORT}") };
            let info = format!("redis://{with_port}").into_connection_info().map_err(|e| format!("{host:?}: {e}"))?;
            sentinels.push(info);
        }
        // Decoded by the crate as for any redis:// URL (percent-escapes).
        let auth = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
        let redis = format!("redis://{auth}localhost/{db}")
            .into_connection_info()
            .map_err(|e| format!("credentials: {e}"))?
            .redis_settings()
            .clone();
        let sentinel = Sentinel::build(sentinels).map_err(|e| e.to_string())?;
        Ok(Endpoint::Sentinel(SentinelSet { sentinel, master: master.to_string(), redis, hosts: hosts.to_string() }))
    }
}

impl SentinelSet {
    /// How to connect to the data servers the Sentinels name.
    pub(super) fn node(&self) -> SentinelNodeConnectionInfo {
        SentinelNodeConnectionInfo::default().set_redis_connection_info(self.redis.clone())
    }
}

/// `host:port`, `[v6]:port`: a port is given.
fn has_port(host: &str) -> bool {
    match host.rsplit_once(':') {
        Some((h, p)) => !h.ends_with('[') && !p.ends_with(']') && p.parse::<u16>().is_ok(),
        None => false,
    }
}

/// What is wrong with a Redis queue's URL or TLS files, if anything (for
/// the start-up check, which names the key).
pub fn problem(config: &QueueConfig) -> Option<Problem> {
    if config.url.starts_with("sqlite:") {
        return None;
    }
    Endpoint::open(config).err()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sentinel(url: &str) -> SentinelSet {
        match Endpoint::parse_sentinel(url) {
            Ok(Endpoint::Sentinel(s)) => s,
            Ok(Endpoint::Server(_)) => panic!("{url}: not a Sentinel set"),
            Err(e) => panic!("{url}: {e}"),
        }
    }

    #[test]
    fn a_sentinel_url_names_the_sentinels_the_master_and_the_database() {
        let s = sentinel("redis+sentinel://h1:26380,h2,[::1]:26381/mymaster/3");
        assert_eq!((s.master.as_str(), s.redis.db()), ("mymaster", 3));
        assert_eq!(s.hosts, "h1:26380,h2,[::1]:26381");
        assert_eq!((s.redis.username(), s.redis.password()), (None, None));
        let s = sentinel("redis+sentinel://app:p%40ss@127.0.0.1:1/queue/");
        assert_eq!((s.master.as_str(), s.redis.db()), ("queue", 0));
        assert_eq!((s.redis.username(), s.redis.password()), (Some("app"), Some("p@ss")), "decoded");
    }

    #[test]
    fn a_wrong_url_says_what_is_wrong() {
        for (url, says) in [
            ("redis+sentinel://h1:26379", "names no master"),
            ("redis+sentinel://h1:26379/", "names no master"),
            ("redis+sentinel://h1,,h2/m", "names no Sentinel"),
            ("redis+sentinel://h1/m/x", "is not a database number"),
            ("redis+sentinel://h1/m/0/extra", "more than a master"),
        ] {
            let e = Endpoint::parse_sentinel(url).err().unwrap_or_else(|| panic!("{url} accepted"));
            assert!(e.contains(says), "{url}: {e}");
        }
        let with = |url: &str| QueueConfig { url: url.into(), ..QueueConfig::default() };
        assert!(problem(&with("redis://127.0.0.1:6379/0")).is_none());
        assert!(problem(&with("sqlite:///tmp/x.db")).is_none());
        assert!(problem(&with("redis+sentinel://h/m")).is_none());
        let missing = QueueConfig { tls_ca_file: "/nonexistent/ca.pem".into(), ..with("rediss://h:6380/0") };
        let p = problem(&missing).expect("an unreadable CA file");
        assert_eq!(p.key, "queue.tls_ca_file");
        assert!(p.text.contains("cannot read \"/nonexistent/ca.pem\""), "{}", p.text);
    }

    #[test]
    fn ports_are_recognised() {
        assert!(has_port("h:1") && has_port("[::1]:26379") && has_port("10.0.0.1:26379"));
        assert!(!has_port("h") && !has_port("[::1]") && !has_port("h:x"));
    }
}
