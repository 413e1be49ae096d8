//! Delta encoding of a changed small file against the child's old copy, rsync-style.
//!
//! Files up to [`crate::manifest::CHUNK_THRESHOLD`] are one chunk in the manifest, so a
//! 64-byte edit would otherwise send the whole file. For such a file the child sends a
//! [`Signature`] of its old copy (per block: 16 bits of a rolling weak checksum and a 32-bit
//! strong sum keyed with the signature's random seed, 6 bytes on the wire); the master slides
//! a window over the new content, finds the blocks the child already has at any offset, and
//! sends a [`Delta`]: block copies and the literal bytes in between. The child rebuilds the
//! file from its old copy and checks the result against the manifest's BLAKE3 of the whole
//! file, so a weak/strong collision or an old copy that changed in between fails the step
//! instead of writing wrong data.
//!
//! Why 48 bits per block are enough (rsync sends as little as 2 bytes of strong sum for small
//! files): a false match needs a window of the new content to agree with an old block in both
//! sums, about `len × blocks / 2^48` per file (≈ 10⁻⁷ for a 1 MiB file), it is caught by the
//! whole-file check, and the seed is fresh for every signature, so the next run does not meet
//! the same collision again. The 6 bytes against the former 12–13 halve the signatures, which
//! were the largest part of a "1% changed" run on the wire.
//!
//! The strong sum is a universal hash, not a cryptographic one: Thorup's vector
//! multiply-shift ("High speed hashing for integers and strings", 2015, §3.5) over the
//! block's 32-bit little-endian words (the last one zero-padded), `(b + Σ aᵢ·xᵢ mod 2⁶⁴) >> 32`,
//! with the 64-bit keys `aᵢ` and `b` drawn from the seed by BLAKE3's XOF. The family is
//! strongly universal: two different blocks of the same length (the only ones compared) have
//! the same sum with probability exactly 2⁻³² over the key, so content made in advance
//! cannot aim at a collision with a seed it does not know, as with the keyed BLAKE3 it
//! replaces. It costs one multiply per 4 bytes; a keyed BLAKE3 of blocks of 0.3–16 KiB (too
//! short for its SIMD across chunks) ran at ~0.7 GB/s and was most of the child's work for a
//! signature and of the master's for a delta.
//!
//! Pure: bytes in, bytes out. Everything that comes from the other end is checked.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Files smaller than this are sent whole (a signature would cost about as much).
pub const DELTA_MIN: u64 = 2048;
/// Smallest block size.
const BLOCK_MIN: u32 = 256;
/// Largest block size.
pub const BLOCK_MAX: u32 = 16 * 1024;
/// Bytes of strong sum per block.
const STRONG: usize = 4;

/// One block of the old copy: 6 bytes on the wire (fixed-size arrays, no varints).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSig {
    /// rsync's rolling checksum (two 16-bit sums) folded to 16 bits, little-endian.
    pub weak: [u8; 2],
    /// The block's strong sum keyed with the signature's seed (see the module's doc).
    pub strong: [u8; STRONG],
}

/// The child's description of its old copy of a file; `block == 0` means "no usable copy".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// Block size; the last block may be shorter.
    pub block: u32,
    /// Length of the old copy.
    pub len: u64,
    /// Key of the strong sums (random per signature, so that a collision does not repeat).
    pub seed: u64,
    /// One entry per block, in order.
    pub blocks: Vec<BlockSig>,
}

/// One instruction of a delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeltaOp {
    /// Copy `count` consecutive blocks of the old copy, starting at block `index`.
    Copy {
        /// First block.
        index: u32,
        /// Number of blocks.
        count: u32,
    },
    /// Take the next `len` literal bytes.
    Literal(u32),
}

/// How to rebuild a file from the old copy: instructions and their literal bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    /// Instructions in order.
    pub ops: Vec<DeltaOp>,
    /// Literal bytes of all `Literal` instructions, concatenated.
    pub literals: Vec<u8>,
}

/// Why a delta could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// An instruction points outside the old copy or the literals, or the result has the
    /// wrong length.
    #[error("delta does not fit the old copy ({0})")]
    OutOfRange(&'static str),
}

/// The block size for a file of `len` bytes: about `sqrt(6 * len)`, which balances the
/// signature's size (6 bytes per block) against the literal bytes of a changed block.
pub fn block_size(len: u64) -> u32 {
    let b = ((6 * len) as f64).sqrt() as u32;
    b.div_ceil(64)
        .saturating_mul(64)
        .clamp(BLOCK_MIN, BLOCK_MAX)
}

/// The keys of a signature's strong sums (see the module's doc): one multiplier per 32-bit
/// word of a block, and the addend.
struct StrongKey {
    a: Vec<u64>,
    b: u64,
}

impl StrongKey {
    /// The keys for blocks of at most `block` bytes (at most [`BLOCK_MAX`]), drawn from
    /// `seed` by BLAKE3's XOF.
    fn new(seed: u64, block: u32) -> StrongKey {
        let words = (block.min(BLOCK_MAX) as usize).div_ceil(4);
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&seed.to_le_bytes());
        let mut xof = blake3::Hasher::new_keyed(&k)
            .update(b"corral delta strong sum keys")
            .finalize_xof();
        let mut bytes = vec![0u8; 8 * (words + 1)];
        xof.fill(&mut bytes);
        let mut keys = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()));
        let b = keys.next().unwrap_or_default();
        StrongKey {
            a: keys.collect(),
            b,
        }
    }

    /// The strong sum of `block` (at most as long as the block size the keys were made for).
    fn sum(&self, block: &[u8]) -> [u8; STRONG] {
        debug_assert!(block.len() <= 4 * self.a.len());
        let word = |w: &[u8]| u64::from(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
        // Four sums side by side (16 bytes a step), so that the multiplies do not wait for
        // one another; the sum is the same (addition mod 2^64).
        let mut acc = [self.b, 0, 0, 0];
        let quads = block.chunks_exact(16);
        let tail = quads.remainder();
        for (q, k) in quads.zip(self.a.chunks_exact(4)) {
            for j in 0..4 {
                acc[j] = acc[j].wrapping_add(k[j].wrapping_mul(word(&q[4 * j..4 * j + 4])));
            }
        }
        let mut i = (block.len() / 16) * 4;
        let mut words = tail.chunks_exact(4);
        for w in &mut words {
            acc[0] = acc[0].wrapping_add(self.a[i].wrapping_mul(word(w)));
            i += 1;
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 4];
            w[..rest.len()].copy_from_slice(rest);
            acc[0] = acc[0].wrapping_add(self.a[i].wrapping_mul(word(&w)));
        }
        let h = acc[0]
            .wrapping_add(acc[1])
            .wrapping_add(acc[2])
            .wrapping_add(acc[3]);
        ((h >> 32) as u32).to_le_bytes()
    }
}

/// rsync's rolling checksum of a window.
#[derive(Debug, Clone, Copy)]
struct Rolling {
    a: u32,
    b: u32,
    n: u32,
}

impl Rolling {
    fn new(w: &[u8]) -> Rolling {
        let (mut a, mut b) = (0u32, 0u32);
        for &x in w {
            a = a.wrapping_add(u32::from(x));
            b = b.wrapping_add(a);
        }
        Rolling {
            a,
            b,
            n: w.len() as u32,
        }
    }
    fn digest(&self) -> [u8; 2] {
        let d = (self.a & 0xffff) | (self.b << 16);
        ((d ^ (d >> 16)) as u16).to_le_bytes()
    }
    /// Slides the window one byte: `out` leaves, `inn` enters.
    fn roll(&mut self, out: u8, inn: u8) {
        self.a = self
            .a
            .wrapping_sub(u32::from(out))
            .wrapping_add(u32::from(inn));
        self.b = self
            .b
            .wrapping_sub(self.n.wrapping_mul(u32::from(out)))
            .wrapping_add(self.a);
    }
}

/// The signature of `old` with seed 0 (see [`signature_seeded`]; the receiver picks a random
/// seed).
pub fn signature(old: &[u8]) -> Signature {
    signature_seeded(old, 0)
}

/// The signature of `old`, its strong sums keyed with `seed`.
pub fn signature_seeded(old: &[u8], seed: u64) -> Signature {
    let block = block_size(old.len() as u64);
    let k = StrongKey::new(seed, block);
    Signature {
        block,
        len: old.len() as u64,
        seed,
        blocks: old
            .chunks(block as usize)
            .map(|b| BlockSig {
                weak: Rolling::new(b).digest(),
                strong: k.sum(b),
            })
            .collect(),
    }
}

fn push_copy(ops: &mut Vec<DeltaOp>, index: u32) {
    if let Some(DeltaOp::Copy { index: i, count }) = ops.last_mut()
        && i.checked_add(*count) == Some(index)
    {
        *count += 1;
        return;
    }
    ops.push(DeltaOp::Copy { index, count: 1 });
}

fn push_literal(d: &mut Delta, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    for piece in bytes.chunks(u32::MAX as usize) {
        d.ops.push(DeltaOp::Literal(piece.len() as u32));
        d.literals.extend_from_slice(piece);
    }
}

/// The delta that turns the old copy described by `sig` into `new`.
pub fn delta(sig: &Signature, new: &[u8]) -> Delta {
    let mut d = Delta::default();
    let bs = sig.block as usize;
    // (A block size beyond BLOCK_MAX never comes from the child: the decoder refuses it.)
    if bs == 0 || sig.block > BLOCK_MAX || sig.blocks.is_empty() {
        push_literal(&mut d, new);
        return d;
    }
    let full = (sig.len / u64::from(sig.block)) as usize;
    let k = StrongKey::new(sig.seed, sig.block);
    let mut by_weak: HashMap<[u8; 2], Vec<u32>> = HashMap::new();
    for (i, b) in sig.blocks.iter().enumerate().take(full) {
        by_weak.entry(b.weak).or_default().push(i as u32);
    }
    let mut lit = 0;
    let mut i = 0;
    let mut roll = (new.len() >= bs).then(|| Rolling::new(&new[..bs]));
    while let Some(r) = roll.as_mut() {
        let found = by_weak.get(&r.digest()).and_then(|cands| {
            let s = k.sum(&new[i..i + bs]);
            cands
                .iter()
                .copied()
                .find(|&c| sig.blocks[c as usize].strong == s)
        });
        if let Some(idx) = found {
            push_literal(&mut d, &new[lit..i]);
            push_copy(&mut d.ops, idx);
            i += bs;
            lit = i;
            roll = (i + bs <= new.len()).then(|| Rolling::new(&new[i..i + bs]));
        } else if i + bs < new.len() {
            r.roll(new[i], new[i + bs]);
            i += 1;
        } else {
            break;
        }
    }
    // The old copy's short last block can only match the new content's end.
    if full < sig.blocks.len() {
        let tail = (sig.len % u64::from(sig.block)) as usize;
        let last = &sig.blocks[full];
        if new.len() >= lit + tail {
            let t = &new[new.len() - tail..];
            if Rolling::new(t).digest() == last.weak && k.sum(t) == last.strong {
                push_literal(&mut d, &new[lit..new.len() - tail]);
                push_copy(&mut d.ops, full as u32);
                lit = new.len();
            }
        }
    }
    push_literal(&mut d, &new[lit..]);
    d
}

/// Bytes this delta puts on the wire before compression (an estimate for choosing it).
pub fn wire_size(d: &Delta) -> usize {
    d.ops.len() * 6 + d.literals.len()
}

/// Rebuilds the new content from `old`, `block` (the block size of the signature the delta
/// was made against) and the delta; the result must be exactly `len` bytes.
pub fn apply(
    old: &[u8],
    block: u32,
    ops: &[DeltaOp],
    literals: &[u8],
    len: usize,
) -> Result<Vec<u8>, DeltaError> {
    let mut out = Vec::with_capacity(len);
    let mut lit = 0usize;
    let bs = block as usize;
    for op in ops {
        match *op {
            DeltaOp::Copy { index, count } => {
                if bs == 0 {
                    return Err(DeltaError::OutOfRange("copy without a block size"));
                }
                let start = (index as usize)
                    .checked_mul(bs)
                    .filter(|s| *s < old.len())
                    .ok_or(DeltaError::OutOfRange("copy start"))?;
                let end = (index as usize)
                    .checked_add(count as usize)
                    .and_then(|e| e.checked_mul(bs))
                    .map_or(old.len(), |e| e.min(old.len()));
                if count == 0 || out.len() + (end - start) > len {
                    return Err(DeltaError::OutOfRange("copy length"));
                }
                out.extend_from_slice(&old[start..end]);
            }
            DeltaOp::Literal(n) => {
                let n = n as usize;
                let end = lit
                    .checked_add(n)
                    .filter(|e| *e <= literals.len())
                    .ok_or(DeltaError::OutOfRange("literal"))?;
                if out.len() + n > len {
                    return Err(DeltaError::OutOfRange("literal length"));
                }
                out.extend_from_slice(&literals[lit..end]);
                lit = end;
            }
        }
    }
    if out.len() != len || lit != literals.len() {
        return Err(DeltaError::OutOfRange("result length"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn round(old: &[u8], new: &[u8]) -> Delta {
        let s = signature(old);
        let d = delta(&s, new);
        let got = apply(old, s.block, &d.ops, &d.literals, new.len()).unwrap();
        assert_eq!(got, new);
        d
    }

    #[test]
    fn a_64_byte_edit_costs_about_two_blocks() {
        for size in [4096usize, 16 * 1024, 200 * 1024, 1 << 20] {
            let old = bytes(size, 7);
            let mut new = old.clone();
            let off = size / 3;
            new[off..off + 64].copy_from_slice(&bytes(64, 9));
            let d = round(&old, &new);
            let bs = block_size(size as u64) as usize;
            assert!(
                d.literals.len() <= 2 * bs,
                "{size}: {} literal bytes",
                d.literals.len()
            );
            let sig = signature(&old);
            let sig_bytes = postcard::to_allocvec(&sig).unwrap().len();
            assert!(
                sig_bytes <= sig.blocks.len() * 6 + 16,
                "{size}: a signature costs 6 bytes per block on the wire, got {sig_bytes} for {}",
                sig.blocks.len()
            );
            assert!(
                sig_bytes + wire_size(&d) < 16 * 1024,
                "{size}: signature {sig_bytes} + delta {}",
                wire_size(&d)
            );
        }
    }

    #[test]
    fn the_seed_keys_the_strong_sums_and_deltas_follow_it() {
        let old = bytes(40_000, 11);
        let mut new = old.clone();
        new[20_000..20_010].copy_from_slice(b"0123456789");
        let a = signature_seeded(&old, 1);
        let b = signature_seeded(&old, 2);
        assert_eq!(a.blocks.len(), b.blocks.len());
        assert!(
            a.blocks
                .iter()
                .zip(&b.blocks)
                .all(|(x, y)| x.weak == y.weak),
            "the weak sums do not depend on the seed"
        );
        assert!(
            a.blocks
                .iter()
                .zip(&b.blocks)
                .any(|(x, y)| x.strong != y.strong),
            "the strong sums do"
        );
        for s in [a, b] {
            let d = delta(&s, &new);
            assert!(
                d.literals.len() <= 2 * s.block as usize,
                "{}",
                d.literals.len()
            );
            assert_eq!(
                apply(&old, s.block, &d.ops, &d.literals, new.len()).unwrap(),
                new
            );
        }
        // A signature whose seed was altered in transit matches nothing: all literal.
        let mut s = signature_seeded(&old, 3);
        s.seed = 4;
        assert_eq!(delta(&s, &new).literals.len(), new.len());
    }

    /// The strong sum is part of the protocol: pinned for a seed and inputs of every length
    /// class (whole 16-byte steps, whole words, a partial last word, empty), and it is the
    /// multiply-shift of the module's doc, computed here the plain way.
    #[test]
    fn strong_sums_are_the_documented_multiply_shift() {
        let k = StrongKey::new(42, 64);
        assert_eq!(k.a.len(), 16);
        let plain = |b: &[u8]| {
            let mut h = k.b;
            for (i, w) in b.chunks(4).enumerate() {
                let mut x = [0u8; 4];
                x[..w.len()].copy_from_slice(w);
                h = h.wrapping_add(k.a[i].wrapping_mul(u64::from(u32::from_le_bytes(x))));
            }
            ((h >> 32) as u32).to_le_bytes()
        };
        let data = bytes(64, 5);
        for len in 0..=64 {
            assert_eq!(k.sum(&data[..len]), plain(&data[..len]), "length {len}");
        }
        let pinned: Vec<[u8; 4]> = [0, 3, 4, 16, 21, 64]
            .iter()
            .map(|&n| k.sum(&data[..n]))
            .collect();
        assert_eq!(
            pinned,
            vec![
                [191, 238, 132, 40],
                [30, 26, 95, 53],
                [60, 165, 143, 109],
                [173, 234, 220, 79],
                [144, 16, 20, 229],
                [209, 31, 242, 164]
            ],
            "pinned strong sums (protocol {})",
            crate::proto::VERSION
        );
    }

    /// Different blocks of one length (the only ones compared), or one block under different
    /// seeds, get different sums as often as 32 random bits would: no one-bit change
    /// anywhere, also in the zero-padded last word, keeps a block's sum.
    #[test]
    fn strong_sums_separate_blocks_like_random_bits() {
        let mut same = 0;
        let mut tried = 0;
        for seed in 0..200u64 {
            let k = StrongKey::new(seed, 1024);
            let base = bytes(1021, seed + 1);
            let s0 = k.sum(&base);
            for bit in (0..base.len() * 8).step_by(97) {
                let mut b = base.clone();
                b[bit / 8] ^= 1 << (bit % 8);
                tried += 1;
                same += usize::from(k.sum(&b) == s0);
            }
            assert_ne!(
                StrongKey::new(seed + 1000, 1024).sum(&base),
                s0,
                "seed {seed}: another seed, another sum"
            );
        }
        assert!(tried > 10_000);
        assert_eq!(same, 0, "{same} of {tried} one-bit changes kept the sum");
    }

    #[test]
    fn insertions_and_deletions_shift_matches() {
        let old = bytes(50_000, 3);
        let mut new = old[..10_000].to_vec();
        new.extend_from_slice(b"inserted bytes that shift everything after them");
        new.extend_from_slice(&old[10_000..30_000]);
        new.extend_from_slice(&old[31_000..]);
        let d = round(&old, &new);
        assert!(d.literals.len() < 2_000, "{}", d.literals.len());
        // Unrelated content: all literal.
        let other = bytes(5_000, 99);
        let d = round(&old, &other);
        assert_eq!(d.literals.len(), other.len());
        // Empty old or new.
        round(&[], &other);
        round(&old, &[]);
    }

    #[test]
    fn hostile_deltas_are_refused_not_panicking() {
        let old = bytes(5_000, 1);
        let bad = [
            vec![DeltaOp::Copy {
                index: 1000,
                count: 1,
            }],
            vec![DeltaOp::Copy {
                index: u32::MAX,
                count: u32::MAX,
            }],
            vec![DeltaOp::Copy { index: 0, count: 0 }],
            vec![DeltaOp::Literal(10)],
            vec![DeltaOp::Literal(u32::MAX)],
        ];
        for ops in bad {
            assert!(apply(&old, 256, &ops, b"abc", 100).is_err(), "{ops:?}");
        }
        assert!(apply(&old, 0, &[DeltaOp::Copy { index: 0, count: 1 }], b"", 10).is_err());
        // Too long a result.
        assert!(
            apply(
                &old,
                256,
                &[DeltaOp::Copy {
                    index: 0,
                    count: 19
                }],
                b"",
                10
            )
            .is_err()
        );
    }

    proptest! {
        #[test]
        fn any_old_and_new_round_trip(
            old in proptest::collection::vec(any::<u8>(), 0..6000),
            edits in proptest::collection::vec((any::<usize>(), proptest::collection::vec(any::<u8>(), 0..300), any::<bool>()), 0..5),
        ) {
            let mut new = old.clone();
            for (at, b, insert) in edits {
                let at = if new.is_empty() { 0 } else { at % new.len() };
                if insert {
                    new.splice(at..at, b);
                } else {
                    let end = (at + b.len()).min(new.len());
                    new.splice(at..end, b);
                }
            }
            let s = signature(&old);
            let d = delta(&s, &new);
            prop_assert_eq!(apply(&old, s.block, &d.ops, &d.literals, new.len()).unwrap(), new);
        }

        #[test]
        fn random_deltas_never_panic(
            ops in proptest::collection::vec((any::<bool>(), any::<u32>(), any::<u32>()), 0..8),
            len in 0usize..10_000,
            block in 0u32..5000,
        ) {
            let old = bytes(3000, 5);
            let ops: Vec<DeltaOp> = ops.into_iter().map(|(c, a, b)| if c {
                DeltaOp::Copy { index: a % 40, count: b % 40 }
            } else {
                DeltaOp::Literal(a % 4000)
            }).collect();
            let _ = apply(&old, block, &ops, &bytes(2000, 8), len);
        }
    }
}
