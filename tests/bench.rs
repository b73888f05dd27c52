//! Smoke test of `switchboard bench`: each workload runs for a moment against real
//! nodes and its JSON line adds up. (A benchmark is not a test: no timing is checked.)

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Longest a smoke run may take before it counts as hung (each runs for a second or two).
const BENCH_TIMEOUT: Duration = Duration::from_secs(180);

/// Runs `switchboard bench --addr <addrs> <args>` and returns its JSON line.
fn bench(addrs: &[&Node], args: &[&str]) -> Value {
    let addr: Vec<String> = addrs
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["bench", "--quiet", "--addr", &addr.join(",")])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run switchboard bench");
    let started = Instant::now();
    while child.try_wait().expect("wait for bench").is_none() {
        if started.elapsed() > BENCH_TIMEOUT {
            let _ = child.kill();
            panic!("bench {args:?} still running after {BENCH_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("bench output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench {args:?} failed: {stderr}\n{stdout}"
    );
    assert!(!stderr.trim().is_empty(), "a human summary on stderr");
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not one JSON line ({e}): {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workload_runs_and_its_counts_add_up() {
    let node = Node::start("sends_per_second = 100000").await;
    let plot = node.dir_path().join("latency.svg");
    let plot_arg = plot.to_string_lossy().into_owned();
    for workload in ["throughput", "latency"] {
        let mut args = vec![
            "--plot",
            plot_arg.as_str(),
            workload,
            "--users",
            "4",
            "--seconds",
            "1",
            "--warmup",
            "0",
        ];
        if workload == "latency" {
            args.extend(["--rate", "40"]);
        } else {
            args.extend(["--window", "2"]);
        }
        // A plot left by the previous run must not pass for this one's.
        let _ = std::fs::remove_file(&plot);
        let v = bench(&[&node], &args);
        assert_eq!(v["workload"], workload);
        assert!(u64_field(&v, "sent") > 0, "{v}");
        assert_eq!(u64_field(&v, "sent"), u64_field(&v, "acked"), "{v}");
        assert_eq!(u64_field(&v, "sent"), u64_field(&v, "delivered"), "{v}");
        assert_eq!(u64_field(&v, "lost"), 0, "{v}");
        assert_eq!(u64_field(&v, "errors"), 0, "{v}");
        assert!(u64_field(&v["latency"], "samples") > 0, "{v}");
        assert!(
            v["cpu"]["tool_cpu_cores"].is_number(),
            "the tool reports its CPU: {v}"
        );
        let svg = std::fs::read_to_string(&plot).expect("plot written");
        assert!(
            svg.starts_with("<svg") && svg.contains("polyline"),
            "an SVG curve"
        );
    }
    let v = bench(
        &[&node],
        &[
            "fanout",
            "--members",
            "6",
            "--messages",
            "5",
            "--rate",
            "20",
        ],
    );
    assert_eq!(u64_field(&v, "not_delivered_to_all"), 0, "{v}");
    assert_eq!(u64_field(&v["latency_to_last_device"], "samples"), 5, "{v}");
    let pid = node.pid().to_string();
    let v = bench(
        &[&node],
        &[
            "--server-pid",
            &pid,
            "idle",
            "--conns",
            "30",
            "--users",
            "3",
            "--hold",
            "0",
        ],
    );
    assert_eq!(u64_field(&v, "conns_delivered_after"), 30, "{v}");
    assert!(
        v["server_kib_per_conn"].is_number(),
        "memory read with --server-pid: {v}"
    );
    let v = bench(
        &[&node],
        &["catchup", "--messages", "300", "--senders", "2"],
    );
    assert_eq!(u64_field(&v, "received"), 300, "{v}");

    let nodes = Node::start_cluster(2, "sends_per_second = 100000").await;
    let v = bench(
        &[&nodes[0], &nodes[1]],
        &[
            "cluster",
            "--users",
            "4",
            "--window",
            "2",
            "--seconds",
            "1",
            "--warmup",
            "0",
        ],
    );
    assert_eq!(u64_field(&v, "sent"), u64_field(&v, "delivered"), "{v}");
    assert_eq!(u64_field(&v, "errors"), 0, "{v}");
}
