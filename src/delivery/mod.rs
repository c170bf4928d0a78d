//! Delivery from the shared queue (being written).

pub mod dsn;
