//! The stored value types. Each is encoded by `codec` with the schema version byte.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::{ConversationId, GroupId, UserId};

/// A user's profile and credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub user_id: UserId,
    pub handle: String,
    pub display_name: String,
    /// Argon2id PHC string.
    pub password_hash: String,
    pub created_at: i64,
    /// When the user's last live session ended; `None` until that first happens.
    pub last_seen: Option<i64>,
}

/// A login token, stored under the SHA-256 of the token: the token itself is never kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub expires_at: i64,
}

/// Whether a message was written by a user or by the server (membership changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageKind {
    User,
    System,
}

/// One message of a conversation. Immutable once stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRecord {
    pub message_id: Uuid,
    pub conversation_id: ConversationId,
    pub seq: u64,
    pub sender_id: UserId,
    pub kind: MessageKind,
    pub body: String,
    pub media: Vec<Uuid>,
    /// The sender's idempotency key; `None` for system messages.
    pub client_msg_id: Option<Uuid>,
    pub ts: i64,
}

/// What kind of conversation, and who is in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConversationKind {
    /// Between two users (one, for notes to self). Members are fixed.
    Direct,
    /// A group's conversation; membership is owned by the group.
    Group { group_id: GroupId },
}

/// A conversation's identity and membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationRecord {
    pub conversation_id: ConversationId,
    pub kind: ConversationKind,
    pub members: Vec<UserId>,
    pub created_at: i64,
}

/// One entry of a user's inbox: which message of which conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxEntry {
    pub conversation_id: ConversationId,
    pub seq: u64,
}

/// The inbox entries one append wrote, stored as one record under the inbox seq of the
/// first: entry `i` is inbox seq `first + i`, message `seqs[i]` of `conversation_id`.
/// One record per append instead of one per message: a busy inbox takes one write for
/// every run a conversation sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxRun {
    pub conversation_id: ConversationId,
    pub seqs: Vec<u64>,
}

/// A conversation as one member sees it: its kind and the highest seq appended to the
/// member's inbox (`head`), which makes the inbox append idempotent. The stored `head`
/// is exact up to the user's heads checkpoint (`Store::heads_at`); inbox runs past the
/// checkpoint raise it when the user is loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserConversation {
    pub conversation_id: ConversationId,
    pub kind: ConversationKind,
    /// The other member of a direct conversation (oneself for notes to self).
    pub peer_id: Option<UserId>,
    pub head: u64,
}

/// A member's cumulative receipts in one conversation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermarks {
    pub delivered: u64,
    pub read: u64,
}

/// A user's published E2EE keys, opaque to the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyBundle {
    pub identity_key: String,
    pub signed_prekey: String,
}

/// An uploaded media object. Several ids may share one file (same bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaRecord {
    pub media_id: Uuid,
    /// Hex SHA-256 of the bytes: also the file's name in the media store.
    pub sha256: String,
    pub size: u64,
    pub content_type: String,
    pub uploader: UserId,
    pub created_at: i64,
}

/// A member's role in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupRole {
    Admin,
    Member,
}

/// One member of a group and its role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMember {
    pub user_id: UserId,
    pub role: GroupRole,
}

/// What one membership change did: the content of its `system` message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupEvent {
    /// The group was made with these members (the creator first).
    Created {
        name: String,
        members: Vec<UserId>,
    },
    Added {
        user: UserId,
    },
    Removed {
        user: UserId,
    },
    /// A member left; if it was the last admin, `new_admin` was promoted.
    Left {
        user: UserId,
        new_admin: Option<UserId>,
    },
}

/// A group: its name, members and roles, and the last membership change.
///
/// `version` counts membership changes (1 = creation). Each change is written here
/// first, then applied to the group's conversation, which records the version it has
/// applied; a change the conversation has not confirmed is re-applied (idempotently) when
/// the group actor next starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub group_id: GroupId,
    pub conversation_id: ConversationId,
    pub name: String,
    /// In joining order; the creator first.
    pub members: Vec<GroupMember>,
    pub created_at: i64,
    pub version: u64,
    pub last_event: GroupEvent,
    /// Who made the last change (the sender of its `system` message).
    pub last_by: UserId,
}

/// The seqs of a group conversation one member is entitled to: `from..=until`
/// (`until` is `None` while it is a member). A member that leaves and comes back has
/// one span per stay; ended spans are dropped once fan-out has delivered them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberSpan {
    pub user: UserId,
    pub from: u64,
    pub until: Option<u64>,
}

/// A group conversation's view of its membership: the group's version it has applied,
/// and who may receive which seqs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMembership {
    pub version: u64,
    pub spans: Vec<MemberSpan>,
}

/// The ring a node serves: its version (counted from 1, one more per membership
/// change), its nodes and points per node; and, once it has started handing off to
/// the next ring, that ring's nodes (`moving_to`: a restart finishes that move, whatever
/// the file says by then) and whether its share has all gone (`handed_off`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingRecord {
    pub version: u64,
    pub nodes: Vec<String>,
    pub vnodes: u32,
    pub moving_to: Option<Vec<String>>,
    pub handed_off: bool,
}
