//! Push notifications for users with no live session, through the `[push]` webhook.
//!
//! Owns the bounded queue and the one task that drains it. Entity actors hand over a
//! notice with `try_send` and never wait: a slow or dead webhook cannot delay an ack.
//! A full queue drops the notice (`switchboard_push_dropped_total`). The task sends
//! batches (up to [`BATCH`] notices, gathered for at most [`GATHER`]) as one JSON POST,
//! signed with HMAC-SHA256 of the body in `X-Switchboard-Signature` (hex), and retries a
//! failed batch with exponential backoff before giving it up
//! (`switchboard_push_failed_total`). Payload: `docs/PROTOCOL.md`, "Push notifications".

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::mpsc;

use crate::config::PushConfig;
use crate::metrics::metrics;

/// Notices waiting to be sent before new ones are dropped.
const QUEUE: usize = 10_000;
/// Most notices in one POST.
const BATCH: usize = 100;
/// How long the task waits to fill a batch once it has one notice.
const GATHER: Duration = Duration::from_millis(20);
const ATTEMPTS: u32 = 5;
const RETRY_FIRST: Duration = Duration::from_millis(100);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What one notification carries (no body: the device fetches the message itself).
pub type PushNotice = crate::actors::OfflineNotice;

#[derive(Serialize)]
struct Batch<'a> {
    notifications: &'a [PushNotice],
}

/// The sending side of the queue.
#[derive(Clone)]
pub struct Pusher {
    tx: mpsc::Sender<PushNotice>,
}

impl Pusher {
    /// Starts the sender task (on the current actix system) for `config`.
    pub fn start(config: PushConfig) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        actix::spawn(run(config, rx));
        Pusher { tx }
    }

    /// Queues a notice without waiting; a full queue drops it.
    pub fn offer(&self, notice: PushNotice) {
        if self.tx.try_send(notice).is_err() {
            metrics().push_dropped.inc();
        }
    }
}

/// The signature header's value: hex HMAC-SHA256 of `body` under `secret`.
pub fn sign(secret: &str, body: &[u8]) -> String {
    // HMAC takes keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

async fn run(config: PushConfig, mut rx: mpsc::Receiver<PushNotice>) {
    let client = match reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "push disabled: cannot build an HTTP client");
            return;
        }
    };
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        let deadline = tokio::time::Instant::now() + GATHER;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(n)) => batch.push(n),
                _ => break,
            }
        }
        send(&client, &config, &batch).await;
        batch.clear();
    }
}

async fn send(client: &reqwest::Client, config: &PushConfig, batch: &[PushNotice]) {
    let body = match serde_json::to_vec(&Batch {
        notifications: batch,
    }) {
        Ok(b) => b,
        Err(_) => return,
    };
    let mut backoff = RETRY_FIRST;
    for attempt in 1..=ATTEMPTS {
        let mut req = client
            .post(&config.webhook_url)
            .header("content-type", "application/json")
            .body(body.clone());
        if let Some(secret) = &config.secret {
            req = req.header("X-Switchboard-Signature", sign(secret, &body));
        }
        match req.send().await {
            Ok(r) if r.status().is_success() => {
                metrics().push_sent.inc_by(batch.len() as u64);
                return;
            }
            Ok(r) => tracing::debug!(status = %r.status(), attempt, "push webhook refused a batch"),
            Err(e) => tracing::debug!(error = %e, attempt, "push webhook unreachable"),
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
    tracing::warn!(notices = batch.len(), "push batch given up after retries");
    metrics().push_failed.inc_by(batch.len() as u64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hex_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign("Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
