//! Durable lease persistence with group commit.
//!
//! A dedicated thread owns the store connection (in `synchronous = FULL` mode). The packet
//! loop hands it batches of lease changes with a completion channel; the thread takes every
//! batch waiting (up to [`MAX_BATCH`] changes), writes them in one transaction, commits (one
//! fsync for all), and only then completes them, so that each ACK leaves after its lease is on
//! disk while thousands of clients share a handful of fsyncs per second.

use std::path::{Path, PathBuf};
use std::sync::mpsc;

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
        let leases = store
            .leases()
            .map_err(serr)?
            .into_iter()
            .filter_map(from_stored)
            .collect();
        let (tx, rx) = mpsc::channel::<Job>();
        let p: PathBuf = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("dhcp-leases".into())
            .spawn(move || run(store, rx, &p))
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
        let job = Job { writes, done };
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
        let result = store.write_leases(&writes).map_err(|e| {
            tracing::error!(path = %path.display(), error = %e, "persisting DHCP leases failed");
            e.to_string()
        });
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
