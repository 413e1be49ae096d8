//! Fuzz a sender's TCP catch-up server on one connection: whatever a client sends (a
//! receiver of another release, another stream, or a hostile host) must end in replies it
//! frames or a closed connection. Never a panic, never a hang.
//!
//! The first byte chooses: odd, the rest is the whole connection (the opening included);
//! even, the rest follows this release's opening (the requests are where the parsing is, and
//! a fuzzer seldom finds the three bytes of the opening by itself).
//!
//! Run: `cargo fuzz run cast_catchup_server` (from `fuzz/`). The tests of
//! `corral_cast::fuzzing` run the same code in CI.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&choice, rest)) = data.split_first() else {
        return;
    };
    let input = if choice % 2 == 1 {
        rest.to_vec()
    } else {
        [&corral_cast::fuzzing::OPENING[..], rest].concat()
    };
    let answered = corral_cast::fuzzing::catchup_server(&input);
    // Every answer is framed: status, u32 length, that many bytes.
    let mut rest = answered.as_slice();
    while !rest.is_empty() {
        assert!(rest.len() >= 5, "a reply cut short: {rest:?}");
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        assert!(rest.len() >= 5 + len, "a reply cut short");
        rest = &rest[5 + len..];
    }
});
