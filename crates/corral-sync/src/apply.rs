//! The receiver: applies plan steps beneath a root directory, confined to it.
//!
//! Every path is resolved from an `O_DIRECTORY` descriptor of the root with `openat2` and
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` for the parent directory, then acted on with the
//! `*at` calls on the last component without following it. A symlink swapped in during the
//! run therefore fails the step; it never leads outside the root.
//!
//! Files are written to a temporary name in the same directory and given their metadata; the
//! renames over the old names happen in batches (see [`BATCH_FILES`], [`BATCH_BYTES`]): every
//! temporary file of a batch is written first, then one `syncfs` makes all of them durable,
//! and only then are they renamed into place. A run killed at any moment therefore leaves each
//! file old or new: before the `syncfs` only temporary files exist (removed by the next scan),
//! after it every rename installs a file whose data is already on disk. A file the child does
//! not have yet is written without any name (`O_TMPFILE`) and given its name with `linkat`
//! at the same point: no temporary name is created, looked up and renamed away (about a fifth
//! of the file system's work per new file), and a crash leaves nothing behind at all; where
//! the file system cannot do that, new files take the temporary-name path too. One `syncfs`
//! per batch replaces an `fsync` per file (the old cost of a full copy); the final `syncfs` of
//! the run makes the renames themselves durable. The `syncfs` of a full batch runs on a thread
//! while the receiver writes the next batch (the disk and the stream work at the same time);
//! the batch is renamed into place once that sync has returned, never before. A batch also
//! ends at [`EARLY_SYNC_BYTES`] when no earlier one is syncing, so the disk writes back while
//! the run goes on and the run's last sync waits for its last few MiB alone.
//! Content comes chunk by chunk from, in order of preference: the old file itself (kept by a
//! copy-on-write clone, `FICLONE`, where the file system supports it), any file the child
//! already holds with that chunk (by BLAKE3), or data from the master.
//!
//! A small file the child already has (one chunk, replaced whole) is rebuilt and checked on
//! the receiver's thread, then created under its temporary name, written and given its
//! metadata by a writer thread while the receiver goes on with the next step;
//! it joins its batch once written, so the rule above holds for it too.
//!
//! The exception is a large file that changes a little where no clone is possible (ext4):
//! rebuilding it in a temporary file would write all of it. Such a file (at least
//! [`IN_PLACE_MIN`], less than `1/`[`IN_PLACE_FRACTION`] of it changed, one link, still as
//! scanned, no `--backup-dir`, no changed chunk read back from an overwritten part of itself)
//! is updated in place behind an undo journal ([`crate::journal`]): the new bytes of the
//! changed chunks are pulled first (up to [`PULL_MAX`]), the old bytes of only the 4 KiB pages
//! that differ journaled and synced, then those pages written, size and metadata set,
//! the file synced and the journal removed. A failure rolls the file back from the journal
//! at once; a crash leaves the journal for [`crate::journal::recover`], which the receiver
//! runs before its scan. `report.bytes_written` counts the journal's bytes as well, and
//! `report.cloned_bytes` the bytes kept in place.
//!
//! With `--backup-dir` the old file must survive whole, which costs a full copy on a file
//! system without clones; such a file is replaced (temp + rename, the old inode hard-linked
//! into the backup) as before. One limitation: a later file of the same run that reuses a
//! chunk found only in a changed range of an in-place file reads the new bytes, fails its
//! hash check and is reported failed (the next run sends it).

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Timestamps};
use rustix::io::Errno;

use crate::error::SyncError;
use crate::manifest::{Content, Entry, Hash, Kind, Manifest, Meta};
use crate::owner;
use crate::proto::Report;
use crate::scan::TEMP_SUFFIX;

/// Name of the journal a run leaves in its backup directory (what it created).
pub const JOURNAL: &str = ".corral-run.json";

fn errno(op: &'static str, path: &str, e: Errno) -> SyncError {
    SyncError::fs(op, path, std::io::Error::from(e))
}

/// How the receiver behaves.
#[derive(Debug, Clone, Default)]
pub struct ReceiverOptions {
    /// Keep replaced and deleted objects under `dir/run/` beneath the root.
    pub backup: Option<(String, String)>,
    /// Do not change owners.
    pub ignore_owner: bool,
    /// Use numeric ids even when names are known.
    pub numeric_ids: bool,
    /// Make each batch of written files durable (`syncfs`) before renaming it into place,
    /// and the renames durable at the end of the run.
    pub fsync: bool,
}

/// Files at least this large (on the child) may be updated in place behind an undo journal
/// when the file system cannot clone them (see [`crate::journal`]). The environment variable
/// `CORRAL_SYNC_IN_PLACE_MIN` (bytes) overrides it for the receiver.
pub const IN_PLACE_MIN: u64 = 64 << 20;
/// An in-place update is used only when less than `1/IN_PLACE_FRACTION` of the file changes.
pub const IN_PLACE_FRACTION: u64 = 4;

/// Files written to temporary names before a batch is synced and renamed into place.
pub const BATCH_FILES: usize = 1024;
/// Bytes written to temporary files before a batch is synced and renamed into place.
pub const BATCH_BYTES: u64 = 256 << 20;

/// Bytes written to temporary files after which a batch is ended early when no earlier
/// batch is still being synced: the disk writes back what was written while the receiver
/// writes on, instead of all of it in the `syncfs` that ends the run (a 1 %-changed tree
/// writes ~30 MiB; its last sync then waits for the last few MiB alone).
pub const EARLY_SYNC_BYTES: u64 = 8 << 20;

/// The thread running a batch's `syncfs`.
type SyncThread = std::thread::JoinHandle<Result<(), Errno>>;

/// A file written to its temporary name, waiting for its batch's sync and rename.
#[derive(Debug)]
struct Pending {
    path: String,
    dir: OwnedFd,
    staged: Staged,
    name: String,
    content: Content,
}

/// Where a written file waits for its batch's sync.
#[derive(Debug)]
enum Staged {
    /// Under this temporary name in its directory.
    Named(String),
    /// Without a name (`O_TMPFILE`): the descriptor is all there is of it until it is linked.
    Anonymous(OwnedFd),
}

/// How a file written without a name (`O_TMPFILE`) is given one, found out by the first such
/// file of a run (see [`Receiver::open_anonymous`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AnonLink {
    /// Not tried yet.
    Untried,
    /// `linkat(fd, "", dir, name, AT_EMPTY_PATH)`: needs `CAP_DAC_READ_SEARCH`.
    EmptyPath,
    /// `linkat` of `/proc/self/fd/N` following the magic link: any user, needs `/proc`.
    ProcFd,
    /// Not possible here (file system, kernel, no `/proc`, too few descriptors): new files
    /// take the temporary-name path.
    Off,
}

/// Descriptors a receiver must be allowed for new files to wait for their batch's sync
/// without names: each waiting file holds one, two batches may wait, besides the retained
/// old inodes and the graveyard's backlog.
const ANON_MIN_FDS: u64 = 16_384;

/// Applies steps beneath a root.
#[derive(Debug)]
pub struct Receiver {
    root: OwnedFd,
    opts: ReceiverOptions,
    /// The child's manifest from the scan at the start of the run, sorted
    /// ([`Manifest::sort`]): its files before the run.
    child: std::sync::Arc<Manifest>,
    /// Where each chunk the child holds can be read: the index of its file in `child`,
    /// offset, length.
    index: HashMap<Hash, (u32, u64, u32)>,
    /// The index in `child` of the entry [`Receiver::old`] found last.
    old_memo: std::sync::atomic::AtomicU32,
    /// Old inodes of files replaced in this run, still readable for their chunks.
    retained: HashMap<String, OwnedFd>,
    /// Old copies read for signatures, kept for the deltas made against them (taken when
    /// used), and their bytes in all.
    kept_old: HashMap<String, Vec<u8>>,
    kept_bytes: usize,
    open_cache: Option<(String, OwnedFd)>,
    /// The range of an old copy read last for range deltas (a run of chunks is rebuilt from
    /// one): path, offset, length, bytes.
    base_cache: Option<(String, u64, u32, std::sync::Arc<Vec<u8>>)>,
    created: Vec<String>,
    /// Files written with their content (for the hash cache).
    pub written: Vec<(String, Content)>,
    /// What was done.
    pub report: Report,
    seq: u64,
    /// This process's id, for temporary names.
    pid: u32,
    /// How new files written without a name are linked into place.
    anon: AnonLink,
    pending: Vec<Pending>,
    pending_bytes: u64,
    /// The previous batch, whose `syncfs` runs on a thread while the next batch is written;
    /// its files are renamed into place once that sync has returned.
    syncing: Option<(Vec<Pending>, SyncThread)>,
    in_place_min: u64,
    /// Test hook: abort the process after this many extent writes of in-place updates
    /// (always `None` without the `test-hooks` feature; see [`crash_after_from`]).
    crash_after: Option<u64>,
    extents_written: u64,
    /// Whether FICLONE works, per device (probed once).
    reflink: HashMap<u64, bool>,
    /// An in-place update made the journal directory.
    journal_dir_used: bool,
    /// Closes the last descriptors of replaced inodes off the run's path.
    graveyard: Graveyard,
    /// Writes the temporary files of small replaced files beside this thread.
    writer: Writer,
}

/// The environment variable of the crash test hook (see [`crash_after_from`]).
#[cfg(feature = "test-hooks")]
const CRASH_AFTER_VAR: &str = "CORRAL_SYNC_CRASH_AFTER_EXTENTS";

/// The crash test hook's count from the value of `CORRAL_SYNC_CRASH_AFTER_EXTENTS`: with the
/// `test-hooks` feature (enabled only by the test builds of this crate and of `corral`), a
/// receiver dies like a killed one after that many extent writes of in-place updates. Without it (every
/// shipped binary) the variable is ignored, so no environment can make a receiver abort.
fn crash_after_from(value: Option<&str>) -> Option<u64> {
    #[cfg(feature = "test-hooks")]
    return value.and_then(|v| v.parse().ok());
    #[cfg(not(feature = "test-hooks"))]
    {
        let _ = value;
        None
    }
}

/// The value of `CORRAL_SYNC_CRASH_AFTER_EXTENTS`, read only in builds with the `test-hooks`
/// feature (a shipped binary neither reads nor names the variable).
#[cfg(feature = "test-hooks")]
fn crash_hook_env() -> Option<String> {
    std::env::var(CRASH_AFTER_VAR).ok()
}

/// Without the `test-hooks` feature there is no hook to configure.
#[cfg(not(feature = "test-hooks"))]
fn crash_hook_env() -> Option<String> {
    None
}

/// A thread that closes descriptors of the old inodes a run replaced. Renaming over a file's
/// last name, or closing the last descriptor of an unlinked inode, frees the inode and its
/// blocks inside that call: on a busy ext4 about 1.7 ms each (a journal handle, waiting
/// behind other writers' commits), which made a 500-file update spend most of its time in
/// `renameat`. Each old inode is held open across its rename (or a deleted file's across its
/// unlink) and closed here instead, in parallel with the run; nothing about the new files'
/// durability depends on it. Dropping the graveyard waits for the thread (after the run's
/// report has been sent).
#[derive(Debug)]
struct Graveyard {
    tx: Option<std::sync::mpsc::Sender<OwnedFd>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Descriptors handed over so far.
    buried: usize,
    /// Descriptors the thread has closed so far.
    closed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// At most this many descriptors wait to be closed (see [`Graveyard::has_room`]).
    max_backlog: usize,
}

/// How many held inodes may wait for the graveyard at once. Unlinking is much faster than
/// freeing, so deleting a directory of 100,000 files would otherwise queue as many open
/// descriptors and exhaust the receiver's descriptor limit (65,536 at most), failing the
/// run's own opens meanwhile; beyond it, inodes are freed inline as before.
const GRAVEYARD_BACKLOG: usize = 4096;

impl Default for Graveyard {
    fn default() -> Self {
        Graveyard {
            tx: None,
            thread: None,
            buried: 0,
            closed: std::sync::Arc::default(),
            max_backlog: GRAVEYARD_BACKLOG,
        }
    }
}

impl Graveyard {
    /// Whether another descriptor may be buried without the backlog passing its bound.
    fn has_room(&self) -> bool {
        let closed = self.closed.load(std::sync::atomic::Ordering::Relaxed);
        self.buried.saturating_sub(closed) < self.max_backlog
    }

    /// Closes `fd` on the graveyard's thread (started on first use; closed here if it
    /// cannot start).
    fn bury(&mut self, fd: OwnedFd) {
        self.buried += 1;
        if self.tx.is_none() {
            let (tx, rx) = std::sync::mpsc::channel::<OwnedFd>();
            let closed = self.closed.clone();
            if let Ok(h) = std::thread::Builder::new()
                .name("corral-close".into())
                .spawn(move || {
                    for fd in rx {
                        drop(fd);
                        closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                })
            {
                self.tx = Some(tx);
                self.thread = Some(h);
            }
        }
        if let Some(tx) = &self.tx {
            // A send fails only when the thread has gone: the fd comes back and closes here.
            let _ = tx.send(fd);
        }
    }
}

impl Drop for Graveyard {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
    }
}

/// A file the writer threads create under its temporary name, write whole and give its
/// metadata (see [`Writer`]).
struct WriteJob {
    path: String,
    dir: OwnedFd,
    /// Its temporary name, unless it is written without one (`nameless`).
    tmp: String,
    /// Written without a name (`O_TMPFILE`) when its directory allows, else under `tmp`.
    nameless: bool,
    /// A file the child lacks: its large blocks are written past the page cache (see
    /// `direct`); a replaced one is written through it (the child's working set).
    new: bool,
    name: String,
    data: JobData,
    meta: Meta,
    /// The owner to set (`None`: left alone).
    owner: Option<(u32, u32)>,
    content: Content,
}

/// The bytes of a [`WriteJob`]'s file: as they are, or to be rebuilt from the child's old
/// copy and a delta (and checked against the file's one chunk).
enum JobData {
    Bytes(Vec<u8>),
    Delta {
        old: Vec<u8>,
        block: u32,
        ops: Vec<crate::delta::DeltaOp>,
        literals: Vec<u8>,
        chunk: crate::manifest::Chunk,
    },
}

/// A [`WriteJob`] done: the file waiting for its batch's sync, the bytes written, and, for a
/// rebuilt delta, those of them sent literally and reused from the old copy.
struct Written {
    pending: Pending,
    bytes: u64,
    literal: u64,
    reused: u64,
}

/// What became of a [`WriteJob`]: written, or the path and why it failed (its temporary
/// file removed).
type WriteDone = Result<Written, (String, SyncError)>;

/// Jobs handed to the writer threads and not yet collected, at most (each holds one file of
/// at most [`crate::manifest::CHUNK_THRESHOLD`], or its delta and old copy).
const WRITER_QUEUE: usize = 32;

/// Bytes of old copies read for signatures that are kept for the deltas made against them
/// (a file over [`crate::manifest::CHUNK_THRESHOLD`] has no signature; past this, an old
/// copy is read again when its delta comes).
const KEEP_OLD_MAX: usize = 64 << 20;

/// Writer threads once the run writes files the child lacks (`CORRAL_SYNC_WRITERS` sets a
/// fixed number instead); before that, one per core up to this. New files' large writes
/// wait for the disk (see `direct`): with two threads on two cores a full copy's receiver
/// waited on them (SCALE=1 full copies, two rounds each: 2 threads 11.9 and 11.0 s,
/// 4 threads 11.1 and 9.6 s, 8 threads 10.5 and 9.9 s). A run that replaces files the child
/// has is CPU work for them (rebuilds and their checks) and more threads than cores only
/// contend: 1 % of the tree changed, medians of 8, 476 ms with 2 threads against 505 with 4.
const WRITERS: usize = 4;

/// Threads that rebuild small files the child already has from their deltas, check them,
/// and create, write and set the metadata of their temporary files (replaced whole), and
/// create, write and set the metadata of the one-chunk files the child lacks (nameless): in
/// a run that changes a few hundred files, that work (the rebuild and its BLAKE3, the new
/// inode, the directory entry, the data, four metadata calls) was most of the receiver's,
/// and with one writer thread the receiver's thread waited on it; in a full copy a new
/// file's large writes wait for the disk (see `direct`). The receiver's thread
/// keeps everything else: the stream, the old copies, batches, syncs and renames. A file's
/// job is done (its data written) before it joins a batch, so nothing is renamed into place
/// before a `syncfs` that began after its data was written, as on the receiver's own thread.
/// Jobs finish in any order (a batch's files are renamed in any order).
#[derive(Default)]
struct Writer {
    tx: Option<std::sync::mpsc::Sender<WriteJob>>,
    /// (In a mutex only so that the receiver stays `Sync`: one thread uses it.)
    rx: Option<std::sync::Mutex<std::sync::mpsc::Receiver<WriteDone>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Jobs sent and not yet collected.
    outstanding: usize,
    /// No thread could be started: jobs are done inline.
    inline: bool,
    /// What more threads need (the jobs' queue and the results' sender) until the writers
    /// are widened to [`WRITERS`]; `None` once they are, or when their number is fixed.
    widen: Option<WriterQueue>,
}

/// The writer threads' ends of their channels.
type WriterQueue = (
    std::sync::Arc<std::sync::Mutex<std::sync::mpsc::Receiver<WriteJob>>>,
    std::sync::mpsc::Sender<WriteDone>,
);

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("threads", &self.threads.len())
            .field("outstanding", &self.outstanding)
            .field("inline", &self.inline)
            .finish()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.tx = None;
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

impl Writer {
    /// Starts the writer threads (as many as start; none: jobs are done inline).
    fn start(&mut self) {
        let (tx, jobs) = std::sync::mpsc::channel::<WriteJob>();
        let (done, rx) = std::sync::mpsc::channel::<WriteDone>();
        let jobs = std::sync::Arc::new(std::sync::Mutex::new(jobs));
        let fixed = std::env::var("CORRAL_SYNC_WRITERS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map(|n| n.clamp(1, 64));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let q = (jobs, done);
        self.spawn(&q, fixed.unwrap_or(cores.min(WRITERS)));
        if self.threads.is_empty() {
            self.inline = true;
            return;
        }
        if fixed.is_none() && self.threads.len() < WRITERS {
            self.widen = Some(q);
        }
        self.tx = Some(tx);
        self.rx = Some(std::sync::Mutex::new(rx));
    }

    /// Starts writer threads until there are `n` (as many as start).
    fn spawn(&mut self, (jobs, done): &WriterQueue, n: usize) {
        while self.threads.len() < n {
            let (jobs, done) = (jobs.clone(), done.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("corral-write-{}", self.threads.len()))
                .spawn(move || Self::serve(&jobs, &done));
            match spawned {
                Ok(h) => self.threads.push(h),
                Err(_) => break,
            }
        }
    }

    /// Widens the writers to [`WRITERS`] threads (once: the run writes new files).
    fn widen(&mut self) {
        if let Some(q) = self.widen.take() {
            self.spawn(&q, WRITERS);
        }
    }

    /// One writer thread: does jobs until the receiver drops its end. A job that panics is
    /// reported failed (the others go on; its temporary file is left for the next scan).
    fn serve(
        jobs: &std::sync::Mutex<std::sync::mpsc::Receiver<WriteJob>>,
        done: &std::sync::mpsc::Sender<WriteDone>,
    ) {
        loop {
            let job = jobs
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .recv();
            let Ok(job) = job else { return };
            let path = job.path.clone();
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run()))
                .unwrap_or_else(|_| {
                    let err = SyncError::fs(
                        "write",
                        &path,
                        std::io::Error::other("the receiver's writer thread failed"),
                    );
                    Err((path, err))
                });
            if done.send(result).is_err() {
                return;
            }
        }
    }
}

impl WriteJob {
    /// Rebuilds the file if it came as a delta, creates the temporary file, writes it and
    /// sets its metadata; on failure the temporary file is removed.
    fn run(self) -> WriteDone {
        let WriteJob {
            path,
            dir,
            tmp,
            nameless,
            new,
            name,
            data,
            meta,
            owner,
            content,
        } = self;
        // (Bytes as they are were counted when they came.)
        let (bytes, literal, reused) = match data {
            JobData::Bytes(b) => (b, 0, 0),
            JobData::Delta {
                old,
                block,
                ops,
                literals,
                chunk,
            } => match rebuilt(&old, block, &ops, &literals, &chunk) {
                Some(b) => {
                    let literal = literals.len() as u64;
                    let reused = (b.len() as u64).saturating_sub(literal);
                    (b, literal, reused)
                }
                None => {
                    let err = rebuild_failed(&path);
                    return Err((path, err));
                }
            },
        };
        let (f, named) = match nameless.then(|| open_nameless(&dir).ok()).flatten() {
            Some(f) => (f, false),
            None => match create_temp(&dir, &tmp) {
                Ok(f) => (f, true),
                Err(x) => {
                    let err = errno("create temporary", &path, x);
                    return Err((path, err));
                }
            },
        };
        let r = if new {
            write_new_at(&f, &bytes, 0, false)
        } else {
            write_at(&f, &bytes, 0, false)
        };
        let r = r
            .map_err(|x| errno("write", &path, x))
            .and_then(|()| set_meta(MetaTarget::Fd(f.as_fd()), &path, &meta, owner, None));
        if let Err(err) = r {
            if named {
                let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), AtFlags::empty());
            }
            return Err((path, err));
        }
        let staged = if named {
            drop(f);
            Staged::Named(tmp)
        } else {
            Staged::Anonymous(f)
        };
        let n = bytes.len() as u64;
        Ok(Written {
            pending: Pending {
                path,
                dir,
                staged,
                name,
                content,
            },
            bytes: n,
            literal,
            reused,
        })
    }
}

/// A one-chunk file rebuilt from the old copy and a delta; `None` unless the result hashes
/// to the chunk's hash.
fn rebuilt(
    old: &[u8],
    block: u32,
    ops: &[crate::delta::DeltaOp],
    literals: &[u8],
    c: &crate::manifest::Chunk,
) -> Option<Vec<u8>> {
    let b = crate::delta::apply(old, block, ops, literals, c.len as usize).ok()?;
    (Hash::of(&b) == c.hash).then_some(b)
}

fn rebuild_failed(path: &str) -> SyncError {
    SyncError::SourceChanged(format!(
        "{path} (the delta against the old copy on the child does not rebuild it)"
    ))
}

/// A file that will be updated in place.
#[derive(Debug)]
struct InPlace {
    f: OwnedFd,
    /// Ranges of the new file that differ from the old one: offset, length.
    changed: Vec<(u64, u64)>,
    /// Bytes kept as they are.
    kept: u64,
    /// Size before the update.
    old_size: u64,
}

/// A chunk's bytes for an in-place update, and `Some(literal bytes)` when they came from the
/// master's stream.
type PulledBytes = (Vec<u8>, Option<u64>);

/// A changed chunk of an in-place update, pulled before the file is touched.
struct Pulled {
    /// Offset in the new file.
    off: u64,
    hash: Hash,
    bytes: Vec<u8>,
    /// Sent by the master (not read from the child's own files).
    streamed: bool,
    /// Of its bytes, those the master sent literally (all of a `Data` frame's, a delta's
    /// literals).
    literal: u64,
}

/// Whether a sync may remove the xattr `name` from a child's file when the master's copy
/// lacks it: user attributes and POSIX ACLs. Others (`security.*`, `trusted.*`) may belong to
/// the child's own system (an SELinux label, a file system's bookkeeping) and are left alone.
pub(crate) fn managed_xattr(name: &[u8]) -> bool {
    name.starts_with(b"user.") || name.starts_with(b"system.posix_acl_")
}

/// The inode whose metadata is set: a descriptor open for reading or writing, or the
/// `/proc/self/fd` path of an `O_PATH` descriptor.
#[derive(Clone, Copy)]
enum MetaTarget<'a> {
    Fd(std::os::fd::BorrowedFd<'a>),
    Path(&'a str),
}

/// Where a chunk the receiver writes comes from ([`Receiver::chunk_source`]).
enum ChunkSource {
    /// Read from a file the child holds, checked against the chunk's hash.
    Local(Vec<u8>),
    /// Sent by the master.
    Stream(Incoming),
}

/// An in-place update changing at most this many bytes (in whole chunks) pulls them into
/// memory first, then journals and writes only the 4 KiB pages that differ; a larger one
/// journals the changed chunks whole.
pub const PULL_MAX: u64 = 64 << 20;

/// How the receiver opens a file it reads old bytes from: never through a symlink, and without
/// blocking on a fifo swapped in under it.
const READ_OLD: OFlags = OFlags::RDONLY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC)
    .union(OFlags::NONBLOCK);

const RETAIN_MAX: usize = 256;

/// What the master sent for a chunk the child does not hold.
#[derive(Debug)]
pub enum Incoming {
    /// The bytes themselves (already checked against the chunk's hash).
    Bytes(Vec<u8>),
    /// A delta against the child's old copy of the same path (checked once rebuilt): the
    /// whole of it (a small file), or the range `base` (offset, length) of it.
    Delta {
        /// The range of the old copy, `None` for all of it.
        base: Option<(u64, u32)>,
        /// Block size of the signature it was made against.
        block: u32,
        /// Block copies and literals.
        ops: Vec<crate::delta::DeltaOp>,
        /// The literal bytes (decoded).
        literals: Vec<u8>,
    },
}

/// Yields what the master sent for each chunk the child does not hold.
pub type DataSource<'a> = dyn FnMut(&Hash, u32) -> Result<Incoming, SyncError> + 'a;

fn split(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

fn beneath() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

fn ts(s: i64, ns: u32) -> rustix::fs::Timespec {
    rustix::fs::Timespec {
        tv_sec: s,
        tv_nsec: ns.into(),
    }
}

fn times(m: &Meta) -> Timestamps {
    Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        last_modification: ts(m.mtime, m.mtime_ns),
    }
}

impl Receiver {
    /// A receiver for `root`, which must be a directory; `child` is its manifest from the
    /// scan at the start of the run (sorted here if it is not).
    ///
    /// Only the chunk index is built (no path is copied): 50,000 files took 30-40 ms more
    /// when each was also keyed by its path, on the way to the first signature.
    pub fn new(
        root: &Path,
        child: std::sync::Arc<Manifest>,
        opts: ReceiverOptions,
    ) -> Result<Self, SyncError> {
        let fd = rustix::fs::open(
            root,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| SyncError::fs("open root", root, e.into()))?;
        let sorted = child
            .entries
            .is_sorted_by(|a, b| crate::manifest::path_order(&a.path, &b.path).is_le());
        let child = if sorted {
            child
        } else {
            let mut m = Manifest::clone(&child);
            m.sort();
            std::sync::Arc::new(m)
        };
        let mut index = HashMap::with_capacity(child.entries.len());
        for (i, e) in child.entries.iter().enumerate() {
            let (Kind::File, Some(c), Ok(i)) = (&e.kind, &e.content, u32::try_from(i)) else {
                continue;
            };
            for (off, ch) in c.chunk_iter() {
                index.entry(ch.hash).or_insert((i, off, ch.len));
            }
        }
        // Many retained descriptors may be open at once: the soft limit is raised towards
        // the hard one (up to 65,536), never lowered (a higher limit the user set stays).
        let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        let want = lim.maximum.map_or(65_536, |m| m.min(65_536));
        if lim.current.is_some_and(|c| c < want) {
            let _ = rustix::process::setrlimit(
                rustix::process::Resource::Nofile,
                rustix::process::Rlimit {
                    current: Some(want),
                    maximum: lim.maximum,
                },
            );
        }
        let fds = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        let anon = if fds.is_none_or(|c| c >= ANON_MIN_FDS) {
            AnonLink::Untried
        } else {
            AnonLink::Off
        };
        Ok(Receiver {
            root: fd,
            opts,
            child,
            index,
            old_memo: std::sync::atomic::AtomicU32::new(u32::MAX),
            retained: HashMap::new(),
            kept_old: HashMap::new(),
            kept_bytes: 0,
            open_cache: None,
            base_cache: None,
            created: Vec::new(),
            written: Vec::new(),
            report: Report::default(),
            seq: 0,
            pid: std::process::id(),
            anon,
            pending: Vec::new(),
            pending_bytes: 0,
            syncing: None,
            in_place_min: std::env::var("CORRAL_SYNC_IN_PLACE_MIN")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(IN_PLACE_MIN),
            crash_after: crash_after_from(crash_hook_env().as_deref()),
            extents_written: 0,
            graveyard: Graveyard::default(),
            writer: Writer::default(),
            reflink: HashMap::new(),
            journal_dir_used: false,
        })
    }

    /// The content of the child's file at `path` before the run (`None`: no such file).
    fn old(&self, path: &str) -> Option<&Content> {
        // A step asks for its path several times in a row: the last entry found is tried
        // before a binary search of the manifest.
        use std::sync::atomic::Ordering::Relaxed;
        let last = self.old_memo.load(Relaxed) as usize;
        let entry = match self.child.entries.get(last) {
            Some(e) if e.path == path => Some(e),
            _ => self.child.position(path).map(|i| {
                self.old_memo.store(i as u32, Relaxed);
                &self.child.entries[i]
            }),
        };
        match entry {
            Some(Entry {
                kind: Kind::File,
                content: Some(c),
                ..
            }) => Some(c),
            _ => None,
        }
    }

    /// The chunks of the child's old copy of `path` when it is a large file (for a chunk
    /// list sent as edits of them, [`crate::proto::ChunkEdit`]).
    pub fn old_chunks(&self, path: &str) -> Option<&[crate::manifest::Chunk]> {
        self.old(path)
            .map(|c| c.chunks.as_slice())
            .filter(|c| !c.is_empty())
    }

    /// The path of the child's file holding chunk `i` of the index.
    fn indexed_path(&self, i: u32) -> &str {
        &self.child.entries[i as usize].path
    }

    /// Whether the child holds a chunk with this hash (same rule the master uses to decide
    /// what data to send).
    pub fn has_chunk(&self, h: &Hash) -> bool {
        self.index.contains_key(h)
    }

    /// Opens a directory beneath the root (`""` is the root).
    fn dir(&self, rel: &str) -> Result<OwnedFd, SyncError> {
        let p = if rel.is_empty() { "." } else { rel };
        rustix::fs::openat2(
            &self.root,
            p,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            beneath(),
        )
        .map_err(|e| errno("open directory", rel, e))
    }

    fn parent(&self, path: &str) -> Result<(OwnedFd, String), SyncError> {
        let (d, n) = split(path);
        Ok((self.dir(d)?, n.to_string()))
    }

    fn temp_name(&mut self, name: &str) -> String {
        self.seq += 1;
        let short: String = name.chars().take(150).collect();
        format!(".{short}.{}-{}{TEMP_SUFFIX}", self.pid, self.seq)
    }

    /// A new file without a name in `dir` (`O_TMPFILE`), to be linked into place by
    /// [`Receiver::link_anonymous`] once its batch is synced; `None` when that is not possible
    /// here (then the caller creates a temporary name). The first call of a run finds out how
    /// such a file can be linked, with a probe file of its own (linked to a temporary name,
    /// then unlinked: a file once linked cannot be linked again after its unlink).
    fn open_anonymous(&mut self, dir: &OwnedFd) -> Option<OwnedFd> {
        if self.anon == AnonLink::Off {
            return None;
        }
        let open = || open_nameless(dir);
        let f = match open() {
            Ok(f) => f,
            // No O_TMPFILE on this file system or kernel.
            Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => {
                self.anon = AnonLink::Off;
                return None;
            }
            // Anything else (no space, no permission) the temporary-name path meets and
            // reports as well.
            Err(_) => return None,
        };
        if self.anon == AnonLink::Untried {
            let probe = open().ok()?;
            let name = self.temp_name("probe");
            self.anon = AnonLink::Off;
            for how in [AnonLink::EmptyPath, AnonLink::ProcFd] {
                if Self::link_anonymous(how, &probe, dir, &name).is_ok() {
                    let _ = rustix::fs::unlinkat(dir, name.as_str(), AtFlags::empty());
                    self.anon = how;
                    break;
                }
            }
            tracing::debug!(how = ?self.anon, "receiver: new files written without a name");
            if self.anon == AnonLink::Off {
                return None;
            }
        }
        Some(f)
    }

    /// Whether new files can be written without a name here (found out by
    /// [`Receiver::open_anonymous`] the first time), for a writer thread to create one.
    fn nameless_ok(&mut self, dir: &OwnedFd) -> bool {
        if self.anon == AnonLink::Untried {
            drop(self.open_anonymous(dir));
        }
        self.anon != AnonLink::Off
    }

    /// Gives the nameless file `f` the name `name` in `dir` (fails with `EEXIST` if the name
    /// is taken: never replaces anything).
    fn link_anonymous(how: AnonLink, f: &OwnedFd, dir: &OwnedFd, name: &str) -> Result<(), Errno> {
        match how {
            AnonLink::EmptyPath => rustix::fs::linkat(f, "", dir, name, AtFlags::EMPTY_PATH),
            AnonLink::ProcFd => rustix::fs::linkat(
                rustix::fs::CWD,
                format!("/proc/self/fd/{}", f.as_raw_fd()).as_str(),
                dir,
                name,
                AtFlags::SYMLINK_FOLLOW,
            ),
            AnonLink::Untried | AnonLink::Off => Err(Errno::NOTSUP),
        }
    }

    /// Installs a batch's file written without a name: linked to its name when that is
    /// free, which it is unless something appeared there during the run; then linked to a
    /// temporary name and installed over what is there as any other file.
    fn install_anonymous(
        &mut self,
        path: &str,
        f: &OwnedFd,
        dir: &OwnedFd,
        name: &str,
    ) -> Result<(), SyncError> {
        match Self::link_anonymous(self.anon, f, dir, name) {
            Ok(()) => {
                self.created.push(path.to_string());
                Ok(())
            }
            Err(Errno::EXIST) => {
                let tmp = self.temp_name(name);
                Self::link_anonymous(self.anon, f, dir, &tmp)
                    .map_err(|x| errno("link into place", path, x))?;
                self.install_temp(path, dir, &tmp, name)
            }
            Err(x) => Err(errno("link into place", path, x)),
        }
    }

    fn exists(dir: &OwnedFd, name: &str) -> Option<rustix::fs::Stat> {
        rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).ok()
    }

    /// Creates the directories of `rel` beneath the root (for the backup tree).
    fn mkdirs(&self, rel: &str) -> Result<OwnedFd, SyncError> {
        let mut cur = self.dir("")?;
        for comp in rel.split('/').filter(|c| !c.is_empty()) {
            match rustix::fs::mkdirat(&cur, comp, Mode::from_raw_mode(0o700)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(errno("mkdir", rel, e)),
            }
            cur = rustix::fs::openat2(
                &cur,
                comp,
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                Mode::empty(),
                beneath(),
            )
            .map_err(|e| errno("open directory", rel, e))?;
        }
        Ok(cur)
    }

    fn backup_parent(&self, path: &str) -> Result<Option<(OwnedFd, String)>, SyncError> {
        let Some((dir, run)) = &self.opts.backup else {
            return Ok(None);
        };
        let (d, n) = split(path);
        let rel = if d.is_empty() {
            format!("{dir}/{run}")
        } else {
            format!("{dir}/{run}/{d}")
        };
        Ok(Some((self.mkdirs(&rel)?, n.to_string())))
    }

    /// Moves an existing object away: into the backup, or removed (recursively).
    fn remove(&mut self, path: &str) -> Result<(), SyncError> {
        let (dir, name) = self.parent(path)?;
        if Self::exists(&dir, &name).is_none() {
            return Ok(());
        }
        self.keep_old(path, &dir, &name);
        if let Some((bdir, bname)) = self.backup_parent(path)? {
            // A second backup of the same path in one run keeps the first.
            if Self::exists(&bdir, &bname).is_none() {
                return rustix::fs::renameat(&dir, name.as_str(), &bdir, bname.as_str())
                    .map_err(|e| errno("move to backup", path, e));
            }
        }
        self.remove_tree(path, &dir, name.as_str())
            .map_err(|e| errno("remove", path, e))
    }

    /// Removes `name` in `dir` (the object at `path`), recursively, never following symlinks
    /// (each level is opened `NOFOLLOW` relative to its parent's descriptor, which is beneath
    /// the root). Every regular file whose name is its last, also deep inside a deleted
    /// directory, is unlinked with its inode held and freed on the graveyard's thread.
    fn remove_tree<P: rustix::path::Arg + Copy>(
        &mut self,
        path: &str,
        dir: &OwnedFd,
        name: P,
    ) -> Result<(), Errno> {
        let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
        if st.st_mode & 0o170000 != 0o040000 {
            let old_inode = self.hold_last_name(path, dir, name, &st);
            let r = rustix::fs::unlinkat(dir, name, AtFlags::empty());
            if let Some(fd) = old_inode {
                self.graveyard.bury(fd);
            }
            return r;
        }
        let sub = rustix::fs::openat(
            dir,
            name,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut names = Vec::new();
        for de in rustix::fs::Dir::read_from(&sub)? {
            let de = de?;
            let n = de.file_name();
            if n.to_bytes() != b"." && n.to_bytes() != b".." {
                names.push(n.to_owned());
            }
        }
        for n in names {
            let p = format!("{path}/{}", n.to_string_lossy());
            self.remove_tree(&p, &sub, n.as_c_str())?;
        }
        rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)
    }

    /// A descriptor holding the inode of regular file `name` when that name is its last and
    /// nothing else keeps it (see [`Graveyard`]): about to be renamed over or unlinked, the
    /// inode is then freed when the graveyard closes it, not inside that call.
    fn hold_last_name<P: rustix::path::Arg>(
        &self,
        path: &str,
        dir: &OwnedFd,
        name: P,
        st: &rustix::fs::Stat,
    ) -> Option<OwnedFd> {
        if st.st_mode & 0o170000 != 0o100000
            || st.st_nlink != 1
            || self.retained.contains_key(path)
            || !self.graveyard.has_room()
        {
            return None;
        }
        rustix::fs::openat(
            dir,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()
    }

    /// Keeps the old inode of a regular file open while its chunks may still be needed.
    fn keep_old(&mut self, path: &str, dir: &OwnedFd, name: &str) {
        if self.old(path).is_some()
            && self.retained.len() < RETAIN_MAX
            && let Ok(fd) = rustix::fs::openat(dir, name, READ_OLD, Mode::empty())
        {
            self.retained.insert(path.to_string(), fd);
        }
    }

    /// Renames `tmp` over `name`, first hard-linking the old object into the backup.
    fn install(
        &mut self,
        path: &str,
        dir: &OwnedFd,
        tmp: &str,
        name: &str,
    ) -> Result<(), SyncError> {
        // The old inode, held across the rename when nothing else keeps it (see Graveyard).
        let mut old_inode = None;
        match Self::exists(dir, name) {
            Some(st) => {
                if st.st_mode & 0o170000 == 0o040000 {
                    // A directory in the way (the plan's Replace normally cleared it).
                    self.remove(path)?;
                } else {
                    self.keep_old(path, dir, name);
                    if let Some((bdir, bname)) = self.backup_parent(path)? {
                        if Self::exists(&bdir, &bname).is_none() {
                            rustix::fs::linkat(dir, name, &bdir, bname.as_str(), AtFlags::empty())
                                .map_err(|e| errno("link to backup", path, e))?;
                        }
                    } else {
                        old_inode = self.hold_last_name(path, dir, name, &st);
                    }
                }
            }
            None => self.created.push(path.to_string()),
        }
        let r = rustix::fs::renameat(dir, tmp, dir, name)
            .map_err(|e| errno("rename into place", path, e));
        if let Some(fd) = old_inode {
            self.graveyard.bury(fd);
        }
        r
    }

    /// [`Receiver::install`]s the temporary name `tmp`, removing it if that fails.
    fn install_temp(
        &mut self,
        path: &str,
        dir: &OwnedFd,
        tmp: &str,
        name: &str,
    ) -> Result<(), SyncError> {
        let r = self.install(path, dir, tmp, name);
        if r.is_err() {
            let _ = rustix::fs::unlinkat(dir, tmp, AtFlags::empty());
        }
        r
    }

    fn uid_gid(&self, m: &Meta) -> (u32, u32) {
        if self.opts.numeric_ids {
            (m.uid, m.gid)
        } else {
            (
                owner::local_uid(m.user.as_deref(), m.uid),
                owner::local_gid(m.group.as_deref(), m.gid),
            )
        }
    }

    /// The owner a file gets (`None`: owners are left alone).
    fn owner_of(&self, m: &Meta) -> Option<(u32, u32)> {
        (!self.opts.ignore_owner).then(|| self.uid_gid(m))
    }

    /// [`set_meta`] with this receiver's owner mapping.
    fn set_meta_on(
        &self,
        t: MetaTarget<'_>,
        rel: &str,
        m: &Meta,
        now: Option<&rustix::fs::Stat>,
    ) -> Result<(), SyncError> {
        set_meta(t, rel, m, self.owner_of(m), now)
    }

    /// Sets the metadata of an existing object without following a final symlink.
    fn set_meta_at(
        &self,
        dir: &OwnedFd,
        name: &str,
        rel: &str,
        e: &Entry,
    ) -> Result<(), SyncError> {
        if let Kind::Symlink(_) = e.kind {
            if !self.opts.ignore_owner {
                let (u, g) = self.uid_gid(&e.meta);
                rustix::fs::chownat(
                    dir,
                    name,
                    Some(rustix::fs::Uid::from_raw(u)),
                    Some(rustix::fs::Gid::from_raw(g)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|x| errno("chown", rel, x))?;
            }
            return rustix::fs::utimensat(dir, name, &times(&e.meta), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|x| errno("set mtime", rel, x));
        }
        if e.kind == Kind::Dir {
            // A directory is opened for real (`O_DIRECTORY | O_NOFOLLOW`: never anything
            // else, never through a symlink) and set through its descriptor: no procfs lookup
            // per call. Most directories here are set again only because a run changed their
            // entries, which moved their mtime: owner and mode are left when they match. One
            // its user may not read (no root) takes the `O_PATH` way below.
            match rustix::fs::openat(
                dir,
                if name.is_empty() { "." } else { name },
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => {
                    let st = rustix::fs::fstat(&fd).map_err(|x| errno("stat", rel, x))?;
                    return self.set_meta_on(MetaTarget::Fd(fd.as_fd()), rel, &e.meta, Some(&st));
                }
                Err(Errno::ACCESS) => {}
                Err(Errno::NOTDIR | Errno::LOOP) => {
                    return Err(SyncError::fs(
                        "set metadata",
                        rel,
                        std::io::Error::other("no longer a directory"),
                    ));
                }
                Err(x) => return Err(errno("open directory", rel, x)),
            }
        }
        let fd = if name.is_empty() {
            rustix::fs::openat(dir, ".", OFlags::PATH | OFlags::CLOEXEC, Mode::empty())
        } else {
            rustix::fs::openat(
                dir,
                name,
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
        }
        .map_err(|x| errno("open", rel, x))?;
        let st = rustix::fs::fstat(&fd).map_err(|x| errno("stat", rel, x))?;
        if st.st_mode & 0o170000 == 0o120000 {
            return Err(SyncError::fs(
                "set metadata",
                rel,
                std::io::Error::other("became a symlink during the run"),
            ));
        }
        // An `O_PATH` descriptor takes no fchown/fchmod/fsetxattr: its /proc path does.
        let p = format!("/proc/self/fd/{}", fd.as_raw_fd());
        self.set_meta_on(MetaTarget::Path(&p), rel, &e.meta, Some(&st))
    }

    /// Opens a child file for reading its old bytes, confined beneath the root.
    fn open_old(&self, path: &str) -> Option<OwnedFd> {
        rustix::fs::openat2(&self.root, path, READ_OLD, Mode::empty(), beneath()).ok()
    }

    fn read_local(&mut self, path: &str, off: u64, len: u32) -> Option<Vec<u8>> {
        let fd = if let Some(fd) = self.retained.get(path) {
            fd.as_fd()
        } else {
            if self.open_cache.as_ref().is_none_or(|(p, _)| p != path) {
                let fd = self.open_old(path)?;
                self.open_cache = Some((path.to_string(), fd));
            }
            self.open_cache.as_ref()?.1.as_fd()
        };
        pread_exact(fd, len as usize, off)
    }

    /// Writes a regular file. `data` yields the next chunk sent by the master (already
    /// checked against its hash) for each chunk the child does not hold.
    pub fn write(&mut self, e: &Entry, data: &mut DataSource<'_>) -> Result<(), SyncError> {
        let content = e.content.clone().unwrap_or(Content {
            size: 0,
            hash: Hash::of(b""),
            chunks: Vec::new(),
            sparse: false,
        });
        let chunks = content.chunk_list();
        // Pull every chunk from the stream first in any failure case, so that the stream
        // stays in step with the master even when this file fails.
        let (dir, name) = match self.parent(&e.path) {
            Ok(x) => x,
            Err(err) => {
                for (_, c) in &chunks {
                    if !self.has_chunk(&c.hash) {
                        data(&c.hash, c.len)?;
                    }
                }
                return Err(err);
            }
        };
        let mut replay: Option<std::vec::IntoIter<Pulled>> = None;
        if let Some(mut ip) = self.in_place_plan(e, &content, &chunks, &dir, &name) {
            let changed: u64 = ip.changed.iter().map(|(_, l)| l).sum();
            if changed <= PULL_MAX {
                // The new bytes first: then only the pages that differ are journaled and
                // written (a 4 KiB edit journals 4-8 KiB, not its whole chunk).
                let pulled = self.pull_changed(e, &chunks, &ip, data)?;
                let new: Vec<(u64, &[u8])> =
                    pulled.iter().map(|p| (p.off, p.bytes.as_slice())).collect();
                let runs = differing_runs(&ip.f, &new, ip.old_size)
                    .map_err(|x| errno("read old bytes", &e.path, x))?;
                ip.changed = runs.iter().map(|(o, b)| (*o, b.len() as u64)).collect();
                if let Some((jdir, jname, jbytes)) = self.start_journal(e, &content, &ip) {
                    self.count_pulled(&pulled);
                    return self.write_in_place(
                        e,
                        content,
                        ip,
                        jdir,
                        &jname,
                        jbytes,
                        |r, ip, w| r.write_runs(e, ip, &runs, w),
                    );
                }
                // No journal: the temporary-file path below takes the streamed chunks from
                // what was pulled (and counts every chunk as it writes it, once).
                replay = Some(
                    pulled
                        .into_iter()
                        .filter(|p| p.streamed)
                        .collect::<Vec<_>>()
                        .into_iter(),
                );
            } else if let Some((jdir, jname, jbytes)) = self.start_journal(e, &content, &ip) {
                return self.write_in_place(e, content, ip, jdir, &jname, jbytes, |r, ip, w| {
                    r.fill_in_place(e, &chunks, ip, w, data)
                });
            }
        }
        let mut from_pulled;
        let data: &mut DataSource<'_> = match replay {
            Some(mut q) => {
                from_pulled = move |h: &Hash, _: u32| match q.next() {
                    Some(p) if p.hash == *h => Ok(Incoming::Bytes(p.bytes)),
                    _ => Err(SyncError::SourceChanged(format!(
                        "{} (chunks pulled for an in-place update do not match)",
                        e.path
                    ))),
                };
                &mut from_pulled
            }
            None => data,
        };
        // A file the child does not have is written without a name (see the module's doc).
        let new = self.old(&e.path).is_none();
        // A small file written whole is written by a writer thread once its bytes (or its
        // delta and old copy) are here: the rebuild and its check are the writer's too, and
        // so are a new file's creation and its wait for the disk (see `direct`).
        if content.chunks.is_empty()
            && content.size > 0
            && !content.sparse
            && let [(0, c)] = chunks.as_slice()
        {
            let data = match self.chunk_source(e, c, data)?? {
                ChunkSource::Local(b) => {
                    self.report.reused_bytes += b.len() as u64;
                    JobData::Bytes(b)
                }
                ChunkSource::Stream(Incoming::Bytes(b)) => {
                    self.report.literal_bytes += b.len() as u64;
                    JobData::Bytes(b)
                }
                ChunkSource::Stream(Incoming::Delta {
                    base,
                    block,
                    ops,
                    literals,
                }) => JobData::Delta {
                    old: match base {
                        None => self.old_copy(&e.path),
                        Some((off, len)) => self.base_bytes(&e.path, off, len).map(|b| b.to_vec()),
                    }
                    .ok_or_else(|| rebuild_failed(&e.path))?,
                    block,
                    ops,
                    literals,
                    chunk: *c,
                },
            };
            let tmp = self.temp_name(&name);
            let nameless = new && self.nameless_ok(&dir);
            self.offload(WriteJob {
                path: e.path.clone(),
                dir,
                tmp,
                nameless,
                new,
                name,
                data,
                meta: e.meta.clone(),
                owner: self.owner_of(&e.meta),
                content,
            });
            return Ok(());
        }
        let anonymous = if new { self.open_anonymous(&dir) } else { None };
        let (f, tmp) = match anonymous {
            Some(f) => (f, None),
            None => {
                let tmp = self.temp_name(&name);
                let f =
                    create_temp(&dir, &tmp).map_err(|x| errno("create temporary", &e.path, x))?;
                (f, Some(tmp))
            }
        };
        let result = self.fill(e, &content, &chunks, &dir, &name, &f, data);
        let result = result.and_then(|()| self.set_meta_fd(&f, &e.path, &e.meta));
        if let Err(err) = result {
            if let Some(tmp) = &tmp {
                let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), AtFlags::empty());
            }
            return Err(err);
        }
        let staged = match tmp {
            Some(tmp) => Staged::Named(tmp),
            None => Staged::Anonymous(f),
        };
        self.pending_bytes += content.size;
        self.pending.push(Pending {
            path: e.path.clone(),
            dir,
            staged,
            name,
            content,
        });
        self.batch_full();
        Ok(())
    }

    /// Hands a job to the writer threads (started on first use; the job is done here if none
    /// can start), waiting for earlier jobs while [`WRITER_QUEUE`] are outstanding, and
    /// collects the jobs done meanwhile.
    fn offload(&mut self, job: WriteJob) {
        if self.writer.tx.is_none() && !self.writer.inline {
            self.writer.start();
        }
        if job.new {
            self.writer.widen();
        }
        let job = match &self.writer.tx {
            Some(tx) => match tx.send(job) {
                Ok(()) => {
                    self.writer.outstanding += 1;
                    None
                }
                // The thread has gone: the job comes back and is done here.
                Err(std::sync::mpsc::SendError(job)) => Some(job),
            },
            None => Some(job),
        };
        if let Some(job) = job {
            let done = job.run();
            self.writes_done(done);
        }
        while self.writer.outstanding >= WRITER_QUEUE {
            self.collect_writes(true);
        }
        self.collect_writes(false);
    }

    /// Collects the writer thread's finished jobs (with `wait`, at least one, if any is
    /// outstanding).
    fn collect_writes(&mut self, mut wait: bool) {
        while self.writer.outstanding > 0 {
            let Some(rx) = &self.writer.rx else { return };
            let rx = rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let got = if wait {
                wait = false;
                rx.recv().ok()
            } else {
                match rx.try_recv() {
                    Ok(d) => Some(d),
                    Err(std::sync::mpsc::TryRecvError::Empty) => return,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => None,
                }
            };
            drop(rx);
            let Some(done) = got else {
                return self.writer_lost();
            };
            self.writer.outstanding -= 1;
            self.writes_done(done);
        }
    }

    /// Waits for every job handed to the writer thread.
    fn drain_writes(&mut self) {
        while self.writer.outstanding > 0 {
            self.collect_writes(true);
        }
    }

    /// The writer threads ended with jobs outstanding (none can: a job that panics is
    /// reported by its thread): they are reported failed, their temporary files left for
    /// the next scan to remove.
    fn writer_lost(&mut self) {
        tracing::warn!(
            jobs = self.writer.outstanding,
            "receiver: writer threads stopped"
        );
        for _ in 0..self.writer.outstanding {
            self.report.failed.push((
                String::new(),
                "the receiver's writer threads stopped".to_string(),
            ));
        }
        self.writer.outstanding = 0;
        self.writer.tx = None;
        self.writer.rx = None;
        self.writer.inline = true;
    }

    /// A finished job: the file joins the batch, or its failure is reported.
    fn writes_done(&mut self, done: WriteDone) {
        match done {
            Ok(w) => {
                self.report.bytes_written += w.bytes;
                self.report.literal_bytes += w.literal;
                self.report.reused_bytes += w.reused;
                self.pending_bytes += w.pending.content.size;
                self.pending.push(w.pending);
                self.batch_full();
            }
            Err((path, err)) => {
                tracing::warn!(path = %path, error = %err, "sync step failed");
                self.report.failed.push((path, err.to_string()));
            }
        }
    }

    /// Ends the current batch when it is full (or may be synced early).
    fn batch_full(&mut self) {
        if self.pending.len() >= BATCH_FILES
            || self.pending_bytes >= BATCH_BYTES
            || (self.pending_bytes >= EARLY_SYNC_BYTES
                && self.opts.fsync
                && self.syncing.as_ref().is_none_or(|(_, h)| h.is_finished()))
        {
            self.rotate();
        }
    }

    /// Whether `e` can be updated in place (see [`crate::journal`]): a large regular file
    /// with one link, present as scanned, no backup wanted, no copy-on-write clone possible,
    /// and less than `1/IN_PLACE_FRACTION` of it changing, none of which the new content reads
    /// back from the file itself.
    fn in_place_plan(
        &mut self,
        e: &Entry,
        content: &Content,
        chunks: &[(u64, crate::manifest::Chunk)],
        dir: &OwnedFd,
        name: &str,
    ) -> Option<InPlace> {
        if self.opts.backup.is_some() {
            return None;
        }
        let old = self.old(&e.path)?;
        if old.size < self.in_place_min || old.size <= crate::manifest::CHUNK_THRESHOLD {
            return None;
        }
        let old_size = old.size;
        let old_at: HashMap<u64, Hash> = old.chunk_iter().map(|(o, c)| (o, c.hash)).collect();
        let mut changed: Vec<(u64, u64)> = Vec::new();
        let mut kept = 0u64;
        for (off, c) in chunks {
            if old_at.get(off) == Some(&c.hash) {
                kept += u64::from(c.len);
                continue;
            }
            match changed.last_mut() {
                Some((o, l)) if *o + *l == *off => *l += u64::from(c.len),
                _ => changed.push((*off, u64::from(c.len))),
            }
        }
        let cut = old_size.saturating_sub(content.size);
        let touched: u64 = changed.iter().map(|(_, l)| l).sum::<u64>() + cut;
        if touched.saturating_mul(IN_PLACE_FRACTION) >= content.size.max(old_size) {
            return None;
        }
        // A changed chunk whose bytes come from a part of this file that is overwritten (or
        // cut off) could read new bytes: such a file takes the temporary-file path.
        let overlaps = |o: u64, l: u64| {
            o + l > content.size.min(old_size)
                || changed.iter().any(|(co, cl)| o < co + cl && *co < o + l)
        };
        for (off, c) in chunks {
            if old_at.get(off) != Some(&c.hash)
                && let Some((i, o, l)) = self.index.get(&c.hash)
                && self.indexed_path(*i) == e.path
                && overlaps(*o, u64::from(*l))
            {
                return None;
            }
        }
        let f = rustix::fs::openat(
            dir,
            name,
            OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        )
        .ok()?;
        let st = rustix::fs::fstat(&f).ok()?;
        if st.st_mode & 0o170000 != 0o100000 || st.st_nlink != 1 || st.st_size as u64 != old_size {
            return None;
        }
        let dev = st.st_dev;
        let reflink = match self.reflink.get(&dev) {
            Some(r) => *r,
            None => {
                let r = self.probe_reflink(dir, name, &f);
                self.reflink.insert(dev, r);
                r
            }
        };
        if reflink {
            return None;
        }
        Some(InPlace {
            f,
            changed,
            kept,
            old_size,
        })
    }

    /// Whether the file system of `dir` can clone `f` (then the temporary-file path costs
    /// no data writes and is used instead of an in-place update).
    fn probe_reflink(&mut self, dir: &OwnedFd, name: &str, f: &OwnedFd) -> bool {
        let tmp = self.temp_name(name);
        let Ok(t) = rustix::fs::openat(
            dir,
            tmp.as_str(),
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::from_raw_mode(0o600),
        ) else {
            return false;
        };
        let ok = rustix::fs::ioctl_ficlone(&t, f).is_ok();
        drop(t);
        let _ = rustix::fs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
        ok
    }

    /// Writes and commits the undo journal of an in-place update: the old bytes of every
    /// range about to change and of the tail a shrink cuts off, with the old metadata.
    /// `None` (with a warning) when it cannot: the file is untouched and takes the
    /// temporary-file path.
    fn start_journal(
        &mut self,
        e: &Entry,
        content: &Content,
        ip: &InPlace,
    ) -> Option<(OwnedFd, String, u64)> {
        let mut created: Option<(OwnedFd, String)> = None;
        let r = (|| -> Result<(OwnedFd, String, u64), SyncError> {
            let st = rustix::fs::fstat(&ip.f).map_err(|x| errno("stat", &e.path, x))?;
            let p = format!("/proc/self/fd/{}", ip.f.as_raw_fd());
            let header = crate::journal::Header {
                path: e.path.clone(),
                size: st.st_size as u64,
                mode: st.st_mode & 0o7777,
                uid: st.st_uid,
                gid: st.st_gid,
                mtime: st.st_mtime,
                mtime_ns: st.st_mtime_nsec as u32,
                xattrs: crate::journal::get_xattrs(&p)
                    .map_err(|x| SyncError::fs("read xattrs", &e.path, x))?,
            };
            let jdir = self.mkdirs(crate::journal::DIR)?;
            self.journal_dir_used = true;
            if self.opts.fsync {
                // The directory's own entry must survive a crash too.
                rustix::fs::fsync(&self.root).map_err(|x| errno("sync root", "", x))?;
            }
            self.seq += 1;
            let jname = format!(
                "{}-{}{}",
                std::process::id(),
                self.seq,
                crate::journal::SUFFIX
            );
            let jf = rustix::fs::openat(
                &jdir,
                jname.as_str(),
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|x| errno("create journal", &e.path, x))?;
            created = Some((
                jdir.try_clone()
                    .map_err(|x| SyncError::fs("dup", &e.path, x))?,
                jname.clone(),
            ));
            let jio = |x: std::io::Error| SyncError::fs("write journal", &e.path, x);
            let mut w = crate::journal::Writer::new(jf, &header).map_err(jio)?;
            let old_size = header.size;
            let mut save: Vec<(u64, u64)> = ip
                .changed
                .iter()
                .filter(|(o, _)| *o < old_size)
                .map(|(o, l)| (*o, (*l).min(old_size - o)))
                .collect();
            if content.size < old_size {
                save.push((content.size, old_size - content.size));
            }
            let mut buf = vec![0u8; crate::journal::MAX_EXTENT as usize];
            for (o, l) in save {
                let mut at = o;
                while at < o + l {
                    let n = ((o + l - at) as usize).min(buf.len());
                    read_exact_at(&ip.f, &mut buf[..n], at)
                        .map_err(|x| errno("read old bytes", &e.path, x))?;
                    w.extent(at, &buf[..n]).map_err(jio)?;
                    at += n as u64;
                }
            }
            let bytes = w.commit(self.opts.fsync).map_err(jio)?;
            if self.opts.fsync {
                rustix::fs::fsync(&jdir).map_err(|x| errno("sync journal", &e.path, x))?;
            }
            Ok((jdir, jname, bytes))
        })();
        match r {
            Ok(x) => Some(x),
            Err(err) => {
                // Not committed, the file untouched: the partial journal goes.
                if let Some((d, n)) = created {
                    let _ = rustix::fs::unlinkat(&d, n.as_str(), AtFlags::empty());
                }
                tracing::warn!(path = %e.path, error = %err, "no in-place update (journal failed); rewriting the file");
                None
            }
        }
    }

    /// Updates a file in place once its journal is durable: writes the changed ranges, sets
    /// size and metadata, syncs the file, then removes the journal. On any failure the
    /// journal is replayed (the file is old again) and the step fails.
    #[allow(clippy::too_many_arguments)]
    fn write_in_place(
        &mut self,
        e: &Entry,
        content: Content,
        ip: InPlace,
        jdir: OwnedFd,
        jname: &str,
        jbytes: u64,
        fill: impl FnOnce(&mut Self, &InPlace, &mut u64) -> Result<(), SyncError>,
    ) -> Result<(), SyncError> {
        let mut written = 0u64;
        let r = fill(self, &ip, &mut written);
        let r = r.and_then(|()| {
            rustix::fs::ftruncate(&ip.f, content.size)
                .map_err(|x| errno("truncate", &e.path, x))?;
            if content.size < ip.old_size {
                self.step_done();
            }
            self.set_meta_fd(&ip.f, &e.path, &e.meta)?;
            if self.opts.fsync {
                rustix::fs::fsync(&ip.f).map_err(|x| errno("fsync", &e.path, x))?;
            }
            Ok(())
        });
        // Journal bytes are bytes written on the child too.
        self.report.bytes_written += jbytes + written;
        if let Err(err) = r {
            drop(ip);
            return match crate::journal::replay(&self.root, &jdir, jname, self.opts.fsync) {
                Ok(_) => Err(err),
                Err(j) => Err(SyncError::fs(
                    "roll back in-place update",
                    &e.path,
                    std::io::Error::other(format!(
                        "{j} after: {err}; the next run replays the journal"
                    )),
                )),
            };
        }
        rustix::fs::unlinkat(&jdir, jname, AtFlags::empty())
            .map_err(|x| errno("remove journal", &e.path, x))?;
        if self.opts.fsync {
            rustix::fs::fsync(&jdir).map_err(|x| errno("sync journal directory", &e.path, x))?;
        }
        self.report.cloned_bytes += ip.kept;
        self.report.files_written += 1;
        self.written.push((e.path.clone(), content));
        Ok(())
    }

    /// Pulls the new bytes of the changed chunks of an in-place update (from the stream or
    /// from elsewhere on the child), before anything is journaled or written. Every chunk is
    /// pulled from the stream even after a failure, so the stream stays in step with the
    /// master; a failure leaves the file untouched. Nothing is counted in the report yet:
    /// the caller counts the chunks where they are used ([`Receiver::count_pulled`], or
    /// [`Receiver::fill`] again when no journal can be made).
    fn pull_changed(
        &mut self,
        e: &Entry,
        chunks: &[(u64, crate::manifest::Chunk)],
        ip: &InPlace,
        data: &mut DataSource<'_>,
    ) -> Result<Vec<Pulled>, SyncError> {
        let mut first_err = None;
        let mut out = Vec::new();
        for (off, c) in chunks {
            if !ip.changed.iter().any(|(o, l)| *off >= *o && *off < o + l) {
                continue;
            }
            match self.whole_chunk(e, c, data)? {
                Ok((bytes, literal)) => out.push(Pulled {
                    off: *off,
                    hash: c.hash,
                    bytes,
                    streamed: literal.is_some(),
                    literal: literal.unwrap_or(0),
                }),
                Err(err) => {
                    first_err.get_or_insert(err);
                }
            }
        }
        match first_err {
            Some(err) => Err(err),
            None => Ok(out),
        }
    }

    /// Counts pulled chunks written by an in-place update: streamed ones as literal bytes,
    /// the others as reused.
    fn count_pulled(&mut self, pulled: &[Pulled]) {
        for p in pulled {
            let n = p.bytes.len() as u64;
            let literal = if p.streamed { p.literal.min(n) } else { 0 };
            self.report.literal_bytes += literal;
            self.report.reused_bytes += n - literal;
        }
    }

    /// Where the bytes of chunk `c` of `e` come from: the child's own files when it holds
    /// that chunk (read and checked against its hash), else the master's stream. The outer
    /// error is the stream's (the run cannot go on); the inner one fails only this file.
    fn chunk_source(
        &mut self,
        e: &Entry,
        c: &crate::manifest::Chunk,
        data: &mut DataSource<'_>,
    ) -> Result<Result<ChunkSource, SyncError>, SyncError> {
        match self.index.get(&c.hash).copied() {
            Some((i, o, l)) => {
                let p = self.indexed_path(i).to_string();
                Ok(self
                    .read_local(&p, o, l)
                    .filter(|b| Hash::of(b) == c.hash)
                    .map(ChunkSource::Local)
                    .ok_or_else(|| {
                        SyncError::SourceChanged(format!(
                            "{} (chunk source {p} on the child)",
                            e.path
                        ))
                    }))
            }
            None => Ok(Ok(ChunkSource::Stream(data(&c.hash, c.len)?))),
        }
    }

    /// The bytes of chunk `c` of `e`, from wherever [`Receiver::chunk_source`] finds them (a
    /// delta rebuilt against the old copy and checked), counted as reused or literal. The
    /// outer error is the stream's; the inner one fails only this file.
    fn chunk_bytes(
        &mut self,
        e: &Entry,
        c: &crate::manifest::Chunk,
        data: &mut DataSource<'_>,
    ) -> Result<Result<Vec<u8>, SyncError>, SyncError> {
        Ok(match self.chunk_source(e, c, data)? {
            Err(err) => Err(err),
            Ok(ChunkSource::Local(b)) => {
                self.report.reused_bytes += b.len() as u64;
                Ok(b)
            }
            Ok(ChunkSource::Stream(Incoming::Bytes(b))) => {
                self.report.literal_bytes += b.len() as u64;
                Ok(b)
            }
            Ok(ChunkSource::Stream(Incoming::Delta {
                base,
                block,
                ops,
                literals,
            })) => match self.rebuild(&e.path, base, block, &ops, &literals, c) {
                Some(b) => {
                    self.report.literal_bytes += literals.len() as u64;
                    self.report.reused_bytes += (b.len() - literals.len()) as u64;
                    Ok(b)
                }
                None => Err(rebuild_failed(&e.path)),
            },
        })
    }

    /// [`Receiver::chunk_source`] for a chunk of a file updated in place: its bytes, and
    /// `Some(literal bytes)` when they came from the stream (all of them, or a range delta's
    /// literals; a delta against a whole old copy is made only for one-chunk files, which
    /// are never in place).
    fn whole_chunk(
        &mut self,
        e: &Entry,
        c: &crate::manifest::Chunk,
        data: &mut DataSource<'_>,
    ) -> Result<Result<PulledBytes, SyncError>, SyncError> {
        Ok(match self.chunk_source(e, c, data)? {
            Ok(ChunkSource::Local(b)) => Ok((b, None)),
            Ok(ChunkSource::Stream(Incoming::Bytes(b))) => {
                let n = b.len() as u64;
                Ok((b, Some(n)))
            }
            Ok(ChunkSource::Stream(Incoming::Delta {
                base: Some(base),
                block,
                ops,
                literals,
            })) => match self.rebuild(&e.path, Some(base), block, &ops, &literals, c) {
                Some(b) => Ok((b, Some(literals.len() as u64))),
                None => Err(rebuild_failed(&e.path)),
            },
            Ok(ChunkSource::Stream(Incoming::Delta { base: None, .. })) => {
                Err(SyncError::SourceChanged(format!(
                    "{} (a delta for a chunk of a large file)",
                    e.path
                )))
            }
            Err(err) => Err(err),
        })
    }

    /// Writes the runs of an in-place update (once their old bytes are journaled).
    fn write_runs(
        &mut self,
        e: &Entry,
        ip: &InPlace,
        runs: &[(u64, Vec<u8>)],
        written: &mut u64,
    ) -> Result<(), SyncError> {
        for (off, b) in runs {
            write_at(&ip.f, b, *off, false).map_err(|x| errno("write", &e.path, x))?;
            *written += b.len() as u64;
            self.step_done();
        }
        Ok(())
    }

    /// Counts a step of an in-place update (a run written, a shrink's cut) for the test hook
    /// `CORRAL_SYNC_CRASH_AFTER_EXTENTS` (feature `test-hooks` only), which dies like a killed
    /// receiver after that many, the journal and a half-updated file left.
    fn step_done(&mut self) {
        self.extents_written += 1;
        if self.crash_after == Some(self.extents_written) {
            std::process::abort();
        }
    }

    /// Writes the changed chunks of an in-place update too large to pull first
    /// ([`PULL_MAX`]). Every chunk is pulled from the
    /// stream even after a failure, so the stream stays in step with the master.
    fn fill_in_place(
        &mut self,
        e: &Entry,
        chunks: &[(u64, crate::manifest::Chunk)],
        ip: &InPlace,
        written: &mut u64,
        data: &mut DataSource<'_>,
    ) -> Result<(), SyncError> {
        let mut first_err = None;
        for (off, c) in chunks {
            if !ip.changed.iter().any(|(o, l)| *off >= *o && *off < o + l) {
                continue;
            }
            let bytes = match self.whole_chunk(e, c, data)? {
                Ok((b, literal)) => {
                    let literal = literal.unwrap_or(0).min(b.len() as u64);
                    self.report.literal_bytes += literal;
                    self.report.reused_bytes += b.len() as u64 - literal;
                    b
                }
                Err(err) => {
                    first_err.get_or_insert(err);
                    continue;
                }
            };
            if first_err.is_some() {
                continue;
            }
            match write_changed_blocks(&ip.f, &bytes, *off, ip.old_size) {
                Ok(n) => *written += n,
                Err(x) => {
                    first_err = Some(errno("write", &e.path, x));
                    continue;
                }
            }
            self.step_done();
        }
        match first_err {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// Ends the current batch without waiting for its sync: the previous batch (whose
    /// `syncfs` has been running meanwhile) is installed, then a thread syncs the file system
    /// for the current one while the receiver writes the next. Writing and syncing overlap;
    /// a file is still renamed into place only after a `syncfs` that began once all of its
    /// data was written. Failures are reported per file in `report.failed`.
    fn rotate(&mut self) {
        self.install_synced();
        let batch = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        if batch.is_empty() {
            return;
        }
        if !self.opts.fsync {
            self.install_batch(batch, Ok(()));
            return;
        }
        match self.root.try_clone() {
            Ok(root) => {
                let h = std::thread::spawn(move || rustix::fs::syncfs(&root));
                self.syncing = Some((batch, h));
            }
            Err(_) => {
                let r = rustix::fs::syncfs(&self.root);
                self.install_batch(batch, r);
            }
        }
    }

    /// Waits for the sync of the batch [`Receiver::rotate`] handed to a thread and installs
    /// it; returns whether that sync succeeded.
    fn install_synced(&mut self) -> bool {
        let Some((batch, h)) = self.syncing.take() else {
            return true;
        };
        let r = h.join().unwrap_or(Err(Errno::IO));
        self.install_batch(batch, r)
    }

    /// Installs the files written so far: one `syncfs` makes their data durable, then each is
    /// renamed into place. A file that cannot be installed is reported in `report.failed`
    /// (its temporary file removed); only a failed sync fails the whole batch.
    pub fn flush(&mut self) -> Result<(), SyncError> {
        self.drain_writes();
        let earlier = self.install_synced();
        let batch = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        if !batch.is_empty() {
            let t0 = std::time::Instant::now();
            let r = if self.opts.fsync {
                rustix::fs::syncfs(&self.root)
            } else {
                Ok(())
            };
            let synced = t0.elapsed();
            let failed = r.err();
            let files = batch.len();
            self.install_batch(batch, r);
            tracing::debug!(
                sync_ms = synced.as_secs_f64() * 1e3,
                ms = t0.elapsed().as_secs_f64() * 1e3,
                files,
                "receiver: batch synced and installed"
            );
            if let Some(x) = failed {
                return Err(errno("syncfs", "", x));
            }
        }
        if earlier {
            Ok(())
        } else {
            Err(SyncError::fs(
                "syncfs",
                "",
                std::io::Error::other("the sync before a batch's renames failed"),
            ))
        }
    }

    /// Renames a written batch into place after its sync returned `synced`; when the sync
    /// failed nothing of the batch is installed (every file stays old, its temporary file
    /// removed). Returns whether the sync succeeded.
    fn install_batch(&mut self, batch: Vec<Pending>, synced: Result<(), Errno>) -> bool {
        if let Err(x) = synced {
            for p in batch {
                // A file without a name goes with its descriptor.
                if let Staged::Named(tmp) = &p.staged {
                    let _ = rustix::fs::unlinkat(&p.dir, tmp.as_str(), AtFlags::empty());
                }
                self.report
                    .failed
                    .push((p.path, format!("syncfs before rename: {x}")));
            }
            return false;
        }
        for p in batch {
            let r = match &p.staged {
                Staged::Named(tmp) => self.install_temp(&p.path, &p.dir, tmp, &p.name),
                Staged::Anonymous(f) => self.install_anonymous(&p.path, f, &p.dir, &p.name),
            };
            match r {
                Ok(()) => {
                    self.report.files_written += 1;
                    self.written.push((p.path, p.content));
                }
                Err(err) => {
                    tracing::warn!(path = %p.path, error = %err, "sync step failed");
                    self.report.failed.push((p.path, err.to_string()));
                }
            }
        }
        true
    }

    #[allow(clippy::too_many_arguments)]
    fn fill(
        &mut self,
        e: &Entry,
        content: &Content,
        chunks: &[(u64, crate::manifest::Chunk)],
        dir: &OwnedFd,
        name: &str,
        f: &OwnedFd,
        data: &mut DataSource<'_>,
    ) -> Result<(), SyncError> {
        // A file the child lacks goes past the page cache; a replaced one through it.
        let new = self.old(&e.path).is_none();
        // Same chunks at the same offsets in the old file: keep them by cloning it.
        let mut cloned: HashMap<u64, Hash> = HashMap::new();
        if let Some(old) = self.old(&e.path)
            && old.size > crate::manifest::CHUNK_THRESHOLD
        {
            let new_at: HashMap<u64, Hash> = chunks.iter().map(|(o, c)| (*o, c.hash)).collect();
            let shared: Vec<(u64, Hash)> = old
                .chunk_iter()
                .filter(|(o, c)| new_at.get(o) == Some(&c.hash))
                .map(|(o, c)| (o, c.hash))
                .collect();
            if !shared.is_empty()
                && let Ok(src) = rustix::fs::openat(dir, name, READ_OLD, Mode::empty())
                && rustix::fs::ioctl_ficlone(f, &src).is_ok()
            {
                cloned = shared.into_iter().collect();
            }
        }
        let mut first_err = None;
        // Where the bytes written end: the fresh file's size unless a clone or holes left
        // another.
        let mut end = 0u64;
        for (off, c) in chunks {
            if cloned.get(off) == Some(&c.hash) {
                self.report.cloned_bytes += u64::from(c.len);
                continue;
            }
            let bytes = match self.chunk_bytes(e, c, data)? {
                Ok(b) => b,
                Err(err) => {
                    first_err.get_or_insert(err);
                    continue;
                }
            };
            if first_err.is_some() {
                continue;
            }
            let sparse = content.sparse && cloned.is_empty();
            let written = if new {
                write_new_at(f, &bytes, *off, sparse)
            } else {
                write_at(f, &bytes, *off, sparse)
            };
            if let Err(x) = written {
                first_err = Some(errno("write", &e.path, x));
                continue;
            }
            end = end.max(*off + bytes.len() as u64);
            self.report.bytes_written += bytes.len() as u64;
        }
        if let Some(err) = first_err {
            return Err(err);
        }
        // The temporary file was created empty: written from start to end without holes,
        // it has its size already (a truncate is 4 us per file of a full copy).
        if cloned.is_empty() && !content.sparse && end == content.size {
            return Ok(());
        }
        rustix::fs::ftruncate(f, content.size).map_err(|x| errno("truncate", &e.path, x))
    }

    /// The child's old copy of `path` when it is one chunk (what signatures describe).
    fn old_copy(&mut self, path: &str) -> Option<Vec<u8>> {
        if let Some(b) = self.kept_old.remove(path) {
            self.kept_bytes -= b.len();
            return Some(b);
        }
        let old = self.old(path)?;
        if !old.chunks.is_empty() || old.size > crate::manifest::CHUNK_THRESHOLD {
            return None;
        }
        let size = u32::try_from(old.size).ok()?;
        self.read_local(path, 0, size)
    }

    /// The signature of the child's old copy of `path` (`block == 0` when there is none).
    pub fn signature(&mut self, path: &str) -> crate::delta::Signature {
        self.old_copy(path)
            .map(|b| crate::delta::signature_seeded(&b, random_seed()))
            .unwrap_or_default()
    }

    /// The signatures of the child's old copies of `paths`, in order (as [`Self::signature`]
    /// gives them): read and computed on rayon's pool (500 files of a 1%-changed tree took a
    /// quarter of a second on one thread).
    ///
    /// The old copies read are kept (up to 64 MiB in all) for the deltas
    /// made against these signatures: each is then read once, and the receiver's thread
    /// does not read them again on the run's path.
    pub fn signatures(&mut self, paths: &[String]) -> Vec<crate::delta::Signature> {
        use rayon::prelude::*;
        let read: Vec<_> = paths
            .par_iter()
            .map(|p| {
                let old = self.old_copy_shared(p);
                let sig = old
                    .as_ref()
                    .map(|b| crate::delta::signature_seeded(b, random_seed()))
                    .unwrap_or_default();
                (sig, old)
            })
            .collect();
        let mut sigs = Vec::with_capacity(read.len());
        for (p, (sig, old)) in paths.iter().zip(read) {
            if let Some(b) = old
                && self.kept_bytes + b.len() <= KEEP_OLD_MAX
            {
                self.kept_bytes += b.len();
                if let Some(earlier) = self.kept_old.insert(p.clone(), b) {
                    self.kept_bytes -= earlier.len();
                }
            }
            sigs.push(sig);
        }
        sigs
    }

    /// [`Self::old_copy`] without the receiver's open-file cache (callable from several
    /// threads).
    fn old_copy_shared(&self, path: &str) -> Option<Vec<u8>> {
        let old = self.old(path)?;
        if !old.chunks.is_empty() || old.size > crate::manifest::CHUNK_THRESHOLD {
            return None;
        }
        let size = usize::try_from(old.size).ok()?;
        let opened;
        let fd = match self.retained.get(path) {
            Some(fd) => fd.as_fd(),
            None => {
                opened = self.open_old(path)?;
                opened.as_fd()
            }
        };
        pread_exact(fd, size, 0)
    }

    /// Rebuilds a chunk from the old copy of `path` and a delta; `None` unless the result
    /// hashes to the chunk's hash.
    fn rebuild(
        &mut self,
        path: &str,
        base: Option<(u64, u32)>,
        block: u32,
        ops: &[crate::delta::DeltaOp],
        literals: &[u8],
        c: &crate::manifest::Chunk,
    ) -> Option<Vec<u8>> {
        match base {
            None => rebuilt(&self.old_copy(path)?, block, ops, literals, c),
            Some((off, len)) => rebuilt(&self.base_bytes(path, off, len)?, block, ops, literals, c),
        }
    }

    /// The bytes `off..off + len` of the child's old copy of `path` (a range delta's base):
    /// `None` unless the child has that file, at least that long, and `len` is at most
    /// [`crate::proto::MAX_BASE`]. The range read last is kept (a run of chunks is rebuilt
    /// from one).
    fn base_bytes(&mut self, path: &str, off: u64, len: u32) -> Option<std::sync::Arc<Vec<u8>>> {
        if let Some((p, o, l, b)) = &self.base_cache
            && p == path
            && (*o, *l) == (off, len)
        {
            return Some(b.clone());
        }
        let old = self.old(path)?;
        if len > crate::proto::MAX_BASE || off.checked_add(u64::from(len))? > old.size {
            return None;
        }
        let b = std::sync::Arc::new(self.read_local(path, off, len)?);
        self.base_cache = Some((path.to_string(), off, len, b.clone()));
        Some(b)
    }

    /// The signatures of the byte ranges `asks` (path, offset, length) of the child's old
    /// copies, in order (`block == 0` where the child has no such range, or it is longer than
    /// [`crate::proto::MAX_BASE`]): read and computed on rayon's pool.
    pub fn range_signatures(
        &mut self,
        asks: &[(String, u64, u32)],
    ) -> Vec<crate::delta::Signature> {
        use rayon::prelude::*;
        asks.par_iter()
            .map(|(path, off, len)| {
                let ok = self.old(path).is_some_and(|old| {
                    *len <= crate::proto::MAX_BASE
                        && off
                            .checked_add(u64::from(*len))
                            .is_some_and(|end| end <= old.size)
                });
                let fd = ok.then(|| self.open_old(path)).flatten();
                fd.and_then(|fd| pread_exact(fd.as_fd(), *len as usize, *off))
                    .map(|b| crate::delta::signature_seeded(&b, random_seed()))
                    .unwrap_or_default()
            })
            .collect()
    }

    /// Sets the metadata of a file open for writing through its descriptor (a `/proc/self/fd`
    /// path costs a procfs lookup per call: 19 against 5 us per file for the four calls).
    fn set_meta_fd(&self, f: &OwnedFd, rel: &str, m: &Meta) -> Result<(), SyncError> {
        self.set_meta_on(MetaTarget::Fd(f.as_fd()), rel, m, None)
    }

    /// Applies a step that carries no file data.
    pub fn apply(&mut self, op: &crate::planner::Op) -> Result<(), SyncError> {
        use crate::planner::Op;
        self.report.ops += 1;
        // Steps that may read or replace what a pending write installs wait for its batch;
        // new directories and special files do not depend on it.
        if !matches!(op, Op::Mkdir(_) | Op::Special(_)) {
            self.flush()?;
        }
        match op {
            Op::Replace { path } | Op::Delete { path, .. } => self.remove(path),
            Op::Mkdir(e) => {
                let (dir, name) = self.parent(&e.path)?;
                match rustix::fs::mkdirat(&dir, name.as_str(), Mode::from_raw_mode(0o700)) {
                    Ok(()) => {
                        self.created.push(e.path.clone());
                        Ok(())
                    }
                    Err(Errno::EXIST) => Ok(()),
                    Err(x) => Err(errno("mkdir", &e.path, x)),
                }
            }
            Op::Special(e) => self.special(e),
            Op::Link { path, target } => {
                let (tdir, tname) = self.parent(target)?;
                let (dir, name) = self.parent(path)?;
                let tmp = self.temp_name(&name);
                rustix::fs::linkat(&tdir, tname.as_str(), &dir, tmp.as_str(), AtFlags::empty())
                    .map_err(|x| errno("hard link", path, x))?;
                self.install_temp(path, &dir, &tmp, &name)
            }
            Op::Meta(e) | Op::DirMeta(e) => {
                let (dir, name) = self.parent(&e.path)?;
                self.set_meta_at(&dir, &name, &e.path, e)
            }
            Op::Write(_) => Err(SyncError::fs(
                "apply",
                op.path(),
                std::io::Error::other("a write needs its data"),
            )),
        }
    }

    fn special(&mut self, e: &Entry) -> Result<(), SyncError> {
        let (dir, name) = self.parent(&e.path)?;
        let tmp = self.temp_name(&name);
        let mode = Mode::from_raw_mode(e.meta.mode);
        let r = match &e.kind {
            Kind::Symlink(t) => rustix::fs::symlinkat(t.as_slice(), &dir, tmp.as_str()),
            Kind::Char(d) => rustix::fs::mknodat(
                &dir,
                tmp.as_str(),
                rustix::fs::FileType::CharacterDevice,
                mode,
                *d,
            ),
            Kind::Block(d) => rustix::fs::mknodat(
                &dir,
                tmp.as_str(),
                rustix::fs::FileType::BlockDevice,
                mode,
                *d,
            ),
            Kind::Fifo => {
                rustix::fs::mknodat(&dir, tmp.as_str(), rustix::fs::FileType::Fifo, mode, 0)
            }
            _ => {
                return Err(SyncError::fs(
                    "create",
                    &e.path,
                    std::io::Error::other("not a special file"),
                ));
            }
        };
        r.map_err(|x| errno("create", &e.path, x))?;
        let r = self
            .set_meta_at(&dir, &tmp, &e.path, e)
            .and_then(|()| self.install(&e.path, &dir, &tmp, &name));
        if r.is_err() {
            let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), AtFlags::empty());
        }
        r
    }

    /// Ends the run: writes the rollback journal, syncs the file system.
    pub fn finish(&mut self) -> Result<(), SyncError> {
        self.flush()?;
        if let Some((dir, run)) = self.opts.backup.clone() {
            let d = self.mkdirs(&format!("{dir}/{run}"))?;
            let j = serde_json::to_vec_pretty(&serde_json::json!({ "created": self.created }))
                .unwrap_or_default();
            let f = rustix::fs::openat(
                &d,
                JOURNAL,
                OFlags::CREATE
                    | OFlags::TRUNC
                    | OFlags::WRONLY
                    | OFlags::CLOEXEC
                    | OFlags::NOFOLLOW,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|x| errno("write journal", JOURNAL, x))?;
            write_at(&f, &j, 0, false).map_err(|x| errno("write journal", JOURNAL, x))?;
        }
        // The replaced inodes kept for their chunks are freed off the run's path too.
        for (_, fd) in self.retained.drain() {
            self.graveyard.bury(fd);
        }
        if self.journal_dir_used {
            crate::journal::remove_dir(&self.root, self.opts.fsync);
        }
        // A run that changed nothing wrote nothing: no syncfs (it would flush every other
        // writer's dirty pages on the file system).
        let changed = self.report.ops > 0
            || self.report.files_written > 0
            || !self.report.failed.is_empty()
            || self.journal_dir_used
            || self.opts.backup.is_some();
        if self.opts.fsync && changed {
            // The renames (and the journal) are durable once the file system is synced.
            let t0 = std::time::Instant::now();
            rustix::fs::syncfs(&self.root).map_err(|x| errno("syncfs", "", x))?;
            tracing::debug!(
                ms = t0.elapsed().as_secs_f64() * 1e3,
                "receiver: final sync"
            );
        }
        Ok(())
    }
}

/// Writes `buf` at `off` except the 4 KiB blocks that already hold these bytes (a changed
/// chunk is mostly unchanged: an edit of a few bytes rewrites one block, not the chunk);
/// returns the bytes written.
fn write_changed_blocks(f: &OwnedFd, buf: &[u8], off: u64, old_size: u64) -> Result<u64, Errno> {
    const BLOCK: usize = 4096;
    let mut old = vec![0u8; BLOCK];
    let mut written = 0;
    let mut run: Option<(usize, usize)> = None;
    let mut i = 0;
    while i <= buf.len() {
        let same = i < buf.len() && {
            let n = BLOCK.min(buf.len() - i);
            let at = off + i as u64;
            at + n as u64 <= old_size
                && read_exact_at(f, &mut old[..n], at).is_ok()
                && old[..n] == buf[i..i + n]
        };
        if i == buf.len() || same {
            if let Some((s, e)) = run.take() {
                write_at(f, &buf[s..e], off + s as u64, false)?;
                written += (e - s) as u64;
            }
            if i == buf.len() {
                break;
            }
        } else {
            let e = (i + BLOCK).min(buf.len());
            run = Some((run.map_or(i, |(s, _)| s), e));
        }
        i = (i + BLOCK).min(buf.len());
    }
    Ok(written)
}

/// The 4 KiB pages (aligned in the file) of the new bytes `new` (offset, bytes; ascending
/// offsets) that differ from the file `f` of `old_size` bytes, merged into runs of new bytes:
/// what an in-place update journals (the old bytes, up to `old_size`) and then writes.
fn differing_runs(
    f: &OwnedFd,
    new: &[(u64, &[u8])],
    old_size: u64,
) -> Result<Vec<(u64, Vec<u8>)>, Errno> {
    const PAGE: u64 = 4096;
    let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut old = vec![0u8; PAGE as usize];
    for (off, b) in new {
        let mut i = 0usize;
        while i < b.len() {
            let at = off + i as u64;
            let n = ((PAGE - at % PAGE) as usize).min(b.len() - i);
            let piece = &b[i..i + n];
            let same = at + n as u64 <= old_size && {
                read_exact_at(f, &mut old[..n], at)?;
                old[..n] == *piece
            };
            if !same {
                match runs.last_mut() {
                    Some((o, r)) if *o + r.len() as u64 == at => r.extend_from_slice(piece),
                    _ => runs.push((at, piece.to_vec())),
                }
            }
            i += n;
        }
    }
    Ok(runs)
}

/// A new file without a name in `dir` (`O_TMPFILE`), readable and writable by its owner.
fn open_nameless(dir: &OwnedFd) -> Result<OwnedFd, Errno> {
    rustix::fs::openat(
        dir,
        ".",
        OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
}

/// Creates the temporary file `tmp` in `dir` for writing a file's new content: a new name
/// only (never an existing object, never through a symlink), readable by its owner alone
/// until its metadata is set.
fn create_temp(dir: &OwnedFd, tmp: &str) -> Result<OwnedFd, Errno> {
    rustix::fs::openat(
        dir,
        tmp,
        OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::from_raw_mode(0o600),
    )
}

/// Sets owner (`owner`, when given), xattrs (ACLs), mode and mtime of the inode `t` names. Owner first: a
/// `chown` clears setuid and setgid, which the mode then sets again. With `now`, the
/// inode's current status, an owner and a mode it has already are not set again (a
/// directory's metadata set again after its entries changed needs its mtime alone).
fn set_meta(
    t: MetaTarget<'_>,
    rel: &str,
    m: &Meta,
    owner: Option<(u32, u32)>,
    now: Option<&rustix::fs::Stat>,
) -> Result<(), SyncError> {
    let mut chowned = false;
    if let Some((u, g)) = owner
        && now.is_none_or(|s| (s.st_uid, s.st_gid) != (u, g))
    {
        let (u, g) = (
            Some(rustix::fs::Uid::from_raw(u)),
            Some(rustix::fs::Gid::from_raw(g)),
        );
        match t {
            MetaTarget::Fd(f) => rustix::fs::fchown(f, u, g),
            MetaTarget::Path(p) => rustix::fs::chownat(rustix::fs::CWD, p, u, g, AtFlags::empty()),
        }
        .map_err(|e| errno("chown", rel, e))?;
        chowned = true;
    }
    // An ACL set or removed changes the mode's group bits: the mode is set after it.
    let xattrs_changed = set_xattrs(t, rel, m)?;
    if chowned || xattrs_changed || now.is_none_or(|s| s.st_mode & 0o7777 != m.mode & 0o7777) {
        let mode = Mode::from_raw_mode(m.mode);
        match t {
            MetaTarget::Fd(f) => rustix::fs::fchmod(f, mode),
            MetaTarget::Path(p) => rustix::fs::chmodat(rustix::fs::CWD, p, mode, AtFlags::empty()),
        }
        .map_err(|e| errno("chmod", rel, e))?;
    }
    match t {
        MetaTarget::Fd(f) => rustix::fs::futimens(f, &times(m)),
        MetaTarget::Path(p) => {
            rustix::fs::utimensat(rustix::fs::CWD, p, &times(m), AtFlags::empty())
        }
    }
    .map_err(|e| errno("set mtime", rel, e))
}

/// Makes the inode's xattrs those of `m` (see [`managed_xattr`] for what is removed);
/// returns whether any was set or removed.
fn set_xattrs(t: MetaTarget<'_>, rel: &str, m: &Meta) -> Result<bool, SyncError> {
    // Most files have no xattrs: ask for the size of the list first (a 64 KiB buffer per
    // file was a noticeable share of a full copy's CPU).
    let size = match t {
        MetaTarget::Fd(f) => rustix::fs::flistxattr_query(f),
        MetaTarget::Path(p) => rustix::fs::listxattr_query(p),
    }
    .unwrap_or(64 * 1024);
    let have: Vec<Vec<u8>> = if size == 0 {
        Vec::new()
    } else {
        let mut names = vec![0u8; size.min(64 * 1024)];
        match match t {
            MetaTarget::Fd(f) => rustix::fs::flistxattr(f, &mut names[..]),
            MetaTarget::Path(p) => rustix::fs::listxattr(p, &mut names[..]),
        } {
            Ok(n) => names[..n]
                .split(|b| *b == 0)
                .filter(|n| !n.is_empty())
                .map(<[u8]>::to_vec)
                .collect(),
            Err(_) => Vec::new(),
        }
    };
    let mut changed = false;
    for n in &have {
        if managed_xattr(n) && !m.xattrs.iter().any(|(k, _)| k == n) {
            changed = true;
            match t {
                MetaTarget::Fd(f) => rustix::fs::fremovexattr(f, n.as_slice()),
                MetaTarget::Path(p) => rustix::fs::removexattr(p, n.as_slice()),
            }
            .map_err(|e| errno("remove xattr", rel, e))?;
        }
    }
    for (k, v) in &m.xattrs {
        changed = true;
        let flags = rustix::fs::XattrFlags::empty();
        match t {
            MetaTarget::Fd(f) => rustix::fs::fsetxattr(f, k.as_slice(), v, flags),
            MetaTarget::Path(p) => rustix::fs::setxattr(p, k.as_slice(), v, flags),
        }
        .map_err(|e| {
            SyncError::fs(
                "set xattr",
                format!("{rel} ({})", String::from_utf8_lossy(k)),
                e.into(),
            )
        })?;
    }
    Ok(changed)
}

fn read_exact_at(f: &OwnedFd, mut buf: &mut [u8], mut off: u64) -> Result<(), Errno> {
    while !buf.is_empty() {
        let n = rustix::io::pread(f, &mut *buf, off)?;
        if n == 0 {
            return Err(Errno::IO);
        }
        buf = &mut buf[n..];
        off += n as u64;
    }
    Ok(())
}

/// [`write_at`] for a file the child lacks (nothing reads it back during the run, and it is
/// not yet part of the child's working set): its large aligned middle goes past the page
/// cache (see `direct`).
fn write_new_at(f: &OwnedFd, buf: &[u8], off: u64, skip_zero_blocks: bool) -> Result<(), Errno> {
    if skip_zero_blocks {
        return write_at(f, buf, off, true);
    }
    let direct = crate::direct::write_at(f, buf, off)?;
    write_at(f, &buf[..direct.start], off, false)?;
    write_at(f, &buf[direct.end..], off + direct.end as u64, false)
}

fn write_at(
    f: &OwnedFd,
    mut buf: &[u8],
    mut off: u64,
    skip_zero_blocks: bool,
) -> Result<(), Errno> {
    if skip_zero_blocks {
        // Leave holes where the master has zeros (the file was created empty).
        for block in buf.chunks(4096) {
            if block.iter().any(|b| *b != 0) {
                write_at(f, block, off, false)?;
            }
            off += block.len() as u64;
        }
        return Ok(());
    }
    while !buf.is_empty() {
        let n = rustix::io::pwrite(f, buf, off)?;
        if n == 0 {
            return Err(Errno::IO);
        }
        buf = &buf[n..];
        off += n as u64;
    }
    Ok(())
}

/// A random seed for a signature's strong sums: the standard library's per-process random
/// hasher keys (from the OS), not a security boundary, only so that two runs never meet the
/// same sum collision.
/// `len` bytes of `fd` from `off` (`None` when it has fewer, or a read fails).
fn pread_exact(fd: std::os::fd::BorrowedFd<'_>, len: usize, off: u64) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < buf.len() {
        match rustix::io::pread(fd, &mut buf[done..], off + done as u64) {
            Ok(0) | Err(_) => return None,
            Ok(n) => done += n,
        }
    }
    Some(buf)
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue #5: the crash hook works only in builds with the `test-hooks` feature; a shipped
    /// binary (built without it) ignores `CORRAL_SYNC_CRASH_AFTER_EXTENTS`.
    #[test]
    fn crash_hook_counts_only_with_the_test_hooks_feature() {
        let expected = if cfg!(feature = "test-hooks") {
            Some(3)
        } else {
            None
        };
        assert_eq!(crash_after_from(Some("3")), expected);
        assert_eq!(crash_after_from(Some("three")), None);
        assert_eq!(crash_after_from(None), None);
    }

    fn entry(path: &str, data: &[u8]) -> Entry {
        Entry {
            path: path.into(),
            kind: Kind::File,
            meta: Meta::test_file(),
            content: Some(Content {
                size: data.len() as u64,
                hash: Hash::of(data),
                chunks: vec![],
                sparse: false,
            }),
        }
    }

    fn write_n(r: &mut Receiver, from: usize, to: usize) {
        for i in from..to {
            let data = format!("file {i}\n").into_bytes();
            let e = entry(&format!("f{i}"), &data);
            r.write(&e, &mut |_, _| Ok(Incoming::Bytes(data.clone())))
                .unwrap();
        }
        // Files written by the writer thread join their batch when collected.
        r.drain_writes();
    }

    /// Files beneath `root` by how they wait for their batch: under their own names, under
    /// temporary names, and (for this process) without any name.
    fn names(root: &Path) -> (usize, usize, usize) {
        let (mut real, mut temp) = (0, 0);
        for e in std::fs::read_dir(root).unwrap() {
            let n = e.unwrap().file_name().into_string().unwrap();
            if n.ends_with(TEMP_SUFFIX) {
                temp += 1;
            } else {
                real += 1;
            }
        }
        (real, temp, deleted_open(root))
    }

    /// A receiver for new files in `root`, writing them without names (`O_TMPFILE`, which
    /// the temporary directories of the tests' file systems support) or, with `named`, under
    /// temporary names as where that is not possible.
    fn receiver_for_new(root: &Path, fsync: bool, named: bool) -> Receiver {
        let opts = ReceiverOptions {
            ignore_owner: true,
            fsync,
            ..ReceiverOptions::default()
        };
        let mut r = Receiver::new(root, std::sync::Arc::default(), opts).unwrap();
        if named {
            r.anon = AnonLink::Off;
        }
        r
    }

    /// With durability on, a full batch is synced on a thread while the next one is written,
    /// and linked or renamed into place only once that sync has returned (at the next batch's
    /// end or a flush): until then its files have no names (new files, `O_TMPFILE`) or only
    /// temporary ones (where that is not possible).
    #[test]
    fn a_batch_is_installed_after_its_background_sync() {
        for named in [false, true] {
            batch_installed_after_its_sync(named);
        }
    }

    fn batch_installed_after_its_sync(named: bool) {
        let t = tempfile::tempdir().unwrap();
        let mut r = receiver_for_new(t.path(), true, named);
        // (real names, temporary names, nameless files) with `n` files waiting.
        let waiting = |real: usize, n: usize| if named { (real, n, 0) } else { (real, 0, n) };
        write_n(&mut r, 0, BATCH_FILES);
        assert!(r.syncing.is_some(), "the full batch is being synced");
        if !named {
            assert!(
                matches!(r.anon, AnonLink::EmptyPath | AnonLink::ProcFd),
                "new files are written without a name here: {:?}",
                r.anon
            );
        }
        assert_eq!(names(t.path()), waiting(0, BATCH_FILES));
        write_n(&mut r, BATCH_FILES, BATCH_FILES + 5);
        assert_eq!(names(t.path()), waiting(0, BATCH_FILES + 5));
        r.flush().unwrap();
        assert!(r.syncing.is_none());
        assert_eq!(names(t.path()), (BATCH_FILES + 5, 0, 0));
        assert_eq!(r.report.files_written, BATCH_FILES as u64 + 5);
        assert!(r.report.failed.is_empty(), "{:?}", r.report.failed);
        for i in [0, BATCH_FILES - 1, BATCH_FILES + 4] {
            let got = std::fs::read(t.path().join(format!("f{i}"))).unwrap();
            assert_eq!(got, format!("file {i}\n").into_bytes());
        }
        // A second full batch installs the first as soon as it is handed over itself.
        write_n(&mut r, BATCH_FILES + 5, 2 * BATCH_FILES + 5);
        assert_eq!(names(t.path()), waiting(BATCH_FILES + 5, BATCH_FILES));
        write_n(&mut r, 2 * BATCH_FILES + 5, 3 * BATCH_FILES + 5);
        assert_eq!(names(t.path()), waiting(2 * BATCH_FILES + 5, BATCH_FILES));
        r.finish().unwrap();
        assert_eq!(names(t.path()), (3 * BATCH_FILES + 5, 0, 0));
        assert_eq!(r.report.files_written, 3 * BATCH_FILES as u64 + 5);
        // Nothing of the run's (no probe file either) is left but the files themselves.
        drop(r);
        assert_eq!(names(t.path()), (3 * BATCH_FILES + 5, 0, 0));
    }

    /// A new file that loses its name to something created there during the run (after the
    /// scan said the name was free) still replaces it whole: linked to a temporary name and
    /// renamed over it, as any other file.
    #[test]
    fn a_name_taken_during_the_run_is_replaced_whole() {
        let t = tempfile::tempdir().unwrap();
        let mut r = receiver_for_new(t.path(), true, false);
        write_n(&mut r, 0, 3);
        assert_eq!(names(t.path()), (0, 0, 3));
        std::fs::write(t.path().join("f1"), b"somebody else's").unwrap();
        std::fs::create_dir(t.path().join("f2")).unwrap();
        r.finish().unwrap();
        assert!(r.report.failed.is_empty(), "{:?}", r.report.failed);
        assert_eq!(r.report.files_written, 3);
        for i in 0..3 {
            let got = std::fs::read(t.path().join(format!("f{i}"))).unwrap();
            assert_eq!(got, format!("file {i}\n").into_bytes(), "f{i}");
        }
        let mode = std::fs::metadata(t.path().join("f1"))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o7777,
            0o644
        );
        drop(r);
        assert_eq!(names(t.path()), (3, 0, 0));
    }

    /// Both ways of giving a nameless file its name work here: by its descriptor (needs
    /// `CAP_DAC_READ_SEARCH`: root) and through `/proc/self/fd` (any user); neither replaces a
    /// name that exists.
    #[test]
    fn a_nameless_file_is_linked_either_way() {
        let t = tempfile::tempdir().unwrap();
        let dir =
            rustix::fs::open(t.path(), OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap();
        let root = rustix::process::geteuid().is_root();
        if !root {
            eprintln!("SKIPPED (not root): linking by descriptor (AT_EMPTY_PATH) needs root");
        }
        for (how, name) in [
            (AnonLink::ProcFd, "by-proc"),
            (AnonLink::EmptyPath, "by-fd"),
        ] {
            if how == AnonLink::EmptyPath && !root {
                continue;
            }
            let f = rustix::fs::openat(
                &dir,
                ".",
                OFlags::TMPFILE | OFlags::RDWR,
                Mode::from_raw_mode(0o600),
            )
            .unwrap();
            rustix::io::write(&f, name.as_bytes()).unwrap();
            std::fs::write(t.path().join("taken"), b"x").unwrap();
            assert_eq!(
                Receiver::link_anonymous(how, &f, &dir, "taken"),
                Err(Errno::EXIST),
                "{how:?}"
            );
            assert_eq!(std::fs::read(t.path().join("taken")).unwrap(), b"x");
            Receiver::link_anonymous(how, &f, &dir, name).unwrap();
            assert_eq!(std::fs::read(t.path().join(name)).unwrap(), name.as_bytes());
        }
    }

    /// Descriptors of this process that name a deleted file beneath `root`.
    fn deleted_open(root: &Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|l| l.starts_with(root) && l.to_string_lossy().ends_with(" (deleted)"))
            .count()
    }

    /// Replacing files the child has keeps one writer thread per core (their work is CPU);
    /// the first file the child lacks widens them to `WRITERS` (their writes wait for the
    /// disk).
    #[test]
    fn writers_widen_when_new_files_come() {
        if std::env::var_os("CORRAL_SYNC_WRITERS").is_some() {
            eprintln!("SKIPPED: CORRAL_SYNC_WRITERS fixes the number of writer threads");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        let mut child = Manifest::default();
        for i in 0..5 {
            std::fs::write(root.join(format!("f{i}")), b"old content\n").unwrap();
            child
                .entries
                .push(entry(&format!("f{i}"), b"old content\n"));
        }
        let opts = ReceiverOptions {
            ignore_owner: true,
            ..ReceiverOptions::default()
        };
        let mut r = Receiver::new(&root, std::sync::Arc::new(child), opts).unwrap();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        write_n(&mut r, 0, 5);
        assert_eq!(r.writer.threads.len(), cores.min(WRITERS), "replacing");
        write_n(&mut r, 5, 8);
        assert_eq!(r.writer.threads.len(), WRITERS, "after new files");
        r.finish().unwrap();
        assert!(r.report.failed.is_empty(), "{:?}", r.report.failed);
        for i in 0..8 {
            let got = std::fs::read(root.join(format!("f{i}"))).unwrap();
            assert_eq!(got, format!("file {i}\n").into_bytes());
        }
    }

    /// The old inodes of replaced files (kept for their chunks, or held across the rename so
    /// that freeing them happens on the graveyard's thread) are all released once the
    /// receiver is dropped, and every file is the new one.
    #[test]
    fn replaced_inodes_are_released() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        let mut child = Manifest::default();
        for i in 0..10 {
            std::fs::write(root.join(format!("f{i}")), b"old content\n").unwrap();
            // Half of them are in the child's manifest (their chunks may be reused).
            if i < 5 {
                child
                    .entries
                    .push(entry(&format!("f{i}"), b"old content\n"));
            }
        }
        let opts = ReceiverOptions {
            ignore_owner: true,
            fsync: true,
            ..ReceiverOptions::default()
        };
        let mut r = Receiver::new(&root, std::sync::Arc::new(child), opts).unwrap();
        write_n(&mut r, 0, 10);
        r.finish().unwrap();
        assert!(r.report.failed.is_empty(), "{:?}", r.report.failed);
        assert!(r.retained.is_empty());
        drop(r);
        assert_eq!(deleted_open(&root), 0, "old inodes still open");
        for i in 0..10 {
            let got = std::fs::read(root.join(format!("f{i}"))).unwrap();
            assert_eq!(got, format!("file {i}\n").into_bytes());
        }
    }

    /// A deleted file whose name was its last (also inside a deleted directory) has its inode
    /// freed by the graveyard (held across the unlink); a hard-linked one, a directory or a
    /// symlink is just removed.
    /// Nothing stays open once the receiver is dropped.
    #[test]
    fn deleted_files_are_freed_by_the_graveyard() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        for i in 0..6 {
            std::fs::write(root.join(format!("gone{i}")), b"old\n").unwrap();
        }
        std::fs::write(root.join("linked"), b"two names\n").unwrap();
        std::fs::hard_link(root.join("linked"), root.join("kept")).unwrap();
        std::fs::create_dir_all(root.join("dir/sub")).unwrap();
        std::fs::write(root.join("dir/sub/f"), b"x").unwrap();
        std::os::unix::fs::symlink("gone0", root.join("link")).unwrap();
        let opts = ReceiverOptions {
            ignore_owner: true,
            fsync: true,
            ..ReceiverOptions::default()
        };
        let mut r = Receiver::new(&root, std::sync::Arc::default(), opts).unwrap();
        for p in ["gone0", "gone1", "gone2", "gone3", "gone4", "gone5"] {
            r.apply(&crate::planner::Op::Delete {
                path: p.into(),
                dir: false,
            })
            .unwrap();
        }
        for (p, dir) in [("linked", false), ("dir", true), ("link", false)] {
            r.apply(&crate::planner::Op::Delete {
                path: p.into(),
                dir,
            })
            .unwrap();
        }
        assert_eq!(
            r.graveyard.buried, 7,
            "one held inode per deleted last name (dir/sub/f included)"
        );
        r.finish().unwrap();
        drop(r);
        assert_eq!(deleted_open(&root), 0, "old inodes still open");
        let mut left: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["kept"]);
        assert_eq!(std::fs::read(root.join("kept")).unwrap(), b"two names\n");
    }

    /// Issue #5: the files inside a deleted directory are freed like a deleted top-level file:
    /// each last name's inode held across its unlink and closed by the graveyard. A file with
    /// another name outside keeps it, a symlink inside is removed, not followed, and nothing
    /// stays open once the receiver is dropped.
    #[test]
    fn files_inside_a_deleted_directory_are_freed_by_the_graveyard() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("dir/sub/deeper")).unwrap();
        std::fs::create_dir_all(root.join("outside")).unwrap();
        for f in ["dir/a", "dir/b", "dir/sub/c", "dir/sub/deeper/d"] {
            std::fs::write(root.join(f), f.as_bytes()).unwrap();
        }
        std::fs::write(root.join("outside/kept"), b"two names\n").unwrap();
        std::fs::hard_link(root.join("outside/kept"), root.join("dir/sub/linked")).unwrap();
        std::os::unix::fs::symlink("../outside", root.join("dir/to-outside")).unwrap();
        std::os::unix::fs::symlink("../../outside/kept", root.join("dir/sub/to-kept")).unwrap();
        let opts = ReceiverOptions {
            ignore_owner: true,
            fsync: true,
            ..ReceiverOptions::default()
        };
        let mut r = Receiver::new(&root, std::sync::Arc::default(), opts).unwrap();
        r.apply(&crate::planner::Op::Delete {
            path: "dir".into(),
            dir: true,
        })
        .unwrap();
        assert_eq!(
            r.graveyard.buried, 4,
            "one held inode per last name inside the deleted directory"
        );
        r.finish().unwrap();
        drop(r);
        assert_eq!(deleted_open(&root), 0, "old inodes still open");
        assert!(!root.join("dir").exists());
        assert_eq!(
            std::fs::read(root.join("outside/kept")).unwrap(),
            b"two names\n"
        );
        let kept = std::fs::metadata(root.join("outside/kept")).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::nlink(&kept), 1);
    }

    /// With the graveyard's backlog full (here: no room at all), a deleted directory's files
    /// are freed inline (no descriptor held): the directory is still removed and nothing
    /// stays open.
    #[test]
    fn a_full_graveyard_frees_inline() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        for i in 0..20 {
            std::fs::create_dir_all(root.join(format!("dir/{}", i % 3))).unwrap();
            std::fs::write(root.join(format!("dir/{}/f{i}", i % 3)), b"x").unwrap();
        }
        let opts = ReceiverOptions {
            ignore_owner: true,
            fsync: true,
            ..ReceiverOptions::default()
        };
        let mut r = Receiver::new(&root, std::sync::Arc::default(), opts).unwrap();
        r.graveyard.max_backlog = 0;
        r.apply(&crate::planner::Op::Delete {
            path: "dir".into(),
            dir: true,
        })
        .unwrap();
        assert_eq!(r.graveyard.buried, 0, "no room: every inode freed inline");
        r.finish().unwrap();
        drop(r);
        assert!(!root.join("dir").exists());
        assert_eq!(deleted_open(&root), 0, "old inodes still open");
    }

    /// Without durability there is nothing to wait for: a full batch is installed at once.
    #[test]
    fn without_fsync_a_batch_is_installed_at_once() {
        let t = tempfile::tempdir().unwrap();
        let opts = ReceiverOptions {
            ignore_owner: true,
            fsync: false,
            ..ReceiverOptions::default()
        };
        let mut r = Receiver::new(t.path(), std::sync::Arc::default(), opts).unwrap();
        write_n(&mut r, 0, BATCH_FILES + 1);
        assert!(r.syncing.is_none());
        assert_eq!(names(t.path()), (BATCH_FILES, 0, 1));
        r.finish().unwrap();
        assert_eq!(names(t.path()), (BATCH_FILES + 1, 0, 0));
    }

    /// The receiver finds the child's old files and chunks through its manifest whatever
    /// order that came in (it is sorted when it is not).
    #[test]
    fn old_files_and_chunks_are_found_in_an_unsorted_manifest() {
        let t = tempfile::tempdir().unwrap();
        let mut child = Manifest::default();
        for n in ["b", "a/x", "c", "a"] {
            let mut e = entry(n, format!("content of {n}\n").as_bytes());
            if n == "a" {
                e.kind = Kind::Dir;
                e.content = None;
            }
            child.entries.push(e);
        }
        let r = Receiver::new(
            t.path(),
            std::sync::Arc::new(child),
            ReceiverOptions::default(),
        )
        .unwrap();
        for n in ["b", "a/x", "c"] {
            let c = r.old(n).unwrap_or_else(|| panic!("{n} not found"));
            assert_eq!(c.hash, Hash::of(format!("content of {n}\n").as_bytes()));
            assert!(r.has_chunk(&c.hash));
            let (i, off, len) = r.index[&c.hash];
            assert_eq!((r.indexed_path(i), off, len as u64), (n, 0, c.size));
        }
        assert!(r.old("a").is_none(), "a directory has no old content");
        assert!(r.old("d").is_none());
    }

    /// A directory's metadata is set through its own descriptor: mode and mtime as the master
    /// has them whether or not the mode already matched, a managed xattr the master lacks
    /// removed, and a directory that became something else (a symlink, a file) during the
    /// run is refused, nothing followed.
    #[test]
    fn directory_metadata_is_set_and_a_swapped_directory_refused() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let mut r = Receiver::new(
            root,
            std::sync::Arc::default(),
            ReceiverOptions {
                ignore_owner: true,
                ..ReceiverOptions::default()
            },
        )
        .unwrap();
        let dir_entry = |path: &str, mode: u32, mtime: i64| {
            let mut e = entry(path, b"");
            e.kind = Kind::Dir;
            e.content = None;
            e.meta.mode = mode;
            e.meta.mtime = mtime;
            e.meta.mtime_ns = 123_456_789;
            e
        };
        let mtime = |p: &Path| {
            let m = std::fs::symlink_metadata(p).unwrap();
            use std::os::unix::fs::MetadataExt;
            (m.mode() & 0o7777, m.mtime(), m.mtime_nsec())
        };
        std::fs::create_dir(root.join("same")).unwrap();
        std::fs::set_permissions(root.join("same"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::create_dir(root.join("other")).unwrap();
        std::fs::set_permissions(root.join("other"), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        let xattr = rustix::fs::setxattr(
            root.join("other").as_path(),
            "user.corral-test",
            b"1",
            rustix::fs::XattrFlags::empty(),
        )
        .is_ok();
        r.apply(&crate::planner::Op::DirMeta(dir_entry(
            "same", 0o755, 1_000_000,
        )))
        .unwrap();
        assert_eq!(mtime(&root.join("same")), (0o755, 1_000_000, 123_456_789));
        r.apply(&crate::planner::Op::DirMeta(dir_entry(
            "other", 0o2751, 2_000_000,
        )))
        .unwrap();
        assert_eq!(mtime(&root.join("other")), (0o2751, 2_000_000, 123_456_789));
        if xattr {
            assert_eq!(
                rustix::fs::listxattr_query(root.join("other").as_path()).unwrap(),
                0,
                "the xattr the master lacks is removed"
            );
        } else {
            eprintln!("SKIPPED part: user xattrs not supported on this file system");
        }
        r.apply(&crate::planner::Op::DirMeta(dir_entry(
            "", 0o750, 3_000_000,
        )))
        .unwrap();
        assert_eq!(mtime(root), (0o750, 3_000_000, 123_456_789));
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Swapped during the run: a symlink to a directory outside, a file.
        let outside = tempfile::tempdir().unwrap();
        let before = mtime(outside.path());
        std::os::unix::fs::symlink(outside.path(), root.join("link")).unwrap();
        std::fs::write(root.join("file"), b"x").unwrap();
        for name in ["link", "file"] {
            let err = r
                .apply(&crate::planner::Op::DirMeta(dir_entry(
                    name, 0o777, 4_000_000,
                )))
                .unwrap_err();
            assert!(
                err.to_string().contains("no longer a directory"),
                "{name}: {err}"
            );
        }
        assert_eq!(
            mtime(outside.path()),
            before,
            "nothing outside the root changed"
        );
        assert_ne!(mtime(&root.join("file")).1, 4_000_000);
    }

    /// With durability on, a batch that has reached [`EARLY_SYNC_BYTES`] is synced on a
    /// thread at once when no earlier batch is still syncing (its files installed at the
    /// next batch's end or the flush), not only at [`BATCH_FILES`] or [`BATCH_BYTES`].
    #[test]
    fn a_batch_of_early_sync_bytes_is_synced_early() {
        let t = tempfile::tempdir().unwrap();
        let mut r = receiver_for_new(t.path(), true, true);
        let big = (EARLY_SYNC_BYTES / 3 + 1) as usize;
        let write = |r: &mut Receiver, i: usize| {
            let data = vec![i as u8; big];
            let e = entry(&format!("big{i}"), &data);
            r.write(&e, &mut |_, _| Ok(Incoming::Bytes(data.clone())))
                .unwrap();
            r.drain_writes();
        };
        write(&mut r, 0);
        write(&mut r, 1);
        assert!(
            r.syncing.is_none() && r.pending.len() == 2,
            "below the bytes: waiting"
        );
        write(&mut r, 2);
        assert!(
            r.syncing.is_some(),
            "three files pass the bytes: synced early"
        );
        assert!(r.pending.is_empty());
        assert_eq!(
            names(t.path()),
            (0, 3, 0),
            "not installed before its sync returned"
        );
        write(&mut r, 3);
        r.finish().unwrap();
        assert_eq!(names(t.path()), (4, 0, 0));
        for i in 0..4 {
            assert_eq!(
                std::fs::read(t.path().join(format!("big{i}"))).unwrap(),
                vec![i as u8; big]
            );
        }
        assert_eq!(r.report.files_written, 4);
    }

    /// A chunk of a large file sent as a delta against a range of the child's old copy is
    /// rebuilt from that range and checked; a range past the old copy's end gets no
    /// signature, and a delta built on one fails its file alone, leaving the old copy.
    #[test]
    fn a_range_delta_rebuilds_a_chunk_and_a_range_past_the_old_copy_fails_its_file() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let mut x = 5u64;
        let old: Vec<u8> = (0..3 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let mut new = old.clone();
        new[1_500_000..1_504_096].fill(7);
        let with = |path: &str, c: Content| Entry {
            content: Some(c),
            ..entry(path, b"")
        };
        std::fs::write(root.join("img"), &old).unwrap();
        std::fs::write(root.join("img2"), &old).unwrap();
        let old_c = crate::scan::hash_file(&root.join("img"), false).unwrap();
        std::fs::write(t.path().join("new"), &new).unwrap();
        let new_c = crate::scan::hash_file(&t.path().join("new"), false).unwrap();
        let child = Manifest {
            entries: vec![with("img", old_c.clone()), with("img2", old_c.clone())],
        };
        let mut r = Receiver::new(
            &root,
            std::sync::Arc::new(child),
            ReceiverOptions {
                ignore_owner: true,
                ..ReceiverOptions::default()
            },
        )
        .unwrap();
        let held: std::collections::HashSet<Hash> = old_c.chunks.iter().map(|c| c.hash).collect();
        let lacked: Vec<(u64, crate::manifest::Chunk)> = new_c
            .chunk_iter()
            .filter(|(_, c)| !held.contains(&c.hash))
            .collect();
        assert!(!lacked.is_empty());
        let (a, b) = (
            lacked[0].0,
            lacked
                .iter()
                .map(|(o, c)| o + u64::from(c.len))
                .max()
                .unwrap(),
        );
        let base = (a - 4096, (b - a + 8192) as u32);
        let sigs = r.range_signatures(&[
            ("img".into(), base.0, base.1),
            ("img".into(), old.len() as u64 - 10, 100),
            ("nothere".into(), 0, 100),
        ]);
        assert!(sigs[0].block > 0 && sigs[0].len == u64::from(base.1));
        assert_eq!(
            (sigs[1].block, sigs[2].block),
            (0, 0),
            "no such range: no signature"
        );
        let sig = sigs[0].clone();
        let send = |base: (u64, u32)| {
            let (new, lacked, sig) = (&new, &lacked, &sig);
            move |h: &Hash, _: u32| {
                let (o, c) = lacked.iter().find(|(_, c)| c.hash == *h).unwrap();
                let d =
                    crate::delta::delta(sig, &new[*o as usize..(*o + u64::from(c.len)) as usize]);
                Ok(Incoming::Delta {
                    base: Some(base),
                    block: sig.block,
                    ops: d.ops,
                    literals: d.literals,
                })
            }
        };
        r.write(&with("img", new_c.clone()), &mut send(base))
            .unwrap();
        let past = (old.len() as u64 - 100, base.1);
        assert!(
            r.write(&with("img2", new_c.clone()), &mut send(past))
                .is_err()
        );
        r.finish().unwrap();
        assert!(std::fs::read(root.join("img")).unwrap() == new, "rebuilt");
        assert!(
            std::fs::read(root.join("img2")).unwrap() == old,
            "left as it was"
        );
        assert!(r.report.literal_bytes < 16 << 10, "{:?}", r.report);
        assert_eq!(r.report.files_written, 1);
    }

    /// Small files the child has are written by the writer thread beside the receiver's
    /// (deltas and whole files alike): every file ends up with its new bytes and metadata,
    /// nothing is left under a temporary name, and a file whose delta does not rebuild fails
    /// alone while the others go on.
    #[test]
    fn replaced_small_files_are_rebuilt_and_written_by_the_writer_threads() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let n = 300;
        let old = |i: usize| {
            format!(
                "old content of file {i}, long enough for a delta: {}",
                "x".repeat(3000)
            )
            .into_bytes()
        };
        let new = |i: usize| {
            let mut b = old(i);
            b[10] = b'N';
            b
        };
        let mut child = Manifest::default();
        for i in 0..n {
            std::fs::write(root.join(format!("f{i:03}")), old(i)).unwrap();
            child.entries.push(entry(&format!("f{i:03}"), &old(i)));
        }
        let mut r = Receiver::new(
            root,
            std::sync::Arc::new(child),
            ReceiverOptions {
                ignore_owner: true,
                fsync: true,
                ..ReceiverOptions::default()
            },
        )
        .unwrap();
        // Half the signatures asked together (their old copies kept for the deltas), half
        // one by one.
        let together: Vec<String> = (0..n).step_by(4).map(|i| format!("f{i:03}")).collect();
        let mut sigs = r.signatures(&together).into_iter();
        assert!(r.kept_bytes > 0 && r.kept_old.len() == together.len());
        for i in 0..n {
            let data = new(i);
            let mut e = entry(&format!("f{i:03}"), &data);
            e.meta.mode = 0o640;
            e.meta.mtime = 1_000_000 + i as i64;
            let sig = if i % 4 == 0 {
                sigs.next().unwrap()
            } else {
                r.signature(&e.path)
            };
            let mut d = crate::delta::delta(&sig, &data);
            if i == 8 {
                // A delta that rebuilds something else: this file fails, alone.
                d.literals[0] ^= 1;
            }
            let res = r.write(&e, &mut |_, _| {
                Ok(if i % 2 == 0 {
                    Incoming::Delta {
                        base: None,
                        block: sig.block,
                        ops: d.ops.clone(),
                        literals: d.literals.clone(),
                    }
                } else {
                    Incoming::Bytes(data.clone())
                })
            });
            // (A delta that does not rebuild fails on its writer thread.)
            assert!(res.is_ok(), "file {i}: {res:?}");
        }
        assert!(!r.writer.threads.is_empty(), "writer threads wrote them");
        r.finish().unwrap();
        assert_eq!(
            (r.kept_old.len(), r.kept_bytes),
            (0, 0),
            "every kept copy used"
        );
        assert_eq!(r.report.failed.len(), 1, "{:?}", r.report.failed);
        assert_eq!(r.report.failed[0].0, "f008");
        assert!(r.report.failed[0].1.contains("does not rebuild"));
        assert_eq!(r.report.files_written, n as u64 - 1);
        let sent: u64 = (0..n)
            .filter(|&i| i != 8)
            .map(|i| new(i).len() as u64)
            .sum();
        assert_eq!(r.report.literal_bytes + r.report.reused_bytes, sent);
        // (Half the files came as deltas.)
        assert!(
            r.report.reused_bytes > sent / 4,
            "deltas reused the old copies"
        );
        for i in 0..n {
            let p = root.join(format!("f{i:03}"));
            let want = if i == 8 { old(i) } else { new(i) };
            assert_eq!(std::fs::read(&p).unwrap(), want, "file {i}");
            if i != 8 {
                let m = std::fs::metadata(&p).unwrap();
                assert_eq!(
                    (m.mode() & 0o7777, m.mtime()),
                    (0o640, 1_000_000 + i as i64)
                );
            }
        }
        drop(r);
        assert_eq!(
            names(root),
            (n, 0, 0),
            "no temporary name (or old inode) is left"
        );
    }
}
