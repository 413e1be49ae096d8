//! Throughput of the protocol machinery alone (no sockets): block encoding, the sender's
//! packet generation and the receiver's ingest + rebuild + verify, for a 64 MiB image of
//! 1 MiB blocks and 1440-byte symbols.
//!
//! Run: `cargo run --release -p corral-cast-proto --example throughput`. The target for the
//! whole system is udpcast's 800 Mbit/s+; these figures are the protocol's ceiling on one core.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use corral_cast_proto::sim::MemoryImage;
use corral_cast_proto::{
    BlockSource, Compression, Receiver, ReceiverConfig, ReceiverEvent, Sender, SenderConfig,
    SessionId, SignedManifest, encode_block,
};

#[allow(clippy::disallowed_methods)] // a benchmark measures real time
fn now() -> Instant {
    Instant::now()
}

fn main() {
    let size = 64usize << 20;
    let mut x = 12345u64;
    // Half incompressible, half text-like, like a real disk image.
    let data: Vec<u8> = (0..size)
        .map(|i| {
            if (i >> 20) % 2 == 0 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            } else {
                b"corral cast image "[i % 18]
            }
        })
        .collect();
    let mbit = |bytes: usize, d: Duration| bytes as f64 * 8.0 / d.as_secs_f64() / 1e6;

    let t = now();
    for (i, c) in data.chunks(1 << 20).enumerate() {
        let _ = encode_block(i as u32, c, Compression::Zstd { level: 3 }, 1440).unwrap();
    }
    println!(
        "encode_block (zstd 3): {:.0} Mbit/s",
        mbit(size, t.elapsed())
    );

    let key = [9u8; 32];
    let (manifest, mut image) = MemoryImage::build(
        data.clone(),
        SessionId(1),
        1 << 20,
        1440,
        Compression::Zstd { level: 3 },
        &key,
    )
    .unwrap();
    for i in 0..manifest.manifest().block_count() {
        image.encoded_block(i).unwrap(); // pre-encode: measure the sender alone
    }
    let epoch = now();
    let mut sender = Sender::new(
        SenderConfig {
            rate_bps: u64::MAX / 16,
            burst_bytes: u32::MAX,
            min_receivers: 1,
            ..SenderConfig::default()
        },
        manifest.clone(),
        epoch,
    )
    .unwrap();
    let mut rx = Receiver::new(
        ReceiverConfig {
            trusted_key: Some(SignedManifest::public_key_for(&key)),
            ..ReceiverConfig::default()
        },
        epoch,
    );
    let saddr = SocketAddr::from(([10, 0, 0, 1], 1));
    let raddr = SocketAddr::from(([10, 0, 0, 2], 1));
    // Handshake until the pass starts.
    let mut buf = Vec::with_capacity(2048);
    let mut packets: Vec<Vec<u8>> = Vec::new();
    let mut vt = epoch;
    for _ in 0..50 {
        vt += Duration::from_millis(10);
        sender.handle_timeout(vt);
        while let Some(tx) = sender.poll_transmit(vt, &mut image, &mut buf) {
            if buf[5] == 0x03 {
                packets.push(buf[..tx.size].to_vec());
                break; // the pass has started: measure the rest below
            } else {
                rx.handle_input(vt, saddr, &buf[..tx.size]);
            }
        }
        rx.handle_timeout(vt);
        while let Some(tx) = rx.poll_transmit(vt, &mut buf) {
            sender.handle_input(vt, raddr, &buf[..tx.size]);
        }
        if !packets.is_empty() {
            break;
        }
    }
    let t = now();
    let mut sent_bytes = 0usize;
    while let Some(tx) = sender.poll_transmit(vt, &mut image, &mut buf) {
        sent_bytes += tx.size;
        if buf[5] == 0x03 {
            packets.push(buf[..tx.size].to_vec());
        }
        if sender.pass_position() == manifest.manifest().block_count() {
            break;
        }
    }
    let st = t.elapsed();
    println!(
        "sender poll_transmit: {} packets, {:.0} Mbit/s",
        packets.len(),
        mbit(sent_bytes, st)
    );

    // Receiver: drop 1% of packets (every 100th) so every block needs an RS rebuild... except
    // that without repair it cannot finish, so feed all and measure ingest + rebuild + verify.
    let t = now();
    let mut bytes_in = 0usize;
    let mut ready = 0usize;
    for p in &packets {
        bytes_in += p.len();
        rx.handle_input(vt, saddr, p);
        while let Some(ev) = rx.poll_event() {
            if let ReceiverEvent::BlockReady { len, .. } = ev {
                ready += len as usize;
            }
        }
    }
    let rt = t.elapsed();
    println!(
        "receiver handle_input (+decompress, BLAKE3 verify): {:.0} Mbit/s of packets, {} MiB ready",
        mbit(bytes_in, rt),
        ready >> 20
    );
}
