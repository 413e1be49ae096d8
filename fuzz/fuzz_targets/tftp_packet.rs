//! Fuzz the TFTP packet decoder and the listening-port classifier.
//!
//! Any bytes must decode to a packet or a typed error, never panic; a decoded packet must
//! re-encode to something that decodes to the same packet; a classified request must carry a
//! path without `..` components, leading `/` or control characters.
//!
//! Run: `cargo fuzz run tftp_packet` (from `fuzz/`). The proptest `random_bytes_never_panic`
//! in corral-tftp-proto runs the same checks in CI.

#![no_main]

use corral_tftp_proto::{Incoming, Packet, classify};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Packet::decode(data) {
        let again = p.to_vec();
        let q = Packet::decode(&again).expect("a re-encoded packet decodes");
        if !matches!(p, Packet::Error { .. }) {
            assert_eq!(p, q);
        }
    }
    if let Incoming::Read(r) = classify(data) {
        assert!(!r.path.starts_with('/'));
        assert!(
            !r.path
                .split('/')
                .any(|c| c == ".." || c.is_empty() || c == ".")
        );
        assert!(!r.path.chars().any(|c| c.is_control() || c == '\\'));
    }
});
