//! mxrelay: a clustered, closed SMTP relay. One message's path through the
//! code: `smtp` (session) → `policy` (relay decision, checks; `domains`
//! snapshot, `dns`) → `spool` (durable shared queue) → delivery. Below
//! them all, `proto`: the SMTP vocabulary every layer speaks.

pub mod admin;
pub mod config;
pub mod delivery;
pub mod dns;
pub mod domains;
pub mod metrics;
pub mod policy;
pub mod proto;
pub mod scan;
pub mod server;
pub mod shutdown;
pub mod smtp;
pub mod spool;
pub mod users;
