//! Operator-facing behaviour: the command line's handling of bad cluster files, and the
//! health and metrics endpoints.

mod common;

use std::process::Command;

use common::*;

/// Runs `switchboard serve` on a config text and returns (exit code, stderr).
fn serve_with(config: &str, extra: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cluster.toml");
    std::fs::write(&path, config).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .args(extra)
        .output()
        .expect("run switchboard");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const NODE: &str = "[[node]]\nid = \"n1\"\nclient_addr = \"127.0.0.1:1\"\npeer_addr = \"127.0.0.1:2\"\ndata_dir = \"d\"\n";

#[test]
fn bad_cluster_files_get_one_line_errors() {
    let cases: Vec<(String, Vec<&str>, &str)> = vec![
        ("[cluster\nvnodes = 1".into(), vec![], "line 1"),
        (format!("[cluster]\nvnodes = 0\n{NODE}"), vec![], "vnodes"),
        (
            format!("{NODE}[limits]\nmax_frame_bytes = -5\n"),
            vec![],
            "max_frame_bytes",
        ),
        (
            NODE.replace("127.0.0.1:1", "localhost"),
            vec![],
            "client_addr",
        ),
        (
            format!(
                "{NODE}{}",
                NODE.replace("127.0.0.1:1", "127.0.0.1:3")
                    .replace("\"d\"", "\"e\"")
            ),
            vec![],
            "duplicate node id",
        ),
        (NODE.to_string(), vec!["--node", "n9"], "n9"),
        ("[cluster]\nvnodes = 8\n".into(), vec![], "no [[node]]"),
    ];
    for (config, extra, needle) in cases {
        let (code, stderr) = serve_with(&config, &extra);
        assert_eq!(code, Some(2), "exit code for {needle:?}; stderr: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one line for {needle:?}, got: {stderr}");
        assert!(lines[0].starts_with("error: "), "{stderr}");
        assert!(
            lines[0].contains("cluster.toml"),
            "names the file: {stderr}"
        );
        assert!(lines[0].contains(needle), "{needle:?} in {stderr}");
    }
    let (code, stderr) = serve_with("", &["--config-typo"]);
    assert_ne!(code, Some(0), "{stderr}");
}

#[tokio::test]
async fn health_and_metrics() {
    let node = Node::start("").await;
    let health = node.get_root("/healthz").await;
    assert_eq!(health.status, 200, "{}", health.text);
    // Some traffic, so that every series has a sample.
    let a = node.user("met").await;
    let b = node.user("met").await;
    let mut aw = node.ws(&a.token).await;
    aw.sync(0).await;
    aw.send_to_user(&b.id, "hello").await;
    let metrics = node.get_root("/metrics").await;
    assert_eq!(metrics.status, 200);
    for series in [
        "switchboard_ws_connections 1",
        "switchboard_messages_in_total 1",
        "switchboard_messages_out_total",
        "switchboard_flush_seconds_count",
        "switchboard_flush_batch_size_bucket",
        "switchboard_actors{kind=\"user\"}",
        "switchboard_actors{kind=\"conversation\"} 1",
        "switchboard_mailbox_depth{kind=\"user\"}",
    ] {
        assert!(
            metrics.text.contains(series),
            "missing {series:?} in:\n{}",
            metrics.text
        );
    }
}
