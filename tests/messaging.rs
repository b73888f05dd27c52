//! Messaging over the WebSocket: live and offline delivery, multi-device
//! inbox order, resume, idempotent retries, direct conversation ids,
//! receipts and the conversation list.

mod common;

use std::collections::HashSet;

use common::*;
use serde_json::{json, Value};

/// Checks that `frame` is a `message` event carrying exactly what `ack` acknowledged.
#[track_caller]
fn assert_message_matches_ack(frame: &Value, ack: &Value, sender: &str, body: &str) {
    assert_eq!(frame["type"], "message", "not a message frame: {frame}");
    assert!(
        frame["inbox_seq"].as_u64().is_some_and(|s| s >= 1),
        "inbox_seq: {frame}"
    );
    let m = &frame["message"];
    assert_message_obj(m);
    assert_eq!(
        m["message_id"], ack["message_id"],
        "message_id: {frame} vs {ack}"
    );
    assert_eq!(
        m["conversation_id"], ack["conversation_id"],
        "conversation_id: {frame}"
    );
    assert_eq!(m["seq"], ack["seq"], "seq: {frame} vs {ack}");
    assert_eq!(m["ts"], ack["ts"], "ts: {frame} vs {ack}");
    assert_eq!(
        m["client_msg_id"], ack["client_msg_id"],
        "client_msg_id: {frame}"
    );
    assert_eq!(m["sender_id"].as_str(), Some(sender), "sender_id: {frame}");
    assert_eq!(m["kind"], "user", "kind: {frame}");
    assert_eq!(m["body"].as_str(), Some(body), "body: {frame}");
    assert_eq!(m["media"], json!([]), "media: {frame}");
}

fn inbox_seqs(frames: &[Value]) -> Vec<u64> {
    frames.iter().map(|f| u64_field(f, "inbox_seq")).collect()
}

fn message_ids(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .map(|f| str_field(&f["message"], "message_id").to_string())
        .collect()
}

#[tokio::test]
async fn live_delivery_to_recipient_and_all_sender_devices() {
    let node = Node::start("").await;
    let a = node.user("la").await;
    let b = node.user("lb").await;
    let mut a1 = node.ws(&a.token).await;
    let mut a2 = node.ws(&a.token).await;
    let mut bw = node.ws(&b.token).await;
    for ws in [&mut a1, &mut a2, &mut bw] {
        let s = ws.sync(0).await;
        assert!(s.messages.is_empty(), "fresh inbox: {:?}", s.messages);
        assert_eq!(s.inbox_seq, 0, "fresh inbox head");
    }
    a1.ping_pong().await;

    let cmid = a1.send_to_user_nowait(&b.id, "hello bob").await;
    let ack = a1.ack_for(&cmid).await;
    assert_ack_shape(&ack, &cmid);
    assert_eq!(ack["seq"], 1, "first message of a conversation: {ack}");
    let ts = u64_field(&ack, "ts");
    assert!(
        ts > now_ms() - 3_600_000 && ts < now_ms() + 3_600_000,
        "ts is epoch ms: {ts}"
    );

    let got_b = bw.recv_type("message").await;
    assert_message_matches_ack(&got_b, &ack, &a.id, "hello bob");
    assert_eq!(got_b["inbox_seq"], 1);

    // The sender's inbox holds its own message, on every device.
    let got_a1 = a1.recv_type("message").await;
    assert_message_matches_ack(&got_a1, &ack, &a.id, "hello bob");
    assert_eq!(got_a1["inbox_seq"], 1);
    let got_a2 = a2.recv_type("message").await;
    assert_message_matches_ack(&got_a2, &ack, &a.id, "hello bob");
    assert_eq!(got_a2["inbox_seq"], 1);

    // Reply, live, the other way.
    let back = bw.send_to_user(&a.id, "hi alice").await;
    assert_eq!(back["conversation_id"], ack["conversation_id"]);
    assert_eq!(back["seq"], 2);
    for ws in [&mut a1, &mut a2] {
        let f = ws.recv_type("message").await;
        assert_message_matches_ack(&f, &back, &b.id, "hi alice");
        assert_eq!(f["inbox_seq"], 2);
    }
    let own = bw.recv_type("message").await;
    assert_message_matches_ack(&own, &back, &b.id, "hi alice");
    assert_eq!(own["inbox_seq"], 2);

    // No duplicates anywhere.
    for ws in [&mut a1, &mut a2, &mut bw] {
        ws.expect_no_frame_for(QUIET_MS).await;
    }
}

#[tokio::test]
async fn offline_delivery_and_resume_from_cursor() {
    let node = Node::start("").await;
    let a = node.user("oa").await;
    let b = node.user("ob").await;
    let mut aw = node.ws(&a.token).await; // never syncs: only acks come back
    let mut acks = Vec::new();
    for i in 0..3 {
        acks.push(aw.send_to_user(&b.id, &format!("offline {i}")).await);
    }

    // b connects later and syncs from the beginning.
    let mut b1 = node.ws(&b.token).await;
    let s = b1.sync_n(0, 3).await;
    assert_eq!(
        inbox_seqs(&s.messages),
        vec![1, 2, 3],
        "offline sync: {:?}",
        s.messages
    );
    for (i, (f, ack)) in s.messages.iter().zip(&acks).enumerate() {
        assert_message_matches_ack(f, ack, &a.id, &format!("offline {i}"));
    }

    // Two more live.
    for i in 3..5 {
        let ack = aw.send_to_user(&b.id, &format!("live {i}")).await;
        let f = b1.recv_type("message").await;
        assert_message_matches_ack(&f, &ack, &a.id, &format!("live {i}"));
        assert_eq!(f["inbox_seq"], (i + 1) as u64);
        acks.push(ack);
    }
    b1.expect_no_frame_for(QUIET_MS).await;
    b1.close().await;

    // Two more while offline again.
    for i in 5..7 {
        acks.push(aw.send_to_user(&b.id, &format!("offline {i}")).await);
    }

    // Resume from cursor 5: only 6 and 7.
    let mut b2 = node.ws(&b.token).await;
    let s = b2.sync_n(5, 2).await;
    assert_eq!(
        inbox_seqs(&s.messages),
        vec![6, 7],
        "resume after 5: {:?}",
        s.messages
    );
    assert_message_matches_ack(&s.messages[0], &acks[5], &a.id, "offline 5");
    assert_message_matches_ack(&s.messages[1], &acks[6], &a.id, "offline 6");
    b2.expect_no_frame_for(QUIET_MS).await;

    // Another cursor on another device (b2 has seen 7 live, so the inbox
    // holds it: the whole rest is replayed).
    let mut b3 = node.ws(&b.token).await;
    let s = b3.sync(3).await;
    assert_eq!(inbox_seqs(&s.messages), vec![4, 5, 6, 7]);
    assert_eq!(s.inbox_seq, 7);

    // A cursor beyond the head replays nothing; synced is the head.
    let mut b4 = node.ws(&b.token).await;
    let s = b4.sync(1000).await;
    assert!(
        s.messages.is_empty(),
        "cursor beyond head: {:?}",
        s.messages
    );
    assert_eq!(s.inbox_seq, 7);

    // Live events continue after the head on every synced device.
    let ack = aw.send_to_user(&b.id, "after resume").await;
    for ws in [&mut b2, &mut b3, &mut b4] {
        let f = ws.recv_type("message").await;
        assert_message_matches_ack(&f, &ack, &a.id, "after resume");
        assert_eq!(f["inbox_seq"], 8);
        ws.expect_no_frame_for(QUIET_MS).await;
    }
}

#[tokio::test]
async fn two_devices_see_one_gap_free_order_with_concurrent_senders() {
    const PER_SENDER: usize = 40;
    let node = Node::start("").await;
    let a = node.user("ca").await;
    let c = node.user("cc").await;
    let b = node.user("cb").await;
    let mut d1 = node.ws(&b.token).await;
    let mut d2 = node.ws(&b.token).await;
    d1.sync(0).await;
    d2.sync(0).await;

    let mut tasks = Vec::new();
    for sender in [&a, &c] {
        let mut ws = node.ws(&sender.token).await;
        let to = b.id.clone();
        tasks.push(tokio::spawn(async move {
            let mut cmids = Vec::new();
            for i in 0..PER_SENDER {
                cmids.push(ws.send_to_user_nowait(&to, &format!("m{i}")).await);
            }
            let mut acks = Vec::new();
            for cmid in &cmids {
                acks.push(ws.ack_for(cmid).await);
            }
            acks
        }));
    }
    let mut acked: HashSet<String> = HashSet::new();
    for t in tasks {
        let acks = t.await.expect("sender task");
        let seqs: Vec<u64> = acks.iter().map(|a| u64_field(a, "seq")).collect();
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (1..=PER_SENDER as u64).collect::<Vec<_>>(),
            "per-conversation seqs"
        );
        for ack in acks {
            acked.insert(str_field(&ack, "message_id").to_string());
        }
    }
    assert_eq!(acked.len(), 2 * PER_SENDER);

    let total = 2 * PER_SENDER;
    let f1 = d1.recv_messages(total).await;
    let f2 = d2.recv_messages(total).await;
    let want: Vec<u64> = (1..=total as u64).collect();
    assert_eq!(inbox_seqs(&f1), want, "device 1 inbox_seq order");
    assert_eq!(inbox_seqs(&f2), want, "device 2 inbox_seq order");
    let ids1 = message_ids(&f1);
    assert_eq!(ids1, message_ids(&f2), "both devices see the same order");
    let set: HashSet<String> = ids1.iter().cloned().collect();
    assert_eq!(set.len(), total, "no repeats");
    assert_eq!(set, acked, "exactly the acked messages");
    d1.expect_no_frame_for(QUIET_MS).await;
    d2.expect_no_frame_for(QUIET_MS).await;

    // A third device syncing from 0 sees the same log.
    let mut d3 = node.ws(&b.token).await;
    let s = d3.sync(0).await;
    assert_eq!(inbox_seqs(&s.messages), want);
    assert_eq!(message_ids(&s.messages), ids1, "same inbox on a new device");
    assert_eq!(s.inbox_seq, total as u64);
}

#[tokio::test]
async fn retry_with_same_client_msg_id_is_idempotent() {
    let node = Node::start("").await;
    let a = node.user("ra").await;
    let b = node.user("rb").await;
    let mut aw = node.ws(&a.token).await;
    let mut bw = node.ws(&b.token).await;
    aw.sync(0).await;
    bw.sync(0).await;

    let cmid = new_uuid();
    let frame = json!({"type":"send","client_msg_id":cmid,"to_user":b.id,"body":"once"});
    aw.send_json(&frame).await;
    let ack1 = aw.ack_for(&cmid).await;
    assert_ack_shape(&ack1, &cmid);
    aw.send_json(&frame).await;
    let ack2 = aw.ack_for(&cmid).await;
    assert_eq!(ack1, ack2, "a retry must return the identical ack");

    // A retry from a new connection (the usual case after a drop).
    let mut aw2 = node.ws(&a.token).await;
    aw2.send_json(&frame).await;
    let ack3 = aw2.ack_for(&cmid).await;
    assert_eq!(
        ack1, ack3,
        "a retry on a new connection returns the identical ack"
    );

    let f = bw.recv_type("message").await;
    assert_message_matches_ack(&f, &ack1, &a.id, "once");
    bw.expect_no_frame_for(QUIET_MS).await;
    let own = aw.recv_type("message").await;
    assert_message_matches_ack(&own, &ack1, &a.id, "once");
    aw.expect_no_frame_for(QUIET_MS).await;

    let cid = str_field(&ack1, "conversation_id");
    let h = node.history(&a.token, cid, "").await;
    assert_eq!(h.len(), 1, "stored once: {h:?}");
    assert_eq!(h[0]["message_id"], ack1["message_id"]);

    // The next message gets the next seq.
    let next = aw.send_to_user(&b.id, "twice").await;
    assert_eq!(next["seq"], 2);
}

#[tokio::test]
async fn direct_conversation_ids_and_send_by_conversation_id() {
    let node = Node::start("").await;
    let a = node.user("da").await;
    let b = node.user("db").await;
    let mut aw = node.ws(&a.token).await;
    let mut bw = node.ws(&b.token).await;
    aw.sync(0).await;
    bw.sync(0).await;

    let ack_ab = aw.send_to_user(&b.id, "a to b").await;
    let ack_ba = bw.send_to_user(&a.id, "b to a").await;
    assert_eq!(
        ack_ab["conversation_id"], ack_ba["conversation_id"],
        "the direct conversation id is the same from both sides"
    );
    assert_eq!(ack_ab["seq"], 1);
    assert_eq!(ack_ba["seq"], 2);
    let cid = str_field(&ack_ab, "conversation_id").to_string();

    let ack3 = bw.send_to_conv(&cid, "by cid").await;
    assert_eq!(ack3["conversation_id"].as_str(), Some(cid.as_str()));
    assert_eq!(ack3["seq"], 3);
    let frames = aw.recv_messages(3).await;
    assert_eq!(inbox_seqs(&frames), vec![1, 2, 3]);
    assert_message_matches_ack(&frames[2], &ack3, &b.id, "by cid");

    // Notes to self: its own conversation, delivered once.
    let own = aw.send_to_user(&a.id, "note to self").await;
    assert_ne!(own["conversation_id"].as_str(), Some(cid.as_str()));
    assert_eq!(own["seq"], 1);
    let f = aw.recv_type("message").await;
    assert_message_matches_ack(&f, &own, &a.id, "note to self");
    assert_eq!(f["inbox_seq"], 4);
    aw.expect_no_frame_for(QUIET_MS).await;

    let r = node.get("/conversations", Some(&a.token)).await;
    assert_eq!(r.status, 200, "GET /conversations: {}", r.text);
    let list = r.body.as_array().expect("array").clone();
    assert_eq!(list.len(), 2, "two conversations: {list:?}");
    let self_conv = list
        .iter()
        .find(|c| c["conversation_id"] == own["conversation_id"])
        .expect("notes-to-self conversation listed");
    assert_eq!(self_conv["kind"], "direct");
    assert_eq!(
        self_conv["peer_id"].as_str(),
        Some(a.id.as_str()),
        "peer_id for self"
    );
    assert_eq!(self_conv["last_seq"], 1);
}

#[tokio::test]
async fn receipts_and_conversation_list() {
    let node = Node::start("").await;
    let a = node.user("wa").await;
    let b = node.user("wb").await;
    let stranger = node.user("ws").await;
    let mut aw = node.ws(&a.token).await;
    let mut bw = node.ws(&b.token).await;
    aw.sync(0).await;
    bw.sync(0).await;
    let mut cid = String::new();
    for i in 0..3 {
        let ack = aw.send_to_user(&b.id, &format!("r{i}")).await;
        cid = str_field(&ack, "conversation_id").to_string();
    }
    aw.recv_messages(3).await; // a's own copies
    bw.recv_messages(3).await;
    aw.expect_no_frame_for(QUIET_MS).await;

    let receipt = |r: &Value, status: &str, seq: u64| {
        assert_eq!(r["type"], "receipt", "{r}");
        assert_eq!(r["conversation_id"].as_str(), Some(cid.as_str()), "{r}");
        assert_eq!(r["user_id"].as_str(), Some(b.id.as_str()), "{r}");
        assert_eq!(r["status"].as_str(), Some(status), "{r}");
        assert_eq!(r["seq"].as_u64(), Some(seq), "{r}");
    };

    bw.send_json(&json!({"type":"delivered","conversation_id":cid,"seq":3}))
        .await;
    let r = aw.recv_type("receipt").await;
    receipt(&r, "delivered", 3);
    bw.send_json(&json!({"type":"read","conversation_id":cid,"seq":2}))
        .await;
    let r = aw.recv_type("receipt").await;
    receipt(&r, "read", 2);

    // Lower or equal values are ignored: no event.
    bw.send_json(&json!({"type":"delivered","conversation_id":cid,"seq":1}))
        .await;
    bw.send_json(&json!({"type":"read","conversation_id":cid,"seq":2}))
        .await;
    bw.send_json(&json!({"type":"delivered","conversation_id":cid,"seq":3}))
        .await;
    aw.expect_no_frame_for(QUIET_MS).await;

    // Above the last seq: clamped to it.
    bw.send_json(&json!({"type":"read","conversation_id":cid,"seq":100}))
        .await;
    let r = aw.recv_type("receipt").await;
    receipt(&r, "read", 3); // clamped to the last seq
    aw.expect_no_frame_for(QUIET_MS).await;

    // A stranger's watermarks touch nothing.
    let mut sw = node.ws(&stranger.token).await;
    sw.sync(0).await;
    sw.send_json(&json!({"type":"delivered","conversation_id":cid,"seq":3}))
        .await;
    sw.send_json(&json!({"type":"read","conversation_id":cid,"seq":3}))
        .await;
    sw.ping_pong().await;
    for f in sw.pending.drain(..) {
        assert_eq!(f["type"], "error", "stranger watermark answer: {f}");
        assert!(
            f["code"].is_string() && f["message"].is_string(),
            "error shape: {f}"
        );
    }
    aw.expect_no_frame_for(QUIET_MS).await;

    // Receipts endpoint: one entry per member.
    let r = node
        .get(&format!("/conversations/{cid}/receipts"), Some(&a.token))
        .await;
    assert_eq!(r.status, 200, "GET receipts: {}", r.text);
    let entries = r.body.as_array().expect("receipts array").clone();
    assert_eq!(entries.len(), 2, "one entry per member: {}", r.text);
    for (user, d, rd) in [(&b.id, 3, 3), (&a.id, 0, 0)] {
        let e = entries
            .iter()
            .find(|e| e["user_id"].as_str() == Some(user.as_str()))
            .unwrap_or_else(|| panic!("no receipts entry for {user}: {}", r.text));
        assert_eq!(e["delivered_seq"].as_u64(), Some(d), "delivered_seq: {e}");
        assert_eq!(e["read_seq"].as_u64(), Some(rd), "read_seq: {e}");
    }
    let r = node
        .get(
            &format!("/conversations/{cid}/receipts"),
            Some(&stranger.token),
        )
        .await;
    assert_http_error(&r, 403, "not_member", "stranger reads receipts");

    // Conversation lists.
    let r = node.get("/conversations", Some(&b.token)).await;
    assert_eq!(r.status, 200, "GET /conversations: {}", r.text);
    let list = r.body.as_array().expect("array");
    assert_eq!(list.len(), 1, "{}", r.text);
    let c = &list[0];
    assert_eq!(c["conversation_id"].as_str(), Some(cid.as_str()));
    assert_eq!(c["kind"], "direct");
    assert_eq!(c["peer_id"].as_str(), Some(a.id.as_str()));
    assert_eq!(c["last_seq"], 3);
    assert_eq!(c["delivered_seq"], 3);
    assert_eq!(c["read_seq"], 3);

    let r = node.get("/conversations", Some(&a.token)).await;
    let list = r.body.as_array().expect("array");
    assert_eq!(list.len(), 1, "{}", r.text);
    let c = &list[0];
    assert_eq!(c["conversation_id"].as_str(), Some(cid.as_str()));
    assert_eq!(c["kind"], "direct");
    assert_eq!(c["peer_id"].as_str(), Some(b.id.as_str()));
    assert_eq!(c["last_seq"], 3);
    assert_eq!(c["delivered_seq"], 0);
    assert_eq!(c["read_seq"], 0);

    let r = node.get("/conversations", Some(&stranger.token)).await;
    assert_eq!(
        r.body,
        json!([]),
        "stranger has no conversations: {}",
        r.text
    );
}
