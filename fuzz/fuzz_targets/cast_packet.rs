//! Fuzz the cast packet decoder: arbitrary datagrams must decode to a typed error or to a
//! packet that re-encodes to exactly the same bytes. Never a panic, never a huge allocation.
//!
//! Run: `cargo fuzz run cast_packet` (from `fuzz/`). The crate's proptests
//! `decode_never_panics*` run the same checks in CI.

#![no_main]

use corral_cast_proto::packet::Packet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Packet::decode(data) {
        let _ = p.body.kind();
        let mut out = Vec::new();
        p.encode(&mut out);
        assert_eq!(out, data, "decode/encode is not canonical");
        assert_eq!(p.encoded_len(), data.len());
    }
});
