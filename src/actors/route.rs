//! The routing trait: how an actor (or the HTTP layer) reaches any entity by id.
//!
//! Declared here, implemented in `net`, so actors never know whether the entity lives
//! on this node or behind a peer link. Every call is bounded in time: an owner that
//! does not answer yields [`ActorError::Unavailable`], never a hang.

use futures_util::future::BoxFuture;

use super::error::ActorError;
use super::messages::{
    ConversationReply, ConversationRequest, GroupReply, GroupRequest, MediaRequest, OfflineNotice,
    SessionEvent, SessionRef, UserReply, UserRequest,
};
use crate::ids::{ConversationId, GroupId, UserId};
use crate::storage::MessageRecord;

/// A call in flight to some entity.
pub type Call<T> = BoxFuture<'static, Result<T, ActorError>>;

/// What became of an event pushed to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Delivered,
    /// The session's queue is full: it cannot keep up and will be closed.
    Full,
    /// The session no longer exists.
    Gone,
}

pub trait Route: Send + Sync + 'static {
    /// This node's id.
    fn node_id(&self) -> &str;
    /// Whether calls for `user` are served on this node now (its writes then go to
    /// this node's store, and any flush that covers them covers every earlier write
    /// here too). False while the user is being moved or has been handed off.
    fn served_here(&self, user: UserId) -> bool;
    fn user(&self, id: UserId, req: UserRequest) -> Call<UserReply>;
    fn conversation(&self, id: ConversationId, req: ConversationRequest)
        -> Call<ConversationReply>;
    fn group(&self, id: GroupId, req: GroupRequest) -> Call<GroupReply>;
    fn media(&self, id: uuid::Uuid, req: MediaRequest) -> Call<()>;
    /// Pushes an event to the live sessions of a user, best-effort and without waiting:
    /// a user with no live session (whose actor is not running) is skipped without
    /// being woken, and a user whose mailbox is full misses it.
    fn notify(&self, user: UserId, event: SessionEvent);
    /// Reads stored (durable, immutable) messages by seq, in the order asked; missing
    /// seqs are skipped.
    fn read_messages(&self, id: ConversationId, seqs: Vec<u64>) -> Call<Vec<MessageRecord>>;
    /// Claims a handle for a user; `Some(owner)` if someone else holds it.
    fn claim_handle(&self, handle: String, user: UserId) -> Call<Option<UserId>>;
    fn release_handle(&self, handle: String, user: UserId) -> Call<()>;
    fn resolve_handle(&self, handle: String) -> Call<Option<UserId>>;
    /// Pushes an event to a session, without waiting. `from` is the user whose actor
    /// delivers it: if the session turns out to be gone on another node, that actor is
    /// told (`Detach`) later.
    fn deliver(&self, from: UserId, session: &SessionRef, event: SessionEvent) -> Delivery;
    /// Pushes an event to a session of *another* user that watches the caller's
    /// presence (so the session is not checked to be the caller's). `Gone` only when
    /// known at once (a session of this node).
    fn deliver_to_watcher(&self, session: &SessionRef, event: SessionEvent) -> Delivery;
    /// Queues a push notification for an offline user, without waiting; a no-op when
    /// no webhook is configured.
    fn push(&self, notice: OfflineNotice);
}
