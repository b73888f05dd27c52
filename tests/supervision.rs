//! Supervision and fault injection, one fault at a time: actors killed (and killed
//! again, into a crash loop), a link partitioned, the disk failing. Each test checks
//! that nothing acked is lost and that every failure is answered, never hung.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const CHAOS: &str = "[chaos]\nenabled = true";

async fn admin_post(node: &Node, path: &str, body: &Value) -> Resp {
    node.admin(reqwest::Method::POST, path, Some(body)).await
}

/// The value of a counter in `/metrics` (summed over its labels).
async fn metric(node: &Node, name: &str) -> f64 {
    node.get_root("/metrics")
        .await
        .text
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_calls_exist_only_when_enabled() {
    let node = Node::start("").await;
    for (path, body) in [
        ("/admin/chaos/kill", json!({"target": "random"})),
        (
            "/admin/chaos/partition",
            json!({"peer": "n2", "for_ms": 10}),
        ),
        ("/admin/chaos/storage", json!({"fail_for_ms": 10})),
    ] {
        let r = admin_post(&node, path, &body).await;
        assert_http_error(&r, 404, "not_found", path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_actor_comes_back_from_storage_and_nothing_acked_is_lost() {
    let node = Node::start(CHAOS).await;
    let a = node.user("ka").await;
    let b = node.user("kb").await;
    let mut aw = node.ws(&a.token).await;
    aw.sync(0).await;
    let first = aw.send_to_user(&b.id, "before").await;
    let cid = str_field(&first, "conversation_id").to_string();

    // Each kind, by name: answered with what was killed; the next call is served by
    // a fresh actor loaded from storage.
    for target in [
        format!("user:{}", a.id),
        format!("user:{}", b.id),
        format!("conversation:{cid}"),
    ] {
        let r = admin_post(&node, "/admin/chaos/kill", &json!({"target": target})).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body, json!({"killed": target}));
    }
    let r = admin_post(&node, "/admin/chaos/kill", &json!({"target": "random"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        str_field(&r.body, "killed").contains(':'),
        "names its victim: {}",
        r.text
    );
    for bad in ["user:nope", "planet:3", "", "group"] {
        let r = admin_post(&node, "/admin/chaos/kill", &json!({"target": bad})).await;
        assert_http_error(&r, 400, "bad_request", bad);
    }
    // Killing a user closes nothing a client needs: its session resyncs if dropped,
    // and the conversation continues at the next seq, with the history intact.
    let mut aw = node.ws(&a.token).await;
    aw.sync(0).await;
    let second = aw.send_to_user(&b.id, "after").await;
    assert_eq!(u64_field(&second, "seq"), 2, "{second}");
    let history = node.full_history(&b.token, &cid).await;
    let bodies: Vec<&str> = history.iter().map(|m| str_field(m, "body")).collect();
    assert_eq!(bodies, ["before", "after"]);
    let l = node.login(&a.handle, &a.password).await;
    assert_eq!(l.status, 200, "the user's record is intact: {}", l.text);
    assert!(metric(&node, "switchboard_actor_restarts_total").await >= 1.0);

    // Kills racing a burst of sends: every send is answered, and a retry of an
    // unanswered one with its client_msg_id never stores it twice.
    let mut sent = Vec::new();
    for i in 0..40 {
        let cmid = aw.send_to_user_nowait(&b.id, &format!("burst {i}")).await;
        sent.push(cmid);
        if i % 8 == 0 {
            let target = format!("conversation:{cid}");
            admin_post(&node, "/admin/chaos/kill", &json!({"target": target})).await;
        }
    }
    for (i, cmid) in sent.iter().enumerate() {
        let mut reply = aw.reply_for(cmid).await;
        while reply["type"] == "error" {
            assert_eq!(reply["code"], "owner_unavailable", "{reply}");
            tokio::time::sleep(Duration::from_millis(100)).await;
            aw.send_json(&json!({"type":"send","client_msg_id":cmid,"to_user":b.id,"body":format!("burst {i}")}))
                .await;
            reply = aw.reply_for(cmid).await;
        }
        assert_ack_shape(&reply, cmid);
    }
    let history = node.full_history(&b.token, &cid).await;
    let seqs: Vec<u64> = history.iter().map(|m| u64_field(m, "seq")).collect();
    assert_eq!(seqs, (1..=42).collect::<Vec<_>>(), "no gap, nothing twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_that_keeps_dying_is_restarted_with_backoff() {
    let node = Node::start(CHAOS).await;
    let a = node.user("loop").await;
    let target = json!({"target": format!("user:{}", a.id)});
    // Called (so its actor runs) and killed, over and over, faster than a healthy
    // actor ever dies; after a few deaths the calls find it backing off.
    let mut kills = 0;
    loop {
        let r = node.get("/users/me", Some(&a.token)).await;
        match r.status {
            200 => {}
            503 => break,
            other => panic!("GET /users/me answered {other}: {}", r.text),
        }
        let r = admin_post(&node, "/admin/chaos/kill", &target).await;
        assert_eq!(r.status, 200, "{}", r.text);
        kills += 1;
        assert!(kills < 20, "restarts never backed off after {kills} deaths");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        kills > 3,
        "the first few deaths restart at once ({kills} kills)"
    );
    assert!(metric(&node, "switchboard_actor_crash_loops_total").await >= 1.0);
    assert!(
        node.log_tail(200).contains("keeps dying"),
        "the loop is reported in the log"
    );
    // It comes back once the backoff has passed.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = node.login(&a.handle, &a.password).await;
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503, "{}", r.text);
        assert!(Instant::now() < deadline, "never came back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_disk_fails_sends_without_an_ack_and_nothing_is_lost() {
    let node = Node::start(CHAOS).await;
    let a = node.user("da").await;
    let b = node.user("db").await;
    let mut aw = node.ws(&a.token).await;
    aw.sync(0).await;
    aw.send_to_user(&b.id, "one").await;
    let r = admin_post(&node, "/admin/chaos/storage", &json!({"fail_for_ms": 1500})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let cmid = aw.send_to_user_nowait(&b.id, "two").await;
    // Never an ack: an error frame, or the connection closed (1012) because the
    // sender's own user actor stopped on the failed flush (its client resyncs).
    loop {
        match aw.next_event(Duration::from_secs(10)).await {
            Event::Json(v) if v["client_msg_id"] == cmid.as_str() => {
                assert_error_frame(&v, "storage_error", "a send while the disk fails");
                break;
            }
            Event::Json(_) | Event::Binary(_) => {}
            Event::Closed(code) => {
                assert_eq!(code, Some(1012), "closed as a restart, not otherwise");
                break;
            }
            Event::Timeout => panic!("no answer to a send while the disk fails"),
        }
    }
    let health = node.get_root("/healthz").await;
    assert_eq!(health.status, 503, "{}", health.text);
    assert_eq!(
        health.body["error"]["code"], "storage_error",
        "{}",
        health.text
    );
    assert!(metric(&node, "switchboard_flush_errors_total").await >= 1.0);
    // The disk recovers: the retry gets its ack, and the message is stored once.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    // (A fresh connection: the old one may be closing, its user's actor having stopped
    // on the failed flush.)
    drop(aw);
    let mut aw = node.ws(&a.token).await;
    aw.sync(0).await;
    aw.send_json(&json!({"type":"send","client_msg_id":cmid,"to_user":b.id,"body":"two"}))
        .await;
    let ack = aw.ack_for(&cmid).await;
    assert_ack_shape(&ack, &cmid);
    assert_eq!(node.get_root("/healthz").await.status, 200);
    let cid = str_field(&ack, "conversation_id");
    let bodies: Vec<String> = node
        .full_history(&b.token, cid)
        .await
        .iter()
        .map(|m| str_field(m, "body").to_string())
        .collect();
    assert_eq!(bodies, ["one", "two"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_link_heals_by_itself() {
    let nodes = Node::start_cluster(2, CHAOS).await;
    let ring = switchboard::net::ring::Ring::new(["n1", "n2"], 64);
    let homed_on = |id: &str| {
        ring.owner(format!("user:{id}").as_bytes())
            .map(str::to_string)
    };
    // a lives on n1 and b on n2, so a call from n1 about b must cross the link.
    let a = loop {
        let u = nodes[0].user("pa").await;
        if homed_on(&u.id).as_deref() == Some("n1") {
            break u;
        }
    };
    let b = loop {
        let u = nodes[1].user("pb").await;
        if homed_on(&u.id).as_deref() == Some("n2") {
            break u;
        }
    };
    let r = admin_post(
        &nodes[0],
        "/admin/chaos/partition",
        &json!({"peer": "n2", "for_ms": 1500}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body, json!({"partitioned": "n2", "for_ms": 1500}));
    let bad = admin_post(
        &nodes[0],
        "/admin/chaos/partition",
        &json!({"peer": "n9", "for_ms": 10}),
    )
    .await;
    assert_http_error(&bad, 404, "unknown_node", "no such peer");
    let bad = admin_post(
        &nodes[0],
        "/admin/chaos/partition",
        &json!({"peer": "n2", "for_ms": 0}),
    )
    .await;
    assert_http_error(&bad, 400, "bad_request", "zero duration");
    // While partitioned, n1 cannot reach what lives on n2, and says so at once (the
    // link is dropped within a ping interval at most).
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let started = Instant::now();
        let r = nodes[0]
            .get(&format!("/users/{}", b.id), Some(&a.token))
            .await;
        if r.status == 503 {
            assert_http_error(&r, 503, "owner_unavailable", "a user on the other side");
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "answered at once"
            );
            break;
        }
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(Instant::now() < deadline, "the partition never took effect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...and it heals by itself: both ways work again, with every link up.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let there = nodes[0]
            .get(&format!("/users/{}", b.id), Some(&a.token))
            .await;
        let back = nodes[1]
            .get(&format!("/users/{}", a.id), Some(&b.token))
            .await;
        if there.status == 200 && back.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never healed: {} {}",
            there.text,
            back.text
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    nodes[0].wait_links(1).await;
    nodes[1].wait_links(1).await;
    let mut aw = nodes[1].ws(&a.token).await;
    aw.sync(0).await;
    aw.send_to_user(&b.id, "healed").await;
}
