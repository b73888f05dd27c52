//! Storage errors.

/// What can go wrong below the actors. Cloneable, because one failed flush is reported to
/// every write that waited on it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    /// The disk or sled refused an operation (disk full, I/O error). The node reports
    /// itself unhealthy; the write is not acked.
    #[error("storage I/O error: {0}")]
    Io(String),
    /// A stored value could not be decoded: written by an unknown schema version or
    /// damaged. Never a panic: the entity answers with an error.
    #[error("corrupt value in tree {tree} at key {key}: {reason}")]
    Corrupt {
        tree: &'static str,
        key: String,
        reason: String,
    },
    /// The group-commit thread is gone (the node is shutting down).
    #[error("the storage flusher has stopped")]
    Closed,
}

impl From<sled::Error> for StorageError {
    fn from(e: sled::Error) -> Self {
        StorageError::Io(e.to_string())
    }
}

impl From<std::io::Error> for StorageError {
    fn from(e: std::io::Error) -> Self {
        StorageError::Io(e.to_string())
    }
}
