//! The crate's error type.

use std::path::PathBuf;

/// Why the TFTP service could not start or had to stop. Problems of single transfers are not
/// errors of the service: they end that transfer and are reported as
/// [`crate::TftpEvent::Failed`].
#[derive(Debug, thiserror::Error)]
pub enum TftpError {
    /// The served root cannot be opened as a directory.
    #[error("TFTP root {}: {source} (create it or point the config at an existing directory)", path.display())]
    Root {
        /// The configured root.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A socket operation on the listening socket failed.
    #[error("TFTP listening socket: {what}: {source}")]
    Socket {
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
}
