//! Nodes added and removed at run time, as an operator does it: edit cluster.toml, start
//! the new node, SIGHUP (or `POST /admin/reload`) every node. Clients keep sending
//! throughout; afterwards every acked message is in every member's inbox exactly once,
//! seqs have no gap, and each node owns exactly what the ring says.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use switchboard::net::ring::Ring;

/// What a sender got acked.
#[derive(Debug, Clone)]
struct Acked {
    conversation: String,
    seq: u64,
    body: String,
}

enum Target {
    User(String),
    Conversation(String),
}

/// One client sending to one target until told to stop, through the nodes of `ports`
/// in turn (the list changes as nodes join and leave), retrying each unacked send with
/// the same `client_msg_id`.
async fn sender(
    name: String,
    token: String,
    target: Target,
    ports: Arc<Mutex<Vec<u16>>>,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
) {
    let mut client = Roamer::new(&token);
    let mut connects = 0usize;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let body = format!("{name}#{i}");
        let mut frame = match &target {
            Target::User(u) => json!({"to_user": u}),
            Target::Conversation(c) => json!({"conversation_id": c}),
        };
        frame["type"] = json!("send");
        frame["client_msg_id"] = json!(new_uuid());
        frame["body"] = json!(body);
        let next_port = || {
            connects += 1;
            let p = ports.lock().unwrap();
            p[connects % p.len()]
        };
        // Only "try again" errors during a ring change: anything else fails the test.
        let retry_on = ["owner_unavailable", "rate_limited"];
        let v = client
            .send_until_acked(&frame, next_port, &retry_on, Duration::from_secs(60))
            .await;
        acked.lock().unwrap().push(Acked {
            conversation: str_field(&v, "conversation_id").to_string(),
            seq: u64_field(&v, "seq"),
            body,
        });
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn ring(nodes: &[&str]) -> Ring {
    Ring::new(nodes.iter().map(|s| s.to_string()), 64)
}

/// Entities per node as `ring` homes `keys`.
fn predicted(ring: &Ring, keys: &[String]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for k in keys {
        *out.entry(ring.owner(k.as_bytes()).unwrap().to_string())
            .or_insert(0) += 1;
    }
    out
}

/// `(node, owned_entities)` from `GET /admin/cluster`, and each node's status.
fn owned(view: &Value) -> (BTreeMap<String, u64>, BTreeMap<String, String>) {
    let mut owned = BTreeMap::new();
    let mut status = BTreeMap::new();
    for n in view["nodes"].as_array().expect("nodes") {
        let id = str_field(n, "id").to_string();
        owned.insert(id.clone(), u64_field(n, "owned_entities"));
        status.insert(id, str_field(n, "status").to_string());
    }
    (owned, status)
}

async fn upload(node: &Node, token: &str, bytes: &[u8]) -> String {
    let r = node
        .call_raw(
            reqwest::Method::POST,
            &node.api("/media"),
            &[
                ("Authorization", &format!("Bearer {token}")),
                ("Content-Type", "application/octet-stream"),
            ],
            Some(bytes.to_vec()),
        )
        .await;
    assert_eq!(r.status, 201, "upload: {}", r.text);
    str_field(&r.body, "media_id").to_string()
}

async fn download(node: &Node, token: &str, id: &str) -> Resp {
    node.call_raw(
        reqwest::Method::GET,
        &node.api(&format!("/media/{id}")),
        &[("Authorization", &format!("Bearer {token}"))],
        None,
    )
    .await
}

/// Every message `user` has, per conversation, in inbox order (a fresh device that
/// syncs from the start).
async fn inbox(port: u16, token: &str) -> HashMap<String, Vec<(u64, String)>> {
    let mut ws = ws_to(port, token).await.expect("connect");
    let synced = ws.sync(0).await;
    let mut out: HashMap<String, Vec<(u64, String)>> = HashMap::new();
    for frame in synced.messages {
        let m = &frame["message"];
        out.entry(str_field(m, "conversation_id").to_string())
            .or_default()
            .push((
                u64_field(m, "seq"),
                m["body"].as_str().unwrap_or("").to_string(),
            ));
    }
    out
}

/// Twelve users on a cluster, six direct pairs and a group of six, one upload through
/// each of the first three nodes; nine clients sending continuously while the test
/// changes the cluster, then checks that nothing was lost, repeated or reordered.
struct Workload {
    users: Vec<User>,
    group_id: String,
    group_conv: String,
    media: Vec<(String, usize, Vec<u8>)>,
    ports: Arc<Mutex<Vec<u16>>>,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
    senders: Vec<tokio::task::JoinHandle<()>>,
}

impl Workload {
    async fn start(nodes: &[Node]) -> Workload {
        let mut users = Vec::new();
        for i in 0..12 {
            users.push(nodes[i % 3].user("mv").await);
        }
        let members: Vec<&str> = users[1..6].iter().map(|u| u.id.as_str()).collect();
        let g = nodes[0]
            .post(
                "/groups",
                Some(&users[0].token),
                &json!({"name": "movers", "members": members}),
            )
            .await;
        assert_eq!(g.status, 201, "{}", g.text);
        let group_id = str_field(&g.body, "group_id").to_string();
        let group_conv = str_field(&g.body, "conversation_id").to_string();
        // One upload through each node (each is stored where it arrives).
        let mut media = Vec::new();
        for (i, node) in nodes.iter().enumerate().take(3) {
            let bytes: Vec<u8> = (0..300_000u32).map(|b| (b % 241) as u8 ^ i as u8).collect();
            let id = upload(node, &users[i].token, &bytes).await;
            media.push((id, i, bytes));
        }
        let mut w = Workload {
            users,
            group_id,
            group_conv,
            media,
            ports: Arc::new(Mutex::new(nodes.iter().map(|n| n.port).collect())),
            stop: Arc::new(AtomicBool::new(false)),
            acked: Arc::new(Mutex::new(Vec::new())),
            senders: Vec::new(),
        };
        for pair in 0..6 {
            let (from, to) = (&w.users[2 * pair], &w.users[2 * pair + 1]);
            let task = sender(
                format!("d{pair}"),
                from.token.clone(),
                Target::User(to.id.clone()),
                Arc::clone(&w.ports),
                Arc::clone(&w.stop),
                Arc::clone(&w.acked),
            );
            w.senders.push(tokio::spawn(task));
        }
        for (k, u) in [0usize, 3, 5].into_iter().enumerate() {
            let task = sender(
                format!("g{k}"),
                w.users[u].token.clone(),
                Target::Conversation(w.group_conv.clone()),
                Arc::clone(&w.ports),
                Arc::clone(&w.stop),
                Arc::clone(&w.acked),
            );
            w.senders.push(tokio::spawn(task));
        }
        w
    }

    /// Stops the senders; what they got acked.
    async fn stop(&mut self) -> Vec<Acked> {
        self.stop.store(true, Ordering::Relaxed);
        for s in self.senders.drain(..) {
            s.await.expect("sender");
        }
        self.acked.lock().unwrap().clone()
    }

    /// Every ring key the workload created.
    fn keys(&self, acked: &[Acked]) -> Vec<String> {
        let mut keys: Vec<String> = Vec::new();
        for u in &self.users {
            keys.push(format!("user:{}", u.id));
            keys.push(format!("handle:{}", u.handle));
        }
        let convs: HashSet<&String> = acked.iter().map(|a| &a.conversation).collect();
        keys.extend(convs.into_iter().map(|c| format!("conversation:{c}")));
        keys.push(format!("group:{}", self.group_id));
        keys.extend(self.media.iter().map(|(id, _, _)| format!("media:{id}")));
        keys
    }

    /// Every acked message is in its conversation's history once, at its seq, seqs
    /// have no gap, nothing is stored twice; every member's inbox (a fresh device
    /// syncing from the start) holds each message of its conversations once, in seq
    /// order; media are readable. Through `via`.
    async fn verify(&self, via: &Node, acked: &[Acked]) {
        let mut by_conv: BTreeMap<String, Vec<&Acked>> = BTreeMap::new();
        for a in acked {
            by_conv.entry(a.conversation.clone()).or_default().push(a);
        }
        let pair_of = |conv: &str| -> usize {
            let a = by_conv[conv][0];
            a.body[1..a.body.find('#').unwrap()].parse().unwrap()
        };
        let mut member_of: HashMap<&str, Vec<String>> = HashMap::new();
        let mut histories: HashMap<String, Vec<(u64, String)>> = HashMap::new();
        for conv in by_conv.keys() {
            let members: Vec<&User> = if *conv == self.group_conv {
                self.users[0..6].iter().collect()
            } else {
                let pair = pair_of(conv);
                vec![&self.users[2 * pair], &self.users[2 * pair + 1]]
            };
            for u in &members {
                member_of
                    .entry(u.id.as_str())
                    .or_default()
                    .push(conv.clone());
            }
            let list = via.seq_bodies(&members[0].token, conv).await;
            let seqs: Vec<u64> = list.iter().map(|(s, _)| *s).collect();
            assert_eq!(
                seqs,
                (1..=seqs.len() as u64).collect::<Vec<_>>(),
                "conversation {conv}: seqs without gaps"
            );
            let mut seen = HashSet::new();
            for (_, body) in &list {
                assert!(
                    body.starts_with('{') || seen.insert(body.clone()),
                    "conversation {conv}: {body} stored twice"
                );
            }
            for a in &by_conv[conv] {
                assert!(
                    list.contains(&(a.seq, a.body.clone())),
                    "acked {} (seq {}) missing from {conv}",
                    a.body,
                    a.seq
                );
            }
            histories.insert(conv.clone(), list);
        }
        for u in &self.users {
            let expected = member_of.get(u.id.as_str()).cloned().unwrap_or_default();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let got = inbox(via.port, &u.token).await;
                let complete = expected
                    .iter()
                    .all(|c| got.get(c).map(Vec::len) == Some(histories[c].len()));
                if complete || Instant::now() > deadline {
                    for c in &expected {
                        assert_eq!(
                            got.get(c),
                            Some(&histories[c]),
                            "user {} inbox for {c}: every message once, in seq order",
                            u.handle
                        );
                    }
                    break;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        for (id, i, bytes) in &self.media {
            let r = download(via, &self.users[*i].token, id).await;
            assert_eq!(r.status, 200, "media {id}: {}", r.text);
            assert!(r.text == String::from_utf8_lossy(bytes), "media {id} bytes");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_added_then_one_removed_under_load_loses_nothing() {
    let mut nodes = Node::start_cluster(3, "").await;
    let mut load = Workload::start(&nodes).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // ---- add n4: its entry in the file, start it, reload everyone (both ways).
    let joined = Instant::now();
    let mut n4 = nodes[0].join("n4");
    let r = nodes[0].reload().await;
    assert_eq!(r.status, 200, "reload: {}", r.text);
    nodes[1].signal(libc::SIGHUP);
    let r = nodes[2].reload().await;
    assert_eq!(r.status, 200, "reload: {}", r.text);
    n4.wait_serving().await;
    nodes.push(n4);
    for n in &nodes {
        n.wait_ring(2, Duration::from_secs(60)).await;
    }
    let add_took = joined.elapsed();
    load.ports.lock().unwrap().push(nodes[3].port);
    let after_add = nodes[3].cluster().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // ---- remove n2: out of the file, SIGHUP everyone, n2 included.
    let removing = Instant::now();
    load.ports.lock().unwrap().retain(|p| *p != nodes[1].port);
    nodes[0].drop_from_config("n2");
    for n in &nodes {
        n.signal(libc::SIGHUP);
    }
    let code = nodes[1].wait_exit(Duration::from_secs(60)).await;
    assert_eq!(code, Some(0), "the leaving node stops by itself, cleanly");
    for i in [0, 2, 3] {
        nodes[i].wait_ring(3, Duration::from_secs(60)).await;
    }
    let remove_took = removing.elapsed();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let acked = load.stop().await;
    eprintln!(
        "acked {} messages; adding n4 took {add_took:?}, removing n2 {remove_took:?}",
        acked.len()
    );
    assert!(
        acked.len() > 100,
        "load kept flowing: {} acked",
        acked.len()
    );
    load.verify(&nodes[3], &acked).await;

    // ---- ownership is exactly the ring's, after each change.
    let keys = load.keys(&acked);
    let (owned_after_add, status) = owned(&after_add);
    assert_eq!(
        owned_after_add,
        predicted(&ring(&["n1", "n2", "n3", "n4"]), &keys),
        "after adding n4, each node owns what the ring says: {after_add}"
    );
    assert!(status.values().all(|s| s == "up"), "{after_add}");
    let moved_to_n4 = owned_after_add["n4"];
    let share = moved_to_n4 as f64 / keys.len() as f64;
    assert!(
        (0.1..=0.45).contains(&share),
        "about a quarter of the entities moved to n4: {moved_to_n4} of {}",
        keys.len()
    );
    let view = nodes[0].cluster().await;
    assert_eq!(u64_field(&view, "ring_version"), 3, "{view}");
    assert_eq!(u64_field(&view, "handoffs_pending"), 0, "{view}");
    let (owned_final, status) = owned(&view);
    assert_eq!(
        owned_final,
        predicted(&ring(&["n1", "n3", "n4"]), &keys),
        "after removing n2, each node owns what the ring says: {view}"
    );
    assert!(status.values().all(|s| s == "up"), "{view}");

    // ---- n2 comes back on its old data dir: it joins like a new node.
    nodes[1].rejoin();
    for i in [0, 2, 3] {
        nodes[i].signal(libc::SIGHUP);
    }
    nodes[1].wait_serving().await;
    for n in &nodes {
        n.wait_ring(4, Duration::from_secs(60)).await;
    }
    let view = nodes[1].cluster().await;
    let (owned_back, _) = owned(&view);
    assert_eq!(
        owned_back,
        predicted(&ring(&["n1", "n2", "n3", "n4"]), &keys),
        "n2 back: {view}"
    );
    load.verify(&nodes[1], &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_survives_a_frozen_new_node_and_a_killed_old_one() {
    let mut nodes = Node::start_cluster(3, "").await;
    let mut load = Workload::start(&nodes).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // n4 joins; n2 and n3 take the new file, and every node hears n4; then n4 freezes
    // and n1 takes the file last: all three agree (on what n4 last said) and start
    // handing off to it, and every batch to it fails.
    let mut n4 = nodes[0].join("n4");
    nodes[1].signal(libc::SIGHUP);
    nodes[2].signal(libc::SIGHUP);
    n4.wait_serving().await;
    // (Ring states go out every half second: let every node hear n4's.)
    tokio::time::sleep(Duration::from_millis(1500)).await;
    n4.signal(libc::SIGSTOP);
    let r = nodes[0].reload().await;
    assert_eq!(r.status, 200, "reload: {}", r.text);
    // A node with something to move to n4 (which one depends on the random ids) is
    // killed in the middle of its handoff, and restarted.
    let deadline = Instant::now() + Duration::from_secs(30);
    let victim = loop {
        let failing = (0..3).find(|i| nodes[*i].log_tail(400).contains("handoff batch failed"));
        if let Some(i) = failing {
            break i;
        }
        assert!(Instant::now() < deadline, "no node tried to hand off to n4");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    nodes[victim].kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    nodes[victim].restart().await;
    n4.signal(libc::SIGCONT);
    nodes.push(n4);
    for n in &nodes {
        n.wait_ring(2, Duration::from_secs(60)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let acked = load.stop().await;
    eprintln!("acked {} messages", acked.len());
    load.verify(&nodes[3], &acked).await;
    let view = nodes[1].cluster().await;
    let (owned_now, _) = owned(&view);
    assert_eq!(
        owned_now,
        predicted(&ring(&["n1", "n2", "n3", "n4"]), &load.keys(&acked)),
        "{view}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_the_cluster_cannot_take_is_refused_and_the_old_ring_kept() {
    let nodes = Node::start_cluster(2, "").await;
    let a = nodes[0].user("fa").await;
    let b = nodes[1].user("fb").await;
    let path = nodes[0].dir_path().join("cluster.toml");
    let good = std::fs::read_to_string(&path).expect("read cluster.toml");
    let refused = |r: &Resp, status: u16, code: &str, what: &str| {
        assert_http_error(r, status, code, what);
    };

    // A file that does not parse, one that moves a running node, one that changes
    // vnodes: each refused with its reason; the node keeps ring version 1.
    std::fs::write(&path, "[cluster\n").unwrap();
    refused(
        &nodes[0].reload().await,
        400,
        "invalid_config",
        "unparsable file",
    );
    let moved = good.replacen(&format!("127.0.0.1:{}", nodes[1].port), "127.0.0.1:1", 1);
    std::fs::write(&path, &moved).unwrap();
    let r = nodes[0].reload().await;
    refused(&r, 409, "reload_refused", "a node's address changed");
    assert!(r.text.contains("n2"), "names the node: {}", r.text);
    std::fs::write(&path, good.replace("vnodes = 64", "vnodes = 32")).unwrap();
    let r = nodes[0].reload().await;
    refused(&r, 409, "reload_refused", "vnodes changed");
    assert!(r.text.contains("vnodes"), "{}", r.text);
    // SIGHUP with a bad file: logged, nothing changes.
    nodes[0].signal(libc::SIGHUP);

    // A node given a file its peer does not have (a third node only n1 knows about):
    // accepted, but nothing moves; n1 says it waits and keeps serving ring 1.
    let (l, port) = free_port();
    drop(l);
    std::fs::write(
        &path,
        format!(
            "{good}\n[[node]]\nid = \"n9\"\nclient_addr = \"127.0.0.1:{port}\"\npeer_addr = \"127.0.0.1:{}\"\ndata_dir = \"/nonexistent\"\n",
            port + 1
        ),
    )
    .unwrap();
    let r = nodes[0].reload().await;
    assert_eq!(r.status, 200, "{}", r.text);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let view = nodes[0].cluster().await;
    assert_eq!(u64_field(&view, "ring_version"), 1, "{view}");
    let (_, status) = owned(&view);
    assert_eq!(
        status.get("n9").map(String::as_str),
        Some("joining"),
        "{view}"
    );
    assert!(
        nodes[0].log_tail(200).contains("keeping the current ring"),
        "the node says why it does not move"
    );
    let mut aw = nodes[1].ws(&a.token).await;
    aw.sync(0).await;
    aw.send_to_user(&b.id, "still served").await;

    // Back to the file everyone has: nothing left to agree on.
    std::fs::write(&path, &good).unwrap();
    let r = nodes[0].reload().await;
    assert_eq!(r.status, 200, "{}", r.text);
    let view = nodes[0].cluster().await;
    let (_, status) = owned(&view);
    assert_eq!(status.len(), 2, "{view}");
    assert!(status.values().all(|s| s == "up"), "{view}");
    assert_eq!(u64_field(&view, "ring_version"), 1, "{view}");
    aw.send_to_user(&b.id, "and still").await;
}
