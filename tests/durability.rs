//! Durability: every acked message survives a SIGKILL the moment after its
//! ack, exactly once, with gap-free sequences, and idempotency survives too.

mod common;

use std::collections::{HashMap, HashSet};

use common::*;
use serde_json::{json, Value};

const SENDERS: usize = 4;
const CONNS_PER_SENDER: usize = 2;
const PER_CONN: usize = 25;
const PER_SENDER: usize = CONNS_PER_SENDER * PER_CONN;
const TOTAL: usize = SENDERS * PER_SENDER;

/// One acked send: the frame sent and the ack received.
struct Sent {
    frame: Value,
    ack: Value,
}

#[tokio::test]
async fn acked_messages_survive_kill9() {
    let mut node = Node::start("sends_per_second = 100000").await;
    let r = node.user("dur").await;
    let mut senders = Vec::new();
    for _ in 0..SENDERS {
        senders.push(node.user("dus").await);
    }

    // Burst over several connections at once.
    let mut tasks = Vec::new();
    for (si, s) in senders.iter().enumerate() {
        for ci in 0..CONNS_PER_SENDER {
            let mut ws = node.ws(&s.token).await;
            let to = r.id.clone();
            tasks.push(tokio::spawn(async move {
                let mut frames = Vec::new();
                for i in 0..PER_CONN {
                    let frame = json!({"type":"send","client_msg_id":new_uuid(),"to_user":to,
                                       "body":format!("s{si} c{ci} m{i}")});
                    ws.send_json(&frame).await;
                    frames.push(frame);
                }
                let mut out = Vec::new();
                for frame in frames {
                    let ack = ws.ack_for(str_field(&frame, "client_msg_id")).await;
                    out.push(Sent { frame, ack });
                }
                (si, out, ws)
            }));
        }
    }
    let mut by_sender: Vec<Vec<Sent>> = (0..SENDERS).map(|_| Vec::new()).collect();
    let mut conns = Vec::new();
    for t in tasks {
        let (si, out, ws) = t.await.expect("sender task");
        by_sender[si].extend(out);
        conns.push(ws);
    }
    // The moment after the last ack.
    node.kill9();
    drop(conns);
    node.restart().await;

    let mut all_ids: HashSet<String> = HashSet::new();
    let mut cids = Vec::new();
    for (si, sent) in by_sender.iter().enumerate() {
        assert_eq!(sent.len(), PER_SENDER);
        let cid = str_field(&sent[0].ack, "conversation_id").to_string();
        let mut ack_seqs: Vec<u64> = sent
            .iter()
            .map(|s| {
                assert_eq!(s.ack["conversation_id"].as_str(), Some(cid.as_str()));
                u64_field(&s.ack, "seq")
            })
            .collect();
        ack_seqs.sort_unstable();
        assert_eq!(
            ack_seqs,
            (1..=PER_SENDER as u64).collect::<Vec<_>>(),
            "sender {si}: acked seqs"
        );

        let hist = node.full_history(&senders[si].token, &cid).await;
        let seqs: Vec<u64> = hist.iter().map(|m| u64_field(m, "seq")).collect();
        assert_eq!(
            seqs,
            (1..=PER_SENDER as u64).collect::<Vec<_>>(),
            "sender {si}: seqs after restart are 1..N with no gap"
        );
        let by_id: HashMap<&str, &Value> = hist
            .iter()
            .map(|m| (str_field(m, "message_id"), m))
            .collect();
        assert_eq!(by_id.len(), PER_SENDER, "sender {si}: each message once");
        let cmids: HashSet<&str> = hist.iter().map(|m| str_field(m, "client_msg_id")).collect();
        assert_eq!(
            cmids.len(),
            PER_SENDER,
            "sender {si}: each client_msg_id once"
        );
        for s in sent {
            let id = str_field(&s.ack, "message_id");
            let m = by_id
                .get(id)
                .unwrap_or_else(|| panic!("acked message {id} lost after kill -9: {}", s.ack));
            assert_eq!(m["client_msg_id"], s.ack["client_msg_id"]);
            assert_eq!(m["seq"], s.ack["seq"]);
            assert_eq!(m["ts"], s.ack["ts"]);
            assert_eq!(m["body"], s.frame["body"]);
            assert_eq!(m["sender_id"].as_str(), Some(senders[si].id.as_str()));
            all_ids.insert(id.to_string());
        }
        cids.push(cid);
    }
    assert_eq!(all_ids.len(), TOTAL);

    // The recipient's inbox: each message once, inbox_seq 1..M gap-free.
    let mut rw = node.ws(&r.token).await;
    let s = rw.sync(0).await;
    let inbox: Vec<u64> = s
        .messages
        .iter()
        .map(|f| u64_field(f, "inbox_seq"))
        .collect();
    assert_eq!(
        inbox,
        (1..=TOTAL as u64).collect::<Vec<_>>(),
        "recipient inbox_seq"
    );
    assert_eq!(s.inbox_seq, TOTAL as u64);
    let ids: HashSet<String> = s
        .messages
        .iter()
        .map(|f| str_field(&f["message"], "message_id").to_string())
        .collect();
    assert_eq!(ids, all_ids, "recipient inbox = acked messages, each once");

    let convs = node.get("/conversations", Some(&r.token)).await;
    let list = convs.body.as_array().expect("conversations array");
    assert_eq!(list.len(), SENDERS, "{}", convs.text);
    for c in list {
        assert!(
            cids.iter().any(|cid| c["conversation_id"] == cid.as_str()),
            "{c}"
        );
        assert_eq!(c["last_seq"].as_u64(), Some(PER_SENDER as u64), "{c}");
    }

    // A retry of an acked send after the restart returns the identical ack.
    let mut sw = node.ws(&senders[0].token).await;
    let last = by_sender[0].last().expect("sent");
    sw.send_json(&last.frame).await;
    let again = sw.ack_for(str_field(&last.frame, "client_msg_id")).await;
    assert_eq!(again, last.ack, "retry after restart");
    let first = &by_sender[0][0];
    sw.send_json(&first.frame).await;
    let again = sw.ack_for(str_field(&first.frame, "client_msg_id")).await;
    assert_eq!(again, first.ack, "retry after restart");

    // New sends continue at N+1, and reach the live recipient next in its inbox.
    let next = sw.send_to_user(&r.id, "after restart").await;
    assert_eq!(next["conversation_id"].as_str(), Some(cids[0].as_str()));
    assert_eq!(next["seq"].as_u64(), Some(PER_SENDER as u64 + 1));
    let f = rw.recv_type("message").await;
    assert_eq!(f["inbox_seq"].as_u64(), Some(TOTAL as u64 + 1));
    assert_eq!(f["message"]["message_id"], next["message_id"]);
    rw.expect_no_frame_for(QUIET_MS).await;
    let hist = node.full_history(&r.token, &cids[0]).await;
    assert_eq!(hist.len(), PER_SENDER + 1, "the retries stored nothing new");
}
