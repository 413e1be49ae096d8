//! The crate's error type: one enum, context in fields.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything that can make a cast send or receive fail.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CastError {
    /// A socket call failed.
    #[error("socket {what}: {source}")]
    Socket {
        /// The call or option.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// `--interface` names no usable interface.
    #[error("interface {name:?}: {source}")]
    Interface {
        /// What the user gave.
        name: String,
        /// Why it failed.
        source: io::Error,
    },
    /// File or device I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or device.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A key file is not a valid key.
    #[error("key file {path}: {reason}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The output device is smaller than the image.
    #[error("{path}: device holds {device} bytes but the image has {image} bytes")]
    DeviceTooSmall {
        /// The device.
        path: PathBuf,
        /// Its size.
        device: u64,
        /// The image size.
        image: u64,
    },
    /// The file system of a regular-file output has no room for the image's data.
    #[error(
        "{path}: the image needs {need} more bytes on this file system but only {free} are free; free some space or write the image elsewhere (--output)"
    )]
    NoRoom {
        /// The file being written.
        path: PathBuf,
        /// Bytes still to be allocated (the image's non-zero blocks, less what the file
        /// already holds).
        need: u64,
        /// Bytes free for this process on the file system.
        free: u64,
    },
    /// The catch-up server reached belongs to a sender of another stream (its port was taken
    /// on that host, so the sender this receiver wants listens elsewhere).
    #[error(
        "the catch-up server at {addr} serves the stream to {theirs}, not ours ({ours}): another sender holds that port; give --sender HOST:PORT with the TCP catch-up port our sender printed"
    )]
    OtherStream {
        /// The catch-up address asked.
        addr: std::net::SocketAddr,
        /// The stream that server belongs to (`0.0.0.0:PORT` for unicast targets).
        theirs: std::net::SocketAddrV4,
        /// The stream this receiver listens to.
        ours: std::net::SocketAddrV4,
    },
    /// The sender's catch-up server speaks another version of the catch-up protocol.
    #[error(
        "the sender at {addr} speaks catch-up protocol version {theirs}, this receiver version {ours}: run the same corral release on both ends"
    )]
    CatchUpVersion {
        /// The catch-up address asked.
        addr: std::net::SocketAddr,
        /// The server's version.
        theirs: u8,
        /// Ours.
        ours: u8,
    },
    /// The output cannot be shown to hold the signed image: a block was never verified by
    /// this process, or the block hashes do not make up the image hash.
    #[error("{path}: {why}")]
    Verify {
        /// The output.
        path: PathBuf,
        /// What failed.
        why: String,
    },
    /// The state file belongs to another image or is corrupt.
    #[error("state file {path}: {reason}")]
    State {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The `--pipe` command failed.
    #[error("pipe command {command:?}: {reason}")]
    Pipe {
        /// The shell command.
        command: String,
        /// What went wrong.
        reason: String,
    },
    /// The TCP catch-up exchange with the sender failed.
    #[error("catch-up with {peer}: {reason}")]
    CatchUp {
        /// The sender's TCP address.
        peer: SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// The image's manifest could not be built.
    #[error("manifest: {0}")]
    Manifest(#[from] corral_cast_proto::ManifestError),
    /// The protocol rejected the sender configuration.
    #[error("sender configuration: {0}")]
    Config(#[from] corral_cast_proto::ConfigError),
    /// The datagram size leaves no room for data.
    #[error("packet size {size} is too small (at least {min} bytes)")]
    PacketSize {
        /// The size asked for.
        size: usize,
        /// The smallest usable size.
        min: usize,
    },
    /// A background task died (a bug or an abort).
    #[error("internal task {task} failed: {source}")]
    Task {
        /// Which task.
        task: &'static str,
        /// Why.
        source: tokio::task::JoinError,
    },
    /// The session ended without the image complete and verified.
    #[error("transfer incomplete: {reason}")]
    Incomplete {
        /// Why.
        reason: String,
    },
    /// The image server's control exchange failed or refused the request.
    #[error("image server {server}: {reason}")]
    Control {
        /// The server's control address.
        server: SocketAddr,
        /// What went wrong, or the server's reason.
        reason: String,
    },
    /// Cancelled by the caller.
    #[error("cancelled")]
    Cancelled,
}

/// Adds the path to an I/O error.
pub(crate) fn io_at(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> CastError {
    let path = path.into();
    move |source| CastError::Io { path, source }
}
