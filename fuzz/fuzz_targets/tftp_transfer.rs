//! Fuzz the read-transfer state machine with operation sequences.
//!
//! The first bytes choose the options (blksize, windowsize, tsize) and file size; the rest is a
//! sequence of operations: deliver an ACK of some block, deliver arbitrary bytes, advance the
//! clock and fire the timer, or drain the transmit queue. The machine must never panic, every
//! DATA it sends must carry exactly the file's bytes for its block number, it must never send
//! more than one window past the highest acknowledged block, and once done it stays done.
//!
//! Run: `cargo fuzz run tftp_transfer` (from `fuzz/`). The proptests in corral-tftp-proto's
//! simulated network run the same machine under random loss, reordering and duplication in CI.

#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use corral_tftp_proto::{Limits, MemorySource, Negotiated, Packet, RequestOptions, Transfer};
use libfuzzer_sys::fuzz_target;

fn epoch() -> Instant {
    static T: OnceLock<Instant> = OnceLock::new();
    *T.get_or_init(Instant::now)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let blksize = 8 + u16::from_be_bytes([data[0], data[1]]) % 2000;
    let windowsize = 1 + u16::from(data[2] % 32);
    let len = usize::from(u16::from_be_bytes([data[3], data[4]])) * 3 + usize::from(data[5] % 7);
    let file: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
    let opts = RequestOptions {
        blksize: Some(blksize),
        windowsize: Some(windowsize),
        tsize: if data[2] & 0x80 != 0 { Some(0) } else { None },
        ..Default::default()
    };
    let limits = Limits {
        max_blksize: 65464,
        max_windowsize: 64,
        ..Limits::default()
    };
    let neg = Negotiated::new(&opts, &limits, Some(len as u64));
    let bs = usize::from(neg.blksize);
    let ws = u64::from(neg.windowsize);
    let mut t = Transfer::new(MemorySource(file.clone()), neg);
    let mut buf = vec![0u8; t.max_packet_len()];
    let mut now = epoch();
    let mut done = false;
    let mut ops = &data[6..];
    while !ops.is_empty() {
        let op = ops[0];
        ops = &ops[1..];
        match op % 4 {
            0 => {
                let step = u64::from(op >> 2);
                let wire = (t.acknowledged() + step) as u16;
                t.handle_input(now, &Packet::Ack { block: wire }.to_vec());
            }
            1 => {
                let n = usize::from(op >> 2).min(ops.len());
                t.handle_input(now, &ops[..n]);
                ops = &ops[n..];
            }
            2 => {
                now += Duration::from_millis(u64::from(op) * 20);
                t.handle_timeout(now);
            }
            _ => {}
        }
        let acked = t.acknowledged();
        while let Some(n) = t.poll_transmit(now, &mut buf) {
            let p = Packet::decode(&buf[..n]).expect("the server sends well-formed packets");
            if let Packet::Data { block, data } = p {
                assert!(!done, "DATA after the end");
                // The block must lie inside the window after the last acknowledged one.
                let ahead = u64::from(block.wrapping_sub(acked as u16));
                assert!(
                    (1..=ws).contains(&ahead),
                    "block {block} outside the window"
                );
                let idx = acked + ahead;
                let start = ((idx - 1) as usize).saturating_mul(bs).min(file.len());
                let end = (start + bs).min(file.len());
                assert_eq!(data, &file[start..end], "wrong bytes for block {idx}");
            }
        }
        assert!(t.acknowledged() <= t.highest_sent());
        while t.poll_event().is_some() {}
        if t.is_done() {
            done = true;
        } else {
            assert!(!done, "a finished transfer came back to life");
        }
    }
});
