//! How the driver reports what happens: audit [`Event`]s (session start, receiver joins,
//! leaves, failures, results) and progress snapshots for bars or JSON lines.
//!
//! The driver does not know about the store or the terminal; the binary passes an
//! [`Observer`] that forwards events to `corral_store` and draws progress.

use std::net::SocketAddr;

use corral_model::Event;

/// A receiver as the sender sees it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReceiverProgress {
    /// The name the receiver announced (`--name`), or its address.
    pub name: String,
    /// Where its reports come from.
    pub addr: SocketAddr,
    /// Blocks it has verified.
    pub blocks_done: u64,
}

/// A progress snapshot.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "side", rename_all = "lowercase")]
pub enum Progress {
    /// The sender's view.
    Sender {
        /// Blocks in the image.
        blocks_total: u64,
        /// Bytes in the image.
        image_bytes: u64,
        /// Bytes sent on the wire so far (data and parity).
        bytes_sent: u64,
        /// Seconds since the session started.
        elapsed_s: f64,
        /// Every receiver heard from.
        receivers: Vec<ReceiverProgress>,
    },
    /// The sender reading and hashing the image for its manifest, before it offers it.
    Hashing {
        /// Bytes in the image.
        image_bytes: u64,
        /// Bytes read and hashed so far.
        bytes_done: u64,
        /// Seconds since hashing started.
        elapsed_s: f64,
    },
    /// A receiver waiting for a sender that is still reading and hashing its image (from
    /// the sender's Preparing packets, before it announces).
    Waiting {
        /// The sender's image size (0: not known yet).
        sender_image_bytes: u64,
        /// Bytes the sender has read and hashed so far.
        sender_bytes_done: u64,
        /// Seconds since the receiver started.
        elapsed_s: f64,
    },
    /// A receiver's view.
    Receiver {
        /// Blocks in the image (0 until the manifest is known).
        blocks_total: u64,
        /// Blocks verified and written.
        blocks_done: u64,
        /// Bytes in the image.
        image_bytes: u64,
        /// Bytes verified and written.
        bytes_done: u64,
        /// Seconds since the receiver started.
        elapsed_s: f64,
    },
}

/// Receives the driver's audit events and progress. Both methods must be cheap: they are
/// called from the I/O loop.
pub trait Observer: Send + Sync {
    /// An audit event (`Source::Cast`).
    fn event(&self, event: &Event) {
        let _ = event;
    }
    /// A progress snapshot (about twice a second).
    fn progress(&self, progress: &Progress) {
        let _ = progress;
    }
}

/// An observer that discards everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl Observer for NoObserver {}
