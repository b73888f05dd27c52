//! Media files: content-addressed, under `<data_dir>/media/`.
//!
//! An upload streams into a temp file (`media/tmp/`), hashing as it goes; once complete
//! it is fsynced and renamed to `media/<sha256 hex>`, so the same bytes are stored once
//! and a file under its hash name is always whole. A cut-off or refused upload only
//! ever leaves a temp file, which is deleted (and swept at start-up).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::error::StorageError;

/// Writes one upload. Dropped without `finish`, its temp file is removed.
pub struct MediaWriter {
    dir: PathBuf,
    tmp: PathBuf,
    file: Option<tokio::fs::File>,
    hasher: Sha256,
    size: u64,
}

impl MediaWriter {
    pub(super) async fn create(dir: &Path) -> Result<Self, StorageError> {
        let tmp_dir = dir.join("tmp");
        tokio::fs::create_dir_all(&tmp_dir).await?;
        let tmp = tmp_dir.join(uuid::Uuid::new_v4().to_string());
        let file = tokio::fs::File::create(&tmp).await?;
        Ok(MediaWriter {
            dir: dir.to_path_buf(),
            tmp,
            file: Some(file),
            hasher: Sha256::new(),
            size: 0,
        })
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), StorageError> {
        let file = self.file.as_mut().ok_or(StorageError::Closed)?;
        file.write_all(chunk).await?;
        self.hasher.update(chunk);
        self.size += chunk.len() as u64;
        Ok(())
    }

    /// Makes the upload durable under its content hash; returns (sha256 hex, size).
    pub async fn finish(mut self) -> Result<(String, u64), StorageError> {
        let mut file = self.file.take().ok_or(StorageError::Closed)?;
        file.flush().await?;
        file.sync_all().await?;
        drop(file);
        let sha = hex::encode(std::mem::take(&mut self.hasher).finalize());
        let dest = self.dir.join(&sha);
        // Same bytes already stored: keep that file.
        if tokio::fs::try_exists(&dest).await? {
            tokio::fs::remove_file(&self.tmp).await?;
        } else {
            tokio::fs::rename(&self.tmp, &dest).await?;
            // The rename is durable only once the directory is synced.
            tokio::fs::File::open(&self.dir).await?.sync_all().await?;
        }
        self.tmp = PathBuf::new();
        Ok((sha, self.size))
    }
}

impl Drop for MediaWriter {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Removes temp files left by uploads cut off by a crash.
pub(super) fn sweep_tmp(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir.join("tmp")) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
