//! Fuzz the manifest decoders: arbitrary bytes as a signed manifest and as a bare manifest.
//! They must fail with a typed error or decode to something that re-encodes identically and
//! whose block hashes make up its image hash.
//!
//! Run: `cargo fuzz run cast_manifest` (from `fuzz/`). The crate's proptest
//! `manifest_decode_never_panics` runs the same check in CI.

#![no_main]

use corral_cast_proto::{Manifest, SignedManifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::decode(data) {
        assert_eq!(m.encode(), data, "manifest encoding is not canonical");
        let _ = m.data_bytes();
        // Decoding checked that the block hashes merge into the image hash.
        assert_eq!(m.merged_image_hash(), m.image_hash);
        for i in 0..m.block_count().min(4) {
            let _ = (m.block_offset(i), m.block_len(i));
            // Any bytes at any block's place: a hash, never a panic.
            let _ = m.hash_block(i, &data[..data.len().min(m.block_len(i) as usize)]);
        }
    }
    if let Ok(s) = SignedManifest::decode(data) {
        assert_eq!(s.as_bytes(), data);
        let _ = s.verify(&[0u8; 32]);
        let _ = s.hash();
    }
});
