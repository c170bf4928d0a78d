//! Where the queue's Redis primary is: one server (`redis://`, or
//! `rediss://` over TLS, verified against `queue.tls_ca_file` or the
//! system's roots, with a client certificate when one is set), or the
//! primary a set of Sentinels names
//! (`redis+sentinel://[user:password@]host:port,host:port,…/master[/db]`,
//! or `rediss+sentinel://` with TLS to the Sentinels and the data servers
//! alike; the Sentinels' own credentials are `queue.sentinel_user` and
//! `queue.sentinel_password_file`), asked again every [`SENTINEL_CHECK`]
//! so that a node follows a failover by itself, or a Redis Cluster
//! (`redis+cluster://[user:password@]host:port,host:port,…`, or
//! `rediss+cluster://` over TLS), whose slot map is read the same way (see
//! [`super::cluster`]).
//!
//! Invariant: a primary is only taken from a Sentinel after it answered
//! `ROLE` as a master (the `redis` crate's `async_master_for` checks), so
//! a node never writes to a server that a failover demoted, once the
//! Sentinels know.

use std::time::Duration;

use redis::IntoConnectionInfo;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};

use crate::config::{QueueConfig, mask_url};

/// How often a node asks the Sentinels which server is the primary, or
/// the cluster which primary holds each shard.
pub(super) const SENTINEL_CHECK: Duration = Duration::from_millis(500);
/// Port of a Sentinel given without one.
const SENTINEL_PORT: u16 = 26379;
/// Port of a cluster node given without one.
const REDIS_PORT: u16 = 6379;
const SENTINEL_SCHEMES: [(&str, &str); 2] = [("redis+sentinel://", "redis"), ("rediss+sentinel://", "rediss")];
const CLUSTER_SCHEMES: [(&str, &str); 2] = [("redis+cluster://", "redis"), ("rediss+cluster://", "rediss")];

/// What `queue.url` names.
pub(super) enum Endpoint {
    /// One server, always the same.
    Server(redis::Client),
    /// The primary of `master` as the Sentinels see it.
    Sentinel(SentinelSet),
    /// The primaries of a Redis Cluster, one per shard.
    Cluster(ClusterSeeds),
}

/// What a `redis+cluster://` URL names: where to ask for the slot map
/// first, and how to reach any node of the cluster.
pub(super) struct ClusterSeeds {
    /// `host:port` of the nodes the URL lists.
    pub(super) seeds: Vec<String>,
    /// `redis` or `rediss`.
    scheme: &'static str,
    /// `user:password@` as written (percent-escaped), or empty.
    auth: String,
    tls: Option<TlsFiles>,
}

/// The contents of `queue.tls_ca_file`, `queue.tls_cert`, `queue.tls_key`.
#[derive(Clone)]
struct TlsFiles {
    root_cert: Option<Vec<u8>>,
    client: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsFiles {
    /// `None` when no file is set (the system's roots, no client certificate).
    fn read(config: &QueueConfig) -> Result<Option<TlsFiles>, Problem> {
        if config.tls_ca_file.is_empty() && config.tls_cert.is_empty() {
            return Ok(None);
        }
        let read = |key: &'static str, path: &str| {
            std::fs::read(path).map_err(|e| Problem { key, text: format!("cannot read {path:?}: {e}") })
        };
        let root_cert = match config.tls_ca_file.as_str() {
            "" => None,
            path => Some(read("queue.tls_ca_file", path)?),
        };
        let client = match (config.tls_cert.as_str(), config.tls_key.as_str()) {
            ("", _) | (_, "") => None,
            (cert, key) => Some((read("queue.tls_cert", cert)?, read("queue.tls_key", key)?)),
        };
        Ok(Some(TlsFiles { root_cert, client }))
    }

    fn certificates(&self) -> redis::TlsCertificates {
        let client_tls = self
            .client
            .as_ref()
            .map(|(cert, key)| redis::ClientTlsConfig { client_cert: cert.clone(), client_key: key.clone() });
        redis::TlsCertificates { client_tls, root_cert: self.root_cert.clone() }
    }

    fn client(&self, url: &str) -> Result<redis::Client, Problem> {
        redis::Client::build_with_tls(url, self.certificates()).map_err(|e| Problem {
            key: "queue.tls_ca_file",
            text: format!("the TLS files for {} are not usable: {e}", mask_url(url)),
        })
    }
}

impl ClusterSeeds {
    /// A client for the cluster node at `addr` (`host:port`), with the
    /// URL's credentials and TLS.
    pub(super) fn client(&self, addr: &str) -> Result<redis::Client, Problem> {
        let url = format!("{}://{}{addr}/", self.scheme, self.auth);
        match &self.tls {
            Some(tls) if self.scheme == "rediss" => tls.client(&url),
            _ => redis::Client::open(url.as_str()).map_err(|e| Problem { key: "queue.url", text: e.to_string() }),
        }
    }

    /// Parses a `redis+cluster://` or `rediss+cluster://` URL.
    fn parse(url: &str, tls: Option<TlsFiles>) -> Result<ClusterSeeds, String> {
        let (rest, scheme) = strip_scheme(url, &CLUSTER_SCHEMES).ok_or("is not a cluster URL")?;
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((u, r)) => (format!("{u}@"), r),
            None => (String::new(), rest),
        };
        let hosts = rest.trim_end_matches('/');
        if hosts.contains('/') {
            return Err("names a database, but a Redis Cluster has only database 0".into());
        }
        let mut seeds = Vec::new();
        for host in hosts.split(',').map(str::trim) {
            if host.is_empty() {
                return Err("names no cluster node (host:port,host:port,…)".into());
            }
            seeds.push(if has_port(host) { host.to_string() } else { format!("{host}:{REDIS_PORT}") });
        }
        let parsed = ClusterSeeds { seeds, scheme, auth, tls };
        // Every seed must make a valid URL (host syntax, escapes).
        for seed in &parsed.seeds {
            parsed.client(seed).map_err(|p| format!("{seed:?}: {}", p.text))?;
        }
        Ok(parsed)
    }
}

pub(super) struct SentinelSet {
    /// Asks the Sentinels, and checks with `ROLE` the primary they name.
    pub(super) client: SentinelClient,
    pub(super) master: String,
    /// The Sentinels, for logs.
    pub(super) hosts: String,
}

/// What is wrong with the queue's configuration: the key, and why.
#[derive(Debug)]
pub struct Problem {
    pub key: &'static str,
    pub text: String,
}

impl Endpoint {
    /// Reads `queue.url` (and the TLS files of `rediss://`).
    pub(super) fn open(config: &QueueConfig) -> Result<Endpoint, Problem> {
        let url = config.url.as_str();
        let problem = |key, text: String| Problem { key, text };
        let tls = TlsFiles::read(config)?;
        if strip_scheme(url, &SENTINEL_SCHEMES).is_some() {
            let auth = SentinelAuth::read(config)?;
            let set = SentinelUrl::parse(url).and_then(|u| u.build(tls.as_ref(), auth));
            return set.map(Endpoint::Sentinel).map_err(|e| problem("queue.url", e));
        }
        if strip_scheme(url, &CLUSTER_SCHEMES).is_some() {
            return ClusterSeeds::parse(url, tls).map(Endpoint::Cluster).map_err(|e| problem("queue.url", e));
        }
        match tls {
            Some(tls) if url.starts_with("rediss://") => tls.client(url).map(Endpoint::Server),
            _ => redis::Client::open(url).map(Endpoint::Server).map_err(|e| problem("queue.url", e.to_string())),
        }
    }
}

/// What a `redis+sentinel://` or `rediss+sentinel://` URL names.
struct SentinelUrl {
    sentinels: Vec<redis::ConnectionAddr>,
    master: String,
    /// Credentials and database for the data servers (not the Sentinels).
    data: redis::RedisConnectionInfo,
    tls: bool,
    /// The Sentinels as written, for logs.
    hosts: String,
}

impl SentinelUrl {
    /// Parses the URL; the error says what is wrong.
    fn parse(url: &str) -> Result<SentinelUrl, String> {
        let (rest, scheme) = strip_scheme(url, &SENTINEL_SCHEMES).ok_or("is not a Sentinel URL")?;
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
            let info =
                format!("{scheme}://{with_port}").into_connection_info().map_err(|e| format!("{host:?}: {e}"))?;
            sentinels.push(info.addr().clone());
        }
        // Decoded by the crate as for any redis:// URL (percent-escapes).
        let userinfo = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
        let data = format!("redis://{userinfo}localhost/{db}")
            .into_connection_info()
            .map_err(|e| format!("credentials: {e}"))?
            .redis_settings()
            .clone();
        Ok(SentinelUrl {
            sentinels,
            master: master.to_string(),
            data,
            tls: scheme == "rediss",
            hosts: hosts.to_string(),
        })
    }

    /// The client that asks the Sentinels and checks the primary they name.
    fn build(self, tls: Option<&TlsFiles>, auth: SentinelAuth) -> Result<SentinelSet, String> {
        let data = &self.data;
        let mut builder = SentinelClientBuilder::new(self.sentinels, &self.master, SentinelServerType::Master)
            .map_err(|e| e.to_string())?
            .set_client_to_redis_db(data.db());
        if let Some(user) = data.username() {
            builder = builder.set_client_to_redis_username(user);
        }
        if let Some(password) = data.password() {
            builder = builder.set_client_to_redis_password(password);
        }
        if let Some(user) = auth.user {
            builder = builder.set_client_to_sentinel_username(user);
        }
        if let Some(password) = auth.password {
            builder = builder.set_client_to_sentinel_password(password);
        }
        if self.tls {
            builder = builder.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
            if let Some(tls) = tls {
                builder = builder
                    .set_client_to_redis_certificates(tls.certificates())
                    .set_client_to_sentinel_certificates(tls.certificates());
            }
        }
        let client = builder.build().map_err(|e| e.to_string())?;
        Ok(SentinelSet { client, master: self.master, hosts: self.hosts })
    }
}

/// The Sentinels' own credentials (`queue.sentinel_user`,
/// `queue.sentinel_password_file`).
#[derive(Default)]
struct SentinelAuth {
    user: Option<String>,
    password: Option<String>,
}

impl SentinelAuth {
    fn read(config: &QueueConfig) -> Result<SentinelAuth, Problem> {
        let user = Some(config.sentinel_user.clone()).filter(|u| !u.is_empty());
        let password = match config.sentinel_password_file.as_str() {
            "" => None,
            path => {
                let text = std::fs::read_to_string(path).map_err(|e| Problem {
                    key: "queue.sentinel_password_file",
                    text: format!("cannot read {path:?}: {e}"),
                })?;
                Some(text.trim_end_matches(['\r', '\n']).to_string())
            }
        };
        Ok(SentinelAuth { user, password })
    }
}

/// The rest of `url` after the first of `schemes` it starts with, and that
/// scheme's plain form (`redis` or `rediss`).
fn strip_scheme<'a>(url: &'a str, schemes: &[(&str, &'static str)]) -> Option<(&'a str, &'static str)> {
    schemes.iter().find_map(|(prefix, scheme)| url.strip_prefix(prefix).map(|r| (r, *scheme)))
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

    fn sentinel(url: &str) -> SentinelUrl {
        SentinelUrl::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    #[test]
    fn a_sentinel_url_names_the_sentinels_the_master_and_the_database() {
        let s = sentinel("redis+sentinel://h1:26380,h2,[::1]:26381/mymaster/3");
        assert_eq!((s.master.as_str(), s.data.db()), ("mymaster", 3));
        assert_eq!(s.hosts, "h1:26380,h2,[::1]:26381");
        let addrs: Vec<String> = s.sentinels.iter().map(ToString::to_string).collect();
        assert_eq!(addrs, ["h1:26380", "h2:26379", "::1:26381"]);
        assert!(!s.tls && matches!(s.sentinels[0], redis::ConnectionAddr::Tcp(..)));
        assert_eq!((s.data.username(), s.data.password()), (None, None));
        let s = sentinel("redis+sentinel://app:p%40ss@127.0.0.1:1/queue/");
        assert_eq!((s.master.as_str(), s.data.db()), ("queue", 0));
        assert_eq!((s.data.username(), s.data.password()), (Some("app"), Some("p@ss")), "decoded");
        let s = sentinel("rediss+sentinel://h1,h2/m");
        assert!(
            s.tls && s.sentinels.iter().all(|a| matches!(a, redis::ConnectionAddr::TcpTls { insecure: false, .. }))
        );
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
            let e = SentinelUrl::parse(url).err().unwrap_or_else(|| panic!("{url} accepted"));
            assert!(e.contains(says), "{url}: {e}");
        }
        let with = |url: &str| QueueConfig { url: url.into(), ..QueueConfig::default() };
        assert!(problem(&with("redis://127.0.0.1:6379/0")).is_none());
        assert!(problem(&with("sqlite:///tmp/x.db")).is_none());
        assert!(problem(&with("redis+sentinel://h/m")).is_none());
        let unread = QueueConfig { sentinel_password_file: "/nonexistent/pw".into(), ..with("redis+sentinel://h/m") };
        let p = problem(&unread).expect("an unreadable Sentinel password file");
        assert_eq!(p.key, "queue.sentinel_password_file");
        let missing = QueueConfig { tls_ca_file: "/nonexistent/ca.pem".into(), ..with("rediss://h:6380/0") };
        let p = problem(&missing).expect("an unreadable CA file");
        assert_eq!(p.key, "queue.tls_ca_file");
        assert!(p.text.contains("cannot read \"/nonexistent/ca.pem\""), "{}", p.text);
    }

    #[test]
    fn a_cluster_url_names_its_seeds_with_default_ports_and_keeps_the_credentials() {
        let with = |url: &str| QueueConfig { url: url.into(), ..QueueConfig::default() };
        let Ok(Endpoint::Cluster(c)) = Endpoint::open(&with("redis+cluster://app:p%40ss@h1:7000,h2,[::1]:7002/"))
        else {
            panic!("not a cluster")
        };
        assert_eq!(c.seeds, ["h1:7000", "h2:6379", "[::1]:7002"]);
        let info = c.client("10.0.0.5:7005").unwrap().get_connection_info().clone();
        assert_eq!(info.addr().to_string(), "10.0.0.5:7005");
        assert_eq!((info.redis_settings().username(), info.redis_settings().password()), (Some("app"), Some("p@ss")));
        assert!(matches!(Endpoint::open(&with("rediss+cluster://h1")), Ok(Endpoint::Cluster(_))));
        for (url, says) in
            [("redis+cluster://h1:7000/3", "only database 0"), ("redis+cluster://h1,,h2", "names no cluster node")]
        {
            let p = problem(&with(url)).unwrap_or_else(|| panic!("{url} accepted"));
            assert_eq!(p.key, "queue.url");
            assert!(p.text.contains(says), "{url}: {}", p.text);
        }
    }

    #[test]
    fn ports_are_recognised() {
        assert!(has_port("h:1") && has_port("[::1]:26379") && has_port("10.0.0.1:26379"));
        assert!(!has_port("h") && !has_port("[::1]") && !has_port("h:x"));
    }
}
