//! Durable lease persistence with group commit.
//!
//! A dedicated thread owns the store connection (in `synchronous = FULL` mode). The packet
//! loop hands it batches of lease changes with a completion channel; the thread takes every
//! batch waiting (up to [`MAX_BATCH`] changes), writes them in one transaction, commits (one
//! fsync for all), and only then completes them, so that each ACK leaves after its lease is on
//! disk while thousands of clients share a handful of fsyncs per second.
//!
//! The writer's connection never checkpoints the WAL itself (a checkpoint inside a commit
//! would hold up every ACK of that batch and of the batches queued behind it): a second
//! connection on its own thread checkpoints passively every [`CHECKPOINT_EVERY`], so the WAL
//! restarts from its beginning and stays small. When the writer stops it logs a summary of
//! its commits (count, batch size, commit time and queueing before a commit, p50/p99).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use corral_dhcp_proto::{Lease, LeaseChange, LeaseState};
use corral_model::UnixMillis;
use corral_store::{LeaseStatus, LeaseWrite, Store, StoredLease};
use tokio::sync::oneshot;

use crate::error::DhcpError;

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
/// where an ACK's latency goes (waiting for the commit before, the commit itself).
#[derive(Default)]
struct Stats {
    /// Microseconds each commit (the transaction and its fsync) took.
    commit_us: Vec<u32>,
    /// Microseconds the oldest job of each batch waited before its commit started.
    wait_us: Vec<u32>,
    /// Lease changes per commit.
    writes: Vec<u32>,
}

impl Stats {
    fn log(&mut self, path: &Path) {
        if self.commit_us.is_empty() {
            return;
        }
        let pct = |v: &mut Vec<u32>, p: usize| {
            v.sort_unstable();
            let i = (v.len() - 1) * p / 100;
            f64::from(v[i]) / 1000.0
        };
        let total: u64 = self.writes.iter().map(|&w| u64::from(w)).sum();
        let commits = self.commit_us.len();
        tracing::info!(
            path = %path.display(),
            commits,
            writes_per_commit = format!("{:.1}", total as f64 / commits as f64),
            max_writes = self.writes.iter().max().copied().unwrap_or(0),
            commit_ms_p50 = pct(&mut self.commit_us, 50),
            commit_ms_p99 = pct(&mut self.commit_us, 99),
            commit_ms_max = pct(&mut self.commit_us, 100),
            wait_ms_p50 = pct(&mut self.wait_us, 50),
            wait_ms_p99 = pct(&mut self.wait_us, 99),
            "DHCP lease writer stopped"
        );
    }
}

/// Handle to the writer thread; dropping it stops the thread after it drains its queue.
#[derive(Debug)]
pub(crate) struct LeaseWriter {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LeaseWriter {
    /// Opens the store, loads its leases, and starts the writer.
    pub(crate) fn open(path: &Path) -> Result<(LeaseWriter, Vec<Lease>), DhcpError> {
        let serr = |source| DhcpError::Store {
            path: path.to_path_buf(),
            source: Box::new(source),
        };
        let store = Store::open(path).map_err(serr)?;
        store.set_durable(true).map_err(serr)?;
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
                run(store, rx, &p);
                drop(stop_tx);
                let _ = checkpointer.join();
            })
            .map_err(DhcpError::Thread)?;
        Ok((
            LeaseWriter {
                tx: Some(tx),
                thread: Some(thread),
            },
            leases,
        ))
    }

    /// Queues `changes`; `done` is completed after they are committed.
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

fn run(store: Store, rx: mpsc::Receiver<Job>, path: &Path) {
    let mut stats = Stats::default();
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
        let us = |d: std::time::Duration| u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        stats.wait_us.push(us(started - jobs[0].queued));
        let result = store.write_leases(&writes).map_err(|e| {
            tracing::error!(path = %path.display(), error = %e, "persisting DHCP leases failed");
            e.to_string()
        });
        stats.commit_us.push(us(started.elapsed()));
        stats
            .writes
            .push(u32::try_from(writes.len()).unwrap_or(u32::MAX));
        tracing::trace!(
            jobs = jobs.len(),
            writes = writes.len(),
            "lease batch committed"
        );
        for j in jobs {
            if let Some(d) = j.done {
                let _ = d.send(result.clone());
            }
        }
    }
    stats.log(path);
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
}
