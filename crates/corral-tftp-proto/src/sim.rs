//! Simulated network for the transfer state machine: a virtual clock, loss, reordering
//! (per-packet jitter) and duplication, all from one seed, and an RFC 7440 client model that
//! checks every byte it receives. Nothing sleeps.

#![allow(clippy::disallowed_methods)] // one real `Instant` anchors the virtual clock

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng};

use crate::options::{Limits, Negotiated, RequestOptions};
use crate::packet::Packet;
use crate::transfer::{FailReason, MemorySource, Transfer, TransferEvent};

/// Network behaviour of one simulated link (both directions).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Link {
    pub loss: f64,
    pub duplicate: f64,
    pub delay: Duration,
    pub jitter: Duration,
}

impl Default for Link {
    fn default() -> Self {
        Link {
            loss: 0.0,
            duplicate: 0.0,
            delay: Duration::from_micros(200),
            jitter: Duration::ZERO,
        }
    }
}

/// A TFTP client per RFC 1350/7440: ACKs each full window, ACKs the last in-order block when a
/// block arrives out of order, re-ACKs on its own timeout, dallies after the last block.
struct Client {
    blksize: usize,
    windowsize: u64,
    expected: u64,
    in_window: u64,
    data: Vec<u8>,
    done: bool,
    got_oack: bool,
    wants_oack: bool,
    last_heard: Duration,
    timeout: Duration,
    last_ack: Option<u16>,
}

#[derive(Debug)]
pub(crate) struct SimResult {
    pub event: Option<TransferEvent>,
    pub client_data: Vec<u8>,
    pub client_done: bool,
    pub server_packets: u64,
    pub elapsed: Duration,
}

#[derive(Debug, Clone, Copy)]
enum Dir {
    ToClient,
    ToServer,
}

/// Runs one transfer of `file` with `opts` over `link`.
pub(crate) fn run(
    file: &[u8],
    opts: &RequestOptions,
    limits: &Limits,
    link: Link,
    seed: u64,
) -> SimResult {
    let mut rng = StdRng::seed_from_u64(seed);
    let t0 = Instant::now();
    let neg = Negotiated::new(opts, limits, Some(file.len() as u64));
    let mut client = Client {
        blksize: usize::from(neg.blksize),
        windowsize: u64::from(neg.windowsize),
        expected: 1,
        in_window: 0,
        data: Vec::new(),
        done: false,
        got_oack: false,
        wants_oack: !neg.oack.is_empty(),
        last_heard: Duration::ZERO,
        timeout: Duration::from_millis(2500),
        last_ack: None,
    };
    let mut server = Transfer::new(MemorySource(file.to_vec()), neg);
    let mut buf = vec![0u8; server.max_packet_len()];
    // (deliver at, seq) -> packet
    let mut heap: BinaryHeap<Reverse<(Duration, u64)>> = BinaryHeap::new();
    let mut packets: std::collections::HashMap<u64, (Dir, Vec<u8>)> = Default::default();
    let mut seq = 0u64;
    let mut now = Duration::ZERO;
    let mut server_packets = 0u64;
    let mut event = None;
    let mut send = |heap: &mut BinaryHeap<Reverse<(Duration, u64)>>,
                    packets: &mut std::collections::HashMap<u64, (Dir, Vec<u8>)>,
                    rng: &mut StdRng,
                    now: Duration,
                    dir: Dir,
                    bytes: Vec<u8>| {
        if rng.random::<f64>() < link.loss {
            return;
        }
        let copies = if rng.random::<f64>() < link.duplicate {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let jitter = if link.jitter.is_zero() {
                Duration::ZERO
            } else {
                Duration::from_nanos(rng.random_range(0..link.jitter.as_nanos() as u64))
            };
            seq += 1;
            heap.push(Reverse((now + link.delay + jitter, seq)));
            packets.insert(seq, (dir, bytes.clone()));
        }
    };
    let limit = Duration::from_secs(3600);
    loop {
        // Drain the server.
        while let Some(n) = server.poll_transmit(t0 + now, &mut buf) {
            server_packets += 1;
            send(
                &mut heap,
                &mut packets,
                &mut rng,
                now,
                Dir::ToClient,
                buf[..n].to_vec(),
            );
        }
        while let Some(e) = server.poll_event() {
            event = Some(e);
        }
        if server.is_done() && heap.is_empty() {
            break;
        }
        // Next thing to happen.
        let next_packet = heap.peek().map(|Reverse((t, _))| *t);
        let next_server = server.poll_timeout().map(|t| t - t0);
        let next_client = if client.done && server.is_done() {
            None
        } else {
            Some(client.last_heard + client.timeout)
        };
        let Some(next) = [next_packet, next_server, next_client]
            .into_iter()
            .flatten()
            .min()
        else {
            break;
        };
        now = next.max(now);
        if now > limit {
            break;
        }
        if next_packet == Some(next) {
            let Reverse((_, id)) = heap.pop().unwrap(); // peeked above
            let (dir, bytes) = packets.remove(&id).unwrap(); // inserted with its heap entry
            match dir {
                Dir::ToServer => server.handle_input(t0 + now, &bytes),
                Dir::ToClient => {
                    if let Some(ack) = client.on_packet(now, &bytes) {
                        send(&mut heap, &mut packets, &mut rng, now, Dir::ToServer, ack);
                    }
                }
            }
        } else if next_server == Some(next) {
            server.handle_timeout(t0 + now);
        } else {
            // Client timeout: re-send the last ACK (RFC 1350 §6 retransmission by the reader).
            client.last_heard = now;
            let block = client
                .last_ack
                .unwrap_or(if client.got_oack || !client.wants_oack {
                    0
                } else {
                    u16::MAX
                });
            if client.last_ack.is_some() || client.got_oack {
                send(
                    &mut heap,
                    &mut packets,
                    &mut rng,
                    now,
                    Dir::ToServer,
                    Packet::Ack { block }.to_vec(),
                );
            }
            if client.done {
                // The dally period is over.
                client.timeout = Duration::from_secs(3600 * 24);
            }
        }
    }
    SimResult {
        event,
        client_data: client.data,
        client_done: client.done,
        server_packets,
        elapsed: now,
    }
}

impl Client {
    fn on_packet(&mut self, now: Duration, bytes: &[u8]) -> Option<Vec<u8>> {
        // The reader's timer restarts only on progress: a stream of stale retransmissions
        // must not keep it from re-sending its last ACK.
        let before = (self.expected, self.got_oack);
        let out = self.on_packet_inner(bytes);
        if (self.expected, self.got_oack) != before {
            self.last_heard = now;
        }
        out
    }

    fn on_packet_inner(&mut self, bytes: &[u8]) -> Option<Vec<u8>> {
        let p = Packet::decode(bytes).expect("the server only sends well-formed packets");
        match p {
            Packet::Oack { options } => {
                assert!(self.wants_oack, "OACK without options: {options:?}");
                if self.expected > 1 {
                    return None; // a late duplicate
                }
                self.got_oack = true;
                self.last_ack = Some(0);
                Some(Packet::Ack { block: 0 }.to_vec())
            }
            Packet::Data { block, data } => {
                if self.wants_oack && !self.got_oack {
                    panic!("DATA before the OACK was acknowledged");
                }
                if self.done {
                    // Dally: re-ACK the last block so a lost final ACK does not hang the server.
                    return self.last_ack.map(|b| Packet::Ack { block: b }.to_vec());
                }
                if block == self.expected as u16 {
                    assert!(data.len() <= self.blksize, "block larger than blksize");
                    self.data.extend_from_slice(data);
                    self.expected += 1;
                    self.in_window += 1;
                    if data.len() < self.blksize {
                        self.done = true;
                        self.last_ack = Some(block);
                        return Some(Packet::Ack { block }.to_vec());
                    }
                    if self.in_window >= self.windowsize {
                        self.in_window = 0;
                        self.last_ack = Some(block);
                        return Some(Packet::Ack { block }.to_vec());
                    }
                    None
                } else if block.wrapping_sub(self.expected as u16) >= 0x8000 {
                    // A block already received (a duplicate, or a retransmission after our
                    // ACK was lost): repeat the last ACK sent. If the server has it, it is a
                    // duplicate there and ignored; if it was lost, this one moves the server on.
                    // (ACKing the old block itself would read as a gap report mid-window.)
                    self.last_ack.map(|b| Packet::Ack { block: b }.to_vec())
                } else {
                    // A block from the future: one went missing. ACK the last in-order block
                    // (RFC 7440 §4) so the sender restarts after it.
                    self.in_window = 0;
                    let b = (self.expected - 1) as u16;
                    self.last_ack = Some(b);
                    Some(Packet::Ack { block: b }.to_vec())
                }
            }
            Packet::Error { code, message } => panic!("server error {code:?}: {message}"),
            other => panic!("unexpected packet to the client: {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn file(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.random()).collect()
    }

    fn opts(blksize: Option<u16>, windowsize: Option<u16>) -> RequestOptions {
        RequestOptions {
            blksize,
            windowsize,
            tsize: Some(0),
            ..Default::default()
        }
    }

    fn check(r: &SimResult, f: &[u8]) {
        assert!(r.client_done, "client did not finish: {r:?}");
        assert_eq!(r.client_data.len(), f.len());
        assert!(r.client_data == f, "received bytes differ");
        match &r.event {
            Some(TransferEvent::Finished { bytes, .. }) => assert_eq!(*bytes, f.len() as u64),
            other => panic!("server did not finish: {other:?}"),
        }
    }

    // RFC 1350 §6: lock-step transfer, last block shorter than 512.
    #[test]
    fn rfc1350_s6_lockstep_clean() {
        let f = file(5000, 1);
        let r = run(
            &f,
            &RequestOptions::default(),
            &Limits::default(),
            Link::default(),
            1,
        );
        check(&r, &f);
        assert_eq!(r.server_packets, 10);
    }

    // RFC 1350 §6: a size that is a multiple of the block size ends with an empty block.
    #[test]
    fn rfc1350_s6_exact_multiple_ends_with_empty_block() {
        for len in [0usize, 512, 1024] {
            let f = file(len, 2);
            let r = run(
                &f,
                &RequestOptions::default(),
                &Limits::default(),
                Link::default(),
                2,
            );
            check(&r, &f);
            assert_eq!(r.server_packets, (len / 512 + 1) as u64);
        }
    }

    // RFC 7440 §4: windowed transfer; one ACK per window.
    #[test]
    fn rfc7440_s4_window_clean() {
        let f = file(1432 * 16 * 5 + 7, 3);
        let r = run(
            &f,
            &opts(Some(1432), Some(16)),
            &Limits::default(),
            Link::default(),
            3,
        );
        check(&r, &f);
        // OACK + 81 DATA, nothing retransmitted.
        assert_eq!(r.server_packets, 82);
    }

    // Block numbers wrap from 65535 to 0 (files over 32 MiB at blksize 512).
    #[test]
    fn rollover_past_65535_blocks() {
        let f = file(512 * 65536 + 100, 4);
        let r = run(
            &f,
            &opts(Some(512), Some(64)),
            &Limits::default(),
            Link::default(),
            4,
        );
        check(&r, &f);
        let r = run(
            &f,
            &opts(Some(512), None),
            &Limits::default(),
            Link {
                loss: 0.01,
                ..Link::default()
            },
            5,
        );
        check(&r, &f);
    }

    // RFC 1123 §4.2.3.1: duplicate ACKs must not double the data stream (Sorcerer's
    // Apprentice). With every packet duplicated and no loss, no block is sent twice.
    #[test]
    fn rfc1123_sorcerers_apprentice_duplicates_do_not_double() {
        let f = file(512 * 200 + 1, 6);
        for ws in [None, Some(8)] {
            let r = run(
                &f,
                &opts(None, ws),
                &Limits::default(),
                Link {
                    duplicate: 1.0,
                    ..Link::default()
                },
                6,
            );
            check(&r, &f);
            let Some(TransferEvent::Finished { retransmitted, .. }) = r.event else {
                panic!()
            };
            assert_eq!(retransmitted, 0, "windowsize {ws:?}");
        }
    }

    // RFC 1350 §2 / 7440 §4: retries on timeout, then give up.
    #[test]
    fn gives_up_after_retries() {
        let f = file(5000, 7);
        let r = run(
            &f,
            &RequestOptions::default(),
            &Limits::default(),
            Link {
                loss: 1.0,
                ..Link::default()
            },
            7,
        );
        assert_eq!(
            r.event,
            Some(TransferEvent::Failed(FailReason::Timeout {
                block: 1,
                retries: 5
            }))
        );
        // 1 send + 5 retransmissions + the final "timed out" error.
        assert_eq!(r.server_packets, 7);
        assert_eq!(r.elapsed, Duration::from_secs(6));
    }

    #[test]
    fn lossy_reordered_duplicated_windows() {
        let f = file(300_000, 8);
        let limits = Limits {
            retries: 50,
            ..Limits::default()
        };
        for seed in 0..20 {
            let link = Link {
                loss: 0.05,
                duplicate: 0.05,
                delay: Duration::from_micros(300),
                jitter: Duration::from_micros(500),
            };
            let r = run(&f, &opts(Some(1000), Some(16)), &limits, link, seed);
            check(&r, &f);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn any_link_any_options_delivers_every_byte(
            len in 0usize..40_000,
            blksize in prop::option::of(8u16..3000),
            windowsize in prop::option::of(1u16..40),
            loss in 0.0f64..0.2,
            duplicate in 0.0f64..0.2,
            jitter_us in 0u64..2000,
            seed in any::<u64>(),
        ) {
            let f = file(len, seed);
            let limits = Limits { retries: 100, max_windowsize: 64, ..Limits::default() };
            let link = Link { loss, duplicate, delay: Duration::from_micros(100),
                              jitter: Duration::from_micros(jitter_us) };
            let r = run(&f, &opts(blksize, windowsize), &limits, link, seed);
            check(&r, &f);
        }

        // The fuzz target `tftp_transfer` in CI form: random op sequences (ACKs ahead of the
        // acknowledged block, garbage, timer firings); DATA stays inside the window and carries
        // the file's bytes; a finished transfer stays finished.
        #[test]
        fn op_sequences_keep_invariants(
            blksize in 8u16..600,
            windowsize in 1u16..20,
            len in 0usize..5000,
            ops in prop::collection::vec((0u8..3, any::<u16>(), prop::collection::vec(any::<u8>(), 0..8)), 0..200),
        ) {
            let file: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
            let o = opts(Some(blksize), Some(windowsize));
            let neg = Negotiated::new(&o, &Limits::default(), Some(len as u64));
            let bs = usize::from(neg.blksize);
            let ws = u64::from(neg.windowsize);
            let mut t = Transfer::new(MemorySource(file.clone()), neg);
            let mut buf = vec![0u8; t.max_packet_len()];
            let mut now = Instant::now();
            let mut done = false;
            for (kind, arg, bytes) in ops {
                match kind {
                    0 => {
                        let wire = (t.acknowledged() + u64::from(arg % 40)) as u16;
                        t.handle_input(now, &Packet::Ack { block: wire }.to_vec());
                    }
                    1 => t.handle_input(now, &bytes),
                    _ => {
                        now += Duration::from_millis(u64::from(arg % 3000));
                        t.handle_timeout(now);
                    }
                }
                let acked = t.acknowledged();
                while let Some(n) = t.poll_transmit(now, &mut buf) {
                    if let Packet::Data { block, data } = Packet::decode(&buf[..n]).unwrap() {
                        prop_assert!(!done);
                        let ahead = u64::from(block.wrapping_sub(acked as u16));
                        prop_assert!((1..=ws).contains(&ahead));
                        let start = ((acked + ahead - 1) as usize * bs).min(file.len());
                        let end = (start + bs).min(file.len());
                        prop_assert_eq!(data, &file[start..end]);
                    }
                }
                while t.poll_event().is_some() {}
                if t.is_done() { done = true; } else { prop_assert!(!done); }
            }
        }

        // Random bytes into the decoder and into a running transfer: errors, never panics.
        #[test]
        fn random_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = Packet::decode(&data);
            let _ = crate::request::classify(&data);
            let neg = Negotiated::new(&opts(Some(512), Some(4)), &Limits::default(), Some(4000));
            let mut t = Transfer::new(MemorySource(vec![7u8; 4000]), neg);
            let now = Instant::now();
            let mut buf = vec![0u8; t.max_packet_len()];
            while t.poll_transmit(now, &mut buf).is_some() {}
            t.handle_input(now, &data);
            while t.poll_transmit(now, &mut buf).is_some() {}
        }
    }
}
