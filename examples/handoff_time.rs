//! Measures how long a ring change takes on a running cluster, as an operator sees it.
//!
//! `populate` fills the cluster through the client contract: `--users` users, `--groups`
//! groups of three (each with its conversation), `--messages` messages in each. Then,
//! after the operator has edited cluster.toml (and started any new node), `reload`
//! POSTs `/admin/reload` to every listed node and times until each reports the next
//! ring version with no handoff pending.
//!
//! ```sh
//! cargo run --release --example handoff_time -- --addr 127.0.0.1:8081 populate --users 200 --groups 5000 --messages 20
//! # add n4 to cluster.toml, start it, then:
//! cargo run --release --example handoff_time -- --addr 127.0.0.1:8081 reload \
//!     --nodes 127.0.0.1:8081,127.0.0.1:8082,127.0.0.1:8083,127.0.0.1:8084 --admin-token local-admin
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
struct Args {
    /// A node's client address, for `populate`.
    #[arg(long, default_value = "127.0.0.1:8081")]
    addr: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Populate {
        #[arg(long, default_value_t = 200)]
        users: usize,
        #[arg(long, default_value_t = 5000)]
        groups: usize,
        #[arg(long, default_value_t = 20)]
        messages: usize,
    },
    Reload {
        /// Every node's client address, comma-separated.
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<String>,
        #[arg(long, default_value = "local-admin")]
        admin_token: String,
    },
}

type Err = Box<dyn std::error::Error + Send + Sync>;

async fn post(
    http: &reqwest::Client,
    url: String,
    token: Option<&str>,
    body: Value,
) -> Result<Value, Err> {
    let mut ask = http.post(url).json(&body);
    if let Some(t) = token {
        ask = ask.bearer_auth(t);
    }
    let answer = ask.send().await?;
    let status = answer.status();
    let body: Value = answer.json().await?;
    if !status.is_success() {
        return Err(format!("{status}: {body}").into());
    }
    Ok(body)
}

async fn populate(addr: &str, users: usize, groups: usize, messages: usize) -> Result<(), Err> {
    let http = reqwest::Client::new();
    let base = format!("http://{addr}/api/v1");
    let run = uuid::Uuid::new_v4().simple().to_string();
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(4));
    let mut joins = Vec::new();
    for i in 0..users {
        let (http, base, gate) = (http.clone(), base.clone(), Arc::clone(&gate));
        let handle = format!("h{}_{i}", &run[..8]);
        joins.push(tokio::spawn(async move {
            let _permit = gate.acquire().await?;
            let body = json!({"handle": handle, "password": "handoff-password"});
            let id = post(&http, format!("{base}/users"), None, body.clone()).await?["user_id"]
                .as_str()
                .ok_or("no user_id")?
                .to_string();
            let token = post(&http, format!("{base}/sessions"), None, body).await?["token"]
                .as_str()
                .ok_or("no token")?
                .to_string();
            Ok::<_, Err>((id, token))
        }));
    }
    let mut members = Vec::new();
    for j in joins {
        members.push(j.await??);
    }
    eprintln!("{users} users in {:?}", started.elapsed());
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(16));
    let mut joins = Vec::new();
    for g in 0..groups {
        let owner = g % users;
        let others = [
            members[(g + 1) % users].0.clone(),
            members[(g + 7) % users].0.clone(),
        ];
        let (http, base, gate) = (http.clone(), base.clone(), Arc::clone(&gate));
        let token = members[owner].1.clone();
        joins.push(tokio::spawn(async move {
            let _permit = gate.acquire().await?;
            let body = json!({"name": format!("g{g}"), "members": others});
            let made = post(&http, format!("{base}/groups"), Some(&token), body).await?;
            Ok::<_, Err>((
                owner,
                made["conversation_id"]
                    .as_str()
                    .ok_or("no conversation_id")?
                    .to_string(),
            ))
        }));
    }
    let mut by_owner: Vec<Vec<String>> = vec![Vec::new(); users];
    for j in joins {
        let (owner, conv) = j.await??;
        by_owner[owner].push(conv);
    }
    eprintln!("{groups} groups in {:?}", started.elapsed());
    let started = Instant::now();
    let mut joins = Vec::new();
    for (owner, convs) in by_owner.into_iter().enumerate() {
        let url = format!("ws://{addr}/api/v1/ws?token={}", members[owner].1);
        joins.push(tokio::spawn(send_all(url, convs, messages)));
    }
    let mut sent = 0;
    for j in joins {
        sent += j.await??;
    }
    eprintln!("{sent} messages in {:?}", started.elapsed());
    Ok(())
}

/// Sends `messages` messages to each conversation over one connection, at most 64
/// unacknowledged at a time and 40 a second (under the default `sends_per_second`).
async fn send_all(url: String, convs: Vec<String>, messages: usize) -> Result<usize, Err> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    let mut pace = tokio::time::interval(Duration::from_millis(25));
    let total = convs.len() * messages;
    let (mut sent, mut acked) = (0, 0);
    let mut plan = convs
        .iter()
        .flat_map(|c| std::iter::repeat_n(c, messages))
        .enumerate();
    while acked < total {
        while sent - acked < 64 {
            let Some((i, conv)) = plan.next() else { break };
            pace.tick().await;
            let frame = json!({"type": "send", "client_msg_id": uuid::Uuid::new_v4(),
                "conversation_id": conv, "body": format!("message {i}")});
            ws.send(Message::Text(frame.to_string())).await?;
            sent += 1;
        }
        match ws.next().await.ok_or("connection closed")?? {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t)?;
                match v["type"].as_str() {
                    Some("ack") => acked += 1,
                    Some("error") => return Err(format!("send refused: {v}").into()),
                    _ => {}
                }
            }
            Message::Close(c) => return Err(format!("closed: {c:?}").into()),
            _ => {}
        }
    }
    Ok(total)
}

async fn reload(nodes: &[String], token: &str) -> Result<(), Err> {
    let http = reqwest::Client::new();
    let view = |node: &String| {
        let ask = http
            .get(format!("http://{node}/admin/cluster"))
            .bearer_auth(token);
        async move { ask.send().await?.json::<Value>().await }
    };
    let before = view(&nodes[0]).await?["ring_version"].as_u64().unwrap_or(0);
    let started = Instant::now();
    for node in nodes {
        let answer = http
            .post(format!("http://{node}/admin/reload"))
            .bearer_auth(token)
            .send()
            .await?;
        eprintln!("{node}: {} {}", answer.status(), answer.text().await?);
    }
    let mut done = vec![None; nodes.len()];
    while done.iter().any(Option::is_none) {
        for (i, node) in nodes.iter().enumerate() {
            if done[i].is_some() {
                continue;
            }
            match view(node).await {
                Ok(v)
                    if v["ring_version"].as_u64() > Some(before)
                        && v["handoffs_pending"].as_u64() == Some(0) =>
                {
                    done[i] = Some((started.elapsed(), v));
                }
                // A node that left stops answering: done when it is gone.
                Err(_) => done[i] = Some((started.elapsed(), Value::Null)),
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut slowest = Duration::ZERO;
    for (node, (took, v)) in nodes.iter().zip(done.into_iter().flatten()) {
        slowest = slowest.max(took);
        println!("{node}: ring version {} after {took:?}", v["ring_version"]);
        if let Some(list) = v["nodes"].as_array() {
            for n in list {
                println!(
                    "    {} {} owns {}",
                    n["id"], n["status"], n["owned_entities"]
                );
            }
        }
    }
    println!(
        "{}",
        json!({"ring_version_before": before, "seconds_to_commit_everywhere": slowest.as_secs_f64()})
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Err> {
    let args = Args::parse();
    match args.command {
        Command::Populate {
            users,
            groups,
            messages,
        } => populate(&args.addr, users, groups, messages).await,
        Command::Reload { nodes, admin_token } => reload(&nodes, &admin_token).await,
    }
}
