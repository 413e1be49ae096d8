//! Fuzz the receiver state machine with arbitrary packet sequences.
//!
//! The input is split into datagrams (a 2-byte length prefix each). The receiver is first given
//! a genuine announce and signed manifest, so the fuzzer reaches the data, NAK and Done paths;
//! then every datagram is fed with a slowly advancing clock, timers fire and transmits are
//! drained. It must never panic, and no `BlockReady` may ever carry bytes other than the real
//! image's (the fuzzer cannot forge a BLAKE3 hash).
//!
//! Run: `cargo fuzz run cast_receiver` (from `fuzz/`). The crate's proptests
//! `arbitrary_datagrams_never_panic` and `header_valid_datagrams_never_panic` run the same
//! checks in CI.

#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use corral_cast_proto::packet::{self, Announce, Body, ManifestChunk, Packet};
use corral_cast_proto::{
    Compression, MANIFEST_CHUNK_LEN, ManifestBuilder, Receiver, ReceiverConfig, ReceiverEvent,
    SessionId, SignedManifest,
};
use libfuzzer_sys::fuzz_target;

const KEY: [u8; 32] = [42; 32];

struct Fixture {
    image: Vec<u8>,
    manifest: SignedManifest,
    epoch: Instant,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let mut image: Vec<u8> = (0..4096u32).map(|i| (i * 7 + i / 13) as u8).collect();
        image[1024..2048].fill(0);
        let mut b = ManifestBuilder::new(SessionId(1), 1024, 64, Compression::Zstd { level: 1 });
        for c in image.chunks(1024) {
            b.push_block(c);
        }
        let manifest = SignedManifest::sign(b.finish().unwrap(), &KEY);
        #[allow(clippy::disallowed_methods)] // the fuzz harness is a driver: one real anchor
        let epoch = Instant::now();
        Fixture {
            image,
            manifest,
            epoch,
        }
    })
}

fn enc(body: Body<'_>) -> Vec<u8> {
    let mut v = Vec::new();
    Packet::new(SessionId(1), body).encode(&mut v);
    v
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let from = SocketAddr::from(([10, 0, 0, 1], 9000));
    let mut now = f.epoch;
    let mut r = Receiver::new(
        ReceiverConfig {
            name: "fuzz".into(),
            trusted_key: Some(SignedManifest::public_key_for(&KEY)),
            ..ReceiverConfig::default()
        },
        now,
    );
    let m = &f.manifest;
    let with_manifest = data.first().is_some_and(|b| b & 1 == 1);
    if with_manifest {
        r.handle_input(
            now,
            from,
            &enc(Body::Announce(Announce {
                flags: packet::ANNOUNCE_STARTED,
                manifest_len: m.as_bytes().len() as u32,
                manifest_hash: m.hash(),
                tcp_port: 0,
                symbol_size: 64,
                block_size: 1024,
                block_count: 4,
                image_size: 4096,
                pass_pos: 0,
                rate_bps: 1,
            })),
        );
        for (i, c) in m.as_bytes().chunks(MANIFEST_CHUNK_LEN).enumerate() {
            r.handle_input(
                now,
                from,
                &enc(Body::ManifestChunk(ManifestChunk {
                    offset: (i * MANIFEST_CHUNK_LEN) as u32,
                    total_len: m.as_bytes().len() as u32,
                    bytes: c,
                })),
            );
        }
    }
    let mut rest = data.get(1..).unwrap_or(&[]);
    let mut buf = Vec::new();
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let (dgram, tail) = rest[2..].split_at(len);
        rest = tail;
        now += Duration::from_millis(3);
        r.handle_input(now, from, dgram);
        r.handle_timeout(now);
        while r.poll_transmit(now, &mut buf).is_some() {}
        if let Some(t) = r.poll_timeout() {
            assert!(t >= f.epoch);
        }
    }
    if rest.len() == 1 {
        let _ = r.accept_encoded_block(u32::from(rest[0] % 5), data);
        let _ = r.accept_manifest_bytes(data);
    }
    let _ = r.missing_blocks();
    while let Some(ev) = r.poll_event() {
        if let ReceiverEvent::BlockReady {
            offset,
            len,
            data: Some(bytes),
            ..
        } = ev
        {
            let want = &f.image[offset as usize..(offset + u64::from(len)) as usize];
            assert_eq!(
                bytes, want,
                "a block that is not the image's reached BlockReady"
            );
        }
    }
});
