//! The tokio driver for `corral-cast-proto`: sockets, files, block devices, progress.
//!
//! What it is: the I/O around the sans-IO cast protocol. [`send`] reads an image (file, block
//! device or stdin), multicasts it through the protocol's `Sender` state machine and serves TCP
//! catch-up; [`receive`] joins the group, feeds datagrams to the protocol's `Receiver`, writes
//! verified blocks to a file, device, stdout or pipe, keeps a resume state file, falls back to
//! TCP when multicast is silent, and reads everything back before reporting success.
//!
//! What it is not: the protocol. Packet formats, the signed manifest, parity repair and every
//! decision about what to send when live in `corral-cast-proto`; this crate only wires sockets,
//! timers and files to it.
//!
//! Entry types: [`SendOptions`] → [`send`] → [`SendReport`]; [`ReceiveOptions`] → [`receive`] →
//! [`ReceiveReport`]; [`keys`] for Ed25519 key files; [`Observer`] for events and progress.

#[allow(dead_code)] // Wired into send/receive once the protocol API lands.
mod catchup;
mod error;
pub mod keys;
mod observe;
#[allow(dead_code)] // Wired into receive once the protocol API lands.
mod output;
pub mod socket;
mod source;
pub mod state;

pub use error::CastError;
pub use observe::{NoObserver, Observer, Progress, ReceiverProgress};
pub use output::{OutputSpec, part_path};
pub use source::ImageSource;
mod options;

pub use options::{Rate, ReceiveOptions, ReceiveReport, ReceiverOutcome, SendOptions, SendReport};
pub use tokio_util::sync::CancellationToken;

/// Sends an image to every receiver (see the crate docs).
pub async fn send(opts: SendOptions, cancel: CancellationToken) -> Result<SendReport, CastError> {
    let _ = (opts, cancel);
    Err(CastError::Incomplete {
        reason: "the cast protocol is not wired yet".into(),
    })
}

/// Receives an image (see the crate docs).
pub async fn receive(
    opts: ReceiveOptions,
    cancel: CancellationToken,
) -> Result<ReceiveReport, CastError> {
    let _ = (opts, cancel);
    Err(CastError::Incomplete {
        reason: "the cast protocol is not wired yet".into(),
    })
}
