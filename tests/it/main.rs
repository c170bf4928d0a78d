//! The integration tests, one binary (one link, one build of the helpers):
//! a module per area, helpers in `support/`. nextest names a test
//! `mxrelay::it <area>::<test>`; run one area with
//! `cargo nextest run --test it -E 'test(/^<area>::/)'` or `cargo nextest run <area>::`.

mod support;

mod abuse;
mod admin;
mod cluster;
mod config_errors;
mod delivery;
mod delivery_peers;
mod deploy;
mod deploy_k8s;
mod domain_store;
mod domains;
mod embedded;
mod faults;
mod hostile;
mod inbound_tls;
mod load;
mod ops;
mod outbound_postfix;
mod outbound_tls;
mod protocol;
mod queue_cluster;
mod queue_faults;
mod receive;
mod recipients;
mod reliability;
mod routing;
mod scan;
mod scanners_harness;
mod secured_stores;
mod shutdown;
mod spool;
mod spool_faults;
mod spool_model;
mod topology;
