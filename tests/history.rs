//! History paging: `GET /conversations/{cid}/messages` with
//! `before_seq` / `after_seq` / `limit`, and its access rules.

mod common;

use std::collections::HashSet;

use common::*;
use serde_json::Value;

fn seqs(msgs: &[Value]) -> Vec<u64> {
    msgs.iter().map(|m| u64_field(m, "seq")).collect()
}

fn range(lo: u64, hi: u64) -> Vec<u64> {
    (lo..=hi).collect()
}

#[tokio::test]
async fn history_paging_and_access() {
    const N: u64 = 120;
    let node = Node::start("sends_per_second = 100000").await;
    let a = node.user("ha").await;
    let b = node.user("hb").await;
    let stranger = node.user("hs").await;

    let mut aw = node.ws(&a.token).await;
    let mut cmids = Vec::new();
    for i in 0..N {
        cmids.push(aw.send_to_user_nowait(&b.id, &format!("msg {i}")).await);
    }
    // (body, ack) per send, ordered by the acked seq. The contract does not
    // promise that pipelined sends get seqs in sending order, so the
    // expected body of each seq comes from its own ack.
    let mut acks: Vec<(String, Value)> = Vec::new();
    for (i, c) in cmids.iter().enumerate() {
        acks.push((format!("msg {i}"), aw.ack_for(c).await));
    }
    acks.sort_by_key(|(_, a)| u64_field(a, "seq"));
    let cid = str_field(&acks[0].1, "conversation_id").to_string();
    assert!(acks
        .iter()
        .all(|(_, a)| a["conversation_id"] == cid.as_str()));
    let acked_seqs: Vec<u64> = acks.iter().map(|(_, a)| u64_field(a, "seq")).collect();
    assert_eq!(acked_seqs, range(1, N), "acked seqs are 1..N");

    let h = |q: &'static str| {
        let node = &node;
        let cid = cid.clone();
        let tok = b.token.clone();
        async move { seqs(&node.history(&tok, &cid, q).await) }
    };

    // Neither: the latest `limit` (default 50).
    assert_eq!(h("").await, range(N - 49, N), "default page");
    assert_eq!(h("limit=10").await, range(N - 9, N), "latest 10");
    // Only after_seq: the first `limit` after it.
    assert_eq!(h("after_seq=0").await, range(1, 50), "after 0");
    assert_eq!(h("after_seq=100").await, range(101, N), "after 100");
    assert_eq!(
        h("after_seq=10&limit=5").await,
        range(11, 15),
        "after 10 limit 5"
    );
    assert_eq!(
        h("after_seq=120").await,
        Vec::<u64>::new(),
        "after the last"
    );
    // Only before_seq: the last `limit` before it.
    assert_eq!(
        h("before_seq=50&limit=10").await,
        range(40, 49),
        "before 50 limit 10"
    );
    assert_eq!(h("before_seq=5").await, range(1, 4), "before 5");
    assert_eq!(h("before_seq=1").await, Vec::<u64>::new(), "before 1");
    assert_eq!(
        h("before_seq=1000&limit=3").await,
        range(N - 2, N),
        "before beyond"
    );
    // Both: the first `limit` strictly between.
    assert_eq!(
        h("after_seq=10&before_seq=20").await,
        range(11, 19),
        "between"
    );
    assert_eq!(
        h("after_seq=10&before_seq=20&limit=3").await,
        range(11, 13),
        "between, limit"
    );
    assert_eq!(
        h("after_seq=10&before_seq=11").await,
        Vec::<u64>::new(),
        "empty between"
    );
    // Limits.
    assert_eq!(h("limit=500&after_seq=0").await, range(1, N), "limit 500");
    assert_eq!(h("limit=1").await, vec![N], "limit 1");

    // Walking backwards with before_seq covers everything exactly once.
    let mut seen: Vec<u64> = Vec::new();
    let mut before = N + 1;
    loop {
        let page = seqs(
            &node
                .history(&b.token, &cid, &format!("before_seq={before}&limit=50"))
                .await,
        );
        if page.is_empty() {
            break;
        }
        assert!(
            page.windows(2).all(|w| w[0] < w[1]),
            "ascending page {page:?}"
        );
        before = page[0];
        seen.splice(0..0, page);
        assert!(seen.len() as u64 <= N, "paging repeats: {seen:?}");
    }
    assert_eq!(seen, range(1, N), "backward walk");

    // Message objects carry what was acked, for both members.
    let all = node.full_history(&a.token, &cid).await;
    assert_eq!(all.len() as u64, N);
    for (m, (body, ack)) in all.iter().zip(&acks) {
        assert_message_obj(m);
        assert_eq!(m["body"].as_str(), Some(body.as_str()));
        assert_eq!(m["message_id"], ack["message_id"]);
        assert_eq!(m["client_msg_id"], ack["client_msg_id"]);
        assert_eq!(m["seq"], ack["seq"]);
        assert_eq!(m["ts"], ack["ts"]);
        assert_eq!(m["conversation_id"].as_str(), Some(cid.as_str()));
        assert_eq!(m["sender_id"].as_str(), Some(a.id.as_str()));
        assert_eq!(m["kind"], "user");
    }
    let ids: HashSet<&str> = all.iter().map(|m| str_field(m, "message_id")).collect();
    assert_eq!(ids.len() as u64, N, "distinct message ids");

    // Bad query values: 400 bad_request.
    for q in [
        "limit=501",
        "limit=0",
        "limit=-1",
        "limit=abc",
        "before_seq=x",
        "after_seq=1.5",
    ] {
        let r = node
            .get(
                &format!("/conversations/{cid}/messages?{q}"),
                Some(&b.token),
            )
            .await;
        assert_http_error(&r, 400, "bad_request", &format!("history ?{q}"));
    }

    // Access rules.
    let r = node
        .get(
            &format!("/conversations/{cid}/messages"),
            Some(&stranger.token),
        )
        .await;
    assert_http_error(&r, 403, "not_member", "stranger reads history");
    let r = node
        .get(
            &format!("/conversations/{}/messages", new_uuid()),
            Some(&b.token),
        )
        .await;
    assert_http_error(&r, 404, "unknown_conversation", "unknown conversation");
    let r = node
        .get("/conversations/not-a-uuid/messages", Some(&b.token))
        .await;
    assert_http_error(&r, 400, "invalid_id", "non-UUID conversation id");
    let r = node
        .get(&format!("/conversations/{cid}/messages"), None)
        .await;
    assert_http_error(&r, 401, "unauthorized", "history without token");
    let r = node
        .get(
            &format!("/conversations/{}/receipts", new_uuid()),
            Some(&b.token),
        )
        .await;
    assert_http_error(
        &r,
        404,
        "unknown_conversation",
        "receipts of unknown conversation",
    );
}
