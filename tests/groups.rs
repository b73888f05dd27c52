//! Groups as a client sees them: creation and the rules on membership, `system`
//! messages in seq order, fan-out to every member exactly once (a 200-member group),
//! a member removed mid-conversation, per-member receipts, typing and presence through
//! a shared group, and membership surviving a kill -9.

mod common;

use std::collections::HashMap;

use common::*;
use futures_util::future::join_all;
use serde_json::{json, Value};

async fn create_group(node: &Node, token: &str, name: &str, members: &[&str]) -> Resp {
    node.post(
        "/groups",
        Some(token),
        &json!({"name": name, "members": members}),
    )
    .await
}

/// Creates a group and returns (group_id, conversation_id, group object).
async fn new_group(node: &Node, owner: &User, name: &str, members: &[&str]) -> (String, String) {
    let r = create_group(node, &owner.token, name, members).await;
    assert_eq!(r.status, 201, "POST /groups: {} {}", r.text, node.ctx());
    (
        str_field(&r.body, "group_id").to_string(),
        str_field(&r.body, "conversation_id").to_string(),
    )
}

/// `[(user_id, role)]` of a group object.
fn roster(group: &Value) -> Vec<(String, String)> {
    field_pairs(group, "members", "user_id", "role")
}

/// The parsed body of a `system` message.
fn system_event(m: &Value) -> Value {
    assert_eq!(m["kind"], "system", "expected a system message: {m}");
    assert!(
        m["client_msg_id"].is_null(),
        "system messages have no client_msg_id: {m}"
    );
    serde_json::from_str(str_field(m, "body"))
        .unwrap_or_else(|e| panic!("system body is not JSON ({e}): {m}"))
}

async fn add(node: &Node, token: &str, gid: &str, user: &str) -> Resp {
    node.post(
        &format!("/groups/{gid}/members"),
        Some(token),
        &json!({ "user_id": user }),
    )
    .await
}

async fn remove(node: &Node, token: &str, gid: &str, user: &str) -> Resp {
    node.delete(&format!("/groups/{gid}/members/{user}"), Some(token))
        .await
}

/// A connected, synced device. The replayed messages are kept (first in `pending`),
/// so a caller reads them with the live ones, whichever way the timing fell.
async fn device(node: &Node, u: &User) -> Ws {
    let mut ws = node.ws(&u.token).await;
    let s = ws.sync(0).await;
    for m in s.messages.into_iter().rev() {
        ws.pending.push_front(m);
    }
    ws
}

/// The conversation seqs of `message` frames.
fn seqs_of(frames: &[Value]) -> Vec<u64> {
    frames
        .iter()
        .map(|f| u64_field(&f["message"], "seq"))
        .collect()
}

/// The next `message` frame's message object.
async fn next_message(ws: &mut Ws) -> Value {
    ws.recv_messages(1).await.remove(0)["message"].clone()
}

#[tokio::test]
async fn creation_rules_and_errors() {
    let node = Node::start("max_group_members = 4").await;
    let a = node.user("gra").await;
    let b = node.user("grb").await;
    let c = node.user("grc").await;
    let d = node.user("grd").await;
    let e = node.user("gre").await;

    let r = create_group(&node, &a.token, "Weekend", &[&b.id, &c.id]).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let gid = str_field(&r.body, "group_id").to_string();
    let cid = str_field(&r.body, "conversation_id").to_string();
    assert!(is_uuid(&r.body["group_id"]) && is_uuid(&r.body["conversation_id"]));
    assert_eq!(r.body["name"], "Weekend");
    let want = vec![
        (a.id.clone(), "admin".to_string()),
        (b.id.clone(), "member".to_string()),
        (c.id.clone(), "member".to_string()),
    ];
    assert_eq!(roster(&r.body), want);
    // The creator may list itself; it is still one admin.
    let r2 = create_group(&node, &a.token, "Self", &[&a.id]).await;
    assert_eq!(r2.status, 201, "{}", r2.text);
    assert_eq!(roster(&r2.body), vec![(a.id.clone(), "admin".to_string())]);

    // Members read it; others may not.
    let r = node.get(&format!("/groups/{gid}"), Some(&b.token)).await;
    assert_eq!(
        (r.status, roster(&r.body)),
        (200, want.clone()),
        "{}",
        r.text
    );
    assert_eq!(r.body["conversation_id"].as_str(), Some(cid.as_str()));
    let r = node.get(&format!("/groups/{gid}"), Some(&d.token)).await;
    assert_http_error(&r, 403, "not_member", "a stranger reads the group");
    let r = node
        .get(&format!("/groups/{}", new_uuid()), Some(&a.token))
        .await;
    assert_http_error(&r, 404, "unknown_group", "unknown group");
    let r = node.get("/groups/nope", Some(&a.token)).await;
    assert_http_error(&r, 400, "invalid_id", "malformed group id");
    let r = node.get(&format!("/groups/{gid}"), None).await;
    assert_http_error(&r, 401, "unauthorized", "no token");

    // Bad creations: nothing is made.
    for (name, members, status, code) in [
        ("", vec![b.id.clone()], 400, "invalid_name"),
        ("   ", vec![], 400, "invalid_name"),
        (&*"x".repeat(101), vec![], 400, "invalid_name"),
        ("Dup", vec![b.id.clone(), b.id.clone()], 400, "bad_request"),
        ("Ghost", vec![b.id.clone(), new_uuid()], 404, "unknown_user"),
        ("Bad", vec!["not-a-uuid".to_string()], 400, "invalid_id"),
        (
            "Big",
            vec![b.id.clone(), c.id.clone(), d.id.clone(), e.id.clone()],
            422,
            "group_full",
        ),
    ] {
        let refs: Vec<&str> = members.iter().map(String::as_str).collect();
        let r = create_group(&node, &a.token, name, &refs).await;
        assert_http_error(&r, status, code, &format!("create {name:?} {members:?}"));
    }
    for body in [json!({"members": []}), json!({"name": 5}), json!([1])] {
        let r = node.post("/groups", Some(&a.token), &body).await;
        assert_http_error(&r, 400, "bad_request", &format!("create with {body}"));
    }
    let r = node
        .post("/groups", None, &json!({"name": "x", "members": []}))
        .await;
    assert_http_error(&r, 401, "unauthorized", "create without a token");
    // None of the refused groups reached anyone's conversation list: once the one
    // group b is in has arrived (fan-out is asynchronous), it is all b has.
    let started = std::time::Instant::now();
    let r = loop {
        let r = node.get("/conversations", Some(&b.token)).await;
        if !r.body.as_array().expect("array").is_empty() || started.elapsed().as_secs() > 10 {
            break r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let groups: Vec<&Value> = r.body.as_array().expect("array").iter().collect();
    assert_eq!(groups.len(), 1, "b is in one group: {}", r.text);
    assert!(
        groups
            .iter()
            .all(|c| c["conversation_id"].as_str() == Some(cid.as_str())),
        "b sees only the one group it is in: {}",
        r.text
    );

    // Membership rules.
    let r = add(&node, &b.token, &gid, &d.id).await;
    assert_http_error(&r, 403, "not_admin", "a member adds someone");
    let r = add(&node, &d.token, &gid, &d.id).await;
    assert_http_error(&r, 403, "not_member", "a stranger adds itself");
    let r = add(&node, &a.token, &gid, &b.id).await;
    assert_http_error(&r, 409, "already_member", "adding a member twice");
    let r = add(&node, &a.token, &gid, &new_uuid()).await;
    assert_http_error(&r, 404, "unknown_user", "adding a user that does not exist");
    let r = add(&node, &a.token, &gid, "x").await;
    assert_http_error(&r, 400, "invalid_id", "adding a malformed id");
    let r = node
        .post(
            &format!("/groups/{gid}/members"),
            Some(&a.token),
            &json!({}),
        )
        .await;
    assert_http_error(&r, 400, "bad_request", "add without user_id");
    let r = add(&node, &a.token, &new_uuid(), &d.id).await;
    assert_http_error(&r, 404, "unknown_group", "adding to an unknown group");
    let r = add(&node, &a.token, &gid, &d.id).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(roster(&r.body).len(), 4);
    let r = add(&node, &a.token, &gid, &e.id).await;
    assert_http_error(
        &r,
        422,
        "group_full",
        "a fifth member past max_group_members = 4",
    );

    let r = remove(&node, &b.token, &gid, &c.id).await;
    assert_http_error(&r, 403, "not_admin", "a member removes another");
    let r = remove(&node, &e.token, &gid, &e.id).await;
    assert_http_error(&r, 403, "not_member", "a stranger leaves");
    let r = remove(&node, &a.token, &gid, &e.id).await;
    assert_http_error(&r, 404, "unknown_member", "removing a non-member");
    let r = remove(&node, &a.token, &gid, &c.id).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!roster(&r.body).iter().any(|(u, _)| *u == c.id));
    // b leaves by itself; then the admin leaves and d (the longest-standing) is promoted.
    assert_eq!(remove(&node, &b.token, &gid, &b.id).await.status, 200);
    let r = remove(&node, &a.token, &gid, &a.id).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(roster(&r.body), vec![(d.id.clone(), "admin".to_string())]);
    let r = node.get(&format!("/groups/{gid}"), Some(&a.token)).await;
    assert_http_error(&r, 403, "not_member", "a member that left reads the group");

    // Every change is a system message, in seq order, from the one who made it.
    let h = node.full_history(&d.token, &cid).await;
    let events: Vec<(String, String, Value)> = h
        .iter()
        .map(|m| {
            assert_message_obj(m);
            let ev = system_event(m);
            (
                str_field(&ev, "event").to_string(),
                str_field(m, "sender_id").to_string(),
                ev,
            )
        })
        .collect();
    // d joined at seq 2: its history starts there.
    assert_eq!(u64_field(&h[0], "seq"), 2, "{h:?}");
    let names: Vec<(&str, &str)> = events
        .iter()
        .map(|(e, s, _)| (e.as_str(), s.as_str()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("member_added", a.id.as_str()),
            ("member_removed", a.id.as_str()),
            ("member_left", b.id.as_str()),
            ("member_left", a.id.as_str()),
        ]
    );
    assert_eq!(events[0].2["user_id"], d.id.as_str());
    assert_eq!(events[1].2["user_id"], c.id.as_str());
    assert!(events[2].2["new_admin"].is_null());
    assert_eq!(events[3].2["new_admin"], d.id.as_str());
    let seqs: Vec<u64> = h.iter().map(|m| u64_field(m, "seq")).collect();
    assert_eq!(seqs, vec![2, 3, 4, 5]);
}

#[tokio::test]
async fn removed_member_gets_nothing_more_and_receipts_are_per_member() {
    let node = Node::start("").await;
    let a = node.user("gma").await;
    let b = node.user("gmb").await;
    let c = node.user("gmc").await;
    let (gid, cid) = new_group(&node, &a, "Trip", &[&b.id, &c.id]).await;
    let mut aw = device(&node, &a).await;
    let mut bw = device(&node, &b).await;
    let mut cw = device(&node, &c).await;
    // Everyone's inbox starts with the creation (live or replayed, by timing).
    for ws in [&mut aw, &mut bw, &mut cw] {
        let m = next_message(ws).await;
        let ev = system_event(&m);
        assert_eq!(
            (ev["event"].as_str(), ev["name"].as_str()),
            (Some("group_created"), Some("Trip"))
        );
        assert_eq!(
            ev["members"],
            json!([a.id, b.id, c.id]),
            "the founders, creator first"
        );
        assert_eq!(u64_field(&m, "seq"), 1);
    }

    let hello = cw.send_to_conv_nowait(&cid, "hello all").await;
    let ack = cw.ack_for(&hello).await;
    assert_eq!(u64_field(&ack, "seq"), 2);
    for ws in [&mut aw, &mut bw, &mut cw] {
        let m = next_message(ws).await;
        assert_eq!(
            (m["body"].as_str(), u64_field(&m, "seq")),
            (Some("hello all"), 2)
        );
    }

    // Receipts are per member and go to the others; reading implies delivery, and both
    // are announced, delivered first.
    bw.send_json(&json!({"type":"read","conversation_id":cid,"seq":2}))
        .await;
    for ws in [&mut aw, &mut cw] {
        let d = ws.recv_type("receipt").await;
        assert_eq!(
            (d["status"].as_str(), d["seq"].as_u64()),
            (Some("delivered"), Some(2)),
            "{d}"
        );
        let r = ws.recv_type("receipt").await;
        assert_eq!(
            (
                r["user_id"].as_str(),
                r["status"].as_str(),
                r["seq"].as_u64()
            ),
            (Some(b.id.as_str()), Some("read"), Some(2)),
            "{r}"
        );
    }
    let r = node
        .get(&format!("/conversations/{cid}/receipts"), Some(&c.token))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let marks: HashMap<String, (u64, u64)> = r
        .body
        .as_array()
        .expect("array")
        .iter()
        .map(|e| {
            (
                str_field(e, "user_id").to_string(),
                (u64_field(e, "delivered_seq"), u64_field(e, "read_seq")),
            )
        })
        .collect();
    assert_eq!(marks.len(), 3, "{}", r.text);
    assert_eq!(marks[&b.id], (2, 2));
    assert_eq!(marks[&a.id], (0, 0));

    // Typing goes to the other members only.
    cw.send_json(&json!({"type":"typing","conversation_id":cid}))
        .await;
    for ws in [&mut aw, &mut bw] {
        let t = ws.recv_type("typing").await;
        assert_eq!(t["user_id"].as_str(), Some(c.id.as_str()), "{t}");
    }

    // c is removed mid-conversation: it sees its removal, then nothing.
    let r = remove(&node, &a.token, &gid, &c.id).await;
    assert_eq!(r.status, 200, "{}", r.text);
    for ws in [&mut aw, &mut bw, &mut cw] {
        let m = next_message(ws).await;
        let ev = system_event(&m);
        assert_eq!(
            (ev["event"].as_str(), ev["user_id"].as_str()),
            (Some("member_removed"), Some(c.id.as_str()))
        );
        assert_eq!(u64_field(&m, "seq"), 3);
    }
    aw.send_to_conv(&cid, "after c left").await;
    bw.send_json(&json!({"type":"typing","conversation_id":cid}))
        .await;
    for ws in [&mut aw, &mut bw] {
        let m = next_message(ws).await;
        assert_eq!(
            (m["body"].as_str(), u64_field(&m, "seq")),
            (Some("after c left"), 4)
        );
    }
    aw.recv_type("typing").await;
    bw.send_json(&json!({"type":"read","conversation_id":cid,"seq":4}))
        .await;
    aw.recv_type("receipt").await; // delivered 4
    aw.recv_type("receipt").await; // read 4
    cw.ping_pong().await;
    cw.expect_no_frame_for(QUIET_MS).await;

    // A retry of what c sent while a member still gets its original ack...
    cw.send_json(
        &json!({"type":"send","client_msg_id":hello,"conversation_id":cid,"body":"hello all"}),
    )
    .await;
    assert_eq!(cw.ack_for(&hello).await, ack, "a retry after removal");
    // ...but c can no longer post, type, mark, or read the history or receipts.
    let cmid = cw.send_to_conv_nowait(&cid, "let me back").await;
    assert_error_frame(
        &cw.reply_for(&cmid).await,
        "not_member",
        "a removed member posts",
    );
    cw.send_json(&json!({"type":"typing","conversation_id":cid}))
        .await;
    assert_error_frame(
        &cw.recv_type("error").await,
        "not_member",
        "a removed member types",
    );
    for path in [
        format!("/conversations/{cid}/messages"),
        format!("/conversations/{cid}/receipts"),
        format!("/groups/{gid}"),
    ] {
        let r = node.get(&path, Some(&c.token)).await;
        assert_http_error(
            &r,
            403,
            "not_member",
            &format!("removed member: GET {path}"),
        );
    }
    // Its devices keep what they had: a fresh sync replays up to its removal.
    let mut c2 = node.ws(&c.token).await;
    let s = c2.sync(0).await;
    assert_eq!(seqs_of(&s.messages), vec![1, 2, 3]);
    // The list still shows the conversation it was in.
    let r = node.get("/conversations", Some(&c.token)).await;
    let entry = r
        .body
        .as_array()
        .expect("array")
        .iter()
        .find(|x| x["conversation_id"] == cid.as_str())
        .cloned();
    let entry = entry.unwrap_or_else(|| panic!("no group entry for c: {}", r.text));
    assert_eq!(
        (entry["kind"].as_str(), entry["group_id"].as_str()),
        (Some("group"), Some(gid.as_str()))
    );
    assert_eq!(entry["last_seq"], 3, "frozen at its removal: {entry}");

    // Added back, c gets its arrival and what follows, never what it missed.
    let r = add(&node, &a.token, &gid, &c.id).await;
    assert_eq!(r.status, 200, "{}", r.text);
    aw.send_to_conv(&cid, "welcome back").await;
    for ws in [&mut cw, &mut c2] {
        let m = next_message(ws).await;
        assert_eq!(
            (system_event(&m)["event"].as_str(), u64_field(&m, "seq")),
            (Some("member_added"), 5)
        );
        let m = next_message(ws).await;
        assert_eq!(
            (m["body"].as_str(), u64_field(&m, "seq")),
            (Some("welcome back"), 6)
        );
    }
    let h = node.full_history(&c.token, &cid).await;
    let seqs: Vec<u64> = h.iter().map(|m| u64_field(m, "seq")).collect();
    assert_eq!(
        seqs,
        vec![5, 6],
        "a returning member's history starts at its return"
    );
    let h = node.full_history(&b.token, &cid).await;
    assert_eq!(h.len(), 6);
    let ack = cw.send_to_conv(&cid, "thanks").await;
    assert_eq!(u64_field(&ack, "seq"), 7);
}

#[tokio::test]
async fn two_hundred_members_get_each_message_once_in_order() {
    const MEMBERS: usize = 200;
    const MESSAGES: usize = 5;
    let node = Node::start("").await;
    // Registration hashes passwords (slow on purpose): in waves, not one by one.
    let mut users: Vec<User> = Vec::with_capacity(MEMBERS);
    for _ in 0..MEMBERS / 20 {
        let made = join_all((0..20).map(|_| node.user("big"))).await;
        users.extend(made);
    }
    let owner = users[0].clone();
    let others: Vec<&str> = users[1..].iter().map(|u| u.id.as_str()).collect();
    let (_, cid) = new_group(&node, &owner, "Everyone", &others).await;

    // A few members are live while the messages go out; the rest catch up later.
    let mut live: Vec<Ws> = Vec::new();
    for u in users.iter().take(5) {
        live.push(device(&node, u).await);
    }
    let mut ow = node.ws(&owner.token).await;
    ow.sync(0).await;
    for i in 0..MESSAGES {
        ow.send_to_conv(&cid, &format!("to everyone {i}")).await;
    }
    let want: Vec<u64> = (1..=MESSAGES as u64 + 1).collect();
    for ws in live.iter_mut() {
        let mut seqs = Vec::new();
        while seqs.len() < want.len() {
            let f = ws.recv_type("message").await;
            if f["message"]["conversation_id"] == cid.as_str() {
                seqs.push(u64_field(&f["message"], "seq"));
            }
        }
        assert_eq!(seqs, want);
    }
    // Every member's inbox holds the group's messages once each, in seq order.
    for chunk in users.chunks(25) {
        let checks = chunk.iter().map(|u| {
            let (node, cid) = (&node, cid.as_str());
            let want = want.clone();
            async move {
                let mut ws = node.ws(&u.token).await;
                let s = ws.sync_n(0, want.len()).await;
                let seqs: Vec<u64> = s
                    .messages
                    .iter()
                    .map(|f| {
                        assert_eq!(f["message"]["conversation_id"], cid);
                        u64_field(&f["message"], "seq")
                    })
                    .collect();
                assert_eq!(seqs, want, "inbox of {}", u.handle);
                ws.expect_no_frame_for(200).await;
                ws.close().await;
            }
        });
        join_all(checks).await;
    }
    let r = node
        .get(
            &format!("/conversations/{cid}/receipts"),
            Some(&users[7].token),
        )
        .await;
    assert_eq!(r.body.as_array().map(Vec::len), Some(MEMBERS), "{}", r.text);
}

#[tokio::test]
async fn presence_through_a_shared_group() {
    let node = Node::start("").await;
    let a = node.user("gpa").await;
    let b = node.user("gpb").await;
    let stranger = node.user("gps").await;
    let (_, cid) = new_group(&node, &a, "Presence", &[&b.id]).await;
    let mut aw = device(&node, &a).await;
    // Wait until the group is in a's inbox: that is what makes b visible to a.
    let m = next_message(&mut aw).await;
    assert_eq!(m["conversation_id"], cid.as_str());

    aw.send_json(&json!({"type":"subscribe_presence","user_ids":[b.id, stranger.id]}))
        .await;
    let err = aw.recv_type("error").await;
    assert_error_frame(&err, "not_member", "presence of a stranger");
    assert!(
        err["message"]
            .as_str()
            .is_some_and(|t| t.contains(&stranger.id) && !t.contains(&b.id)),
        "the error names the stranger only: {err}"
    );
    let p = aw.recv_type("presence").await;
    assert_eq!(
        (p["user_id"].as_str(), p["online"].as_bool()),
        (Some(b.id.as_str()), Some(false))
    );
    let bw = device(&node, &b).await;
    let p = aw.recv_type("presence").await;
    assert_eq!(
        (p["user_id"].as_str(), p["online"].as_bool()),
        (Some(b.id.as_str()), Some(true))
    );
    bw.close().await;
    let p = aw.recv_type("presence").await;
    assert_eq!(p["online"], false);
    assert!(p["last_seen"].is_u64(), "{p}");
}

#[tokio::test]
async fn membership_survives_kill9() {
    let mut node = Node::start("").await;
    let a = node.user("gka").await;
    let b = node.user("gkb").await;
    let c = node.user("gkc").await;
    let (gid, cid) = new_group(&node, &a, "Durable", &[&b.id]).await;
    assert_eq!(add(&node, &a.token, &gid, &c.id).await.status, 200);
    let mut aw = node.ws(&a.token).await;
    aw.sync(0).await;
    let ack = aw.send_to_conv(&cid, "before the crash").await;
    assert_eq!(u64_field(&ack, "seq"), 3);
    assert_eq!(remove(&node, &a.token, &gid, &b.id).await.status, 200);
    node.kill9();
    node.restart().await;

    let r = node.get(&format!("/groups/{gid}"), Some(&c.token)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        roster(&r.body),
        vec![
            (a.id.clone(), "admin".into()),
            (c.id.clone(), "member".into())
        ]
    );
    let mut aw = node.ws(&a.token).await;
    aw.sync(0).await;
    let ack = aw.send_to_conv(&cid, "after the crash").await;
    assert_eq!(u64_field(&ack, "seq"), 5, "seqs continue without a gap");
    let h = node.full_history(&a.token, &cid).await;
    let kinds: Vec<(u64, String)> = h
        .iter()
        .map(|m| (u64_field(m, "seq"), str_field(m, "kind").to_string()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (1, "system".into()),
            (2, "system".into()),
            (3, "user".into()),
            (4, "system".into()),
            (5, "user".into())
        ]
    );
    // b's inbox ends at its removal; c's starts at its arrival.
    for (u, want) in [(&b, vec![1, 2, 3, 4]), (&c, vec![2, 3, 4, 5])] {
        let mut ws = node.ws(&u.token).await;
        let s = ws.sync_n(0, want.len()).await;
        assert_eq!(seqs_of(&s.messages), want, "inbox of {}", u.handle);
        ws.expect_no_frame_for(QUIET_MS).await;
    }
}

/// Sends `n` messages to `cid` a few ms apart without waiting, then collects the acks.
async fn chatter(node: &Node, token: String, cid: String, n: usize) {
    let mut ws = node.ws(&token).await;
    ws.sync(0).await;
    let mut cmids = Vec::with_capacity(n);
    for i in 0..n {
        cmids.push(ws.send_to_conv_nowait(&cid, &format!("chatter {i}")).await);
        tokio::time::sleep(std::time::Duration::from_millis(4)).await;
    }
    for cmid in cmids {
        ws.ack_for(&cmid).await;
    }
}

#[tokio::test]
async fn membership_churn_under_traffic_keeps_every_stay_whole() {
    let node = Node::start("sends_per_second = 1000").await;
    let a = node.user("gza").await;
    let b = node.user("gzb").await;
    let d = node.user("gzd").await;
    let (gid, cid) = new_group(&node, &a, "Churn", &[&b.id]).await;
    // a and b talk without pause while a adds and removes d, again and again.
    let talk = futures_util::future::join(
        chatter(&node, a.token.clone(), cid.clone(), 150),
        chatter(&node, b.token.clone(), cid.clone(), 150),
    );
    let churn = async {
        for _ in 0..25 {
            assert_eq!(add(&node, &a.token, &gid, &d.id).await.status, 200);
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            assert_eq!(remove(&node, &a.token, &gid, &d.id).await.status, 200);
        }
    };
    futures_util::future::join(talk, churn).await;

    // d is owed exactly its stays: from each `member_added` for it through the next
    // `member_removed`, whatever was said in between.
    let h = node.full_history(&a.token, &cid).await;
    assert_eq!(
        h.len(),
        1 + 300 + 50,
        "every send and change is stored once"
    );
    let mut owed = Vec::new();
    let mut inside = false;
    for m in &h {
        if m["kind"] == "system" {
            let ev = system_event(m);
            if ev["user_id"] == d.id.as_str() {
                inside = ev["event"] == "member_added";
                owed.push(u64_field(m, "seq"));
                continue;
            }
        }
        if inside {
            owed.push(u64_field(m, "seq"));
        }
    }
    let mut dw = node.ws(&d.token).await;
    let s = dw.sync_n(0, owed.len()).await;
    assert_eq!(
        seqs_of(&s.messages),
        owed,
        "d's inbox holds its stays, whole"
    );
    dw.expect_no_frame_for(QUIET_MS).await;
}
