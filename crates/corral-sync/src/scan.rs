//! Walking a tree into a [`Manifest`]: a parallel walk, BLAKE3 hashes (rayon), FastCDC chunks
//! for large files, and a hash cache so unchanged files are not read again.

use std::collections::HashMap;
use std::io::{Read, Seek};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::SyncError;
use crate::manifest::{
    CHUNK_THRESHOLD, Chunk, Content, Entry, Hash, Kind, Manifest, Meta, path_order,
};
use crate::owner;

/// FastCDC sizes: min, average, max.
pub const CDC_MIN: u32 = 16 * 1024;
/// Average chunk size.
pub const CDC_AVG: u32 = 64 * 1024;
/// Largest chunk.
pub const CDC_MAX: u32 = 256 * 1024;

/// Threads of the directory walk once it waits on the disk (`CORRAL_SYNC_WALK_THREADS`
/// overrides it). A walk starts with one thread per core and adds the others when its
/// threads are seen reading inode tables from the disk (a cold tree).
pub const WALK_THREADS: usize = 16;

/// Suffix of the receiver's temporary files (removed by the next scan after a crash).
pub const TEMP_SUFFIX: &str = ".corral-tmp";

/// How to scan.
#[derive(Debug, Clone, Default)]
pub struct ScanOptions {
    /// The hash cache file (read, then rewritten atomically). `None`: hash every file.
    pub cache: Option<PathBuf>,
    /// Relative paths left out with everything below them (e.g. the backup directory).
    pub skip: Vec<String>,
    /// Remove leftover temporary files of an interrupted run (receiver side).
    pub clean_temps: bool,
}

/// What a scan did.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct ScanStats {
    /// Entries found.
    pub entries: u64,
    /// Regular files hashed (cache miss).
    pub hashed: u64,
    /// Bytes read to hash them.
    pub hashed_bytes: u64,
    /// Regular files whose hash came from the cache.
    pub cached: u64,
    /// Names skipped because they are not UTF-8 or could not be read.
    pub skipped: u64,
    /// Regular files left unread for their reader to hash (see [`Walked::hash`]).
    #[serde(default)]
    pub deferred: u64,
}

/// One file's cached hash and extended attributes, valid while inode, size, mtime and ctime
/// are unchanged. ctime cannot be set by users, so an edit whose mtime was restored
/// (`touch -d`) still misses; `setxattr`/`removexattr` (ACLs included) change ctime too, so a
/// hit's attributes are the file's own and its `llistxattr` is skipped. The attributes are
/// read after the stat that keyed them: a change racing the scan leaves a newer ctime.
///
/// `P` is the path's type: owned in the cache's rewrite, `&str` borrowed from the decoded
/// bytes when a scan reads it (one encoding, no allocation per entry).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CacheEntry<P = String> {
    path: P,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    content: Content,
    /// `None`: not known (an entry of a version-1 cache); read them and rewrite the cache.
    xattrs: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

/// Version of the cache file: 2 is a vector of [`CacheEntry`] in manifest order (matched with
/// the sorted walk in one pass, no hashing of every path), with each file's extended
/// attributes.
const CACHE_VERSION: u32 = 2;

/// A hash cache file not used for this long (no scan of its tree read it) is removed by the
/// next scan that uses the same cache directory: trees that went away stop costing disk.
pub const CACHE_KEEP: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// How stale a used cache file's mtime may get before a scan moves it to now (its "last used"
/// mark). Once a day at most, so a run that changes nothing writes nothing.
const CACHE_TOUCH: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    files: Vec<CacheEntry>,
}

/// Version 1: a map without the attributes (still read, then rewritten as version 2).
#[derive(Debug, Serialize, Deserialize)]
struct CacheEntryV1 {
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    content: Content,
}

/// What a scan needs of a stat (a `std::fs::Metadata` is four times as large, and the walk's
/// entries are moved by the sort).
#[derive(Debug, Clone, Copy)]
struct Stat {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    mtime_ns: i64,
    ctime: i64,
    ctime_ns: i64,
    ino: u64,
    dev: u64,
    size: u64,
    nlink: u64,
    blocks: u64,
}

impl Stat {
    fn of(md: &std::fs::Metadata) -> Stat {
        Stat {
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            mtime: md.mtime(),
            mtime_ns: md.mtime_nsec(),
            ctime: md.ctime(),
            ctime_ns: md.ctime_nsec(),
            ino: md.ino(),
            dev: md.dev(),
            size: md.size(),
            nlink: md.nlink(),
            blocks: md.blocks(),
        }
    }
}

#[derive(Debug)]
struct Raw {
    path: String,
    kind: Kind,
    st: Stat,
    /// Read by the walk for everything but regular files; a file's come from the cache on a
    /// hit, else are read after the walk (still after the stat that keys the cache entry).
    xattrs: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    /// Index of the matching cache entry (same inode, size, mtime, ctime).
    hit: Option<usize>,
}

/// Reads the cache file: its entries in manifest order, and whether it must be rewritten
/// even when every file hits (an older version).
fn load_cache(p: &Path) -> (Vec<CacheEntry>, bool) {
    match read_cache(p) {
        Some(b) => decode_cache(p, &b),
        None => (Vec::new(), false),
    }
}

/// The cache file's decompressed bytes (`None`: no cache, or not zstd).
fn read_cache(p: &Path) -> Option<Vec<u8>> {
    let z = std::fs::read(p).ok()?;
    // Read straight into the vector (`decode_all` copies through a stack buffer).
    let mut b = Vec::new();
    zstd::stream::read::Decoder::with_buffer(&z[..])
        .ok()?
        .read_to_end(&mut b)
        .ok()?;
    Some(b)
}

/// A cache entry as a scan keeps it: its path is a place in [`Loaded::names`].
#[derive(Debug)]
struct Cached {
    path: std::ops::Range<usize>,
    key: CacheKey,
    content: Content,
    xattrs: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

/// The hash cache as a scan reads it, in manifest order: all paths in one string, so the
/// 50,000 entries of a tree cost no allocation each.
#[derive(Debug, Default)]
struct Loaded {
    names: String,
    files: Vec<Cached>,
}

impl Loaded {
    fn path(&self, i: usize) -> &str {
        // Ranges made by `push` (at the ends of whole strings): always in bounds.
        self.names
            .get(self.files[i].path.clone())
            .unwrap_or_default()
    }

    fn push(
        &mut self,
        path: &str,
        key: CacheKey,
        content: Content,
        xattrs: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    ) {
        let at = self.names.len();
        self.names.push_str(path);
        self.files.push(Cached {
            path: at..self.names.len(),
            key,
            content,
            xattrs,
        });
    }

    fn sorted(&self) -> bool {
        (1..self.files.len()).all(|i| path_order(self.path(i - 1), self.path(i)).is_lt())
    }
}

/// Reads the cache for a scan: a version-2 file in manifest order is decoded entry by entry
/// with borrowed paths; anything else goes through [`decode_cache`] (converted, sorted).
fn load_for_scan(p: &Path) -> (Loaded, bool) {
    let Some(b) = read_cache(p) else {
        return (Loaded::default(), false);
    };
    if let Some(l) = decode_v2(&b)
        && l.sorted()
    {
        return (l, false);
    }
    let (files, stale) = decode_cache(p, &b);
    let mut l = Loaded {
        names: String::new(),
        files: Vec::with_capacity(files.len()),
    };
    for e in files {
        let key = CacheKey {
            ino: e.ino,
            size: e.size,
            mtime: e.mtime,
            ctime: e.ctime,
        };
        l.push(&e.path, key, e.content, e.xattrs);
    }
    (l, stale)
}

/// A version-2 cache file ([`CacheFile`]: the version, the number of entries, the entries)
/// decoded without a `String` per path; `None` when it is not one.
fn decode_v2(b: &[u8]) -> Option<Loaded> {
    let (version, rest) = postcard::take_from_bytes::<u32>(b).ok()?;
    if version != CACHE_VERSION {
        return None;
    }
    let (n, mut rest) = postcard::take_from_bytes::<usize>(rest).ok()?;
    let mut l = Loaded {
        names: String::with_capacity(rest.len() / 4),
        // An entry takes more than 32 bytes: a damaged count allocates no more than that.
        files: Vec::with_capacity(n.min(rest.len() / 32)),
    };
    for _ in 0..n {
        let (e, r) = postcard::take_from_bytes::<CacheEntry<&str>>(rest).ok()?;
        rest = r;
        let key = CacheKey {
            ino: e.ino,
            size: e.size,
            mtime: e.mtime,
            ctime: e.ctime,
        };
        l.push(e.path, key, e.content, e.xattrs);
    }
    Some(l)
}

/// Decodes a cache file's bytes (any version) into owned entries in manifest order.
fn decode_cache(p: &Path, b: &[u8]) -> (Vec<CacheEntry>, bool) {
    let files = match postcard::take_from_bytes::<u32>(b) {
        Ok((CACHE_VERSION, _)) => postcard::from_bytes::<CacheFile>(b).map(|c| (c.files, false)),
        Ok((1, rest)) => postcard::from_bytes::<HashMap<String, CacheEntryV1>>(rest).map(|m| {
            let v = m
                .into_iter()
                .map(|(path, e)| CacheEntry {
                    path,
                    ino: e.ino,
                    size: e.size,
                    mtime: e.mtime,
                    ctime: e.ctime,
                    content: e.content,
                    xattrs: None,
                })
                .collect();
            (v, true)
        }),
        Ok((v, _)) => Err(postcard::Error::DeserializeBadEncoding).inspect_err(|_| {
            tracing::warn!(path = %p.display(), version = v, "hash cache of an unknown version");
        }),
        Err(e) => Err(e),
    };
    match files {
        Ok((mut files, stale)) => {
            if !files.is_sorted_by(|a, b| path_order(&a.path, &b.path).is_lt()) {
                files.sort_by(|a, b| path_order(&a.path, &b.path));
                files.dedup_by(|a, b| a.path == b.path);
                return (files, true);
            }
            (files, stale)
        }
        Err(_) => {
            tracing::warn!(path = %p.display(), "hash cache unreadable, rehashing");
            (Vec::new(), false)
        }
    }
}

fn save_cache(p: &Path, files: Vec<CacheEntry>) -> Result<(), SyncError> {
    let b = postcard::to_stdvec(&CacheFile {
        version: CACHE_VERSION,
        files,
    })
    .map_err(|e| SyncError::fs("encode cache", p, std::io::Error::other(e)))?;
    let z = zstd::encode_all(&b[..], 1).map_err(|e| SyncError::fs("compress cache", p, e))?;
    if let Some(d) = p.parent() {
        fs_err::create_dir_all(d).map_err(|e| SyncError::fs("create", d, e))?;
    }
    // A name of this process's own: two runs saving the same cache at once (children of one
    // master pushed in parallel, or a receiver still saving as the next run scans) never
    // write into one temporary file; the last rename wins, and either file is whole.
    static SAVES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SAVES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = p.with_extension(format!("{}-{n}.tmp", std::process::id()));
    fs_err::write(&tmp, z).map_err(|e| SyncError::fs("write", &tmp, e))?;
    fs_err::rename(&tmp, p).map_err(|e| SyncError::fs("rename", p, e))
}

/// How long a scan waits for a hash cache that is being saved (by the previous run's
/// receiver, which answers before it updates its cache, or by this master's previous run)
/// before it reads the file as it is, and how long a saver waits for scans reading it.
const CACHE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// An advisory `flock` on the lock file beside a hash cache (`NAME.lock` for `NAME.cache`),
/// released when dropped. Whoever rewrites the cache holds it exclusively from before it
/// reads the old cache until the new one has been renamed into place; a scan holds it shared
/// while it reads the cache. So a run started while the previous run's receiver is still
/// saving (its report leaves first) reads the new cache instead of hashing again what that
/// run wrote, and two savers do not lose each other's entries.
#[derive(Debug)]
pub struct CacheLock {
    _fd: rustix::fd::OwnedFd,
}

impl CacheLock {
    /// Takes the lock of the hash cache `cache` for a rewrite (exclusive), waiting at most
    /// `wait`. `None` when it cannot be had in time or at all (the lock file cannot be made,
    /// e.g. a read-only directory): the saver goes on without it, the cache file being
    /// replaced atomically anyway.
    pub fn update(cache: &Path, wait: std::time::Duration) -> Option<CacheLock> {
        if let Some(d) = cache.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        Self::take(cache, true, wait)
    }

    /// Takes the lock of `cache` shared (for reading it), waiting at most `wait`.
    fn read(cache: &Path, wait: std::time::Duration) -> Option<CacheLock> {
        Self::take(cache, false, wait)
    }

    fn take(cache: &Path, exclusive: bool, wait: std::time::Duration) -> Option<CacheLock> {
        use rustix::fs::{FlockOperation, Mode, OFlags};
        let p = cache.with_extension("lock");
        let fd = match rustix::fs::open(
            &p,
            OFlags::RDONLY | OFlags::CREATE | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::from_raw_mode(0o644),
        ) {
            Ok(fd) => fd,
            Err(e) => {
                // No cache directory yet (nothing saved, nothing to wait for) or read-only.
                tracing::debug!(path = %p.display(), error = %e, "hash cache lock not taken");
                return None;
            }
        };
        let op = if exclusive {
            FlockOperation::NonBlockingLockExclusive
        } else {
            FlockOperation::NonBlockingLockShared
        };
        let deadline = std::time::Instant::now() + wait;
        loop {
            match rustix::fs::flock(&fd, op) {
                Ok(()) => return Some(CacheLock { _fd: fd }),
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::WOULDBLOCK) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => {
                    tracing::debug!(
                        path = %p.display(),
                        error = %e,
                        waited_ms = wait.as_millis() as u64,
                        "hash cache lock busy; going on without it"
                    );
                    return None;
                }
            }
        }
    }
}

/// [`load_for_scan`] once no save of it is in progress (see [`CacheLock`]); after
/// [`CACHE_LOCK_WAIT`] it reads the file as it is (whole: saves rename a complete file into
/// place), whose entries are still checked against each file's keys.
fn load_cache_when_saved(p: &Path) -> (Loaded, bool) {
    let _lock = CacheLock::read(p, CACHE_LOCK_WAIT);
    load_for_scan(p)
}

/// Marks the cache file `used` as used now (its mtime, at most once per [`CACHE_TOUCH`]) and,
/// when it did, removes the other `*.cache` (and leftover `*.tmp`) files of its directory that
/// were not used for [`CACHE_KEEP`], and the `*.lock` files of caches no longer there. Best
/// effort: a failure costs disk, not correctness.
fn cache_housekeeping(used: &Path, now: std::time::SystemTime) {
    let old = |m: &std::fs::Metadata, age| {
        m.modified()
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|d| d > age)
    };
    match std::fs::metadata(used) {
        Ok(m) if old(&m, CACHE_TOUCH) => {
            let touched = std::fs::File::options()
                .write(true)
                .open(used)
                .and_then(|f| f.set_modified(now));
            if let Err(e) = touched {
                tracing::debug!(path = %used.display(), error = %e, "hash cache not touched");
            }
        }
        _ => return, // used within the day (so was the directory pruned), or no cache yet
    }
    let Some(dir) = used.parent() else { return };
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let ours = match p.extension().and_then(|x| x.to_str()) {
            Some("cache" | "tmp") => true,
            // A lock file stays while its cache does (a scan may be waiting on it).
            Some("lock") => !p.with_extension("cache").exists(),
            _ => false,
        };
        if !ours || p == used {
            continue;
        }
        if let Ok(m) = e.metadata()
            && m.is_file()
            && old(&m, CACHE_KEEP)
        {
            match std::fs::remove_file(&p) {
                Ok(()) => {
                    tracing::info!(path = %p.display(), "removed a hash cache unused for 30 days")
                }
                Err(e) => tracing::debug!(path = %p.display(), error = %e, "stale hash cache kept"),
            }
        }
    }
}

/// Reads a path's extended attributes (ACLs included), sorted by name.
///
/// Most files have none: one `llistxattr` into a small stack buffer says so without
/// allocating (a 64 KiB buffer is used only when the list or a value does not fit).
pub fn read_xattrs(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut small = [0u8; 256];
    let names: Vec<u8> = match rustix::fs::llistxattr(path, &mut small[..]) {
        Ok(0) => return Vec::new(),
        Ok(n) => small[..n].to_vec(),
        Err(rustix::io::Errno::RANGE) => {
            let mut big = vec![0u8; 64 * 1024];
            match rustix::fs::llistxattr(path, &mut big[..]) {
                Ok(n) => {
                    big.truncate(n);
                    big
                }
                Err(_) => return Vec::new(),
            }
        }
        Err(_) => return Vec::new(),
    };
    let mut out = Vec::new();
    let mut val = [0u8; 256];
    let mut big: Vec<u8> = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        match rustix::fs::lgetxattr(path, name, &mut val[..]) {
            Ok(k) => out.push((name.to_vec(), val[..k].to_vec())),
            Err(rustix::io::Errno::RANGE) => {
                big.resize(64 * 1024, 0);
                if let Ok(k) = rustix::fs::lgetxattr(path, name, &mut big[..]) {
                    out.push((name.to_vec(), big[..k].to_vec()));
                }
            }
            Err(_) => {}
        }
    }
    out.sort();
    out
}

/// Hashes a file: BLAKE3 of the whole, and FastCDC chunks with their BLAKE3 when it is
/// larger than [`CHUNK_THRESHOLD`].
pub fn hash_file(path: &Path, sparse: bool) -> Result<Content, SyncError> {
    let mut f = fs_err::File::open(path).map_err(|e| SyncError::fs("open", path, e))?;
    let size = f
        .metadata()
        .map_err(|e| SyncError::fs("stat", path, e))?
        .len();
    if size <= CHUNK_THRESHOLD {
        // The size it has and a byte more; if that byte came, it grew, and the rest is read.
        let mut buf = Vec::new();
        crate::direct::read_at_into(f.file(), &mut buf, 0, size as usize + 1)
            .map_err(|e| SyncError::fs("read", path, e))?;
        if buf.len() as u64 > size {
            f.seek(std::io::SeekFrom::Start(buf.len() as u64))
                .map_err(|e| SyncError::fs("seek", path, e))?;
            f.read_to_end(&mut buf)
                .map_err(|e| SyncError::fs("read", path, e))?;
        }
        let chunks = if buf.len() as u64 > CHUNK_THRESHOLD {
            // Grew while we read it: chunk what we have.
            fastcdc::v2020::FastCDC::new(&buf, CDC_MIN, CDC_AVG, CDC_MAX)
                .map(|c| Chunk {
                    len: c.length as u32,
                    hash: Hash::of(&buf[c.offset..c.offset + c.length]),
                })
                .collect()
        } else {
            Vec::new()
        };
        return Ok(Content {
            size: buf.len() as u64,
            hash: Hash::of(&buf),
            chunks,
            sparse,
        });
    }
    let mut whole = blake3::Hasher::new();
    let mut chunks = Vec::new();
    let mut total = 0u64;
    read_ahead(f.file(), |r| {
        for c in fastcdc::v2020::StreamCDC::new(r, CDC_MIN, CDC_AVG, CDC_MAX) {
            let c = c.map_err(|e| SyncError::fs("read", path, std::io::Error::other(e)))?;
            whole.update(&c.data);
            total += c.length as u64;
            chunks.push(Chunk {
                len: c.length as u32,
                hash: Hash::of(&c.data),
            });
        }
        Ok::<_, SyncError>(())
    })?;
    if total <= CHUNK_THRESHOLD {
        // Shrunk while we read: describe it as a small file.
        chunks.clear();
    }
    Ok(Content {
        size: total,
        hash: Hash(*whole.finalize().as_bytes()),
        chunks,
        sparse,
    })
}

/// Blocks a large file is read in by [`read_ahead`].
const AHEAD_BLOCK: usize = 4 << 20;
/// Blocks [`read_ahead`]'s thread reads ahead of the hashing.
const AHEAD_BLOCKS: usize = 2;

/// Runs `body` with a reader of `f` from its start to its end, whose blocks a thread of its
/// own reads ahead (past the page cache where they are not cached, see `direct`): a large
/// file's chunking and hashing (one core's work) and its reads from the disk overlap instead
/// of taking turns (a cold 1 GiB image: hashed in about half the time). The thread stops at
/// the end of the file, at a read error (which `body` reads), or when `body` returns.
fn read_ahead<T>(f: &std::fs::File, body: impl FnOnce(&mut dyn Read) -> T) -> T {
    let (tx, rx) = std::sync::mpsc::sync_channel::<std::io::Result<Vec<u8>>>(AHEAD_BLOCKS);
    std::thread::scope(|s| {
        let reader = move || {
            let mut off = 0u64;
            loop {
                let mut b = Vec::new();
                let r = crate::direct::read_at_into(f, &mut b, off, AHEAD_BLOCK).map(|()| b);
                let end = r.as_ref().map_or(true, Vec::is_empty);
                off += r.as_ref().map_or(0, |b| b.len() as u64);
                if tx.send(r).is_err() || end {
                    return;
                }
            }
        };
        let mut blocks = Blocks {
            rx,
            cur: Vec::new(),
            pos: 0,
            done: false,
        };
        match std::thread::Builder::new()
            .name("corral-read".into())
            .spawn_scoped(s, reader)
        {
            Ok(_) => {}
            // No thread: the blocks are read as they are needed, on this one.
            Err(_) => blocks.done = true,
        }
        if blocks.done {
            let mut r = FileReader { f, off: 0 };
            return body(&mut r);
        }
        let out = body(&mut blocks);
        // Unblocks the reader if `body` stopped early.
        drop(blocks);
        out
    })
}

/// The reading end of [`read_ahead`].
struct Blocks {
    rx: std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
    /// The empty block that marks the end came.
    done: bool,
}

impl Read for Blocks {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.cur.len() {
            if self.done {
                return Ok(0);
            }
            self.cur = match self.rx.recv() {
                Ok(r) => r?,
                Err(_) => return Err(std::io::Error::other("file reader thread stopped")),
            };
            self.pos = 0;
            self.done = self.cur.is_empty();
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// A file read from the start with `pread`, past the page cache where its ranges are large
/// and not cached (see `direct`): [`read_ahead`]'s fallback when no thread starts.
struct FileReader<'f> {
    f: &'f std::fs::File,
    off: u64,
}

impl Read for FileReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = match crate::direct::read_at(self.f, out, self.off)? {
            Some(n) => n,
            None => self.f.read_at(out, self.off)?,
        };
        self.off += n as u64;
        Ok(n)
    }
}

fn meta_of(st: &Stat, xattrs: Vec<(Vec<u8>, Vec<u8>)>) -> Meta {
    Meta {
        mode: st.mode & 0o7777,
        uid: st.uid,
        gid: st.gid,
        user: owner::user_name(st.uid),
        group: owner::group_name(st.gid),
        mtime: st.mtime,
        mtime_ns: st.mtime_ns as u32,
        xattrs,
    }
}

fn join(rel: &str, name: &str) -> String {
    if rel.is_empty() {
        return name.to_string();
    }
    let mut s = String::with_capacity(rel.len() + 1 + name.len());
    s.push_str(rel);
    s.push('/');
    s.push_str(name);
    s
}

struct Walk<'a> {
    root: &'a Path,
    opts: &'a ScanOptions,
    /// The entries found, each directory's together and sorted by name, and where each
    /// directory's are.
    out: Mutex<Listed>,
    errors: Mutex<Vec<SyncError>>,
    skipped: std::sync::atomic::AtomicU64,
    queue: Mutex<Queue>,
    ready: std::sync::Condvar,
    /// Set once the walk has all its threads (it began with fewer; see [`WALK_THREADS`]).
    widened: std::sync::atomic::AtomicBool,
    /// The walk's threads once widened.
    threads: usize,
    /// The threads it began with.
    started: usize,
    /// Widen after the first directory, cold or not (tests).
    widen_at_once: bool,
}

/// When a walk thread's reads from the disk make the walk cold: at least this many bytes...
const COLD_READ: u64 = 64 * 1024;
/// ...and this many per entry it listed. A cold walk reads inode tables (256 bytes an inode,
/// 128 KiB at a time with ext4's readahead) and directory blocks: hundreds of bytes an entry
/// or more. A cached one now and then reads a stray block or a readahead window (an inode or
/// a directory block evicted, a page of the program): a few bytes an entry over the walk.
const COLD_READ_PER_ENTRY: u64 = 64;

/// Whether this thread has read from the disk since the walk began: its `read_bytes` in
/// `/proc/thread-self/io` (the bytes of the reads it submitted to the block layer, inode
/// tables and directory blocks included), from a descriptor kept open and read again at
/// offset 0 (one `pread`), against its value when the walk began (the thread that starts a
/// walk may have read before it). On a cached tree a walk is CPU work and threads beyond the
/// cores only contend for locks; on a cold one each `statx` may wait on an inode table
/// block, and more threads keep more reads in flight.
struct DiskReads {
    io: Option<(std::fs::File, u64)>,
}

impl DiskReads {
    fn open() -> DiskReads {
        let io = std::fs::File::open("/proc/thread-self/io")
            .ok()
            .and_then(|f| {
                let at = Self::read_bytes(&f)?;
                Some((f, at))
            });
        DiskReads { io }
    }

    fn read_bytes(f: &std::fs::File) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 512];
        let n = f.read_at(&mut buf, 0).ok()?;
        std::str::from_utf8(&buf[..n])
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("read_bytes:"))?
            .trim()
            .parse()
            .ok()
    }

    /// Whether this thread's reads from the disk since [`DiskReads::open`] say the tree is
    /// cold, `listed` entries into its walk (see [`COLD_READ`]); `None` when the kernel does
    /// not say (no task I/O accounting).
    fn cold(&self, listed: u64) -> Option<bool> {
        let (f, at) = self.io.as_ref()?;
        let read = Self::read_bytes(f)?.saturating_sub(*at);
        Some(read >= COLD_READ && read >= COLD_READ_PER_ENTRY.saturating_mul(listed))
    }
}

/// What the walk found: every directory's entries, one directory after another (in the order
/// they were read), each directory's sorted by name, and the place of each directory's.
#[derive(Default)]
struct Listed {
    raws: Vec<Raw>,
    dirs: Vec<(String, std::ops::Range<usize>)>,
}

/// The directories still to read and how many are being read: the walk is over when both
/// are none.
#[derive(Default)]
struct Queue {
    dirs: Vec<String>,
    busy: usize,
}

impl Walk<'_> {
    /// One walk thread: reads directories from the queue until none is left and none is being
    /// read (a thread that finds the queue empty sleeps on the condition variable; it does not
    /// spin).
    fn worker<'s>(&'s self, s: &'s std::thread::Scope<'s, '_>) {
        let disk = DiskReads::open();
        // Entries this thread has listed.
        let mut listed = 0u64;
        loop {
            let rel = {
                let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if let Some(d) = q.dirs.pop() {
                        q.busy += 1;
                        break d;
                    }
                    if q.busy == 0 {
                        return;
                    }
                    q = self.ready.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            };
            let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.dir(rel)));
            if let Ok((_, n)) = &read {
                listed += n;
                self.widen_if_reading(&disk, listed, s);
            }
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            let subdirs = match read {
                Ok((s, _)) => s,
                Err(p) => {
                    // The others must not wait for this directory's subdirectories forever.
                    q.busy -= 1;
                    q.dirs.clear();
                    self.ready.notify_all();
                    drop(q);
                    std::panic::resume_unwind(p);
                }
            };
            q.busy -= 1;
            let n = subdirs.len();
            q.dirs.extend(subdirs);
            if n > 1 || (q.busy == 0 && q.dirs.is_empty()) {
                self.ready.notify_all();
            } else if n == 1 {
                self.ready.notify_one();
            }
        }
    }

    /// Starts the walk's other threads, once, when this one's reads from the disk say the tree
    /// is cold (or it cannot tell).
    fn widen_if_reading<'s>(
        &'s self,
        disk: &DiskReads,
        listed: u64,
        s: &'s std::thread::Scope<'s, '_>,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.widened.load(Relaxed) || (!self.widen_at_once && disk.cold(listed) == Some(false)) {
            return;
        }
        if !self.widened.swap(true, Relaxed) {
            tracing::debug!(
                threads = self.threads,
                "walk: reading from the disk, widened"
            );
            self.spawn(s, self.started..self.threads);
        }
    }

    /// Starts walk threads numbered `ids` (the ones that do not start are not needed: the
    /// threads running do the walk).
    fn spawn<'s>(&'s self, s: &'s std::thread::Scope<'s, '_>, ids: std::ops::Range<usize>) {
        for i in ids {
            let spawned = std::thread::Builder::new()
                .name(format!("corral-walk-{i}"))
                .spawn_scoped(s, move || self.worker(s));
            if spawned.is_err() {
                break;
            }
        }
    }

    /// Reads one directory into `out` and returns its subdirectories and the number of its
    /// entries.
    fn dir(&self, rel: String) -> (Vec<String>, u64) {
        let mut subdirs = Vec::new();
        let abs = self.root.join(&rel);
        let rd = match std::fs::read_dir(&abs) {
            Ok(r) => r,
            Err(e) => {
                self.errors
                    .lock()
                    .unwrap()
                    .push(SyncError::fs("read dir", &abs, e));
                return (subdirs, 0);
            }
        };
        let mut batch = Vec::new();
        // Where a name starts in its path.
        let skip = if rel.is_empty() { 0 } else { rel.len() + 1 };
        for de in rd {
            let Ok(de) = de else {
                self.skipped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            };
            let name = match de.file_name().into_string() {
                Ok(n) => n,
                Err(name) => {
                    tracing::warn!(dir = %abs.display(), ?name, "skipping a name that is not UTF-8");
                    self.skipped
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
            };
            // In the top directory the name is the path (no second allocation).
            let path = if rel.is_empty() {
                name
            } else {
                join(&rel, &name)
            };
            let name = &path[skip..];
            if self.opts.skip.contains(&path) {
                continue;
            }
            if name.ends_with(TEMP_SUFFIX) && name.starts_with('.') {
                if self.opts.clean_temps {
                    let _ = std::fs::remove_file(de.path());
                }
                continue;
            }
            // Relative to the directory's descriptor (no lookup of the whole path).
            let md = match de.metadata() {
                Ok(m) => m,
                Err(_) => continue, // vanished
            };
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                Kind::Dir
            } else if ft.is_file() {
                Kind::File
            } else if ft.is_symlink() {
                match std::fs::read_link(de.path()) {
                    Ok(t) => Kind::Symlink(t.into_os_string().into_encoded_bytes()),
                    Err(_) => continue,
                }
            } else if ft.is_char_device() {
                Kind::Char(md.rdev())
            } else if ft.is_block_device() {
                Kind::Block(md.rdev())
            } else if ft.is_fifo() {
                Kind::Fifo
            } else {
                // Sockets are not synced (rsync skips them too without --specials).
                continue;
            };
            if kind == Kind::Dir {
                subdirs.push(path.clone());
            }
            let st = Stat::of(&md);
            // A file's attributes wait for the cache (loaded while the walk runs).
            let xattrs = match kind {
                Kind::File => None,
                _ => Some(read_xattrs(&de.path())),
            };
            batch.push(Raw {
                path,
                kind,
                st,
                xattrs,
                hit: None,
            });
        }
        // Siblings share the directory's path: ordering them by name (shorter keys, a small
        // sort on this walk thread) gives their manifest order, and [`in_manifest_order`]
        // nests the directories' lists without sorting the whole tree again.
        batch.sort_unstable_by(|a, b| path_order(&a.path[skip..], &b.path[skip..]));
        let mut out = self.out.lock().unwrap();
        let at = out.raws.len();
        out.raws.extend(batch);
        let end = out.raws.len();
        out.dirs.push((rel, at..end));
        (subdirs, (end - at) as u64)
    }
}

/// The manifest order of the walk's entries: a directory's subtree comes right after it and
/// before its next sibling, as [`path_order`] wants (`/` sorts before every other byte), so
/// the directories' lists (each sorted by name) are spliced in after their entries, depth
/// first. No path is compared and no entry moves: `order[k]` is the index of the entry at
/// place `k`.
fn manifest_order(listed: &Listed) -> Vec<usize> {
    let raws = &listed.raws;
    let n = raws.len();
    let mut lists: HashMap<&str, std::ops::Range<usize>> = listed
        .dirs
        .iter()
        .map(|(d, r)| (d.as_str(), r.clone()))
        .collect();
    let mut order = Vec::with_capacity(n);
    let mut stack = Vec::new();
    if let Some(top) = lists.remove("") {
        stack.push(top);
    }
    while let Some(list) = stack.last_mut() {
        let Some(i) = list.next() else {
            stack.pop();
            continue;
        };
        order.push(i);
        if raws[i].kind == Kind::Dir
            && let Some(below) = lists.remove(raws[i].path.as_str())
        {
            stack.push(below);
        }
    }
    if order.len() != n {
        // Every list but the top one is a directory's, reached from its entry: not reached.
        debug_assert!(false, "directory lists not reached");
        order = (0..n).collect();
        order.sort_unstable_by(|&a, &b| path_order(&raws[a].path, &raws[b].path));
    }
    order
}

/// Walks `root` into a manifest (the root itself is the entry `""`).
pub fn scan(root: &Path, opts: &ScanOptions) -> Result<(Manifest, ScanStats), SyncError> {
    let (m, st, _) = walk(root, opts)?.hash(&|_| false)?;
    Ok((m, st))
}

/// A tree walked but not yet hashed (see [`walk`]).
#[derive(Debug)]
pub struct Walked {
    root: PathBuf,
    root_entry: Entry,
    cache_path: Option<PathBuf>,
    cache: Loaded,
    stale: bool,
    /// In the walk's order (see `order`).
    raws: Vec<Raw>,
    /// Indices into `raws` in manifest order.
    order: Vec<usize>,
    skipped: u64,
}

/// What keys a file's hash in the cache: inode, size, mtime and ctime (ctime cannot be set
/// by users, so an edit whose mtime was restored still changes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheKey {
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl CacheKey {
    /// The key of a file's metadata.
    pub fn of(md: &std::fs::Metadata) -> CacheKey {
        CacheKey {
            ino: md.ino(),
            size: md.size(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
        }
    }

    fn of_stat(st: &Stat) -> CacheKey {
        CacheKey {
            ino: st.ino,
            size: st.size,
            mtime: (st.mtime, st.mtime_ns),
            ctime: (st.ctime, st.ctime_ns),
        }
    }

    /// The file's size when it was walked.
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// A regular file the scan left unhashed (see [`Walked::hash`]): its entry's `content` is
/// `None`; whoever reads it later fills it in and may record it with [`cache_add_keyed`].
#[derive(Debug, Clone)]
pub struct Deferred {
    /// Its path.
    pub path: String,
    /// Its metadata as walked: a read is that file's content only while this still holds.
    pub key: CacheKey,
    /// It has holes (allocated blocks < size).
    pub sparse: bool,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Walks `root` (directories, stats, extended attributes, hash cache look-ups) without
/// reading any file; [`Walked::hash`] hashes the files the cache does not know.
pub fn walk(root: &Path, opts: &ScanOptions) -> Result<Walked, SyncError> {
    // The walk waits on the disk when the inodes are not cached (a cold scan): more threads
    // than cores keep several directories' reads in flight. On a cached tree it is CPU work,
    // and threads beyond the cores only contend (10 % slower on two cores): it starts with
    // one per core and widens when a thread reads from the disk.
    let threads = std::env::var("CORRAL_SYNC_WALK_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(WALK_THREADS)
        .max(1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    walk_shaped(root, opts, threads.min(cores), threads, false)
}

/// [`walk`] with `started` threads, widened to `threads` when the tree is cold (or, with
/// `widen_at_once`, after the first directory: for tests).
fn walk_shaped(
    root: &Path,
    opts: &ScanOptions,
    started: usize,
    threads: usize,
    widen_at_once: bool,
) -> Result<Walked, SyncError> {
    let rmd = std::fs::symlink_metadata(root).map_err(|e| SyncError::fs("stat", root, e))?;
    if !rmd.is_dir() {
        return Err(SyncError::fs(
            "scan",
            root,
            std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        ));
    }
    let walk = Walk {
        root,
        opts,
        out: Mutex::new(Listed::default()),
        errors: Mutex::new(Vec::new()),
        skipped: 0.into(),
        queue: Mutex::new(Queue {
            dirs: vec![String::new()],
            busy: 0,
        }),
        ready: std::sync::Condvar::new(),
        widened: (started >= threads).into(),
        widen_at_once,
        threads,
        started,
    };
    // The cache file is read and decoded while the walk runs (on a cold cache both wait for
    // the disk).
    let (cache, stale) = std::thread::scope(|s| {
        let loader = opts.cache.as_deref().map(|p| {
            std::thread::Builder::new()
                .name("corral-cache".into())
                .spawn_scoped(s, move || {
                    let loaded = load_cache_when_saved(p);
                    cache_housekeeping(p, std::time::SystemTime::now());
                    loaded
                })
        });
        walk.spawn(s, 1..started);
        walk.worker(s);
        match (loader, opts.cache.as_deref()) {
            (Some(Ok(h)), _) => h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
            (Some(Err(_)), Some(p)) => load_cache_when_saved(p), // no thread: read it here
            _ => (Loaded::default(), false),
        }
    });
    if let Some(e) = walk.errors.into_inner().unwrap().into_iter().next() {
        return Err(e);
    }
    let skipped = walk.skipped.into_inner();
    let listed = walk.out.into_inner().unwrap();
    let order = manifest_order(&listed);
    let mut raws = listed.raws;
    // A file the cache knows unchanged (ctime included) has its hash and attributes cached.
    // Both lists are in manifest order: one merge pass, no search.
    {
        let mut ci = 0;
        for &i in &order {
            let r = &mut raws[i];
            if r.kind != Kind::File {
                continue;
            }
            let n = cache.files.len();
            while ci < n && path_order(cache.path(ci), &r.path).is_lt() {
                ci += 1;
            }
            if ci < n && cache.path(ci) == r.path && cache.files[ci].key == CacheKey::of_stat(&r.st)
            {
                r.hit = Some(ci);
                r.xattrs.clone_from(&cache.files[ci].xattrs);
            }
        }
    }

    // Hard links: the first path (in manifest order) of an inode is the file, the others
    // name it.
    let mut leaders: HashMap<(u64, u64), String> = HashMap::new();
    for &i in &order {
        let r = &mut raws[i];
        if r.kind == Kind::File && r.st.nlink > 1 {
            let key = (r.st.dev, r.st.ino);
            match leaders.get(&key) {
                Some(l) => r.kind = Kind::Hardlink(l.clone()),
                None => {
                    leaders.insert(key, r.path.clone());
                }
            }
        }
    }
    let root_entry = Entry {
        path: String::new(),
        kind: Kind::Dir,
        meta: meta_of(&Stat::of(&rmd), read_xattrs(root)),
        content: None,
    };
    Ok(Walked {
        root: root.to_path_buf(),
        root_entry,
        cache_path: opts.cache.clone(),
        cache,
        stale,
        raws,
        order,
        skipped,
    })
}

/// How a walked entry's content was found.
enum Hashed {
    NotFile,
    /// From the cache entry of this index (moved out of it, not copied).
    Cached(usize),
    /// Read and hashed (boxed: the results of 50,000 files stay small).
    Fresh(Box<Content>),
    Deferred,
}

impl Walked {
    /// Hashes the files the cache does not know (in parallel) into the manifest, and
    /// rewrites the cache when it changed. A file of at most [`CHUNK_THRESHOLD`] bytes the
    /// cache misses and for whose path `defer` says yes (asked as late as possible, once per
    /// file, possibly from several threads) is not read: its entry has no content and it is
    /// listed as [`Deferred`]. Larger files are always hashed: their chunk list is needed
    /// before their data.
    pub fn hash(
        self,
        defer: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<(Manifest, ScanStats, Vec<Deferred>), SyncError> {
        let s = self.hash_in_background(defer, false)?;
        s.save.wait();
        Ok((s.manifest, s.stats, s.deferred))
    }

    /// [`Walked::hash`], with the cache (when it must be rewritten: 50,000 entries encoded,
    /// compressed and written) saved on a thread of its own when `background`: the manifest
    /// is ready before the cache is on disk (see [`Scanned`]).
    pub fn hash_in_background(
        self,
        defer: &(dyn Fn(&str) -> bool + Sync),
        background: bool,
    ) -> Result<Scanned, SyncError> {
        let Walked {
            root,
            root_entry,
            cache_path,
            cache,
            stale,
            mut raws,
            order,
            skipped,
        } = self;
        let mut st = ScanStats {
            entries: raws.len() as u64 + 1,
            skipped,
            ..ScanStats::default()
        };
        // Errors boxed too: one result per entry, 16 bytes each.
        let content = |r: &mut Raw| -> Result<Hashed, Box<SyncError>> {
            if r.xattrs.is_none() {
                // A file the cache did not know, or a version-1 entry (no attributes): read
                // after the stat that keys its cache entry.
                r.xattrs = Some(read_xattrs(&root.join(&r.path)));
            }
            if r.kind != Kind::File {
                return Ok(Hashed::NotFile);
            }
            if let Some(i) = r.hit {
                return Ok(Hashed::Cached(i));
            }
            // A large file is chunked before its first byte can be sent (its chunk list
            // leads its data), so deferring it would save no read: it is hashed now, while
            // the transport starts and the child scans.
            if r.st.size <= CHUNK_THRESHOLD && defer(&r.path) {
                return Ok(Hashed::Deferred);
            }
            let sparse = r.st.blocks * 512 < r.st.size;
            Ok(Hashed::Fresh(Box::new(hash_file(
                &root.join(&r.path),
                sparse,
            )?)))
        };
        // Files are read on rayon's pool; when the cache has every one with its attributes,
        // this thread copies them (no pool to start, no workers left spinning afterwards).
        let misses = raws
            .iter()
            .any(|r| r.xattrs.is_none() || (r.kind == Kind::File && r.hit.is_none()));
        let results: Vec<Result<Hashed, Box<SyncError>>> = if misses {
            raws.par_iter_mut().map(content).collect()
        } else {
            raws.iter_mut().map(content).collect()
        };

        let mut entries = Vec::with_capacity(raws.len() + 1);
        entries.push(root_entry);
        // The cache is unchanged when every file came from it with its attributes and every
        // entry of it was used: then it is neither rebuilt nor rewritten (a no-change run
        // writes nothing).
        let hits = results
            .iter()
            .filter(|r| matches!(r, Ok(Hashed::Cached(_))))
            .count();
        let unchanged = !stale
            && hits == cache.files.len()
            && raws
                .iter()
                .all(|r| r.hit.is_none_or(|i| cache.files[i].xattrs.is_some()))
            && results
                .iter()
                .all(|r| matches!(r, Ok(Hashed::NotFile | Hashed::Cached(_))));
        let rewrite = cache_path.is_some() && !unchanged;
        let mut cache = cache;
        let mut new_cache = Vec::new();
        let mut deferred = Vec::new();
        let mut fresh = Vec::new();
        let mut results = results;
        for &i in &order {
            let r = &mut raws[i];
            let c = std::mem::replace(&mut results[i], Ok(Hashed::NotFile));
            let content = match c {
                // Each cache entry is hit by one path at most (both lists are in manifest
                // order, paths unique), so taking its content leaves nothing another needs.
                Ok(Hashed::Cached(i)) => Some(std::mem::replace(
                    &mut cache.files[i].content,
                    Content {
                        size: 0,
                        hash: Hash([0; 32]),
                        chunks: Vec::new(),
                        sparse: false,
                    },
                )),
                Ok(Hashed::Fresh(c)) => Some(*c),
                Ok(Hashed::Deferred) => {
                    st.deferred += 1;
                    deferred.push(Deferred {
                        path: r.path.clone(),
                        key: CacheKey {
                            ino: r.st.ino,
                            size: r.st.size,
                            mtime: (r.st.mtime, r.st.mtime_ns),
                            ctime: (r.st.ctime, r.st.ctime_ns),
                        },
                        sparse: r.st.blocks * 512 < r.st.size,
                        xattrs: r.xattrs.clone().unwrap_or_default(),
                    });
                    None
                }
                Ok(Hashed::NotFile) => None,
                Err(e)
                    if matches!(&*e, SyncError::Fs { source, .. }
                        if source.kind() == std::io::ErrorKind::NotFound) =>
                {
                    continue; // vanished during the scan
                }
                Err(e) => return Err(*e),
            };
            if let Some(c) = &content {
                if r.hit.is_some() {
                    st.cached += 1;
                } else {
                    st.hashed += 1;
                    st.hashed_bytes += c.size;
                    fresh.push(entries.len());
                }
                if rewrite {
                    new_cache.push(CacheEntry {
                        path: r.path.clone(),
                        ino: r.st.ino,
                        size: r.st.size,
                        mtime: (r.st.mtime, r.st.mtime_ns),
                        ctime: (r.st.ctime, r.st.ctime_ns),
                        content: c.clone(),
                        xattrs: r.xattrs.clone(),
                    });
                }
            }
            entries.push(Entry {
                meta: meta_of(&r.st, r.xattrs.take().unwrap_or_default()),
                path: std::mem::take(&mut r.path),
                kind: std::mem::replace(&mut r.kind, Kind::Fifo),
                content,
            });
        }
        // Rewrite the cache only when it changed (a no-change run writes nothing).
        let mut save = CacheSave(None);
        if let Some(p) = cache_path
            && rewrite
        {
            let work = move || {
                let _lock = CacheLock::update(&p, CACHE_LOCK_WAIT);
                if let Err(e) = save_cache(&p, new_cache) {
                    // A missing cache costs time, not correctness.
                    tracing::warn!(error = %e, "hash cache not saved; the next run hashes again");
                }
            };
            if background {
                match std::thread::Builder::new()
                    .name("corral-cache-save".into())
                    .spawn(work)
                {
                    Ok(h) => save = CacheSave(Some(h)),
                    Err(e) => {
                        tracing::warn!(error = %e, "hash cache not saved; the next run hashes again");
                    }
                }
            } else {
                work();
            }
        }
        Ok(Scanned {
            manifest: Manifest { entries },
            stats: st,
            deferred,
            save,
            fresh,
        })
    }
}

/// A tree hashed by [`Walked::hash_in_background`].
#[derive(Debug)]
pub struct Scanned {
    /// The manifest, in the walk's manifest order.
    pub manifest: Manifest,
    pub stats: ScanStats,
    /// The files left unread (see [`Walked::hash`]).
    pub deferred: Vec<Deferred>,
    /// The cache's save, waited for by [`CacheSave::wait`] or when dropped.
    pub save: CacheSave,
    /// Where the files hashed in this scan (the cache did not know them, or not as they are
    /// now) are in the manifest: the files that changed since the cache was written.
    pub fresh: Vec<usize>,
}

/// A hash cache being saved on a thread of its own (see [`Walked::hash_in_background`]):
/// waited for by [`CacheSave::wait`] or when dropped.
#[derive(Debug)]
#[must_use = "dropping it waits for the save"]
pub struct CacheSave(Option<std::thread::JoinHandle<()>>);

impl CacheSave {
    /// Waits until the cache is on disk (or its save failed, with a warning).
    pub fn wait(mut self) {
        self.join();
    }

    fn join(&mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

impl Drop for CacheSave {
    fn drop(&mut self) {
        self.join();
    }
}

/// Records files hashed after the scan that listed them as [`Deferred`]: each with the key
/// it was walked with and the attributes read then (valid together: the caller checked that
/// the file still had that key before and after it read it).
pub fn cache_add_keyed(cache: &Path, files: Vec<(Deferred, Content)>) {
    if files.is_empty() {
        return;
    }
    let _lock = CacheLock::update(cache, CACHE_LOCK_WAIT);
    let (old, _) = load_cache(cache);
    let mut all: HashMap<String, CacheEntry> =
        old.into_iter().map(|e| (e.path.clone(), e)).collect();
    for (d, content) in files {
        all.insert(
            d.path.clone(),
            CacheEntry {
                path: d.path,
                ino: d.key.ino,
                size: d.key.size,
                mtime: d.key.mtime,
                ctime: d.key.ctime,
                content,
                xattrs: Some(d.xattrs),
            },
        );
    }
    let mut all: Vec<CacheEntry> = all.into_values().collect();
    all.sort_unstable_by(|a, b| path_order(&a.path, &b.path));
    if let Err(e) = save_cache(cache, all) {
        tracing::warn!(error = %e, "hash cache not saved; the next run hashes again");
    }
}

/// Records freshly written files in the cache so the next scan does not read them again.
/// `lock`: the cache's [`CacheLock`] if the caller took it already (e.g. before answering,
/// so that a scan started on that answer waits for this update); else it is taken here.
pub fn cache_add(
    cache: &Path,
    root: &Path,
    written: &[(String, Content)],
    lock: Option<CacheLock>,
) -> Result<(), SyncError> {
    if written.is_empty() {
        return Ok(());
    }
    let _lock = lock.or_else(|| CacheLock::update(cache, CACHE_LOCK_WAIT));
    let (files, _) = load_cache(cache);
    let mut files: HashMap<String, CacheEntry> =
        files.into_iter().map(|e| (e.path.clone(), e)).collect();
    // One stat and one xattr list per written file (50,000 after a large copy, on the
    // receiver's last answer's path): on rayon's threads.
    let fresh: Vec<CacheEntry> = written
        .par_iter()
        .filter_map(|(path, content)| {
            let p = root.join(path);
            let md = std::fs::symlink_metadata(&p).ok()?;
            // Attributes read after the stat (see CacheEntry).
            let xattrs = Some(read_xattrs(&p));
            Some(CacheEntry {
                path: path.clone(),
                ino: md.ino(),
                size: md.size(),
                mtime: (md.mtime(), md.mtime_nsec()),
                ctime: (md.ctime(), md.ctime_nsec()),
                content: content.clone(),
                xattrs,
            })
        })
        .collect();
    for e in fresh {
        files.insert(e.path.clone(), e);
    }
    let mut files: Vec<CacheEntry> = files.into_values().collect();
    files.sort_unstable_by(|a, b| path_order(&a.path, &b.path));
    if let Err(e) = save_cache(cache, files) {
        tracing::warn!(error = %e, "hash cache not saved; the next run hashes again");
    }
    Ok(())
}

/// The default hash cache file for a tree root: `$CORRAL_STATE_DIR/sync/<hash of root>.cache`
/// (`/var/lib/corral` when unset).
pub fn default_cache(root: &Path) -> PathBuf {
    cache_in(&default_state_dir(), root)
}

/// This machine's state directory: `$CORRAL_STATE_DIR`, else `/var/lib/corral`.
pub fn default_state_dir() -> PathBuf {
    std::env::var_os("CORRAL_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/corral"))
}

/// The hash cache file of the tree at `root` in the state directory `state`
/// (`STATE/sync/HASH.cache`, named after the root's canonical path).
pub fn cache_in(state: &Path, root: &Path) -> PathBuf {
    let canon = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    let h = Hash::of(canon.as_os_str().as_encoded_bytes());
    state
        .join("sync")
        .join(format!("{}.cache", &h.to_hex()[..32]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_file_read_ahead_hashes_as_chunking_it_in_memory_does() {
        let t = tempfile::tempdir().unwrap();
        // Not a multiple of the read-ahead block, several blocks long.
        let mut x = 7u64;
        let data: Vec<u8> = (0..AHEAD_BLOCK * 2 + 12_345)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let p = t.path().join("big");
        std::fs::write(&p, &data).unwrap();
        let c = hash_file(&p, false).unwrap();
        let want: Vec<Chunk> = fastcdc::v2020::FastCDC::new(&data, CDC_MIN, CDC_AVG, CDC_MAX)
            .map(|k| Chunk {
                len: k.length as u32,
                hash: Hash::of(&data[k.offset..k.offset + k.length]),
            })
            .collect();
        assert_eq!(c.size, data.len() as u64);
        assert_eq!(c.hash, Hash::of(&data));
        assert_eq!(c.chunks, want);
        // A reader that stops early stops the thread reading ahead (no hang), and one that
        // reads to the end sees every byte.
        let f = std::fs::File::open(&p).unwrap();
        let first = read_ahead(&f, |r| {
            let mut b = [0u8; 10];
            r.read_exact(&mut b).map(|()| b)
        });
        assert_eq!(&first.unwrap()[..], &data[..10]);
        let mut all = Vec::new();
        read_ahead(&f, |r| r.read_to_end(&mut all)).unwrap();
        assert!(all == data, "read-ahead bytes differ");
    }

    #[test]
    fn the_walk_lists_every_entry_once_in_manifest_order() {
        let t = tempfile::tempdir().unwrap();
        // Names where byte order and manifest order differ (`a/…` before `a-b`, `a.b`, `ab`).
        let mut want = Vec::new();
        for d in ["a", "a-b", "a.b", "ab", "a/x", "a/x/y", "ab/a", "z"] {
            std::fs::create_dir(t.path().join(d)).unwrap();
            want.push(d.to_string());
        }
        for f in [
            "a/x/y/f", "a/x-1", "a/x0", "a-b/f", "a.b/f", "ab/a/f", "b", "z/f", "0",
        ] {
            std::fs::write(t.path().join(f), f).unwrap();
            want.push(f.to_string());
        }
        for i in 0..300 {
            let f = format!("z/g{}", 300 - i);
            std::fs::write(t.path().join(&f), b"x").unwrap();
            want.push(f);
        }
        want.sort_by(|a, b| path_order(a, b));
        want.insert(0, String::new());
        let (m, st) = scan(t.path(), &ScanOptions::default()).unwrap();
        let got: Vec<&str> = m.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(got, want);
        assert_eq!(st.entries, want.len() as u64);
        assert!(got.iter().position(|p| *p == "a/x/y/f") < got.iter().position(|p| *p == "a-b"));
    }

    #[test]
    fn a_walk_widened_as_it_goes_lists_what_a_narrow_one_does() {
        let t = tempfile::tempdir().unwrap();
        for d in 0..40 {
            let d = t.path().join(format!("d{d}/e"));
            std::fs::create_dir_all(&d).unwrap();
            for f in 0..20 {
                std::fs::write(d.join(format!("f{f}")), b"x").unwrap();
            }
        }
        let paths = |w: Walked| -> Vec<String> {
            let (m, _, _) = w.hash(&|_| false).unwrap();
            m.entries.into_iter().map(|e| e.path).collect()
        };
        let opts = ScanOptions::default();
        let narrow = paths(walk_shaped(t.path(), &opts, 1, 1, false).unwrap());
        let widened = paths(walk_shaped(t.path(), &opts, 1, 8, true).unwrap());
        assert_eq!(narrow.len(), 1 + 40 * 22);
        assert_eq!(widened, narrow);
    }

    /// A thread's disk reads are counted from when it opens its counter: one that has read
    /// nothing since is not cold.
    #[test]
    fn disk_reads_count_from_the_walk_start() {
        let r = std::thread::spawn(|| {
            let d = DiskReads::open();
            (d.io.is_some(), d.cold(0), d.cold(1_000_000))
        })
        .join()
        .unwrap();
        if r.0 {
            assert_eq!((r.1, r.2), (Some(false), Some(false)));
        } else {
            eprintln!("no /proc/thread-self/io here (no task I/O accounting): nothing to check");
        }
    }

    #[test]
    fn caches_unused_for_30_days_are_removed_and_the_used_one_is_marked() {
        let t = tempfile::tempdir().unwrap();
        let now = std::time::SystemTime::now();
        let day = std::time::Duration::from_secs(24 * 3600);
        let file = |name: &str, age_days: u32| {
            let p = t.path().join(name);
            std::fs::write(&p, b"x").unwrap();
            let f = std::fs::File::options().write(true).open(&p).unwrap();
            f.set_modified(now - day * age_days).unwrap();
            p
        };
        let used = file("used.cache", 40);
        let gone = file("gone.cache", 31);
        let recent = file("recent.cache", 29);
        let tmp = file("crashed.tmp", 45);
        let other = file("notes.txt", 400);
        cache_housekeeping(&used, now);
        assert!(used.exists() && recent.exists() && other.exists());
        assert!(!gone.exists() && !tmp.exists());
        let m = std::fs::metadata(&used).unwrap().modified().unwrap();
        assert!(
            now.duration_since(m).unwrap_or_default() < day,
            "used cache marked now"
        );
        // Used within the day: nothing touched, nothing scanned.
        let gone2 = file("gone2.cache", 60);
        cache_housekeeping(&used, now + day / 2);
        assert!(gone2.exists());
        // A day later the directory is pruned again.
        cache_housekeeping(&used, now + day * 2);
        assert!(!gone2.exists() && used.exists());
    }

    /// Issue #5: a scan started while its cache is being saved (the previous run's receiver
    /// answers before it updates its cache) waits for the save and reads the new cache; a
    /// save that takes too long is not waited for beyond the bound.
    #[test]
    fn a_scan_waits_for_a_cache_being_saved_and_reads_the_new_one() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("a"), b"a").unwrap();
        let cache = t.path().join("state/scan.cache");
        let opts = ScanOptions {
            cache: Some(cache.clone()),
            ..ScanOptions::default()
        };
        let (m1, s1) = scan(&root, &opts).unwrap();
        assert_eq!(s1.hashed, 1);
        assert_eq!(
            m1.get("a").unwrap().content.as_ref().unwrap().hash,
            Hash::of(b"a")
        );
        // A saver holds the lock and, 300 ms later, renames in a cache whose entry for `a`
        // (same keys) carries another hash: only a scan that waited can have it.
        let lock = CacheLock::update(&cache, std::time::Duration::ZERO).unwrap();
        let (mut files, _) = load_cache(&cache);
        let marker = Hash::of(b"from the new cache");
        files
            .iter_mut()
            .find(|e| e.path == "a")
            .unwrap()
            .content
            .hash = marker;
        let saving = cache.clone();
        let saver = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            save_cache(&saving, files).unwrap();
            drop(lock);
        });
        let t0 = std::time::Instant::now();
        let (m2, s2) = scan(&root, &opts).unwrap();
        let waited = t0.elapsed();
        saver.join().unwrap();
        assert_eq!((s2.hashed, s2.cached), (0, 1), "{s2:?}");
        assert_eq!(m2.get("a").unwrap().content.as_ref().unwrap().hash, marker);
        assert!(
            waited >= std::time::Duration::from_millis(250),
            "{waited:?}"
        );
        // A lock held beyond the wait is given up on (the scan then reads the file as is).
        let held = CacheLock::update(&cache, std::time::Duration::ZERO).unwrap();
        let t0 = std::time::Instant::now();
        assert!(CacheLock::read(&cache, std::time::Duration::from_millis(100)).is_none());
        assert!(t0.elapsed() >= std::time::Duration::from_millis(100));
        drop(held);
        assert!(CacheLock::read(&cache, std::time::Duration::ZERO).is_some());
        // The lock file lives beside the cache and is pruned only with it.
        assert!(cache.with_extension("lock").exists());
    }

    fn setfattr(p: &Path, name: &str, value: &str) {
        let ok = std::process::Command::new("setfattr")
            .args(["-n", name, "-v", value])
            .arg(p)
            .status()
            .unwrap()
            .success();
        assert!(ok, "setfattr {name} on {}", p.display());
    }

    fn xattrs_of<'m>(m: &'m Manifest, path: &str) -> &'m [(Vec<u8>, Vec<u8>)] {
        &m.get(path).unwrap().meta.xattrs
    }

    #[test]
    fn cached_files_keep_their_attributes_and_changes_are_seen() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("d")).unwrap();
        for f in ["a", "b", "d/c"] {
            std::fs::write(root.join(f), f).unwrap();
        }
        setfattr(&root.join("a"), "user.one", "1");
        let opts = ScanOptions {
            cache: Some(t.path().join("scan.cache")),
            ..ScanOptions::default()
        };
        let (m1, s1) = scan(&root, &opts).unwrap();
        assert_eq!(s1.hashed, 3);
        let one = vec![(b"user.one".to_vec(), b"1".to_vec())];
        assert_eq!(xattrs_of(&m1, "a"), one);
        // Every file hits: the attributes come from the cache, the same as read.
        let (m2, s2) = scan(&root, &opts).unwrap();
        assert_eq!((s2.hashed, s2.cached), (0, 3));
        assert_eq!(m1, m2);
        // An attribute added or removed changes ctime: the file misses and is read again.
        setfattr(&root.join("b"), "user.two", "2");
        let rm = std::process::Command::new("setfattr")
            .args(["-x", "user.one"])
            .arg(root.join("a"))
            .status()
            .unwrap();
        assert!(rm.success());
        let (m3, s3) = scan(&root, &opts).unwrap();
        assert_eq!((s3.hashed, s3.cached), (2, 1), "{s3:?}");
        assert!(xattrs_of(&m3, "a").is_empty());
        assert_eq!(xattrs_of(&m3, "b"), [(b"user.two".to_vec(), b"2".to_vec())]);
        // And the rewritten cache holds the new attributes.
        let (m4, s4) = scan(&root, &opts).unwrap();
        assert_eq!((s4.hashed, s4.cached), (0, 3));
        assert_eq!(m3, m4);
    }

    #[test]
    fn a_version_1_cache_is_used_and_rewritten_with_attributes() {
        #[derive(Serialize)]
        struct V1 {
            version: u32,
            files: HashMap<String, CacheEntryV1>,
        }
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        for f in ["a", "b"] {
            std::fs::write(root.join(f), f).unwrap();
        }
        setfattr(&root.join("b"), "user.x", "y");
        let (plain, _) = scan(&root, &ScanOptions::default()).unwrap();
        let mut files = HashMap::new();
        for f in ["a", "b"] {
            let md = std::fs::symlink_metadata(root.join(f)).unwrap();
            files.insert(
                f.to_string(),
                CacheEntryV1 {
                    ino: md.ino(),
                    size: md.size(),
                    mtime: (md.mtime(), md.mtime_nsec()),
                    ctime: (md.ctime(), md.ctime_nsec()),
                    content: plain.get(f).unwrap().content.clone().unwrap(),
                },
            );
        }
        let cache = t.path().join("v1.cache");
        let b = postcard::to_stdvec(&V1 { version: 1, files }).unwrap();
        std::fs::write(&cache, zstd::encode_all(&b[..], 1).unwrap()).unwrap();
        let opts = ScanOptions {
            cache: Some(cache.clone()),
            ..ScanOptions::default()
        };
        let (m, s) = scan(&root, &opts).unwrap();
        assert_eq!((s.hashed, s.cached), (0, 2), "the old hashes are used");
        assert_eq!(m, plain);
        let (files, stale) = load_cache(&cache);
        assert!(!stale, "rewritten as version {CACHE_VERSION}");
        assert_eq!(files.len(), 2);
        assert_eq!(
            files[1].xattrs,
            Some(vec![(b"user.x".to_vec(), b"y".to_vec())])
        );
    }

    #[test]
    fn an_unreadable_cache_means_rehashing() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("a"), "a").unwrap();
        let cache = t.path().join("bad.cache");
        for junk in [
            &b"not zstd"[..],
            &zstd::encode_all(&[7u8, 1, 2, 3][..], 1).unwrap(),
        ] {
            std::fs::write(&cache, junk).unwrap();
            let opts = ScanOptions {
                cache: Some(cache.clone()),
                ..ScanOptions::default()
            };
            let (_, s) = scan(&root, &opts).unwrap();
            assert_eq!((s.hashed, s.cached), (1, 0));
            let (_, s) = scan(&root, &opts).unwrap();
            assert_eq!((s.hashed, s.cached), (0, 1), "the cache was rewritten");
        }
    }

    /// A scan reads a version-2 cache with borrowed paths: the same entries as the owned
    /// decode, in order; a file out of order is sorted, deduplicated and marked for rewriting.
    #[test]
    fn the_scan_reads_the_cache_it_writes() {
        let t = tempfile::tempdir().unwrap();
        let cache = t.path().join("c.cache");
        let entry = |path: &str, n: u8| CacheEntry {
            path: path.into(),
            ino: u64::from(n),
            size: u64::from(n) * 10,
            mtime: (i64::from(n), 1),
            ctime: (i64::from(n), 2),
            content: Content {
                size: u64::from(n) * 10,
                hash: Hash([n; 32]),
                chunks: vec![Chunk {
                    len: 7,
                    hash: Hash([n + 1; 32]),
                }],
                sparse: n.is_multiple_of(2),
            },
            xattrs: (n != 3).then(|| vec![(b"user.k".to_vec(), vec![n])]),
        };
        let ordered = ["", "a", "a/b", "a/é", "a.b", "b"];
        let files: Vec<CacheEntry> = (0u8..).zip(ordered).map(|(n, p)| entry(p, n)).collect();
        save_cache(&cache, files.clone()).unwrap();
        let (l, stale) = load_for_scan(&cache);
        assert!(!stale);
        assert_eq!(l.files.len(), files.len());
        for (i, e) in files.iter().enumerate() {
            let c = &l.files[i];
            assert_eq!(l.path(i), e.path);
            assert_eq!(
                (c.key.ino, c.key.size, c.key.mtime, c.key.ctime),
                (e.ino, e.size, e.mtime, e.ctime)
            );
            assert_eq!((&c.content, &c.xattrs), (&e.content, &e.xattrs));
        }
        // Out of order, with a path twice.
        let mut shuffled = files.clone();
        shuffled.reverse();
        shuffled.push(entry("a", 9));
        save_cache(&cache, shuffled).unwrap();
        let (l, stale) = load_for_scan(&cache);
        assert!(stale);
        let paths: Vec<&str> = (0..l.files.len()).map(|i| l.path(i)).collect();
        assert_eq!(paths, ordered);
    }
}
