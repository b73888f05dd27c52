//! The web client end to end, in a real browser: starts a node as the other integration
//! tests do, then runs `tests/browser/e2e.mjs` (Playwright driving Debian's headless
//! Chromium) against it, and fails with the script's output if the script fails.
//!
//! Needs Chromium (`apt-get install -y chromium`; `CHROMIUM_PATH` overrides
//! `/usr/bin/chromium`), Node.js 20 or later, and `npm ci` run in `tests/browser`.
//! `bash scripts/test.sh` installs what is missing. Without them this test fails and says
//! how to install them: it never passes without having run.
//!
//! With `SCREENSHOT_DIR` set (e.g. `SCREENSHOT_DIR=$PWD/docs`), the script saves the
//! main screens there as `web-*.png`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// The script bounds itself (150 s); this is the guard above it.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);

/// What is missing to run the browser test, each with how to install it.
fn missing_tools(dir: &Path, chromium: &Path) -> Vec<String> {
    let mut missing = Vec::new();
    if !chromium.exists() {
        missing.push(format!(
            "Chromium at {}: install it with `sudo apt-get install -y chromium` \
             (or set CHROMIUM_PATH to a Chromium binary)",
            chromium.display()
        ));
    }
    let node = std::process::Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        missing.push("Node.js 20 or later (`node`): install it with your package manager".into());
    }
    if !dir
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        missing.push(format!(
            "playwright-core: install it with `npm ci` in {}",
            dir.display()
        ));
    }
    missing
}

#[tokio::test]
async fn web_client_end_to_end_in_headless_chromium() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let chromium = std::env::var_os("CHROMIUM_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let missing = missing_tools(&dir, &chromium);
    assert!(
        missing.is_empty(),
        "the browser test cannot run; missing:\n  - {}\n\
         `bash scripts/test.sh` installs all of it, then runs the whole suite.",
        missing.join("\n  - ")
    );

    // A short heartbeat bounds how long a peer whose network died (without closing its
    // socket) looks online; browsers answer the pings by themselves.
    let node = Node::start("heartbeat_interval_ms = 1000\nheartbeat_timeout_ms = 5000").await;
    let started = Instant::now();
    let mut script = tokio::process::Command::new("node");
    script
        .arg(dir.join("e2e.mjs"))
        .arg(node.base())
        .current_dir(&dir)
        .env("CHROMIUM_PATH", &chromium)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = match tokio::time::timeout(SCRIPT_TIMEOUT, script.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("cannot run node {}: {e}", dir.join("e2e.mjs").display()),
        Err(_) => panic!(
            "tests/browser/e2e.mjs did not finish within {SCRIPT_TIMEOUT:?}\n{}",
            node.log_tail(60)
        ),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "tests/browser/e2e.mjs failed ({}) after {:.1?}\n---- stdout ----\n{stdout}\n---- stderr ----\n{stderr}\n{}",
        out.status,
        started.elapsed(),
        node.log_tail(60)
    );
    println!("{stdout}");
}
