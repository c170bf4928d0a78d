//! One typed configuration: defaults, then the TOML file, then `MXRELAY_*`
//! environment variables (key path upper-cased, `.` → `_`:
//! `smtp.listen` → `MXRELAY_SMTP_LISTEN`). Every error names the key (and
//! the variable, when the value came from one) and the fix; a zero duration
//! is refused unless 0 has a documented meaning for that key. Nothing deeper
//! in the code looks a key up by string.

mod load;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Prefix of every environment override.
pub const ENV_PREFIX: &str = "MXRELAY_";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Stable name of this node: consumer name in the queue, `Received:` and
    /// logs. Default: the host name.
    pub node_id: String,
    /// Name in the greeting and `Received:` (Postfix `myhostname`).
    /// Default: the host name.
    pub myhostname: String,
    /// Clients that may relay anywhere (Postfix `mynetworks`, CIDR list).
    pub mynetworks: Vec<String>,
    /// Largest message accepted, in bytes (Postfix `message_size_limit`).
    pub message_size_limit: u64,
    /// Client IPs, CIDRs or host names whose SMTP transcript is logged
    /// (Postfix `debug_peer_list`).
    pub debug_peer_list: Vec<String>,
    /// Refuse mail already carrying more `Received:` headers than this
    /// (Postfix `hop_count_limit`).
    pub hop_count_limit: usize,
    /// Recipients per message (Postfix `smtpd_recipient_limit`).
    pub smtpd_recipient_limit: usize,
    /// RCPTs past `smtpd_recipient_limit` answered `452 4.5.3` without
    /// counting toward `smtp.error_limit`, so that a client pipelining more
    /// recipients keeps the ones accepted and sends the rest later (Postfix
    /// `smtpd_recipient_overshoot_limit`, RFC 5321 §4.5.3.1.10).
    pub smtpd_recipient_overshoot_limit: usize,
    /// Postfix `disable_vrfy_command`: VRFY answers 502 5.5.1.
    pub disable_vrfy_command: bool,
    /// Postfix `smtpd_helo_required`.
    pub smtpd_helo_required: bool,
    /// Postfix `strict_rfc821_envelopes`: addresses need angle brackets.
    pub strict_rfc821_envelopes: bool,
    /// Postfix `smtpd_forbid_bare_newline`: `true` refuses a message with a
    /// bare LF (554 5.6.0); `false` normalises it to CRLF.
    pub smtpd_forbid_bare_newline: bool,
    /// Postfix `reject_unknown_sender_domain` (450 4.1.8).
    pub reject_unknown_sender_domain: bool,
    /// Postfix `reject_unknown_recipient_domain` (450 4.1.2).
    pub reject_unknown_recipient_domain: bool,
    /// Run database migrations when `serve` starts.
    pub migrate_on_start: bool,
    /// Where the embedded store keeps its SQLite database when `domains.url`
    /// or `queue.url` is not set (single node, no MySQL/Redis).
    pub data_dir: String,
    pub smtp: SmtpConfig,
    pub admin: AdminConfig,
    pub domains: DomainsConfig,
    pub queue: QueueConfig,
    pub dns: DnsConfig,
    pub delivery: DeliveryConfig,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
    pub scan: ScanConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Deliver from the queue on this node (`false`: receive only).
    pub enabled: bool,
    /// Concurrent deliveries on this node.
    pub concurrency: usize,
    /// Concurrent connections to one destination from this node, so a
    /// recovering primary is not flooded
    /// (Postfix `default_destination_concurrency_limit`).
    pub destination_concurrency: usize,
    /// First retry delay, doubled per attempt (Postfix `minimal_backoff_time`).
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    /// Longest retry delay (Postfix `maximal_backoff_time`).
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Undeliverable after this long: bounced (Postfix `maximal_queue_lifetime`).
    /// 0 = try once: the first temporary failure bounces, as in Postfix.
    #[serde(with = "humantime_serde")]
    pub max_queue_lifetime: Duration,
    /// Postfix `smtp_connect_timeout`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Postfix `smtp_helo_timeout` (greeting and EHLO).
    #[serde(with = "humantime_serde")]
    pub greeting_timeout: Duration,
    /// Postfix `smtp_mail_timeout`/`smtp_rcpt_timeout`/`smtp_quit_timeout`.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Postfix `smtp_data_xfer_timeout` / `smtp_data_done_timeout`.
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    /// Longest line sent, CRLF not counted; longer ones are folded with
    /// CRLF SPACE (Postfix `smtp_line_length_limit`; 0: never fold).
    pub line_length_limit: usize,
    /// Each destination with deferred mail gets one attempt this often, so a
    /// recovered primary is noticed (and drained) quickly.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// On SIGTERM, how long in-flight deliveries may finish before they are
    /// handed back to the cluster; 0 = hand them back at once.
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
    /// Outbound STARTTLS security level (Postfix `smtp_tls_security_level`):
    /// `none` (never), `may` (when offered, certificate not checked, clear
    /// if the handshake fails), `encrypt` (required, not checked) or
    /// `verify` (required, certificate trusted and matching the host name).
    /// Required TLS that fails defers the mail. Needs a restart to change.
    pub tls_policy: String,
    /// Per recipient domain levels over `tls_policy` (Postfix
    /// `smtp_tls_policy_maps`): `"example.com" = "verify"` matches that
    /// domain exactly, `".example.com" = "encrypt"` its subdomains. Keys
    /// with a leading dot must be quoted in TOML.
    #[serde(deserialize_with = "crate::delivery::tls::deserialize_policy_map")]
    pub tls_policy_map: std::collections::BTreeMap<String, String>,
    /// PEM file of extra trust anchors for `verify`, added to the built-in
    /// webpki-roots (Postfix `smtp_tls_CAfile`). Empty: webpki-roots only.
    pub tls_ca_file: String,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            enabled: true,
            concurrency: 50,
            destination_concurrency: 20,
            retry_min: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
            max_queue_lifetime: Duration::from_secs(5 * 86400),
            connect_timeout: Duration::from_secs(30),
            greeting_timeout: Duration::from_secs(300),
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            line_length_limit: 998,
            probe_interval: Duration::from_secs(10),
            stop_grace: Duration::from_secs(10),
            tls_policy: "may".into(),
            tls_policy_map: std::collections::BTreeMap::new(),
            tls_ca_file: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpConfig {
    /// Address of the SMTP listener.
    pub listen: String,
    /// Concurrent SMTP sessions on this node (421 4.7.0 beyond).
    pub max_connections: usize,
    /// Share of `max_connections` (percent) kept for `mynetworks` clients
    /// once the rest is busy; half of it may go to clients that must
    /// authenticate before MAIL (when AUTH is on). 0: no reserve.
    pub reserved_connections_percent: u32,
    /// Busy share of `max_connections` (percent) from which the node is
    /// under stress: `stress_timeout` caps the command and data timeouts
    /// (Postfix's `${stress?...}`). 0: never.
    pub stress_threshold_percent: u32,
    /// Longest wait for a command or for content while under stress.
    #[serde(with = "humantime_serde")]
    pub stress_timeout: Duration,
    /// Concurrent sessions per client IP (Postfix
    /// `smtpd_client_connection_count_limit`); `mynetworks` is exempt.
    pub max_connections_per_ip: usize,
    /// Idle time allowed between commands (Postfix `smtpd_timeout`).
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Idle time allowed while reading message content.
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    /// Errors in one session before it is closed (Postfix
    /// `smtpd_hard_error_limit`).
    pub error_limit: u32,
    /// Wait this long before the greeting; a client that talks first is
    /// refused (Postfix `reject_unauth_pipelining` / postscreen pregreet);
    /// 0 (the default) = greet at once.
    #[serde(with = "humantime_serde")]
    pub greet_pause: Duration,
    /// Reverse-resolve the client address for `Received:` and logs
    /// (Postfix `smtpd_peername_lookup`).
    pub peername_lookup: bool,
    /// Expect a HAProxy PROXY protocol header (v1 or v2) from the load
    /// balancers in `proxy_networks` on every listener (Postfix
    /// `smtpd_upstream_proxy_protocol = haproxy`).
    pub proxy_protocol: bool,
    /// Addresses/CIDRs of the load balancers allowed to send a PROXY header.
    pub proxy_networks: Vec<String>,
    /// New connections per client IP per `rate_window` (Postfix
    /// `smtpd_client_connection_rate_limit`); 0 = no limit.
    pub connection_rate_limit: u32,
    /// Messages (MAIL commands) per client IP per `rate_window` (Postfix
    /// `smtpd_client_message_rate_limit`); 0 = no limit.
    pub message_rate_limit: u32,
    /// Recipients per client IP per `rate_window` (Postfix
    /// `smtpd_client_recipient_rate_limit`); 0 = no limit.
    pub recipient_rate_limit: u32,
    /// Failed AUTH attempts per client IP per `rate_window` before AUTH
    /// from it is refused (Postfix `smtpd_client_auth_rate_limit`).
    pub auth_failure_limit: u32,
    /// The window of the per-client rate limits (Postfix `anvil_rate_time_unit`).
    #[serde(with = "humantime_serde")]
    pub rate_window: Duration,
    /// Slowest message content accepted, bytes per second, after the first
    /// `data_timeout` (Postfix `smtpd_min_data_rate`); 0 = off.
    pub min_data_rate: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain for STARTTLS and the implicit-TLS listener
    /// (Postfix `smtpd_tls_chain_files`); re-read on SIGHUP.
    pub cert: String,
    /// PEM private key for `cert`.
    pub key: String,
    /// `none`, `may` (offer STARTTLS) or `encrypt` (require it before MAIL
    /// and AUTH), as Postfix `smtpd_tls_security_level`.
    pub security_level: String,
    /// Address of an implicit-TLS listener (port 465 style, Postfix
    /// `smtpd_tls_wrappermode`); empty = none.
    pub implicit_listen: String,
    /// Longest TLS handshake allowed.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: String::new(),
            key: String::new(),
            security_level: "may".into(),
            implicit_listen: String::new(),
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Offer SMTP AUTH PLAIN/LOGIN against the `relay_users` table (Postfix
    /// `smtpd_sasl_auth_enable`); an authenticated client may relay.
    pub enabled: bool,
    /// Offer AUTH only inside TLS (Postfix `smtpd_tls_auth_only`).
    pub tls_only: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScanConfig {
    /// clamd address: `host:port` or `unix:/path`; empty = no virus scan.
    pub clamd: String,
    /// rspamd base URL, e.g. `http://127.0.0.1:11333`; empty = no spam scan.
    pub rspamd: String,
    /// Longest wait for a scanner (a slot, the connection and the answer).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Messages scanned at once on this node.
    pub concurrency: usize,
    /// `tempfail` (451 4.7.1, the sender retries) or `accept` (accepted
    /// with a header saying it was not scanned) when a scanner fails.
    pub on_failure: String,
    /// Messages larger than this (bytes) are not scanned and get a header
    /// saying so (keep it under clamd's StreamMaxLength).
    pub max_size: u64,
    /// Prepended to the Subject when rspamd says `rewrite subject` without
    /// giving the new subject itself.
    pub spam_subject_tag: String,
}

impl Default for ScanConfig {
    fn default() -> Self {
        ScanConfig {
            clamd: String::new(),
            rspamd: String::new(),
            timeout: Duration::from_secs(30),
            concurrency: 16,
            on_failure: "tempfail".into(),
            max_size: 20 * 1024 * 1024,
            spam_subject_tag: "***SPAM*** ".into(),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig { enabled: false, tls_only: true }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the HTTP listener for `/metrics`, `/healthz`, `/readyz`.
    pub listen: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DomainsConfig {
    /// `mysql://user:password@host:port/database` holding table `domains`
    /// (cluster), or `sqlite://path` (embedded). Unset: the embedded store
    /// in `data_dir`.
    pub url: String,
    /// How often every node reloads its domain snapshot.
    #[serde(with = "humantime_serde")]
    pub refresh: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// `redis://host:port/db` of the shared queue (cluster), or
    /// `sqlite://path` (embedded). Unset: the embedded store in `data_dir`.
    pub url: String,
    /// Key prefix; every node of one cluster must use the same.
    pub prefix: String,
    /// Queue shards (hash-tagged key groups), chosen per message at enqueue.
    pub shards: u32,
    /// With a Redis replica: replicas that must acknowledge a message (WAIT)
    /// before it is answered 250. 0 = do not wait.
    pub min_replicas_ack: u32,
    /// How long WAIT may take before the message is refused with 451.
    #[serde(with = "humantime_serde")]
    pub replicas_ack_timeout: Duration,
    /// Longest time one Redis command may take before it counts as failed.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Bodies larger than this are streamed to Redis in chunks of this size.
    pub chunk_size: usize,
    /// A delivery not renewed for this long is taken over by another node.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// Nameservers as `ip:port`; empty = the system's `/etc/resolv.conf`.
    pub nameservers: Vec<String>,
    /// Longest wait for one DNS query.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `info,mxrelay::smtp=debug`.
    pub level: String,
    /// `text` (reads like Postfix's mail log) or `json`.
    pub format: String,
}

fn host_name() -> String {
    gethostname::gethostname().into_string().ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "localhost".to_string())
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: host_name(),
            myhostname: host_name(),
            mynetworks: vec!["127.0.0.1/32".into(), "::1/128".into()],
            message_size_limit: 50 * 1024 * 1024,
            debug_peer_list: vec![],
            hop_count_limit: 50,
            smtpd_recipient_limit: 1000,
            smtpd_recipient_overshoot_limit: 1000,
            disable_vrfy_command: true,
            smtpd_helo_required: true,
            strict_rfc821_envelopes: true,
            smtpd_forbid_bare_newline: true,
            reject_unknown_sender_domain: true,
            reject_unknown_recipient_domain: true,
            migrate_on_start: true,
            data_dir: "./mxrelay-data".into(),
            smtp: SmtpConfig::default(),
            admin: AdminConfig::default(),
            domains: DomainsConfig::default(),
            queue: QueueConfig::default(),
            dns: DnsConfig::default(),
            delivery: DeliveryConfig::default(),
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            scan: ScanConfig::default(),
            log: LogConfig::default(),
        }
    }
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: "127.0.0.1:2525".into(),
            max_connections: 1000,
            max_connections_per_ip: 50,
            reserved_connections_percent: 5,
            stress_threshold_percent: 80,
            stress_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(300),
            error_limit: 20,
            greet_pause: Duration::ZERO,
            peername_lookup: true,
            proxy_protocol: false,
            proxy_networks: vec![],
            connection_rate_limit: 0,
            message_rate_limit: 0,
            recipient_rate_limit: 0,
            auth_failure_limit: 10,
            rate_window: Duration::from_secs(60),
            min_data_rate: 500,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { listen: "127.0.0.1:9425".into() }
    }
}

impl Default for DomainsConfig {
    fn default() -> Self {
        DomainsConfig { url: String::new(), refresh: Duration::from_secs(30) }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            url: String::new(),
            prefix: "mxr".into(),
            shards: 4,
            min_replicas_ack: 0,
            replicas_ack_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
            chunk_size: 256 * 1024,
            lease: Duration::from_secs(60),
        }
    }
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig { nameservers: vec![], timeout: Duration::from_secs(5) }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".into(), format: "text".into() }
    }
}

/// A configuration problem: the key, what is wrong, and how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem} (fix: {fix})", self.named())]
pub struct ConfigError {
    /// The key path (`smtp.command_timeout`), or what else is at fault (an
    /// unknown variable's name, the file).
    pub key: String,
    /// The `MXRELAY_*` variable the bad value came from, if it did.
    pub env: Option<String>,
    /// What is wrong, with the bad value.
    pub problem: String,
    pub fix: String,
}

impl ConfigError {
    fn new(key: &str, problem: impl Into<String>, fix: impl Into<String>) -> Self {
        ConfigError { key: key.to_string(), env: None, problem: problem.into(), fix: fix.into() }
    }

    /// `smtp.command_timeout (MXRELAY_SMTP_COMMAND_TIMEOUT)`, or the key alone.
    fn named(&self) -> String {
        match &self.env {
            Some(env) => format!("{} ({env})", self.key),
            None => self.key.clone(),
        }
    }
}

/// Duration keys whose floor is not "more than 0s": where 0 has a meaning
/// (said in the key's doc), or where it must be longer still.
const DURATION_FLOORS: &[(&str, Duration)] = &[
    ("smtp.greet_pause", Duration::ZERO),            // 0: greet at once
    ("delivery.stop_grace", Duration::ZERO),         // 0: hand back at once
    ("delivery.max_queue_lifetime", Duration::ZERO), // 0: try once (Postfix)
    ("smtp.rate_window", Duration::from_secs(1)),
    ("domains.refresh", Duration::from_secs(1)),
    ("queue.lease", Duration::from_secs(1)),
];

/// Settings derived from [`Config`] once it is validated.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub smtp_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// The implicit-TLS listener, if any.
    pub tls_listen: Option<SocketAddr>,
    pub mynetworks: Vec<IpNet>,
    pub nameservers: Vec<SocketAddr>,
}

impl Config {
    /// Defaults, then `file` (if any), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Config, Vec<ConfigError>> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(file, &env)
    }

    /// Checks every key and returns the derived settings, or every problem.
    pub fn resolve(&self) -> Result<Resolved, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let addr = |key: &str, value: &str, errors: &mut Vec<ConfigError>| {
            value.parse::<SocketAddr>().map_err(|_| {
                errors.push(ConfigError::new(
                    key,
                    format!("{value:?} is not an address with a port"),
                    "write it as ip:port, e.g. 127.0.0.1:2525 or [::1]:2525",
                ))
            })
        };
        let smtp_listen = addr("smtp.listen", &self.smtp.listen, &mut errors);
        let admin_listen = addr("admin.listen", &self.admin.listen, &mut errors);
        let mynetworks = networks(
            "mynetworks",
            &self.mynetworks,
            "use entries like 127.0.0.1/32, 192.0.2.0/24 or [::1]/128",
            &mut errors,
        );
        networks(
            "smtp.proxy_networks",
            &self.smtp.proxy_networks,
            "list your load balancers' addresses, e.g. 10.0.0.0/24",
            &mut errors,
        );
        if self.smtp.proxy_protocol && self.smtp.proxy_networks.is_empty() {
            errors.push(ConfigError::new(
                "smtp.proxy_networks",
                "empty while smtp.proxy_protocol is on: no load balancer could send a PROXY header",
                "list the load balancers' addresses, or set smtp.proxy_protocol = false",
            ));
        }
        let tls_listen = if self.tls.implicit_listen.trim().is_empty() {
            None
        } else {
            addr("tls.implicit_listen", &self.tls.implicit_listen, &mut errors).ok()
        };
        if !matches!(self.tls.security_level.as_str(), "none" | "may" | "encrypt") {
            errors.push(ConfigError::new(
                "tls.security_level",
                format!("{:?} is unknown", self.tls.security_level),
                "use \"none\", \"may\" or \"encrypt\"",
            ));
        }
        if self.tls.cert.is_empty() != self.tls.key.is_empty() {
            errors.push(ConfigError::new(
                "tls.cert",
                "tls.cert and tls.key must be set together",
                "set both PEM file paths, or neither",
            ));
        }
        let needs_cert = self.tls.security_level == "encrypt" || tls_listen.is_some();
        if needs_cert && self.tls.cert.is_empty() {
            errors.push(ConfigError::new(
                "tls.cert",
                "a certificate is needed for tls.security_level = \"encrypt\" or tls.implicit_listen",
                "set tls.cert and tls.key to PEM files",
            ));
        }
        if !self.tls.cert.is_empty()
            && let Err(e) = crate::smtp::tls::load_acceptor(&self.tls)
        {
            errors.push(ConfigError::new(
                "tls.cert",
                e.to_string(),
                "point tls.cert/tls.key at a readable PEM chain and its private key",
            ));
        }
        if self.auth.enabled && self.auth.tls_only && self.tls.cert.is_empty() {
            errors.push(ConfigError::new(
                "auth.enabled",
                "AUTH is only offered inside TLS (auth.tls_only) but no certificate is configured",
                "set tls.cert and tls.key, or auth.tls_only = false (passwords in clear)",
            ));
        }
        if !matches!(self.scan.on_failure.as_str(), "tempfail" | "accept") {
            errors.push(ConfigError::new(
                "scan.on_failure",
                format!("{:?} is unknown", self.scan.on_failure),
                "use \"tempfail\" (451, the default) or \"accept\"",
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
        let mut nameservers = Vec::new();
        for ns in &self.dns.nameservers {
            match ns.parse::<SocketAddr>().or_else(|_| ns.parse::<IpAddr>().map(|ip| (ip, 53).into())) {
                Ok(a) => nameservers.push(a),
                Err(_) => errors.push(ConfigError::new(
                    "dns.nameservers",
                    format!("{ns:?} is not an IP address"),
                    "use entries like 127.0.0.1 or 127.0.0.1:5353",
                )),
            }
        }
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
        if !["redis://", "rediss://", "sqlite://"].iter().any(|p| self.queue.url.starts_with(p)) {
            errors.push(ConfigError::new(
                "queue.url",
                format!("unsupported scheme in {:?}", mask_url(&self.queue.url)),
                "use redis://host:port/db (cluster) or sqlite://path/mxrelay.db (single node)",
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
        if !matches!(self.log.format.as_str(), "text" | "json") {
            errors.push(ConfigError::new(
                "log.format",
                format!("{:?} is unknown", self.log.format),
                "use \"text\" or \"json\"",
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            errors.push(ConfigError::new(
                "log.level",
                format!("{:?} is not a filter", self.log.level),
                "use e.g. \"info\" or \"info,mxrelay=debug\"",
            ));
        }
        // Outbound TLS: delivery.tls_policy, delivery.tls_policy_map, delivery.tls_ca_file.
        {
            use crate::delivery::tls;
            let problems = tls::TlsPolicies::from_config(&self.delivery).err().unwrap_or_default();
            let ca = tls::trust_anchors(&self.delivery.tls_ca_file).err();
            errors.extend(problems.into_iter().chain(ca).map(|p| ConfigError::new(p.key, p.problem, p.fix)));
        }
        match (smtp_listen, admin_listen, errors.is_empty()) {
            (Ok(smtp_listen), Ok(admin_listen), true) => {
                Ok(Resolved { smtp_listen, admin_listen, tls_listen, mynetworks, nameservers })
            }
            _ => Err(errors),
        }
    }

    /// Every duration key with its value.
    fn durations(&self) -> [(&'static str, Duration); 21] {
        let (s, d, q) = (&self.smtp, &self.delivery, &self.queue);
        [
            ("smtp.command_timeout", s.command_timeout),
            ("smtp.data_timeout", s.data_timeout),
            ("smtp.greet_pause", s.greet_pause),
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
            ("delivery.connect_timeout", d.connect_timeout),
            ("delivery.greeting_timeout", d.greeting_timeout),
            ("delivery.command_timeout", d.command_timeout),
            ("delivery.data_timeout", d.data_timeout),
            ("delivery.probe_interval", d.probe_interval),
            ("delivery.stop_grace", d.stop_grace),
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

    /// The effective configuration as TOML, with passwords in URLs masked.
    pub fn to_masked_toml(&self) -> String {
        let mut shown = self.clone();
        shown.domains.url = mask_url(&shown.domains.url);
        shown.queue.url = mask_url(&shown.queue.url);
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// Parses the address/CIDR list of `key`; each bad entry is an error
/// naming the key, with `fix`.
fn networks(key: &str, entries: &[String], fix: &str, errors: &mut Vec<ConfigError>) -> Vec<IpNet> {
    let mut nets = Vec::new();
    for net in entries {
        match parse_network(net) {
            Some(n) => nets.push(n),
            None => errors.push(ConfigError::new(key, format!("{net:?} is not an IP address or CIDR"), fix)),
        }
    }
    nets
}

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

/// `300s` → `5m`, as durations are written in the file.
fn human(d: Duration) -> String {
    humantime_serde::re::humantime::format_duration(d).to_string()
}

/// `user:secret@host` → `user:***@host`.
pub fn mask_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

/// `192.0.2.0/24`, `[::1]/128`, or a bare address (a /32 or /128).
pub fn parse_network(s: &str) -> Option<IpNet> {
    let s = s.trim().replace(['[', ']'], "");
    s.parse::<IpNet>().ok().or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

fn collect_keys(t: &toml::Table, prefix: &mut Vec<String>, out: &mut Vec<(Vec<String>, toml::Value)>) {
    for (k, v) in t {
        prefix.push(k.clone());
        match v {
            toml::Value::Table(inner) => collect_keys(inner, prefix, out),
            other => out.push((prefix.clone(), other.clone())),
        }
        prefix.pop();
    }
}

fn env_name(path: &[String]) -> String {
    path.join("_").to_ascii_uppercase()
}

fn insert_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    let (last, parents) = path.split_last().expect("key paths are never empty");
    let mut t = table;
    for p in parents {
        let entry = t.entry(p.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        t = entry.as_table_mut().expect("just made a table");
    }
    t.insert(last.clone(), value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn env_overrides_nested_and_top_level_keys() {
        let c = Config::load_from(
            None,
            &env(&[
                ("MXRELAY_SMTP_LISTEN", "127.0.0.1:2600"),
                ("MXRELAY_MESSAGE_SIZE_LIMIT", "1048576"),
                ("MXRELAY_DOMAINS_REFRESH", "5s"),
                ("MXRELAY_MYNETWORKS", "10.0.0.0/8,127.0.0.1"),
                ("MXRELAY_SMTPD_FORBID_BARE_NEWLINE", "false"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.smtp.listen, "127.0.0.1:2600");
        assert_eq!(c.message_size_limit, 1048576);
        assert_eq!(c.domains.refresh, Duration::from_secs(5));
        assert_eq!(c.mynetworks, vec!["10.0.0.0/8", "127.0.0.1"]);
        assert!(!c.smtpd_forbid_bare_newline);
    }

    #[test]
    fn unknown_env_key_is_named() {
        let e = Config::load_from(None, &env(&[("MXRELAY_SMTP_LISTN", "x")])).unwrap_err();
        assert_eq!(e[0].key, "MXRELAY_SMTP_LISTN");
    }

    #[test]
    fn bad_values_name_their_key() {
        let e =
            Config::load_from(None, &env(&[("MXRELAY_SMTP_LISTEN", "nowhere"), ("MXRELAY_MYNETWORKS", "10.0.0.0/33")]))
                .unwrap_err();
        let keys: Vec<_> = e.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["smtp.listen", "mynetworks"]);
    }

    #[test]
    fn live_keys_are_copied_and_others_kept() {
        let old = Config::default();
        let new = Config {
            message_size_limit: 1234567,
            smtp: SmtpConfig { error_limit: 3, listen: "127.0.0.1:1".into(), ..SmtpConfig::default() },
            ..Config::default()
        };
        let changed = old.changed_keys(&new);
        assert_eq!(changed, ["message_size_limit", "smtp.error_limit", "smtp.listen"]);
        let live: Vec<String> = changed.into_iter().filter(|k| LIVE_KEYS.contains(&k.as_str())).collect();
        let applied = old.with_keys_from(&new, &live);
        assert_eq!((applied.message_size_limit, applied.smtp.error_limit), (1234567, 3));
        assert_eq!(applied.smtp.listen, old.smtp.listen);
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
        let refused: Vec<String> = config.resolve().unwrap_err().into_iter().map(|e| e.key).collect();
        let allowed = ["smtp.greet_pause", "delivery.stop_grace", "delivery.max_queue_lifetime"];
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

    #[test]
    fn secrets_are_masked() {
        assert_eq!(mask_url("mysql://mail:pw@127.0.0.1/mail"), "mysql://mail:***@127.0.0.1/mail");
        assert_eq!(mask_url("redis://127.0.0.1/"), "redis://127.0.0.1/");
    }
}
