//! Machine state writes, off the network path.
//!
//! Every boot decision updates the machine's row (last seen, last IP, next action, sometimes
//! the lifecycle state). Doing that as SQLite transactions inside the DHCP decision made every
//! DHCP answer wait for a commit. The [`StateWriter`] takes the updates instead: the caller
//! merges its update into an in-memory map keyed by MAC (so a machine that sends DISCOVER,
//! REQUEST and its iPXE DHCP within milliseconds costs one row write), and a thread with its
//! own connection commits whatever is pending in one transaction.
//!
//! Reads must see the caller's own writes before the thread commits them: [`StateWriter::state`]
//! answers from the pending and in-flight maps first; only when neither holds a state for the
//! MAC does the engine read the store. The in-flight map is cleared only after the commit, so
//! no moment exists where an update is neither in a map nor in the database.
//!
//! Where a change must be on disk before the answer (the installer's done callback: a lost
//! `installed` would mean a reinstall loop), the caller [`StateWriter::flush`]es.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use corral_model::{LifecycleState, MacAddr};
use corral_store::{MachineUpdate, Store};

use crate::NetbootError;

#[derive(Debug, Default)]
struct Queue {
    /// Updates not yet taken by the writer, merged per machine.
    pending: HashMap<MacAddr, MachineUpdate>,
    /// Updates being committed right now.
    in_flight: HashMap<MacAddr, MachineUpdate>,
    /// How many updates were ever queued.
    queued: u64,
    /// How many of those were committed or failed.
    done: u64,
    /// The most recent failed batches: the update numbers they held (`from` exclusive, `upto`
    /// inclusive) and why they failed.
    failures: std::collections::VecDeque<(u64, u64, String)>,
    stop: bool,
    /// The writer thread has ended (stopped or panicked): nothing queued will be written.
    dead: bool,
}

#[derive(Debug, Default)]
struct Shared {
    queue: Mutex<Queue>,
    cond: Condvar,
}

fn lock(m: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Held by the writer thread: when it ends, however it ends (a panic included), waiters are
/// woken and told, and later updates are refused instead of piling up unread.
struct Alive<'a>(&'a Shared);

impl Drop for Alive<'_> {
    fn drop(&mut self) {
        let mut q = lock(&self.0.queue);
        q.dead = true;
        if !q.stop {
            tracing::error!(
                lost = q.pending.len() + q.in_flight.len(),
                "the machine state writer stopped unexpectedly; machine state is no longer stored"
            );
        }
        drop(q);
        self.0.cond.notify_all();
    }
}

/// The machine-state writer thread and its queue. Dropping it writes what is pending and
/// stops the thread.
#[derive(Debug)]
pub struct StateWriter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl StateWriter {
    /// Starts the writer on `store` (a connection of its own).
    pub fn spawn(store: Store) -> Result<StateWriter, NetbootError> {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("corral-state-wr".into())
            .spawn(move || run(store, &s))
            .map_err(|e| NetbootError::Io {
                op: "starting the machine state writer",
                path: std::path::PathBuf::new(),
                source: e,
            })?;
        Ok(StateWriter {
            shared,
            thread: Some(thread),
        })
    }

    /// Queues `update`; never blocks on the database. Returns the update's number, for
    /// [`StateWriter::flush`].
    pub fn update(&self, update: MachineUpdate) -> u64 {
        let mut q = lock(&self.shared.queue);
        q.queued += 1;
        let seq = q.queued;
        if q.dead {
            // Nobody would ever write it; `flush(seq)` reports the writer's death.
            return seq;
        }
        match q.pending.get_mut(&update.mac) {
            Some(u) => u.merge(update),
            None => {
                q.pending.insert(update.mac, update);
            }
        }
        drop(q);
        self.shared.cond.notify_all();
        seq
    }

    /// The lifecycle state of `mac` that is queued or being written, if any: newer than what
    /// the store holds.
    pub fn state(&self, mac: MacAddr) -> Option<LifecycleState> {
        let q = lock(&self.shared.queue);
        q.pending
            .get(&mac)
            .and_then(|u| u.state)
            .or_else(|| q.in_flight.get(&mac).and_then(|u| u.state))
    }

    /// Waits until update number `seq` (and every one before it) is written. `Err` says why
    /// the database refused the batch that held it.
    pub fn flush(&self, seq: u64) -> Result<(), String> {
        let mut q = lock(&self.shared.queue);
        while q.done < seq {
            if q.dead || self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                return Err("the machine state writer has stopped".into());
            }
            q = self
                .shared
                .cond
                .wait(q)
                .unwrap_or_else(PoisonError::into_inner);
        }
        match q
            .failures
            .iter()
            .find(|(from, upto, _)| *from < seq && seq <= *upto)
        {
            Some((_, _, why)) => Err(why.clone()),
            None => Ok(()),
        }
    }
}

impl Drop for StateWriter {
    fn drop(&mut self) {
        lock(&self.shared.queue).stop = true;
        self.shared.cond.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(mut store: Store, shared: &Shared) {
    let _alive = Alive(shared);
    loop {
        let mut q = lock(&shared.queue);
        while q.pending.is_empty() && !q.stop {
            q = shared.cond.wait(q).unwrap_or_else(PoisonError::into_inner);
        }
        if q.pending.is_empty() {
            return;
        }
        q.in_flight = std::mem::take(&mut q.pending);
        let from = q.done;
        let upto = q.queued;
        let batch: Vec<MachineUpdate> = q.in_flight.values().cloned().collect();
        drop(q);

        let result = store.update_machines(&batch);

        let mut q = lock(&shared.queue);
        q.in_flight.clear();
        q.done = upto;
        if let Err(e) = result {
            tracing::error!(error = %e, machines = batch.len(), "cannot store machine state; these updates are lost");
            if q.failures.len() == 64 {
                q.failures.pop_front();
            }
            q.failures.push_back((from, upto, e.to_string()));
        }
        drop(q);
        shared.cond.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_model::UnixMillis;

    fn mac(n: u8) -> MacAddr {
        MacAddr([0x52, 0x54, 0, 0, 0, n])
    }

    #[test]
    fn queued_state_is_visible_at_once_and_durable_after_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let reader = Store::open(&path).unwrap();
        let w = StateWriter::spawn(Store::open(&path).unwrap()).unwrap();
        let mut u = MachineUpdate::new(mac(1), UnixMillis(1));
        u.state = Some(LifecycleState::Discovered);
        u.seen = Some(UnixMillis(1));
        w.update(u);
        // A later update without a state does not hide the queued one.
        let mut u2 = MachineUpdate::new(mac(1), UnixMillis(2));
        u2.seen = Some(UnixMillis(2));
        let seq = w.update(u2);
        assert_eq!(w.state(mac(1)), Some(LifecycleState::Discovered));
        assert_eq!(w.state(mac(2)), None);
        w.flush(seq).unwrap();
        let m = reader.machine(mac(1)).unwrap().unwrap();
        assert_eq!(m.state, Some(LifecycleState::Discovered));
        assert_eq!(m.last_seen, Some(UnixMillis(2)));
    }

    #[test]
    fn never_a_moment_where_the_state_is_nowhere() {
        // Readers poll while the writer commits: each read must see the new state either in
        // the queue or in the database.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let reader = Store::open(&path).unwrap();
        let w = StateWriter::spawn(Store::open(&path).unwrap()).unwrap();
        let mut last = 0;
        for i in 0..200u8 {
            let m = mac(i);
            let mut u = MachineUpdate::new(m, UnixMillis(i.into()));
            u.state = Some(LifecycleState::Install);
            last = w.update(u);
            for _ in 0..3 {
                let seen = w
                    .state(m)
                    .or_else(|| reader.machine(m).unwrap().and_then(|r| r.state));
                assert_eq!(seen, Some(LifecycleState::Install), "machine {i}");
            }
        }
        w.flush(last).unwrap();
        assert_eq!(reader.machines().unwrap().len(), 200);
    }

    #[test]
    fn a_refused_batch_is_reported_to_its_flusher_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let w = StateWriter::spawn(Store::open(&path).unwrap()).unwrap();
        let ok = w.update(MachineUpdate::new(mac(1), UnixMillis(1)));
        w.flush(ok).unwrap();
        // Break the database under the writer (the sqlite3 shell is one of the test packages).
        let st = std::process::Command::new("sqlite3")
            .arg(&path)
            .arg("DROP TABLE machines")
            .status();
        match st {
            Ok(s) if s.success() => {}
            other => {
                eprintln!("SKIPPED: the sqlite3 shell is not available ({other:?})");
                return;
            }
        }
        let bad = w.update(MachineUpdate::new(mac(2), UnixMillis(2)));
        let err = w.flush(bad).unwrap_err();
        assert!(err.contains("machines"), "{err}");
        // The earlier, committed update is not blamed for the later failure.
        w.flush(ok).unwrap();
    }

    #[test]
    fn drop_writes_what_is_pending() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        {
            let w = StateWriter::spawn(Store::open(&path).unwrap()).unwrap();
            for i in 0..50u8 {
                let mut u = MachineUpdate::new(mac(i), UnixMillis(5));
                u.next_action = Some("boot from local disk".into());
                w.update(u);
            }
        }
        let reader = Store::open(&path).unwrap();
        let all = reader.machines().unwrap();
        assert_eq!(all.len(), 50);
        assert!(
            all.iter()
                .all(|m| m.next_action.as_deref() == Some("boot from local disk"))
        );
    }

    #[test]
    fn a_dead_writer_fails_flush_at_once_and_queues_nothing() {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let _alive = Alive(&s);
            // Dies (as a panic in the store would) while a flush is already waiting.
            go_rx.recv().unwrap();
            panic!("simulated writer death");
        });
        let w = StateWriter {
            shared,
            thread: Some(thread),
        };
        let seq = w.update(MachineUpdate::new(mac(1), UnixMillis(1)));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|sc| {
            sc.spawn(|| tx.send(w.flush(seq)).unwrap());
            std::thread::sleep(std::time::Duration::from_millis(50));
            go_tx.send(()).unwrap();
            let r = rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("flush must not hang when the writer dies");
            assert!(r.unwrap_err().contains("stopped"));
        });
        let later = w.update(MachineUpdate::new(mac(2), UnixMillis(1)));
        assert!(w.flush(later).is_err());
        assert!(
            !lock(&w.shared.queue).pending.contains_key(&mac(2)),
            "nothing is queued after the writer died"
        );
    }
}
