//! Crash in the middle of a stream: SIGKILL the node while sends are in flight and acks
//! are streaming back. Every ack received before the kill must survive; after the
//! restart the clients retry every send they made (acked or not), and each message must
//! then exist exactly once, with gap-free seqs and a gap-free recipient inbox.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use std::time::Duration;
use tokio::sync::Notify;

use common::*;
use serde_json::{json, Value};

const SENDERS: usize = 4;
/// Sends each connection keeps unacked at once.
const WINDOW: usize = 32;
/// Kill once this many acks have arrived in total.
const KILL_AFTER_ACKS: usize = 300;
const MAX_PER_SENDER: usize = 2000;

struct Outcome {
    frames: Vec<Value>,
    acks: HashMap<String, Value>,
}

/// Sends with a window until the connection dies (or the cap), recording acks.
async fn stream_until_dead(
    mut ws: Ws,
    to: String,
    tag: usize,
    acked: Arc<AtomicUsize>,
    threshold: Arc<Notify>,
) -> Outcome {
    let mut frames = Vec::new();
    let mut acks = HashMap::new();
    let mut in_flight = 0usize;
    loop {
        while in_flight < WINDOW && frames.len() < MAX_PER_SENDER {
            let frame = json!({"type": "send", "client_msg_id": new_uuid(), "to_user": to,
                               "body": format!("s{tag} m{}", frames.len())});
            if !ws.try_send_text(frame.to_string()).await {
                return Outcome { frames, acks };
            }
            frames.push(frame);
            in_flight += 1;
        }
        match ws.next_event(Duration::from_secs(20)).await {
            Event::Json(v) if v["type"] == "ack" => {
                acks.insert(str_field(&v, "client_msg_id").to_string(), v);
                if acked.fetch_add(1, Ordering::SeqCst) + 1 == KILL_AFTER_ACKS {
                    // Wake the killer at once: the tighter the kill follows an ack, the
                    // more likely an ack given too early is caught unflushed.
                    threshold.notify_one();
                }
                in_flight -= 1;
            }
            Event::Json(v) if v["type"] == "error" => panic!("error frame during the stream: {v}"),
            Event::Json(_) => {}
            Event::Closed(_) | Event::Timeout => return Outcome { frames, acks },
            other => panic!("unexpected event {other:?}"),
        }
    }
}

/// Kill/restart rounds per test run. A premature ack is unflushed only for a
/// millisecond or two, so one round catches it about half the time (checked by
/// planting one); three rounds make a miss rare.
const ROUNDS: usize = 3;

#[tokio::test]
async fn kill9_mid_stream_loses_and_repeats_nothing() {
    let mut node = Node::start("sends_per_second = 100000").await;
    for _ in 0..ROUNDS {
        crash_round(&mut node).await;
    }
}

async fn crash_round(node: &mut Node) {
    let r = node.user("crr").await;
    let mut senders = Vec::new();
    for _ in 0..SENDERS {
        senders.push(node.user("crs").await);
    }
    let acked = Arc::new(AtomicUsize::new(0));
    let threshold = Arc::new(Notify::new());
    let mut tasks = Vec::new();
    for (i, s) in senders.iter().enumerate() {
        let ws = node.ws(&s.token).await;
        tasks.push(tokio::spawn(stream_until_dead(
            ws,
            r.id.clone(),
            i,
            Arc::clone(&acked),
            Arc::clone(&threshold),
        )));
    }
    tokio::time::timeout(Duration::from_secs(60), threshold.notified())
        .await
        .expect("acks did not arrive");
    node.kill9();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.expect("sender task"));
    }
    let acked_total: usize = outcomes.iter().map(|o| o.acks.len()).sum();
    let sent_total: usize = outcomes.iter().map(|o| o.frames.len()).sum();
    assert!(acked_total >= KILL_AFTER_ACKS, "{acked_total} acks");
    assert!(
        sent_total > acked_total,
        "the kill should catch sends in flight ({sent_total} sent, {acked_total} acked)"
    );

    node.restart().await;

    // Each sender retries everything it sent, acked or not, with the same ids.
    let mut total_messages = 0;
    for (s, o) in senders.iter().zip(&outcomes) {
        let mut ws = node.ws(&s.token).await;
        let mut conversation = None;
        for frame in &o.frames {
            ws.send_json(frame).await;
            let cmid = str_field(frame, "client_msg_id");
            let ack = ws.ack_for(cmid).await;
            if let Some(before) = o.acks.get(cmid) {
                assert_eq!(
                    &ack, before,
                    "an ack given before the kill must be given again, unchanged"
                );
            }
            conversation = Some(str_field(&ack, "conversation_id").to_string());
        }
        let cid = conversation.expect("sent something");
        let history = node.full_history(&s.token, &cid).await;
        let cmids: Vec<&str> = history
            .iter()
            .map(|m| str_field(m, "client_msg_id"))
            .collect();
        let distinct: HashSet<&str> = cmids.iter().copied().collect();
        assert_eq!(distinct.len(), cmids.len(), "a client_msg_id stored twice");
        let sent: HashSet<&str> = o
            .frames
            .iter()
            .map(|f| str_field(f, "client_msg_id"))
            .collect();
        assert_eq!(distinct, sent, "history holds exactly what was sent");
        let seqs: Vec<u64> = history.iter().map(|m| u64_field(m, "seq")).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "seq gap");
        total_messages += history.len();
    }

    // The recipient's inbox: every message once, inbox_seq gap-free. Fan-out follows
    // the ack, so what the replay lacks must arrive live.
    let mut rw = node.ws(&r.token).await;
    let mut synced = rw.sync(0).await;
    if synced.messages.len() < total_messages {
        let missing = total_messages - synced.messages.len();
        synced.messages.extend(rw.recv_messages(missing).await);
    }
    let ids: HashSet<String> = synced
        .messages
        .iter()
        .map(|m| str_field(&m["message"], "message_id").to_string())
        .collect();
    assert_eq!(
        ids.len(),
        synced.messages.len(),
        "a message delivered twice"
    );
    assert_eq!(
        synced.messages.len(),
        total_messages,
        "every message reaches the inbox"
    );
    let inbox: Vec<u64> = synced
        .messages
        .iter()
        .map(|m| u64_field(m, "inbox_seq"))
        .collect();
    assert_eq!(
        inbox,
        (1..=inbox.len() as u64).collect::<Vec<_>>(),
        "inbox_seq gap"
    );
}
