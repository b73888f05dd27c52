//! Errors an entity call can end in.
//!
//! One enum for the whole actor layer, serialisable so that it crosses peer links
//! unchanged. [`ActorError::code`] and [`ActorError::status`] answer the one policy
//! question every caller has: which contract error is this?

use serde::{Deserialize, Serialize};

use crate::storage::StorageError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ActorError {
    /// No user with that id (or handle).
    #[error("unknown user")]
    UnknownUser,
    /// No conversation with that id.
    #[error("unknown conversation")]
    UnknownConversation,
    /// The caller is not a member of the conversation.
    #[error("not a member of this conversation")]
    NotMember,
    /// Missing, forged, expired or revoked token.
    #[error("invalid, expired or revoked token")]
    Unauthorized,
    /// Wrong handle or password; deliberately the same for both.
    #[error("wrong handle or password")]
    InvalidCredentials,
    /// The caller neither uploaded the media nor is in a conversation holding it.
    #[error("that media is neither yours nor in a conversation of yours")]
    MediaForbidden,
    /// No media with that id.
    #[error("unknown media")]
    UnknownMedia,
    /// The user has not published a key bundle.
    #[error("this user has not published keys")]
    NoKeys,
    /// No group with that id.
    #[error("unknown group")]
    UnknownGroup,
    /// Some of the users named as group members do not exist.
    #[error("no such user: {}", list(.0))]
    UnknownMembers(Vec<crate::ids::UserId>),
    /// The user named is not a member of the group.
    #[error("that user is not a member of this group")]
    UnknownMember,
    /// The user is already a member of the group.
    #[error("that user is already a member of this group")]
    AlreadyMember,
    /// Only a group's admins may do this.
    #[error("only the group's admins may do this")]
    NotAdmin,
    /// The group already has the configured maximum of members.
    #[error("a group may have at most {0} members")]
    GroupFull(usize),
    /// A group name that is empty, too long, or has control characters.
    #[error("{0}")]
    InvalidName(String),
    /// The handle belongs to someone else.
    #[error("handle is already taken")]
    HandleTaken,
    /// The request breaks a rule of the contract; the text says which.
    #[error("{0}")]
    BadRequest(String),
    /// The entity's actor or node did not answer in time. Safe to retry: every write
    /// is idempotent.
    #[error("the owner of this entity is unavailable")]
    Unavailable,
    /// The disk refused a read or write; nothing was acked.
    #[error("storage failure: {0}")]
    Storage(String),
    /// A bug or an invariant broken; logged.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ActorError {
    /// The contract's snake_case error code.
    pub fn code(&self) -> &'static str {
        match self {
            ActorError::UnknownUser => "unknown_user",
            ActorError::UnknownConversation => "unknown_conversation",
            ActorError::NotMember | ActorError::MediaForbidden => "not_member",
            ActorError::Unauthorized => "unauthorized",
            ActorError::InvalidCredentials => "invalid_credentials",
            ActorError::HandleTaken => "handle_taken",
            ActorError::NoKeys => "no_keys",
            ActorError::UnknownMedia => "unknown_media",
            ActorError::UnknownGroup => "unknown_group",
            ActorError::UnknownMembers(_) => "unknown_user",
            ActorError::UnknownMember => "unknown_member",
            ActorError::AlreadyMember => "already_member",
            ActorError::NotAdmin => "not_admin",
            ActorError::GroupFull(_) => "group_full",
            ActorError::InvalidName(_) => "invalid_name",
            ActorError::BadRequest(_) => "bad_request",
            ActorError::Unavailable => "owner_unavailable",
            ActorError::Storage(_) => "storage_error",
            ActorError::Internal(_) => "internal",
        }
    }

    /// The HTTP status the contract gives this error.
    pub fn status(&self) -> u16 {
        match self {
            ActorError::UnknownUser
            | ActorError::UnknownConversation
            | ActorError::NoKeys
            | ActorError::UnknownMedia
            | ActorError::UnknownGroup
            | ActorError::UnknownMembers(_)
            | ActorError::UnknownMember => 404,
            ActorError::NotMember | ActorError::NotAdmin | ActorError::MediaForbidden => 403,
            ActorError::AlreadyMember => 409,
            ActorError::GroupFull(_) => 422,
            ActorError::InvalidName(_) => 400,
            ActorError::Unauthorized | ActorError::InvalidCredentials => 401,
            ActorError::HandleTaken => 409,
            ActorError::BadRequest(_) => 400,
            ActorError::Unavailable => 503,
            ActorError::Storage(_) | ActorError::Internal(_) => 500,
        }
    }
}

fn list(ids: &[crate::ids::UserId]) -> String {
    ids.iter()
        .map(|u| u.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl From<StorageError> for ActorError {
    fn from(e: StorageError) -> Self {
        ActorError::Storage(e.to_string())
    }
}
