//! Durable lease persistence: an ACK waits for one in-place write to the lease journal.
//!
//! **Journal mode (the default).** The packet loop hands a writer its lease changes with a
//! completion channel. [`JOURNAL_WRITERS`] threads take every job waiting (up to
//! [`MAX_BATCH`] changes), give the batch the next sequence number and free blocks of the
//! journal (`journal.rs`: a preallocated, zero-filled ring beside the store, opened with
//! `O_DSYNC`, and `O_DIRECT` where the file system has it), hand its changes to the applier and
//! write the record; the jobs complete when that one write returns, so each ACK leaves after
//! its lease is on disk. While one record's write is in flight the next batch is written by
//! another thread, so an ACK waits for about one write. The applier thread brings the store
//! (`dhcp_leases`, which `corral machine` and the lease views read) up to date behind the
//! journal: it commits what arrived every [`STORE_APPLY_EVERY`] with `synchronous = NORMAL`, fsyncs the WAL
//! every [`STORE_SYNC_EVERY`] and then writes the journal's base (every record below it is in
//! the store); only then are the journal blocks of those records free to be written over (a
//! writer that finds no free blocks waits, at most [`SPACE_TIMEOUT`]), and
//! checkpoints every [`STORE_CHECKPOINT_EVERY`] so the WAL file is reused instead of
//! growing. None of that is on an ACK's path. On start the journal is replayed into the store
//! (checksummed records from the newest record's base on, a torn tail ignored) and made
//! durable before the leases are loaded and served.
//!
//! Why: under write load the WAL's `fdatasync` had a tail many times a bare fsync's (bench
//! run 10: WAL fdatasync p99 6.7 ms against 0.50 ms for a lone 4 KiB fdatasync) and an ACK
//! waited for it plus the commit before it; a journal write is one write of the record's own
//! blocks, with no file size or allocation change and nothing else queued in front of it by
//! us (bench/dhcp/RESULTS.md, run 11, has the A/B).
//!
//! **WAL mode** (kept for comparisons, [`Durability::Wal`]): a thread commits each batch with
//! `synchronous = NORMAL` and hands it to one of several syncer threads that `fdatasync` the
//! WAL ([`Wal`]) and then complete it; checkpoints run on a second connection. **Full mode**:
//! `synchronous = FULL` commits. When the writer stops it logs a summary (batch size, write and
//! fsync times, time to durable, p50/p99).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use corral_dhcp_proto::{Lease, LeaseChange, LeaseState};
use corral_model::UnixMillis;
use corral_store::{LeaseStatus, LeaseWrite, Store, StoredLease};
use tokio::sync::oneshot;

use crate::error::DhcpError;
use crate::journal;
use crate::latency::Histogram;
use crate::metrics::{DhcpMetrics, Stamps};

/// The most lease changes committed in one transaction.
pub const MAX_BATCH: usize = 1024;

/// Outcome of one persisted batch: when it went through the writer, or the store's message.
pub(crate) type Done = oneshot::Sender<Result<Stamps, String>>;

struct Job {
    writes: Vec<LeaseWrite>,
    done: Option<Done>,
    queued: Instant,
    /// Sent by the writer thread the moment the changes are durable.
    reply: Option<DirectReply>,
}

/// A reply the writer thread sends itself as soon as its lease is durable, so that an ACK
/// does not wait for the packet loop's thread to be scheduled and to get to it (bench/dhcp
/// run 13: that wake-up was most of the ACK's p99). Sent with a non-blocking `sendto`; if
/// the socket's buffer is full, the waiter sends it instead.
#[derive(Debug)]
pub(crate) struct DirectReply {
    /// A duplicate of the service's socket (same open file, non-blocking).
    pub(crate) sock: Arc<socket2::Socket>,
    pub(crate) bytes: Vec<u8>,
    pub(crate) dest: std::net::SocketAddrV4,
}

/// Timings of the writer, summarised in one log line when it stops: the figures that say
/// where an ACK's latency goes (waiting for the commit before, the commit itself). Fixed-size
/// histograms, so a service that runs for months holds no growing sample list.
#[derive(Default)]
struct Stats {
    /// Each commit (the transaction).
    commit: Histogram,
    /// How long the oldest job of each batch waited before its commit started.
    wait: Histogram,
    /// Lease changes committed, and the most in one commit.
    writes: AtomicU64,
    max_writes: AtomicU64,
    /// Each fsync of the WAL.
    sync: Histogram,
    /// From a job's submission until it was durable (what an ACK waits for).
    durable: Histogram,
}

impl Stats {
    fn log(&self, path: &Path) {
        let commits = self.commit.count();
        if commits == 0 {
            return;
        }
        let writes = self.writes.load(Ordering::Relaxed);
        tracing::info!(
            path = %path.display(),
            commits,
            writes_per_commit = format!("{:.1}", writes as f64 / commits as f64),
            max_writes = self.max_writes.load(Ordering::Relaxed),
            commit_ms_p50 = self.commit.percentile_ms(50),
            commit_ms_p99 = self.commit.percentile_ms(99),
            commit_ms_max = self.commit.percentile_ms(100),
            wait_ms_p50 = self.wait.percentile_ms(50),
            wait_ms_p99 = self.wait.percentile_ms(99),
            fsyncs = self.sync.count(),
            fsync_ms_p50 = self.sync.percentile_ms(50),
            fsync_ms_p99 = self.sync.percentile_ms(99),
            fsync_ms_max = self.sync.percentile_ms(100),
            durable_ms_p50 = self.durable.percentile_ms(50),
            durable_ms_p99 = self.durable.percentile_ms(99),
            durable_ms_max = self.durable.percentile_ms(100),
            "DHCP lease writer stopped"
        );
    }
}

/// Handle to the writer thread; dropping it stops the thread after it drains its queue.
#[derive(Debug)]
pub(crate) struct LeaseWriter {
    tx: Option<mpsc::Sender<Job>>,
    /// Set by the first failed fsync or journal write (and by tests, to simulate one).
    #[cfg_attr(not(test), allow(dead_code))]
    poisoned: Arc<AtomicBool>,
    /// Journal mode: while set, the applier leaves the store alone (tests: a store that lags
    /// behind the journal, as it may when a crash comes).
    #[cfg_attr(not(test), allow(dead_code))]
    applier_paused: Arc<AtomicBool>,
    /// The threads to join when stopping (the first is joined first: it drains the queue).
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl LeaseWriter {
    /// Opens the store, replays the lease journal into it, loads its leases, and starts the
    /// writer (journal mode, see [`Durability::Journal`]), recording into `metrics`.
    pub(crate) fn open(
        path: &Path,
        metrics: Arc<DhcpMetrics>,
    ) -> Result<(LeaseWriter, Vec<Lease>), DhcpError> {
        LeaseWriter::open_with(
            path,
            Durability::Journal {
                blocks: journal::BLOCKS,
                writers: JOURNAL_WRITERS,
            },
            metrics,
        )
    }

    /// [`LeaseWriter::open`] with another way to make leases durable, for comparisons.
    fn open_with(
        path: &Path,
        durability: Durability,
        metrics: Arc<DhcpMetrics>,
    ) -> Result<(LeaseWriter, Vec<Lease>), DhcpError> {
        let serr = |source| DhcpError::Store {
            path: path.to_path_buf(),
            source: Box::new(source),
        };
        let store = Store::open(path).map_err(serr)?;
        // Checkpoints never run inside a commit an ACK may wait for (see `checkpointer` and
        // `applier`).
        store.disable_auto_checkpoint().map_err(serr)?;
        // Whatever the journal holds goes into the store first (a crash may have left ACKed
        // leases only there), durably, before the leases are loaded and served. Done in every
        // mode, so switching modes never loses a journal's leases.
        let jpath = journal::path_for(path);
        let jerr = |source: std::io::Error| DhcpError::Journal {
            path: jpath.clone(),
            source,
        };
        let replayed = journal::replay(&jpath).map_err(jerr)?;
        if !replayed.writes.is_empty() {
            store.set_durable(true).map_err(serr)?;
            store.write_leases(&replayed.writes).map_err(serr)?;
            tracing::info!(path = %jpath.display(), records = replayed.records,
                changes = replayed.writes.len(), "replayed the DHCP lease journal into the store");
        }
        let leases = store
            .leases()
            .map_err(serr)?
            .into_iter()
            .filter_map(from_stored)
            .collect();
        let syncers = match durability {
            Durability::Journal { blocks, writers } => {
                let journal = journal::Journal::open(&jpath, blocks).map_err(jerr)?;
                let writer =
                    start_journal(store, journal, writers, replayed.last_seq, path, metrics)?;
                return Ok((writer, leases));
            }
            Durability::Wal(n) => n,
            Durability::Full => 0,
        };
        let checkpoints = Store::open(path).map_err(serr)?;
        // The fsync that makes a commit durable is ours (see `Wal`): the writer commits with
        // `synchronous = NORMAL` and goes on with the next batch while syncers fsync the WAL.
        let wal = match Wal::open(path).and_then(|w| {
            if syncers > 0 {
                Ok(w)
            } else {
                Err(std::io::Error::other("overlapping fsyncs turned off"))
            }
        }) {
            Ok(w) => {
                store.set_durable(false).map_err(serr)?;
                Some(Arc::new(w))
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e,
                    "cannot open the store's WAL; committing with synchronous = FULL instead");
                store.set_durable(true).map_err(serr)?;
                None
            }
        };
        let poisoned = wal
            .as_ref()
            .map_or_else(|| Arc::new(AtomicBool::new(false)), |w| w.poisoned.clone());
        let (tx, rx) = mpsc::channel::<Job>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let p: PathBuf = path.to_path_buf();
        let checkpointer = std::thread::Builder::new()
            .name("dhcp-checkpoint".into())
            .spawn(move || checkpointer(checkpoints, stop_rx, &p))
            .map_err(DhcpError::Thread)?;
        let p: PathBuf = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("dhcp-leases".into())
            .spawn(move || {
                run(store, wal, syncers, rx, &p);
                drop(stop_tx);
                let _ = checkpointer.join();
            })
            .map_err(DhcpError::Thread)?;
        Ok((
            LeaseWriter {
                tx: Some(tx),
                poisoned,
                applier_paused: Arc::new(AtomicBool::new(false)),
                threads: vec![thread],
            },
            leases,
        ))
    }

    /// Makes every later fsync fail, as after a real fsync error.
    #[cfg(test)]
    fn poison_for_test(&self) {
        self.poisoned.store(true, Ordering::Release);
    }

    /// Journal mode: stops the applier from writing to the store, so that acknowledged
    /// leases are in the journal only.
    #[cfg(test)]
    fn pause_applier_for_test(&self) {
        self.applier_paused.store(true, Ordering::Release);
    }

    /// Queues `changes`; `done` is completed after they are durable.
    pub(crate) fn submit(&self, changes: &[LeaseChange], now: UnixMillis, done: Option<Done>) {
        self.submit_with_reply(changes, now, done, None);
    }

    /// [`LeaseWriter::submit`], and `reply` is sent by the writer thread as soon as the
    /// changes are durable (before `done` is completed; its [`Stamps::sent`] says whether).
    pub(crate) fn submit_with_reply(
        &self,
        changes: &[LeaseChange],
        now: UnixMillis,
        done: Option<Done>,
        reply: Option<DirectReply>,
    ) {
        let writes = changes.iter().map(|c| to_write(c, now)).collect();
        let job = Job {
            writes,
            done,
            queued: Instant::now(),
            reply,
        };
        if let Some(tx) = &self.tx
            && let Err(mpsc::SendError(job)) = tx.send(job)
            && let Some(d) = job.done
        {
            let _ = d.send(Err("lease writer thread stopped".into()));
        }
    }
}

impl Drop for LeaseWriter {
    fn drop(&mut self) {
        drop(self.tx.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// How an ACK's lease changes are made durable before it leaves.
#[derive(Debug, Clone, Copy)]
enum Durability {
    /// One in-place `O_DSYNC` write to the lease journal (`journal.rs`) of this many blocks;
    /// the store is brought up to date behind it. The default.
    Journal { blocks: u64, writers: usize },
    /// Group commit into the store's WAL with `synchronous = NORMAL`, then an `fdatasync` of
    /// the WAL by one of this many overlapping syncer threads (what ran until bench run 10).
    #[cfg_attr(not(test), allow(dead_code))]
    Wal(usize),
    /// Group commit with `synchronous = FULL` (the fsync inside the commit).
    #[cfg_attr(not(test), allow(dead_code))]
    Full,
}

/// Journal writer threads: while one record's write is in flight, the next batch is written
/// by another thread at the next blocks, so an ACK waits for about one write.
const JOURNAL_WRITERS: usize = 3;

/// How often the applier commits what the journal holds into the store. Under load the same
/// lease rows change again and again (1000 clients renewing): one commit per 50 ms writes each
/// changed page once, where one commit per journal record (about 2 changes each at 5000
/// exchanges/s) wrote tens of MB/s of WAL frames whose flushes stalled the journal's writes
/// (bench/dhcp run 12: journal-to-durable p99 22.5 ms with a store fsync p50 of 20 ms).
const STORE_APPLY_EVERY: Duration = Duration::from_millis(50);

/// How often the applier makes the store's WAL durable (which frees journal blocks).
const STORE_SYNC_EVERY: Duration = Duration::from_millis(500);

/// How often the applier checkpoints the store (copies the WAL into the database, so the
/// WAL restarts from its beginning and stays bounded).
const STORE_CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// The applier's nice value: its SQLite commits, WAL fsyncs and checkpoints give way to the
/// journal writers and the packet loop whenever they want the CPU (bench/dhcp run 13), and
/// still get a tenth of a contended core (weight 110 against 1024), several times what they
/// need at 5000 exchanges/s. Raising a nice value needs no privilege.
const APPLIER_NICE: i32 = 10;

/// The journal writers' nice value, when the process may raise priorities (root or
/// `CAP_SYS_NICE`, as a DHCP server on port 67 usually runs): they are the ACK's path, each
/// mostly blocked in its write, so a higher priority costs other work little and lets a
/// writer run the moment a job or its write's completion arrives. Left at the default
/// otherwise.
const WRITER_NICE: i32 = crate::PACKET_NICE;

/// Sets the calling thread's nice value (Linux: `setpriority(PRIO_PROCESS, 0)` is per thread);
/// false when not permitted.
pub(crate) fn set_thread_nice(nice: i32) -> bool {
    rustix::process::setpriority_process(None, nice).is_ok()
}

/// How long a batch waits for journal blocks to be freed (the store not catching up) before
/// it fails, unanswered.
const SPACE_TIMEOUT: Duration = Duration::from_secs(5);

/// The journal's blocks: where the next record goes and which records still need them.
struct Ring {
    next_block: u64,
    next_seq: u64,
    /// Every record below this sequence number is durable in the store.
    durable_below: u64,
    /// The base written to the journal's header (every record below it durable in the
    /// store): the blocks of records below it are free. Lags `durable_below` by one header
    /// write, so that a replay never misses a record whose blocks were reused.
    freed_below: u64,
    /// Header slot for the next base write (alternating).
    base_slot: u64,
    /// Sequence number of the record occupying each block (0: none).
    block_seq: Vec<u64>,
}

/// A journaled batch on its way to the applier: its sequence number and its changes.
type Journaled = (u64, Vec<LeaseWrite>);

/// State shared by the journal writers and the applier.
struct Shared {
    journal: journal::Journal,
    jobs: Mutex<mpsc::Receiver<Job>>,
    ring: Mutex<Ring>,
    freed: Condvar,
    /// To the applier, in sequence order (sent while holding `ring`).
    /// Taken (closed) when the writers have stopped, which ends the applier.
    apply: Mutex<Option<mpsc::Sender<Journaled>>>,
    poisoned: Arc<AtomicBool>,
    applier_paused: Arc<AtomicBool>,
    /// The service's metrics (`journal` and the per-job durable times).
    metrics: Arc<DhcpMetrics>,
}

/// The journal mode's figures as one log line (when the writer stops).
fn log_journal(m: &DhcpMetrics, path: &Path, direct: bool) {
    let j = &m.journal;
    let records = j.write.count();
    if records == 0 {
        return;
    }
    let changes = j.changes.load(Ordering::Relaxed);
    tracing::info!(
        path = %path.display(),
        commits = records,
        writes_per_commit = format!("{:.1}", changes as f64 / records as f64),
        max_writes = j.max_changes.load(Ordering::Relaxed),
        wait_ms_p50 = j.wait.percentile_ms(50),
        wait_ms_p99 = j.wait.percentile_ms(99),
        journal_write_ms_p50 = j.write.percentile_ms(50),
        journal_write_ms_p99 = j.write.percentile_ms(99),
        journal_write_ms_max = j.write.percentile_ms(100),
        durable_ms_p50 = j.durable.percentile_ms(50),
        durable_ms_p99 = j.durable.percentile_ms(99),
        durable_ms_max = j.durable.percentile_ms(100),
        space_waits = j.space_waits.load(Ordering::Relaxed),
        store_commits = j.store_commit.count(),
        store_commit_ms_p99 = j.store_commit.percentile_ms(99),
        store_syncs = j.store_sync.count(),
        store_sync_ms_p50 = j.store_sync.percentile_ms(50),
        store_sync_ms_max = j.store_sync.percentile_ms(100),
        checkpoints = j.store_checkpoint.count(),
        checkpoint_ms_max = j.store_checkpoint.percentile_ms(100),
        o_direct = direct,
        "DHCP lease writer stopped (journal)"
    );
}

/// Starts the journal mode: `n_writers` threads write records, an applier thread
/// brings the store up to date.
fn start_journal(
    store: Store,
    journal: journal::Journal,
    n_writers: usize,
    last_seq: u64,
    path: &Path,
    metrics: Arc<DhcpMetrics>,
) -> Result<LeaseWriter, DhcpError> {
    let serr = |source| DhcpError::Store {
        path: path.to_path_buf(),
        source: Box::new(source),
    };
    // The applier's commits are durable once it fsyncs the WAL (see `Wal`); without a WAL
    // to fsync, each of its commits is.
    let wal = match Wal::open(path) {
        Ok(w) => {
            store.set_durable(false).map_err(serr)?;
            Some(w)
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e,
                "cannot open the store's WAL; applying the lease journal with synchronous = FULL");
            store.set_durable(true).map_err(serr)?;
            None
        }
    };
    // Everything replayed is durable in the store now: say so in both header slots before
    // the first record, so that no record of an earlier run is ever replayed over newer ones.
    for slot in 0..2 {
        journal
            .write_base(slot, last_seq + 1)
            .map_err(|source| DhcpError::Journal {
                path: journal::path_for(path),
                source,
            })?;
    }
    let (tx, rx) = mpsc::channel::<Job>();
    let (apply_tx, apply_rx) = mpsc::channel();
    let blocks = journal.blocks();
    let shared = Arc::new(Shared {
        journal,
        jobs: Mutex::new(rx),
        ring: Mutex::new(Ring {
            next_block: journal::FIRST_RECORD_BLOCK,
            next_seq: last_seq + 1,
            // Everything replayed is durable in the store.
            durable_below: last_seq + 1,
            freed_below: last_seq + 1,
            base_slot: 0,
            block_seq: vec![0; usize::try_from(blocks).unwrap_or(usize::MAX)],
        }),
        freed: Condvar::new(),
        apply: Mutex::new(Some(apply_tx)),
        poisoned: Arc::new(AtomicBool::new(false)),
        applier_paused: Arc::new(AtomicBool::new(false)),
        metrics,
    });
    let mut writers = Vec::new();
    for i in 0..n_writers.max(1) {
        let (sh, p) = (shared.clone(), path.to_path_buf());
        writers.push(
            std::thread::Builder::new()
                .name(format!("dhcp-journal{i}"))
                .spawn(move || {
                    if !set_thread_nice(WRITER_NICE) {
                        tracing::debug!("journal writer stays at the default priority");
                    }
                    journal_writer(&sh, &p)
                })
                .map_err(DhcpError::Thread)?,
        );
    }
    let (sh, p) = (shared.clone(), path.to_path_buf());
    let applier = std::thread::Builder::new()
        .name("dhcp-apply".into())
        .spawn(move || {
            set_thread_nice(APPLIER_NICE);
            applier(store, wal, apply_rx, &sh, &p)
        })
        .map_err(DhcpError::Thread)?;
    let (sh, p) = (shared.clone(), path.to_path_buf());
    let thread = std::thread::Builder::new()
        .name("dhcp-leases".into())
        .spawn(move || {
            // The writers end when the job channel closes; then the applier's channel is
            // closed, and it ends after applying (and fsyncing) everything journaled.
            for w in writers {
                let _ = w.join();
            }
            if let Ok(mut a) = sh.apply.lock() {
                a.take();
            }
            let _ = applier.join();
            log_journal(&sh.metrics, &p, sh.journal.direct());
        })
        .map_err(DhcpError::Thread)?;
    let poisoned = shared.poisoned.clone();
    let applier_paused = shared.applier_paused.clone();
    Ok(LeaseWriter {
        tx: Some(tx),
        poisoned,
        applier_paused,
        threads: vec![thread],
    })
}

/// One journal writer: takes every job waiting, places the record in the ring, hands its
/// changes to the applier, writes the record, then completes the jobs.
fn journal_writer(sh: &Shared, path: &Path) {
    loop {
        let (jobs, record, block, taken) = {
            let Ok(rx) = sh.jobs.lock() else { return };
            let Ok(first) = rx.recv() else { return };
            let taken = Instant::now();
            let mut jobs = vec![first];
            let mut n = jobs[0].writes.len();
            while n < MAX_BATCH {
                match rx.try_recv() {
                    Ok(j) => {
                        n += j.writes.len();
                        jobs.push(j);
                    }
                    Err(_) => break,
                }
            }
            let writes: Vec<LeaseWrite> =
                jobs.iter().flat_map(|j| j.writes.iter().cloned()).collect();
            match place(sh, &writes, &jobs[0]) {
                Ok((record, block)) => (jobs, record, block, taken),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "journaling DHCP leases failed");
                    drop(rx);
                    let now = Instant::now();
                    complete_jobs(jobs, &Err(e), &sh.metrics.journal.durable, taken, now);
                    continue;
                }
            }
        };
        let started = Instant::now();
        let result = if sh.poisoned.load(Ordering::Acquire) {
            Err("an earlier write of the lease journal failed; restart the service".to_owned())
        } else {
            sh.journal.write_at(block, &record).map_err(|e| {
                sh.poisoned.store(true, Ordering::Release);
                tracing::error!(path = %path.display(), error = %e, "writing the DHCP lease journal failed");
                format!("lease journal write: {e}")
            })
        };
        sh.metrics.journal.write.record(started.elapsed());
        complete_jobs(jobs, &result, &sh.metrics.journal.durable, taken, started);
    }
}

/// Gives `writes` the next sequence number and free blocks (waiting up to [`SPACE_TIMEOUT`]
/// for the applier to free some), hands them to the applier, and encodes the record.
fn place(
    sh: &Shared,
    writes: &[LeaseWrite],
    first: &Job,
) -> Result<(journal::Record, u64), String> {
    let mut ring = sh.ring.lock().map_err(|_| "journal lock poisoned")?;
    // Encoded with a provisional header to know its size; re-encoded below with its numbers.
    let nblocks = journal::Record::new(0, 0, writes).blocks();
    let total = ring.block_seq.len() as u64;
    let first_block = journal::FIRST_RECORD_BLOCK;
    if nblocks > (total - first_block) / 2 {
        return Err(format!(
            "a record of {nblocks} blocks does not fit the lease journal"
        ));
    }
    let start = if ring.next_block + nblocks > total {
        first_block
    } else {
        ring.next_block
    };
    let range = start as usize..(start + nblocks) as usize;
    let deadline = Instant::now() + SPACE_TIMEOUT;
    let mut waited = false;
    while ring.block_seq[range.clone()]
        .iter()
        .any(|&s| s >= ring.freed_below)
    {
        waited = true;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("the lease journal is full: the store is not keeping up".into());
        }
        ring = sh
            .freed
            .wait_timeout(ring, left)
            .map_err(|_| "journal lock poisoned")?
            .0;
    }
    let seq = ring.next_seq;
    ring.next_seq += 1;
    ring.next_block = start + nblocks;
    for b in &mut ring.block_seq[range] {
        *b = seq;
    }
    let record = journal::Record::new(seq, ring.durable_below, writes);
    sh.apply
        .lock()
        .map_err(|_| "journal lock poisoned")?
        .as_ref()
        .ok_or("the lease applier stopped")?
        .send((seq, writes.to_vec()))
        .map_err(|_| "the lease applier stopped")?;
    drop(ring);
    let j = &sh.metrics.journal;
    j.wait.record(first.queued.elapsed());
    j.changes.fetch_add(writes.len() as u64, Ordering::Relaxed);
    j.max_changes
        .fetch_max(writes.len() as u64, Ordering::Relaxed);
    j.space_waits
        .fetch_add(u64::from(waited), Ordering::Relaxed);
    Ok((record, start))
}

/// Brings the store up to date behind the journal: commits the journaled changes in sequence
/// order every [`STORE_APPLY_EVERY`] (`synchronous = NORMAL`, off every ACK's path), fsyncs the WAL every
/// [`STORE_SYNC_EVERY`] and then frees the journal blocks of what it covered, and checkpoints
/// every [`STORE_CHECKPOINT_EVERY`]. A failed commit is retried at the next turn; its journal
/// blocks stay taken meanwhile.
fn applier(
    store: Store,
    wal: Option<Wal>,
    rx: mpsc::Receiver<Journaled>,
    sh: &Shared,
    path: &Path,
) {
    let mut pending: Vec<LeaseWrite> = Vec::new();
    let mut pending_last = 0u64;
    // Highest sequence number committed into the store, and made durable there.
    let (mut committed, mut synced) = (0u64, 0u64);
    let mut last_sync = Instant::now();
    let mut last_checkpoint = Instant::now();
    let mut last_apply = Instant::now();
    let mut open = true;
    while open {
        match rx.recv_timeout(STORE_APPLY_EVERY) {
            Ok((seq, w)) => {
                pending.extend(w);
                pending_last = seq;
                for (seq, w) in rx.try_iter() {
                    pending.extend(w);
                    pending_last = seq;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => open = false,
        }
        if sh.applier_paused.load(Ordering::Acquire) {
            continue;
        }
        if !pending.is_empty() && (!open || last_apply.elapsed() >= STORE_APPLY_EVERY) {
            let started = Instant::now();
            last_apply = started;
            match store.write_leases(&pending) {
                Ok(()) => {
                    committed = pending_last;
                    pending.clear();
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e,
                        "applying the DHCP lease journal to the store failed; retrying");
                    if !open {
                        return;
                    }
                }
            }
            sh.metrics.journal.store_commit.record(started.elapsed());
        }
        // Also early when a quarter of the ring's blocks wait for this sync (a record takes one
        // block or more), so that a load heavier than the bench's (more records per 500 ms
        // than the ring holds) does not leave the writers waiting for journal space.
        let pressed = committed - synced >= sh.journal.blocks() / 4;
        if committed > synced && (!open || pressed || last_sync.elapsed() >= STORE_SYNC_EVERY) {
            let started = Instant::now();
            let ok = match &wal {
                Some(w) => w.sync().map_err(|e| {
                    tracing::error!(path = %path.display(), error = %e,
                        "fsync of the lease store's WAL failed; journal blocks stay taken");
                }),
                None => Ok(()),
            };
            last_sync = Instant::now();
            sh.metrics.journal.store_sync.record(started.elapsed());
            if ok.is_ok() {
                synced = committed;
                let slot = match sh.ring.lock() {
                    Ok(mut ring) => {
                        ring.durable_below = synced + 1;
                        ring.base_slot += 1;
                        ring.base_slot
                    }
                    Err(_) => continue,
                };
                // Only once the header says so may the blocks of these records be reused.
                match sh.journal.write_base(slot, synced + 1) {
                    Ok(()) => {
                        if let Ok(mut ring) = sh.ring.lock() {
                            ring.freed_below = ring.freed_below.max(synced + 1);
                        }
                        sh.freed.notify_all();
                    }
                    Err(e) => tracing::error!(path = %path.display(), error = %e,
                        "writing the lease journal's base failed; journal blocks stay taken"),
                }
            }
        }
        if !open || last_checkpoint.elapsed() >= STORE_CHECKPOINT_EVERY {
            let started = Instant::now();
            if let Err(e) = store.checkpoint_passive() {
                tracing::warn!(path = %path.display(), error = %e, "checkpointing the lease store failed");
            }
            last_checkpoint = Instant::now();
            sh.metrics
                .journal
                .store_checkpoint
                .record(started.elapsed());
        }
    }
}

/// Syncing threads: while one fsyncs the WAL, the next committed batch starts its own fsync
/// at once instead of waiting for the one in flight, so an ACK waits for about one fsync.
/// Three had the steadiest tail in the `ack_latency_overlapped_vs_full` measurement on a
/// loaded shared disk (p99 to durable 8-33 ms, where two had 8-213 ms and one, which does not
/// overlap, 15-244 ms; bench/dhcp/RESULTS.md, run 6).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const SYNCERS: usize = 3;

/// A committed (not yet durable) batch on its way to a syncer.
struct Committed {
    jobs: Vec<Job>,
    /// When its commit started.
    started: Instant,
}

fn run(
    store: Store,
    wal: Option<Arc<Wal>>,
    n_syncers: usize,
    rx: mpsc::Receiver<Job>,
    path: &Path,
) {
    let stats = Arc::new(Stats::default());
    let (sync_tx, sync_rx) = mpsc::channel::<Committed>();
    let sync_rx = Arc::new(Mutex::new(sync_rx));
    let mut syncers = Vec::new();
    if let Some(wal) = &wal {
        for i in 0..n_syncers {
            let (wal, rx, stats, p) = (
                wal.clone(),
                sync_rx.clone(),
                stats.clone(),
                path.to_path_buf(),
            );
            match std::thread::Builder::new()
                .name(format!("dhcp-sync{i}"))
                .spawn(move || syncer(&wal, &rx, &stats, &p))
            {
                Ok(t) => syncers.push(t),
                Err(e) => tracing::error!(error = %e, "cannot start a lease syncer thread"),
            }
        }
    }
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let mut n = jobs[0].writes.len();
        while n < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => {
                    n += j.writes.len();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        let writes: Vec<LeaseWrite> = jobs.iter().flat_map(|j| j.writes.iter().cloned()).collect();
        let started = Instant::now();
        let result = store.write_leases(&writes).map_err(|e| {
            tracing::error!(path = %path.display(), error = %e, "persisting DHCP leases failed");
            e.to_string()
        });
        stats.wait.record(started - jobs[0].queued);
        stats.commit.record(started.elapsed());
        stats
            .writes
            .fetch_add(writes.len() as u64, Ordering::Relaxed);
        stats
            .max_writes
            .fetch_max(writes.len() as u64, Ordering::Relaxed);
        tracing::trace!(
            jobs = jobs.len(),
            writes = writes.len(),
            "lease batch committed"
        );
        match result {
            // Committed into the WAL's page cache: durable after a syncer's fsync.
            Ok(()) if !syncers.is_empty() => {
                if let Err(mpsc::SendError(c)) = sync_tx.send(Committed { jobs, started }) {
                    let e = Err("lease syncer threads stopped".into());
                    complete_jobs(c.jobs, &e, &stats.durable, started, started);
                }
            }
            // synchronous = FULL: the commit was the fsync.
            r => complete_jobs(jobs, &r, &stats.durable, started, started),
        }
    }
    drop(sync_tx);
    for t in syncers {
        let _ = t.join();
    }
    stats.log(path);
}

/// Records in `durable` how long each job took to become durable, sends the replies of a
/// durable batch ([`DirectReply`]), then tells each job's waiter the outcome, with its
/// [`Stamps`]: `taken` when a thread took the batch, `write_start` when its write (or
/// commit) started, and now.
fn complete_jobs(
    jobs: Vec<Job>,
    result: &Result<(), String>,
    durable: &Histogram,
    taken: Instant,
    write_start: Instant,
) {
    let now = Instant::now();
    for j in &jobs {
        durable.record(now - j.queued);
    }
    let mut sent = Vec::with_capacity(jobs.len());
    for j in &jobs {
        sent.push(match (&j.reply, result) {
            (Some(r), Ok(())) => {
                let started = Instant::now();
                // Any failure (a full send buffer above all) leaves the reply to the waiter.
                r.sock
                    .send_to(&r.bytes, &std::net::SocketAddr::V4(r.dest).into())
                    .ok()
                    .map(|_| (started, Instant::now()))
            }
            _ => None,
        });
    }
    for (j, sent) in jobs.into_iter().zip(sent) {
        if let Some(d) = j.done {
            let _ = d.send(result.clone().map(|()| Stamps {
                queued: j.queued,
                taken,
                write_start,
                write_end: now,
                sent,
            }));
        }
    }
}

/// One syncing thread: takes every committed batch waiting, fsyncs the WAL (which covers all
/// of them: their writes returned before the fsync started), then completes them.
fn syncer(wal: &Wal, rx: &Mutex<mpsc::Receiver<Committed>>, stats: &Stats, path: &Path) {
    loop {
        let batches = {
            let Ok(rx) = rx.lock() else { return };
            let Ok(first) = rx.recv() else { return };
            let mut b = vec![first];
            b.extend(rx.try_iter());
            b
        };
        let started = Instant::now();
        let result = wal.sync().map_err(|e| {
            tracing::error!(path = %path.display(), error = %e, "fsync of the lease store's WAL failed");
            e
        });
        stats.sync.record(started.elapsed());
        for c in batches {
            complete_jobs(c.jobs, &result, &stats.durable, c.started, c.started);
        }
    }
}

/// The store's write-ahead log, opened by us to fsync it.
///
/// SQLite appends each commit's pages to `<db>-wal` with `write(2)`; recovery at the next open
/// replays every frame whose checksum chain is intact. A commit made with
/// `synchronous = NORMAL` is therefore durable once an `fdatasync` of that file *started
/// after the commit returned* has completed: exactly what `synchronous = FULL` does inside the
/// commit, done here outside it so that several fsyncs can overlap. The WAL is reused (same
/// file) while the store is open; should it ever be replaced, the next sync notices the new
/// inode, reopens it, and syncs that.
#[derive(Debug)]
pub(crate) struct Wal {
    path: PathBuf,
    file: Mutex<Arc<std::fs::File>>,
    /// Set by the first failed fsync: after one, Linux may have dropped the dirty pages it
    /// could not write, so no later fsync can vouch for them; every later sync fails too.
    poisoned: Arc<AtomicBool>,
}

impl Wal {
    fn wal_path(db: &Path) -> PathBuf {
        let mut p = db.as_os_str().to_owned();
        p.push("-wal");
        PathBuf::from(p)
    }

    pub(crate) fn open(db: &Path) -> std::io::Result<Wal> {
        let path = Wal::wal_path(db);
        let file = std::fs::File::open(&path)?;
        Ok(Wal {
            path,
            file: Mutex::new(Arc::new(file)),
            poisoned: Arc::new(AtomicBool::new(false)),
        })
    }

    /// `fdatasync` of the WAL: every commit that returned before this call is durable when it
    /// returns `Ok`.
    pub(crate) fn sync(&self) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt;
        if self.poisoned.load(Ordering::Acquire) {
            return Err(
                "an earlier fsync of the lease store's WAL failed; restart the service".into(),
            );
        }
        let file = {
            let mut f = self
                .file
                .lock()
                .map_err(|_| "WAL lock poisoned".to_owned())?;
            let current = std::fs::metadata(&self.path)
                .map_err(|e| format!("{}: {e}", self.path.display()))?;
            let ours = f
                .metadata()
                .map_err(|e| format!("{}: {e}", self.path.display()))?;
            if (current.dev(), current.ino()) != (ours.dev(), ours.ino()) {
                tracing::warn!(path = %self.path.display(), "the store's WAL was replaced; syncing the new one");
                *f = Arc::new(
                    std::fs::File::open(&self.path)
                        .map_err(|e| format!("{}: {e}", self.path.display()))?,
                );
            }
            f.clone()
        };
        file.sync_data().map_err(|e| {
            self.poisoned.store(true, Ordering::Release);
            format!("fsync of {}: {e}", self.path.display())
        })
    }
}

/// How often the checkpointer copies the WAL into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// Checkpoints the WAL every [`CHECKPOINT_EVERY`] from its own connection, off the commit
/// path, until `stop` is dropped (the writer has stopped; one last checkpoint then).
fn checkpointer(store: Store, stop: mpsc::Receiver<()>, path: &Path) {
    loop {
        let last = !matches!(
            stop.recv_timeout(CHECKPOINT_EVERY),
            Err(mpsc::RecvTimeoutError::Timeout)
        );
        if let Err(e) = store.checkpoint_passive() {
            tracing::warn!(path = %path.display(), error = %e, "checkpointing the lease store failed");
        }
        if last {
            return;
        }
    }
}

fn status(s: LeaseState) -> LeaseStatus {
    match s {
        LeaseState::Offered => LeaseStatus::Offered,
        LeaseState::Bound => LeaseStatus::Bound,
        LeaseState::Expired => LeaseStatus::Expired,
        LeaseState::Released => LeaseStatus::Released,
        LeaseState::Declined => LeaseStatus::Declined,
    }
}

fn to_write(c: &LeaseChange, now: UnixMillis) -> LeaseWrite {
    match c {
        LeaseChange::Upsert(l) => LeaseWrite::Upsert(StoredLease {
            ip: l.ip,
            mac: l.mac,
            state: status(l.state),
            expires: l.expires,
            hostname: l.hostname.clone(),
            updated: now,
        }),
        LeaseChange::Remove(ip) => LeaseWrite::Remove(*ip),
    }
}

fn from_stored(s: StoredLease) -> Option<Lease> {
    let state = match s.state {
        // An offer does not survive a restart: the client will DISCOVER again.
        LeaseStatus::Offered => return None,
        LeaseStatus::Bound => LeaseState::Bound,
        LeaseStatus::Expired => LeaseState::Expired,
        LeaseStatus::Released => LeaseState::Released,
        LeaseStatus::Declined => LeaseState::Declined,
    };
    Some(Lease {
        ip: s.ip,
        mac: s.mac,
        state,
        expires: s.expires,
        hostname: s.hostname,
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use corral_model::MacAddr;

    use super::*;

    fn bound(i: u32) -> LeaseChange {
        LeaseChange::Upsert(Lease {
            ip: Ipv4Addr::from(0x0a00_0000 + i),
            mac: MacAddr([2, 0, 0, 0, (i >> 8) as u8, i as u8]),
            state: LeaseState::Bound,
            expires: UnixMillis(4_000_000_000_000),
            hostname: Some(format!("host{i}")),
        })
    }

    fn m() -> Arc<DhcpMetrics> {
        DhcpMetrics::unregistered("test")
    }

    fn commit(w: &LeaseWriter, changes: &[LeaseChange]) {
        let (tx, rx) = oneshot::channel();
        w.submit(changes, UnixMillis(1), Some(tx));
        rx.blocking_recv()
            .expect("writer answers")
            .expect("batch committed");
    }

    fn wal_len(db: &Path) -> u64 {
        let mut p = db.as_os_str().to_owned();
        p.push("-wal");
        std::fs::metadata(PathBuf::from(p)).map_or(0, |m| m.len())
    }

    /// Commits never checkpoint themselves; the checkpointer does, so the WAL restarts from
    /// its beginning instead of growing with every committed batch.
    #[test]
    fn checkpointer_keeps_the_wal_from_growing() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("leases.db");
        let (w, loaded) = LeaseWriter::open_with(&db, Durability::Wal(SYNCERS), m()).unwrap();
        assert!(loaded.is_empty());
        // 400 commits of one lease each: appended without a checkpoint, the WAL would hold
        // at least 400 frames of 4 KiB (1.6 MB).
        let started = Instant::now();
        for i in 0..400 {
            commit(&w, &[bound(i % 50)]);
            if i % 100 == 99 {
                // Give the checkpointer a turn (it runs every CHECKPOINT_EVERY).
                std::thread::sleep(CHECKPOINT_EVERY * 2);
            }
        }
        let len = wal_len(&db);
        assert!(
            len < 400 * 4096,
            "WAL is {len} bytes after 400 commits in {:?}: not checkpointed",
            started.elapsed()
        );
        drop(w);
        // Every acknowledged lease is there after a restart.
        let (_w, loaded) = LeaseWriter::open(&db, m()).unwrap();
        assert_eq!(loaded.len(), 50);
        assert!(loaded.iter().all(|l| l.state == LeaseState::Bound));
    }

    /// After a passive checkpoint copied every frame, the next commit restarts the WAL from its
    /// beginning: it overwrites instead of growing the file.
    #[test]
    fn checkpoint_lets_the_next_commit_restart_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("leases.db");
        let store = Store::open(&db).unwrap();
        store.disable_auto_checkpoint().unwrap();
        store.set_durable(true).unwrap();
        let writes: Vec<LeaseWrite> = (0..20)
            .map(|i| to_write(&bound(i), UnixMillis(1)))
            .collect();
        for _ in 0..50 {
            store.write_leases(&writes).unwrap();
        }
        let before = wal_len(&db);
        assert!(before > 0, "commits went to the WAL");
        store.write_leases(&writes).unwrap();
        assert!(wal_len(&db) > before, "without a checkpoint the WAL grows");
        let before = wal_len(&db);
        let (frames, copied) = store.checkpoint_passive().unwrap();
        assert!(
            frames > 0 && copied == frames,
            "{frames} frames, {copied} copied"
        );
        store.write_leases(&writes).unwrap();
        assert_eq!(wal_len(&db), before, "the WAL restarted from its beginning");
    }

    /// What a crash leaves behind, in every mode: a copy of the database, its WAL and the
    /// lease journal taken while the writer runs (no clean shutdown, no final checkpoint)
    /// has every acknowledged lease after a restart (SQLite replays its WAL, we our journal).
    #[test]
    fn acknowledged_leases_survive_without_a_clean_shutdown() {
        let journal = Durability::Journal {
            blocks: journal::MIN_BLOCKS,
            writers: JOURNAL_WRITERS,
        };
        // (mode, the store lags behind: only the journal has the leases)
        for (mode, lag) in [
            (journal, true),
            (journal, false),
            (Durability::Wal(SYNCERS), false),
            (Durability::Full, false),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let db = dir.path().join("leases.db");
            let (w, _) = LeaseWriter::open_with(&db, mode, m()).unwrap();
            if lag {
                w.pause_applier_for_test();
            }
            for i in 0..30 {
                commit(&w, &[bound(i)]);
            }
            let crash = dir.path().join("crash");
            std::fs::create_dir(&crash).unwrap();
            let copy = crash.join("leases.db");
            for (from, to) in [
                (db.clone(), copy.clone()),
                (Wal::wal_path(&db), Wal::wal_path(&copy)),
                (journal::path_for(&db), journal::path_for(&copy)),
            ] {
                if from.exists() {
                    std::fs::copy(&from, &to).unwrap();
                }
            }
            if lag {
                let s = Store::open(&copy).unwrap();
                assert!(s.leases().unwrap().is_empty(), "the store lags the journal");
            }
            let (_w2, loaded) = LeaseWriter::open(&copy, m()).unwrap();
            assert_eq!(
                loaded.len(),
                30,
                "{mode:?} (store lagging: {lag}): every acknowledged lease recovered"
            );
            drop(w);
        }
    }

    /// In journal mode the store is brought up to date behind the journal: a reader of the
    /// store (`corral machine`) sees the leases within moments, and the store's WAL stays
    /// bounded (the applier checkpoints it, so the WAL file is reused, not grown): four more
    /// checkpoint periods of sustained commits leave it under twice its size after two
    /// (appended without checkpoints it would triple).
    #[test]
    fn journal_mode_keeps_the_store_current_and_its_wal_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("leases.db");
        let (w, _) = LeaseWriter::open(&db, m()).unwrap();
        let run = |periods: u32| {
            let started = Instant::now();
            while started.elapsed() < STORE_CHECKPOINT_EVERY * periods {
                for i in 0..50 {
                    commit(&w, &[bound(i)]);
                }
            }
        };
        run(2);
        let first = wal_len(&db);
        run(4);
        let second = wal_len(&db);
        assert!(
            second < first * 2,
            "WAL grew from {first} to {second} bytes: not checkpointed"
        );
        std::thread::sleep(STORE_SYNC_EVERY * 3);
        let reader = Store::open(&db).unwrap();
        assert_eq!(reader.leases().unwrap().len(), 50, "the store is current");
    }

    /// The journal is a ring: far more records than it has blocks are written, each block
    /// reused only after the store holds its records, and a restart finds the latest state.
    #[test]
    fn journal_ring_wraps_without_losing_leases() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("leases.db");
        let mode = Durability::Journal {
            blocks: journal::MIN_BLOCKS,
            writers: JOURNAL_WRITERS,
        };
        let (w, _) = LeaseWriter::open_with(&db, mode, m()).unwrap();
        let n = journal::MIN_BLOCKS as u32 * 3;
        for i in 0..n {
            commit(&w, &[bound(i % 100)]);
        }
        // The last change of each address: released for even ones.
        for i in (0..100).step_by(2) {
            let mut l = match bound(i) {
                LeaseChange::Upsert(l) => l,
                LeaseChange::Remove(_) => unreachable!(),
            };
            l.state = LeaseState::Released;
            commit(&w, &[LeaseChange::Upsert(l)]);
        }
        // Crash copy (journal included) and a clean restart agree.
        let copy = dir.path().join("copy.db");
        std::fs::copy(&db, &copy).unwrap();
        if Wal::wal_path(&db).exists() {
            std::fs::copy(Wal::wal_path(&db), Wal::wal_path(&copy)).unwrap();
        }
        std::fs::copy(journal::path_for(&db), journal::path_for(&copy)).unwrap();
        drop(w);
        for p in [&db, &copy] {
            let (_w, loaded) = LeaseWriter::open_with(p, mode, m()).unwrap();
            assert_eq!(loaded.len(), 100);
            for l in &loaded {
                let last = u32::from(l.ip) - 0x0a00_0000;
                let want = if last % 2 == 0 {
                    LeaseState::Released
                } else {
                    LeaseState::Bound
                };
                assert_eq!(l.state, want, "{}", l.ip);
            }
        }
    }

    /// Crash test: a child process (this test binary again) acknowledges leases as fast as
    /// the journal takes them, several batches in flight at once, and is killed with SIGKILL
    /// while doing so; after a restart every lease it reported acknowledged is in the store.
    /// Once with the store kept current (the journal wraps three times before the kill), once
    /// with the store left behind (the leases are in the journal only). (A process crash: the
    /// page cache survives. Power loss is what `O_DSYNC` is for; it cannot be simulated here.)
    #[test]
    fn every_acknowledged_lease_survives_kill_9() {
        // More than fit the journal when the store lags would block the child: fewer then.
        kill_9_after(journal::MIN_BLOCKS as usize * 3, false);
        kill_9_after(journal::MIN_BLOCKS as usize / 2, true);
    }

    fn kill_9_after(acks: usize, store_lags: bool) {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("leases.db");
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "persist::tests::crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CORRAL_DHCP_CRASH_DB", &db)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
        if store_lags {
            cmd.env("CORRAL_DHCP_CRASH_STORE_LAGS", "1");
        }
        let mut child = cmd.spawn().unwrap();
        let mut acked = Vec::new();
        let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        for line in lines {
            let line = line.unwrap();
            if let Some(i) = line.strip_prefix("acked ") {
                acked.push(i.parse::<u32>().unwrap());
                if acked.len() >= acks {
                    break;
                }
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert!(acked.len() >= acks, "child stopped early");
        if store_lags {
            let s = Store::open(&db).unwrap();
            assert!(s.leases().unwrap().is_empty(), "the store lags the journal");
        }
        let (_w, loaded) = LeaseWriter::open_with(
            &db,
            Durability::Journal {
                blocks: journal::MIN_BLOCKS,
                writers: JOURNAL_WRITERS,
            },
            m(),
        )
        .unwrap();
        let have: std::collections::HashSet<Ipv4Addr> = loaded
            .iter()
            .filter(|l| l.state == LeaseState::Bound)
            .map(|l| l.ip)
            .collect();
        let missing: Vec<u32> = acked
            .iter()
            .copied()
            .filter(|i| !have.contains(&Ipv4Addr::from(0x0a00_0000 + i)))
            .collect();
        assert!(
            missing.is_empty(),
            "store lagging: {store_lags}: acknowledged but lost: {missing:?}"
        );
    }

    /// The child of [`every_acknowledged_lease_survives_kill_9`]; does nothing on its own.
    #[test]
    #[ignore = "child process of every_acknowledged_lease_survives_kill_9"]
    fn crash_child() {
        use std::io::Write;
        let Some(db) = std::env::var_os("CORRAL_DHCP_CRASH_DB") else {
            return;
        };
        let (w, _) = LeaseWriter::open_with(
            Path::new(&db),
            Durability::Journal {
                blocks: journal::MIN_BLOCKS,
                writers: JOURNAL_WRITERS,
            },
            m(),
        )
        .unwrap();
        if std::env::var_os("CORRAL_DHCP_CRASH_STORE_LAGS").is_some() {
            w.pause_applier_for_test();
        }
        let mut out = std::io::stdout().lock();
        for round in 0u32.. {
            let waits: Vec<_> = (0..8)
                .map(|k| {
                    let i = round * 8 + k;
                    let (tx, rx) = oneshot::channel();
                    w.submit(&[bound(i)], UnixMillis(1), Some(tx));
                    (i, rx)
                })
                .collect();
            for (i, rx) in waits {
                if rx.blocking_recv().is_ok_and(|r| r.is_ok()) {
                    let _ = writeln!(out, "acked {i}");
                }
            }
            let _ = out.flush();
        }
    }

    /// A reply handed to the writer is sent by the writer thread once its lease is durable
    /// (the waiter is told it was sent, and when), and never when the write failed: then the
    /// waiter gets the error and nothing reaches the client.
    #[test]
    fn writer_sends_the_reply_only_after_a_durable_write() {
        use std::net::{SocketAddrV4, UdpSocket};
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let std::net::SocketAddr::V4(dest) = client.local_addr().unwrap() else {
            unreachable!("bound to an IPv4 address")
        };
        let server =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        server
            .bind(&SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0).into())
            .unwrap();
        server.set_nonblocking(true).unwrap();
        let server = Arc::new(server);
        let reply = |tag: &[u8]| DirectReply {
            sock: server.clone(),
            bytes: tag.to_vec(),
            dest,
        };
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("leases.db");
        let (w, _) = LeaseWriter::open(&db, m()).unwrap();
        let (tx, rx) = oneshot::channel();
        w.submit_with_reply(&[bound(1)], UnixMillis(1), Some(tx), Some(reply(b"ack-1")));
        let stamps = rx.blocking_recv().unwrap().expect("durable");
        let (started, sent) = stamps.sent.expect("sent by the writer");
        assert!(stamps.write_end <= started && started <= sent);
        let mut buf = [0u8; 64];
        let n = client.recv(&mut buf).expect("the reply arrived");
        assert_eq!(&buf[..n], b"ack-1");
        w.poison_for_test();
        let (tx, rx) = oneshot::channel();
        w.submit_with_reply(&[bound(2)], UnixMillis(1), Some(tx), Some(reply(b"ack-2")));
        assert!(rx.blocking_recv().unwrap().is_err(), "not durable");
        assert!(
            client.recv(&mut buf).is_err(),
            "no reply without a durable lease"
        );
    }

    /// Completion waits for the fsync and carries its outcome: after a failed fsync (here
    /// forced), no batch is reported durable, neither the one whose fsync failed nor later
    /// ones (their pages may have been dropped by the kernel), and the error says why.
    #[test]
    fn no_ack_without_a_successful_fsync() {
        for mode in [
            Durability::Journal {
                blocks: journal::MIN_BLOCKS,
                writers: JOURNAL_WRITERS,
            },
            Durability::Wal(SYNCERS),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let db = dir.path().join("leases.db");
            let (w, _) = LeaseWriter::open_with(&db, mode, m()).unwrap();
            commit(&w, &[bound(1)]);
            w.poison_for_test();
            for i in 2..5 {
                let (tx, rx) = oneshot::channel();
                w.submit(&[bound(i)], UnixMillis(1), Some(tx));
                let err = rx.blocking_recv().unwrap().expect_err("no durable answer");
                assert!(
                    err.contains("fsync") || err.contains("journal"),
                    "{mode:?}: {err}"
                );
            }
        }
    }

    /// A/B of the commit path on this machine's disk (run by hand, it takes 10 s):
    /// `cargo test -p corral-dhcp --release --lib -- --ignored --nocapture ack_latency`.
    /// Submits 5000 one-lease batches per second for 4 s and prints how long each took to
    /// become durable, with the journal, overlapping WAL fsyncs and `synchronous = FULL`.
    #[test]
    #[ignore = "measurement, prints figures; run by hand"]
    fn ack_latency_overlapped_vs_full() {
        let journal = |writers| Durability::Journal {
            blocks: journal::BLOCKS,
            writers,
        };
        for mode in [
            journal(1),
            journal(3),
            journal(6),
            Durability::Wal(3),
            journal(1),
            journal(3),
            journal(6),
            Durability::Wal(3),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let db = dir.path().join("leases.db");
            let (w, _) = LeaseWriter::open_with(&db, mode, m()).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut lat: Vec<f64> = rt.block_on(async {
                let mut waits = Vec::new();
                let start = Instant::now();
                for i in 0..20_000u32 {
                    let due = start + Duration::from_micros(u64::from(i) * 200);
                    tokio::time::sleep_until(due.into()).await;
                    let (tx, rx) = oneshot::channel();
                    let t = Instant::now();
                    w.submit(&[bound(i % 1000)], UnixMillis(1), Some(tx));
                    waits.push(tokio::spawn(async move {
                        rx.await.unwrap().unwrap();
                        t.elapsed().as_secs_f64() * 1000.0
                    }));
                }
                let mut out = Vec::new();
                for h in waits {
                    out.push(h.await.unwrap());
                }
                out
            });
            drop(w);
            lat.sort_by(f64::total_cmp);
            let p = |q: usize| lat[(lat.len() - 1) * q / 100];
            eprintln!(
                "{mode:?}: durable after p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                p(50),
                p(90),
                p(99),
                lat[lat.len() - 1]
            );
        }
    }
}
