//! Push notifications: a local webhook receives signed batches for offline users; a
//! dead webhook never holds up acks.

mod common;

use std::time::Duration;

use common::*;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// A minimal HTTP/1.1 receiver: forwards (signature header, body) of every request and
/// answers 200. Handles keep-alive connections.
async fn webhook() -> (u16, mpsc::UnboundedReceiver<(Option<String>, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(sock);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let (mut len, mut sig) = (0usize, None);
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            match k.to_ascii_lowercase().as_str() {
                                "content-length" => len = v.trim().parse().unwrap_or(0),
                                "x-switchboard-signature" => sig = Some(v.trim().to_string()),
                                _ => {}
                            }
                        }
                    }
                    let mut body = vec![0; len];
                    if reader.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let _ = tx.send((sig, body));
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                    if reader.get_mut().write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, rx)
}

#[tokio::test]
async fn offline_users_get_signed_notifications_without_bodies() {
    let (port, mut hooks) = webhook().await;
    let node = Node::start(&format!(
        "sends_per_second = 1000\n\n[push]\nwebhook_url = \"http://127.0.0.1:{port}/push\"\nsecret = \"s3cret\""
    ))
    .await;
    let a = node.user("psa").await;
    let b = node.user("psb").await;
    // b has a connection that never syncs: it receives nothing, so b still gets pushes.
    let _b_unsynced = node.ws(&b.token).await;
    let mut aw = node.ws(&a.token).await;
    aw.sync(0).await;
    let mut acks = Vec::new();
    for i in 0..5 {
        acks.push(aw.send_to_user(&b.id, &format!("secret body {i}")).await);
    }

    let mut got: Vec<Value> = Vec::new();
    while got.len() < 5 {
        let (sig, body) = tokio::time::timeout(Duration::from_secs(20), hooks.recv())
            .await
            .expect("notifications within the bound")
            .expect("receiver alive");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").expect("key");
        mac.update(&body);
        assert_eq!(
            sig,
            Some(hex::encode(mac.finalize().into_bytes())),
            "signature"
        );
        let text = String::from_utf8(body).expect("utf-8");
        assert!(
            !text.contains("secret body"),
            "no message body in a notification: {text}"
        );
        let v: Value = serde_json::from_str(&text).expect("json");
        got.extend(
            v["notifications"]
                .as_array()
                .expect("notifications array")
                .iter()
                .cloned(),
        );
    }
    assert_eq!(
        got.len(),
        5,
        "one notification per message, none for the online sender: {got:?}"
    );
    for (n, ack) in got.iter().zip(&acks) {
        assert_eq!(n["user_id"], b.id.as_str());
        assert_eq!(n["sender_id"], a.id.as_str());
        assert_eq!(n["conversation_id"], ack["conversation_id"]);
        assert_eq!(n["seq"], ack["seq"]);
        assert_eq!(n["message_id"], ack["message_id"]);
        assert!(n["inbox_seq"].is_u64() && n["ts"].is_i64(), "{n}");
    }

    // Once b is online, nothing more is pushed for it.
    let mut bw = node.ws(&b.token).await;
    bw.sync_n(0, 5).await;
    aw.send_to_user(&b.id, "online now").await;
    bw.recv_type("message").await;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), hooks.recv())
            .await
            .is_err(),
        "no notification for a user with a live session"
    );
}

#[tokio::test]
async fn a_dead_webhook_never_holds_up_acks() {
    // A port nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let node = Node::start(&format!(
        "sends_per_second = 1000\n\n[push]\nwebhook_url = \"http://127.0.0.1:{port}/push\""
    ))
    .await;
    let a = node.user("pda").await;
    let b = node.user("pdb").await;
    let mut aw = node.ws(&a.token).await;
    aw.sync(0).await;
    for i in 0..50 {
        let ack = aw.send_to_user(&b.id, &format!("m{i}")).await;
        assert_eq!(ack["seq"], i + 1);
    }
    // The failed deliveries are counted once retries run out.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = node.get_root("/metrics").await;
        let failed: f64 = m
            .text
            .lines()
            .find_map(|l| l.strip_prefix("switchboard_push_failed_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
        if failed >= 1.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "push failures never counted:\n{}",
            m.text
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
