//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong in the netboot engine and its servers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetbootError {
    /// An iPXE binary is missing from `[paths] ipxe`.
    #[error(
        "iPXE binary {path} not found: install the Debian package `ipxe` (apt-get install ipxe) \
         or point [paths] ipxe in site.toml at a directory holding {file}"
    )]
    MissingIpxe {
        /// The missing file.
        path: PathBuf,
        /// Its name.
        file: String,
    },
    /// A template failed to render.
    #[error("iPXE template {template} failed to render: {reason}")]
    Template {
        /// Which template.
        template: String,
        /// The engine's message.
        reason: String,
    },
    /// No script for this machine.
    #[error("no iPXE script: {reason}")]
    NoScript {
        /// Why.
        reason: String,
    },
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A socket could not be bound.
    #[error(
        "cannot bind {what} on {addr}: {source} (is another server running there? ports below 1024 need root)"
    )]
    Bind {
        /// Which service.
        what: &'static str,
        /// The address.
        addr: std::net::SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] corral_store::StoreError),
}
