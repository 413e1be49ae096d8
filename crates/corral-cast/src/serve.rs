//! Daemon mode: offer the images of a directory; receivers ask for one by name and are told
//! which multicast session to join.
//!
//! The exchange is one request line and one answer line of JSON over TCP (the control port,
//! 9100 by default): `{"op":"list"}` answers the images on offer; `{"op":"request",
//! "image":"NAME","name":"RECEIVER"}` answers the group, port and catch-up address of the
//! session for that image. A session for an image gathers receivers until its start condition
//! holds (min receivers after min wait, or max wait), then runs like `corral cast send`; a
//! request that comes after the data pass began opens a new session. Sessions of different
//! images (or successive sessions of one) run at once, each on its own group and port, taken
//! from a fixed pool of slots.
//!
//! Requests are untrusted: a line is at most [`MAX_LINE`] bytes, a connection gets
//! [`REQUEST_TIMEOUT`] to send it, and an image name must be a plain file name of a regular
//! file directly in the served directory (no `/`, no `..`, no hidden files, no symlink that
//! leads out of the directory).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corral_model::{Event, Outcome, Source, UnixMillis};
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::{CastError, io_at};
use crate::observe::{Observer, Progress};
use crate::options::{Rate, SendOptions};
use crate::socket::MulticastConfig;

/// The default control port.
pub const DEFAULT_CONTROL_PORT: u16 = 9100;
/// Longest request or answer line, in bytes.
pub const MAX_LINE: usize = 4096;
/// How long a client has to send its request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a control connection may last in all (a client that does not read its answer).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);
/// Control connections served at once; the next accept waits for one to end.
pub const MAX_CLIENTS: usize = 256;

/// A request from a receiver (or `corral cast list`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// Which images are on offer?
    List,
    /// Put me in a session for `image`.
    Request {
        /// The image's file name in the served directory.
        image: String,
        /// The receiver's name (as `cast receive --name`).
        name: String,
    },
}

/// One image on offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// File name.
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// Where to receive a requested image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// The image's name.
    pub image: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// The session's multicast group.
    pub group: Ipv4Addr,
    /// The session's UDP port.
    pub port: u16,
    /// The sender's catch-up address (its TCP port is the UDP port's number unless that was
    /// taken on the server's host).
    pub sender: SocketAddr,
    /// Hex of the public key that signs the session's manifest. Informational: a receiver
    /// should pin the key it was given out of band (`--trusted-key`).
    pub public_key: String,
}

/// The server's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Answer {
    /// The images on offer.
    Images {
        /// Sorted by name.
        images: Vec<ImageInfo>,
    },
    /// Join this session.
    Offer(Offer),
    /// The request was refused.
    Error {
        /// Why, in words a person can act on.
        reason: String,
    },
}

/// Everything [`serve`] needs.
#[derive(Clone)]
pub struct ServeOptions {
    /// The directory whose regular files are offered.
    pub dir: PathBuf,
    /// Where the control port listens.
    pub control: SocketAddr,
    /// First group and port of the slot pool; slot `i` uses group + i and port + i.
    pub multicast: MulticastConfig,
    /// How many sessions may run at once (the pool size).
    pub max_sessions: u16,
    /// Sending rate of each session.
    pub rate: Rate,
    /// UDP payload size per datagram.
    pub packet_size: usize,
    /// Start a session once this many receivers joined (after `min_wait`).
    pub min_receivers: usize,
    /// Wait at least this long for more receivers after a session opens.
    pub min_wait: Duration,
    /// Start after this long even with fewer receivers.
    pub max_wait: Duration,
    /// zstd level per block.
    pub compress_level: i32,
    /// The signing key for every session (`None`: one ephemeral key for this server's life).
    pub key: Option<SigningKey>,
    /// How long a session waits for receivers without progress after its pass.
    pub linger: Duration,
    /// Where events and progress go.
    pub observer: Arc<dyn Observer>,
}

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("dir", &self.dir)
            .field("control", &self.control)
            .field("multicast", &self.multicast)
            .field("max_sessions", &self.max_sessions)
            .finish_non_exhaustive()
    }
}

/// A session that is gathering receivers or running.
#[derive(Debug)]
struct Slot {
    image: String,
    bytes: u64,
    /// The TCP port its catch-up server listens on.
    catchup_port: u16,
    /// Set when the session's data pass began: later requests open a new session.
    started: Arc<AtomicBool>,
}

#[derive(Debug)]
struct Shared {
    opts: ServeOptions,
    key: SigningKey,
    /// Canonical form of `opts.dir`, to confine image names.
    root: PathBuf,
    slots: Mutex<Vec<Option<Slot>>>,
}

/// Runs the image server until `cancel` fires; running sessions are cancelled with it.
pub async fn serve(opts: ServeOptions, cancel: CancellationToken) -> Result<(), CastError> {
    serve_limited(opts, cancel, MAX_CLIENTS).await
}

/// [`serve`] with at most `max_clients` control connections at once.
async fn serve_limited(
    opts: ServeOptions,
    cancel: CancellationToken,
    max_clients: usize,
) -> Result<(), CastError> {
    let root = fs_err::canonicalize(&opts.dir).map_err(io_at(&opts.dir))?;
    let listener = TcpListener::bind(opts.control)
        .await
        .map_err(|source| CastError::Socket {
            what: "bind control port",
            source,
        })?;
    let key = match &opts.key {
        Some(k) => k.clone(),
        None => {
            warn!("no signing key given: sessions use an ephemeral key; receivers cannot pin it");
            crate::keys::generate()?
        }
    };
    let shared = Arc::new(Shared {
        slots: Mutex::new((0..opts.max_sessions.max(1)).map(|_| None).collect()),
        key,
        root,
        opts,
    });
    let images = list_images(&shared.root).unwrap_or_default();
    let bound = listener.local_addr().ok();
    info!(dir = %shared.opts.dir.display(), control = ?bound, images = images.len(), "cast server ready");
    shared.opts.observer.event(&server_event(
        "serve-start",
        Outcome::Info,
        format!(
            "serving {} image(s) from {} on control port {}",
            images.len(),
            shared.opts.dir.display(),
            bound.map_or_else(|| shared.opts.control.to_string(), |a| a.to_string())
        ),
    ));
    let slots = Arc::new(tokio::sync::Semaphore::new(max_clients.max(1)));
    loop {
        let slot = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => return Ok(()),
            },
        };
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors, say: not a reason to spin.
                    warn!(error = %e, "control port accept failed; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(CLIENT_TIMEOUT, handle_client(shared, stream, peer, cancel))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(%peer, error = %e, "control connection failed"),
                Err(_) => warn!(%peer, "control connection closed after {CLIENT_TIMEOUT:?}"),
            }
        });
    }
}

fn server_event(kind: &str, outcome: Outcome, reason: impl Into<String>) -> Event {
    Event::new(
        UnixMillis::from_system_time(std::time::SystemTime::now()),
        Source::Cast,
        kind,
        outcome,
        reason,
    )
}

async fn handle_client(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let local = stream.local_addr()?;
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read).take(MAX_LINE as u64 + 1);
    let mut line = Vec::new();
    let answer =
        match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
            Err(_) => Answer::Error {
                reason: format!("no request within {}s", REQUEST_TIMEOUT.as_secs()),
            },
            Ok(Err(e)) => return Err(e),
            Ok(Ok(_)) if line.len() > MAX_LINE => Answer::Error {
                reason: format!("request longer than {MAX_LINE} bytes"),
            },
            Ok(Ok(_)) => match serde_json::from_slice::<Request>(&line) {
                Err(e) => Answer::Error {
                    reason: format!(
                        "malformed request ({e}): send one JSON line such as {{\"op\":\"list\"}}"
                    ),
                },
                Ok(Request::List) => match list_images(&shared.root) {
                    Ok(images) => Answer::Images { images },
                    Err(e) => Answer::Error {
                        reason: format!("cannot list the images: {e}"),
                    },
                },
                Ok(Request::Request { image, name }) => {
                    let answer = place(&shared, &image, local, &cancel);
                    let (outcome, reason) = match &answer {
                        Answer::Offer(o) => (
                            Outcome::Ok,
                            format!(
                                "receiver {name} at {peer} asked for {image}: session on {}:{}",
                                o.group, o.port
                            ),
                        ),
                        Answer::Error { reason } => (
                            Outcome::Denied,
                            format!("receiver {name} at {peer} asked for {image:?}: {reason}"),
                        ),
                        Answer::Images { .. } => (Outcome::Info, String::new()),
                    };
                    let ev = server_event("image-request", outcome, reason)
                        .with_ip(peer.ip())
                        .with_hostname(name.chars().take(64).collect::<String>());
                    shared.opts.observer.event(&ev);
                    answer
                }
            },
        };
    let mut out = serde_json::to_vec(&answer).unwrap_or_default();
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

/// Lists the offered images: regular files directly in `root`, not hidden, sorted.
pub fn list_images(root: &Path) -> Result<Vec<ImageInfo>, CastError> {
    let mut images = Vec::new();
    for entry in fs_err::read_dir(root).map_err(io_at(root))? {
        let entry = entry.map_err(io_at(root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Ok(path) = resolve_image(root, &name)
            && let Ok(meta) = fs_err::metadata(&path)
        {
            images.push(ImageInfo {
                name,
                bytes: meta.len(),
            });
        }
    }
    images.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(images)
}

/// The path of image `name` beneath `root` (canonical), or why it is refused.
pub fn resolve_image(root: &Path, name: &str) -> Result<PathBuf, String> {
    if name.is_empty()
        || name.starts_with('.')
        || name.contains('/')
        || name.contains('\\')
        || name.chars().any(char::is_control)
    {
        return Err(format!(
            "{name:?} is not an image name (a plain file name, not hidden, without '/')"
        ));
    }
    let path = root.join(name);
    let real = std::fs::canonicalize(&path)
        .map_err(|_| format!("no image {name:?} here; `corral cast list` shows what is offered"))?;
    if !real.starts_with(root) {
        return Err(format!("{name:?} leads outside the image directory"));
    }
    match std::fs::metadata(&real) {
        Ok(m) if m.is_file() => Ok(real),
        _ => Err(format!("{name:?} is not a regular file")),
    }
}

/// Finds or opens the session for `image` and describes it.
fn place(
    shared: &Arc<Shared>,
    image: &str,
    local: SocketAddr,
    cancel: &CancellationToken,
) -> Answer {
    let path = match resolve_image(&shared.root, image) {
        Ok(p) => p,
        Err(reason) => return Answer::Error { reason },
    };
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let mut slots = shared.slots.lock().unwrap_or_else(|e| e.into_inner());
    let gathering = slots.iter().position(|s| {
        s.as_ref()
            .is_some_and(|s| s.image == image && !s.started.load(Ordering::Acquire))
    });
    let index = match gathering {
        Some(i) => i,
        None => {
            let Some(free) = slots.iter().position(Option::is_none) else {
                return Answer::Error {
                    reason: format!(
                        "all {} session slots are busy; try again when a session ends",
                        slots.len()
                    ),
                };
            };
            let mc = slot_multicast(&shared.opts.multicast, free);
            // Bound now, so that every receiver of the session is told the port it has
            // (another program may hold the slot's).
            let ip = mc.interface.unwrap_or(Ipv4Addr::UNSPECIFIED);
            let listener = match crate::options::CatchupListener::bind(ip, mc.port) {
                Ok(l) => l,
                Err(e) => {
                    return Answer::Error {
                        reason: format!("cannot open a session: {e}; try again later"),
                    };
                }
            };
            let started = Arc::new(AtomicBool::new(false));
            slots[free] = Some(Slot {
                image: image.to_owned(),
                bytes,
                catchup_port: listener.port(),
                started: started.clone(),
            });
            start_session(
                shared.clone(),
                free,
                path,
                listener,
                started,
                cancel.child_token(),
            );
            free
        }
    };
    let Some(slot) = slots[index].as_ref() else {
        return Answer::Error {
            reason: "the session ended as it was joined; ask again".into(),
        };
    };
    let (bytes, catchup_port) = (slot.bytes, slot.catchup_port);
    let mc = slot_multicast(&shared.opts.multicast, index);
    let sender_ip = match (mc.interface, local) {
        (Some(ip), _) => ip,
        (None, SocketAddr::V4(a)) => *a.ip(),
        (None, SocketAddr::V6(_)) => Ipv4Addr::LOCALHOST,
    };
    Answer::Offer(Offer {
        image: image.to_owned(),
        bytes,
        group: mc.group,
        port: mc.port,
        sender: SocketAddr::V4(SocketAddrV4::new(sender_ip, catchup_port)),
        public_key: hex::encode(shared.key.verifying_key().to_bytes()),
    })
}

/// Group and port of slot `index`.
fn slot_multicast(base: &MulticastConfig, index: usize) -> MulticastConfig {
    let mut mc = base.clone();
    let i = u32::try_from(index).unwrap_or(0);
    mc.group = Ipv4Addr::from(u32::from(base.group).wrapping_add(i));
    mc.port = base.port.wrapping_add(u16::try_from(index).unwrap_or(0));
    mc
}

/// Marks the slot started when the session's data pass begins, and forwards everything.
struct SessionObserver {
    inner: Arc<dyn Observer>,
    started: Arc<AtomicBool>,
}

impl Observer for SessionObserver {
    fn event(&self, event: &Event) {
        if event.kind.0 == crate::send::PASS_START {
            self.started.store(true, Ordering::Release);
        }
        self.inner.event(event);
    }
    fn progress(&self, progress: &Progress) {
        self.inner.progress(progress);
    }
}

fn start_session(
    shared: Arc<Shared>,
    index: usize,
    path: PathBuf,
    listener: crate::options::CatchupListener,
    started: Arc<AtomicBool>,
    cancel: CancellationToken,
) {
    let o = &shared.opts;
    let mc = slot_multicast(&o.multicast, index);
    let opts = SendOptions {
        source: path.clone(),
        catchup_port: listener.port(),
        catchup_listener: Some(listener),
        multicast: mc,
        unicast: Vec::new(),
        rate: o.rate,
        packet_size: o.packet_size,
        min_receivers: o.min_receivers.max(1),
        expect: Vec::new(),
        min_wait: o.min_wait,
        max_wait: o.max_wait,
        compress_level: o.compress_level,
        key: Some(shared.key.clone()),
        linger: o.linger,
        observer: Arc::new(SessionObserver {
            inner: o.observer.clone(),
            started: started.clone(),
        }),
    };
    tokio::spawn(async move {
        let result = crate::send(opts, cancel).await;
        // Whatever happened, later requests must not join this session any more.
        started.store(true, Ordering::Release);
        let (outcome, reason) = match &result {
            Ok(r) if r.all_ok() => (
                Outcome::Ok,
                format!(
                    "session for {} ended: {} receiver(s) verified",
                    path.display(),
                    r.receivers.len()
                ),
            ),
            Ok(r) => (
                Outcome::Fail,
                format!(
                    "session for {} ended: {} of {} receiver(s) failed",
                    path.display(),
                    r.receivers.iter().filter(|x| !x.ok).count(),
                    r.receivers.len()
                ),
            ),
            Err(e) => (
                Outcome::Fail,
                format!("session for {} failed: {e}", path.display()),
            ),
        };
        let mut ev = server_event("serve-session-end", outcome, reason);
        if let Ok(r) = &result {
            ev = ev.with_session(r.session);
        }
        shared.opts.observer.event(&ev);
        let mut slots = shared.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots[index] = None;
    });
}

/// Asks the server at `server` (the control port) and returns its answer.
pub async fn ask(server: SocketAddr, request: &Request) -> Result<Answer, CastError> {
    let fail = |reason: String| CastError::Control { server, reason };
    let exchange = async {
        let mut stream = TcpStream::connect(server).await.map_err(|e| {
            fail(format!(
                "cannot connect ({e}); is `corral cast serve` running there?"
            ))
        })?;
        let mut line = serde_json::to_vec(request).map_err(|e| fail(e.to_string()))?;
        line.push(b'\n');
        stream
            .write_all(&line)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let mut reader = BufReader::new(stream).take(64 * 1024);
        let mut answer = Vec::new();
        reader
            .read_until(b'\n', &mut answer)
            .await
            .map_err(|e| fail(e.to_string()))?;
        serde_json::from_slice::<Answer>(&answer)
            .map_err(|e| fail(format!("unreadable answer ({e})")))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| fail("no answer within 10s".into()))?
}

/// Asks for `image` and returns where to receive it, or the server's refusal as an error.
pub async fn request_image(
    server: SocketAddr,
    image: &str,
    name: &str,
) -> Result<Offer, CastError> {
    match ask(
        server,
        &Request::Request {
            image: image.to_owned(),
            name: name.to_owned(),
        },
    )
    .await?
    {
        Answer::Offer(o) => Ok(o),
        Answer::Error { reason } => Err(CastError::Control { server, reason }),
        Answer::Images { .. } => Err(CastError::Control {
            server,
            reason: "answered a list instead of an offer".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With every control slot held by a client that sends nothing, the next client waits
    /// until the request timeout frees one, then is answered.
    #[tokio::test]
    async fn past_the_client_limit_a_request_waits_for_a_slot() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.img"), b"image").unwrap();
        let control = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let opts = ServeOptions {
            dir: dir.path().to_path_buf(),
            control,
            multicast: MulticastConfig {
                group: Ipv4Addr::new(239, 255, 77, 1),
                port: 9000,
                interface: Some(Ipv4Addr::LOCALHOST),
                ttl: 1,
                loopback: false,
                buffer: 1 << 20,
            },
            max_sessions: 1,
            rate: Rate::Fixed(100_000_000),
            packet_size: 1472,
            min_receivers: 1,
            min_wait: Duration::ZERO,
            max_wait: Duration::from_secs(1),
            compress_level: 1,
            key: Some(SigningKey::from_bytes(&[3; 32])),
            linger: Duration::from_secs(1),
            observer: Arc::new(crate::NoObserver),
        };
        let cancel = CancellationToken::new();
        tokio::spawn(serve_limited(opts, cancel.clone(), 1));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let silent = TcpStream::connect(control).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t0 = std::time::Instant::now();
        match ask(control, &Request::List).await.unwrap() {
            Answer::Images { images } => assert_eq!(images[0].name, "a.img"),
            other => panic!("unexpected answer {other:?}"),
        }
        let waited = t0.elapsed();
        assert!(
            waited >= REQUEST_TIMEOUT - Duration::from_secs(1),
            "answered while the only slot was held: {waited:?}"
        );
        drop(silent);
        cancel.cancel();
    }
}
