//! The admin HTTP listener: `/metrics` (Prometheus text), `/healthz`
//! (process alive) and `/readyz` (queue readable and writable, domain
//! snapshot loaded, not draining) for load balancers and Kubernetes.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::domains::Domains;
use crate::metrics::METRICS;
use crate::spool::Admin;

#[derive(Clone)]
pub struct Health {
    pub spool: Arc<dyn Admin>,
    pub domains: Arc<Domains>,
    pub shutdown: crate::shutdown::Shutdown,
}

pub async fn serve(listener: TcpListener, health: Health) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(health.clone());
    let mut stop = health.shutdown.clone();
    let stopped = async move { stop.reached(crate::shutdown::Phase::Stopped).await };
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stopped).await {
        tracing::error!(error = %e, "admin listener failed");
    }
}

async fn metrics(State(h): State<Health>) -> String {
    let age = h.domains.snapshot().map_or(-1, |s| s.loaded_at.elapsed().as_secs() as i64);
    METRICS.domains_snapshot_age_seconds.set(age);
    // Cluster queue gauges: a few cheap commands per shard, at scrape time.
    if let Ok(s) = h.spool.stats(false).await {
        for (state, n) in [("ready", s.ready), ("leased", s.leased), ("deferred", s.deferred), ("held", s.held)] {
            METRICS.queue_messages.with_label_values(&[state]).set(n as i64);
        }
        let oldest = s.oldest_received_at.map_or(0, |t| ((chrono::Utc::now().timestamp_millis() - t) / 1000).max(0));
        METRICS.queue_oldest_age_seconds.set(oldest);
    }
    METRICS.render()
}

async fn ready(State(h): State<Health>) -> (StatusCode, String) {
    if h.shutdown.is_leaving() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n".into());
    }
    let Some(snapshot) = h.domains.snapshot() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "no domain snapshot yet\n".into());
    };
    // Served from the last good snapshot while the database is down: its
    // age tells the operator how stale the domain list may be.
    let age = snapshot.loaded_at.elapsed().as_secs();
    match h.spool.ping().await {
        Ok(()) => (StatusCode::OK, format!("ready (domain snapshot {age}s old)\n")),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}
