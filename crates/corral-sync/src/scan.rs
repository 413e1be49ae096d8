//! Walking a tree into a [`Manifest`]: a parallel walk (rayon), BLAKE3 hashes, FastCDC chunks
//! for large files, and a hash cache so unchanged files are not read again.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::SyncError;
use crate::manifest::{CHUNK_THRESHOLD, Chunk, Content, Entry, Hash, Kind, Manifest, Meta};
use crate::owner;

/// FastCDC sizes: min, average, max.
pub const CDC_MIN: u32 = 16 * 1024;
/// Average chunk size.
pub const CDC_AVG: u32 = 64 * 1024;
/// Largest chunk.
pub const CDC_MAX: u32 = 256 * 1024;

/// Threads of the directory walk (`CORRAL_SYNC_WALK_THREADS` overrides it).
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
}

/// One file's cached hash, valid while inode, size, mtime and ctime are unchanged. ctime
/// cannot be set by users, so an edit whose mtime was restored (`touch -d`) still misses.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CacheEntry {
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    content: Content,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    files: HashMap<String, CacheEntry>,
}

struct Raw {
    path: String,
    kind: Kind,
    md: std::fs::Metadata,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn load_cache(p: &Path) -> HashMap<String, CacheEntry> {
    let Ok(z) = std::fs::read(p) else {
        return HashMap::new();
    };
    let Ok(b) = zstd::decode_all(&z[..]) else {
        return HashMap::new();
    };
    match postcard::from_bytes::<CacheFile>(&b) {
        Ok(c) if c.version == 1 => c.files,
        _ => {
            tracing::warn!(path = %p.display(), "hash cache unreadable, rehashing");
            HashMap::new()
        }
    }
}

fn save_cache(p: &Path, files: HashMap<String, CacheEntry>) -> Result<(), SyncError> {
    let b = postcard::to_stdvec(&CacheFile { version: 1, files })
        .map_err(|e| SyncError::fs("encode cache", p, std::io::Error::other(e)))?;
    let z = zstd::encode_all(&b[..], 1).map_err(|e| SyncError::fs("compress cache", p, e))?;
    if let Some(d) = p.parent() {
        fs_err::create_dir_all(d).map_err(|e| SyncError::fs("create", d, e))?;
    }
    let tmp = p.with_extension("tmp");
    fs_err::write(&tmp, z).map_err(|e| SyncError::fs("write", &tmp, e))?;
    fs_err::rename(&tmp, p).map_err(|e| SyncError::fs("rename", p, e))
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
        let mut buf = Vec::with_capacity(size as usize);
        f.read_to_end(&mut buf)
            .map_err(|e| SyncError::fs("read", path, e))?;
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
    let r = std::io::BufReader::with_capacity(1 << 20, f);
    for c in fastcdc::v2020::StreamCDC::new(r, CDC_MIN, CDC_AVG, CDC_MAX) {
        let c = c.map_err(|e| SyncError::fs("read", path, std::io::Error::other(e)))?;
        whole.update(&c.data);
        total += c.length as u64;
        chunks.push(Chunk {
            len: c.length as u32,
            hash: Hash::of(&c.data),
        });
    }
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

fn meta_of(md: &std::fs::Metadata, xattrs: Vec<(Vec<u8>, Vec<u8>)>) -> Meta {
    Meta {
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        user: owner::user_name(md.uid()),
        group: owner::group_name(md.gid()),
        mtime: md.mtime(),
        mtime_ns: md.mtime_nsec() as u32,
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
    out: Mutex<Vec<Raw>>,
    errors: Mutex<Vec<SyncError>>,
    skipped: std::sync::atomic::AtomicU64,
}

impl Walk<'_> {
    fn dir<'s>(&'s self, scope: &rayon::Scope<'s>, rel: String) {
        let abs = self.root.join(&rel);
        let rd = match std::fs::read_dir(&abs) {
            Ok(r) => r,
            Err(e) => {
                self.errors
                    .lock()
                    .unwrap()
                    .push(SyncError::fs("read dir", &abs, e));
                return;
            }
        };
        let mut batch = Vec::new();
        for de in rd {
            let Ok(de) = de else {
                self.skipped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            };
            let Some(name) = de.file_name().to_str().map(str::to_string) else {
                tracing::warn!(dir = %abs.display(), name = ?de.file_name(), "skipping a name that is not UTF-8");
                self.skipped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            };
            let path = join(&rel, &name);
            if self.opts.skip.contains(&path) {
                continue;
            }
            let p = de.path();
            if name.ends_with(TEMP_SUFFIX) && name.starts_with('.') {
                if self.opts.clean_temps {
                    let _ = std::fs::remove_file(&p);
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
                match std::fs::read_link(&p) {
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
                let r = path.clone();
                scope.spawn(move |s| self.dir(s, r));
            }
            let xattrs = read_xattrs(&p);
            batch.push(Raw {
                path,
                kind,
                md,
                xattrs,
            });
        }
        self.out.lock().unwrap().extend(batch);
    }
}

/// Walks `root` into a manifest (the root itself is the entry `""`).
pub fn scan(root: &Path, opts: &ScanOptions) -> Result<(Manifest, ScanStats), SyncError> {
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
        out: Mutex::new(Vec::new()),
        errors: Mutex::new(Vec::new()),
        skipped: 0.into(),
    };
    // The walk waits on the disk when the inodes are not cached (a cold scan): more threads
    // than cores keep several reads in flight; on a cached tree they cost next to nothing.
    let threads = std::env::var("CORRAL_SYNC_WALK_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(WALK_THREADS);
    match rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("corral-walk-{i}"))
        .build()
    {
        Ok(pool) => pool.scope(|s| walk.dir(s, String::new())),
        Err(_) => rayon::scope(|s| walk.dir(s, String::new())),
    }
    if let Some(e) = walk.errors.into_inner().unwrap().into_iter().next() {
        return Err(e);
    }
    let mut raws = walk.out.into_inner().unwrap();
    raws.sort_by(|a, b| crate::manifest::path_order(&a.path, &b.path));

    // Hard links: the first path (in manifest order) of an inode is the file, the others
    // name it.
    let mut leaders: HashMap<(u64, u64), String> = HashMap::new();
    for r in &mut raws {
        if r.kind == Kind::File && r.md.nlink() > 1 {
            let key = (r.md.dev(), r.md.ino());
            match leaders.get(&key) {
                Some(l) => r.kind = Kind::Hardlink(l.clone()),
                None => {
                    leaders.insert(key, r.path.clone());
                }
            }
        }
    }

    let cache = opts.cache.as_deref().map(load_cache).unwrap_or_default();
    let stats = Mutex::new(ScanStats {
        entries: raws.len() as u64 + 1,
        skipped: walk.skipped.into_inner(),
        ..ScanStats::default()
    });
    let results: Vec<Result<Option<(Content, bool)>, SyncError>> = raws
        .par_iter()
        .map(|r| {
            if r.kind != Kind::File {
                return Ok(None);
            }
            let md = &r.md;
            if let Some(c) = cache.get(&r.path)
                && c.ino == md.ino()
                && c.size == md.size()
                && c.mtime == (md.mtime(), md.mtime_nsec())
                && c.ctime == (md.ctime(), md.ctime_nsec())
            {
                return Ok(Some((c.content.clone(), false)));
            }
            let sparse = md.blocks() * 512 < md.size();
            let c = hash_file(&root.join(&r.path), sparse)?;
            Ok(Some((c, true)))
        })
        .collect();

    let mut entries = Vec::with_capacity(raws.len() + 1);
    entries.push(Entry {
        path: String::new(),
        kind: Kind::Dir,
        meta: meta_of(&rmd, read_xattrs(root)),
        content: None,
    });
    // The cache is unchanged when every file came from it and every entry of it was used:
    // then it is neither rebuilt nor rewritten (a no-change run writes nothing).
    let hits = results
        .iter()
        .filter(|r| matches!(r, Ok(Some((_, false)))))
        .count();
    let unchanged = hits == cache.len()
        && results
            .iter()
            .all(|r| matches!(r, Ok(None) | Ok(Some((_, false)))));
    let rewrite = opts.cache.is_some() && !unchanged;
    let mut new_cache = HashMap::new();
    let mut st = stats.into_inner().unwrap();
    for (r, c) in raws.into_iter().zip(results) {
        let content = match c {
            Ok(Some((c, hashed))) => {
                if hashed {
                    st.hashed += 1;
                    st.hashed_bytes += c.size;
                } else {
                    st.cached += 1;
                }
                if rewrite {
                    new_cache.insert(
                        r.path.clone(),
                        CacheEntry {
                            ino: r.md.ino(),
                            size: r.md.size(),
                            mtime: (r.md.mtime(), r.md.mtime_nsec()),
                            ctime: (r.md.ctime(), r.md.ctime_nsec()),
                            content: c.clone(),
                        },
                    );
                }
                Some(c)
            }
            Ok(None) => None,
            Err(SyncError::Fs { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                continue; // vanished during the scan
            }
            Err(e) => return Err(e),
        };
        entries.push(Entry {
            meta: meta_of(&r.md, r.xattrs),
            path: r.path,
            kind: r.kind,
            content,
        });
    }
    // Rewrite the cache only when it changed (a no-change run writes nothing).
    if let Some(p) = &opts.cache
        && rewrite
        && let Err(e) = save_cache(p, new_cache)
    {
        // A missing cache costs time, not correctness.
        tracing::warn!(error = %e, "hash cache not saved; the next run hashes again");
    }
    Ok((Manifest { entries }, st))
}

/// Records freshly written files in the cache so the next scan does not read them again.
pub fn cache_add(
    cache: &Path,
    root: &Path,
    written: &[(String, Content)],
) -> Result<(), SyncError> {
    if written.is_empty() {
        return Ok(());
    }
    let mut files = load_cache(cache);
    for (path, content) in written {
        if let Ok(md) = std::fs::symlink_metadata(root.join(path)) {
            files.insert(
                path.clone(),
                CacheEntry {
                    ino: md.ino(),
                    size: md.size(),
                    mtime: (md.mtime(), md.mtime_nsec()),
                    ctime: (md.ctime(), md.ctime_nsec()),
                    content: content.clone(),
                },
            );
        }
    }
    if let Err(e) = save_cache(cache, files) {
        tracing::warn!(error = %e, "hash cache not saved; the next run hashes again");
    }
    Ok(())
}

/// The default hash cache file for a tree root: `$CORRAL_STATE_DIR/sync/<hash of root>.cache`
/// (`/var/lib/corral` when unset).
pub fn default_cache(root: &Path) -> PathBuf {
    let base = std::env::var_os("CORRAL_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/corral"));
    let canon = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    let h = Hash::of(canon.as_os_str().as_encoded_bytes());
    base.join("sync")
        .join(format!("{}.cache", &h.to_hex()[..32]))
}
