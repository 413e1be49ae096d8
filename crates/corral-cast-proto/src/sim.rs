//! A simulated network for the sender and receivers: virtual clock, per-link loss, latency,
//! jitter (reordering), duplication and bandwidth, late joiners, receivers that die, forged
//! packets, all from one seed. Nothing sleeps: a thousand receivers run in seconds.
//!
//! The simulation plays the driver's role too: it writes `BlockReady` data into a per-receiver
//! check (comparing with the real image when `check_data` is set) and calls
//! [`Receiver::finish`] on `AllBlocksReady`. It also models the TCP catch-up path: after
//! `CatchUpAdvised` (or `SessionEnded` with blocks missing) it fetches the receiver's missing
//! blocks one by one over a unicast pipe of `catchup_bandwidth_bps`, counted apart from the
//! multicast traffic.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::block::{BlockSource, Compression, EncodedBlock, encode_block};
use crate::manifest::{ManifestBuilder, SignedManifest};
use crate::receiver::{Receiver, ReceiverConfig, ReceiverEvent};
use crate::rng::SplitMix64;
use crate::sender::{Sender, SenderConfig, SenderEvent, SenderStats, SessionSummary};
use crate::{Dest, SessionId};

/// An in-memory image implementing [`BlockSource`] (encodes each block once, then caches).
#[derive(Debug)]
pub struct MemoryImage {
    data: Vec<u8>,
    block_size: u32,
    symbol_size: u16,
    compression: Compression,
    cache: HashMap<u32, Arc<EncodedBlock>>,
    /// Blocks encoded so far (cache misses).
    pub encodes: u64,
}

impl MemoryImage {
    /// Builds the manifest for `data`, signs it with `secret_key`, and returns both.
    pub fn build(
        data: Vec<u8>,
        session: SessionId,
        block_size: u32,
        symbol_size: u16,
        compression: Compression,
        secret_key: &[u8; 32],
    ) -> Result<(SignedManifest, MemoryImage), crate::ManifestError> {
        let mut b = ManifestBuilder::new(session, block_size, symbol_size, compression);
        for chunk in data.chunks(block_size as usize) {
            b.push_block(chunk);
        }
        let m = b.finish()?;
        Ok((
            SignedManifest::sign(m, secret_key),
            MemoryImage {
                data,
                block_size,
                symbol_size,
                compression,
                cache: HashMap::new(),
                encodes: 0,
            },
        ))
    }

    /// The image bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }
}

impl BlockSource for MemoryImage {
    fn encoded_block(&mut self, index: u32) -> std::io::Result<Arc<EncodedBlock>> {
        if let Some(b) = self.cache.get(&index) {
            return Ok(b.clone());
        }
        let start = index as usize * self.block_size as usize;
        let end = (start + self.block_size as usize).min(self.data.len());
        let slice = self.data.get(start..end).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "block past end")
        })?;
        let enc = encode_block(index, slice, self.compression, self.symbol_size)
            .map_err(std::io::Error::other)?;
        self.encodes += 1;
        let enc = Arc::new(enc);
        self.cache.insert(index, enc.clone());
        Ok(enc)
    }
}

/// One direction of a link.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkConfig {
    /// Independent loss probability per packet.
    pub loss: f64,
    /// Base one-way latency.
    pub latency: Duration,
    /// Extra uniform random delay (reorders packets when larger than their spacing).
    pub jitter: Duration,
    /// Probability that a packet is delivered twice.
    pub duplicate: f64,
    /// Link bandwidth (`None`: unlimited).
    pub bandwidth_bps: Option<u64>,
    /// Queue depth, as time: a packet that would wait longer is dropped.
    pub queue: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            loss: 0.0,
            latency: Duration::from_micros(200),
            jitter: Duration::ZERO,
            duplicate: 0.0,
            bandwidth_bps: None,
            queue: Duration::from_millis(20),
        }
    }
}

/// One simulated receiver.
#[derive(Debug, Clone)]
pub struct SimReceiver {
    /// Its configuration (the seed is overridden per receiver from the simulation seed).
    pub config: ReceiverConfig,
    /// Sender → receiver.
    pub down: LinkConfig,
    /// Receiver → sender.
    pub up: LinkConfig,
    /// When it starts (virtual time since the start).
    pub join_at: Duration,
    /// When it dies (stops sending and receiving), if ever.
    pub dies_at: Option<Duration>,
    /// Compare every `BlockReady` with the real image (costs memory and time).
    pub check_data: bool,
    /// Bandwidth of its TCP catch-up pipe (`None`: the down link's, else unlimited).
    pub catchup_bandwidth_bps: Option<u64>,
}

impl SimReceiver {
    /// A receiver named `name` on a link with `loss` in the down direction.
    pub fn new(name: &str, loss: f64) -> Self {
        SimReceiver {
            config: ReceiverConfig {
                name: name.to_owned(),
                ..ReceiverConfig::default()
            },
            down: LinkConfig {
                loss,
                ..LinkConfig::default()
            },
            up: LinkConfig {
                loss,
                ..LinkConfig::default()
            },
            join_at: Duration::ZERO,
            dies_at: None,
            check_data: false,
            catchup_bandwidth_bps: None,
        }
    }
}

/// A simulation.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Seed for every random choice.
    pub seed: u64,
    /// The sender's settings.
    pub sender: SenderConfig,
    /// The receivers.
    pub receivers: Vec<SimReceiver>,
    /// Probability, per multicast data packet, that a forged copy (symbol bytes corrupted,
    /// header intact) is also delivered to every receiver, sometimes before the real one.
    pub forge: f64,
    /// Probability, per multicast packet, that random garbage is delivered too.
    pub garbage: f64,
    /// Stop after this much virtual time.
    pub time_limit: Duration,
}

/// What happened to one receiver.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SimReceiverResult {
    /// Its name.
    pub name: String,
    /// Virtual time from the start of the pass to `AllBlocksReady`.
    pub complete_after_start: Option<Duration>,
    /// `BlockReady` events.
    pub blocks_ready: u32,
    /// `BlockReady` events whose data differed from the image (must stay 0).
    pub wrong_blocks: u32,
    /// `BlockRejected` events.
    pub rejected_blocks: u32,
    /// `ManifestRejected` events.
    pub manifest_rejections: u32,
    /// The manifest was accepted.
    pub manifest_ok: bool,
    /// `MulticastSilent` was emitted.
    pub silent: bool,
    /// Done was acknowledged.
    pub done_acked: bool,
    /// NAK packets sent.
    pub naks_sent: u64,
    /// Packets the receiver rejected (malformed, conflicting duplicates, wrong parameters).
    pub rejected_packets: u64,
    /// The sender moved it to unicast catch-up (`CatchUpAdvised`).
    pub catchup_advised: bool,
    /// Blocks fetched over the simulated TCP catch-up.
    pub catchup_blocks: u32,
    /// Bytes fetched over the simulated TCP catch-up.
    pub catchup_bytes: u64,
}

/// What happened.
#[derive(Debug, Clone)]
pub struct SimResult {
    /// The sender's final summary, if it finished.
    pub summary: Option<SessionSummary>,
    /// Every sender event.
    pub sender_events: Vec<SenderEvent>,
    /// Per receiver.
    pub receivers: Vec<SimReceiverResult>,
    /// Sender counters.
    pub stats: SenderStats,
    /// Virtual time when the pass started.
    pub started_at: Option<Duration>,
    /// Virtual time when the simulation stopped.
    pub ended_at: Duration,
    /// Multicast packets sent by the sender (all kinds).
    pub multicast_packets: u64,
    /// Multicast bytes sent by the sender (all kinds).
    pub multicast_bytes: u64,
}

#[derive(Debug)]
enum What {
    ToSender {
        from: usize,
        bytes: Rc<[u8]>,
    },
    ToReceiver {
        to: usize,
        bytes: Rc<[u8]>,
    },
    SenderTimer,
    ReceiverTimer(usize),
    Spawn(usize),
    Kill(usize),
    /// Catch-up of receiver `to`: `Some` delivers a fetched block, `None` asks for the next.
    CatchUp {
        to: usize,
        block: Option<(u32, Rc<[u8]>)>,
    },
}

struct Link {
    busy_until: Instant,
}

struct Node {
    rx: Option<Receiver>,
    dead: bool,
    down: Link,
    up: Link,
    timer: Option<Instant>,
    result: SimReceiverResult,
    /// A catch-up fetch is running.
    catching_up: bool,
}

/// Address of simulated receiver `i`.
pub fn receiver_addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 1, (i >> 8) as u8, (i & 0xff) as u8], 9000))
}

/// Address of the simulated sender.
pub fn sender_addr() -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], 9000))
}

struct Sim<'a> {
    cfg: &'a SimConfig,
    start: Instant,
    now: Instant,
    rng: SplitMix64,
    seq: u64,
    heap: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    items: HashMap<u64, What>,
    nodes: Vec<Node>,
    sender_timer: Option<Instant>,
    image: &'a mut MemoryImage,
    multicast_packets: u64,
    multicast_bytes: u64,
}

impl Sim<'_> {
    fn push(&mut self, at: Instant, what: What) {
        self.seq += 1;
        self.heap.push(Reverse((at, self.seq, 0)));
        self.items.insert(self.seq, what);
    }

    fn link_delay(
        &mut self,
        link: &LinkConfig,
        to: usize,
        up: bool,
        size: usize,
    ) -> Option<Instant> {
        if self.rng.next_f64() < link.loss {
            return None;
        }
        let state = if up {
            &mut self.nodes[to].up
        } else {
            &mut self.nodes[to].down
        };
        let mut depart = self.now;
        if let Some(bw) = link.bandwidth_bps {
            depart = depart.max(state.busy_until);
            if depart.saturating_duration_since(self.now) > link.queue {
                return None;
            }
            state.busy_until = depart + Duration::from_secs_f64(size as f64 * 8.0 / bw as f64);
            depart = state.busy_until;
        }
        let jitter = link.jitter.mul_f64(self.rng.next_f64());
        Some(depart + link.latency + jitter)
    }

    fn deliver_down(&mut self, to: usize, bytes: Rc<[u8]>) {
        let node = &self.nodes[to];
        if node.dead || node.rx.is_none() {
            return;
        }
        let link = self.cfg.receivers[to].down.clone();
        if let Some(at) = self.link_delay(&link, to, false, bytes.len()) {
            if link.duplicate > 0.0 && self.rng.next_f64() < link.duplicate {
                let extra = link.jitter.mul_f64(self.rng.next_f64()) + Duration::from_micros(50);
                self.push(
                    at + extra,
                    What::ToReceiver {
                        to,
                        bytes: bytes.clone(),
                    },
                );
            }
            self.push(at, What::ToReceiver { to, bytes });
        }
    }

    fn drive_sender(&mut self, sender: &mut Sender, events: &mut Vec<SenderEvent>) {
        let now = self.now;
        sender.handle_timeout(now);
        let mut buf = Vec::with_capacity(2048);
        while let Some(t) = sender.poll_transmit(now, self.image, &mut buf) {
            let bytes: Rc<[u8]> = Rc::from(&buf[..t.size]);
            match t.dest {
                Dest::Group => {
                    self.multicast_packets += 1;
                    self.multicast_bytes += t.size as u64;
                    let forge = self.cfg.forge > 0.0
                        && bytes.len() > crate::packet::DATA_OVERHEAD
                        && bytes[5] == 0x03
                        && self.rng.next_f64() < self.cfg.forge;
                    let garbage = self.cfg.garbage > 0.0 && self.rng.next_f64() < self.cfg.garbage;
                    for i in 0..self.nodes.len() {
                        self.deliver_down(i, bytes.clone());
                    }
                    if forge {
                        let mut f = bytes.to_vec();
                        let pos = crate::packet::DATA_OVERHEAD
                            + (self.rng.next_u64() as usize
                                % (f.len() - crate::packet::DATA_OVERHEAD));
                        f[pos] ^= 0x5a;
                        let f: Rc<[u8]> = Rc::from(f);
                        for i in 0..self.nodes.len() {
                            if self.nodes[i].rx.is_some() && !self.nodes[i].dead {
                                // Forged copies race the real one.
                                let at =
                                    self.now + Duration::from_micros(self.rng.next_u64() % 400);
                                self.push(
                                    at,
                                    What::ToReceiver {
                                        to: i,
                                        bytes: f.clone(),
                                    },
                                );
                            }
                        }
                    }
                    if garbage {
                        let mut g = bytes.to_vec();
                        for b in g.iter_mut().skip(6) {
                            *b = self.rng.next_u64() as u8;
                        }
                        let g: Rc<[u8]> = Rc::from(g);
                        for i in 0..self.nodes.len() {
                            if self.nodes[i].rx.is_some() && !self.nodes[i].dead {
                                self.push(
                                    self.now,
                                    What::ToReceiver {
                                        to: i,
                                        bytes: g.clone(),
                                    },
                                );
                            }
                        }
                    }
                }
                Dest::Unicast(addr) => {
                    if let Some(i) = addr_index(addr)
                        && i < self.nodes.len()
                    {
                        self.deliver_down(i, bytes);
                    }
                }
            }
        }
        while let Some(ev) = sender.poll_event() {
            events.push(ev);
        }
        let t = sender.poll_timeout();
        if t != self.sender_timer {
            self.sender_timer = t;
            if let Some(t) = t {
                self.push(t.max(now), What::SenderTimer);
            }
        }
    }

    fn drive_receiver(&mut self, i: usize, started_at: Option<Instant>) {
        let now = self.now;
        let Some(mut rx) = self.nodes[i].rx.take() else {
            return;
        };
        rx.handle_timeout(now);
        let mut buf = Vec::with_capacity(1500);
        while let Some(t) = rx.poll_transmit(now, &mut buf) {
            let bytes: Rc<[u8]> = Rc::from(&buf[..t.size]);
            let link = self.cfg.receivers[i].up.clone();
            if let Some(at) = self.link_delay(&link, i, true, bytes.len()) {
                self.push(at, What::ToSender { from: i, bytes });
            }
        }
        let mut want_catchup = false;
        while let Some(ev) = rx.poll_event() {
            let res = &mut self.nodes[i].result;
            match ev {
                ReceiverEvent::BlockReady {
                    offset, len, data, ..
                } => {
                    res.blocks_ready += 1;
                    if self.cfg.receivers[i].check_data {
                        let want =
                            &self.image.data()[offset as usize..(offset + u64::from(len)) as usize];
                        let ok = match &data {
                            Some(d) => d.as_slice() == want,
                            None => crate::block::is_zero(want),
                        };
                        if !ok {
                            res.wrong_blocks += 1;
                        }
                    }
                }
                ReceiverEvent::AllBlocksReady => {
                    res.complete_after_start =
                        Some(now.saturating_duration_since(started_at.unwrap_or(self.start)));
                    let ok = res.wrong_blocks == 0;
                    rx.finish(ok, if ok { "verified" } else { "wrong data" });
                }
                ReceiverEvent::BlockRejected { .. } => res.rejected_blocks += 1,
                ReceiverEvent::ManifestRejected { .. } => res.manifest_rejections += 1,
                ReceiverEvent::ManifestReady { .. } => res.manifest_ok = true,
                ReceiverEvent::MulticastSilent { .. } => res.silent = true,
                ReceiverEvent::DoneAcknowledged => res.done_acked = true,
                ReceiverEvent::CatchUpAdvised => {
                    res.catchup_advised = true;
                    want_catchup = true;
                }
                ReceiverEvent::SessionEnded { .. } if !rx.is_complete() => want_catchup = true,
                _ => {}
            }
        }
        if want_catchup && !self.nodes[i].catching_up {
            self.nodes[i].catching_up = true;
            self.push(now, What::CatchUp { to: i, block: None });
        }
        // finish() may have queued a Done.
        while let Some(t) = rx.poll_transmit(now, &mut buf) {
            let bytes: Rc<[u8]> = Rc::from(&buf[..t.size]);
            let link = self.cfg.receivers[i].up.clone();
            if let Some(at) = self.link_delay(&link, i, true, bytes.len()) {
                self.push(at, What::ToSender { from: i, bytes });
            }
        }
        self.nodes[i].result.naks_sent = rx.stats().naks_sent;
        self.nodes[i].result.rejected_packets = rx.stats().rejected_packets;
        let t = rx.poll_timeout();
        if t != self.nodes[i].timer {
            self.nodes[i].timer = t;
            if let Some(t) = t {
                self.push(t.max(now), What::ReceiverTimer(i));
            }
        }
        self.nodes[i].rx = Some(rx);
    }

    /// Fetches the next missing block of receiver `i` over the catch-up pipe (like the driver:
    /// one request at a time, in order), or stops when nothing is missing.
    fn catch_up_next(&mut self, i: usize) {
        let node = &self.nodes[i];
        let Some(rx) = node.rx.as_ref() else {
            return;
        };
        if node.dead || rx.manifest().is_none() {
            return;
        }
        let Some(&block) = rx.missing_blocks().first() else {
            self.nodes[i].catching_up = false;
            return;
        };
        let Ok(enc) = self.image.encoded_block(block) else {
            self.nodes[i].catching_up = false;
            return;
        };
        let bytes: Rc<[u8]> = Rc::from(enc.to_bytes());
        let r = &self.cfg.receivers[i];
        let bw = r.catchup_bandwidth_bps.or(r.down.bandwidth_bps);
        let wire = bw.map_or(Duration::ZERO, |bw| {
            Duration::from_secs_f64(bytes.len() as f64 * 8.0 / bw as f64)
        });
        // Request up, reply down: one round trip plus the bytes at the pipe's rate.
        let at = self.now + r.up.latency + r.down.latency + wire;
        self.push(
            at,
            What::CatchUp {
                to: i,
                block: Some((block, bytes)),
            },
        );
    }
}

fn addr_index(addr: SocketAddr) -> Option<usize> {
    match addr {
        SocketAddr::V4(a) => {
            let o = a.ip().octets();
            (o[0] == 10 && o[1] == 1).then(|| (usize::from(o[2]) << 8) | usize::from(o[3]))
        }
        SocketAddr::V6(_) => None,
    }
}

/// Runs a simulation to completion (or `time_limit`). `start` is the virtual epoch.
pub fn run(
    cfg: &SimConfig,
    manifest: SignedManifest,
    image: &mut MemoryImage,
    start: Instant,
) -> Result<SimResult, crate::ConfigError> {
    let mut sender = Sender::new(cfg.sender.clone(), manifest, start)?;
    let mut sim = Sim {
        cfg,
        start,
        now: start,
        rng: SplitMix64::new(cfg.seed ^ 0x5eed),
        seq: 0,
        heap: BinaryHeap::new(),
        items: HashMap::new(),
        nodes: cfg
            .receivers
            .iter()
            .map(|r| Node {
                rx: None,
                dead: false,
                down: Link { busy_until: start },
                up: Link { busy_until: start },
                timer: None,
                result: SimReceiverResult {
                    name: r.config.name.clone(),
                    ..SimReceiverResult::default()
                },
                catching_up: false,
            })
            .collect(),
        sender_timer: None,
        image,
        multicast_packets: 0,
        multicast_bytes: 0,
    };
    for (i, r) in cfg.receivers.iter().enumerate() {
        sim.push(start + r.join_at, What::Spawn(i));
        if let Some(d) = r.dies_at {
            sim.push(start + d, What::Kill(i));
        }
    }
    let mut events = Vec::new();
    let mut started_at: Option<Instant> = None;
    sim.drive_sender(&mut sender, &mut events);
    let limit = start + cfg.time_limit;
    let mut finished_at: Option<Instant> = None;
    while let Some(Reverse((at, seq, _))) = sim.heap.pop() {
        if at > limit {
            break;
        }
        let Some(what) = sim.items.remove(&seq) else {
            continue;
        };
        sim.now = at;
        match what {
            What::SenderTimer => {
                if sim.sender_timer != Some(at) && sim.sender_timer.is_some_and(|t| t > at) {
                    continue;
                }
                sim.sender_timer = None;
                sim.drive_sender(&mut sender, &mut events);
            }
            What::ToSender { from, bytes } => {
                sender.handle_input(at, receiver_addr(from), &bytes);
                sim.drive_sender(&mut sender, &mut events);
            }
            What::ToReceiver { to, bytes } => {
                if sim.nodes[to].dead {
                    continue;
                }
                if let Some(rx) = sim.nodes[to].rx.as_mut() {
                    rx.handle_input(at, sender_addr(), &bytes);
                }
                sim.drive_receiver(to, started_at);
            }
            What::ReceiverTimer(i) => {
                if sim.nodes[i].dead || sim.nodes[i].timer != Some(at) {
                    continue;
                }
                sim.nodes[i].timer = None;
                sim.drive_receiver(i, started_at);
            }
            What::Spawn(i) => {
                let mut rc = cfg.receivers[i].config.clone();
                rc.seed = cfg
                    .seed
                    .wrapping_mul(0x9e37_79b9)
                    .wrapping_add(i as u64 + 1);
                sim.nodes[i].rx = Some(Receiver::new(rc, at));
                sim.drive_receiver(i, started_at);
            }
            What::Kill(i) => {
                sim.nodes[i].dead = true;
            }
            What::CatchUp { to, block } => {
                if sim.nodes[to].dead {
                    continue;
                }
                if let Some((index, bytes)) = block {
                    if let Some(rx) = sim.nodes[to].rx.as_mut() {
                        // Verified by the receiver like multicast data; a failure is counted
                        // through BlockRejected and the block is fetched again.
                        let _ = rx.accept_encoded_block(index, &bytes);
                    }
                    let res = &mut sim.nodes[to].result;
                    res.catchup_blocks += 1;
                    res.catchup_bytes += bytes.len() as u64;
                    sim.drive_receiver(to, started_at);
                }
                sim.catch_up_next(to);
            }
        }
        if started_at.is_none()
            && events
                .iter()
                .any(|e| matches!(e, SenderEvent::Started { .. }))
        {
            started_at = Some(at);
        }
        if sender.is_finished() {
            // Let receivers see their DoneAcks and the End for a while, then stop.
            let stop = *finished_at.get_or_insert(at + Duration::from_millis(500));
            if at >= stop {
                break;
            }
        }
    }
    let summary = events.iter().rev().find_map(|e| match e {
        SenderEvent::Finished(s) => Some(s.clone()),
        _ => None,
    });
    Ok(SimResult {
        summary,
        receivers: sim.nodes.into_iter().map(|n| n.result).collect(),
        stats: sender.stats(),
        started_at: started_at.map(|s| s.saturating_duration_since(start)),
        ended_at: sim.now.saturating_duration_since(start),
        multicast_packets: sim.multicast_packets,
        multicast_bytes: sim.multicast_bytes,
        sender_events: events,
    })
}
