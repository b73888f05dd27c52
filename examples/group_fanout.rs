//! Measures group fan-out on a running node, as clients see it: one group of `--members`
//! users, every member connected and synced, one member sending `--messages` messages
//! open-loop at `--rate` per second; for each message, the time from its scheduled send
//! to the moment the last member's device has it.
//!
//! ```sh
//! cargo run --release -- serve &            # a node on 127.0.0.1:8080
//! cargo run --release --example group_fanout -- --members 1000 --messages 100 --rate 10
//! ```
//!
//! Uses only the client contract (HTTP + WebSocket). Prints a summary and one JSON line.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    #[arg(long, default_value_t = 1000)]
    members: usize,
    #[arg(long, default_value_t = 100)]
    messages: usize,
    /// Messages per second, open loop (sends are scheduled, not paced by acks).
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    #[arg(long, default_value_t = 100)]
    body: usize,
}

type Err = Box<dyn std::error::Error + Send + Sync>;

struct Member {
    id: String,
    token: String,
}

/// POSTs `body` (with the token, if any) and returns the string field `field` of the
/// answer.
async fn post_for(
    http: &reqwest::Client,
    url: String,
    token: Option<&str>,
    body: Value,
    field: &str,
) -> Result<String, Err> {
    let mut ask = http.post(url).json(&body);
    if let Some(t) = token {
        ask = ask.bearer_auth(t);
    }
    let answer: Value = ask.send().await?.json().await?;
    Ok(answer[field]
        .as_str()
        .ok_or(format!("no `{field}` in {answer}"))?
        .to_string())
}

async fn register(http: &reqwest::Client, base: &str, handle: String) -> Result<Member, Err> {
    let body = json!({"handle": handle, "password": "fanout-password"});
    let id = post_for(http, format!("{base}/users"), None, body.clone(), "user_id").await?;
    let token = post_for(http, format!("{base}/sessions"), None, body, "token").await?;
    Ok(Member { id, token })
}

/// Connects, syncs, then reports the conversation seq of every message it receives.
async fn device(
    addr: String,
    token: String,
    seen: mpsc::UnboundedSender<(u64, Instant)>,
    synced: mpsc::UnboundedSender<()>,
) -> Result<(), Err> {
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/api/v1/ws?token={token}")).await?;
    ws.send(Message::Text(
        json!({"type": "sync", "after": 0}).to_string(),
    ))
    .await?;
    while let Some(frame) = ws.next().await {
        let Message::Text(text) = frame? else {
            continue;
        };
        let v: Value = serde_json::from_str(&text)?;
        match v["type"].as_str() {
            Some("synced") => {
                let _ = synced.send(());
            }
            Some("message") => {
                let seq = v["message"]["seq"].as_u64().unwrap_or(0);
                let _ = seen.send((seq, Instant::now()));
            }
            _ => {}
        }
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> Result<(), Err> {
    let args = Args::parse();
    let base = format!("http://{}/api/v1", args.addr);
    let http = reqwest::Client::builder().no_proxy().build()?;
    let run = std::process::id();

    eprintln!("registering {} users...", args.members);
    let t = Instant::now();
    let gate = Arc::new(Semaphore::new(16));
    let made = futures_util::future::join_all((0..args.members).map(|i| {
        let (http, base, gate) = (http.clone(), base.clone(), Arc::clone(&gate));
        async move {
            let _permit = gate.acquire().await;
            register(&http, &base, format!("fo{run}_{i}")).await
        }
    }))
    .await;
    let members: Vec<Member> = made.into_iter().collect::<Result<_, _>>()?;
    eprintln!("  {:.1} s", t.elapsed().as_secs_f64());

    eprintln!("connecting {} devices...", members.len());
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let (synced_tx, mut synced_rx) = mpsc::unbounded_channel();
    for m in &members {
        let (addr, token) = (args.addr.clone(), m.token.clone());
        let (seen, synced) = (seen_tx.clone(), synced_tx.clone());
        tokio::spawn(async move {
            if let Err(e) = device(addr, token, seen, synced).await {
                eprintln!("device ended: {e}");
            }
        });
    }
    for _ in 0..members.len() {
        synced_rx.recv().await.ok_or("a device never synced")?;
    }

    let owner = &members[0];
    let others: Vec<&str> = members[1..].iter().map(|m| m.id.as_str()).collect();
    let created = Instant::now();
    let cid = post_for(
        &http,
        format!("{base}/groups"),
        Some(&owner.token),
        json!({"name": "fan-out", "members": others}),
        "conversation_id",
    )
    .await?;
    let create_answer = created.elapsed();

    // The sender is a second device of the owner, so every member device only reads.
    let (mut sender, _) = tokio_tungstenite::connect_async(format!(
        "ws://{}/api/v1/ws?token={}",
        args.addr, owner.token
    ))
    .await?;
    sender
        .send(Message::Text(
            json!({"type": "sync", "after": 0}).to_string(),
        ))
        .await?;
    let (mut sink, mut stream) = sender.split();
    tokio::spawn(async move { while stream.next().await.is_some() {} });

    let n = members.len();
    let total_msgs = args.messages + 1; // the group_created system message is seq 1
    let mut got: HashMap<u64, (usize, Instant)> = HashMap::new();
    let mut scheduled: HashMap<u64, Instant> = HashMap::from([(1, created)]);
    let body = "x".repeat(args.body);
    let gap = Duration::from_secs_f64(1.0 / args.rate);
    let start = Instant::now() + Duration::from_millis(500);
    let mut next = 0usize;
    let deadline = start + gap * args.messages as u32 + Duration::from_secs(30);
    let complete = |got: &HashMap<u64, (usize, Instant)>| {
        got.len() == total_msgs && got.values().all(|(c, _)| *c >= n)
    };
    while !complete(&got) && Instant::now() < deadline {
        let due = start + gap * next as u32;
        tokio::select! {
            _ = tokio::time::sleep_until(due.into()), if next < args.messages => {
                let frame = json!({"type": "send", "client_msg_id": uuid::Uuid::new_v4(),
                                   "conversation_id": cid, "body": body});
                sink.send(Message::Text(frame.to_string())).await?;
                scheduled.insert(next as u64 + 2, due);
                next += 1;
            }
            Some((seq, at)) = seen_rx.recv() => {
                let e = got.entry(seq).or_insert((0, at));
                e.0 += 1;
                e.1 = e.1.max(at);
            }
        }
    }

    let mut to_last: Vec<f64> = Vec::new();
    let mut short = 0;
    for seq in 2..=total_msgs as u64 {
        match (got.get(&seq), scheduled.get(&seq)) {
            (Some((count, last)), Some(at)) if *count >= n => {
                to_last.push(last.duration_since(*at).as_secs_f64() * 1000.0)
            }
            _ => short += 1,
        }
    }
    to_last.sort_by(f64::total_cmp);
    let creation_ms = got
        .get(&1)
        .map(|(_, last)| last.duration_since(created).as_secs_f64() * 1000.0);
    let (p50, p99, max) = (
        percentile(&to_last, 50.0),
        percentile(&to_last, 99.0),
        to_last.last().copied().unwrap_or(f64::NAN),
    );
    eprintln!(
        "group of {n}: {} messages at {}/s; time until the last member's device has a message: \
         p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms; {short} not delivered to all; \
         creation answered in {:.1} ms, on every device after {:.1} ms",
        args.messages,
        args.rate,
        create_answer.as_secs_f64() * 1000.0,
        creation_ms.unwrap_or(f64::NAN)
    );
    println!(
        "{}",
        json!({"workload": "group_fanout", "members": n, "messages": args.messages, "rate": args.rate,
               "body": args.body, "to_last_ms": {"p50": p50, "p99": p99, "max": max},
               "not_delivered_to_all": short,
               "create_answer_ms": create_answer.as_secs_f64() * 1000.0, "create_on_all_ms": creation_ms})
    );
    if short > 0 {
        return Err(format!("{short} messages did not reach every member").into());
    }
    Ok(())
}
