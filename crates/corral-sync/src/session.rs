//! The two ends of a run over a byte stream: [`serve`] (the receiver, `corral sync serve`)
//! and [`push`] (the master). Blocking I/O on purpose: a run is one sequential conversation
//! and the parallel parts (walking, hashing) use rayon inside the scan; each end has one
//! helper thread beside the stream (the master's reads, checks and compresses the data of the
//! next steps; the receiver's reads frames ahead, decompresses and checks their BLAKE3).

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::apply::{Incoming, Receiver, ReceiverOptions};
use crate::compression::{Chooser, Compress, CompressionReport, Mode};
use crate::delta::{DELTA_MIN, Signature};
use crate::error::{ProtoError, SyncError};
use crate::filter::PathFilter;
use crate::manifest::{Content, Entry, Hash, Manifest};
use crate::planner::{Op, Plan, PlanOptions, plan, plan_over};
use crate::proto::{
    Frame, Framed, Message, Report, RunOptions, VERSION, WHOLE_MAX, compress, compress_read,
    decompress, raw_read,
};
use crate::scan::{Deferred, ScanOptions, ScanStats, hash_file, scan, walk};

const BATCH: usize = 2000;

/// Options of the receiving end.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Hash cache file for the root (`None`: no cache).
    pub cache: Option<PathBuf>,
    /// Skip the `syncfs` before each batch of renames and at the end (see [`crate::apply`]).
    pub no_fsync: bool,
}

fn unexpected(m: &Message) -> SyncError {
    let s = format!("{m:?}");
    SyncError::Proto(ProtoError::Unexpected(s.chars().take(80).collect()))
}

/// Runs the receiving end of a conversation beneath `root` until the master is done.
pub fn serve<R: Read + crate::proto::Buffered + Send, W: Write>(
    root: &Path,
    framed: &mut Framed<R, W>,
    opts: &ServeOptions,
) -> Result<(), SyncError> {
    let options = match framed.recv()? {
        Message::Hello { version, options } if version == VERSION => options,
        Message::Hello { version, .. } => {
            let _ = framed.send(&Message::Error(format!(
                "protocol version {version} not supported (this end speaks {VERSION}): install \
                 the same corral release on both ends"
            )));
            let _ = framed.flush();
            return Err(ProtoError::Version(version, VERSION).into());
        }
        m => return Err(unexpected(&m)),
    };
    framed.send(&Message::Hello {
        version: VERSION,
        options: RunOptions::default(),
    })?;
    framed.flush()?;
    // A reader thread reads the stream ahead, decompresses file data and checks its BLAKE3
    // while this thread does the file system calls.
    std::thread::scope(|s| {
        let (reader, mut out) = framed.halves();
        let (tx, rx) = std::sync::mpsc::sync_channel(READ_AHEAD);
        s.spawn(move || read_ahead(reader, tx));
        let mut inbox = Inbox {
            rx,
            ready: std::collections::VecDeque::new(),
        };
        let r = serve_inner(root, &mut inbox, &mut out, opts, &options);
        if let Err(e) = &r {
            let _ = out.send(&Message::Error(e.to_string()));
            let _ = out.flush();
        }
        // The reader stops at its next frame, or at the end of the stream.
        drop(inbox);
        r
    })
}

/// Batches the receiver's reader thread holds ready ahead of the file system work, each of
/// at most [`BATCH_FRAMES`] frames and less than [`BATCH_BYTES`] of data plus one chunk (at
/// most 1 MiB: entries with larger chunks are refused when decoded): at most 16 MiB of file
/// data queued, with one batch being read and one being applied beside them.
const READ_AHEAD: usize = 8;

/// A frame as the receiver's reader thread hands it on.
enum Inbound {
    /// Any message but `Data`.
    Msg(Message),
    /// A chunk, decompressed; `ok` when its length and BLAKE3 are those of a chunk of that
    /// hash in the write it follows.
    Data {
        hash: Hash,
        bytes: Vec<u8>,
        ok: bool,
    },
}

/// The receiver's reader thread: reads frames and passes them on until the stream ends, a
/// frame is bad, `Bye` comes or the receiver has gone. The data of a `Write` is decompressed
/// at most to the size of that write's largest chunk (of an `ApplyEdit`, its largest new
/// chunk), as the receiver would. Frames go in
/// batches: what was decoded is handed on when the next read may wait for the stream (the
/// reader's buffer is empty), or at [`BATCH_FRAMES`] frames or [`BATCH_BYTES`] bytes of data.
fn read_ahead<R: Read + crate::proto::Buffered, W: Write>(
    mut f: Framed<R, W>,
    tx: std::sync::mpsc::SyncSender<Vec<Result<Inbound, ProtoError>>>,
) {
    let mut expect: std::collections::HashMap<Hash, u32> = std::collections::HashMap::new();
    let mut max = 0usize;
    let mut batch = Vec::new();
    let mut bytes = 0usize;
    loop {
        let item = match f.recv_data(max) {
            Ok(Frame::Data { hash, bytes }) => {
                let ok = expect.get(&hash) == Some(&(bytes.len() as u32))
                    && u32::try_from(bytes.len()).is_ok()
                    && Hash::of(&bytes) == hash;
                Ok(Inbound::Data { hash, bytes, ok })
            }
            Ok(Frame::Other(m)) => {
                if let Message::Apply(op) = &m {
                    expect.clear();
                    if let Op::Write(e) = op
                        && let Some(c) = &e.content
                    {
                        expect.extend(c.chunk_iter().map(|(_, c)| (c.hash, c.len)));
                    }
                    max = expect.values().copied().max().unwrap_or(0) as usize;
                }
                // A write whose chunk list comes as edits of the child's old copy's: data
                // comes only for its new chunks (the kept ones are the child's own).
                if let Message::ApplyEdit { edits, .. } = &m {
                    expect.clear();
                    expect.extend(edits.iter().filter_map(|e| match e {
                        crate::proto::ChunkEdit::New(c) => Some((c.hash, c.len)),
                        crate::proto::ChunkEdit::Keep { .. } => None,
                    }));
                    max = expect.values().copied().max().unwrap_or(0) as usize;
                }
                Ok(Inbound::Msg(m))
            }
            Err(e) => Err(e),
        };
        let last = matches!(item, Err(_) | Ok(Inbound::Msg(Message::Bye)));
        if let Ok(Inbound::Data { bytes: b, .. }) = &item {
            bytes += b.len();
        }
        batch.push(item);
        if last || f.buffered() == 0 || batch.len() >= BATCH_FRAMES || bytes >= BATCH_BYTES {
            bytes = 0;
            if tx.send(std::mem::take(&mut batch)).is_err() || last {
                return;
            }
        }
    }
}

/// Frames the reader thread hands on at most at once.
const BATCH_FRAMES: usize = 64;
/// Bytes of file data the reader thread hands on at most at once (with [`READ_AHEAD`]
/// batches queued, what it holds ahead stays bounded).
const BATCH_BYTES: usize = 1 << 20;

/// The receiving end of the reader thread's channel.
struct Inbox {
    rx: std::sync::mpsc::Receiver<Vec<Result<Inbound, ProtoError>>>,
    /// The rest of the last batch received.
    ready: std::collections::VecDeque<Result<Inbound, ProtoError>>,
}

impl Inbox {
    /// The next frame.
    fn next(&mut self) -> Result<Inbound, ProtoError> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                return item;
            }
            match self.rx.recv() {
                Ok(batch) => self.ready = batch.into(),
                Err(_) => {
                    return Err(ProtoError::Io(std::io::Error::other(
                        "stream reader stopped",
                    )));
                }
            }
        }
    }
    /// The next frame, which must not be `Data`.
    fn recv(&mut self) -> Result<Message, ProtoError> {
        match self.next()? {
            Inbound::Msg(m) => Ok(m),
            Inbound::Data { hash, .. } => Err(data_out_of_place(&hash)),
        }
    }
}

fn data_out_of_place(hash: &Hash) -> ProtoError {
    ProtoError::Unexpected(format!("data of chunk {hash:?}"))
}

fn serve_inner<W: Write>(
    root: &Path,
    inbox: &mut Inbox,
    framed: &mut Framed<std::io::Empty, W>,
    opts: &ServeOptions,
    options: &RunOptions,
) -> Result<(), SyncError> {
    // The receiver (its index of the child's chunks) is built from the child's manifest when
    // the first step or signature request needs it (or the `Finish` of a backup run): a dry
    // run (`corral drift`) ends with `Bye` and a run with nothing to do ends with `Finish`,
    // and neither builds it.
    let mut scanned: Option<std::sync::Arc<Manifest>> = None;
    // The range parameter of the last scan's digests (`None`: it was sent whole).
    let mut range_k: Option<u32> = None;
    // The run's digest key (chunk-range digests of listed large files are keyed with it).
    let mut range_key = [0u8; 32];
    let mut recv: Option<Receiver> = None;
    let receiver = |recv: &mut Option<Receiver>,
                    scanned: &Option<std::sync::Arc<Manifest>>|
     -> Result<(), SyncError> {
        if recv.is_none()
            && let Some(child) = scanned
        {
            *recv = Some(Receiver::new(
                root,
                child.clone(),
                ReceiverOptions {
                    backup: options.backup.clone(),
                    ignore_owner: options.ignore_owner || !rustix::process::geteuid().is_root(),
                    numeric_ids: options.numeric_ids,
                    fsync: !opts.no_fsync,
                },
            )?);
        }
        Ok(())
    };
    loop {
        let m = match inbox.recv() {
            Ok(m) => m,
            Err(ProtoError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        // A write whose chunk list came as edits of the old copy's is the write with that
        // list rebuilt from the child's own manifest (no old copy, or edits that do not fit
        // it: the master is not speaking of this child, and the conversation ends).
        let m = match m {
            Message::ApplyEdit { mut entry, edits } => {
                receiver(&mut recv, &scanned)?;
                let old = recv.as_ref().and_then(|r| r.old_chunks(&entry.path));
                let (Some(old), Some(c)) = (old, entry.content.as_mut()) else {
                    return Err(ProtoError::Decode(format!(
                        "{}: chunk list edits of a file this child has no chunked copy of",
                        entry.path
                    ))
                    .into());
                };
                c.chunks = crate::proto::apply_edits(old, &edits, c.size)?;
                Message::Apply(Op::Write(entry))
            }
            m => m,
        };
        match m {
            Message::Scan { key, k } => {
                let t0 = std::time::Instant::now();
                // Interrupted in-place updates are rolled back before anything reads the tree.
                crate::journal::recover_path(root, !opts.no_fsync)?;
                let mut skip = vec![crate::journal::DIR.to_string()];
                if let Some((d, _)) = &options.backup {
                    skip.push(d.clone());
                }
                let (child, _) = scan(
                    root,
                    &ScanOptions {
                        cache: opts.cache.clone(),
                        skip,
                        clean_temps: true,
                    },
                )?;
                let mut child = child;
                child.sort();
                tracing::debug!(ms = ms(t0), entries = child.entries.len(), "serve: scanned");
                if child.entries.len() <= WHOLE_MAX {
                    // Small (a new destination): all of it at once, no range exchange.
                    send_entries(framed, &child.entries, &key)?;
                    range_k = None;
                } else {
                    // The digests of its ranges, at once: the master asks (`Wanted`) only
                    // for the entries of those it holds no copy of.
                    let digests = crate::ranges::digests(&key, &child.entries, k);
                    for b in digests.chunks(DIGEST_BATCH) {
                        framed.send(&Message::RangeDigests(b.to_vec()))?;
                    }
                    framed.send(&Message::RangesEnd)?;
                    framed.flush()?;
                    range_k = Some(k);
                }
                tracing::debug!(ms = ms(t0), "serve: manifest sent");
                range_key = key;
                recv = None;
                scanned = Some(std::sync::Arc::new(child));
            }
            Message::Wanted(bits) => {
                let (Some(k), Some(child)) = (range_k, &scanned) else {
                    return Err(unexpected(&Message::Wanted(bits)));
                };
                let listed = crate::ranges::listing(k, &child.entries, &bits)
                    .map_err(|e| ProtoError::Decode(format!("master's range request: {e}")))?;
                send_entries(framed, &listed, &range_key)?;
            }
            Message::WantedChunks(asks) => {
                let Some(child) = &scanned else {
                    return Err(unexpected(&Message::WantedChunks(asks)));
                };
                // A path or bitmap that does not fit gets an empty list: the master finds it
                // does not rebuild its file, and stops.
                let lists = asks
                    .iter()
                    .map(|(path, bits)| {
                        child
                            .position(path)
                            .and_then(|i| child.entries[i].content.as_ref())
                            .and_then(|c| crate::ranges::chunks_listed(&c.chunks, bits))
                            .unwrap_or_default()
                    })
                    .collect();
                framed.send(&Message::ChunkLists(lists))?;
                framed.flush()?;
            }
            Message::Apply(op) => {
                receiver(&mut recv, &scanned)?;
                let Some(r) = recv.as_mut() else {
                    return Err(unexpected(&Message::Apply(op)));
                };
                let res = match &op {
                    Op::Write(e) => {
                        let mut data = |h: &Hash, len: u32| -> Result<Incoming, SyncError> {
                            match inbox.next()? {
                                Inbound::Data { hash, bytes, ok } if hash == *h => {
                                    if !ok || bytes.len() != len as usize {
                                        return Err(SyncError::BadData(e.path.clone()));
                                    }
                                    Ok(Incoming::Bytes(bytes))
                                }
                                Inbound::Msg(Message::Delta {
                                    hash,
                                    block,
                                    ops,
                                    literals,
                                }) if hash == *h => Ok(Incoming::Delta {
                                    base: None,
                                    block,
                                    ops,
                                    literals: decompress(&literals, len as usize)?,
                                }),
                                Inbound::Msg(Message::RangeDelta {
                                    hash,
                                    base,
                                    block,
                                    ops,
                                    literals,
                                }) if hash == *h => Ok(Incoming::Delta {
                                    base: Some(base),
                                    block,
                                    ops,
                                    literals: decompress(&literals, len as usize)?,
                                }),
                                Inbound::Data { hash, .. } => {
                                    Err(SyncError::Proto(data_out_of_place(&hash)))
                                }
                                Inbound::Msg(m) => Err(unexpected(&m)),
                            }
                        };
                        r.report.ops += 1;
                        r.write(e, &mut data)
                    }
                    op => r.apply(op),
                };
                match res {
                    Ok(()) => {}
                    // Stream-level failures end the conversation.
                    Err(e @ (SyncError::Proto(_) | SyncError::BadData(_))) => return Err(e),
                    Err(e) => {
                        tracing::warn!(path = op.path(), error = %e, "sync step failed");
                        r.report.failed.push((op.path().to_string(), e.to_string()));
                    }
                }
            }
            Message::SigRequest(paths) => {
                let t0 = std::time::Instant::now();
                receiver(&mut recv, &scanned)?;
                tracing::debug!(ms = ms(t0), "serve: receiver ready");
                let Some(r) = recv.as_mut() else {
                    return Err(unexpected(&Message::SigRequest(paths)));
                };
                let sigs = r.signatures(&paths);
                framed.send(&Message::Sigs(sigs))?;
                framed.flush()?;
                tracing::debug!(ms = ms(t0), files = paths.len(), "serve: signatures sent");
            }
            Message::RangeSigRequest(asks) => {
                receiver(&mut recv, &scanned)?;
                let Some(r) = recv.as_mut() else {
                    return Err(unexpected(&Message::RangeSigRequest(asks)));
                };
                let sigs = r.range_signatures(&asks);
                framed.send(&Message::Sigs(sigs))?;
                framed.flush()?;
            }
            Message::Finish => {
                // A run with no step and no signature request built no receiver and needs
                // none: nothing was written, so there is nothing to make durable or to add
                // to the cache, and the report is empty. Only a backup run must still
                // record its (empty) journal.
                if options.backup.is_some() {
                    receiver(&mut recv, &scanned)?;
                }
                let t0 = std::time::Instant::now();
                let report = match recv.as_mut() {
                    Some(r) => {
                        r.finish()?;
                        r.report.clone()
                    }
                    None => Report::default(),
                };
                tracing::debug!(ms = ms(t0), "serve: finished (durable)");
                // Every change is durable: the master may report success now. The hash
                // cache (a speed-up, never trusted beyond its keys) is updated after the
                // report has left, while the master finishes: rewriting 50,000 entries is
                // no longer on the run's path. Its lock is taken first (if free at once), so
                // that a next run started on this report waits for the update instead of
                // hashing this run's files again.
                let update = match (recv.as_ref(), &opts.cache) {
                    (Some(r), Some(c)) if !r.written.is_empty() => Some((
                        c,
                        crate::scan::CacheLock::update(c, std::time::Duration::ZERO),
                    )),
                    _ => None,
                };
                framed.send(&Message::Report(report))?;
                framed.flush()?;
                if let (Some(r), Some((c, lock))) = (recv.as_ref(), update) {
                    crate::scan::cache_add(c, root, &r.written, lock)?;
                    tracing::debug!(ms = ms(t0), files = r.written.len(), "serve: cache saved");
                }
            }
            Message::Bye => return Ok(()),
            m => return Err(unexpected(&m)),
        }
    }
}

/// Options of the master end.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// Planner options (delete, ids).
    pub plan: PlanOptions,
    /// Only compute and return the plan.
    pub dry_run: bool,
    /// Run options sent to the receiver.
    pub run: RunOptions,
    /// The master's hash cache.
    pub cache: Option<PathBuf>,
    /// Whether file data is compressed (see [`crate::compression`]).
    pub compress: Compress,
}

/// What a push did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PushResult {
    /// The plan (its `items` are the change list).
    pub plan: Plan,
    /// The receiver's report (empty on a dry run).
    pub report: Report,
    /// Master scan figures.
    pub master_scan: ScanStats,
    /// Bytes sent on the stream.
    pub bytes_out: u64,
    /// Bytes received on the stream.
    pub bytes_in: u64,
    /// How file data was encoded, and why.
    pub compression: CompressionReport,
}

/// Progress callback events.
#[derive(Debug, Clone)]
pub enum Progress {
    /// The plan is known: steps and bytes to send at most.
    Planned {
        /// Steps.
        ops: u64,
        /// Bytes of file content in the plan.
        bytes: u64,
    },
    /// One step sent, or a part of a large file's (the parts' bytes add up to its size).
    Step {
        /// Its path.
        path: String,
        /// Content bytes it covers.
        bytes: u64,
    },
}

/// Sends entries in `Entries` batches, then `EntriesEnd`; a large file's with at least
/// [`crate::ranges::CHUNK_DIGESTS_MIN`] chunks as `ListedChunks` (its chunk list as
/// chunk-range digests keyed with `key`: the master asks for the ranges it has no copy of).
fn send_entries<W: Write>(
    framed: &mut Framed<std::io::Empty, W>,
    entries: &[Entry],
    key: &[u8; 32],
) -> Result<(), SyncError> {
    let large = |e: &Entry| {
        e.content
            .as_ref()
            .is_some_and(|c| c.chunks.len() >= crate::ranges::CHUNK_DIGESTS_MIN)
    };
    let mut batch = Vec::new();
    for e in entries {
        if large(e) {
            let c = e.content.as_ref().map_or(&[][..], |c| &c.chunks[..]);
            let ranges = crate::ranges::chunk_digests(key, c);
            let mut entry = e.clone();
            if let Some(c) = entry.content.as_mut() {
                c.chunks = Vec::new();
            }
            framed.send(&Message::ListedChunks { entry, ranges })?;
            continue;
        }
        batch.push(e.clone());
        if batch.len() == BATCH {
            framed.send(&Message::Entries(std::mem::take(&mut batch)))?;
        }
    }
    if !batch.is_empty() {
        framed.send(&Message::Entries(batch))?;
    }
    framed.send(&Message::EntriesEnd)?;
    framed.flush()?;
    Ok(())
}

/// What the child listed of its large files' chunk lists: per path, its chunk-range
/// digests (see [`resolve_chunk_lists`]).
type ChunkDigests = Vec<(String, Vec<(u32, crate::ranges::Digest)>)>;

/// The child's first answer after its scan.
enum ChildAnswer {
    /// Its whole manifest (at most [`WHOLE_MAX`] entries), sorted, and the chunk-range
    /// digests of its large files (whose entries came without chunks).
    Whole(Manifest, ChunkDigests),
    /// The digests of its ranges (see [`fetch_child`]).
    Digests(Vec<crate::ranges::Digest>),
}

/// Reads the child's first answer after its scan: its range digests (`RangeDigests`…
/// `RangesEnd`, at most [`crate::ranges::MAX_RANGES`]), or its whole manifest (`Entries`…
/// `EntriesEnd`, at most [`WHOLE_MAX`] entries, each path once).
fn child_answer<R: Read, W: Write>(framed: &mut Framed<R, W>) -> Result<ChildAnswer, SyncError> {
    let mut entries: Vec<Entry> = Vec::new();
    let mut pending: ChunkDigests = Vec::new();
    // `Some` once the answer is digests (the first frame says which).
    let mut digests: Option<Vec<crate::ranges::Digest>> = None;
    let mut first = true;
    loop {
        let m = framed.recv()?;
        let was_first = std::mem::replace(&mut first, false);
        match m {
            Message::RangeDigests(d) if was_first || digests.is_some() => {
                let ds = digests.get_or_insert_with(Vec::new);
                if ds.len() + d.len() > crate::ranges::MAX_RANGES {
                    return Err(bad_answer(crate::ranges::RangeError::Bounds(format!(
                        "more than {} range digests",
                        crate::ranges::MAX_RANGES
                    ))));
                }
                ds.extend(d);
            }
            Message::RangesEnd if was_first || digests.is_some() => {
                return Ok(ChildAnswer::Digests(digests.unwrap_or_default()));
            }
            Message::Entries(es) if digests.is_none() => {
                if entries.len() + es.len() > WHOLE_MAX {
                    return Err(bad_answer(crate::ranges::RangeError::TooMany(WHOLE_MAX)));
                }
                entries.extend(es);
            }
            Message::ListedChunks { entry, ranges } if digests.is_none() => {
                if entries.len() >= WHOLE_MAX {
                    return Err(bad_answer(crate::ranges::RangeError::TooMany(WHOLE_MAX)));
                }
                pending.push((entry.path.clone(), ranges));
                entries.push(entry);
            }
            Message::EntriesEnd if digests.is_none() => break,
            Message::Error(e) => return Err(SyncError::Remote(e)),
            m => return Err(unexpected(&m)),
        }
    }
    let mut m = Manifest { entries };
    m.sort();
    if let Some(w) = m.entries.windows(2).find(|w| w[0].path == w[1].path) {
        return Err(bad_answer(crate::ranges::RangeError::Inconsistent(
            w[0].path.clone(),
        )));
    }
    Ok(ChildAnswer::Whole(m, pending))
}

/// Reads the answer to an early signature request of `n` paths.
fn recv_early_sigs<R: Read, W: Write>(
    framed: &mut Framed<R, W>,
    n: usize,
) -> Result<Vec<Signature>, SyncError> {
    match framed.recv()? {
        Message::Sigs(s) if s.len() == n => Ok(s),
        Message::Error(e) => Err(SyncError::Remote(e)),
        m => Err(unexpected(&m)),
    }
}

/// Fills in the chunk lists of the child's large files, which came as chunk-range digests
/// (`ListedChunks`, `pending`) with their entries in `entries`: the ranges of which the
/// master's file of the same path has a copy are taken from its own list, the others asked
/// for (`WantedChunks`, one round trip) and listed by the child (`ChunkLists`). An edit of a
/// 1 GiB image so costs a few kilobytes of the child's answer instead of its whole chunk
/// list (half a megabyte); a file the master has no copy of at that path (a renamed image)
/// is listed whole, as before. An answer that does not rebuild a list adding up to its
/// file's size is refused.
fn resolve_chunk_lists<R: Read, W: Write>(
    framed: &mut Framed<R, W>,
    key: &[u8; 32],
    master: &Manifest,
    entries: &mut [Entry],
    pending: ChunkDigests,
    early: &mut EarlySigs,
) -> Result<(), SyncError> {
    let ours_of = |path: &str| {
        master
            .position(path)
            .and_then(|i| master.entries[i].content.as_ref())
            .map_or(&[][..], |c| &c.chunks[..])
    };
    let asks: Vec<(String, Vec<u8>)> = pending
        .iter()
        .map(|(path, theirs)| {
            (
                path.clone(),
                crate::ranges::chunks_wanted(key, ours_of(path), theirs),
            )
        })
        .filter(|(_, bits)| bits.iter().any(|b| *b != 0))
        .collect();
    let mut lists: std::collections::HashMap<String, Vec<crate::manifest::Chunk>> =
        Default::default();
    if !asks.is_empty() {
        framed.send(&Message::WantedChunks(asks.clone()))?;
        framed.flush()?;
        // An early signature request went before: its answer comes first.
        if !early.asked.is_empty() && early.received.is_none() {
            early.received = Some(recv_early_sigs(framed, early.asked.len())?);
        }
        match framed.recv()? {
            Message::ChunkLists(l) if l.len() == asks.len() => {
                lists.extend(asks.into_iter().map(|(p, _)| p).zip(l));
            }
            Message::Error(e) => return Err(SyncError::Remote(e)),
            m => return Err(unexpected(&m)),
        }
    }
    // Where the pending entries are (one pass, no copy of the listing's paths).
    let wanted: HashSet<&str> = pending.iter().map(|(p, _)| p.as_str()).collect();
    let at: std::collections::HashMap<String, usize> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| wanted.contains(e.path.as_str()))
        .map(|(i, e)| (e.path.clone(), i))
        .collect();
    for (path, theirs) in pending {
        let listed = lists.remove(&path).unwrap_or_default();
        let rebuilt = crate::ranges::rebuild_chunks(key, ours_of(&path), &theirs, &listed);
        let e = at.get(&path).map(|&i| &mut entries[i]);
        let (Some(chunks), Some(c)) = (rebuilt, e.and_then(|e| e.content.as_mut())) else {
            return Err(bad_answer(crate::ranges::RangeError::Inconsistent(path)));
        };
        if chunks.iter().map(|c| u64::from(c.len)).sum::<u64>() != c.size {
            return Err(bad_answer(crate::ranges::RangeError::Inconsistent(path)));
        }
        c.chunks = chunks;
    }
    Ok(())
}

/// Digests sent in one `RangeDigests` frame.
const DIGEST_BATCH: usize = 1 << 20;

/// A random key for one run's range digests.
fn digest_key() -> Result<[u8; 32], SyncError> {
    let mut key = [0u8; 32];
    let mut f =
        fs_err::File::open("/dev/urandom").map_err(|e| SyncError::fs("open", "/dev/urandom", e))?;
    f.read_exact(&mut key)
        .map_err(|e| SyncError::fs("read", "/dev/urandom", e))?;
    Ok(key)
}

/// The child's manifest from its range digests (made with this run's `k`) and the master's
/// own (`ours`, of `master`, sorted): `None` when it is the master's (it holds every range and
/// has no other: a no-change run, which asks nothing more and saves copying 50,000 entries).
/// Otherwise the child's entries of the ranges that match none of the master's are asked for
/// (`Wanted`, at most [`crate::ranges::MAX_LISTED`] entries come back) and the manifest is
/// rebuilt from them and the master's entries of the ranges the child holds; an answer that
/// does not fit the master's ranges is refused.
///
/// With the request for the child's ranges goes an early signature request (see
/// [`EarlySigs`]) for the files of `changed` (the master's files that changed since its last
/// scan) that may travel as deltas and lie in ranges the child does not hold as they are:
/// the child computes their signatures while the master receives its listing and plans,
/// instead of after (a round trip, the child's index of its files and the reading of those
/// files: 80 ms of a 600 ms run with 500 files edited). Returns the paths asked for, whose
/// answer is the next message.
fn fetch_child<R: Read, W: Write>(
    framed: &mut Framed<R, W>,
    master: &Manifest,
    k: u32,
    ours: &[crate::ranges::Digest],
    theirs: &[crate::ranges::Digest],
    changed: &[String],
) -> Result<(Option<Listing>, Vec<String>, ChunkDigests), SyncError> {
    let t0 = std::time::Instant::now();
    let mut pending: ChunkDigests = Vec::new();
    let (held, wanted) = crate::ranges::matching(ours, theirs);
    let none_wanted = wanted.iter().all(|b| *b == 0);
    let same = none_wanted
        && crate::ranges::all_held(&held, ours.len())
        && master
            .entries
            .windows(2)
            .all(|w| crate::manifest::path_order(&w[0].path, &w[1].path).is_lt());
    if same {
        return Ok((None, Vec::new(), pending));
    }
    let mut listed = Vec::new();
    let mut asked = Vec::new();
    if !none_wanted {
        framed.send(&Message::Wanted(wanted))?;
        if !changed.is_empty() {
            let starts = crate::ranges::cut(&master.entries, k);
            asked = changed
                .iter()
                .filter(|p| {
                    let Ok(i) = master
                        .entries
                        .binary_search_by(|e| crate::manifest::path_order(&e.path, p))
                    else {
                        return false;
                    };
                    let r = starts.partition_point(|&s| s <= i).saturating_sub(1);
                    let not_held = held.get(r / 8).is_none_or(|b| b & (1 << (r % 8)) == 0);
                    not_held && master.entries[i].content.as_ref().is_some_and(delta_sized)
                })
                .cloned()
                .collect();
            if !asked.is_empty() {
                framed.send(&Message::SigRequest(asked.clone()))?;
            }
        }
        framed.flush()?;
        loop {
            match framed.recv()? {
                Message::Entries(es) => {
                    if listed.len() + es.len() > crate::ranges::MAX_LISTED {
                        return Err(bad_answer(crate::ranges::RangeError::TooMany(
                            crate::ranges::MAX_LISTED,
                        )));
                    }
                    listed.extend(es);
                }
                Message::ListedChunks { entry, ranges } => {
                    if listed.len() >= crate::ranges::MAX_LISTED {
                        return Err(bad_answer(crate::ranges::RangeError::TooMany(
                            crate::ranges::MAX_LISTED,
                        )));
                    }
                    pending.push((entry.path.clone(), ranges));
                    listed.push(entry);
                }
                Message::EntriesEnd => break,
                Message::Error(e) => return Err(SyncError::Remote(e)),
                m => return Err(unexpected(&m)),
            }
        }
        tracing::debug!(
            ms = ms(t0),
            listed = listed.len(),
            "push: child's ranges listed"
        );
    }
    // (Checked and put together by `ranges::rebuild_refs`.)
    Ok((Some((held, listed)), asked, pending))
}

/// The hashes of every chunk the child holds (its files' single chunks and large files'
/// chunks): the master sends no data for those.
fn chunks_held(child: &[&Entry]) -> HashSet<Hash> {
    let mut have = HashSet::with_capacity(child.len());
    for e in child {
        if let (crate::manifest::Kind::File, Some(c)) = (&e.kind, &e.content) {
            have.extend(c.chunk_iter().map(|(_, ch)| ch.hash));
        }
    }
    have
}

/// What the child answered to a range request: the bitmap of the ranges it holds (as the
/// master's) and the entries of the others.
type Listing = (Vec<u8>, Vec<Entry>);

/// A signature request sent before the plan (see [`fetch_child`]) whose answer is still to
/// be read: [`fetch_signatures`] reads it first, and asks only for what it did not cover.
#[derive(Default)]
struct EarlySigs {
    asked: Vec<String>,
    /// Their answer when it had to be read before the plan (it came before the chunk lists
    /// asked for after the listing, see [`resolve_chunk_lists`]).
    received: Option<Vec<Signature>>,
}

/// Whether a file of this content may travel as a delta against the child's old copy (one
/// chunk, neither too small to gain nor too large for a signature).
fn delta_sized(c: &crate::manifest::Content) -> bool {
    c.chunks.is_empty() && c.size >= DELTA_MIN && c.size <= crate::manifest::CHUNK_THRESHOLD
}

/// Milliseconds since `t0` (phase timings in debug logs).
fn ms(t0: std::time::Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1e3
}

fn bad_answer(e: crate::ranges::RangeError) -> SyncError {
    SyncError::Proto(ProtoError::Decode(format!("child's manifest: {e}")))
}

/// Says hello.
pub fn hello<R: Read, W: Write>(
    framed: &mut Framed<R, W>,
    run: &RunOptions,
) -> Result<(), SyncError> {
    greet(framed, run, None)
}

/// Says hello and asks the child to scan (and to digest its ranges with `key` and `k`)
/// without waiting for its answer in between (one round trip instead of two), then waits for
/// the child's hello.
fn hello_and_scan<R: Read, W: Write>(
    framed: &mut Framed<R, W>,
    run: &RunOptions,
    key: [u8; 32],
    k: u32,
) -> Result<(), SyncError> {
    greet(framed, run, Some(Message::Scan { key, k }))
}

/// Sends Hello (and `scan` right behind it), then checks the child's Hello.
fn greet<R: Read, W: Write>(
    framed: &mut Framed<R, W>,
    run: &RunOptions,
    scan: Option<Message>,
) -> Result<(), SyncError> {
    framed.send(&Message::Hello {
        version: VERSION,
        options: run.clone(),
    })?;
    if let Some(scan) = scan {
        framed.send(&scan)?;
    }
    framed.flush()?;
    match framed.recv()? {
        Message::Hello { version, .. } if version == VERSION => Ok(()),
        Message::Hello { version, .. } => Err(ProtoError::Version(version, VERSION).into()),
        Message::Error(e) => Err(SyncError::Remote(e)),
        m => Err(unexpected(&m)),
    }
}

/// Runs the master end: scans `src`, fetches the child's manifest, plans, sends the steps.
pub fn push<R: Read, W: Write>(
    src: &Path,
    framed: &mut Framed<R, W>,
    filter: &dyn PathFilter,
    opts: &PushOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<PushResult, SyncError> {
    let t0 = std::time::Instant::now();
    let mut skip = Vec::new();
    if let Some((d, _)) = &opts.run.backup {
        skip.push(d.clone());
    }
    let scan_opts = ScanOptions {
        cache: opts.cache.clone(),
        skip,
        clean_temps: false,
    };
    // The master's scan runs while the transport starts (ssh: connection, authentication,
    // the remote process) and while the child scans: `Hello` and `Scan` leave together. A
    // child whose manifest is small sends it whole as soon as it has scanned; from then on
    // the master's scan leaves unread every small file the child does not have (unless this
    // is a dry run, which lists every hash): those are read once, as they are sent. (A large
    // file is hashed by the scan whatever the child holds: its chunk list leads its data.)
    let child_paths: std::sync::OnceLock<HashSet<String>> = std::sync::OnceLock::new();
    // Set when the child failed (a remote end that did not start, a refused root): the
    // files not yet hashed stay unread, so the error comes now, not after a full read of
    // the tree.
    let child_failed = std::sync::atomic::AtomicBool::new(false);
    let key = digest_key()?;
    let k = crate::ranges::RANGE_K;
    let (answer, scanned) = std::thread::scope(|s| {
        let scanner = s.spawn(|| {
            let walked = walk(src, &scan_opts)?;
            // The cache (rewritten when some files changed) is saved while the run goes on.
            let crate::scan::Scanned {
                manifest: mut master,
                stats,
                deferred,
                save,
                fresh,
            } = walked.hash_in_background(
                &|p: &str| {
                    child_failed.load(std::sync::atomic::Ordering::Relaxed)
                        || (!opts.dry_run && child_paths.get().is_some_and(|c| !c.contains(p)))
                },
                true,
            )?;
            // The files that changed since the master's last scan, as candidates for an
            // early signature request (a few at most: not after a first scan).
            let changed: Vec<String> = if fresh.len() <= SIG_BATCH && !opts.dry_run {
                fresh
                    .iter()
                    .map(|&i| master.entries[i].path.clone())
                    .collect()
            } else {
                Vec::new()
            };
            master.sort();
            tracing::debug!(ms = ms(t0), "push: master scanned");
            // The master's range digests, while the child still scans (unless the child's
            // whole manifest has come: then none are needed).
            let digests = child_paths
                .get()
                .is_none()
                .then(|| crate::ranges::digests(&key, &master.entries, k));
            tracing::debug!(ms = ms(t0), "push: master digested");
            Ok::<_, SyncError>(MasterScan {
                master,
                stats,
                deferred,
                digests,
                save,
                changed,
            })
        });
        let answer = hello_and_scan(framed, &opts.run, key, k).and_then(|()| {
            tracing::debug!(ms = ms(t0), "push: child's hello");
            child_answer(framed)
        });
        tracing::debug!(ms = ms(t0), "push: child answered");
        if answer.is_err() {
            child_failed.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if let Ok(ChildAnswer::Whole(m, _)) = &answer {
            let _ = child_paths.set(m.entries.iter().map(|e| e.path.clone()).collect());
        }
        let scanned = scanner
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        (answer, scanned)
    });
    let answer = answer?;
    let MasterScan {
        master,
        stats: master_scan,
        deferred,
        digests,
        save: cache_save,
        changed,
    } = scanned?;
    let mut early = EarlySigs::default();
    // The child's manifest: sent whole (a small one), or rebuilt from the master's entries
    // for the ranges the child holds and the entries it listed, or (nothing differs) the
    // master's own; as references, nothing copied.
    let mut whole = None;
    let mut fetched = None;
    let pending = match answer {
        ChildAnswer::Whole(m, pending) => {
            whole = Some(m);
            pending
        }
        ChildAnswer::Digests(theirs) => {
            let ours = match digests {
                Some(d) => d,
                None => crate::ranges::digests(&key, &master.entries, k),
            };
            let (f, asked, pending) = fetch_child(framed, &master, k, &ours, &theirs, &changed)?;
            early.asked = asked;
            fetched = f;
            pending
        }
    };
    if !pending.is_empty() {
        let entries: &mut [Entry] = match (&mut whole, &mut fetched) {
            (Some(m), _) => &mut m.entries,
            (None, Some((_, listed))) => listed,
            _ => &mut [],
        };
        resolve_chunk_lists(framed, &key, &master, entries, pending, &mut early)?;
    }
    let same = whole.is_none() && fetched.is_none();
    let child: Vec<&crate::manifest::Entry> = match (&whole, &fetched) {
        (Some(m), _) => m.entries.iter().collect(),
        (None, Some((held, listed))) => {
            crate::ranges::rebuild_refs(&master.entries, k, held, listed).map_err(bad_answer)?
        }
        (None, None) => master.entries.iter().collect(),
    };
    tracing::debug!(ms = ms(t0), "push: child manifest");
    // The chunks the child holds are gathered on a thread of their own while the plan is
    // made (needed once something is written; a no-change run has nothing to gather).
    let (mut p, have) = if same {
        (plan(&master, &master, filter, &opts.plan), None)
    } else {
        std::thread::scope(|s| {
            let have = (!opts.dry_run).then(|| s.spawn(|| chunks_held(&child)));
            let p = plan_over(&master, &child, filter, &opts.plan);
            (p, have.and_then(|h| h.join().ok()))
        })
    };
    tracing::debug!(ms = ms(t0), ops = p.ops.len(), "push: planned");
    let mut result = PushResult {
        master_scan,
        ..PushResult::default()
    };
    if opts.dry_run {
        framed.send(&Message::Bye)?;
        framed.flush()?;
        result.plan = p;
        result.bytes_in = framed.bytes_in;
        result.bytes_out = framed.bytes_out;
        return Ok(result);
    }
    let deferred: std::collections::HashMap<&str, &Deferred> =
        deferred.iter().map(|d| (d.path.as_str(), d)).collect();
    // The chunks the child holds (only needed when something is written).
    let writes = p.ops.iter().any(|o| matches!(o, Op::Write(_)));
    let have = match have {
        Some(h) if writes => h,
        _ if writes => chunks_held(&child),
        _ => HashSet::new(),
    };
    let sigs = fetch_signatures(framed, &p, &child, &have, early)?;
    // The child's old copies of the large files written (chunk-list edits, range deltas).
    let olds = old_chunked(&p, &child);
    let range_sigs = fetch_range_signatures(framed, &p, &olds, &have)?;
    tracing::debug!(
        ms = ms(t0),
        sigs = sigs.len(),
        ranges = range_sigs.values().map(Vec::len).sum::<usize>(),
        "push: signatures received"
    );
    let size_of = |op: &Op| match op {
        Op::Write(e) => deferred
            .get(e.path.as_str())
            .map_or_else(|| e.size(), |d| d.key.size()),
        _ => 0,
    };
    let planned: u64 = p.ops.iter().map(size_of).sum();
    progress(Progress::Planned {
        ops: p.ops.len() as u64,
        bytes: planned,
    });
    // Reader threads read, hash, check and compress the data of the next steps, a large
    // file's a window at a time ([`Part`]), several reads in flight on a cold disk, while
    // this thread writes their frames in plan order: the disk, the CPU and the stream work
    // at the same time, and what is in memory is bounded by the pipeline, not by a file's
    // size. Whether they compress is the chooser's call, fed the time of each part as it
    // leaves.
    let mut chooser = Chooser::new(opts.compress, planned);
    let raw = std::sync::atomic::AtomicBool::new(chooser.mode() == Mode::Raw);
    let mut hashed: Vec<(usize, Content, bool)> = Vec::new();
    let ops = &p.ops;
    let parts = parts(ops, &have);
    let (have, sigs, deferred_ref, raw_ref, parts_ref) = (&have, &sigs, &deferred, &raw, &parts);
    let range_sigs = &range_sigs;
    let olds = &olds;
    ordered_pipeline(
        parts.len(),
        |k| {
            let mode = if raw_ref.load(std::sync::atomic::Ordering::Relaxed) {
                Mode::Raw
            } else {
                Mode::Zstd
            };
            let (i, part) = &parts_ref[k];
            prepare_part(
                src,
                &ops[*i],
                part,
                have,
                sigs.get(ops[*i].path()),
                range_sigs
                    .get(ops[*i].path())
                    .map_or(&[][..], Vec::as_slice),
                olds.get(ops[*i].path()).map(|c| c.chunks.as_slice()),
                deferred_ref,
                mode,
            )
        },
        |k, prepared| {
            let (i, part) = &parts_ref[k];
            let i = *i;
            let prepared = prepared?;
            for f in &prepared.frames {
                match f {
                    Message::Data { hash, payload } => framed.send_data(hash, payload)?,
                    f => framed.send(f)?,
                }
            }
            chooser.on_sent(std::time::Instant::now(), prepared.mode, prepared.data);
            raw.store(
                chooser.mode() == Mode::Raw,
                std::sync::atomic::Ordering::Relaxed,
            );
            if let Some((c, cacheable)) = prepared.hashed {
                hashed.push((i, c, cacheable));
            }
            if *part != Part::Head {
                progress(Progress::Step {
                    path: ops[i].path().to_string(),
                    bytes: part_bytes(&ops[i], part, size_of(&ops[i])),
                });
            }
            Ok(())
        },
    )?;
    framed.send(&Message::Finish)?;
    framed.flush()?;
    tracing::debug!(ms = ms(t0), "push: steps sent");
    // While the receiver makes its last batch durable and saves its cache (a few tenths of
    // a second after a large copy), the master does its own bookkeeping before it waits for
    // the report: the plan as carried out (the contents of the files read as they were
    // sent) and those files in the master's hash cache (the next scan does not read them
    // again). The cache holds the master's own files, so it is right whatever the child
    // answers.
    let mut keep = Vec::new();
    let mut hex: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for (i, c, cacheable) in hashed {
        if let Op::Write(e) = &mut p.ops[i] {
            hex.insert(e.path.clone(), c.hash.to_hex());
            if cacheable && let Some(d) = deferred.get(e.path.as_str()) {
                keep.push(((*d).clone(), c.clone()));
            }
            e.content = Some(c);
        }
    }
    for it in &mut p.items {
        let path = it.path.as_str();
        if let Some(n) = &mut it.new
            && n.hash.is_none()
            && let Some(h) = hex.get(path)
        {
            n.hash = Some(h.clone());
        }
    }
    // The scan's own save of the cache comes first (this adds to what it saved).
    cache_save.wait();
    if let Some(c) = &opts.cache {
        crate::scan::cache_add_keyed(c, keep);
    }
    let report = match framed.recv()? {
        Message::Report(r) => {
            tracing::debug!(ms = ms(t0), "push: report received");
            r
        }
        Message::Error(e) => return Err(SyncError::Remote(e)),
        m => return Err(unexpected(&m)),
    };
    tracing::debug!(compression = %chooser.report(), "file data encoding");
    result.plan = p;
    result.report = report;
    result.bytes_in = framed.bytes_in;
    result.bytes_out = framed.bytes_out;
    result.compression = chooser.report().clone();
    // Freeing the master's manifest (50,000 entries of a few allocations each: ~10 ms) is
    // not the run's work: a thread does it while the caller reports (inline if none starts).
    drop(child);
    let _ = std::thread::Builder::new()
        .name("corral-free".into())
        .spawn(move || drop(master));
    Ok(result)
}

/// The master's scan in [`push`], done while the transport starts and the child scans.
struct MasterScan {
    /// Sorted.
    master: Manifest,
    stats: crate::scan::ScanStats,
    /// The files left unread: read once, as they are sent.
    deferred: Vec<Deferred>,
    /// The master's range digests (`None`: the child's whole manifest came first).
    digests: Option<Vec<crate::ranges::Digest>>,
    /// The hash cache's save.
    save: crate::scan::CacheSave,
    /// The files that changed since the master's last scan (a few at most), for an early
    /// signature request.
    changed: Vec<String>,
}

/// What the reader threads prepared for one step.
struct Prepared {
    /// Its frames: `Apply`, then its data.
    frames: Vec<Message>,
    /// The content of a file the scan deferred, read as it was sent, and whether the file
    /// kept the metadata it was walked with while it was read (so its hash may be cached).
    hashed: Option<(Content, bool)>,
    /// The encoding its data was prepared in.
    mode: Mode,
    /// Bytes of file data its `Data` and `Delta` frames carry (before encoding).
    data: u64,
}

/// The frames of one step. A write of a file the scan deferred (a small one) reads it once,
/// hashing it as it is sent; one that grew past [`crate::manifest::CHUNK_THRESHOLD`] since
/// the scan is chunked, then its chunks read again.
fn prepare(
    src: &Path,
    op: &Op,
    have: &HashSet<Hash>,
    sig: Option<&Signature>,
    deferred: &std::collections::HashMap<&str, &Deferred>,
    mode: Mode,
) -> Result<Prepared, SyncError> {
    let Op::Write(e) = op else {
        return Ok(Prepared {
            frames: vec![Message::Apply(op.clone())],
            hashed: None,
            mode,
            data: 0,
        });
    };
    let d = deferred
        .get(e.path.as_str())
        .filter(|_| e.content.is_none());
    let Some(d) = d else {
        let mut frames = vec![Message::Apply(op.clone())];
        let data = data_frames(src, e, have, sig, mode, &mut frames)?;
        return Ok(Prepared {
            frames,
            hashed: None,
            mode,
            data,
        });
    };
    let path = src.join(&e.path);
    let mut f = fs_err::File::open(&path).map_err(|x| SyncError::fs("open", &path, x))?;
    let key = |f: &fs_err::File| f.metadata().ok().map(|m| crate::scan::CacheKey::of(&m));
    let before = key(&f);
    let small = before.is_some_and(|k| k.size() <= crate::manifest::CHUNK_THRESHOLD);
    // Read after a byte reserved for the payload's tag (see data_frames).
    let mut buf = Vec::new();
    if small {
        // The size it was opened with, and one byte more to see whether it grew.
        let size = before.map_or(0, |k| k.size()) as usize;
        buf.reserve_exact(1 + size + 1);
        buf.push(0);
        crate::direct::read_at_into(f.file(), &mut buf, 0, size + 1)
            .map_err(|x| SyncError::fs("read", &path, x))?;
        if buf.len() == 1 + size + 1 {
            // It grew while read: the rest, up to the chunking threshold (past it, the
            // large-file path below reads it again).
            f.seek(SeekFrom::Start(size as u64 + 1))
                .map_err(|x| SyncError::fs("seek", &path, x))?;
            (&mut f)
                .take(crate::manifest::CHUNK_THRESHOLD - size as u64)
                .read_to_end(&mut buf)
                .map_err(|x| SyncError::fs("read", &path, x))?;
        }
    }
    let mut e = e.clone();
    let content = if small && buf.len() as u64 <= 1 + crate::manifest::CHUNK_THRESHOLD {
        crate::manifest::Content {
            size: buf.len() as u64 - 1,
            hash: Hash::of(&buf[1..]),
            chunks: Vec::new(),
            sparse: d.sparse,
        }
    } else {
        // Large (or grew past the chunking threshold while read): chunked as the scan does.
        buf = Vec::new();
        hash_file(&path, d.sparse)?
    };
    let cacheable = before == Some(d.key) && key(&f) == Some(d.key);
    e.content = Some(content.clone());
    let mut frames = Vec::new();
    let mut data = 0;
    if buf.len() > 1 {
        if !have.contains(&content.hash) {
            data = buf.len() as u64 - 1;
            frames.push(Message::Data {
                hash: content.hash,
                payload: encode_read(buf, mode),
            });
        }
        frames.insert(0, Message::Apply(Op::Write(e)));
    } else {
        frames.push(Message::Apply(Op::Write(e.clone())));
        data = data_frames(src, &e, have, None, mode, &mut frames)?;
    }
    Ok(Prepared {
        frames,
        hashed: Some((content, cacheable)),
        mode,
        data,
    })
}

/// Runs `work(i)` for `i` in `0..n` on [`READERS`] threads, at most [`PIPELINE`] steps ahead
/// of `consume`, which gets the results in order on the calling thread. Stops at the first
/// error of `consume` (the threads finish the step they are on), or with an error when a
/// `work` panicked.
///
/// Wake-ups are counted (a full copy runs a step per small file, 50,000 of them): a reader
/// wakes the consumer only with the step it waits for, a consumed step wakes one reader, and
/// nobody is notified when nobody waits (a `Condvar` notify is a system call even then).
fn ordered_pipeline<T: Send>(
    n: usize,
    work: impl Fn(usize) -> T + Sync,
    mut consume: impl FnMut(usize, T) -> Result<(), SyncError>,
) -> Result<(), SyncError> {
    struct State<T> {
        next: usize,
        /// The step the consumer takes next (it waits for this one only).
        consumed: usize,
        done: std::collections::BTreeMap<usize, T>,
        stop: bool,
        /// A reader thread panicked: its step never comes.
        lost: bool,
        /// Whether the consumer is waiting on `ready`.
        consumer_waits: bool,
        /// Readers waiting on `room`.
        readers_wait: usize,
    }
    let state = std::sync::Mutex::new(State {
        next: 0,
        consumed: 0,
        done: std::collections::BTreeMap::new(),
        stop: false,
        lost: false,
        consumer_waits: false,
        readers_wait: 0,
    });
    let ready = std::sync::Condvar::new();
    let room = std::sync::Condvar::new();
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    std::thread::scope(|s| {
        for _ in 0..READERS.min(n) {
            s.spawn(|| {
                loop {
                    let i = {
                        let mut st = lock();
                        while !st.stop && st.next < n && st.next >= st.consumed + PIPELINE {
                            st.readers_wait += 1;
                            st = room.wait(st).unwrap_or_else(|p| p.into_inner());
                            st.readers_wait -= 1;
                        }
                        if st.stop || st.next >= n {
                            return;
                        }
                        st.next += 1;
                        st.next - 1
                    };
                    let t = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(i)));
                    let mut st = lock();
                    let wake = match t {
                        Ok(t) => {
                            st.done.insert(i, t);
                            i == st.consumed
                        }
                        Err(_) => {
                            st.lost = true;
                            st.stop = true;
                            true
                        }
                    };
                    let (wake_consumer, wake_readers) =
                        (wake && st.consumer_waits, st.stop && st.readers_wait > 0);
                    drop(st);
                    if wake_consumer {
                        ready.notify_one();
                    }
                    if wake_readers {
                        room.notify_all();
                    }
                }
            });
        }
        let r = (0..n).try_for_each(|i| {
            let t = {
                let mut st = lock();
                let t = loop {
                    if let Some(t) = st.done.remove(&i) {
                        break t;
                    }
                    if st.lost {
                        return Err(SyncError::Remote("data reader stopped".into()));
                    }
                    st.consumer_waits = true;
                    st = ready.wait(st).unwrap_or_else(|p| p.into_inner());
                    st.consumer_waits = false;
                };
                st.consumed = i + 1;
                let wake = st.readers_wait > 0;
                drop(st);
                if wake {
                    room.notify_one();
                }
                t
            };
            consume(i, t)
        });
        lock().stop = true;
        room.notify_all();
        r
    })
}

/// Reader threads of the master's data: enough reads in flight for a cold disk.
const READERS: usize = 8;

/// Paths asked for in one `SigRequest`.
const SIG_BATCH: usize = 1024;

/// Asks the child for the signatures of its old copies of the small files the plan rewrites
/// (one round trip per [`SIG_BATCH`] files), so that they can travel as deltas.
fn fetch_signatures<R: Read, W: Write>(
    framed: &mut Framed<R, W>,
    p: &Plan,
    child: &[&crate::manifest::Entry],
    have: &HashSet<Hash>,
    early: EarlySigs,
) -> Result<std::collections::HashMap<String, Signature>, SyncError> {
    let small = delta_sized;
    let mut out = std::collections::HashMap::new();
    // The answer to the early request comes first, whatever the plan (unless it was read
    // already).
    if !early.asked.is_empty() {
        let s = match early.received {
            Some(s) => s,
            None => recv_early_sigs(framed, early.asked.len())?,
        };
        out.extend(
            early
                .asked
                .iter()
                .cloned()
                .zip(s)
                .filter(|(_, s)| s.block > 0),
        );
    }
    let asked: HashSet<&str> = early.asked.iter().map(String::as_str).collect();
    // A plan that writes nothing asks for nothing (and needs no index of the child's files).
    if !p.ops.iter().any(|o| matches!(o, Op::Write(_))) {
        return Ok(out);
    }
    // Whether the child has an old copy of a path to make a delta against, asked for the
    // files written only: by binary search when the child's entries are in manifest order
    // (references into the master's, or a whole manifest sent sorted), else in a map.
    let sorted = child
        .windows(2)
        .all(|w| crate::manifest::path_order(&w[0].path, &w[1].path).is_lt());
    let by_path: Option<std::collections::HashMap<&str, &crate::manifest::Entry>> =
        (!sorted).then(|| child.iter().map(|e| (e.path.as_str(), *e)).collect());
    let has_old = |path: &str| {
        let e = match &by_path {
            Some(m) => m.get(path).copied(),
            None => child
                .binary_search_by(|e| crate::manifest::path_order(&e.path, path))
                .ok()
                .map(|i| child[i]),
        };
        e.is_some_and(|e| {
            e.kind == crate::manifest::Kind::File && e.content.as_ref().is_some_and(small)
        })
    };
    let paths: Vec<String> = p
        .ops
        .iter()
        .filter_map(|op| match op {
            Op::Write(e) => Some(e),
            _ => None,
        })
        .filter(|e| {
            e.content
                .as_ref()
                .is_some_and(|c| small(c) && !have.contains(&c.hash))
                && has_old(&e.path)
                && !asked.contains(e.path.as_str())
        })
        .map(|e| e.path.clone())
        .collect();
    for batch in paths.chunks(SIG_BATCH) {
        framed.send(&Message::SigRequest(batch.to_vec()))?;
        framed.flush()?;
        match framed.recv()? {
            Message::Sigs(s) if s.len() == batch.len() => {
                out.extend(batch.iter().cloned().zip(s).filter(|(_, s)| s.block > 0));
            }
            Message::Error(e) => return Err(SyncError::Remote(e)),
            m => return Err(unexpected(&m)),
        }
    }
    Ok(out)
}

/// The child's old copies of the large files the plan writes that are large files too (the
/// chunked ones), by path.
fn old_chunked<'c>(
    p: &Plan,
    child: &[&'c crate::manifest::Entry],
) -> std::collections::HashMap<String, &'c Content> {
    let mut out = std::collections::HashMap::new();
    let sorted = child
        .windows(2)
        .all(|w| crate::manifest::path_order(&w[0].path, &w[1].path).is_lt());
    let by_path: Option<std::collections::HashMap<&str, &crate::manifest::Entry>> =
        (!sorted).then(|| child.iter().map(|e| (e.path.as_str(), *e)).collect());
    for op in &p.ops {
        let Op::Write(e) = op else { continue };
        if e.content.as_ref().is_none_or(|c| c.chunks.is_empty()) {
            continue;
        }
        let old = match &by_path {
            Some(m) => m.get(e.path.as_str()).copied(),
            None => child
                .binary_search_by(|c| crate::manifest::path_order(&c.path, &e.path))
                .ok()
                .map(|i| child[i]),
        };
        if let Some(c) = old
            .filter(|o| o.kind == crate::manifest::Kind::File)
            .and_then(|o| o.content.as_ref())
            .filter(|c| !c.chunks.is_empty())
        {
            out.insert(e.path.clone(), c);
        }
    }
    out
}

/// The frame that applies `op`: for a large file's write whose old copy the child has
/// (`old`, its chunks), the chunk list as edits of the old copy's when they are far fewer
/// ([`Message::ApplyEdit`]).
fn apply_frame(op: &Op, old: Option<&[crate::manifest::Chunk]>) -> Message {
    if let (Op::Write(e), Some(old)) = (op, old)
        && let Some(c) = e.content.as_ref().filter(|c| !c.chunks.is_empty())
    {
        let edits = crate::proto::chunk_edits(&c.chunks, old);
        if edits.len() * 4 < c.chunks.len() {
            let entry = Entry {
                path: e.path.clone(),
                kind: e.kind.clone(),
                meta: e.meta.clone(),
                content: Some(Content {
                    size: c.size,
                    hash: c.hash,
                    chunks: Vec::new(),
                    sparse: c.sparse,
                }),
            };
            return Message::ApplyEdit { entry, edits };
        }
    }
    Message::Apply(op.clone())
}

/// A run of chunks of a large file the child lacks, the range of the child's old copy it
/// replaces, and that range's signature: the run's chunks go as deltas against it.
#[derive(Debug)]
struct RunSig {
    /// Indices of the run's chunks in the file's chunk list.
    chunks: std::ops::Range<usize>,
    /// Offset and length of the range of the old copy.
    base: (u64, u32),
    sig: Signature,
}

/// The runs of chunks of `new` the child lacks (none in `have`) and the range of the child's
/// old copy `old` each replaces: from where the chunk before the run ends in the old copy to
/// where the chunk after it starts there (the file's start and end at its ends); a
/// neighbour not in the old copy puts that end at the run's own offset (an edit in place).
/// A run whose range is empty, longer than [`crate::proto::MAX_BASE`], or longer than four
/// times the run and a chunk, gets none (its chunks go whole).
fn delta_runs(
    new: &Content,
    old: &Content,
    have: &HashSet<Hash>,
) -> Vec<(std::ops::Range<usize>, (u64, u32))> {
    // Where each chunk is in the old copy: every place (a disk image repeats its zero
    // chunks), the one nearest to where it is now taken.
    let mut old_at: std::collections::HashMap<Hash, Vec<u64>> = Default::default();
    for (o, c) in old.chunk_iter() {
        old_at.entry(c.hash).or_default().push(o);
    }
    let near = |c: &crate::manifest::Chunk, now: u64| {
        old_at
            .get(&c.hash)
            .and_then(|v| v.iter().copied().min_by_key(|o| o.abs_diff(now)))
    };
    let list: Vec<(u64, crate::manifest::Chunk)> = new.chunk_iter().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < list.len() {
        if have.contains(&list[i].1.hash) {
            i += 1;
            continue;
        }
        let mut j = i;
        while j < list.len() && !have.contains(&list[j].1.hash) {
            j += 1;
        }
        let (run_off, run_end) = (list[i].0, list[j - 1].0 + u64::from(list[j - 1].1.len));
        let start = match i
            .checked_sub(1)
            .map(|k| (&list[k].1, near(&list[k].1, list[k].0)))
        {
            None => 0,
            Some((c, Some(o))) => o + u64::from(c.len),
            Some((_, None)) => run_off,
        };
        let end = match list.get(j).map(|(o, c)| near(c, *o)) {
            None => old.size,
            Some(Some(o)) => o,
            Some(None) => start + (run_end - run_off),
        }
        .min(old.size);
        let run_len = run_end - run_off;
        let len = end.saturating_sub(start);
        if len > 0
            && len <= u64::from(crate::proto::MAX_BASE)
            && len <= 4 * run_len + u64::from(crate::scan::CDC_MAX)
        {
            out.push((i..j, (start, len as u32)));
        }
        i = j;
    }
    out
}

/// Asks the child for the signatures of the ranges of its old copies of the large files the
/// plan rewrites that the runs of chunks it lacks replace ([`delta_runs`]), in batches: an
/// edit of a disk image then costs about the bytes edited, not the chunks around them. A
/// file whose chunks that differ from the old copy's at the same offsets exceed
/// [`crate::apply::PULL_MAX`] is left out: the child updates such a file in place as its
/// chunks come, and a range could be overwritten before a delta reads it.
fn fetch_range_signatures<R: Read, W: Write>(
    framed: &mut Framed<R, W>,
    p: &Plan,
    olds: &std::collections::HashMap<String, &Content>,
    have: &HashSet<Hash>,
) -> Result<std::collections::HashMap<String, Vec<RunSig>>, SyncError> {
    let mut out: std::collections::HashMap<String, Vec<RunSig>> = Default::default();
    let mut asks: Vec<(String, u64, u32)> = Vec::new();
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for op in &p.ops {
        let Op::Write(e) = op else { continue };
        let Some(new) = e.content.as_ref().filter(|c| !c.chunks.is_empty()) else {
            continue;
        };
        if new.chunks.iter().all(|c| have.contains(&c.hash)) {
            continue;
        }
        let Some(old) = olds.get(e.path.as_str()) else {
            continue;
        };
        let old_at: HashSet<(u64, Hash)> = old.chunk_iter().map(|(o, c)| (o, c.hash)).collect();
        let differ: u64 = new
            .chunk_iter()
            .filter(|(o, c)| !old_at.contains(&(*o, c.hash)))
            .map(|(_, c)| u64::from(c.len))
            .sum();
        if differ > crate::apply::PULL_MAX {
            continue;
        }
        for (r, (off, len)) in delta_runs(new, old, have) {
            asks.push((e.path.clone(), off, len));
            runs.push(r);
        }
    }
    for (batch, rs) in asks.chunks(SIG_BATCH).zip(runs.chunks(SIG_BATCH)) {
        framed.send(&Message::RangeSigRequest(batch.to_vec()))?;
        framed.flush()?;
        match framed.recv()? {
            Message::Sigs(s) if s.len() == batch.len() => {
                for (((path, off, len), r), sig) in batch.iter().zip(rs).zip(s) {
                    if sig.block > 0 && sig.len == u64::from(*len) {
                        out.entry(path.clone()).or_default().push(RunSig {
                            chunks: r.clone(),
                            base: (*off, *len),
                            sig,
                        });
                    }
                }
            }
            Message::Error(e) => return Err(SyncError::Remote(e)),
            m => return Err(unexpected(&m)),
        }
    }
    Ok(out)
}

/// Parts ([`Part`]) whose frames are prepared ahead of the stream.
const PIPELINE: usize = 64;

/// Bytes of data the child lacks that one part of a large file carries (about: whole
/// chunks). Such a file is read, checked and sent a window at a time, several windows in
/// flight, not whole before its first byte leaves (which held a disk image's size in the
/// master's memory and read it on one thread).
const WINDOW: u64 = 1 << 20;

/// A piece of the master's stream, prepared by a reader thread and sent in plan order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    /// A whole step: its `Apply` and the data of a small file.
    Step,
    /// The `Apply` of a large file with chunks the child lacks; `Chunks` parts follow.
    Head,
    /// The chunks of that file with these indices (the first at byte `off`), those the
    /// child lacks as frames.
    Chunks {
        /// Indices into the file's chunk list.
        chunks: std::ops::Range<usize>,
        /// Offset of the first.
        off: u64,
    },
}

/// The parts of the plan's steps, with the index of each part's step: a step whole, or a
/// large file whose chunks the child lacks some of as its head and windows of chunks that
/// carry about [`WINDOW`] bytes of data each and cover the whole file.
fn parts(ops: &[Op], have: &HashSet<Hash>) -> Vec<(usize, Part)> {
    let mut out = Vec::with_capacity(ops.len());
    for (i, op) in ops.iter().enumerate() {
        let chunks = match op {
            Op::Write(e) => e.content.as_ref().map_or(&[][..], |c| &c.chunks[..]),
            _ => &[],
        };
        if chunks.iter().all(|c| have.contains(&c.hash)) {
            out.push((i, Part::Step));
            continue;
        }
        out.push((i, Part::Head));
        let (mut start, mut off, mut at, mut lacked) = (0, 0u64, 0u64, 0u64);
        for (j, c) in chunks.iter().enumerate() {
            if !have.contains(&c.hash) {
                lacked += u64::from(c.len);
            }
            at += u64::from(c.len);
            if lacked >= WINDOW || j + 1 == chunks.len() {
                out.push((
                    i,
                    Part::Chunks {
                        chunks: start..j + 1,
                        off,
                    },
                ));
                (start, off, lacked) = (j + 1, at, 0);
            }
        }
    }
    out
}

/// The frames of one part (see [`Part`]).
#[allow(clippy::too_many_arguments)]
fn prepare_part(
    src: &Path,
    op: &Op,
    part: &Part,
    have: &HashSet<Hash>,
    sig: Option<&Signature>,
    runs: &[RunSig],
    old: Option<&[crate::manifest::Chunk]>,
    deferred: &std::collections::HashMap<&str, &Deferred>,
    mode: Mode,
) -> Result<Prepared, SyncError> {
    let only = |frames| Prepared {
        frames,
        hashed: None,
        mode,
        data: 0,
    };
    match (part, op) {
        (Part::Step, _) => {
            let mut p = prepare(src, op, have, sig, deferred, mode)?;
            if old.is_some()
                && let Some(Message::Apply(applied)) = p.frames.first()
            {
                let f = apply_frame(applied, old);
                p.frames[0] = f;
            }
            Ok(p)
        }
        (Part::Head, _) => Ok(only(vec![apply_frame(op, old)])),
        (Part::Chunks { chunks, off }, Op::Write(e)) => {
            let list = e.content.as_ref().map_or(&[][..], |c| &c.chunks[..]);
            let Some(list) = list.get(chunks.clone()) else {
                return Ok(only(Vec::new()));
            };
            let with_offsets = list.iter().zip(chunks.clone()).scan(*off, |at, (c, i)| {
                let o = *at;
                *at += u64::from(c.len);
                Some((i, o, *c))
            });
            let mut frames = Vec::new();
            let data = chunk_frames(src, e, with_offsets, have, None, runs, mode, &mut frames)?;
            Ok(Prepared {
                frames,
                hashed: None,
                mode,
                data,
            })
        }
        (Part::Chunks { .. }, _) => Ok(only(Vec::new())),
    }
}

/// Content bytes a part covers, for progress: a step's size, a window's chunks' lengths.
fn part_bytes(op: &Op, part: &Part, step: u64) -> u64 {
    match (part, op) {
        (Part::Step, _) => step,
        (Part::Head, _) => 0,
        (Part::Chunks { chunks, .. }, Op::Write(e)) => e
            .content
            .as_ref()
            .and_then(|c| c.chunks.get(chunks.clone()))
            .map_or(0, |l| l.iter().map(|c| u64::from(c.len)).sum()),
        (Part::Chunks { .. }, _) => 0,
    }
}

/// A chunk read into `buf[1..]` as the payload of a `Data` frame in `mode`.
fn encode_read(buf: Vec<u8>, mode: Mode) -> Vec<u8> {
    match mode {
        Mode::Zstd => compress_read(buf),
        Mode::Raw => raw_read(buf),
    }
}

/// The `Data` frames of a write: one per chunk the child does not hold, read from the source
/// and checked against the manifest's hash (a file changed since the scan fails its step).
/// Returns the bytes of file data they carry.
fn data_frames(
    src: &Path,
    e: &Entry,
    have: &HashSet<Hash>,
    sig: Option<&Signature>,
    mode: Mode,
    frames: &mut Vec<Message>,
) -> Result<u64, SyncError> {
    let Some(c) = &e.content else { return Ok(0) };
    if c.chunk_iter().all(|(_, ch)| have.contains(&ch.hash)) {
        return Ok(0);
    }
    let chunks = c.chunk_iter().enumerate().map(|(i, (o, ch))| (i, o, ch));
    chunk_frames(src, e, chunks, have, sig, &[], mode, frames)
}

/// The `Data` (or `Delta`, `RangeDelta`) frames of `chunks` (with their indices in the
/// file's chunk list and their offsets) of the file `e`: one per chunk the child does not
/// hold. A small file's one chunk goes as a delta against `sig` (the child's old copy), a
/// large file's chunk in one of `runs` as a delta against that run's range of the old copy,
/// when the delta is clearly smaller. Returns the bytes of file data they carry.
#[allow(clippy::too_many_arguments)]
fn chunk_frames(
    src: &Path,
    e: &Entry,
    chunks: impl Iterator<Item = (usize, u64, crate::manifest::Chunk)>,
    have: &HashSet<Hash>,
    sig: Option<&Signature>,
    runs: &[RunSig],
    mode: Mode,
    frames: &mut Vec<Message>,
) -> Result<u64, SyncError> {
    let mut sent = 0u64;
    let path = src.join(&e.path);
    let f = fs_err::File::open(&path).map_err(|x| SyncError::fs("open", &path, x))?;
    for (i, off, ch) in chunks {
        if have.contains(&ch.hash) {
            continue;
        }
        // Read after a byte reserved for the payload's tag: sent raw, the buffer is the
        // payload (no zeroing, no copy).
        let mut buf = Vec::with_capacity(1 + ch.len as usize);
        buf.push(0);
        crate::direct::read_at_into(f.file(), &mut buf, off, ch.len as usize)
            .map_err(|x| SyncError::fs("read", &path, x))?;
        if buf.len() != 1 + ch.len as usize {
            return Err(SyncError::SourceChanged(e.path.clone()));
        }
        sent += u64::from(ch.len);
        let data = &buf[1..];
        if Hash::of(data) != ch.hash {
            return Err(SyncError::SourceChanged(e.path.clone()));
        }
        if let Some(sig) = sig {
            // A small file is one chunk: the delta against the child's old copy replaces it
            // when that is clearly smaller.
            let d = crate::delta::delta(sig, data);
            if crate::delta::wire_size(&d) * 4 < data.len() * 3 {
                frames.push(Message::Delta {
                    hash: ch.hash,
                    block: sig.block,
                    ops: d.ops,
                    literals: compress(&d.literals),
                });
                continue;
            }
        } else if let Some(run) = runs.iter().find(|r| r.chunks.contains(&i)) {
            let d = crate::delta::delta(&run.sig, data);
            if crate::delta::wire_size(&d) * 4 < data.len() * 3 {
                frames.push(Message::RangeDelta {
                    hash: ch.hash,
                    base: run.base,
                    block: run.sig.block,
                    ops: d.ops,
                    literals: compress(&d.literals),
                });
                continue;
            }
        }
        frames.push(Message::Data {
            hash: ch.hash,
            payload: encode_read(buf, mode),
        });
    }
    Ok(sent)
}

#[cfg(test)]
mod pipeline_tests {
    use super::*;
    use crate::direct::read_at_into;

    #[test]
    fn results_come_in_order_and_an_error_or_a_panic_stops_the_pipeline() {
        // Later steps finish first; the consumer still sees 0, 1, 2, ...
        let mut seen = Vec::new();
        ordered_pipeline(
            200,
            |i| {
                std::thread::sleep(std::time::Duration::from_micros(
                    ((200 - i) % 7) as u64 * 50,
                ));
                i * 3
            },
            |i, t| {
                seen.push((i, t));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seen, (0..200).map(|i| (i, i * 3)).collect::<Vec<_>>());
        // The consumer's error ends it; no step past it is consumed.
        let mut last = 0;
        let e = ordered_pipeline(
            1000,
            |i| i,
            |i, _| {
                last = i;
                if i == 10 {
                    Err(SyncError::Remote("stop".into()))
                } else {
                    Ok(())
                }
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("stop"), "{e}");
        assert_eq!(last, 10);
        // A step whose work panics is an error, not a hang.
        let e = ordered_pipeline(
            50,
            |i| {
                assert!(i != 20, "reader failure");
                i
            },
            |_, _| Ok(()),
        )
        .unwrap_err();
        assert!(e.to_string().contains("data reader stopped"), "{e}");
    }

    #[test]
    fn no_wake_up_is_lost_when_readers_and_consumer_race() {
        // Many tiny steps, some slow on either side, so that readers wait for room and the
        // consumer waits for its step over and over; a lost wake-up hangs (caught here).
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sum = 0u64;
            let r = ordered_pipeline(
                30_000,
                |i| {
                    if i % 997 == 0 {
                        std::thread::sleep(std::time::Duration::from_micros(300));
                    }
                    i as u64
                },
                |i, t| {
                    assert_eq!(i as u64, t);
                    if i % 1009 == 0 {
                        std::thread::sleep(std::time::Duration::from_micros(300));
                    }
                    sum += t;
                    Ok(())
                },
            );
            let _ = tx.send((r.is_ok(), sum));
        });
        let (ok, sum) = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the pipeline hung: a wake-up was lost");
        assert!(ok);
        assert_eq!(sum, (0..30_000u64).sum::<u64>());
    }

    #[test]
    fn read_at_into_appends_the_range_and_stops_at_its_end_or_the_file_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        // After the tag byte, from an offset.
        let mut buf = vec![9u8];
        read_at_into(&f, &mut buf, 1000, 200_000).unwrap();
        assert_eq!(buf[0], 9);
        assert_eq!(&buf[1..], &data[1000..201_000]);
        // Room for more than wanted: no byte past the range.
        let mut buf = Vec::with_capacity(1 << 20);
        buf.push(0);
        read_at_into(&f, &mut buf, 10, 5).unwrap();
        assert_eq!(&buf[1..], &data[10..15]);
        // Past the end of the file: what there is.
        let mut buf = vec![0u8];
        read_at_into(&f, &mut buf, 299_990, 100).unwrap();
        assert_eq!(&buf[1..], &data[299_990..]);
        let mut buf = Vec::new();
        read_at_into(&f, &mut buf, 400_000, 100).unwrap();
        assert!(buf.is_empty());
    }

    fn meta() -> crate::manifest::Meta {
        crate::manifest::Meta::test_file()
    }

    fn chunked(path: &str, lens: &[u32]) -> Op {
        let chunks: Vec<crate::manifest::Chunk> = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| crate::manifest::Chunk {
                len,
                hash: Hash::of(format!("{path}/{i}").as_bytes()),
            })
            .collect();
        Op::Write(Entry {
            path: path.into(),
            kind: crate::manifest::Kind::File,
            meta: meta(),
            content: Some(Content {
                size: lens.iter().map(|&l| u64::from(l)).sum(),
                hash: Hash::of(path.as_bytes()),
                chunks,
                sparse: false,
            }),
        })
    }

    #[test]
    fn a_large_file_the_child_lacks_goes_in_windows_that_cover_it() {
        let k = 64 << 10;
        let lens: Vec<u32> = (0..100).map(|i| k + (i % 7) * 4096).collect();
        let img = chunked("img", &lens);
        let Op::Write(e) = &img else { unreachable!() };
        let chunks = &e.content.as_ref().unwrap().chunks;
        // The child holds every third chunk already.
        let have: HashSet<Hash> = chunks.iter().step_by(3).map(|c| c.hash).collect();
        let small = Op::Write(Entry {
            path: "small".into(),
            kind: crate::manifest::Kind::File,
            meta: meta(),
            content: None,
        });
        let held = chunked("held", &[k, k, k]);
        let Op::Write(h) = &held else { unreachable!() };
        let have: HashSet<Hash> = have
            .into_iter()
            .chain(h.content.as_ref().unwrap().chunks.iter().map(|c| c.hash))
            .collect();
        let ops = vec![small, img.clone(), held];
        let ps = parts(&ops, &have);
        assert_eq!(ps[0], (0, Part::Step));
        assert_eq!(ps[1], (1, Part::Head));
        assert_eq!(ps.last(), Some(&(2, Part::Step)), "all held: one step");
        // The windows cover the file's chunks in order, each offset where the one before
        // ended, each carrying about WINDOW bytes the child lacks (never a chunk more).
        let windows: Vec<_> = ps[2..ps.len() - 1].to_vec();
        assert!(windows.len() > 1, "{windows:?}");
        let (mut next, mut at, mut bytes) = (0, 0u64, 0u64);
        for (i, p) in &windows {
            assert_eq!(*i, 1);
            let Part::Chunks { chunks: r, off } = p else {
                panic!("{p:?}")
            };
            assert_eq!((r.start, *off), (next, at));
            let lacked: u64 = chunks[r.clone()]
                .iter()
                .filter(|c| !have.contains(&c.hash))
                .map(|c| u64::from(c.len))
                .sum();
            assert!(
                lacked < WINDOW + u64::from(crate::scan::CDC_MAX),
                "{lacked}"
            );
            next = r.end;
            at += chunks[r.clone()]
                .iter()
                .map(|c| u64::from(c.len))
                .sum::<u64>();
            bytes += part_bytes(&img, p, 0);
        }
        assert_eq!(next, chunks.len());
        assert_eq!(bytes, e.size(), "progress adds up to the file's size");
    }

    fn content(hashes: &[(u8, u32)]) -> Content {
        Content {
            size: hashes.iter().map(|&(_, l)| u64::from(l)).sum(),
            hash: Hash([0; 32]),
            chunks: hashes
                .iter()
                .map(|&(h, len)| crate::manifest::Chunk {
                    len,
                    hash: Hash([h; 32]),
                })
                .collect(),
            sparse: false,
        }
    }

    #[test]
    fn a_run_of_lacked_chunks_replaces_the_old_range_between_its_neighbours() {
        let k = 64 << 10;
        // Old: A B C D E. New: A X D E (B and C replaced by one chunk), then F at the end.
        let old = content(&[(1, k), (2, k), (3, k), (4, k), (5, k)]);
        let new = content(&[(1, k), (9, k + 10), (4, k), (5, k), (8, 1000)]);
        let have: HashSet<Hash> = old.chunks.iter().map(|c| c.hash).collect();
        let runs = delta_runs(&new, &old, &have);
        assert_eq!(
            runs,
            vec![
                // X: from where A ends to where D starts in the old copy.
                (1..2, (u64::from(k), 2 * k)),
                // F: after E, which ends the old copy: nothing to build on.
            ]
        );
        // A run at the start of the file: from the old copy's start; a neighbour the old
        // copy does not have (held elsewhere): the run's own place.
        let elsewhere = Hash([7; 32]);
        let new = content(&[(9, k), (7, k), (6, k), (4, k), (5, k)]);
        let mut have = have;
        have.insert(elsewhere);
        let runs = delta_runs(&new, &old, &have);
        assert_eq!(
            runs,
            vec![(0..1, (0, k)), (2..3, (2 * u64::from(k), k))],
            "the first ends, the second starts, where chunk 7 (not in the old copy) is"
        );
        // A run far larger than the old range it would replace, or an old range far larger
        // than the run, gets no delta.
        let old = content(&[(1, k), (2, 40 * k), (3, k)]);
        let new = content(&[(1, k), (9, k), (3, k)]);
        let have: HashSet<Hash> = old.chunks.iter().map(|c| c.hash).collect();
        assert!(delta_runs(&new, &old, &have).is_empty());
    }
}
