//! The sender state machine.
//!
//! Phases: **announcing** (Announce + manifest chunks every `announce_interval` until the start
//! condition holds), **pass** (one in-order pass over the data blocks, paced by a token bucket,
//! with repair interleaved but capped at `repair_share` of the bytes sent), **draining** (only
//! repair and periodic Announce, until every live receiver is Done or failed; a receiver that
//! made no progress for `linger` (its Status shows no new verified block) is failed), **finished** (End sent, [`SenderEvent::Finished`] emitted).
//!
//! Repair policy: each NAK line says how many more symbols a receiver needs for a block and the
//! highest symbol index it has seen. Symbols the sender sent after that index within the last
//! `repair_guard` are assumed still in flight and subtracted; what remains is merged into the
//! block's pending repair as a **maximum** over receivers, and answered with that many *fresh*
//! parity symbols (indices never sent before for that block while any remain).
//!
//! Receivers far behind the stream are not repaired by multicast: when the sender has a TCP
//! catch-up port, a receiver whose NAKs (each block counted once) ask for more than
//! `catchup_nak_share` of the source symbols sent so far, or whose verified blocks lag the pass
//! by more than `catchup_lag_blocks`, is sent a CatchUp packet and its NAKs are ignored from
//! then on: it fetches what it lacks over TCP, and the multicast stream stays near the image's
//! size for everyone else.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::block::{BlockSource, EncodedBlock, Parity, parity_count};
use crate::error::ConfigError;
use crate::manifest::SignedManifest;
use crate::packet::{self, Announce, Body, Data, NakEntry, Packet, Status};
use crate::{Dest, MANIFEST_CHUNK_LEN, SessionId, Transmit};

/// Sender settings. `Default` gives sensible LAN values.
#[derive(Debug, Clone, PartialEq)]
pub struct SenderConfig {
    /// Send rate in bits per second (UDP payload bytes × 8).
    pub rate_bps: u64,
    /// Lowest rate adaptive control may choose.
    pub min_rate_bps: u64,
    /// Highest rate adaptive control may climb to while the median receiver loses nothing
    /// (below `rate_bps`: `rate_bps`, which is also where it starts).
    pub max_rate_bps: u64,
    /// AIMD on the loss the *median* receiver reports (never on the slowest alone).
    pub adaptive: bool,
    /// Start once this many receivers hold the manifest (and `min_wait` has passed).
    pub min_receivers: usize,
    /// Receiver names expected; start as soon as all of them hold the manifest (and
    /// `min_wait` has passed). Those that never join are listed in the summary.
    pub expected_receivers: Vec<String>,
    /// Never start before this.
    pub min_wait: Duration,
    /// Start at this time whatever joined (`None`: wait for the quorum forever).
    pub max_wait: Option<Duration>,
    /// A receiver silent this long is declared failed and never waited for again.
    pub dead_after: Duration,
    /// After the pass, a receiver that has verified no new block for this long is failed. A
    /// receiver still making progress (repair, TCP catch-up at its link's rate) is waited for.
    pub linger: Duration,
    /// How often Announce is multicast (and the manifest, before the start).
    pub announce_interval: Duration,
    /// TCP catch-up port advertised in Announce (0: none).
    pub tcp_port: u16,
    /// Most of the bytes sent during the pass that may be repair (0.0..=1.0), so the pass
    /// never waits for anyone.
    pub repair_share: f64,
    /// Repair sent this recently is assumed still in flight when a NAK arrives.
    pub repair_guard: Duration,
    /// Extra fraction of repair symbols sent on top of the aggregated need (0.0 = exact).
    pub repair_margin: f64,
    /// Token bucket depth in bytes.
    pub burst_bytes: u32,
    /// Encoded blocks (with parity) kept for repair.
    pub repair_cache_blocks: usize,
    /// Least time between unicast manifest copies to one late joiner.
    pub manifest_resend_interval: Duration,
    /// Most receivers tracked; Joins beyond it are ignored and counted (bounds the memory a
    /// flood of forged Joins can take).
    pub max_receivers: usize,
    /// A receiver whose NAKs, counting each block once, ask for more than this share of the
    /// source symbols sent so far is moved to unicast catch-up (only with a `tcp_port`;
    /// checked once at least [`CATCHUP_MIN_SYMBOLS`] were sent; 1.0 never).
    pub catchup_nak_share: f64,
    /// A receiver whose last Status shows it more than this many blocks behind the pass is
    /// moved to unicast catch-up (only with a `tcp_port`; 0: never).
    pub catchup_lag_blocks: u32,
}

/// Source symbols the pass must have sent before a NAK share can move a receiver to unicast
/// catch-up (so that one unlucky first block does not).
pub const CATCHUP_MIN_SYMBOLS: u64 = 1024;

/// Least time between CatchUp packets to one receiver that keeps NAKing (the first may be lost).
const CATCHUP_RESEND: Duration = Duration::from_millis(200);

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig {
            rate_bps: 500_000_000,
            min_rate_bps: 10_000_000,
            max_rate_bps: 0,
            adaptive: false,
            min_receivers: 1,
            expected_receivers: Vec::new(),
            min_wait: Duration::ZERO,
            max_wait: None,
            dead_after: Duration::from_secs(2),
            linger: Duration::from_secs(60),
            announce_interval: Duration::from_millis(200),
            tcp_port: 0,
            repair_share: 0.05,
            repair_guard: Duration::from_millis(20),
            repair_margin: 0.0,
            burst_bytes: 64 * 1024,
            repair_cache_blocks: 16,
            manifest_resend_interval: Duration::from_secs(1),
            max_receivers: 10_000,
            catchup_nak_share: 0.2,
            catchup_lag_blocks: 256,
        }
    }
}

impl SenderConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.rate_bps == 0 {
            return Err(ConfigError::Invalid {
                field: "rate_bps",
                why: "must be > 0",
            });
        }
        if !(0.0..=1.0).contains(&self.repair_share) {
            return Err(ConfigError::Invalid {
                field: "repair_share",
                why: "must be within 0.0..=1.0",
            });
        }
        if !(0.0..=1.0).contains(&self.catchup_nak_share) {
            return Err(ConfigError::Invalid {
                field: "catchup_nak_share",
                why: "must be within 0.0..=1.0",
            });
        }
        if !(0.0..=10.0).contains(&self.repair_margin) {
            return Err(ConfigError::Invalid {
                field: "repair_margin",
                why: "must be within 0.0..=10.0",
            });
        }
        if self.dead_after.is_zero() {
            return Err(ConfigError::Invalid {
                field: "dead_after",
                why: "must be > 0",
            });
        }
        if self.announce_interval.is_zero() {
            return Err(ConfigError::Invalid {
                field: "announce_interval",
                why: "must be > 0",
            });
        }
        Ok(())
    }
}

/// Why the pass started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartReason {
    /// `min_receivers` hold the manifest.
    Quorum,
    /// Every expected receiver holds the manifest.
    AllExpected,
    /// `max_wait` passed.
    MaxWait,
}

/// How one receiver's session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverOutcome {
    /// It reported the image verified on disk.
    Verified,
    /// It reported failure, fell silent, or did not finish in time.
    Failed {
        /// Why.
        reason: String,
    },
    /// It was expected but never joined.
    NeverJoined,
    /// Still running (only in progress snapshots, never in a final summary).
    InProgress,
}

/// One receiver in the final summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiverSummary {
    /// Its id (`None` for an expected receiver that never joined).
    pub id: Option<u64>,
    /// Its name.
    pub name: String,
    /// Its address, if it joined.
    pub addr: Option<SocketAddr>,
    /// Result and why.
    pub outcome: ReceiverOutcome,
    /// Blocks verified, from its last status.
    pub blocks_done: u32,
    /// Bytes verified, from its last status.
    pub bytes_done: u64,
    /// NAK packets received from it.
    pub naks: u64,
}

/// Counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SenderStats {
    /// Source symbols sent in the pass.
    pub source_packets: u64,
    /// Symbol bytes sent in the pass.
    pub source_bytes: u64,
    /// Repair symbols sent.
    pub repair_packets: u64,
    /// Repair symbol bytes sent.
    pub repair_bytes: u64,
    /// Announce and manifest packets.
    pub control_packets: u64,
    /// NAK packets received.
    pub naks_received: u64,
    /// Packets that failed to decode or were for another session.
    pub rejected_packets: u64,
    /// Receivers moved to unicast catch-up (far behind the stream).
    pub moved_to_unicast: u64,
    /// NAK entries ignored because their receiver was moved to unicast catch-up.
    pub naks_ignored: u64,
}

/// The honest end of a session.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionSummary {
    /// The session.
    pub session: SessionId,
    /// Every receiver ever seen, and expected ones that never joined.
    pub receivers: Vec<ReceiverSummary>,
    /// Traffic counters.
    pub stats: SenderStats,
    /// From start of the pass to the end (zero if it never started).
    pub duration: Duration,
    /// Set when the sender aborted (e.g. the block source failed).
    pub aborted: Option<String>,
}

impl SessionSummary {
    /// Receivers that verified the image.
    pub fn verified(&self) -> usize {
        self.receivers
            .iter()
            .filter(|r| r.outcome == ReceiverOutcome::Verified)
            .count()
    }
}

/// Things the driver should record or show.
#[derive(Debug, Clone, PartialEq)]
pub enum SenderEvent {
    /// A receiver joined for the first time.
    ReceiverJoined {
        /// Its id.
        id: u64,
        /// Its name.
        name: String,
        /// Its address.
        addr: SocketAddr,
    },
    /// A receiver reported progress.
    ReceiverProgress {
        /// Its id.
        id: u64,
        /// Its name.
        name: String,
        /// The report.
        status: Status,
    },
    /// A receiver reported its result.
    ReceiverDone {
        /// Its id.
        id: u64,
        /// Its name.
        name: String,
        /// Verified on disk.
        ok: bool,
        /// Its reason text.
        reason: String,
    },
    /// A receiver was declared failed by the sender (silence, no finish in time).
    ReceiverFailed {
        /// Its id.
        id: u64,
        /// Its name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A receiver is too far behind the stream for multicast repair: it was told to fetch
    /// what it lacks over TCP catch-up, and its NAKs are no longer answered by multicast.
    ReceiverToUnicast {
        /// Its id.
        id: u64,
        /// Its name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The pass started.
    Started {
        /// Receivers holding the manifest at the start.
        receivers: usize,
        /// Why now.
        reason: StartReason,
    },
    /// Adaptive rate control changed the rate.
    RateChanged {
        /// New rate.
        rate_bps: u64,
        /// Median loss fraction that drove it.
        median_loss: f64,
    },
    /// The in-order pass is complete; only repair follows.
    PassComplete,
    /// The block source failed; the session is aborted (a `Finished` follows).
    Aborted {
        /// The block that could not be read.
        block: u32,
        /// The I/O error.
        error: String,
    },
    /// The session is over.
    Finished(SessionSummary),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Announcing,
    Pass,
    Draining,
    Ending,
    Finished,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RxState {
    Active,
    Done { ok: bool, reason: String },
    Failed { reason: String },
}

#[derive(Debug)]
struct Rx {
    id: u64,
    name: String,
    addr: SocketAddr,
    last_heard: Instant,
    /// When its Status last showed more verified blocks than before.
    last_progress: Instant,
    has_manifest: bool,
    state: RxState,
    status: Status,
    last_loss: Option<f64>,
    naks: u64,
    manifest_sent_at: Option<Instant>,
    /// Moved to unicast catch-up: NAKs ignored. When the CatchUp packet was last sent.
    unicast: Option<Instant>,
    /// Blocks whose NAK was counted towards `nak_symbols` (one bit per block; empty until its
    /// first NAK).
    nak_counted: Vec<u64>,
    /// Symbols its NAKs asked for, each block counted once.
    nak_symbols: u64,
}

impl Rx {
    /// Marks it failed (never waited for again) and reports why.
    fn fail(&mut self, reason: String, events: &mut VecDeque<SenderEvent>) {
        self.state = RxState::Failed {
            reason: reason.clone(),
        };
        events.push_back(SenderEvent::ReceiverFailed {
            id: self.id,
            name: self.name.clone(),
            reason,
        });
    }
}

#[derive(Debug, Clone, Copy)]
struct BlockRepair {
    k: u16,
    /// Repair symbols sent so far (`j`: parity `j` while `j < r`, then source symbols again).
    sent: u32,
    last_sent: Instant,
}

#[derive(Debug)]
struct Cached {
    block: u32,
    enc: Arc<EncodedBlock>,
    parity: Option<Arc<Parity>>,
}

/// The sender state machine. See the [crate docs](crate) for the driver loop.
#[derive(Debug)]
pub struct Sender {
    cfg: SenderConfig,
    manifest: Arc<SignedManifest>,
    session: SessionId,
    manifest_hash: [u8; 32],
    phase: Phase,
    created: Instant,
    started_at: Option<Instant>,
    pass_done_at: Option<Instant>,
    rxs: Vec<Rx>,
    by_id: HashMap<u64, usize>,
    // pacing
    rate_bps: u64,
    tokens: f64,
    last_refill: Instant,
    // pass
    cur_block: u32,
    cur_esi: u16,
    cur: Option<Arc<EncodedBlock>>,
    pass_pos: u32,
    // repair
    repair: HashMap<u32, BlockRepair>,
    pending: BTreeMap<u32, u32>,
    cache: VecDeque<Cached>,
    // queues
    control: VecDeque<(Dest, Vec<u8>)>,
    manifest_queue: VecDeque<(Dest, u32)>,
    next_announce: Instant,
    ends_left: u8,
    next_check: Instant,
    next_adapt: Instant,
    /// Paced (data) bytes handed out so far, and that count and the time at the last
    /// adaptive-rate step: what the sender really sent in between.
    paced_bytes: u64,
    adapt_mark: (Instant, u64),
    events: VecDeque<SenderEvent>,
    stats: SenderStats,
    aborted: Option<String>,
}

impl Sender {
    /// A sender for `manifest`, starting to announce at `now`.
    pub fn new(
        cfg: SenderConfig,
        manifest: SignedManifest,
        now: Instant,
    ) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let session = manifest.manifest().session;
        let burst = f64::from(cfg.burst_bytes.max(4096));
        Ok(Sender {
            rate_bps: cfg.rate_bps,
            manifest_hash: manifest.hash(),
            manifest: Arc::new(manifest),
            session,
            phase: Phase::Announcing,
            created: now,
            started_at: None,
            pass_done_at: None,
            rxs: Vec::new(),
            by_id: HashMap::new(),
            tokens: burst,
            last_refill: now,
            cur_block: 0,
            cur_esi: 0,
            cur: None,
            pass_pos: 0,
            repair: HashMap::new(),
            pending: BTreeMap::new(),
            cache: VecDeque::new(),
            control: VecDeque::new(),
            manifest_queue: VecDeque::new(),
            next_announce: now,
            ends_left: 0,
            next_check: now,
            next_adapt: now,
            paced_bytes: 0,
            adapt_mark: (now, 0),
            events: VecDeque::new(),
            stats: SenderStats::default(),
            aborted: None,
            cfg,
        })
    }

    /// The session id.
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// The signed manifest being sent (the driver serves it over TCP too).
    pub fn manifest(&self) -> &SignedManifest {
        &self.manifest
    }

    /// Traffic counters so far.
    pub fn stats(&self) -> SenderStats {
        self.stats
    }

    /// Current send rate.
    pub fn rate_bps(&self) -> u64 {
        self.rate_bps
    }

    /// Whether the session is over.
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished
    }

    /// Blocks whose in-order pass is complete.
    pub fn pass_position(&self) -> u32 {
        self.pass_pos
    }

    /// Stops the session now: remaining receivers are failed with `reason`, End is sent and
    /// `Finished` follows.
    pub fn abort(&mut self, now: Instant, reason: &str) {
        if matches!(self.phase, Phase::Ending | Phase::Finished) {
            return;
        }
        self.aborted = Some(reason.to_owned());
        self.fail_active(reason);
        self.begin_end(now);
    }

    /// Feeds one datagram received from `from`. Malformed and foreign packets are counted and
    /// dropped.
    pub fn handle_input(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        let pkt = match Packet::decode(datagram) {
            Ok(p) if p.session == self.session => p,
            Ok(_) | Err(_) => {
                self.stats.rejected_packets += 1;
                return;
            }
        };
        match pkt.body {
            Body::Join(j) => self.on_join(now, from, j.receiver, j.name, j.flags),
            Body::Nak(n) => {
                let Some(idx) = self.touch(now, n.receiver) else {
                    return;
                };
                self.stats.naks_received += 1;
                self.rxs[idx].naks += 1;
                if self.rxs[idx].unicast.is_none() {
                    self.count_nak(now, idx, &n.entries);
                }
                if let Some(sent) = self.rxs[idx].unicast {
                    // It fetches over TCP: repair for it would only cost the others. It still
                    // NAKs, so it may have missed the CatchUp: say it again (rate-limited).
                    self.stats.naks_ignored += n.entries.len() as u64;
                    if now.saturating_duration_since(sent) >= CATCHUP_RESEND {
                        self.send_catch_up(now, idx);
                    }
                    return;
                }
                for e in &n.entries {
                    self.on_nak_entry(now, e);
                }
            }
            Body::Status(s) => {
                // Receivers are not authenticated: a Status claiming more verified blocks than
                // the image has is forged or corrupt. Taken as progress it would keep the
                // session lingering; each real one moves `blocks_done` up to the count at most.
                if s.blocks_done > self.manifest.manifest().block_count() {
                    self.stats.rejected_packets += 1;
                    return;
                }
                let Some(idx) = self.touch(now, s.receiver) else {
                    return;
                };
                let rx = &mut self.rxs[idx];
                let (dr, dl) = (
                    s.received.saturating_sub(rx.status.received),
                    s.lost.saturating_sub(rx.status.lost),
                );
                if dr + dl >= 16 {
                    rx.last_loss = Some(dl as f64 / (dr + dl) as f64);
                }
                if s.blocks_done > rx.status.blocks_done {
                    rx.last_progress = now;
                }
                rx.status = s;
                self.events.push_back(SenderEvent::ReceiverProgress {
                    id: rx.id,
                    name: rx.name.clone(),
                    status: s,
                });
                let lag = self.pass_pos.saturating_sub(s.blocks_done);
                if self.cfg.catchup_lag_blocks > 0
                    && self.phase == Phase::Pass
                    && lag > self.cfg.catchup_lag_blocks
                {
                    let reason = format!(
                        "{lag} blocks behind the pass (more than {})",
                        self.cfg.catchup_lag_blocks
                    );
                    self.move_to_unicast(now, idx, reason);
                }
            }
            Body::Done(d) => {
                let Some(idx) = self.touch(now, d.receiver) else {
                    return;
                };
                self.queue_control(
                    Dest::Unicast(from),
                    Body::DoneAck {
                        receiver: d.receiver,
                    },
                );
                let rx = &mut self.rxs[idx];
                if rx.state == RxState::Active {
                    rx.state = RxState::Done {
                        ok: d.ok,
                        reason: d.reason.to_owned(),
                    };
                    self.events.push_back(SenderEvent::ReceiverDone {
                        id: rx.id,
                        name: rx.name.clone(),
                        ok: d.ok,
                        reason: d.reason.to_owned(),
                    });
                }
                self.check_finish(now);
            }
            // Sender-to-receiver packets (our own multicast looped back) are ignored.
            _ => {}
        }
    }

    fn touch(&mut self, now: Instant, id: u64) -> Option<usize> {
        let idx = *self.by_id.get(&id)?;
        let rx = &mut self.rxs[idx];
        if rx.state == RxState::Active {
            rx.last_heard = now;
        }
        Some(idx)
    }

    fn on_join(&mut self, now: Instant, from: SocketAddr, id: u64, name: &str, flags: u8) {
        let has_manifest = flags & packet::JOIN_HAS_MANIFEST != 0;
        let idx = match self.by_id.get(&id) {
            Some(&i) => i,
            None => {
                if matches!(self.phase, Phase::Ending | Phase::Finished) {
                    return;
                }
                if self.rxs.len() >= self.cfg.max_receivers {
                    self.stats.rejected_packets += 1;
                    tracing::warn!(%from, max = self.cfg.max_receivers, "join ignored: receiver limit reached");
                    return;
                }
                self.rxs.push(Rx {
                    id,
                    name: name.to_owned(),
                    addr: from,
                    last_heard: now,
                    last_progress: now,
                    has_manifest: false,
                    state: RxState::Active,
                    status: Status {
                        receiver: id,
                        ..Status::default()
                    },
                    last_loss: None,
                    naks: 0,
                    manifest_sent_at: None,
                    unicast: None,
                    nak_counted: Vec::new(),
                    nak_symbols: 0,
                });
                self.by_id.insert(id, self.rxs.len() - 1);
                self.events.push_back(SenderEvent::ReceiverJoined {
                    id,
                    name: name.to_owned(),
                    addr: from,
                });
                self.rxs.len() - 1
            }
        };
        let rx = &mut self.rxs[idx];
        if rx.state == RxState::Active {
            rx.last_heard = now;
        }
        rx.addr = from;
        rx.has_manifest |= has_manifest;
        // Late joiner without the manifest: unicast it (rate-limited per receiver). Before the
        // start it arrives with the multicast announce cycle anyway.
        let resend_due = rx
            .manifest_sent_at
            .is_none_or(|t| now.saturating_duration_since(t) >= self.cfg.manifest_resend_interval);
        if !rx.has_manifest && self.phase != Phase::Announcing && resend_due {
            rx.manifest_sent_at = Some(now);
            let total = self.manifest.as_bytes().len() as u32;
            let mut off = 0u32;
            while off < total {
                self.manifest_queue.push_back((Dest::Unicast(from), off));
                off += MANIFEST_CHUNK_LEN as u32;
            }
        }
        self.queue_control(Dest::Unicast(from), Body::JoinAck { receiver: id });
        self.check_start(now);
    }

    /// Adds the symbols `entries` ask for (blocks not counted before) to the receiver's NAK
    /// total, and moves it to unicast catch-up when that exceeds its share of the stream.
    fn count_nak(&mut self, now: Instant, idx: usize, entries: &[NakEntry]) {
        let m = self.manifest.manifest();
        let count = m.block_count();
        let rx = &mut self.rxs[idx];
        if rx.nak_counted.is_empty() {
            rx.nak_counted = vec![0; count.div_ceil(64) as usize];
        }
        for e in entries {
            if e.block >= self.pass_pos || e.block >= count {
                continue;
            }
            let (word, bit) = ((e.block / 64) as usize, 1u64 << (e.block % 64));
            if rx.nak_counted[word] & bit != 0 {
                continue;
            }
            let Some(st) = self.repair.get(&e.block) else {
                continue;
            };
            rx.nak_counted[word] |= bit;
            let k = u32::from(st.k);
            rx.nak_symbols += u64::from(if e.needed == NakEntry::ALL {
                k
            } else {
                e.needed.min(k)
            });
        }
        let sent = self.stats.source_packets;
        let share = rx.nak_symbols as f64 / sent.max(1) as f64;
        if sent >= CATCHUP_MIN_SYMBOLS && share > self.cfg.catchup_nak_share {
            let reason = format!(
                "its NAKs asked for {:.0}% of the {sent} symbols sent (more than {:.0}%)",
                share * 100.0,
                self.cfg.catchup_nak_share * 100.0
            );
            self.move_to_unicast(now, idx, reason);
        }
    }

    /// Stops multicast repair for receiver `idx` and tells it to fetch over TCP catch-up.
    /// Nothing happens without a catch-up port, or for a receiver already moved or finished.
    fn move_to_unicast(&mut self, now: Instant, idx: usize, reason: String) {
        let rx = &self.rxs[idx];
        if self.cfg.tcp_port == 0 || rx.unicast.is_some() || rx.state != RxState::Active {
            return;
        }
        tracing::info!(receiver = %rx.name, %reason, "receiver moved to unicast catch-up");
        self.stats.moved_to_unicast += 1;
        // Pending repair is a maximum over receivers, so this one's share cannot be taken out:
        // drop it all. Receivers that still need some of it NAK again (one round trip), which
        // is far cheaper than multicasting repair sized for a receiver that fetches over TCP.
        self.pending.clear();
        self.events.push_back(SenderEvent::ReceiverToUnicast {
            id: rx.id,
            name: rx.name.clone(),
            reason,
        });
        self.send_catch_up(now, idx);
    }

    fn send_catch_up(&mut self, now: Instant, idx: usize) {
        let rx = &mut self.rxs[idx];
        rx.unicast = Some(now);
        let (addr, receiver) = (rx.addr, rx.id);
        self.queue_control(Dest::Unicast(addr), Body::CatchUp { receiver });
    }

    fn on_nak_entry(&mut self, now: Instant, e: &NakEntry) {
        let m = self.manifest.manifest();
        if e.block >= self.pass_pos || e.block >= m.block_count() {
            return;
        }
        if m.blocks[e.block as usize].zero {
            return;
        }
        let Some(st) = self.repair.get(&e.block).copied() else {
            return;
        };
        let k = u32::from(st.k);
        let needed = if e.needed == NakEntry::ALL {
            k
        } else {
            e.needed.min(k)
        };
        if needed == 0 {
            return;
        }
        let r = u32::from(parity_count(st.k));
        let sent_hi = k + st.sent.min(r);
        // Only *repair* symbols can still be in flight: a receiver NAKs a block once it has
        // seen the pass move beyond it, so source symbols it lacks are lost, not late.
        let in_flight = if now.saturating_duration_since(st.last_sent) < self.cfg.repair_guard {
            sent_hi.saturating_sub(e.seen.max(k).min(sent_hi))
        } else {
            0
        };
        let mut extra = needed.saturating_sub(in_flight);
        if extra == 0 {
            return;
        }
        extra += (f64::from(extra) * self.cfg.repair_margin).ceil() as u32;
        let p = self.pending.entry(e.block).or_insert(0);
        *p = (*p).max(extra);
    }

    fn queue_control(&mut self, dest: Dest, body: Body<'_>) {
        let mut v = Vec::with_capacity(64);
        Packet::new(self.session, body).encode(&mut v);
        self.control.push_back((dest, v));
    }

    /// Fires timers: start condition, dead receivers, linger, adaptive rate.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.check_start(now);
        if now >= self.next_check {
            self.next_check = now + Duration::from_millis(50);
            self.check_liveness(now);
            self.check_finish(now);
        }
        if self.cfg.adaptive && now >= self.next_adapt {
            self.next_adapt = now + Duration::from_millis(100);
            self.adapt(now);
        }
    }

    fn check_liveness(&mut self, now: Instant) {
        let dead_after = self.cfg.dead_after;
        for rx in &mut self.rxs {
            if rx.state == RxState::Active
                && now.saturating_duration_since(rx.last_heard) > dead_after
            {
                let reason = format!(
                    "silent for {:.1}s (dead_after {:.1}s); not waited for",
                    now.saturating_duration_since(rx.last_heard).as_secs_f64(),
                    dead_after.as_secs_f64()
                );
                rx.fail(reason, &mut self.events);
            }
        }
    }

    /// One adaptive-rate step (every 100 ms): multiplicative decrease when the median receiver
    /// loses more than 5 %, additive increase while it loses under 1 %, but only while the
    /// sender really sends at (about) the set rate. A sender that cannot reach its rate (CPU-
    /// bound, or the socket's send buffer pacing a slower NIC) must not keep raising a number
    /// nothing measures: the rate would run away to the ceiling, and the first loss would then
    /// be answered by cutting a fiction, seconds of overload later (seen with 8 receivers on
    /// 2 cores: 10 Gbit/s set, 1 Gbit/s sent, repair traffic larger than the image). For the
    /// same reason a decrease during the pass starts from what was sent, not from what was set.
    fn adapt(&mut self, now: Instant) {
        let (t0, b0) = self.adapt_mark;
        self.adapt_mark = (now, self.paced_bytes);
        let dt = now.saturating_duration_since(t0).as_secs_f64();
        // Bits per second handed out since the last step (None: too short a window to tell).
        let sent_bps = (dt >= 0.02).then(|| (self.paced_bytes - b0) as f64 * 8.0 / dt);
        let mut losses: Vec<f64> = self
            .rxs
            .iter()
            .filter(|r| r.state == RxState::Active && r.unicast.is_none())
            .filter_map(|r| r.last_loss)
            .collect();
        if losses.is_empty() || !matches!(self.phase, Phase::Pass | Phase::Draining) {
            return;
        }
        losses.sort_by(f64::total_cmp);
        let median = losses[losses.len() / 2];
        let old = self.rate_bps;
        if median > 0.05 {
            // Multiplicative decrease towards what the median receiver actually got. In the
            // pass there is always data to send, so what went out is what the path took.
            let base = match sent_bps {
                Some(s) if self.phase == Phase::Pass && s > 0.0 => (s as u64).min(self.rate_bps),
                _ => self.rate_bps,
            };
            let factor = (1.0 - median).clamp(0.5, 0.9);
            self.rate_bps = ((base as f64 * factor) as u64).max(self.cfg.min_rate_bps);
        } else if median < 0.01 && sent_bps.is_some_and(|s| s >= 0.8 * self.rate_bps as f64) {
            // Additive steps of 5 % of the start rate, or 10 % of the current one once above
            // it, up to the ceiling: on a fast path the start rate is not a limit.
            let step = (self.cfg.rate_bps / 20).max(self.rate_bps / 10);
            let ceiling = self.cfg.max_rate_bps.max(self.cfg.rate_bps);
            self.rate_bps = (self.rate_bps + step).min(ceiling);
        }
        // Every step, changed or not: with the window's real rate next to the set one, this is
        // what shows whether the climb stalls (sent < 0.8x set) or a loss report cut the rate.
        tracing::debug!(
            set_bps = old,
            sent_bps = sent_bps.map_or(0, |s| s as u64),
            median_loss = median,
            new_bps = self.rate_bps,
            "adaptive rate step"
        );
        if self.rate_bps != old {
            self.events.push_back(SenderEvent::RateChanged {
                rate_bps: self.rate_bps,
                median_loss: median,
            });
        }
    }

    fn check_start(&mut self, now: Instant) {
        if self.phase != Phase::Announcing {
            return;
        }
        if let Some(reason) = self.start_reason(now) {
            self.phase = Phase::Pass;
            self.started_at = Some(now);
            self.next_announce = now;
            self.manifest_queue.clear();
            let ready = self.ready_count();
            self.events.push_back(SenderEvent::Started {
                receivers: ready,
                reason,
            });
            tracing::info!(session = %self.session, receivers = ready, ?reason, "cast pass starting");
        }
    }

    fn ready_count(&self) -> usize {
        self.rxs
            .iter()
            .filter(|r| r.has_manifest && r.state == RxState::Active)
            .count()
    }

    fn start_reason(&self, now: Instant) -> Option<StartReason> {
        let elapsed = now.saturating_duration_since(self.created);
        if elapsed >= self.cfg.min_wait {
            let exp = &self.cfg.expected_receivers;
            // A set, so a thousand expected names cost O(n) per Join, not O(n^2).
            let ready: std::collections::HashSet<&str> = self
                .rxs
                .iter()
                .filter(|r| r.has_manifest && r.state == RxState::Active)
                .map(|r| r.name.as_str())
                .collect();
            if !exp.is_empty() && exp.iter().all(|n| ready.contains(n.as_str())) {
                return Some(StartReason::AllExpected);
            }
            let ready_count = self
                .rxs
                .iter()
                .filter(|r| r.has_manifest && r.state == RxState::Active)
                .count();
            if (exp.is_empty() || self.cfg.min_receivers > 0)
                && ready_count >= self.cfg.min_receivers
            {
                return Some(StartReason::Quorum);
            }
        }
        if self.cfg.max_wait.is_some_and(|m| elapsed >= m) {
            return Some(StartReason::MaxWait);
        }
        None
    }

    fn fail_active(&mut self, reason: &str) {
        for rx in &mut self.rxs {
            if rx.state == RxState::Active {
                rx.fail(reason.to_owned(), &mut self.events);
            }
        }
    }

    fn check_finish(&mut self, now: Instant) {
        if self.phase != Phase::Draining {
            return;
        }
        let Some(done_at) = self.pass_done_at else {
            return;
        };
        let linger = self.cfg.linger;
        let total = self.manifest.manifest().block_count();
        for rx in &mut self.rxs {
            if rx.state != RxState::Active {
                continue;
            }
            // Idle since the later of the pass's end and its last new verified block: a slow
            // receiver fetching over TCP catch-up keeps the session (and the catch-up server).
            let idle_since = rx.last_progress.max(done_at);
            if now.saturating_duration_since(idle_since) >= linger {
                let reason = format!(
                    "no progress for {:.1}s after the pass (linger), {} of {} blocks verified",
                    linger.as_secs_f64(),
                    rx.status.blocks_done,
                    total
                );
                rx.fail(reason, &mut self.events);
            }
        }
        if self.rxs.iter().all(|r| r.state != RxState::Active) {
            self.begin_end(now);
        }
    }

    fn begin_end(&mut self, _now: Instant) {
        self.phase = Phase::Ending;
        self.ends_left = 3;
        self.pending.clear();
    }

    fn finish(&mut self, now: Instant) {
        self.phase = Phase::Finished;
        let mut receivers: Vec<ReceiverSummary> = self
            .rxs
            .iter()
            .map(|r| ReceiverSummary {
                id: Some(r.id),
                name: r.name.clone(),
                addr: Some(r.addr),
                outcome: match &r.state {
                    RxState::Active => ReceiverOutcome::InProgress,
                    RxState::Done { ok: true, .. } => ReceiverOutcome::Verified,
                    RxState::Done { ok: false, reason } => ReceiverOutcome::Failed {
                        reason: format!("receiver reported failure: {reason}"),
                    },
                    RxState::Failed { reason } => ReceiverOutcome::Failed {
                        reason: reason.clone(),
                    },
                },
                blocks_done: r.status.blocks_done,
                bytes_done: r.status.bytes_done,
                naks: r.naks,
            })
            .collect();
        for n in &self.cfg.expected_receivers {
            if !self.rxs.iter().any(|r| &r.name == n) {
                receivers.push(ReceiverSummary {
                    id: None,
                    name: n.clone(),
                    addr: None,
                    outcome: ReceiverOutcome::NeverJoined,
                    blocks_done: 0,
                    bytes_done: 0,
                    naks: 0,
                });
            }
        }
        let duration = self
            .started_at
            .map(|s| now.saturating_duration_since(s))
            .unwrap_or_default();
        self.events.push_back(SenderEvent::Finished(SessionSummary {
            session: self.session,
            receivers,
            stats: self.stats,
            duration,
            aborted: self.aborted.clone(),
        }));
    }

    /// When the driver should call [`Sender::handle_timeout`] / [`Sender::poll_transmit`]
    /// next. `None`: only when a datagram arrives.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.phase == Phase::Finished {
            return None;
        }
        let mut t = self.next_check;
        if self.phase == Phase::Announcing {
            let min_wait = self.created + self.cfg.min_wait;
            if min_wait > self.last_refill {
                t = t.min(min_wait);
            }
            if let Some(m) = self.cfg.max_wait {
                t = t.min(self.created + m);
            }
        }
        if self.cfg.adaptive && matches!(self.phase, Phase::Pass | Phase::Draining) {
            t = t.min(self.next_adapt);
        }
        if !self.control.is_empty() {
            return Some(self.last_refill.min(t));
        }
        let has_paced = self.next_announce <= t
            || !self.manifest_queue.is_empty()
            || self.ends_left > 0
            || !self.pending.is_empty()
            || self.phase == Phase::Pass;
        if has_paced {
            let when = if self.manifest_queue.is_empty()
                && self.ends_left == 0
                && self.pending.is_empty()
                && self.phase != Phase::Pass
            {
                self.next_announce.max(self.token_ready_at())
            } else {
                self.token_ready_at()
            };
            t = t.min(when);
        } else {
            t = t.min(self.next_announce);
        }
        Some(t)
    }

    fn token_ready_at(&self) -> Instant {
        let need = self.packet_budget() - self.tokens;
        if need <= 0.0 {
            return self.last_refill;
        }
        // Round up (plus a nanosecond) so that at the returned instant the bucket really holds
        // enough; rounding down would make the driver spin at the same instant.
        let nanos = (need * 8.0 * 1e9 / self.rate_bps as f64).ceil() as u64 + 1;
        self.last_refill + Duration::from_nanos(nanos)
    }

    fn packet_budget(&self) -> f64 {
        (packet::DATA_OVERHEAD + usize::from(self.manifest.manifest().symbol_size)) as f64
    }

    fn refill(&mut self, now: Instant) {
        let dt = now
            .saturating_duration_since(self.last_refill)
            .as_secs_f64();
        if dt > 0.0 {
            let burst = f64::from(self.cfg.burst_bytes).max(2.0 * self.packet_budget());
            self.tokens = (self.tokens + dt * self.rate_bps as f64 / 8.0).min(burst);
            self.last_refill = now;
        }
    }

    /// The next datagram to send, written to `buf` (cleared first). Paced: returns `None` when
    /// the token bucket is empty or nothing is due; ask [`Sender::poll_timeout`] when to retry.
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        blocks: &mut dyn BlockSource,
        buf: &mut Vec<u8>,
    ) -> Option<Transmit> {
        buf.clear();
        if let Some((dest, bytes)) = self.control.pop_front() {
            buf.extend_from_slice(&bytes);
            return Some(Transmit {
                dest,
                size: buf.len(),
            });
        }
        if self.phase == Phase::Finished {
            return None;
        }
        self.check_start(now);
        self.refill(now);
        if self.tokens < self.packet_budget() {
            return None;
        }
        let t = self.next_paced(now, blocks, buf)?;
        self.tokens -= t.size as f64;
        self.paced_bytes += t.size as u64;
        Some(t)
    }

    fn next_paced(
        &mut self,
        now: Instant,
        blocks: &mut dyn BlockSource,
        buf: &mut Vec<u8>,
    ) -> Option<Transmit> {
        if self.phase == Phase::Ending {
            if self.ends_left > 0 {
                self.ends_left -= 1;
                let flags = if self.aborted.is_some() {
                    packet::END_ABORTED
                } else {
                    0
                };
                Packet::new(self.session, Body::End { flags }).encode(buf);
                if self.ends_left == 0 {
                    self.finish(now);
                }
                return Some(Transmit {
                    dest: Dest::Group,
                    size: buf.len(),
                });
            }
            return None;
        }
        if now >= self.next_announce {
            self.next_announce = now + self.cfg.announce_interval;
            if self.phase == Phase::Announcing {
                let total = self.manifest.as_bytes().len() as u32;
                self.manifest_queue.clear();
                let mut off = 0u32;
                while off < total {
                    self.manifest_queue.push_back((Dest::Group, off));
                    off += MANIFEST_CHUNK_LEN as u32;
                }
            }
            self.encode_announce(buf);
            self.stats.control_packets += 1;
            return Some(Transmit {
                dest: Dest::Group,
                size: buf.len(),
            });
        }
        if let Some((dest, off)) = self.manifest_queue.pop_front() {
            let bytes = self.manifest.as_bytes();
            let end = (off as usize + MANIFEST_CHUNK_LEN).min(bytes.len());
            Packet::new(
                self.session,
                Body::ManifestChunk(packet::ManifestChunk {
                    offset: off,
                    total_len: bytes.len() as u32,
                    bytes: &bytes[off as usize..end],
                }),
            )
            .encode(buf);
            self.stats.control_packets += 1;
            return Some(Transmit {
                dest,
                size: buf.len(),
            });
        }
        match self.phase {
            Phase::Pass => {
                let repair_allowed = !self.pending.is_empty() && {
                    let total = (self.stats.source_bytes + self.stats.repair_bytes) as f64;
                    (self.stats.repair_bytes as f64) <= self.cfg.repair_share * total
                };
                if repair_allowed && let Some(t) = self.send_repair(now, blocks, buf) {
                    return Some(t);
                }
                if let Some(t) = self.send_source(now, blocks, buf) {
                    return Some(t);
                }
                self.send_repair(now, blocks, buf)
            }
            Phase::Draining => self.send_repair(now, blocks, buf),
            _ => None,
        }
    }

    fn encode_announce(&self, buf: &mut Vec<u8>) {
        let m = self.manifest.manifest();
        let mut flags = 0;
        if self.phase != Phase::Announcing {
            flags |= packet::ANNOUNCE_STARTED;
        }
        if matches!(self.phase, Phase::Draining | Phase::Ending) {
            flags |= packet::ANNOUNCE_PASS_DONE;
        }
        Packet::new(
            self.session,
            Body::Announce(Announce {
                flags,
                manifest_len: self.manifest.as_bytes().len() as u32,
                manifest_hash: self.manifest_hash,
                tcp_port: self.cfg.tcp_port,
                symbol_size: m.symbol_size,
                block_size: m.block_size,
                block_count: m.block_count(),
                image_size: m.image_size,
                pass_pos: self.pass_pos,
                rate_bps: self.rate_bps,
            }),
        )
        .encode(buf);
    }

    fn fetch(
        &mut self,
        now: Instant,
        blocks: &mut dyn BlockSource,
        index: u32,
    ) -> Option<Arc<EncodedBlock>> {
        if let Some(c) = self.cache.iter().find(|c| c.block == index) {
            return Some(c.enc.clone());
        }
        match blocks.encoded_block(index) {
            Ok(enc) => {
                self.cache.push_back(Cached {
                    block: index,
                    enc: enc.clone(),
                    parity: None,
                });
                while self.cache.len() > self.cfg.repair_cache_blocks.max(2) {
                    self.cache.pop_front();
                }
                Some(enc)
            }
            Err(e) => {
                let error = e.to_string();
                tracing::error!(block = index, %error, "block source failed; aborting cast");
                self.events.push_back(SenderEvent::Aborted {
                    block: index,
                    error: error.clone(),
                });
                self.abort(
                    now,
                    &format!("sender could not read block {index}: {error}"),
                );
                None
            }
        }
    }

    fn send_source(
        &mut self,
        now: Instant,
        blocks: &mut dyn BlockSource,
        buf: &mut Vec<u8>,
    ) -> Option<Transmit> {
        let manifest = self.manifest.clone();
        let m = manifest.manifest();
        let count = m.block_count();
        // Skip zero blocks.
        if self.cur.is_none() {
            while self.cur_block < count && m.blocks[self.cur_block as usize].zero {
                self.cur_block += 1;
                self.pass_pos = self.cur_block;
            }
            if self.cur_block >= count {
                self.pass_complete(now);
                return None;
            }
            let b = self.cur_block;
            let enc = self.fetch(now, blocks, b)?;
            if enc.symbol_size() != self.manifest.manifest().symbol_size {
                self.events.push_back(SenderEvent::Aborted {
                    block: b,
                    error: "block source used a different symbol size".into(),
                });
                self.abort(now, "block source used a different symbol size");
                return None;
            }
            self.cur = Some(enc);
            self.cur_esi = 0;
        }
        let enc = self.cur.clone()?;
        let esi = self.cur_esi;
        let sym = enc.source_symbol(esi)?;
        let mut flags = 0;
        if enc.compressed() {
            flags |= packet::DATA_COMPRESSED;
        }
        packet::encode_data(
            buf,
            self.session,
            &Data {
                block: self.cur_block,
                esi,
                k: enc.k(),
                payload_len: enc.payload_len(),
                flags,
                symbol: sym,
            },
        );
        self.stats.source_packets += 1;
        self.stats.source_bytes += sym.len() as u64;
        self.cur_esi += 1;
        if self.cur_esi >= enc.k() {
            self.repair.insert(
                self.cur_block,
                BlockRepair {
                    k: enc.k(),
                    sent: 0,
                    last_sent: now,
                },
            );
            self.cur = None;
            self.cur_block += 1;
            self.pass_pos = self.cur_block;
            // Zero blocks right after are passed too, so receivers can NAK up to here.
            while self.cur_block < count && m.blocks[self.cur_block as usize].zero {
                self.cur_block += 1;
                self.pass_pos = self.cur_block;
            }
            if self.cur_block >= count {
                self.pass_complete(now);
            }
        }
        Some(Transmit {
            dest: Dest::Group,
            size: buf.len(),
        })
    }

    fn pass_complete(&mut self, now: Instant) {
        if self.phase != Phase::Pass {
            return;
        }
        self.phase = Phase::Draining;
        self.pass_done_at = Some(now);
        self.pass_pos = self.manifest.manifest().block_count();
        // Tell receivers at once so they NAK the tail without waiting for the next cycle.
        self.next_announce = now;
        self.events.push_back(SenderEvent::PassComplete);
        self.check_finish(now);
    }

    fn send_repair(
        &mut self,
        now: Instant,
        blocks: &mut dyn BlockSource,
        buf: &mut Vec<u8>,
    ) -> Option<Transmit> {
        let (&block, _) = self.pending.iter().next()?;
        let Some(mut st) = self.repair.get(&block).copied() else {
            self.pending.remove(&block);
            return None;
        };
        let enc = self.fetch(now, blocks, block)?;
        let k = enc.k();
        let r = parity_count(k);
        let j = st.sent;
        let mut flags = packet::DATA_REPAIR;
        if enc.compressed() {
            flags |= packet::DATA_COMPRESSED;
        }
        let parity;
        let (esi, sym): (u16, &[u8]) = if j < u32::from(r) {
            parity = self.parity_for(block, &enc)?;
            // j < r <= 32768 and k <= 32768, so k + j fits in u16.
            (k + j as u16, parity.symbol(j as u16)?)
        } else {
            // Every parity symbol has been used: cycle through the source symbols again.
            let s = ((j - u32::from(r)) % u32::from(k)) as u16;
            (s, enc.source_symbol(s)?)
        };
        packet::encode_data(
            buf,
            self.session,
            &Data {
                block,
                esi,
                k,
                payload_len: enc.payload_len(),
                flags,
                symbol: sym,
            },
        );
        st.sent += 1;
        st.last_sent = now;
        self.repair.insert(block, st);
        if let Some(p) = self.pending.get_mut(&block) {
            *p = p.saturating_sub(1);
            if *p == 0 {
                self.pending.remove(&block);
            }
        }
        self.stats.repair_packets += 1;
        self.stats.repair_bytes += sym.len() as u64;
        Some(Transmit {
            dest: Dest::Group,
            size: buf.len(),
        })
    }

    fn parity_for(&mut self, block: u32, enc: &Arc<EncodedBlock>) -> Option<Arc<Parity>> {
        let pos = self.cache.iter().position(|c| c.block == block)?;
        if let Some(p) = &self.cache[pos].parity {
            return Some(p.clone());
        }
        match enc.parity(block) {
            Ok(p) => {
                let p = Arc::new(p);
                self.cache[pos].parity = Some(p.clone());
                Some(p)
            }
            Err(e) => {
                tracing::error!(block, error = %e, "parity encoding failed");
                self.pending.remove(&block);
                None
            }
        }
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<SenderEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::MemoryImage;
    use crate::{Compression, Receiver, ReceiverConfig};
    use std::collections::HashSet;

    #[allow(clippy::disallowed_methods)] // tests need one real anchor for the virtual clock
    fn t0() -> Instant {
        Instant::now()
    }

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 1, 0, i], 9000))
    }

    fn setup() -> (SignedManifest, MemoryImage) {
        let mut x = 5u64;
        let data: Vec<u8> = (0..32_768)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                (x >> 33) as u8
            })
            .collect();
        MemoryImage::build(data, SessionId(9), 8192, 82, Compression::None, &[1; 32]).unwrap()
    }

    fn pkt(body: Body<'_>) -> Vec<u8> {
        let mut v = Vec::new();
        Packet::new(SessionId(9), body).encode(&mut v);
        v
    }

    fn join(s: &mut Sender, now: Instant, i: u8, manifest: bool) {
        let flags = if manifest {
            packet::JOIN_HAS_MANIFEST
        } else {
            0
        };
        s.handle_input(
            now,
            addr(i),
            &pkt(Body::Join(packet::Join {
                receiver: u64::from(i),
                flags,
                name: &format!("r{i}"),
            })),
        );
    }

    /// Drains everything the sender may send at `now`, returning the data packets.
    fn drain(s: &mut Sender, now: Instant, img: &mut MemoryImage) -> Vec<(u32, u16, u8)> {
        let mut buf = Vec::new();
        let mut out = Vec::new();
        while let Some(t) = s.poll_transmit(now, img, &mut buf) {
            if let Ok(Packet {
                body: Body::Data(d),
                ..
            }) = Packet::decode(&buf[..t.size])
            {
                out.push((d.block, d.esi, d.flags));
            }
        }
        out
    }

    fn cfg() -> SenderConfig {
        SenderConfig {
            rate_bps: 1_000_000_000,
            min_receivers: 2,
            repair_share: 1.0,
            ..SenderConfig::default()
        }
    }

    /// Runs an adaptive sender for `secs` of virtual time with two receivers that report no
    /// loss; every 5 ms the driver takes at most `per_tick` packets (a CPU-bound sender takes
    /// fewer than the rate allows). Returns every rate it was set to.
    fn adaptive_rates(per_tick: usize, secs: u64) -> Vec<u64> {
        let now = t0();
        let mut x = 7u64;
        let data: Vec<u8> = (0..4_000_000)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                (x >> 33) as u8
            })
            .collect();
        let (m, mut img) = MemoryImage::build(
            data,
            SessionId(9),
            65_536,
            1400,
            Compression::None,
            &[1; 32],
        )
        .unwrap();
        let mut s = Sender::new(
            SenderConfig {
                rate_bps: 8_000_000,
                min_rate_bps: 1_000_000,
                max_rate_bps: 400_000_000,
                adaptive: true,
                burst_bytes: 16_384,
                ..cfg()
            },
            m,
            now,
        )
        .unwrap();
        join(&mut s, now, 1, true);
        join(&mut s, now, 2, true);
        let mut rates = Vec::new();
        let mut buf = Vec::new();
        let mut received = 0u64;
        for tick in 0..(secs * 200) {
            let t = now + Duration::from_millis(5 * tick);
            s.handle_timeout(t);
            let mut n = 0;
            while n < per_tick && s.poll_transmit(t, &mut img, &mut buf).is_some() {
                n += 1;
            }
            received += n as u64;
            if tick % 20 == 0 {
                for i in 1..=2u8 {
                    s.handle_input(
                        t,
                        addr(i),
                        &pkt(Body::Status(Status {
                            receiver: u64::from(i),
                            received,
                            ..Status::default()
                        })),
                    );
                }
            }
            while let Some(e) = s.poll_event() {
                if let SenderEvent::RateChanged { rate_bps, .. } = e {
                    rates.push(rate_bps);
                }
            }
        }
        rates
    }

    #[test]
    fn adaptive_rate_climbs_only_while_the_sender_keeps_up_with_it() {
        // 8 Mbit/s is about 3.5 packets of 1.4 kB per 5 ms tick. Unlimited: the rate climbs.
        let free = adaptive_rates(usize::MAX, 2);
        assert!(
            free.iter().any(|&r| r > 16_000_000),
            "a sender that keeps up climbs: {free:?}"
        );
        // At most 2 packets per tick (about 4.6 Mbit/s, under the 8 Mbit/s set): nobody
        // loses, but the sender does not reach its rate, so raising it means nothing.
        let limited = adaptive_rates(2, 2);
        assert!(
            limited.iter().all(|&r| r <= 8_000_000),
            "a sender that cannot reach its rate must not raise it: {limited:?}"
        );
    }

    #[test]
    fn starts_on_quorum_at_once_and_lists_never_joined() {
        let now = t0();
        let (m, mut img) = setup();
        let mut s = Sender::new(
            SenderConfig {
                expected_receivers: vec!["r1".into(), "r2".into(), "ghost".into()],
                ..cfg()
            },
            m,
            now,
        )
        .unwrap();
        join(&mut s, now, 1, true);
        assert!(drain(&mut s, now, &mut img).is_empty());
        join(&mut s, now, 2, false);
        assert!(
            drain(&mut s, now, &mut img).is_empty(),
            "r2 lacks the manifest"
        );
        let t = now + Duration::from_millis(1);
        join(&mut s, t, 2, true);
        let evs: Vec<_> = std::iter::from_fn(|| s.poll_event()).collect();
        assert!(evs.contains(&SenderEvent::Started {
            receivers: 2,
            reason: StartReason::Quorum
        }));
        s.abort(t, "test over");
        let mut buf = Vec::new();
        while s.poll_transmit(t, &mut img, &mut buf).is_some() {}
        let summary = std::iter::from_fn(|| s.poll_event())
            .find_map(|e| match e {
                SenderEvent::Finished(s) => Some(s),
                _ => None,
            })
            .unwrap();
        assert_eq!(summary.receivers.len(), 3);
        assert_eq!(summary.receivers[2].outcome, ReceiverOutcome::NeverJoined);
        assert_eq!(summary.aborted.as_deref(), Some("test over"));
    }

    /// Runs the pass to block 2 of 4, then receiver 1 reports it verified none: with a TCP port
    /// it is moved to catch-up (a CatchUp to it), its NAKs draw no repair, receiver 2's do.
    fn lagging_receiver(tcp_port: u16) -> (Sender, MemoryImage, Vec<(Dest, u64)>, Instant) {
        let now = t0();
        let (m, mut img) = setup();
        let cfg = SenderConfig {
            tcp_port,
            catchup_lag_blocks: 1,
            // Small steps, so the pass stops inside block 2 rather than running to its end.
            burst_bytes: 4096,
            ..cfg()
        };
        let mut s = Sender::new(cfg, m, now).unwrap();
        join(&mut s, now, 1, true);
        join(&mut s, now, 2, true);
        let mut t = now;
        while s.pass_position() < 2 {
            t += Duration::from_micros(10);
            drain(&mut s, t, &mut img);
        }
        assert!(s.pass_position() < 4, "pass over before the Status");
        s.handle_input(
            t,
            addr(1),
            &pkt(Body::Status(Status {
                receiver: 1,
                ..Status::default()
            })),
        );
        let mut buf = Vec::new();
        let mut catch_ups = Vec::new();
        while let Some(tx) = s.poll_transmit(t, &mut img, &mut buf) {
            if let Ok(Packet {
                body: Body::CatchUp { receiver },
                ..
            }) = Packet::decode(&buf[..tx.size])
            {
                catch_ups.push((tx.dest, receiver));
            }
        }
        (s, img, catch_ups, t)
    }

    /// Repair packets sent over the next 50 ms (the small bucket lets out 32 packets a drain).
    fn repair_over(s: &mut Sender, t: Instant, img: &mut MemoryImage) -> Vec<(u32, u16, u8)> {
        (0..50u64)
            .flat_map(|ms| drain(s, t + Duration::from_millis(ms), img))
            .filter(|d| d.2 & packet::DATA_REPAIR != 0)
            .collect()
    }

    fn nak_block_0(s: &mut Sender, t: Instant, i: u8) {
        s.handle_input(
            t,
            addr(i),
            &pkt(Body::Nak(packet::Nak {
                receiver: u64::from(i),
                entries: vec![NakEntry {
                    block: 0,
                    needed: 50,
                    seen: 100,
                }],
            })),
        );
    }

    #[test]
    fn a_status_claiming_more_blocks_than_the_image_has_is_not_progress() {
        let now = t0();
        let (m, _img) = setup();
        let count = m.manifest().block_count();
        let mut s = Sender::new(cfg(), m, now).unwrap();
        join(&mut s, now, 1, true);
        while s.poll_event().is_some() {}
        let status = |blocks_done| {
            pkt(Body::Status(Status {
                receiver: 1,
                blocks_done,
                ..Status::default()
            }))
        };
        // A forger (receivers are not authenticated) claims far more than the image holds.
        s.handle_input(now, addr(1), &status(u32::MAX));
        s.handle_input(now, addr(1), &status(count + 1));
        assert_eq!(s.stats().rejected_packets, 2);
        assert!(
            std::iter::from_fn(|| s.poll_event())
                .all(|e| !matches!(e, SenderEvent::ReceiverProgress { .. })),
            "an impossible Status must not count as progress"
        );
        // The real receiver's own report at the image's end is taken.
        s.handle_input(now, addr(1), &status(count));
        assert_eq!(s.stats().rejected_packets, 2);
        assert!(std::iter::from_fn(|| s.poll_event()).any(|e| matches!(
            e,
            SenderEvent::ReceiverProgress { status, .. } if status.blocks_done == count
        )));
    }

    #[test]
    fn lagging_receiver_is_moved_to_catch_up_and_its_naks_draw_no_repair() {
        let (mut s, mut img, catch_ups, t) = lagging_receiver(4000);
        assert_eq!(catch_ups, vec![(Dest::Unicast(addr(1)), 1)]);
        assert_eq!(s.stats().moved_to_unicast, 1);
        let ev: Vec<SenderEvent> = std::iter::from_fn(|| s.poll_event()).collect();
        assert!(ev.iter().any(|e| matches!(
            e,
            SenderEvent::ReceiverToUnicast { id: 1, reason, .. } if reason.contains("behind")
        )));
        let t = t + Duration::from_millis(100);
        nak_block_0(&mut s, t, 1);
        let rep = repair_over(&mut s, t, &mut img);
        assert!(rep.is_empty(), "{rep:?}");
        assert_eq!(s.stats().naks_ignored, 1);
        let t = t + Duration::from_millis(100);
        nak_block_0(&mut s, t, 2);
        assert_eq!(repair_over(&mut s, t, &mut img).len(), 50);
    }

    #[test]
    fn without_a_catch_up_port_a_lagging_receiver_is_still_repaired() {
        let (mut s, mut img, catch_ups, t) = lagging_receiver(0);
        assert!(catch_ups.is_empty());
        assert_eq!(s.stats().moved_to_unicast, 0);
        let t = t + Duration::from_millis(100);
        nak_block_0(&mut s, t, 1);
        assert_eq!(repair_over(&mut s, t, &mut img).len(), 50);
    }

    #[test]
    fn naks_aggregate_as_max_and_parity_is_fresh() {
        let now = t0();
        let (m, mut img) = setup();
        let mut s = Sender::new(cfg(), m, now).unwrap();
        join(&mut s, now, 1, true);
        join(&mut s, now, 2, true);
        let mut t = now;
        let mut sent = Vec::new();
        while s.pass_position() < 4 {
            t += Duration::from_millis(1);
            sent.extend(drain(&mut s, t, &mut img));
        }
        assert_eq!(sent.len(), 400, "4 blocks of k=100, once each");
        // Two receivers miss 3 and 7 symbols of block 1; NAKs arrive long after the pass.
        t += Duration::from_millis(100);
        for (i, need) in [(1u8, 3u32), (2, 7)] {
            s.handle_input(
                t,
                addr(i),
                &pkt(Body::Nak(packet::Nak {
                    receiver: u64::from(i),
                    entries: vec![NakEntry {
                        block: 1,
                        needed: need,
                        seen: 100,
                    }],
                })),
            );
        }
        let rep = drain(&mut s, t, &mut img);
        assert_eq!(rep.len(), 7, "max(3, 7), not the sum: {rep:?}");
        assert!(
            rep.iter()
                .all(|&(b, esi, f)| b == 1 && esi >= 100 && f & packet::DATA_REPAIR != 0)
        );
        // A NAK composed before that repair arrived (seen = 100) within the guard is covered
        // by the symbols in flight; nothing more is sent.
        s.handle_input(
            t,
            addr(1),
            &pkt(Body::Nak(packet::Nak {
                receiver: 1,
                entries: vec![NakEntry {
                    block: 1,
                    needed: 5,
                    seen: 100,
                }],
            })),
        );
        assert!(drain(&mut s, t, &mut img).is_empty());
        // Later, a receiver still short of 2 gets 2 *new* indices.
        t += Duration::from_millis(100);
        s.handle_input(
            t,
            addr(2),
            &pkt(Body::Nak(packet::Nak {
                receiver: 2,
                entries: vec![NakEntry {
                    block: 1,
                    needed: 2,
                    seen: 107,
                }],
            })),
        );
        let rep2 = drain(&mut s, t, &mut img);
        let first: HashSet<u16> = rep.iter().map(|r| r.1).collect();
        assert_eq!(rep2.len(), 2);
        assert!(rep2.iter().all(|r| !first.contains(&r.1)), "{rep2:?}");
    }

    #[test]
    fn silent_receiver_is_failed_and_session_finishes() {
        let now = t0();
        let (m, mut img) = setup();
        let mut s = Sender::new(cfg(), m, now).unwrap();
        join(&mut s, now, 1, true);
        join(&mut s, now, 2, true);
        let mut t = now;
        let mut finished = None;
        for _ in 0..4000 {
            t += Duration::from_millis(1);
            // Receiver 1 keeps reporting and finishes; receiver 2 is silent.
            if t.duration_since(now).as_millis().is_multiple_of(100) {
                s.handle_input(
                    t,
                    addr(1),
                    &pkt(Body::Status(Status {
                        receiver: 1,
                        ..Status::default()
                    })),
                );
            }
            if t.duration_since(now).as_millis() == 500 {
                s.handle_input(
                    t,
                    addr(1),
                    &pkt(Body::Done(packet::Done {
                        receiver: 1,
                        ok: true,
                        reason: "",
                    })),
                );
            }
            s.handle_timeout(t);
            drain(&mut s, t, &mut img);
            while let Some(e) = s.poll_event() {
                if let SenderEvent::Finished(sum) = e {
                    finished = Some((t, sum));
                }
            }
            if finished.is_some() {
                break;
            }
        }
        let (at, sum) = finished.expect("finished");
        let waited = at.duration_since(now);
        assert!(waited <= Duration::from_millis(2100), "{waited:?}");
        assert_eq!(sum.receivers[0].outcome, ReceiverOutcome::Verified);
        assert!(
            matches!(&sum.receivers[1].outcome, ReceiverOutcome::Failed { reason } if reason.contains("silent"))
        );
    }

    #[test]
    fn garbage_input_is_counted_not_fatal() {
        let now = t0();
        let (m, _) = setup();
        let mut s = Sender::new(cfg(), m, now).unwrap();
        s.handle_input(now, addr(1), b"hello");
        s.handle_input(now, addr(1), &[0u8; 2000]);
        let mut other = Vec::new();
        Packet::new(SessionId(1), Body::End { flags: 0 }).encode(&mut other);
        s.handle_input(now, addr(1), &other);
        assert_eq!(s.stats().rejected_packets, 3);
        // A receiver's random id that never joined is ignored.
        s.handle_input(
            now,
            addr(1),
            &pkt(Body::Nak(packet::Nak {
                receiver: 77,
                entries: vec![],
            })),
        );
        assert_eq!(s.stats().naks_received, 0);
        let _ = Receiver::new(ReceiverConfig::default(), now);
    }

    #[test]
    fn starts_when_all_expected_hold_the_manifest() {
        let now = t0();
        let (m, _) = setup();
        let mut s = Sender::new(
            SenderConfig {
                expected_receivers: vec!["r1".into(), "r3".into()],
                min_receivers: 0,
                ..cfg()
            },
            m,
            now,
        )
        .unwrap();
        join(&mut s, now, 1, true);
        join(&mut s, now, 2, true);
        assert!(
            !std::iter::from_fn(|| s.poll_event())
                .any(|e| matches!(e, SenderEvent::Started { .. }))
        );
        join(&mut s, now, 3, true);
        assert!(std::iter::from_fn(|| s.poll_event()).any(|e| e
            == SenderEvent::Started {
                receivers: 3,
                reason: StartReason::AllExpected
            }));
    }

    #[test]
    fn join_flood_is_bounded() {
        let now = t0();
        let (m, _) = setup();
        let mut s = Sender::new(
            SenderConfig {
                max_receivers: 2,
                ..cfg()
            },
            m,
            now,
        )
        .unwrap();
        for i in 1..=5 {
            join(&mut s, now, i, false);
        }
        let joined = std::iter::from_fn(|| s.poll_event())
            .filter(|e| matches!(e, SenderEvent::ReceiverJoined { .. }))
            .count();
        assert_eq!(joined, 2);
        assert_eq!(s.stats().rejected_packets, 3);
    }

    #[test]
    fn bad_config_rejected() {
        let (m, _) = setup();
        let e = Sender::new(
            SenderConfig {
                rate_bps: 0,
                ..SenderConfig::default()
            },
            m,
            t0(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("rate_bps"));
    }
}
