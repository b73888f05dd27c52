//! Storage: the only module that touches sled and bincode.
//!
//! One sled database per node. Data is grouped by the entity that owns it, one tree per
//! entity kind, with every key of an entity under that entity's 16-byte id. So an
//! entity's whole state is one contiguous key range of one tree: an actor's writes can be
//! one atomic `sled::Batch`, and moving an entity to another node (handoff) streams one
//! range.
//!
//! Durability: sled keeps writes in memory until a flush. [`Store::commit`] joins the
//! next group commit and resolves once a flush that covers every write made before the
//! call has reached the disk. Nothing is acked to a client before that. See
//! `ARCHITECTURE.md` for exactly what a sled flush guarantees.

mod codec;
mod commit;
mod error;
mod keys;
mod media;
mod records;
mod store;

pub use error::StorageError;
pub use media::MediaWriter;
pub use records::{
    ConversationKind, ConversationRecord, GroupEvent, GroupMember, GroupMembership, GroupRecord,
    GroupRole, InboxEntry, InboxRun, KeyBundle, MediaRecord, MemberSpan, MessageKind,
    MessageRecord, RingRecord, TokenRecord, UserConversation, UserRecord, Watermarks,
};
pub use store::{EntityCounts, EntityDump, EntityKey, Store};
