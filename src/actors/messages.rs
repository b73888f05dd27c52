//! The messages entity actors understand.
//!
//! Plain data only (ids, seqs, strings, records): no `Addr`, nothing tied to this
//! process, so every request and reply can cross a peer link as is. Each entity kind has
//! one request enum and one reply enum, delivered to its actor in one envelope type.

use std::sync::Arc;

use actix::Message;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::ActorError;
use crate::ids::{ConversationId, GroupId, UserId};
use crate::storage::{
    ConversationKind, GroupRecord, InboxEntry, KeyBundle, MessageRecord, UserConversation,
    Watermarks,
};

/// SHA-256 of a token: how tokens are named everywhere but in the client's hands.
pub type TokenHash = [u8; 32];

/// Where a WebSocket session lives: its node and its id there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SessionRef {
    pub node: String,
    pub id: u64,
}

/// Which watermark a receipt moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReceiptStatus {
    Delivered,
    Read,
}

/// What an entity pushes to a live session.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[rtype(result = "()")]
pub enum SessionEvent {
    /// The next entry of the user's inbox.
    Inbox {
        inbox_seq: u64,
        message: Arc<MessageRecord>,
    },
    /// Another member's watermark rose.
    Receipt {
        conversation_id: ConversationId,
        user_id: UserId,
        status: ReceiptStatus,
        seq: u64,
    },
    /// A watched user's presence changed (or: its presence at subscribe time).
    Presence {
        user_id: UserId,
        online: bool,
        last_seen: Option<i64>,
    },
    /// A member of a conversation is typing. Never stored.
    Typing {
        conversation_id: ConversationId,
        user_id: UserId,
    },
    /// The session must end (token revoked, too slow).
    Close { code: u16, reason: String },
}

/// A message landed in the inbox of a user with no live session: what a push
/// notification says (never the body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfflineNotice {
    pub user_id: UserId,
    pub conversation_id: ConversationId,
    pub seq: u64,
    pub inbox_seq: u64,
    pub sender_id: UserId,
    pub message_id: Uuid,
    pub ts: i64,
}

/// A user's public profile, as `GET /users/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserProfile {
    pub user_id: UserId,
    pub handle: String,
    pub display_name: String,
    pub online: bool,
    pub last_seen: Option<i64>,
}

/// What the User actor does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum UserRequest {
    /// Creates the user; its handle is already claimed for it.
    Create {
        handle: String,
        display_name: String,
        password_hash: String,
    },
    /// Checks the password and issues a token.
    Login {
        password: String,
    },
    /// Is this token valid now?
    Authenticate {
        token: TokenHash,
    },
    /// Revokes the token and closes the sessions opened with it.
    Logout {
        token: TokenHash,
    },
    Profile,
    /// A WebSocket session opened with `token`.
    Attach {
        session: SessionRef,
        token: TokenHash,
    },
    Detach {
        session: SessionRef,
    },
    /// Whether `session` is still one of the user's sessions.
    Attached {
        session: SessionRef,
    },
    /// The node `node` is unreachable: forget its sessions (and its watchers).
    DetachNode {
        node: String,
    },
    /// The next page of the inbox after `after`; when it reaches the head, the session
    /// goes live and receives every later entry as it is appended.
    SyncPage {
        session: SessionRef,
        after: u64,
        limit: usize,
    },
    /// Appends a conversation's messages to the inbox: one contiguous run of seqs.
    /// Idempotent: messages at or below the conversation's head are skipped, and
    /// nothing past a gap is taken. A run may start past the head + 1 only where the
    /// seqs between were never this user's (see `sequence::accept_run`).
    AppendInbox {
        conversation_id: ConversationId,
        kind: ConversationKind,
        /// For a direct conversation, the other member (oneself for notes to self).
        peer: Option<UserId>,
        /// The user's last entitled seq before the run: the inbox must hold it.
        prev: u64,
        messages: Vec<Arc<MessageRecord>>,
    },
    Conversations,
    /// Pushes an event to every live session of the user.
    Notify {
        event: SessionEvent,
    },
    AddContact {
        contact: UserId,
    },
    RemoveContact {
        contact: UserId,
    },
    Contacts,
    /// Which of `targets` may this user watch: peers of its direct conversations and
    /// its contacts.
    Visible {
        targets: Vec<UserId>,
    },
    /// A session watches this user's presence; the reply is the presence now, and
    /// every change is pushed to the session until it ends.
    WatchPresence {
        session: SessionRef,
    },
    /// Publishes the user's key bundle and adds one-time prekeys.
    PutKeys {
        bundle: KeyBundle,
        prekeys: Vec<String>,
    },
    /// The user's key bundle with one one-time prekey, which is never handed out again.
    ClaimKeys,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum UserReply {
    Profile(UserProfile),
    Token {
        token: String,
        expires_at: i64,
    },
    Done,
    Page {
        entries: Vec<(u64, InboxEntry)>,
        /// Set when the page reached the head: the session is live after this seq.
        live_head: Option<u64>,
    },
    /// The conversation's head in this inbox, durable.
    Appended {
        head: u64,
    },
    Conversations(Vec<UserConversation>),
    Users(Vec<UserId>),
    Attached(bool),
    Keys {
        bundle: KeyBundle,
        prekey: Option<String>,
    },
}

/// What the Conversation actor does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ConversationRequest {
    /// Stores a message; the reply is the ack, sent once the message is on disk.
    Post {
        sender: UserId,
        client_msg_id: Uuid,
        body: String,
        media: Vec<Uuid>,
        /// For a direct conversation's first message: the other user, already checked
        /// to exist by the caller.
        direct_peer: Option<UserId>,
    },
    /// Raises a member's delivered or read watermark.
    Mark {
        user: UserId,
        status: ReceiptStatus,
        seq: u64,
    },
    History {
        user: UserId,
        after: Option<u64>,
        before: Option<u64>,
        limit: usize,
    },
    Receipts {
        user: UserId,
    },
    /// The conversation as `user` sees it in `GET /conversations` (a former group
    /// member sees it up to its removal).
    View {
        user: UserId,
    },
    /// Answers `Done` if `user` is a current member, else `not_member`.
    IsMember {
        user: UserId,
    },
    /// Wakes the actor so it resumes a fan-out left pending by a restart.
    Resume,
    /// Relays "typing" to the other members' live sessions.
    Typing {
        user: UserId,
    },
    /// Applies the group's membership change number `version`: writes its `system`
    /// message and the new member list atomically. Idempotent: a version already
    /// applied changes nothing. The first one creates the group's conversation.
    ApplyMembership {
        group_id: GroupId,
        version: u64,
        members: Vec<UserId>,
        /// Who made the change: the `system` message's sender.
        by: UserId,
        body: String,
    },
    /// Which of `targets` are members along with `user` (none if `user` is not one).
    SharedMembers {
        user: UserId,
        targets: Vec<UserId>,
    },
}

/// The answer to a `send`, as the `ack` frame carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub client_msg_id: Uuid,
    pub message_id: Uuid,
    pub conversation_id: ConversationId,
    pub seq: u64,
    pub ts: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ConversationReply {
    Ack(Ack),
    Done,
    Messages(Vec<MessageRecord>),
    Receipts(Vec<(UserId, Watermarks)>),
    View {
        last_seq: u64,
        watermarks: Watermarks,
    },
    Users(Vec<UserId>),
}

/// What a media object's home node does. Media are immutable, so no actor: these
/// are storage operations at the home.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MediaRequest {
    /// `user` attaches the media to a message in `conversation` (see
    /// `Registry::reference_media`).
    Reference {
        user: UserId,
        conversation: ConversationId,
        /// The other user, when the send names a direct chat by `to_user`.
        peer: Option<UserId>,
    },
}

/// What the Group actor does. Every change is made by a member; the actor checks roles.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum GroupRequest {
    /// Creates the group with `creator` as its admin and `members` (existing users,
    /// distinct) as members.
    Create {
        creator: UserId,
        name: String,
        members: Vec<UserId>,
    },
    /// The group, for one of its members.
    View { user: UserId },
    /// An admin adds a user.
    AddMember { by: UserId, user: UserId },
    /// An admin removes a member, or a member removes itself (leaves).
    RemoveMember { by: UserId, user: UserId },
    /// Applies a change the group's conversation has not confirmed (woken at start-up).
    Settle,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum GroupReply {
    Group(GroupRecord),
    Done,
}

/// Envelope that delivers a [`UserRequest`] to a User actor.
#[derive(Clone, Message)]
#[rtype(result = "Result<UserReply, ActorError>")]
pub struct UserCall(pub UserRequest);

/// Envelope that delivers a [`GroupRequest`] to a Group actor.
#[derive(Clone, Message)]
#[rtype(result = "Result<GroupReply, ActorError>")]
pub struct GroupCall(pub GroupRequest);

/// Envelope that delivers a [`ConversationRequest`] to a Conversation actor.
#[derive(Clone, Message)]
#[rtype(result = "Result<ConversationReply, ActorError>")]
pub struct ConversationCall(pub ConversationRequest);

/// Stops an entity actor for good on this node: its entity is moving to another node
/// (handoff). Handled in mailbox order, so it lands between calls, never inside one.
#[derive(Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct Retire;

/// Stops an entity actor abruptly, as a panic would (chaos testing): its handler
/// panics. Its supervisor (the registry) brings it back from storage on the next call.
#[derive(Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct Kill;

/// An entity that has an actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Entity {
    User(UserId),
    Conversation(ConversationId),
    Group(GroupId),
}

impl Entity {
    pub fn ring_key(&self) -> String {
        match self {
            Entity::User(id) => id.ring_key(),
            Entity::Conversation(id) => id.ring_key(),
            Entity::Group(id) => id.ring_key(),
        }
    }

    /// `user:<id>` and the like, as the chaos endpoint names entities.
    pub fn parse(s: &str) -> Option<Entity> {
        let (kind, id) = s.split_once(':')?;
        let id = Uuid::parse_str(id).ok()?;
        match kind {
            "user" => Some(Entity::User(UserId(id))),
            "conversation" => Some(Entity::Conversation(ConversationId(id))),
            "group" => Some(Entity::Group(GroupId(id))),
            _ => None,
        }
    }
}

impl std::fmt::Display for Entity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Entity::User(id) => write!(f, "user:{id}"),
            Entity::Conversation(id) => write!(f, "conversation:{id}"),
            Entity::Group(id) => write!(f, "group:{id}"),
        }
    }
}
