//! Order-preserving key layouts.
//!
//! Every key starts with the owning entity's 16 raw UUID bytes, then a one-byte tag for
//! the kind of record, then the record's own key. Integers are big-endian so that sled's
//! lexicographic order is numeric order: a range scan over `conversation | 0x01 | seq`
//! reads history in seq order, `user | 0x02 | inbox_seq` reads an inbox in order.
//!
//! ```text
//! users tree          user(16) 00                     -> UserRecord
//!                     user(16) 01 token_sha256(32)    -> TokenRecord
//!                     user(16) 02 inbox_seq(8 BE)     -> InboxRun (entries from inbox_seq on)
//!                     user(16) 03 conversation(16)    -> UserConversation
//!                     user(16) 04 contact(16)         -> added at (i64 ms)
//!                     user(16) 05                     -> KeyBundle
//!                     user(16) 06 prekey_seq(8 BE)    -> one-time prekey (String)
//!                     user(16) 07                     -> heads checkpoint: inbox seq (u64)
//! handles tree        handle (UTF-8)                  -> user(16)
//! conversations tree  conv(16) 00                     -> ConversationRecord
//!                     conv(16) 01 seq(8 BE)           -> MessageRecord
//!                     conv(16) 02 sender(16) cmid(16) -> seq (u64)
//!                     conv(16) 03 user(16)            -> Watermarks
//!                     conv(16) 04                     -> fanned-out seq (u64)
//!                     conv(16) 05                     -> GroupMembership (groups only)
//! fanout tree         conv(16)                        -> (empty): fan-out pending
//! meta tree           "format"                        -> storage format (u32)
//!                     "ring_state"                    -> RingRecord
//! media tree          media(16) 00                    -> MediaRecord
//!                     media(16) 01 conv(16)           -> (empty): referenced there
//! groups tree         group(16) 00                    -> GroupRecord
//!                     group(16) 01                    -> version applied by the conversation (u64)
//! ```

pub const USER_PROFILE: u8 = 0x00;
pub const USER_TOKEN: u8 = 0x01;
pub const USER_INBOX: u8 = 0x02;
pub const USER_CONVERSATION: u8 = 0x03;
pub const USER_CONTACT: u8 = 0x04;
pub const USER_KEYS: u8 = 0x05;
pub const USER_PREKEY: u8 = 0x06;
pub const USER_HEADS: u8 = 0x07;

pub const MEDIA_RECORD: u8 = 0x00;
pub const MEDIA_REF: u8 = 0x01;

pub const CONV_RECORD: u8 = 0x00;
pub const CONV_MESSAGE: u8 = 0x01;
pub const CONV_IDEMPOTENCY: u8 = 0x02;
pub const CONV_WATERMARK: u8 = 0x03;
pub const CONV_FANOUT: u8 = 0x04;
pub const CONV_MEMBERSHIP: u8 = 0x05;

pub const GROUP_RECORD: u8 = 0x00;
pub const GROUP_APPLIED: u8 = 0x01;

/// `entity | tag`: a record kind's prefix, or a singleton record's key.
pub fn tagged(entity: &[u8; 16], tag: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.extend_from_slice(entity);
    k.push(tag);
    k
}

/// `entity | tag | seq(8 BE)`.
pub fn with_seq(entity: &[u8; 16], tag: u8, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(25);
    k.extend_from_slice(entity);
    k.push(tag);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// `entity | tag | part...`.
pub fn with_parts(entity: &[u8; 16], tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(17 + parts.iter().map(|p| p.len()).sum::<usize>());
    k.extend_from_slice(entity);
    k.push(tag);
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

/// The seq at the end of a `with_seq` key, if the key has that shape.
pub fn seq_suffix(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.get(17..25)?.try_into().ok()?;
    (key.len() == 25).then(|| u64::from_be_bytes(bytes))
}

/// Hex rendering of a key for error messages.
pub fn show(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn seq_keys_sort_numerically(e in any::<[u8; 16]>(), a in any::<u64>(), b in any::<u64>()) {
            let (ka, kb) = (with_seq(&e, CONV_MESSAGE, a), with_seq(&e, CONV_MESSAGE, b));
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            prop_assert_eq!(seq_suffix(&ka), Some(a));
        }

        #[test]
        fn entities_never_interleave(e1 in any::<[u8; 16]>(), e2 in any::<[u8; 16]>(), a in any::<u64>(), b in any::<u64>()) {
            prop_assume!(e1 < e2);
            // Every key of a smaller entity sorts before every key of a larger one, so an
            // entity's data is one contiguous range.
            prop_assert!(with_seq(&e1, CONV_FANOUT, a) < with_seq(&e2, CONV_RECORD, b));
            prop_assert!(tagged(&e1, 0xff) < tagged(&e2, 0x00));
        }

        #[test]
        fn seq_suffix_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = seq_suffix(&bytes);
        }
    }
}
