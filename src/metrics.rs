//! Prometheus metrics of one node, registered once in [`METRICS`].
//! Names follow `mxrelay_<subsystem>_<what>_<unit>`; labels are low-cardinality
//! (never a domain or an address).

use std::sync::LazyLock;

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

pub struct Metrics {
    pub registry: Registry,
    pub smtp_reserved_slots: IntCounterVec,
    pub smtp_auth_verifier_busy: IntCounter,
    pub queue_leases_reclaimed: IntCounter,
    pub smtp_stress: IntGauge,
    pub smtp_stress_episodes: IntCounter,
    pub smtp_connections: IntCounter,
    pub smtp_connections_active: IntGauge,
    pub smtp_connections_refused: IntCounterVec,
    pub smtp_sessions: IntCounterVec,
    pub smtp_rcpt: IntCounterVec,
    pub recipient_checks: IntCounterVec,
    pub recipient_verify_probes: IntCounterVec,
    pub smtp_messages: IntCounterVec,
    pub smtp_received_bytes: IntCounter,
    pub smtp_tls_handshakes: IntCounterVec,
    pub smtp_auth: IntCounterVec,
    pub smtp_limit_hits: IntCounterVec,
    pub smtp_proxy_headers: IntCounterVec,
    pub scan: IntCounterVec,
    pub scan_errors: IntCounterVec,
    pub scan_duration_seconds: prometheus::HistogramVec,
    pub queue_enqueue_seconds: Histogram,
    pub queue_group_commit_messages: Histogram,
    pub queue_errors: IntCounterVec,
    pub database_errors: IntCounter,
    pub dns_errors: IntCounter,
    pub domains_snapshot_size: IntGauge,
    pub domains_snapshot_age_seconds: IntGauge,
    pub queue_lease_takeovers: IntCounter,
    pub queue_leases_lost: IntCounter,
    pub queue_bookkeeping_retries: IntCounter,
    pub queue_groups_recreated: IntCounter,
    pub queue_primary_changes: IntCounter,
    pub queue_commits_recovered: IntCounter,
    pub queue_quarantined: IntCounter,
    pub queue_maintenance: IntCounterVec,
    pub delivery_attempts: IntCounterVec,
    pub delivery_recipients: IntCounterVec,
    pub delivery_duration_seconds: Histogram,
    pub delivery_destination_connections: IntGauge,
    pub delivery_dsn: IntCounter,
    pub delivery_delay_warnings: IntCounter,
    pub delivery_relayed_notices: IntCounter,
    pub delivery_lines_folded: IntCounter,
    pub delivery_connections_reused: IntCounter,
    pub delivery_tls: IntCounterVec,
    pub queue_messages: prometheus::IntGaugeVec,
    pub queue_oldest_age_seconds: IntGauge,
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let r = Registry::new();
    let queue_enqueue_seconds = Histogram::with_opts(
        HistogramOpts::new("mxrelay_queue_enqueue_duration_seconds", "Time to write one message durably to the queue")
            .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]),
    )
    .expect("valid metric");
    r.register(Box::new(queue_enqueue_seconds.clone())).expect("unique metric");
    let queue_group_commit_messages = Histogram::with_opts(
        HistogramOpts::new(
            "mxrelay_queue_group_commit_messages",
            "Received messages stored by one transaction (one fsync) of the embedded store",
        )
        .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
    )
    .expect("valid metric");
    r.register(Box::new(queue_group_commit_messages.clone())).expect("unique metric");
    let delivery_duration_seconds = Histogram::with_opts(
        HistogramOpts::new("mxrelay_delivery_duration_seconds", "Time for one delivery attempt of one message")
            .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]),
    )
    .expect("valid metric");
    r.register(Box::new(delivery_duration_seconds.clone())).expect("unique metric");
    let scan_duration_seconds = prometheus::HistogramVec::new(
        HistogramOpts::new("mxrelay_scan_duration_seconds", "Time for one scan of one message, by scanner")
            .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        &["scanner"],
    )
    .expect("valid metric");
    r.register(Box::new(scan_duration_seconds.clone())).expect("unique metric");
    let metrics = Metrics {
        scan: counter_vec(
            &r,
            "mxrelay_scan_total",
            "Scans by scanner and result (clean, virus, rspamd action, error, skipped_size)",
            &["scanner", "result"],
        ),
        scan_errors: counter_vec(
            &r,
            "mxrelay_scan_errors_total",
            "Scanners that were down, slow or answered garbage",
            &["scanner"],
        ),
        scan_duration_seconds,
        queue_lease_takeovers: counter(
            &r,
            "mxrelay_queue_lease_takeovers_total",
            "Queue entries taken over from a node that stopped renewing",
        ),
        queue_leases_lost: counter(
            &r,
            "mxrelay_queue_leases_lost_total",
            "Deliveries this node stopped because its lease was no longer current (taken over, or the message left the queue)",
        ),
        queue_bookkeeping_retries: counter(
            &r,
            "mxrelay_queue_bookkeeping_retries_total",
            "Retries of a delivery result (complete, defer, hand back) the queue did not take at first",
        ),
        queue_groups_recreated: counter(
            &r,
            "mxrelay_queue_groups_recreated_total",
            "Consumer groups found missing (Redis restarted without its data) and recreated",
        ),
        queue_primary_changes: counter(
            &r,
            "mxrelay_queue_primary_changes_total",
            "Times this node moved its queue writes to a new Redis primary (Sentinel failover)",
        ),
        queue_commits_recovered: counter(
            &r,
            "mxrelay_queue_commits_recovered_total",
            "Commits whose reply was lost but which were found queued (answered 250, not 451)",
        ),
        queue_quarantined: counter(
            &r,
            "mxrelay_queue_quarantined_total",
            "Messages held because their envelope is unreadable",
        ),
        queue_maintenance: counter_vec(
            &r,
            "mxrelay_queue_maintenance_total",
            "What queue housekeeping removed (staged_removed, consumers_pruned, corrupt_removed)",
            &["action"],
        ),
        delivery_attempts: counter_vec(
            &r,
            "mxrelay_delivery_attempts_total",
            "Delivery attempts per recipient or connection, by result",
            &["result"],
        ),
        delivery_recipients: counter_vec(
            &r,
            "mxrelay_delivery_recipients_total",
            "Recipients delivered, deferred or bounced",
            &["result"],
        ),
        delivery_duration_seconds,
        delivery_destination_connections: gauge(
            &r,
            "mxrelay_delivery_destination_connections",
            "Destination connection slots in use on this node",
        ),
        queue_messages: {
            let g = prometheus::IntGaugeVec::new(
                Opts::new("mxrelay_queue_messages", "Messages in the shared queue (whole cluster), by state"),
                &["state"],
            )
            .expect("valid metric");
            r.register(Box::new(g.clone())).expect("unique metric");
            g
        },
        queue_oldest_age_seconds: gauge(
            &r,
            "mxrelay_queue_oldest_message_age_seconds",
            "Age of the oldest message in the shared queue (0 when empty)",
        ),
        delivery_tls: counter_vec(
            &r,
            "mxrelay_delivery_tls_total",
            "Outbound sessions opened, by TLS level and what STARTTLS gave (tls, clear, fallback_clear, required_missing, starttls_refused, handshake_failed, verify_failed)",
            &["policy", "result"],
        ),
        delivery_connections_reused: counter(
            &r,
            "mxrelay_delivery_connections_reused_total",
            "Deliveries over a cached session (after RSET)",
        ),
        smtp_reserved_slots: counter_vec(
            &r,
            "mxrelay_smtp_reserved_slots_total",
            "Connections given a reserved slot because the general ones were busy, by client (mynetworks, probation)",
            &["client"],
        ),
        smtp_auth_verifier_busy: counter(
            &r,
            "mxrelay_smtp_auth_verifier_busy_total",
            "AUTH attempts answered 454 because every password verifier was busy and the queue full",
        ),
        queue_leases_reclaimed: counter(
            &r,
            "mxrelay_queue_leases_reclaimed_total",
            "Entries leased to this node that it did not hold (a lost read reply, an earlier run), leased again at once",
        ),
        smtp_stress: gauge(
            &r,
            "mxrelay_smtp_stress",
            "1 while the node is under stress (smtp.stress_threshold_percent of the slots busy)",
        ),
        smtp_stress_episodes: counter(&r, "mxrelay_smtp_stress_episodes_total", "Times the node went under stress"),
        delivery_dsn: counter(&r, "mxrelay_delivery_dsn_total", "Delivery status notifications (bounces) queued"),
        delivery_relayed_notices: counter(
            &r,
            "mxrelay_delivery_relayed_notices_total",
            "\"Relayed\" DSNs sent for NOTIFY=SUCCESS to a next hop without DSN",
        ),
        delivery_delay_warnings: counter(
            &r,
            "mxrelay_delivery_delay_warnings_total",
            "Delay warnings (delayed DSNs) sent to senders",
        ),
        delivery_lines_folded: counter(
            &r,
            "mxrelay_delivery_lines_folded_total",
            "Lines longer than delivery.line_length_limit folded when sent",
        ),
        smtp_connections: counter(&r, "mxrelay_smtp_connections_total", "SMTP connections accepted"),
        smtp_connections_active: gauge(&r, "mxrelay_smtp_connections_active", "SMTP sessions open now"),
        smtp_connections_refused: counter_vec(
            &r,
            "mxrelay_smtp_connections_refused_total",
            "SMTP connections refused at connect",
            &["reason"],
        ),
        smtp_sessions: counter_vec(&r, "mxrelay_smtp_sessions_total", "SMTP sessions ended, by outcome", &["outcome"]),
        smtp_rcpt: counter_vec(&r, "mxrelay_smtp_rcpt_total", "RCPT commands by result", &["result"]),
        recipient_checks: counter_vec(
            &r,
            "mxrelay_recipient_checks_total",
            "Recipients checked against a domain's recipient validation, by method and result",
            &["method", "result"],
        ),
        recipient_verify_probes: counter_vec(
            &r,
            "mxrelay_recipient_verify_probes_total",
            "Recipient verification probes of this node to a domain's server, by result \
             (skipped: the destination was down or every probe slot busy)",
            &["result"],
        ),
        smtp_messages: counter_vec(
            &r,
            "mxrelay_smtp_messages_total",
            "Messages at end of DATA/BDAT, by result",
            &["result"],
        ),
        smtp_received_bytes: counter(&r, "mxrelay_smtp_received_bytes_total", "Bytes of accepted messages"),
        smtp_tls_handshakes: counter_vec(
            &r,
            "mxrelay_smtp_tls_handshakes_total",
            "Inbound TLS handshakes (STARTTLS or implicit), by result",
            &["result"],
        ),
        smtp_auth: counter_vec(&r, "mxrelay_smtp_auth_total", "SMTP AUTH attempts, by result", &["result"]),
        smtp_limit_hits: counter_vec(
            &r,
            "mxrelay_smtp_limit_hits_total",
            "Client limits that tripped (rates, concurrency, slow clients, errors), by limit",
            &["limit"],
        ),
        smtp_proxy_headers: counter_vec(
            &r,
            "mxrelay_smtp_proxy_headers_total",
            "PROXY protocol headers, by result (accepted, local, invalid, untrusted)",
            &["result"],
        ),
        queue_enqueue_seconds,
        queue_group_commit_messages,
        queue_errors: counter_vec(
            &r,
            "mxrelay_queue_errors_total",
            "Failed queue operations (Redis, or the embedded SQLite spool), by operation",
            &["op"],
        ),
        database_errors: counter(&r, "mxrelay_database_errors_total", "Failed domain database operations"),
        dns_errors: counter(&r, "mxrelay_dns_errors_total", "DNS lookups that failed temporarily"),
        domains_snapshot_size: gauge(&r, "mxrelay_domains_snapshot_size", "Domains in this node's snapshot"),
        domains_snapshot_age_seconds: gauge(
            &r,
            "mxrelay_domains_snapshot_age_seconds",
            "Age of this node's domain snapshot (-1 when none is loaded)",
        ),
        registry: r,
    };
    metrics.init_known_labels();
    metrics
});

impl Metrics {
    /// Creates the label values dashboards and alerts rely on at 0, so a
    /// series exists (and `rate()` works) before the first event: every
    /// value README.md lists (tests/it/ops.rs checks that against a node).
    fn init_known_labels(&self) {
        let init = |vec: &IntCounterVec, values: &[&str]| {
            for v in values {
                vec.with_label_values(&[v]);
            }
        };
        init(&self.smtp_messages, &["accepted", "too_big", "bare_newline", "too_many_hops", "queue_error"]);
        for result in ["accepted", "rejected"] {
            self.recipient_checks.with_label_values(&["table", result]);
        }
        for result in ["accepted", "rejected", "unverified"] {
            self.recipient_checks.with_label_values(&["verify", result]);
        }
        init(&self.recipient_verify_probes, &["deliverable", "undeliverable", "no_answer", "skipped"]);
        init(
            &self.smtp_rcpt,
            &[
                "accepted",
                "relay_denied",
                "unknown_domain",
                "unknown_recipient",
                "non_fqdn",
                "invalid_helo",
                "tempfail",
                "no_snapshot",
                "syntax",
                "too_many",
            ],
        );
        init(
            &self.smtp_connections_refused,
            &["node_limit", "ip_limit", "rate_limit", "early_talker", "proxy_untrusted", "shutting_down"],
        );
        init(
            &self.smtp_sessions,
            &[
                "quit",
                "disconnected",
                "timeout",
                "too_many_errors",
                "early_talker",
                "io_error",
                "tls_failed",
                "refused",
                "shutdown",
            ],
        );
        init(&self.smtp_tls_handshakes, &["ok", "failed"]);
        init(&self.smtp_auth, &["success", "failure", "tempfail", "aborted", "malformed", "rate_limited"]);
        init(&self.smtp_proxy_headers, &["accepted", "local", "invalid", "untrusted"]);
        init(&self.smtp_reserved_slots, &["mynetworks", "probation"]);
        init(
            &self.smtp_limit_hits,
            &[
                "connection_rate",
                "connections_per_ip",
                "message_rate",
                "recipient_rate",
                "auth_failures",
                "slow_client",
                "errors",
            ],
        );
        init(&self.delivery_recipients, &["delivered", "deferred", "bounced"]);
        init(
            &self.delivery_attempts,
            &["sent", "deferred", "bounced", "connect_error", "session_error", "dns_error", "loop"],
        );
        init(&self.queue_errors, &["enqueue"]);
        init(&self.queue_maintenance, &["staged_removed", "consumers_pruned", "corrupt_removed"]);
        init(&self.scan_errors, &["clamd", "rspamd"]);
        for scanner in ["clamd", "rspamd"] {
            self.scan_duration_seconds.with_label_values(&[scanner]);
        }
        for (scanner, result) in [
            ("clamd", "clean"),
            ("clamd", "virus"),
            ("rspamd", "no_action"),
            ("rspamd", "reject"),
            ("all", "skipped_size"),
        ] {
            self.scan.with_label_values(&[scanner, result]);
        }
        for result in ["tls", "handshake_failed", "verify_failed", "required_missing", "starttls_refused"] {
            self.delivery_tls.with_label_values(&["may", result]);
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
