//! Three real nodes on loopback, one cluster.toml: every entity has one home on the
//! ring and clients get the same service from whichever node they reach. Homes are
//! computed with the crate's own ring (the layout is specified byte for byte), so the
//! tests know which node a user lives on.

mod common;

use std::time::Instant;

use common::*;
use serde_json::json;
use switchboard::net::ring::Ring;

/// `GET /admin/cluster` on `node` with `token`.
async fn admin_cluster(node: &Node, token: Option<&str>) -> Resp {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    node.call_raw(
        reqwest::Method::GET,
        &format!("{}/admin/cluster", node.base()),
        &headers,
        None,
    )
    .await
}

/// `(id, status)` of every node in an admin cluster view.
fn statuses(view: &serde_json::Value) -> Vec<(String, String)> {
    field_pairs(view, "nodes", "id", "status")
}

/// `GET /media/{mid}` on `node` as `token`, with an optional `Range`.
async fn get_media(node: &Node, token: &str, mid: &str, range: Option<&str>) -> Resp {
    let auth = format!("Bearer {token}");
    let mut headers = vec![("Authorization", auth.as_str())];
    headers.extend(range.map(|r| ("Range", r)));
    node.call_raw(
        reqwest::Method::GET,
        &node.api(&format!("/media/{mid}")),
        &headers,
        None,
    )
    .await
}

async fn add_member(node: &Node, admin: &User, gid: &str, user: &str) -> Resp {
    node.post(
        &format!("/groups/{gid}/members"),
        Some(&admin.token),
        &json!({ "user_id": user }),
    )
    .await
}

fn ring(n: usize) -> Ring {
    Ring::new((1..=n).map(|i| format!("n{i}")), 64)
}

fn home(ring: &Ring, kind: &str, id: &str) -> String {
    ring.owner(format!("{kind}:{id}").as_bytes())
        .expect("ring has nodes")
        .to_string()
}

/// Index of the node with id `id`.
fn idx(id: &str) -> usize {
    id.trim_start_matches('n')
        .parse::<usize>()
        .expect("node id")
        - 1
}

#[tokio::test]
async fn three_nodes_serve_one_chat() {
    let nodes = Node::start_cluster(3, "").await;
    let r = ring(3);
    // Users registered through different nodes, homed wherever the ring puts them.
    let mut users = Vec::new();
    for i in 0..6 {
        users.push(nodes[i % 3].user("cl").await);
    }
    let homes: Vec<String> = users.iter().map(|u| home(&r, "user", &u.id)).collect();
    eprintln!("user homes: {homes:?}");

    // A handle is unique across the cluster, whichever node is asked.
    for n in &nodes {
        let again = n.create_user(&users[0].handle, "another password").await;
        assert_http_error(
            &again,
            409,
            "handle_taken",
            &format!("same handle via {}", n.id),
        );
    }
    // Log in, look up and read profiles through any node.
    for (i, u) in users.iter().enumerate() {
        let n = &nodes[(i + 1) % 3];
        let l = n.login(&u.handle, &u.password).await;
        assert_eq!(l.status, 200, "login via {}: {}", n.id, l.text);
        let found = n
            .get(&format!("/users?handle={}", u.handle), Some(&u.token))
            .await;
        assert_eq!(
            found.body["user_id"].as_str(),
            Some(u.id.as_str()),
            "{}",
            found.text
        );
    }

    // 1:1 between devices on different nodes.
    let (a, b) = (&users[0], &users[1]);
    let mut aw = nodes[1].ws(&a.token).await;
    aw.sync(0).await;
    let mut bw = nodes[2].ws(&b.token).await;
    bw.sync(0).await;
    let ack = aw.send_to_user(&b.id, "across the cluster").await;
    let cid = str_field(&ack, "conversation_id").to_string();
    let got = bw.recv_type("message").await;
    assert_eq!(got["message"]["body"], "across the cluster");
    let own = aw.recv_type("message").await;
    assert_eq!(own["message"]["seq"], ack["seq"]);
    bw.send_json(&json!({"type":"read","conversation_id":cid,"seq":1}))
        .await;
    for status in ["delivered", "read"] {
        let rc = aw.recv_type("receipt").await;
        assert_eq!(
            (rc["status"].as_str(), rc["user_id"].as_str()),
            (Some(status), Some(b.id.as_str()))
        );
    }
    // Typing and presence cross nodes too.
    bw.send_json(&json!({"type":"typing","conversation_id":cid}))
        .await;
    assert_eq!(aw.recv_type("typing").await["user_id"], b.id.as_str());
    aw.send_json(&json!({"type":"subscribe_presence","user_ids":[b.id]}))
        .await;
    assert_eq!(aw.recv_type("presence").await["online"], true);

    // History and receipts agree from every node.
    for n in &nodes {
        let h = n.full_history(&a.token, &cid).await;
        assert_eq!(h.len(), 1, "history via {}", n.id);
        let rr = n
            .get(&format!("/conversations/{cid}/receipts"), Some(&b.token))
            .await;
        assert_eq!(rr.status, 200, "{}", rr.text);
    }

    // A group of all six, created through one node, used through all three.
    let members: Vec<&str> = users[1..].iter().map(|u| u.id.as_str()).collect();
    let g = nodes[2]
        .post(
            "/groups",
            Some(&users[0].token),
            &json!({"name": "everywhere", "members": members}),
        )
        .await;
    assert_eq!(g.status, 201, "{}", g.text);
    let gcid = str_field(&g.body, "conversation_id").to_string();
    let mut devices = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let mut ws = nodes[(i + 2) % 3].ws(&u.token).await;
        let replayed = ws.sync(0).await.messages;
        // Keep what the replay gave, to be read with the live messages.
        for m in replayed.into_iter().rev() {
            ws.pending.push_front(m);
        }
        devices.push(ws);
    }
    for (i, ws) in devices.iter_mut().enumerate() {
        ws.send_to_conv(&gcid, &format!("hello from {i}")).await;
    }
    for (i, ws) in devices.iter_mut().enumerate() {
        let mut seqs = Vec::new();
        while seqs.len() < 7 {
            let f = ws.recv_type("message").await;
            if f["message"]["conversation_id"] == gcid.as_str() {
                seqs.push(u64_field(&f["message"], "seq"));
            }
        }
        assert_eq!(seqs, (1..=7).collect::<Vec<_>>(), "device {i}");
    }
    let h = nodes[0].full_history(&users[3].token, &gcid).await;
    assert_eq!(h.len(), 7);

    // Every node describes the same cluster to its operator.
    let mut owned_total = 0;
    for n in &nodes {
        let v = admin_cluster(n, Some("test-admin-token")).await;
        assert_eq!(v.status, 200, "{}", v.text);
        assert_eq!(v.body["node_id"].as_str(), Some(n.id.as_str()));
        assert_eq!(v.body["ring_version"], 1);
        assert_eq!(v.body["handoffs_pending"], 0);
        let want: Vec<(String, String)> = (1..=3)
            .map(|i| (format!("n{i}"), "up".to_string()))
            .collect();
        assert_eq!(statuses(&v.body), want);
        let mine = v.body["nodes"][idx(&n.id)]["owned_entities"]
            .as_u64()
            .expect("count");
        owned_total += mine;
        assert_http_error(
            &admin_cluster(n, None).await,
            401,
            "unauthorized",
            "no admin token",
        );
        assert_http_error(
            &admin_cluster(n, Some(&users[0].token)).await,
            401,
            "unauthorized",
            "a user's token is not the admin token",
        );
    }
    // Users and handles (6 each), the direct and the group conversation, the group.
    const STORED: u64 = 6 + 6 + 1 + 1 + 1;
    assert_eq!(owned_total, STORED, "owned entities");

    // A token revoked through one node stops working on every node at once.
    let c = &users[2];
    let out = nodes[(idx(&homes[2]) + 1) % 3]
        .delete("/sessions/current", Some(&c.token))
        .await;
    assert_eq!(out.status, 204, "{}", out.text);
    for n in &nodes {
        let me = n.get("/users/me", Some(&c.token)).await;
        assert_http_error(
            &me,
            401,
            "unauthorized",
            &format!("revoked token via {}", n.id),
        );
    }
}

#[tokio::test]
async fn a_dead_node_answers_503_and_its_data_is_there_when_it_returns() {
    let mut nodes = Node::start_cluster(3, "").await;
    let r = ring(3);
    // Enough users that each node is home to some.
    let mut users = Vec::new();
    while (1..=3).any(|i| {
        !users
            .iter()
            .any(|u: &User| home(&r, "user", &u.id) == format!("n{i}"))
    }) {
        users.push(nodes[users.len() % 3].user("dn").await);
        assert!(
            users.len() < 60,
            "the ring never placed a user on every node"
        );
    }
    let on = |n: &str| -> Vec<User> {
        users
            .iter()
            .filter(|u| home(&r, "user", &u.id) == n)
            .cloned()
            .collect()
    };
    let (n1s, n3s) = (on("n1"), on("n3"));
    let alive = &n1s[0];
    let doomed = &n3s[0];
    // Before the crash, `alive` has talked to every user of n3 (so its connection
    // knows they exist).
    let mut aw = nodes[1].ws(&alive.token).await;
    aw.sync(0).await;
    for u in &n3s {
        aw.send_to_user(&u.id, "hello").await;
    }

    nodes[2].kill9();
    // Calls for entities homed on the dead node fail fast with 503...
    let t = Instant::now();
    let p = nodes[0]
        .get(&format!("/users/{}", doomed.id), Some(&alive.token))
        .await;
    assert_http_error(&p, 503, "owner_unavailable", "a user homed on a dead node");
    eprintln!("503 for a dead owner after {:?}", t.elapsed());
    let t = Instant::now();
    let me = nodes[1].get("/users/me", Some(&doomed.token)).await;
    assert_http_error(
        &me,
        503,
        "owner_unavailable",
        "a token of a user homed on a dead node",
    );
    eprintln!("503 for a dead owner's token after {:?}", t.elapsed());
    let v = admin_cluster(&nodes[0], Some("test-admin-token")).await;
    assert_eq!(
        statuses(&v.body)
            .iter()
            .map(|(_, s)| s.as_str())
            .collect::<Vec<_>>(),
        vec!["up", "up", "down"],
        "{}",
        v.text
    );

    // ...everything else keeps working. A send to a user of the dead node is acked
    // when its conversation lives on a live node (delivered when the node returns),
    // and refused with owner_unavailable when the conversation lives on the dead one.
    let direct_home = |x: &User, y: &User| {
        let cid = switchboard::ids::ConversationId::direct(
            x.id.parse().expect("uuid"),
            y.id.parse().expect("uuid"),
        );
        home(&r, "conversation", &cid.to_string())
    };
    let mut owed = Vec::new();
    for u in &n3s {
        let cmid = aw.send_to_user_nowait(&u.id, "while you were down").await;
        let reply = aw.reply_for(&cmid).await;
        if direct_home(alive, u) == "n3" {
            assert_error_frame(&reply, "owner_unavailable", "a conversation on a dead node");
        } else {
            assert_eq!(reply["type"], "ack", "{reply}");
            owed.push(u.clone());
        }
    }
    eprintln!(
        "{} of {} sends to n3's users acked while n3 was down",
        owed.len(),
        n3s.len()
    );
    // Two users of live nodes, with their conversation on a live node, chat on.
    let friend = users
        .iter()
        .find(|u| {
            u.id != alive.id && home(&r, "user", &u.id) != "n3" && direct_home(alive, u) != "n3"
        })
        .cloned();
    if let Some(friend) = friend {
        aw.send_to_user(&friend.id, "the living still chat").await;
    }

    nodes[2].restart().await;
    for n in &nodes {
        n.wait_links(2).await;
    }
    // Its users are back, with every acked message in their inbox exactly once.
    let back = nodes[0]
        .get(&format!("/users/{}", doomed.id), Some(&alive.token))
        .await;
    assert_eq!(back.status, 200, "{}", back.text);
    for u in &owed {
        // Fan-out retries with backoff (up to 5 s): poll the inbox, bounded.
        let started = Instant::now();
        let bodies = loop {
            let mut ws = nodes[0].ws(&u.token).await;
            let s = ws.sync(0).await;
            let bodies: Vec<String> = s
                .messages
                .iter()
                .map(|m| m["message"]["body"].as_str().unwrap_or("").to_string())
                .collect();
            ws.close().await;
            if bodies.len() >= 2 || started.elapsed().as_secs() > 30 {
                break bodies;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        };
        assert_eq!(bodies, vec!["hello", "while you were down"]);
    }
    // What needed the dead node works again.
    let mut dw = nodes[0].ws(&doomed.token).await;
    dw.sync(0).await;
    dw.send_to_user(&alive.id, "I am back").await;
}

#[tokio::test]
async fn media_is_stored_where_uploaded_and_read_through_any_node() {
    let nodes = Node::start_cluster(3, "").await;
    let r = ring(3);
    let a = nodes[0].user("ma").await;
    let b = nodes[1].user("mb").await;
    let stranger = nodes[2].user("ms").await;
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let up = nodes[1]
        .call_raw(
            reqwest::Method::POST,
            &nodes[1].api("/media"),
            &[
                ("Authorization", &format!("Bearer {}", a.token)),
                ("Content-Type", "image/png"),
            ],
            Some(bytes.clone()),
        )
        .await;
    assert_eq!(up.status, 201, "{}", up.text);
    let mid = str_field(&up.body, "media_id").to_string();
    assert_eq!(
        home(&r, "media", &mid),
        "n2",
        "an upload is stored where it arrives"
    );

    // a sends it to b (through a third node); b reads it through every node.
    let mut aw = nodes[2].ws(&a.token).await;
    aw.sync(0).await;
    let cmid = new_uuid();
    aw.send_json(
        &json!({"type":"send","client_msg_id":cmid,"to_user":b.id,"body":"look","media":[mid]}),
    )
    .await;
    let ack = aw.ack_for(&cmid).await;
    assert!(ack["seq"].is_u64());
    for n in &nodes {
        let whole = get_media(n, &b.token, &mid, None).await;
        assert_eq!(whole.status, 200, "GET via {}", n.id);
        // (The harness keeps bodies as lossy UTF-8: compare them the same way.)
        assert!(
            whole.text == String::from_utf8_lossy(&bytes),
            "bytes via {}",
            n.id
        );
        let part = get_media(n, &b.token, &mid, Some("bytes=1000-1999")).await;
        assert_eq!(part.status, 206, "ranged GET via {}", n.id);
        assert!(
            part.text == String::from_utf8_lossy(&bytes[1000..2000]),
            "range via {}",
            n.id
        );
        let denied = get_media(n, &stranger.token, &mid, None).await;
        assert_http_error(
            &denied,
            403,
            "not_member",
            &format!("a stranger via {}", n.id),
        );
    }
    // The stranger cannot attach it either, and nothing is stored.
    let mut sw = nodes[0].ws(&stranger.token).await;
    sw.sync(0).await;
    let cmid = new_uuid();
    sw.send_json(
        &json!({"type":"send","client_msg_id":cmid,"to_user":a.id,"body":"mine now","media":[mid]}),
    )
    .await;
    assert_error_frame(
        &sw.reply_for(&cmid).await,
        "not_member",
        "someone else's media",
    );
    let unknown = new_uuid();
    let cmid = new_uuid();
    sw.send_json(
        &json!({"type":"send","client_msg_id":cmid,"to_user":a.id,"body":"?","media":[unknown]}),
    )
    .await;
    assert_error_frame(
        &sw.reply_for(&cmid).await,
        "unknown_media",
        "media that does not exist",
    );
}

#[tokio::test]
async fn a_membership_change_waits_for_its_conversation_node_and_is_announced_once() {
    let mut nodes = Node::start_cluster(3, "").await;
    let r = ring(3);
    let mut users: Vec<User> = Vec::new();
    for i in 0..6 {
        users.push(nodes[i % 3].user("gw").await);
    }
    // A group whose conversation lives on another node than the group itself.
    let (gid, cid, conv_node) = loop {
        let g = nodes[0]
            .post(
                "/groups",
                Some(&users[0].token),
                &json!({"name": "split", "members": []}),
            )
            .await;
        assert_eq!(g.status, 201, "{}", g.text);
        let gid = str_field(&g.body, "group_id").to_string();
        let cid = str_field(&g.body, "conversation_id").to_string();
        let (gh, ch) = (home(&r, "group", &gid), home(&r, "conversation", &cid));
        if gh != ch && home(&r, "user", &users[0].id) != ch {
            break (gid, cid, ch);
        }
    };
    let down = idx(&conv_node);
    let up = (down + 1) % 3;
    let newcomer = users
        .iter()
        .skip(1)
        .find(|u| home(&r, "user", &u.id) != conv_node)
        .cloned()
        .expect("a user homed elsewhere");
    let second = users
        .iter()
        .skip(1)
        .find(|u| u.id != newcomer.id && home(&r, "user", &u.id) != conv_node)
        .cloned();

    nodes[down].kill9();
    // The change is stored and answered; its announcement waits for the conversation.
    let add = add_member(&nodes[up], &users[0], &gid, &newcomer.id).await;
    assert_eq!(add.status, 200, "{}", add.text);
    // While it is unannounced, every change waits, its own retry included.
    let again = add_member(&nodes[up], &users[0], &gid, &newcomer.id).await;
    assert_http_error(
        &again,
        503,
        "owner_unavailable",
        "a retry while unannounced",
    );
    // A further change cannot overtake the unannounced one.
    if let Some(second) = &second {
        let next = add_member(&nodes[up], &users[0], &gid, &second.id).await;
        assert_http_error(
            &next,
            503,
            "owner_unavailable",
            "a change behind an unannounced one",
        );
    }

    nodes[down].restart().await;
    for n in &nodes {
        n.wait_links(2).await;
    }
    // The group retries on its own: the newcomer's inbox gets its arrival, once.
    let mut nw = nodes[up].ws(&newcomer.token).await;
    let s = nw.sync_n(0, 1).await;
    let m = &s.messages[0]["message"];
    assert_eq!(m["conversation_id"], cid.as_str());
    let ev: serde_json::Value = serde_json::from_str(str_field(m, "body")).expect("json body");
    assert_eq!(
        (ev["event"].as_str(), ev["user_id"].as_str()),
        (Some("member_added"), Some(newcomer.id.as_str()))
    );
    nw.send_to_conv(&cid, "made it").await;
    // Now a retry of the add is answered as the success it was, not "already a member".
    let again = add_member(&nodes[up], &users[0], &gid, &newcomer.id).await;
    assert_eq!(again.status, 200, "a retry after the fact: {}", again.text);
    let h = nodes[0].full_history(&users[0].token, &cid).await;
    let added: Vec<_> = h
        .iter()
        .filter(|m| str_field(m, "body").contains("member_added"))
        .collect();
    assert_eq!(added.len(), 1, "announced exactly once: {h:?}");
}

#[tokio::test]
async fn a_device_on_a_restarted_node_gets_live_events_at_once() {
    let mut nodes = Node::start_cluster(3, "").await;
    let r = ring(3);
    let a = nodes[0].user("ra").await;
    let b = nodes[1].user("rb").await;
    // The node to restart: home to neither of them (their conversation may live there:
    // then b's sends wait for it, which is fine).
    let restarted = (0..3)
        .find(|i| {
            let n = format!("n{}", i + 1);
            home(&r, "user", &a.id) != n && home(&r, "user", &b.id) != n
        })
        .expect("a node that is home to neither");
    let mut bw = nodes[(restarted + 1) % 3].ws(&b.token).await;
    bw.sync(0).await;
    bw.send_to_user(&a.id, "before").await;
    for round in 0..4 {
        nodes[restarted].kill9();
        nodes[restarted].restart().await;
        // Straight away, while the other nodes may not have dialled it back yet.
        let mut aw = loop {
            match nodes[restarted].try_ws(&a.token).await {
                Ok(ws) => break ws,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        };
        let s = aw.sync(0).await;
        let body = format!("live {round}");
        // Their conversation may live on the restarted node: retry (same id) until its
        // link is back.
        let cmid = new_uuid();
        let mut tries = 0;
        let ack = loop {
            tries += 1;
            assert!(
                tries < 500,
                "the restarted node's conversation never came back"
            );
            bw.send_json(&json!({"type":"send","client_msg_id":cmid,"to_user":a.id,"body":body}))
                .await;
            let reply = bw.reply_for(&cmid).await;
            if reply["type"] == "ack" {
                break reply;
            }
            assert_error_frame(&reply, "owner_unavailable", "send right after a restart");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        // Sent after the sync: it can only come live.
        assert!(s.messages.iter().all(|m| m["message"]["seq"] != ack["seq"]));
        let live = aw.recv_type("message").await;
        assert_eq!(live["message"]["body"], body.as_str(), "round {round}");
    }
}

#[tokio::test]
async fn a_frozen_node_is_marked_down_and_answers_503() {
    let nodes = Node::start_cluster(3, "").await;
    let r = ring(3);
    let mut users = Vec::new();
    while !users.iter().any(|u: &User| home(&r, "user", &u.id) == "n3")
        || !users.iter().any(|u: &User| home(&r, "user", &u.id) == "n1")
    {
        users.push(nodes[users.len() % 2].user("fz").await);
        assert!(users.len() < 60);
    }
    let frozen = users
        .iter()
        .find(|u| home(&r, "user", &u.id) == "n3")
        .cloned()
        .expect("on n3");
    let alive = users
        .iter()
        .find(|u| home(&r, "user", &u.id) == "n1")
        .cloned()
        .expect("on n1");
    // A device on the node about to freeze, of a user homed elsewhere.
    let mut on_frozen = nodes[2].ws(&alive.token).await;
    on_frozen.sync(0).await;
    nodes[2].signal(libc::SIGSTOP);
    // It closes nothing, but it stops answering pings: the others mark it down.
    let started = Instant::now();
    loop {
        let v = admin_cluster(&nodes[0], Some("test-admin-token")).await;
        if statuses(&v.body)[2].1 == "down" {
            break;
        }
        assert!(
            started.elapsed().as_secs() < 30,
            "never marked down: {}",
            v.text
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    eprintln!(
        "a frozen node was marked down after {:?}",
        started.elapsed()
    );
    let p = nodes[0]
        .get(&format!("/users/{}", frozen.id), Some(&alive.token))
        .await;
    assert_http_error(&p, 503, "owner_unavailable", "a user on a frozen node");
    nodes[2].signal(libc::SIGCONT);
    for n in &nodes {
        n.wait_links(2).await;
    }
    let back = nodes[0]
        .get(&format!("/users/{}", frozen.id), Some(&alive.token))
        .await;
    assert_eq!(back.status, 200, "{}", back.text);
    // The device on the thawed node is never silently stuck: it gets what is sent to
    // its user, or it is closed (and its client reconnects and syncs).
    let sender = nodes[1].user("fzs").await;
    let mut sw = nodes[1].ws(&sender.token).await;
    sw.sync(0).await;
    sw.send_to_user(&alive.id, "after the thaw").await;
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match on_frozen.next_event(left).await {
            Event::Json(f) if f["type"] == "message" => {
                assert_eq!(f["message"]["body"], "after the thaw");
                break;
            }
            Event::Json(_) | Event::Binary(_) => {}
            Event::Closed(code) => {
                eprintln!("the device on the thawed node was closed ({code:?})");
                break;
            }
            Event::Timeout => {
                panic!("a device on the thawed node is stuck: no message, not closed")
            }
        }
    }
}

#[tokio::test]
async fn registrations_refused_while_a_node_is_down_can_be_retried() {
    let mut nodes = Node::start_cluster(3, "").await;
    nodes[2].kill9();
    // Some of these land on the dead node (the user's home or the handle's): 503.
    let mut refused = Vec::new();
    for i in 0..24 {
        let handle = unique_handle("rg");
        let r = nodes[i % 2].create_user(&handle, "password123").await;
        match r.status {
            201 => {}
            503 => refused.push(handle),
            other => panic!("registration answered {other}: {}", r.text),
        }
    }
    assert!(
        !refused.is_empty(),
        "the ring placed nothing on the dead node"
    );
    nodes[2].restart().await;
    for n in &nodes {
        n.wait_links(2).await;
    }
    // Retried with the same password, each one succeeds: no handle was lost to the
    // failed attempt.
    for handle in &refused {
        let r = nodes[0].create_user(handle, "password123").await;
        assert_eq!(r.status, 201, "retry of {handle}: {}", r.text);
        let l = nodes[1].login(handle, "password123").await;
        assert_eq!(l.status, 200, "login as {handle}: {}", l.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_reaches_a_watcher_connected_to_another_node() {
    let nodes = Node::start_cluster(3, "").await;
    let r = ring(3);
    let a = nodes[0].user("wa").await;
    let b = nodes[1].user("wb").await;
    // a watches b from a node that is not b's home (the events cross a link).
    let b_home = idx(&home(&r, "user", &b.id));
    let watch_from = (b_home + 1) % 3;
    let mut aw = nodes[watch_from].ws(&a.token).await;
    aw.sync(0).await;
    aw.send_to_user(&b.id, "hi").await;
    aw.send_json(&json!({"type": "subscribe_presence", "user_ids": [b.id]}))
        .await;
    let first = aw
        .recv_where("presence of b", |v| {
            v["type"] == "presence" && v["user_id"] == b.id.as_str()
        })
        .await;
    assert_eq!(first["online"], false, "{first}");
    let mut bw = nodes[(b_home + 2) % 3].ws(&b.token).await;
    bw.sync(0).await;
    let online = aw
        .recv_where("b online", |v| {
            v["type"] == "presence" && v["online"] == true
        })
        .await;
    assert_eq!(online["user_id"], b.id.as_str());
    bw.close().await;
    let offline = aw
        .recv_where("b offline", |v| {
            v["type"] == "presence" && v["online"] == false
        })
        .await;
    assert!(offline["last_seen"].is_u64(), "{offline}");
}
