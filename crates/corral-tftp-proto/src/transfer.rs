//! The read-transfer state machine: one client, one file, sans-IO.
//!
//! * With options, the transfer opens with an OACK and waits for ACK 0
//!   ([RFC 2347 §"Negotiation"](https://www.rfc-editor.org/rfc/rfc2347)); without, DATA 1 goes
//!   out at once ([RFC 1350 §6](https://www.rfc-editor.org/rfc/rfc1350#section-6)).
//! * A window of `windowsize` blocks is sent, then the server waits for an ACK
//!   ([RFC 7440 §4](https://www.rfc-editor.org/rfc/rfc7440#section-4)). An ACK of the window's
//!   last block opens the next window; an ACK of an earlier block (the client saw a gap) makes
//!   the next window start right after it. On timeout the window is sent again from the first
//!   unacknowledged block (go-back-N), up to `retries` times in a row without progress.
//! * A **duplicate** ACK (of a block already acknowledged) never triggers a send: answering
//!   duplicates doubles every later packet (the "Sorcerer's Apprentice" bug, RFC 1123
//!   §4.2.3.1). Only the timer retransmits.
//! * Blocks are numbered from 1 as 64-bit indices inside; on the wire they wrap from 65535 to
//!   0 (what tftp-hpa, atftp, curl and iPXE expect), so files of any size transfer.
//! * The last block is the first one shorter than `blksize` (0 bytes when the size is a
//!   multiple of it). The transfer is done when it is acknowledged.

use std::collections::VecDeque;
use std::time::Instant;

use crate::options::Negotiated;
use crate::packet::{
    DATA_HEADER, ErrorCode, Packet, encode_data_header, encode_error, encode_oack,
};

/// Where the bytes of a transfer come from: a file, generated content, anything seekable.
///
/// The state machine asks for each block when it (re)sends it, so a source must return the same
/// bytes for the same offset every time.
pub trait Source {
    /// Total size if known (answers `tsize`).
    fn size(&self) -> Option<u64>;
    /// Fills `buf` with bytes from `offset`; returns how many. Fewer than `buf.len()` means end
    /// of data.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize>;
}

/// Serves bytes held in memory (rendered scripts, tests).
#[derive(Debug, Clone)]
pub struct MemorySource<B>(pub B);

impl<B: AsRef<[u8]>> Source for MemorySource<B> {
    fn size(&self) -> Option<u64> {
        Some(self.0.as_ref().len() as u64)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let data = self.0.as_ref();
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(data.len());
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
    }
}

/// Why a transfer ended without delivering the whole file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FailReason {
    /// No progress after `retries` retransmissions.
    #[error("timed out waiting for the ACK of block {block} after {retries} retransmissions")]
    Timeout {
        /// First unacknowledged block (1-based index, not wrapped).
        block: u64,
        /// Retransmissions made.
        retries: u32,
    },
    /// The client sent an ERROR packet (code 8 after an OACK: it declined the options).
    #[error("client sent error {code}: {message}")]
    PeerError {
        /// The client's error code.
        code: u16,
        /// The client's message.
        message: String,
    },
    /// The client sent something other than ACK or ERROR on the transfer's port.
    #[error("protocol violation: {detail}")]
    Protocol {
        /// What was wrong.
        detail: String,
    },
    /// The source could not be read.
    #[error("read error at byte {offset}: {message}")]
    Read {
        /// Offset being read.
        offset: u64,
        /// The I/O error.
        message: String,
    },
}

/// What a transfer reports to its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferEvent {
    /// The client acknowledged the last block.
    Finished {
        /// Bytes delivered.
        bytes: u64,
        /// Blocks (DATA packets) sent again after loss or timeout.
        retransmitted: u64,
    },
    /// The transfer ended early.
    Failed(FailReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// OACK sent (or due), waiting for ACK 0.
    Oack,
    /// Sending DATA windows.
    Data,
    /// Over; nothing more to send except a pending error.
    Done,
}

/// One read transfer. Feed it with [`Transfer::handle_input`] and
/// [`Transfer::handle_timeout`]; drain [`Transfer::poll_transmit`] and [`Transfer::poll_event`].
#[derive(Debug)]
pub struct Transfer<S> {
    source: S,
    neg: Negotiated,
    phase: Phase,
    oack_due: bool,
    /// Highest block acknowledged (0 = none).
    acked: u64,
    /// Next block to send.
    next_send: u64,
    /// Highest block ever sent.
    highest_sent: u64,
    /// Index and payload length of the last block, once a short read found it.
    last_block: Option<(u64, usize)>,
    deadline: Option<Instant>,
    retries: u32,
    retransmitted: u64,
    error_due: Option<(ErrorCode, String)>,
    events: VecDeque<TransferEvent>,
}

impl<S: Source> Transfer<S> {
    /// Starts a transfer with negotiated parameters (see [`Negotiated::new`]). Nothing is sent
    /// until the driver calls [`Transfer::poll_transmit`].
    pub fn new(source: S, negotiated: Negotiated) -> Self {
        let with_oack = !negotiated.oack.is_empty();
        Transfer {
            source,
            neg: negotiated,
            phase: if with_oack { Phase::Oack } else { Phase::Data },
            oack_due: with_oack,
            acked: 0,
            next_send: 1,
            highest_sent: 0,
            last_block: None,
            deadline: None,
            retries: 0,
            retransmitted: 0,
            error_due: None,
            events: VecDeque::new(),
        }
    }

    /// The parameters this transfer runs with.
    pub fn negotiated(&self) -> &Negotiated {
        &self.neg
    }

    /// Highest block acknowledged so far (1-based index, not wrapped; 0 = none).
    pub fn acknowledged(&self) -> u64 {
        self.acked
    }

    /// Highest block sent so far (1-based index, not wrapped).
    pub fn highest_sent(&self) -> u64 {
        self.highest_sent
    }

    /// Size of the send buffer [`Transfer::poll_transmit`] needs.
    pub fn max_packet_len(&self) -> usize {
        // An OACK with four options fits in 512 bytes; DATA needs the block plus header.
        (usize::from(self.neg.blksize) + DATA_HEADER).max(512)
    }

    /// True once the transfer is over and its last packet (if any) has been polled.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done && self.error_due.is_none()
    }

    /// When [`Transfer::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.phase == Phase::Done {
            None
        } else {
            self.deadline
        }
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<TransferEvent> {
        self.events.pop_front()
    }

    fn finish(&mut self, event: TransferEvent, error: Option<(ErrorCode, String)>) {
        if self.phase == Phase::Done {
            return;
        }
        self.phase = Phase::Done;
        self.deadline = None;
        self.error_due = error;
        self.events.push_back(event);
    }

    /// Handles one datagram from the client (the driver has checked it comes from the client's
    /// address and port; strangers get error 5 from the driver).
    pub fn handle_input(&mut self, now: Instant, datagram: &[u8]) {
        let _ = now;
        if self.phase == Phase::Done {
            return;
        }
        match Packet::decode(datagram) {
            Ok(Packet::Ack { block }) => self.on_ack(block),
            Ok(Packet::Error { code, message }) => self.finish(
                TransferEvent::Failed(FailReason::PeerError {
                    code: code.to_u16(),
                    message,
                }),
                None,
            ),
            Ok(other) => {
                let detail = match other {
                    Packet::Rrq(_) => "RRQ",
                    Packet::Wrq(_) => "WRQ",
                    Packet::Data { .. } => "DATA",
                    _ => "OACK",
                };
                let msg = format!("unexpected {detail} during a read transfer");
                self.finish(
                    TransferEvent::Failed(FailReason::Protocol {
                        detail: msg.clone(),
                    }),
                    Some((ErrorCode::IllegalOperation, msg)),
                );
            }
            Err(e) => {
                let msg = format!("malformed packet: {e}");
                self.finish(
                    TransferEvent::Failed(FailReason::Protocol {
                        detail: msg.clone(),
                    }),
                    Some((ErrorCode::IllegalOperation, msg)),
                );
            }
        }
    }

    fn on_ack(&mut self, block: u16) {
        match self.phase {
            Phase::Oack => {
                if block == 0 {
                    self.phase = Phase::Data;
                    self.oack_due = false;
                    self.retries = 0;
                    self.deadline = None;
                }
                // Anything else before ACK 0 is stale; ignore it.
            }
            Phase::Data => {
                // Map the 16-bit wire number onto the 64-bit index just above `acked`.
                let diff = u64::from(block.wrapping_sub(self.acked as u16));
                let idx = self.acked + diff;
                if diff == 0 || idx > self.highest_sent {
                    // Duplicate (diff 0, or an old ACK that wrapped past what was sent): never
                    // answered (Sorcerer's Apprentice). The timer covers real loss.
                    return;
                }
                self.acked = idx;
                self.retries = 0;
                if let Some((last, len)) = self.last_block.filter(|&(l, _)| idx >= l) {
                    let bytes = (last - 1) * u64::from(self.neg.blksize) + len as u64;
                    self.finish(
                        TransferEvent::Finished {
                            bytes,
                            retransmitted: self.retransmitted,
                        },
                        None,
                    );
                    return;
                }
                // RFC 7440 §4: the next window starts right after the acknowledged block,
                // whether the ACK closed the window or reported a gap inside it.
                self.next_send = idx + 1;
                self.deadline = None;
            }
            Phase::Done => {}
        }
    }

    /// Handles the timer: retransmits from the first unacknowledged block (or the OACK), or
    /// gives up after `retries` attempts without progress.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(deadline) = self.deadline else {
            return;
        };
        if self.phase == Phase::Done || now < deadline {
            return;
        }
        self.deadline = None;
        self.retries += 1;
        if self.retries > self.neg.retries {
            let block = self.acked + 1;
            self.finish(
                TransferEvent::Failed(FailReason::Timeout {
                    block,
                    retries: self.neg.retries,
                }),
                Some((ErrorCode::Undefined, "timed out".to_owned())),
            );
            return;
        }
        match self.phase {
            Phase::Oack => self.oack_due = true,
            Phase::Data => self.next_send = self.acked + 1,
            Phase::Done => {}
        }
    }

    /// Writes the next datagram to send into `buf` and returns its length, or `None` when
    /// nothing is due. Call until `None` after every input and timeout.
    ///
    /// # Panics
    /// If `buf` is shorter than [`Transfer::max_packet_len`] (a driver bug).
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        assert!(buf.len() >= self.max_packet_len(), "send buffer too small");
        if let Some((code, msg)) = self.error_due.take() {
            return Some(encode_error(code, &msg, buf));
        }
        match self.phase {
            Phase::Done => None,
            Phase::Oack => {
                if !self.oack_due {
                    return None;
                }
                self.oack_due = false;
                self.deadline = Some(now + self.neg.timeout);
                // The OACK holds at most four short options: it always fits in 512 bytes.
                encode_oack(&self.neg.oack, buf)
            }
            Phase::Data => {
                let window_end = self.acked + u64::from(self.neg.windowsize);
                let past_last = self.last_block.is_some_and(|(l, _)| self.next_send > l);
                if self.next_send > window_end || past_last {
                    return None;
                }
                let idx = self.next_send;
                let bs = usize::from(self.neg.blksize);
                let offset = (idx - 1) * bs as u64;
                let n = match read_full(&mut self.source, offset, &mut buf[DATA_HEADER..][..bs]) {
                    Ok(n) => n,
                    Err(e) => {
                        self.finish(
                            TransferEvent::Failed(FailReason::Read {
                                offset,
                                message: e.to_string(),
                            }),
                            None,
                        );
                        return Some(encode_error(ErrorCode::Undefined, "read error", buf));
                    }
                };
                if n < bs {
                    self.last_block = Some((idx, n));
                }
                if idx <= self.highest_sent {
                    self.retransmitted += 1;
                }
                self.highest_sent = self.highest_sent.max(idx);
                self.next_send = idx + 1;
                self.deadline = Some(now + self.neg.timeout);
                encode_data_header(idx as u16, buf);
                Some(DATA_HEADER + n)
            }
        }
    }
}

/// Reads until `buf` is full or the source reports end of data.
fn read_full<S: Source>(src: &mut S, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match src.read_at(offset + got as u64, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::disallowed_methods)] // one real `Instant` as the clock's origin

    use std::time::Duration;

    use super::*;
    use crate::options::{Limits, RequestOptions};

    fn transfer(
        len: usize,
        blksize: Option<u16>,
        windowsize: Option<u16>,
    ) -> Transfer<MemorySource<Vec<u8>>> {
        let opts = RequestOptions {
            blksize,
            windowsize,
            ..Default::default()
        };
        let neg = Negotiated::new(&opts, &Limits::default(), Some(len as u64));
        Transfer::new(MemorySource((0..len).map(|i| i as u8).collect()), neg)
    }

    fn drain(t: &mut Transfer<MemorySource<Vec<u8>>>, now: Instant) -> Vec<Vec<u8>> {
        let mut buf = vec![0u8; t.max_packet_len()];
        let mut out = Vec::new();
        while let Some(n) = t.poll_transmit(now, &mut buf) {
            out.push(buf[..n].to_vec());
        }
        out
    }

    fn ack(b: u16) -> Vec<u8> {
        Packet::Ack { block: b }.to_vec()
    }

    fn blocks(packets: &[Vec<u8>]) -> Vec<u16> {
        packets
            .iter()
            .map(|p| match Packet::decode(p).unwrap() {
                Packet::Data { block, .. } => block,
                other => panic!("not DATA: {other:?}"),
            })
            .collect()
    }

    // RFC 2347 §"Negotiation": OACK first; DATA 1 only after ACK 0.
    #[test]
    fn rfc2347_oack_then_ack0_then_data() {
        let now = Instant::now();
        let mut t = transfer(2000, Some(1000), None);
        let p = drain(&mut t, now);
        assert_eq!(p, vec![b"\x00\x06blksize\x001000\x00".to_vec()]);
        t.handle_input(now, &ack(1)); // not ACK 0: ignored
        assert!(drain(&mut t, now).is_empty());
        t.handle_input(now, &ack(0));
        assert_eq!(blocks(&drain(&mut t, now)), vec![1]);
        // OACK lost: resent on timeout.
        let mut t = transfer(10, Some(512), None);
        drain(&mut t, now);
        t.handle_timeout(now + Duration::from_secs(1));
        assert_eq!(drain(&mut t, now)[0][..2], [0, 6]);
    }

    // RFC 2347: the client may refuse the OACK with error 8; the server sends nothing more.
    #[test]
    fn rfc2347_client_declines_oack() {
        let now = Instant::now();
        let mut t = transfer(100, Some(512), None);
        drain(&mut t, now);
        t.handle_input(now, b"\x00\x05\x00\x08no thanks\x00");
        assert!(drain(&mut t, now).is_empty());
        assert!(t.is_done());
        assert_eq!(
            t.poll_event(),
            Some(TransferEvent::Failed(FailReason::PeerError {
                code: 8,
                message: "no thanks".into()
            }))
        );
    }

    // RFC 7440 §4: an ACK inside the window restarts right after it; duplicates do nothing.
    #[test]
    fn rfc7440_s4_partial_ack_and_duplicate() {
        let now = Instant::now();
        let mut t = transfer(512 * 20, None, Some(4));
        drain(&mut t, now); // OACK
        t.handle_input(now, &ack(0));
        assert_eq!(blocks(&drain(&mut t, now)), vec![1, 2, 3, 4]);
        t.handle_input(now, &ack(2)); // gap after 2
        assert_eq!(blocks(&drain(&mut t, now)), vec![3, 4, 5, 6]);
        t.handle_input(now, &ack(2)); // duplicate: nothing
        assert!(drain(&mut t, now).is_empty());
        t.handle_input(now, &ack(9)); // beyond anything sent: ignored
        assert!(drain(&mut t, now).is_empty());
        // Timeout: go back to the first unacknowledged block.
        t.handle_timeout(now + Duration::from_secs(1));
        assert_eq!(blocks(&drain(&mut t, now)), vec![3, 4, 5, 6]);
    }

    // Block numbers wrap from 65535 to 0.
    #[test]
    fn block_numbers_wrap_to_zero() {
        let now = Instant::now();
        let mut t = transfer(8 * 65540, Some(8), Some(64));
        drain(&mut t, now);
        t.handle_input(now, &ack(0));
        let mut seen = Vec::new();
        while !t.is_done() {
            let p = drain(&mut t, now);
            let b = blocks(&p);
            seen.extend_from_slice(&b);
            t.handle_input(now, &ack(*b.last().unwrap()));
        }
        assert_eq!(seen.len(), 65541);
        assert_eq!(&seen[65533..65538], &[65534, 65535, 0, 1, 2]);
        assert!(matches!(
            t.poll_event(),
            Some(TransferEvent::Finished { bytes, .. }) if bytes == 8 * 65540
        ));
    }

    // RFC 1350 §5: DATA (or a request) from the client during a read is an illegal operation.
    #[test]
    fn rfc1350_unexpected_packet_is_error_4() {
        let now = Instant::now();
        let mut t = transfer(100, None, None);
        drain(&mut t, now);
        t.handle_input(now, b"\x00\x03\x00\x01xx");
        let p = drain(&mut t, now);
        assert_eq!(p.len(), 1);
        assert_eq!(&p[0][..4], b"\x00\x05\x00\x04");
        assert!(t.is_done());
        assert!(drain(&mut t, now).is_empty());
    }

    // A failing source ends the transfer with an error packet.
    #[test]
    fn read_error_sends_error() {
        struct Broken;
        impl Source for Broken {
            fn size(&self) -> Option<u64> {
                None
            }
            fn read_at(&mut self, _: u64, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk on fire"))
            }
        }
        let now = Instant::now();
        let neg = Negotiated::new(&RequestOptions::default(), &Limits::default(), None);
        let mut t = Transfer::new(Broken, neg);
        let mut buf = vec![0u8; t.max_packet_len()];
        let n = t.poll_transmit(now, &mut buf).unwrap();
        assert_eq!(&buf[..4], b"\x00\x05\x00\x00");
        assert!(n > 5);
        assert!(t.is_done());
        assert!(matches!(
            t.poll_event(),
            Some(TransferEvent::Failed(FailReason::Read { .. }))
        ));
    }
}
