//! Media: streamed uploads into a content-addressed store, ranged downloads, limits and
//! the access rule.

mod common;

use std::time::Duration;

use common::*;
use reqwest::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn upload(node: &Node, token: &str, bytes: Vec<u8>, content_type: &str) -> Resp {
    node.call_raw(
        Method::POST,
        &node.api("/media"),
        &[
            ("authorization", &format!("Bearer {token}")),
            ("content-type", content_type),
        ],
        Some(bytes),
    )
    .await
}

async fn get_media(node: &Node, token: &str, id: &str, range: Option<&str>) -> reqwest::Response {
    let mut rb = reqwest::Client::new()
        .get(node.api(&format!("/media/{id}")))
        .bearer_auth(token);
    if let Some(r) = range {
        rb = rb.header("range", r);
    }
    rb.send().await.expect("GET media")
}

/// Files in the media store, temp files included.
fn stored_files(node: &Node) -> Vec<String> {
    let dir = node.data_dir().join("media");
    let mut out = Vec::new();
    for sub in [dir.clone(), dir.join("tmp")] {
        if let Ok(entries) = std::fs::read_dir(&sub) {
            for e in entries.flatten() {
                if e.path().is_file() {
                    out.push(e.path().display().to_string());
                }
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn upload_then_ranged_reads_of_a_20_mib_file() {
    let node = Node::start("").await;
    let a = node.user("mda").await;
    let bytes: Vec<u8> = (0..20 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let r = upload(&node, &a.token, bytes.clone(), "video/mp4").await;
    assert_eq!(r.status, 201, "{}", r.text);
    let id = str_field(&r.body, "media_id").to_string();
    assert!(is_uuid(&r.body["media_id"]));
    assert_eq!(r.body["size"], bytes.len() as u64);
    assert_eq!(r.body["content_type"], "video/mp4");
    let sha = str_field(&r.body, "sha256").to_string();
    assert_eq!(sha.len(), 64, "hex sha256");

    let full = get_media(&node, &a.token, &id, None).await;
    assert_eq!(full.status(), 200);
    assert_eq!(full.headers()["content-type"], "video/mp4");
    assert!(
        full.bytes().await.expect("body").as_ref() == bytes.as_slice(),
        "same bytes back"
    );

    let part = get_media(&node, &a.token, &id, Some("bytes=10-19")).await;
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.headers()["content-range"],
        format!("bytes 10-19/{}", bytes.len()).as_str()
    );
    assert_eq!(part.bytes().await.expect("body").as_ref(), &bytes[10..20]);
    let tail = get_media(&node, &a.token, &id, Some("bytes=-5")).await;
    assert_eq!(tail.status(), 206);
    assert_eq!(
        tail.bytes().await.expect("body").as_ref(),
        &bytes[bytes.len() - 5..]
    );
    let past = get_media(
        &node,
        &a.token,
        &id,
        Some(&format!("bytes={}-", bytes.len() + 10)),
    )
    .await;
    assert_eq!(past.status(), 416, "a range past the end");
    assert_eq!(
        past.headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok()),
        Some(format!("bytes */{}", bytes.len()).as_str())
    );
    let err: serde_json::Value = past.json().await.expect("a JSON error body");
    assert_eq!(err["error"]["code"], "range_not_satisfiable", "{err}");
    assert!(err["error"]["message"].is_string());
    // A malformed Range is ignored: the whole object.
    let whole = get_media(&node, &a.token, &id, Some("pages=1-2")).await;
    assert_eq!(whole.status(), 200, "a malformed Range");
    assert_eq!(whole.bytes().await.expect("body").len(), bytes.len());

    // The same bytes again: a new id, one stored file.
    let again = upload(&node, &a.token, bytes, "video/mp4").await;
    assert_eq!(again.status, 201);
    assert_ne!(again.body["media_id"], id.as_str());
    assert_eq!(again.body["sha256"], sha.as_str());
    assert_eq!(
        stored_files(&node).len(),
        1,
        "content-addressed: {:?}",
        stored_files(&node)
    );
}

#[tokio::test]
async fn limits_cut_off_uploads_and_access() {
    let node = Node::start("max_media_bytes = 1048576").await;
    let a = node.user("mla").await;
    let c = node.user("mlc").await;

    let r = upload(&node, &a.token, vec![7; 2 * 1024 * 1024], "image/png").await;
    assert_http_error(&r, 413, "too_large", "upload over max_media_bytes");
    // Over the limit without a Content-Length (chunked): refused as it streams.
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", node.port))
        .await
        .expect("connect");
    let head = format!(
        "POST /api/v1/media HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
        a.token
    );
    raw.write_all(head.as_bytes()).await.expect("write");
    let chunk = vec![1u8; 64 * 1024];
    for _ in 0..40 {
        let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
        frame.extend_from_slice(&chunk);
        frame.extend_from_slice(b"\r\n");
        if raw.write_all(&frame).await.is_err() {
            break; // the server answered and closed early: fine
        }
    }
    let _ = raw.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "chunked upload over the limit: {answer}"
    );
    // Cut off mid-upload.
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", node.port))
        .await
        .expect("connect");
    let head = format!(
        "POST /api/v1/media HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-length: 500000\r\n\r\n",
        a.token
    );
    raw.write_all(head.as_bytes()).await.expect("write");
    raw.write_all(&[9u8; 100_000]).await.expect("write");
    drop(raw);
    // Nothing partial is kept (temp files go as the upload fails).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !stored_files(&node).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "partial files kept: {:?}",
            stored_files(&node)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let ok = upload(&node, &a.token, b"hello".to_vec(), "text/plain").await;
    assert_eq!(ok.status, 201, "{}", ok.text);
    let id = str_field(&ok.body, "media_id").to_string();
    // A stranger may not read it; unknown and malformed ids; no token.
    let r = get_media(&node, &c.token, &id, None).await;
    assert_eq!(r.status(), 403, "stranger");
    let r = node
        .get(&format!("/media/{}", new_uuid()), Some(&a.token))
        .await;
    assert_http_error(&r, 404, "unknown_media", "unknown media id");
    let r = node.get("/media/nope", Some(&a.token)).await;
    assert_http_error(&r, 400, "invalid_id", "malformed media id");
    let r = node.get(&format!("/media/{id}"), None).await;
    assert_http_error(&r, 401, "unauthorized", "no token");
}

#[tokio::test]
async fn messages_reference_only_readable_media_and_grant_access() {
    let node = Node::start("").await;
    let a = node.user("mra").await;
    let b = node.user("mrb").await;
    let c = node.user("mrc").await;
    let up = upload(&node, &a.token, b"image bytes".to_vec(), "image/png").await;
    let id = str_field(&up.body, "media_id").to_string();

    // b cannot read it before any message references it.
    assert_eq!(get_media(&node, &b.token, &id, None).await.status(), 403);

    let mut aw = node.ws(&a.token).await;
    aw.sync(0).await;
    let cmid = new_uuid();
    aw.send_json(&serde_json::json!({"type": "send", "client_msg_id": cmid, "to_user": b.id, "body": "look", "media": [id]}))
        .await;
    let ack = aw.ack_for(&cmid).await;
    let mut bw = node.ws(&b.token).await;
    let s = bw.sync_n(0, 1).await;
    assert_eq!(s.messages[0]["message"]["media"], serde_json::json!([id]));
    assert_eq!(s.messages[0]["message"]["message_id"], ack["message_id"]);
    // Now b, a member of the conversation holding it, may read it; c may not.
    let r = get_media(&node, &b.token, &id, None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.expect("body").as_ref(), b"image bytes");
    assert_eq!(get_media(&node, &c.token, &id, None).await.status(), 403);

    // c may not attach media it cannot read, nor unknown media; nothing is stored.
    let mut cw = node.ws(&c.token).await;
    cw.sync(0).await;
    for (media, code) in [(id.clone(), "not_member"), (new_uuid(), "unknown_media")] {
        let cmid = new_uuid();
        cw.send_json(&serde_json::json!({"type": "send", "client_msg_id": cmid, "to_user": a.id, "body": "x", "media": [media]}))
            .await;
        let e = cw.recv_type("error").await;
        assert_error_frame(&e, code, "media the sender cannot read");
        assert_eq!(e["client_msg_id"], cmid.as_str());
    }
    assert_eq!(
        node.get("/conversations", Some(&c.token)).await.body,
        serde_json::json!([])
    );

    // b can forward what it can read; then c can read it too.
    let fwd = new_uuid();
    bw.send_json(&serde_json::json!({"type": "send", "client_msg_id": fwd, "to_user": c.id, "body": "fwd", "media": [id]}))
        .await;
    bw.ack_for(&fwd).await;
    assert_eq!(get_media(&node, &c.token, &id, None).await.status(), 200);
}
