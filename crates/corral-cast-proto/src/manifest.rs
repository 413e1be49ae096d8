//! The signed manifest: what the image is, block by block, so every block can be verified
//! before it is written.
//!
//! Canonical binary encoding (all integers big-endian), version 1:
//!
//! ```text
//! magic "CRMF" | version u8 = 1 | session u64 | image_size u64 | block_size u32
//! | symbol_size u16 | compression u8 (0 none, 1 zstd) | zstd level i8 | block_count u32
//! | image_hash [32] | block_count × (flags u8 (bit 0 = all zero) | blake3 [32])
//! ```
//!
//! A [`SignedManifest`] is `manifest_len u32 | manifest bytes | public key [32] | signature [64]`;
//! the Ed25519 signature covers `"corral-cast-manifest-v1\0" ‖ manifest bytes` exactly.

use corral_model::SessionId;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

use crate::block::{Compression, MAX_SOURCE_SYMBOLS};
use crate::error::ManifestError;

const MAGIC: &[u8; 4] = b"CRMF";
const VERSION: u8 = 1;
const HEADER_LEN: usize = 4 + 1 + 8 + 8 + 4 + 2 + 1 + 1 + 4 + 32;
const ENTRY_LEN: usize = 33;
const SIGN_CONTEXT: &[u8] = b"corral-cast-manifest-v1\0";

/// Largest block size a manifest may declare (bounds every per-block allocation).
pub const MAX_BLOCK_SIZE: u32 = 64 << 20;
/// Default block size: 1 MiB.
pub const DEFAULT_BLOCK_SIZE: u32 = 1 << 20;
/// Default symbol size: fits one symbol plus headers in a 1500-byte Ethernet frame over IPv4.
pub const DEFAULT_SYMBOL_SIZE: u16 = 1440;

/// One block's line in the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockEntry {
    /// BLAKE3 of the *uncompressed* block.
    pub hash: [u8; 32],
    /// The block is all zero bytes and is never sent.
    pub zero: bool,
}

impl BlockEntry {
    /// Hashes one block and detects whether it is all zero.
    pub fn of(data: &[u8]) -> Self {
        BlockEntry {
            hash: *blake3::hash(data).as_bytes(),
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
        Ok(m)
    }

    fn validate(&self) -> Result<(), ManifestError> {
        if self.block_size == 0 || self.block_size > MAX_BLOCK_SIZE {
            return Err(ManifestError::Invalid {
                field: "block_size",
                value: u64::from(self.block_size),
                why: "must be 1..=64 MiB",
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

/// Hashes an image block by block, in order, to build its [`Manifest`].
#[derive(Debug)]
pub struct ManifestBuilder {
    session: SessionId,
    block_size: u32,
    symbol_size: u16,
    compression: Compression,
    blocks: Vec<BlockEntry>,
    image: blake3::Hasher,
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
            image: blake3::Hasher::new(),
            size: 0,
        }
    }

    /// Adds the next block (all but the last must be exactly `block_size` long). Returns its
    /// entry.
    pub fn push_block(&mut self, data: &[u8]) -> BlockEntry {
        let e = BlockEntry::of(data);
        self.image.update(data);
        self.size += data.len() as u64;
        self.blocks.push(e);
        e
    }

    /// Finishes and validates.
    pub fn finish(self) -> Result<Manifest, ManifestError> {
        Manifest::build(
            self.session,
            self.size,
            self.block_size,
            self.symbol_size,
            self.compression,
            self.blocks,
            *self.image.finalize().as_bytes(),
        )
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
