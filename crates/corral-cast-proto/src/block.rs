//! Block coding: zstd compression, cutting into source symbols, Reed–Solomon parity, and the
//! verified inverse.
//!
//! A data block becomes a *payload* (zstd-compressed, or raw when compression does not help),
//! which is zero-padded and cut into `k` source symbols of `symbol_size` bytes. Parity symbols
//! are recovery shards from [`reed_solomon_simd`]: any `k` distinct symbols (source or parity)
//! rebuild the payload. Symbol indices (ESIs) `0..k` are source symbols, `k..k + r` parity,
//! with `r = parity_count(k)`. Both sides derive `r` from `k`, so packets need not carry it.

use std::sync::Arc;

use crate::error::BlockError;
use crate::manifest::{BlockPos, block_hash};

/// Largest number of source symbols per block (reed-solomon-simd supports up to 32768
/// original shards).
pub const MAX_SOURCE_SYMBOLS: usize = 32768;

/// Fewest parity symbols generated per block, so small blocks still have fresh repair.
pub const MIN_PARITY_SYMBOLS: usize = 64;

/// How a block's payload was produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// Blocks are sent as they are.
    None,
    /// Blocks are zstd-compressed independently at this level (a block that does not shrink
    /// is sent raw; packets flag which).
    Zstd {
        /// zstd level (1..=22; 3 is a good default for images).
        level: i32,
    },
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Zstd { level: 3 }
    }
}

/// Number of parity symbols available for a block of `k` source symbols.
///
/// `max(k, 64)`, capped so that reed-solomon-simd supports the `(k, r)` pair. Repair never
/// needs more than `k` fresh symbols unless a receiver lost more than a whole block's worth.
pub fn parity_count(k: u16) -> u16 {
    let k = usize::from(k).max(1);
    let r = k.clamp(MIN_PARITY_SYMBOLS, MAX_SOURCE_SYMBOLS);
    // k <= 32768 and r <= 32768 is always supported by the default rate (see crate README:
    // "any combination of 1 - 32768 original shards with 1 - 32768 recovery shards").
    u16::try_from(r).unwrap_or(u16::MAX)
}

/// Number of source symbols for a payload of `payload_len` bytes.
pub fn source_count(payload_len: usize, symbol_size: u16) -> usize {
    payload_len.div_ceil(usize::from(symbol_size)).max(1)
}

/// Whether every byte is zero (such blocks are never sent; the manifest flags them).
pub fn is_zero(data: &[u8]) -> bool {
    // Compare in 8-byte words: this runs over the whole image on the sender.
    let words = data.chunks_exact(8);
    let tail = words.remainder();
    words
        .map(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .all(|w| w == 0)
        && tail.iter().all(|&b| b == 0)
}

/// A data block ready to send: its payload cut into `k` zero-padded source symbols.
#[derive(Clone, PartialEq, Eq)]
pub struct EncodedBlock {
    compressed: bool,
    payload_len: u32,
    symbol_size: u16,
    k: u16,
    /// `k * symbol_size` bytes: the payload then zero padding.
    symbols: Vec<u8>,
}

impl std::fmt::Debug for EncodedBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncodedBlock")
            .field("compressed", &self.compressed)
            .field("payload_len", &self.payload_len)
            .field("symbol_size", &self.symbol_size)
            .field("k", &self.k)
            .finish()
    }
}

/// Compresses (if configured and useful) and cuts one block into source symbols.
///
/// `block` is only used in error context. Zero blocks should not be encoded (the manifest marks
/// them and they are never sent), but encoding one works.
pub fn encode_block(
    block: u32,
    data: &[u8],
    compression: Compression,
    symbol_size: u16,
) -> Result<EncodedBlock, BlockError> {
    check_symbol_size(symbol_size)?;
    match compress(block, data, compression)? {
        Some(c) => EncodedBlock::from_payload(block, true, &c, symbol_size),
        None => EncodedBlock::from_payload(block, false, data, symbol_size),
    }
}

/// [`encode_block`] on a block the caller owns: a block sent raw (the usual case for data that
/// is not zeros) keeps `data` as its symbol buffer, zero-padded to whole symbols, instead of
/// copying it (give `data` capacity for [`source_count`] symbols to avoid a reallocation).
pub fn encode_block_vec(
    block: u32,
    mut data: Vec<u8>,
    compression: Compression,
    symbol_size: u16,
) -> Result<EncodedBlock, BlockError> {
    check_symbol_size(symbol_size)?;
    if let Some(c) = compress(block, &data, compression)? {
        return EncodedBlock::from_payload(block, true, &c, symbol_size);
    }
    let k = source_count(data.len(), symbol_size);
    let payload_len = u32::try_from(data.len())
        .ok()
        .filter(|_| k <= MAX_SOURCE_SYMBOLS);
    let Some(payload_len) = payload_len else {
        return Err(BlockError::TooManySymbols {
            block,
            payload_len: data.len(),
            k,
            max: MAX_SOURCE_SYMBOLS,
        });
    };
    data.resize(k * usize::from(symbol_size), 0);
    Ok(EncodedBlock {
        compressed: false,
        payload_len,
        symbol_size,
        // k <= 32768 checked above.
        k: k as u16,
        symbols: data,
    })
}

/// The block compressed, if configured and smaller (and not judged incompressible by
/// [`looks_incompressible`]).
fn compress(
    block: u32,
    data: &[u8],
    compression: Compression,
) -> Result<Option<Vec<u8>>, BlockError> {
    let Compression::Zstd { level } = compression else {
        return Ok(None);
    };
    let zstd = |d: &[u8]| {
        compress_with_level(d, level).map_err(|e| BlockError::Zstd {
            block,
            op: "compress",
            message: e.to_string(),
        })
    };
    if looks_incompressible(data, zstd)? {
        return Ok(None);
    }
    let c = zstd(data)?;
    Ok((c.len() < data.len()).then_some(c))
}

thread_local! {
    /// This thread's zstd context and its level, reused for every block and sample: a new
    /// context per call (`zstd::bulk::compress`) cost more than the three 16 KiB samples of
    /// an incompressible block it was made for.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

/// `data` as one zstd frame at `level`, with this thread's context.
fn compress_with_level(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        match &mut *slot {
            Some((l, c)) if *l == level => c.compress(data),
            _ => {
                let mut c = zstd::bulk::Compressor::new(level)?;
                let out = c.compress(data);
                *slot = Some((level, c));
                out
            }
        }
    })
}

/// Bytes of each sample [`looks_incompressible`] compresses.
const PROBE_LEN: usize = 16 * 1024;

/// Whether a block is not worth compressing whole: on a large block, three samples (start,
/// middle, end) are compressed first and if none of them shrinks by at least 1/32 the block is
/// sent raw. Random or already-compressed data (most of a typical image that is not zeros) then
/// costs 3 x 16 KiB of zstd instead of the whole block; a block compressible only between the
/// samples is sent raw, which costs bandwidth, never correctness.
fn looks_incompressible(
    data: &[u8],
    mut zstd: impl FnMut(&[u8]) -> Result<Vec<u8>, BlockError>,
) -> Result<bool, BlockError> {
    if data.len() < 8 * PROBE_LEN {
        return Ok(false);
    }
    let mid = (data.len() / 2) & !(PROBE_LEN - 1);
    for at in [0, mid, data.len() - PROBE_LEN] {
        let sample = &data[at..at + PROBE_LEN];
        if zstd(sample)?.len() < PROBE_LEN - PROBE_LEN / 32 {
            return Ok(false);
        }
    }
    Ok(true)
}

fn check_symbol_size(symbol_size: u16) -> Result<(), BlockError> {
    if symbol_size == 0 || !symbol_size.is_multiple_of(2) {
        return Err(BlockError::SymbolSize { symbol_size });
    }
    Ok(())
}

impl EncodedBlock {
    /// Wraps an already produced payload.
    pub fn from_payload(
        block: u32,
        compressed: bool,
        payload: &[u8],
        symbol_size: u16,
    ) -> Result<Self, BlockError> {
        check_symbol_size(symbol_size)?;
        let k = source_count(payload.len(), symbol_size);
        if k > MAX_SOURCE_SYMBOLS {
            return Err(BlockError::TooManySymbols {
                block,
                payload_len: payload.len(),
                k,
                max: MAX_SOURCE_SYMBOLS,
            });
        }
        let payload_len = u32::try_from(payload.len()).map_err(|_| BlockError::TooManySymbols {
            block,
            payload_len: payload.len(),
            k,
            max: MAX_SOURCE_SYMBOLS,
        })?;
        let mut symbols = Vec::with_capacity(k * usize::from(symbol_size));
        symbols.extend_from_slice(payload);
        symbols.resize(k * usize::from(symbol_size), 0);
        Ok(EncodedBlock {
            compressed,
            payload_len,
            symbol_size,
            // k <= 32768 checked above.
            k: k as u16,
            symbols,
        })
    }

    /// Whether the payload is zstd-compressed.
    pub fn compressed(&self) -> bool {
        self.compressed
    }

    /// Payload length in bytes (before padding).
    pub fn payload_len(&self) -> u32 {
        self.payload_len
    }

    /// Source symbol count.
    pub fn k(&self) -> u16 {
        self.k
    }

    /// Symbol size in bytes.
    pub fn symbol_size(&self) -> u16 {
        self.symbol_size
    }

    /// The payload (compressed or raw bytes, without padding).
    pub fn payload(&self) -> &[u8] {
        &self.symbols[..self.payload_len as usize]
    }

    /// Source symbol `esi` (`0..k`), or `None` when out of range.
    pub fn source_symbol(&self, esi: u16) -> Option<&[u8]> {
        if esi >= self.k {
            return None;
        }
        let s = usize::from(self.symbol_size);
        let i = usize::from(esi);
        self.symbols.get(i * s..(i + 1) * s)
    }

    /// Computes all `parity_count(k)` parity symbols (done once per block per repair round;
    /// the sender caches the result).
    pub fn parity(&self, block: u32) -> Result<Parity, BlockError> {
        let r = parity_count(self.k);
        let s = usize::from(self.symbol_size);
        let shards = self.symbols.chunks_exact(s);
        let rec = reed_solomon_simd::encode(usize::from(self.k), usize::from(r), shards).map_err(
            |e| BlockError::ReedSolomon {
                block,
                op: "encode",
                message: e.to_string(),
            },
        )?;
        let mut data = Vec::with_capacity(usize::from(r) * s);
        for shard in &rec {
            data.extend_from_slice(shard);
        }
        Ok(Parity {
            symbol_size: self.symbol_size,
            r,
            data,
        })
    }

    /// Decompresses and checks length and BLAKE3 hash against the manifest's entry.
    ///
    /// Nothing that fails here may reach the disk.
    pub fn decode_verified(
        &self,
        block: u32,
        expected_len: usize,
        expected_hash: &[u8; 32],
        pos: BlockPos,
    ) -> Result<Vec<u8>, BlockError> {
        decode_payload(
            block,
            self.compressed,
            self.payload().to_vec(),
            expected_len,
            expected_hash,
            pos,
        )
    }

    /// Serialises for the TCP catch-up path: `flags u8 | payload_len u32 BE | symbol_size u16 BE
    /// | payload`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(7 + self.payload_len as usize);
        out.push(u8::from(self.compressed));
        out.extend_from_slice(&self.payload_len.to_be_bytes());
        out.extend_from_slice(&self.symbol_size.to_be_bytes());
        out.extend_from_slice(self.payload());
        out
    }

    /// Parses [`EncodedBlock::to_bytes`] output; every length is checked.
    pub fn from_bytes(block: u32, bytes: &[u8]) -> Result<Self, BlockError> {
        let malformed = |why| BlockError::Malformed {
            block,
            why,
            len: bytes.len(),
        };
        if bytes.len() < 7 {
            return Err(malformed("shorter than the 7-byte header"));
        }
        let compressed = match bytes[0] {
            0 => false,
            1 => true,
            _ => return Err(malformed("unknown flags")),
        };
        let payload_len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        let symbol_size = u16::from_be_bytes([bytes[5], bytes[6]]);
        if bytes.len() - 7 != payload_len {
            return Err(malformed("payload length field does not match"));
        }
        Self::from_payload(block, compressed, &bytes[7..], symbol_size)
    }

    /// Rebuilds a block from any `k` distinct symbols. Used by drivers and tests (the
    /// receiver itself lays symbols out in place and calls [`rebuild_payload`]). `symbols`
    /// yields `(esi, bytes)`; each must be `symbol_size` long.
    pub fn from_symbols<'a>(
        block: u32,
        compressed: bool,
        payload_len: u32,
        symbol_size: u16,
        symbols: impl IntoIterator<Item = (u16, &'a [u8])>,
    ) -> Result<Self, BlockError> {
        let k = checked_source_count(block, payload_len, symbol_size)?;
        let s = usize::from(symbol_size);
        let r = usize::from(parity_count(k as u16));
        let mut buf = vec![0u8; k * s];
        let mut have = vec![false; k];
        let mut recovery: Vec<(u16, &[u8])> = Vec::new();
        for (esi, sym) in symbols {
            if sym.len() != s {
                return Err(BlockError::Malformed {
                    block,
                    why: "symbol length differs from symbol size",
                    len: sym.len(),
                });
            }
            let esi = usize::from(esi);
            if esi < k {
                if !have[esi] {
                    have[esi] = true;
                    buf[esi * s..(esi + 1) * s].copy_from_slice(sym);
                }
            } else if esi < k + r {
                // esi - k < r <= 32768
                let j = (esi - k) as u16;
                if !recovery.iter().any(|&(i, _)| i == j) {
                    recovery.push((j, sym));
                }
            }
        }
        let payload = rebuild_payload(block, payload_len, symbol_size, buf, |i| have[i], recovery)?;
        Self::from_payload(block, compressed, &payload, symbol_size)
    }
}

/// `source_count` with the size checks every rebuild needs.
fn checked_source_count(
    block: u32,
    payload_len: u32,
    symbol_size: u16,
) -> Result<usize, BlockError> {
    check_symbol_size(symbol_size)?;
    let k = source_count(payload_len as usize, symbol_size);
    if k > MAX_SOURCE_SYMBOLS {
        return Err(BlockError::TooManySymbols {
            block,
            payload_len: payload_len as usize,
            k,
            max: MAX_SOURCE_SYMBOLS,
        });
    }
    Ok(k)
}

/// Rebuilds a block's payload in place, without copying the symbols that arrived.
///
/// `source` holds the `k` source symbols laid out at their positions (symbol `i` at
/// `i * symbol_size`; it is zero-extended to `k * symbol_size` if shorter); `present(i)` says
/// which of them arrived (the bytes of the others are ignored and overwritten). `recovery`
/// yields `(j, bytes)` for parity symbols (ESI `k + j`), distinct `j`, each `symbol_size` long.
/// With every source symbol present no decoding is done at all. Returns the payload
/// (`payload_len` bytes, the `source` buffer truncated), not yet verified.
pub fn rebuild_payload<'a>(
    block: u32,
    payload_len: u32,
    symbol_size: u16,
    mut source: Vec<u8>,
    present: impl Fn(usize) -> bool,
    recovery: impl IntoIterator<Item = (u16, &'a [u8])>,
) -> Result<Vec<u8>, BlockError> {
    let k = checked_source_count(block, payload_len, symbol_size)?;
    let s = usize::from(symbol_size);
    let r = usize::from(parity_count(k as u16));
    source.resize(k * s, 0);
    let have_count = (0..k).filter(|&i| present(i)).count();
    if have_count < k {
        let need = k - have_count;
        let mut rec: Vec<(usize, &[u8])> = Vec::with_capacity(need);
        for (j, sym) in recovery {
            if rec.len() == need {
                break;
            }
            if sym.len() != s {
                return Err(BlockError::Malformed {
                    block,
                    why: "symbol length differs from symbol size",
                    len: sym.len(),
                });
            }
            if usize::from(j) < r {
                rec.push((usize::from(j), sym));
            }
        }
        if rec.len() < need {
            return Err(BlockError::ReedSolomon {
                block,
                op: "decode",
                message: format!(
                    "not enough symbols: {have_count} source + {} parity < {k}",
                    rec.len()
                ),
            });
        }
        let originals = (0..k)
            .filter(|&i| present(i))
            .map(|i| (i, &source[i * s..(i + 1) * s]));
        let restored =
            reed_solomon_simd::decode(k, r, originals, rec.iter().copied()).map_err(|e| {
                BlockError::ReedSolomon {
                    block,
                    op: "decode",
                    message: e.to_string(),
                }
            })?;
        for (i, shard) in restored {
            if i < k && shard.len() == s {
                source[i * s..(i + 1) * s].copy_from_slice(&shard);
            }
        }
    }
    source.truncate(payload_len as usize);
    Ok(source)
}

/// Turns a rebuilt payload into the block's bytes (decompressing if `compressed`, else reusing
/// the buffer) and checks length and hash (at `pos`, see [`block_hash`]) against the manifest's
/// entry.
///
/// Nothing that fails here may reach the disk.
pub fn decode_payload(
    block: u32,
    compressed: bool,
    payload: Vec<u8>,
    expected_len: usize,
    expected_hash: &[u8; 32],
    pos: BlockPos,
) -> Result<Vec<u8>, BlockError> {
    let data = if compressed {
        // Capacity bounds the output: a decompression bomb fails instead of allocating.
        zstd::bulk::decompress(&payload, expected_len).map_err(|e| BlockError::Zstd {
            block,
            op: "decompress",
            message: e.to_string(),
        })?
    } else {
        payload
    };
    verify(block, &data, expected_len, expected_hash, pos)?;
    Ok(data)
}

/// Checks a decoded block's length and its hash at `pos` (see [`block_hash`]).
pub fn verify(
    block: u32,
    data: &[u8],
    expected_len: usize,
    expected_hash: &[u8; 32],
    pos: BlockPos,
) -> Result<(), BlockError> {
    if data.len() != expected_len {
        return Err(BlockError::Length {
            block,
            got: data.len(),
            expected: expected_len,
        });
    }
    let got = blake3::Hash::from_bytes(block_hash(data, pos));
    if got.as_bytes() != expected_hash {
        return Err(BlockError::HashMismatch {
            block,
            got: got.to_hex().to_string(),
            expected: blake3::Hash::from_bytes(*expected_hash)
                .to_hex()
                .to_string(),
        });
    }
    Ok(())
}

/// The parity symbols of one block.
#[derive(Clone)]
pub struct Parity {
    symbol_size: u16,
    r: u16,
    data: Vec<u8>,
}

impl std::fmt::Debug for Parity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parity")
            .field("symbol_size", &self.symbol_size)
            .field("r", &self.r)
            .finish()
    }
}

impl Parity {
    /// Number of parity symbols.
    pub fn count(&self) -> u16 {
        self.r
    }

    /// Parity symbol `j` (ESI `k + j`), or `None` when out of range.
    pub fn symbol(&self, j: u16) -> Option<&[u8]> {
        let s = usize::from(self.symbol_size);
        let j = usize::from(j);
        self.data.get(j * s..(j + 1) * s)
    }
}

/// Source of encoded blocks for the [`Sender`](crate::Sender); the driver implements it (reads
/// block `index` from the image and calls [`encode_block`], caching as it likes).
///
/// Only called for blocks the manifest marks as data (never for zero blocks).
pub trait BlockSource {
    /// The encoded block `index`.
    fn encoded_block(&mut self, index: u32) -> std::io::Result<Arc<EncodedBlock>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn compressible_block_shrinks_and_round_trips() {
        let data = b"corral ".repeat(10_000);
        let enc = encode_block(0, &data, Compression::Zstd { level: 3 }, 1024).unwrap();
        assert!(enc.compressed());
        assert!((enc.payload_len() as usize) < data.len() / 10);
        let hash = *blake3::hash(&data).as_bytes();
        assert_eq!(
            enc.decode_verified(0, data.len(), &hash, BlockPos::WHOLE)
                .unwrap(),
            data
        );
    }

    #[test]
    fn incompressible_block_is_sent_raw() {
        let data = pseudo_random(100_000, 7);
        let enc = encode_block(3, &data, Compression::Zstd { level: 3 }, 1440).unwrap();
        assert!(!enc.compressed());
        assert_eq!(enc.payload_len() as usize, data.len());
        assert_eq!(usize::from(enc.k()), 100_000usize.div_ceil(1440));
    }

    #[test]
    fn large_blocks_are_probed_before_compressing() {
        let z = Compression::Zstd { level: 3 };
        // Random: all three samples incompressible, sent raw.
        let random = pseudo_random(1 << 20, 11);
        assert!(!encode_block(0, &random, z, 1440).unwrap().compressed());
        // Random but for a compressible last quarter (the end sample sees it): compressed.
        let mut tail = random.clone();
        tail[3 << 18..].fill(7);
        let enc = encode_block(0, &tail, z, 1440).unwrap();
        assert!(enc.compressed());
        assert!((enc.payload_len() as usize) < (800 << 10));
        // Compressible in the middle only: found by the middle sample.
        let mut middle = random.clone();
        middle[400 << 10..600 << 10].fill(0);
        assert!(encode_block(0, &middle, z, 1440).unwrap().compressed());
        // Compressible only between the samples: sent raw (the documented trade-off).
        let mut between = random;
        between[100 << 10..300 << 10].fill(0);
        assert!(!encode_block(0, &between, z, 1440).unwrap().compressed());
    }

    #[test]
    fn owned_blocks_encode_like_borrowed_ones() {
        let random = pseudo_random(100_001, 5);
        let text = b"corral ".repeat(20_000);
        for (data, c) in [
            (&random, Compression::None),
            (&random, Compression::Zstd { level: 3 }),
            (&text, Compression::Zstd { level: 3 }),
            (&text, Compression::None),
        ] {
            let a = encode_block(2, data, c, 1440).unwrap();
            let b = encode_block_vec(2, data.clone(), c, 1440).unwrap();
            assert_eq!(a.to_bytes(), b.to_bytes());
            assert_eq!(a.compressed(), b.compressed());
            assert_eq!((a.k(), a.payload_len()), (b.k(), b.payload_len()));
            for esi in 0..a.k() {
                assert_eq!(a.source_symbol(esi), b.source_symbol(esi));
            }
        }
        assert!(encode_block_vec(0, vec![1], Compression::None, 1441).is_err());
    }

    #[test]
    fn any_k_symbols_rebuild_the_block() {
        let data = pseudo_random(50_000, 9);
        let hash = *blake3::hash(&data).as_bytes();
        let enc = encode_block(1, &data, Compression::None, 1000).unwrap();
        let k = enc.k();
        let parity = enc.parity(1).unwrap();
        assert_eq!(parity.count(), parity_count(k));
        // Drop every third source symbol and use parity instead.
        let mut syms: Vec<(u16, &[u8])> = (0..k)
            .filter(|i| i % 3 != 0)
            .map(|i| (i, enc.source_symbol(i).unwrap()))
            .collect();
        let missing = usize::from(k) - syms.len();
        for j in 0..missing as u16 {
            syms.push((k + j + 5, parity.symbol(j + 5).unwrap()));
        }
        let rebuilt =
            EncodedBlock::from_symbols(1, enc.compressed(), enc.payload_len(), 1000, syms).unwrap();
        assert_eq!(
            rebuilt
                .decode_verified(1, data.len(), &hash, BlockPos::WHOLE)
                .unwrap(),
            data
        );
    }

    #[test]
    fn too_few_symbols_is_an_error_not_a_panic() {
        let data = pseudo_random(5000, 1);
        let enc = encode_block(0, &data, Compression::None, 1000).unwrap();
        let syms = (0..enc.k() - 1).map(|i| (i, enc.source_symbol(i).unwrap()));
        let err = EncodedBlock::from_symbols(0, false, enc.payload_len(), 1000, syms).unwrap_err();
        assert!(matches!(err, BlockError::ReedSolomon { .. }), "{err}");
    }

    #[test]
    fn corrupted_block_fails_hash() {
        let data = pseudo_random(4000, 2);
        let hash = *blake3::hash(&data).as_bytes();
        let mut bytes = encode_block(0, &data, Compression::None, 512)
            .unwrap()
            .to_bytes();
        bytes[100] ^= 1;
        let enc = EncodedBlock::from_bytes(0, &bytes).unwrap();
        let err = enc
            .decode_verified(0, data.len(), &hash, BlockPos::WHOLE)
            .unwrap_err();
        assert!(matches!(err, BlockError::HashMismatch { block: 0, .. }));
    }

    #[test]
    fn odd_symbol_size_rejected() {
        assert!(matches!(
            encode_block(0, b"x", Compression::None, 1441),
            Err(BlockError::SymbolSize { symbol_size: 1441 })
        ));
    }

    #[test]
    fn parity_counts_are_supported_by_codec() {
        for k in [1u16, 2, 63, 64, 729, 4096, 32768] {
            let r = parity_count(k);
            assert!(
                reed_solomon_simd::ReedSolomonEncoder::supports(usize::from(k), usize::from(r)),
                "k={k} r={r}"
            );
        }
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 1025]));
        let mut v = vec![0u8; 1025];
        v[1024] = 1;
        assert!(!is_zero(&v));
        v[1024] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
    }
}
