//! The JSON wire types of the client contract (`docs/PROTOCOL.md`).
//!
//! Client frames are parsed in two steps so that each failure gets its own error code:
//! not JSON or not an object -> `bad_request`; a `type` we do not know ->
//! `unknown_type`; a known type with missing or mistyped fields -> `bad_request`.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::actors::{Ack, MessageKind, MessageRecord, ReceiptStatus, UserProfile};

/// A parsed client frame.
#[derive(Debug)]
pub enum ClientFrame {
    Sync { after: u64 },
    Send(SendFrame),
    Delivered(MarkFrame),
    Read(MarkFrame),
    Typing { conversation_id: String },
    SubscribePresence { user_ids: Vec<String> },
    Ping,
}

#[derive(Debug, Deserialize)]
pub struct SendFrame {
    pub client_msg_id: String,
    #[serde(default)]
    pub to_user: Option<String>,
    #[serde(default)]
    pub conversation_id: Option<String>,
    pub body: String,
    #[serde(default)]
    pub media: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
pub struct MarkFrame {
    pub conversation_id: String,
    pub seq: u64,
}

#[derive(Deserialize)]
struct SyncFields {
    #[serde(default)]
    after: u64,
}

#[derive(Deserialize)]
struct TypingFields {
    conversation_id: String,
}

#[derive(Deserialize)]
struct PresenceFields {
    user_ids: Vec<String>,
}

/// Why a frame could not be parsed: the error code and a message for the client, plus
/// the `client_msg_id` of a `send`, when it could be read.
#[derive(Debug)]
pub struct FrameError {
    pub code: &'static str,
    pub message: String,
    pub client_msg_id: Option<String>,
}

impl ClientFrame {
    pub fn parse(text: &str) -> Result<ClientFrame, FrameError> {
        let bad = |message: String, client_msg_id: Option<String>| FrameError {
            code: "bad_request",
            message,
            client_msg_id,
        };
        let value: Value =
            serde_json::from_str(text).map_err(|e| bad(format!("malformed JSON: {e}"), None))?;
        let Value::Object(map) = &value else {
            return Err(bad("a frame must be a JSON object".into(), None));
        };
        let Some(kind) = map.get("type").and_then(Value::as_str) else {
            return Err(bad("missing string field `type`".into(), None));
        };
        let cmid = map
            .get("client_msg_id")
            .and_then(Value::as_str)
            .map(str::to_string);
        fn fields<T: serde::de::DeserializeOwned>(v: Value, kind: &str) -> Result<T, String> {
            serde_json::from_value(v).map_err(|e| format!("invalid `{kind}` frame: {e}"))
        }
        let kind = kind.to_string();
        match kind.as_str() {
            "sync" => fields::<SyncFields>(value, &kind)
                .map(|f| ClientFrame::Sync { after: f.after })
                .map_err(|m| bad(m, None)),
            "send" => fields::<SendFrame>(value, &kind)
                .map(ClientFrame::Send)
                .map_err(|m| bad(m, cmid)),
            "delivered" => fields(value, &kind)
                .map(ClientFrame::Delivered)
                .map_err(|m| bad(m, None)),
            "read" => fields(value, &kind)
                .map(ClientFrame::Read)
                .map_err(|m| bad(m, None)),
            "typing" => fields::<TypingFields>(value, &kind)
                .map(|f| ClientFrame::Typing {
                    conversation_id: f.conversation_id,
                })
                .map_err(|m| bad(m, None)),
            "subscribe_presence" => fields::<PresenceFields>(value, &kind)
                .map(|f| ClientFrame::SubscribePresence {
                    user_ids: f.user_ids,
                })
                .map_err(|m| bad(m, None)),
            "ping" => Ok(ClientFrame::Ping),
            other => Err(FrameError {
                code: "unknown_type",
                message: format!("unknown frame type {other:?}"),
                client_msg_id: None,
            }),
        }
    }
}

/// A message object, as frames and history carry it.
#[derive(Debug, Serialize)]
pub struct MessageJson<'a> {
    pub message_id: Uuid,
    pub conversation_id: Uuid,
    pub seq: u64,
    pub sender_id: Uuid,
    pub kind: &'static str,
    pub body: &'a str,
    pub media: &'a [Uuid],
    pub client_msg_id: Option<Uuid>,
    pub ts: i64,
}

impl<'a> From<&'a MessageRecord> for MessageJson<'a> {
    fn from(m: &'a MessageRecord) -> Self {
        MessageJson {
            message_id: m.message_id,
            conversation_id: m.conversation_id.0,
            seq: m.seq,
            sender_id: m.sender_id.0,
            kind: match m.kind {
                MessageKind::User => "user",
                MessageKind::System => "system",
            },
            body: &m.body,
            media: &m.media,
            client_msg_id: m.client_msg_id,
            ts: m.ts,
        }
    }
}

/// A frame the server sends.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Ack(&'a Ack),
    Message {
        inbox_seq: u64,
        message: MessageJson<'a>,
    },
    Synced {
        inbox_seq: u64,
    },
    Receipt {
        conversation_id: Uuid,
        user_id: Uuid,
        status: &'static str,
        seq: u64,
    },
    Presence {
        user_id: Uuid,
        online: bool,
        last_seen: Option<i64>,
    },
    Typing {
        conversation_id: Uuid,
        user_id: Uuid,
    },
    Error {
        code: &'a str,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<&'a str>,
    },
    Pong,
}

impl ServerFrame<'_> {
    pub fn to_text(&self) -> String {
        // Serialising these plain structs cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

pub fn status_name(s: ReceiptStatus) -> &'static str {
    match s {
        ReceiptStatus::Delivered => "delivered",
        ReceiptStatus::Read => "read",
    }
}

/// The user object of the contract.
#[derive(Debug, Serialize)]
pub struct UserJson<'a> {
    pub user_id: Uuid,
    pub handle: &'a str,
    pub display_name: &'a str,
    pub online: bool,
    pub last_seen: Option<i64>,
}

impl<'a> From<&'a UserProfile> for UserJson<'a> {
    fn from(p: &'a UserProfile) -> Self {
        UserJson {
            user_id: p.user_id.0,
            handle: &p.handle,
            display_name: &p.display_name,
            online: p.online,
            last_seen: p.last_seen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn error_codes_by_failure() {
        assert_eq!(ClientFrame::parse("{").unwrap_err().code, "bad_request");
        assert_eq!(ClientFrame::parse("[1]").unwrap_err().code, "bad_request");
        assert_eq!(
            ClientFrame::parse(r#"{"type":"dance"}"#).unwrap_err().code,
            "unknown_type"
        );
        let e = ClientFrame::parse(r#"{"type":"send","client_msg_id":"x"}"#).unwrap_err();
        assert_eq!(
            (e.code, e.client_msg_id.as_deref()),
            ("bad_request", Some("x"))
        );
        assert!(matches!(
            ClientFrame::parse(r#"{"type":"sync"}"#),
            Ok(ClientFrame::Sync { after: 0 })
        ));
        assert!(matches!(
            ClientFrame::parse(r#"{"type":"ping"}"#),
            Ok(ClientFrame::Ping)
        ));
        assert!(ClientFrame::parse(r#"{"type":"read","conversation_id":"c","seq":-1}"#).is_err());
    }

    #[test]
    fn frames_serialise_per_contract() {
        let f = ServerFrame::Error {
            code: "rate_limited",
            message: "slow down",
            client_msg_id: None,
        };
        assert_eq!(
            f.to_text(),
            r#"{"type":"error","code":"rate_limited","message":"slow down"}"#
        );
        assert_eq!(ServerFrame::Pong.to_text(), r#"{"type":"pong"}"#);
        assert_eq!(
            ServerFrame::Synced { inbox_seq: 4 }.to_text(),
            r#"{"type":"synced","inbox_seq":4}"#
        );
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in ".{0,300}") {
            let _ = ClientFrame::parse(&s);
        }

        #[test]
        fn arbitrary_json_objects_never_panic(kind in "(sync|send|read|delivered|typing|ping|x)", v in any::<i64>(), s in ".{0,20}") {
            let text = format!(r#"{{"type":"{kind}","after":{v},"seq":{v},"client_msg_id":{s:?},"body":{s:?},"conversation_id":{s:?}}}"#);
            let _ = ClientFrame::parse(&text);
        }
    }
}
