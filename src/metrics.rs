//! Process-wide Prometheus metrics, served as text at `/metrics`.
//!
//! One registry per process, reached through [`metrics()`]. Every layer records into it;
//! only `net` renders it. Names follow Prometheus conventions (`_total` counters, base
//! units in seconds).

use std::sync::OnceLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric the node exports.
pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections.
    pub ws_connections: IntGauge,
    /// Messages accepted and acked (stored durably).
    pub messages_in: IntCounter,
    /// `message` events written to client connections.
    pub messages_out: IntCounter,
    /// Duration of one group-commit flush (sled flush + fdatasync).
    pub flush_seconds: Histogram,
    /// Writes covered by one flush: the group-commit batch size.
    pub flush_batch: Histogram,
    /// Failed flushes; a non-zero value means the disk is refusing writes.
    pub flush_errors: IntCounter,
    /// Live entity actors by kind.
    pub actors: IntGaugeVec,
    /// Calls queued or running at entity actors by kind: the mailbox depth.
    pub mailbox_depth: IntGaugeVec,
    /// Entity actors that stopped abnormally and were restarted from storage on next use.
    pub actor_restarts: IntCounterVec,
    /// Error frames and HTTP errors sent, by contract code.
    pub errors: IntCounterVec,
    /// Connections closed by the server, by reason.
    pub disconnects: IntCounterVec,
    /// Push notifications delivered to the webhook, dropped (queue full), given up.
    pub push_sent: IntCounter,
    pub push_dropped: IntCounter,
    pub push_failed: IntCounter,
    /// Time from a message being stored to it being appended to a member's inbox.
    pub fanout_seconds: HistogramVec,
    /// 1 while the link to a peer node is up, by peer.
    pub peer_up: IntGaugeVec,
    /// Calls to peers that failed (link down, queue full, no answer in time).
    pub peer_calls_failed: IntCounter,
    /// Wire messages and the frames they carried, written to peers: their ratio is the
    /// batching.
    pub peer_messages: IntCounter,
    pub peer_frames: IntCounter,
    /// The ring version this node serves.
    pub ring_version: prometheus::IntGauge,
    /// Entities this node handed off to their new home.
    pub handoff_entities: IntCounter,
    /// Duration of this node's share of each handoff.
    pub handoff_seconds: Histogram,
    /// Times an entity actor kept dying and its restart was delayed.
    pub actor_crash_loops: IntCounterVec,
}

impl Metrics {
    fn new() -> Self {
        let registry =
            Registry::new_custom(Some("switchboard".into()), None).expect("static prefix is valid");
        let ws_connections =
            IntGauge::new("ws_connections", "Open WebSocket connections").expect("static metric");
        let messages_in = IntCounter::new("messages_in_total", "Messages stored and acked")
            .expect("static metric");
        let messages_out = IntCounter::new(
            "messages_out_total",
            "Message events written to connections",
        )
        .expect("static metric");
        let flush_seconds = Histogram::with_opts(
            HistogramOpts::new("flush_seconds", "Duration of one group-commit flush").buckets(
                vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
                ],
            ),
        )
        .expect("static metric");
        let flush_batch = Histogram::with_opts(
            HistogramOpts::new("flush_batch_size", "Writes covered by one flush").buckets(vec![
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
            ]),
        )
        .expect("static metric");
        let flush_errors =
            IntCounter::new("flush_errors_total", "Failed flushes").expect("static metric");
        let actors = IntGaugeVec::new(Opts::new("actors", "Live entity actors"), &["kind"])
            .expect("static metric");
        let mailbox_depth = IntGaugeVec::new(
            Opts::new("mailbox_depth", "Calls queued or running at entity actors"),
            &["kind"],
        )
        .expect("static metric");
        let actor_restarts = IntCounterVec::new(
            Opts::new(
                "actor_restarts_total",
                "Entity actors restarted after an abnormal stop",
            ),
            &["kind"],
        )
        .expect("static metric");
        let errors = IntCounterVec::new(
            Opts::new("errors_total", "Errors answered to clients, by code"),
            &["code"],
        )
        .expect("static metric");
        let disconnects = IntCounterVec::new(
            Opts::new(
                "disconnects_total",
                "Connections closed by the server, by reason",
            ),
            &["reason"],
        )
        .expect("static metric");
        let fanout_seconds = HistogramVec::new(
            HistogramOpts::new("fanout_seconds", "Stored to appended in a member inbox").buckets(
                vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0,
                ],
            ),
            &["kind"],
        )
        .expect("static metric");
        let push_sent = IntCounter::new("push_sent_total", "Push notifications delivered")
            .expect("static metric");
        let push_dropped = IntCounter::new(
            "push_dropped_total",
            "Push notifications dropped: queue full",
        )
        .expect("static metric");
        let push_failed = IntCounter::new(
            "push_failed_total",
            "Push notifications given up after retries",
        )
        .expect("static metric");
        let peer_up = IntGaugeVec::new(
            Opts::new("peer_up", "1 while the link to the peer is up"),
            &["peer"],
        )
        .expect("static metric");
        let peer_calls_failed = IntCounter::new(
            "peer_calls_failed_total",
            "Calls to peer nodes that failed or timed out",
        )
        .expect("static metric");
        let peer_messages =
            IntCounter::new("peer_messages_total", "Wire messages written to peer links")
                .expect("static metric");
        let peer_frames = IntCounter::new(
            "peer_frames_total",
            "Frames (calls, answers, casts) written to peer links",
        )
        .expect("static metric");
        let ring_version =
            prometheus::IntGauge::new("ring_version", "The ring version this node serves")
                .expect("static metric");
        let handoff_entities = IntCounter::new(
            "handoff_entities_total",
            "Entities this node handed off to their new home node",
        )
        .expect("static metric");
        let handoff_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "handoff_seconds",
                "Time this node took to hand off its share of a ring change",
            )
            .buckets(prometheus::exponential_buckets(0.01, 2.0, 16).expect("static buckets")),
        )
        .expect("static metric");
        let actor_crash_loops = IntCounterVec::new(
            Opts::new(
                "actor_crash_loops_total",
                "Times an entity actor kept dying and its restart was delayed",
            ),
            &["kind"],
        )
        .expect("static metric");
        let m = Metrics {
            actor_crash_loops,
            ring_version,
            handoff_entities,
            handoff_seconds,
            peer_messages,
            peer_frames,
            peer_up,
            peer_calls_failed,
            push_sent,
            push_dropped,
            push_failed,
            registry,
            ws_connections,
            messages_in,
            messages_out,
            flush_seconds,
            flush_batch,
            flush_errors,
            actors,
            mailbox_depth,
            actor_restarts,
            errors,
            disconnects,
            fanout_seconds,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.ws_connections.clone()),
            Box::new(m.messages_in.clone()),
            Box::new(m.messages_out.clone()),
            Box::new(m.flush_seconds.clone()),
            Box::new(m.flush_batch.clone()),
            Box::new(m.flush_errors.clone()),
            Box::new(m.actors.clone()),
            Box::new(m.mailbox_depth.clone()),
            Box::new(m.actor_restarts.clone()),
            Box::new(m.errors.clone()),
            Box::new(m.disconnects.clone()),
            Box::new(m.fanout_seconds.clone()),
            Box::new(m.push_sent.clone()),
            Box::new(m.push_dropped.clone()),
            Box::new(m.push_failed.clone()),
            Box::new(m.peer_up.clone()),
            Box::new(m.peer_calls_failed.clone()),
            Box::new(m.peer_messages.clone()),
            Box::new(m.peer_frames.clone()),
            Box::new(m.ring_version.clone()),
            Box::new(m.handoff_entities.clone()),
            Box::new(m.handoff_seconds.clone()),
            Box::new(m.actor_crash_loops.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        m
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// The process's metrics, created on first use.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}
