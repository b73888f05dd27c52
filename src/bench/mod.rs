//! `switchboard bench`: the product's own load tool. It drives any Switchboard node or
//! cluster purely through the client contract (HTTP to register and log in, WebSocket to
//! sync, send and receive) and measures end to end: from the moment a send is
//! *scheduled* to the moment the recipient's device has the message, so queueing in
//! the tool or the server is counted (open loop where the workload has a rate: a late
//! send keeps its scheduled time, no coordinated omission).
//!
//! Workloads (`workloads.rs`): `throughput`, `latency`, `fanout`, `idle`, `catchup`,
//! `cluster`. Each shows a progress bar on stderr, prints a human summary on stderr and
//! one JSON line on stdout, reports its own CPU time (so a saturated tool is visible)
//! and, with `--plot`, writes the latency percentile curve as an SVG.
//!
//! The server's `sends_per_second` must be above what one connection sends here, or
//! sends come back `rate_limited` (counted and reported, never retried).

mod client;
mod report;
mod workloads;

use std::path::PathBuf;

use clap::{Args, Subcommand};

pub use workloads::run;

/// Options every workload shares.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// A node's client address; several, comma-separated, spread the connections.
    #[arg(long, default_value = "127.0.0.1:8080", value_delimiter = ',')]
    pub addr: Vec<String>,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 100)]
    pub body: usize,
    /// Worker threads of the tool.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// The server's pid: its CPU time (and, for `idle`, memory) over the run.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Writes the latency percentile curve to this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Handles are this prefix plus a number: runs with different prefixes do not
    /// collide (default: random).
    #[arg(long)]
    pub prefix: Option<String>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Users in pairs, each sender keeping `window` messages in flight.
#[derive(Args, Debug, Clone)]
pub struct Pairs {
    #[arg(long, default_value_t = 200)]
    pub users: usize,
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    #[arg(long, default_value_t = 3)]
    pub warmup: u64,
}

/// A `--rate`: messages per second, finite and above 0 (a schedule is built from it).
fn positive_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        Ok(_) => Err("the rate must be a number of messages per second above 0".into()),
        Err(e) => Err(e.to_string()),
    }
}

#[derive(Subcommand, Debug, Clone)]
pub enum Workload {
    /// N users in pairs; each sender keeps W messages in flight.
    Throughput(Pairs),
    /// A fixed total rate, open loop, over N users in pairs.
    Latency {
        #[arg(long, default_value_t = 200)]
        users: usize,
        #[arg(long, default_value_t = 1000.0, value_parser = positive_rate)]
        rate: f64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        #[arg(long, default_value_t = 2)]
        warmup: u64,
    },
    /// One group of M members, every member connected; one member sends at a rate;
    /// time until every member's device has each message.
    Fanout {
        #[arg(long, default_value_t = 1000)]
        members: usize,
        #[arg(long, default_value_t = 100)]
        messages: usize,
        #[arg(long, default_value_t = 10.0, value_parser = positive_rate)]
        rate: f64,
    },
    /// C authenticated idle connections (over `--users` users); the server's memory per
    /// connection (with `--server-pid`), then one message to every user: every
    /// connection must get it.
    Idle {
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
        #[arg(long, default_value_t = 100)]
        users: usize,
        /// Connections opened at once.
        #[arg(long, default_value_t = 200)]
        parallel: usize,
        /// Seconds to hold them before measuring.
        #[arg(long, default_value_t = 5)]
        hold: u64,
    },
    /// A user offline while K messages arrive, then it syncs: time and messages/s.
    Catchup {
        #[arg(long, default_value_t = 100_000)]
        messages: usize,
        /// Senders filling the inbox side by side.
        #[arg(long, default_value_t = 8)]
        senders: usize,
    },
    /// `throughput` with every sender connected to the first `--addr` and every
    /// recipient to the second.
    Cluster(Pairs),
}
