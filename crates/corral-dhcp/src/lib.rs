//! corral's DHCP and ProxyDHCP server: a thin tokio driver over [`corral_dhcp_proto`].
//!
//! [`serve`] binds UDP port 67 and the PXE port 4011 on **one** interface
//! (`SO_BINDTODEVICE`: it never sees nor answers traffic of any other), feeds every datagram
//! to the sans-IO [`corral_dhcp_proto::Server`], asks the netboot layer's [`BootPolicy`] what
//! boot clients get, persists leases durably in the store (schema 2, `dhcp_leases`) before
//! the ACK that grants them leaves, and sends replies by broadcast or unicast as RFC 2131 §4.1
//! says (broadcast to clients that have no address yet: it never adds ARP entries).
//!
//! Persistence goes through a lease journal beside the store (`<store>-leasejournal`): writer
//! threads append all waiting lease changes as one checksummed record, written in place with
//! `O_DSYNC` into a preallocated file (several writes may overlap), and the ACKs of a batch go
//! out only after that write returned, sent by that writer thread itself; an applier thread
//! (at a lower priority) brings the store's `dhcp_leases`
//! table up to date behind it (fsync and checkpoint off every ACK's path). On start the
//! journal is replayed into the store, then leases are reloaded; expired ones are reclaimed
//! every second. OFFERs and other replies that change no
//! lease are sent at once, never behind a commit.
//!
//! The site is re-read on every packet from the [`corral_site::SiteHandle`] (an atomic
//! pointer load): a reload of networks or `machines/` takes effect at once, leases are kept.
//!
//! It is *not*: a DHCP relay, a DHCPv6 server, a DNS updater, or a place for boot decisions
//! (those live in `corral-netboot`, behind [`BootPolicy`]).
//!
//! # Entry points
//! - [`serve`] with a [`DhcpConfig`] and an `Arc<dyn BootPolicy>`; stops on its
//!   `CancellationToken`.
//! - [`server_config`]: the site's `[[dhcp.network]]` and `machines/` as a
//!   [`corral_dhcp_proto::ServerConfig`] (used by `serve`, public for tests and tools).
//! - [`metrics::prometheus_text`]: every running service's timings and counters (where an
//!   answer's time goes, stage by stage) for a `/metrics` endpoint; the table of metrics is in
//!   [`metrics`].

mod error;
mod journal;
mod latency;
pub mod metrics;
mod persist;
mod socket;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use corral_dhcp_proto::{Datagram, Port, Reply, Reservation, Server, ServerConfig, Step};
use corral_model::UnixMillis;
use corral_site::{Site, SiteHandle};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

pub use corral_dhcp_proto::{
    Arch, Boot, BootAnswer, BootQuery, ClientInfo, DhcpEvent, DhcpEventKind, Firmware, Mode,
};
pub use error::DhcpError;
pub use persist::MAX_BATCH;

/// How the service runs.
#[derive(Debug, Clone)]
pub struct DhcpConfig {
    /// Full server or ProxyDHCP ("off" means: do not call [`serve`]).
    pub mode: Mode,
    /// The one interface served (`SO_BINDTODEVICE`); never any other.
    pub interface: String,
    /// Our address on that interface: server identifier (option 54) and siaddr.
    pub server_ip: Ipv4Addr,
    /// Networks, pools, lease times and reservations (machines' MAC, IP, hostname).
    pub site: SiteHandle,
    /// The lease database (the corral store, schema version 2); `None`: leases in memory only.
    pub store: Option<PathBuf>,
    /// The DHCP server port, 67 (tests may use others). The PXE port 4011 is also served
    /// (required in proxy mode, best effort in full mode).
    pub port: u16,
}

/// The netboot layer's side: boot decisions and the record of what happened.
pub trait BootPolicy: Send + Sync + 'static {
    /// What a PXE/HTTP/iPXE client boots. Called on the packet path: keep it quick (no disk
    /// writes; hand those to a background writer such as `corral_store::Recorder`).
    fn decide(&self, query: &BootQuery) -> BootAnswer;

    /// Every offer, ack, nak, release, decline, inform, proxy answer, drop and expiry.
    fn on_event(&self, event: DhcpEvent);
}

/// The site's DHCP configuration as the state machine's data.
pub fn server_config(
    site: &Site,
    mode: Mode,
    server_ip: Ipv4Addr,
    interface: &str,
    port: u16,
) -> ServerConfig {
    let mut c = ServerConfig::new(mode, server_ip, interface);
    c.server_port = port;
    c.networks = site
        .dhcp
        .networks
        .iter()
        .map(|n| corral_dhcp_proto::Network {
            name: n.name.clone(),
            cidr: n.cidr,
            pool: n.pool.map(|p| (p.start, p.end)),
            gateway: n.gateway,
            dns: n.dns.clone(),
            domain: n.domain.as_ref().map(|d| d.as_str().to_owned()),
            lease: n.lease,
        })
        .collect();
    c.reservations = site
        .machines()
        .flat_map(|m| {
            m.macs.iter().map(|mac| Reservation {
                mac: *mac,
                ip: m.ip,
                hostname: Some(m.hostname.as_str().to_owned()),
            })
        })
        .collect();
    c
}

fn now() -> UnixMillis {
    UnixMillis::from_system_time(SystemTime::now())
}

/// Runs the DHCP service until `cancel` fires (or this future is dropped).
///
/// The packets are read, decided and answered on a thread of the service's own (a
/// single-threaded runtime), not on the caller's runtime: a request never waits behind other
/// tasks, and where the process may raise priorities (root or `CAP_SYS_NICE`, as a server
/// on port 67 usually runs) that thread and the lease journal's writers run at nice
/// [`PACKET_NICE`], ahead of the store's background work (nice 10) and of other programs on
/// the machine (bench/dhcp run 13: under load most of an answer's time was requests waiting
/// in the socket for the packet loop to get a CPU).
///
/// Fails at start when a socket cannot be bound (missing interface, port in use, no
/// privilege) or the lease store cannot be opened; afterwards only on a receive error.
pub async fn serve(
    config: DhcpConfig,
    policy: Arc<dyn BootPolicy>,
    cancel: CancellationToken,
) -> Result<(), DhcpError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    // Dropping this future stops the service too.
    let stop = cancel.clone().drop_guard();
    std::thread::Builder::new()
        .name("dhcp-packets".into())
        .spawn(move || {
            if !persist::set_thread_nice(PACKET_NICE) {
                tracing::debug!("the DHCP packet loop stays at the default priority");
            }
            let r = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(DhcpError::PacketThread)
                .and_then(|rt| rt.block_on(run(config, policy, cancel)));
            let _ = tx.send(r);
        })
        .map_err(DhcpError::PacketThread)?;
    let r = rx.await.unwrap_or_else(|_| {
        Err(DhcpError::PacketThread(std::io::Error::other(
            "the DHCP packet thread stopped unexpectedly",
        )))
    });
    stop.disarm();
    r
}

/// The nice value of the packet loop's thread and the journal writers, where the process may
/// raise priorities: they are what an answer waits for, mostly blocked, and little CPU.
pub const PACKET_NICE: i32 = -5;

/// The service itself, on its own thread (see [`serve`]).
async fn run(
    config: DhcpConfig,
    policy: Arc<dyn BootPolicy>,
    cancel: CancellationToken,
) -> Result<(), DhcpError> {
    let sock = Arc::new(socket::bind(&config.interface, config.port)?);
    // Port 4011: required in proxy mode; in full mode it answers firmware that re-asks there
    // (EDK2 does for offers it classifies as "BINL"), so a failure to bind it is only a warning.
    let pxe = match (
        config.mode,
        socket::bind(&config.interface, corral_dhcp_proto::PXE_PORT),
    ) {
        (_, Ok(s)) => Some(Arc::new(s)),
        (Mode::Proxy, Err(e)) => return Err(e),
        (Mode::Full, Err(e)) => {
            tracing::warn!(error = %e, "not answering PXE requests on port 4011");
            None
        }
    };
    let mut site = config.site.current();
    let mut server = Server::new(server_config(
        &site,
        config.mode,
        config.server_ip,
        &config.interface,
        config.port,
    ));
    let metrics = metrics::register(&config.interface);
    // The lease writer's threads send ACKs themselves, through duplicates of the sockets
    // (the same open files: non-blocking, bound to the interface, broadcast allowed).
    let dup = |s: &UdpSocket| socket2::SockRef::from(s).try_clone().ok().map(Arc::new);
    let direct = dup(&sock);
    let pxe_direct = pxe.as_deref().and_then(dup);
    let writer = match &config.store {
        Some(path) => {
            let (w, leases) = persist::LeaseWriter::open(path, metrics.clone())?;
            tracing::info!(path = %path.display(), leases = leases.len(), "DHCP leases loaded");
            server.load_leases(leases);
            Some(w)
        }
        None => None,
    };
    tracing::info!(
        interface = %config.interface,
        server_ip = %config.server_ip,
        port = config.port,
        mode = ?config.mode,
        "DHCP service started"
    );
    let mut buf = vec![0u8; 65536];
    let mut buf2 = vec![0u8; 65536];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (port, n, src) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = sock.recv_from(&mut buf) => match r {
                Ok((n, src)) => (Port::Dhcp, n, src),
                Err(e) if transient(&e) => continue,
                Err(source) => return Err(DhcpError::Receive { interface: config.interface.clone(), source }),
            },
            r = recv_opt(pxe.as_deref(), &mut buf2) => match r {
                Ok((n, src)) => (Port::Pxe, n, src),
                Err(e) if transient(&e) => continue,
                Err(source) => return Err(DhcpError::Receive { interface: config.interface.clone(), source }),
            },
            _ = tick.tick() => {
                let t = now();
                let (changes, events) = server.expire(t);
                if !changes.is_empty() && let Some(w) = &writer {
                    w.submit(&changes, t, None);
                }
                for e in events {
                    policy.on_event(e);
                }
                continue;
            }
        };
        let received_at = Instant::now();
        metrics.received.fetch_add(1, Ordering::Relaxed);
        let SocketAddr::V4(src) = src else { continue };
        // Hot reload: the handle's current site is one atomic load.
        let current = config.site.current();
        if !Arc::ptr_eq(&current, &site) {
            site = current;
            server.set_config(server_config(
                &site,
                config.mode,
                config.server_ip,
                &config.interface,
                config.port,
            ));
            tracing::info!("DHCP configuration reloaded from the site");
        }
        let data = if port == Port::Dhcp {
            &buf[..n]
        } else {
            &buf2[..n]
        };
        let t = now();
        let step = server.handle(t, Datagram { data, src, port }, &mut |q: &BootQuery| {
            policy.decide(q)
        });
        let out = Out {
            sock: &sock,
            pxe: pxe.as_ref(),
            direct: direct.as_ref(),
            pxe_direct: pxe_direct.as_ref(),
            metrics: &metrics,
            received_at,
        };
        dispatch(step, t, out, writer.as_ref(), &policy);
    }
    // Dropping the writer drains its queue and joins the thread; do it off the runtime.
    if let Some(w) = writer {
        let _ = tokio::task::spawn_blocking(move || drop(w)).await;
    }
    metrics.log();
    tracing::info!(interface = %config.interface, "DHCP service stopped");
    Ok(())
}

async fn recv_opt(s: Option<&UdpSocket>, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    match s {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// Errors a UDP receive can return for an earlier send (ICMP unreachable) and the like.
fn transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused
            | ConnectionReset
            | WouldBlock
            | Interrupted
            | HostUnreachable
            | NetworkUnreachable
    )
}

/// Where replies go, and where their timing is recorded.
struct Out<'a> {
    sock: &'a Arc<UdpSocket>,
    pxe: Option<&'a Arc<UdpSocket>>,
    /// Duplicates of `sock` and `pxe` for the lease writer's threads (see
    /// [`persist::DirectReply`]); `None` where the duplicate could not be made.
    direct: Option<&'a Arc<socket2::Socket>>,
    pxe_direct: Option<&'a Arc<socket2::Socket>>,
    metrics: &'a Arc<metrics::DhcpMetrics>,
    received_at: Instant,
}

fn dispatch(
    step: Step,
    t: UnixMillis,
    o: Out<'_>,
    writer: Option<&persist::LeaseWriter>,
    policy: &Arc<dyn BootPolicy>,
) {
    let out = match step.reply.as_ref().map(|r| r.via) {
        Some(Port::Pxe) => o.pxe.unwrap_or(o.sock).clone(),
        _ => o.sock.clone(),
    };
    let (m, received_at) = (o.metrics.clone(), o.received_at);
    match (writer, step.persist.is_empty()) {
        (Some(w), false) => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let direct = step.reply.as_ref().and_then(|r| {
                let sock = match r.via {
                    Port::Pxe => o.pxe_direct,
                    Port::Dhcp => o.direct,
                }?;
                Some(persist::DirectReply {
                    sock: sock.clone(),
                    bytes: r.bytes.clone(),
                    dest: r.dest,
                })
            });
            w.submit_with_reply(&step.persist, t, Some(tx), direct);
            let policy = policy.clone();
            tokio::spawn(async move {
                match rx.await {
                    Ok(Ok(stamps)) => {
                        match &step.reply {
                            Some(r) => {
                                let (started, sent) = match stamps.sent {
                                    // The writer thread sent it the moment it was durable.
                                    Some(s) => s,
                                    None => {
                                        let started = Instant::now();
                                        send(&out, r).await;
                                        (started, Instant::now())
                                    }
                                };
                                m.record_ack(received_at, &stamps, started, sent);
                            }
                            None => {
                                m.no_reply.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        for e in step.events {
                            policy.on_event(e);
                        }
                    }
                    failed => {
                        let why = match failed {
                            Ok(Err(msg)) => msg,
                            _ => "lease writer stopped".into(),
                        };
                        m.unstored.fetch_add(1, Ordering::Relaxed);
                        // No durable lease, no ACK: the client retries, and nobody is told
                        // an address we could lose on a crash.
                        for mut e in step.events {
                            e.kind = DhcpEventKind::Dropped;
                            e.reason = format!(
                                "not answered: the lease could not be stored ({why}); was: {}",
                                e.reason
                            );
                            policy.on_event(e);
                        }
                    }
                }
            });
        }
        _ => {
            match step.reply {
                Some(r) => {
                    // The socket is non-blocking with a large send buffer: try inline first.
                    match out.try_send_to(&r.bytes, r.dest.into()) {
                        Ok(_) => m.immediate.record(received_at.elapsed()),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            tokio::spawn(async move {
                                send(&out, &r).await;
                                m.immediate.record(received_at.elapsed());
                            });
                        }
                        Err(e) => {
                            tracing::warn!(dest = %r.dest, error = %e, "sending DHCP reply failed")
                        }
                    }
                }
                None => {
                    m.no_reply.fetch_add(1, Ordering::Relaxed);
                }
            }
            for e in step.events {
                policy.on_event(e);
            }
        }
    }
}

async fn send(sock: &UdpSocket, r: &Reply) {
    let dest: SocketAddrV4 = r.dest;
    if let Err(e) = sock.send_to(&r.bytes, dest).await {
        tracing::warn!(%dest, error = %e, "sending DHCP reply failed");
    }
}
