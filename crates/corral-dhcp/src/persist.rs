//! Durable lease persistence: group commit with overlapping fsyncs.
//!
//! A dedicated thread owns the store connection. The packet loop hands it batches of lease
//! changes with a completion channel; the thread takes every batch waiting (up to
//! [`MAX_BATCH`] changes) and commits them in one transaction with `synchronous = NORMAL`
//! (the WAL pages are written, not yet fsynced), hands the committed batch to one of
//! [`SYNCERS`] syncing threads and goes on with the next batch. A syncer takes every committed
//! batch waiting, `fdatasync`s the WAL ([`Wal`]) and only then completes them, so each ACK
//! leaves after its lease is on disk. Because the next syncer starts its fsync while the
//! previous one is still in flight, an ACK waits for about one fsync instead of the rest of
//! the one in flight plus its own (what one `synchronous = FULL` commit after another costs).
//! If the WAL cannot be opened the writer falls back to `synchronous = FULL` commits.
//!
//! The writer's connection never checkpoints the WAL itself (a checkpoint inside a commit
//! would hold up every ACK of that batch and of the batches queued behind it): a second
//! connection on its own thread checkpoints passively every [`CHECKPOINT_EVERY`], so the WAL
//! restarts from its beginning and stays small. When the writer stops it logs a summary
//! (batch size, commit and fsync times, time to durable, p50/p99).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use corral_dhcp_proto::{Lease, LeaseChange, LeaseState};
use corral_model::UnixMillis;
use corral_store::{LeaseStatus, LeaseWrite, Store, StoredLease};
use tokio::sync::oneshot;

use crate::error::DhcpError;
use crate::latency::Histogram;

/// The most lease changes committed in one transaction.
pub const MAX_BATCH: usize = 1024;

/// Outcome of one persisted batch: `Err` carries the store's message.
pub(crate) type Done = oneshot::Sender<Result<(), String>>;

struct Job {
    writes: Vec<LeaseWrite>,
    done: Option<Done>,
    queued: Instant,
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
    writes: u64,
    max_writes: u32,
    /// Each fsync of the WAL.
    sync: Histogram,
    /// From a job's submission until it was durable (what an ACK waits for).
    durable: Histogram,
}

impl Stats {
    fn log(&mut self, path: &Path) {
        let commits = self.commit.count();
        if commits == 0 {
            return;
        }
        tracing::info!(
            path = %path.display(),
            commits,
            writes_per_commit = format!("{:.1}", self.writes as f64 / commits as f64),
            max_writes = self.max_writes,
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
    /// The WAL the syncers fsync (`None` with `synchronous = FULL`).
    #[cfg_attr(not(test), allow(dead_code))]
    wal: Option<Arc<Wal>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LeaseWriter {
    /// Opens the store, loads its leases, and starts the writer.
    pub(crate) fn open(path: &Path) -> Result<(LeaseWriter, Vec<Lease>), DhcpError> {
        LeaseWriter::open_with(path, SYNCERS)
    }

    /// [`LeaseWriter::open`] with `syncers` syncing threads; 0 commits with
    /// `synchronous = FULL` instead (one fsync inside each commit), for comparisons.
    fn open_with(path: &Path, syncers: usize) -> Result<(LeaseWriter, Vec<Lease>), DhcpError> {
        let serr = |source| DhcpError::Store {
            path: path.to_path_buf(),
            source: Box::new(source),
        };
        let store = Store::open(path).map_err(serr)?;
        // Checkpoints run on their own connection and thread (see `checkpointer`): a commit
        // that an ACK waits for is then only the WAL append and its fsync.
        store.disable_auto_checkpoint().map_err(serr)?;
        let checkpoints = Store::open(path).map_err(serr)?;
        let leases = store
            .leases()
            .map_err(serr)?
            .into_iter()
            .filter_map(from_stored)
            .collect();
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
        let wal_handle = wal.clone();
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
                wal: wal_handle,
                thread: Some(thread),
            },
            leases,
        ))
    }

    /// Makes every later fsync fail, as after a real fsync error.
    #[cfg(test)]
    fn poison_wal_for_test(&self) {
        if let Some(w) = &self.wal {
            w.poisoned.store(true, std::sync::atomic::Ordering::Release);
        }
    }

    /// Queues `changes`; `done` is completed after they are durable.
    pub(crate) fn submit(&self, changes: &[LeaseChange], now: UnixMillis, done: Option<Done>) {
        let writes = changes.iter().map(|c| to_write(c, now)).collect();
        let job = Job {
            writes,
            done,
            queued: Instant::now(),
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
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Syncing threads: while one fsyncs the WAL, the next committed batch starts its own fsync
/// at once instead of waiting for the one in flight, so an ACK waits for about one fsync.
/// Three had the steadiest tail in the `ack_latency_overlapped_vs_full` measurement on a
/// loaded shared disk (p99 to durable 8-33 ms, where two had 8-213 ms and one, which does not
/// overlap, 15-244 ms; bench/dhcp/RESULTS.md, run 6).
pub(crate) const SYNCERS: usize = 3;

/// A committed (not yet durable) batch on its way to a syncer.
struct Committed {
    jobs: Vec<Job>,
}

fn run(
    store: Store,
    wal: Option<Arc<Wal>>,
    n_syncers: usize,
    rx: mpsc::Receiver<Job>,
    path: &Path,
) {
    let stats = Arc::new(Mutex::new(Stats::default()));
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
        if let Ok(mut st) = stats.lock() {
            st.wait.record(started - jobs[0].queued);
            st.commit.record(started.elapsed());
            st.writes += writes.len() as u64;
            st.max_writes = st
                .max_writes
                .max(u32::try_from(writes.len()).unwrap_or(u32::MAX));
        }
        tracing::trace!(
            jobs = jobs.len(),
            writes = writes.len(),
            "lease batch committed"
        );
        match result {
            // Committed into the WAL's page cache: durable after a syncer's fsync.
            Ok(()) if !syncers.is_empty() => {
                if let Err(mpsc::SendError(c)) = sync_tx.send(Committed { jobs }) {
                    complete(c.jobs, &Err("lease syncer threads stopped".into()), &stats);
                }
            }
            // synchronous = FULL: the commit was the fsync.
            r => complete(jobs, &r, &stats),
        }
    }
    drop(sync_tx);
    for t in syncers {
        let _ = t.join();
    }
    if let Ok(mut st) = stats.lock() {
        st.log(path);
    }
}

/// Tells each job's waiter the outcome; records how long its changes took to become durable.
fn complete(jobs: Vec<Job>, result: &Result<(), String>, stats: &Mutex<Stats>) {
    let now = Instant::now();
    if let Ok(mut st) = stats.lock() {
        for j in &jobs {
            st.durable.record(now - j.queued);
        }
    }
    for j in jobs {
        if let Some(d) = j.done {
            let _ = d.send(result.clone());
        }
    }
}

/// One syncing thread: takes every committed batch waiting, fsyncs the WAL (which covers all
/// of them: their writes returned before the fsync started), then completes them.
fn syncer(wal: &Wal, rx: &Mutex<mpsc::Receiver<Committed>>, stats: &Mutex<Stats>, path: &Path) {
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
        if let Ok(mut st) = stats.lock() {
            st.sync.record(started.elapsed());
        }
        for c in batches {
            complete(c.jobs, &result, stats);
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
    poisoned: std::sync::atomic::AtomicBool,
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
            poisoned: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// `fdatasync` of the WAL: every commit that returned before this call is durable when it
    /// returns `Ok`.
    pub(crate) fn sync(&self) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt;
        use std::sync::atomic::Ordering;
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
        let (w, loaded) = LeaseWriter::open(&db).unwrap();
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
        let (_w, loaded) = LeaseWriter::open(&db).unwrap();
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

    /// An ACK's lease is in the WAL when the ACK may leave: a copy of the database and its
    /// WAL taken at that moment, without a clean shutdown or a checkpoint, has it (SQLite's
    /// recovery replays the WAL). This is the state a crash leaves behind.
    #[test]
    fn acknowledged_leases_survive_without_a_clean_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("leases.db");
        let (w, _) = LeaseWriter::open(&db).unwrap();
        for i in 0..30 {
            commit(&w, &[bound(i)]);
        }
        // Snapshot the files while the writer still runs (no drop, no final checkpoint).
        let crash = dir.path().join("crash");
        std::fs::create_dir(&crash).unwrap();
        std::fs::copy(&db, crash.join("leases.db")).unwrap();
        let wal = Wal::wal_path(&db);
        if wal.exists() {
            std::fs::copy(&wal, Wal::wal_path(&crash.join("leases.db"))).unwrap();
        }
        let (_w2, loaded) = LeaseWriter::open(&crash.join("leases.db")).unwrap();
        assert_eq!(loaded.len(), 30, "every acknowledged lease recovered");
        drop(w);
    }

    /// Completion waits for the fsync and carries its outcome: after a failed fsync (here
    /// forced), no batch is reported durable, neither the one whose fsync failed nor later
    /// ones (their pages may have been dropped by the kernel), and the error says why.
    #[test]
    fn no_ack_without_a_successful_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("leases.db");
        let (w, _) = LeaseWriter::open(&db).unwrap();
        commit(&w, &[bound(1)]);
        w.poison_wal_for_test();
        for i in 2..5 {
            let (tx, rx) = oneshot::channel();
            w.submit(&[bound(i)], UnixMillis(1), Some(tx));
            let err = rx.blocking_recv().unwrap().expect_err("no durable answer");
            assert!(err.contains("fsync"), "{err}");
        }
    }

    /// A/B of the commit path on this machine's disk (run by hand, it takes 10 s):
    /// `cargo test -p corral-dhcp --release --lib -- --ignored --nocapture ack_latency`.
    /// Submits 2500 one-lease batches per second for 4 s and prints how long each took to
    /// become durable, with overlapping fsyncs and with `synchronous = FULL`.
    #[test]
    #[ignore = "measurement, prints figures; run by hand"]
    fn ack_latency_overlapped_vs_full() {
        for syncers in [3, 2, 1, 0, 3, 2, 1, 0] {
            let dir = tempfile::tempdir().unwrap();
            let db = dir.path().join("leases.db");
            let (w, _) = LeaseWriter::open_with(&db, syncers).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut lat: Vec<f64> = rt.block_on(async {
                let mut waits = Vec::new();
                let start = Instant::now();
                for i in 0..10_000u32 {
                    let due = start + Duration::from_micros(u64::from(i) * 400);
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
                "syncers {syncers} (0: synchronous=FULL): durable after p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                p(50),
                p(90),
                p(99),
                lat[lat.len() - 1]
            );
        }
    }
}
