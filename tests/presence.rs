//! Contacts, presence subscriptions and typing, as a client sees them.

mod common;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("expected an array, got {list}"))
        .iter()
        .map(|u| str_field(u, "user_id").to_string())
        .collect()
}

#[tokio::test]
async fn contacts_are_a_list_of_user_objects() {
    let node = Node::start("").await;
    let a = node.user("cta").await;
    let b = node.user("ctb").await;

    let r = node
        .call(
            Method::PUT,
            &format!("/contacts/{}", b.id),
            Some(&a.token),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(ids(&r.body), vec![b.id.clone()]);
    assert_user_obj(&r.body[0], &b.id, &b.handle);
    // Adding twice changes nothing.
    let r = node
        .call(
            Method::PUT,
            &format!("/contacts/{}", b.id),
            Some(&a.token),
            None,
        )
        .await;
    assert_eq!(ids(&r.body), vec![b.id.clone()]);
    let r = node.get("/contacts", Some(&a.token)).await;
    assert_eq!((r.status, ids(&r.body)), (200, vec![b.id.clone()]));

    let r = node
        .call(
            Method::PUT,
            &format!("/contacts/{}", new_uuid()),
            Some(&a.token),
            None,
        )
        .await;
    assert_http_error(&r, 404, "unknown_user", "contact that does not exist");
    let r = node
        .call(
            Method::PUT,
            &format!("/contacts/{}", a.id),
            Some(&a.token),
            None,
        )
        .await;
    assert_http_error(&r, 400, "bad_request", "oneself as a contact");
    let r = node
        .call(Method::PUT, "/contacts/not-a-uuid", Some(&a.token), None)
        .await;
    assert_http_error(&r, 400, "invalid_id", "malformed contact id");
    let r = node
        .call(Method::PUT, &format!("/contacts/{}", b.id), None, None)
        .await;
    assert_http_error(&r, 401, "unauthorized", "no token");
    // b's own list is untouched.
    assert_eq!(node.get("/contacts", Some(&b.token)).await.body, json!([]));

    let r = node
        .delete(&format!("/contacts/{}", b.id), Some(&a.token))
        .await;
    assert_eq!((r.status, r.body.clone()), (200, json!([])), "{}", r.text);
    let r = node
        .delete(&format!("/contacts/{}", b.id), Some(&a.token))
        .await;
    assert_eq!(
        (r.status, r.body.clone()),
        (200, json!([])),
        "removing twice: {}",
        r.text
    );
}

async fn presence_of(ws: &mut Ws, user: &str) -> Value {
    let u = user.to_string();
    ws.recv_where(&format!("presence of {user}"), move |v| {
        v["type"] == "presence" && v["user_id"] == u.as_str()
    })
    .await
}

#[tokio::test]
async fn presence_reaches_every_watching_device_and_not_strangers() {
    let node = Node::start("").await;
    let a = node.user("pra").await;
    let b = node.user("prb").await;
    let c = node.user("prc").await;
    // a and b share a conversation; c shares nothing with a.
    let mut a1 = node.ws(&a.token).await;
    a1.sync(0).await;
    a1.send_to_user(&b.id, "hi").await;
    let mut a2 = node.ws(&a.token).await;
    a2.sync_n(0, 1).await;

    for ws in [&mut a1, &mut a2] {
        ws.send_json(&json!({"type": "subscribe_presence", "user_ids": [b.id]}))
            .await;
        let p = presence_of(ws, &b.id).await;
        assert_eq!(
            (p["online"].clone(), p["last_seen"].clone()),
            (json!(false), Value::Null),
            "{p}"
        );
    }

    // b comes online: both devices hear it.
    let bw = node.ws(&b.token).await;
    for ws in [&mut a1, &mut a2] {
        assert_eq!(presence_of(ws, &b.id).await["online"], true);
    }
    // b goes away: both hear it, with last_seen.
    bw.close().await;
    for ws in [&mut a1, &mut a2] {
        let p = presence_of(ws, &b.id).await;
        assert_eq!(p["online"], false, "{p}");
        assert!(p["last_seen"].is_u64(), "{p}");
    }

    // A stranger's presence is refused...
    a1.send_json(&json!({"type": "subscribe_presence", "user_ids": [c.id]}))
        .await;
    let e = a1.recv_type("error").await;
    assert_error_frame(&e, "not_member", "presence of a stranger");
    // ...until they are a contact.
    let r = node
        .call(
            Method::PUT,
            &format!("/contacts/{}", c.id),
            Some(&a.token),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    a1.send_json(&json!({"type": "subscribe_presence", "user_ids": [c.id]}))
        .await;
    assert_eq!(presence_of(&mut a1, &c.id).await["online"], false);

    // Malformed ids.
    a1.send_json(&json!({"type": "subscribe_presence", "user_ids": ["nope"]}))
        .await;
    assert_error_frame(
        &a1.recv_type("error").await,
        "bad_request",
        "malformed user id",
    );
    a1.send_json(&json!({"type": "subscribe_presence"})).await;
    assert_error_frame(
        &a1.recv_type("error").await,
        "bad_request",
        "missing user_ids",
    );
}

#[tokio::test]
async fn typing_is_relayed_to_other_members_only_and_never_stored() {
    let node = Node::start("").await;
    let a = node.user("tya").await;
    let b = node.user("tyb").await;
    let c = node.user("tyc").await;
    let mut aw = node.ws(&a.token).await;
    aw.sync(0).await;
    let ack = aw.send_to_user(&b.id, "hello").await;
    let cid = str_field(&ack, "conversation_id").to_string();
    let mut bw = node.ws(&b.token).await;
    bw.sync_n(0, 1).await;

    bw.send_json(&json!({"type": "typing", "conversation_id": cid}))
        .await;
    let t = aw.recv_type("typing").await;
    assert_eq!(
        t,
        json!({"type": "typing", "conversation_id": cid, "user_id": b.id})
    );
    bw.expect_no_frame_for(QUIET_MS).await;

    // Not a member; not a UUID.
    let mut cw = node.ws(&c.token).await;
    cw.send_json(&json!({"type": "typing", "conversation_id": cid}))
        .await;
    assert_error_frame(
        &cw.recv_type("error").await,
        "not_member",
        "typing as a stranger",
    );
    cw.send_json(&json!({"type": "typing", "conversation_id": "x"}))
        .await;
    assert_error_frame(
        &cw.recv_type("error").await,
        "bad_request",
        "typing with a bad id",
    );

    // A flood is rate limited, per connection.
    for _ in 0..20 {
        bw.send_json(&json!({"type": "typing", "conversation_id": cid}))
            .await;
    }
    assert_error_frame(&bw.recv_type("error").await, "rate_limited", "typing flood");

    // Nothing was stored.
    let h = node.full_history(&a.token, &cid).await;
    assert_eq!(h.len(), 1, "typing stores nothing: {h:?}");
}
