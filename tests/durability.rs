//! Durability: every acked message survives a SIGKILL the moment after its
//! ack, exactly once, with gap-free sequences, and idempotency survives too.
//! Several rounds of burst -> kill -9 -> restart -> verify, on one data dir.

mod common;

use std::collections::{HashMap, HashSet};

use common::*;
use serde_json::{json, Value};

const ROUNDS: usize = 3;
const SENDERS: usize = 4;
const CONNS_PER_SENDER: usize = 2;
const PER_CONN: usize = 25;
const PER_SENDER: usize = CONNS_PER_SENDER * PER_CONN;
const PER_ROUND: usize = SENDERS * PER_SENDER;

/// One acked send: the frame sent and the ack received.
struct Sent {
    frame: Value,
    ack: Value,
}

/// Sends a burst of `PER_ROUND` messages to `to` over several connections at
/// once; returns the acked sends per sender once every ack is in, and the
/// still open connections.
async fn burst(node: &Node, senders: &[User], to: &str, round: usize) -> (Vec<Vec<Sent>>, Vec<Ws>) {
    let mut tasks = Vec::new();
    for (si, s) in senders.iter().enumerate() {
        for ci in 0..CONNS_PER_SENDER {
            let mut ws = node.ws(&s.token).await;
            let to = to.to_string();
            tasks.push(tokio::spawn(async move {
                let mut frames = Vec::new();
                for i in 0..PER_CONN {
                    let frame = json!({"type":"send","client_msg_id":new_uuid(),"to_user":to,
                                       "body":format!("r{round} s{si} c{ci} m{i}")});
                    ws.send_json(&frame).await;
                    frames.push(frame);
                }
                let mut out = Vec::new();
                for frame in frames {
                    let ack = ws.ack_for(str_field(&frame, "client_msg_id")).await;
                    out.push(Sent { frame, ack });
                }
                // Keep the connection open until the kill.
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
    (by_sender, conns)
}

/// Checks everything acked so far against the restarted node. Returns the
/// conversation id per sender.
async fn verify(node: &Node, senders: &[User], r: &User, acked: &[Vec<Sent>]) -> Vec<String> {
    let mut all_ids: HashSet<String> = HashSet::new();
    let mut cids = Vec::new();
    for (si, sent) in acked.iter().enumerate() {
        let n = sent.len() as u64;
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
            (1..=n).collect::<Vec<_>>(),
            "sender {si}: acked seqs"
        );

        let hist = node.full_history(&senders[si].token, &cid).await;
        let by_id: HashMap<&str, &Value> = hist
            .iter()
            .map(|m| (str_field(m, "message_id"), m))
            .collect();
        let lost: Vec<u64> = sent
            .iter()
            .filter(|s| !by_id.contains_key(str_field(&s.ack, "message_id")))
            .map(|s| u64_field(&s.ack, "seq"))
            .collect();
        assert!(
            lost.is_empty(),
            "sender {si}: {} of {n} acked messages lost after kill -9 (acked seqs {lost:?}); \
             history has {} messages",
            lost.len(),
            hist.len()
        );
        let seqs: Vec<u64> = hist.iter().map(|m| u64_field(m, "seq")).collect();
        assert_eq!(
            seqs,
            (1..=n).collect::<Vec<_>>(),
            "sender {si}: seqs after restart are 1..N with no gap"
        );
        assert_eq!(by_id.len() as u64, n, "sender {si}: each message once");
        let cmids: HashSet<&str> = hist.iter().map(|m| str_field(m, "client_msg_id")).collect();
        assert_eq!(
            cmids.len() as u64,
            n,
            "sender {si}: each client_msg_id once"
        );
        for s in sent {
            let m = by_id[str_field(&s.ack, "message_id")];
            assert_eq!(m["client_msg_id"], s.ack["client_msg_id"]);
            assert_eq!(m["seq"], s.ack["seq"]);
            assert_eq!(m["ts"], s.ack["ts"]);
            assert_eq!(m["body"], s.frame["body"]);
            assert_eq!(m["sender_id"].as_str(), Some(senders[si].id.as_str()));
            all_ids.insert(str_field(&s.ack, "message_id").to_string());
        }
        cids.push(cid);
    }
    let total = all_ids.len();

    // The recipient's inbox: each message once, inbox_seq 1..M gap-free.
    let mut rw = node.ws(&r.token).await;
    let s = rw.sync_n(0, total).await;
    let inbox: Vec<u64> = s
        .messages
        .iter()
        .map(|f| u64_field(f, "inbox_seq"))
        .collect();
    assert_eq!(
        inbox,
        (1..=total as u64).collect::<Vec<_>>(),
        "recipient inbox_seq"
    );
    let ids: HashSet<String> = s
        .messages
        .iter()
        .map(|f| str_field(&f["message"], "message_id").to_string())
        .collect();
    assert_eq!(ids, all_ids, "recipient inbox = acked messages, each once");
    rw.expect_no_frame_for(QUIET_MS).await;
    rw.close().await;

    let convs = node.get("/conversations", Some(&r.token)).await;
    let list = convs.body.as_array().expect("conversations array");
    assert_eq!(list.len(), SENDERS, "{}", convs.text);
    for c in list {
        let i = cids
            .iter()
            .position(|cid| c["conversation_id"] == cid.as_str())
            .unwrap_or_else(|| panic!("unexpected conversation {c}"));
        assert_eq!(c["last_seq"].as_u64(), Some(acked[i].len() as u64), "{c}");
    }
    cids
}

#[tokio::test]
async fn acked_messages_survive_kill9() {
    let mut node = Node::start("sends_per_second = 100000").await;
    let r = node.user("dur").await;
    let mut senders = Vec::new();
    for _ in 0..SENDERS {
        senders.push(node.user("dus").await);
    }

    let mut acked: Vec<Vec<Sent>> = (0..SENDERS).map(|_| Vec::new()).collect();
    let mut cids = Vec::new();
    for round in 0..ROUNDS {
        let (got, conns) = burst(&node, &senders, &r.id, round).await;
        // The moment after the last ack.
        node.kill9();
        drop(conns);
        node.restart().await;
        for (all, new) in acked.iter_mut().zip(got) {
            all.extend(new);
        }
        cids = verify(&node, &senders, &r, &acked).await;
    }
    let per_sender = (ROUNDS * PER_SENDER) as u64;
    let total = (ROUNDS * PER_ROUND) as u64;

    // A retry of an acked send after the restart returns the identical ack.
    let mut rw = node.ws(&r.token).await;
    rw.sync_n(total, 0).await;
    let mut sw = node.ws(&senders[0].token).await;
    for sent in [acked[0].last().expect("sent"), &acked[0][0]] {
        sw.send_json(&sent.frame).await;
        let again = sw.ack_for(str_field(&sent.frame, "client_msg_id")).await;
        assert_eq!(again, sent.ack, "retry after restart");
    }

    // New sends continue at N+1, and reach the live recipient next in its inbox.
    let next = sw.send_to_user(&r.id, "after restart").await;
    assert_eq!(next["conversation_id"].as_str(), Some(cids[0].as_str()));
    assert_eq!(next["seq"].as_u64(), Some(per_sender + 1));
    let f = rw.recv_type("message").await;
    assert_eq!(f["inbox_seq"].as_u64(), Some(total + 1));
    assert_eq!(f["message"]["message_id"], next["message_id"]);
    rw.expect_no_frame_for(QUIET_MS).await;
    let hist = node.full_history(&r.token, &cids[0]).await;
    assert_eq!(
        hist.len() as u64,
        per_sender + 1,
        "the retries stored nothing new"
    );
}

/// An inbox's conversation heads are stored only at checkpoints (every 4,096 entries)
/// and recovered from the inbox past the last one. After a kill -9 with about a hundred
/// entries past a checkpoint, the recovered head must be exact: a stale one would take
/// re-sent messages again (duplicates) or refuse the next (a stuck inbox).
#[tokio::test]
async fn inbox_heads_are_recovered_past_their_checkpoint() {
    const N: usize = 4200;
    const WINDOW: usize = 256;
    let mut node = Node::start("sends_per_second = 100000").await;
    let s = node.user("hs").await;
    let r = node.user("hr").await;
    let mut sw = node.ws(&s.token).await;
    let mut cid = String::new();
    for chunk in (0..N).collect::<Vec<_>>().chunks(WINDOW) {
        let cmids: Vec<String> = chunk.iter().map(|_| new_uuid()).collect();
        for (i, cmid) in chunk.iter().zip(&cmids) {
            sw.send_json(&json!({"type":"send","client_msg_id":cmid,"to_user":r.id,
                                 "body":format!("m{i}")}))
                .await;
        }
        for cmid in &cmids {
            cid = str_field(&sw.ack_for(cmid).await, "conversation_id").to_string();
        }
    }
    node.kill9();
    drop(sw);
    node.restart().await;

    let mut sw = node.ws(&s.token).await;
    let next = sw.send_to_user(&r.id, "after restart").await;
    assert_eq!(next["seq"].as_u64(), Some(N as u64 + 1));
    let mut rw = node.ws(&r.token).await;
    let got = rw.sync_n(0, N + 1).await;
    let inbox: Vec<u64> = got
        .messages
        .iter()
        .map(|f| u64_field(f, "inbox_seq"))
        .collect();
    assert_eq!(inbox, (1..=N as u64 + 1).collect::<Vec<_>>(), "inbox_seq");
    let seqs: Vec<u64> = got
        .messages
        .iter()
        .map(|f| {
            assert_eq!(f["message"]["conversation_id"].as_str(), Some(cid.as_str()));
            u64_field(&f["message"], "seq")
        })
        .collect();
    assert_eq!(
        seqs,
        (1..=N as u64 + 1).collect::<Vec<_>>(),
        "each message once, in order, in the recipient's inbox"
    );
    rw.expect_no_frame_for(QUIET_MS).await;
}
