//! The E2EE key directory: opaque bundles, one-time prekeys handed out once each.

mod common;

use std::collections::HashSet;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

async fn put_keys(node: &Node, token: &str, body: &Value) -> Resp {
    node.call(Method::PUT, "/keys", Some(token), Some(body))
        .await
}

fn bundle(identity: &str, prekeys: std::ops::Range<usize>) -> Value {
    json!({
        "identity_key": identity,
        "signed_prekey": format!("spk-of-{identity}"),
        "prekeys": prekeys.map(|i| format!("{identity}-otk-{i}")).collect::<Vec<_>>(),
    })
}

#[tokio::test]
async fn prekeys_are_handed_out_once_even_concurrently_and_across_restarts() {
    let mut node = Node::start("").await;
    let b = node.user("kyb").await;
    let r = put_keys(&node, &b.token, &bundle("idA", 0..30)).await;
    assert_eq!(r.status, 204, "{}", r.text);

    let mut claimers = Vec::new();
    for _ in 0..4 {
        claimers.push(node.user("kyc").await);
    }
    let path = format!("/users/{}/keys", b.id);
    let first = node.get(&path, Some(&claimers[0].token)).await;
    assert_eq!(first.status, 200, "{}", first.text);
    assert_eq!(first.body["identity_key"], "idA");
    assert_eq!(first.body["signed_prekey"], "spk-of-idA");
    let mut seen: Vec<String> = vec![str_field(&first.body, "prekey").to_string()];

    // 40 concurrent claims for the 29 left.
    let mut tasks = Vec::new();
    for i in 0..40 {
        let token = claimers[i % claimers.len()].token.clone();
        let url = node.api(&path);
        tasks.push(tokio::spawn(async move {
            let r = reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("claim");
            assert_eq!(r.status().as_u16(), 200);
            r.json::<Value>().await.expect("json")
        }));
    }
    let mut without = 0;
    for t in tasks {
        let v = t.await.expect("task");
        match v.get("prekey") {
            Some(p) => seen.push(p.as_str().expect("string").to_string()),
            None => without += 1,
        }
        assert_eq!(v["identity_key"], "idA");
    }
    let distinct: HashSet<&String> = seen.iter().collect();
    assert_eq!(
        distinct.len(),
        seen.len(),
        "a prekey handed out twice: {seen:?}"
    );
    assert_eq!(seen.len(), 30, "every prekey handed out");
    assert_eq!(
        without, 11,
        "answers without a prekey once the pool is empty"
    );

    // Same identity: prekeys are added. Then a restart: none is handed out again.
    assert_eq!(
        put_keys(&node, &b.token, &bundle("idA", 30..33))
            .await
            .status,
        204
    );
    let one = node.get(&path, Some(&claimers[1].token)).await;
    seen.push(str_field(&one.body, "prekey").to_string());
    node.kill9();
    node.restart().await;
    for _ in 0..3 {
        let v = node.get(&path, Some(&claimers[2].token)).await.body;
        if let Some(p) = v.get("prekey") {
            seen.push(p.as_str().expect("string").to_string());
        }
    }
    let distinct: HashSet<&String> = seen.iter().collect();
    assert_eq!(
        distinct.len(),
        seen.len(),
        "a prekey handed out twice across a restart"
    );
    assert_eq!(seen.len(), 33);

    // A new identity key replaces the pool.
    assert_eq!(
        put_keys(&node, &b.token, &bundle("idB", 0..2)).await.status,
        204
    );
    let v = node.get(&path, Some(&claimers[3].token)).await.body;
    assert_eq!(
        (v["identity_key"].clone(), v["prekey"].clone()),
        (json!("idB"), json!("idB-otk-0"))
    );
}

#[tokio::test]
async fn bad_key_bundles_and_lookups() {
    let node = Node::start("").await;
    let a = node.user("kba").await;
    let b = node.user("kbb").await;
    let cases = [
        (
            json!({"signed_prekey": "s", "prekeys": []}),
            "missing identity_key",
        ),
        (
            json!({"identity_key": "", "signed_prekey": "s"}),
            "empty identity_key",
        ),
        (
            json!({"identity_key": "i", "signed_prekey": 5}),
            "non-string signed_prekey",
        ),
        (
            json!({"identity_key": "i", "signed_prekey": "s", "prekeys": ["x".repeat(9000)]}),
            "oversize prekey",
        ),
        (
            json!({"identity_key": "i", "signed_prekey": "s", "prekeys": vec!["p"; 1001]}),
            "too many prekeys",
        ),
    ];
    for (body, what) in cases {
        assert_http_error(
            &put_keys(&node, &a.token, &body).await,
            400,
            "bad_request",
            what,
        );
    }
    let r = node
        .call(Method::PUT, "/keys", None, Some(&bundle("i", 0..1)))
        .await;
    assert_http_error(&r, 401, "unauthorized", "no token");
    // Nothing was half-written: a has no keys.
    let r = node
        .get(&format!("/users/{}/keys", a.id), Some(&b.token))
        .await;
    assert_http_error(&r, 404, "no_keys", "no bundle published");
    let r = node
        .get(&format!("/users/{}/keys", new_uuid()), Some(&b.token))
        .await;
    assert_http_error(&r, 404, "unknown_user", "unknown user");
    let r = node.get("/users/nope/keys", Some(&b.token)).await;
    assert_http_error(&r, 400, "invalid_id", "malformed id");
    // `prekeys` absent or null: a bundle without one-time prekeys.
    let r = put_keys(
        &node,
        &b.token,
        &json!({"identity_key": "i", "signed_prekey": "s", "prekeys": null}),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text);
    let v = node
        .get(&format!("/users/{}/keys", b.id), Some(&a.token))
        .await
        .body;
    assert_eq!(
        v,
        json!({"identity_key": "i", "signed_prekey": "s"}),
        "no prekey field when none"
    );
    // Opaque: any string content is kept byte for byte.
    let odd = json!({"identity_key": "\u{1}💬\"<>", "signed_prekey": "AAAA==", "prekeys": ["ciphertext\n"]});
    assert_eq!(put_keys(&node, &a.token, &odd).await.status, 204);
    let v = node
        .get(&format!("/users/{}/keys", a.id), Some(&b.token))
        .await
        .body;
    assert_eq!(
        v,
        json!({"identity_key": "\u{1}💬\"<>", "signed_prekey": "AAAA==", "prekey": "ciphertext\n"})
    );
}
