//! Switchboard: a WhatsApp-style chat backend on an actor-model cluster.
//!
//! The crate is layered; each layer owns one concern and imports only the ones below it:
//!
//! - [`config`]: reads and validates `cluster.toml` (nodes, limits, optional sections).
//! - [`ids`]: the entity identifiers (users, conversations, groups) and their ring keys.
//! - [`storage`]: owns sled. Tree layout, order-preserving keys, versioned bincode values,
//!   and the group-commit flusher that makes an `ack` mean "on disk". Nothing else names
//!   sled or bincode.
//! - [`actors`]: the entity actors (user, conversation), the registry that starts,
//!   passivates and restarts them, and the [`actors::Route`] trait through which an actor
//!   reaches any other entity without knowing which node it lives on.
//! - [`net`]: every socket. The HTTP API, the WebSocket session actor and its JSON
//!   protocol, the consistent-hash ring and the router that implements `Route`.
//! - [`metrics`]: the Prometheus registry served at `/metrics`.
//!
//! The binary (`src/main.rs`) parses the command line, reads the config and calls
//! [`net::serve`].

pub mod actors;
pub mod config;
pub mod ids;
pub mod metrics;
pub mod net;
pub mod storage;

/// Milliseconds since the Unix epoch: the contract's unit for every timestamp.
pub fn now_ms() -> i64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
