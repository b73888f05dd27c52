//! A minimal client of the contract: register and log in over HTTP, then a WebSocket
//! that syncs, sends and reads frames.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;
pub type Tx = SplitSink<WsStream, Message>;
pub type Rx = SplitStream<WsStream>;

/// A logged-in user.
#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub token: String,
}

/// Registers `handle` (or logs it in if it exists with this password) and logs in.
pub async fn user(http: &reqwest::Client, addr: &str, handle: &str) -> Result<User> {
    let body = json!({"handle": handle, "password": "bench-password"});
    let post = |path: &str| {
        http.post(format!("http://{addr}/api/v1{path}"))
            .json(&body)
            .send()
    };
    let made = post("/users").await?;
    let status = made.status().as_u16();
    if status != 201 && status != 200 && status != 409 {
        bail!("POST /users {handle}: {status} {}", made.text().await?);
    }
    let login = post("/sessions").await?;
    let status = login.status().as_u16();
    let v: Value = login
        .json()
        .await
        .with_context(|| format!("POST /sessions {handle}: {status}, not JSON"))?;
    let field = |k: &str| -> Result<String> {
        v[k].as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("POST /sessions {handle}: {status} {v}"))
    };
    Ok(User {
        id: field("user_id")?,
        token: field("token")?,
    })
}

/// Registers `count` users (`prefix` + index), `parallel` at a time.
pub async fn users(
    http: &reqwest::Client,
    addrs: &[String],
    prefix: &str,
    count: usize,
    parallel: usize,
) -> Result<Vec<User>> {
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let mut tasks = Vec::new();
    for i in 0..count {
        let (http, addr, gate) = (
            http.clone(),
            addrs[i % addrs.len()].clone(),
            std::sync::Arc::clone(&gate),
        );
        let handle = format!("{prefix}{i}");
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            user(&http, &addr, &handle).await
        }));
    }
    let mut out = Vec::with_capacity(count);
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

/// How long a connection may take to open, or to answer its `sync` with `synced`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens a WebSocket and sends `sync` from 0; what follows is the replay, then `synced`.
pub async fn open(addr: &str, token: &str) -> Result<(Tx, Rx)> {
    let url = format!("ws://{addr}/api/v1/ws?token={token}");
    let (ws, _) = tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(url))
        .await
        .context("WebSocket connect timed out")??;
    let (mut tx, rx) = ws.split();
    tx.send(Message::Text(
        json!({"type": "sync", "after": 0}).to_string(),
    ))
    .await?;
    Ok((tx, rx))
}

/// Opens a WebSocket and waits for `synced` (skipping the replay).
pub async fn connect(addr: &str, token: &str) -> Result<(Tx, Rx)> {
    let (tx, mut rx) = open(addr, token).await?;
    let synced = async {
        loop {
            let frame = next_json(&mut rx)
                .await?
                .ok_or_else(|| anyhow!("closed before synced"))?;
            if frame["type"] == "synced" {
                return Ok::<_, anyhow::Error>(());
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, synced)
        .await
        .context("no `synced` answer to `sync`")??;
    Ok((tx, rx))
}

/// The next JSON frame (`None` when the connection ended).
pub async fn next_json(rx: &mut Rx) -> Result<Option<Value>> {
    while let Some(msg) = rx.next().await {
        match msg? {
            Message::Text(t) => return Ok(Some(serde_json::from_str(&t)?)),
            Message::Close(_) => return Ok(None),
            _ => {}
        }
    }
    Ok(None)
}

/// A `send` frame whose body starts with the scheduled send time (µs since the run
/// began), padded to `size` bytes.
pub fn send_frame(target: &Value, scheduled_us: u64, size: usize) -> Message {
    let mut body = format!("{scheduled_us}|");
    while body.len() < size {
        body.push('x');
    }
    let mut frame = target.clone();
    frame["type"] = json!("send");
    frame["client_msg_id"] = json!(uuid::Uuid::new_v4());
    frame["body"] = json!(body);
    Message::Text(frame.to_string())
}

/// The scheduled send time carried by a message event's body.
pub fn scheduled_of(frame: &Value) -> Option<u64> {
    let body = frame["message"]["body"].as_str()?;
    body.split('|').next()?.parse().ok()
}
