//! End-to-end tests of the cast driver: real sockets, real files.
//!
//! - `loopback`: sender and receivers in this process on 127.0.0.1 multicast; no root needed.
//! - `lab`: sender and receivers as child processes in network namespaces (corral-testkit), with
//!   loss, rate limits, killed receivers, rogue hosts, blocked multicast, loop devices. Needs
//!   root; prints a loud SKIPPED line otherwise.
//!
//! One integration-test binary; `helper` lets the binary re-run itself as a sender/receiver in a
//! namespace.

mod helper;
mod lab;
mod loopback;

use std::path::Path;

/// Writes `len` pseudo-random bytes (seeded), with every `zero_every`-th MiB zero if non-zero.
pub(crate) fn make_image(path: &Path, len: usize, seed: u64, zero_every: usize) {
    let mut x = seed | 1;
    let mut data = vec![0u8; len];
    for (i, chunk) in data.chunks_mut(8).enumerate() {
        if zero_every != 0 && (i * 8 / (1 << 20)) % zero_every == 0 {
            continue;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    std::fs::write(path, data).expect("write test image");
}

/// BLAKE3 of a file, hex.
pub(crate) fn hash_file(path: &Path) -> String {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    blake3::hash(&data).to_hex().to_string()
}

/// Logs to stderr for debugging (`RUST_LOG=corral_cast=debug`); harmless when called twice.
pub(crate) fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
