//! What operators talk to besides SMTP: the HTTP endpoints of a node
//! (`/metrics`, `/healthz`, `/readyz`). The queue and domain commands of
//! the CLI will live here too.

pub mod domains;
pub mod http;
pub mod queue;
pub mod recipients;
