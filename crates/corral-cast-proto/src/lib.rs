//! Sans-IO multicast imaging protocol ("cast"): packets, signed manifest, parity repair, and
//! the sender and receiver state machines.
//!
//! This crate is the whole protocol and nothing else: no sockets, no files, no clock reads
//! (`now: Instant` is always passed in), no threads, no async. The tokio driver lives in
//! `corral-cast`. The style follows `quinn-proto`: feed datagrams with `handle_input`, fire
//! timers with `handle_timeout`, ask `poll_timeout` when to wake next, drain `poll_transmit`
//! for datagrams to send and `poll_event` for things to record.
//!
//! # How a cast works
//! * The image is cut into blocks ([`Manifest::block_size`], default 1 MiB). All-zero blocks are
//!   flagged in the manifest and never sent. A data block is zstd-compressed on its own (sent raw
//!   if that does not help) and cut into `k` source symbols ([`encode_block`]); parity symbols
//!   are Reed–Solomon recovery shards. Any `k` distinct symbols rebuild the block.
//! * The [`SignedManifest`] lists each block's BLAKE3 hash (of the uncompressed bytes, as the
//!   BLAKE3 subtree the block forms at its offset, so that the block hashes merge into the
//!   plain BLAKE3 hash of the image), signed with Ed25519. Receivers verify every block against it before emitting
//!   [`ReceiverEvent::BlockReady`]; nothing unverified reaches the disk.
//! * Before that, while the driver still reads and hashes the image for the manifest, it
//!   tells the group so with a Preparing packet ([`packet::Preparing`]); a [`Receiver`] shows
//!   it ([`Receiver::sender_preparing`]) and acts on nothing in it.
//! * The [`Sender`] announces the session and multicasts the manifest until its start condition
//!   holds, then makes **one in-order pass** over the blocks, paced by a token bucket. Receivers
//!   NAK what they miss; the sender aggregates NAKs per block as the **maximum** count any
//!   receiver needs and answers with that many **fresh** parity symbols, so one repair packet
//!   fixes different losses at different receivers. Nobody ACKs every slice and the stream
//!   never waits for the slowest receiver; a receiver silent for
//!   [`SenderConfig::dead_after`] is declared failed and not waited for again.
//! * A [`Receiver`] that cannot get data over multicast is told so
//!   ([`ReceiverEvent::MulticastSilent`]); the driver can then fetch the manifest and encoded
//!   blocks over TCP and feed them in with [`Receiver::accept_manifest_bytes`] and
//!   [`Receiver::accept_encoded_block`], which verify exactly as the multicast path does.
//!
//! # What this crate is not
//! It does not open sockets, join groups, read images, write disks or decide policy about
//! fallbacks; it does not log to the audit store (the driver turns events into audit rows).
//!
//! # Driver loop
//! ```no_run
//! use std::net::SocketAddr;
//! use std::sync::Arc;
//! use std::time::Instant;
//! use corral_cast_proto::{
//!     BlockSource, Dest, EncodedBlock, Sender, SenderConfig, SenderEvent, SignedManifest,
//! };
//!
//! # fn socket_recv(_: &mut [u8]) -> Option<(usize, SocketAddr)> { None }
//! # fn send_to(_: Dest, _: &[u8]) {}
//! # fn sleep_until(_: Option<Instant>) {}
//! # fn now() -> Instant { unimplemented!() }
//! # struct Image;
//! # impl BlockSource for Image {
//! #     fn encoded_block(&mut self, i: u32) -> std::io::Result<Arc<EncodedBlock>> { unimplemented!() }
//! # }
//! # fn run(manifest: SignedManifest, mut image: Image) -> Result<(), Box<dyn std::error::Error>> {
//! let mut sender = Sender::new(SenderConfig::default(), manifest, now())?;
//! let mut out = Vec::with_capacity(1500);
//! let mut inbuf = [0u8; 2048];
//! loop {
//!     // 1. Everything that arrived on the socket.
//!     while let Some((n, from)) = socket_recv(&mut inbuf) {
//!         sender.handle_input(now(), from, &inbuf[..n]);
//!     }
//!     // 2. Timers.
//!     sender.handle_timeout(now());
//!     // 3. Datagrams (paced: `None` means "not now", see poll_timeout).
//!     while let Some(t) = sender.poll_transmit(now(), &mut image, &mut out) {
//!         send_to(t.dest, &out[..t.size]);
//!     }
//!     // 4. Events for the audit store / progress display.
//!     while let Some(ev) = sender.poll_event() {
//!         if let SenderEvent::Finished(summary) = ev {
//!             println!("{summary:?}");
//!             return Ok(());
//!         }
//!     }
//!     // 5. Sleep until the next deadline or the next datagram.
//!     sleep_until(sender.poll_timeout());
//! }
//! # }
//! ```
//! The receiver is driven the same way ([`Receiver::handle_input`], [`Receiver::poll_transmit`]
//! with every datagram going to the sender, [`Receiver::poll_event`]); on
//! [`ReceiverEvent::BlockReady`] the driver writes the block, on
//! [`ReceiverEvent::AllBlocksReady`] it checks that every block was verified and that
//! [`Manifest::merged_image_hash`] is [`Manifest::image_hash`] (no second pass over the
//! data), makes the output durable, and calls [`Receiver::finish`].
//!
//! # Design notes and measured figures
//! * Parity count per block is `r = max(k, 64)` (≤ 32768), derived from `k` on both sides so
//!   Data packets need not carry it; reed-solomon-simd needs even shard sizes, so symbol sizes
//!   are even (default 1440: one symbol + 27 header bytes fit a 1500-byte IPv4/UDP frame).
//! * Repair during the pass is capped at [`SenderConfig::repair_share`] (default 5%) of the
//!   bytes sent; at 25% a single slow receiver's NAKs slowed the pass for everyone by 1.3x.
//! * A NAK line carries `(block, needed, seen)`; repair sent within
//!   [`SenderConfig::repair_guard`] after `seen` counts as in flight, so NAKs crossing a repair
//!   burst do not double it. Two different copies of one symbol index poison that index.
//! * Simulated (tests/sim.rs): 1000 receivers at 1% independent loss need 2.27% repair
//!   (256 KiB blocks, 256-byte symbols; 2.37% at the 1 MiB / 1440 defaults) and complete within
//!   1.02x of a single receiver. One core (examples/throughput.rs, release): sender ~10 Gbit/s
//!   of packets, receiver ingest + verify ~8 Gbit/s.
//!
//! Entry types: [`Sender`], [`Receiver`], [`SignedManifest`], [`packet::Packet`],
//! [`encode_block`]. The [`sim`] module runs both over a simulated network with a virtual clock.

pub mod block;
pub mod error;
pub mod manifest;
pub mod packet;
pub mod receiver;
mod rng;
pub mod sender;
pub mod sim;

use std::net::SocketAddr;

pub use block::{
    BlockSource, Compression, EncodedBlock, Parity, encode_block, encode_block_vec, parity_count,
    source_count,
};
pub use corral_model::SessionId;
pub use error::{BlockError, ConfigError, ManifestError, PacketError};
pub use manifest::{BlockEntry, BlockPos, Manifest, ManifestBuilder, SignedManifest, block_hash};
pub use receiver::{Receiver, ReceiverConfig, ReceiverEvent, ReceiverStats, SenderPreparing};
pub use sender::Sender;
pub use sender::{
    ReceiverOutcome, ReceiverSummary, SenderConfig, SenderEvent, SenderStats, SessionSummary,
    StartReason,
};

/// Where a datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dest {
    /// The session's multicast group (the driver knows its address and port).
    Group,
    /// One peer.
    Unicast(SocketAddr),
}

/// One datagram to send: `buf[..size]` of the buffer passed to `poll_transmit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// Destination.
    pub dest: Dest,
    /// Bytes written to the caller's buffer.
    pub size: usize,
}

/// Bytes of signed manifest per ManifestChunk packet.
pub const MANIFEST_CHUNK_LEN: usize = 1200;
