//! Entity identifiers.
//!
//! Every entity is named by a UUID wrapped in its own type, so a user id can never be
//! passed where a conversation id is expected. Each id also names the entity's key on the
//! hash ring (`user:<uuid>`, `conversation:<uuid>`), which decides its home node.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Namespace for direct-conversation ids: the standard URL namespace of RFC 4122, so any
/// client can derive the same id from the two user ids.
const DIRECT_NAMESPACE: Uuid = Uuid::NAMESPACE_URL;
/// Namespace for group-conversation ids: distinct from the direct one (and the name is
/// the 16-byte group id here against the 32-byte pair there), so the kinds never collide.
const GROUP_NAMESPACE: Uuid = Uuid::NAMESPACE_OID;

macro_rules! entity_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// The key that places this entity on the hash ring.
            pub fn ring_key(&self) -> String {
                format!(concat!($prefix, ":{}"), self.0)
            }

            /// The raw 16 bytes, for storage keys.
            pub fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map($name)
            }
        }
    };
}

entity_id!(
    /// A user: owns its inbox, tokens, sessions and presence.
    UserId,
    "user"
);
entity_id!(
    /// A conversation (direct or group): owns its message sequence and watermarks.
    ConversationId,
    "conversation"
);
entity_id!(
    /// A group: owns membership and roles; has exactly one conversation.
    GroupId,
    "group"
);

impl UserId {
    /// A fresh random user id.
    pub fn random() -> Self {
        UserId(Uuid::new_v4())
    }
}

impl ConversationId {
    /// The direct conversation between two users: a UUIDv5 over both ids in ascending byte
    /// order, so either side (or any node) computes the same id.
    pub fn direct(a: UserId, b: UserId) -> Self {
        let (lo, hi) = if a.as_bytes() <= b.as_bytes() {
            (a, b)
        } else {
            (b, a)
        };
        let mut name = [0u8; 32];
        name[..16].copy_from_slice(lo.as_bytes());
        name[16..].copy_from_slice(hi.as_bytes());
        ConversationId(Uuid::new_v5(&DIRECT_NAMESPACE, &name))
    }
}

impl GroupId {
    /// A fresh random group id.
    pub fn random() -> Self {
        GroupId(Uuid::new_v4())
    }

    /// The group's conversation: a UUIDv5 of the group id, so the pair can never come
    /// apart (a retried creation cannot mint a second conversation).
    pub fn conversation(&self) -> ConversationId {
        ConversationId(Uuid::new_v5(&GROUP_NAMESPACE, self.as_bytes()))
    }
}

/// The ring key of a media object: its home stores the bytes and who may read them.
pub fn media_ring_key(id: &Uuid) -> String {
    format!("media:{id}")
}

/// The ring key of a handle: handles are entities of their own so that uniqueness is
/// decided at one home node.
pub fn handle_ring_key(handle: &str) -> String {
    format!("handle:{handle}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn direct_id_known_value() {
        let a: UserId = "00000000-0000-0000-0000-000000000001".parse().unwrap();
        let b: UserId = "00000000-0000-0000-0000-000000000002".parse().unwrap();
        let mut name = Vec::new();
        name.extend_from_slice(a.as_bytes());
        name.extend_from_slice(b.as_bytes());
        assert_eq!(
            ConversationId::direct(a, b).0,
            Uuid::new_v5(&Uuid::NAMESPACE_URL, &name)
        );
    }

    proptest! {
        #[test]
        fn direct_id_is_symmetric(a in any::<u128>(), b in any::<u128>()) {
            let (a, b) = (UserId(Uuid::from_u128(a)), UserId(Uuid::from_u128(b)));
            prop_assert_eq!(ConversationId::direct(a, b), ConversationId::direct(b, a));
        }

        #[test]
        fn direct_ids_differ_per_pair(a in any::<u128>(), b in any::<u128>(), c in any::<u128>()) {
            prop_assume!(b != c);
            let (a, b, c) = (UserId(Uuid::from_u128(a)), UserId(Uuid::from_u128(b)), UserId(Uuid::from_u128(c)));
            prop_assert_ne!(ConversationId::direct(a, b), ConversationId::direct(a, c));
        }
    }
}
