//! One typed configuration: defaults, then the TOML file, then `MXRELAY_*`
//! environment variables (key path upper-cased, `.` → `_`:
//! `smtp.listen` → `MXRELAY_SMTP_LISTEN`). Every error names the key (and
//! the variable, when the value came from one) and the fix; a zero duration
//! is refused unless 0 has a documented meaning for that key. Nothing deeper
//! in the code looks a key up by string.

mod check;
mod env;
mod reload;

pub use reload::LIVE_KEYS;

use std::collections::BTreeMap;
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
    #[serde(with = "networks")]
    pub mynetworks: Vec<IpNet>,
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
    /// bare LF or a bare CR (554 5.6.0); `false` normalises either to CRLF.
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
    pub verify: VerifyConfig,
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
    /// Once a message has waited this long, its sender gets one "delayed"
    /// notice for the recipients still deferred (Postfix
    /// `delay_warning_time`); 0 = never, as Postfix's default.
    #[serde(with = "humantime_serde")]
    pub delay_warning_time: Duration,
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
    pub tls_policy: TlsPolicy,
    /// Per recipient domain levels over `tls_policy` (Postfix
    /// `smtp_tls_policy_maps`): `"example.com" = "verify"` matches that
    /// domain exactly, `".example.com" = "encrypt"` its subdomains. Keys
    /// with a leading dot must be quoted in TOML.
    #[serde(deserialize_with = "policy_map")]
    pub tls_policy_map: BTreeMap<String, TlsPolicy>,
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
            delay_warning_time: Duration::ZERO,
            connect_timeout: Duration::from_secs(30),
            greeting_timeout: Duration::from_secs(300),
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            line_length_limit: 998,
            probe_interval: Duration::from_secs(10),
            stop_grace: Duration::from_secs(10),
            tls_policy: TlsPolicy::May,
            tls_policy_map: BTreeMap::new(),
            tls_ca_file: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpConfig {
    /// Address of the SMTP listener.
    #[serde(with = "addr")]
    pub listen: SocketAddr,
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
    #[serde(with = "networks")]
    pub proxy_networks: Vec<IpNet>,
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
    /// On SIGTERM, how long `/readyz` fails while the node still accepts
    /// and serves as usual, so that a load balancer's health check takes
    /// it out of rotation before its listener closes; 0 = close at once.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
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
    pub security_level: TlsLevel,
    /// Address of an implicit-TLS listener (port 465 style, Postfix
    /// `smtpd_tls_wrappermode`); empty = none.
    #[serde(with = "optional_addr")]
    pub implicit_listen: Option<SocketAddr>,
    /// Longest TLS handshake allowed.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: String::new(),
            key: String::new(),
            security_level: TlsLevel::May,
            implicit_listen: None,
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
    pub on_failure: ScanFailure,
    /// Messages larger than this (bytes) are not scanned and get a header
    /// saying so (keep it under clamd's StreamMaxLength).
    pub max_size: u64,
    /// Bytes of messages waiting for a verdict held in memory on this node,
    /// all together; a message over 1 MiB, or one that would pass this, is
    /// held in a file under `data_dir/scan` instead. 0: always a file.
    pub memory_limit: u64,
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
            on_failure: ScanFailure::Tempfail,
            max_size: 20 * 1024 * 1024,
            memory_limit: 64 * 1024 * 1024,
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
    #[serde(with = "addr")]
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DomainsConfig {
    /// `mysql://user:password@host:port/database` holding table `domains`
    /// (cluster), or `sqlite://path` (embedded). Unset: the embedded store
    /// in `data_dir`.
    pub url: String,
    /// A file holding the database password (a Kubernetes Secret mounted as
    /// a file): it replaces any password in `url`. Empty: none.
    pub password_file: String,
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
    /// A file holding the Redis password (of the ACL user in `url`, or the
    /// `requirepass` one): it replaces any password in `url`. Empty: none.
    pub password_file: String,
    /// With `rediss://`: the CA certificates (PEM) Redis's certificate is
    /// verified against; empty: the system's roots.
    pub tls_ca_file: String,
    /// With `rediss://`: a client certificate chain and its key (PEM), for
    /// a Redis with `tls-auth-clients yes`; both or neither.
    pub tls_cert: String,
    pub tls_key: String,
    /// With `redis+sentinel://`: the ACL user the Sentinels themselves
    /// know (their `user` lines); empty: the default user.
    pub sentinel_user: String,
    /// With `redis+sentinel://`: a file holding the Sentinels' own password
    /// (their `requirepass`, or `sentinel_user`'s); empty: none. The data
    /// servers' password is `queue.url`'s or `queue.password_file`'s.
    pub sentinel_password_file: String,
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
    /// Nameservers as `ip` or `ip:port`; empty = the system's `/etc/resolv.conf`.
    #[serde(with = "nameservers")]
    pub nameservers: Vec<SocketAddr>,
    /// Longest wait for one DNS query.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

/// Recipient verification against a domain's own server, for the
/// domains whose recipient check is `verify` (Postfix's
/// `reject_unverified_recipient`): at RCPT the node asks `relay_host`
/// (`MAIL FROM:<>`, `RCPT TO:`) and keeps the answer in the shared queue
/// store for every node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerifyConfig {
    /// How long an address the server accepted stays verified (Postfix
    /// `address_verify_positive_expire_time`).
    #[serde(with = "humantime_serde")]
    pub positive_expire_time: Duration,
    /// How long an address the server refused with 5xx stays refused
    /// (Postfix `address_verify_negative_expire_time`).
    #[serde(with = "humantime_serde")]
    pub negative_expire_time: Duration,
    /// What RCPT gets when the server gives no answer (down, a 4xx, a
    /// timeout): `accept` (the backup MX's job while the primary is down)
    /// or `tempfail` (`450 4.1.1`; Postfix
    /// `unverified_recipient_reject_code = 450`).
    pub unreachable: VerifyUnreachable,
    /// Longest wait for an answer at RCPT, probe and waiting for another
    /// node's probe included (Postfix `address_verify_poll_count` ×
    /// `address_verify_poll_delay`); past it the answer is `unreachable`'s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Probes at once from this node, all destinations together.
    pub concurrency: usize,
    /// Probes at once from this node to one destination.
    pub destination_concurrency: usize,
}

/// `verify.unreachable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyUnreachable {
    Accept,
    Tempfail,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        VerifyConfig {
            positive_expire_time: Duration::from_secs(7 * 86400),
            negative_expire_time: Duration::from_secs(3 * 3600),
            unreachable: VerifyUnreachable::Accept,
            timeout: Duration::from_secs(8),
            concurrency: 20,
            destination_concurrency: 2,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `info,mxrelay::smtp=debug`.
    pub level: String,
    /// `text` (reads like Postfix's mail log) or `json`.
    pub format: LogFormat,
}

fn host_name() -> String {
    gethostname::gethostname().into_string().ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "localhost".to_string())
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: host_name(),
            myhostname: host_name(),
            mynetworks: vec![
                IpNet::from(IpAddr::from([127, 0, 0, 1])),
                IpNet::from(IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
            ],
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
            verify: VerifyConfig::default(),
            log: LogConfig::default(),
        }
    }
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 2525)),
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
            drain_delay: Duration::ZERO,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { listen: SocketAddr::from(([127, 0, 0, 1], 9425)) }
    }
}

impl Default for DomainsConfig {
    fn default() -> Self {
        DomainsConfig { url: String::new(), password_file: String::new(), refresh: Duration::from_secs(30) }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            url: String::new(),
            password_file: String::new(),
            tls_ca_file: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            sentinel_user: String::new(),
            sentinel_password_file: String::new(),
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
        LogConfig { level: "info".into(), format: LogFormat::Text }
    }
}

/// Inbound STARTTLS (Postfix `smtpd_tls_security_level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsLevel {
    /// STARTTLS is not offered.
    None,
    /// STARTTLS is offered.
    May,
    /// STARTTLS is required before MAIL and AUTH.
    Encrypt,
}

/// What a message gets when a scanner fails (`scan.on_failure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScanFailure {
    /// 451 4.7.1: the sender retries.
    Tempfail,
    /// Accepted with a header saying it was not scanned.
    Accept,
}

/// `log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Reads like Postfix's mail log.
    Text,
    Json,
}

/// An outbound TLS security level, weakest first (Postfix
/// `smtp_tls_security_level`). Written in any case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TlsPolicy {
    /// Never STARTTLS.
    None,
    /// STARTTLS when offered, certificate not checked; a failed handshake
    /// is retried once in clear.
    May,
    /// STARTTLS required, certificate not checked.
    Encrypt,
    /// STARTTLS required, certificate chained to a trusted root and valid
    /// for the host name (or IP) we connected to.
    Verify,
}

impl TlsPolicy {
    pub const ALL: [TlsPolicy; 4] = [TlsPolicy::None, TlsPolicy::May, TlsPolicy::Encrypt, TlsPolicy::Verify];

    pub fn parse(s: &str) -> Option<TlsPolicy> {
        TlsPolicy::ALL.into_iter().find(|p| p.as_str().eq_ignore_ascii_case(s.trim()))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TlsPolicy::None => "none",
            TlsPolicy::May => "may",
            TlsPolicy::Encrypt => "encrypt",
            TlsPolicy::Verify => "verify",
        }
    }

    /// Mail must not go out in clear.
    pub fn requires_tls(self) -> bool {
        matches!(self, TlsPolicy::Encrypt | TlsPolicy::Verify)
    }
}

impl std::fmt::Display for TlsPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for TlsPolicy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for TlsPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<TlsPolicy, D::Error> {
        let s = String::deserialize(d)?;
        TlsPolicy::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("{s:?} is not a TLS security level")))
    }
}

/// Address/CIDR lists (`mynetworks`, `smtp.proxy_networks`): written as
/// strings, a bare address meaning a /32 or /128.
mod networks {
    use ipnet::IpNet;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(nets: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(nets.iter().map(ToString::to_string))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|n| {
                super::parse_network(n)
                    .ok_or_else(|| serde::de::Error::custom(format!("{n:?} is not an IP address or CIDR")))
            })
            .collect()
    }
}

/// A listener address, `ip:port`.
mod addr {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(addr: &SocketAddr, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(addr)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        parse(&String::deserialize(d)?)
    }

    pub(super) fn parse<E: serde::de::Error>(s: &str) -> Result<SocketAddr, E> {
        s.trim().parse().map_err(|_| E::custom(format!("{s:?} is not an address with a port")))
    }
}

/// A listener that may be off: written as `""` when it is.
mod optional_addr {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(addr: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&addr.map(|a| a.to_string()).unwrap_or_default())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim().is_empty() {
            return Ok(None);
        }
        super::addr::parse(&s).map(Some)
    }
}

/// `dns.nameservers`: `ip` (port 53) or `ip:port`.
mod nameservers {
    use std::net::{IpAddr, SocketAddr};

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(servers: &[SocketAddr], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(servers.iter().map(ToString::to_string))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|ns| {
                ns.parse::<SocketAddr>()
                    .or_else(|_| ns.parse::<IpAddr>().map(|ip| (ip, 53).into()))
                    .map_err(|_| serde::de::Error::custom(format!("{ns:?} is not an IP address")))
            })
            .collect()
    }
}

/// Reads `delivery.tls_policy_map`. TOML turns an unquoted
/// `example.com = "verify"` into nested tables (`example` → `com`); their
/// key paths are joined back into the domain name the operator wrote.
fn policy_map<'de, D>(deserializer: D) -> Result<BTreeMap<String, TlsPolicy>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    fn flatten(prefix: &str, value: toml::Value, out: &mut BTreeMap<String, TlsPolicy>) -> Result<(), String> {
        match value {
            toml::Value::String(level) => {
                let level = TlsPolicy::parse(&level)
                    .ok_or_else(|| format!("{level:?} (for {prefix:?}) is not a TLS security level"))?;
                out.insert(prefix.to_string(), level);
                Ok(())
            }
            toml::Value::Table(table) => {
                for (key, value) in table {
                    flatten(&format!("{prefix}.{key}"), value, out)?;
                }
                Ok(())
            }
            other => Err(format!("the level for {prefix:?} must be a string such as \"verify\", not {other}")),
        }
    }
    let table = <BTreeMap<String, toml::Value> as serde::Deserialize>::deserialize(deserializer)?;
    let mut out = BTreeMap::new();
    for (key, value) in table {
        flatten(&key, value, &mut out).map_err(serde::de::Error::custom)?;
    }
    Ok(out)
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
    pub fn new(key: &str, problem: impl Into<String>, fix: impl Into<String>) -> Self {
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

impl Config {
    /// Defaults, then `file` (if any), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Config, Vec<ConfigError>> {
        Self::load_with(file, |_| Vec::new())
    }

    /// [`Config::load`], plus the checks of `files` (what the subsystems
    /// check by reading the files the configuration names), reported
    /// together with every other problem, with their variables.
    pub fn load_with(
        file: Option<&Path>,
        files: impl Fn(&Config) -> Vec<ConfigError>,
    ) -> Result<Config, Vec<ConfigError>> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_checked(file, &env, files)
    }

    /// The effective configuration as TOML, with passwords in URLs masked.
    pub fn to_masked_toml(&self) -> String {
        let mut shown = self.clone();
        shown.domains.url = mask_url(&shown.domains.url);
        shown.queue.url = mask_url(&shown.queue.url);
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
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

/// `url` with its password replaced by `password` (percent-encoded), the
/// user kept; for one host or several (`redis+sentinel://a,b/m`).
pub fn with_password(url: &str, password: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // The authority ends at the path: an '@' in a query is not userinfo.
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (user, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (userinfo.split_once(':').map_or(userinfo, |(u, _)| u), hosts),
        None => ("", authority),
    };
    let encoded = percent_encoding::utf8_percent_encode(password, percent_encoding::NON_ALPHANUMERIC);
    format!("{scheme}://{user}:{encoded}@{hosts}{path}")
}

/// `192.0.2.0/24`, `[::1]/128`, or a bare address (a /32 or /128).
pub fn parse_network(s: &str) -> Option<IpNet> {
    let s = s.trim().replace(['[', ']'], "");
    s.parse::<IpNet>().ok().or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_file_replaces_the_password_and_keeps_the_user() {
        assert_eq!(with_password("redis://127.0.0.1:6379/0", "s3cret"), "redis://:s3cret@127.0.0.1:6379/0");
        assert_eq!(with_password("redis://app:old@h:1/0", "n@w/:"), "redis://app:n%40w%2F%3A@h:1/0");
        assert_eq!(with_password("mysql://mail@db/mail", "pw"), "mysql://mail:pw@db/mail");
        assert_eq!(with_password("redis+sentinel://u@a:1,b:2/m", "x"), "redis+sentinel://u:x@a:1,b:2/m");
        assert_eq!(with_password("mysql://m@db/x?ssl-ca=/a@b/ca.pem", "p"), "mysql://m:p@db/x?ssl-ca=/a@b/ca.pem");
        assert_eq!(mask_url(&with_password("redis://app@h/0", "x")), "redis://app:***@h/0");
    }

    #[test]
    fn secrets_are_masked() {
        assert_eq!(mask_url("mysql://mail:pw@127.0.0.1/mail"), "mysql://mail:***@127.0.0.1/mail");
        assert_eq!(mask_url("redis://127.0.0.1/"), "redis://127.0.0.1/");
    }
}
