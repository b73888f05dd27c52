//! Hostile and broken clients: bad frames, limits, rate limiting, slow
//! readers, vanishing clients and silent clients (heartbeat).

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

/// Sends `frame` and expects the next frame to be an error with `code`,
/// echoing `cmid` when given; the connection must stay open.
async fn expect_error(ws: &mut Ws, frame: &str, code: &str, cmid: Option<&str>) {
    ws.send_text(frame.to_string()).await;
    let v = ws.recv().await;
    assert_error_frame(&v, code, frame);
    if let Some(c) = cmid {
        assert_eq!(
            v["client_msg_id"].as_str(),
            Some(c),
            "error about a send must echo client_msg_id; frame {frame}, got {v}"
        );
    }
    ws.ping_pong().await;
}

#[tokio::test]
async fn bad_frames_get_error_frames_and_store_nothing() {
    let node = Node::start("max_message_bytes = 1024\nmax_frame_bytes = 4096").await;
    let a = node.user("ba").await;
    let b = node.user("bb").await;
    let c = node.user("bc").await;
    let mut aw = node.ws(&a.token).await;
    let first = aw.send_to_user(&b.id, "setup").await;
    let cid = str_field(&first, "conversation_id").to_string();

    expect_error(&mut aw, "{not json", "bad_request", None).await;
    expect_error(&mut aw, "", "bad_request", None).await;
    expect_error(&mut aw, r#"{"type":"frobnicate"}"#, "unknown_type", None).await;

    let x = new_uuid();
    let cases: Vec<(Value, &str)> = vec![
        // missing body
        (
            json!({"type":"send","client_msg_id":x,"to_user":b.id}),
            "bad_request",
        ),
        // neither target
        (
            json!({"type":"send","client_msg_id":x,"body":"hi"}),
            "bad_request",
        ),
        // both targets
        (
            json!({"type":"send","client_msg_id":x,"to_user":b.id,"conversation_id":cid,"body":"hi"}),
            "bad_request",
        ),
        // wrongly typed body
        (
            json!({"type":"send","client_msg_id":x,"to_user":b.id,"body":42}),
            "bad_request",
        ),
        // non-UUID ids
        (
            json!({"type":"send","client_msg_id":x,"to_user":"bob","body":"hi"}),
            "bad_request",
        ),
        (
            json!({"type":"send","client_msg_id":x,"conversation_id":"42","body":"hi"}),
            "bad_request",
        ),
        // unknown targets
        (
            json!({"type":"send","client_msg_id":x,"to_user":new_uuid(),"body":"hi"}),
            "unknown_user",
        ),
        (
            json!({"type":"send","client_msg_id":x,"conversation_id":new_uuid(),"body":"hi"}),
            "unknown_conversation",
        ),
        // body over max_message_bytes, counted in UTF-8 bytes (513 chars, 1026 bytes)
        (
            json!({"type":"send","client_msg_id":x,"to_user":b.id,"body":"é".repeat(513)}),
            "too_large",
        ),
    ];
    for (frame, code) in &cases {
        expect_error(&mut aw, &frame.to_string(), code, Some(&x)).await;
    }
    // No client_msg_id at all, or not a UUID.
    expect_error(
        &mut aw,
        &json!({"type":"send","to_user":b.id,"body":"hi"}).to_string(),
        "bad_request",
        None,
    )
    .await;
    expect_error(
        &mut aw,
        &json!({"type":"send","client_msg_id":"nope","to_user":b.id,"body":"hi"}).to_string(),
        "bad_request",
        None,
    )
    .await;
    expect_error(
        &mut aw,
        &json!({"type":"delivered","conversation_id":"nope","seq":1}).to_string(),
        "bad_request",
        None,
    )
    .await;

    // A binary frame.
    aw.send_binary(b"{\"type\":\"ping\"}".to_vec()).await;
    let v = aw.recv().await;
    assert_error_frame(&v, "bad_request", "binary frame");
    aw.ping_pong().await;

    // Exactly max_message_bytes (512 x 2-byte chars) is fine.
    let ok = aw.send_to_user(&b.id, &"é".repeat(512)).await;
    assert_eq!(ok["seq"], 2, "only the valid sends got seqs: {ok}");

    // The failed cmid was never stored: using it now stores a new message.
    aw.send_json(&json!({"type":"send","client_msg_id":x,"to_user":b.id,"body":"late"}))
        .await;
    let late = aw.ack_for(&x).await;
    assert_eq!(late["seq"], 3, "{late}");

    // Second sync on one connection.
    aw.sync_n(0, 3).await;
    expect_error(&mut aw, r#"{"type":"sync","after":0}"#, "bad_request", None).await;

    // A non-member posting to the conversation.
    let mut cw = node.ws(&c.token).await;
    let y = new_uuid();
    expect_error(
        &mut cw,
        &json!({"type":"send","client_msg_id":y,"conversation_id":cid,"body":"intruder"})
            .to_string(),
        "not_member",
        Some(&y),
    )
    .await;

    // Nothing else was stored anywhere.
    let h = node.full_history(&a.token, &cid).await;
    let big = "é".repeat(512);
    let bodies: Vec<&str> = h.iter().map(|m| str_field(m, "body")).collect();
    assert_eq!(bodies, vec!["setup", big.as_str(), "late"], "history");
    let convs = node.get("/conversations", Some(&a.token)).await;
    assert_eq!(
        convs.body.as_array().map(|l| l.len()),
        Some(1),
        "a's conversations: {}",
        convs.text
    );
    let convs = node.get("/conversations", Some(&c.token)).await;
    assert_eq!(convs.body, json!([]), "c's conversations: {}", convs.text);
    let mut bw = node.ws(&b.token).await;
    let s = bw.sync_n(0, 3).await;
    let ids: Vec<&Value> = s
        .messages
        .iter()
        .map(|f| &f["message"]["message_id"])
        .collect();
    let hist_ids: Vec<&Value> = h.iter().map(|m| &m["message_id"]).collect();
    assert_eq!(ids, hist_ids, "b's inbox holds exactly the stored messages");
    bw.expect_no_frame_for(QUIET_MS).await;
}

#[tokio::test]
async fn text_frame_that_is_not_utf8_closes_with_1007() {
    let node = Node::start("").await;
    let a = node.user("u8a").await;
    let mut aw = node.ws(&a.token).await;
    aw.sync(0).await;
    // FIN + text, masked, 2 bytes (mask 0): 0xFF 0xFE is never UTF-8.
    let frame = [0x81, 0x82, 0, 0, 0, 0, 0xFF, 0xFE];
    aw.tcp().write_all(&frame).await.expect("write");
    let (code, _) = aw.expect_close(Duration::from_secs(10)).await;
    assert_eq!(
        code,
        Some(1007),
        "close code (transport: {:?})",
        aw.end_error
    );
    node.ws(&a.token).await.ping_pong().await;
}

#[tokio::test]
async fn frame_over_max_frame_bytes_closes_with_1009() {
    let node = Node::start("max_message_bytes = 1024\nmax_frame_bytes = 4096").await;
    let a = node.user("fa").await;
    let b = node.user("fb").await;
    let mut aw = node.ws(&a.token).await;
    aw.sync(0).await;
    let frame =
        json!({"type":"send","client_msg_id":new_uuid(),"to_user":b.id,"body":"x".repeat(5000)});
    // The server may close while we are still writing; a failed write is fine.
    let _ = aw.try_send_text(frame.to_string()).await;
    let (code, _) = aw.expect_close(Duration::from_secs(10)).await;
    assert_eq!(
        code,
        Some(1009),
        "close code for an oversized frame (transport error: {:?})",
        aw.end_error
    );

    // Nothing stored, and the node still serves.
    let mut bw = node.ws(&b.token).await;
    let s = bw.sync(0).await;
    assert!(s.messages.is_empty(), "nothing stored: {:?}", s.messages);
    bw.expect_no_frame_for(QUIET_MS).await;
    let mut aw2 = node.ws(&a.token).await;
    aw2.ping_pong().await;
    let ack = aw2.send_to_user(&b.id, "still works").await;
    assert_eq!(ack["seq"], 1);
}

#[tokio::test]
async fn http_limits_and_routes() {
    let node = Node::start("max_message_bytes = 1024\nmax_frame_bytes = 4096").await;
    let h = unique_handle("big");
    let r = node
        .post(
            "/users",
            None,
            &json!({"handle": h, "password": "password123", "display_name": "d".repeat(5000)}),
        )
        .await;
    assert_http_error(&r, 413, "too_large", "POST /users over max_frame_bytes");
    let r = node
        .post(
            "/sessions",
            None,
            &json!({"handle": h, "password": "p".repeat(5000)}),
        )
        .await;
    assert_http_error(&r, 413, "too_large", "POST /sessions over max_frame_bytes");
    let u = node.user("lim").await;
    let r = node
        .get(&format!("/users?handle={h}"), Some(&u.token))
        .await;
    assert_http_error(
        &r,
        404,
        "unknown_user",
        "oversized registration stored nothing",
    );

    let r = node.get("/no/such/route", Some(&u.token)).await;
    assert_http_error(&r, 404, "not_found", "unknown route");
    let r = node
        .call(
            reqwest::Method::PATCH,
            "/sessions/current",
            Some(&u.token),
            None,
        )
        .await;
    assert_http_error(&r, 405, "method_not_allowed", "PATCH /sessions/current");
    assert_eq!(node.healthz().await, 200);
}

#[tokio::test]
async fn rate_limit_rejects_excess_sends_and_stores_only_acked() {
    const BURST: usize = 30;
    let node = Node::start("sends_per_second = 5").await;
    let a = node.user("rla").await;
    let b = node.user("rlb").await;
    let mut aw = node.ws(&a.token).await;
    let mut cmids = Vec::new();
    for i in 0..BURST {
        cmids.push(aw.send_to_user_nowait(&b.id, &format!("burst {i}")).await);
    }
    let mut acked: Vec<Value> = Vec::new();
    let mut limited = 0;
    for c in &cmids {
        let v = aw.reply_for(c).await;
        if v["type"] == "ack" {
            assert_ack_shape(&v, c);
            acked.push(v);
        } else {
            assert_error_frame(&v, "rate_limited", "burst send");
            limited += 1;
        }
    }
    assert_eq!(acked.len() + limited, BURST, "one answer per send");
    assert!(limited > 0, "a burst of {BURST} at 5/s must hit the limit");
    assert!(!acked.is_empty(), "the bucket starts full; some sends pass");
    aw.expect_no_frame_for(QUIET_MS).await;
    aw.ping_pong().await;

    let cid = str_field(&acked[0], "conversation_id").to_string();
    let hist = node.full_history(&a.token, &cid).await;
    let stored: HashSet<(String, String)> = hist
        .iter()
        .map(|m| {
            (
                str_field(m, "message_id").to_string(),
                str_field(m, "client_msg_id").to_string(),
            )
        })
        .collect();
    let want: HashSet<(String, String)> = acked
        .iter()
        .map(|m| {
            (
                str_field(m, "message_id").to_string(),
                str_field(m, "client_msg_id").to_string(),
            )
        })
        .collect();
    assert_eq!(hist.len(), acked.len(), "only acked sends are stored");
    assert_eq!(stored, want, "history = acked messages");
    let seqs: Vec<u64> = hist.iter().map(|m| u64_field(m, "seq")).collect();
    assert_eq!(
        seqs,
        (1..=acked.len() as u64).collect::<Vec<_>>(),
        "gap-free seqs"
    );
}

#[tokio::test]
async fn slow_reader_is_disconnected_and_can_resume() {
    const BODY_BYTES: usize = 16 * 1024;
    const BATCH: usize = 25;
    const MAX_MESSAGES: usize = 2500; // ~40 MB: far beyond socket buffers
                                      // The heartbeat timeout is long so that only the slow-consumer rule can
                                      // drop the reader during this test.
    let node = Node::start(
        "sends_per_second = 100000\nheartbeat_interval_ms = 1000\nheartbeat_timeout_ms = 600000",
    )
    .await;
    let a = node.user("sra").await;
    let b = node.user("srb").await;
    let mut bw = node.ws_small_rcvbuf(&b.token, 4096).await;
    bw.sync(0).await;
    // From here on b never reads.

    let mut aw = node.ws(&a.token).await;
    let body = "x".repeat(BODY_BYTES);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut sent = 0;
    let mut dropped = false;
    while sent < MAX_MESSAGES && Instant::now() < deadline {
        let mut cmids = Vec::new();
        for _ in 0..BATCH {
            cmids.push(aw.send_to_user_nowait(&b.id, &body).await);
        }
        for c in &cmids {
            aw.ack_for(c).await;
        }
        sent += BATCH;
        if node.user_obj(&a.token, &b.id).await["online"] == false {
            dropped = true;
            break;
        }
    }
    if !dropped {
        let (u, ok) = node
            .poll_user(&a.token, &b.id, Duration::from_secs(30), |u| {
                u["online"] == false
            })
            .await;
        assert!(
            ok,
            "a client that never reads was not disconnected after {sent} messages of {BODY_BYTES} bytes: {u}"
        );
    }

    // b's socket ends (after whatever was already buffered).
    let (code, read) = bw.expect_close(Duration::from_secs(30)).await;
    eprintln!(
        "slow reader: dropped after {sent} sends; it had read {read} frames; close code {code:?}"
    );
    if let Some(code) = code {
        assert_eq!(code, 1013, "close code for a slow reader");
    }

    // Reconnect and sync from the start: every acked message, gap-free.
    let mut b2 = node.ws(&b.token).await;
    let s = b2.sync_n(0, sent).await;
    let seqs: Vec<u64> = s
        .messages
        .iter()
        .map(|f| u64_field(f, "inbox_seq"))
        .collect();
    assert_eq!(seqs, (1..=sent as u64).collect::<Vec<_>>(), "b's inbox");
    b2.expect_no_frame_for(QUIET_MS).await;
}

/// A WebSocket text frame header announcing 1000 masked bytes, plus 10 of them.
fn partial_frame() -> Vec<u8> {
    let mut f = vec![0x81, 0xFE, 0x03, 0xE8, 0x12, 0x34, 0x56, 0x78];
    f.extend_from_slice(b"{\"type\":\"s");
    f
}

#[tokio::test]
async fn clients_vanishing_mid_frame_do_not_disturb_others() {
    let node = Node::start("heartbeat_interval_ms = 200\nheartbeat_timeout_ms = 1000").await;
    let a = node.user("va").await;
    let b = node.user("vb").await;
    let c = node.user("vc").await;

    // c1 stalls mid-frame and stays connected; c2 writes half a frame and vanishes.
    let mut c1 = node.ws(&c.token).await;
    c1.sync(0).await;
    c1.tcp().write_all(&partial_frame()).await.expect("write");
    let mut c2 = node.ws(&c.token).await;
    c2.sync(0).await;
    c2.tcp().write_all(&partial_frame()).await.expect("write");
    drop(c2);
    // Half an HTTP upgrade request: one held, one dropped.
    let half_req = format!(
        "GET /api/v1/ws?token={} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n",
        c.token
    );
    let mut raw1 = tokio::net::TcpStream::connect(("127.0.0.1", node.port))
        .await
        .expect("connect");
    raw1.write_all(half_req.as_bytes()).await.expect("write");
    let mut raw2 = tokio::net::TcpStream::connect(("127.0.0.1", node.port))
        .await
        .expect("connect");
    raw2.write_all(half_req.as_bytes()).await.expect("write");
    drop(raw2);

    // Everyone else is served.
    assert_eq!(node.healthz().await, 200);
    let mut aw = node.ws(&a.token).await;
    let mut bw = node.ws(&b.token).await;
    aw.sync(0).await;
    bw.sync(0).await;
    let ack = aw.send_to_user(&b.id, "still here").await;
    let f = bw.recv_type("message").await;
    assert_eq!(f["message"]["message_id"], ack["message_id"]);
    let ack2 = aw.send_to_user(&c.id, "to c").await;
    assert_eq!(ack2["seq"], 1);

    drop(c1);
    drop(raw1);

    // c ends up offline with last_seen, and can come back.
    let (u, ok) = node
        .poll_user(&a.token, &c.id, Duration::from_secs(15), |u| {
            u["online"] == false && u["last_seen"].is_u64()
        })
        .await;
    assert!(ok, "vanished client should go offline with last_seen: {u}");
    let mut c3 = node.ws(&c.token).await;
    let s = c3.sync_n(0, 1).await;
    assert_eq!(s.messages[0]["message"]["message_id"], ack2["message_id"]);
    c3.ping_pong().await;
}

#[tokio::test]
async fn heartbeat_drops_a_silent_client() {
    let node = Node::start("heartbeat_interval_ms = 200\nheartbeat_timeout_ms = 1000").await;
    let a = node.user("hba").await;
    let watcher = node.user("hbw").await;
    let mut aw = node.ws(&a.token).await;
    aw.sync(0).await;

    // While it reads (and so answers pings), it is kept, well past the timeout.
    let (_, u) = tokio::join!(aw.expect_no_frame_for(3000), async {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        node.user_obj(&watcher.token, &a.id).await
    });
    assert_eq!(u["online"], true, "a responsive client stays online: {u}");
    assert!(u["last_seen"].is_null(), "no session ended yet: {u}");

    // Now it goes silent: dropped, offline, last_seen set.
    let (u, ok) = node
        .poll_user(&watcher.token, &a.id, Duration::from_secs(15), |u| {
            u["online"] == false && u["last_seen"].is_u64()
        })
        .await;
    assert!(
        ok,
        "a client that stopped answering pings should be dropped: {u}"
    );
    aw.expect_close(Duration::from_secs(10)).await;
}

/// A client that stops reading while the server writes to it freezes its session (the
/// socket is full, so the server stops polling it): it must still be dropped from
/// presence after the heartbeat timeout, not linger "online".
#[tokio::test]
async fn frozen_reader_goes_offline_after_the_timeout() {
    let node = Node::start("heartbeat_interval_ms = 200\nheartbeat_timeout_ms = 1000").await;
    let a = node.user("fza").await;
    let b = node.user("fzb").await;
    let mut bw = node.ws_small_rcvbuf(&b.token, 4096).await;
    bw.sync(0).await;
    // Pings whose pongs b never reads, until the server's writes back up and b's own
    // writes stall.
    let ping = json!({"type": "ping"}).to_string();
    for _ in 0..400_000 {
        let sent = tokio::time::timeout(
            std::time::Duration::from_millis(500),
            bw.try_send_text(ping.clone()),
        )
        .await;
        if !matches!(sent, Ok(true)) {
            break;
        }
    }
    let (u, ok) = node
        .poll_user(&a.token, &b.id, std::time::Duration::from_secs(20), |u| {
            u["online"] == false
        })
        .await;
    assert!(ok, "a frozen reader stayed online: {u}");
    assert!(u["last_seen"].is_u64(), "last_seen set: {u}");
    drop(bw);
}
