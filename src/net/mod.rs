//! Everything that touches a socket.
//!
//! - `http.rs`: the HTTP API (accounts, history, receipts, health, metrics) on actix-web.
//! - `ws.rs`: the WebSocket session actor: parses client frames, enforces frame size,
//!   rate and heartbeat limits, keeps the connection's inbox cursor and writes events in
//!   order through a bounded outgoing buffer.
//! - `protocol.rs`: the JSON wire types of the client contract.
//! - `api.rs`: the contract's error body and status mapping.
//! - `ring.rs`: the consistent-hash ring that names each entity's home node.
//! - `router.rs`: implements [`crate::actors::Route`]: ring lookup, then the local
//!   registry or the owner's peer link; serves the peers' calls.
//! - `sessions.rs`: this node's table of live WebSocket sessions.
//! - `push.rs`: the bounded queue and sender of push notifications to the `[push]` webhook.
//! - `peer.rs`: the links to the other nodes: framed bincode over TCP, handshake,
//!   correlated calls with timeouts, casts, reconnect with backoff.
//! - `membership.rs`: which ring the node serves, which its file asks for, and the rules
//!   by which the nodes agree to move from one to the other.
//! - `handoff.rs`: this node's share of a ring change: moving entities to their new home.
//! - `web.rs`: the web client's files (`web/`, embedded at build time), served at `/`.
//!
//! `net` imports `actors` (and `storage` only to open it at start-up).

mod api;
mod handoff;
mod http;
pub mod membership;
pub mod peer;
mod protocol;
mod push;
pub mod ring;
mod router;
mod sessions;
pub mod web;
mod ws;

use std::sync::{Arc, Weak};

use actix_web::{App, HttpServer};

use crate::actors::{Registry, Route};
use crate::config::{ClusterConfig, NodeConfig};
use crate::storage::{StorageError, Store};

pub use router::Router;

/// Why a node could not start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot open storage: {0}")]
    Storage(#[from] StorageError),
    #[error("cannot start: {0}")]
    Startup(#[from] crate::actors::ActorError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
}

/// Shared state handed to every HTTP handler and WebSocket session.
#[derive(Clone)]
pub(crate) struct AppState {
    pub router: Arc<Router>,
    pub limits: Arc<crate::config::Limits>,
    /// `[cluster] admin_token`: `/admin/*` answer 404 without it.
    pub admin_token: Option<Arc<str>>,
    /// For reading media from their home node on a client's behalf.
    pub http: reqwest::Client,
    /// The cluster file, re-read by `POST /admin/reload`.
    pub config_path: Arc<std::path::Path>,
    /// `[chaos] enabled`: the `/admin/chaos/*` calls exist.
    pub chaos: bool,
}

/// Runs one node until it is told to stop (SIGINT/SIGTERM), or until it has left the
/// cluster. `config_path` is re-read on SIGHUP. Must be called inside an actix system.
pub async fn serve(
    config: ClusterConfig,
    node: NodeConfig,
    config_path: std::path::PathBuf,
) -> Result<(), NetError> {
    let store = Store::open(&node.data_dir)?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let registry = Registry::new(store, config.limits.clone(), threads);
    let pusher = config.push.clone().map(push::Pusher::start);
    let stored = registry.store().ring_record()?;
    let hello = peer::Hello {
        node: node.id.clone(),
        protocol: peer::PEER_PROTOCOL,
    };
    let (peers, links) = peer::PeerLinks::new(
        hello,
        config
            .nodes
            .iter()
            .filter(|n| n.id != node.id)
            .map(|n| (n.id.clone(), n.peer_addr)),
    );
    let router = Router::new(
        node.id.clone(),
        &config,
        stored,
        Arc::clone(&registry),
        pusher,
        Arc::clone(&peers),
    );
    let weak: Weak<dyn Route> = Arc::downgrade(&(Arc::clone(&router) as Arc<dyn Route>));
    registry.set_route(weak);
    let handler: Weak<dyn peer::PeerHandler> =
        Arc::downgrade(&(Arc::clone(&router) as Arc<dyn peer::PeerHandler>));
    peers
        .start(handler, node.peer_addr, links)
        .await
        .map_err(|source| NetError::Bind {
            addr: node.peer_addr,
            source,
        })?;
    actix::spawn(Arc::clone(&router).run_membership());
    // Conversations whose fan-out was cut short by the last stop pick it up again, and
    // groups with a membership change not yet announced retry it.
    router.resume_pending();
    reload_on_sighup(Arc::clone(&router), config_path.clone())?;
    // Conversations and groups that died with work of their own (a fan-out, an
    // announcement) are woken once their restart is allowed, even if nobody calls them.
    let reviver = Arc::clone(&router);
    actix::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
        loop {
            tick.tick().await;
            for entity in reviver.registry().due_revivals() {
                let call = reviver.revive(entity);
                actix::spawn(async move {
                    if let Err(e) = call.await {
                        tracing::debug!(%entity, error = %e, "revival failed; the next call retries");
                    }
                });
            }
        }
    });

    // Sessions frozen by a client that stopped reading cannot run their own heartbeat:
    // sweep them here, so their users go offline on time.
    let sweeper = Arc::clone(&router);
    let (interval, timeout) = (
        config.limits.heartbeat_interval(),
        config.limits.heartbeat_timeout_ms,
    );
    actix::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            let stale_before = u64::try_from(crate::now_ms())
                .unwrap_or(0)
                .saturating_sub(timeout);
            for (session, user) in sweeper.sessions().sweep(sweeper.node_id(), stale_before) {
                crate::metrics::metrics()
                    .disconnects
                    .with_label_values(&["heartbeat_frozen"])
                    .inc();
                let detach = sweeper.user(user, crate::actors::UserRequest::Detach { session });
                actix::spawn(async move {
                    let _ = detach.await;
                });
            }
        }
    });

    let state = AppState {
        router,
        limits: Arc::new(config.limits.clone()),
        admin_token: config.cluster.admin_token.as_deref().map(Arc::from),
        http: reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(std::time::Duration::from_secs(2))
            // A home that stops sending (headers or body) ends the read, not the node.
            .read_timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| NetError::Io(std::io::Error::other(e)))?,
        config_path: Arc::from(config_path.as_path()),
        chaos: config.chaos.enabled,
    };
    tracing::info!(node = %node.id, addr = %node.client_addr, data_dir = %node.data_dir.display(), "serving");
    let left = Arc::clone(&state.router);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(actix_web::web::Data::new(state.clone()))
            .configure(http::routes)
    })
    .workers(threads)
    .shutdown_timeout(2)
    .bind(node.client_addr)
    .map_err(|source| NetError::Bind {
        addr: node.client_addr,
        source,
    })?
    .run();
    // A node that has left the cluster stops serving.
    let handle = server.handle();
    actix::spawn(async move {
        left.left.notified().await;
        handle.stop(true).await;
    });
    server.await?;
    Ok(())
}

/// Re-reads the cluster file on every SIGHUP (as `POST /admin/reload` does); a file
/// that cannot be used is reported and the node keeps its rings.
fn reload_on_sighup(router: Arc<Router>, path: std::path::PathBuf) -> Result<(), NetError> {
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    actix::spawn(async move {
        while hangups.recv().await.is_some() {
            match reload(&router, &path) {
                Ok(news) => tracing::info!(file = %path.display(), "{news}"),
                Err(e) => tracing::error!(file = %path.display(), "reload refused: {e}"),
            }
        }
    });
    Ok(())
}

/// Reads `path` and hands it to the router; the answer says what happens next.
fn reload(router: &Router, path: &std::path::Path) -> Result<String, String> {
    let config = ClusterConfig::load(path).map_err(|e| e.to_string())?;
    router.reload(&config)
}
