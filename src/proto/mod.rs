//! The SMTP vocabulary, below every other module: replies ([`reply`]),
//! the command grammar ([`command`]), envelope addresses ([`address`]) and
//! the MAIL/RCPT parameters ([`params`], the DSN ones in [`dsn`]).
//! Pure functions over bytes and strings, unit- and property-tested; the
//! session, policy, scanning and delivery all speak in these terms.
//!
//! Never here: I/O, configuration, metrics, or anything that knows about
//! the queue or the domain list.

pub mod address;
pub mod command;
pub mod dsn;
pub mod params;
pub mod reply;
