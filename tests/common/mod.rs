//! Black-box test harness for Switchboard.
//!
//! Everything here talks to a real `switchboard serve` process the way a
//! third-party client would: HTTP via `reqwest`, WebSocket via
//! `tokio-tungstenite`, following `CONTRACT.md` and the implementation
//! decisions. Every wait is bounded, so a broken server fails a test instead
//! of hanging it; no timing threshold is ever asserted.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// How long a node may take to answer `GET /healthz` 200 after spawning.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Guard for a single HTTP request.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(20);
/// Guard for waiting on one expected WebSocket frame.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);
/// Quiet period used to check that no frame arrives (a guard, not a threshold).
pub const QUIET_MS: u64 = 500;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A handle unique within this test process: `prefix` plus a counter.
/// Keep `prefix` short (at most 16 chars) so the handle stays within 32 chars.
pub fn unique_handle(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}_{}_{}", prefix, std::process::id() % 100_000, n)
}

pub fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub fn is_uuid(v: &Value) -> bool {
    v.as_str()
        .map(|s| uuid::Uuid::parse_str(s).is_ok())
        .unwrap_or(false)
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after epoch")
        .as_millis() as u64
}

/// `v[key]` as u64, panicking with context otherwise.
pub fn u64_field(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("field `{key}` is not an unsigned integer in {v}"))
}

/// `(a, b)` string fields of every object in the array `v[list]`: e.g. a group's
/// `members` as `(user_id, role)`.
pub fn field_pairs(v: &Value, list: &str, a: &str, b: &str) -> Vec<(String, String)> {
    v[list]
        .as_array()
        .unwrap_or_else(|| panic!("no `{list}` array in {v}"))
        .iter()
        .map(|o| (str_field(o, a).to_string(), str_field(o, b).to_string()))
        .collect()
}

/// `v[key]` as &str, panicking with context otherwise.
pub fn str_field<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("field `{key}` is not a string in {v}"))
}

pub fn free_port() -> (std::net::TcpListener, u16) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    let p = l.local_addr().expect("local addr").port();
    (l, p)
}

// ---------------------------------------------------------------------------
// Node process
// ---------------------------------------------------------------------------

/// One `switchboard serve` process on a temp dir, killed (SIGKILL) on drop.
pub struct Node {
    /// Shared by every node of a cluster (one cluster.toml, one data dir each).
    dir: std::sync::Arc<tempfile::TempDir>,
    /// The node's id in cluster.toml.
    pub id: String,
    pub port: u16,
    pub peer_port: u16,
    config_path: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
    http: reqwest::Client,
}

/// An HTTP answer: status, parsed JSON body (`Null` when empty, `String`
/// holding the raw text when it is not JSON) and raw text.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub body: Value,
    pub text: String,
}

/// A registered and logged-in user.
#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub handle: String,
    pub password: String,
    pub token: String,
}

impl Node {
    /// Starts a node with the given `[limits]` lines (may be empty).
    pub async fn start(limits_toml: &str) -> Node {
        let dir = tempfile::Builder::new()
            .prefix("switchboard-test-")
            .tempdir()
            .expect("create tempdir");
        let log_path = dir.path().join("node.log");
        let config_path = dir.path().join("cluster.toml");
        let http = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .no_proxy()
            .build()
            .expect("build reqwest client");
        let mut node = Node {
            dir: std::sync::Arc::new(dir),
            id: "n1".into(),
            port: 0,
            peer_port: 0,
            config_path,
            log_path,
            child: None,
            http,
        };
        // Ports are picked by binding :0 and releasing; another process may
        // grab one in between, so retry a few times with fresh ports.
        for attempt in 1..=3 {
            let (l1, p1) = free_port();
            let (l2, p2) = free_port();
            drop(l1);
            drop(l2);
            node.port = p1;
            node.peer_port = p2;
            node.write_config(limits_toml);
            node.spawn();
            match node.wait_ready().await {
                Ok(()) => return node,
                Err(e) if attempt < 3 => {
                    eprintln!("node start attempt {attempt} failed: {e}; retrying");
                    node.kill9();
                }
                Err(e) => panic!("node did not become ready: {e}\n{}", node.log_tail(60)),
            }
        }
        unreachable!()
    }

    /// Starts `n` nodes (`n1`..`nN`) of one cluster on loopback, each with its own data
    /// dir under one temp dir and the same cluster.toml, and waits until each serves
    /// and has its peer links up.
    pub async fn start_cluster(n: usize, limits_toml: &str) -> Vec<Node> {
        let dir = std::sync::Arc::new(
            tempfile::Builder::new()
                .prefix("switchboard-cluster-")
                .tempdir()
                .expect("create tempdir"),
        );
        let config_path = dir.path().join("cluster.toml");
        let listeners: Vec<_> = (0..2 * n).map(|_| free_port()).collect();
        let ports: Vec<u16> = listeners.iter().map(|(_, p)| *p).collect();
        drop(listeners);
        let mut cfg = format!(
            "[cluster]\nvnodes = 64\nadmin_token = \"test-admin-token\"\n\n[limits]\n{limits_toml}\n\n"
        );
        for i in 0..n {
            let data_dir = dir.path().join("data").join(format!("n{}", i + 1));
            let data_dir = serde_json::to_string(&data_dir.to_string_lossy()).expect("path");
            cfg.push_str(&format!(
                "[[node]]\nid = \"n{}\"\nclient_addr = \"127.0.0.1:{}\"\npeer_addr = \"127.0.0.1:{}\"\ndata_dir = {data_dir}\n\n",
                i + 1,
                ports[2 * i],
                ports[2 * i + 1]
            ));
        }
        std::fs::write(&config_path, cfg).expect("write cluster.toml");
        let mut nodes: Vec<Node> = (0..n)
            .map(|i| Node {
                dir: std::sync::Arc::clone(&dir),
                id: format!("n{}", i + 1),
                port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                config_path: config_path.clone(),
                log_path: dir.path().join(format!("n{}.log", i + 1)),
                child: None,
                http: reqwest::Client::builder()
                    .timeout(HTTP_TIMEOUT)
                    .no_proxy()
                    .build()
                    .expect("build reqwest client"),
            })
            .collect();
        for node in nodes.iter_mut() {
            node.spawn();
        }
        for node in nodes.iter_mut() {
            if let Err(e) = node.wait_ready().await {
                panic!(
                    "node {} did not become ready: {e}\n{}",
                    node.id,
                    node.log_tail(60)
                );
            }
        }
        for node in &nodes {
            node.wait_links(n - 1).await;
        }
        nodes
    }

    /// Adds a node `id` to the cluster file this node shares and starts it. It serves
    /// once the running nodes have reloaded the file (its `/healthz` says 503 until
    /// then), so this does not wait for it.
    pub fn join(&self, id: &str) -> Node {
        let (l1, port) = free_port();
        let (l2, peer_port) = free_port();
        drop((l1, l2));
        let data_dir = self.dir.path().join("data").join(id);
        let data_dir = serde_json::to_string(&data_dir.to_string_lossy()).expect("path");
        let mut cfg = std::fs::read_to_string(&self.config_path).expect("read cluster.toml");
        cfg.push_str(&format!(
            "\n[[node]]\nid = \"{id}\"\nclient_addr = \"127.0.0.1:{port}\"\npeer_addr = \"127.0.0.1:{peer_port}\"\ndata_dir = {data_dir}\n"
        ));
        std::fs::write(&self.config_path, cfg).expect("write cluster.toml");
        let mut node = Node {
            dir: std::sync::Arc::clone(&self.dir),
            id: id.to_string(),
            port,
            peer_port,
            config_path: self.config_path.clone(),
            log_path: self.dir.path().join(format!("{id}.log")),
            child: None,
            http: self.http.clone(),
        };
        node.spawn();
        node
    }

    /// The node process's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// The temp dir this node (and its cluster) lives in.
    pub fn dir_path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Puts this node's entry back into the shared cluster file (same addresses, same
    /// data dir) and starts it again, without waiting for it to serve.
    pub fn rejoin(&mut self) {
        let data_dir = serde_json::to_string(&self.data_dir().to_string_lossy()).expect("path");
        let mut cfg = std::fs::read_to_string(&self.config_path).expect("read cluster.toml");
        cfg.push_str(&format!(
            "\n[[node]]\nid = \"{}\"\nclient_addr = \"127.0.0.1:{}\"\npeer_addr = \"127.0.0.1:{}\"\ndata_dir = {data_dir}\n",
            self.id, self.port, self.peer_port
        ));
        std::fs::write(&self.config_path, cfg).expect("write cluster.toml");
        self.spawn();
    }

    /// Rewrites the shared cluster file without node `id`'s entry.
    pub fn drop_from_config(&self, id: &str) {
        let cfg = std::fs::read_to_string(&self.config_path).expect("read cluster.toml");
        let mut blocks = cfg.split("[[node]]");
        let mut out = blocks.next().unwrap_or_default().to_string();
        for block in blocks {
            if !block.contains(&format!("id = \"{id}\"")) {
                out.push_str("[[node]]");
                out.push_str(block);
            }
        }
        std::fs::write(&self.config_path, out).expect("write cluster.toml");
    }

    /// An `/admin/...` call with the admin token (and a JSON body, if any).
    pub async fn admin(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Resp {
        self.call_raw(
            method,
            &format!("{}{path}", self.base()),
            &[
                ("authorization", "Bearer test-admin-token"),
                ("content-type", "application/json"),
            ],
            body.map(|b| b.to_string().into_bytes()),
        )
        .await
    }

    /// `POST /admin/reload` with the admin token.
    pub async fn reload(&self) -> Resp {
        self.admin(reqwest::Method::POST, "/admin/reload", None)
            .await
    }

    /// `GET /admin/cluster` with the admin token.
    pub async fn cluster(&self) -> Value {
        let r = self
            .admin(reqwest::Method::GET, "/admin/cluster", None)
            .await;
        assert_eq!(
            r.status,
            200,
            "GET /admin/cluster: {} {}",
            r.text,
            self.ctx()
        );
        r.body
    }

    /// Waits until this node serves ring `version` with no handoff pending.
    pub async fn wait_ring(&self, version: u64, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let r = self
                .admin(reqwest::Method::GET, "/admin/cluster", None)
                .await;
            if r.status == 200
                && u64_field(&r.body, "ring_version") >= version
                && u64_field(&r.body, "handoffs_pending") == 0
            {
                return r.body;
            }
            if Instant::now() > deadline {
                panic!(
                    "node {} did not reach ring version {version}: {}\n{}",
                    self.id,
                    r.text,
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the process has exited by itself; its exit code.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return status.code();
                }
            }
            if Instant::now() > deadline {
                panic!("node {} did not stop\n{}", self.id, self.log_tail(40));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `/healthz` answers 200.
    pub async fn wait_serving(&mut self) {
        if let Err(e) = self.wait_ready().await {
            panic!(
                "node {} does not serve: {e}\n{}",
                self.id,
                self.log_tail(60)
            );
        }
    }

    /// Waits until `/metrics` shows `count` peer links up.
    pub async fn wait_links(&self, count: usize) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let m = self.get_root("/metrics").await.text;
            let up = m
                .lines()
                .filter(|l| l.starts_with("switchboard_peer_up{") && l.ends_with(" 1"))
                .count();
            if up >= count {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "node {}: {up} of {count} peer links up\n{}",
                    self.id,
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn write_config(&self, limits_toml: &str) {
        let data_dir = self.dir.path().join("data").join("n1");
        let data_dir = serde_json::to_string(&data_dir.to_string_lossy()).expect("path");
        let cfg = format!(
            "[cluster]\nvnodes = 64\nadmin_token = \"test-admin-token\"\n\n\
             [limits]\n{limits_toml}\n\n\
             [[node]]\nid = \"n1\"\nclient_addr = \"127.0.0.1:{}\"\npeer_addr = \"127.0.0.1:{}\"\ndata_dir = {data_dir}\n",
            self.port, self.peer_port
        );
        std::fs::write(&self.config_path, cfg).expect("write cluster.toml");
    }

    fn spawn(&mut self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open node log");
        let log2 = log.try_clone().expect("clone log handle");
        let child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--node")
            .arg(&self.id)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::from(log2))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn switchboard");
        self.child = Some(child);
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let url = format!("{}/healthz", self.base());
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!("node exited early with {status}"));
                }
            }
            if let Ok(r) = self
                .http
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                if r.status().as_u16() == 200 {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!("no 200 from {url} within {READY_TIMEOUT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL the process (no graceful shutdown) and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL on unix
            let _ = child.wait();
        }
    }

    /// Sends a signal to the process (e.g. `libc::SIGSTOP` to freeze it).
    pub fn signal(&self, sig: i32) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as i32, sig);
            }
        }
    }

    /// Starts the process again on the same config, data dir and ports.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn();
        if let Err(e) = self.wait_ready().await {
            panic!(
                "node did not come back after restart: {e}\n{}",
                self.log_tail(60)
            );
        }
    }

    /// The node's data directory (for checks on what it keeps on disk).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data").join(&self.id)
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn api(&self, path: &str) -> String {
        format!("{}/api/v1{}", self.base(), path)
    }

    pub fn ws_url(&self, token: &str) -> String {
        format!("ws://127.0.0.1:{}/api/v1/ws?token={}", self.port, token)
    }

    /// Short context for assertion messages.
    pub fn ctx(&self) -> String {
        format!("(node log: {})", self.log_path.display())
    }

    /// The last `lines` lines of the node log.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log_path) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let start = len.saturating_sub(64 * 1024);
            let _ = f.seek(SeekFrom::Start(start));
            let _ = f.read_to_string(&mut s);
        }
        let all: Vec<&str> = s.lines().collect();
        let from = all.len().saturating_sub(lines);
        format!(
            "---- node log tail ({}) ----\n{}\n---- end of node log ----",
            self.log_path.display(),
            all[from..].join("\n")
        )
    }

    // ---------------------------------------------------------------- HTTP

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Resp {
        let mut rb = self.http.request(method.clone(), self.api(path));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(b);
        }
        self.finish(rb, &format!("{method} {path}")).await
    }

    pub async fn call_raw(
        &self,
        method: reqwest::Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Resp {
        let mut rb = self.http.request(method.clone(), url);
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        if let Some(b) = body {
            rb = rb.body(b);
        }
        self.finish(rb, &format!("{method} {url}")).await
    }

    async fn finish(&self, rb: reqwest::RequestBuilder, what: &str) -> Resp {
        let r = rb
            .send()
            .await
            .unwrap_or_else(|e| panic!("{what}: request failed: {e} {}", self.ctx()));
        let status = r.status().as_u16();
        let text = r
            .text()
            .await
            .unwrap_or_else(|e| panic!("{what}: reading body failed: {e} {}", self.ctx()));
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.clone()))
        };
        Resp { status, body, text }
    }

    /// GET at the server root (`/healthz`, `/metrics`), outside the API prefix.
    pub async fn get_root(&self, path: &str) -> Resp {
        self.call_raw(
            reqwest::Method::GET,
            &format!("{}{path}", self.base()),
            &[],
            None,
        )
        .await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Resp {
        self.call(reqwest::Method::GET, path, token, None).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> Resp {
        self.call(reqwest::Method::POST, path, token, Some(body))
            .await
    }

    pub async fn delete(&self, path: &str, token: Option<&str>) -> Resp {
        self.call(reqwest::Method::DELETE, path, token, None).await
    }

    pub async fn healthz(&self) -> u16 {
        self.call_raw(
            reqwest::Method::GET,
            &format!("{}/healthz", self.base()),
            &[],
            None,
        )
        .await
        .status
    }

    /// POST /users; returns the raw answer.
    pub async fn create_user(&self, handle: &str, password: &str) -> Resp {
        self.post(
            "/users",
            None,
            &json!({"handle": handle, "password": password}),
        )
        .await
    }

    /// POST /sessions; returns the raw answer.
    pub async fn login(&self, handle: &str, password: &str) -> Resp {
        self.post(
            "/sessions",
            None,
            &json!({"handle": handle, "password": password}),
        )
        .await
    }

    /// Registers `handle` and logs in: (user_id, token).
    pub async fn register(&self, handle: &str) -> (String, String) {
        let password = "correct horse battery";
        let r = self.create_user(handle, password).await;
        assert_eq!(
            r.status,
            201,
            "POST /users {handle}: {} {}",
            r.text,
            self.ctx()
        );
        let id = str_field(&r.body, "user_id").to_string();
        let l = self.login(handle, password).await;
        assert_eq!(
            l.status,
            200,
            "POST /sessions {handle}: {} {}",
            l.text,
            self.ctx()
        );
        let token = str_field(&l.body, "token").to_string();
        (id, token)
    }

    /// Registers a fresh user with a unique handle built from `prefix`.
    pub async fn user(&self, prefix: &str) -> User {
        let handle = unique_handle(prefix);
        let (id, token) = self.register(&handle).await;
        User {
            id,
            handle,
            password: "correct horse battery".into(),
            token,
        }
    }

    /// GET /conversations/{cid}/messages?{query} and returns the messages,
    /// asserting a 200 answer.
    pub async fn history(&self, token: &str, cid: &str, query: &str) -> Vec<Value> {
        let path = format!("/conversations/{cid}/messages?{query}");
        let r = self.get(&path, Some(token)).await;
        assert_eq!(r.status, 200, "GET {path}: {} {}", r.text, self.ctx());
        r.body["messages"]
            .as_array()
            .unwrap_or_else(|| panic!("GET {path}: no `messages` array: {}", r.text))
            .clone()
    }

    /// Every message of a conversation, via after_seq paging with limit 500.
    pub async fn full_history(&self, token: &str, cid: &str) -> Vec<Value> {
        let mut out: Vec<Value> = Vec::new();
        let mut after = 0;
        loop {
            let page = self
                .history(token, cid, &format!("after_seq={after}&limit=500"))
                .await;
            if page.is_empty() {
                return out;
            }
            after = u64_field(page.last().expect("non-empty"), "seq");
            out.extend(page);
            assert!(out.len() < 1_000_000, "runaway history paging");
        }
    }

    /// The whole history of `cid` as `(seq, body)` pairs (an empty body for none).
    pub async fn seq_bodies(&self, token: &str, cid: &str) -> Vec<(u64, String)> {
        self.full_history(token, cid)
            .await
            .iter()
            .map(|m| {
                (
                    u64_field(m, "seq"),
                    m["body"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// GET /users/{id} as `token`, asserting 200.
    pub async fn user_obj(&self, token: &str, id: &str) -> Value {
        let r = self.get(&format!("/users/{id}"), Some(token)).await;
        assert_eq!(r.status, 200, "GET /users/{id}: {} {}", r.text, self.ctx());
        r.body
    }

    /// Polls GET /users/{id} until `pred` holds, bounded by `bound`.
    /// Returns the last user object seen, and whether `pred` held.
    pub async fn poll_user(
        &self,
        token: &str,
        id: &str,
        bound: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> (Value, bool) {
        let deadline = Instant::now() + bound;
        loop {
            let u = self.user_obj(token, id).await;
            if pred(&u) {
                return (u, true);
            }
            if Instant::now() > deadline {
                return (u, false);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // ----------------------------------------------------------- WebSocket

    /// Opens a WebSocket with `?token=`; panics on failure.
    pub async fn ws(&self, token: &str) -> Ws {
        match self.try_ws(token).await {
            Ok(ws) => ws,
            Err(e) => panic!("WebSocket connect failed: {e} {}", self.ctx()),
        }
    }

    /// Opens a WebSocket with `?token=`.
    pub async fn try_ws(&self, token: &str) -> Result<Ws, WsConnectError> {
        let tcp = TcpStream::connect(("127.0.0.1", self.port))
            .await
            .map_err(|e| WsConnectError::Io(e.to_string()))?;
        Ws::handshake(self.ws_url(token), None, tcp, self.ctx()).await
    }

    /// Opens a WebSocket authenticated with the `Authorization` header.
    pub async fn try_ws_header(&self, token: &str) -> Result<Ws, WsConnectError> {
        let tcp = TcpStream::connect(("127.0.0.1", self.port))
            .await
            .map_err(|e| WsConnectError::Io(e.to_string()))?;
        let url = format!("ws://127.0.0.1:{}/api/v1/ws", self.port);
        Ws::handshake(url, Some(token), tcp, self.ctx()).await
    }

    /// Opens a WebSocket over a socket with a small receive buffer, so a
    /// client that stops reading backs up into the server quickly.
    pub async fn ws_small_rcvbuf(&self, token: &str, rcvbuf: u32) -> Ws {
        let sock = TcpSocket::new_v4().expect("socket");
        sock.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
        let addr = format!("127.0.0.1:{}", self.port).parse().expect("addr");
        let tcp = sock.connect(addr).await.expect("connect");
        Ws::handshake(self.ws_url(token), None, tcp, self.ctx())
            .await
            .unwrap_or_else(|e| panic!("WebSocket connect failed: {e} {}", self.ctx()))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail(80));
        }
    }
}

/// Asserts an HTTP error answer: status and `{"error":{"code","message"}}`.
#[track_caller]
pub fn assert_http_error(r: &Resp, status: u16, code: &str, what: &str) {
    assert_eq!(
        r.status, status,
        "{what}: expected {status} {code}, got {} {}",
        r.status, r.text
    );
    assert_eq!(
        r.body["error"]["code"].as_str(),
        Some(code),
        "{what}: expected error code {code}, got body {}",
        r.text
    );
    assert!(
        r.body["error"]["message"].is_string(),
        "{what}: error.message must be a string, got {}",
        r.text
    );
}

/// Asserts the contract's user object shape.
#[track_caller]
pub fn assert_user_obj(u: &Value, id: &str, handle: &str) {
    assert_eq!(u["user_id"].as_str(), Some(id), "user_id in {u}");
    assert_eq!(u["handle"].as_str(), Some(handle), "handle in {u}");
    assert!(u["display_name"].is_string(), "display_name in {u}");
    assert!(u["online"].is_boolean(), "online must be a bool in {u}");
    assert!(
        u.get("last_seen").is_some() && (u["last_seen"].is_null() || u["last_seen"].is_u64()),
        "last_seen must be present, null or integer ms, in {u}"
    );
}

/// Asserts the contract's message object shape.
#[track_caller]
pub fn assert_message_obj(m: &Value) {
    assert!(is_uuid(&m["message_id"]), "message_id in {m}");
    assert!(is_uuid(&m["conversation_id"]), "conversation_id in {m}");
    assert!(m["seq"].as_u64().is_some_and(|s| s >= 1), "seq in {m}");
    assert!(is_uuid(&m["sender_id"]), "sender_id in {m}");
    assert!(
        matches!(m["kind"].as_str(), Some("user") | Some("system")),
        "kind in {m}"
    );
    assert!(m["body"].is_string(), "body in {m}");
    assert!(m["media"].is_array(), "media must be an array in {m}");
    assert!(m.get("client_msg_id").is_some(), "client_msg_id in {m}");
    assert!(m["ts"].is_u64(), "ts in {m}");
}

/// Asserts the ack shape for `cmid`.
#[track_caller]
pub fn assert_ack_shape(ack: &Value, cmid: &str) {
    assert_eq!(ack["type"], "ack", "not an ack: {ack}");
    assert_eq!(ack["client_msg_id"].as_str(), Some(cmid), "ack cmid: {ack}");
    assert!(is_uuid(&ack["message_id"]), "ack message_id: {ack}");
    assert!(
        is_uuid(&ack["conversation_id"]),
        "ack conversation_id: {ack}"
    );
    assert!(
        ack["seq"].as_u64().is_some_and(|s| s >= 1),
        "ack seq: {ack}"
    );
    assert!(ack["ts"].is_u64(), "ack ts: {ack}");
}

/// A client that roams between nodes: it sends a frame and retries it (same
/// `client_msg_id`) until acked, reconnecting whenever its connection breaks.
pub struct Roamer {
    token: String,
    ws: Option<Ws>,
    /// Sends retried (an error answer, or a broken connection).
    pub retries: u64,
}

impl Roamer {
    pub fn new(token: &str) -> Roamer {
        Roamer {
            token: token.to_string(),
            ws: None,
            retries: 0,
        }
    }

    /// Sends `frame` (a `send` with its `client_msg_id`) until acked, connecting to
    /// the node `port` names each time it needs a connection; an error whose code is
    /// in `retry_on` is retried, any other fails the test, and so does no ack within
    /// `within`. The ack.
    pub async fn send_until_acked(
        &mut self,
        frame: &Value,
        mut port: impl FnMut() -> u16,
        retry_on: &[&str],
        within: Duration,
    ) -> Value {
        let cmid = frame["client_msg_id"]
            .as_str()
            .expect("a client_msg_id")
            .to_string();
        let deadline = Instant::now() + within;
        loop {
            assert!(
                Instant::now() < deadline,
                "no ack for {frame} within {within:?}"
            );
            let ws = match self.ws.as_mut() {
                Some(ws) => ws,
                None => match ws_to(port(), &self.token).await {
                    Ok(w) => self.ws.insert(w),
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            if !ws.try_send_text(frame.to_string()).await {
                self.ws = None;
                continue;
            }
            let answer = loop {
                match ws.next_event(Duration::from_secs(8)).await {
                    Event::Json(v) if v["client_msg_id"] == cmid.as_str() => break Some(v),
                    Event::Json(_) | Event::Binary(_) => {}
                    Event::Closed(_) | Event::Timeout => break None,
                }
            };
            self.retries += 1;
            match answer {
                Some(v) if v["type"] == "ack" => {
                    self.retries -= 1;
                    assert_ack_shape(&v, &cmid);
                    return v;
                }
                Some(v) => {
                    let code = v["code"].as_str().unwrap_or_default();
                    assert!(retry_on.contains(&code), "a send failed for good: {v}");
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
                None => {
                    self.ws = None;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Opens a WebSocket to the node on `port` (for clients that roam between nodes).
pub async fn ws_to(port: u16, token: &str) -> Result<Ws, WsConnectError> {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| WsConnectError::Io(e.to_string()))?;
    let url = format!("ws://127.0.0.1:{port}/api/v1/ws?token={token}");
    Ws::handshake(url, None, tcp, format!("(node on port {port})")).await
}

/// Asserts an error frame with `code` (and its `message` text).
#[track_caller]
pub fn assert_error_frame(v: &Value, code: &str, what: &str) {
    assert_eq!(
        v["type"], "error",
        "{what}: expected error frame {code}, got {v}"
    );
    assert_eq!(
        v["code"].as_str(),
        Some(code),
        "{what}: wrong error code in {v}"
    );
    assert!(
        v["message"].is_string(),
        "{what}: error frame without message: {v}"
    );
}

// ---------------------------------------------------------------------------
// WebSocket client
// ---------------------------------------------------------------------------

#[derive(Debug)]
pub enum WsConnectError {
    Io(String),
    /// A non-101 HTTP answer to the upgrade: status and body (if any).
    Http(u16, Option<String>),
    Other(String),
}

impl std::fmt::Display for WsConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

/// What the next read produced.
#[derive(Debug)]
pub enum Event {
    Json(Value),
    Binary(Vec<u8>),
    /// Close frame (with its code) or end of stream / transport error (None).
    Closed(Option<u16>),
    Timeout,
}

/// A WebSocket client. Frames read but not yet wanted wait in `pending`.
pub struct Ws {
    inner: WebSocketStream<TcpStream>,
    pub pending: VecDeque<Value>,
    pub closed: bool,
    /// Transport error that ended the stream, if any.
    pub end_error: Option<String>,
    ctx: String,
}

/// What `sync` returned.
#[derive(Debug)]
pub struct Synced {
    pub messages: Vec<Value>,
    pub inbox_seq: u64,
}

impl Ws {
    async fn handshake(
        url: String,
        bearer: Option<&str>,
        tcp: TcpStream,
        ctx: String,
    ) -> Result<Ws, WsConnectError> {
        let mut req = url
            .into_client_request()
            .map_err(|e| WsConnectError::Other(e.to_string()))?;
        if let Some(t) = bearer {
            req.headers_mut().insert(
                "Authorization",
                format!("Bearer {t}").parse().expect("header value"),
            );
        }
        let fut = tokio_tungstenite::client_async(req, tcp);
        match tokio::time::timeout(RECV_TIMEOUT, fut).await {
            Err(_) => Err(WsConnectError::Other("handshake timed out".into())),
            Ok(Ok((inner, _resp))) => Ok(Ws {
                inner,
                pending: VecDeque::new(),
                closed: false,
                end_error: None,
                ctx,
            }),
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
                let status = resp.status().as_u16();
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned());
                Err(WsConnectError::Http(status, body))
            }
            Ok(Err(e)) => Err(WsConnectError::Other(e.to_string())),
        }
    }

    /// The underlying TCP stream, for writing raw bytes.
    pub fn tcp(&mut self) -> &mut TcpStream {
        self.inner.get_mut()
    }

    pub async fn send_text(&mut self, s: String) {
        let r = tokio::time::timeout(RECV_TIMEOUT, self.inner.send(Message::Text(s))).await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("WebSocket send failed: {e} {}", self.ctx),
            Err(_) => panic!("WebSocket send timed out {}", self.ctx),
        }
    }

    /// Sends; returns false instead of panicking when the transport failed.
    pub async fn try_send_text(&mut self, s: String) -> bool {
        matches!(
            tokio::time::timeout(RECV_TIMEOUT, self.inner.send(Message::Text(s))).await,
            Ok(Ok(()))
        )
    }

    pub async fn send_binary(&mut self, b: Vec<u8>) {
        self.inner
            .send(Message::Binary(b))
            .await
            .unwrap_or_else(|e| panic!("WebSocket send failed: {e} {}", self.ctx));
    }

    pub async fn send_json(&mut self, v: &Value) {
        self.send_text(v.to_string()).await;
    }

    /// Reads the next data frame, skipping ping/pong control frames.
    pub async fn next_event(&mut self, bound: Duration) -> Event {
        if self.closed {
            return Event::Closed(None);
        }
        let deadline = Instant::now() + bound;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(remaining, self.inner.next()).await {
                Err(_) => return Event::Timeout,
                Ok(None) => {
                    self.closed = true;
                    return Event::Closed(None);
                }
                Ok(Some(Err(e))) => {
                    self.closed = true;
                    self.end_error = Some(e.to_string());
                    return Event::Closed(None);
                }
                Ok(Some(Ok(msg))) => match msg {
                    Message::Text(t) => {
                        let v: Value = serde_json::from_str(&t).unwrap_or_else(|e| {
                            panic!(
                                "server sent a non-JSON text frame ({e}): {t:?} {}",
                                self.ctx
                            )
                        });
                        return Event::Json(v);
                    }
                    Message::Binary(b) => return Event::Binary(b),
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                    Message::Close(f) => {
                        self.closed = true;
                        return Event::Closed(f.map(|f| u16::from(f.code)));
                    }
                },
            }
        }
    }

    /// Next JSON text frame (pending first), within `ms`; panics otherwise.
    pub async fn recv_json_timeout(&mut self, ms: u64) -> Value {
        if let Some(v) = self.pending.pop_front() {
            return v;
        }
        match self.next_event(Duration::from_millis(ms)).await {
            Event::Json(v) => v,
            other => panic!(
                "expected a JSON frame within {ms} ms, got {other:?} {}",
                self.ctx
            ),
        }
    }

    pub async fn recv(&mut self) -> Value {
        self.recv_json_timeout(RECV_TIMEOUT.as_millis() as u64)
            .await
    }

    /// First frame (pending first) matching `pred`; others are kept in
    /// `pending` in arrival order.
    pub async fn recv_where(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.pending.iter().position(&pred) {
            return self.pending.remove(i).expect("index valid");
        }
        let deadline = Instant::now() + RECV_TIMEOUT;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.next_event(remaining).await {
                Event::Json(v) if pred(&v) => return v,
                Event::Json(v) => self.pending.push_back(v),
                other => panic!(
                    "waiting for {what}: got {other:?}; frames held: {:?} {}",
                    self.pending, self.ctx
                ),
            }
        }
    }

    pub async fn recv_type(&mut self, ty: &str) -> Value {
        let t = ty.to_string();
        self.recv_where(&format!("a `{ty}` frame"), move |v| v["type"] == t.as_str())
            .await
    }

    /// Asserts that no data frame arrives for `ms` (and none is pending).
    pub async fn expect_no_frame_for(&mut self, ms: u64) {
        assert!(
            self.pending.is_empty(),
            "unexpected frames held: {:?} {}",
            self.pending,
            self.ctx
        );
        match self.next_event(Duration::from_millis(ms)).await {
            Event::Timeout => {}
            other => panic!("expected no frame for {ms} ms, got {other:?} {}", self.ctx),
        }
    }

    /// Removes and returns held frames of type `ty`.
    pub fn take_pending_type(&mut self, ty: &str) -> Vec<Value> {
        let (take, keep): (Vec<Value>, Vec<Value>) =
            self.pending.drain(..).partition(|v| v["type"] == ty);
        self.pending = keep.into();
        take
    }

    /// Sends `sync` and collects `message` frames until `synced`. Other
    /// frames are kept in `pending`.
    pub async fn sync(&mut self, after: u64) -> Synced {
        self.send_json(&json!({"type": "sync", "after": after}))
            .await;
        self.collect_until_synced().await
    }

    pub async fn collect_until_synced(&mut self) -> Synced {
        let mut messages = Vec::new();
        let mut others = Vec::new();
        let mut held: VecDeque<Value> = std::mem::take(&mut self.pending);
        loop {
            let v = match held.pop_front() {
                Some(v) => v,
                None => match self.next_event(RECV_TIMEOUT).await {
                    Event::Json(v) => v,
                    other => panic!(
                        "sync: expected message/synced, got {other:?} after {} messages {}",
                        messages.len(),
                        self.ctx
                    ),
                },
            };
            match v["type"].as_str() {
                Some("message") => messages.push(v),
                Some("synced") => {
                    let inbox_seq = u64_field(&v, "inbox_seq");
                    others.extend(held);
                    self.pending.extend(others);
                    return Synced {
                        messages,
                        inbox_seq,
                    };
                }
                Some("error") => panic!("sync answered with an error: {v} {}", self.ctx),
                _ => others.push(v),
            }
        }
    }

    /// Sends `sync` after `after` and collects `n` message events in all: the
    /// replay, then live ones after `synced` (messages acked to their sender
    /// may reach this inbox a moment later; the contract allows them to come
    /// live). Checks the replay is contiguous from `after + 1` and that
    /// `synced.inbox_seq` is the last replayed one; the caller checks the rest.
    pub async fn sync_n(&mut self, after: u64, n: usize) -> Synced {
        let s = self.sync(after).await;
        let replayed: Vec<u64> = s
            .messages
            .iter()
            .map(|f| u64_field(f, "inbox_seq"))
            .collect();
        let want: Vec<u64> = (after + 1..=after + replayed.len() as u64).collect();
        assert_eq!(replayed, want, "replay after {after} {}", self.ctx);
        if let Some(&last) = replayed.last() {
            assert_eq!(
                s.inbox_seq, last,
                "synced.inbox_seq after replay {}",
                self.ctx
            );
        }
        assert!(
            s.messages.len() <= n,
            "replay gave {} messages, expected {n} {}",
            s.messages.len(),
            self.ctx
        );
        let mut messages = s.messages;
        let more = n - messages.len();
        messages.extend(self.recv_messages(more).await);
        Synced {
            messages,
            inbox_seq: s.inbox_seq,
        }
    }

    /// Collects `n` `message` frames (pending first); other frames are held.
    pub async fn recv_messages(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let v = self
                .recv_where(&format!("message frame {} of {n}", out.len() + 1), |v| {
                    v["type"] == "message"
                })
                .await;
            out.push(v);
        }
        out
    }

    /// Sends a `send` frame to a user; returns the client_msg_id.
    pub async fn send_to_user_nowait(&mut self, to: &str, body: &str) -> String {
        let cmid = new_uuid();
        self.send_json(&json!({"type":"send","client_msg_id":cmid,"to_user":to,"body":body}))
            .await;
        cmid
    }

    /// Sends a `send` frame to a conversation; returns the client_msg_id.
    pub async fn send_to_conv_nowait(&mut self, cid: &str, body: &str) -> String {
        let cmid = new_uuid();
        self.send_json(
            &json!({"type":"send","client_msg_id":cmid,"conversation_id":cid,"body":body}),
        )
        .await;
        cmid
    }

    /// Waits for the ack or error answering `cmid`.
    pub async fn reply_for(&mut self, cmid: &str) -> Value {
        let c = cmid.to_string();
        self.recv_where(&format!("ack/error for {cmid}"), move |v| {
            (v["type"] == "ack" || v["type"] == "error") && v["client_msg_id"] == c.as_str()
        })
        .await
    }

    /// Waits for the ack of `cmid`, panicking on an error frame.
    pub async fn ack_for(&mut self, cmid: &str) -> Value {
        let v = self.reply_for(cmid).await;
        assert_eq!(
            v["type"], "ack",
            "expected an ack for {cmid}, got {v} {}",
            self.ctx
        );
        v
    }

    /// Sends to a user and waits for the ack.
    pub async fn send_to_user(&mut self, to: &str, body: &str) -> Value {
        let cmid = self.send_to_user_nowait(to, body).await;
        let ack = self.ack_for(&cmid).await;
        assert_ack_shape(&ack, &cmid);
        ack
    }

    /// Sends to a conversation and waits for the ack.
    pub async fn send_to_conv(&mut self, cid: &str, body: &str) -> Value {
        let cmid = self.send_to_conv_nowait(cid, body).await;
        let ack = self.ack_for(&cmid).await;
        assert_ack_shape(&ack, &cmid);
        ack
    }

    /// `ping` -> `pong`: proves the connection is open and serving.
    pub async fn ping_pong(&mut self) {
        self.send_json(&json!({"type":"ping"})).await;
        self.recv_type("pong").await;
    }

    /// Waits (bounded) for the connection to end, discarding data frames.
    /// Returns the close code if a close frame came, and how many data
    /// frames were discarded. Panics if it does not end within `bound`.
    pub async fn expect_close(&mut self, bound: Duration) -> (Option<u16>, usize) {
        self.pending.clear();
        let deadline = Instant::now() + bound;
        let mut discarded = 0;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.next_event(remaining).await {
                Event::Closed(code) => return (code, discarded),
                Event::Timeout => panic!(
                    "connection still open after {bound:?} ({discarded} frames read) {}",
                    self.ctx
                ),
                Event::Json(_) | Event::Binary(_) => discarded += 1,
            }
        }
    }

    /// Closes politely.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.inner.close(None)).await;
    }
}
