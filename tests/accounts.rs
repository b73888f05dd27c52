//! Accounts and sessions: registration, login, user lookup, logout,
//! token checks on HTTP and on the WebSocket upgrade, presence fields.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test]
async fn register_login_and_lookup() {
    let node = Node::start("").await;
    let handle = unique_handle("acc");

    // 201 with the user object; display_name given.
    let r = node
        .post(
            "/users",
            None,
            &json!({"handle": handle, "password": "password123", "display_name": "Ada L."}),
        )
        .await;
    assert_eq!(r.status, 201, "POST /users: {}", r.text);
    assert!(is_uuid(&r.body["user_id"]), "user_id: {}", r.text);
    assert_eq!(r.body["handle"], handle.as_str());
    assert_eq!(r.body["display_name"], "Ada L.");
    let id = str_field(&r.body, "user_id").to_string();

    // display_name defaults to the handle.
    let h2 = unique_handle("acc");
    let r2 = node.create_user(&h2, "password123").await;
    assert_eq!(r2.status, 201, "POST /users: {}", r2.text);
    assert_eq!(
        r2.body["display_name"],
        h2.as_str(),
        "default display_name: {}",
        r2.text
    );
    assert_ne!(r2.body["user_id"], r.body["user_id"]);

    // Duplicate handle.
    let dup = node.create_user(&handle, "otherpassword").await;
    assert_http_error(&dup, 409, "handle_taken", "duplicate handle");
    // Even with the same password: the contract's 409, and nothing changes.
    let again = node.create_user(&handle, "password123").await;
    assert_http_error(&again, 409, "handle_taken", "same handle, same password");

    // Login.
    let before = now_ms();
    let l = node.login(&handle, "password123").await;
    assert_eq!(l.status, 200, "POST /sessions: {}", l.text);
    let token = str_field(&l.body, "token").to_string();
    assert!(!token.is_empty());
    assert_eq!(l.body["user_id"].as_str(), Some(id.as_str()));
    let expires = u64_field(&l.body, "expires_at");
    let day = 24 * 3600 * 1000;
    assert!(
        expires > before + 29 * day && expires < now_ms() + 31 * day,
        "expires_at should be ~30 days ahead: {expires}"
    );

    // Two logins give two distinct tokens.
    let l2 = node.login(&handle, "password123").await;
    assert_eq!(l2.status, 200);
    assert_ne!(l2.body["token"], l.body["token"]);

    // Wrong password and unknown handle: the same 401.
    let bad = node.login(&handle, "password124").await;
    assert_http_error(&bad, 401, "invalid_credentials", "wrong password");
    let unknown = node.login(&unique_handle("nobody"), "password123").await;
    assert_http_error(&unknown, 401, "invalid_credentials", "unknown handle");

    // GET /users/me.
    let me = node.get("/users/me", Some(&token)).await;
    assert_eq!(me.status, 200, "GET /users/me: {}", me.text);
    assert_user_obj(&me.body, &id, &handle);
    assert_eq!(me.body["display_name"], "Ada L.");
    assert_eq!(
        me.body["online"], false,
        "no WebSocket open yet: {}",
        me.text
    );
    assert!(
        me.body["last_seen"].is_null(),
        "never had a session: {}",
        me.text
    );

    // GET /users/{id}, by another user.
    let other_token = str_field(&node.login(&h2, "password123").await.body, "token").to_string();
    let by_id = node.get(&format!("/users/{id}"), Some(&other_token)).await;
    assert_eq!(by_id.status, 200, "GET /users/id: {}", by_id.text);
    assert_user_obj(&by_id.body, &id, &handle);

    // GET /users?handle=H answers one object.
    let by_handle = node
        .get(&format!("/users?handle={handle}"), Some(&other_token))
        .await;
    assert_eq!(
        by_handle.status, 200,
        "GET /users?handle: {}",
        by_handle.text
    );
    assert_user_obj(&by_handle.body, &id, &handle);

    // Unknowns.
    let r = node
        .get(&format!("/users/{}", new_uuid()), Some(&token))
        .await;
    assert_http_error(&r, 404, "unknown_user", "GET /users/{random uuid}");
    let r = node
        .get(
            &format!("/users?handle={}", unique_handle("nobody")),
            Some(&token),
        )
        .await;
    assert_http_error(&r, 404, "unknown_user", "GET /users?handle=unknown");
    let r = node.get("/users", Some(&token)).await;
    assert_http_error(&r, 400, "bad_request", "GET /users without handle");
    let r = node.get("/users/not-a-uuid", Some(&token)).await;
    assert_http_error(&r, 400, "invalid_id", "GET /users/not-a-uuid");
}

#[tokio::test]
async fn registration_validation() {
    let node = Node::start("").await;
    let long = "a".repeat(33);
    for bad in [
        "ab",
        "Upper_case",
        "with space",
        "émile",
        "semi;colon",
        long.as_str(),
        "",
    ] {
        let r = node.create_user(bad, "password123").await;
        assert_http_error(&r, 400, "invalid_handle", &format!("handle {bad:?}"));
    }
    // Edges that are valid: 3 and 32 chars, all allowed punctuation.
    let n = unique_handle("x");
    let h32 = format!("{}{}", n, "z".repeat(32 - n.len()));
    for good in [
        format!("a.{}", &n[n.len() - 1..]),
        h32,
        format!("a-b_c.{n}"),
    ] {
        let r = node.create_user(&good, "password123").await;
        assert_eq!(r.status, 201, "handle {good:?} should be valid: {}", r.text);
    }
    // Passwords.
    let r = node.create_user(&unique_handle("pw"), "short12").await;
    assert_http_error(&r, 400, "invalid_password", "7-char password");
    let r = node
        .create_user(&unique_handle("pw"), &"p".repeat(1025))
        .await;
    assert_http_error(&r, 400, "invalid_password", "1025-char password");
    let r = node.create_user(&unique_handle("pw"), "exactly8").await;
    assert_eq!(r.status, 201, "8-char password is fine: {}", r.text);

    // display_name rules.
    for bad in [json!(""), json!("x".repeat(65)), json!("tab\there")] {
        let r = node
            .post(
                "/users",
                None,
                &json!({"handle": unique_handle("dn"), "password": "password123", "display_name": bad}),
            )
            .await;
        assert_http_error(
            &r,
            400,
            "invalid_display_name",
            &format!("display_name {bad}"),
        );
    }

    // Missing / wrongly typed fields, malformed JSON.
    for body in [
        json!({"handle": unique_handle("m")}),
        json!({"password": "password123"}),
        json!({"handle": 12, "password": "password123"}),
        json!([1, 2, 3]),
    ] {
        let r = node.post("/users", None, &body).await;
        assert_http_error(&r, 400, "bad_request", &format!("POST /users {body}"));
    }
    let r = node
        .call_raw(
            reqwest::Method::POST,
            &node.api("/users"),
            &[("content-type", "application/json")],
            Some(b"{\"handle\": \"abc\", ".to_vec()),
        )
        .await;
    assert_http_error(&r, 400, "bad_request", "malformed JSON body");
    let r = node
        .post("/sessions", None, &json!({"handle": "abc"}))
        .await;
    assert_http_error(&r, 400, "bad_request", "POST /sessions without password");

    // JSON is parsed whatever the Content-Type says.
    let h = unique_handle("ct");
    let body = json!({"handle": h, "password": "password123"}).to_string();
    let r = node
        .call_raw(
            reqwest::Method::POST,
            &node.api("/users"),
            &[("content-type", "text/plain")],
            Some(body.into_bytes()),
        )
        .await;
    assert_eq!(r.status, 201, "text/plain JSON body: {}", r.text);
    // Nothing invalid was stored: an invalid handle never became a user.
    let (_, t) = node.register(&unique_handle("chk")).await;
    let r = node.get("/users?handle=ab", Some(&t)).await;
    assert_http_error(&r, 404, "unknown_user", "rejected handle is not stored");
}

#[tokio::test]
async fn tokens_missing_forged_and_logout() {
    let node = Node::start("").await;
    let u = node.user("tok").await;

    // Missing, malformed, forged.
    let r = node.get("/users/me", None).await;
    assert_http_error(&r, 401, "unauthorized", "no token");
    let r = node.get("/users/me", Some("not a token")).await;
    assert_http_error(&r, 401, "unauthorized", "malformed token");
    let first = u.token.chars().next().expect("non-empty token");
    let forged = format!(
        "{}{}",
        if first == 'A' { 'B' } else { 'A' },
        &u.token[first.len_utf8()..]
    );
    let r = node.get("/users/me", Some(&forged)).await;
    assert_http_error(&r, 401, "unauthorized", "forged token (first char changed)");
    let r = node
        .get(
            "/users/me",
            Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
        )
        .await;
    assert_http_error(&r, 401, "unauthorized", "forged token");
    let r = node
        .call_raw(
            reqwest::Method::GET,
            &node.api("/users/me"),
            &[("authorization", &format!("Basic {}", u.token))],
            None,
        )
        .await;
    assert_http_error(&r, 401, "unauthorized", "wrong auth scheme");
    // A valid token in the URL is read only by the WebSocket upgrade, never by HTTP
    // calls (it would end up in access logs).
    let r = node
        .get(&format!("/users/me?token={}", u.token), None)
        .await;
    assert_http_error(
        &r,
        401,
        "unauthorized",
        "token in the query of an HTTP call",
    );

    // The WS upgrade checks the token before upgrading.
    for tok in ["", forged.as_str()] {
        match node.try_ws(tok).await {
            Ok(_) => panic!("WS upgrade with token {tok:?} should be refused"),
            Err(WsConnectError::Http(status, _)) => {
                assert_eq!(status, 401, "WS upgrade with token {tok:?}")
            }
            Err(e) => panic!("WS upgrade with token {tok:?}: expected HTTP 401, got {e}"),
        }
        // The same upgrade request through a plain HTTP client, to read the body.
        let r = node
            .call_raw(
                reqwest::Method::GET,
                &format!("{}/api/v1/ws?token={tok}", node.base()),
                &[
                    ("connection", "Upgrade"),
                    ("upgrade", "websocket"),
                    ("sec-websocket-version", "13"),
                    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ],
                None,
            )
            .await;
        assert_http_error(&r, 401, "unauthorized", "WS upgrade with a bad token");
    }
    // The Authorization header works for the upgrade too.
    let mut ws = node
        .try_ws_header(&u.token)
        .await
        .unwrap_or_else(|e| panic!("WS with Authorization header: {e}"));
    ws.sync(0).await;
    ws.ping_pong().await;
    ws.close().await;

    // A second session survives the logout of the first.
    let other = node.login(&u.handle, &u.password).await;
    let other_token = str_field(&other.body, "token").to_string();

    let r = node.get("/users/me", Some(&u.token)).await;
    assert_eq!(r.status, 200);
    let r = node.delete("/sessions/current", Some(&u.token)).await;
    assert_eq!(r.status, 204, "DELETE /sessions/current: {}", r.text);
    let r = node.get("/users/me", Some(&u.token)).await;
    assert_http_error(&r, 401, "unauthorized", "token after logout");
    let r = node.delete("/sessions/current", Some(&u.token)).await;
    assert_http_error(&r, 401, "unauthorized", "second logout with the same token");
    match node.try_ws(&u.token).await {
        Err(WsConnectError::Http(401, _)) => {}
        Err(e) => panic!("WS upgrade after logout: expected 401, got {e}"),
        Ok(_) => panic!("WS upgrade after logout must be refused"),
    }
    let r = node.get("/users/me", Some(&other_token)).await;
    assert_eq!(r.status, 200, "other session still valid: {}", r.text);
}

#[tokio::test]
async fn logout_closes_open_websocket_with_1008() {
    let node = Node::start("").await;
    let u = node.user("lo").await;
    let mut ws = node.ws(&u.token).await;
    ws.sync(0).await;
    ws.ping_pong().await;
    let r = node.delete("/sessions/current", Some(&u.token)).await;
    assert_eq!(r.status, 204, "logout: {}", r.text);
    let (code, _) = ws.expect_close(Duration::from_secs(10)).await;
    assert_eq!(
        code,
        Some(1008),
        "close code after logout (transport error: {:?})",
        ws.end_error
    );
}

#[tokio::test]
async fn presence_online_and_last_seen() {
    let node = Node::start("").await;
    let a = node.user("pa").await;
    let b = node.user("pb").await;
    let u = node.user_obj(&b.token, &a.id).await;
    assert_eq!(u["online"], false);
    assert!(u["last_seen"].is_null(), "never connected: {u}");

    let mut ws = node.ws(&a.token).await;
    ws.sync(0).await;
    ws.ping_pong().await;
    let (u, ok) = node
        .poll_user(&b.token, &a.id, Duration::from_secs(10), |u| {
            u["online"] == true
        })
        .await;
    assert!(ok, "user with an open WebSocket should be online: {u}");

    let before_close = now_ms();
    ws.close().await;
    let (u, ok) = node
        .poll_user(&b.token, &a.id, Duration::from_secs(15), |u| {
            u["online"] == false && u["last_seen"].is_u64()
        })
        .await;
    assert!(
        ok,
        "after the only WebSocket closed: offline with last_seen: {u}"
    );
    let seen = u64_field(&u, "last_seen");
    assert!(
        seen + 1000 >= before_close && seen <= now_ms() + 1000,
        "last_seen {seen} should be about when the session ended ({before_close})"
    );
    let me = node.get("/users/me", Some(&a.token)).await;
    assert_eq!(
        me.body["last_seen"], u["last_seen"],
        "same last_seen from /users/me"
    );
}
