//! Value encoding: one schema-version byte, then bincode (standard config, via serde).
//!
//! The version byte lets a later release read old values or refuse them clearly instead
//! of misreading them. Decoding never panics: damaged bytes are a `Corrupt` error.

use serde::{de::DeserializeOwned, Serialize};

use super::error::StorageError;
use super::keys;

/// Version of every value layout written by this release.
pub const SCHEMA_VERSION: u8 = 1;

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StorageError> {
    let mut out = vec![SCHEMA_VERSION];
    bincode::serde::encode_into_std_write(value, &mut out, bincode::config::standard())
        .map_err(|e| StorageError::Io(format!("encode: {e}")))?;
    Ok(out)
}

/// Most bytes a stored value may claim while it is decoded. Far above any real value (a
/// message body is at most 64 KiB), and what keeps a damaged length prefix from
/// making bincode allocate without bound (or panic on a capacity overflow).
const DECODE_LIMIT: usize = 64 * 1024 * 1024;

pub fn decode<T: DeserializeOwned>(
    tree: &'static str,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StorageError> {
    let corrupt = |reason: String| StorageError::Corrupt {
        tree,
        key: keys::show(key),
        reason,
    };
    match bytes.split_first() {
        Some((&SCHEMA_VERSION, body)) => {
            let (value, used) = bincode::serde::decode_from_slice(
                body,
                bincode::config::standard().with_limit::<DECODE_LIMIT>(),
            )
            .map_err(|e| corrupt(e.to_string()))?;
            if used != body.len() {
                return Err(corrupt(format!("{} trailing bytes", body.len() - used)));
            }
            Ok(value)
        }
        Some((v, _)) => Err(corrupt(format!("unknown schema version {v}"))),
        None => Err(corrupt("empty value".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{ConversationId, UserId};
    use crate::storage::records::{MessageKind, MessageRecord};
    use proptest::prelude::*;
    use uuid::Uuid;

    fn message(seq: u64, body: String, media: Vec<u128>, cmid: Option<u128>) -> MessageRecord {
        MessageRecord {
            message_id: Uuid::from_u128(seq as u128 + 7),
            conversation_id: ConversationId(Uuid::from_u128(1)),
            seq,
            sender_id: UserId(Uuid::from_u128(2)),
            kind: MessageKind::User,
            body,
            media: media.into_iter().map(Uuid::from_u128).collect(),
            client_msg_id: cmid.map(Uuid::from_u128),
            ts: 1_700_000_000_000,
        }
    }

    proptest! {
        #[test]
        fn round_trip(seq in any::<u64>(), body in ".{0,200}", media in proptest::collection::vec(any::<u128>(), 0..4), cmid in any::<Option<u128>>()) {
            let m = message(seq, body, media, cmid);
            let bytes = encode(&m).unwrap();
            let back: MessageRecord = decode("t", b"k", &bytes).unwrap();
            prop_assert_eq!(back, m);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode::<MessageRecord>("t", b"k", &bytes);
            // Behind a valid version byte, so that bincode itself sees the garbage.
            let mut versioned = vec![SCHEMA_VERSION];
            versioned.extend_from_slice(&bytes);
            let _ = decode::<MessageRecord>("t", b"k", &versioned);
        }

        #[test]
        fn corrupted_values_never_panic(body in ".{0,50}", at in any::<usize>(), byte in any::<u8>()) {
            let mut bytes = encode(&message(9, body, vec![1], Some(2))).unwrap();
            let at = 1 + at % (bytes.len() - 1);
            bytes[at] = byte;
            let _ = decode::<MessageRecord>("t", b"k", &bytes);
        }

        #[test]
        fn truncation_is_an_error(body in ".{1,50}", cut in 1usize..10) {
            let bytes = encode(&message(3, body, vec![], None)).unwrap();
            let cut = cut.min(bytes.len() - 1);
            prop_assert!(decode::<MessageRecord>("t", b"k", &bytes[..bytes.len() - cut]).is_err());
        }
    }

    /// Found by `corrupted_values_never_panic`: a damaged length prefix claiming
    /// 2^64 - 1 bytes made bincode panic on a capacity overflow.
    #[test]
    fn a_huge_length_prefix_is_corrupt_not_a_panic() {
        let body = "\u{b}0a0Aa\u{10000}\u{10000}a \u{800}".to_string();
        let mut bytes = encode(&message(9, body, vec![1], Some(2))).unwrap();
        let at = 1 + 15575951321163244449usize % (bytes.len() - 1);
        bytes[at] = 253;
        assert!(decode::<MessageRecord>("t", b"k", &bytes).is_err());
        let mut string = vec![SCHEMA_VERSION, 253];
        string.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode::<String>("t", b"k", &string).is_err());
    }

    #[test]
    fn unknown_version_is_corrupt() {
        let mut bytes = encode(&5u64).unwrap();
        bytes[0] = 99;
        let err = decode::<u64>("t", b"k", &bytes).unwrap_err();
        assert!(
            err.to_string().contains("unknown schema version 99"),
            "{err}"
        );
    }
}
