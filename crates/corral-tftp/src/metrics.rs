//! The TFTP server's counters, for operators: readable while it runs as Prometheus text
//! ([`prometheus_text`]).
//!
//! Every [`serve`](crate::serve) registers its counters, labelled with the address it listens
//! on (`listen`); they are plain atomics, so counting costs one atomic addition on the packet
//! path. The names, all prefixed `corral_tftp_`:
//!
//! | metric | type | what |
//! |--------|------|------|
//! | `transfers_started_total` | counter | transfers that began (file open, first packet due) |
//! | `transfers_completed_total` | counter | transfers whose last block was acknowledged |
//! | `transfers_failed_total{reason}` | counter | transfers that began and ended early: `timeout` (no ACK after the retries), `client_error` (the client sent ERROR, e.g. code 8 after an OACK), `protocol` (the client sent something else), `read_error` (the file could not be read), `shutdown` (the server stopped), `other` |
//! | `requests_refused_total{reason}` | counter | requests that got no transfer (all but `other` with an ERROR packet): `not_found`, `denied` (access violation: the netboot layer's refusal, a path outside the root, a write request), `bad_request` (illegal operation, bad option values), `busy` (`max_transfers` reached), `other` (e.g. no transfer socket could be bound) |
//! | `active_transfers` | gauge | transfers running now |
//! | `data_bytes_sent_total` | counter | payload bytes of the DATA packets sent, retransmissions included |
//! | `blocks_retransmitted_total` | counter | DATA packets sent again, counted when their transfer completes |
//! | `errors_sent_total` | counter | ERROR packets sent (refusals, failed transfers, unknown transfer IDs) |

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use corral_model::prometheus::escape_label;
use corral_tftp_proto::{ErrorCode, FailReason, packet::DATA_HEADER};

/// Why a transfer that began ended early (label `reason` of `transfers_failed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    Timeout,
    ClientError,
    Protocol,
    ReadError,
    Shutdown,
    Other,
}

impl Failure {
    const ALL: [Failure; 6] = [
        Failure::Timeout,
        Failure::ClientError,
        Failure::Protocol,
        Failure::ReadError,
        Failure::Shutdown,
        Failure::Other,
    ];

    fn label(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::ClientError => "client_error",
            Failure::Protocol => "protocol",
            Failure::ReadError => "read_error",
            Failure::Shutdown => "shutdown",
            Failure::Other => "other",
        }
    }

    /// The class of the state machine's reason.
    pub(crate) fn of(r: &FailReason) -> Failure {
        match r {
            FailReason::Timeout { .. } => Failure::Timeout,
            FailReason::PeerError { .. } => Failure::ClientError,
            FailReason::Protocol { .. } => Failure::Protocol,
            FailReason::Read { .. } => Failure::ReadError,
        }
    }
}

/// Why a request got an ERROR instead of a transfer (label `reason` of
/// `requests_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    NotFound,
    Denied,
    BadRequest,
    Busy,
    Other,
}

impl Refusal {
    const ALL: [Refusal; 5] = [
        Refusal::NotFound,
        Refusal::Denied,
        Refusal::BadRequest,
        Refusal::Busy,
        Refusal::Other,
    ];

    fn label(self) -> &'static str {
        match self {
            Refusal::NotFound => "not_found",
            Refusal::Denied => "denied",
            Refusal::BadRequest => "bad_request",
            Refusal::Busy => "busy",
            Refusal::Other => "other",
        }
    }

    /// The class of the error code a refusal is sent with.
    pub(crate) fn of(code: ErrorCode) -> Refusal {
        match code {
            ErrorCode::FileNotFound => Refusal::NotFound,
            ErrorCode::AccessViolation => Refusal::Denied,
            ErrorCode::IllegalOperation | ErrorCode::OptionNegotiation => Refusal::BadRequest,
            _ => Refusal::Other,
        }
    }
}

/// The counters of one TFTP server (one listening socket).
#[derive(Debug, Default)]
pub(crate) struct TftpMetrics {
    listen: String,
    started: AtomicU64,
    completed: AtomicU64,
    failed: [AtomicU64; Failure::ALL.len()],
    refused: [AtomicU64; Refusal::ALL.len()],
    active: AtomicU64,
    data_bytes: AtomicU64,
    retransmitted: AtomicU64,
    errors_sent: AtomicU64,
}

impl TftpMetrics {
    /// Counters not listed by [`prometheus_text`].
    pub(crate) fn unregistered(listen: &str) -> Arc<TftpMetrics> {
        Arc::new(TftpMetrics {
            listen: listen.to_owned(),
            ..TftpMetrics::default()
        })
    }

    /// A transfer began; it counts as active until [`TftpMetrics::ended`].
    pub(crate) fn started(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    /// A transfer that [`TftpMetrics::started`] ended: completed (`Ok` with the blocks it sent
    /// again) or failed.
    pub(crate) fn ended(&self, outcome: Result<u64, Failure>) {
        match outcome {
            Ok(retransmitted) => {
                self.completed.fetch_add(1, Ordering::Relaxed);
                self.retransmitted
                    .fetch_add(retransmitted, Ordering::Relaxed);
            }
            Err(f) => {
                self.failed[f as usize].fetch_add(1, Ordering::Relaxed);
            }
        }
        // Paired with `started`: never below zero.
        let _ = self
            .active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// A request got no transfer.
    pub(crate) fn refused(&self, why: Refusal) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// One packet handed to the socket: DATA payload and ERROR packets are counted.
    pub(crate) fn sent(&self, packet: &[u8]) {
        match packet.get(..2) {
            Some([0, 3]) => {
                let payload = packet.len().saturating_sub(DATA_HEADER) as u64;
                self.data_bytes.fetch_add(payload, Ordering::Relaxed);
            }
            Some([0, 5]) => {
                self.errors_sent.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// A run of packets of `seg` bytes each (the last one may be shorter) handed to the
    /// socket at once (UDP GSO).
    pub(crate) fn sent_run(&self, batch: &[u8], seg: usize) {
        for p in batch.chunks(seg.max(1)) {
            self.sent(p);
        }
    }
}

/// Every running server's counters (stopped servers fall out).
static REGISTRY: Mutex<Vec<Weak<TftpMetrics>>> = Mutex::new(Vec::new());

/// New counters for the server listening on `listen`, listed by [`prometheus_text`] while
/// they live.
pub(crate) fn register(listen: &str) -> Arc<TftpMetrics> {
    let m = TftpMetrics::unregistered(listen);
    if let Ok(mut r) = REGISTRY.lock() {
        r.retain(|w| w.strong_count() > 0);
        r.push(Arc::downgrade(&m));
    }
    m
}

/// The counters of every TFTP server running in this process, in the Prometheus text
/// exposition format (version 0.0.4), for a `/metrics` endpoint. The names and what they count
/// are in this module's documentation; all carry a `listen` label.
pub fn prometheus_text() -> String {
    let live: Vec<Arc<TftpMetrics>> = REGISTRY
        .lock()
        .map(|r| r.iter().filter_map(Weak::upgrade).collect())
        .unwrap_or_default();
    let mut out = String::new();
    type Series = fn(&TftpMetrics) -> Vec<(String, u64)>;
    let families: [(&str, &str, &str, Series); 8] = [
        (
            "transfers_started_total",
            "counter",
            "TFTP transfers that began.",
            |m| vec![(String::new(), m.started.load(Ordering::Relaxed))],
        ),
        (
            "transfers_completed_total",
            "counter",
            "TFTP transfers whose last block was acknowledged.",
            |m| vec![(String::new(), m.completed.load(Ordering::Relaxed))],
        ),
        (
            "transfers_failed_total",
            "counter",
            "TFTP transfers that began and ended early, by reason.",
            |m| {
                Failure::ALL
                    .iter()
                    .map(|f| {
                        (
                            format!(",reason=\"{}\"", f.label()),
                            m.failed[*f as usize].load(Ordering::Relaxed),
                        )
                    })
                    .collect()
            },
        ),
        (
            "requests_refused_total",
            "counter",
            "TFTP read requests answered with an ERROR and no transfer, by reason.",
            |m| {
                Refusal::ALL
                    .iter()
                    .map(|r| {
                        (
                            format!(",reason=\"{}\"", r.label()),
                            m.refused[*r as usize].load(Ordering::Relaxed),
                        )
                    })
                    .collect()
            },
        ),
        (
            "active_transfers",
            "gauge",
            "TFTP transfers running now.",
            |m| vec![(String::new(), m.active.load(Ordering::Relaxed))],
        ),
        (
            "data_bytes_sent_total",
            "counter",
            "Payload bytes of the TFTP DATA packets sent, retransmissions included.",
            |m| vec![(String::new(), m.data_bytes.load(Ordering::Relaxed))],
        ),
        (
            "blocks_retransmitted_total",
            "counter",
            "TFTP DATA packets sent again, counted when their transfer completes.",
            |m| vec![(String::new(), m.retransmitted.load(Ordering::Relaxed))],
        ),
        (
            "errors_sent_total",
            "counter",
            "TFTP ERROR packets sent.",
            |m| vec![(String::new(), m.errors_sent.load(Ordering::Relaxed))],
        ),
    ];
    for (name, kind, help, series) in families {
        let _ = writeln!(out, "# HELP corral_tftp_{name} {help}");
        let _ = writeln!(out, "# TYPE corral_tftp_{name} {kind}");
        for m in &live {
            for (labels, v) in series(m) {
                let _ = writeln!(
                    out,
                    "corral_tftp_{name}{{listen=\"{}\"{labels}}} {v}",
                    escape_label(&m.listen)
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// Packets are classified by opcode, a transfer's end moves it out of the gauge, and the
    /// text has one HELP and TYPE per family and the server's series until it is dropped.
    #[test]
    fn counts_packets_and_outcomes_per_listening_socket() {
        let m = register("127.0.0.9:6\"9");
        let l = "listen=\"127.0.0.9:6\\\"9\"";
        m.started();
        m.started();
        // Two DATA packets of 512 and 100 payload bytes laid out as one GSO run, an ACK-sized
        // oddity, and an ERROR.
        let mut run = vec![0u8; 516 + 104];
        run[..2].copy_from_slice(&[0, 3]);
        run[516..518].copy_from_slice(&[0, 3]);
        m.sent_run(&run, 516);
        m.sent(&[0, 4, 0, 1]);
        m.sent(b"\x00\x05\x00\x01file not found\x00");
        m.ended(Ok(3));
        m.ended(Err(Failure::Timeout));
        m.ended(Err(Failure::Timeout)); // unpaired: the gauge stays at zero
        m.refused(Refusal::of(ErrorCode::FileNotFound));
        m.refused(Refusal::Busy);
        let text = prometheus_text();
        let want = [
            ("transfers_started_total", "", 2),
            ("transfers_completed_total", "", 1),
            ("transfers_failed_total", ",reason=\"timeout\"", 2),
            ("transfers_failed_total", ",reason=\"client_error\"", 0),
            ("requests_refused_total", ",reason=\"not_found\"", 1),
            ("requests_refused_total", ",reason=\"busy\"", 1),
            ("active_transfers", "", 0),
            ("data_bytes_sent_total", "", 612),
            ("blocks_retransmitted_total", "", 3),
            ("errors_sent_total", "", 1),
        ];
        for (name, labels, v) in want {
            let series = format!("corral_tftp_{name}{{{l}{labels}}}");
            assert_eq!(value(&text, &series), Some(v), "{series} in\n{text}");
        }
        for family in [
            "transfers_started_total",
            "transfers_failed_total",
            "active_transfers",
        ] {
            let ty = format!("# TYPE corral_tftp_{family} ");
            assert_eq!(text.matches(&ty).count(), 1, "{ty}");
        }
        assert!(text.contains("# TYPE corral_tftp_active_transfers gauge\n"));
        drop(m);
        assert!(!prometheus_text().contains("127.0.0.9"));
    }
}
