//! The receiver driver: group socket + unicast socket → protocol `Receiver`; verified blocks →
//! file, device, stdout or pipe; resume state; TCP catch-up; the final check.
//!
//! The final check does not read the output again: every block is hashed once, before it is
//! written (by the protocol receiver), or, for a block a state file says an earlier process
//! wrote, re-read and hashed when the output is opened. The image is good when every block was
//! verified in this process and the manifest's block hashes merge into its image hash (plain
//! BLAKE3 of the image, see `corral_cast_proto::manifest`); only then, after an fsync, does the
//! receiver report success.

use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use corral_cast_proto::packet::Preparing;
use corral_cast_proto::{Dest, Receiver, ReceiverConfig, ReceiverEvent, SignedManifest};
use corral_model::{Outcome, SessionId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::catchup::{CatchUpClient, ManifestReply};
use crate::error::CastError;
use crate::observe::Progress;
use crate::options::{ReceiveOptions, ReceiveReport};
use crate::output::{OutputSpec, RandomSink, StreamSink, data_ranges};
use crate::send::event;
use crate::socket;
use crate::state::ResumeState;

/// Without progress for this long while blocks are missing, fetch the rest over TCP.
const STALL_AFTER: Duration = Duration::from_secs(3);
/// How often written blocks are fsynced and recorded in the state file.
const STATE_INTERVAL: Duration = Duration::from_millis(500);
/// Datagram slots per `recvmmsg` (each a GRO run of up to 64 KiB).
const RECV_SLOTS: usize = 8;
/// A sender's Preparing counts as current this long (it sends one a second).
const PREPARING_HEARD: Duration = Duration::from_secs(3);
/// How often a receiver asks a sender that is still preparing its manifest over TCP again.
const PREPARING_POLL: Duration = Duration::from_secs(1);

/// The identity of an image for resume: stable across sessions (the manifest itself carries
/// the session id, so its hash changes every time the sender restarts).
fn image_key(m: &SignedManifest) -> [u8; 32] {
    let m = m.manifest();
    let mut h = blake3::Hasher::new();
    h.update(b"corral-cast-resume-v1");
    h.update(&m.image_hash);
    h.update(&m.image_size.to_be_bytes());
    h.update(&m.block_size.to_be_bytes());
    for b in &m.blocks {
        h.update(&b.hash);
    }
    *h.finalize().as_bytes()
}

enum Sink {
    Random { sink: RandomSink, fresh: bool },
    Stream(StreamSink),
}

enum FromTcp {
    /// The manifest's bytes (unverified), and the port of the sender's UDP socket if told.
    Manifest(Vec<u8>, Option<u16>),
    /// The sender has no manifest yet: it is reading and hashing its image.
    Preparing(Preparing),
    Block(u32, Vec<u8>),
    /// The batch is done (or failed, with the error).
    Idle(Option<CastError>),
}

struct CatchUp {
    requests: mpsc::Sender<Vec<u32>>,
    busy: bool,
}

/// How long to wait before reconnecting after a catch-up connection failed.
const CATCHUP_RETRY: Duration = Duration::from_secs(1);

/// The receiver's side of TCP catch-up: at most one connection, one batch in flight. NAKs are
/// suppressed from the moment a batch is handed to a live connection (multicast repair for us
/// would only cost the other receivers) until that connection fails: a receiver whose TCP path
/// keeps failing asks for multicast repair again between its retries instead of waiting on a
/// path that does not work.
struct CatchUpCtl {
    conn: Option<CatchUp>,
    /// No new connection before this (after a failure).
    not_before: Instant,
}

impl CatchUpCtl {
    fn new(now: Instant) -> Self {
        CatchUpCtl {
            conn: None,
            not_before: now,
        }
    }

    /// Hands `missing` to the connection if it is idle; NAKs stop while it fetches them. A
    /// connection that can no longer take a batch (its task ended) counts as failed.
    fn fetch(&mut self, rx: &mut Receiver, missing: Vec<u32>, now: Instant) {
        let Some(c) = &mut self.conn else { return };
        if c.busy || missing.is_empty() {
            return;
        }
        match c.requests.try_send(missing) {
            Ok(()) => {
                c.busy = true;
                rx.suppress_naks(true);
            }
            Err(_) => self.failed(rx, now),
        }
    }

    /// The connection finished a batch (`None`) or failed (`Some`).
    fn on_idle(&mut self, rx: &mut Receiver, err: Option<CastError>, now: Instant) {
        match err {
            None => {
                if let Some(c) = &mut self.conn {
                    c.busy = false;
                }
            }
            Some(e) => {
                warn!(error = %e, "TCP catch-up failed; asking for multicast repair and retrying in 1 s");
                self.failed(rx, now);
            }
        }
    }

    fn failed(&mut self, rx: &mut Receiver, now: Instant) {
        self.conn = None;
        self.not_before = now + CATCHUP_RETRY;
        rx.suppress_naks(false);
    }
}

/// Starts a catch-up connection task: it fetches the manifest if `need_manifest`, then every
/// batch of block indices it is sent.
fn start_catchup(
    addr: SocketAddr,
    stream: SocketAddrV4,
    need_manifest: bool,
    results: mpsc::Sender<FromTcp>,
    cancel: CancellationToken,
) -> CatchUp {
    let (req_tx, mut req_rx) = mpsc::channel::<Vec<u32>>(4);
    tokio::spawn(async move {
        let run = async {
            let mut client = CatchUpClient::connect(addr).await?;
            if need_manifest {
                // A sender still preparing its manifest is asked again every second.
                let m = loop {
                    match client.manifest(stream).await? {
                        ManifestReply::Ready(m) => break m,
                        ManifestReply::Preparing(p) => {
                            let _ = results.send(FromTcp::Preparing(p)).await;
                            tokio::time::sleep(PREPARING_POLL).await;
                        }
                    }
                };
                let _ = results
                    .send(FromTcp::Manifest(m, client.report_port()))
                    .await;
            }
            let _ = results.send(FromTcp::Idle(None)).await;
            while let Some(batch) = req_rx.recv().await {
                if !client.blocks(&batch, &results, FromTcp::Block).await? {
                    return Ok(());
                }
                let _ = results.send(FromTcp::Idle(None)).await;
            }
            Ok::<_, CastError>(())
        };
        tokio::select! {
            _ = cancel.cancelled() => {}
            r = run => {
                if let Err(e) = r {
                    let _ = results.send(FromTcp::Idle(Some(e))).await;
                }
            }
        }
    });
    CatchUp {
        requests: req_tx,
        busy: true,
    }
}

struct Run {
    opts: ReceiveOptions,
    rx: Receiver,
    sink: Option<Sink>,
    state: Option<ResumeState>,
    /// Blocks written since the last fsync + state save.
    unsynced: Vec<u32>,
    blocks_multicast: u64,
    blocks_tcp: u64,
    blocks_resumed: u64,
    bytes_done: u64,
    /// Blocks just handed over from TCP (their BlockReady counts as TCP).
    tcp_blocks: std::collections::HashSet<u32>,
    /// The sender's last word over TCP that it is still preparing its manifest, for a
    /// receiver that cannot hear its Preparing packets.
    tcp_preparing: Option<Preparing>,
    /// Per block: its bytes in the output were verified by this process (hashed before the
    /// write, written as zeros, or re-read from a resumed output and hashed).
    verified: Vec<bool>,
    last_progress: Instant,
}

/// Re-reads the blocks a state file lists from the output and returns those whose bytes still
/// hash to the manifest's entry. An earlier process wrote them; nothing about them is trusted
/// without reading them back (zero blocks are skipped: they are written again).
fn verify_resumed(
    sink: &RandomSink,
    m: &corral_cast_proto::Manifest,
    prior: &ResumeState,
) -> Vec<u32> {
    let mut have = Vec::new();
    let mut buf = Vec::new();
    for i in 0..m.block_count() {
        if !prior.has(u64::from(i)) || m.blocks[i as usize].zero {
            continue;
        }
        buf.resize(m.block_len(i) as usize, 0);
        if sink.read_at(m.block_offset(i), &mut buf).is_ok()
            && m.hash_block(i, &buf) == m.blocks[i as usize].hash
        {
            have.push(i);
        }
    }
    have
}

/// The final check: every block verified by this process, and the verified block hashes
/// merging into the manifest's image hash. Reads nothing.
fn final_check(
    m: &corral_cast_proto::Manifest,
    verified: &[bool],
    path: &std::path::Path,
) -> Result<(), CastError> {
    let missing =
        (0..m.block_count()).find(|&i| !verified.get(i as usize).copied().unwrap_or(false));
    if let Some(i) = missing {
        return Err(CastError::Verify {
            path: path.to_owned(),
            why: format!("block {i} was never verified"),
        });
    }
    if m.merged_image_hash() != m.image_hash {
        return Err(CastError::Verify {
            path: path.to_owned(),
            why: "the block hashes do not make up the signed image hash".into(),
        });
    }
    Ok(())
}

impl Run {
    fn obs_event(&self, kind: &str, outcome: Outcome, reason: String) {
        let session = self.rx.session().unwrap_or(SessionId(0));
        self.opts
            .observer
            .event(&event(session, kind, outcome, reason).with_hostname(self.opts.name.clone()));
    }

    /// Opens the output once the manifest is known; re-verifies resumable blocks.
    fn ensure_sink(&mut self) -> Result<(), CastError> {
        if self.sink.is_some() {
            return Ok(());
        }
        let Some(signed) = self.rx.manifest().cloned() else {
            return Ok(());
        };
        let m = signed.manifest();
        let key = image_key(&signed);
        let prior = match &self.opts.state {
            Some(p) => match ResumeState::load(p) {
                Ok(Some(s))
                    if s.manifest_hash == key && s.blocks() == u64::from(m.block_count()) =>
                {
                    Some(s)
                }
                Ok(Some(_)) => {
                    warn!(state = %p.display(), "state file is for another image; starting over");
                    None
                }
                Ok(None) => None,
                Err(e) => {
                    warn!(error = %e, "unreadable state file; starting over");
                    None
                }
            },
            None => None,
        };
        match &self.opts.output {
            OutputSpec::Path(path) => {
                let mut sink = RandomSink::open(path, m.image_size, prior.is_some())?;
                let ranges = data_ranges((0..m.block_count()).map(|i| {
                    (
                        m.block_offset(i),
                        u64::from(m.block_len(i)),
                        m.blocks[i as usize].zero,
                    )
                }));
                let data: u64 = ranges.iter().map(|(a, b)| b - a).sum();
                if let Err(e) = sink.check_room(data) {
                    if prior.is_none() {
                        // Nothing of ours is in it: no empty part file left behind.
                        let _ = std::fs::remove_file(sink.path());
                    }
                    return Err(e);
                }
                sink.reserve(ranges);
                let mut fresh = prior.is_none();
                let mut have = Vec::new();
                if let Some(prior) = &prior {
                    // Trust nothing: re-read and verify every block the state file lists.
                    have = verify_resumed(&sink, m, prior);
                    info!(
                        listed = prior.count(),
                        verified = have.len(),
                        "resuming: blocks already on disk re-verified"
                    );
                    self.obs_event(
                        "resume",
                        Outcome::Info,
                        format!(
                            "resuming: {} of {} blocks already on disk and verified",
                            have.len(),
                            m.block_count()
                        ),
                    );
                    fresh = false;
                }
                let mut st = ResumeState::new(key, u64::from(m.block_count()));
                self.verified = vec![false; m.block_count() as usize];
                for &i in &have {
                    st.set(u64::from(i));
                    self.verified[i as usize] = true;
                    self.bytes_done += u64::from(m.block_len(i));
                }
                self.blocks_resumed = have.len() as u64;
                if !have.is_empty() {
                    self.rx.mark_have(have);
                }
                self.state = self.opts.state.as_ref().map(|_| st);
                if fs_is_device(sink.path()) {
                    fresh = false;
                }
                self.sink = Some(Sink::Random { sink, fresh });
            }
            OutputSpec::Stdout => self.sink = Some(Sink::Stream(StreamSink::stdout())),
            OutputSpec::Pipe(cmd) => self.sink = Some(Sink::Stream(StreamSink::pipe(cmd)?)),
        }
        self.verified.resize(m.block_count() as usize, false);
        Ok(())
    }

    async fn write_block(
        &mut self,
        index: u32,
        offset: u64,
        len: u32,
        data: Option<Vec<u8>>,
    ) -> Result<(), CastError> {
        self.ensure_sink()?;
        let is_zero = data.is_none();
        match &mut self.sink {
            Some(Sink::Random { sink, fresh }) => {
                match data {
                    Some(d) => {
                        sink.write_at(offset, &d)?;
                        self.rx.recycle(d);
                    }
                    // A new file is already zero; a device or an old part file may not be.
                    None if !*fresh => sink.write_at(offset, &vec![0u8; len as usize])?,
                    None => {}
                }
                self.unsynced.push(index);
            }
            Some(Sink::Stream(s)) => {
                let d = data.unwrap_or_else(|| vec![0u8; len as usize]);
                s.push(u64::from(index), d).await?;
            }
            None => {}
        }
        // The protocol receiver hashed these bytes against the manifest before handing them
        // over (zero blocks: zeros written now, or a part file this process just created).
        if let Some(v) = self.verified.get_mut(index as usize) {
            *v = true;
        }
        self.bytes_done += u64::from(len);
        if !is_zero {
            self.last_progress = Instant::now();
        }
        Ok(())
    }

    /// Fsyncs the output and records the blocks written since the last call.
    fn save_state(&mut self) -> Result<(), CastError> {
        if self.unsynced.is_empty() {
            return Ok(());
        }
        if let Some(Sink::Random { sink, .. }) = &self.sink {
            sink.sync()?;
        }
        if let (Some(st), Some(path)) = (&mut self.state, &self.opts.state) {
            for &i in &self.unsynced {
                st.set(u64::from(i));
            }
            st.save(path)?;
        }
        self.unsynced.clear();
        Ok(())
    }

    /// The final check (see [`final_check`]) for whatever the output is.
    fn check_image(&self) -> Result<(), CastError> {
        let Some(signed) = self.rx.manifest() else {
            return Ok(());
        };
        let path = match (&self.sink, &self.opts.output) {
            (Some(Sink::Random { sink, .. }), _) => sink.path().to_owned(),
            (_, OutputSpec::Path(p)) => p.clone(),
            (_, OutputSpec::Stdout) => "-".into(),
            (_, OutputSpec::Pipe(c)) => format!("| {c}").into(),
        };
        final_check(signed.manifest(), &self.verified, &path)
    }

    fn progress(&self, t0: Instant) {
        let preparing = self
            .rx
            .sender_preparing()
            .map(|p| Preparing {
                image_size: p.image_size,
                bytes_done: p.bytes_done,
            })
            .or(self.tcp_preparing);
        if self.rx.manifest().is_none()
            && let Some(p) = preparing
        {
            self.opts.observer.progress(&Progress::Waiting {
                sender_image_bytes: p.image_size,
                sender_bytes_done: p.bytes_done,
                elapsed_s: t0.elapsed().as_secs_f64(),
            });
            return;
        }
        let (blocks_total, image_bytes) = self
            .rx
            .manifest()
            .map(|s| {
                (
                    u64::from(s.manifest().block_count()),
                    s.manifest().image_size,
                )
            })
            .unwrap_or((0, 0));
        self.opts.observer.progress(&Progress::Receiver {
            blocks_total,
            blocks_done: u64::from(self.rx.blocks_done()),
            image_bytes,
            bytes_done: self.bytes_done.min(image_bytes),
            elapsed_s: t0.elapsed().as_secs_f64(),
        });
    }

    /// The stream this receiver listens to, as a catch-up server is asked for it: the group
    /// and port, or 0.0.0.0 and the port when it takes unicast.
    fn stream(&self) -> SocketAddrV4 {
        let m = &self.opts.multicast;
        if self.opts.unicast {
            SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, m.port)
        } else {
            SocketAddrV4::new(m.group, m.port)
        }
    }

    /// Where to ask for catch-up: the sender's announced TCP port, at the address given by
    /// `--sender` when that is the announcing host (its own word beats the default port
    /// guessed for `--sender HOST`: it may have found that port taken).
    fn tcp_addr(&self) -> Option<SocketAddr> {
        let heard = self.rx.sender().zip(self.rx.tcp_port().filter(|&p| p != 0));
        match (self.opts.sender, heard) {
            (Some(a), Some((s, p))) if a.ip() == s.ip() => Some(SocketAddr::new(a.ip(), p)),
            (Some(a), _) => Some(a),
            (None, Some((s, p))) => Some(SocketAddr::new(s.ip(), p)),
            (None, None) => None,
        }
    }
}

fn fs_is_device(path: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}

/// Receives one image; returns only once it is written and verified (or fails).
pub async fn receive(
    opts: ReceiveOptions,
    cancel: CancellationToken,
) -> Result<ReceiveReport, CastError> {
    let t0 = Instant::now();
    let gsock = if opts.unicast {
        socket::unicast_receiver_socket(&opts.multicast)?
    } else {
        socket::receiver_socket(&opts.multicast)?
    };
    let usock = socket::unicast_socket(opts.multicast.interface)?;
    let mut seed = [0u8; 8];
    let _ = getrandom::fill(&mut seed);
    let cfg = ReceiverConfig {
        name: opts.name.clone(),
        trusted_key: opts.trusted_key.map(|k| k.to_bytes()),
        seed: u64::from_be_bytes(seed),
        // Reports go to the sender's UDP socket, which is bound to the stream's port; the
        // port given with --sender is its TCP catch-up port, which may differ (taken on the
        // sender's host, it listens on another).
        sender: opts
            .sender
            .map(|a| SocketAddr::new(a.ip(), opts.multicast.port)),
        silent_after: opts.silent_after,
        ..ReceiverConfig::default()
    };
    let mut run = Run {
        rx: Receiver::new(cfg, Instant::now()),
        opts,
        sink: None,
        state: None,
        unsynced: Vec::new(),
        blocks_multicast: 0,
        blocks_tcp: 0,
        blocks_resumed: 0,
        bytes_done: 0,
        tcp_blocks: std::collections::HashSet::new(),
        tcp_preparing: None,
        verified: Vec::new(),
        last_progress: Instant::now(),
    };
    let task_cancel = cancel.child_token();
    let _guard = task_cancel.clone().drop_guard();
    let (tcp_tx, mut tcp_rx) = mpsc::channel::<FromTcp>(64);
    let mut catchup = CatchUpCtl::new(Instant::now());
    let mut want_catchup = false;
    let mut last_data_packets = 0u64;
    let mut rejected_reason: Option<String> = None;
    let mut last_heard = Instant::now();
    let mut told_preparing = false;
    // 8 GRO slots of 64 KiB: 512 KiB that the kernel fills and the state machine reads right
    // after, within a core's L2 beside the block being assembled. 32 slots (2 MiB) spilled
    // to L3: 8 receivers on 2 cores took 2.75 s against 2.68 s (11 interleaved pairs of
    // 512 MiB, 9 faster).
    let mut batch = socket::RecvBatch::new(RECV_SLOTS, 65_536);
    let mut ubuf = vec![0u8; 65_536];
    let mut out = Vec::with_capacity(2048);
    let mut tick = tokio::time::interval(STATE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut finishing: Option<Instant> = None;
    let mut result: Option<Result<(), CastError>> = None;

    loop {
        let now = Instant::now();
        run.rx.handle_timeout(now);
        while let Some(t) = run.rx.poll_transmit(now, &mut out) {
            let dest = match t.dest {
                Dest::Unicast(a) => a,
                Dest::Group => run.opts.multicast.group_addr(),
            };
            if let Err(e) = usock.send_to(&out[..t.size], dest).await {
                debug!(%dest, error = %e, "send failed");
            }
        }
        while let Some(ev) = run.rx.poll_event() {
            match ev {
                ReceiverEvent::Joined {
                    session,
                    sender,
                    tcp_port,
                } => {
                    info!(%session, %sender, tcp_port, "joined");
                    run.obs_event(
                        "joined",
                        Outcome::Info,
                        format!("joined session {session} of sender {sender}"),
                    );
                }
                ReceiverEvent::ManifestReady {
                    manifest,
                    authenticated,
                } => {
                    let m = manifest.manifest();
                    run.obs_event(
                        "manifest",
                        if authenticated {
                            Outcome::Ok
                        } else {
                            Outcome::Warn
                        },
                        format!(
                            "manifest accepted: {} bytes in {} blocks{}",
                            m.image_size,
                            m.block_count(),
                            if authenticated {
                                ", signed by the trusted key"
                            } else {
                                " (no --trusted-key: origin not authenticated)"
                            }
                        ),
                    );
                    if let Err(e) = run.ensure_sink() {
                        result = Some(Err(e));
                    }
                }
                ReceiverEvent::ManifestRejected { error } => {
                    warn!(%error, "manifest rejected");
                    rejected_reason = Some(error.to_string());
                    run.obs_event(
                        "manifest-rejected",
                        Outcome::Denied,
                        format!("manifest rejected: {error}"),
                    );
                    if run.opts.trusted_key.is_some() && run.rx.manifest().is_none() {
                        // Keep listening: a forged manifest must not stop a good one.
                    }
                }
                ReceiverEvent::BlockReady {
                    index,
                    offset,
                    len,
                    data,
                } => {
                    if data.is_some() {
                        if run.tcp_blocks.remove(&index) {
                            run.blocks_tcp += 1;
                        } else {
                            run.blocks_multicast += 1;
                        }
                    }
                    if let Err(e) = run.write_block(index, offset, len, data).await {
                        result = Some(Err(e));
                    }
                }
                ReceiverEvent::BlockRejected { error } => {
                    debug!(%error, "block rejected");
                }
                ReceiverEvent::AllBlocksReady => {
                    let r = finish_output(&mut run, &usock).await;
                    match &r {
                        Ok(()) => run.rx.finish(true, "verified"),
                        Err(e) => run.rx.finish(false, &e.to_string()),
                    }
                    finishing = Some(Instant::now());
                    result = Some(r);
                }
                ReceiverEvent::MulticastSilent { silent_for } => {
                    warn!(
                        ?silent_for,
                        "no multicast data: falling back to TCP catch-up"
                    );
                    run.obs_event(
                        "multicast-silent",
                        Outcome::Warn,
                        format!(
                            "no multicast data {:.1} s after joining; fetching over TCP",
                            silent_for.as_secs_f64()
                        ),
                    );
                    want_catchup = true;
                }
                ReceiverEvent::CatchUpAdvised => {
                    info!("the sender moved us to TCP catch-up (too far behind the stream)");
                    run.obs_event(
                        "catch-up-advised",
                        Outcome::Warn,
                        "too far behind the multicast stream: fetching the rest over TCP".into(),
                    );
                    want_catchup = true;
                }
                ReceiverEvent::DoneAcknowledged | ReceiverEvent::DoneUnacknowledged => {}
                ReceiverEvent::SessionEnded { aborted } => {
                    if result.is_none() && !run.rx.is_complete() {
                        if run.tcp_addr().is_some() && !aborted {
                            want_catchup = true;
                        } else {
                            result = Some(Err(CastError::Incomplete {
                                reason: format!(
                                    "the sender {} the session with {} blocks missing",
                                    if aborted { "aborted" } else { "ended" },
                                    run.rx.missing_blocks().len()
                                ),
                            }));
                        }
                    }
                }
            }
        }

        // Finished: wait (briefly) for the sender to acknowledge our Done, then report.
        if let Some(r) = &result {
            if finishing.is_none() {
                // Tell the sender why we stop (retried until acknowledged).
                if let Err(e) = r {
                    run.rx.finish(false, &e.to_string());
                }
                finishing = Some(Instant::now());
            }
            let done = run.rx.is_finished()
                || run.rx.sender().is_none()
                || finishing.is_some_and(|f| f.elapsed() > Duration::from_secs(3));
            if done {
                let r = result.take().unwrap_or(Ok(()));
                return conclude(run, r, t0);
            }
        }

        // Decide on TCP catch-up: told so by the protocol, or stalled with blocks missing, or
        // never heard from multicast but given --sender.
        let data_packets = run.rx.stats().data_packets;
        if data_packets != last_data_packets {
            last_data_packets = data_packets;
            run.last_progress = Instant::now();
        }
        // Multicast data flowed, then stopped with blocks still missing.
        let stalled = run.rx.manifest().is_some()
            && !run.rx.is_complete()
            && data_packets > 0
            && run.last_progress.elapsed() > STALL_AFTER;
        // A sender heard saying it still hashes its image is reachable by multicast: no
        // reason to go to TCP before it announces.
        let preparing = run
            .rx
            .sender_preparing()
            .is_some_and(|p| p.heard_at.elapsed() < PREPARING_HEARD);
        if preparing && !told_preparing {
            told_preparing = true;
            if let Some(p) = run.rx.sender_preparing() {
                info!(
                    sender = %p.from,
                    session = %p.session,
                    image_bytes = p.image_size,
                    "a sender is reading and hashing its image; waiting for it to announce"
                );
            }
        }
        let never = data_packets == 0
            && run.opts.sender.is_some()
            && t0.elapsed() > run.opts.silent_after
            && !preparing;
        let due = result.is_none()
            && (want_catchup || stalled || never)
            && Instant::now() >= catchup.not_before;
        match (due, run.tcp_addr(), &catchup.conn) {
            (true, Some(addr), None) => {
                info!(%addr, "starting TCP catch-up");
                catchup.conn = Some(start_catchup(
                    addr,
                    run.stream(),
                    run.rx.manifest().is_none(),
                    tcp_tx.clone(),
                    task_cancel.clone(),
                ));
            }
            (true, Some(_), Some(c)) if !c.busy && run.rx.manifest().is_some() => {
                let missing = run.rx.missing_blocks();
                catchup.fetch(&mut run.rx, missing, Instant::now());
            }
            _ => {}
        }

        let wake = match run.rx.poll_timeout() {
            Some(d) => tokio::time::Instant::from_std(d),
            None => tokio::time::Instant::now() + STATE_INTERVAL,
        };
        tokio::select! {
            _ = cancel.cancelled() => {
                let _ = run.save_state();
                return Err(CastError::Cancelled);
            }
            r = gsock.readable() => {
                if r.is_ok() {
                    let now = Instant::now();
                    let mut got = 0;
                    // Up to 8 batches or 512 datagrams (a GRO slot holds up to 64) before
                    // timers and sends get a turn.
                    for _ in 0..8 {
                        match batch.recv(&gsock) {
                            Ok(_) => {
                                for (d, from) in batch.datagrams() {
                                    run.rx.handle_input(now, from, d);
                                    got += 1;
                                }
                            }
                            Err(_) => break,
                        }
                        if got >= 512 {
                            break;
                        }
                    }
                    // Datagrams count as "heard" only while no manifest was refused: a
                    // sender we do not trust must not keep us waiting forever.
                    if got > 0 && (rejected_reason.is_none() || run.rx.manifest().is_some()) {
                        last_heard = now;
                    }
                }
            }
            r = usock.recv_from(&mut ubuf) => {
                if let Ok((n, from)) = r {
                    let now = Instant::now();
                    if rejected_reason.is_none() || run.rx.manifest().is_some() {
                        last_heard = now;
                    }
                    run.rx.handle_input(now, from, &ubuf[..n]);
                }
            }
            Some(msg) = tcp_rx.recv() => {
                // A failed attempt is not word from a sender: a receiver given --sender
                // must not retry a dead or absent one forever.
                if !matches!(msg, FromTcp::Idle(Some(_))) {
                    last_heard = Instant::now();
                }
                match msg {
                    FromTcp::Preparing(p) => {
                        if run.tcp_preparing.is_none() {
                            info!(
                                sender = ?run.tcp_addr(),
                                image_bytes = p.image_size,
                                "the sender is reading and hashing its image (heard over TCP); waiting for its manifest"
                            );
                        }
                        run.tcp_preparing = Some(p);
                    }
                    FromTcp::Manifest(bytes, report_port) => {
                        match run.rx.accept_manifest_bytes(&bytes) {
                            Err(e) => warn!(error = %e, "manifest fetched over TCP rejected"),
                            // The sender's word of where its reports go (a sender whose
                            // stream port was taken on its host listens on another), for
                            // a receiver that follows that host and has heard no
                            // announcement of its own to learn it from.
                            Ok(()) => {
                                if let (Some(port), Some(tcp)) = (report_port, run.tcp_addr())
                                    && run.rx.sender().is_some_and(|s| s.ip() == tcp.ip())
                                    && run.rx.tcp_port().is_none()
                                {
                                    run.rx.sender_listens_on(port);
                                }
                            }
                        }
                    }
                    FromTcp::Block(index, bytes) => {
                        run.tcp_blocks.insert(index);
                        if let Err(e) = run.rx.accept_encoded_block(index, &bytes) {
                            warn!(block = index, error = %e, "block fetched over TCP rejected");
                        }
                    }
                    // Another sender's server, or one of another release: asking again
                    // will not change it.
                    FromTcp::Idle(Some(
                        e @ (CastError::OtherStream { .. } | CastError::CatchUpVersion { .. }),
                    )) => {
                        result = Some(Err(e));
                    }
                    FromTcp::Idle(err) => catchup.on_idle(&mut run.rx, err, Instant::now()),
                }
            }
            _ = tokio::time::sleep_until(wake) => {}
            _ = tick.tick() => {
                if let Some(sender) = run.rx.sender() {
                    for pkt in keepalive(&run, last_data_packets) {
                        let _ = usock.send_to(&pkt, sender).await;
                    }
                }
                if let Err(e) = run.save_state() {
                    result = Some(Err(e));
                }
                run.progress(t0);
                if last_heard.elapsed() > run.opts.idle_timeout && result.is_none() {
                    result = Some(Err(CastError::Incomplete {
                        reason: match &rejected_reason {
                            Some(why) if run.rx.manifest().is_none() => format!(
                                "no acceptable sender within {:.0} s; last manifest refused: {why}",
                                run.opts.idle_timeout.as_secs_f64()
                            ),
                            _ => format!(
                                "nothing heard from a sender for {:.0} s",
                                run.opts.idle_timeout.as_secs_f64()
                            ),
                        },
                    }));
                }
            }
        }
    }
}

/// Works around two gaps in the protocol receiver (reported to its owner):
/// - it schedules Status reports only after hearing an Announce, so a receiver that only ever
///   talks TCP (`--sender`, multicast blocked) would be declared dead by the sender;
/// - a JoinAck that arrives after the manifest was assembled marks "sender knows we hold the
///   manifest" even when the acknowledged Join did not say so, so the sender may never count
///   us as ready.
///
/// Both packets are idempotent on the sender side.
fn keepalive(run: &Run, data_packets: u64) -> Vec<Vec<u8>> {
    use corral_cast_proto::packet::{Body, JOIN_HAS_MANIFEST, Join, Packet};
    let mut out = Vec::new();
    let Some(session) = run.rx.session() else {
        return out;
    };
    if run.rx.is_finished() || run.rx.sender().is_none() {
        return out;
    }
    let mut buf = Vec::with_capacity(128);
    if run.rx.manifest().is_some() && data_packets == 0 && !run.rx.is_complete() {
        Packet::new(
            session,
            Body::Join(Join {
                receiver: run.rx.id(),
                flags: JOIN_HAS_MANIFEST,
                name: &run.opts.name,
            }),
        )
        .encode(&mut buf);
        out.push(std::mem::take(&mut buf));
    }
    if run.rx.tcp_port().is_none() {
        Packet::new(session, Body::Status(run.rx.status())).encode(&mut buf);
        out.push(buf);
    }
    out
}

/// How often a receiver busy flushing its output tells the sender it is alive
/// (the sender gives up on a receiver silent for 2 s by default).
const ALIVE_INTERVAL: Duration = Duration::from_millis(250);

/// Sends one Status packet to the sender every [`ALIVE_INTERVAL`] from a thread of its own,
/// until dropped. The final fsync blocks this single-threaded receiver for
/// seconds on a large image (longer than the sender's `dead_after` on a slow disk or a busy
/// machine), and no report may go missing for that long just before the Done.
struct KeepAlive {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KeepAlive {
    fn start(usock: &tokio::net::UdpSocket, pkt: Vec<u8>, to: SocketAddr) -> Option<KeepAlive> {
        use std::os::fd::AsFd;
        // A second handle on the same socket: same source address and port, so the sender
        // recognises the reports. It shares the non-blocking flag; a full buffer only skips
        // one report.
        let fd = usock.as_fd().try_clone_to_owned().ok()?;
        let sock = std::net::UdpSocket::from(fd);
        let (stop, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("cast-keepalive".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    rx.recv_timeout(ALIVE_INTERVAL)
                {
                    let _ = sock.send_to(&pkt, to);
                }
            })
            .ok()?;
        Some(KeepAlive {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs the final check, then flushes and commits the output, with a [`KeepAlive`] running
/// meanwhile so that the sender does not declare it dead just before its Done.
async fn finish_output(run: &mut Run, usock: &tokio::net::UdpSocket) -> Result<(), CastError> {
    use corral_cast_proto::packet::{Body, Packet};
    let _alive = match (run.rx.session(), run.rx.sender()) {
        (Some(session), Some(to)) => {
            let mut pkt = Vec::with_capacity(64);
            Packet::new(session, Body::Status(run.rx.status())).encode(&mut pkt);
            KeepAlive::start(usock, pkt, to)
        }
        _ => None,
    };
    run.save_state()?;
    match run.sink.take() {
        Some(Sink::Random { sink, fresh }) => {
            run.sink = Some(Sink::Random { sink, fresh });
            run.check_image()?;
            if let Some(Sink::Random { sink, .. }) = run.sink.take() {
                // Durable before success: the data (a device) or the data, the file and its
                // new name (a regular file).
                sink.sync()?;
                let path = sink.commit()?;
                debug!(path = %path.display(), "output committed");
            }
            Ok(())
        }
        Some(Sink::Stream(s)) => {
            run.check_image()?;
            s.finish().await?;
            Ok(())
        }
        None => {
            // An empty image: nothing to write, but a file output should exist.
            if let (OutputSpec::Path(p), Some(_)) = (&run.opts.output, run.rx.manifest()) {
                let sink = RandomSink::open(p, 0, false)?;
                sink.commit()?;
            }
            Ok(())
        }
    }
}

fn conclude(run: Run, r: Result<(), CastError>, t0: Instant) -> Result<ReceiveReport, CastError> {
    let (blocks, image_bytes) = run
        .rx
        .manifest()
        .map(|s| {
            (
                u64::from(s.manifest().block_count()),
                s.manifest().image_size,
            )
        })
        .unwrap_or((0, 0));
    match r {
        Ok(()) => {
            let report = ReceiveReport {
                session: run.rx.session().unwrap_or(SessionId(0)),
                image_bytes,
                blocks,
                blocks_multicast: run.blocks_multicast,
                blocks_tcp: run.blocks_tcp,
                blocks_resumed: run.blocks_resumed,
                elapsed_s: t0.elapsed().as_secs_f64(),
                output: match &run.opts.output {
                    OutputSpec::Path(p) => p.display().to_string(),
                    OutputSpec::Stdout => "-".into(),
                    OutputSpec::Pipe(c) => format!("| {c}"),
                },
            };
            run.progress(t0);
            run.obs_event(
                "verified",
                Outcome::Ok,
                format!(
                    "image verified: {} bytes ({} multicast, {} TCP, {} resumed blocks) in {:.1} s",
                    image_bytes,
                    run.blocks_multicast,
                    run.blocks_tcp,
                    run.blocks_resumed,
                    report.elapsed_s
                ),
            );
            Ok(report)
        }
        Err(e) => {
            run.obs_event("failed", Outcome::Fail, format!("receive failed: {e}"));
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_cast_proto::{Compression, Manifest, ManifestBuilder};

    fn image(blocks: usize) -> (Vec<u8>, Manifest) {
        let mut x = 7u64;
        let data: Vec<u8> = (0..blocks * 4096 - 100)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut b = ManifestBuilder::new(SessionId(1), 4096, 512, Compression::None);
        for c in data.chunks(4096) {
            b.push_block(c);
        }
        (data, b.finish().unwrap())
    }

    #[test]
    fn resumed_blocks_whose_bytes_changed_are_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let (data, m) = image(5);
        std::fs::write(crate::output::part_path(&out), &data).unwrap();
        let mut prior = ResumeState::new([0; 32], 5);
        for i in [0, 1, 2, 4] {
            prior.set(i);
        }
        let sink = RandomSink::open(&out, data.len() as u64, true).unwrap();
        assert_eq!(verify_resumed(&sink, &m, &prior), vec![0, 1, 2, 4]);
        // One bit flips in block 1 and one in the short last block: both are dropped.
        let mut bad = data.clone();
        bad[4096 + 17] ^= 1;
        bad[4 * 4096 + 3] ^= 0x80;
        sink.write_at(0, &bad).unwrap();
        assert_eq!(verify_resumed(&sink, &m, &prior), vec![0, 2]);
        // Blocks swapped on disk: same bytes, wrong place.
        let mut swapped = data.clone();
        swapped.copy_within(0..4096, 2 * 4096);
        sink.write_at(0, &swapped).unwrap();
        assert_eq!(verify_resumed(&sink, &m, &prior), vec![0, 1, 4]);
    }

    #[test]
    fn final_check_needs_every_block_verified_and_the_image_hash() {
        let (_, m) = image(3);
        let path = std::path::Path::new("out");
        final_check(&m, &[true, true, true], path).unwrap();
        let err = final_check(&m, &[true, false, true], path).unwrap_err();
        assert!(
            err.to_string().contains("block 1 was never verified"),
            "{err}"
        );
        assert!(final_check(&m, &[true, true], path).is_err());
        let mut lying = m.clone();
        lying.image_hash[0] ^= 1;
        let err = final_check(&lying, &[true; 3], path).unwrap_err();
        assert!(err.to_string().contains("image hash"), "{err}");
    }

    fn peer() -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], 9000))
    }

    fn connected(ctl: &mut CatchUpCtl) -> mpsc::Receiver<Vec<u32>> {
        let (tx, rx) = mpsc::channel(4);
        ctl.conn = Some(CatchUp {
            requests: tx,
            busy: false,
        });
        rx
    }

    /// A receiver whose TCP catch-up fails must NAK again: with NAKs left suppressed it could
    /// only wait for a TCP path that keeps failing, and multicast repair never came.
    #[test]
    fn a_failed_catch_up_turns_naks_back_on() {
        let t = Instant::now();
        let mut rx = Receiver::new(ReceiverConfig::default(), t);
        let mut ctl = CatchUpCtl::new(t);
        let mut requests = connected(&mut ctl);

        ctl.fetch(&mut rx, vec![3, 5], t);
        assert_eq!(requests.try_recv().unwrap(), vec![3, 5]);
        assert!(rx.naks_suppressed(), "a batch over TCP stops NAKs");
        // Busy: a second batch waits for the first.
        ctl.fetch(&mut rx, vec![7], t);
        assert!(requests.try_recv().is_err());
        // A finished batch keeps the connection and NAKs off.
        ctl.on_idle(&mut rx, None, t);
        assert!(rx.naks_suppressed());
        ctl.fetch(&mut rx, vec![7], t);
        assert_eq!(requests.try_recv().unwrap(), vec![7]);

        let err = CastError::CatchUp {
            peer: peer(),
            reason: "connection reset".into(),
        };
        ctl.on_idle(&mut rx, Some(err), t);
        assert!(!rx.naks_suppressed(), "NAKs are back on after the failure");
        assert!(ctl.conn.is_none(), "the failed connection is dropped");
        assert_eq!(ctl.not_before, t + CATCHUP_RETRY);
    }

    #[test]
    fn a_catch_up_connection_that_cannot_take_a_batch_counts_as_failed() {
        let t = Instant::now();
        let mut rx = Receiver::new(ReceiverConfig::default(), t);
        // NAKs already off (the sender advised catch-up, or an earlier batch).
        rx.suppress_naks(true);
        let mut ctl = CatchUpCtl::new(t);
        drop(connected(&mut ctl));
        ctl.fetch(&mut rx, vec![1, 2], t);
        assert!(!rx.naks_suppressed());
        assert!(ctl.conn.is_none());
        assert_eq!(ctl.not_before, t + CATCHUP_RETRY);
        // Nothing to fetch: nothing changes.
        let _requests = connected(&mut ctl);
        ctl.fetch(&mut rx, vec![], t);
        assert!(!rx.naks_suppressed());
        assert!(ctl.conn.as_ref().is_some_and(|c| !c.busy));
    }

    #[test]
    fn keepalive_reports_from_the_receivers_socket_until_dropped() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sender
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let usock = rt
            .block_on(tokio::net::UdpSocket::bind("127.0.0.1:0"))
            .unwrap();
        let ours = usock.local_addr().unwrap();
        let ka = KeepAlive::start(&usock, b"status".to_vec(), sender.local_addr().unwrap())
            .expect("keepalive thread");
        // The caller is blocked (as in a long fsync); the reports still go out, from the
        // receiver's own address.
        std::thread::sleep(ALIVE_INTERVAL * 3);
        let mut buf = [0u8; 16];
        for _ in 0..2 {
            let (n, from) = sender.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"status");
            assert_eq!(from, ours);
        }
        drop(ka);
        // Drain what was sent before the drop, then nothing more arrives.
        sender.set_read_timeout(Some(ALIVE_INTERVAL * 3)).unwrap();
        while sender.recv_from(&mut buf).is_ok() {}
        std::thread::sleep(ALIVE_INTERVAL * 2);
        sender.set_nonblocking(true).unwrap();
        assert!(
            sender.recv_from(&mut buf).is_err(),
            "a report after the drop"
        );
    }
}
