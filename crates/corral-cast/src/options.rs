//! What callers pass to [`crate::send`] and [`crate::receive`], and what they get back.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corral_model::SessionId;
use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::observe::Observer;
use crate::output::OutputSpec;
use crate::socket::MulticastConfig;

/// How fast the sender sends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// A fixed rate in bits per second on the wire.
    Fixed(u64),
    /// Start high and back off when receivers report loss.
    Adaptive,
}

impl std::str::FromStr for Rate {
    type Err = String;
    /// `adaptive`, or a number of bits per second with an optional `K`, `M` or `G` suffix
    /// (powers of 1000; a trailing `bit`/`bps` is ignored): `800M`, `1.5G`, `100mbit`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        if t == "adaptive" {
            return Ok(Rate::Adaptive);
        }
        let t = t
            .trim_end_matches("bps")
            .trim_end_matches("bit")
            .trim_end_matches("/s");
        let (num, mult) = match t.chars().last() {
            Some('k') => (&t[..t.len() - 1], 1e3),
            Some('m') => (&t[..t.len() - 1], 1e6),
            Some('g') => (&t[..t.len() - 1], 1e9),
            _ => (t, 1.0),
        };
        let v: f64 = num
            .parse()
            .map_err(|_| format!("invalid rate {s:?}: expected e.g. 800M, 1G or adaptive"))?;
        let bits = v * mult;
        if !(1e5..=1e12).contains(&bits) {
            return Err(format!("rate {s:?} out of range (100K to 1000G)"));
        }
        Ok(Rate::Fixed(bits as u64))
    }
}

/// Everything [`crate::send`] needs.
#[derive(Clone)]
pub struct SendOptions {
    /// The image: a file, a block device, or `-` for stdin (spooled first).
    pub source: PathBuf,
    /// Group, port, interface, TTL, buffers.
    pub multicast: MulticastConfig,
    /// Unicast targets: when not empty, everything meant for the group goes to each of these
    /// addresses instead (receivers started with `unicast`), for networks where multicast
    /// does not work. Each datagram is sent once per target.
    pub unicast: Vec<std::net::SocketAddrV4>,
    /// TCP port of the catch-up server (0: same number as the UDP port).
    pub catchup_port: u16,
    /// The catch-up server's listener, bound already (`cast serve` binds it when it opens a
    /// session, to tell receivers its real port); `None`: the session binds `catchup_port`.
    pub catchup_listener: Option<CatchupListener>,
    /// Sending rate.
    pub rate: Rate,
    /// Largest UDP payload per datagram (from `--mtu` minus 28, or `--packet-size`).
    pub packet_size: usize,
    /// Start once this many receivers have joined (after `min_wait`).
    pub min_receivers: usize,
    /// Receivers (by `--name`) that must all join before the start and all succeed.
    pub expect: Vec<String>,
    /// Wait at least this long for receivers before starting.
    pub min_wait: Duration,
    /// Start after this long even if not everyone has joined.
    pub max_wait: Duration,
    /// zstd level per block (0: store uncompressed).
    pub compress_level: i32,
    /// The signing key (`None`: an ephemeral key, reported in [`SendReport::public_key`]).
    pub key: Option<SigningKey>,
    /// Give up on receivers still missing blocks this long after the last useful progress.
    pub linger: Duration,
    /// Where events and progress go.
    pub observer: Arc<dyn Observer>,
}

impl std::fmt::Debug for SendOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendOptions")
            .field("source", &self.source)
            .field("multicast", &self.multicast)
            .field("unicast", &self.unicast)
            .field("rate", &self.rate)
            .field("packet_size", &self.packet_size)
            .field("min_receivers", &self.min_receivers)
            .field("expect", &self.expect)
            .finish_non_exhaustive()
    }
}

/// A catch-up listener bound before its session starts: its port is known (and can be
/// announced) from the start. The session takes it; a clone shares it.
#[derive(Debug, Clone)]
pub struct CatchupListener {
    listener: Arc<Mutex<Option<std::net::TcpListener>>>,
    port: u16,
}

impl CatchupListener {
    /// Binds `ip:port`, or an ephemeral port of `ip` when that one is taken (another sender
    /// on this host): the port that was bound is [`CatchupListener::port`], which is what
    /// receivers must be told.
    pub fn bind(ip: Ipv4Addr, port: u16) -> Result<Self, crate::CastError> {
        let listener = bind_catchup(ip, port)?;
        let port = listener
            .local_addr()
            .map_err(|source| crate::CastError::Socket {
                what: "catch-up listener address",
                source,
            })?
            .port();
        Ok(CatchupListener {
            listener: Arc::new(Mutex::new(Some(listener))),
            port,
        })
    }

    /// The TCP port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The listener, for the session that serves on it (`None` once taken).
    pub(crate) fn take(&self) -> Option<std::net::TcpListener> {
        self.listener
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// Binds a non-blocking catch-up listener on `ip:port`, or on an ephemeral port of `ip` when
/// `port` is taken.
pub(crate) fn bind_catchup(
    ip: Ipv4Addr,
    port: u16,
) -> Result<std::net::TcpListener, crate::CastError> {
    let bind = |port| {
        std::net::TcpListener::bind(SocketAddrV4::new(ip, port))
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
    };
    let fail = |source| crate::CastError::Socket {
        what: "bind catch-up listener",
        source,
    };
    match bind(port) {
        Ok(l) => Ok(l),
        Err(e) if port != 0 => {
            tracing::warn!(addr = %SocketAddrV4::new(ip, port), error = %e,
                "catch-up port busy; using an ephemeral port");
            bind(0).map_err(fail)
        }
        Err(e) => Err(fail(e)),
    }
}

/// How one receiver ended, as the sender saw it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReceiverOutcome {
    /// The receiver's `--name` (or address when it gave none).
    pub name: String,
    /// Where its reports came from (`None` for an expected receiver never heard from).
    pub addr: Option<SocketAddr>,
    /// Whether it reported the whole image verified.
    pub ok: bool,
    /// Why it failed, or "verified".
    pub reason: String,
    /// Blocks it had when last heard from.
    pub blocks_done: u64,
}

/// What [`crate::send`] reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SendReport {
    /// The session.
    pub session: SessionId,
    /// Image size in bytes.
    pub image_bytes: u64,
    /// Blocks in the image.
    pub blocks: u64,
    /// Seconds from the first data packet to the end.
    pub elapsed_s: f64,
    /// Bytes put on the wire (all datagrams).
    pub bytes_sent: u64,
    /// Datagrams sent (data, repair and control; each segment of a GSO send counts).
    pub packets_sent: u64,
    /// Source symbols of the in-order pass (multicast data packets).
    pub source_packets: u64,
    /// Repair symbols multicast (parity or repeated source).
    pub repair_packets: u64,
    /// Receivers moved to TCP catch-up because they were far behind the stream.
    pub moved_to_unicast: u64,
    /// Whether UDP GSO was still in use at the end (off: the kernel refused it).
    pub gso: bool,
    /// Hex of the public key that signed the manifest.
    pub public_key: String,
    /// Whether that key was made up for this session.
    pub ephemeral_key: bool,
    /// Every receiver heard from, and every expected one.
    pub receivers: Vec<ReceiverOutcome>,
}

impl SendReport {
    /// True when no receiver failed and every expected receiver succeeded.
    pub fn all_ok(&self) -> bool {
        self.receivers.iter().all(|r| r.ok)
    }
}

/// Everything [`crate::receive`] needs.
#[derive(Clone)]
pub struct ReceiveOptions {
    /// Where the image goes.
    pub output: OutputSpec,
    /// Group, port, interface, buffers.
    pub multicast: MulticastConfig,
    /// Listen for the stream by unicast on the group's port (a sender with unicast targets)
    /// instead of joining the group.
    pub unicast: bool,
    /// The sender's catch-up TCP address, when known up front (`--sender`); otherwise learnt
    /// from its announcements.
    pub sender: Option<SocketAddr>,
    /// Only accept manifests signed by this key (`None`: trust the first signed manifest).
    pub trusted_key: Option<VerifyingKey>,
    /// Resume state file.
    pub state: Option<PathBuf>,
    /// The name this receiver reports to the sender.
    pub name: String,
    /// Fall back to TCP when no multicast data arrived this long after joining.
    pub silent_after: Duration,
    /// Give up when nothing at all was heard for this long.
    pub idle_timeout: Duration,
    /// Where events and progress go.
    pub observer: Arc<dyn Observer>,
}

impl std::fmt::Debug for ReceiveOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiveOptions")
            .field("output", &self.output)
            .field("multicast", &self.multicast)
            .field("unicast", &self.unicast)
            .field("sender", &self.sender)
            .field("state", &self.state)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// What [`crate::receive`] reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReceiveReport {
    /// The session.
    pub session: SessionId,
    /// Image size in bytes.
    pub image_bytes: u64,
    /// Blocks in the image.
    pub blocks: u64,
    /// Blocks received from the UDP stream: by multicast, or by unicast from a sender with
    /// unicast targets.
    pub blocks_multicast: u64,
    /// Blocks fetched over TCP catch-up.
    pub blocks_tcp: u64,
    /// Blocks found already on disk (resume) and re-verified.
    pub blocks_resumed: u64,
    /// Seconds from start to verified.
    pub elapsed_s: f64,
    /// Where the image ended up.
    pub output: String,
}
