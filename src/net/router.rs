//! The router: implements [`Route`] by finding each entity's home on the ring.
//!
//! Entities homed here are called through the local [`Registry`]; every call is bounded
//! by [`CALL_TIMEOUT`] and answers [`ActorError::Unavailable`] rather than hang. An
//! actor that stopped between lookup and delivery (passivation, crash) is looked up
//! again and the call retried: requests are idempotent, so a retry is always safe.
//! Entities homed on another node are called over its peer link ([`PeerLinks`]), the
//! same request as plain data; the message path does not change shape.
//!
//! The router is also this node's [`PeerHandler`]: it serves the calls peers send for
//! entities homed here (and only those: a call for an entity this ring does not give
//! us is refused, never bounced back), applies their casts, and cleans up when a link
//! drops: sessions on the lost node are forgotten by the users here, and sessions here
//! of users homed there are closed, so their clients reconnect and sync.
//!
//! It keeps the node's [`Membership`] (which ring it serves, which it moves to) behind
//! one lock, and places every call by it: while an entity moves to its next home its
//! calls are held here, then forwarded, in the order they came (`net/handoff.rs` moves
//! the data). It runs the membership loop: tell the peers our ring state, read theirs,
//! and adopt, hand off or commit as `membership::decide` says.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use actix::{Actor, Addr, Handler, MailboxError};
use tokio::sync::oneshot;

use super::membership::{decide, Held, Membership, NodeAddrs, Phase, Place, Step};
use super::peer::{PeerCall, PeerCast, PeerHandler, PeerLinks, PeerReply};
use super::push::Pusher;
use super::ring::Ring;
use super::sessions::SessionTable;
use crate::actors::*;
use crate::config::ClusterConfig;
use crate::ids::{handle_ring_key, media_ring_key, ConversationId, GroupId, UserId};
use crate::metrics::metrics;
use crate::storage::{MediaWriter, RingRecord};

/// Longest an entity call may take before the caller gets `Unavailable`.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts when the actor turns out to have stopped under us.
const ATTEMPTS: usize = 3;

/// Calls held for moving entities at most; past it they answer `owner_unavailable` (the
/// caller retries), so a long handoff under heavy load cannot hold memory without bound.
const MAX_HELD: usize = 10_000;
/// A media file transfer with no part for this long is abandoned (its sender resends).
const ARRIVING_IDLE: Duration = Duration::from_secs(60);
/// How often a change that cannot proceed is logged again.
const WAIT_LOG_EVERY: Duration = Duration::from_secs(10);

/// How often the membership loop tells the peers our ring state and looks at theirs.
const MEMBERSHIP_TICK: Duration = Duration::from_millis(500);
/// The other nodes keep their link to a node that left this long after they commit
/// (it waits to hear that they did before it stops).
const LEAVE_GRACE: Duration = Duration::from_secs(10);

pub struct Router {
    this: std::sync::Weak<Router>,
    node_id: String,
    /// `[chaos] enabled`: chaos kills are obeyed.
    chaos: bool,
    membership: Arc<Mutex<Membership>>,
    /// Wakes the membership loop (a peer's state or our own changed).
    changed: tokio::sync::Notify,
    /// Entities each peer last said it owns, for `GET /admin/cluster`.
    peer_owned: Mutex<HashMap<String, u64>>,
    registry: Arc<Registry>,
    sessions: SessionTable,
    pusher: Option<Pusher>,
    peers: Arc<PeerLinks>,
    /// Fan-outs and group changes that arrived unfinished in a handoff, resumed once the
    /// import that carries them is durable.
    arriving_marks: Mutex<(Vec<ConversationId>, Vec<GroupId>)>,
    /// Media files arriving in a handoff, by hash: the writer and the next offset.
    /// A transfer idle longer than [`ARRIVING_IDLE`] (its sender died mid-file) is dropped.
    arriving_files: tokio::sync::Mutex<HashMap<String, (MediaWriter, u64, std::time::Instant)>>,
    /// Hashes of the media files received in the current ring change: this node never
    /// removes them as "moved away" (their records may still be on their way).
    arrived_files: Mutex<std::collections::HashSet<String>>,
    /// When the membership loop last logged why the ring does not change.
    last_said: Mutex<std::time::Instant>,
    /// Notified when this node has left the cluster and should stop serving.
    pub(crate) left: tokio::sync::Notify,
}

/// Where an entity lives (by the committed ring).
enum Home {
    Here,
    Peer(String),
}

/// Counts a call served here until it is answered, in the slot of the epoch it started
/// in (see `Membership::epoch`); an upload holds one from its id to its record. Taken
/// under the membership lock (so the epoch cannot change in between), dropped without
/// it: the message path pays one atomic decrement, not a second lock.
pub(crate) struct InFlight(Arc<[AtomicUsize; 2]>, usize);

impl InFlight {
    fn new(m: &Membership) -> InFlight {
        let slot = (m.epoch % 2) as usize;
        m.inflight[slot].fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(&m.inflight), slot)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0[self.1].fetch_sub(1, Ordering::AcqRel);
    }
}

fn lock(m: &Mutex<Membership>) -> MutexGuard<'_, Membership> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Router {
    /// A router for node `node_id` of `config`, serving `stored` (the ring this node
    /// last committed, if any) until the cluster agrees on the file's ring.
    pub fn new(
        node_id: String,
        config: &ClusterConfig,
        stored: Option<RingRecord>,
        registry: Arc<Registry>,
        pusher: Option<Pusher>,
        peers: Arc<PeerLinks>,
    ) -> Arc<Self> {
        let vnodes = config.cluster.vnodes;
        let mut target = Ring::new(config.nodes.iter().map(|n| n.id.clone()), vnodes);
        // A move that had started finishes first, whatever the file says by now: some
        // of this node's entities may already live at their next home.
        let started = stored.as_ref().and_then(|r| r.moving_to.clone());
        if let Some(nodes) = &started {
            let moving_to = Ring::new(nodes.clone(), vnodes);
            if moving_to != target {
                tracing::warn!(moving_to = ?nodes, file = ?target.nodes(), "a ring change was under way when this node stopped: finishing it before the file's");
            }
            target = moving_to;
        }
        let handed_off = started.is_some() && stored.as_ref().is_some_and(|r| r.handed_off);
        let mut committed = stored.map(|r| (r.version, Ring::new(r.nodes, r.vnodes)));
        // A node that left the cluster handed everything off: started again (its entry
        // back in the file), it joins like a new node.
        if started.is_none()
            && committed
                .as_ref()
                .is_some_and(|(_, r)| !r.contains(&node_id))
        {
            tracing::info!("this node left the cluster before: joining it as a new node");
            committed = None;
        }
        let membership = Membership {
            me: node_id.clone(),
            vnodes,
            committed,
            target,
            addrs: config
                .nodes
                .iter()
                .map(|n| {
                    (
                        n.id.clone(),
                        NodeAddrs {
                            client: n.client_addr,
                            peer: n.peer_addr,
                        },
                    )
                })
                .collect(),
            peers: HashMap::new(),
            handed_off,
            started: started.is_some(),
            // Held until the handoff runs again and lists what is still here.
            phase: if handed_off {
                Phase::Moving(Default::default())
            } else if started.is_some() {
                Phase::Draining
            } else {
                Phase::Idle
            },
            epoch: 0,
            inflight: Default::default(),
            held: Vec::new(),
            handing_off: false,
            waiting: None,
        };
        Arc::new_cyclic(|this| Router {
            this: this.clone(),
            node_id,
            chaos: config.chaos.enabled,
            membership: Arc::new(Mutex::new(membership)),
            changed: tokio::sync::Notify::new(),
            peer_owned: Default::default(),
            registry,
            sessions: SessionTable::default(),
            pusher,
            peers,
            arriving_files: Default::default(),
            arrived_files: Default::default(),
            arriving_marks: Default::default(),
            left: tokio::sync::Notify::new(),
            last_said: Mutex::new(std::time::Instant::now()),
        })
    }

    pub(crate) fn membership(&self) -> MutexGuard<'_, Membership> {
        lock(&self.membership)
    }

    pub(crate) fn peers(&self) -> &Arc<PeerLinks> {
        &self.peers
    }

    /// Whether this node serves a ring (a fresh node waits to learn its cluster's).
    pub fn serving(&self) -> bool {
        self.membership().committed.is_some()
    }

    pub fn sessions(&self) -> &SessionTable {
        &self.sessions
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Whether calls for `user` are served on this node now. Not merely whether the
    /// committed ring homes it here: during a ring change a user already handed off is
    /// forwarded to its next home, and one being moved is held.
    pub fn served_here(&self, user: UserId) -> bool {
        matches!(
            self.membership().place(user.ring_key().as_bytes()),
            Place::Here { .. }
        )
    }

    /// Whether a call for `user` can reach its home now (here, or over a link that is
    /// up). A call that failed while its home was unreachable was never delivered.
    pub fn reachable(&self, user: UserId) -> bool {
        match self.home(&user.ring_key()) {
            Ok(Home::Here) => true,
            Ok(Home::Peer(node)) => self.peers.is_up(&node),
            Err(_) => false,
        }
    }

    /// A fresh media id homed on this node, so an upload is stored where it arrives:
    /// by the committed ring and, during a ring change, by the next one too. (A
    /// random id lands here with probability about 1/n.) `None` if no id does: a
    /// joining or leaving node stores no uploads until the change is committed.
    ///
    /// The upload counts as a call in flight until its guard is dropped (once its record
    /// is stored), so a handoff that starts meanwhile waits for it and lists it.
    pub(crate) fn new_media_id(&self) -> Option<(uuid::Uuid, InFlight)> {
        let m = self.membership();
        let id = (0..1000).map(|_| uuid::Uuid::new_v4()).find(|id| {
            let key = media_ring_key(id);
            m.place(key.as_bytes()) == Place::Here { leaving: false }
        })?;
        Some((id, InFlight::new(&m)))
    }

    /// The client address of the node serving the media, if that is another node:
    /// its home, or its next home once it has moved there.
    pub fn media_elsewhere(&self, id: &uuid::Uuid) -> Option<std::net::SocketAddr> {
        let m = self.membership();
        let node = match m.place(media_ring_key(id).as_bytes()) {
            Place::Peer(node) | Place::Forward(node) => node,
            _ => return None,
        };
        m.addrs.get(&node).map(|a| a.client)
    }

    pub fn ring_version(&self) -> u64 {
        self.membership().version()
    }

    /// Entities stored on this node, counted on the blocking pool (it reads the whole
    /// key space, one seek per entity).
    pub async fn owned_here(&self) -> Result<u64, ActorError> {
        self.registry.entity_count().await
    }

    /// What `GET /admin/cluster` lists for each node of the committed and next rings:
    /// `(id, status, owned entities)`, and the handoffs still to do. A peer that does
    /// not answer is down and shows what it last reported.
    pub async fn cluster_view(&self) -> (Vec<(String, &'static str, u64)>, u64) {
        let (nodes, statuses, pending) = {
            let m = self.membership();
            let committed: Vec<String> = m
                .committed
                .iter()
                .flat_map(|(_, r)| r.nodes().to_vec())
                .collect();
            let mut nodes: Vec<String> =
                committed.iter().chain(m.target.nodes()).cloned().collect();
            nodes.sort();
            nodes.dedup();
            let statuses: HashMap<String, Option<&'static str>> = nodes
                .iter()
                .map(|n| {
                    let status = if !m.changing() {
                        None
                    } else if !committed.contains(n) {
                        Some("joining")
                    } else if !m.target.contains(n) {
                        Some("leaving")
                    } else {
                        None
                    };
                    (n.clone(), status)
                })
                .collect();
            (nodes, statuses, m.pending())
        };
        let others: Vec<&String> = nodes.iter().filter(|n| **n != self.node_id).collect();
        let asks = others.iter().map(|node| {
            let call = self
                .peers
                .is_up(node)
                .then(|| self.peers.call(node, PeerCall::Owned));
            async move {
                match call?.await {
                    Ok(PeerReply::Count(n)) => Some(n),
                    _ => None,
                }
            }
        });
        let (mine, answers) =
            futures_util::future::join(self.owned_here(), futures_util::future::join_all(asks))
                .await;
        let mut cache = self.peer_owned.lock().unwrap_or_else(|p| p.into_inner());
        let status = |node: &String, up: bool| {
            statuses
                .get(node)
                .copied()
                .flatten()
                .unwrap_or(if up { "up" } else { "down" })
        };
        let me = self.node_id.clone();
        let mut out = Vec::new();
        if nodes.contains(&me) {
            out.push((me.clone(), status(&me, true), mine.unwrap_or(0)));
        }
        for (node, asked) in others.into_iter().zip(answers) {
            if let Some(n) = asked {
                cache.insert(node.clone(), n);
            }
            let owned = cache.get(node).copied().unwrap_or(0);
            out.push((node.clone(), status(node, asked.is_some()), owned));
        }
        out.sort();
        (out, pending)
    }

    fn home(&self, key: &str) -> Result<Home, ActorError> {
        let m = self.membership();
        match m.home(key.as_bytes()) {
            Some(owner) if owner == self.node_id => Ok(Home::Here),
            Some(owner) => Ok(Home::Peer(owner.to_string())),
            None => Err(ActorError::Unavailable),
        }
    }

    /// Sends a call to its entity's home: served here, or over the home's peer link;
    /// during a ring change, held while its entity moves and then forwarded to the
    /// next home. Every call an entity can get goes this one way.
    fn dispatch(&self, call: PeerCall) -> Call<PeerReply> {
        let Some(key) = call_key(&call) else {
            return self.serve_here(call);
        };
        let m = self.membership();
        let place = m.place(key.as_bytes());
        self.send_to(m, place, key, call)
    }

    /// Sends `call` where `place` says. The lock is held while a forwarded or held
    /// call is queued, so calls for a moving entity keep their order.
    fn send_to(
        &self,
        mut m: MutexGuard<'_, Membership>,
        place: Place,
        key: String,
        call: PeerCall,
    ) -> Call<PeerReply> {
        match place {
            Place::Here { .. } => {
                let counted = InFlight::new(&m);
                drop(m);
                let answer = self.serve_here(call);
                Box::pin(async move {
                    let _counted = counted;
                    answer.await
                })
            }
            Place::Peer(node) => {
                drop(m);
                self.peers.call(&node, call)
            }
            Place::Forward(node) => self.peers.call(&node, call),
            Place::Hold(_)
                if m.held.len() >= MAX_HELD && {
                    for refused in m.prune() {
                        let _ = refused.answer.send(Err(ActorError::Unavailable));
                    }
                    m.held.len() >= MAX_HELD
                } =>
            {
                Box::pin(async { Err(ActorError::Unavailable) })
            }
            Place::Hold(_) => {
                let (answer, rx) = oneshot::channel();
                m.held.push(Held { key, call, answer });
                Box::pin(async move {
                    match tokio::time::timeout(CALL_TIMEOUT, rx).await {
                        Ok(Ok(result)) => result,
                        _ => Err(ActorError::Unavailable),
                    }
                })
            }
            Place::Unknown | Place::Refused => Box::pin(async { Err(ActorError::Unavailable) }),
        }
    }

    /// Sends on the held calls whose entity has now moved (call with the lock held,
    /// right after the change that let them go).
    fn release(&self, m: &mut Membership) {
        for (held, place) in m.ready() {
            let answer = match place {
                Place::Forward(node) | Place::Peer(node) => self.peers.call(&node, held.call),
                Place::Here { .. } => self.serve_here(held.call),
                _ => Box::pin(async { Err(ActorError::Unavailable) }) as Call<PeerReply>,
            };
            actix::spawn(async move {
                let _ = held.answer.send(answer.await);
            });
        }
    }

    /// Serves a call for an entity homed here (the caller checked that).
    fn serve_here(&self, call: PeerCall) -> Call<PeerReply> {
        fn wrap<T: Send + 'static>(answer: Call<T>, into: fn(T) -> PeerReply) -> Call<PeerReply> {
            Box::pin(async move { answer.await.map(into) })
        }
        let registry = Arc::clone(&self.registry);
        match call {
            PeerCall::User(id, req) => wrap(
                call_local("user", move || registry.user(id), UserCall(req)),
                PeerReply::User,
            ),
            PeerCall::Conversation(id, req) => wrap(
                call_local(
                    "conversation",
                    move || registry.conversation(id),
                    ConversationCall(req),
                ),
                PeerReply::Conversation,
            ),
            PeerCall::Group(id, req) => wrap(
                call_local("group", move || registry.group(id), GroupCall(req)),
                PeerReply::Group,
            ),
            PeerCall::Media(
                id,
                MediaRequest::Reference {
                    user,
                    conversation,
                    peer,
                },
            ) => Box::pin(async move {
                registry
                    .reference_media(user, id, conversation, peer)
                    .await
                    .map(|()| PeerReply::Done)
            }),
            PeerCall::ReadMessages(id, seqs) => {
                Box::pin(
                    async move { read_messages(&registry, id, &seqs).map(PeerReply::Messages) },
                )
            }
            PeerCall::ClaimHandle(h, user) => {
                Box::pin(
                    async move { registry.claim_handle(&h, user).await.map(PeerReply::Handle) },
                )
            }
            PeerCall::ReleaseHandle(h, user) => {
                Box::pin(async move { registry.release_handle(&h, user).map(|()| PeerReply::Done) })
            }
            PeerCall::ResolveHandle(h) => {
                Box::pin(async move { registry.resolve_handle(&h).map(PeerReply::Handle) })
            }
            PeerCall::Owned => {
                Box::pin(async move { registry.entity_count().await.map(PeerReply::Count) })
            }
            PeerCall::Kill(entity) => {
                // Only where chaos testing is on, whoever asks.
                let killed = if self.chaos {
                    registry.kill(entity);
                    Ok(PeerReply::Done)
                } else {
                    Err(ActorError::Internal(
                        "chaos testing is off on the entity's home node".into(),
                    ))
                };
                Box::pin(async move { killed })
            }
            PeerCall::Import {
                ring,
                records,
                commit,
            } => self.import(ring, records, commit),
            PeerCall::HasMediaFile(sha) => {
                let have = registry.store().has_media_file(&sha);
                Box::pin(async move { Ok(PeerReply::Count(u64::from(have))) })
            }
            PeerCall::MediaChunk {
                sha256,
                offset,
                bytes,
                last,
            } => {
                let me = self.self_arc();
                Box::pin(async move {
                    match me {
                        Some(me) => me.media_chunk(sha256, offset, bytes, last).await,
                        None => Err(ActorError::Unavailable),
                    }
                })
            }
        }
    }

    fn self_arc(&self) -> Option<Arc<Router>> {
        self.this.upgrade()
    }

    /// Writes entities handed to this node for the ring with signature `ring`
    /// (refused unless that is the ring this node moves to). After the last part of a
    /// batch is durable, interrupted fan-outs and membership changes resume here.
    fn import(
        &self,
        ring: u64,
        records: Vec<(String, Vec<u8>, Vec<u8>)>,
        commit: bool,
    ) -> Call<PeerReply> {
        let expected = {
            let m = self.membership();
            m.changing() && m.target.signature() == ring
        };
        let me = self.self_arc();
        Box::pin(async move {
            let me = me.ok_or(ActorError::Unavailable)?;
            if !expected {
                return Err(ActorError::Internal(
                    "handoff refused: this node does not move to that ring".into(),
                ));
            }
            let store = me.registry.store();
            let n = records.len() as u32;
            let dump = crate::storage::EntityDump { records };
            store.import_entity(&dump)?;
            let (conversations, groups) = dump.marks();
            {
                let mut marks = me.arriving_marks.lock().unwrap_or_else(|p| p.into_inner());
                marks.0.extend(conversations);
                marks.1.extend(groups);
            }
            if commit {
                store.commit(n).await?;
                let (conversations, groups) = std::mem::take(
                    &mut *me.arriving_marks.lock().unwrap_or_else(|p| p.into_inner()),
                );
                me.resume(conversations, groups);
            }
            Ok(PeerReply::Done)
        })
    }

    /// Wakes every conversation with a fan-out to finish and every group with a
    /// change to announce, among those stored here (each is idempotent).
    pub(crate) fn resume_pending(&self) {
        let fanouts = self.registry.pending_fanouts().unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot list pending fan-outs");
            Vec::new()
        });
        let groups = self.registry.pending_groups().unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot list pending groups");
            Vec::new()
        });
        self.resume(fanouts, groups);
    }

    /// Wakes these conversations (to finish their fan-out) and groups (to announce
    /// their change).
    fn resume(&self, fanouts: Vec<ConversationId>, groups: Vec<GroupId>) {
        // Through `dispatch`, like any call: an entity that is moving is resumed where
        // it lives once it has arrived, never restarted at its old home.
        for id in fanouts {
            let call = self.dispatch(PeerCall::Conversation(id, ConversationRequest::Resume));
            actix::spawn(async move {
                if let Err(e) = call.await {
                    tracing::warn!(conversation_id = %id, error = %e, "cannot resume fan-out");
                }
            });
        }
        for id in groups {
            let call = self.dispatch(PeerCall::Group(id, GroupRequest::Settle));
            actix::spawn(async move {
                if let Err(e) = call.await {
                    tracing::info!(group_id = %id, error = %e, "membership change still pending; its group retries");
                }
            });
        }
    }

    /// One part of a media file handed to this node; the file is kept (under its hash)
    /// once the last part has come and the bytes match it.
    async fn media_chunk(
        &self,
        sha256: String,
        offset: u64,
        bytes: Vec<u8>,
        last: bool,
    ) -> Result<PeerReply, ActorError> {
        let mut files = self.arriving_files.lock().await;
        files.retain(|_, (_, _, touched)| touched.elapsed() < ARRIVING_IDLE);
        if offset == 0 {
            let writer = self.registry.media_writer().await?;
            files.insert(sha256.clone(), (writer, 0, std::time::Instant::now()));
        }
        let Some((writer, next, touched)) = files.get_mut(&sha256) else {
            return Err(ActorError::Internal("media part out of order".into()));
        };
        *touched = std::time::Instant::now();
        if *next != offset {
            files.remove(&sha256);
            return Err(ActorError::Internal("media part out of order".into()));
        }
        writer.write(&bytes).await?;
        *next += bytes.len() as u64;
        if !last {
            return Ok(PeerReply::Done);
        }
        let Some((writer, _, _)) = files.remove(&sha256) else {
            return Err(ActorError::Internal("media part out of order".into()));
        };
        self.arrived_files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sha256.clone());
        let (got, _) = writer.finish().await?;
        if got != sha256 {
            return Err(ActorError::Internal(format!(
                "handed-off media file has hash {got}, expected {sha256}"
            )));
        }
        Ok(PeerReply::Done)
    }

    /// Re-reads the cluster file: its ring becomes this node's target, and the nodes
    /// agree on it over their links before anything moves. Refused (the node keeps its
    /// rings) if the file cannot be reconciled with what the node runs.
    pub fn reload(&self, config: &ClusterConfig) -> Result<String, String> {
        let mut m = self.membership();
        if config.cluster.vnodes != m.vnodes {
            return Err(format!(
                "vnodes changed from {} to {}: it cannot change on a running cluster",
                m.vnodes, config.cluster.vnodes
            ));
        }
        for node in &config.nodes {
            let addrs = NodeAddrs {
                client: node.client_addr,
                peer: node.peer_addr,
            };
            if let Some(known) = m.addrs.get(&node.id) {
                if *known != addrs {
                    return Err(format!(
                        "node {:?} changed its addresses (client {} -> {}, peer {} -> {}): a node keeps its addresses while it is in the cluster",
                        node.id, known.client, addrs.client, known.peer, addrs.peer
                    ));
                }
            }
            let clash = m.addrs.iter().find(|(id, a)| {
                **id != node.id && (a.client == addrs.client || a.peer == addrs.peer)
            });
            if let Some((other, _)) = clash {
                return Err(format!(
                    "node {:?} uses an address of node {other:?}",
                    node.id
                ));
            }
        }
        let target = Ring::new(config.nodes.iter().map(|n| n.id.clone()), m.vnodes);
        let back = m.committed.as_ref().is_some_and(|(_, r)| *r == target);
        if target == m.target {
            return Ok(format!(
                "cluster.toml unchanged: serving ring version {}",
                m.version()
            ));
        }
        if m.handing_off || m.started {
            return Err(format!(
                "a move to nodes {:?} is under way: reload again once it is committed",
                m.target.nodes()
            ));
        }
        for node in &config.nodes {
            m.addrs.insert(
                node.id.clone(),
                NodeAddrs {
                    client: node.client_addr,
                    peer: node.peer_addr,
                },
            );
            if node.id != self.node_id {
                self.peers.add(&node.id, node.peer_addr);
            }
        }
        m.target = target;
        m.waiting = None;
        // Links (and addresses) of nodes neither ring names any more go.
        let keep: Vec<String> = m
            .committed
            .iter()
            .flat_map(|(_, r)| r.nodes().to_vec())
            .chain(m.target.nodes().to_vec())
            .collect();
        for node in self.peers.nodes() {
            if !keep.contains(&node) {
                self.peers.remove(&node);
                m.peers.remove(&node);
            }
        }
        m.addrs.retain(|node, _| keep.contains(node));
        let nodes = m.target.nodes().to_vec();
        drop(m);
        self.changed.notify_one();
        if back {
            tracing::info!(
                ?nodes,
                "cluster.toml reloaded: back to the ring this node serves"
            );
            return Ok(format!(
                "cluster.toml reloaded: nodes {nodes:?}, the ring this node serves; nothing moves"
            ));
        }
        tracing::info!(
            ?nodes,
            "cluster.toml reloaded: moving to a new ring once every node agrees"
        );
        Ok(format!(
            "cluster.toml reloaded: nodes {nodes:?}; the ring changes once every node has the same file"
        ))
    }

    /// The membership loop, for the node's life: tells the peers our ring state, reads
    /// theirs, and takes the step `membership::decide` gives.
    pub async fn run_membership(self: Arc<Self>) {
        let mut told = tokio::time::Instant::now() - MEMBERSHIP_TICK;
        let mut last_told = None;
        loop {
            let (state, step) = {
                let mut m = self.membership();
                let state = m.state();
                let step = decide(&self.node_id, &state, &m.peers);
                // Taken with the decision, under one lock: a reload in between cannot
                // change the ring this node hands off to.
                if step == Step::Handoff && !m.handing_off {
                    m.handing_off = true;
                    let target = m.target.clone();
                    actix::spawn(super::handoff::run(Arc::clone(&self), target));
                }
                (state, step)
            };
            // Every tick, and at once when our state changed.
            if told.elapsed() >= MEMBERSHIP_TICK / 2 || last_told.as_ref() != Some(&state) {
                for node in self.peers.nodes() {
                    self.peers.cast(&node, PeerCast::Ring(state.clone()));
                }
                told = tokio::time::Instant::now();
                last_told = Some(state);
            }
            let acted = self.take_step(step).await;
            if !acted {
                tokio::select! {
                    _ = tokio::time::sleep(MEMBERSHIP_TICK) => {}
                    _ = self.changed.notified() => {}
                }
            }
        }
    }

    /// Takes one step; `true` if the state changed (so the loop goes round again now).
    async fn take_step(self: &Arc<Self>, step: Step) -> bool {
        let problem = matches!(step, Step::Wait(_));
        match step {
            Step::Idle => {
                self.membership().waiting = None;
                false
            }
            Step::Wait(why) | Step::Progress(why) => {
                let mut m = self.membership();
                let mut said = self.last_said.lock().unwrap_or_else(|p| p.into_inner());
                if m.waiting.as_deref() != Some(&why)
                    || (problem && said.elapsed() >= WAIT_LOG_EVERY)
                {
                    if problem {
                        tracing::warn!(ring_version = m.version(), reason = %why, "keeping the current ring");
                    } else {
                        tracing::info!(ring_version = m.version(), "ring change under way: {why}");
                    }
                    *said = std::time::Instant::now();
                    m.waiting = Some(why);
                }
                false
            }
            Step::Adopt { version, nodes } => {
                let vnodes = self.membership().vnodes;
                if let Err(e) = self.record_ring(version, &nodes, vnodes, None, false).await {
                    tracing::error!(error = %e, "cannot record the ring");
                    return false;
                }
                let mut m = self.membership();
                let ring = Ring::new(nodes, vnodes);
                for node in ring.nodes() {
                    if *node != self.node_id {
                        match m.addrs.get(node) {
                            Some(a) => self.peers.add(node, a.peer),
                            None => {
                                tracing::error!(node = %node, "the cluster's ring has a node this node's cluster.toml does not name")
                            }
                        }
                    }
                }
                tracing::info!(ring_version = version, nodes = ?ring.nodes(), "serving the cluster's ring");
                m.committed = Some((version, ring));
                metrics().ring_version.set(version as i64);
                true
            }
            // Started by the loop, with the decision.
            Step::Handoff => false,
            Step::Commit { version } => {
                self.commit(version).await;
                true
            }
        }
    }

    async fn record_ring(
        &self,
        version: u64,
        nodes: &[String],
        vnodes: u32,
        moving_to: Option<Vec<String>>,
        handed_off: bool,
    ) -> Result<(), ActorError> {
        let store = self.registry.store();
        store.put_ring_record(&RingRecord {
            version,
            nodes: nodes.to_vec(),
            vnodes,
            moving_to,
            handed_off,
        })?;
        store.commit(1).await?;
        Ok(())
    }

    /// Commits the target ring as `version`: it becomes the ring this node serves.
    async fn commit(self: &Arc<Self>, version: u64) {
        let (nodes, vnodes) = {
            let m = self.membership();
            (m.target.nodes().to_vec(), m.vnodes)
        };
        if let Err(e) = self.record_ring(version, &nodes, vnodes, None, false).await {
            tracing::error!(error = %e, "cannot record the new ring; retrying");
            tokio::time::sleep(MEMBERSHIP_TICK).await;
            return;
        }
        let leaving = {
            let mut m = self.membership();
            let target = m.target.clone();
            m.committed = Some((version, target));
            m.addrs.retain(|node, _| nodes.contains(node));
            m.handed_off = false;
            m.started = false;
            self.registry.unfence();
            self.arrived_files
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            m.handing_off = false;
            m.phase = Phase::Idle;
            m.waiting = None;
            self.release(&mut m);
            // Links to nodes that left go after a grace period, not at once: a leaving
            // node waits to hear that the others have committed before it stops.
            let gone: Vec<String> = self
                .peers
                .nodes()
                .into_iter()
                .filter(|n| !nodes.contains(n))
                .collect();
            if !gone.is_empty() {
                let me = Arc::clone(self);
                actix::spawn(async move {
                    tokio::time::sleep(LEAVE_GRACE).await;
                    for node in gone {
                        me.peers.remove(&node);
                        me.membership().peers.remove(&node);
                    }
                });
            }
            !nodes.contains(&self.node_id)
        };
        metrics().ring_version.set(version as i64);
        tracing::info!(ring_version = version, ?nodes, "new ring committed");
        if leaving {
            self.leave(version).await;
        }
    }

    /// This node is no longer in the ring: once the others have committed too (they
    /// may need to hear that this node has handed off), close every session here and
    /// stop serving.
    async fn leave(self: &Arc<Self>, version: u64) {
        let mut next_word = tokio::time::Instant::now() + LEAVE_GRACE;
        loop {
            let all = {
                let m = self.membership();
                m.target.nodes().iter().all(|n| {
                    m.peers
                        .get(n)
                        .is_some_and(|s| s.committed.as_ref().is_some_and(|(v, _)| *v >= version))
                })
            };
            let state = self.membership().state();
            for node in self.peers.nodes() {
                self.peers.cast(&node, PeerCast::Ring(state.clone()));
            }
            if all {
                break;
            }
            if tokio::time::Instant::now() >= next_word {
                tracing::warn!(
                    "left the ring; waiting for the other nodes to commit it before stopping"
                );
                next_word = tokio::time::Instant::now() + LEAVE_GRACE;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for (session, _) in self.sessions.all() {
            self.sessions.deliver(
                session,
                SessionEvent::Close {
                    code: 1012,
                    reason: "this node left the cluster: reconnect to another node".into(),
                },
            );
        }
        tracing::info!("this node has handed off everything and left the cluster; stopping");
        self.left.notify_one();
    }

    // ---- the handoff task's hooks (see `net/handoff.rs`) ----

    /// Holds every call for a leaving entity and records, durably, that the move to
    /// `target` has started; returns once every call that started before has finished.
    pub(crate) async fn begin_handoff(&self, target: &Ring) {
        let (version, committed, before) = {
            let mut m = self.membership();
            if !matches!(m.phase, Phase::Moving(_)) {
                m.phase = Phase::Draining;
            }
            let before = (m.epoch % 2) as usize;
            m.epoch += 1;
            let (version, committed) = m
                .committed
                .as_ref()
                .map(|(v, r)| (*v, r.nodes().to_vec()))
                .unwrap_or_default();
            (version, committed, before)
        };
        let moving_to = Some(target.nodes().to_vec());
        while let Err(e) = self
            .record_ring(
                version,
                &committed,
                target.vnodes(),
                moving_to.clone(),
                false,
            )
            .await
        {
            tracing::error!(error = %e, "cannot record the start of the handoff; retrying");
            tokio::time::sleep(MEMBERSHIP_TICK).await;
        }
        self.membership().started = true;
        // Every call is bounded (timeouts), so this ends.
        let started = tokio::time::Instant::now();
        let mut warned = false;
        let inflight = Arc::clone(&self.membership().inflight);
        while inflight[before].load(Ordering::Acquire) > 0 {
            if !warned && started.elapsed() > CALL_TIMEOUT * 4 {
                warned = true;
                tracing::warn!("handoff still waiting for calls that started before it");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The leaving entities stored here are `left`: calls for any other leaving
    /// entity go to its next home at once.
    pub(crate) fn listed(&self, left: std::collections::HashSet<String>) {
        let mut m = self.membership();
        m.phase = Phase::Moving(left);
        self.release(&mut m);
    }

    /// Whether a media file with this hash arrived here during the current change.
    pub(crate) fn arrived(&self, sha256: &str) -> bool {
        self.arrived_files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(sha256)
    }

    /// These entities now live at their next home (durably there, deleted here).
    pub(crate) fn moved(&self, keys: &[String]) {
        let mut m = self.membership();
        if let Phase::Moving(left) = &mut m.phase {
            for k in keys {
                left.remove(k);
            }
        }
        self.release(&mut m);
    }

    /// Everything this ring change takes from this node has gone (recorded durably).
    pub(crate) async fn handed_off(&self, target: &Ring) -> Result<(), ActorError> {
        let (version, nodes, vnodes) = {
            let m = self.membership();
            let (v, ring) = m.committed.as_ref().ok_or(ActorError::Unavailable)?;
            (*v, ring.nodes().to_vec(), ring.vnodes())
        };
        self.record_ring(version, &nodes, vnodes, Some(target.nodes().to_vec()), true)
            .await?;
        let mut m = self.membership();
        m.handed_off = true;
        self.release(&mut m);
        drop(m);
        self.changed.notify_one();
        Ok(())
    }

    /// Wakes an entity whose actor died, so it resumes its own work: a conversation its
    /// fan-out, a group its pending announcement.
    pub(crate) fn revive(&self, entity: Entity) -> Call<()> {
        match entity {
            Entity::Conversation(id) => narrow(
                self.dispatch(PeerCall::Conversation(id, ConversationRequest::Resume)),
                |_| Some(()),
            ),
            Entity::Group(id) => narrow(
                self.dispatch(PeerCall::Group(id, GroupRequest::Settle)),
                |_| Some(()),
            ),
            Entity::User(_) => Box::pin(async { Ok(()) }),
        }
    }

    /// Pushes `event` to a session: here directly, elsewhere as the cast `wrap` makes.
    fn deliver_with(
        &self,
        session: &SessionRef,
        event: SessionEvent,
        wrap: impl FnOnce(u64, SessionEvent) -> PeerCast,
    ) -> Delivery {
        if session.node == self.node_id {
            return self.sessions.deliver(session.id, event);
        }
        if self.peers.cast(&session.node, wrap(session.id, event)) {
            Delivery::Delivered
        } else {
            // Link down (its sessions are being closed) or hopelessly backed up.
            Delivery::Gone
        }
    }

    /// Chaos testing: stops `entity`'s actor abruptly, at its home.
    pub fn kill(&self, entity: Entity) -> Call<()> {
        narrow(self.dispatch(PeerCall::Kill(entity)), done)
    }

    /// Tells `from`'s home that `session` (on this node) is gone.
    fn session_gone(&self, from: UserId, session: u64) {
        let session = SessionRef {
            node: self.node_id.clone(),
            id: session,
        };
        let detach = self.user(from, UserRequest::Detach { session });
        actix::spawn(async move {
            let _ = detach.await;
        });
    }
}

/// The ring key of the entity a call is for (`None`: the node itself).
fn call_key(call: &PeerCall) -> Option<String> {
    Some(match call {
        PeerCall::User(id, _) => id.ring_key(),
        PeerCall::Conversation(id, _) | PeerCall::ReadMessages(id, _) => id.ring_key(),
        PeerCall::Group(id, _) => id.ring_key(),
        PeerCall::Media(id, _) => media_ring_key(id),
        PeerCall::ClaimHandle(h, _)
        | PeerCall::ReleaseHandle(h, _)
        | PeerCall::ResolveHandle(h) => handle_ring_key(h),
        PeerCall::Kill(entity) => entity.ring_key(),
        PeerCall::Owned
        | PeerCall::Import { .. }
        | PeerCall::HasMediaFile(_)
        | PeerCall::MediaChunk { .. } => return None,
    })
}

/// A reply narrowed to the variant the caller expects.
fn narrow<T: Send + 'static>(reply: Call<PeerReply>, pick: fn(PeerReply) -> Option<T>) -> Call<T> {
    Box::pin(async move {
        pick(reply.await?).ok_or_else(|| ActorError::Internal("answered the wrong kind".into()))
    })
}

fn done(r: PeerReply) -> Option<()> {
    matches!(r, PeerReply::Done).then_some(())
}

fn owner(r: PeerReply) -> Option<Option<UserId>> {
    match r {
        PeerReply::Handle(h) => Some(h),
        _ => None,
    }
}

/// Sends `msg` to the actor `lookup` yields, retrying with a fresh lookup if the actor
/// stopped before handling it.
///
/// The first attempt is enqueued now, not when the returned future is first polled:
/// callers that issue calls in order (a session posting a burst of sends) get them
/// into the mailbox in that order, whatever order their futures are polled in.
fn call_local<A, M, R>(
    kind: &'static str,
    lookup: impl Fn() -> Result<Addr<A>, ActorError> + Send + 'static,
    msg: M,
) -> Call<R>
where
    A: Actor<Context = actix::Context<A>> + Handler<M>,
    M: actix::Message<Result = Result<R, ActorError>> + Clone + Send + 'static,
    R: Send + 'static,
{
    let depth = metrics().mailbox_depth.with_label_values(&[kind]);
    let first = match lookup() {
        Ok(addr) => addr.send(msg.clone()),
        Err(e) => return Box::pin(async move { Err(e) }),
    };
    depth.inc();
    Box::pin(async move {
        let mut attempt = first;
        let mut result = Err(ActorError::Unavailable);
        for tries_left in (0..ATTEMPTS).rev() {
            match attempt.timeout(CALL_TIMEOUT).await {
                Ok(reply) => {
                    result = reply;
                    break;
                }
                // The actor stopped (or died) before answering: ask a fresh one.
                Err(MailboxError::Closed) if tries_left > 0 => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    match lookup() {
                        Ok(addr) => attempt = addr.send(msg.clone()),
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                }
                Err(_) => break,
            }
        }
        depth.dec();
        result
    })
}

impl Route for Router {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    fn served_here(&self, user: UserId) -> bool {
        Router::served_here(self, user)
    }

    fn user(&self, id: UserId, req: UserRequest) -> Call<UserReply> {
        narrow(self.dispatch(PeerCall::User(id, req)), |r| match r {
            PeerReply::User(u) => Some(u),
            _ => None,
        })
    }

    fn conversation(
        &self,
        id: ConversationId,
        req: ConversationRequest,
    ) -> Call<ConversationReply> {
        narrow(
            self.dispatch(PeerCall::Conversation(id, req)),
            |r| match r {
                PeerReply::Conversation(c) => Some(c),
                _ => None,
            },
        )
    }

    fn group(&self, id: GroupId, req: GroupRequest) -> Call<GroupReply> {
        narrow(self.dispatch(PeerCall::Group(id, req)), |r| match r {
            PeerReply::Group(g) => Some(g),
            _ => None,
        })
    }

    fn media(&self, id: uuid::Uuid, req: MediaRequest) -> Call<()> {
        narrow(self.dispatch(PeerCall::Media(id, req)), done)
    }

    fn notify(&self, user: UserId, event: SessionEvent) {
        match self.home(&user.ring_key()) {
            Ok(Home::Here) => {
                if let Some(addr) = self.registry.running_user(user) {
                    // Full mailbox: this best-effort signal is dropped rather than queued.
                    let _ = addr.try_send(UserCall(UserRequest::Notify { event }));
                }
            }
            Ok(Home::Peer(node)) => {
                self.peers.cast(&node, PeerCast::Notify { user, event });
            }
            Err(_) => {}
        }
    }

    fn read_messages(&self, id: ConversationId, seqs: Vec<u64>) -> Call<Vec<MessageRecord>> {
        narrow(
            self.dispatch(PeerCall::ReadMessages(id, seqs)),
            |r| match r {
                PeerReply::Messages(m) => Some(m),
                _ => None,
            },
        )
    }

    fn claim_handle(&self, handle: String, user: UserId) -> Call<Option<UserId>> {
        narrow(self.dispatch(PeerCall::ClaimHandle(handle, user)), owner)
    }

    fn release_handle(&self, handle: String, user: UserId) -> Call<()> {
        narrow(self.dispatch(PeerCall::ReleaseHandle(handle, user)), done)
    }

    fn resolve_handle(&self, handle: String) -> Call<Option<UserId>> {
        narrow(self.dispatch(PeerCall::ResolveHandle(handle)), owner)
    }

    fn deliver_to_watcher(&self, session: &SessionRef, event: SessionEvent) -> Delivery {
        self.deliver_with(session, event, |session, event| PeerCast::Watched {
            session,
            event,
        })
    }

    fn push(&self, notice: OfflineNotice) {
        if let Some(p) = &self.pusher {
            p.offer(notice);
        }
    }

    fn deliver(&self, from: UserId, session: &SessionRef, event: SessionEvent) -> Delivery {
        self.deliver_with(session, event, |session, event| PeerCast::Deliver {
            user: from,
            session,
            event,
        })
    }
}

impl PeerHandler for Router {
    fn call(&self, call: PeerCall) -> Call<PeerReply> {
        // Served only for entities our ring state gives us; forwarded only to an
        // entity's next home once it has moved there, never back to its old home.
        let Some(key) = call_key(&call) else {
            return self.serve_here(call);
        };
        let m = self.membership();
        let place = m.accept(key.as_bytes());
        self.send_to(m, place, key, call)
    }

    fn cast(&self, from: &str, cast: PeerCast) {
        match cast {
            PeerCast::Deliver {
                user,
                session,
                event,
            } => match self.sessions.deliver_to(session, Some(user), event) {
                Delivery::Delivered => {}
                Delivery::Full => {
                    self.sessions.deliver(
                        session,
                        SessionEvent::Close {
                            code: 1013,
                            reason: "client too slow: reconnect and sync".into(),
                        },
                    );
                    self.session_gone(user, session);
                }
                Delivery::Gone => self.session_gone(user, session),
            },
            // Only for users homed here: never forwarded on (two rings could disagree).
            PeerCast::Notify { user, event } => {
                if matches!(self.home(&user.ring_key()), Ok(Home::Here)) {
                    self.notify(user, event);
                }
            }
            PeerCast::Watched { session, event } => {
                self.sessions.deliver(session, event);
            }
            PeerCast::Ring(state) => {
                let changed = {
                    let mut m = self.membership();
                    m.peers.insert(from.to_string(), state.clone()) != Some(state)
                };
                if changed {
                    self.changed.notify_one();
                }
            }
        }
    }

    fn link_down(&self, node: &str) {
        // Users homed here forget the sessions on the lost node...
        for user in self.registry.running_users() {
            let _ = user.try_send(UserCall(UserRequest::DetachNode {
                node: node.to_string(),
            }));
        }
        // ...and clients here of users homed there reconnect (to any node) and sync,
        // rather than sit on a session that no longer receives anything.
        for (session, user) in self.sessions.all() {
            if matches!(self.home(&user.ring_key()), Ok(Home::Peer(n)) if n == node) {
                self.sessions.deliver(
                    session,
                    SessionEvent::Close {
                        code: 1013,
                        reason: "a node of the cluster is unreachable: reconnect and sync".into(),
                    },
                );
            }
        }
    }
}
