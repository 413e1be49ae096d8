//! Sans-IO TFTP server protocol: the packet codec, request checks, option negotiation and the
//! read-transfer state machine.
//!
//! Implements [RFC 1350](https://www.rfc-editor.org/rfc/rfc1350) (TFTP),
//! [RFC 2347](https://www.rfc-editor.org/rfc/rfc2347) (option extension, OACK),
//! [RFC 2348](https://www.rfc-editor.org/rfc/rfc2348) (`blksize`),
//! [RFC 2349](https://www.rfc-editor.org/rfc/rfc2349) (`timeout`, `tsize`) and
//! [RFC 7440](https://www.rfc-editor.org/rfc/rfc7440) (`windowsize`), with block numbers
//! wrapping past 65535 for large files.
//!
//! # What this crate is not
//! No sockets, no files, no clock reads (`now: Instant` is passed in), no tasks. The tokio
//! server is `corral-tftp`; it opens files beneath the served root and turns [`Source`] reads
//! into `pread`s. It is a *read-only* server: write requests are refused with an access
//! violation. Netascii is served as octet (boot files are binary). There is no client.
//!
//! # Entry points
//! * [`request::classify`]: what to do with a datagram on the listening port (start a read,
//!   or the ERROR packet to answer with; see [`request::Incoming`]).
//! * [`options::Negotiated::new`]: the client's [`options::RequestOptions`] clamped to the
//!   server's [`options::Limits`].
//! * [`Transfer`]: one read transfer in the style of `quinn-proto`: `handle_input(now, bytes)`,
//!   `handle_timeout(now)`, `poll_timeout()`, `poll_transmit(now, buf)`, `poll_event()`.
//! * [`path::sanitize`]: request file name to a root-relative path (no `..`, leading `/`
//!   stripped, `\` as separator, no control characters).
//! * [`packet::Packet`]: decoding and encoding, with typed [`DecodeError`]s.
//!
//! # Driver loop
//! ```
//! use std::time::{Duration, Instant};
//! use corral_tftp_proto::{Incoming, Limits, MemorySource, Negotiated, Transfer, classify};
//!
//! # #[allow(clippy::disallowed_methods)] let now = Instant::now();
//! let Incoming::Read(req) = classify(b"\x00\x01/hello.txt\x00octet\x00") else { panic!() };
//! let src = MemorySource(b"hello".to_vec());
//! let neg = Negotiated::new(&req.options, &Limits::default(), Some(5));
//! let mut t = Transfer::new(src, neg);
//! let mut buf = vec![0u8; t.max_packet_len()];
//! let n = t.poll_transmit(now, &mut buf).unwrap();      // DATA 1 "hello"
//! assert_eq!(&buf[..n], b"\x00\x03\x00\x01hello");
//! t.handle_input(now, b"\x00\x04\x00\x01");              // ACK 1
//! assert!(t.is_done());
//! ```

pub mod error;
pub mod options;
pub mod packet;
pub mod path;
pub mod request;
pub mod transfer;

#[cfg(test)]
mod sim;

pub use error::{DecodeError, OptionError, PathError};
pub use options::{Limits, Negotiated, RequestOptions};
pub use packet::{ErrorCode, Mode, Packet, Request};
pub use request::{Incoming, ReadRequest, Rejection, classify};
pub use transfer::{FailReason, MemorySource, Source, Transfer, TransferEvent};
