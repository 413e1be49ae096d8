//! Errors of the sync engine.

use std::path::PathBuf;

/// Errors decoding or encoding the wire protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The stream failed or ended.
    #[error("sync stream: {0}")]
    Io(#[source] std::io::Error),
    /// A frame longer than the limit.
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(usize),
    /// A frame that does not decode.
    #[error("undecodable message: {0}")]
    Decode(String),
    /// A message that does not encode.
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// A path that is absolute, has `..` or an empty component.
    #[error("refused path {0:?}: not a plain relative path")]
    BadPath(String),
    /// A chunk list that does not add up to the file size.
    #[error("chunk list of {0:?} does not add up to its size")]
    BadChunks(String),
    /// A message out of order.
    #[error("unexpected message: {0}")]
    Unexpected(String),
    /// Peer speaks another protocol version.
    #[error(
        "peer speaks sync protocol version {0}, this build speaks {1}: install the same corral \
         release on both ends"
    )]
    Version(u32, u32),
}

/// Errors of the sync engine.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// A file system operation failed.
    #[error("{op} {path}: {source}")]
    Fs {
        /// What was attempted.
        op: &'static str,
        /// The path (relative to the root where it applies).
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The protocol failed.
    #[error(transparent)]
    Proto(#[from] ProtoError),
    /// The master's file changed while it was being sent.
    #[error("{0}: changed on the master during the run; run again")]
    SourceChanged(String),
    /// Data for a chunk did not match its hash.
    #[error("{0}: received data does not match its hash")]
    BadData(String),
    /// The remote end failed.
    #[error("remote: {0}")]
    Remote(String),
    /// Spawning the transport failed.
    #[error("cannot start {cmd}: {source}")]
    Spawn {
        /// The command.
        cmd: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Rollback of a run that has no backup.
    #[error("no backup for run {0} under {1}")]
    NoSuchRun(String, PathBuf),
}

impl SyncError {
    pub(crate) fn fs(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SyncError::Fs {
            op,
            path: path.into(),
            source,
        }
    }
}
