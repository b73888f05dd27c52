//! Entity actors and how they are reached.
//!
//! - [`UserActor`] (`user.rs`): a user's profile, tokens, inbox, sessions, presence.
//! - [`ConversationActor`] (`conversation.rs`): a conversation's sequence, idempotency,
//!   watermarks and fan-out.
//! - [`GroupActor`] (`group.rs`): a group's name, members and roles; it writes each
//!   membership change into the group's conversation as a `system` message.
//! - [`Registry`] (`registry.rs`): starts entity actors on first use, lets idle ones
//!   stop, and restarts dead ones from storage on their next call.
//! - [`Route`] (`route.rs`): the trait through which anything reaches an entity by id,
//!   wherever it lives; `net` implements it.
//! - `messages.rs`: the plain-data requests and replies; `sequence.rs`: the pure
//!   ordering logic (idempotent inbox append, in-order emission); `auth.rs`: passwords
//!   and tokens.
//!
//! This layer uses `storage` for persistence and knows nothing of sockets or JSON.

pub mod auth;
mod conversation;
mod error;
mod group;
mod messages;
mod registry;
mod route;
pub mod sequence;
mod user;

pub use conversation::{read_messages, ConversationActor, MAX_MEDIA_PER_MESSAGE};
pub use error::ActorError;
pub use group::GroupActor;
pub use messages::*;
pub use registry::Registry;
pub use route::{Call, Delivery, Route};
pub use user::UserActor;

/// The stored records that requests and replies carry, re-exported so that callers of
/// this layer need not reach into `storage`.
pub use crate::storage::{
    ConversationKind, GroupEvent, GroupMember, GroupRecord, GroupRole, InboxEntry, KeyBundle,
    MessageKind, MessageRecord, UserConversation, Watermarks,
};
