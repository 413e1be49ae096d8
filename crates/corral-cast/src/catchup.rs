//! TCP catch-up: the sender serves its signed manifest and encoded blocks by index, so that a
//! receiver that missed multicast data (silent group, blocked multicast, blocks still missing
//! after the sender's pass) can fetch exactly what it lacks. Everything fetched here is verified
//! by the receiver exactly like multicast data, so this channel needs no trust of its own.
//!
//! The server listens from the sender's first moment: while the sender still reads and hashes
//! its image (minutes for a large disk) a receiver that cannot hear the group (multicast
//! blocked) learns over TCP that the sender is there and at work, instead of giving up.
//!
//! A server belongs to one stream (a group and port, or a list of unicast targets), and a
//! receiver asks for the manifest of the stream it listens to: a sender whose catch-up port
//! was taken (another sender on the same host) listens on another port, and a receiver given
//! only `--sender HOST` that reaches the other sender is told so instead of being handed that
//! sender's image (with one signing key for a whole site, it would verify).
//!
//! Wire format (all integers big-endian):
//! - the client opens with `CU` + u8 version ([`VERSION`]); a server of another version
//!   answers status 4 with its own version (1 byte) and closes, so that ends of different
//!   corral releases say so instead of misreading each other.
//! - request `M` + IPv4 group + u16 port — the manifest of the stream to that group and port
//!   (group 0.0.0.0 and the receiver's port for a receiver of unicast targets); request `B` +
//!   u32 index — one encoded block.
//! - reply: u8 status + u32 length + that many bytes. Status 0: ok (to `M`: u16 port of the
//!   sender's UDP socket, where reports go, then the signed manifest); 1: unknown; 2 (to `M`
//!   only): no manifest yet, the sender is preparing it, and the 16 bytes are the image size
//!   (0 while unknown) and the bytes read and hashed so far, as u64s; 3 (to `M` only): this
//!   server is another stream's, the 6 bytes are its group and port (0.0.0.0 and the first
//!   target's port for unicast targets).
//!
//! The UDP port comes with the manifest for a receiver that cannot hear the group: it learns
//! where its joins, status and Done go from the sender's own word, as a receiver that hears
//! the group does from where the announcements come from (a sender whose stream port was
//! taken on its host binds another). Version 1 had no port.
//!
//! Receivers of releases before the version existed open with `M` straight away: they are
//! answered status 4 too (and report that the sender has no manifest); a sender of such a
//! release closes the connection at `CU`, which this client reports as one of the two reasons
//! a server closes a connection before its first answer (the other: its connection limit,
//! [`MAX_CONNECTIONS`]; a connection that sends no opening within [`OPENING_TIMEOUT`] is closed).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use corral_cast_proto::packet::Preparing;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::CastError;

/// Largest reply a client accepts (a block is far smaller).
const MAX_REPLY: u32 = 256 * 1024 * 1024;
/// How long a client waits for one reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Block requests a client keeps in flight. The server answers in order; with one request at
/// a time the link idles for a round trip per block, which on a slow or distant link (the
/// receivers that end up here) costs a large share of its rate.
pub(crate) const PIPELINE: usize = 8;

/// Reply status: no manifest yet, the sender is reading and hashing its image.
const STATUS_PREPARING: u8 = 2;

/// Reply status: this server belongs to another stream.
const STATUS_OTHER_STREAM: u8 = 3;

/// Reply status: the client's opening named another protocol version (or none).
const STATUS_VERSION: u8 = 4;

/// The catch-up protocol's version, sent in the client's opening.
pub(crate) const VERSION: u8 = 2;

/// What a client sends first.
pub(crate) const OPENING: [u8; 3] = [b'C', b'U', VERSION];

/// The stream a catch-up server belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stream {
    /// Multicast to this group and port.
    Group(SocketAddrV4),
    /// Unicast to each of these targets.
    Targets(Vec<SocketAddrV4>),
}

impl Stream {
    /// Whether a receiver listening to `asked` (its group and port; group 0.0.0.0 when it
    /// takes unicast) gets this stream. A target list has no group: a receiver on a target's
    /// port is one of them, or one fetching everything over TCP.
    fn serves(&self, asked: SocketAddrV4) -> bool {
        match self {
            Stream::Group(g) => *g == asked,
            Stream::Targets(t) => t.iter().any(|t| t.port() == asked.port()),
        }
    }

    /// How the stream is named in an "another stream" reply.
    fn shown(&self) -> SocketAddrV4 {
        match self {
            Stream::Group(g) => *g,
            Stream::Targets(t) => {
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, t.first().map_or(0, |t| t.port()))
            }
        }
    }
}

fn stream_bytes(s: SocketAddrV4) -> [u8; 6] {
    let mut b = [0u8; 6];
    b[..4].copy_from_slice(&s.ip().octets());
    b[4..].copy_from_slice(&s.port().to_be_bytes());
    b
}

fn stream_from(b: [u8; 6]) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::new(b[0], b[1], b[2], b[3]),
        u16::from_be_bytes([b[4], b[5]]),
    )
}

/// The answer to a manifest request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ManifestReply {
    /// The signed manifest bytes (unverified: the receiver verifies them).
    Ready(Vec<u8>),
    /// No manifest yet: the sender is still reading and hashing its image (what its
    /// Preparing packets say).
    Preparing(Preparing),
}

/// What the catch-up server serves.
pub(crate) trait CatchUpProvider: Send + Sync + 'static {
    /// The signed manifest, or how far the sender is with it.
    fn manifest(&self) -> ManifestReply;
    /// Encoded block `index` (as it travels in a data packet), or `None` if there is none.
    fn block(&self, index: u32) -> Option<Arc<Vec<u8>>>;
}

/// How far a sender's pre-pass is, asked when a receiver asks.
type PrePass = Box<dyn Fn() -> Preparing + Send + Sync>;

/// The provider of a sender whose manifest pre-pass is still running: it answers that it is
/// preparing (with the pre-pass's progress) until [`Deferred::ready`] hands it the real one.
pub(crate) struct Deferred {
    progress: PrePass,
    ready: OnceLock<Arc<dyn CatchUpProvider>>,
}

impl Deferred {
    /// Reports the pre-pass's progress as `progress` tells it.
    pub(crate) fn new(progress: impl Fn() -> Preparing + Send + Sync + 'static) -> Self {
        Deferred {
            progress: Box::new(progress),
            ready: OnceLock::new(),
        }
    }

    /// From now on, serves `provider` (only the first call counts).
    pub(crate) fn ready(&self, provider: Arc<dyn CatchUpProvider>) {
        let _ = self.ready.set(provider);
    }
}

impl CatchUpProvider for Deferred {
    fn manifest(&self) -> ManifestReply {
        match self.ready.get() {
            Some(p) => p.manifest(),
            None => ManifestReply::Preparing((self.progress)()),
        }
    }

    fn block(&self, index: u32) -> Option<Arc<Vec<u8>>> {
        self.ready.get()?.block(index)
    }
}

/// Connections a server holds at once; more are closed as they come. Bounds the
/// descriptors a flood of connections can take from the sender (a thousand receivers that
/// cannot hear the group each hold one).
pub(crate) const MAX_CONNECTIONS: usize = 4096;

/// How long a new connection has to send its opening before it is closed.
pub(crate) const OPENING_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves catch-up requests on `listener` until `cancel` fires; `report_port` is the port of
/// the sender's UDP socket, told with the manifest.
pub(crate) async fn serve(
    listener: TcpListener,
    provider: Arc<dyn CatchUpProvider>,
    stream: Stream,
    report_port: u16,
    cancel: CancellationToken,
) {
    serve_limited(
        listener,
        provider,
        stream,
        report_port,
        cancel,
        MAX_CONNECTIONS,
        OPENING_TIMEOUT,
    )
    .await;
}

/// [`serve`] with its limits given.
async fn serve_limited(
    listener: TcpListener,
    provider: Arc<dyn CatchUpProvider>,
    stream: Stream,
    report_port: u16,
    cancel: CancellationToken,
    max_connections: usize,
    opening_timeout: Duration,
) {
    let serving = Arc::new(stream);
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut refused = 0u64;
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "catch-up accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused += 1;
            if refused.is_power_of_two() {
                warn!(%peer, refused, max_connections, "catch-up connections at their limit; closing new ones");
            }
            continue;
        };
        let provider = provider.clone();
        let ours = serving.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = async {
                    let _ = stream.set_nodelay(true);
                    serve_one(stream, provider, &ours, report_port, opening_timeout).await
                } => {
                    if let Err(e) = r {
                        debug!(%peer, error = %e, "catch-up connection ended");
                    }
                }
            }
        });
    }
}

/// One connection: its opening, then requests until the client closes (any byte stream: a
/// TCP connection, or the fuzz targets' in-memory pipe).
pub(crate) async fn serve_one<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    provider: Arc<dyn CatchUpProvider>,
    ours: &Stream,
    report_port: u16,
    opening_timeout: Duration,
) -> std::io::Result<()> {
    let mut opening = [0u8; 3];
    tokio::time::timeout(opening_timeout, stream.read_exact(&mut opening))
        .await
        .map_err(|_| std::io::Error::other("no opening in time"))??;
    if opening != OPENING {
        stream.write_u8(STATUS_VERSION).await?;
        stream.write_u32(1).await?;
        stream.write_u8(VERSION).await?;
        // The rest of an old client's request is read before the connection closes, so
        // that the close is an end of file after the answer, not a reset that may lose it.
        let _ = stream.shutdown().await;
        let mut rest = [0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut rest)).await;
        return Err(std::io::Error::other(format!(
            "catch-up client opened with {opening:02x?}, not version {VERSION}"
        )));
    }
    let mut served = 0u64;
    loop {
        let op = match stream.read_u8().await {
            Ok(op) => op,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                debug!(served, "catch-up client done");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let (status, bytes) = match op {
            b'M' => {
                let mut asked = [0u8; 6];
                stream.read_exact(&mut asked).await?;
                if !ours.serves(stream_from(asked)) {
                    debug!(asked = %stream_from(asked), "catch-up client of another stream");
                    (
                        STATUS_OTHER_STREAM,
                        Arc::new(stream_bytes(ours.shown()).to_vec()),
                    )
                } else {
                    match provider.manifest() {
                        ManifestReply::Ready(m) => {
                            let mut b = Vec::with_capacity(2 + m.len());
                            b.extend_from_slice(&report_port.to_be_bytes());
                            b.extend_from_slice(&m);
                            (0, Arc::new(b))
                        }
                        ManifestReply::Preparing(p) => {
                            let mut b = Vec::with_capacity(16);
                            b.extend_from_slice(&p.image_size.to_be_bytes());
                            b.extend_from_slice(&p.bytes_done.to_be_bytes());
                            (STATUS_PREPARING, Arc::new(b))
                        }
                    }
                }
            }
            b'B' => {
                let index = stream.read_u32().await?;
                let p = provider.clone();
                served += 1;
                // Reading and compressing a block is blocking work.
                match tokio::task::spawn_blocking(move || p.block(index)).await {
                    Ok(Some(b)) => (0, b),
                    _ => (1, Arc::default()),
                }
            }
            _ => return Err(std::io::Error::other("unknown catch-up request")),
        };
        stream.write_u8(status).await?;
        stream.write_u32(bytes.len() as u32).await?;
        stream.write_all(&bytes).await?;
    }
}

/// A receiver's connection to a sender's catch-up server (a TCP connection, or the fuzz
/// targets' in-memory pipe).
#[derive(Debug)]
pub(crate) struct CatchUpClient<S = TcpStream> {
    stream: S,
    peer: SocketAddr,
    /// Whether a reply came on this connection (an end of file before the first one is
    /// how a sender of an older release refuses the opening).
    answered: bool,
    /// The port of the sender's UDP socket, told with its manifest.
    report_port: Option<u16>,
}

impl CatchUpClient {
    pub(crate) async fn connect(peer: SocketAddr) -> Result<Self, CastError> {
        let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(peer))
            .await
            .map_err(|_| CastError::CatchUp {
                peer,
                reason: "connect timed out".into(),
            })?
            .map_err(|e| CastError::CatchUp {
                peer,
                reason: format!("connect: {e}"),
            })?;
        let _ = stream.set_nodelay(true);
        CatchUpClient::over(stream, peer).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> CatchUpClient<S> {
    /// A client on an open byte stream to the server at `peer` (named in errors).
    pub(crate) async fn over(stream: S, peer: SocketAddr) -> Result<Self, CastError> {
        let mut c = CatchUpClient {
            stream,
            peer,
            answered: false,
            report_port: None,
        };
        // Sent with the first request (nothing comes back for the opening itself).
        c.stream
            .write_all(&OPENING)
            .await
            .map_err(|e| c.err(format!("send: {e}")))?;
        Ok(c)
    }

    fn err(&self, reason: impl Into<String>) -> CastError {
        CastError::CatchUp {
            peer: self.peer,
            reason: reason.into(),
        }
    }

    async fn request(&mut self, req: &[u8]) -> Result<(u8, Vec<u8>), CastError> {
        self.stream
            .write_all(req)
            .await
            .map_err(|e| self.err(e.to_string()))?;
        self.reply().await
    }

    /// Reads the next reply: its status and bytes.
    async fn reply(&mut self) -> Result<(u8, Vec<u8>), CastError> {
        let fut = async {
            let status = match self.stream.read_u8().await {
                Ok(s) => s,
                // Closed (or reset, with our bytes unread) between replies.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                    ) =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            let len = self.stream.read_u32().await?;
            if len > MAX_REPLY {
                return Err(std::io::Error::other(format!("reply of {len} bytes")));
            }
            // Grown as the bytes come (up to 1 MiB ahead), not sized by the claim: a peer
            // that says 256 MiB must send them before they are held.
            let mut buf = Vec::with_capacity((len as usize).min(1 << 20));
            (&mut self.stream)
                .take(u64::from(len))
                .read_to_end(&mut buf)
                .await?;
            if buf.len() != len as usize {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("reply cut short: {} of {len} bytes", buf.len()),
                ));
            }
            Ok::<_, std::io::Error>(Some((status, buf)))
        };
        match tokio::time::timeout(REPLY_TIMEOUT, fut).await {
            Err(_) => Err(self.err("reply timed out")),
            // A sender from before the version closes the connection at the opening.
            Ok(Ok(None)) if !self.answered => Err(self.err(
                "the sender closed the connection before its first answer: it is at its \
                 connection limit, or of an older release that does not speak this catch-up \
                 protocol (run the same corral release on both ends)",
            )),
            Ok(Ok(None)) => Err(self.err("the sender closed the connection")),
            Ok(Err(e)) => Err(self.err(e.to_string())),
            Ok(Ok(Some((STATUS_VERSION, v)))) => match v.as_slice() {
                [v] => Err(CastError::CatchUpVersion {
                    addr: self.peer,
                    theirs: *v,
                    ours: VERSION,
                }),
                _ => Err(self.err(format!(
                    "the sender answered with a version reply of {} bytes: it speaks another \
                     catch-up protocol than this receiver's version {VERSION}; run the same \
                     corral release on both ends",
                    v.len()
                ))),
            },
            Ok(Ok(Some(r))) => {
                self.answered = true;
                Ok(r)
            }
        }
    }

    /// The signed manifest (unverified: the caller verifies it), or word that the sender is
    /// still preparing it.
    pub(crate) async fn manifest(
        &mut self,
        stream: SocketAddrV4,
    ) -> Result<ManifestReply, CastError> {
        let mut req = [0u8; 7];
        req[0] = b'M';
        req[1..].copy_from_slice(&stream_bytes(stream));
        match self.request(&req).await? {
            (0, mut m) if m.len() >= 2 => {
                let port = u16::from_be_bytes([m[0], m[1]]);
                self.report_port = (port != 0).then_some(port);
                m.drain(..2);
                Ok(ManifestReply::Ready(m))
            }
            (0, m) => Err(self.err(format!(
                "a manifest reply of {} bytes (at least 2 expected)",
                m.len()
            ))),
            (STATUS_PREPARING, b) if b.len() == 16 => {
                let image_size = u64::from_be_bytes(b[..8].try_into().expect("8 bytes"));
                let bytes_done = u64::from_be_bytes(b[8..].try_into().expect("8 bytes"));
                Ok(ManifestReply::Preparing(Preparing {
                    image_size,
                    bytes_done: bytes_done.min(image_size),
                }))
            }
            (STATUS_PREPARING, b) => Err(self.err(format!(
                "a 'preparing' reply of {} bytes (16 expected)",
                b.len()
            ))),
            (STATUS_OTHER_STREAM, b) => match <[u8; 6]>::try_from(b.as_slice()) {
                Ok(theirs) => Err(CastError::OtherStream {
                    addr: self.peer,
                    theirs: stream_from(theirs),
                    ours: stream,
                }),
                Err(_) => Err(self.err(format!(
                    "an 'another stream' reply of {} bytes (6 expected)",
                    b.len()
                ))),
            },
            _ => Err(self.err("sender has no manifest")),
        }
    }

    /// The port of the sender's UDP socket (where a receiver's reports go), as told with the
    /// last manifest this connection fetched.
    pub(crate) fn report_port(&self) -> Option<u16> {
        self.report_port
    }

    /// Encoded block `index` (unverified).
    #[cfg(test)]
    pub(crate) async fn block(&mut self, index: u32) -> Result<Vec<u8>, CastError> {
        match self.request(&block_request(index)).await? {
            (0, b) => Ok(b),
            _ => Err(self.err(format!("sender has no block {index}"))),
        }
    }

    /// Encoded blocks `indices` (unverified), in order, with up to [`PIPELINE`] requests in
    /// flight; each is sent to `out` as `wrap(index, bytes)`. `Ok(false)`: `out` was closed
    /// and the batch stopped early. After an early stop or an error, replies may still be on
    /// their way: the connection is then done.
    pub(crate) async fn blocks<T>(
        &mut self,
        indices: &[u32],
        out: &tokio::sync::mpsc::Sender<T>,
        wrap: impl Fn(u32, Vec<u8>) -> T,
    ) -> Result<bool, CastError> {
        let mut sent = 0;
        for (k, &index) in indices.iter().enumerate() {
            let ahead = indices.len().min(k + PIPELINE);
            if sent < ahead {
                let req: Vec<u8> = indices[sent..ahead]
                    .iter()
                    .flat_map(|&i| block_request(i))
                    .collect();
                self.stream
                    .write_all(&req)
                    .await
                    .map_err(|e| self.err(e.to_string()))?;
                sent = ahead;
            }
            let b = match self.reply().await? {
                (0, b) => b,
                _ => return Err(self.err(format!("sender has no block {index}"))),
            };
            if out.send(wrap(index, b)).await.is_err() {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

fn block_request(index: u32) -> [u8; 5] {
    let mut req = [0u8; 5];
    req[0] = b'B';
    req[1..].copy_from_slice(&index.to_be_bytes());
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stream the tests' servers and clients are of.
    const G: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(239, 1, 2, 3), 9000);
    /// The UDP port the tests' servers tell (not the stream's: as a sender whose port was
    /// taken).
    const REPORT_PORT: u16 = 41_234;

    /// Serves `provider` as `stream` on a loopback port: its address and what stops it.
    async fn start(
        provider: Arc<dyn CatchUpProvider>,
        stream: Stream,
    ) -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn(serve(
            listener,
            provider,
            stream,
            REPORT_PORT,
            cancel.clone(),
        ));
        (addr, cancel)
    }

    struct Fixed;
    impl CatchUpProvider for Fixed {
        fn manifest(&self) -> ManifestReply {
            ManifestReply::Ready(b"manifest".to_vec())
        }
        fn block(&self, index: u32) -> Option<Arc<Vec<u8>>> {
            (index < 3).then(|| Arc::new(vec![index as u8; 1000]))
        }
    }

    #[tokio::test]
    async fn serves_manifest_and_blocks() {
        let (addr, cancel) = start(Arc::new(Fixed), Stream::Group(G)).await;
        let mut c = CatchUpClient::connect(addr).await.unwrap();
        assert_eq!(c.report_port(), None);
        assert_eq!(
            c.manifest(G).await.unwrap(),
            ManifestReply::Ready(b"manifest".to_vec())
        );
        assert_eq!(c.report_port(), Some(REPORT_PORT));
        assert_eq!(c.block(2).await.unwrap(), vec![2u8; 1000]);
        assert!(c.block(9).await.is_err());
        assert_eq!(c.block(0).await.unwrap(), vec![0u8; 1000]);
        cancel.cancel();
    }

    #[tokio::test]
    async fn pipelined_blocks_arrive_in_order_and_a_missing_one_fails_the_batch() {
        let (addr, cancel) = start(Arc::new(Fixed), Stream::Group(G)).await;
        let mut c = CatchUpClient::connect(addr).await.unwrap();
        // More indices than the pipeline holds, with repeats, all present.
        let want: Vec<u32> = (0..3 * PIPELINE as u32).map(|i| (i * 7) % 3).collect();
        let (tx, mut rx) = tokio::sync::mpsc::channel(want.len());
        assert!(c.blocks(&want, &tx, |i, b| (i, b)).await.unwrap());
        let mut got = Vec::new();
        while let Ok(x) = rx.try_recv() {
            got.push(x);
        }
        assert_eq!(got.len(), want.len());
        for ((i, b), w) in got.iter().zip(&want) {
            assert_eq!(i, w);
            assert_eq!(b, &vec![*w as u8; 1000], "block {i} in its place");
        }
        // A batch fails at the first block the sender does not have, after delivering the
        // ones before it.
        let mut c = CatchUpClient::connect(addr).await.unwrap();
        let r = c.blocks(&[0, 1, 9, 2], &tx, |i, b| (i, b)).await;
        assert!(r.is_err(), "block 9 does not exist");
        let mut n = 0;
        while rx.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, 2, "the blocks before the missing one were delivered");
        // A closed receiving end stops the batch.
        drop(rx);
        let mut c = CatchUpClient::connect(addr).await.unwrap();
        assert!(!c.blocks(&[0, 1], &tx, |i, b| (i, b)).await.unwrap());
        cancel.cancel();
    }

    /// A receiver of another stream (another group, or the same group on another port) is
    /// told whose server it reached and gets no manifest; a server of unicast targets serves
    /// a receiver on a target's port. Blocks are not stream-checked (a client gets to them
    /// only through a manifest it verified).
    #[tokio::test]
    async fn a_receiver_of_another_stream_is_told_and_gets_no_manifest() {
        let (addr, cancel) = start(Arc::new(Fixed), Stream::Group(G)).await;
        let mut c = CatchUpClient::connect(addr).await.unwrap();
        for other in [
            SocketAddrV4::new(Ipv4Addr::new(239, 1, 2, 4), 9000),
            SocketAddrV4::new(*G.ip(), 9002),
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9000),
        ] {
            match c.manifest(other).await {
                Err(CastError::OtherStream {
                    theirs,
                    ours,
                    addr: a,
                }) => {
                    assert_eq!((theirs, ours, a), (G, other, addr));
                }
                r => panic!("{other}: {r:?}"),
            }
        }
        let err = c
            .manifest(SocketAddrV4::new(*G.ip(), 1))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("--sender HOST:PORT"), "{err}");
        // The same connection still serves its own stream.
        assert_eq!(
            c.manifest(G).await.unwrap(),
            ManifestReply::Ready(b"manifest".to_vec())
        );
        cancel.cancel();

        let targets = Stream::Targets(vec![
            "10.0.0.2:7000".parse().unwrap(),
            "10.0.0.3:7001".parse().unwrap(),
        ]);
        let (addr, cancel) = start(Arc::new(Fixed), targets).await;
        let mut c = CatchUpClient::connect(addr).await.unwrap();
        let own = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 7001);
        assert_eq!(
            c.manifest(own).await.unwrap(),
            ManifestReply::Ready(b"manifest".to_vec())
        );
        match c
            .manifest(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 7002))
            .await
        {
            Err(CastError::OtherStream { theirs, .. }) => {
                assert_eq!(theirs, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 7000));
            }
            r => panic!("{r:?}"),
        }
        cancel.cancel();
    }

    /// A sender still hashing answers a manifest request with how far it is, and has no
    /// blocks; once it is ready, the same connection gets the manifest and the blocks.
    #[tokio::test]
    async fn a_deferred_provider_says_preparing_until_it_is_ready() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let (size, done) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (s, d) = (size.clone(), done.clone());
        let deferred = Arc::new(Deferred::new(move || Preparing {
            image_size: s.load(Ordering::Relaxed),
            bytes_done: d.load(Ordering::Relaxed),
        }));
        let (addr, cancel) = start(deferred.clone(), Stream::Group(G)).await;
        let mut c = CatchUpClient::connect(addr).await.unwrap();
        // Size unknown (a standard input being spooled).
        assert_eq!(
            c.manifest(G).await.unwrap(),
            ManifestReply::Preparing(Preparing {
                image_size: 0,
                bytes_done: 0
            })
        );
        size.store(1 << 30, Ordering::Relaxed);
        done.store(1 << 20, Ordering::Relaxed);
        assert_eq!(
            c.manifest(G).await.unwrap(),
            ManifestReply::Preparing(Preparing {
                image_size: 1 << 30,
                bytes_done: 1 << 20
            })
        );
        assert!(c.block(0).await.is_err(), "no blocks before the manifest");
        // The receiver asks again on the same connection.
        deferred.ready(Arc::new(Fixed));
        assert_eq!(
            c.manifest(G).await.unwrap(),
            ManifestReply::Ready(b"manifest".to_vec())
        );
        assert_eq!(c.block(1).await.unwrap(), vec![1u8; 1000]);
        cancel.cancel();
    }

    /// A reply that claims more bytes than it sends before the connection closes is an
    /// error (and what it claimed was never allocated up front).
    #[tokio::test]
    async fn a_reply_cut_short_is_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut opening = [0u8; 3];
            s.read_exact(&mut opening).await.unwrap();
            assert_eq!(opening, OPENING);
            assert_eq!(s.read_u8().await.unwrap(), b'M');
            let mut asked = [0u8; 6];
            s.read_exact(&mut asked).await.unwrap();
            assert_eq!(stream_from(asked), G);
            s.write_u8(0).await.unwrap();
            s.write_u32(MAX_REPLY).await.unwrap();
            s.write_all(b"only this").await.unwrap();
        });
        let mut c = CatchUpClient::connect(addr).await.unwrap();
        let err = c.manifest(G).await.unwrap_err().to_string();
        assert!(err.contains("cut short: 9 of"), "{err}");
    }

    /// A 'preparing' reply of the wrong length, or one whose progress exceeds the size, from
    /// a hostile or broken sender: an error, or the progress capped at the size.
    #[tokio::test]
    async fn a_malformed_preparing_reply_is_refused() {
        for (body, want) in [
            (vec![0u8; 15], None),
            (vec![0u8; 17], None),
            (
                [10u64.to_be_bytes(), 99u64.to_be_bytes()].concat(),
                Some(ManifestReply::Preparing(Preparing {
                    image_size: 10,
                    bytes_done: 10,
                })),
            ),
        ] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut opening = [0u8; 3];
                s.read_exact(&mut opening).await.unwrap();
                assert_eq!(opening, OPENING);
                assert_eq!(s.read_u8().await.unwrap(), b'M');
                let mut asked = [0u8; 6];
                s.read_exact(&mut asked).await.unwrap();
                assert_eq!(stream_from(asked), G);
                s.write_u8(STATUS_PREPARING).await.unwrap();
                s.write_u32(body.len() as u32).await.unwrap();
                s.write_all(&body).await.unwrap();
                s
            });
            let mut c = CatchUpClient::connect(addr).await.unwrap();
            let got = c.manifest(G).await;
            match want {
                None => assert!(got.is_err(), "{got:?}"),
                Some(w) => assert_eq!(got.unwrap(), w),
            }
            drop(server.await.unwrap());
        }
    }

    /// A manifest reply too short to hold the sender's UDP port is an error, and a port of
    /// 0 is no word of one.
    #[tokio::test]
    async fn a_manifest_reply_without_its_port_is_refused() {
        for (body, want) in [
            (vec![7u8], None),
            (vec![0, 0, b'm'], Some(None)),
            (vec![0x9c, 0x40, b'm'], Some(Some(40_000))),
        ] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut request = [0u8; 3 + 7];
                s.read_exact(&mut request).await.unwrap();
                s.write_u8(0).await.unwrap();
                s.write_u32(body.len() as u32).await.unwrap();
                s.write_all(&body).await.unwrap();
                s
            });
            let mut c = CatchUpClient::connect(addr).await.unwrap();
            let got = c.manifest(G).await;
            match want {
                None => {
                    let e = got.unwrap_err().to_string();
                    assert!(e.contains("manifest reply of 1 bytes"), "{e}");
                }
                Some(port) => {
                    assert_eq!(got.unwrap(), ManifestReply::Ready(b"m".to_vec()));
                    assert_eq!(c.report_port(), port);
                }
            }
            drop(server.await.unwrap());
        }
    }

    /// Ends of different releases say so. A client that opens without the version (a
    /// receiver of an older release, whose first byte is its request) is answered status 4
    /// and this server's version; a client told another version, or whose sender closes the
    /// connection at the opening (a sender of an older release), says so.
    #[tokio::test]
    async fn ends_of_different_protocol_versions_refuse_each_other_clearly() {
        let (addr, cancel) = start(Arc::new(Fixed), Stream::Group(G)).await;
        let mut old = TcpStream::connect(addr).await.unwrap();
        old.write_all(&[b'M', 239, 1, 2, 3, 0x23, 0x28])
            .await
            .unwrap();
        assert_eq!(old.read_u8().await.unwrap(), STATUS_VERSION);
        assert_eq!(old.read_u32().await.unwrap(), 1);
        assert_eq!(old.read_u8().await.unwrap(), VERSION);
        let mut rest = Vec::new();
        old.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "nothing more, the connection closed");
        // The server still serves clients of its version.
        let mut c = CatchUpClient::connect(addr).await.unwrap();
        assert_eq!(
            c.manifest(G).await.unwrap(),
            ManifestReply::Ready(b"manifest".to_vec())
        );
        cancel.cancel();

        for newer in [true, false] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                if newer {
                    // A later version: answers status 4 with its own.
                    let mut opening = [0u8; 3];
                    s.read_exact(&mut opening).await.unwrap();
                    s.write_all(&[STATUS_VERSION, 0, 0, 0, 1, VERSION + 1])
                        .await
                        .unwrap();
                } else {
                    // An older release: 'C' is no request it knows; it hangs up.
                    assert_eq!(s.read_u8().await.unwrap(), b'C');
                }
            });
            let mut c = CatchUpClient::connect(addr).await.unwrap();
            let err = c.manifest(G).await.unwrap_err().to_string();
            let want = if newer {
                format!("version {}", VERSION + 1)
            } else {
                "older release".to_string()
            };
            assert!(err.contains(&want), "{err}");
            assert!(err.contains("same corral release on both ends"), "{err}");
            server.await.unwrap();
        }
    }

    /// A flood of connections takes at most the server's limit of descriptors: past it, new
    /// connections are closed at once; one that never sends its opening is closed after the
    /// opening timeout, and its place serves a real client again.
    #[tokio::test]
    async fn connections_past_the_limit_or_silent_ones_are_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn(serve_limited(
            listener,
            Arc::new(Fixed),
            Stream::Group(G),
            REPORT_PORT,
            cancel.clone(),
            2,
            Duration::from_millis(300),
        ));
        let mut silent = Vec::new();
        for _ in 0..2 {
            silent.push(TcpStream::connect(addr).await.unwrap());
        }
        // The third is closed without a word.
        let mut third = CatchUpClient::connect(addr).await.unwrap();
        let err = third.manifest(G).await.unwrap_err().to_string();
        assert!(err.contains("at its connection limit"), "{err}");
        // The silent two are closed after the opening timeout ...
        for s in &mut silent {
            let mut b = [0u8; 1];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
                .await
                .expect("closed by the server")
                .unwrap_or(0);
            assert_eq!(n, 0);
        }
        // ... and their places serve again.
        let mut c = CatchUpClient::connect(addr).await.unwrap();
        assert_eq!(
            c.manifest(G).await.unwrap(),
            ManifestReply::Ready(b"manifest".to_vec())
        );
        cancel.cancel();
    }
}
