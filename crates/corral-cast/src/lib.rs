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

mod blocks;
mod catchup;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod keys;
mod observe;
mod options;
mod output;
mod receive;
mod sched;
mod send;
pub mod serve;
pub mod socket;
mod source;
pub mod state;

pub use error::CastError;
pub use observe::{NoObserver, Observer, Progress, ReceiverProgress};
pub use options::{
    CatchupListener, Rate, ReceiveOptions, ReceiveReport, ReceiverOutcome, SendOptions, SendReport,
};
pub use output::{OutputSpec, part_path};
pub use receive::receive;
pub use send::send;
pub use source::ImageSource;
pub use tokio_util::sync::CancellationToken;
