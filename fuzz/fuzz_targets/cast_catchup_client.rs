//! Fuzz a receiver's TCP catch-up client: whatever a sender (or anyone who answers on its
//! port) sends back to the manifest and block requests must end in a typed error or in the
//! replies it framed, in order. Never a panic, never a hang, never more memory than the bytes
//! that came.
//!
//! Run: `cargo fuzz run cast_catchup_client` (from `fuzz/`). The tests of
//! `corral_cast::fuzzing` run the same code in CI.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let got = corral_cast::fuzzing::catchup_client(data);
    assert!(got.blocks.len() <= 16);
    if got.manifest.is_none() {
        assert!(got.blocks.is_empty(), "blocks without a manifest");
    }
});
