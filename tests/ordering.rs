//! Regressions for ordering and flow control on one connection.

mod common;

use common::*;
use serde_json::json;

/// A burst of sends to a peer this connection has never written to is stored in the
/// order it was sent (the peer check must not let later sends overtake earlier ones).
#[tokio::test]
async fn burst_to_a_new_peer_keeps_send_order() {
    let node = Node::start("sends_per_second = 100000").await;
    for round in 0..5 {
        let a = node.user("ora").await;
        let b = node.user("orb").await;
        let mut aw = node.ws(&a.token).await;
        let mut cmids = Vec::new();
        for i in 0..60 {
            cmids.push(
                aw.send_to_user_nowait(&b.id, &format!("r{round} m{i}"))
                    .await,
            );
        }
        let mut seqs = Vec::new();
        for c in &cmids {
            seqs.push(u64_field(&aw.ack_for(c).await, "seq"));
        }
        assert_eq!(
            seqs,
            (1..=60).collect::<Vec<u64>>(),
            "round {round}: seq follows send order"
        );
    }
}

/// Replaying a page of large messages is paced by the socket, not cut off as a slow
/// reader: the client gets every message and then `synced`.
#[tokio::test]
async fn replay_of_large_messages_is_not_cut_off() {
    let node = Node::start("sends_per_second = 100000").await;
    let a = node.user("rla").await;
    let b = node.user("rlb").await;
    let mut aw = node.ws(&a.token).await;
    // U+0001 escapes to six bytes of JSON: 60 KiB bodies become 360 KiB frames.
    let body = "\u{1}".repeat(60 * 1024);
    let mut cmids = Vec::new();
    for _ in 0..40 {
        cmids.push(aw.send_to_user_nowait(&b.id, &body).await);
    }
    for c in &cmids {
        aw.ack_for(c).await;
    }
    let mut bw = node.ws(&b.token).await;
    let synced = bw.sync_n(0, 40).await;
    assert_eq!(synced.messages.len(), 40);
    // The connection is still usable afterwards.
    bw.send_json(&json!({"type": "ping"})).await;
    assert_eq!(bw.recv_type("pong").await["type"], "pong");
}
