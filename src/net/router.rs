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
//! us is refused, never forwarded), applies their casts, and cleans up when a link
//! drops: sessions on the lost node are forgotten by the users here, and sessions here
//! of users homed there are closed, so their clients reconnect and sync.

use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr, Handler, MailboxError};

use super::peer::{PeerCall, PeerCast, PeerHandler, PeerLinks, PeerReply};
use super::push::Pusher;
use super::ring::Ring;
use super::sessions::SessionTable;
use crate::actors::*;
use crate::ids::{handle_ring_key, media_ring_key, ConversationId, GroupId, UserId};
use crate::metrics::metrics;

/// Longest an entity call may take before the caller gets `Unavailable`.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts when the actor turns out to have stopped under us.
const ATTEMPTS: usize = 3;

pub struct Router {
    node_id: String,
    ring: Ring,
    ring_version: u64,
    /// Entities each peer last said it owns, for `GET /admin/cluster`.
    peer_owned: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    registry: Arc<Registry>,
    sessions: SessionTable,
    pusher: Option<Pusher>,
    peers: Arc<PeerLinks>,
    /// Every node's client address, to proxy media reads to their home.
    client_addrs: std::collections::HashMap<String, std::net::SocketAddr>,
}

/// Where an entity lives.
enum Home<'a> {
    Here,
    Peer(&'a str),
}

impl Router {
    pub fn new(
        node_id: String,
        ring: Ring,
        ring_version: u64,
        registry: Arc<Registry>,
        pusher: Option<Pusher>,
        peers: Arc<PeerLinks>,
        client_addrs: std::collections::HashMap<String, std::net::SocketAddr>,
    ) -> Arc<Self> {
        Arc::new(Router {
            node_id,
            ring,
            ring_version,
            peer_owned: Default::default(),
            registry,
            sessions: SessionTable::default(),
            pusher,
            peers,
            client_addrs,
        })
    }

    pub fn sessions(&self) -> &SessionTable {
        &self.sessions
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// Whether `user` lives on this node.
    pub fn homed_here(&self, user: UserId) -> bool {
        matches!(self.home(&user.ring_key()), Ok(Home::Here))
    }

    /// Whether a call for `user` can reach its home now (here, or over a link that is
    /// up). A call that failed while its home was unreachable was never delivered.
    pub fn reachable(&self, user: UserId) -> bool {
        match self.home(&user.ring_key()) {
            Ok(Home::Here) => true,
            Ok(Home::Peer(node)) => self.peers.is_up(node),
            Err(_) => false,
        }
    }

    /// A fresh media id homed on this node, so an upload is stored where it arrives.
    /// (A random id lands here with probability 1/n; a few tries suffice.)
    pub fn new_media_id(&self) -> uuid::Uuid {
        loop {
            let id = uuid::Uuid::new_v4();
            if matches!(self.home(&media_ring_key(&id)), Ok(Home::Here) | Err(_)) {
                return id;
            }
        }
    }

    /// The client address of the media's home, if that is another node.
    pub fn media_elsewhere(&self, id: &uuid::Uuid) -> Option<std::net::SocketAddr> {
        match self.home(&media_ring_key(id)) {
            Ok(Home::Peer(node)) => self.client_addrs.get(node).copied(),
            _ => None,
        }
    }

    pub fn ring_version(&self) -> u64 {
        self.ring_version
    }

    /// Entities stored on this node, counted on the blocking pool (it reads the whole
    /// key space, one seek per entity).
    pub async fn owned_here(&self) -> Result<u64, ActorError> {
        self.registry.entity_count().await
    }

    /// What `GET /admin/cluster` lists for each node: `(id, up, owned entities)`. A
    /// peer that does not answer is down and shows what it last reported.
    pub async fn cluster_view(&self) -> Vec<(String, bool, u64)> {
        let others: Vec<&String> = self
            .ring
            .nodes()
            .iter()
            .filter(|n| **n != self.node_id)
            .collect();
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
        let mut out = vec![(self.node_id.clone(), true, mine.unwrap_or(0))];
        for (node, asked) in others.into_iter().zip(answers) {
            if let Some(n) = asked {
                cache.insert(node.clone(), n);
            }
            let owned = cache.get(node).copied().unwrap_or(0);
            out.push((node.clone(), asked.is_some(), owned));
        }
        out.sort();
        out
    }

    fn home(&self, key: &str) -> Result<Home<'_>, ActorError> {
        match self.ring.owner(key.as_bytes()) {
            Some(owner) if owner == self.node_id => Ok(Home::Here),
            Some(owner) => Ok(Home::Peer(owner)),
            None => Err(ActorError::Unavailable),
        }
    }

    /// Whether this node owns the entity with ring key `key`.
    fn owns(&self, key: &str) -> Result<(), ActorError> {
        match self.home(key)? {
            Home::Here => Ok(()),
            Home::Peer(_) => Err(ActorError::Unavailable),
        }
    }

    /// Sends a call to its entity's home: served here, or over the home's peer link.
    /// Every call an entity can get goes this one way, whichever node it lives on.
    fn dispatch(&self, call: PeerCall) -> Call<PeerReply> {
        match call_key(&call).map(|key| self.home(&key)) {
            None | Some(Ok(Home::Here)) => self.serve_here(call),
            Some(Ok(Home::Peer(node))) => self.peers.call(node, call),
            Some(Err(e)) => Box::pin(async move { Err(e) }),
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
        }
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
        PeerCall::Owned => return None,
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
    lookup: impl Fn() -> Addr<A> + Send + 'static,
    msg: M,
) -> Call<R>
where
    A: Actor<Context = actix::Context<A>> + Handler<M>,
    M: actix::Message<Result = Result<R, ActorError>> + Clone + Send + 'static,
    R: Send + 'static,
{
    let depth = metrics().mailbox_depth.with_label_values(&[kind]);
    depth.inc();
    let first = lookup().send(msg.clone());
    Box::pin(async move {
        let mut attempt = first;
        for tries_left in (0..ATTEMPTS).rev() {
            let res = attempt.timeout(CALL_TIMEOUT).await;
            match res {
                Ok(reply) => {
                    depth.dec();
                    return reply;
                }
                Err(MailboxError::Closed) if tries_left > 0 => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    attempt = lookup().send(msg.clone());
                }
                Err(_) => break,
            }
        }
        depth.dec();
        Err(ActorError::Unavailable)
    })
}

impl Route for Router {
    fn node_id(&self) -> &str {
        &self.node_id
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
                self.peers.cast(node, PeerCast::Notify { user, event });
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

    fn push(&self, notice: OfflineNotice) {
        if let Some(p) = &self.pusher {
            p.offer(notice);
        }
    }

    fn deliver(&self, from: UserId, session: &SessionRef, event: SessionEvent) -> Delivery {
        if session.node == self.node_id {
            return self.sessions.deliver(session.id, event);
        }
        let cast = PeerCast::Deliver {
            user: from,
            session: session.id,
            event,
        };
        if self.peers.cast(&session.node, cast) {
            Delivery::Delivered
        } else {
            // Link down (its sessions are being closed) or hopelessly backed up.
            Delivery::Gone
        }
    }
}

impl PeerHandler for Router {
    fn call(&self, call: PeerCall) -> Call<PeerReply> {
        // Served only for entities this ring gives us: never forwarded on, so two
        // nodes whose rings disagree cannot bounce a call between them.
        if let Some(Err(e)) = call_key(&call).map(|key| self.owns(&key)) {
            return Box::pin(async move { Err(e) });
        }
        self.serve_here(call)
    }

    fn cast(&self, _from: &str, cast: PeerCast) {
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
                if self.owns(&user.ring_key()).is_ok() {
                    self.notify(user, event);
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
