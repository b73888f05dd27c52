//! The router: implements [`Route`] by finding each entity's home on the ring.
//!
//! Entities homed here are called through the local [`Registry`]; every call is bounded
//! by [`CALL_TIMEOUT`] and answers [`ActorError::Unavailable`] rather than hang. An
//! actor that stopped between lookup and delivery (passivation, crash) is looked up
//! again and the call retried: requests are idempotent, so a retry is always safe.
//! Entities homed on another node answer `Unavailable` until peer links exist.

use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr, Handler, MailboxError};

use super::push::Pusher;
use super::ring::Ring;
use super::sessions::SessionTable;
use crate::actors::*;
use crate::ids::{handle_ring_key, ConversationId, GroupId, UserId};
use crate::metrics::metrics;

/// Longest an entity call may take before the caller gets `Unavailable`.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts when the actor turns out to have stopped under us.
const ATTEMPTS: usize = 3;

pub struct Router {
    node_id: String,
    ring: Ring,
    registry: Arc<Registry>,
    sessions: SessionTable,
    pusher: Option<Pusher>,
}

impl Router {
    pub fn new(
        node_id: String,
        ring: Ring,
        registry: Arc<Registry>,
        pusher: Option<Pusher>,
    ) -> Arc<Self> {
        Arc::new(Router {
            node_id,
            ring,
            registry,
            sessions: SessionTable::default(),
            pusher,
        })
    }

    pub fn sessions(&self) -> &SessionTable {
        &self.sessions
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Whether this node owns the entity with ring key `key`.
    fn owns(&self, key: &str) -> Result<(), ActorError> {
        match self.ring.owner(key.as_bytes()) {
            Some(owner) if owner == self.node_id => Ok(()),
            _ => Err(ActorError::Unavailable),
        }
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
        if let Err(e) = self.owns(&id.ring_key()) {
            return Box::pin(async move { Err(e) });
        }
        let registry = Arc::clone(&self.registry);
        call_local("user", move || registry.user(id), UserCall(req))
    }

    fn conversation(
        &self,
        id: ConversationId,
        req: ConversationRequest,
    ) -> Call<ConversationReply> {
        if let Err(e) = self.owns(&id.ring_key()) {
            return Box::pin(async move { Err(e) });
        }
        let registry = Arc::clone(&self.registry);
        call_local(
            "conversation",
            move || registry.conversation(id),
            ConversationCall(req),
        )
    }

    fn group(&self, id: GroupId, req: GroupRequest) -> Call<GroupReply> {
        if let Err(e) = self.owns(&id.ring_key()) {
            return Box::pin(async move { Err(e) });
        }
        let registry = Arc::clone(&self.registry);
        call_local("group", move || registry.group(id), GroupCall(req))
    }

    fn notify(&self, user: UserId, event: SessionEvent) {
        if self.owns(&user.ring_key()).is_err() {
            return;
        }
        if let Some(addr) = self.registry.running_user(user) {
            // Full mailbox: this best-effort signal is dropped rather than queued.
            let _ = addr.try_send(UserCall(UserRequest::Notify { event }));
        }
    }

    fn read_messages(&self, id: ConversationId, seqs: Vec<u64>) -> Call<Vec<MessageRecord>> {
        let owned = self.owns(&id.ring_key());
        let registry = Arc::clone(&self.registry);
        Box::pin(async move {
            owned?;
            read_messages(&registry, id, &seqs)
        })
    }

    fn claim_handle(&self, handle: String, user: UserId) -> Call<Option<UserId>> {
        let owned = self.owns(&handle_ring_key(&handle));
        let registry = Arc::clone(&self.registry);
        Box::pin(async move {
            owned?;
            registry.claim_handle(&handle, user).await
        })
    }

    fn release_handle(&self, handle: String, user: UserId) -> Call<()> {
        let owned = self.owns(&handle_ring_key(&handle));
        let registry = Arc::clone(&self.registry);
        Box::pin(async move {
            owned?;
            registry.release_handle(&handle, user)
        })
    }

    fn resolve_handle(&self, handle: String) -> Call<Option<UserId>> {
        let owned = self.owns(&handle_ring_key(&handle));
        let registry = Arc::clone(&self.registry);
        Box::pin(async move {
            owned?;
            registry.resolve_handle(&handle)
        })
    }

    fn push(&self, notice: OfflineNotice) {
        if let Some(p) = &self.pusher {
            p.offer(notice);
        }
    }

    fn deliver(&self, session: &SessionRef, event: SessionEvent) -> Delivery {
        if session.node != self.node_id {
            return Delivery::Gone;
        }
        self.sessions.deliver(session.id, event)
    }
}
