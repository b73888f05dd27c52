//! Handoff: this node's share of a ring change, moving every entity the next ring
//! homes elsewhere to its new home.
//!
//! Runs once the cluster agrees on the next ring (`net/membership.rs`):
//!
//! 1. **Fence.** Calls for leaving entities are held from now on (the router places
//!    them); the handoff waits for those already being served to finish, then stops
//!    the leaving entities' actors (`Registry::retire`). Nothing writes a leaving
//!    entity here any more.
//! 2. **List** the leaving entities stored here. Calls for any other leaving key (an
//!    entity that does not exist yet) go to its next home at once: it is created there.
//! 3. **Move**, in batches, one stream per new home side by side: media files first (chunked, checked against
//!    their hash at the other end), then the entities' records (`EntityDump`, chunked),
//!    the last part committed durably before the new home answers. Only then are the
//!    entities deleted here, durably, and their held calls forwarded, in order. A batch
//!    that fails is sent again (the import overwrites the same keys), so a crash or a
//!    lost link on either side costs a retry, never data: an entity is deleted here
//!    only after its new home holds it durably, and calls reach the new home only
//!    after the deletion is durable, so a restarted old home never sends stale data
//!    over newer.
//! 4. **Done.** The files of the media that left are removed (under the media lock,
//!    unless a media still here has the same bytes), and "handed off" is recorded
//!    durably and told to the peers; the ring is committed once every node has said so.
//!
//! Limit, written down: an entity is exported whole into memory (a conversation with
//! a very long history moves as one batch of parts, held at once).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::peer::{PeerCall, PeerReply};
use super::ring::Ring;
use super::Router;
use crate::actors::{ActorError, Route};
use crate::metrics::metrics;
use crate::storage::{EntityKey, Store};

/// Entities per batch: one durable import at the new home, one deletion here.
const BATCH_ENTITIES: usize = 256;
/// Bytes of records per import call (a batch larger than this is sent in parts).
const PART_BYTES: usize = 512 << 10;
/// Bytes of a media file per call.
const FILE_PART: usize = 512 << 10;
/// Pause before a failed batch is sent again.
const RETRY: Duration = Duration::from_secs(1);

/// Hands off everything the next ring takes from this node, then records that.
pub async fn run(router: Arc<Router>, target: Ring) {
    let started = Instant::now();
    router.begin_handoff(&target).await;
    let ring = target.signature();
    let me = router.node_id().to_string();
    let next_home = |key: &str| {
        target
            .owner(key.as_bytes())
            .filter(|n| **n != me)
            .map(str::to_string)
    };
    let leaving = {
        let (target, me) = (target.clone(), me.clone());
        move |key: &str| target.owner(key.as_bytes()).is_some_and(|n| n != me)
    };
    router.registry().retire(leaving).await;
    let store = router.registry().store().clone();
    let entities = loop {
        let listing = store.clone();
        match tokio::task::spawn_blocking(move || listing.entities()).await {
            Ok(Ok(all)) => break all,
            Ok(Err(e)) => tracing::error!(error = %e, "cannot list the entities to hand off"),
            Err(e) => tracing::error!(error = %e, "cannot list the entities to hand off"),
        }
        tokio::time::sleep(RETRY).await;
    };
    let mut by_home: BTreeMap<String, Vec<(EntityKey, String)>> = BTreeMap::new();
    for entity in entities {
        let key = entity.ring_key();
        if let Some(home) = next_home(&key) {
            by_home.entry(home).or_default().push((entity, key));
        }
    }
    let left: HashSet<String> = by_home
        .values()
        .flatten()
        .map(|(_, key)| key.clone())
        .collect();
    let total = left.len();
    tracing::info!(entities = total, "handing off");
    router.listed(left);
    // One stream of batches per new home, side by side: a slow or unreachable home
    // holds up only the entities going there.
    let moved_files: std::sync::Mutex<Vec<String>> = Default::default();
    let streams = by_home.iter().map(|(home, list)| {
        let (router, store, moved_files) = (&router, &store, &moved_files);
        async move {
            for batch in list.chunks(BATCH_ENTITIES) {
                let mut attempt = 0u32;
                while let Err(e) = send_batch(router, store, home, ring, batch, moved_files).await {
                    attempt += 1;
                    if attempt == 1 || attempt.is_multiple_of(30) {
                        tracing::warn!(to = %home, error = %e, attempt, "handoff batch failed; sending it again");
                    }
                    tokio::time::sleep(RETRY).await;
                }
                let keys: Vec<String> = batch.iter().map(|(_, k)| k.clone()).collect();
                router.moved(&keys);
                metrics().handoff_entities.inc_by(batch.len() as u64);
            }
        }
    });
    futures_util::future::join_all(streams).await;
    // The bytes of the media that left, unless a media still here has the same.
    // (Not the ones that arrived from another node in this change: their records may
    // not have been imported yet.)
    let gone: Vec<String> =
        std::mem::take(&mut *moved_files.lock().unwrap_or_else(|p| p.into_inner()))
            .into_iter()
            .filter(|sha| !router.arrived(sha))
            .collect();
    if !gone.is_empty() {
        let _media = store.lock_media().await;
        let sweeping = store.clone();
        match tokio::task::spawn_blocking(move || sweeping.remove_media_files(&gone)).await {
            Ok(Ok(n)) => tracing::info!(files = n, "removed media files handed off"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot remove media files handed off"),
            Err(e) => tracing::warn!(error = %e, "cannot remove media files handed off"),
        }
    }
    while let Err(e) = router.handed_off(&target).await {
        tracing::error!(error = %e, "cannot record the handoff as done; retrying");
        tokio::time::sleep(RETRY).await;
    }
    let took = started.elapsed();
    metrics().handoff_seconds.observe(took.as_secs_f64());
    tracing::info!(
        entities = total,
        seconds = took.as_secs_f64(),
        "handoff done"
    );
}

/// Moves one batch to `home`: files, records (durable there), then deletes it here.
async fn send_batch(
    router: &Router,
    store: &Store,
    home: &str,
    ring: u64,
    batch: &[(EntityKey, String)],
    moved_files: &std::sync::Mutex<Vec<String>>,
) -> Result<(), ActorError> {
    // Only durable data leaves: an inbox run may name messages written but not yet
    // flushed here (see `ConversationActor::run_for`), if the append that wrote it
    // timed out before its own flush.
    store.commit(0).await?;
    let mut part = Vec::new();
    let mut part_bytes = 0;
    let mut files = Vec::new();
    for (entity, _) in batch {
        if let EntityKey::Media(id) = entity {
            if let Some(rec) = store.media(*id)? {
                send_file(router, store, home, &rec.sha256).await?;
                files.push(rec.sha256);
            }
        }
        for record in store.export_entity(entity)?.records {
            part_bytes += record.0.len() + record.1.len() + record.2.len();
            part.push(record);
            if part_bytes >= PART_BYTES {
                import(router, home, ring, std::mem::take(&mut part), false).await?;
                part_bytes = 0;
            }
        }
    }
    import(router, home, ring, part, true).await?;
    for (entity, _) in batch {
        store.delete_entity(entity)?;
    }
    store.commit(batch.len() as u32).await?;
    moved_files
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(files);
    Ok(())
}

async fn import(
    router: &Router,
    home: &str,
    ring: u64,
    records: Vec<(String, Vec<u8>, Vec<u8>)>,
    commit: bool,
) -> Result<(), ActorError> {
    let call = PeerCall::Import {
        ring,
        records,
        commit,
    };
    match router.peers().call(home, call).await? {
        PeerReply::Done => Ok(()),
        _ => Err(ActorError::Internal(
            "import answered the wrong kind".into(),
        )),
    }
}

/// Sends a media file to `home` unless it has those bytes already.
async fn send_file(
    router: &Router,
    store: &Store,
    home: &str,
    sha256: &str,
) -> Result<(), ActorError> {
    use tokio::io::AsyncReadExt;
    let peers = router.peers();
    if let PeerReply::Count(1) = peers
        .call(home, PeerCall::HasMediaFile(sha256.to_string()))
        .await?
    {
        return Ok(());
    }
    let mut file = tokio::fs::File::open(store.media_path(sha256))
        .await
        .map_err(|e| ActorError::Internal(format!("media file {sha256}: {e}")))?;
    let size = file
        .metadata()
        .await
        .map_err(|e| ActorError::Internal(e.to_string()))?
        .len();
    let mut offset = 0u64;
    loop {
        let mut bytes = vec![0; FILE_PART.min((size - offset) as usize)];
        file.read_exact(&mut bytes)
            .await
            .map_err(|e| ActorError::Internal(format!("media file {sha256}: {e}")))?;
        let last = offset + bytes.len() as u64 >= size;
        let len = bytes.len() as u64;
        let call = PeerCall::MediaChunk {
            sha256: sha256.to_string(),
            offset,
            bytes,
            last,
        };
        peers.call(home, call).await?;
        offset += len;
        if last {
            return Ok(());
        }
    }
}
