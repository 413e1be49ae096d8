//! The sender driver: image → signed manifest → protocol `Sender` on a UDP socket, plus the TCP
//! catch-up server, until the protocol says the session is finished.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use corral_cast_proto::packet::{Body, Packet, Preparing};
use corral_cast_proto::{
    Compression, Dest, ReceiverOutcome as ProtoOutcome, Sender, SenderConfig, SenderEvent,
    SessionSummary,
};
use corral_model::{Event, Outcome, SessionId, Source, UnixMillis};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::blocks::{Blocks, SharedBlocks, build_manifest};
use crate::error::CastError;
use crate::observe::{Progress, ReceiverProgress};
use crate::options::{CatchupListener, Rate, ReceiverOutcome, SendOptions, SendReport};
use crate::source::ImageSource;
use crate::{catchup, keys, socket};

/// Event kind recorded when the data pass begins (the start condition held).
pub(crate) const PASS_START: &str = "pass-start";

/// Block size of the images we send (the protocol's default).
const BLOCK_SIZE: u32 = corral_cast_proto::manifest::DEFAULT_BLOCK_SIZE;

pub(crate) fn event(
    session: SessionId,
    kind: &str,
    outcome: Outcome,
    reason: impl Into<String>,
) -> Event {
    Event::new(
        UnixMillis::from_system_time(std::time::SystemTime::now()),
        Source::Cast,
        kind,
        outcome,
        reason,
    )
    .with_session(session)
}

/// Symbol size for a UDP payload of `packet_size` bytes: what is left after the data packet
/// header, rounded down to even (Reed–Solomon shards must be even).
fn symbol_size(packet_size: usize) -> u16 {
    let s = packet_size
        .saturating_sub(corral_cast_proto::packet::DATA_OVERHEAD)
        .min(65_000);
    (s as u16) & !1
}

/// How often the group hears that the sender is still reading and hashing its image.
const PREPARING_INTERVAL: Duration = Duration::from_secs(1);

/// How far the pre-pass is, from its counters: the image size (0 while unknown) and the bytes
/// read and hashed (reported only once the size is known, and never beyond it).
fn pre_pass(image_size: &AtomicU64, bytes_done: &AtomicU64) -> Preparing {
    let size = image_size.load(Ordering::Relaxed);
    Preparing {
        image_size: size,
        bytes_done: if size == 0 {
            0
        } else {
            bytes_done.load(Ordering::Relaxed).min(size)
        },
    }
}

/// Waits for the manifest pre-pass `hashing`, telling the group (or the unicast targets,
/// `group`) every [`PREPARING_INTERVAL`] (the first time at once) how far it is with a
/// Preparing packet.
async fn preparing<T>(
    hashing: tokio::task::JoinHandle<T>,
    sock: &tokio::net::UdpSocket,
    group: &[SocketAddrV4],
    session: SessionId,
    image_size: &AtomicU64,
    bytes_done: &AtomicU64,
) -> Result<T, tokio::task::JoinError> {
    tokio::pin!(hashing);
    let mut tick = tokio::time::interval(PREPARING_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = Vec::with_capacity(64);
    loop {
        tokio::select! {
            r = &mut hashing => return r,
            _ = tick.tick() => {
                buf.clear();
                let body = Body::Preparing(pre_pass(image_size, bytes_done));
                Packet::new(session, body).encode(&mut buf);
                for &to in group {
                    if let Err(e) = sock.try_send_to(&buf, to.into()) {
                        debug!(error = %e, %to, "preparing packet not sent");
                    }
                }
            }
        }
    }
}

/// The port of a socket's local address (`what` names the socket in the error).
fn port_of(addr: std::io::Result<SocketAddr>, what: &'static str) -> Result<u16, CastError> {
    addr.map(|a| a.port())
        .map_err(|source| CastError::Socket { what, source })
}

/// Sends an image to every receiver that joins; returns when the protocol reports the session
/// finished (every receiver verified, failed or timed out) or `cancel` fires.
pub async fn send(opts: SendOptions, cancel: CancellationToken) -> Result<SendReport, CastError> {
    // The pacing loop and the thread firing its timers must run soon after they wake, or the
    // token bucket overflows and the pass loses rate (see `sched`).
    crate::sched::request_short_slices(crate::sched::SENDER_SLICE);
    let obs = opts.observer.clone();
    let (key, ephemeral_key) = match &opts.key {
        Some(k) => (k.clone(), false),
        None => (keys::generate()?, true),
    };
    if ephemeral_key {
        warn!("no signing key given: using an ephemeral key; receivers cannot pin it");
    }
    let session = SessionId::new();
    let symbol = symbol_size(opts.packet_size);
    if symbol < 64 {
        return Err(CastError::PacketSize {
            size: opts.packet_size,
            min: 64 + corral_cast_proto::packet::DATA_OVERHEAD,
        });
    }
    let compression = if opts.compress_level == 0 {
        Compression::None
    } else {
        Compression::Zstd {
            level: opts.compress_level,
        }
    };
    // The sockets first: while the image is read and hashed (minutes for a large disk), the
    // group hears a Preparing packet every second, and the catch-up server tells receivers
    // that cannot hear the group the same, so that receivers started early neither give up
    // nor sit without a word.
    let sock = socket::sender_socket(&opts.multicast)?;
    // The stream: the group, or the unicast targets; `group` is where what the protocol
    // addresses to the group goes (the group, or each target).
    let stream = if opts.unicast.is_empty() {
        catchup::Stream::Group(SocketAddrV4::new(opts.multicast.group, opts.multicast.port))
    } else {
        catchup::Stream::Targets(opts.unicast.clone())
    };
    let group: Vec<SocketAddrV4> = match &stream {
        catchup::Stream::Group(g) => vec![*g],
        catchup::Stream::Targets(t) => t.clone(),
    };
    socket::raise_descriptor_limit();
    let prep_size = Arc::new(AtomicU64::new(0));
    let prep_done = Arc::new(AtomicU64::new(0));
    let bound = match opts
        .catchup_listener
        .as_ref()
        .and_then(CatchupListener::take)
    {
        Some(l) => l,
        None => crate::options::bind_catchup(
            opts.multicast.interface.unwrap_or(Ipv4Addr::UNSPECIFIED),
            opts.catchup_port,
        )?,
    };
    let tcp_port = port_of(bound.local_addr(), "catch-up listener address")?;
    let listener = TcpListener::from_std(bound).map_err(|source| CastError::Socket {
        what: "catch-up listener",
        source,
    })?;

    let catchup = {
        let (size, done) = (prep_size.clone(), prep_done.clone());
        Arc::new(catchup::Deferred::new(move || pre_pass(&size, &done)))
    };
    // The server stops when this function returns, however it returns.
    let server_cancel = cancel.child_token();
    let _server = server_cancel.clone().drop_guard();
    // Told with the manifest to receivers that cannot hear the group (and so cannot see
    // where the announcements come from): this socket's port, which is the stream's unless
    // another program held that.
    let report_port = port_of(sock.local_addr(), "sender socket address")?;
    tokio::spawn(catchup::serve(
        listener,
        catchup.clone() as Arc<dyn catchup::CatchUpProvider>,
        stream.clone(),
        report_port,
        server_cancel,
    ));
    // Reading and hashing the image is blocking work.
    let src_path = opts.source.clone();
    let secret = key.to_bytes();
    let hashing_obs = obs.clone();
    let (size_w, done_w) = (prep_size.clone(), prep_done.clone());
    let hashing = tokio::task::spawn_blocking(move || {
        let source = Arc::new(ImageSource::open(&src_path)?);
        let started = Instant::now();
        let image_bytes = source.len();
        size_w.store(image_bytes, Ordering::Relaxed);
        let progress = |bytes_done| {
            done_w.store(bytes_done, Ordering::Relaxed);
            hashing_obs.progress(&Progress::Hashing {
                image_bytes,
                bytes_done,
                elapsed_s: started.elapsed().as_secs_f64(),
            });
        };
        let signed = build_manifest(
            &source,
            session,
            BLOCK_SIZE,
            symbol,
            compression,
            &secret,
            &progress,
        )?;
        Ok::<_, CastError>((source, signed))
    });
    let (source, signed) = preparing(hashing, &sock, &group, session, &prep_size, &prep_done)
        .await
        .map_err(|source| CastError::Task {
            task: "manifest",
            source,
        })??;
    let manifest = signed.manifest().clone();
    let zero_blocks = manifest.blocks.iter().filter(|b| b.zero).count();
    info!(
        %session,
        bytes = manifest.image_size,
        blocks = manifest.block_count(),
        zero_blocks,
        "manifest signed"
    );

    // Adaptive: start at 800 Mbit/s and climb while the median receiver loses nothing (up to
    // 10 Gbit/s; the socket's send buffer paces a slower NIC before that).
    let (rate_bps, max_rate_bps, adaptive) = match opts.rate {
        Rate::Fixed(b) => (b, b, false),
        Rate::Adaptive => (800_000_000, 10_000_000_000, true),
    };
    let cfg = SenderConfig {
        rate_bps,
        max_rate_bps,
        adaptive,
        min_receivers: opts.min_receivers,
        expected_receivers: opts.expect.clone(),
        min_wait: opts.min_wait,
        max_wait: (!opts.max_wait.is_zero()).then_some(opts.max_wait),
        linger: opts.linger,
        tcp_port,
        // tokio timers fire with millisecond granularity, so the bucket must hold a few
        // milliseconds' worth of packets or the real rate falls short of the set rate.
        burst_bytes: u32::try_from((rate_bps / 8) * 4 / 1000)
            .unwrap_or(u32::MAX)
            .max(64 * 1024),
        ..SenderConfig::default()
    };
    let mut sender = Sender::new(cfg, signed.clone(), Instant::now())?;
    // The read-ahead thread starts only now: every return from here on stops it.
    let blocks = Blocks::start(source.clone(), signed);
    catchup.ready(blocks.clone());
    let public_key = hex::encode(key.verifying_key().to_bytes());
    obs.event(
        &event(
            session,
            "session-start",
            Outcome::Info,
            format!(
                "offering {} ({} bytes, {} blocks, {} all-zero) on {} (TCP catch-up port {}), key {}{}",
                opts.source.display(),
                manifest.image_size,
                manifest.block_count(),
                zero_blocks,
                match &stream {
                    catchup::Stream::Group(g) => g.to_string(),
                    catchup::Stream::Targets(t) => {
                        let to: Vec<String> = t.iter().map(ToString::to_string).collect();
                        format!("unicast to {}", to.join(", "))
                    }
                },
                tcp_port,
                &public_key[..16],
                if ephemeral_key { " (ephemeral)" } else { "" }
            ),
        )
        .with_details(serde_json::json!({
            "image_bytes": manifest.image_size,
            "blocks": manifest.block_count(),
            "group": opts.multicast.group_addr().to_string(),
            "unicast": opts.unicast.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "tcp_port": tcp_port,
            "public_key": public_key,
        })),
    );

    let mut src = SharedBlocks(blocks.clone());
    let mut out = Vec::with_capacity(65_536);
    // Room for more than one full GSO run (44 datagrams of 1472 bytes at MTU 1500).
    let mut batch = socket::SendBatch::new(128);
    // The other unicast targets' copies, one batch each: runs of datagrams to one address
    // keep their UDP GSO (interleaving the targets in one batch cost 13x the sender's CPU).
    let mut copies: Vec<(SocketAddrV4, socket::SendBatch)> = group[1..]
        .iter()
        .map(|&to| (to, socket::SendBatch::new(128)))
        .collect();
    let mut inbuf = vec![0u8; 65_536];
    let mut started_at: Option<Instant> = None;
    let mut receivers: Vec<ReceiverProgress> = Vec::new();
    let mut next_progress = tokio::time::Instant::now();
    let t0 = Instant::now();
    let summary: SessionSummary = 'run: loop {
        let now = Instant::now();
        sender.handle_timeout(now);
        // Send everything due now (the protocol paces; `None` means wait).
        let mut burst = 0;
        loop {
            let Some(buf) = batch.next_buf() else {
                flush(&mut batch, &sock).await;
                continue;
            };
            let Some(t) = sender.poll_transmit(now, &mut src, buf) else {
                break;
            };
            match t.dest {
                Dest::Group => {
                    batch.push(t.size, group[0]);
                    if !copies.is_empty() {
                        fan_out(&batch, &mut copies, &sock).await;
                    }
                }
                Dest::Unicast(SocketAddr::V4(d)) => batch.push(t.size, d),
                Dest::Unicast(dest) => debug!(%dest, "IPv6 peers are not supported; dropped"),
            }
            burst += 1;
            if burst >= BURST_DATAGRAMS {
                // Let the receive side run between long bursts.
                break;
            }
        }
        flush(&mut batch, &sock).await;
        for (_, b) in &mut copies {
            flush(b, &sock).await;
        }
        while let Some(ev) = sender.poll_event() {
            if let Some(summary) = on_event(&*obs, session, &ev, &mut receivers, &mut started_at) {
                break 'run summary;
            }
        }
        if tokio::time::Instant::now() >= next_progress {
            next_progress = tokio::time::Instant::now() + PROGRESS_INTERVAL;
            emit_progress(&*obs, &manifest, &batch, started_at, &receivers);
        }
        let wake = match wake_at(burst >= BURST_DATAGRAMS, sender.poll_timeout()) {
            Some(d) => tokio::time::Instant::from_std(d).min(next_progress),
            None if !cancel.is_cancelled() => {
                // More is due now: take in what the receivers sent, without waiting, and go
                // on sending.
                drain_reports(&sock, &mut inbuf, &mut sender);
                tokio::task::yield_now().await;
                continue;
            }
            None => tokio::time::Instant::now(),
        };
        tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                sender.abort(Instant::now(), "sender cancelled");
                // Let End go out and Finished come back.
                for _ in 0..100 {
                    let now = Instant::now();
                    sender.handle_timeout(now);
                    while let Some(t) = sender.poll_transmit(now, &mut src, &mut out) {
                        match t.dest {
                            Dest::Group => {
                                for &to in &group {
                                    let _ = sock.try_send_to(&out[..t.size], to.into());
                                }
                            }
                            Dest::Unicast(a) => {
                                let _ = sock.try_send_to(&out[..t.size], a);
                            }
                        }
                    }
                    while let Some(ev) = sender.poll_event() {
                        if let Some(s) = on_event(&*obs, session, &ev, &mut receivers, &mut started_at) {
                            break 'run s;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                blocks.stop();
                return Err(CastError::Cancelled);
            }
            r = sock.recv_from(&mut inbuf) => match r {
                Ok((n, from)) => {
                    sender.handle_input(Instant::now(), from, &inbuf[..n]);
                    drain_reports(&sock, &mut inbuf, &mut sender);
                }
                Err(e) => debug!(error = %e, "recv failed"),
            },
            _ = tokio::time::sleep_until(wake) => {}
        }
    };
    blocks.stop();
    let elapsed = started_at
        .map(|s| s.elapsed())
        .unwrap_or_else(|| t0.elapsed());
    let report = SendReport {
        session,
        image_bytes: manifest.image_size,
        blocks: u64::from(manifest.block_count()),
        elapsed_s: if summary.duration.is_zero() {
            elapsed.as_secs_f64()
        } else {
            summary.duration.as_secs_f64()
        },
        // Every copy to every unicast target counts.
        bytes_sent: batch.sent_bytes() + copies.iter().map(|(_, b)| b.sent_bytes()).sum::<u64>(),
        packets_sent: batch.sent_packets()
            + copies.iter().map(|(_, b)| b.sent_packets()).sum::<u64>(),
        source_packets: summary.stats.source_packets,
        repair_packets: summary.stats.repair_packets,
        moved_to_unicast: summary.stats.moved_to_unicast,
        gso: batch.gso(),
        public_key,
        ephemeral_key,
        receivers: summary
            .receivers
            .iter()
            .map(|r| {
                let (ok, reason) = match &r.outcome {
                    ProtoOutcome::Verified => (true, "verified".to_owned()),
                    ProtoOutcome::Failed { reason } => (false, reason.clone()),
                    ProtoOutcome::NeverJoined => (false, "expected but never joined".to_owned()),
                    ProtoOutcome::InProgress => (false, "still in progress at the end".to_owned()),
                };
                ReceiverOutcome {
                    name: r.name.clone(),
                    addr: r.addr,
                    ok,
                    reason,
                    blocks_done: u64::from(r.blocks_done),
                }
            })
            .collect(),
    };
    let failed = report.receivers.iter().filter(|r| !r.ok).count();
    obs.event(
        &event(
            session,
            "session-end",
            if failed == 0 && !report.receivers.is_empty() {
                Outcome::Ok
            } else {
                Outcome::Fail
            },
            match &summary.aborted {
                Some(why) => format!("aborted: {why}"),
                None => format!(
                    "{} of {} receivers verified the image in {:.1} s",
                    report.receivers.len() - failed,
                    report.receivers.len(),
                    report.elapsed_s
                ),
            },
        )
        .with_details(serde_json::to_value(&report).unwrap_or_default()),
    );
    Ok(report)
}

/// Most datagrams the driver hands to the socket before it looks at what receivers sent.
const BURST_DATAGRAMS: usize = 256;

/// When the driver should next wake, `None` for "go on at once": after a burst cut short at
/// [`BURST_DATAGRAMS`] (`more_due`) more is due now, and waiting on a timer for it, even a
/// zero-length one, costs up to a millisecond: tokio rounds timers up to its next
/// millisecond tick. (Sleeping until "now" after every burst of 256 datagrams capped the
/// sender at 2.1-2.5 Gbit/s with idle CPUs, and lower with busy ones.) Otherwise the
/// protocol's deadline, or a second from now when it has none.
fn wake_at(more_due: bool, deadline: Option<Instant>) -> Option<Instant> {
    if more_due {
        return None;
    }
    Some(deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(1)))
}

/// How often the sender reports progress.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);

/// Feeds the protocol what receivers sent that is already queued on `sock` (at most
/// [`BURST_DATAGRAMS`] datagrams), without waiting.
fn drain_reports(sock: &tokio::net::UdpSocket, inbuf: &mut [u8], sender: &mut Sender) {
    let now = Instant::now();
    for _ in 0..BURST_DATAGRAMS {
        match sock.try_recv_from(inbuf) {
            Ok((n, from)) => sender.handle_input(now, from, &inbuf[..n]),
            Err(_) => break,
        }
    }
}

fn emit_progress(
    obs: &dyn crate::Observer,
    manifest: &corral_cast_proto::Manifest,
    batch: &socket::SendBatch,
    started_at: Option<Instant>,
    receivers: &[ReceiverProgress],
) {
    let elapsed = started_at.map(|s| s.elapsed()).unwrap_or_default();
    obs.progress(&Progress::Sender {
        blocks_total: u64::from(manifest.block_count()),
        image_bytes: manifest.image_size,
        bytes_sent: batch.sent_bytes(),
        elapsed_s: elapsed.as_secs_f64(),
        receivers: receivers.to_vec(),
    });
}

/// Queues a copy of the datagram `batch` queued last in each of `copies` (the unicast targets
/// after the first, each with its own batch), sending a copy batch when it is full.
async fn fan_out(
    batch: &socket::SendBatch,
    copies: &mut [(SocketAddrV4, socket::SendBatch)],
    sock: &tokio::net::UdpSocket,
) {
    let Some(last) = batch.last() else { return };
    for (to, b) in copies {
        if b.is_full() {
            flush(b, sock).await;
        }
        if let Some(buf) = b.next_buf() {
            buf.clear();
            buf.extend_from_slice(last);
            b.push(last.len(), *to);
        }
    }
}

/// Sends everything queued in `batch`, waiting for the socket when its buffer is full.
async fn flush(batch: &mut socket::SendBatch, sock: &tokio::net::UdpSocket) {
    while !batch.is_empty() {
        match batch.send(sock) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let _ = sock.writable().await;
            }
            Err(e) => {
                // One bad destination must not wedge the queue: drop the batch (the protocol
                // repairs what receivers miss).
                debug!(error = %e, "sendmmsg failed; batch dropped");
                batch.clear();
            }
        }
    }
}

/// Turns a protocol event into audit events and progress; returns the summary when finished.
fn on_event(
    obs: &dyn crate::Observer,
    session: SessionId,
    ev: &SenderEvent,
    receivers: &mut Vec<ReceiverProgress>,
    started_at: &mut Option<Instant>,
) -> Option<SessionSummary> {
    match ev {
        SenderEvent::ReceiverJoined { id, name, addr } => {
            info!(%addr, name, "receiver joined");
            receivers.retain(|r| r.name != *name || r.addr != *addr);
            receivers.push(ReceiverProgress {
                name: name.clone(),
                addr: *addr,
                blocks_done: 0,
            });
            obs.event(
                &event(
                    session,
                    "receiver-joined",
                    Outcome::Info,
                    format!("receiver {name} joined from {addr}"),
                )
                .with_ip(addr.ip())
                .with_hostname(name.clone())
                .with_details(serde_json::json!({ "receiver_id": id })),
            );
        }
        SenderEvent::ReceiverProgress { name, status, .. } => {
            if let Some(r) = receivers.iter_mut().find(|r| r.name == *name) {
                r.blocks_done = u64::from(status.blocks_done);
            }
        }
        SenderEvent::ReceiverDone {
            name, ok, reason, ..
        } => {
            let addr = receivers.iter().find(|r| r.name == *name).map(|r| r.addr);
            let mut e = event(
                session,
                "receiver-done",
                if *ok { Outcome::Ok } else { Outcome::Fail },
                format!(
                    "receiver {name} {}: {reason}",
                    if *ok { "verified the image" } else { "failed" }
                ),
            )
            .with_hostname(name.clone());
            if let Some(a) = addr {
                e = e.with_ip(a.ip());
            }
            obs.event(&e);
        }
        SenderEvent::ReceiverFailed { name, reason, .. } => {
            warn!(name, reason, "receiver failed");
            obs.event(
                &event(
                    session,
                    "receiver-failed",
                    Outcome::Fail,
                    format!("receiver {name} failed: {reason}"),
                )
                .with_hostname(name.clone()),
            );
        }
        SenderEvent::ReceiverToUnicast { name, reason, .. } => {
            info!(name, reason, "receiver moved to TCP catch-up");
            obs.event(
                &event(
                    session,
                    "receiver-unicast",
                    Outcome::Warn,
                    format!("receiver {name} moved to TCP catch-up: {reason}"),
                )
                .with_hostname(name.clone()),
            );
        }
        SenderEvent::Started {
            receivers: n,
            reason,
        } => {
            *started_at = Some(Instant::now());
            obs.event(&event(
                session,
                PASS_START,
                Outcome::Info,
                format!("data pass started with {n} receivers ({reason:?})"),
            ));
        }
        SenderEvent::RateChanged {
            rate_bps,
            median_loss,
        } => {
            debug!(rate_bps, median_loss, "rate changed");
        }
        SenderEvent::PassComplete => {
            debug!("pass complete");
        }
        SenderEvent::Aborted { block, error } => {
            obs.event(&event(
                session,
                "aborted",
                Outcome::Fail,
                format!("cannot read block {block}: {error}"),
            ));
        }
        SenderEvent::Finished(summary) => return Some(summary.clone()),
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_cut_short_goes_on_without_a_timer() {
        let soon = Instant::now() + Duration::from_micros(5);
        assert_eq!(wake_at(true, Some(soon)), None);
        assert_eq!(wake_at(true, None), None);
        // Otherwise the protocol's deadline, or a second when it has none.
        assert_eq!(wake_at(false, Some(soon)), Some(soon));
        let idle = wake_at(false, None).expect("a deadline");
        assert!(idle > Instant::now() + Duration::from_millis(900));
    }
}
