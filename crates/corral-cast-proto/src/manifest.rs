//! The signed manifest: what the image is, block by block, so every block can be verified
//! before it is written.
//!
//! Canonical binary encoding (all integers big-endian), version 2:
//!
//! ```text
//! magic "CRMF" | version u8 = 2 | session u64 | image_size u64 | block_size u32
//! | symbol_size u16 | compression u8 (0 none, 1 zstd) | zstd level i8 | block_count u32
//! | image_hash [32] | block_count × (flags u8 (bit 0 = all zero) | blake3 [32])
//! ```
//!
//! A [`SignedManifest`] is `manifest_len u32 | manifest bytes | public key [32] | signature [64]`;
//! the Ed25519 signature covers `"corral-cast-manifest-v1\0" ‖ manifest bytes` exactly.
//!
//! # Block hashes are pieces of the image hash
//!
//! `image_hash` is the plain BLAKE3 hash of the whole image (what `b3sum` prints). The block
//! size is a power of two of at least 1 KiB (BLAKE3's chunk size), so every block is a complete
//! subtree of BLAKE3's hash tree, and a block's hash is that subtree's chaining value: BLAKE3 of
//! the block's bytes *at its offset in the image* (see [`block_hash`]). The image hash is the
//! merge of the block hashes up the tree ([`Manifest::merged_image_hash`]), which
//! [`Manifest::decode`] checks. So a receiver that verified every block against its hash before
//! writing it knows the image hash without reading the image again. An image of one block is
//! its own root: that block's hash is the image hash.

use blake3::hazmat::{self, HasherExt, Mode};
use corral_model::SessionId;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

use crate::block::{Compression, MAX_SOURCE_SYMBOLS};
use crate::error::ManifestError;

const MAGIC: &[u8; 4] = b"CRMF";
const VERSION: u8 = 2;
const HEADER_LEN: usize = 4 + 1 + 8 + 8 + 4 + 2 + 1 + 1 + 4 + 32;
const ENTRY_LEN: usize = 33;
const SIGN_CONTEXT: &[u8] = b"corral-cast-manifest-v1\0";

/// Largest block size a manifest may declare (bounds every per-block allocation).
pub const MAX_BLOCK_SIZE: u32 = 64 << 20;
/// Smallest block size a manifest may declare: BLAKE3's chunk length (block sizes are powers of
/// two, so that every block is a subtree of BLAKE3's hash tree).
pub const MIN_BLOCK_SIZE: u32 = 1024;
/// Default block size: 1 MiB.
pub const DEFAULT_BLOCK_SIZE: u32 = 1 << 20;
/// Default symbol size: fits one symbol plus headers in a 1500-byte Ethernet frame over IPv4.
pub const DEFAULT_SYMBOL_SIZE: u16 = 1440;

/// Where a block sits in its image, which its hash depends on (see [`block_hash`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockPos {
    /// Byte offset of the block in the image (a multiple of the block size).
    pub offset: u64,
    /// The block is the whole image (an image of one block).
    pub whole_image: bool,
}

impl BlockPos {
    /// A block that is the whole image: its hash is plain BLAKE3 of its bytes.
    pub const WHOLE: BlockPos = BlockPos {
        offset: 0,
        whole_image: true,
    };
}

/// The hash of one block (the *uncompressed* bytes) at its place in the image: plain BLAKE3 if
/// the block is the whole image, otherwise the chaining value of the BLAKE3 subtree that the
/// block forms at `pos.offset`. Blocks of a valid manifest always form such a subtree (their
/// size is a power of two of at least 1 KiB and the offset a multiple of it); for anything
/// else (never produced by a valid manifest) the result is a hash in a separate domain that
/// matches no block hash.
pub fn block_hash(data: &[u8], pos: BlockPos) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    if pos.whole_image {
        if pos.offset == 0 {
            h.update(data);
            return *h.finalize().as_bytes();
        }
    } else if subtree_fits(data.len(), pos.offset) {
        h.set_input_offset(pos.offset);
        h.update(data);
        return h.finalize_non_root();
    }
    blake3::derive_key("corral-cast invalid block position", data)
}

/// Whether `len` bytes at `offset` form one BLAKE3 subtree (not empty, chunk-aligned, no
/// larger than the offset allows).
fn subtree_fits(len: usize, offset: u64) -> bool {
    len > 0
        && offset.is_multiple_of(blake3::CHUNK_LEN as u64)
        && hazmat::max_subtree_len(offset).is_none_or(|max| len as u64 <= max)
}

/// Hashes one block at `pos`, returning `(block hash, root hash)`: the second is plain BLAKE3
/// of the block, computed from the same pass (used when an image turns out to be one block).
fn block_and_root_hash(data: &[u8], pos: BlockPos) -> ([u8; 32], [u8; 32]) {
    if pos.offset != 0 || data.is_empty() {
        return (block_hash(data, pos), *blake3::hash(data).as_bytes());
    }
    let mut h = blake3::Hasher::new();
    h.update(data);
    let root = *h.finalize().as_bytes();
    if pos.whole_image {
        (root, root)
    } else {
        (h.finalize_non_root(), root)
    }
}

/// One block's line in the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockEntry {
    /// [`block_hash`] of the *uncompressed* block at its place in the image.
    pub hash: [u8; 32],
    /// The block is all zero bytes and is never sent.
    pub zero: bool,
}

impl BlockEntry {
    /// Hashes one block at `pos` and detects whether it is all zero.
    pub fn of(data: &[u8], pos: BlockPos) -> Self {
        BlockEntry {
            hash: block_hash(data, pos),
            zero: crate::block::is_zero(data),
        }
    }
}

/// Description of one image transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The cast session.
    pub session: SessionId,
    /// Image length in bytes.
    pub image_size: u64,
    /// Block length in bytes (the last block may be shorter).
    pub block_size: u32,
    /// Symbol length in bytes (even).
    pub symbol_size: u16,
    /// How blocks are compressed.
    pub compression: Compression,
    /// One entry per block.
    pub blocks: Vec<BlockEntry>,
    /// BLAKE3 of the whole image.
    pub image_hash: [u8; 32],
}

impl Manifest {
    /// Builds and validates a manifest from per-block entries (see [`ManifestBuilder`] to hash
    /// an image incrementally).
    pub fn build(
        session: SessionId,
        image_size: u64,
        block_size: u32,
        symbol_size: u16,
        compression: Compression,
        blocks: Vec<BlockEntry>,
        image_hash: [u8; 32],
    ) -> Result<Self, ManifestError> {
        let m = Manifest {
            session,
            image_size,
            block_size,
            symbol_size,
            compression,
            blocks,
            image_hash,
        };
        m.validate()?;
        m.check_zero_blocks()?;
        Ok(m)
    }

    fn validate(&self) -> Result<(), ManifestError> {
        self.validate_shape()?;
        if self.merged_image_hash() != self.image_hash {
            return Err(ManifestError::ImageHash);
        }
        Ok(())
    }

    /// Checks that every block flagged as all zero has the hash of zeros at its place. A
    /// receiver writes zeros for such a block without receiving it and counts its hash from
    /// the manifest into the final check, so without this a wrong flag (a buggy sender) would
    /// put zeros on the disk where data belongs and still pass.
    ///
    /// Costs one hash pass over the zero bytes (no I/O), which can be large for a mostly empty
    /// disk, so [`Manifest::decode`] does not do it: a receiver calls it once, after it has
    /// authenticated the manifest (so a forger cannot make it hash terabytes of zeros).
    /// [`Manifest::build`] calls it.
    pub fn check_zero_blocks(&self) -> Result<(), ManifestError> {
        let Some(first) = self.blocks.iter().position(|b| b.zero) else {
            return Ok(());
        };
        // At most one block size of zeros (64 MiB at most; calloc'd, so untouched pages
        // cost nothing).
        let zeros = vec![0u8; self.block_size as usize];
        for i in first..self.blocks.len() {
            if !self.blocks[i].zero {
                continue;
            }
            let index = i as u32;
            let len = self.block_len(index) as usize;
            if self.hash_block(index, &zeros[..len]) != self.blocks[i].hash {
                return Err(ManifestError::ZeroBlockHash { index });
            }
        }
        Ok(())
    }

    /// Checks sizes and counts (everything but the image hash).
    fn validate_shape(&self) -> Result<(), ManifestError> {
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&self.block_size)
            || !self.block_size.is_power_of_two()
        {
            return Err(ManifestError::Invalid {
                field: "block_size",
                value: u64::from(self.block_size),
                why: "must be a power of two from 1 KiB to 64 MiB",
            });
        }
        if self.symbol_size < 2 || !self.symbol_size.is_multiple_of(2) {
            return Err(ManifestError::Invalid {
                field: "symbol_size",
                value: u64::from(self.symbol_size),
                why: "must be even and at least 2",
            });
        }
        let k = (self.block_size as usize).div_ceil(usize::from(self.symbol_size));
        if k > MAX_SOURCE_SYMBOLS {
            return Err(ManifestError::Invalid {
                field: "symbol_size",
                value: u64::from(self.symbol_size),
                why: "too small for the block size (more than 32768 symbols per block)",
            });
        }
        if let Compression::Zstd { level } = self.compression
            && !(-7..=22).contains(&level)
        {
            return Err(ManifestError::Invalid {
                field: "zstd_level",
                value: level as u64,
                why: "must be -7..=22",
            });
        }
        let expected = self.image_size.div_ceil(u64::from(self.block_size));
        if expected != self.blocks.len() as u64 || expected > u64::from(u32::MAX) {
            return Err(ManifestError::BlockCount {
                listed: self.blocks.len() as u64,
                expected,
                image_size: self.image_size,
                block_size: self.block_size,
            });
        }
        Ok(())
    }

    /// Where block `index` sits, for [`block_hash`].
    pub fn block_pos(&self, index: u32) -> BlockPos {
        BlockPos {
            offset: self.block_offset(index),
            whole_image: self.blocks.len() == 1,
        }
    }

    /// The hash block `index` must have, computed from `data` (compare with
    /// `self.blocks[index].hash`).
    pub fn hash_block(&self, index: u32, data: &[u8]) -> [u8; 32] {
        block_hash(data, self.block_pos(index))
    }

    /// The BLAKE3 hash of the whole image, computed from the block hashes alone by merging
    /// them up BLAKE3's tree (a few hundred nanoseconds per block). Equal to
    /// [`Manifest::image_hash`] for every manifest that passed validation.
    pub fn merged_image_hash(&self) -> [u8; 32] {
        match self.blocks.len() {
            0 => *blake3::hash(&[]).as_bytes(),
            1 => self.blocks[0].hash,
            n => {
                let (mid, _) = self.split(0, n);
                *hazmat::merge_subtrees_root(
                    &self.subtree(0, mid),
                    &self.subtree(mid, n),
                    Mode::Hash,
                )
                .as_bytes()
            }
        }
    }

    /// Bytes of blocks `first..end`.
    fn range_len(&self, first: usize, end: usize) -> u64 {
        let bs = u64::from(self.block_size);
        (end as u64 * bs).min(self.image_size) - first as u64 * bs
    }

    /// Splits blocks `first..end` (at least two) where BLAKE3 splits their bytes: the left
    /// subtree holds the largest power of two of chunks that leaves the right one non-empty,
    /// which, with power-of-two blocks, always ends on a block boundary.
    fn split(&self, first: usize, end: usize) -> (usize, usize) {
        let left = hazmat::left_subtree_len(self.range_len(first, end));
        let mid = first + (left / u64::from(self.block_size)) as usize;
        (mid, end)
    }

    /// Chaining value of the subtree made of blocks `first..end` (not the root).
    fn subtree(&self, first: usize, end: usize) -> hazmat::ChainingValue {
        if end - first == 1 {
            return self.blocks[first].hash;
        }
        let (mid, _) = self.split(first, end);
        hazmat::merge_subtrees_non_root(
            &self.subtree(first, mid),
            &self.subtree(mid, end),
            Mode::Hash,
        )
    }

    /// Number of blocks.
    pub fn block_count(&self) -> u32 {
        // validate() guarantees the count fits in u32.
        self.blocks.len() as u32
    }

    /// Byte offset of block `index` in the image.
    pub fn block_offset(&self, index: u32) -> u64 {
        u64::from(index) * u64::from(self.block_size)
    }

    /// Length of block `index` (the last one may be shorter); 0 when out of range.
    pub fn block_len(&self, index: u32) -> u32 {
        let start = self.block_offset(index);
        if start >= self.image_size {
            return 0;
        }
        // Bounded by block_size, so it fits in u32.
        (self.image_size - start).min(u64::from(self.block_size)) as u32
    }

    /// Total bytes of data (non-zero) blocks.
    pub fn data_bytes(&self) -> u64 {
        (0..self.block_count())
            .filter(|&i| !self.blocks[i as usize].zero)
            .map(|i| u64::from(self.block_len(i)))
            .sum()
    }

    /// Canonical encoding (the exact bytes the signature covers).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.blocks.len() * ENTRY_LEN);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.session.0.to_be_bytes());
        out.extend_from_slice(&self.image_size.to_be_bytes());
        out.extend_from_slice(&self.block_size.to_be_bytes());
        out.extend_from_slice(&self.symbol_size.to_be_bytes());
        match self.compression {
            Compression::None => out.extend_from_slice(&[0, 0]),
            Compression::Zstd { level } => {
                out.push(1);
                out.push(level.clamp(-128, 127) as i8 as u8);
            }
        }
        out.extend_from_slice(&self.block_count().to_be_bytes());
        out.extend_from_slice(&self.image_hash);
        for b in &self.blocks {
            out.push(u8::from(b.zero));
            out.extend_from_slice(&b.hash);
        }
        out
    }

    /// Parses the canonical encoding; checks every length before allocating.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        let mut r = Reader { buf: bytes, pos: 0 };
        if r.take(4, "magic")? != MAGIC {
            return Err(ManifestError::BadMagic);
        }
        let version = r.u8("version")?;
        if version != VERSION {
            return Err(ManifestError::UnsupportedVersion { version });
        }
        let session = SessionId(r.u64("session")?);
        let image_size = r.u64("image_size")?;
        let block_size = r.u32("block_size")?;
        let symbol_size = r.u16("symbol_size")?;
        let kind = r.u8("compression")?;
        let level = r.u8("zstd_level")? as i8;
        let compression = match (kind, level) {
            (0, 0) => Compression::None,
            (1, l) => Compression::Zstd {
                level: i32::from(l),
            },
            _ => {
                return Err(ManifestError::Invalid {
                    field: "compression",
                    value: u64::from(kind),
                    why: "unknown compression",
                });
            }
        };
        let count = r.u32("block_count")? as usize;
        let mut image_hash = [0u8; 32];
        image_hash.copy_from_slice(r.take(32, "image_hash")?);
        let left = bytes.len() - r.pos;
        let need = count.saturating_mul(ENTRY_LEN);
        if left < need {
            return Err(ManifestError::Truncated {
                field: "blocks",
                need,
                left,
            });
        }
        if left > need {
            return Err(ManifestError::TrailingBytes { extra: left - need });
        }
        // count * 33 bytes are present, so this allocation is bounded by the input.
        let mut blocks = Vec::with_capacity(count);
        for _ in 0..count {
            let flags = r.u8("block flags")?;
            if flags > 1 {
                return Err(ManifestError::Invalid {
                    field: "block flags",
                    value: u64::from(flags),
                    why: "unknown flag bits",
                });
            }
            let mut hash = [0u8; 32];
            hash.copy_from_slice(r.take(32, "block hash")?);
            blocks.push(BlockEntry {
                hash,
                zero: flags == 1,
            });
        }
        let m = Manifest {
            session,
            image_size,
            block_size,
            symbol_size,
            compression,
            blocks,
            image_hash,
        };
        m.validate()?;
        Ok(m)
    }
}

/// Hashes an image block by block, in order, to build its [`Manifest`]. Every byte is hashed
/// once: the image hash is merged from the block hashes.
#[derive(Debug)]
pub struct ManifestBuilder {
    session: SessionId,
    block_size: u32,
    symbol_size: u16,
    compression: Compression,
    blocks: Vec<BlockEntry>,
    /// Plain BLAKE3 of the first block when [`ManifestBuilder::push_block`] hashed it: the
    /// image hash if it stays the only block.
    first_root: Option<[u8; 32]>,
    size: u64,
}

impl ManifestBuilder {
    /// Starts a manifest.
    pub fn new(
        session: SessionId,
        block_size: u32,
        symbol_size: u16,
        compression: Compression,
    ) -> Self {
        ManifestBuilder {
            session,
            block_size,
            symbol_size,
            compression,
            blocks: Vec::new(),
            first_root: None,
            size: 0,
        }
    }

    /// Adds the next block (all but the last must be exactly `block_size` long).
    pub fn push_block(&mut self, data: &[u8]) {
        let pos = BlockPos {
            offset: self.size,
            whole_image: false,
        };
        // Only the first block's plain hash can become the image hash (a one-block image):
        // later blocks are hashed once, as the builder promises.
        let hash = if self.blocks.is_empty() {
            let (hash, root) = block_and_root_hash(data, pos);
            self.first_root = Some(root);
            hash
        } else {
            block_hash(data, pos)
        };
        let e = BlockEntry {
            hash,
            zero: crate::block::is_zero(data),
        };
        self.size += data.len() as u64;
        self.blocks.push(e);
    }

    /// Adds the next block of `len` bytes as an entry hashed elsewhere (by parallel workers,
    /// say) with [`BlockEntry::of`] at the block's place: `BlockPos { offset, whole_image }`
    /// where `offset` is the sum of the blocks before it and `whole_image` says that the
    /// image is this one block. The same rules on lengths as [`ManifestBuilder::push_block`].
    pub fn push_entry(&mut self, len: u32, entry: BlockEntry) {
        self.size += u64::from(len);
        self.blocks.push(entry);
    }

    /// Finishes and validates.
    pub fn finish(mut self) -> Result<Manifest, ManifestError> {
        if let ([only], Some(root)) = (self.blocks.as_mut_slice(), self.first_root) {
            only.hash = root;
        }
        let mut m = Manifest {
            session: self.session,
            image_size: self.size,
            block_size: self.block_size,
            symbol_size: self.symbol_size,
            compression: self.compression,
            blocks: self.blocks,
            image_hash: [0; 32],
        };
        m.validate_shape()?;
        m.image_hash = m.merged_image_hash();
        Ok(m)
    }
}

/// A manifest with its Ed25519 signature, as sent on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedManifest {
    manifest: Manifest,
    bytes: Vec<u8>,
    public_key: [u8; 32],
    signature: [u8; 64],
}

impl SignedManifest {
    /// Signs `manifest` with the 32-byte Ed25519 secret key (seed) `secret_key`.
    pub fn sign(manifest: Manifest, secret_key: &[u8; 32]) -> Self {
        let sk = SigningKey::from_bytes(secret_key);
        let body = manifest.encode();
        let mut msg = Vec::with_capacity(SIGN_CONTEXT.len() + body.len());
        msg.extend_from_slice(SIGN_CONTEXT);
        msg.extend_from_slice(&body);
        let sig = sk.sign(&msg);
        let public_key = sk.verifying_key().to_bytes();
        let mut bytes = Vec::with_capacity(4 + body.len() + 96);
        bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&body);
        bytes.extend_from_slice(&public_key);
        bytes.extend_from_slice(&sig.to_bytes());
        SignedManifest {
            manifest,
            bytes,
            public_key,
            signature: sig.to_bytes(),
        }
    }

    /// The public key matching a 32-byte secret key (for printing/distributing).
    pub fn public_key_for(secret_key: &[u8; 32]) -> [u8; 32] {
        SigningKey::from_bytes(secret_key)
            .verifying_key()
            .to_bytes()
    }

    /// Parses wire bytes and checks the signature against the *embedded* key. Call
    /// [`SignedManifest::verify`] with the trusted key to authenticate.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        let mut r = Reader { buf: bytes, pos: 0 };
        let len = r.u32("manifest_len")? as usize;
        let body = r.take(len, "manifest")?;
        let mut public_key = [0u8; 32];
        public_key.copy_from_slice(r.take(32, "public_key")?);
        let mut signature = [0u8; 64];
        signature.copy_from_slice(r.take(64, "signature")?);
        if r.pos != bytes.len() {
            return Err(ManifestError::TrailingBytes {
                extra: bytes.len() - r.pos,
            });
        }
        let manifest = Manifest::decode(body)?;
        let signed = SignedManifest {
            manifest,
            bytes: bytes.to_vec(),
            public_key,
            signature,
        };
        signed.check_signature()?;
        Ok(signed)
    }

    fn check_signature(&self) -> Result<(), ManifestError> {
        let vk =
            VerifyingKey::from_bytes(&self.public_key).map_err(|_| ManifestError::BadPublicKey)?;
        let sig = ed25519_dalek::Signature::from_bytes(&self.signature);
        let body = &self.bytes[4..self.bytes.len() - 96];
        let mut msg = Vec::with_capacity(SIGN_CONTEXT.len() + body.len());
        msg.extend_from_slice(SIGN_CONTEXT);
        msg.extend_from_slice(body);
        vk.verify_strict(&msg, &sig)
            .map_err(|_| ManifestError::BadSignature)
    }

    /// Checks that the manifest was signed by `trusted_key` (and that the signature holds).
    pub fn verify(&self, trusted_key: &[u8; 32]) -> Result<(), ManifestError> {
        if &self.public_key != trusted_key {
            return Err(ManifestError::UntrustedKey {
                found: hex32(&self.public_key),
                expected: hex32(trusted_key),
            });
        }
        self.check_signature()
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The wire bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The key that signed it.
    pub fn public_key(&self) -> &[u8; 32] {
        &self.public_key
    }

    /// BLAKE3 of the wire bytes (announced so receivers can check reassembly).
    pub fn hash(&self) -> [u8; 32] {
        *blake3::hash(&self.bytes).as_bytes()
    }
}

fn hex32(b: &[u8; 32]) -> String {
    blake3::Hash::from_bytes(*b).to_hex().to_string()
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], ManifestError> {
        let left = self.buf.len() - self.pos;
        if left < n {
            return Err(ManifestError::Truncated {
                field,
                need: n,
                left,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self, f: &'static str) -> Result<u8, ManifestError> {
        Ok(self.take(1, f)?[0])
    }
    fn u16(&mut self, f: &'static str) -> Result<u16, ManifestError> {
        let b = self.take(2, f)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, f: &'static str) -> Result<u32, ManifestError> {
        let b = self.take(4, f)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, f: &'static str) -> Result<u64, ManifestError> {
        let b = self.take(8, f)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let mut b = ManifestBuilder::new(SessionId(42), 4096, 1024, Compression::default());
        b.push_block(&[1u8; 4096]);
        b.push_block(&[0u8; 4096]);
        b.push_block(&[7u8; 100]);
        b.finish().unwrap()
    }

    #[test]
    fn build_and_round_trip() {
        let m = sample();
        assert_eq!(m.block_count(), 3);
        assert!(m.blocks[1].zero && !m.blocks[0].zero);
        assert_eq!(m.block_len(2), 100);
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn sign_verify_and_reject_other_key() {
        let sk = [5u8; 32];
        let s = SignedManifest::sign(sample(), &sk);
        let d = SignedManifest::decode(s.as_bytes()).unwrap();
        assert_eq!(d, s);
        d.verify(&SignedManifest::public_key_for(&sk)).unwrap();
        let other = SignedManifest::public_key_for(&[6u8; 32]);
        assert!(matches!(
            d.verify(&other),
            Err(ManifestError::UntrustedKey { .. })
        ));
    }

    #[test]
    fn tampered_bytes_fail_signature() {
        let s = SignedManifest::sign(sample(), &[5u8; 32]);
        let mut bytes = s.as_bytes().to_vec();
        bytes[40] ^= 1; // inside image_size / block fields
        assert!(SignedManifest::decode(&bytes).is_err());
    }

    #[test]
    fn block_count_mismatch_rejected() {
        let mut m = sample();
        m.blocks.pop();
        let err = Manifest::decode(&m.encode()).unwrap_err();
        assert!(
            matches!(err, ManifestError::BlockCount { listed: 2, .. }),
            "{err}"
        );
    }

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
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

    fn build(data: &[u8], block_size: u32) -> Manifest {
        let mut b = ManifestBuilder::new(SessionId(1), block_size, 256, Compression::None);
        for chunk in data.chunks(block_size as usize) {
            b.push_block(chunk);
        }
        b.finish().unwrap()
    }

    #[test]
    fn image_hash_is_plain_blake3_merged_from_block_hashes() {
        // Sizes around block and chunk boundaries, one block, odd block counts, a short last
        // block of one byte.
        for block_size in [1024u32, 4096, 16384] {
            let bs = block_size as usize;
            for len in [
                0,
                1,
                1023,
                1024,
                1025,
                bs,
                bs + 1,
                2 * bs,
                3 * bs - 7,
                5 * bs,
                7 * bs + 1,
                13 * bs + 999,
            ] {
                let data = pseudo_random(len, len as u64 + u64::from(block_size));
                let m = build(&data, block_size);
                assert_eq!(
                    m.image_hash,
                    *blake3::hash(&data).as_bytes(),
                    "len {len} block {block_size}"
                );
                assert_eq!(m.merged_image_hash(), m.image_hash);
                for (i, chunk) in data.chunks(bs).enumerate() {
                    let i = i as u32;
                    assert_eq!(m.hash_block(i, chunk), m.blocks[i as usize].hash);
                }
                assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
            }
        }
    }

    #[test]
    fn entries_hashed_elsewhere_make_the_same_manifest() {
        // What parallel workers do: each block hashed on its own at its place, pushed in
        // order. One block (whole, short), several, a short last block; some zero blocks.
        let bs = 4096usize;
        for len in [1, 1000, bs, 2 * bs, 3 * bs - 7, 6 * bs + 5] {
            let mut data = pseudo_random(len, len as u64);
            if len > 2 * bs {
                data[bs..2 * bs].fill(0);
            }
            let whole = build(&data, bs as u32);
            let mut b = ManifestBuilder::new(SessionId(1), bs as u32, 256, Compression::None);
            let count = data.chunks(bs).count();
            for (i, chunk) in data.chunks(bs).enumerate() {
                let pos = BlockPos {
                    offset: (i * bs) as u64,
                    whole_image: count == 1,
                };
                b.push_entry(chunk.len() as u32, BlockEntry::of(chunk, pos));
            }
            let m = b.finish().unwrap();
            assert_eq!(m, whole, "len {len}");
            assert_eq!(m.image_hash, *blake3::hash(&data).as_bytes(), "len {len}");
            assert_eq!(
                m.blocks.iter().filter(|e| e.zero).count(),
                usize::from(len > 2 * bs)
            );
        }
    }

    #[test]
    fn block_hash_depends_on_the_position() {
        let data = pseudo_random(4096, 3);
        let m = build(&[data.clone(), data.clone()].concat(), 4096);
        // The same bytes at another offset are another block.
        assert_ne!(m.blocks[0].hash, m.blocks[1].hash);
        assert_ne!(m.hash_block(1, &data), m.blocks[0].hash);
        // A one-block image: the block hash is the image hash.
        let one = build(&data, 4096);
        assert_eq!(one.blocks[0].hash, *blake3::hash(&data).as_bytes());
        // Positions no valid manifest produces hash to nothing a block can match, no panic.
        let odd = BlockPos {
            offset: 100,
            whole_image: false,
        };
        assert_ne!(block_hash(&data, odd), m.blocks[0].hash);
        let too_big = BlockPos {
            offset: 1024,
            whole_image: false,
        };
        let _ = block_hash(&data, too_big);
        let _ = block_hash(&[], too_big);
    }

    #[test]
    fn image_hash_not_matching_the_blocks_is_rejected() {
        let mut m = sample();
        m.image_hash[0] ^= 1;
        assert!(matches!(
            Manifest::decode(&m.encode()),
            Err(ManifestError::ImageHash)
        ));
        let mut m = sample();
        m.blocks[2].hash[5] ^= 1;
        assert!(matches!(
            Manifest::decode(&m.encode()),
            Err(ManifestError::ImageHash)
        ));
    }

    #[test]
    fn zero_flag_on_a_block_that_is_not_zero_is_rejected() {
        // A sender that flags a data block as zero, with the data's true hash: the hashes
        // still merge into the image hash, so only the zero check catches it.
        let mut m = sample();
        m.blocks[0].zero = true;
        assert_eq!(m.merged_image_hash(), m.image_hash);
        let decoded = Manifest::decode(&m.encode()).unwrap();
        assert!(matches!(
            decoded.check_zero_blocks(),
            Err(ManifestError::ZeroBlockHash { index: 0 })
        ));
        assert!(matches!(
            Manifest::build(
                m.session,
                m.image_size,
                m.block_size,
                m.symbol_size,
                m.compression,
                m.blocks.clone(),
                m.image_hash
            ),
            Err(ManifestError::ZeroBlockHash { index: 0 })
        ));
        // The short last block too.
        let mut m = sample();
        m.blocks[2].zero = true;
        assert!(matches!(
            m.check_zero_blocks(),
            Err(ManifestError::ZeroBlockHash { index: 2 })
        ));
        // A true zero block at any place, including a short last one, is accepted.
        let mut b = ManifestBuilder::new(SessionId(1), 2048, 1024, Compression::default());
        b.push_block(&[3u8; 2048]);
        b.push_block(&[0u8; 2048]);
        b.push_block(&[0u8; 1500]);
        let m = b.finish().unwrap();
        assert!(m.blocks[1].zero && m.blocks[2].zero);
        m.check_zero_blocks().unwrap();
        let mut b = ManifestBuilder::new(SessionId(1), 2048, 1024, Compression::default());
        b.push_block(&[0u8; 2000]);
        let only = b.finish().unwrap();
        assert!(only.blocks[0].zero);
        only.check_zero_blocks().unwrap();
    }

    #[test]
    fn block_size_must_be_a_power_of_two_of_at_least_1_kib() {
        for bad in [1000u32, 512, 3 << 10, (64 << 20) + 1024, 128 << 20] {
            let mut m = sample();
            m.block_size = bad;
            assert!(
                matches!(
                    Manifest::decode(&m.encode()),
                    Err(ManifestError::Invalid {
                        field: "block_size",
                        ..
                    })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn huge_count_does_not_allocate() {
        let mut bytes = sample().encode();
        // block_count field at offset 4+1+8+8+4+2+2 = 29
        bytes[29..33].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            Manifest::decode(&bytes),
            Err(ManifestError::Truncated { .. })
        ));
    }
}
