//! The wire protocol between the master (client) and the receiver (`corral sync serve`).
//!
//! Every message is one frame: a 4-byte big-endian length, then the message encoded with
//! `postcard`. The length's top bit ([`FRAME_ZSTD`]) says the body is a zstd frame: bodies of
//! at least [`FRAME_COMPRESS_MIN`] bytes other than file data (manifest batches, signatures)
//! are compressed, which shrinks a manifest of paths and metadata several times. The first message each way is a `Hello` carrying [`VERSION`]; a peer that
//! speaks another version is refused. File data travels in `Data` frames, zstd-compressed
//! when a sample of it compresses (see [`compress`]), raw otherwise.
//!
//! Conversation (client → server unless noted):
//! 1. `Hello` / server `Hello`.
//! 2. `Scan` with the run's range digest key and `k` (the server starts its scan, from its
//!    hash cache). Once it has scanned, a server whose manifest has at most [`WHOLE_MAX`]
//!    entries sends all of them, `Entries`… `EntriesEnd`, and the exchange is over (the
//!    client plans while it still hashes, and files the server lacks are hashed as they are
//!    sent). Otherwise it sends server `RangeDigests`… `RangesEnd` (one digest per range of
//!    its manifest, see [`crate::ranges`]) without waiting for anything; when some of its
//!    ranges match none of the client's, the client sends `Wanted` (a bitmap of those
//!    ranges) / server `Entries`… `EntriesEnd` (its entries in them). A child that holds
//!    every range of the client's is asked nothing more.
//! 3. `SigRequest(paths)` / server `Sigs` (one [`Signature`] per path, same order), in
//!    batches, for the changed small files the child holds an old copy of. The first may
//!    follow `Wanted` at once, before the client has the listing: the files that changed
//!    on the client since its last scan (an empty signature for a path the server has no
//!    old copy of); the others ask only for what it did not cover. Then
//!    `RangeSigRequest(ranges)` / server `Sigs`, in batches, for the byte ranges of the
//!    child's old copies of changed large files that the runs of chunks it lacks replace.
//! 4. `Apply(op)` for each planned step; an `Apply(Write)` whose chunks the child does not
//!    hold is followed by one `Data`, `Delta` or `RangeDelta` frame per missing chunk, in
//!    order (a `Delta` only for a small file whose signature the child sent, a `RangeDelta`
//!    only against a range whose signature it sent).
//! 5. `Finish` / server `Report`, or `Bye` (dry run).
//!
//! This module is pure: it encodes and decodes bytes and checks every decoded path.

use serde::{Deserialize, Serialize};

use crate::delta::{BLOCK_MAX, DeltaOp, Signature};
use crate::error::ProtoError;
use crate::manifest::{Entry, Hash, check_rel_path};
use crate::planner::Op;

/// Protocol version spoken by this build.
pub const VERSION: u32 = 8;
/// Largest frame accepted (a chunk is at most 256 KiB; manifests come in batches).
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

/// Options for a run, sent by the client in `Hello`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunOptions {
    /// Keep replaced and deleted files under `BACKUP/RUN_ID/` (a path beneath the root).
    pub backup: Option<(String, String)>,
    /// Do not set owners (the receiver is not root).
    pub ignore_owner: bool,
    /// Map owners by number only, never by name.
    pub numeric_ids: bool,
}

/// What a receiver did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Plan steps carried out.
    pub ops: u64,
    /// Files written.
    pub files_written: u64,
    /// Bytes written to files on the child.
    pub bytes_written: u64,
    /// Bytes received as data from the master (uncompressed).
    pub literal_bytes: u64,
    /// Bytes copied from data the child already had.
    pub reused_bytes: u64,
    /// Bytes kept in place by a copy-on-write clone of the old file.
    pub cloned_bytes: u64,
    /// Steps that failed: path and reason.
    pub failed: Vec<(String, String)>,
}

/// A protocol message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message each way.
    Hello {
        /// Protocol version.
        version: u32,
        /// Options (ignored from the server).
        options: RunOptions,
    },
    /// Asks for the child's manifest; a child of more than [`WHOLE_MAX`] entries answers
    /// with the digests of its ranges made with this key and `k` (see [`crate::ranges`]).
    Scan {
        /// Key of the keyed BLAKE3 digests, random per run.
        key: [u8; 32],
        /// Expected entries per range (a range starts where a path hashes to 0 mod `k`).
        k: u32,
    },
    /// A batch of the child's manifest.
    Entries(Vec<Entry>),
    /// End of the child's manifest.
    EntriesEnd,
    /// One plan step.
    Apply(Op),
    /// One chunk of file data; must hash to `hash` once decoded with [`decompress`].
    Data {
        /// BLAKE3 of the uncompressed bytes.
        hash: Hash,
        /// The bytes as made by [`compress`]: a tag byte, then raw bytes or a zstd frame
        /// (encoded as one byte string, not a sequence of numbers).
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// Asks for the signatures of the child's old copies of these files.
    SigRequest(Vec<String>),
    /// The signatures asked for, in the same order (`block == 0`: no usable copy).
    Sigs(Vec<Signature>),
    /// One chunk of file data as a delta against the child's old copy of the same path;
    /// must hash to `hash` once rebuilt.
    Delta {
        /// BLAKE3 of the rebuilt bytes.
        hash: Hash,
        /// Block size of the signature the delta was made against.
        block: u32,
        /// Block copies and literals.
        ops: Vec<DeltaOp>,
        /// The literal bytes, encoded as by [`compress`].
        #[serde(with = "serde_bytes")]
        literals: Vec<u8>,
    },
    /// All steps sent.
    Finish,
    /// What the server did.
    Report(Report),
    /// The server failed as a whole.
    Error(String),
    /// End of a conversation without changes.
    Bye,
    /// A batch of the child's range digests, in manifest order (see [`crate::ranges`]): its
    /// first answer after its scan when its manifest is larger than [`WHOLE_MAX`] entries
    /// (a smaller one is sent whole instead, `Entries`… `EntriesEnd`).
    RangeDigests(Vec<crate::ranges::Digest>),
    /// End of the child's range digests.
    RangesEnd,
    /// The master's request for the child's entries of some of its ranges: bit `j % 8` of
    /// byte `j / 8` set for child range `j`; they come back as `Entries`… `EntriesEnd`.
    Wanted(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Asks for the signatures of byte ranges of the child's old copies of large files:
    /// path, offset, length (at most [`MAX_BASE`]); answered by `Sigs`, one per range, in
    /// the same order (`block == 0`: no such range).
    RangeSigRequest(Vec<(String, u64, u32)>),
    /// One chunk of a large file as a delta against a byte range (offset, length) of the
    /// child's old copy of the same path, whose signature the child sent; must hash to
    /// `hash` once rebuilt.
    RangeDelta {
        /// BLAKE3 of the rebuilt bytes.
        hash: Hash,
        /// The range of the old copy the delta copies blocks from.
        base: (u64, u32),
        /// Block size of the signature the delta was made against.
        block: u32,
        /// Block copies and literals.
        ops: Vec<DeltaOp>,
        /// The literal bytes, encoded as by [`compress`].
        #[serde(with = "serde_bytes")]
        literals: Vec<u8>,
    },
    /// `Apply(Write(entry))` for a large file the child has an old copy of, its chunk list
    /// given as `edits` of the old copy's (the list itself is 36 bytes a chunk: a 1 GiB
    /// image's is half a megabyte, an edit of it a few dozen edits); `entry` comes with no
    /// chunks.
    ApplyEdit {
        /// The file, without its chunk list.
        entry: Entry,
        /// Its chunk list as edits of the old copy's.
        edits: Vec<ChunkEdit>,
    },
    /// In the child's listing (between `Entries` and `EntriesEnd`): a large file with at
    /// least [`crate::ranges::CHUNK_DIGESTS_MIN`] chunks, its chunk list as chunk-range
    /// digests ([`crate::ranges::chunk_digests`], keyed with the run's key); `entry` comes
    /// with no chunks.
    ListedChunks {
        /// The file, without its chunk list.
        entry: Entry,
        /// Per chunk range: its number of chunks and its digest.
        ranges: Vec<(u32, crate::ranges::Digest)>,
    },
    /// The master's request for the chunks of the child's chunk ranges it holds no copy of:
    /// per `ListedChunks` path (in the order they came), a bitmap of its ranges.
    WantedChunks(Vec<(String, Vec<u8>)>),
    /// The chunks asked for: per path of `WantedChunks`, in order, the chunks of its wanted
    /// ranges, in order.
    ChunkLists(Vec<Vec<crate::manifest::Chunk>>),
}

/// One piece of a chunk list given as edits of the child's old copy's ([`Message::ApplyEdit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkEdit {
    /// The old copy's chunks `from..from + count`, in order.
    Keep {
        /// First chunk kept.
        from: u32,
        /// Chunks kept.
        count: u32,
    },
    /// A chunk of the new content.
    New(crate::manifest::Chunk),
}

/// Most chunks a chunk list rebuilt from [`ChunkEdit`]s may have: what a frame carries of a
/// list sent whole (36 bytes a chunk), so edits never make a larger one.
pub const MAX_EDITED_CHUNKS: usize = MAX_FRAME / 36;

/// The chunk list `new` as edits of `old`: runs of old chunks kept, in order, and the new
/// chunks between them. A chunk that is not the old copy's next one is looked for elsewhere
/// in it (the place nearest to the old copy's next), so a moved run is kept too.
pub fn chunk_edits(
    new: &[crate::manifest::Chunk],
    old: &[crate::manifest::Chunk],
) -> Vec<ChunkEdit> {
    let mut at: std::collections::HashMap<(Hash, u32), Vec<usize>> =
        std::collections::HashMap::new();
    for (i, c) in old.iter().enumerate() {
        at.entry((c.hash, c.len)).or_default().push(i);
    }
    let mut out: Vec<ChunkEdit> = Vec::new();
    let mut next = 0usize;
    for c in new {
        let from = if old.get(next) == Some(c) {
            Some(next)
        } else {
            at.get(&(c.hash, c.len))
                .and_then(|v| v.iter().copied().min_by_key(|i| i.abs_diff(next)))
        };
        match from {
            Some(i) => {
                match out.last_mut() {
                    Some(ChunkEdit::Keep { from, count })
                        if *from as usize + *count as usize == i =>
                    {
                        *count += 1
                    }
                    _ => out.push(ChunkEdit::Keep {
                        from: i as u32,
                        count: 1,
                    }),
                }
                next = i + 1;
            }
            None => out.push(ChunkEdit::New(*c)),
        }
    }
    out
}

/// The chunk list `edits` make of `old` (a file's old copy's chunks), which must add up to
/// `size` bytes and have at most [`MAX_EDITED_CHUNKS`] chunks.
pub fn apply_edits(
    old: &[crate::manifest::Chunk],
    edits: &[ChunkEdit],
    size: u64,
) -> Result<Vec<crate::manifest::Chunk>, ProtoError> {
    let bad = |what: &str| ProtoError::Decode(format!("chunk list edits: {what}"));
    let mut out = Vec::new();
    let mut total = 0u64;
    for e in edits {
        let add: &[crate::manifest::Chunk] = match e {
            ChunkEdit::Keep { from, count } => (*from as usize)
                .checked_add(*count as usize)
                .and_then(|end| old.get(*from as usize..end))
                .ok_or_else(|| bad("past the old copy's chunks"))?,
            ChunkEdit::New(c) => std::slice::from_ref(c),
        };
        if out.len() + add.len() > MAX_EDITED_CHUNKS {
            return Err(bad("too many chunks"));
        }
        total = add
            .iter()
            .try_fold(total, |t, c| t.checked_add(u64::from(c.len)))
            .filter(|t| *t <= size)
            .ok_or_else(|| bad("longer than the file"))?;
        out.extend_from_slice(add);
    }
    if total != size {
        return Err(bad("shorter than the file"));
    }
    Ok(out)
}

/// Largest range of an old copy a `RangeSigRequest` may name (and a `RangeDelta` build on):
/// what the child reads and keeps in memory for one.
pub const MAX_BASE: u32 = 4 << 20;

/// A child manifest of at most this many entries is sent whole right after the child's scan
/// (an empty or new destination: the master need not finish hashing before it plans).
pub const WHOLE_MAX: usize = 256;

/// Index of `Message::Data` among the variants (its first byte in postcard).
const DATA_VARIANT: u8 = 5;

/// Flag in a frame's length word: the body is zstd-compressed.
pub const FRAME_ZSTD: u32 = 1 << 31;
/// Bodies this large (other than file data, compressed on its own) are compressed.
pub const FRAME_COMPRESS_MIN: usize = 1024;

/// Encodes one frame, uncompressed.
pub fn encode(msg: &Message) -> Result<Vec<u8>, ProtoError> {
    let body = postcard::to_stdvec(msg).map_err(|e| ProtoError::Encode(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(ProtoError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Encodes one frame as [`Framed`] sends it: compressed when that pays (see the module doc).
pub fn encode_wire(msg: &Message) -> Result<Vec<u8>, ProtoError> {
    let body = postcard::to_stdvec(msg).map_err(|e| ProtoError::Encode(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(ProtoError::TooLarge(body.len()));
    }
    let (flag, body) = match msg {
        Message::Data { .. } | Message::Delta { .. } | Message::RangeDelta { .. } => (0, body),
        _ if body.len() >= FRAME_COMPRESS_MIN => match zstd::bulk::compress(&body, 3) {
            Ok(z) if z.len() < body.len() => (FRAME_ZSTD, z),
            _ => (0, body),
        },
        _ => (0, body),
    };
    let mut out = Vec::with_capacity(4 + body.len());
    let n = u32::try_from(body.len()).unwrap_or(u32::MAX) | flag;
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Length of the frame body that follows this header (without the compression flag).
pub fn frame_len(header: [u8; 4]) -> Result<usize, ProtoError> {
    let n = (u32::from_be_bytes(header) & !FRAME_ZSTD) as usize;
    if n > MAX_FRAME {
        return Err(ProtoError::TooLarge(n));
    }
    Ok(n)
}

/// Whether the frame body that follows this header is compressed.
pub fn frame_compressed(header: [u8; 4]) -> bool {
    u32::from_be_bytes(header) & FRAME_ZSTD != 0
}

/// Decodes one frame body and checks it: every path must be a plain relative path.
pub fn decode(body: &[u8]) -> Result<Message, ProtoError> {
    let msg: Message = postcard::from_bytes(body).map_err(|e| ProtoError::Decode(e.to_string()))?;
    validate(&msg)?;
    Ok(msg)
}

/// Decodes a compressed frame body (at most [`MAX_FRAME`] bytes once decompressed).
pub fn decode_compressed(z: &[u8]) -> Result<Message, ProtoError> {
    use std::io::Read;
    let d = zstd::stream::read::Decoder::new(z).map_err(ProtoError::Io)?;
    let mut body = Vec::new();
    d.take(MAX_FRAME as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| ProtoError::Decode(format!("zstd frame: {e}")))?;
    if body.len() > MAX_FRAME {
        return Err(ProtoError::TooLarge(body.len()));
    }
    decode(&body)
}

fn check(p: &str) -> Result<(), ProtoError> {
    if check_rel_path(p) {
        Ok(())
    } else {
        Err(ProtoError::BadPath(p.to_string()))
    }
}

fn validate(msg: &Message) -> Result<(), ProtoError> {
    match msg {
        Message::Entries(es) => es.iter().try_for_each(check_entry),
        Message::Apply(op) => {
            check(op.path())?;
            match op {
                Op::Link { path, target } => {
                    check(target)?;
                    if path.is_empty() || target.is_empty() {
                        return Err(ProtoError::BadPath(path.clone()));
                    }
                    Ok(())
                }
                Op::Mkdir(e) | Op::Write(e) | Op::Special(e) | Op::Meta(e) | Op::DirMeta(e) => {
                    check_entry(e)?;
                    // Only the root's metadata may be set on "" and it is a directory.
                    if e.path.is_empty() && !matches!(op, Op::DirMeta(_)) {
                        return Err(ProtoError::BadPath(String::new()));
                    }
                    Ok(())
                }
                Op::Replace { path } | Op::Delete { path, .. } => {
                    if path.is_empty() {
                        return Err(ProtoError::BadPath(String::new()));
                    }
                    Ok(())
                }
            }
        }
        Message::SigRequest(paths) => paths.iter().try_for_each(|p| {
            check(p)?;
            if p.is_empty() {
                return Err(ProtoError::BadPath(String::new()));
            }
            Ok(())
        }),
        Message::Sigs(sigs) => {
            for s in sigs {
                let ok = if s.block == 0 {
                    s.blocks.is_empty()
                } else {
                    s.block <= BLOCK_MAX
                        && s.len <= u64::from(MAX_BASE).max(crate::manifest::CHUNK_THRESHOLD)
                        && s.blocks.len() as u64 == s.len.div_ceil(u64::from(s.block))
                };
                if !ok {
                    return Err(ProtoError::Decode("inconsistent signature".into()));
                }
            }
            Ok(())
        }
        Message::Scan { k, .. } if *k == 0 || *k > crate::ranges::MAX_K => {
            Err(ProtoError::Decode(format!("range parameter k = {k}")))
        }
        Message::Delta { block, .. } if *block == 0 || *block > BLOCK_MAX => {
            Err(ProtoError::Decode(format!("delta block size {block}")))
        }
        Message::RangeDelta {
            block,
            base: (_, len),
            ..
        } if *block == 0 || *block > BLOCK_MAX || *len == 0 || *len > MAX_BASE => Err(
            ProtoError::Decode(format!("range delta block size {block}, base length {len}")),
        ),
        Message::ApplyEdit { entry, edits } => {
            check(&entry.path)?;
            let ok = !entry.path.is_empty()
                && entry.kind == crate::manifest::Kind::File
                && entry.content.as_ref().is_some_and(|c| c.chunks.is_empty())
                && edits.len() <= MAX_EDITED_CHUNKS
                && edits.iter().all(|e| match e {
                    ChunkEdit::Keep { count, .. } => *count > 0,
                    ChunkEdit::New(c) => c.len > 0 && c.len <= crate::scan::CDC_MAX,
                });
            if ok {
                Ok(())
            } else {
                Err(ProtoError::BadChunks(entry.path.clone()))
            }
        }
        Message::ListedChunks { entry, ranges } => {
            check(&entry.path)?;
            let ok = !entry.path.is_empty()
                && entry.kind == crate::manifest::Kind::File
                && entry.content.as_ref().is_some_and(|c| c.chunks.is_empty())
                && ranges.iter().all(|(n, _)| *n > 0)
                && ranges.iter().map(|(n, _)| *n as usize).sum::<usize>() <= MAX_EDITED_CHUNKS;
            if ok {
                Ok(())
            } else {
                Err(ProtoError::BadChunks(entry.path.clone()))
            }
        }
        Message::WantedChunks(asks) => asks.iter().try_for_each(|(p, bits)| {
            check(p)?;
            if p.is_empty() || bits.len() > MAX_EDITED_CHUNKS / 8 + 1 {
                return Err(ProtoError::BadPath(p.clone()));
            }
            Ok(())
        }),
        Message::ChunkLists(lists) => {
            let ok = lists.iter().all(|l| {
                l.len() <= MAX_EDITED_CHUNKS
                    && l.iter().all(|c| c.len > 0 && c.len <= crate::scan::CDC_MAX)
            });
            if ok {
                Ok(())
            } else {
                Err(ProtoError::Decode("chunk lists out of bounds".into()))
            }
        }
        Message::RangeSigRequest(asks) => asks.iter().try_for_each(|(p, _, len)| {
            check(p)?;
            if p.is_empty() {
                return Err(ProtoError::BadPath(String::new()));
            }
            if *len == 0 || *len > MAX_BASE {
                return Err(ProtoError::Decode(format!(
                    "signature range of {len} bytes"
                )));
            }
            Ok(())
        }),
        Message::Hello { options, .. } => {
            if let Some((dir, run)) = &options.backup {
                check(dir)?;
                if dir.is_empty() || run.is_empty() || !check_rel_path(run) || run.contains('/') {
                    return Err(ProtoError::BadPath(format!("{dir}/{run}")));
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn check_entry(e: &Entry) -> Result<(), ProtoError> {
    check(&e.path)?;
    if let crate::manifest::Kind::Hardlink(t) = &e.kind {
        check(t)?;
    }
    if let Some(c) = &e.content {
        // Chunk lengths bound what a receiver allocates for one chunk.
        let bad = if c.chunks.is_empty() {
            c.size > crate::manifest::CHUNK_THRESHOLD
        } else {
            c.chunks
                .iter()
                .any(|c| c.len == 0 || c.len > crate::scan::CDC_MAX)
                || c.chunks.iter().map(|c| u64::from(c.len)).sum::<u64>() != c.size
        };
        if bad {
            return Err(ProtoError::BadChunks(e.path.clone()));
        }
    }
    Ok(())
}

/// What [`Framed::recv_data`] read.
#[derive(Debug)]
pub enum Frame {
    /// A `Data` frame, its payload decoded (not yet checked against `hash`).
    Data {
        /// The hash the frame names.
        hash: Hash,
        /// The chunk's bytes.
        bytes: Vec<u8>,
    },
    /// Any other message.
    Other(Message),
}

/// A reader that can tell how many bytes it holds read ahead: a read of at most that many
/// never waits for the stream. The receiver's reader thread hands on what it has decoded
/// when this reaches zero, before a read that may block (fewer wake-ups than one hand-off
/// per frame, and never a frame held back while the master waits for an answer).
pub trait Buffered {
    /// Bytes available without a read from the underlying stream.
    fn buffered(&self) -> usize;
}

impl<T: std::io::Read> Buffered for std::io::BufReader<T> {
    fn buffered(&self) -> usize {
        self.buffer().len()
    }
}

impl Buffered for &[u8] {
    fn buffered(&self) -> usize {
        self.len()
    }
}

impl<T: Buffered + ?Sized> Buffered for &mut T {
    fn buffered(&self) -> usize {
        (**self).buffered()
    }
}

/// Reads and writes frames on a byte stream (blocking).
pub struct Framed<R, W> {
    r: R,
    w: W,
    /// Bytes read, frames included.
    pub bytes_in: u64,
    /// Bytes written, frames included.
    pub bytes_out: u64,
}

impl<R, W> std::fmt::Debug for Framed<R, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Framed")
            .field("bytes_in", &self.bytes_in)
            .field("bytes_out", &self.bytes_out)
            .finish()
    }
}

impl<R: std::io::Read, W: std::io::Write> Framed<R, W> {
    /// Wraps a reader and a writer.
    pub fn new(r: R, w: W) -> Self {
        Framed {
            r,
            w,
            bytes_in: 0,
            bytes_out: 0,
        }
    }
    /// The receiving half and the sending half of this stream, each a `Framed` of its own
    /// (for a reader thread beside a writer; their byte counts are their own).
    #[allow(clippy::type_complexity)]
    pub fn halves(
        &mut self,
    ) -> (
        Framed<&mut R, std::io::Sink>,
        Framed<std::io::Empty, &mut W>,
    ) {
        (
            Framed::new(&mut self.r, std::io::sink()),
            Framed::new(std::io::empty(), &mut self.w),
        )
    }
    /// Bytes the reader holds read ahead (see [`Buffered`]).
    pub fn buffered(&self) -> usize
    where
        R: Buffered,
    {
        self.r.buffered()
    }
    /// Sends one message (buffered; see [`Framed::flush`]).
    pub fn send(&mut self, msg: &Message) -> Result<(), ProtoError> {
        let f = encode_wire(msg)?;
        self.bytes_out += f.len() as u64;
        self.w.write_all(&f).map_err(ProtoError::Io)
    }
    /// Sends a `Data` frame: the same bytes as `send(&Message::Data { hash, payload })`
    /// (uncompressed frame, postcard body), written from `payload` without building the
    /// message or the frame in memory first.
    pub fn send_data(&mut self, hash: &Hash, payload: &[u8]) -> Result<(), ProtoError> {
        let mut head = [0u8; 4 + 1 + 32 + 10];
        head[4] = DATA_VARIANT;
        head[5..37].copy_from_slice(&hash.0);
        let mut n = 37;
        let mut len = payload.len();
        loop {
            let b = (len & 0x7f) as u8;
            len >>= 7;
            if len == 0 {
                head[n] = b;
                n += 1;
                break;
            }
            head[n] = b | 0x80;
            n += 1;
        }
        let body = n - 4 + payload.len();
        if body > MAX_FRAME {
            return Err(ProtoError::TooLarge(body));
        }
        head[..4].copy_from_slice(&u32::try_from(body).unwrap_or(u32::MAX).to_be_bytes());
        self.w.write_all(&head[..n]).map_err(ProtoError::Io)?;
        self.w.write_all(payload).map_err(ProtoError::Io)?;
        self.bytes_out += (n + payload.len()) as u64;
        Ok(())
    }
    /// Flushes the writer.
    pub fn flush(&mut self) -> Result<(), ProtoError> {
        self.w.flush().map_err(ProtoError::Io)
    }
    /// Receives the next frame where a chunk's data is expected: a `Data` frame is read
    /// straight into the chunk's buffer (decompressed, at most `max` bytes) instead of
    /// through a [`Message`]; any other frame is decoded as by [`Framed::recv`].
    pub fn recv_data(&mut self, max: usize) -> Result<Frame, ProtoError> {
        use std::io::Read;
        let mut h = [0u8; 4];
        self.r.read_exact(&mut h).map_err(ProtoError::Io)?;
        let n = frame_len(h)?;
        let mut first = [0u8; 1];
        if frame_compressed(h) || n == 0 {
            return self.recv_body(h, n, &[]).and_then(|m| data_frame(m, max));
        }
        self.r.read_exact(&mut first).map_err(ProtoError::Io)?;
        if first[0] != DATA_VARIANT || n < 1 + 32 + 1 + 1 {
            return self
                .recv_body(h, n, &first)
                .and_then(|m| data_frame(m, max));
        }
        let bad = |what: &str| ProtoError::Decode(format!("data frame: {what}"));
        let mut hash = [0u8; 32];
        self.r.read_exact(&mut hash).map_err(|_| bad("truncated"))?;
        // The payload's length: a postcard varint (at most 10 bytes).
        let (mut len, mut shift, mut used) = (0u64, 0u32, 1 + 32);
        loop {
            let mut b = [0u8; 1];
            self.r.read_exact(&mut b).map_err(ProtoError::Io)?;
            used += 1;
            if shift > 63 || used > n {
                return Err(bad("bad length"));
            }
            len |= u64::from(b[0] & 0x7f) << shift;
            if b[0] & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        if len == 0 || len.checked_add(used as u64) != Some(n as u64) {
            return Err(bad("length does not match the frame"));
        }
        let mut tag = [0u8; 1];
        self.r.read_exact(&mut tag).map_err(ProtoError::Io)?;
        let rest = len as usize - 1;
        let bytes = match tag[0] {
            RAW if rest > max => {
                return Err(ProtoError::Decode(format!(
                    "data: {rest} bytes where at most {max} were expected"
                )));
            }
            RAW | ZSTD => {
                let mut v = Vec::with_capacity(rest);
                (&mut self.r)
                    .take(rest as u64)
                    .read_to_end(&mut v)
                    .map_err(ProtoError::Io)?;
                if v.len() != rest {
                    return Err(ProtoError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
                if tag[0] == ZSTD { unzstd(&v, max)? } else { v }
            }
            t => return Err(ProtoError::Decode(format!("data: unknown encoding {t}"))),
        };
        self.bytes_in += 4 + n as u64;
        Ok(Frame::Data {
            hash: Hash(hash),
            bytes,
        })
    }

    /// Reads the rest of a frame body of `n` bytes whose first bytes `got` were read
    /// already, and decodes it.
    fn recv_body(&mut self, h: [u8; 4], n: usize, got: &[u8]) -> Result<Message, ProtoError> {
        let mut body = vec![0u8; n];
        body[..got.len()].copy_from_slice(got);
        self.r
            .read_exact(&mut body[got.len()..])
            .map_err(ProtoError::Io)?;
        self.bytes_in += 4 + n as u64;
        if frame_compressed(h) {
            decode_compressed(&body)
        } else {
            decode(&body)
        }
    }

    /// Receives one message.
    pub fn recv(&mut self) -> Result<Message, ProtoError> {
        let mut h = [0u8; 4];
        self.r.read_exact(&mut h).map_err(ProtoError::Io)?;
        let n = frame_len(h)?;
        let mut body = vec![0u8; n];
        self.r.read_exact(&mut body).map_err(ProtoError::Io)?;
        self.bytes_in += 4 + n as u64;
        if frame_compressed(h) {
            decode_compressed(&body)
        } else {
            decode(&body)
        }
    }
}

const RAW: u8 = 0;
const ZSTD: u8 = 1;
/// Chunks up to this size are compressed whole to see whether it pays.
const SAMPLE: usize = 8 * 1024;

/// zstd level of file data: the fastest of the regular levels (the data is sent once).
const DATA_LEVEL: i32 = 1;

thread_local! {
    /// One compression context per thread, reused for every chunk: a context costs more to
    /// set up than a small file costs to compress.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    /// One decompression context per thread, reused likewise.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// `data` compressed at [`DATA_LEVEL`] after a tag byte, with this thread's context.
fn zstd_tagged(data: &[u8]) -> Option<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(DATA_LEVEL).ok();
        }
        let c = c.as_mut()?;
        let mut out = std::io::Cursor::new(Vec::with_capacity(
            1 + zstd::zstd_safe::compress_bound(data.len()),
        ));
        out.get_mut().push(ZSTD);
        out.set_position(1);
        c.compress_to_buffer(data, &mut out).ok()?;
        Some(out.into_inner())
    })
}

/// Whether `data` is worth compressing: small data is tried whole by the caller; for larger
/// data a sample from its middle must shrink by at least 10% at zstd level 1. Random or
/// already-compressed content (half of a typical system tree by bytes) then costs a copy, not
/// a compression and a decompression.
fn compressible(data: &[u8]) -> bool {
    if data.len() <= SAMPLE {
        return true;
    }
    let mid = data.len() / 2 - SAMPLE / 2;
    let sample = &data[mid..mid + SAMPLE];
    zstd_tagged(sample).is_some_and(|z| (z.len() - 1) * 10 < sample.len() * 9)
}

/// Encodes a chunk for a `Data` frame: a tag byte, then a zstd frame if that is smaller,
/// else the raw bytes.
pub fn compress(data: &[u8]) -> Vec<u8> {
    if data.len() >= 64
        && compressible(data)
        && let Some(z) = zstd_tagged(data)
        && z.len() <= data.len()
    {
        return z;
    }
    let mut out = Vec::with_capacity(1 + data.len());
    out.push(RAW);
    out.extend_from_slice(data);
    out
}

/// [`compress`] for a chunk read into `buf[1..]` (`buf[0]` is reserved for the tag): when
/// the chunk is sent raw, `buf` itself becomes the payload, without a copy.
pub fn compress_read(mut buf: Vec<u8>) -> Vec<u8> {
    let Some(tag) = buf.first_mut() else {
        return vec![RAW];
    };
    *tag = RAW;
    let data = &buf[1..];
    if data.len() >= 64
        && compressible(data)
        && let Some(z) = zstd_tagged(data)
        && z.len() <= data.len()
    {
        return z;
    }
    buf
}

/// A chunk read into `buf[1..]` (`buf[0]` is reserved for the tag) as a raw payload,
/// without a copy (`--compress never`, or `auto` having measured raw to be faster).
pub fn raw_read(mut buf: Vec<u8>) -> Vec<u8> {
    match buf.first_mut() {
        Some(tag) => *tag = RAW,
        None => buf.push(RAW),
    }
    buf
}

/// Decodes a `Data` frame's payload, refusing more than `max` bytes.
pub fn decompress(z: &[u8], max: usize) -> Result<Vec<u8>, ProtoError> {
    match z.split_first() {
        Some((&RAW, b)) if b.len() <= max => Ok(b.to_vec()),
        Some((&RAW, b)) => Err(ProtoError::Decode(format!(
            "data: {} bytes where at most {max} were expected",
            b.len()
        ))),
        Some((&ZSTD, b)) => unzstd(b, max),
        Some((t, _)) => Err(ProtoError::Decode(format!("data: unknown encoding {t}"))),
        None => Err(ProtoError::Decode("data: empty payload".into())),
    }
}

/// A `Data` message (sent in a compressed frame, or decoded whole) as a [`Frame`].
fn data_frame(m: Message, max: usize) -> Result<Frame, ProtoError> {
    match m {
        Message::Data { hash, payload } => Ok(Frame::Data {
            hash,
            bytes: decompress(&payload, max)?,
        }),
        m => Ok(Frame::Other(m)),
    }
}

/// Decompresses one zstd frame of at most `max` bytes with this thread's context.
fn unzstd(b: &[u8], max: usize) -> Result<Vec<u8>, ProtoError> {
    DECOMPRESSOR
        .with(|d| {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = Some(zstd::bulk::Decompressor::new()?);
            }
            match d.as_mut() {
                Some(d) => d.decompress(b, max),
                None => Err(std::io::Error::other("no zstd context")),
            }
        })
        .map_err(|e| ProtoError::Decode(format!("zstd: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn roundtrip() {
        let m = Message::Hello {
            version: VERSION,
            options: RunOptions::default(),
        };
        let f = encode(&m).unwrap();
        assert_eq!(frame_len(f[..4].try_into().unwrap()).unwrap(), f.len() - 4);
        assert_eq!(decode(&f[4..]).unwrap(), m);
    }

    #[test]
    fn large_frames_are_compressed_and_round_trip() {
        let entries: Vec<Entry> = (0..500)
            .map(|i| crate::manifest::Entry {
                path: format!("etc/dir{}/file{i}.conf", i % 7),
                kind: crate::manifest::Kind::File,
                meta: crate::manifest::Meta {
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                    user: Some("root".into()),
                    group: Some("root".into()),
                    mtime: 1_700_000_000 + i,
                    mtime_ns: 0,
                    xattrs: vec![],
                },
                content: None,
            })
            .collect();
        let m = Message::Entries(entries);
        let f = encode_wire(&m).unwrap();
        let h: [u8; 4] = f[..4].try_into().unwrap();
        assert!(frame_compressed(h));
        assert_eq!(frame_len(h).unwrap(), f.len() - 4);
        let plain = postcard::to_stdvec(&m).unwrap().len();
        assert!(f.len() * 3 < plain, "{} of {plain}", f.len());
        assert_eq!(decode_compressed(&f[4..]).unwrap(), m);
        let mut framed = Framed::new(&f[..], Vec::new());
        assert_eq!(framed.recv().unwrap(), m);
        // A zstd bomb stops at MAX_FRAME; garbage is an error, not a panic.
        let bomb = zstd::bulk::compress(&vec![0u8; MAX_FRAME + 10], 3).unwrap();
        assert!(decode_compressed(&bomb).is_err());
        assert!(decode_compressed(b"not zstd").is_err());
    }

    #[test]
    fn hostile_paths_rejected() {
        for p in ["../x", "/etc/passwd", "a/../../b", "a//b"] {
            let m = Message::Apply(Op::Delete {
                path: p.into(),
                dir: false,
            });
            let f = encode(&m).unwrap();
            assert!(
                matches!(decode(&f[4..]), Err(ProtoError::BadPath(_))),
                "{p}"
            );
            let m = Message::Apply(Op::Link {
                path: "ok".into(),
                target: p.into(),
            });
            let f = encode(&m).unwrap();
            assert!(decode(&f[4..]).is_err(), "{p}");
        }
    }

    #[test]
    fn oversized_chunks_rejected() {
        let mut e = crate::manifest::Entry {
            path: "f".into(),
            kind: crate::manifest::Kind::File,
            meta: crate::manifest::Meta::test_file(),
            content: Some(crate::manifest::Content {
                size: 4 << 30,
                hash: Hash::of(b""),
                chunks: vec![],
                sparse: false,
            }),
        };
        let f = encode(&Message::Apply(Op::Write(e.clone()))).unwrap();
        assert!(matches!(decode(&f[4..]), Err(ProtoError::BadChunks(_))));
        e.content.as_mut().unwrap().chunks = vec![crate::manifest::Chunk {
            len: u32::MAX,
            hash: Hash::of(b""),
        }];
        let f = encode(&Message::Apply(Op::Write(e))).unwrap();
        assert!(decode(&f[4..]).is_err());
    }

    #[test]
    fn incompressible_data_is_sent_raw_and_text_compressed() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let random: Vec<u8> = (0..200_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let p = compress(&random);
        assert_eq!(p[0], RAW, "random bytes are not compressed");
        assert_eq!(p.len(), random.len() + 1);
        assert_eq!(decompress(&p, random.len()).unwrap(), random);
        let text = b"server cluster child master rsync corral\n".repeat(5000);
        let p = compress(&text);
        assert_eq!(p[0], ZSTD);
        assert!(p.len() * 10 < text.len(), "{} of {}", p.len(), text.len());
        assert_eq!(decompress(&p, text.len()).unwrap(), text);
        // Limits hold for both encodings.
        assert!(decompress(&compress(&random), 1000).is_err());
        assert!(decompress(&compress(&text), 1000).is_err());
        assert!(decompress(&[], 10).is_err());
        assert!(decompress(&[7, 1, 2], 10).is_err());
    }

    fn frame_of_data(hash: Hash, payload: Vec<u8>) -> Vec<u8> {
        encode_wire(&Message::Data { hash, payload }).unwrap()
    }

    /// `send_data` writes exactly the frame `send` would (lengths whose varint takes 1, 2
    /// and 3 bytes), and `recv_data` reads it back into the chunk's bytes, raw or zstd.
    #[test]
    fn data_frames_are_written_and_read_without_a_message() {
        for n in [0usize, 1, 126, 127, 128, 300, 16_383, 16_384, 200_000] {
            let text: Vec<u8> = b"server cluster child\n"
                .iter()
                .copied()
                .cycle()
                .take(n)
                .collect();
            for data in [
                text.clone(),
                (0..n).map(|i| (i * 7919 % 251) as u8).collect(),
            ] {
                let hash = Hash::of(&data);
                let payload = compress(&data);
                let mut framed = Framed::new(&b""[..], Vec::new());
                framed.send_data(&hash, &payload).unwrap();
                let wire = framed.w.clone();
                assert_eq!(wire, frame_of_data(hash, payload.clone()), "{n} bytes");
                assert_eq!(framed.bytes_out, wire.len() as u64);
                // Followed by another message, which is read as one.
                let mut both = wire.clone();
                both.extend(encode_wire(&Message::Finish).unwrap());
                let mut rx = Framed::new(&both[..], Vec::new());
                match rx.recv_data(n).unwrap() {
                    Frame::Data { hash: h, bytes } => {
                        assert_eq!(h, hash);
                        assert_eq!(bytes, data);
                    }
                    f => panic!("{f:?}"),
                }
                assert_eq!(rx.bytes_in, wire.len() as u64);
                assert!(matches!(
                    rx.recv_data(n).unwrap(),
                    Frame::Other(Message::Finish)
                ));
                // More bytes than the chunk may hold are refused, raw or compressed.
                if n > 0 {
                    assert!(Framed::new(&wire[..], Vec::new()).recv_data(n - 1).is_err());
                }
            }
        }
    }

    /// Hostile data frames are errors, never panics or allocations beyond the bounds: a
    /// length that does not match the frame, an unknown encoding, an empty payload, a
    /// truncated stream; a `Data` message in a compressed frame is still decoded.
    #[test]
    fn hostile_data_frames_are_refused() {
        let data = vec![7u8; 1000];
        let hash = Hash::of(&data);
        let good = frame_of_data(hash, compress(&data));
        let recv = |b: &[u8]| Framed::new(b, Vec::new()).recv_data(1000);
        assert!(recv(&good).is_ok());
        // The payload length says one byte more, or one less, than the frame holds.
        let by_hand = |claimed: usize, payload: &[u8]| {
            let mut body = vec![DATA_VARIANT];
            body.extend_from_slice(&hash.0);
            let mut n = claimed;
            while n >= 0x80 {
                body.push((n as u8 & 0x7f) | 0x80);
                n >>= 7;
            }
            body.push(n as u8);
            body.extend_from_slice(payload);
            let mut f = (body.len() as u32).to_be_bytes().to_vec();
            f.extend(body);
            f
        };
        let payload = compress(&data);
        assert_eq!(by_hand(payload.len(), &payload), good);
        assert!(recv(&by_hand(payload.len() + 1, &payload)).is_err());
        assert!(recv(&by_hand(payload.len() - 1, &payload)).is_err());
        assert!(recv(&by_hand(usize::MAX, &payload)).is_err());
        let at = 4 + 1 + 32;
        assert!(good[at] < 0x80, "a one-byte length");
        // Unknown encoding tag.
        let mut tag = good.clone();
        tag[at + 1] = 9;
        assert!(recv(&tag).is_err());
        // Empty payload.
        let empty = frame_of_data(hash, vec![]);
        assert!(recv(&empty).is_err());
        // Truncated anywhere.
        for cut in [3, 4, 5, 20, at + 1, good.len() - 1] {
            assert!(recv(&good[..cut]).is_err(), "cut at {cut}");
        }
        // A raw payload larger than the chunk.
        let big = frame_of_data(hash, compress(&vec![1u8; 2000]));
        assert!(recv(&big).is_err());
        // A Data message in a compressed frame (this build never sends one).
        let body = postcard::to_stdvec(&Message::Data {
            hash,
            payload: compress(&data),
        })
        .unwrap();
        let z = zstd::bulk::compress(&body, 3).unwrap();
        let mut f = ((z.len() as u32) | FRAME_ZSTD).to_be_bytes().to_vec();
        f.extend(z);
        match recv(&f).unwrap() {
            Frame::Data { hash: h, bytes } => assert_eq!((h, bytes), (hash, data)),
            f => panic!("{f:?}"),
        }
    }

    proptest! {
        #[test]
        fn compress_round_trips(b in proptest::collection::vec(any::<u8>(), 0..20_000)) {
            let mut read = vec![0xff];
            read.extend_from_slice(&b);
            prop_assert_eq!(compress_read(read.clone()), compress(&b));
            let raw = raw_read(read);
            prop_assert_eq!(raw[0], RAW);
            prop_assert_eq!(decompress(&raw, b.len()).unwrap(), b.clone());
            prop_assert_eq!(decompress(&compress(&b), b.len()).unwrap(), b);
        }

        #[test]
        fn random_frames_never_panic_recv_data(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut f = Framed::new(&b[..], Vec::new());
            while f.recv_data(256).is_ok() {}
        }

        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&b);
            if b.len() >= 4 {
                let _ = frame_len(b[..4].try_into().unwrap());
            }
        }
    }

    fn chunks(ids: &[u8]) -> Vec<crate::manifest::Chunk> {
        ids.iter()
            .map(|&i| crate::manifest::Chunk {
                len: 1000 + u32::from(i),
                hash: Hash([i; 32]),
            })
            .collect()
    }

    fn size(c: &[crate::manifest::Chunk]) -> u64 {
        c.iter().map(|c| u64::from(c.len)).sum()
    }

    #[test]
    fn a_chunk_list_given_as_edits_of_the_old_one_is_rebuilt_exactly() {
        let old = chunks(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 0, 0]);
        for new in [
            chunks(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 0, 0]),
            // An edit in place, one at the start, one at the end.
            chunks(&[1, 2, 99, 4, 5, 6, 7, 8, 9, 10, 0, 0, 0]),
            chunks(&[98, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 0, 97]),
            // Inserted and removed chunks, a moved run, a repeated chunk.
            chunks(&[1, 2, 50, 51, 3, 4, 7, 8, 5, 6, 0, 0, 0, 0, 0, 9]),
            chunks(&[]),
        ] {
            let edits = chunk_edits(&new, &old);
            assert_eq!(apply_edits(&old, &edits, size(&new)).unwrap(), new);
        }
        // One edit: three pieces, not thirteen.
        let new = chunks(&[1, 2, 99, 4, 5, 6, 7, 8, 9, 10, 0, 0, 0]);
        assert_eq!(
            chunk_edits(&new, &old),
            vec![
                ChunkEdit::Keep { from: 0, count: 2 },
                ChunkEdit::New(new[2]),
                ChunkEdit::Keep { from: 3, count: 10 }
            ]
        );
    }

    #[test]
    fn chunk_list_edits_that_do_not_fit_the_old_list_or_the_size_are_refused() {
        let old = chunks(&[1, 2, 3]);
        let keep = |from, count| ChunkEdit::Keep { from, count };
        for (edits, size) in [
            (vec![keep(2, 2)], 0),
            (vec![keep(u32::MAX, 2)], 0),
            (vec![keep(0, 3)], size(&old) - 1),
            (vec![keep(0, 2)], size(&old)),
            (vec![keep(0, 3); 2], size(&old)),
            (vec![keep(0, 3); 30_000], u64::MAX),
        ] {
            assert!(
                apply_edits(&old, &edits, size).is_err(),
                "{size} {:?}",
                &edits[..1]
            );
        }
        // An entry to be edited must come without chunks, and its edits within bounds.
        let mut e = Entry {
            path: "img".into(),
            kind: crate::manifest::Kind::File,
            meta: crate::manifest::Meta::test_file(),
            content: Some(crate::manifest::Content {
                size: 5 << 20,
                hash: Hash([0; 32]),
                chunks: vec![],
                sparse: false,
            }),
        };
        let ok = Message::ApplyEdit {
            entry: e.clone(),
            edits: vec![keep(0, 1)],
        };
        assert!(validate(&ok).is_ok());
        for edits in [
            vec![keep(0, 0)],
            chunks(&[0])
                .into_iter()
                .map(|mut c| {
                    c.len = 0;
                    ChunkEdit::New(c)
                })
                .collect(),
        ] {
            assert!(
                validate(&Message::ApplyEdit {
                    entry: e.clone(),
                    edits
                })
                .is_err()
            );
        }
        e.content.as_mut().unwrap().chunks = chunks(&[1]);
        assert!(
            validate(&Message::ApplyEdit {
                entry: e,
                edits: vec![]
            })
            .is_err()
        );
    }
}
