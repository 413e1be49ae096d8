//! The sender's side of the image: hashing it into a signed manifest, and encoding blocks for
//! the protocol's `Sender` (and the TCP catch-up server) with a read-ahead encoder thread, so
//! that zstd and disk reads do not stall the packet loop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use corral_cast_proto::{
    BlockEntry, BlockPos, BlockSource, Compression, EncodedBlock, ManifestBuilder, SignedManifest,
    encode_block_vec,
};
use corral_model::SessionId;

use crate::catchup::{CatchUpProvider, ManifestReply};
use crate::error::CastError;
use crate::source::{FileIdentity, ImageSource};

/// Block entries of regular-file images hashed earlier by this process, by the file's
/// identity and the block size: a daemon (`cast serve`) offering one image session after
/// session hashes it once. At most [`HASHED_MAX`] images are kept.
static HASHED: Mutex<Vec<(HashedKey, Arc<Vec<BlockEntry>>)>> = Mutex::new(Vec::new());
/// An image file as it was hashed, and the block size.
type HashedKey = (FileIdentity, u32);
/// Images whose block entries [`HASHED`] keeps (about 33 bytes per block each).
const HASHED_MAX: usize = 16;
/// A file is kept in [`HASHED`] only if it had not changed for this long when its hashing
/// began, so that a write right after, in the same coarse timestamp, cannot hide.
const SETTLED: std::time::Duration = if cfg!(test) {
    std::time::Duration::from_millis(100)
} else {
    std::time::Duration::from_secs(2)
};

/// The manifest of `source`, signed: its block entries from [`HASHED`] when this regular
/// file was hashed before and has not changed since (then `progress` gets the image's
/// length at once), else from [`hash_blocks`] (and kept when the file did not change while
/// it was read and had not changed for [`SETTLED`] before). A stale entry could only make
/// receivers reject blocks, never accept wrong ones: every block they write is checked
/// against the manifest.
pub(crate) fn build_manifest(
    source: &ImageSource,
    session: SessionId,
    block_size: u32,
    symbol_size: u16,
    compression: Compression,
    secret: &[u8; 32],
    progress: &dyn Fn(u64),
) -> Result<SignedManifest, CastError> {
    let lock = || HASHED.lock().unwrap_or_else(|e| e.into_inner());
    // Only while the file is as long as when it was opened (the entries cover that length).
    let key = source
        .identity()
        .filter(|id| id.size() == source.len())
        .map(|id| (id, block_size));
    let hashing_from = std::time::SystemTime::now();
    let cached = key.and_then(|k| lock().iter().find(|(c, _)| *c == k).map(|(_, e)| e.clone()));
    let entries = match cached {
        Some(entries) => {
            progress(source.len());
            entries
        }
        None => {
            let entries = Arc::new(hash_blocks(source, block_size, progress)?);
            if let Some(k) = key
                && source.identity() == Some(k.0)
                && k.0.settled_before(hashing_from, SETTLED)
            {
                let mut hashed = lock();
                // An older version of the same file is of no use any more.
                hashed.retain(|(c, _)| !c.0.same_file(&k.0));
                if hashed.len() >= HASHED_MAX {
                    hashed.remove(0);
                }
                hashed.push((k, entries.clone()));
            }
            entries
        }
    };
    let bs = u64::from(block_size);
    let mut builder = ManifestBuilder::new(session, block_size, symbol_size, compression);
    for (i, e) in entries.iter().enumerate() {
        let len = (source.len() - i as u64 * bs).min(bs) as u32;
        builder.push_entry(len, *e);
    }
    let manifest = builder.finish()?;
    Ok(SignedManifest::sign(manifest, secret))
}

/// Reads the whole image once and returns every block's entry, in order. Blocks are read
/// and hashed by one worker per core (at most [`HASH_WORKERS`]): a big disk's pre-pass is
/// bound by BLAKE3 or by the device, and both go faster with more than one block in flight.
/// `progress` gets the bytes hashed so far about every [`HASH_PROGRESS_EVERY`].
fn hash_blocks(
    source: &ImageSource,
    block_size: u32,
    progress: &dyn Fn(u64),
) -> Result<Vec<BlockEntry>, CastError> {
    let bs = u64::from(block_size);
    let count = usize::try_from(source.len().div_ceil(bs)).map_err(|_| CastError::Io {
        path: source.path().to_owned(),
        source: std::io::Error::other("image too large for this machine"),
    })?;
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, HASH_WORKERS)
        .min(count.max(1));
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    // Each worker files its entries here directly (one lock per block, far cheaper than
    // hashing it): the entries are held once, not per worker and then again in order.
    let entries: Mutex<Vec<Option<BlockEntry>>> = Mutex::new(vec![None; count]);
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| -> Result<(), CastError> {
                    let mut buf = Vec::with_capacity(block_size as usize);
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count || failed.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        let offset = i as u64 * bs;
                        let want = (source.len() - offset).min(bs) as usize;
                        buf.clear();
                        let n = match source.read_append(offset, &mut buf, want) {
                            Ok(n) => n,
                            Err(e) => {
                                failed.store(true, Ordering::Relaxed);
                                return Err(e);
                            }
                        };
                        if n != want {
                            failed.store(true, Ordering::Relaxed);
                            return Err(CastError::Io {
                                path: source.path().to_owned(),
                                source: std::io::Error::new(
                                    std::io::ErrorKind::UnexpectedEof,
                                    "image shrank while reading",
                                ),
                            });
                        }
                        let pos = BlockPos {
                            offset,
                            whole_image: count == 1,
                        };
                        let e = BlockEntry::of(&buf, pos);
                        entries.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(e);
                        done.fetch_add(n as u64, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        let mut reported = std::time::Instant::now();
        progress(0);
        while !handles.iter().all(|h| h.is_finished()) {
            std::thread::sleep(HASH_POLL);
            if reported.elapsed() >= HASH_PROGRESS_EVERY {
                reported = std::time::Instant::now();
                progress(done.load(Ordering::Relaxed));
            }
        }
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect::<Vec<_>>()
    });
    for r in results {
        r?;
    }
    progress(done.load(Ordering::Relaxed));
    entries
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            e.ok_or_else(|| CastError::Io {
                path: source.path().to_owned(),
                source: std::io::Error::other(format!("block {i} was not hashed")),
            })
        })
        .collect()
}

/// Most threads that hash an image for its manifest.
const HASH_WORKERS: usize = 8;
/// How often [`build_manifest`] reports progress.
const HASH_PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(500);
/// How often [`build_manifest`] looks whether its workers are done.
const HASH_POLL: std::time::Duration = std::time::Duration::from_millis(5);

/// How many blocks the encoder thread keeps ready ahead of the sender.
const READ_AHEAD: u32 = 16;

/// Bytes of encoded blocks the catch-up server keeps for the next receiver that asks.
const SERVED_BYTES: usize = 64 << 20;

/// A block the catch-up server encoded, or is encoding (whoever asks meanwhile waits for it).
type ServedBlock = Arc<std::sync::OnceLock<Option<Arc<Vec<u8>>>>>;

/// The catch-up server's recent blocks: receivers that fetch over TCP (multicast blocked,
/// a late join) tend to ask for the same blocks at about the same time, and each is read
/// and compressed once for all of them. Oldest first out.
#[derive(Default)]
struct Served {
    blocks: HashMap<u32, ServedBlock>,
    order: std::collections::VecDeque<u32>,
}

struct Cache {
    ready: HashMap<u32, Arc<EncodedBlock>>,
    /// The highest block the sender asked for (the encoder stays `READ_AHEAD` beyond it).
    wanted: u32,
    /// Next block the encoder thread will encode.
    next: u32,
    stop: bool,
}

/// Encoded blocks of one image, shared by the protocol sender, the catch-up server and the
/// read-ahead thread.
pub(crate) struct Blocks {
    source: Arc<ImageSource>,
    signed: SignedManifest,
    cache: Mutex<Cache>,
    cv: Condvar,
    served: Mutex<Served>,
    /// Bytes of blocks `served` keeps ([`SERVED_BYTES`]).
    served_budget: AtomicUsize,
    /// Blocks the catch-up server read and encoded itself (not taken from the read-ahead).
    served_encoded: AtomicU64,
}

impl std::fmt::Debug for Blocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blocks").finish_non_exhaustive()
    }
}

impl Blocks {
    /// Wraps the image and starts the read-ahead thread (stopped by [`Blocks::stop`]).
    pub(crate) fn start(source: Arc<ImageSource>, signed: SignedManifest) -> Arc<Self> {
        let b = Arc::new(Blocks {
            source,
            signed,
            cache: Mutex::new(Cache {
                ready: HashMap::new(),
                wanted: 0,
                next: 0,
                stop: false,
            }),
            cv: Condvar::new(),
            served: Mutex::new(Served::default()),
            served_budget: AtomicUsize::new(SERVED_BYTES),
            served_encoded: AtomicU64::new(0),
        });
        let worker = b.clone();
        std::thread::Builder::new()
            .name("cast-encode".into())
            .spawn(move || worker.read_ahead())
            .ok();
        b
    }

    pub(crate) fn stop(&self) {
        self.lock().stop = true;
        self.cv.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read_ahead(&self) {
        let count = self.signed.manifest().block_count();
        loop {
            let index = {
                let mut c = self.lock();
                loop {
                    if c.stop || c.next >= count {
                        return;
                    }
                    if c.next <= c.wanted.saturating_add(READ_AHEAD) {
                        break;
                    }
                    c = self.cv.wait(c).unwrap_or_else(|e| e.into_inner());
                }
                let i = c.next;
                c.next += 1;
                i
            };
            let m = self.signed.manifest();
            if m.blocks.get(index as usize).is_some_and(|e| e.zero) {
                continue;
            }
            if let Ok(b) = self.encode(index) {
                let mut c = self.lock();
                c.ready.insert(index, Arc::new(b));
            }
        }
    }

    /// Reads and encodes block `index` now.
    pub(crate) fn encode(&self, index: u32) -> std::io::Result<EncodedBlock> {
        let m = self.signed.manifest();
        if index >= m.block_count() {
            return Err(std::io::Error::other(format!("no block {index}")));
        }
        let len = m.block_len(index) as usize;
        // Room for the padding of the last symbol: a block sent raw keeps this buffer.
        let mut buf = Vec::with_capacity(
            corral_cast_proto::source_count(len, m.symbol_size) * usize::from(m.symbol_size),
        );
        let n = self
            .source
            .read_append(m.block_offset(index), &mut buf, len)
            .map_err(std::io::Error::other)?;
        if n != len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("block {index}: image shrank"),
            ));
        }
        encode_block_vec(index, buf, m.compression, m.symbol_size).map_err(std::io::Error::other)
    }

    /// Block `index`, from the read-ahead cache or encoded now.
    pub(crate) fn get(&self, index: u32) -> std::io::Result<Arc<EncodedBlock>> {
        {
            let mut c = self.lock();
            if index > c.wanted {
                c.wanted = index;
                // Drop blocks well behind the sender (repairs of them re-encode inline).
                let floor = index.saturating_sub(READ_AHEAD);
                c.ready.retain(|&i, _| i >= floor);
                self.cv.notify_all();
            }
            if let Some(b) = c.ready.get(&index) {
                return Ok(b.clone());
            }
        }
        Ok(Arc::new(self.encode(index)?))
    }
}

/// The protocol sender's view of [`Blocks`].
pub(crate) struct SharedBlocks(pub(crate) Arc<Blocks>);

impl BlockSource for SharedBlocks {
    fn encoded_block(&mut self, index: u32) -> std::io::Result<Arc<EncodedBlock>> {
        self.0.get(index)
    }
}

impl CatchUpProvider for Blocks {
    fn manifest(&self) -> ManifestReply {
        ManifestReply::Ready(self.signed.as_bytes().to_vec())
    }

    fn block(&self, index: u32) -> Option<Arc<Vec<u8>>> {
        let m = self.signed.manifest();
        if index >= m.block_count() {
            return None;
        }
        // Catch-up requests are random access: they leave the stream's read-ahead alone and
        // share their own recent blocks.
        let served = || self.served.lock().unwrap_or_else(|e| e.into_inner());
        let cell = {
            let mut s = served();
            let budget = self.served_budget.load(Ordering::Relaxed);
            let keep = (budget / m.block_size.max(1) as usize).max(8);
            match s.blocks.get(&index) {
                Some(c) => c.clone(),
                None => {
                    let c = ServedBlock::default();
                    s.blocks.insert(index, c.clone());
                    s.order.push_back(index);
                    while s.order.len() > keep {
                        if let Some(old) = s.order.pop_front() {
                            s.blocks.remove(&old);
                        }
                    }
                    c
                }
            }
        };
        // One thread encodes (or takes the stream's read-ahead encoding of it: a receiver
        // that follows the stream over TCP asks for the blocks the stream is sending); the
        // others asking for it meanwhile wait and share the bytes.
        let got = cell
            .get_or_init(|| {
                let ahead = self.lock().ready.get(&index).cloned();
                if let Some(b) = ahead {
                    return Some(Arc::new(b.to_bytes()));
                }
                self.served_encoded.fetch_add(1, Ordering::Relaxed);
                self.encode(index).ok().map(|b| Arc::new(b.to_bytes()))
            })
            .clone();
        if got.is_none() {
            // A failed read is not kept: the next request tries again.
            let mut s = served();
            if s.blocks.get(&index).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                s.blocks.remove(&index);
                s.order.retain(|&i| i != index);
            }
        }
        got
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parallel pre-pass makes the manifest a plain in-order hash would, for images of
    /// one block, a short last block and zero blocks, and reports every byte.
    #[test]
    fn parallel_manifest_equals_the_serial_one() {
        let bs = 4096u32;
        for len in [0usize, 100, 4096, 3 * 4096 + 17, 64 * 4096] {
            let mut data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            if len > 8192 {
                data[4096..8192].fill(0);
            }
            let src = ImageSource::spool(&mut &data[..]).unwrap();
            let reported = std::sync::Mutex::new(Vec::new());
            let signed = build_manifest(
                &src,
                SessionId(9),
                bs,
                1024,
                Compression::None,
                &[7; 32],
                &|b| reported.lock().unwrap().push(b),
            )
            .unwrap();
            let mut serial = ManifestBuilder::new(SessionId(9), bs, 1024, Compression::None);
            for chunk in data.chunks(bs as usize) {
                serial.push_block(chunk);
            }
            let serial = serial.finish().unwrap();
            assert_eq!(signed.manifest(), &serial, "len {len}");
            assert_eq!(
                signed.manifest().image_hash,
                *blake3::hash(&data).as_bytes()
            );
            let reported = reported.into_inner().unwrap();
            assert_eq!(reported.last(), Some(&(len as u64)), "len {len}");
            assert!(reported.is_sorted(), "{reported:?}");
        }
    }

    /// Builds the manifest of `src`, returning it and the progress reports.
    fn manifest_of(src: &ImageSource) -> (SignedManifest, Vec<u64>) {
        let reported = std::sync::Mutex::new(Vec::new());
        let m = build_manifest(
            src,
            SessionId(3),
            4096,
            1024,
            Compression::None,
            &[5; 32],
            &|b| reported.lock().unwrap().push(b),
        )
        .unwrap();
        (m, reported.into_inner().unwrap())
    }

    /// A regular file is hashed once while it stays the same (the cached pre-pass reports
    /// its end at once), once it has been left alone for [`SETTLED`]; an edit that keeps
    /// size and mtime is hashed again (its ctime changed); spooled stdin is never cached.
    #[test]
    fn an_unchanged_image_file_is_hashed_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let data: Vec<u8> = (0..10 * 4096 + 5).map(|i| (i % 241) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        // Just written: not kept (a write in the same coarse timestamp could follow).
        manifest_of(&ImageSource::open(&path).unwrap());
        let (_, reported) = manifest_of(&ImageSource::open(&path).unwrap());
        assert_eq!(
            reported.first(),
            Some(&0),
            "a fresh file was kept: {reported:?}"
        );
        std::thread::sleep(SETTLED + std::time::Duration::from_millis(50));
        let (first, reported) = manifest_of(&ImageSource::open(&path).unwrap());
        assert_eq!(reported.first(), Some(&0), "{reported:?}");
        let (again, reported) = manifest_of(&ImageSource::open(&path).unwrap());
        assert_eq!(reported, vec![data.len() as u64], "not from the cache");
        assert_eq!(again.manifest(), first.manifest());

        // Same size, mtime restored: only the ctime tells.
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut edited = data.clone();
        edited[5000] ^= 0xff;
        std::fs::write(&path, &edited).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let (changed, reported) = manifest_of(&ImageSource::open(&path).unwrap());
        assert_eq!(
            reported.first(),
            Some(&0),
            "served stale hashes: {reported:?}"
        );
        assert_eq!(
            changed.manifest().image_hash,
            *blake3::hash(&edited).as_bytes()
        );

        let spool = || ImageSource::spool(&mut &data[..]).unwrap();
        manifest_of(&spool());
        let (_, reported) = manifest_of(&spool());
        assert_eq!(
            reported.first(),
            Some(&0),
            "a spool was cached: {reported:?}"
        );
    }

    /// Catch-up requests for one block at once are answered by one read and encode, shared
    /// by all; later requests for it reuse it while it is among the last blocks kept (the
    /// budget's worth, oldest out); a block past the end is none and costs nothing.
    #[test]
    fn catch_up_blocks_are_encoded_once_for_all_who_ask() {
        let blocks = started(20, 13);
        // The read-ahead's first blocks are not the catch-up server's to count: forgotten
        // once it has encoded them (it then waits for the stream to move on).
        wait_ahead(&blocks, READ_AHEAD);
        blocks.lock().ready.clear();
        // Room for 8 blocks of 4 KiB (the least kept).
        blocks.served_budget.store(8 * 4096, Ordering::Relaxed);
        let want = blocks.encode(3).unwrap().to_bytes();
        let got: Vec<Arc<Vec<u8>>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| blocks.block(3).unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for g in &got {
            assert_eq!(**g, want);
            assert!(Arc::ptr_eq(g, &got[0]), "one encoding shared");
        }
        assert_eq!(blocks.served_encoded.load(Ordering::Relaxed), 1);
        // Eight more blocks push block 3 out; asked again, it is encoded again.
        for i in 4..12 {
            assert!(blocks.block(i).is_some());
        }
        assert_eq!(blocks.served_encoded.load(Ordering::Relaxed), 9);
        assert!(blocks.block(11).is_some(), "still kept");
        assert_eq!(blocks.served_encoded.load(Ordering::Relaxed), 9);
        assert_eq!(*blocks.block(3).unwrap(), want);
        assert_eq!(blocks.served_encoded.load(Ordering::Relaxed), 10);
        assert!(blocks.block(20).is_none(), "past the end");
        assert_eq!(blocks.served_encoded.load(Ordering::Relaxed), 10);
        blocks.stop();
    }

    /// A catch-up request for a block the stream's read-ahead holds takes that encoding (the
    /// same bytes, no second read and encode); one it does not hold is encoded.
    #[test]
    fn catch_up_takes_the_read_ahead_encoding() {
        let blocks = started(64, 31);
        wait_ahead(&blocks, READ_AHEAD);
        // The stream asks for block 36: blocks more than READ_AHEAD behind it are dropped,
        // and the read-ahead encodes up to READ_AHEAD beyond it.
        let streamed = blocks.get(36).unwrap();
        wait_ahead(&blocks, 40);
        let ahead = blocks.lock().ready.get(&40).cloned().unwrap();
        let got = blocks.block(40).unwrap();
        assert_eq!(*got, ahead.to_bytes());
        assert_eq!(*got, blocks.encode(40).unwrap().to_bytes());
        assert_eq!(
            blocks.served_encoded.load(Ordering::Relaxed),
            0,
            "encoded again"
        );
        // Far behind the stream (dropped from the read-ahead): encoded for the request.
        assert!(!blocks.lock().ready.contains_key(&1));
        assert_eq!(
            *blocks.block(1).unwrap(),
            blocks.encode(1).unwrap().to_bytes()
        );
        assert_eq!(blocks.served_encoded.load(Ordering::Relaxed), 1);
        assert_eq!(streamed.to_bytes(), blocks.encode(36).unwrap().to_bytes());
        blocks.stop();
    }

    /// [`Blocks`] of a spooled image of `count` 4 KiB blocks (byte `i` is `i * mul % 251`,
    /// no zero block), its read-ahead started.
    fn started(count: usize, mul: usize) -> Arc<Blocks> {
        let data: Vec<u8> = (0..count * 4096).map(|i| (i * mul % 251) as u8).collect();
        let src = Arc::new(ImageSource::spool(&mut &data[..]).unwrap());
        let (signed, _) = manifest_of(&src);
        Blocks::start(src, signed)
    }

    /// Waits until the read-ahead holds block `index`.
    fn wait_ahead(blocks: &Blocks, index: u32) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !blocks.lock().ready.contains_key(&index) {
            assert!(std::time::Instant::now() < deadline, "read-ahead stalled");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}
