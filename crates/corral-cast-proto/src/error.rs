//! Error types, one enum per operation whose callers react differently.

/// Why a datagram could not be decoded or a packet could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Shorter than the fixed header.
    #[error("packet too short: {len} bytes, the header alone needs {need}")]
    TooShort {
        /// Bytes received.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The magic bytes are not corral cast's.
    #[error("bad magic {found:02x?}: not a corral cast packet")]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// A protocol version this build does not speak.
    #[error("unsupported protocol version {version} (this build speaks {supported})")]
    UnsupportedVersion {
        /// Version in the packet.
        version: u8,
        /// Version this build speaks.
        supported: u8,
    },
    /// An unknown packet type byte.
    #[error("unknown packet type 0x{kind:02x}")]
    UnknownType {
        /// The type byte.
        kind: u8,
    },
    /// A body ended before a field it must contain.
    #[error("{kind} packet truncated reading {field}: needs {need} more bytes, {left} left")]
    Truncated {
        /// Packet type name.
        kind: &'static str,
        /// Field being read.
        field: &'static str,
        /// Bytes the field needs.
        need: usize,
        /// Bytes left in the packet.
        left: usize,
    },
    /// Bytes left over after the last field.
    #[error("{kind} packet has {extra} trailing bytes")]
    TrailingBytes {
        /// Packet type name.
        kind: &'static str,
        /// How many.
        extra: usize,
    },
    /// A field holds a value outside its allowed range.
    #[error("{kind} packet field {field} has invalid value {value}")]
    InvalidField {
        /// Packet type name.
        kind: &'static str,
        /// Field name.
        field: &'static str,
        /// The value found.
        value: u64,
    },
    /// A text field is not UTF-8.
    #[error("{kind} packet field {field} is not valid UTF-8")]
    InvalidUtf8 {
        /// Packet type name.
        kind: &'static str,
        /// Field name.
        field: &'static str,
    },
    /// The caller's buffer is too small for the encoded packet.
    #[error("buffer too small: packet needs {need} bytes, buffer has {have}")]
    BufferTooSmall {
        /// Encoded length.
        need: usize,
        /// Buffer length.
        have: usize,
    },
}

/// Why a manifest could not be built, decoded or verified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Input ended before a field.
    #[error("manifest truncated reading {field}: needs {need} bytes, {left} left")]
    Truncated {
        /// Field being read.
        field: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes left.
        left: usize,
    },
    /// Wrong magic bytes.
    #[error("not a corral cast manifest (bad magic)")]
    BadMagic,
    /// Unknown encoding version.
    #[error("unsupported manifest version {version}")]
    UnsupportedVersion {
        /// The version byte found.
        version: u8,
    },
    /// Bytes after the last field.
    #[error("manifest has {extra} trailing bytes")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// A parameter is out of range or inconsistent with another.
    #[error("invalid manifest field {field}: {value} ({why})")]
    Invalid {
        /// Field name.
        field: &'static str,
        /// Value found.
        value: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Block count does not match image size and block size.
    #[error(
        "manifest lists {listed} blocks but an image of {image_size} bytes in blocks of {block_size} has {expected}"
    )]
    BlockCount {
        /// Blocks in the list.
        listed: u64,
        /// Blocks implied by the sizes.
        expected: u64,
        /// Image size.
        image_size: u64,
        /// Block size.
        block_size: u32,
    },
    /// The block hashes do not merge into the image hash.
    #[error("manifest block hashes do not make up its image hash")]
    ImageHash,
    /// A block flagged as all zero does not have the hash of zeros.
    #[error("manifest flags block {index} as all zero but its hash is not the hash of zeros")]
    ZeroBlockHash {
        /// The block's index.
        index: u32,
    },
    /// The signing key bytes are not a valid Ed25519 public key.
    #[error("manifest public key is not a valid Ed25519 key")]
    BadPublicKey,
    /// The signature does not verify against the embedded key.
    #[error("manifest signature does not verify")]
    BadSignature,
    /// Signed by a key other than the trusted one.
    #[error("manifest signed by untrusted key {found}, expected {expected}")]
    UntrustedKey {
        /// Hex of the key that signed.
        found: String,
        /// Hex of the trusted key.
        expected: String,
    },
    /// The bytes do not hash to the value the announcement promised.
    #[error("manifest bytes hash to {found}, announcement promised {expected}")]
    HashMismatch {
        /// Hex of the hash of the bytes received.
        found: String,
        /// Hex of the announced hash.
        expected: String,
    },
    /// The manifest is for another session.
    #[error("manifest is for session {found}, expected {expected}")]
    WrongSession {
        /// Session in the manifest.
        found: corral_model::SessionId,
        /// Session expected.
        expected: corral_model::SessionId,
    },
}

/// Why a block could not be encoded, rebuilt or verified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// Symbol size is zero or odd (Reed–Solomon shards must have an even, non-zero size).
    #[error("invalid symbol size {symbol_size}: must be even and non-zero")]
    SymbolSize {
        /// The size given.
        symbol_size: u16,
    },
    /// The block needs more source symbols than the codec supports.
    #[error("block {block}: {payload_len}-byte payload needs {k} symbols, max is {max}")]
    TooManySymbols {
        /// Block index.
        block: u32,
        /// Payload length.
        payload_len: usize,
        /// Symbols needed.
        k: usize,
        /// Maximum supported.
        max: usize,
    },
    /// zstd failed.
    #[error("block {block}: zstd {op} failed: {message}")]
    Zstd {
        /// Block index.
        block: u32,
        /// "compress" or "decompress".
        op: &'static str,
        /// The library's message.
        message: String,
    },
    /// Reed–Solomon encoding or decoding failed.
    #[error("block {block}: reed-solomon {op} failed: {message}")]
    ReedSolomon {
        /// Block index.
        block: u32,
        /// "encode" or "decode".
        op: &'static str,
        /// The library's message.
        message: String,
    },
    /// Decoded length differs from the manifest's block length.
    #[error("block {block}: decoded {got} bytes, manifest says {expected}")]
    Length {
        /// Block index.
        block: u32,
        /// Length decoded.
        got: usize,
        /// Length expected.
        expected: usize,
    },
    /// The BLAKE3 hash of the decoded block differs from the manifest's.
    #[error("block {block}: hash mismatch (got {got}, manifest says {expected})")]
    HashMismatch {
        /// Block index.
        block: u32,
        /// Hex of the hash computed.
        got: String,
        /// Hex of the manifest's hash.
        expected: String,
    },
    /// The serialised encoded block is malformed.
    #[error("block {block}: malformed encoded block: {why} (len {len})")]
    Malformed {
        /// Block index.
        block: u32,
        /// What is wrong.
        why: &'static str,
        /// Input length.
        len: usize,
    },
    /// The block index is past the end of the image.
    #[error("block {block} out of range: image has {count} blocks")]
    OutOfRange {
        /// Block index.
        block: u32,
        /// Blocks in the image.
        count: u32,
    },
    /// The receiver has no manifest yet, so nothing can be verified.
    #[error("block {block}: no manifest yet, cannot verify")]
    NoManifest {
        /// Block index.
        block: u32,
    },
}

/// A configuration value the state machines cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A field is out of range.
    #[error("invalid config {field}: {why}")]
    Invalid {
        /// Field name.
        field: &'static str,
        /// What is wrong.
        why: &'static str,
    },
}
