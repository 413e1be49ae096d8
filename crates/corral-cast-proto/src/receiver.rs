//! The receiver state machine.
//!
//! It learns the session from an Announce (or from [`ReceiverConfig::session`] /
//! [`ReceiverConfig::sender`]), joins, assembles and verifies the signed manifest, collects
//! symbols per block, rebuilds a block with Reed–Solomon as soon as it holds `k` distinct
//! symbols, decompresses it and checks its BLAKE3 hash **before** emitting
//! [`ReceiverEvent::BlockReady`]. A block that fails is discarded (its symbols dropped, so later
//! ones can rebuild it) and counted. NAKs are batched, jittered by an injected seed, and
//! rate-limited; Status goes out periodically; Done is retried until the sender acknowledges it.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::block::{EncodedBlock, parity_count, source_count};
use crate::error::{BlockError, ManifestError};
use crate::manifest::SignedManifest;
use crate::packet::{self, Announce, Body, Data, NakEntry, Packet, Status};
use crate::rng::SplitMix64;
use crate::{Dest, MANIFEST_CHUNK_LEN, SessionId, Transmit};

/// Receiver settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceiverConfig {
    /// Name reported to the sender (hostname).
    pub name: String,
    /// Only accept manifests signed by this Ed25519 public key. `None`: accept any validly
    /// self-signed manifest, flagged as unauthenticated.
    pub trusted_key: Option<[u8; 32]>,
    /// Seed for the receiver id and NAK jitter (the driver passes OS randomness; tests pass a
    /// fixed value).
    pub seed: u64,
    /// Only join this session (`None`: the first one announced).
    pub session: Option<SessionId>,
    /// The sender's unicast address, if known in advance (otherwise learnt from Announce).
    pub sender: Option<SocketAddr>,
    /// Period of Status reports.
    pub status_interval: Duration,
    /// Period of Join retries until acknowledged.
    pub join_interval: Duration,
    /// Largest random delay before a NAK, so many receivers do not NAK in lockstep.
    pub nak_jitter: Duration,
    /// Least time between two NAKs for the same block.
    pub nak_interval: Duration,
    /// Do not re-NAK a block that received a symbol this recently (repair is arriving).
    pub nak_quiet: Duration,
    /// Least time between two NAK packets.
    pub nak_min_gap: Duration,
    /// Emit [`ReceiverEvent::MulticastSilent`] if no data arrives this long after joining a
    /// started session.
    pub silent_after: Duration,
    /// Period of Done retries.
    pub done_interval: Duration,
    /// Done retries before giving up.
    pub done_retries: u32,
    /// Largest signed manifest accepted.
    pub max_manifest_len: u32,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            name: String::new(),
            trusted_key: None,
            seed: 0,
            session: None,
            sender: None,
            status_interval: Duration::from_millis(250),
            join_interval: Duration::from_millis(200),
            nak_jitter: Duration::from_millis(10),
            nak_interval: Duration::from_millis(60),
            nak_quiet: Duration::from_millis(10),
            nak_min_gap: Duration::from_millis(2),
            silent_after: Duration::from_secs(5),
            done_interval: Duration::from_millis(200),
            done_retries: 25,
            max_manifest_len: 64 << 20,
        }
    }
}

/// Things the driver must act on.
#[derive(Debug, Clone, PartialEq)]
pub enum ReceiverEvent {
    /// The sender acknowledged our Join.
    Joined {
        /// The session.
        session: SessionId,
        /// The sender's address.
        sender: SocketAddr,
        /// The sender's TCP catch-up port (0: none), from its Announce.
        tcp_port: u16,
    },
    /// The manifest is verified and in force.
    ManifestReady {
        /// The manifest.
        manifest: Arc<SignedManifest>,
        /// Signed by the trusted key; `false` means no key was configured (a warning).
        authenticated: bool,
    },
    /// A manifest was rejected (bad signature, untrusted key, wrong hash); counted.
    ManifestRejected {
        /// Why.
        error: ManifestError,
    },
    /// Block `index` is verified: write it at `offset`.
    BlockReady {
        /// Block index.
        index: u32,
        /// Byte offset in the image.
        offset: u64,
        /// Block length.
        len: u32,
        /// The bytes; `None` for an all-zero block (never sent).
        data: Option<Vec<u8>>,
    },
    /// A rebuilt block failed verification and was discarded; it will be fetched again.
    BlockRejected {
        /// Why (holds the block index).
        error: BlockError,
    },
    /// Every block is ready. Read the image back, check the manifest's image hash and call
    /// [`Receiver::finish`].
    AllBlocksReady,
    /// Joined a started session but no data arrived within `silent_after`: multicast may be
    /// blocked; consider the TCP catch-up path.
    MulticastSilent {
        /// How long it has been silent.
        silent_for: Duration,
    },
    /// The sender moved us to unicast catch-up: we are too far behind the stream (or lose too
    /// much of it) for multicast repair, and it no longer answers our NAKs by multicast. NAKs
    /// are suppressed from now on; fetch the missing blocks over TCP catch-up. Emitted once.
    CatchUpAdvised,
    /// The sender acknowledged our Done.
    DoneAcknowledged,
    /// Done was retried `done_retries` times without acknowledgement.
    DoneUnacknowledged,
    /// The sender ended the session.
    SessionEnded {
        /// The sender aborted rather than finished.
        aborted: bool,
    },
}

/// Counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReceiverStats {
    /// Data packets received.
    pub data_packets: u64,
    /// Data packets useful (new symbol for an incomplete block).
    pub useful_packets: u64,
    /// In-order pass packets detected as lost.
    pub lost_packets: u64,
    /// Packets that did not decode, were for another session, or contradict the manifest.
    pub rejected_packets: u64,
    /// Blocks that failed verification.
    pub rejected_blocks: u32,
    /// Manifests rejected.
    pub rejected_manifests: u32,
    /// NAK packets sent.
    pub naks_sent: u64,
}

/// When each incomplete, due block should next be NAKed, indexed both ways so the next
/// deadline and the due set cost O(log n) even for a late joiner with thousands of blocks due.
#[derive(Debug, Default)]
struct NakSchedule {
    by_block: HashMap<u32, Instant>,
    by_time: BTreeSet<(Instant, u32)>,
}

impl NakSchedule {
    fn insert(&mut self, block: u32, at: Instant) {
        if let Some(old) = self.by_block.insert(block, at) {
            self.by_time.remove(&(old, block));
        }
        self.by_time.insert((at, block));
    }

    fn insert_if_absent(&mut self, block: u32, at: Instant) {
        if !self.by_block.contains_key(&block) {
            self.insert(block, at);
        }
    }

    fn postpone(&mut self, block: u32, at: Instant) {
        if self.by_block.get(&block).is_some_and(|&old| at > old) {
            self.insert(block, at);
        }
    }

    fn remove(&mut self, block: u32) {
        if let Some(old) = self.by_block.remove(&block) {
            self.by_time.remove(&(old, block));
        }
    }

    fn clear(&mut self) {
        self.by_block.clear();
        self.by_time.clear();
    }

    fn is_empty(&self) -> bool {
        self.by_block.is_empty()
    }

    fn first(&self) -> Option<Instant> {
        self.by_time.first().map(|&(t, _)| t)
    }

    /// Up to `max` blocks due at `now`, earliest first.
    fn due(&self, now: Instant, max: usize) -> Vec<u32> {
        self.by_time
            .iter()
            .take_while(|&&(t, _)| t <= now)
            .take(max)
            .map(|&(_, b)| b)
            .collect()
    }
}

const SYM_NONE: u8 = 0;
const SYM_HAVE: u8 = 1;
const SYM_POISONED: u8 = 2;

#[derive(Debug)]
struct Assembly {
    k: u16,
    payload_len: u32,
    compressed: bool,
    /// `k + r` states: `SYM_*`.
    have: Vec<u8>,
    count: u16,
    /// One past the highest ESI received.
    seen: u32,
    /// Source symbols laid out in place (ESI `i` at `i * symbol_size`), so a block that lost
    /// nothing is its own payload, with no copy and no decoding. Grows as symbols arrive
    /// (usually in order); holes are zero-filled and flagged in `have`.
    source: Vec<u8>,
    /// Parity symbols in arrival order, and their ESIs.
    parity: Vec<u8>,
    parity_esis: Vec<u16>,
    conflicts: u32,
    last_symbol: Option<Instant>,
    /// Highest repair (parity) index received, for loss estimates during repair.
    last_repair: Option<u16>,
}

#[derive(Debug)]
enum Slot {
    Missing,
    Assembling(Box<Assembly>),
    Done,
}

#[derive(Debug)]
struct ManifestAsm {
    total_len: u32,
    hash: [u8; 32],
    chunks: BTreeMap<u32, Vec<u8>>,
    bytes: usize,
}

#[derive(Debug)]
enum DoneState {
    NotYet,
    Pending {
        ok: bool,
        reason: String,
        tries: u32,
        next: Option<Instant>,
    },
    Acked,
    GaveUp,
}

/// The receiver state machine.
#[derive(Debug)]
pub struct Receiver {
    cfg: ReceiverConfig,
    created: Instant,
    id: u64,
    rng: SplitMix64,
    session: Option<SessionId>,
    sender: Option<SocketAddr>,
    announce: Option<Announce>,
    sender_started: bool,
    masm: Option<ManifestAsm>,
    manifest: Option<Arc<SignedManifest>>,
    slots: Vec<Slot>,
    done_blocks: u32,
    done_bytes: u64,
    pending_have: Vec<u32>,
    frontier: u32,
    naks: NakSchedule,
    last_nak_sent: Option<Instant>,
    last_pass: Option<(u32, u16, u16)>,
    joined_at: Option<Instant>,
    next_join: Option<Instant>,
    join_acked: bool,
    join_acked_with_manifest: bool,
    last_join_had_manifest: bool,
    naks_suppressed: bool,
    catch_up_advised: bool,
    next_status: Option<Instant>,
    last_data: Option<Instant>,
    silent_reported: bool,
    all_ready_reported: bool,
    done: DoneState,
    ended: bool,
    events: VecDeque<ReceiverEvent>,
    stats: ReceiverStats,
    /// Block buffers handed back by the driver ([`Receiver::recycle`]), reused for new
    /// assemblies so a steady stream does not fault in (and zero) fresh pages for every block.
    spare: Vec<Vec<u8>>,
    /// The last Preparing heard before any Announce.
    preparing: Option<SenderPreparing>,
}

/// A sender still reading and hashing its image, as its last Preparing packet told
/// ([`Receiver::sender_preparing`]). Unauthenticated: only shown, never acted on beyond
/// postponing the multicast-silence check of a receiver told its sender and session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenderPreparing {
    /// Where it came from.
    pub from: SocketAddr,
    /// The session it will announce.
    pub session: SessionId,
    /// The image's size (0: not known yet).
    pub image_size: u64,
    /// Bytes read and hashed so far.
    pub bytes_done: u64,
    /// When it was heard.
    pub heard_at: Instant,
}

/// Most recycled block buffers kept.
const MAX_SPARE_BUFFERS: usize = 4;

impl Receiver {
    /// A receiver waiting for an Announce. `now` starts its timers.
    pub fn new(cfg: ReceiverConfig, now: Instant) -> Self {
        let mut rng = SplitMix64::new(cfg.seed);
        let id = rng.next_u64();
        // Told the sender and the session: join at once by unicast, without waiting for an
        // Announce (which may never come if multicast is blocked).
        let told = cfg.sender.is_some() && cfg.session.is_some();
        Receiver {
            created: now,
            id,
            rng,
            session: cfg.session,
            sender: cfg.sender,
            announce: None,
            sender_started: false,
            masm: None,
            manifest: None,
            slots: Vec::new(),
            done_blocks: 0,
            done_bytes: 0,
            pending_have: Vec::new(),
            frontier: 0,
            naks: NakSchedule::default(),
            last_nak_sent: None,
            last_pass: None,
            joined_at: told.then_some(now),
            next_join: told.then_some(now),
            join_acked: false,
            join_acked_with_manifest: false,
            last_join_had_manifest: false,
            naks_suppressed: false,
            catch_up_advised: false,
            next_status: told.then_some(now + cfg.status_interval),
            last_data: None,
            silent_reported: false,
            all_ready_reported: false,
            done: DoneState::NotYet,
            ended: false,
            events: VecDeque::new(),
            stats: ReceiverStats::default(),
            spare: Vec::new(),
            preparing: None,
            cfg,
        }
    }

    /// The sender's last word that it is still reading and hashing the image, heard before
    /// any Announce (`None` once one is heard, or if no such packet came).
    pub fn sender_preparing(&self) -> Option<&SenderPreparing> {
        self.preparing.as_ref().filter(|_| self.announce.is_none())
    }

    /// This receiver's id (random from the seed).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The session joined, once known.
    pub fn session(&self) -> Option<SessionId> {
        self.session
    }

    /// The sender's address, once known.
    pub fn sender(&self) -> Option<SocketAddr> {
        self.sender
    }

    /// The sender's own word, heard over its TCP catch-up channel, of the UDP port it listens
    /// on (a receiver that cannot hear the group has no announcement to learn it from):
    /// reports go there from now on, at the address this receiver follows (the caller takes
    /// the word only from that host; with no sender known, nothing changes).
    pub fn sender_listens_on(&mut self, port: u16) {
        if let Some(s) = &mut self.sender
            && port != 0
        {
            s.set_port(port);
        }
    }

    /// The sender's TCP catch-up port from its Announce (0 or `None`: none known).
    pub fn tcp_port(&self) -> Option<u16> {
        self.announce.map(|a| a.tcp_port)
    }

    /// The verified manifest, once accepted.
    pub fn manifest(&self) -> Option<&Arc<SignedManifest>> {
        self.manifest.as_ref()
    }

    /// Counters.
    pub fn stats(&self) -> ReceiverStats {
        self.stats
    }

    /// Blocks ready (verified, zero, or marked as held).
    pub fn blocks_done(&self) -> u32 {
        self.done_blocks
    }

    /// Whether every block is ready.
    pub fn is_complete(&self) -> bool {
        self.manifest.is_some() && self.done_blocks as usize == self.slots.len()
    }

    /// Whether the session is over for us (ended by the sender, or Done acknowledged).
    pub fn is_finished(&self) -> bool {
        self.ended || matches!(self.done, DoneState::Acked | DoneState::GaveUp)
    }

    /// Blocks not yet ready, in order. Empty until the manifest is known.
    pub fn missing_blocks(&self) -> Vec<u32> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !matches!(s, Slot::Done))
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// Marks blocks the driver already holds verified on disk (resume). May be called before
    /// the manifest arrives; applied then. No `BlockReady` is emitted for them.
    pub fn mark_have(&mut self, blocks: impl IntoIterator<Item = u32>) {
        if self.manifest.is_none() {
            self.pending_have.extend(blocks);
            return;
        }
        for b in blocks {
            self.mark_done(b);
        }
        self.check_all_ready();
    }

    fn mark_done(&mut self, b: u32) -> bool {
        let Some(m) = &self.manifest else {
            return false;
        };
        let len = m.manifest().block_len(b);
        match self.slots.get_mut(b as usize) {
            Some(s) if !matches!(s, Slot::Done) => {
                *s = Slot::Done;
                self.done_blocks += 1;
                self.done_bytes += u64::from(len);
                self.naks.remove(b);
                true
            }
            _ => false,
        }
    }

    /// Hands back the buffer of a [`ReceiverEvent::BlockReady`] once it is written, for reuse
    /// by later blocks (optional; saves an allocation and page faults per block).
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if self.spare.len() < MAX_SPARE_BUFFERS && buf.capacity() > 0 {
            self.spare.push(buf);
        }
    }

    /// Stops (or resumes) NAKing. A driver that fetches the missing blocks over the TCP
    /// catch-up path calls this with `true` so the sender does not multicast repair nobody
    /// can use. Status and Done are still sent.
    pub fn suppress_naks(&mut self, suppress: bool) {
        self.naks_suppressed = suppress;
    }

    /// Whether NAKs are suppressed ([`Receiver::suppress_naks`], or a CatchUp from the sender).
    pub fn naks_suppressed(&self) -> bool {
        self.naks_suppressed
    }

    /// Reports the final result (after the driver's read-back check); Done is sent and retried
    /// until the sender acknowledges it.
    pub fn finish(&mut self, ok: bool, reason: &str) {
        if matches!(self.done, DoneState::NotYet) {
            self.done = DoneState::Pending {
                ok,
                reason: reason.to_owned(),
                tries: 0,
                next: None,
            };
        }
    }

    /// Feeds a signed manifest fetched out of band (TCP catch-up). Verified exactly as one
    /// assembled from multicast chunks.
    pub fn accept_manifest_bytes(&mut self, bytes: &[u8]) -> Result<(), ManifestError> {
        if let Some(a) = &self.announce {
            let h = *blake3::hash(bytes).as_bytes();
            if h != a.manifest_hash {
                let e = ManifestError::HashMismatch {
                    found: hex(&h),
                    expected: hex(&a.manifest_hash),
                };
                self.stats.rejected_manifests += 1;
                self.events
                    .push_back(ReceiverEvent::ManifestRejected { error: e.clone() });
                return Err(e);
            }
        }
        self.install_manifest(bytes)
    }

    fn install_manifest(&mut self, bytes: &[u8]) -> Result<(), ManifestError> {
        if self.manifest.is_some() {
            return Ok(());
        }
        let res = SignedManifest::decode(bytes).and_then(|s| {
            if let Some(k) = &self.cfg.trusted_key {
                s.verify(k)?;
            }
            if let Some(sess) = self.session
                && s.manifest().session != sess
            {
                return Err(ManifestError::WrongSession {
                    found: s.manifest().session,
                    expected: sess,
                });
            }
            // Only now (authenticated, our session): zero blocks are never sent, so their
            // flags must be right before they count as verified.
            s.manifest().check_zero_blocks()?;
            Ok(s)
        });
        match res {
            Ok(s) => {
                let authenticated = self.cfg.trusted_key.is_some();
                if !authenticated {
                    tracing::warn!(
                        session = %s.manifest().session,
                        "accepting manifest without a trusted key: blocks are checked against it, \
                         but its origin is not authenticated"
                    );
                }
                let s = Arc::new(s);
                let m = s.manifest();
                self.session = Some(m.session);
                self.slots = (0..m.block_count()).map(|_| Slot::Missing).collect();
                self.manifest = Some(s.clone());
                self.masm = None;
                // Zero blocks are ready at once (announced, never sent).
                for i in 0..m.block_count() {
                    if m.blocks[i as usize].zero && self.mark_done(i) {
                        self.events.push_back(ReceiverEvent::BlockReady {
                            index: i,
                            offset: m.block_offset(i),
                            len: m.block_len(i),
                            data: None,
                        });
                    }
                }
                for b in std::mem::take(&mut self.pending_have) {
                    self.mark_done(b);
                }
                self.events.push_back(ReceiverEvent::ManifestReady {
                    manifest: s,
                    authenticated,
                });
                // Tell the sender we are ready (Join with the flag).
                self.join_acked_with_manifest = false;
                self.next_join = Some(self.last_anchor());
                self.check_all_ready();
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "manifest rejected");
                self.stats.rejected_manifests += 1;
                self.masm = None;
                self.events
                    .push_back(ReceiverEvent::ManifestRejected { error: e.clone() });
                Err(e)
            }
        }
    }

    /// An instant in the past: "as soon as possible" for timers.
    fn last_anchor(&self) -> Instant {
        self.created
    }

    /// Feeds an encoded block fetched over TCP catch-up (bytes from [`EncodedBlock::to_bytes`]).
    /// Verified exactly as a block rebuilt from multicast; on success `BlockReady` is emitted.
    pub fn accept_encoded_block(&mut self, index: u32, bytes: &[u8]) -> Result<(), BlockError> {
        let Some(m) = self.manifest.clone() else {
            return Err(BlockError::NoManifest { block: index });
        };
        let count = m.manifest().block_count();
        if index >= count {
            return Err(BlockError::OutOfRange {
                block: index,
                count,
            });
        }
        if matches!(self.slots[index as usize], Slot::Done) {
            return Ok(());
        }
        let enc = EncodedBlock::from_bytes(index, bytes)?;
        self.verify_and_emit(index, enc.compressed(), enc.payload().to_vec())
    }

    /// Decodes and verifies a rebuilt payload; emits `BlockReady` on success, counts and
    /// reports the block otherwise.
    fn verify_and_emit(
        &mut self,
        index: u32,
        compressed: bool,
        payload: Vec<u8>,
    ) -> Result<(), BlockError> {
        let Some(m) = self.manifest.clone() else {
            return Err(BlockError::NoManifest { block: index });
        };
        let man = m.manifest();
        let entry = man.blocks[index as usize];
        let len = man.block_len(index);
        // Zero blocks too: their hash is the hash of zeros, so only zeros are accepted.
        let res = crate::block::decode_payload(
            index,
            compressed,
            payload,
            len as usize,
            &entry.hash,
            man.block_pos(index),
        );
        match res {
            Ok(data) => {
                if self.mark_done(index) {
                    self.events.push_back(ReceiverEvent::BlockReady {
                        index,
                        offset: man.block_offset(index),
                        len,
                        data: Some(data),
                    });
                }
                self.check_all_ready();
                Ok(())
            }
            Err(e) => {
                self.stats.rejected_blocks += 1;
                tracing::warn!(block = index, error = %e, "block failed verification; discarded");
                self.events
                    .push_back(ReceiverEvent::BlockRejected { error: e.clone() });
                Err(e)
            }
        }
    }

    fn check_all_ready(&mut self) {
        if !self.all_ready_reported && self.is_complete() {
            self.all_ready_reported = true;
            self.naks.clear();
            self.events.push_back(ReceiverEvent::AllBlocksReady);
        }
    }

    /// Feeds one datagram received from `from`. Never panics; bad input is counted and dropped.
    pub fn handle_input(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        let pkt = match Packet::decode(datagram) {
            Ok(p) => p,
            Err(_) => {
                self.stats.rejected_packets += 1;
                return;
            }
        };
        if let Some(s) = self.session
            && pkt.session != s
        {
            self.stats.rejected_packets += 1;
            return;
        }
        match pkt.body {
            Body::Announce(a) => self.on_announce(now, from, pkt.session, a),
            Body::ManifestChunk(c) if self.session == Some(pkt.session) => {
                self.on_manifest_chunk(c.offset, c.total_len, c.bytes);
            }
            Body::Data(d) if self.session == Some(pkt.session) => {
                self.on_data(now, &d);
            }
            Body::Preparing(p) if self.announce.is_none() => {
                // A receiver told its sender and session started its multicast-silence clock
                // at once; a sender still hashing its image has nothing to send yet, so the
                // clock starts again (only for that sender's word on that session).
                if self.session == Some(pkt.session)
                    && self.sender.is_some_and(|s| s.ip() == from.ip())
                    && self.joined_at.is_some()
                {
                    self.joined_at = Some(now);
                }
                self.preparing = Some(SenderPreparing {
                    from,
                    session: pkt.session,
                    image_size: p.image_size,
                    bytes_done: p.bytes_done,
                    heard_at: now,
                });
            }
            Body::JoinAck { receiver } if receiver == self.id => {
                if !self.join_acked
                    && let (Some(s), Some(a)) = (self.session, self.sender)
                {
                    self.events.push_back(ReceiverEvent::Joined {
                        session: s,
                        sender: a,
                        tcp_port: self.announce.map(|a| a.tcp_port).unwrap_or(0),
                    });
                }
                self.join_acked = true;
                if self.last_join_had_manifest {
                    self.join_acked_with_manifest = true;
                }
            }
            // Only from the sender we follow: anyone else could at most make us fetch over TCP
            // (verified like multicast), but there is no reason to let them.
            Body::CatchUp { receiver }
                if receiver == self.id
                    && self.session == Some(pkt.session)
                    && self.sender == Some(from)
                    && !self.catch_up_advised =>
            {
                self.catch_up_advised = true;
                self.naks_suppressed = true;
                self.events.push_back(ReceiverEvent::CatchUpAdvised);
            }
            Body::DoneAck { receiver } if receiver == self.id => {
                if matches!(self.done, DoneState::Pending { .. }) {
                    self.done = DoneState::Acked;
                    self.events.push_back(ReceiverEvent::DoneAcknowledged);
                }
            }
            Body::End { flags } if self.session == Some(pkt.session) && !self.ended => {
                self.ended = true;
                self.naks.clear();
                self.events.push_back(ReceiverEvent::SessionEnded {
                    aborted: flags & packet::END_ABORTED != 0,
                });
            }
            _ => {}
        }
    }

    fn on_announce(&mut self, now: Instant, from: SocketAddr, session: SessionId, a: Announce) {
        if self.session.is_none() {
            self.session = Some(session);
        }
        match self.sender {
            None => self.sender = Some(from),
            // Told the sender's host, whose report port was the stream's by default: its own
            // datagrams say where it listens (another sender on that host may hold that port).
            Some(s) if s.ip() == from.ip() && s.port() != from.port() => {
                self.sender = Some(from);
            }
            Some(_) => {}
        }
        if a.flags & packet::ANNOUNCE_STARTED != 0 && !self.sender_started {
            self.sender_started = true;
        }
        let first = self.announce.is_none();
        // Keep the first announce's manifest hash until that manifest is rejected.
        match &self.announce {
            Some(old) if old.manifest_hash != a.manifest_hash && self.manifest.is_none() => {
                if self.masm.as_ref().is_none_or(|m| m.bytes == 0) {
                    self.announce = Some(a);
                }
            }
            Some(_) => {
                let keep_hash = self.announce.map(|o| (o.manifest_hash, o.manifest_len));
                let mut na = a;
                if let Some((h, l)) = keep_hash {
                    na.manifest_hash = h;
                    na.manifest_len = l;
                }
                self.announce = Some(na);
            }
            None => self.announce = Some(a),
        }
        if first {
            self.joined_at = Some(now);
            self.next_join = Some(now);
            self.next_status = Some(now + self.cfg.status_interval);
        }
        if self.manifest.is_some() {
            self.advance_frontier(now, a.pass_pos);
        }
    }

    fn on_manifest_chunk(&mut self, offset: u32, total_len: u32, bytes: &[u8]) {
        if self.manifest.is_some() {
            return;
        }
        let Some(a) = self.announce else {
            return;
        };
        if total_len != a.manifest_len
            || total_len > self.cfg.max_manifest_len
            || !(offset as usize).is_multiple_of(MANIFEST_CHUNK_LEN)
            || bytes.len() != (total_len as usize - offset as usize).min(MANIFEST_CHUNK_LEN)
        {
            self.stats.rejected_packets += 1;
            return;
        }
        let asm = self.masm.get_or_insert_with(|| ManifestAsm {
            total_len,
            hash: a.manifest_hash,
            chunks: BTreeMap::new(),
            bytes: 0,
        });
        if asm.total_len != total_len || asm.hash != a.manifest_hash {
            self.masm = None;
            return;
        }
        if asm.chunks.contains_key(&offset) {
            return;
        }
        asm.chunks.insert(offset, bytes.to_vec());
        asm.bytes += bytes.len();
        if asm.bytes == asm.total_len as usize {
            let mut all = Vec::with_capacity(asm.bytes);
            for c in asm.chunks.values() {
                all.extend_from_slice(c);
            }
            let h = *blake3::hash(&all).as_bytes();
            if h != asm.hash {
                let e = ManifestError::HashMismatch {
                    found: hex(&h),
                    expected: hex(&asm.hash),
                };
                self.stats.rejected_manifests += 1;
                self.masm = None;
                self.events
                    .push_back(ReceiverEvent::ManifestRejected { error: e });
                return;
            }
            let _ = self.install_manifest(&all);
        }
    }

    fn advance_frontier(&mut self, now: Instant, to: u32) {
        let count = self.slots.len() as u32;
        let to = to.min(count);
        while self.frontier < to {
            let b = self.frontier;
            self.frontier += 1;
            if !matches!(self.slots[b as usize], Slot::Done) {
                let jitter = self.jitter();
                self.naks.insert_if_absent(b, now + jitter);
            }
        }
    }

    fn jitter(&mut self) -> Duration {
        self.cfg.nak_jitter.mul_f64(self.rng.next_f64())
    }

    fn on_data(&mut self, now: Instant, d: &Data<'_>) {
        self.stats.data_packets += 1;
        self.last_data = Some(now);
        let Some(m) = self.manifest.clone() else {
            return;
        };
        let man = m.manifest();
        let b = d.block;
        if b >= man.block_count() {
            self.stats.rejected_packets += 1;
            return;
        }
        // Loss estimate and frontier from the in-order pass.
        if d.flags & packet::DATA_REPAIR == 0 {
            if let Some((lb, le, lk)) = self.last_pass {
                if b == lb && d.esi > le {
                    self.stats.lost_packets += u64::from(d.esi - le - 1);
                } else if b > lb {
                    self.stats.lost_packets +=
                        u64::from(lk.saturating_sub(le + 1)) + u64::from(d.esi);
                }
            }
            if self
                .last_pass
                .is_none_or(|(lb, le, _)| (b, d.esi) > (lb, le))
            {
                self.last_pass = Some((b, d.esi, d.k));
            }
            self.advance_frontier(now, b);
        }
        let entry = man.blocks[b as usize];
        let block_len = man.block_len(b);
        let sym = usize::from(man.symbol_size);
        let compressed = d.flags & packet::DATA_COMPRESSED != 0;
        let valid = !entry.zero
            && d.symbol.len() == sym
            && d.payload_len >= 1
            && (if compressed {
                !matches!(man.compression, crate::Compression::None) && d.payload_len < block_len
            } else {
                d.payload_len == block_len
            })
            && usize::from(d.k) == source_count(d.payload_len as usize, man.symbol_size)
            && u32::from(d.esi) < u32::from(d.k) + u32::from(parity_count(d.k));
        if !valid {
            self.stats.rejected_packets += 1;
            return;
        }
        let slot = &mut self.slots[b as usize];
        if matches!(slot, Slot::Done) {
            return;
        }
        if let Slot::Assembling(a) = slot
            && (a.k != d.k || a.payload_len != d.payload_len || a.compressed != compressed)
        {
            a.conflicts += 1;
            self.stats.rejected_packets += 1;
            // Legitimate traffic outnumbers a forger's: once conflicting packets exceed
            // what we hold, start over with the new parameters.
            if a.conflicts <= u32::from(a.count) {
                return;
            }
            *slot = Slot::Missing;
        }
        if matches!(slot, Slot::Missing) {
            let r = usize::from(parity_count(d.k));
            *slot = Slot::Assembling(Box::new(Assembly {
                k: d.k,
                payload_len: d.payload_len,
                compressed,
                have: vec![SYM_NONE; usize::from(d.k) + r],
                count: 0,
                seen: 0,
                source: match self.spare.pop() {
                    Some(mut v) => {
                        v.clear();
                        v.reserve(usize::from(d.k) * sym);
                        v
                    }
                    None => Vec::with_capacity(usize::from(d.k) * sym),
                },
                parity: Vec::new(),
                parity_esis: Vec::new(),
                conflicts: 0,
                last_symbol: None,
                last_repair: None,
            }));
        }
        let Slot::Assembling(a) = slot else {
            return;
        };
        let esi = usize::from(d.esi);
        let is_source = d.esi < a.k;
        match a.have[esi] {
            SYM_NONE => {}
            SYM_HAVE => {
                // A second copy. Identical: a harmless duplicate. Different: one of them is
                // forged or corrupted and we cannot tell which, so distrust this index for
                // good and rebuild from other symbols (the sender only sends fresh ones).
                let differs = if is_source {
                    a.source.get(esi * sym..(esi + 1) * sym) != Some(d.symbol)
                } else {
                    a.parity_esis
                        .iter()
                        .position(|&e| e == d.esi)
                        .is_some_and(|pos| a.parity[pos * sym..(pos + 1) * sym] != *d.symbol)
                };
                if differs {
                    a.have[esi] = SYM_POISONED;
                    a.count -= 1;
                    if !is_source && let Some(pos) = a.parity_esis.iter().position(|&e| e == d.esi)
                    {
                        let last = a.parity_esis.len() - 1;
                        a.parity_esis.swap_remove(pos);
                        if pos != last {
                            a.parity
                                .copy_within(last * sym..(last + 1) * sym, pos * sym);
                        }
                        a.parity.truncate(last * sym);
                    }
                    self.stats.rejected_packets += 1;
                }
                return;
            }
            _ => {
                self.stats.rejected_packets += 1;
                return;
            }
        }
        a.have[esi] = SYM_HAVE;
        a.count += 1;
        a.seen = a.seen.max(u32::from(d.esi) + 1);
        if is_source {
            let at = esi * sym;
            if a.source.len() == at {
                a.source.extend_from_slice(d.symbol);
            } else {
                if a.source.len() < at + sym {
                    a.source.resize(at + sym, 0);
                }
                a.source[at..at + sym].copy_from_slice(d.symbol);
            }
        } else {
            a.parity.extend_from_slice(d.symbol);
            a.parity_esis.push(d.esi);
        }
        a.last_symbol = Some(now);
        // Repair symbols of a block carry consecutive parity indices; a gap is loss. This
        // keeps the loss estimate (and adaptive rate) alive after the pass.
        if d.flags & packet::DATA_REPAIR != 0 && d.esi >= a.k {
            if let Some(last) = a.last_repair
                && d.esi > last + 1
            {
                self.stats.lost_packets += u64::from(d.esi - last - 1);
            }
            a.last_repair = Some(a.last_repair.map_or(d.esi, |l| l.max(d.esi)));
        }
        self.stats.useful_packets += 1;
        self.naks.postpone(b, now + self.cfg.nak_quiet);
        if a.count < a.k {
            return;
        }
        // k distinct symbols: rebuild (a no-op when no source symbol was lost), decompress,
        // verify.
        let compressed = a.compressed;
        let k = a.k;
        let source = std::mem::take(&mut a.source);
        let have = &a.have;
        let rebuilt = crate::block::rebuild_payload(
            b,
            a.payload_len,
            man.symbol_size,
            source,
            |i| have[i] == SYM_HAVE,
            a.parity_esis
                .iter()
                .zip(a.parity.chunks_exact(sym))
                .map(|(&e, s)| (e - k, s)),
        );
        self.slots[b as usize] = Slot::Missing;
        let res = match rebuilt {
            Ok(payload) => self.verify_and_emit(b, compressed, payload),
            Err(e) => {
                self.stats.rejected_blocks += 1;
                self.events
                    .push_back(ReceiverEvent::BlockRejected { error: e.clone() });
                Err(e)
            }
        };
        if res.is_err() {
            // Everything for this block was discarded so fresh symbols can rebuild it; NAK it.
            if b < self.frontier {
                let j = self.jitter();
                self.naks.insert(b, now + j);
            }
        }
    }

    /// Fires timers (NAK, Status, Join and Done retries, silence detection).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.silence_possible()
            && let Some(j) = self.joined_at
        {
            let since = now.saturating_duration_since(j);
            if since >= self.cfg.silent_after {
                self.silent_reported = true;
                self.events
                    .push_back(ReceiverEvent::MulticastSilent { silent_for: since });
            }
        }
        if let DoneState::Pending { tries, next, .. } = &self.done
            && *tries >= self.cfg.done_retries
            && next.is_some_and(|n| now >= n)
        {
            self.done = DoneState::GaveUp;
            self.events.push_back(ReceiverEvent::DoneUnacknowledged);
        }
    }

    /// When to call [`Receiver::handle_timeout`] / [`Receiver::poll_transmit`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_finished() {
            return None;
        }
        let mut t: Option<Instant> = None;
        let mut add = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        if self.ended {
            if let DoneState::Pending { next, tries, .. } = &self.done {
                if *tries < self.cfg.done_retries {
                    add(Some(next.unwrap_or_else(|| self.last_anchor())));
                } else {
                    add(*next);
                }
            }
            return t;
        }
        if self.sender.is_some() && self.session.is_some() {
            if self.join_pending() {
                add(self.next_join);
            }
            add(self.next_status);
            if let DoneState::Pending { next, .. } = &self.done {
                add(Some(next.unwrap_or_else(|| self.last_anchor())));
            }
            if !self.naks.is_empty() && !self.naks_suppressed {
                let first = self.naks.first();
                let gap = self.last_nak_sent.map(|l| l + self.cfg.nak_min_gap);
                add(match (first, gap) {
                    (Some(f), Some(g)) => Some(f.max(g)),
                    (f, _) => f,
                });
            }
        }
        if self.silence_possible() {
            add(self.joined_at.map(|j| j + self.cfg.silent_after));
        }
        t
    }

    /// Multicast may be silent: joined a started session and no data yet, or joined by
    /// unicast (sender and session configured) and not even an Announce arrived.
    fn silence_possible(&self) -> bool {
        !self.silent_reported
            && self.last_data.is_none()
            && (self.sender_started || self.announce.is_none())
    }

    fn join_pending(&self) -> bool {
        // Until the pass starts, keep telling the sender we hold the manifest: a JoinAck for
        // an earlier Join without it may have crossed a lost Join with it.
        !self.join_acked
            || (self.manifest.is_some() && (!self.join_acked_with_manifest || !self.sender_started))
    }

    /// The next datagram to send (always to the sender), written to `buf` (cleared first).
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        buf.clear();
        let sender = self.sender?;
        let session = self.session?;
        let dest = Dest::Unicast(sender);
        if self.ended && !matches!(self.done, DoneState::Pending { .. }) {
            return None;
        }
        // Done (retried until acknowledged).
        if let DoneState::Pending {
            ok,
            reason,
            tries,
            next,
        } = &mut self.done
            && next.is_none_or(|n| now >= n)
            && *tries < self.cfg.done_retries
        {
            *tries += 1;
            *next = Some(now + self.cfg.done_interval);
            Packet::new(
                session,
                Body::Done(packet::Done {
                    receiver: self.id,
                    ok: *ok,
                    reason,
                }),
            )
            .encode(buf);
            return Some(Transmit {
                dest,
                size: buf.len(),
            });
        }
        if self.ended {
            return None;
        }
        // Join.
        if self.join_pending() && self.next_join.is_some_and(|n| now >= n) {
            self.next_join = Some(now + self.cfg.join_interval);
            self.last_join_had_manifest = self.manifest.is_some();
            let flags = if self.manifest.is_some() {
                packet::JOIN_HAS_MANIFEST
            } else {
                0
            };
            Packet::new(
                session,
                Body::Join(packet::Join {
                    receiver: self.id,
                    flags,
                    name: &self.cfg.name,
                }),
            )
            .encode(buf);
            return Some(Transmit {
                dest,
                size: buf.len(),
            });
        }
        // NAK: every due block, batched.
        if !self.naks.is_empty()
            && !self.naks_suppressed
            && self
                .last_nak_sent
                .is_none_or(|l| now >= l + self.cfg.nak_min_gap)
        {
            let mut entries = Vec::new();
            for b in self.naks.due(now, packet::MAX_NAK_ENTRIES) {
                let (needed, seen) = match &self.slots[b as usize] {
                    Slot::Assembling(a) => (u32::from(a.k - a.count.min(a.k)), a.seen),
                    _ => (NakEntry::ALL, 0),
                };
                entries.push(NakEntry {
                    block: b,
                    needed,
                    seen,
                });
            }
            if !entries.is_empty() {
                for e in &entries {
                    let j = self.cfg.nak_jitter.mul_f64(self.rng.next_f64());
                    self.naks.insert(e.block, now + self.cfg.nak_interval + j);
                }
                self.last_nak_sent = Some(now);
                self.stats.naks_sent += 1;
                Packet::new(
                    session,
                    Body::Nak(packet::Nak {
                        receiver: self.id,
                        entries,
                    }),
                )
                .encode(buf);
                return Some(Transmit {
                    dest,
                    size: buf.len(),
                });
            }
        }
        // Status.
        if self.next_status.is_some_and(|n| now >= n) {
            self.next_status = Some(now + self.cfg.status_interval);
            Packet::new(session, Body::Status(self.status())).encode(buf);
            return Some(Transmit {
                dest,
                size: buf.len(),
            });
        }
        None
    }

    /// The progress report sent in Status packets.
    pub fn status(&self) -> Status {
        Status {
            receiver: self.id,
            blocks_done: self.done_blocks,
            bytes_done: self.done_bytes,
            received: self.stats.data_packets,
            lost: self.stats.lost_packets,
            rejected: self.stats.rejected_blocks
                + u32::try_from(self.stats.rejected_packets).unwrap_or(u32::MAX),
        }
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<ReceiverEvent> {
        self.events.pop_front()
    }
}

fn hex(b: &[u8; 32]) -> String {
    blake3::Hash::from_bytes(*b).to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{Compression, encode_block};
    use crate::manifest::ManifestBuilder;
    use proptest::prelude::*;

    const KEY: [u8; 32] = [3; 32];

    #[allow(clippy::disallowed_methods)] // tests need one real anchor for the virtual clock
    fn t0() -> Instant {
        Instant::now()
    }

    fn sender() -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], 9000))
    }

    fn data() -> Vec<u8> {
        let mut x = 99u64;
        let mut v: Vec<u8> = (0..3072)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 33) as u8
            })
            .collect();
        v[1024..2048].fill(0); // block 1 is zero
        v
    }

    fn manifest(session: SessionId) -> crate::Manifest {
        let mut b = ManifestBuilder::new(session, 1024, 104, Compression::None);
        for c in data().chunks(1024) {
            b.push_block(c);
        }
        b.finish().unwrap()
    }

    fn signed(session: SessionId) -> SignedManifest {
        SignedManifest::sign(manifest(session), &KEY)
    }

    /// A receiver that trusts [`KEY`].
    fn trusting_receiver(now: Instant) -> Receiver {
        Receiver::new(
            ReceiverConfig {
                name: "t".into(),
                trusted_key: Some(SignedManifest::public_key_for(&KEY)),
                ..ReceiverConfig::default()
            },
            now,
        )
    }

    fn pkt(body: Body<'_>) -> Vec<u8> {
        let mut v = Vec::new();
        Packet::new(SessionId(1), body).encode(&mut v);
        v
    }

    fn announce(m: &SignedManifest, pass_pos: u32) -> Vec<u8> {
        pkt(Body::Announce(Announce {
            flags: packet::ANNOUNCE_STARTED,
            manifest_len: m.as_bytes().len() as u32,
            manifest_hash: m.hash(),
            tcp_port: 0,
            symbol_size: 104,
            block_size: 1024,
            block_count: 3,
            image_size: 3072,
            pass_pos,
            rate_bps: 1,
        }))
    }

    fn ready_receiver(now: Instant) -> (Receiver, SignedManifest) {
        let m = signed(SessionId(1));
        let mut r = trusting_receiver(now);
        r.handle_input(now, sender(), &announce(&m, 0));
        for (i, c) in m.as_bytes().chunks(MANIFEST_CHUNK_LEN).enumerate() {
            r.handle_input(
                now,
                sender(),
                &pkt(Body::ManifestChunk(packet::ManifestChunk {
                    offset: (i * MANIFEST_CHUNK_LEN) as u32,
                    total_len: m.as_bytes().len() as u32,
                    bytes: c,
                })),
            );
        }
        assert!(r.manifest().is_some());
        (r, m)
    }

    fn events(r: &mut Receiver) -> Vec<ReceiverEvent> {
        std::iter::from_fn(|| r.poll_event()).collect()
    }

    #[test]
    fn multicast_manifest_then_blocks_with_parity_and_zero_block() {
        let now = t0();
        let (mut r, _) = ready_receiver(now);
        let ev = events(&mut r);
        assert!(ev.iter().any(|e| matches!(
            e,
            ReceiverEvent::BlockReady {
                index: 1,
                data: None,
                ..
            }
        )));
        assert!(ev.iter().any(|e| matches!(
            e,
            ReceiverEvent::ManifestReady {
                authenticated: true,
                ..
            }
        )));
        let d = data();
        for b in [0u32, 2] {
            let enc =
                encode_block(b, &d[b as usize * 1024..][..1024], Compression::None, 104).unwrap();
            let par = enc.parity(b).unwrap();
            // Lose source symbols 0 and 5, replace with parity 3 and 9.
            for esi in (0..enc.k()).filter(|e| *e != 0 && *e != 5) {
                r.handle_input(
                    now,
                    sender(),
                    &pkt(Body::Data(data_pkt(
                        &enc,
                        b,
                        esi,
                        enc.source_symbol(esi).unwrap(),
                    ))),
                );
            }
            for j in [3u16, 9] {
                let esi = enc.k() + j;
                r.handle_input(
                    now,
                    sender(),
                    &pkt(Body::Data(data_pkt(&enc, b, esi, par.symbol(j).unwrap()))),
                );
            }
        }
        let ev = events(&mut r);
        let ready: Vec<_> = ev
            .iter()
            .filter_map(|e| match e {
                ReceiverEvent::BlockReady { index, data, .. } => Some((*index, data.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(ready.len(), 2);
        assert_eq!(ready[0].1.as_deref(), Some(&d[0..1024]));
        assert_eq!(ready[1].1.as_deref(), Some(&d[2048..3072]));
        assert!(ev.contains(&ReceiverEvent::AllBlocksReady));
        assert!(r.missing_blocks().is_empty());
    }

    #[test]
    fn signed_manifest_flagging_a_data_block_as_zero_is_rejected() {
        // A trusted but buggy sender flags data block 0 as zero (with its true hash, so the
        // hashes still merge into the image hash): the receiver must not take zeros for it.
        let mut m = manifest(SessionId(1));
        m.blocks[0].zero = true;
        let bad = SignedManifest::sign(m, &KEY);
        let mut r = trusting_receiver(t0());
        assert!(matches!(
            r.accept_manifest_bytes(bad.as_bytes()),
            Err(ManifestError::ZeroBlockHash { index: 0 })
        ));
        assert!(r.manifest().is_none());
        assert!(
            !events(&mut r)
                .iter()
                .any(|e| matches!(e, ReceiverEvent::BlockReady { .. }))
        );
        // The honest manifest is then accepted.
        r.accept_manifest_bytes(signed(SessionId(1)).as_bytes())
            .unwrap();
        assert!(r.manifest().is_some());
    }

    fn data_pkt<'a>(enc: &EncodedBlock, block: u32, esi: u16, sym: &'a [u8]) -> Data<'a> {
        Data {
            block,
            esi,
            k: enc.k(),
            payload_len: enc.payload_len(),
            flags: 0,
            symbol: sym,
        }
    }

    #[test]
    fn corrupted_symbol_never_reaches_block_ready_and_block_recovers() {
        let now = t0();
        let (mut r, _) = ready_receiver(now);
        events(&mut r);
        let d = data();
        let enc = encode_block(0, &d[..1024], Compression::None, 104).unwrap();
        let par = enc.parity(0).unwrap();
        let mut bad = enc.source_symbol(4).unwrap().to_vec();
        bad[0] ^= 1;
        for esi in 0..enc.k() {
            let s = if esi == 4 {
                &bad[..]
            } else {
                enc.source_symbol(esi).unwrap()
            };
            r.handle_input(now, sender(), &pkt(Body::Data(data_pkt(&enc, 0, esi, s))));
        }
        let ev = events(&mut r);
        assert!(
            !ev.iter()
                .any(|e| matches!(e, ReceiverEvent::BlockReady { .. }))
        );
        assert!(ev.iter().any(|e| matches!(
            e,
            ReceiverEvent::BlockRejected {
                error: BlockError::HashMismatch { block: 0, .. }
            }
        )));
        // Fresh parity rebuilds it.
        for j in 0..enc.k() {
            r.handle_input(
                now,
                sender(),
                &pkt(Body::Data(data_pkt(
                    &enc,
                    0,
                    enc.k() + j,
                    par.symbol(j).unwrap(),
                ))),
            );
        }
        let ev = events(&mut r);
        assert!(
            ev.iter()
                .any(|e| matches!(e, ReceiverEvent::BlockReady { index: 0, .. }))
        );
    }

    fn ready_blocks(ev: &[ReceiverEvent]) -> Vec<(u32, Vec<u8>)> {
        ev.iter()
            .filter_map(|e| match e {
                ReceiverEvent::BlockReady {
                    index,
                    data: Some(d),
                    ..
                } => Some((*index, d.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn reordered_duplicated_and_poisoned_symbols_rebuild_in_a_recycled_buffer() {
        let now = t0();
        let (mut r, _) = ready_receiver(now);
        events(&mut r);
        // A recycled buffer full of garbage: none of it may leak into a block.
        r.recycle(vec![0xAA; 4096]);
        let d = data();
        let enc = encode_block(0, &d[..1024], Compression::None, 104).unwrap();
        let par = enc.parity(0).unwrap();
        let send = |r: &mut Receiver, esi: u16, sym: &[u8]| {
            r.handle_input(now, sender(), &pkt(Body::Data(data_pkt(&enc, 0, esi, sym))));
        };
        let mut bad = enc.source_symbol(3).unwrap().to_vec();
        bad[7] ^= 0x10;
        // Last to first; symbol 3 arrives twice with different bytes (poisoned: neither copy
        // is trusted), symbol 6 twice identically, symbol 8 never.
        for esi in (0..enc.k()).rev().filter(|&e| e != 8) {
            send(&mut r, esi, enc.source_symbol(esi).unwrap());
            if esi == 6 {
                send(&mut r, esi, enc.source_symbol(esi).unwrap());
            }
            if esi == 3 {
                send(&mut r, esi, &bad);
            }
        }
        assert!(ready_blocks(&events(&mut r)).is_empty(), "8 of 10 symbols");
        send(&mut r, enc.k() + 2, par.symbol(2).unwrap());
        assert!(ready_blocks(&events(&mut r)).is_empty(), "9 of 10 symbols");
        send(&mut r, enc.k() + 5, par.symbol(5).unwrap());
        assert_eq!(ready_blocks(&events(&mut r)), vec![(0, d[..1024].to_vec())]);

        // A block that lost nothing is handed over in the buffer it was assembled in: the
        // recycled one, without a copy.
        let spare = vec![0x55u8; 2048];
        let spare_ptr = spare.as_ptr();
        r.recycle(spare);
        let enc2 = encode_block(2, &d[2048..], Compression::None, 104).unwrap();
        for esi in 0..enc2.k() {
            r.handle_input(
                now,
                sender(),
                &pkt(Body::Data(data_pkt(
                    &enc2,
                    2,
                    esi,
                    enc2.source_symbol(esi).unwrap(),
                ))),
            );
        }
        let ev = events(&mut r);
        let ready = ready_blocks(&ev);
        assert_eq!(ready, vec![(2, d[2048..].to_vec())]);
        let handed = ev.iter().find_map(|e| match e {
            ReceiverEvent::BlockReady { data: Some(d), .. } => Some(d.as_ptr()),
            _ => None,
        });
        assert_eq!(handed, Some(spare_ptr));
        assert!(ev.contains(&ReceiverEvent::AllBlocksReady));
        assert_eq!(r.stats().rejected_blocks, 0);
    }

    #[test]
    fn untrusted_manifest_rejected() {
        let now = t0();
        let m = signed(SessionId(1));
        let mut r = Receiver::new(
            ReceiverConfig {
                trusted_key: Some([1; 32]),
                ..ReceiverConfig::default()
            },
            now,
        );
        r.handle_input(now, sender(), &announce(&m, 0));
        assert!(matches!(
            r.accept_manifest_bytes(m.as_bytes()),
            Err(ManifestError::UntrustedKey { .. })
        ));
        assert!(r.manifest().is_none());
        assert_eq!(r.stats().rejected_manifests, 1);
        assert!(matches!(
            r.accept_encoded_block(0, &[0; 10]),
            Err(BlockError::NoManifest { block: 0 })
        ));
    }

    #[test]
    fn tcp_path_verifies_like_multicast() {
        let now = t0();
        let (mut r, _) = ready_receiver(now);
        events(&mut r);
        let d = data();
        let enc = encode_block(2, &d[2048..], Compression::Zstd { level: 1 }, 104).unwrap();
        let mut bytes = enc.to_bytes();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x10;
        assert!(r.accept_encoded_block(2, &bytes).is_err());
        assert!(r.accept_encoded_block(9, &enc.to_bytes()).is_err());
        r.accept_encoded_block(2, &enc.to_bytes()).unwrap();
        assert_eq!(r.missing_blocks(), vec![0]);
    }

    #[test]
    fn resume_naks_and_done_retries() {
        let now = t0();
        let (mut r, _) = ready_receiver(now);
        r.mark_have([0]);
        assert_eq!(r.missing_blocks(), vec![2]);
        let mut buf = Vec::new();
        // Drain Join/Status.
        while r.poll_transmit(now, &mut buf).is_some() {}
        // Sender reports the pass is complete: block 2 becomes due and is NAKed after jitter.
        r.handle_input(now, sender(), &announce(&signed(SessionId(1)), 3));
        let later = now + Duration::from_millis(20);
        let mut naks = Vec::new();
        while let Some(t) = r.poll_transmit(later, &mut buf) {
            if let Ok(Packet {
                body: Body::Nak(n), ..
            }) = Packet::decode(&buf[..t.size])
            {
                naks.push(n);
            }
        }
        assert_eq!(naks.len(), 1);
        assert_eq!(
            naks[0].entries,
            vec![NakEntry {
                block: 2,
                needed: NakEntry::ALL,
                seen: 0
            }]
        );
        // Done is retried until acknowledged.
        r.finish(true, "verified");
        let mut dones = 0;
        for i in 0..5u64 {
            let t = later + Duration::from_millis(300 * i);
            while let Some(tx) = r.poll_transmit(t, &mut buf) {
                if matches!(
                    Packet::decode(&buf[..tx.size]).map(|p| p.body),
                    Ok(Body::Done(_))
                ) {
                    dones += 1;
                }
            }
        }
        assert_eq!(dones, 5);
        r.handle_input(later, sender(), &pkt(Body::DoneAck { receiver: r.id() }));
        assert!(r.is_finished());
        assert!(events(&mut r).contains(&ReceiverEvent::DoneAcknowledged));
    }

    #[test]
    fn catch_up_from_the_sender_stops_naks_and_is_reported_once() {
        let now = t0();
        let (mut r, _) = ready_receiver(now);
        let mut buf = Vec::new();
        while r.poll_transmit(now, &mut buf).is_some() {}
        let _ = events(&mut r);
        let catch_up = pkt(Body::CatchUp { receiver: r.id() });
        // From anyone but the sender, or for another receiver: ignored.
        let rogue = SocketAddr::from(([10, 9, 9, 9], 9000));
        r.handle_input(now, rogue, &catch_up);
        r.handle_input(
            now,
            sender(),
            &pkt(Body::CatchUp {
                receiver: r.id() ^ 1,
            }),
        );
        assert!(events(&mut r).is_empty());
        r.handle_input(now, sender(), &catch_up);
        r.handle_input(now, sender(), &catch_up);
        assert_eq!(events(&mut r), vec![ReceiverEvent::CatchUpAdvised]);
        // The pass is over with blocks missing: no NAK goes out any more.
        r.handle_input(now, sender(), &announce(&signed(SessionId(1)), 3));
        for i in 0..10u64 {
            let t = now + Duration::from_millis(100 * i);
            r.handle_timeout(t);
            while let Some(tx) = r.poll_transmit(t, &mut buf) {
                let body = Packet::decode(&buf[..tx.size]).map(|p| p.body);
                assert!(!matches!(body, Ok(Body::Nak(_))), "NAK after CatchUp");
            }
        }
        assert_eq!(r.stats().naks_sent, 0);
        assert!(!r.missing_blocks().is_empty());
    }

    #[test]
    fn multicast_silence_is_reported() {
        let now = t0();
        let (mut r, _) = ready_receiver(now);
        r.handle_timeout(now + Duration::from_secs(4));
        assert!(
            !events(&mut r)
                .iter()
                .any(|e| matches!(e, ReceiverEvent::MulticastSilent { .. }))
        );
        r.handle_timeout(now + Duration::from_secs(5));
        assert!(
            events(&mut r)
                .iter()
                .any(|e| matches!(e, ReceiverEvent::MulticastSilent { .. }))
        );
    }

    /// A receiver told its sender and session (it joins by unicast at once).
    fn told_receiver(now: Instant) -> Receiver {
        Receiver::new(
            ReceiverConfig {
                name: "u".into(),
                sender: Some(sender()),
                session: Some(SessionId(1)),
                ..ReceiverConfig::default()
            },
            now,
        )
    }

    #[test]
    fn told_the_sender_joins_by_unicast_and_reports_blocked_multicast() {
        let now = t0();
        let mut r = told_receiver(now);
        let mut buf = Vec::new();
        let t = r.poll_transmit(now, &mut buf).expect("joins at once");
        assert_eq!(t.dest, Dest::Unicast(sender()));
        assert!(matches!(
            Packet::decode(&buf[..t.size]).unwrap().body,
            Body::Join(_)
        ));
        // Not even an Announce within silent_after: multicast looks blocked.
        r.handle_timeout(now + Duration::from_secs(5));
        assert!(
            events(&mut r)
                .iter()
                .any(|e| matches!(e, ReceiverEvent::MulticastSilent { .. }))
        );
    }

    fn preparing(image_size: u64, bytes_done: u64) -> Vec<u8> {
        pkt(Body::Preparing(packet::Preparing {
            image_size,
            bytes_done,
        }))
    }

    /// A receiver told the sender's host (its report port a guess: the stream's) reports to
    /// the port that host's announcements come from (another sender there may hold the
    /// stream's port); an announcement from another host moves nothing.
    #[test]
    fn a_sender_given_by_host_is_reported_to_at_the_port_it_announces_from() {
        let now = t0();
        let m = signed(SessionId(1));
        let mut r = Receiver::new(
            ReceiverConfig {
                name: "t".into(),
                trusted_key: Some(SignedManifest::public_key_for(&KEY)),
                sender: Some(sender()),
                ..ReceiverConfig::default()
            },
            now,
        );
        let elsewhere = SocketAddr::from(([10, 0, 0, 2], 40_001));
        r.handle_input(now, elsewhere, &announce(&m, 0));
        assert_eq!(r.sender(), Some(sender()), "another host's announcement");
        let real = SocketAddr::from(([10, 0, 0, 1], 40_002));
        r.handle_input(now, real, &announce(&m, 0));
        assert_eq!(r.sender(), Some(real));
        let mut buf = Vec::new();
        let t = r.poll_transmit(now, &mut buf).expect("a join");
        assert_eq!(t.dest, Dest::Unicast(real));
    }

    /// A receiver that cannot hear the group learns the sender's report port over TCP:
    /// its joins go there from then on (0 is no word).
    #[test]
    fn a_report_port_told_over_tcp_moves_the_reports() {
        let now = t0();
        let mut r = told_receiver(now);
        r.sender_listens_on(0);
        assert_eq!(r.sender(), Some(sender()));
        r.sender_listens_on(40_003);
        let real = SocketAddr::new(sender().ip(), 40_003);
        assert_eq!(r.sender(), Some(real));
        let mut buf = Vec::new();
        let t = r.poll_transmit(now, &mut buf).expect("a join");
        assert_eq!(t.dest, Dest::Unicast(real));
        // Nobody to follow: nothing to move.
        let mut lone = Receiver::new(ReceiverConfig::default(), now);
        lone.sender_listens_on(40_003);
        assert_eq!(lone.sender(), None);
    }

    #[test]
    fn a_preparing_sender_is_shown_until_it_announces_and_binds_nothing() {
        let now = t0();
        let m = signed(SessionId(1));
        let mut r = trusting_receiver(now);
        assert!(r.sender_preparing().is_none());
        let elsewhere = SocketAddr::from(([10, 0, 0, 9], 9000));
        r.handle_input(now, elsewhere, &preparing(3072, 1024));
        let p = *r.sender_preparing().expect("heard");
        assert_eq!(
            (p.from, p.session, p.image_size, p.bytes_done),
            (elsewhere, SessionId(1), 3072, 1024)
        );
        // It joins nothing, picks no sender, sends nothing.
        assert_eq!((r.session(), r.sender()), (None, None));
        let mut buf = Vec::new();
        assert!(r.poll_transmit(now, &mut buf).is_none());
        assert!(events(&mut r).is_empty());
        // The next one replaces it; the Announce (from the real sender) ends it.
        r.handle_input(
            now + Duration::from_secs(1),
            elsewhere,
            &preparing(3072, 3072),
        );
        assert_eq!(r.sender_preparing().map(|p| p.bytes_done), Some(3072));
        r.handle_input(now + Duration::from_secs(2), sender(), &announce(&m, 0));
        assert!(r.sender_preparing().is_none());
        assert_eq!(r.sender(), Some(sender()));
        // A late Preparing changes nothing any more.
        r.handle_input(now + Duration::from_secs(3), sender(), &preparing(3072, 0));
        assert!(r.sender_preparing().is_none());
        // Out-of-range progress is refused by the decoder and counted.
        let before = r.stats().rejected_packets;
        r.handle_input(now, sender(), &preparing(10, 11));
        assert_eq!(r.stats().rejected_packets, before + 1);
    }

    #[test]
    fn a_told_receiver_waits_for_a_preparing_sender_before_calling_multicast_silent() {
        let now = t0();
        let silent = |r: &mut Receiver| {
            events(r)
                .iter()
                .any(|e| matches!(e, ReceiverEvent::MulticastSilent { .. }))
        };
        // The sender says every second that it is still hashing: no silence for 20 s.
        let mut r = told_receiver(now);
        for s in 1..=20 {
            let t = now + Duration::from_secs(s);
            r.handle_input(t, sender(), &preparing(1 << 40, s << 30));
            r.handle_timeout(t);
            assert!(!silent(&mut r), "silent at {s} s while the sender hashes");
        }
        // Then it falls quiet: silence 5 s after its last word.
        r.handle_timeout(now + Duration::from_secs(24));
        assert!(!silent(&mut r));
        r.handle_timeout(now + Duration::from_secs(25));
        assert!(silent(&mut r));
        // The same words from another host (or for another session) do not postpone it.
        let mut r = told_receiver(now);
        let other = SocketAddr::from(([10, 0, 0, 9], 9000));
        for s in 1..=5 {
            r.handle_input(now + Duration::from_secs(s), other, &preparing(0, 0));
        }
        r.handle_timeout(now + Duration::from_secs(5));
        assert!(silent(&mut r));
    }

    proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic(
            dgrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..40),
        ) {
            let now = t0();
            let (mut r, _) = ready_receiver(now);
            let mut buf = Vec::new();
            for (i, d) in dgrams.iter().enumerate() {
                let t = now + Duration::from_millis(i as u64 * 7);
                r.handle_input(t, sender(), d);
                r.handle_timeout(t);
                while r.poll_transmit(t, &mut buf).is_some() {}
            }
            let forged = events(&mut r)
                .iter()
                .any(|e| matches!(e, ReceiverEvent::BlockReady { data: Some(_), .. }));
            prop_assert!(!forged, "random bytes produced a block");
        }

        #[test]
        fn header_valid_datagrams_never_panic(
            dgrams in proptest::collection::vec(
                (prop::sample::select(vec![1u8, 2, 3, 0x11, 0x15, 0x20]), proptest::collection::vec(any::<u8>(), 0..200)),
                0..40),
        ) {
            let now = t0();
            let (mut r, _) = ready_receiver(now);
            for (kind, body) in &dgrams {
                let mut v = packet::MAGIC.to_vec();
                v.push(packet::VERSION);
                v.push(*kind);
                v.extend_from_slice(&1u64.to_be_bytes());
                v.extend_from_slice(body);
                r.handle_input(now, sender(), &v);
            }
            let forged = events(&mut r)
                .iter()
                .any(|e| matches!(e, ReceiverEvent::BlockReady { data: Some(_), .. }));
            prop_assert!(!forged, "random bytes produced a block");
        }

        #[test]
        fn manifest_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = SignedManifest::decode(&bytes);
            let _ = crate::Manifest::decode(&bytes);
        }

        #[test]
        fn mutated_manifest_never_verifies(pos in 0usize..400, bit in 0u8..8) {
            let m = signed(SessionId(1));
            let mut b = m.as_bytes().to_vec();
            let pos = pos % b.len();
            b[pos] ^= 1 << bit;
            if let Ok(s) = SignedManifest::decode(&b) {
                // Only a change confined to the embedded key could still self-verify; it
                // never verifies against the trusted key.
                prop_assert!(s.verify(&SignedManifest::public_key_for(&KEY)).is_err());
            }
        }
    }
}
