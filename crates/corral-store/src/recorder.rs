//! The never-blocking event recorder and its writer thread.
//!
//! Network paths call [`Recorder::record`], which only `try_send`s into a bounded channel. One
//! dedicated thread owns the [`Store`] and inserts what arrives in batches, one transaction per
//! batch, so the per-event cost is an insert and not a commit. Between batches the same thread
//! enforces [`Retention`] in small chunks, so deletions never hold the write lock for long.
//!
//! When the channel is full the event is dropped — a counted, logged decision: the count is
//! [`Recorder::dropped`], a rate-limited `warn!` says so, and when the writer catches up it
//! records a `store`/`dropped` event "dropped N events: channel full" in the store itself.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use corral_model::{Event, Outcome, Source, UnixMillis};

use crate::{Result, Retention, Store, StoreError};

/// Tuning of a [`Recorder`].
#[derive(Debug, Clone)]
pub struct RecorderConfig {
    /// How many events may wait for the writer before new ones are dropped.
    pub capacity: usize,
    /// The most events inserted in one transaction. Large batches matter: each commit writes
    /// every index page the batch touched, and the per-machine indexes (MAC, hostname) spread
    /// one batch over as many pages as there are machines; 8192 events per commit sustained about
    /// 10% more events/s than 1000 in `store_bench`.
    pub batch_max: usize,
    /// The longest the writer spends collecting one batch; also how often an idle writer
    /// wakes to check for retention work.
    pub batch_window: Duration,
    /// What history to keep.
    pub retention: Retention,
    /// How often retention runs when it has nothing pending.
    pub retention_interval: Duration,
    /// The most events one retention step deletes.
    pub retention_chunk: u32,
    /// The least time between two "dropping events" warnings.
    pub warn_interval: Duration,
}

impl Default for RecorderConfig {
    fn default() -> Self {
        RecorderConfig {
            capacity: 65_536,
            batch_max: 8192,
            batch_window: Duration::from_millis(50),
            retention: Retention::default(),
            retention_interval: Duration::from_secs(60),
            retention_chunk: 5000,
            warn_interval: Duration::from_secs(10),
        }
    }
}

enum Msg {
    Event(Box<Event>),
    Shutdown,
}

#[derive(Default)]
struct Progress {
    /// Events the writer has finished with (written, or lost to a write error).
    done: u64,
    /// The writer thread has exited.
    stopped: bool,
}

#[derive(Default)]
struct Pause {
    paused: bool,
    parked: bool,
}

struct Shared {
    path: PathBuf,
    capacity: usize,
    warn_interval: Duration,
    started: Instant,
    /// Events accepted into the channel.
    sent: AtomicU64,
    /// Events dropped because the channel was full or the writer had stopped.
    dropped: AtomicU64,
    /// Events lost because their batch failed to write.
    failed: AtomicU64,
    /// Mirror of `Progress::done`, readable without the lock (for [`Recorder::backlog`]).
    done: AtomicU64,
    /// Milliseconds since `started` of the last drop warning (-1: never).
    last_warn_ms: AtomicI64,
    progress: Mutex<Progress>,
    progress_cond: Condvar,
    pause: Mutex<Pause>,
    pause_cond: Condvar,
}

/// Locks a mutex, ignoring poisoning: the guarded data are counters that stay meaningful
/// even if a holder panicked.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A cheap, cloneable handle that records events without ever blocking.
///
/// ```
/// use corral_model::{Event, Outcome, Source, UnixMillis};
/// use corral_store::{EventFilter, Recorder, RecorderConfig, Store};
/// let rec = Recorder::spawn(Store::open_in_memory()?, RecorderConfig::default())?;
/// rec.record(Event::new(UnixMillis(1), Source::Tftp, "read", Outcome::Ok, "served pxelinux.0"));
/// let store = rec.shutdown()?.expect("first shutdown returns the store");
/// assert_eq!(store.events(&EventFilter::default())?.len(), 1);
/// # Ok::<(), corral_store::StoreError>(())
/// ```
#[derive(Clone)]
pub struct Recorder {
    tx: SyncSender<Msg>,
    shared: Arc<Shared>,
    writer: Arc<Mutex<Option<JoinHandle<Option<Store>>>>>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("path", &self.shared.path)
            .field("sent", &self.shared.sent.load(Ordering::Relaxed))
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// Opens (or creates) the store at `path` and starts its writer.
    pub fn open(path: impl AsRef<Path>, config: RecorderConfig) -> Result<Recorder> {
        Recorder::spawn(Store::open(path)?, config)
    }

    /// Starts a writer thread that owns `store`.
    pub fn spawn(store: Store, config: RecorderConfig) -> Result<Recorder> {
        let capacity = config.capacity.max(1);
        let (tx, rx) = mpsc::sync_channel(capacity);
        let shared = Arc::new(Shared {
            path: store.path.clone(),
            capacity,
            warn_interval: config.warn_interval,
            started: Instant::now(),
            sent: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            done: AtomicU64::new(0),
            last_warn_ms: AtomicI64::new(-1),
            progress: Mutex::new(Progress::default()),
            progress_cond: Condvar::new(),
            pause: Mutex::new(Pause::default()),
            pause_cond: Condvar::new(),
        });
        let writer = Writer {
            store,
            rx,
            shared: Arc::clone(&shared),
            config,
            reported_dropped: 0,
            next_retention: Instant::now(),
        };
        let handle = std::thread::Builder::new()
            .name("corral-store-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| StoreError::Io {
                op: "starting the writer thread for",
                path: shared.path.clone(),
                source: e,
            })?;
        Ok(Recorder {
            tx,
            shared,
            writer: Arc::new(Mutex::new(Some(handle))),
        })
    }

    /// Queues `event` for writing. Never blocks: when the queue is full (or the writer has
    /// stopped) the event is dropped and counted in [`Recorder::dropped`]. Returns whether it
    /// was queued.
    pub fn record(&self, event: Event) -> bool {
        match self.tx.try_send(Msg::Event(Box::new(event))) {
            Ok(()) => {
                self.shared.sent.fetch_add(1, Ordering::SeqCst);
                true
            }
            Err(TrySendError::Full(_)) => {
                self.note_drop("channel full");
                false
            }
            Err(TrySendError::Disconnected(_)) => {
                self.note_drop("writer stopped");
                false
            }
        }
    }

    fn note_drop(&self, why: &'static str) {
        let total = self.shared.dropped.fetch_add(1, Ordering::SeqCst) + 1;
        let now_ms = i64::try_from(self.shared.started.elapsed().as_millis()).unwrap_or(i64::MAX);
        let last = self.shared.last_warn_ms.load(Ordering::Relaxed);
        let interval = i64::try_from(self.shared.warn_interval.as_millis()).unwrap_or(i64::MAX);
        let due = last < 0 || now_ms.saturating_sub(last) >= interval;
        // Only the thread that wins the exchange warns, so a flood of drops logs one line per
        // interval.
        if due
            && self
                .shared
                .last_warn_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                path = %self.shared.path.display(),
                dropped_total = total,
                capacity = self.shared.capacity,
                "audit store is not keeping up: dropping events ({why})"
            );
        }
    }

    /// Events dropped so far because the queue was full or the writer had stopped.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::SeqCst)
    }

    /// Events accepted by [`Recorder::record`] so far.
    pub fn accepted(&self) -> u64 {
        self.shared.sent.load(Ordering::SeqCst)
    }

    /// Events lost because the database refused their batch (disk full, I/O error); each
    /// failure is also logged at error level.
    pub fn failed(&self) -> u64 {
        self.shared.failed.load(Ordering::SeqCst)
    }

    /// Events accepted but not yet written.
    pub fn backlog(&self) -> u64 {
        let done = self.shared.done.load(Ordering::SeqCst);
        self.accepted().saturating_sub(done)
    }

    /// The database file being written.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Waits until every event accepted before this call has been written (or has failed;
    /// see [`Recorder::failed`]). Blocks: not for network paths.
    pub fn flush(&self) -> Result<()> {
        let target = self.shared.sent.load(Ordering::SeqCst);
        let mut p = lock(&self.shared.progress);
        while p.done < target && !p.stopped {
            p = self
                .shared
                .progress_cond
                .wait(p)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if p.done < target {
            return Err(StoreError::WriterStopped {
                path: self.shared.path.clone(),
            });
        }
        Ok(())
    }

    /// Writes everything queued, stops the writer thread and waits for it. Returns the store
    /// to the first caller (`None` to later callers, or if the writer panicked). Events
    /// recorded afterwards through other clones are dropped and counted.
    pub fn shutdown(&self) -> Result<Option<Store>> {
        let Some(handle) = lock(&self.writer).take() else {
            return Ok(None);
        };
        // A blocking send: shutdown is not on a network path, and the writer is draining.
        let _ = self.tx.send(Msg::Shutdown);
        match handle.join() {
            Ok(store) => Ok(store),
            Err(_) => Err(StoreError::WriterStopped {
                path: self.shared.path.clone(),
            }),
        }
    }

    /// Test hook: parks the writer thread until the returned guard is dropped, so that tests
    /// can fill the queue deterministically. Waits until the writer is parked.
    #[doc(hidden)]
    pub fn pause_writer(&self) -> WriterPause {
        let mut p = lock(&self.shared.pause);
        p.paused = true;
        while !p.parked && !lock(&self.shared.progress).stopped {
            p = self
                .shared
                .pause_cond
                .wait_timeout(p, Duration::from_millis(10))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        WriterPause {
            shared: Arc::clone(&self.shared),
        }
    }
}

/// Keeps the writer parked while alive (see [`Recorder::pause_writer`]).
#[doc(hidden)]
pub struct WriterPause {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for WriterPause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriterPause")
    }
}

impl Drop for WriterPause {
    fn drop(&mut self) {
        lock(&self.shared.pause).paused = false;
        self.shared.pause_cond.notify_all();
    }
}

struct Writer {
    store: Store,
    rx: Receiver<Msg>,
    shared: Arc<Shared>,
    config: RecorderConfig,
    reported_dropped: u64,
    next_retention: Instant,
}

impl Writer {
    fn run(mut self) -> Option<Store> {
        let mut batch: Vec<Event> = Vec::with_capacity(self.config.batch_max);
        let mut retention_pending = false;
        loop {
            self.wait_while_paused();
            let mut stop = false;
            match self.rx.recv_timeout(self.config.batch_window) {
                Ok(Msg::Event(ev)) => batch.push(*ev),
                Ok(Msg::Shutdown) | Err(RecvTimeoutError::Disconnected) => stop = true,
                Err(RecvTimeoutError::Timeout) => {}
            }
            let deadline = Instant::now() + self.config.batch_window;
            // Take whatever is already queued, up to one batch; an empty queue commits at once,
            // so a quiet system writes each event within milliseconds.
            while !stop && !batch.is_empty() && batch.len() < self.config.batch_max {
                match self.rx.try_recv() {
                    Ok(Msg::Event(ev)) => batch.push(*ev),
                    Ok(Msg::Shutdown) | Err(TryRecvError::Disconnected) => stop = true,
                    Err(TryRecvError::Empty) => break,
                }
                if batch.len().is_multiple_of(64) && Instant::now() >= deadline {
                    break;
                }
            }
            self.write(&mut batch);
            if stop {
                self.drain(&mut batch);
                break;
            }
            retention_pending = self.retention_step(retention_pending);
        }
        {
            let mut p = lock(&self.shared.progress);
            p.stopped = true;
        }
        self.shared.progress_cond.notify_all();
        self.shared.pause_cond.notify_all();
        Some(self.store)
    }

    /// Writes everything still queued (shutdown).
    fn drain(&mut self, batch: &mut Vec<Event>) {
        loop {
            match self.rx.try_recv() {
                Ok(Msg::Event(ev)) => batch.push(*ev),
                Ok(Msg::Shutdown) => {}
                Err(_) => break,
            }
            if batch.len() >= self.config.batch_max {
                self.write(batch);
            }
        }
        self.write(batch);
    }

    /// Inserts `batch` (plus a dropped-events notice if needed) in one transaction.
    fn write(&mut self, batch: &mut Vec<Event>) {
        let user_events = batch.len() as u64;
        let dropped = self.shared.dropped.load(Ordering::SeqCst);
        if dropped > self.reported_dropped {
            let n = dropped - self.reported_dropped;
            self.reported_dropped = dropped;
            batch.push(
                Event::new(
                    UnixMillis::from_system_time(SystemTime::now()),
                    Source::Store,
                    "dropped",
                    Outcome::Warn,
                    format!("dropped {n} events: channel full"),
                )
                .with_details(serde_json::json!({
                    "dropped": n,
                    "dropped_total": dropped,
                    "capacity": self.shared.capacity,
                })),
            );
        }
        if batch.is_empty() {
            return;
        }
        if let Err(e) = self.store.insert_events(batch.iter()) {
            self.shared.failed.fetch_add(user_events, Ordering::SeqCst);
            tracing::error!(error = %e, events = batch.len(), "audit store write failed; events lost");
        }
        batch.clear();
        self.shared.done.fetch_add(user_events, Ordering::SeqCst);
        lock(&self.shared.progress).done += user_events;
        self.shared.progress_cond.notify_all();
    }

    /// Runs one retention step when due; returns whether more deletions are pending.
    fn retention_step(&mut self, pending: bool) -> bool {
        let policy = self.config.retention;
        if policy.is_unlimited() || (!pending && Instant::now() < self.next_retention) {
            return pending;
        }
        let now = UnixMillis::from_system_time(SystemTime::now());
        match self
            .store
            .enforce_retention(&policy, now, self.config.retention_chunk)
        {
            Ok(step) => {
                if step.deleted > 0 {
                    tracing::debug!(deleted = step.deleted, more = step.more, "retention step");
                }
                if !step.more {
                    self.next_retention = Instant::now() + self.config.retention_interval;
                }
                step.more
            }
            Err(e) => {
                tracing::error!(error = %e, "audit store retention failed");
                self.next_retention = Instant::now() + self.config.retention_interval;
                false
            }
        }
    }

    fn wait_while_paused(&self) {
        let mut p = lock(&self.shared.pause);
        if !p.paused {
            return;
        }
        p.parked = true;
        self.shared.pause_cond.notify_all();
        while p.paused {
            p = self
                .shared
                .pause_cond
                .wait(p)
                .unwrap_or_else(PoisonError::into_inner);
        }
        p.parked = false;
    }
}
