//! Fuzz the sync delta decoder (`corral_sync::delta::apply`) with instructions and literals
//! that a hostile master could send, and check the encoder's round trip: any old/new pair
//! rebuilds exactly.
#![no_main]

use corral_sync::delta::{self, DeltaOp};
use libfuzzer_sys::fuzz_target;

fn u32_at(d: &[u8], i: usize) -> u32 {
    let mut b = [0u8; 4];
    for (k, x) in b.iter_mut().enumerate() {
        *x = d.get(i + k).copied().unwrap_or(0);
    }
    u32::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    // Hostile delta: block size, wanted length, up to 32 instructions, literals, old copy.
    let block = u32::from(u16::from_le_bytes([data[0], data[1]]));
    let len = usize::from(u16::from_le_bytes([data[2], data[3]]));
    let n_ops = usize::from(data[4] % 33);
    let mut ops = Vec::with_capacity(n_ops);
    let mut at = 5;
    for _ in 0..n_ops {
        let tag = data.get(at).copied().unwrap_or(0);
        let a = u32_at(data, at + 1);
        let b = u32_at(data, at + 5);
        ops.push(if tag & 1 == 0 {
            DeltaOp::Copy { index: a, count: b }
        } else {
            DeltaOp::Literal(a % 4096)
        });
        at += 9;
    }
    let rest = data.get(at..).unwrap_or(&[]);
    let (literals, old) = rest.split_at(rest.len() / 2);
    if let Ok(out) = delta::apply(old, block, &ops, literals, len) {
        assert_eq!(
            out.len(),
            len,
            "apply must produce exactly the announced length"
        );
    }

    // Round trip: the first half is the old copy, the second the new content.
    let (old, new) = data.split_at(data.len() / 2);
    let sig = delta::signature(old);
    let d = delta::delta(&sig, new);
    let rebuilt = delta::apply(old, sig.block, &d.ops, &d.literals, new.len())
        .expect("a delta made against this old copy applies");
    assert_eq!(rebuilt, new);
});
