//! Group commit: one flush serves every write that was waiting for one.
//!
//! Writers make their sled inserts first, then queue a ticket here and await it. A single
//! thread takes every queued ticket, flushes once, and answers them all: while one flush
//! runs, the next batch gathers. Under load a flush covers hundreds of writes, so durable
//! throughput is set by CPU, not by the fsync rate. A ticket queued after its write is
//! covered by the next flush that starts, which is all an ack needs.

use std::fs::File;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::oneshot;

use super::error::StorageError;
use crate::metrics::metrics;

enum Job {
    Flush(Ticket),
    /// The store is being dropped: exit, releasing the thread's database handle.
    Stop,
}

struct Ticket {
    /// Writes this ticket stands for, for the batch-size metric.
    weight: u32,
    done: oneshot::Sender<Result<(), StorageError>>,
}

/// Handle to the flusher thread. Dropping it stops the thread and waits for it, so the
/// database lock is free once the store is gone.
pub(crate) struct Committer {
    tx: mpsc::Sender<Job>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The last flush error, until a flush succeeds again; read by `/healthz`.
    failure: Arc<Mutex<Option<String>>>,
    /// Chaos testing: until this time (ms since the epoch) every flush fails with an
    /// injected I/O error, without flushing (`Store::inject_failures`).
    fail_until: Arc<std::sync::atomic::AtomicI64>,
}

impl Committer {
    /// Starts the flusher thread for `db`, whose log file lives in `dir`.
    pub(crate) fn start(db: sled::Db, dir: &Path) -> Result<Self, StorageError> {
        // sled's flush ends in sync_file_range, which neither persists file metadata nor
        // flushes the device's write cache; an fdatasync of the log file after each flush
        // closes that gap for power loss, at one extra sync per batch.
        let log = File::open(dir.join("db"))?;
        let (tx, rx) = mpsc::channel::<Job>();
        let failure = Arc::new(Mutex::new(None));
        let failure_thread = Arc::clone(&failure);
        let fail_until = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let fail_until_thread = Arc::clone(&fail_until);
        let thread = std::thread::Builder::new()
            .name("group-commit".into())
            .spawn(move || run(db, log, rx, failure_thread, fail_until_thread))?;
        Ok(Committer {
            tx,
            thread: Some(thread),
            failure,
            fail_until,
        })
    }

    /// Resolves once a flush covering every write made before this call is on disk.
    pub(crate) async fn commit(&self, weight: u32) -> Result<(), StorageError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Job::Flush(Ticket { weight, done }))
            .map_err(|_| StorageError::Closed)?;
        wait.await.map_err(|_| StorageError::Closed)?
    }

    pub(crate) fn failure(&self) -> Option<String> {
        self.failure.lock().map(|f| f.clone()).unwrap_or(None)
    }

    /// Makes every flush fail for the next `for_ms` milliseconds.
    pub(crate) fn inject_failures(&self, for_ms: u64) {
        let until = crate::now_ms().saturating_add(i64::try_from(for_ms).unwrap_or(i64::MAX));
        self.fail_until
            .store(until, std::sync::atomic::Ordering::Release);
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        let _ = self.tx.send(Job::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    db: sled::Db,
    log: File,
    rx: mpsc::Receiver<Job>,
    failure: Arc<Mutex<Option<String>>>,
    fail_until: Arc<std::sync::atomic::AtomicI64>,
) {
    let m = metrics();
    let mut batch = Vec::new();
    let mut stop = false;
    while !stop {
        match rx.recv() {
            Ok(Job::Flush(t)) => batch.push(t),
            Ok(Job::Stop) | Err(_) => break,
        }
        for job in rx.try_iter() {
            match job {
                Job::Flush(t) => batch.push(t),
                Job::Stop => stop = true,
            }
        }
        let started = Instant::now();
        let injected = crate::now_ms() < fail_until.load(std::sync::atomic::Ordering::Acquire);
        let result = if injected {
            Err(StorageError::Io(
                "injected I/O error (chaos: POST /admin/chaos/storage)".into(),
            ))
        } else {
            db.flush()
                .map_err(StorageError::from)
                .and_then(|_| log.sync_data().map_err(StorageError::from))
        };
        m.flush_seconds.observe(started.elapsed().as_secs_f64());
        m.flush_batch
            .observe(f64::from(batch.iter().map(|t| t.weight).sum::<u32>()));
        if let Ok(mut f) = failure.lock() {
            match &result {
                Ok(()) => *f = None,
                Err(e) => {
                    m.flush_errors.inc();
                    tracing::error!(error = %e, "flush failed: writes in this batch are not acked");
                    *f = Some(e.to_string());
                }
            }
        }
        for t in batch.drain(..) {
            let _ = t.done.send(result.clone());
        }
    }
}
