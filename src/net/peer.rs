//! Peer links: how a node reaches the entities homed on the other nodes.
//!
//! Owns every node-to-node socket. Each node keeps one outbound link per remote node
//! (it connects to the peer's `peer_addr` and sends its calls there) and accepts the
//! peers' links on its own `peer_addr` (it answers their calls there). On the wire:
//! length-delimited messages (tokio-util's codec, at most [`MAX_PEER_FRAME`] bytes), each
//! holding one or more bincode-encoded [`Frame`]s, every one prefixed by its length.
//!
//! - **Handshake.** The connecting side sends `Hello { node, protocol }` and the
//!   accepting side answers with its own. A link is used only when both speak
//!   [`PEER_PROTOCOL`] and each is in the other's cluster file. Which ring each serves
//!   is not the link's business: nodes tell each other in a `Ring` cast
//!   (`net/membership.rs`), and a node serves a call only for an entity its own ring
//!   state gives it.
//! - **Links come and go** with the cluster file: a reload adds links to new nodes, a
//!   committed ring drops the links to nodes no longer in it.
//! - **Calls** carry a correlation id; the answer comes back on the same connection.
//!   A caller waits at most [`CALL_TIMEOUT`]; a link that is down answers
//!   `owner_unavailable` at once, so nothing hangs on a dead node.
//! - **Casts** (events for sessions, best-effort notifications) expect no answer. While
//!   our link to a peer is not up but its link to us is (a restarted peer dials first),
//!   casts travel back over its link.
//! - **Reconnect** with exponential backoff ([`RETRY_MIN`]..[`RETRY_MAX`]). When a link
//!   goes down its pending calls fail, frames still queued for it are dropped (their
//!   callers were answered; each frame carries the connection generation it was queued
//!   for, so none is sent late on a later connection), and the node is told
//!   ([`PeerHandler::link_down`]) so that sessions depending on it are cleaned up.
//! - **Liveness.** The dialling side pings every [`PING_EVERY`]; a link that hears
//!   nothing for [`PEER_SILENCE`] is down, so a frozen or vanished peer is noticed in
//!   seconds, not at the TCP timeout.
//! - **Size.** A frame over [`MAX_PEER_FRAME`] never takes a link down: an answer is
//!   replaced by an error answer, anything else is dropped. (Config keeps bodies small
//!   enough in a cluster that pages and appends fit.)
//! - **Batching.** The writer packs every frame already queued into one message (up to
//!   1 MiB) before it flushes, so a burst (a group's fan-out to the users of one node)
//!   crosses as one message; each call in it still has its own answer, so one slow
//!   member does not hold up the others.
//!
//! Limits, written down: a link's queue holds [`LINK_QUEUE`] frames; past it calls
//! answer `owner_unavailable` and casts are dropped. Calls a peer sends us run
//! concurrently, bounded only by what the peer has in flight.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::actors::*;
use crate::ids::{ConversationId, GroupId, UserId};
use crate::metrics::metrics;

/// Version of the frames below; peers on another version are refused.
pub const PEER_PROTOCOL: u32 = 3;
/// Largest frame a link accepts (an inbox append carries at most 256 messages of at
/// most `max_message_bytes` each).
pub const MAX_PEER_FRAME: usize = 64 << 20;
/// Frames queued for one link before calls fail and casts are dropped.
pub const LINK_QUEUE: usize = 16_384;
/// Longest a call may wait for its answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
pub const RETRY_MIN: Duration = Duration::from_millis(100);
pub const RETRY_MAX: Duration = Duration::from_secs(2);
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// A wire message gathers queued frames up to this size (a single larger frame goes
/// alone, up to [`MAX_PEER_FRAME`]).
const BATCH_BYTES: usize = 1 << 20;
/// Frames taken from the queue before the writer flushes.
const MAX_BATCH_FRAMES: usize = 1024;
/// The dialling side pings this often...
const PING_EVERY: Duration = Duration::from_secs(1);
/// ...and a link that heard nothing for this long is down (a frozen or vanished peer
/// does not close its sockets).
const PEER_SILENCE: Duration = Duration::from_secs(3);
/// Numbers inbound connections, so a closing one never unsets its successor.
static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// The first frame each side sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub node: String,
    pub protocol: u32,
}

/// A request for an entity homed on the receiving node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PeerCall {
    User(UserId, UserRequest),
    Conversation(ConversationId, ConversationRequest),
    Group(GroupId, GroupRequest),
    Media(uuid::Uuid, MediaRequest),
    ReadMessages(ConversationId, Vec<u64>),
    ClaimHandle(String, UserId),
    ReleaseHandle(String, UserId),
    ResolveHandle(String),
    /// How many entities the receiving node stores.
    Owned,
    /// Chaos testing: stop that entity's actor abruptly (`POST /admin/chaos/kill`).
    Kill(Entity),
    /// Entities handed off to the receiving node, for the ring with signature `ring`:
    /// raw records (see `storage::EntityDump`); durable before the answer if `commit`.
    Import {
        ring: u64,
        records: Vec<(String, Vec<u8>, Vec<u8>)>,
        commit: bool,
    },
    /// Whether the receiving node holds the media bytes with this hash (`Count` 1 or 0).
    HasMediaFile(String),
    /// Part of a media file handed off; the file is whole (and checked against its
    /// hash) after the `last` part.
    MediaChunk {
        sha256: String,
        offset: u64,
        bytes: Vec<u8>,
        last: bool,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PeerReply {
    User(UserReply),
    Conversation(ConversationReply),
    Group(GroupReply),
    Messages(Vec<MessageRecord>),
    Handle(Option<UserId>),
    Count(u64),
    Done,
}

/// A one-way message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PeerCast {
    /// An event for a session on the receiving node, from the actor of `user`. If the
    /// session is gone (or too slow, and closed), the receiver tells that actor to
    /// detach it.
    Deliver {
        user: UserId,
        session: u64,
        event: SessionEvent,
    },
    /// A best-effort event for the live sessions of a user homed on the receiving node.
    Notify { user: UserId, event: SessionEvent },
    /// An event for a session on the receiving node that watches a user's presence
    /// (any user's session: a watcher is someone else).
    Watched { session: u64, event: SessionEvent },
    /// The sender's ring state, every second and on every change.
    Ring(super::membership::RingState),
}

#[derive(Debug, Serialize, Deserialize)]
enum Frame {
    Hello(Hello),
    Call {
        id: u64,
        call: PeerCall,
    },
    Reply {
        id: u64,
        result: Result<PeerReply, ActorError>,
    },
    Cast(PeerCast),
    /// Instead of a `Hello`: the accepting side will not take this link, and why.
    Refused(String),
    /// Liveness, every [`PING_EVERY`] from the dialling side; answered with `Pong`.
    Ping,
    Pong,
}

/// A frame queued for a link, tagged with the link's generation when it was queued.
type Queued = (u64, Frame);

fn encode(frame: &Frame) -> Result<Vec<u8>, String> {
    bincode::serde::encode_to_vec(frame, bincode::config::standard()).map_err(|e| e.to_string())
}

fn decode(bytes: &[u8]) -> Result<Frame, String> {
    // A frame claims no more than a frame may hold: a bad length prefix inside one is
    // an error, not an unbounded allocation.
    let config = bincode::config::standard().with_limit::<MAX_PEER_FRAME>();
    let (frame, used) =
        bincode::serde::decode_from_slice(bytes, config).map_err(|e| e.to_string())?;
    if used != bytes.len() {
        return Err(format!("{} trailing bytes", bytes.len() - used));
    }
    Ok(frame)
}

/// Appends one frame to a wire message: its length (u32, big-endian), then its bytes.
fn pack(out: &mut Vec<u8>, frame: &[u8]) {
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
}

/// The frames of one wire message (one or more, each length-prefixed: a burst of calls
/// to one node travels as one message).
fn unpack(mut wire: &[u8]) -> Result<Vec<Frame>, String> {
    let mut frames = Vec::new();
    while !wire.is_empty() {
        let (len, rest) = wire
            .split_first_chunk::<4>()
            .ok_or("truncated frame length")?;
        let len = u32::from_be_bytes(*len) as usize;
        let body = rest.get(..len).ok_or("frame longer than its message")?;
        frames.push(decode(body)?);
        wire = &rest[len..];
    }
    if frames.is_empty() {
        return Err("empty message".into());
    }
    Ok(frames)
}

/// A wire message holding the one frame.
fn single(frame: &Frame) -> Result<Bytes, String> {
    let mut out = Vec::new();
    pack(&mut out, &encode(frame)?);
    Ok(Bytes::from(out))
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_PEER_FRAME)
        .new_codec()
}

type Wire = Framed<TcpStream, LengthDelimitedCodec>;

/// What a node does with what its peers send it.
pub trait PeerHandler: Send + Sync + 'static {
    /// Serves a call for an entity homed here.
    fn call(&self, call: PeerCall) -> Call<PeerReply>;
    fn cast(&self, from: &str, cast: PeerCast);
    /// The link to `node` went down.
    fn link_down(&self, node: &str);
}

/// One outbound link.
struct Link {
    node: String,
    addr: SocketAddr,
    tx: mpsc::Sender<Queued>,
    /// Counts connections. A frame queued for an earlier one is dropped, never sent
    /// late on a later one: its caller was already answered.
    generation: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<PeerReply, ActorError>>>>,
    next_id: AtomicU64,
    up: AtomicBool,
    /// Cuts the reconnect backoff short: the peer just dialled us, so it is back.
    wake: tokio::sync::Notify,
    /// Set when the node leaves the cluster file: the link stops for good.
    closed: AtomicBool,
    stop: tokio::sync::Notify,
    /// Chaos testing: no connection either way until then.
    partitioned_until: Mutex<Option<tokio::time::Instant>>,
    /// Ends the peer's inbound connection (a partition).
    inbound_stop: tokio::sync::Notify,
    /// The writer of the peer's own link to us, while it is connected: casts take it
    /// when our outbound link is not up (yet). A restarted peer's link to us comes up
    /// before ours to it, and events for its sessions must not be lost in between.
    reverse: Mutex<Option<(u64, mpsc::Sender<Queued>)>>,
}

/// Removes a call's pending entry however its future ends (answered, timed out, or
/// dropped by its caller).
struct Pending {
    link: Arc<Link>,
    id: u64,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.link
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl Link {
    /// The end of a partition in force, if one is.
    fn partitioned(&self) -> Option<tokio::time::Instant> {
        let until = *self
            .partitioned_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        until.filter(|u| *u > tokio::time::Instant::now())
    }

    fn fail_pending(&self) {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        for (_, tx) in pending {
            let _ = tx.send(Err(ActorError::Unavailable));
        }
    }
}

/// This node's links to every other node.
pub struct PeerLinks {
    me: Hello,
    links: RwLock<HashMap<String, Arc<Link>>>,
    handler: OnceLock<Weak<dyn PeerHandler>>,
}

impl PeerLinks {
    /// Creates the links (not yet connected); `start` connects them.
    pub fn new(
        me: Hello,
        peers: impl IntoIterator<Item = (String, SocketAddr)>,
    ) -> (Arc<Self>, Vec<LinkRx>) {
        let mut links = HashMap::new();
        let mut rxs = Vec::new();
        for (node, addr) in peers {
            let (link, rx) = new_link(node.clone(), addr);
            rxs.push(rx);
            links.insert(node, link);
        }
        (
            Arc::new(PeerLinks {
                me,
                links: RwLock::new(links),
                handler: OnceLock::new(),
            }),
            rxs,
        )
    }

    /// Adds a link to a node that joined the cluster file (no-op if there is one).
    /// Must run inside an actix system, after `start`.
    pub fn add(self: &Arc<Self>, node: &str, addr: SocketAddr) {
        let mut links = self.links.write().unwrap_or_else(|p| p.into_inner());
        if links.contains_key(node) {
            return;
        }
        let (link, rx) = new_link(node.to_string(), addr);
        links.insert(node.to_string(), link);
        let me = Arc::clone(self);
        actix::spawn(async move { me.run_link(rx).await });
    }

    /// Drops the link to a node no longer in the cluster, for good.
    pub fn remove(&self, node: &str) {
        let link = self
            .links
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node);
        if let Some(link) = link {
            let _ = metrics().peer_up.remove_label_values(&[node]);
            link.closed.store(true, Ordering::Release);
            link.stop.notify_one();
            link.wake.notify_one();
        }
    }

    /// Chaos testing: drops both directions of the link to `node` and refuses it for
    /// `duration`; then it reconnects by itself. `false` if there is no such link.
    pub fn partition(&self, node: &str, duration: Duration) -> bool {
        let Some(link) = self.link(node) else {
            return false;
        };
        *link
            .partitioned_until
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(tokio::time::Instant::now() + duration);
        tracing::warn!(peer = %node, ms = duration.as_millis() as u64, "chaos: partitioning the link");
        // `notify_waiters`: only the connections up now end; no permit is left behind
        // for the next one.
        link.stop.notify_waiters();
        link.inbound_stop.notify_waiters();
        link.wake.notify_waiters();
        true
    }

    /// The nodes this node has links to.
    pub fn nodes(&self) -> Vec<String> {
        self.links
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    fn link(&self, node: &str) -> Option<Arc<Link>> {
        self.links
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .cloned()
    }

    /// Wires in the handler, then starts the outbound links and the listener. Must run
    /// inside an actix system.
    pub async fn start(
        self: &Arc<Self>,
        handler: Weak<dyn PeerHandler>,
        listen: SocketAddr,
        rxs: Vec<LinkRx>,
    ) -> std::io::Result<()> {
        let _ = self.handler.set(handler);
        let listener = TcpListener::bind(listen).await?;
        let me = Arc::clone(self);
        actix::spawn(async move { me.accept_loop(listener).await });
        for rx in rxs {
            let me = Arc::clone(self);
            actix::spawn(async move { me.run_link(rx).await });
        }
        Ok(())
    }

    fn handler(&self) -> Option<Arc<dyn PeerHandler>> {
        self.handler.get().and_then(Weak::upgrade)
    }

    /// Whether the link to `node` is up now.
    pub fn is_up(&self, node: &str) -> bool {
        self.link(node)
            .is_some_and(|l| l.up.load(Ordering::Acquire))
    }

    /// Sends a call to `node` and waits (bounded) for its answer.
    pub fn call(&self, node: &str, call: PeerCall) -> Call<PeerReply> {
        let Some(link) = self.link(node).filter(|l| l.up.load(Ordering::Acquire)) else {
            metrics().peer_calls_failed.inc();
            return Box::pin(async { Err(ActorError::Unavailable) });
        };
        let id = link.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        link.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let pending = Pending {
            link: Arc::clone(&link),
            id,
        };
        // Queued now, so calls made in order leave in order.
        let generation = link.generation.load(Ordering::Acquire);
        let queued = link.tx.try_send((generation, Frame::Call { id, call }));
        Box::pin(async move {
            let _pending = pending;
            if queued.is_err() {
                metrics().peer_calls_failed.inc();
                return Err(ActorError::Unavailable);
            }
            match tokio::time::timeout(CALL_TIMEOUT, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) | Err(_) => {
                    metrics().peer_calls_failed.inc();
                    Err(ActorError::Unavailable)
                }
            }
        })
    }

    /// Sends a one-way message, over our link to `node` or, while that is not up, over
    /// its link to us; `false` if neither is up or the queue is full.
    pub fn cast(&self, node: &str, cast: PeerCast) -> bool {
        let Some(link) = self.link(node) else {
            return false;
        };
        if link.up.load(Ordering::Acquire) {
            let generation = link.generation.load(Ordering::Acquire);
            return link.tx.try_send((generation, Frame::Cast(cast))).is_ok();
        }
        let reverse = link.reverse.lock().unwrap_or_else(|p| p.into_inner());
        reverse
            .as_ref()
            .is_some_and(|(_, tx)| tx.try_send((0, Frame::Cast(cast))).is_ok())
    }

    /// Connects, serves, and reconnects the link to one peer, for the node's life.
    async fn run_link(self: Arc<Self>, mut rx: LinkRx) {
        let link = Arc::clone(&rx.link);
        let mut backoff = RETRY_MIN;
        let mut warned = false;
        while !link.closed.load(Ordering::Acquire) {
            if let Some(until) = link.partitioned() {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => {}
                    _ = link.stop.notified() => {}
                }
                backoff = RETRY_MIN;
                continue;
            }
            match self.connect(&link).await {
                Ok(wire) => {
                    backoff = RETRY_MIN;
                    warned = false;
                    let generation = link.generation.fetch_add(1, Ordering::AcqRel) + 1;
                    link.up.store(true, Ordering::Release);
                    metrics().peer_up.with_label_values(&[&link.node]).set(1);
                    tracing::info!(peer = %link.node, "peer link up");
                    let why = self
                        .serve_outbound(&link, wire, &mut rx.rx, generation)
                        .await;
                    link.up.store(false, Ordering::Release);
                    metrics().peer_up.with_label_values(&[&link.node]).set(0);
                    tracing::warn!(peer = %link.node, reason = %why, "peer link down");
                    link.fail_pending();
                    // Their callers were answered: drop what is still queued.
                    while rx.rx.try_recv().is_ok() {}
                    if let Some(h) = self.handler() {
                        h.link_down(&link.node);
                    }
                }
                Err(e) if !warned => {
                    warned = true;
                    tracing::warn!(peer = %link.node, addr = %link.addr, error = %e, "cannot reach peer; retrying");
                }
                Err(e) => tracing::debug!(peer = %link.node, error = %e, "peer still unreachable"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = link.wake.notified() => {}
            }
            backoff = (backoff * 2).min(RETRY_MAX);
        }
        tracing::info!(peer = %link.node, "peer link closed: the node left the cluster");
    }

    async fn connect(&self, link: &Link) -> Result<Wire, String> {
        let stream = tokio::time::timeout(HELLO_TIMEOUT, TcpStream::connect(link.addr))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let mut wire = Framed::new(stream, codec());
        wire.send(single(&Frame::Hello(self.me.clone()))?)
            .await
            .map_err(|e| e.to_string())?;
        let theirs = read_hello(&mut wire).await?;
        self.check_hello(&theirs, Some(&link.node))?;
        Ok(wire)
    }

    /// Refuses a peer on another protocol or ring (or not the node we dialled).
    fn check_hello(&self, theirs: &Hello, expected: Option<&str>) -> Result<(), String> {
        if expected.is_some_and(|n| n != theirs.node) {
            return Err(format!(
                "expected node {:?}, reached {:?}",
                expected, theirs.node
            ));
        }
        if self
            .link(&theirs.node)
            .is_some_and(|l| l.partitioned().is_some())
        {
            return Err(format!(
                "node {:?} is partitioned away (chaos)",
                theirs.node
            ));
        }
        if self.link(&theirs.node).is_none() {
            return Err(format!(
                "node {:?} is not in this node's cluster.toml",
                theirs.node
            ));
        }
        if theirs.protocol != PEER_PROTOCOL {
            return Err(format!(
                "peer speaks protocol {}, this node {PEER_PROTOCOL}",
                theirs.protocol
            ));
        }
        Ok(())
    }

    /// Writes queued frames and reads answers until the connection fails or the peer
    /// falls silent.
    async fn serve_outbound(
        &self,
        link: &Link,
        wire: Wire,
        rx: &mut mpsc::Receiver<Queued>,
        generation: u64,
    ) -> String {
        let (mut sink, mut stream) = wire.split();
        let mut ping = tokio::time::interval(PING_EVERY);
        let mut heard = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = link.stop.notified() => return "the node left the cluster".into(),
                queued = rx.recv() => {
                    let Some(first) = queued else { return "node stopping".into() };
                    if let Err(e) = write_batch(&mut sink, first, rx, Some(generation)).await {
                        return e;
                    }
                }
                _ = ping.tick() => {
                    // (A partition also ends the connection here, should its
                    // notification have fallen between two polls.)
                    if link.partitioned().is_some() {
                        return "partitioned (chaos)".into();
                    }
                    if heard.elapsed() > PEER_SILENCE {
                        return format!("no answer for {PEER_SILENCE:?}");
                    }
                    if let Err(e) = write_batch(&mut sink, (generation, Frame::Ping), rx, Some(generation)).await {
                        return e;
                    }
                }
                incoming = stream.next() => {
                    let bytes = match incoming {
                        Some(Ok(b)) => b,
                        Some(Err(e)) => return e.to_string(),
                        None => return "closed by peer".into(),
                    };
                    heard = tokio::time::Instant::now();
                    let frames = match unpack(&bytes) {
                        Ok(f) => f,
                        Err(e) => return format!("undecodable message: {e}"),
                    };
                    for frame in frames {
                        match frame {
                            Frame::Reply { id, result } => {
                                let waiting = link.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                                if let Some(tx) = waiting {
                                    let _ = tx.send(result);
                                }
                            }
                            // The peer's casts, while its own link to us is not up.
                            Frame::Cast(cast) => {
                                if let Some(h) = self.handler() {
                                    h.cast(&link.node, cast);
                                }
                            }
                            Frame::Pong => {}
                            other => return format!("unexpected frame on an outbound link: {other:?}"),
                        }
                    }
                }
            }
        }
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        let mut backoff = Duration::from_millis(10);
        loop {
            match listener.accept().await {
                Ok((stream, addr)) => {
                    backoff = Duration::from_millis(10);
                    let me = Arc::clone(&self);
                    actix::spawn(async move {
                        if let Err(e) = me.serve_inbound(stream).await {
                            tracing::warn!(from = %addr, error = %e, "inbound peer link ended");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!(error = %e, "accepting a peer link failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Answers one peer's calls and applies its casts until the connection ends.
    async fn serve_inbound(self: Arc<Self>, stream: TcpStream) -> Result<(), String> {
        let _ = stream.set_nodelay(true);
        let mut wire = Framed::new(stream, codec());
        let theirs = read_hello(&mut wire).await?;
        // A refusal says why, so the other side can log it (and back off).
        if let Err(e) = self.check_hello(&theirs, None) {
            tracing::warn!(peer = %theirs.node, error = %e, "refusing peer link");
            let _ = wire.send(single(&Frame::Refused(e.clone()))?).await;
            return Err(e);
        }
        wire.send(single(&Frame::Hello(self.me.clone()))?)
            .await
            .map_err(|e| e.to_string())?;
        let from = theirs.node;
        let (mut sink, mut stream) = wire.split();
        let (tx, mut rx) = mpsc::channel::<Queued>(LINK_QUEUE);
        let mut writer = actix::spawn(async move {
            while let Some(first) = rx.recv().await {
                if write_batch(&mut sink, first, &mut rx, None).await.is_err() {
                    break;
                }
            }
        });
        // The peer is up: offer this connection for our casts, and dial it back now.
        let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
        let link = self.link(&from);
        if let Some(link) = &link {
            *link.reverse.lock().unwrap_or_else(|p| p.into_inner()) = Some((conn, tx.clone()));
            link.wake.notify_one();
        }
        let result = loop {
            let partitioned = async {
                match &link {
                    Some(l) => l.inbound_stop.notified().await,
                    None => std::future::pending().await,
                }
            };
            let incoming = tokio::select! {
                _ = partitioned => break Err("partitioned (chaos)".into()),
                incoming = tokio::time::timeout(PEER_SILENCE * 2, stream.next()) => incoming,
                // Answers can no longer be written: serving more calls would only run
                // them unanswered.
                _ = &mut writer => break Err("writer ended".into()),
            };
            let bytes = match incoming {
                Ok(Some(Ok(b))) => b,
                Ok(Some(Err(e))) => break Err(e.to_string()),
                Ok(None) => break Ok(()),
                Err(_) => break Err(format!("no frame for {:?}", PEER_SILENCE * 2)),
            };
            if link.as_ref().is_some_and(|l| l.partitioned().is_some()) {
                break Err("partitioned (chaos)".into());
            }
            let Some(handler) = self.handler() else {
                break Ok(());
            };
            let frames = match unpack(&bytes) {
                Ok(f) => f,
                Err(e) => break Err(format!("undecodable message: {e}")),
            };
            let mut bad = None;
            for frame in frames {
                match frame {
                    Frame::Call { id, call } => {
                        let answer = handler.call(call);
                        let tx = tx.clone();
                        actix::spawn(async move {
                            let result = answer.await;
                            let _ = tx.send((0, Frame::Reply { id, result })).await;
                        });
                    }
                    Frame::Cast(cast) => handler.cast(&from, cast),
                    Frame::Ping => {
                        let _ = tx.try_send((0, Frame::Pong));
                    }
                    other => {
                        bad = Some(format!("unexpected frame on an inbound link: {other:?}"));
                        break;
                    }
                }
            }
            if let Some(e) = bad {
                break Err(e);
            }
        };
        writer.abort();
        if let Some(link) = &link {
            let mut reverse = link.reverse.lock().unwrap_or_else(|p| p.into_inner());
            if reverse.as_ref().is_some_and(|(c, _)| *c == conn) {
                *reverse = None;
            }
        }
        result
    }
}

fn new_link(node: String, addr: SocketAddr) -> (Arc<Link>, LinkRx) {
    let (tx, rx) = mpsc::channel(LINK_QUEUE);
    let link = Arc::new(Link {
        node,
        addr,
        tx,
        generation: AtomicU64::new(0),
        pending: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        up: AtomicBool::new(false),
        wake: tokio::sync::Notify::new(),
        closed: AtomicBool::new(false),
        stop: tokio::sync::Notify::new(),
        partitioned_until: Mutex::new(None),
        inbound_stop: tokio::sync::Notify::new(),
        reverse: Mutex::new(None),
    });
    let rx = LinkRx {
        link: Arc::clone(&link),
        rx,
    };
    (link, rx)
}

/// The receiving end of a link's queue, handed to its connection task.
pub struct LinkRx {
    link: Arc<Link>,
    rx: mpsc::Receiver<Queued>,
}

async fn read_hello(wire: &mut Wire) -> Result<Hello, String> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, wire.next())
        .await
        .map_err(|_| "no hello in time".to_string())?
        .ok_or("closed before hello")?
        .map_err(|e| e.to_string())?;
    match unpack(&first)?.into_iter().next() {
        Some(Frame::Hello(h)) => Ok(h),
        Some(Frame::Refused(why)) => Err(format!("refused by the peer: {why}")),
        other => Err(format!("expected hello, got {other:?}")),
    }
}

/// Writes `first` and every frame already queued behind it, packed into as few wire
/// messages as [`BATCH_BYTES`] allows, then flushes once: a group's fan-out to the users
/// of one node leaves as one message.
async fn write_batch(
    sink: &mut SplitSink<Wire, Bytes>,
    first: Queued,
    rx: &mut mpsc::Receiver<Queued>,
    generation: Option<u64>,
) -> Result<(), String> {
    let mut next = Some(first);
    let mut message: Vec<u8> = Vec::new();
    let mut frames = 0;
    while let Some((queued_for, frame)) = next {
        frames += 1;
        next = if frames < MAX_BATCH_FRAMES {
            rx.try_recv().ok()
        } else {
            None
        };
        if generation.is_some_and(|g| g != queued_for) {
            continue; // queued for an earlier connection; its caller was answered
        }
        let bytes = match encode(&frame).map(|b| fit(b, &frame)) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => continue,
            // A frame that cannot be encoded is a bug; its caller times out.
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a peer frame");
                continue;
            }
        };
        if !message.is_empty() && message.len() + bytes.len() + 4 > BATCH_BYTES {
            metrics().peer_messages.inc();
            sink.feed(Bytes::from(std::mem::take(&mut message)))
                .await
                .map_err(|e| e.to_string())?;
        }
        pack(&mut message, &bytes);
        metrics().peer_frames.inc();
    }
    if !message.is_empty() {
        metrics().peer_messages.inc();
        sink.feed(Bytes::from(message))
            .await
            .map_err(|e| e.to_string())?;
    }
    sink.flush().await.map_err(|e| e.to_string())
}

/// A frame too large for a wire message must not take the link down: an answer is
/// replaced by an error answer, anything else is dropped (its caller times out).
fn fit(bytes: Vec<u8>, frame: &Frame) -> Option<Vec<u8>> {
    if bytes.len() + 4 <= MAX_PEER_FRAME {
        return Some(bytes);
    }
    tracing::error!(size = bytes.len(), "peer frame over the size limit");
    match frame {
        Frame::Reply { id, .. } => encode(&Frame::Reply {
            id: *id,
            result: Err(ActorError::Internal(
                "answer too large for a peer link".into(),
            )),
        })
        .ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip() {
        let f = Frame::Call {
            id: 7,
            call: PeerCall::ResolveHandle("alice".into()),
        };
        let back = decode(&encode(&f).unwrap()).unwrap();
        assert!(
            matches!(back, Frame::Call { id: 7, call: PeerCall::ResolveHandle(h) } if h == "alice")
        );
        let r = Frame::Reply {
            id: 9,
            result: Err(ActorError::NotMember),
        };
        assert!(matches!(
            decode(&encode(&r).unwrap()).unwrap(),
            Frame::Reply {
                id: 9,
                result: Err(ActorError::NotMember)
            }
        ));
    }

    #[test]
    fn messages_pack_several_frames() {
        let mut message = Vec::new();
        for id in 0..3 {
            pack(
                &mut message,
                &encode(&Frame::Reply {
                    id,
                    result: Ok(PeerReply::Done),
                })
                .unwrap(),
            );
        }
        let ids: Vec<u64> = unpack(&message)
            .unwrap()
            .into_iter()
            .map(|f| match f {
                Frame::Reply { id, .. } => id,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids, vec![0, 1, 2]);
        assert!(unpack(&message[..message.len() - 1]).is_err(), "cut short");
        assert!(unpack(&[]).is_err());
        assert!(matches!(
            unpack(
                &single(&Frame::Cast(PeerCast::Notify {
                    user: UserId::random(),
                    event: SessionEvent::Close {
                        code: 1000,
                        reason: String::new()
                    },
                }))
                .unwrap()
            )
            .unwrap()
            .as_slice(),
            [Frame::Cast(_)]
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
            let _ = unpack(&bytes);
        }
    }
}
