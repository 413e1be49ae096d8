//! The DHCP service's own timings and counters, for operators: where an answer's time goes
//! inside the server, readable while it runs as Prometheus text ([`prometheus_text`]) and
//! logged when it stops.
//!
//! Every [`serve`](crate::serve) registers its metrics, labelled with its interface;
//! the histograms are lock-free (fixed log-linear buckets of atomics), so recording costs a few
//! atomic additions on the packet path. The names, all prefixed `corral_dhcp_`:
//!
//! | metric | type | what |
//! |--------|------|------|
//! | `requests_received_total` | counter | datagrams read from the DHCP and PXE sockets |
//! | `requests_unanswered_total{reason}` | counter | `no_reply`: nothing to answer (RELEASE, DECLINE, not for us, malformed); `unstored`: the lease could not be made durable, so no ACK |
//! | `reply_seconds{path}` | histogram | receive to send, in the server: `immediate` (OFFER, NAK, INFORM, proxy answers: no lease written) and `durable` (an ACK, sent after its lease is in the journal) |
//! | `ack_stage_seconds{stage}` | histogram | each durable reply's time by stage: `decide` (receive to the lease change handed to the writer), `queue` (until a journal writer took it), `batch` (until its record's write started: batching, encoding, waiting for journal space), `journal_write` (its record's `O_DSYNC` write), `complete` (write returned to the reply's send starting: the other replies of its batch, sent first, or the wake-up of the packet loop when the writer could not send it), `send` (the send itself) |
//! | `journal_write_seconds` | histogram | each journal record's `O_DSYNC` write (one per batch of ACKs) |
//! | `journal_records_total`, `journal_lease_changes_total`, `journal_space_waits_total` | counter | records written, lease changes in them, and records that waited for the store to free journal blocks |
//! | `store_seconds{op}` | histogram | the applier's work behind the journal, off every ACK's path: `commit` into SQLite, `sync` (WAL fdatasync), `checkpoint` |
//!
//! The stages of one ACK add up to its `reply_seconds{path="durable"}`; what the server
//! cannot see is the time a request waited in the socket's queue before it was read, and the
//! client's own scheduling (compare with the client's figure).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use corral_model::prometheus::escape_label;

use crate::latency::{Histogram, prometheus_bounds_us};

/// The metrics of one DHCP service (one interface).
#[derive(Debug, Default)]
pub(crate) struct DhcpMetrics {
    interface: String,
    pub(crate) received: AtomicU64,
    pub(crate) no_reply: AtomicU64,
    pub(crate) unstored: AtomicU64,
    pub(crate) immediate: Histogram,
    pub(crate) durable: Histogram,
    pub(crate) stages: AckStages,
    pub(crate) journal: JournalMetrics,
}

/// Each durable reply's time by stage (see the module's table).
#[derive(Debug, Default)]
pub(crate) struct AckStages {
    pub(crate) decide: Histogram,
    pub(crate) queue: Histogram,
    pub(crate) batch: Histogram,
    pub(crate) journal_write: Histogram,
    pub(crate) complete: Histogram,
    pub(crate) send: Histogram,
}

/// The lease writer's figures (journal mode).
#[derive(Debug, Default)]
pub(crate) struct JournalMetrics {
    /// Each journal record write (`O_DSYNC`).
    pub(crate) write: Histogram,
    /// How long the oldest job of each record waited before its write started.
    pub(crate) wait: Histogram,
    /// From a job's submission until it was durable (what an ACK waits for).
    pub(crate) durable: Histogram,
    /// Lease changes journaled, and the most in one record.
    pub(crate) changes: AtomicU64,
    pub(crate) max_changes: AtomicU64,
    /// Records that waited for free journal blocks (the store behind).
    pub(crate) space_waits: AtomicU64,
    /// The applier's commits into the store, its WAL fsyncs, and its checkpoints.
    pub(crate) store_commit: Histogram,
    pub(crate) store_sync: Histogram,
    pub(crate) store_checkpoint: Histogram,
}

/// When a durable reply's lease change went through the writer: what
/// [`AckStages`] is computed from (the answering task adds the rest).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stamps {
    /// Handed to the writer.
    pub(crate) queued: Instant,
    /// Taken by a writer thread.
    pub(crate) taken: Instant,
    /// Its record's write (or the commit, in the WAL modes) started.
    pub(crate) write_start: Instant,
    /// Durable.
    pub(crate) write_end: Instant,
    /// When the writer thread started and finished sending the reply itself, if it did.
    pub(crate) sent: Option<(Instant, Instant)>,
}

impl DhcpMetrics {
    /// Metrics not listed by [`prometheus_text`] (tests, the writer opened on its own).
    pub(crate) fn unregistered(interface: &str) -> Arc<DhcpMetrics> {
        Arc::new(DhcpMetrics {
            interface: interface.to_owned(),
            ..DhcpMetrics::default()
        })
    }

    /// One durable reply sent at `sent`: its stages, from the writer's `stamps` and the
    /// answering task's `received`, `resumed` (its send started) and `sent`.
    pub(crate) fn record_ack(
        &self,
        received: Instant,
        s: &Stamps,
        resumed: Instant,
        sent: Instant,
    ) {
        let st = &self.stages;
        st.decide
            .record(s.queued.saturating_duration_since(received));
        st.queue.record(s.taken.saturating_duration_since(s.queued));
        st.batch
            .record(s.write_start.saturating_duration_since(s.taken));
        st.journal_write
            .record(s.write_end.saturating_duration_since(s.write_start));
        st.complete
            .record(resumed.saturating_duration_since(s.write_end));
        st.send.record(sent.saturating_duration_since(resumed));
        self.durable
            .record(sent.saturating_duration_since(received));
    }

    /// The answer times and stages as one log line's fields (logged when the service stops).
    pub(crate) fn log(&self) {
        let st = &self.stages;
        tracing::info!(
            interface = %self.interface,
            received = self.received.load(Ordering::Relaxed),
            no_reply = self.no_reply.load(Ordering::Relaxed),
            unstored = self.unstored.load(Ordering::Relaxed),
            immediate = self.immediate.count(),
            immediate_ms_p50 = self.immediate.percentile_ms(50),
            immediate_ms_p99 = self.immediate.percentile_ms(99),
            immediate_ms_max = self.immediate.percentile_ms(100),
            after_durable = self.durable.count(),
            after_durable_ms_p50 = self.durable.percentile_ms(50),
            after_durable_ms_p99 = self.durable.percentile_ms(99),
            after_durable_ms_max = self.durable.percentile_ms(100),
            decide_ms_p99 = st.decide.percentile_ms(99),
            queue_ms_p99 = st.queue.percentile_ms(99),
            batch_ms_p99 = st.batch.percentile_ms(99),
            journal_write_ms_p50 = st.journal_write.percentile_ms(50),
            journal_write_ms_p99 = st.journal_write.percentile_ms(99),
            complete_ms_p50 = st.complete.percentile_ms(50),
            complete_ms_p99 = st.complete.percentile_ms(99),
            complete_ms_max = st.complete.percentile_ms(100),
            send_ms_p99 = st.send.percentile_ms(99),
            "DHCP answer times"
        );
    }
}

/// Every running service's metrics (dropped services fall out).
static REGISTRY: Mutex<Vec<Weak<DhcpMetrics>>> = Mutex::new(Vec::new());

/// New metrics for the service on `interface`, listed by [`prometheus_text`] while it lives.
pub(crate) fn register(interface: &str) -> Arc<DhcpMetrics> {
    let m = DhcpMetrics::unregistered(interface);
    if let Ok(mut r) = REGISTRY.lock() {
        r.retain(|w| w.strong_count() > 0);
        r.push(Arc::downgrade(&m));
    }
    m
}

/// The metrics of every DHCP service running in this process, in the Prometheus text
/// exposition format (version 0.0.4), for a `/metrics` endpoint. The names and what they
/// measure are in this module's documentation; all carry an `interface` label.
pub fn prometheus_text() -> String {
    let live: Vec<Arc<DhcpMetrics>> = REGISTRY
        .lock()
        .map(|r| r.iter().filter_map(Weak::upgrade).collect())
        .unwrap_or_default();
    let mut out = String::new();
    type Counters = fn(&DhcpMetrics) -> Vec<(String, u64)>;
    let counters: [(&str, &str, Counters); 5] = [
        (
            "requests_received_total",
            "DHCP and PXE datagrams read.",
            |m| vec![(String::new(), m.received.load(Ordering::Relaxed))],
        ),
        (
            "requests_unanswered_total",
            "Requests not answered: nothing to answer (no_reply) or lease not durable (unstored).",
            |m| {
                vec![
                    (
                        ",reason=\"no_reply\"".into(),
                        m.no_reply.load(Ordering::Relaxed),
                    ),
                    (
                        ",reason=\"unstored\"".into(),
                        m.unstored.load(Ordering::Relaxed),
                    ),
                ]
            },
        ),
        (
            "journal_records_total",
            "Lease journal records written.",
            |m| vec![(String::new(), m.journal.write.count())],
        ),
        (
            "journal_lease_changes_total",
            "Lease changes written to the lease journal.",
            |m| vec![(String::new(), m.journal.changes.load(Ordering::Relaxed))],
        ),
        (
            "journal_space_waits_total",
            "Journal records that waited for the store to free journal blocks.",
            |m| vec![(String::new(), m.journal.space_waits.load(Ordering::Relaxed))],
        ),
    ];
    for (name, help, get) in counters {
        let _ = writeln!(out, "# HELP corral_dhcp_{name} {help}");
        let _ = writeln!(out, "# TYPE corral_dhcp_{name} counter");
        for m in &live {
            for (labels, v) in get(m) {
                let _ = writeln!(
                    out,
                    "corral_dhcp_{name}{{interface=\"{}\"{labels}}} {v}",
                    escape_label(&m.interface)
                );
            }
        }
    }
    type Hists = fn(&DhcpMetrics) -> Vec<(&'static str, &Histogram)>;
    let histograms: [(&str, &str, Hists); 4] = [
        (
            "reply_seconds",
            "Receive to send in the server, by path (immediate, or durable: after the lease journal write).",
            |m| {
                vec![
                    ("path=\"immediate\"", &m.immediate),
                    ("path=\"durable\"", &m.durable),
                ]
            },
        ),
        (
            "ack_stage_seconds",
            "Each durable reply's time by stage (they add up to reply_seconds{path=\"durable\"}).",
            |m| {
                let s = &m.stages;
                vec![
                    ("stage=\"decide\"", &s.decide),
                    ("stage=\"queue\"", &s.queue),
                    ("stage=\"batch\"", &s.batch),
                    ("stage=\"journal_write\"", &s.journal_write),
                    ("stage=\"complete\"", &s.complete),
                    ("stage=\"send\"", &s.send),
                ]
            },
        ),
        (
            "journal_write_seconds",
            "Each lease journal record's O_DSYNC write.",
            |m| vec![("", &m.journal.write)],
        ),
        (
            "store_seconds",
            "The applier's work behind the journal (off every ACK's path), by operation.",
            |m| {
                let j = &m.journal;
                vec![
                    ("op=\"commit\"", &j.store_commit),
                    ("op=\"sync\"", &j.store_sync),
                    ("op=\"checkpoint\"", &j.store_checkpoint),
                ]
            },
        ),
    ];
    for (name, help, get) in histograms {
        let _ = writeln!(out, "# HELP corral_dhcp_{name} {help}");
        let _ = writeln!(out, "# TYPE corral_dhcp_{name} histogram");
        for m in &live {
            for (label, h) in get(m) {
                let labels = if label.is_empty() {
                    format!("interface=\"{}\"", escape_label(&m.interface))
                } else {
                    format!("interface=\"{}\",{label}", escape_label(&m.interface))
                };
                write_histogram(&mut out, name, &labels, h);
            }
        }
    }
    out
}

fn write_histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    // Read the total first: buckets recorded meanwhile never exceed +Inf's count below.
    let count = h.count();
    for us in prometheus_bounds_us() {
        let _ = writeln!(
            out,
            "corral_dhcp_{name}_bucket{{{labels},le=\"{}\"}} {}",
            f64::from(us) / 1e6,
            h.count_below_us(us).min(count)
        );
    }
    let _ = writeln!(
        out,
        "corral_dhcp_{name}_bucket{{{labels},le=\"+Inf\"}} {count}"
    );
    let _ = writeln!(
        out,
        "corral_dhcp_{name}_sum{{{labels}}} {}",
        h.sum_seconds()
    );
    let _ = writeln!(out, "corral_dhcp_{name}_count{{{labels}}} {count}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A registered service's figures appear in the text with its interface, cumulative
    /// buckets that never decrease and end at the count, and disappear once it is dropped.
    #[test]
    fn prometheus_text_lists_live_services_with_cumulative_buckets() {
        let m = register("test-if\"0");
        m.received.fetch_add(3, Ordering::Relaxed);
        let t0 = Instant::now();
        let s = Stamps {
            queued: t0 + Duration::from_micros(50),
            taken: t0 + Duration::from_micros(150),
            write_start: t0 + Duration::from_micros(200),
            write_end: t0 + Duration::from_micros(1200),
            sent: None,
        };
        m.record_ack(
            t0,
            &s,
            t0 + Duration::from_micros(1500),
            t0 + Duration::from_micros(1600),
        );
        let text = prometheus_text();
        assert!(text.contains("corral_dhcp_requests_received_total{interface=\"test-if\\\"0\"} 3"));
        let want = [
            ("stage=\"decide\"", "0.000064", 1),
            ("stage=\"journal_write\"", "0.001024", 1),
            ("stage=\"journal_write\"", "0.000768", 0),
            ("stage=\"complete\"", "0.000256", 0),
            ("stage=\"complete\"", "0.000384", 1),
        ];
        for (stage, le, n) in want {
            let line = format!(
                "corral_dhcp_ack_stage_seconds_bucket{{interface=\"test-if\\\"0\",{stage},le=\"{le}\"}} {n}"
            );
            assert!(text.contains(&line), "{line} missing");
        }
        let durable: Vec<u64> = text
            .lines()
            .filter(|l| {
                l.starts_with(
                    "corral_dhcp_reply_seconds_bucket{interface=\"test-if\\\"0\",path=\"durable\"",
                )
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert!(durable.len() > 10);
        assert!(durable.windows(2).all(|w| w[0] <= w[1]), "{durable:?}");
        assert_eq!(durable.last(), Some(&1));
        assert_eq!(
            durable.iter().filter(|&&c| c == 0).count(),
            10,
            "1.6 ms: above 1.536 ms"
        );
        drop(m);
        assert!(!prometheus_text().contains("test-if"));
    }
}
