//! The workloads. Each registers its users, connects and syncs every device before it
//! starts the clock, then measures what the recipients' devices receive.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::SinkExt;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::client::{self, next_json, scheduled_of, send_frame, Rx, Tx};
use super::report::{self, histogram, latency_json, latency_line, CpuMeter};
use super::{Common, Workload};

/// Runs one workload to completion on a runtime of `common.threads` threads.
pub fn run(common: Common, workload: Workload) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(common.threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match workload {
            Workload::Throughput(p) => {
                let pace = Pace::Window(p.window);
                pairs(
                    &common,
                    "throughput",
                    p.users,
                    pace,
                    p.seconds,
                    p.warmup,
                    false,
                )
                .await
            }
            Workload::Cluster(p) => {
                if common.addr.len() < 2 {
                    bail!("cluster needs two addresses: --addr SENDERS_NODE,RECIPIENTS_NODE");
                }
                let pace = Pace::Window(p.window);
                pairs(&common, "cluster", p.users, pace, p.seconds, p.warmup, true).await
            }
            Workload::Latency {
                users,
                rate,
                seconds,
                warmup,
            } => {
                pairs(
                    &common,
                    "latency",
                    users,
                    Pace::Rate(rate),
                    seconds,
                    warmup,
                    false,
                )
                .await
            }
            Workload::Fanout {
                members,
                messages,
                rate,
            } => fanout(&common, members, messages, rate).await,
            Workload::Idle {
                conns,
                users,
                parallel,
                hold,
            } => idle(&common, conns, users, parallel, hold).await,
            Workload::Catchup { messages, senders } => catchup(&common, messages, senders).await,
        }
    })
}

fn prefix(common: &Common) -> String {
    common.prefix.clone().unwrap_or_else(|| {
        let r = uuid::Uuid::new_v4().simple().to_string();
        format!("b{}_", &r[..8])
    })
}

fn http() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()?)
}

/// Microseconds since `t0`.
fn since(t0: Instant) -> u64 {
    t0.elapsed().as_micros() as u64
}

#[derive(Clone, Copy)]
enum Pace {
    /// Closed loop: each sender keeps this many sends unacknowledged.
    Window(usize),
    /// Open loop: this many sends a second in all.
    Rate(f64),
}

/// Counters shared by the tasks of a run.
#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
    rate_limited: AtomicU64,
    delivered: AtomicU64,
    delivered_measured: AtomicU64,
}

/// `throughput`, `latency` and `cluster`: users in pairs, the even one of each pair
/// sending to the odd one.
async fn pairs(
    common: &Common,
    name: &str,
    users: usize,
    pace: Pace,
    seconds: u64,
    warmup: u64,
    split: bool,
) -> Result<()> {
    let users = users.max(2) / 2 * 2;
    let http = http()?;
    let all = client::users(&http, &common.addr, &prefix(common), users, 8).await?;
    let addr_of = |i: usize, sender: bool| -> String {
        if split {
            common.addr[usize::from(!sender)].clone()
        } else {
            common.addr[i % common.addr.len()].clone()
        }
    };
    let mut connections = Vec::new();
    for (i, u) in all.iter().enumerate() {
        connections.push(client::connect(&addr_of(i, i % 2 == 0), &u.token).await?);
    }
    let t0 = Instant::now();
    let measure_from = Duration::from_secs(warmup);
    let end = Duration::from_secs(warmup + seconds);
    let counts = Arc::new(Counts::default());
    let latencies = Arc::new(Mutex::new(histogram()));
    let cpu = Arc::new(Mutex::new(None::<CpuMeter>));
    let bar = report::progress(warmup + seconds, name, common.quiet);
    let senders = users / 2;
    let mut tasks = Vec::new();
    let mut conns = connections.into_iter();
    for i in 0..senders {
        let (Some(send), Some(recv)) = (conns.next(), conns.next()) else {
            bail!("connection missing");
        };
        let target = json!({"to_user": all[2 * i + 1].id});
        let (sent_counts, body) = (Arc::clone(&counts), common.body);
        let pace_here = match pace {
            Pace::Window(w) => Pace::Window(w),
            Pace::Rate(r) => Pace::Rate(r / senders as f64),
        };
        let offset = Duration::from_secs_f64(match pace {
            Pace::Rate(r) => i as f64 / r,
            Pace::Window(_) => 0.0,
        });
        tasks.push(tokio::spawn(sender(
            send,
            target,
            pace_here,
            offset,
            t0,
            end,
            body,
            sent_counts,
        )));
        tasks.push(tokio::spawn(recipient(
            recv,
            t0,
            measure_from,
            end,
            Arc::clone(&counts),
            Arc::clone(&latencies),
        )));
    }
    // The clock: progress, and the CPU meter from the end of the warm-up.
    let ticking = {
        let (bar, cpu, pid) = (bar.clone(), Arc::clone(&cpu), common.server_pid);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut n = 0;
            while n <= warmup + seconds {
                tick.tick().await;
                if n == warmup {
                    *cpu.lock().unwrap_or_else(|p| p.into_inner()) = Some(CpuMeter::start(pid));
                }
                bar.set_position(n);
                n += 1;
            }
        })
    };
    for t in tasks {
        t.await??;
    }
    let _ = ticking.await;
    bar.finish_and_clear();
    let h = latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let measured = counts.delivered_measured.load(Ordering::Relaxed);
    let rate = measured as f64 / seconds.max(1) as f64;
    let cpu_json = cpu
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .map_or(Value::Null, CpuMeter::json);
    let sent = counts.sent.load(Ordering::Relaxed);
    let delivered = counts.delivered.load(Ordering::Relaxed);
    let record = json!({
        "workload": name,
        "addr": common.addr,
        "users": users,
        "pace": match pace { Pace::Window(w) => json!({"window": w}), Pace::Rate(r) => json!({"rate": r}) },
        "seconds": seconds,
        "body_bytes": common.body,
        "delivered_per_sec": report::round2(rate),
        "sent": sent,
        "acked": counts.acked.load(Ordering::Relaxed),
        "delivered": delivered,
        // Stored (acked) but never seen by the recipient; refused sends are not lost.
        "lost": counts.acked.load(Ordering::Relaxed).saturating_sub(delivered),
        "errors": counts.errors.load(Ordering::Relaxed),
        "rate_limited": counts.rate_limited.load(Ordering::Relaxed),
        "latency": latency_json(&h),
        "cpu": cpu_json,
    });
    if let Some(path) = &common.plot {
        report::plot(
            path,
            &format!("switchboard bench {name}: send to device"),
            &h,
        )
        .with_context(|| format!("writing {}", path.display()))?;
    }
    report::emit(
        &format!(
            "{name}: {rate:.0} msg/s delivered over {seconds} s ({sent} sent, {delivered} delivered, {} errors); {}",
            counts.errors.load(Ordering::Relaxed),
            latency_line(&h)
        ),
        &record,
    );
    Ok(())
}

/// Sends until `end`, then waits (bounded) for the acks of what it sent.
#[allow(clippy::too_many_arguments)]
async fn sender(
    (mut tx, mut rx): (Tx, Rx),
    target: Value,
    pace: Pace,
    offset: Duration,
    t0: Instant,
    end: Duration,
    body: usize,
    counts: Arc<Counts>,
) -> Result<()> {
    let in_flight = Arc::new(AtomicU64::new(0));
    let freed = Arc::new(tokio::sync::Notify::new());
    // Acks are read beside the sends, so an open-loop sender never waits on them.
    let reader = {
        let (counts, in_flight, freed) = (
            Arc::clone(&counts),
            Arc::clone(&in_flight),
            Arc::clone(&freed),
        );
        tokio::spawn(async move {
            while let Ok(Some(frame)) = next_json(&mut rx).await {
                match frame["type"].as_str() {
                    Some("ack") => {
                        counts.acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Some("error") => {
                        counts.errors.fetch_add(1, Ordering::Relaxed);
                        if frame["code"] == "rate_limited" {
                            counts.rate_limited.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    _ => continue,
                }
                in_flight.fetch_sub(1, Ordering::AcqRel);
                freed.notify_one();
            }
        })
    };
    let mut k = 0u64;
    loop {
        let now = t0.elapsed();
        if now >= end {
            break;
        }
        let scheduled = match pace {
            Pace::Window(w) => {
                if in_flight.load(Ordering::Acquire) >= w as u64 {
                    let _ = tokio::time::timeout(end - now, freed.notified()).await;
                    continue;
                }
                since(t0)
            }
            Pace::Rate(r) => {
                let at = offset + Duration::from_secs_f64(k as f64 / r);
                if at >= end {
                    break;
                }
                tokio::time::sleep_until((t0 + at).into()).await;
                at.as_micros() as u64
            }
        };
        in_flight.fetch_add(1, Ordering::AcqRel);
        tx.send(send_frame(&target, scheduled, body)).await?;
        counts.sent.fetch_add(1, Ordering::Relaxed);
        k += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while in_flight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        let _ = tokio::time::timeout(Duration::from_millis(100), freed.notified()).await;
    }
    reader.abort();
    let _ = tx.send(Message::Close(None)).await;
    Ok(())
}

/// Receives until everything sent has arrived or 10 s after `end`, recording latencies
/// of messages received inside the measured interval.
async fn recipient(
    (mut tx, mut rx): (Tx, Rx),
    t0: Instant,
    measure_from: Duration,
    end: Duration,
    counts: Arc<Counts>,
    latencies: Arc<Mutex<Histogram<u64>>>,
) -> Result<()> {
    let mut local = histogram();
    let stop = t0 + end + Duration::from_secs(10);
    // Every send has its outcome (acked or refused) and every acked one arrived.
    let all_in = || {
        let acked = counts.acked.load(Ordering::Relaxed);
        let refused =
            counts.errors.load(Ordering::Relaxed) + counts.rate_limited.load(Ordering::Relaxed);
        t0.elapsed() >= end
            && acked + refused >= counts.sent.load(Ordering::Relaxed)
            && counts.delivered.load(Ordering::Relaxed) >= acked
    };
    loop {
        if Instant::now() >= stop || all_in() {
            break;
        }
        let frame = match tokio::time::timeout(Duration::from_millis(200), next_json(&mut rx)).await
        {
            Ok(Ok(Some(f))) => f,
            Ok(_) => break,
            Err(_) => continue,
        };
        if frame["type"] != "message" {
            continue;
        }
        let Some(scheduled) = scheduled_of(&frame) else {
            continue;
        };
        let now = since(t0);
        counts.delivered.fetch_add(1, Ordering::Relaxed);
        let at = Duration::from_micros(now);
        if at >= measure_from && at < end {
            counts.delivered_measured.fetch_add(1, Ordering::Relaxed);
            let _ = local.record(now.saturating_sub(scheduled).max(1));
        }
    }
    let _ = tx.send(Message::Close(None)).await;
    latencies
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .add(&local)
        .ok();
    Ok(())
}

/// One group of `members`; member 0 sends `messages` at `rate`; the time until the last
/// member's device has each one.
async fn fanout(common: &Common, members: usize, messages: usize, rate: f64) -> Result<()> {
    let http = http()?;
    let all = client::users(&http, &common.addr, &prefix(common), members.max(2), 8).await?;
    let ids: Vec<&str> = all[1..].iter().map(|u| u.id.as_str()).collect();
    let made: Value = http
        .post(format!("http://{}/api/v1/groups", common.addr[0]))
        .bearer_auth(&all[0].token)
        .json(&json!({"name": "bench fanout", "members": ids}))
        .send()
        .await?
        .json()
        .await?;
    let conversation = made["conversation_id"]
        .as_str()
        .with_context(|| format!("POST /groups: {made}"))?
        .to_string();
    // Every member's device, connected and synced; each reports (seq, when) it got.
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, u64)>();
    let t0 = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(50));
    let connected = Arc::new(AtomicU64::new(0));
    let mut devices = Vec::new();
    for (i, u) in all.iter().enumerate() {
        let addr = common.addr[i % common.addr.len()].clone();
        let (token, seen, gate, connected) = (
            u.token.clone(),
            seen_tx.clone(),
            Arc::clone(&gate),
            Arc::clone(&connected),
        );
        devices.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await?;
            let (tx, mut rx) = client::connect(&addr, &token).await?;
            drop(permit);
            connected.fetch_add(1, Ordering::Relaxed);
            while let Ok(Some(frame)) = next_json(&mut rx).await {
                if frame["type"] == "message" {
                    if let Some(scheduled) = scheduled_of(&frame) {
                        let _ = seen.send((scheduled, since(t0)));
                    }
                }
            }
            drop(tx);
            Ok::<_, anyhow::Error>(())
        }));
        if devices.len().is_multiple_of(100) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // Every device connected and synced (a device that failed ends the run)...
    let connecting = report::progress(members as u64, "connecting", common.quiet);
    wait_connected(&mut devices, &connected, all.len(), &connecting).await?;
    connecting.finish_and_clear();
    // ...then a probe message that every one of them must get before the clock starts.
    let (mut tx, rx) = client::connect(&common.addr[0], &all[0].token).await?;
    let acks = count_acks(rx);
    let probe = json!({"conversation_id": conversation});
    tx.send(send_frame(&probe, 0, common.body)).await?;
    let mut got_probe = 0;
    let ready_by = Instant::now() + Duration::from_secs(60);
    while got_probe < all.len() && Instant::now() < ready_by {
        if let Ok(Some((0, _))) = tokio::time::timeout(Duration::from_secs(1), seen_rx.recv()).await
        {
            got_probe += 1;
        }
    }
    if got_probe < all.len() {
        bail!(
            "only {got_probe} of {} devices got the probe message",
            all.len()
        );
    }
    let cpu = CpuMeter::start(common.server_pid);
    let bar = report::progress(messages as u64, "fanout", common.quiet);
    let start = since(t0);
    let mut scheduled_all = Vec::with_capacity(messages);
    for k in 0..messages {
        let at = start + (k as f64 / rate * 1e6) as u64 + 1;
        tokio::time::sleep_until((t0 + Duration::from_micros(at)).into()).await;
        tx.send(send_frame(&probe, at, common.body)).await?;
        scheduled_all.push(at);
        bar.set_position(k as u64 + 1);
    }
    // Collect until every member has every message, or 30 s after the last send.
    let mut last: HashMap<u64, (usize, u64)> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let complete = |last: &HashMap<u64, (usize, u64)>| {
        scheduled_all
            .iter()
            .all(|s| last.get(s).is_some_and(|(n, _)| *n >= all.len()))
    };
    while !complete(&last) && Instant::now() < deadline {
        if let Ok(Some((scheduled, at))) =
            tokio::time::timeout(Duration::from_millis(200), seen_rx.recv()).await
        {
            let e = last.entry(scheduled).or_insert((0, 0));
            e.0 += 1;
            e.1 = e.1.max(at);
        }
    }
    bar.finish_and_clear();
    let cpu_json = cpu.json();
    let mut h = histogram();
    let mut incomplete = 0;
    for s in &scheduled_all {
        match last.get(s) {
            Some((n, at)) if *n >= all.len() => {
                let _ = h.record(at.saturating_sub(*s).max(1));
            }
            _ => incomplete += 1,
        }
    }
    let _ = tx.send(Message::Close(None)).await;
    for d in devices {
        d.abort();
    }
    let acked = acks.await.unwrap_or(0);
    if let Some(path) = &common.plot {
        report::plot(path, "switchboard bench fanout: send to last device", &h)?;
    }
    let record = json!({
        "workload": "fanout",
        "addr": common.addr,
        "members": members,
        "messages": messages,
        "rate": rate,
        "acked": acked,
        "not_delivered_to_all": incomplete,
        "latency_to_last_device": latency_json(&h),
        "cpu": cpu_json,
    });
    report::emit(
        &format!(
            "fanout to {members} members at {rate}/s: to the last device {}; {incomplete} of {messages} not delivered to all",
            latency_line(&h)
        ),
        &record,
    );
    Ok(())
}

/// `conns` idle connections over `users` users; memory per connection; then every
/// connection must get one message.
async fn idle(
    common: &Common,
    conns: usize,
    users: usize,
    parallel: usize,
    hold: u64,
) -> Result<()> {
    let http = http()?;
    let prefix = prefix(common);
    let all = client::users(&http, &common.addr, &prefix, users.max(1) + 1, 8).await?;
    let (sender, receivers) = all.split_first().context("no users")?;
    let rss_before = common.server_pid.and_then(report::process_rss_kib);
    let bar = report::progress(conns as u64, "connecting", common.quiet);
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let opened = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let mut tasks = Vec::with_capacity(conns);
    for c in 0..conns {
        let u = &receivers[c % receivers.len()];
        let addr = common.addr[c % common.addr.len()].clone();
        let (token, got, opened, gate) = (
            u.token.clone(),
            got_tx.clone(),
            Arc::clone(&opened),
            Arc::clone(&gate),
        );
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await?;
            let (tx, mut rx) = client::connect(&addr, &token).await?;
            drop(permit);
            opened.fetch_add(1, Ordering::Relaxed);
            while let Ok(Some(frame)) = next_json(&mut rx).await {
                if frame["type"] == "message" {
                    let _ = got.send(c);
                    break;
                }
            }
            // Held open until the run ends (the task is aborted).
            let _keep = tx;
            std::future::pending::<()>().await;
            Ok::<_, anyhow::Error>(())
        }));
    }
    wait_connected(&mut tasks, &opened, conns, &bar).await?;
    bar.finish_and_clear();
    tokio::time::sleep(Duration::from_secs(hold)).await;
    let rss_after = common.server_pid.and_then(report::process_rss_kib);
    let cpu = CpuMeter::start(common.server_pid);
    // One message to every user: every one of its connections must get it.
    let started = Instant::now();
    let (mut tx, rx) = client::connect(&common.addr[0], &sender.token).await?;
    for u in receivers {
        tx.send(send_frame(&json!({"to_user": u.id}), 0, common.body))
            .await?;
    }
    let acks = count_acks(rx);
    let mut delivered = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while delivered.len() < conns && Instant::now() < deadline {
        if let Ok(Some(c)) = tokio::time::timeout(Duration::from_millis(200), got_rx.recv()).await {
            delivered.insert(c);
        }
    }
    let took = started.elapsed();
    let _ = tx.send(Message::Close(None)).await;
    acks.abort();
    for t in &tasks {
        t.abort();
    }
    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) => Some(report::round2(a.saturating_sub(b) as f64 / conns as f64)),
        _ => None,
    };
    let record = json!({
        "workload": "idle",
        "addr": common.addr,
        "conns": conns,
        "users": receivers.len(),
        "server_rss_before_kib": rss_before,
        "server_rss_after_kib": rss_after,
        "server_kib_per_conn": per_conn,
        "conns_delivered_after": delivered.len(),
        "delivery_seconds": report::round2(took.as_secs_f64()),
        "cpu": cpu.json(),
    });
    report::emit(
        &format!(
            "idle: {conns} connections, {} KiB each on the server; {} of {conns} got a message afterwards (in {:.1} s)",
            per_conn.map_or("?".to_string(), |k| format!("{k:.1}")),
            delivered.len(),
            took.as_secs_f64()
        ),
        &record,
    );
    if delivered.len() < conns {
        bail!(
            "{} connections did not get their message",
            conns - delivered.len()
        );
    }
    Ok(())
}

/// A user offline while `messages` arrive from `senders` senders; then it syncs.
async fn catchup(common: &Common, messages: usize, senders: usize) -> Result<()> {
    let http = http()?;
    let all = client::users(&http, &common.addr, &prefix(common), senders.max(1) + 1, 8).await?;
    let (reader, writers) = all.split_first().context("no users")?;
    let bar = report::progress(messages as u64, "filling", common.quiet);
    let per = messages.div_ceil(writers.len());
    let acked = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (i, w) in writers.iter().enumerate() {
        let count = per.min(messages.saturating_sub(i * per));
        let addr = common.addr[i % common.addr.len()].clone();
        let (token, target, acked, bar, body) = (
            w.token.clone(),
            json!({"to_user": reader.id}),
            Arc::clone(&acked),
            bar.clone(),
            common.body,
        );
        tasks.push(tokio::spawn(async move {
            let (mut tx, mut rx) = client::connect(&addr, &token).await?;
            let (mut sent, mut done) = (0usize, 0usize);
            while done < count {
                while sent < count && sent - done < 64 {
                    tx.send(send_frame(&target, 0, body)).await?;
                    sent += 1;
                }
                match next_json(&mut rx).await? {
                    Some(f) if f["type"] == "ack" => {
                        done += 1;
                        acked.fetch_add(1, Ordering::Relaxed);
                        bar.inc(1);
                    }
                    Some(f) if f["type"] == "error" => bail!("send refused: {f}"),
                    Some(_) => {}
                    None => bail!("sender connection closed"),
                }
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    bar.finish_and_clear();
    // Now the reader comes online and syncs everything.
    let cpu = CpuMeter::start(common.server_pid);
    let started = Instant::now();
    let (mut tx, mut rx) = client::open(&common.addr[0], &reader.token).await?;
    let bar = report::progress(messages as u64, "syncing", common.quiet);
    let mut got = 0usize;
    let mut synced_at = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while got < messages && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(30), next_json(&mut rx)).await {
            Ok(Ok(Some(f))) => match f["type"].as_str() {
                Some("message") => {
                    got += 1;
                    if got.is_multiple_of(1000) {
                        bar.set_position(got as u64);
                    }
                }
                Some("synced") => synced_at = Some(started.elapsed()),
                _ => {}
            },
            _ => break,
        }
    }
    let took = started.elapsed();
    bar.finish_and_clear();
    let _ = tx.send(Message::Close(None)).await;
    let rate = got as f64 / took.as_secs_f64().max(1e-9);
    let record = json!({
        "workload": "catchup",
        "addr": common.addr,
        "messages": messages,
        "received": got,
        "seconds": report::round2(took.as_secs_f64()),
        "synced_after_seconds": synced_at.map(|d| report::round2(d.as_secs_f64())),
        "messages_per_sec": report::round2(rate),
        "cpu": cpu.json(),
    });
    report::emit(
        &format!(
            "catchup: {got} of {messages} messages synced in {:.2} s ({rate:.0} msg/s)",
            took.as_secs_f64()
        ),
        &record,
    );
    if got < messages {
        bail!("only {got} of {messages} messages arrived");
    }
    Ok(())
}

/// Waits until `connected` reaches `n`, showing it on `bar`; a connection task that
/// ended before then (failed, or closed by the server) ends the run with its error.
async fn wait_connected(
    tasks: &mut [tokio::task::JoinHandle<Result<()>>],
    connected: &AtomicU64,
    n: usize,
    bar: &indicatif::ProgressBar,
) -> Result<()> {
    while (connected.load(Ordering::Relaxed) as usize) < n {
        bar.set_position(connected.load(Ordering::Relaxed));
        if let Some(t) = tasks.iter_mut().find(|t| t.is_finished()) {
            t.await??;
            bail!("a connection ended before the run");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Counts the `ack` frames on `rx` until the connection ends.
fn count_acks(mut rx: Rx) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok(Some(frame)) = next_json(&mut rx).await {
            if frame["type"] == "ack" {
                n += 1;
            }
        }
        n
    })
}
