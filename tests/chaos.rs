//! The chaos test: a three-node cluster with `[chaos] enabled`, users on several devices
//! connected to different nodes sending 1:1 and group messages, while actors are
//! killed many times a second, links are partitioned and whole nodes are killed -9 and
//! restarted, and disks fail for a moment. Then the faults stop, the system settles, and the invariants are checked:
//!
//! - every acked message is in its conversation's history once, at its seq, with no
//!   gap, and no message (acked or not) is stored twice;
//! - every device of every member has received each message of its conversations
//!   exactly once, in seq order, and all devices of a user in the same inbox order
//!   (every device's `inbox_seq`s run 1, 2, 3... with no gap or repeat, across its
//!   reconnections);
//! - receipts seen by a device never go backwards, and `GET .../receipts` is at least
//!   what was seen;
//! - once every connection has closed, every user is offline with a `last_seen`.
//!
//! Short form (CI): `cargo test --test chaos` runs about 40 s of faults. Long form, with
//! a seed: `CHAOS_SECONDS=600 CHAOS_SEED=7 cargo test --release --test chaos -- --nocapture`.
//! It prints what it did and every violation with the details to chase it.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const USERS: usize = 18;
const DEVICES: usize = 2;

/// A small deterministic generator (xorshift64*), so a seed replays the same choices.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[derive(Default)]
struct Tally {
    kills: AtomicU64,
    kills_refused: AtomicU64,
    partitions: AtomicU64,
    disk_faults: AtomicU64,
    node_restarts: AtomicU64,
    reconnects: AtomicU64,
    retries: AtomicU64,
}

#[derive(Debug, Clone)]
struct Acked {
    conversation: String,
    seq: u64,
    body: String,
}

/// What one device saw.
#[derive(Default)]
struct Device {
    /// Every message event in arrival order: (inbox_seq, conversation, seq, body).
    got: Vec<(u64, String, u64, String)>,
    /// Highest receipt seen per (conversation, user, status).
    receipts: HashMap<(String, String, String), u64>,
}

type Violations = Arc<Mutex<Vec<String>>>;

fn violation(v: &Violations, what: String) {
    eprintln!("VIOLATION: {what}");
    v.lock().unwrap().push(what);
}

/// A device: connects to a random live node, syncs from its cursor, takes live
/// messages, marks some read; reconnects whenever its connection breaks.
#[allow(clippy::too_many_arguments)]
async fn device(
    name: String,
    token: String,
    ports: Vec<u16>,
    mut rng: Rng,
    stop: Arc<AtomicBool>,
    marks_read: bool,
    state: Arc<Mutex<Device>>,
    tally: Arc<Tally>,
    violations: Violations,
) {
    let mut cursor = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let port = ports[rng.below(ports.len())];
        let Ok(mut ws) = ws_to(port, &token).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        tally.reconnects.fetch_add(1, Ordering::Relaxed);
        if !ws
            .try_send_text(json!({"type": "sync", "after": cursor}).to_string())
            .await
        {
            continue;
        }
        let mut received = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let v = match ws.next_event(Duration::from_millis(500)).await {
                Event::Json(v) => v,
                Event::Timeout => continue,
                Event::Binary(_) => continue,
                Event::Closed(_) => break,
            };
            match v["type"].as_str() {
                Some("message") => {
                    let inbox_seq = u64_field(&v, "inbox_seq");
                    let m = &v["message"];
                    let conv = str_field(m, "conversation_id").to_string();
                    let seq = u64_field(m, "seq");
                    if inbox_seq != cursor + 1 {
                        violation(
                            &violations,
                            format!(
                                "{name}: inbox_seq {inbox_seq} after {cursor} ({conv} seq {seq}) on port {port}"
                            ),
                        );
                    }
                    cursor = cursor.max(inbox_seq);
                    let body = m["body"].as_str().unwrap_or("").to_string();
                    state
                        .lock()
                        .unwrap()
                        .got
                        .push((inbox_seq, conv.clone(), seq, body));
                    received += 1;
                    if marks_read && received.is_multiple_of(16) {
                        let mark = json!({"type": "read", "conversation_id": conv, "seq": seq});
                        let _ = ws.try_send_text(mark.to_string()).await;
                    }
                }
                Some("receipt") => {
                    let key = (
                        str_field(&v, "conversation_id").to_string(),
                        str_field(&v, "user_id").to_string(),
                        str_field(&v, "status").to_string(),
                    );
                    let seq = u64_field(&v, "seq");
                    let mut st = state.lock().unwrap();
                    let seen = st.receipts.entry(key.clone()).or_insert(0);
                    if seq < *seen {
                        violation(
                            &violations,
                            format!("{name}: receipt {key:?} went back from {seen} to {seq}"),
                        );
                    }
                    *seen = (*seen).max(seq);
                }
                _ => {}
            }
        }
    }
}

/// A sender: sends to a random one of its conversations, retrying each send (same
/// `client_msg_id`) until acked, through whichever node it reaches.
#[allow(clippy::too_many_arguments)]
async fn sender(
    name: String,
    token: String,
    targets: Vec<Value>,
    ports: Vec<u16>,
    mut rng: Rng,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
    tally: Arc<Tally>,
) {
    let mut client = Roamer::new(&token);
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let body = format!("{name}#{i}");
        let mut frame = targets[rng.below(targets.len())].clone();
        frame["type"] = json!("send");
        frame["client_msg_id"] = json!(new_uuid());
        frame["body"] = json!(body);
        let retried = client.retries;
        let pick = Rng::new(rng.next());
        let v = client
            .send_until_acked(
                &frame,
                {
                    let mut pick = pick;
                    let ports = &ports;
                    move || ports[pick.below(ports.len())]
                },
                // Storage errors are expected too: the run injects disk faults.
                &["owner_unavailable", "rate_limited", "storage_error"],
                Duration::from_secs(90),
            )
            .await;
        tally
            .retries
            .fetch_add(client.retries - retried, Ordering::Relaxed);
        acked.lock().unwrap().push(Acked {
            conversation: str_field(&v, "conversation_id").to_string(),
            seq: u64_field(&v, "seq"),
            body,
        });
        tokio::time::sleep(Duration::from_millis(150 + rng.below(100) as u64)).await;
    }
}

/// Waits (up to 60 s) until `missing(user, device)` is 0 for every device; a violation
/// naming the devices still behind if not.
async fn wait_for_devices(
    devices: &[(usize, Arc<Mutex<Device>>)],
    violations: &Violations,
    what: &str,
    missing: impl Fn(usize, &Device) -> usize,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let behind: Vec<String> = devices
            .iter()
            .filter_map(|(u, d)| {
                let n = missing(*u, &d.lock().unwrap());
                (n > 0).then(|| format!("user {u} missing {n}"))
            })
            .collect();
        if behind.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            let list = behind.join(", ");
            violation(violations, format!("devices never got {what}: {list}"));
            return;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn admin_post(node: &Node, path: &str, body: &Value) -> Resp {
    node.admin(reqwest::Method::POST, path, Some(body)).await
}

/// The faults: actor kills many times a second, a partition every few seconds, a
/// node killed -9 and restarted every so often. Gives the nodes back at the end.
async fn faults(
    mut nodes: Vec<Node>,
    entities: Vec<String>,
    mut rng: Rng,
    until: Instant,
    tally: Arc<Tally>,
) -> Vec<Node> {
    let mut next_partition = Instant::now() + Duration::from_secs(2);
    let mut next_restart = Instant::now() + Duration::from_secs(8);
    let mut next_disk_fault = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        let node = rng.below(nodes.len());
        let target = if rng.below(2) == 0 {
            "random".to_string()
        } else {
            entities[rng.below(entities.len())].clone()
        };
        let r = admin_post(
            &nodes[node],
            "/admin/chaos/kill",
            &json!({"target": target}),
        )
        .await;
        if r.status == 200 {
            tally.kills.fetch_add(1, Ordering::Relaxed);
        } else {
            tally.kills_refused.fetch_add(1, Ordering::Relaxed);
        }
        if Instant::now() >= next_partition {
            let from = rng.below(nodes.len());
            let to = (from + 1 + rng.below(nodes.len() - 1)) % nodes.len();
            let ms = 500 + rng.below(1500);
            let peer = nodes[to].id.clone();
            let r = admin_post(
                &nodes[from],
                "/admin/chaos/partition",
                &json!({"peer": peer, "for_ms": ms}),
            )
            .await;
            if r.status == 200 {
                tally.partitions.fetch_add(1, Ordering::Relaxed);
            }
            next_partition = Instant::now() + Duration::from_millis(2000 + rng.below(2000) as u64);
        }
        if Instant::now() >= next_disk_fault {
            let victim = rng.below(nodes.len());
            let ms = 200 + rng.below(400);
            let r = admin_post(
                &nodes[victim],
                "/admin/chaos/storage",
                &json!({"fail_for_ms": ms}),
            )
            .await;
            if r.status == 200 {
                tally.disk_faults.fetch_add(1, Ordering::Relaxed);
            }
            next_disk_fault = Instant::now() + Duration::from_millis(5000 + rng.below(5000) as u64);
        }
        if Instant::now() >= next_restart {
            let victim = rng.below(nodes.len());
            nodes[victim].kill9();
            tokio::time::sleep(Duration::from_millis(500 + rng.below(1000) as u64)).await;
            nodes[victim].restart().await;
            tally.node_restarts.fetch_add(1, Ordering::Relaxed);
            next_restart = Instant::now() + Duration::from_millis(9000 + rng.below(6000) as u64);
        }
        tokio::time::sleep(Duration::from_millis(30 + rng.below(40) as u64)).await;
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_loses_repeats_and_reorders_nothing() {
    let seconds: u64 = std::env::var("CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| now_ms() % 1_000_000);
    eprintln!("chaos: {seconds} s of faults, seed {seed}");
    let mut rng = Rng::new(seed);
    let nodes = Node::start_cluster(3, "sends_per_second = 1000\n\n[chaos]\nenabled = true").await;
    let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    let mut users = Vec::new();
    for i in 0..USERS {
        users.push(nodes[i % 3].user("ch").await);
    }
    // Two groups of six; the other conversations are direct pairs.
    let mut groups = Vec::new();
    for g in 0..2 {
        let members: Vec<&str> = users[6 * g + 1..6 * g + 6]
            .iter()
            .map(|u| u.id.as_str())
            .collect();
        let r = nodes[g]
            .post(
                "/groups",
                Some(&users[6 * g].token),
                &json!({"name": format!("chaos {g}"), "members": members}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
        groups.push((
            str_field(&r.body, "group_id").to_string(),
            str_field(&r.body, "conversation_id").to_string(),
        ));
    }
    let mut entities: Vec<String> = users.iter().map(|u| format!("user:{}", u.id)).collect();
    for (gid, cid) in &groups {
        entities.push(format!("group:{gid}"));
        entities.push(format!("conversation:{cid}"));
    }

    let stop_senders = Arc::new(AtomicBool::new(false));
    let stop_devices = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let violations: Violations = Arc::new(Mutex::new(Vec::new()));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut devices: Vec<(usize, Arc<Mutex<Device>>)> = Vec::new();
    let mut device_tasks = Vec::new();
    for (u, user) in users.iter().enumerate() {
        for d in 0..DEVICES {
            let state = Arc::new(Mutex::new(Device::default()));
            devices.push((u, Arc::clone(&state)));
            device_tasks.push(tokio::spawn(device(
                format!("{}/{d}", user.handle),
                user.token.clone(),
                ports.clone(),
                Rng::new(rng.next()),
                Arc::clone(&stop_devices),
                d == 0,
                state,
                Arc::clone(&tally),
                Arc::clone(&violations),
            )));
        }
    }
    let mut sender_tasks = Vec::new();
    for (u, user) in users.iter().enumerate() {
        let mut targets = vec![json!({"to_user": users[u ^ 1].id})];
        if u < 12 {
            targets.push(json!({"conversation_id": groups[u / 6].1}));
        }
        sender_tasks.push(tokio::spawn(sender(
            format!("u{u}"),
            user.token.clone(),
            targets,
            ports.clone(),
            Rng::new(rng.next()),
            Arc::clone(&stop_senders),
            Arc::clone(&acked),
            Arc::clone(&tally),
        )));
    }

    let until = Instant::now() + Duration::from_secs(seconds);
    let nodes = faults(
        nodes,
        entities,
        Rng::new(rng.next()),
        until,
        Arc::clone(&tally),
    )
    .await;
    // Faults over: let partitions heal and every link come back, then let the senders
    // finish what they have in flight.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for n in &nodes {
        n.wait_links(2).await;
    }
    stop_senders.store(true, Ordering::Relaxed);
    for t in sender_tasks {
        t.await.expect("sender");
    }
    let acked = acked.lock().unwrap().clone();

    // Histories: every acked message once at its seq, no gap, nothing twice.
    let mut by_conv: BTreeMap<String, Vec<&Acked>> = BTreeMap::new();
    for a in &acked {
        by_conv.entry(a.conversation.clone()).or_default().push(a);
    }
    let member_of = |u: usize| -> Vec<String> {
        let mut convs: Vec<String> = by_conv
            .keys()
            .filter(|c| {
                let g = groups.iter().position(|(_, cid)| cid == *c);
                match g {
                    Some(g) => u / 6 == g && u < 12,
                    None => by_conv[*c].iter().any(|a| {
                        let sender: usize = a.body[1..a.body.find('#').unwrap()].parse().unwrap();
                        sender == u || sender ^ 1 == u
                    }),
                }
            })
            .cloned()
            .collect();
        convs.sort();
        convs
    };
    // Devices first (before anything reads a conversation, which would wake it): each
    // must get every acked message of its conversations by itself.
    wait_for_devices(&devices, &violations, "every acked message", |u, d| {
        let have: std::collections::HashSet<(&str, u64)> =
            d.got.iter().map(|(_, c, s, _)| (c.as_str(), *s)).collect();
        member_of(u)
            .iter()
            .flat_map(|c| by_conv[c].iter())
            .filter(|a| !have.contains(&(a.conversation.as_str(), a.seq)))
            .count()
    })
    .await;
    let mut histories: HashMap<String, Vec<(u64, String)>> = HashMap::new();
    for conv in by_conv.keys() {
        let reader = (0..USERS)
            .find(|u| member_of(*u).contains(conv))
            .expect("a member");
        let list = nodes[0].seq_bodies(&users[reader].token, conv).await;
        let seqs: Vec<u64> = list.iter().map(|(s, _)| *s).collect();
        if seqs != (1..=seqs.len() as u64).collect::<Vec<_>>() {
            violation(&violations, format!("{conv}: seqs with a gap: {seqs:?}"));
        }
        let mut seen = HashMap::new();
        for (seq, body) in &list {
            if !body.starts_with('{') {
                if let Some(first) = seen.insert(body.clone(), *seq) {
                    violation(
                        &violations,
                        format!("{conv}: {body} stored twice (seqs {first} and {seq})"),
                    );
                }
            }
        }
        for a in &by_conv[conv] {
            if !list.contains(&(a.seq, a.body.clone())) {
                violation(
                    &violations,
                    format!(
                        "{conv}: acked {} at seq {} is not in the history",
                        a.body, a.seq
                    ),
                );
            }
        }
        histories.insert(conv.clone(), list);
    }

    // Devices: wait until each has everything, then compare.
    wait_for_devices(&devices, &violations, "the whole history", |u, d| {
        member_of(u)
            .iter()
            .map(|c| {
                let have = d.got.iter().filter(|(_, conv, _, _)| conv == c).count();
                histories[c].len().saturating_sub(have)
            })
            .sum()
    })
    .await;
    let mut inbox_orders: HashMap<usize, Vec<(String, u64)>> = HashMap::new();
    for (u, d) in &devices {
        let d = d.lock().unwrap();
        for conv in member_of(*u) {
            let got: Vec<(u64, String)> = d
                .got
                .iter()
                .filter(|(_, c, _, _)| *c == conv)
                .map(|(_, _, seq, body)| (*seq, body.clone()))
                .collect();
            if got != histories[&conv] {
                let first_diff = got
                    .iter()
                    .zip(&histories[&conv])
                    .position(|(a, b)| a != b)
                    .unwrap_or(got.len().min(histories[&conv].len()));
                violation(
                    &violations,
                    format!(
                        "{}: device has {} messages of {conv}, history {}; first difference at index {first_diff}: device {:?} history {:?}",
                        users[*u].handle,
                        got.len(),
                        histories[&conv].len(),
                        got.get(first_diff),
                        histories[&conv].get(first_diff)
                    ),
                );
            }
        }
        let order: Vec<(String, u64)> = d.got.iter().map(|(_, c, s, _)| (c.clone(), *s)).collect();
        match inbox_orders.get(u) {
            None => {
                inbox_orders.insert(*u, order);
            }
            Some(other) => {
                let n = other.len().min(order.len());
                if other[..n] != order[..n] {
                    violation(
                        &violations,
                        format!(
                            "{}: two devices disagree on the inbox order",
                            users[*u].handle
                        ),
                    );
                }
            }
        }
    }
    // Receipts: what the server reports is at least what any device saw.
    let mut seen_max: HashMap<(String, String, String), u64> = HashMap::new();
    for (_, d) in &devices {
        for (k, v) in &d.lock().unwrap().receipts {
            let e = seen_max.entry(k.clone()).or_insert(0);
            *e = (*e).max(*v);
        }
    }
    if seen_max.is_empty() {
        violation(&violations, "no device saw any receipt".into());
    }
    for conv in by_conv.keys() {
        let reader = (0..USERS)
            .find(|u| member_of(*u).contains(conv))
            .expect("member");
        let r = nodes[0]
            .get(
                &format!("/conversations/{conv}/receipts"),
                Some(&users[reader].token),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        for entry in r.body.as_array().expect("receipts") {
            let user = str_field(entry, "user_id").to_string();
            for (status, field) in [("delivered", "delivered_seq"), ("read", "read_seq")] {
                let key = (conv.clone(), user.clone(), status.to_string());
                if let Some(seen) = seen_max.get(&key) {
                    if u64_field(entry, field) < *seen {
                        violation(
                            &violations,
                            format!(
                                "{key:?}: server says {} after devices saw {seen}",
                                entry[field]
                            ),
                        );
                    }
                }
            }
        }
    }

    // Presence: once every connection has closed, everyone is offline.
    stop_devices.store(true, Ordering::Relaxed);
    for t in device_tasks {
        t.await.expect("device");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for u in &users {
        loop {
            let v = nodes[1].user_obj(&users[0].token, &u.id).await;
            if v["online"] == false && v["last_seen"].is_u64() {
                break;
            }
            if Instant::now() > deadline {
                violation(&violations, format!("{} still online: {v}", u.handle));
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    let t = &tally;
    let summary = json!({
        "seed": seed,
        "seconds": seconds,
        "messages_acked": acked.len(),
        "conversations": by_conv.len(),
        "actor_kills": t.kills.load(Ordering::Relaxed),
        "kills_refused": t.kills_refused.load(Ordering::Relaxed),
        "partitions": t.partitions.load(Ordering::Relaxed),
        "disk_faults": t.disk_faults.load(Ordering::Relaxed),
        "node_restarts": t.node_restarts.load(Ordering::Relaxed),
        "device_connections": t.reconnects.load(Ordering::Relaxed),
        "send_retries": t.retries.load(Ordering::Relaxed),
        "violations": violations.lock().unwrap().len(),
    });
    eprintln!("chaos summary: {summary}");
    let v = violations.lock().unwrap();
    assert!(
        v.is_empty(),
        "{} violations (seed {seed}):\n{}",
        v.len(),
        v.join("\n")
    );
    assert!(acked.len() > 200, "too little got through: {summary}");
    assert!(t.kills.load(Ordering::Relaxed) > 100, "{summary}");
    assert!(t.node_restarts.load(Ordering::Relaxed) >= 2, "{summary}");
}
