//! UDP sockets for multicast: group membership on a chosen interface, TTL, loopback, large
//! buffers (with a warning when the kernel caps them), and interface-name resolution.
//!
//! This and `sched` are the only modules of the crate allowed to use `unsafe` (here for
//! `getifaddrs` and the batched socket calls); every block says why it is sound.
#![allow(unsafe_code)]

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, warn};

use crate::error::CastError;

/// The socket buffer size we ask for. `net.core.rmem_max` often caps it (4 MiB on our CI):
/// multicast receivers lose packets mainly when this buffer overflows.
pub const DEFAULT_SOCKET_BUFFER: usize = 16 * 1024 * 1024;

/// Where multicast traffic goes in and out.
#[derive(Debug, Clone)]
pub struct MulticastConfig {
    /// The group, e.g. 239.255.77.1.
    pub group: Ipv4Addr,
    /// The UDP port of the group.
    pub port: u16,
    /// The local IPv4 address of the interface to use (`None`: let the kernel route).
    pub interface: Option<Ipv4Addr>,
    /// Multicast TTL (1 keeps traffic on the local segment).
    pub ttl: u32,
    /// Whether our own multicast is looped back to local sockets (off by default).
    pub loopback: bool,
    /// Requested `SO_RCVBUF`/`SO_SNDBUF` in bytes.
    pub buffer: usize,
}

impl MulticastConfig {
    /// The group's socket address.
    pub fn group_addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.group, self.port))
    }
}

/// Resolves `--interface`: an IPv4 address, or an interface name whose first IPv4 address is
/// used.
pub fn resolve_interface(spec: &str) -> Result<Ipv4Addr, CastError> {
    if let Ok(ip) = spec.parse::<Ipv4Addr>() {
        return Ok(ip);
    }
    interface_ipv4(spec)
        .map_err(|source| CastError::Interface {
            name: spec.to_owned(),
            source,
        })?
        .ok_or_else(|| CastError::Interface {
            name: spec.to_owned(),
            source: io::Error::new(
                io::ErrorKind::NotFound,
                "no such interface with an IPv4 address",
            ),
        })
}

/// The first IPv4 address of interface `name`, via `getifaddrs(3)`.
fn interface_ipv4(name: &str) -> io::Result<Option<Ipv4Addr>> {
    let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `getifaddrs` writes a pointer to a linked list it allocates into `addrs`; we pass a
    // valid pointer to our local and check the return code before reading it.
    if unsafe { libc::getifaddrs(&mut addrs) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = None;
    let mut cur = addrs;
    while !cur.is_null() {
        // SAFETY: `cur` is a non-null node of the list returned by `getifaddrs`, which stays
        // valid until `freeifaddrs` below.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_name.is_null() && !ifa.ifa_addr.is_null() {
            // SAFETY: `ifa_name` is a NUL-terminated C string owned by the list.
            let ifname = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
            // SAFETY: `ifa_addr` is non-null and points at a sockaddr whose family we check
            // before reinterpreting it as `sockaddr_in`.
            let family = unsafe { (*ifa.ifa_addr).sa_family };
            if ifname.to_bytes() == name.as_bytes() && i32::from(family) == libc::AF_INET {
                // SAFETY: family is AF_INET, so the storage is a `sockaddr_in`.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                found = Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
                break;
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `addrs` came from a successful `getifaddrs` and is freed exactly once; no
    // reference into the list outlives this call (we copied the address out).
    unsafe { libc::freeifaddrs(addrs) };
    Ok(found)
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> CastError {
    move |source| CastError::Socket { what, source }
}

/// Asks for `want` bytes of receive and send buffer. When `net.core.rmem_max`/`wmem_max` caps
/// the request, retries with `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE` (which a privileged process,
/// e.g. one imaging a disk as root, may use beyond the cap) and warns only if that fails too.
fn set_buffers(sock: &Socket, want: usize) {
    for (name, force, set, get) in [
        (
            "SO_RCVBUF",
            (|s: &Socket, v: usize| rustix::net::sockopt::set_socket_recv_buffer_size_force(s, v))
                as Force,
            Socket::set_recv_buffer_size as fn(&Socket, usize) -> io::Result<()>,
            Socket::recv_buffer_size as fn(&Socket) -> io::Result<usize>,
        ),
        (
            "SO_SNDBUF",
            (|s: &Socket, v: usize| rustix::net::sockopt::set_socket_send_buffer_size_force(s, v))
                as Force,
            Socket::set_send_buffer_size,
            Socket::send_buffer_size,
        ),
    ] {
        if let Err(e) = set(sock, want) {
            warn!(option = name, error = %e, "cannot set socket buffer size");
            continue;
        }
        // Linux doubles the value it stores (bookkeeping overhead), so compare against half.
        let capped = |sock: &Socket| get(sock).map(|got| (got / 2 < want, got / 2));
        if let Ok((true, _)) = capped(sock) {
            let _ = force(sock, want);
        }
        match capped(sock) {
            Ok((true, got)) => warn!(
                option = name,
                asked = want,
                got,
                "kernel capped the socket buffer (raise net.core.rmem_max/wmem_max); \
                 expect more loss at high rates"
            ),
            Ok((false, got)) => debug!(option = name, got, "socket buffer"),
            Err(e) => warn!(option = name, error = %e, "cannot read socket buffer size"),
        }
    }
}

/// `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE` (socket2 does not wrap them; rustix does).
type Force = fn(&Socket, usize) -> rustix::io::Result<()>;

/// A non-blocking UDP socket for sending to the group and receiving receivers' unicast
/// reports, bound to the interface address and the group's port.
pub fn sender_socket(cfg: &MulticastConfig) -> Result<tokio::net::UdpSocket, CastError> {
    let sock =
        Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(io_err("socket"))?;
    // Without this, a socket bound to the wildcard address gets every group's traffic on the
    // port as soon as any local socket joined it.
    let _ = sock.set_multicast_all_v4(false);
    // Bound to the group's port number so that a receiver told `--sender HOST` knows where to
    // send its reports without ever hearing an announcement. Bound alone: a second sender on
    // this host with the same port (another group) would otherwise share it, and the kernel
    // hands every unicast report to the newest of the two. Such a sender takes an ephemeral
    // port instead; its datagrams carry it, and receivers that hear them report there.
    let bind = SocketAddrV4::new(cfg.interface.unwrap_or(Ipv4Addr::UNSPECIFIED), cfg.port);
    match sock.bind(&bind.into()) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AddrInUse && cfg.port != 0 => {
            warn!(
                addr = %bind,
                "UDP port in use on this host (another sender?): receivers' reports come to an \
                 ephemeral port, which receivers that hear the group learn; one that cannot must \
                 be given a --port of its own on both ends"
            );
            sock.bind(&SocketAddrV4::new(*bind.ip(), 0).into())
                .map_err(io_err("bind"))?;
        }
        Err(e) => return Err(io_err("bind")(e)),
    }
    // Receivers on this host (tests, a lab on one machine) may bind the port after us.
    sock.set_reuse_address(true)
        .map_err(io_err("SO_REUSEADDR"))?;
    if let Some(ifa) = cfg.interface {
        sock.set_multicast_if_v4(&ifa)
            .map_err(io_err("IP_MULTICAST_IF"))?;
    }
    sock.set_multicast_ttl_v4(cfg.ttl)
        .map_err(io_err("IP_MULTICAST_TTL"))?;
    sock.set_multicast_loop_v4(cfg.loopback)
        .map_err(io_err("IP_MULTICAST_LOOP"))?;
    set_buffers(&sock, cfg.buffer);
    into_tokio(sock)
}

/// A non-blocking UDP socket bound to the group's port and joined to the group on the chosen
/// interface. `SO_REUSEADDR` lets several receivers share one host (tests, benchmarks).
pub fn receiver_socket(cfg: &MulticastConfig) -> Result<tokio::net::UdpSocket, CastError> {
    let sock =
        Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(io_err("socket"))?;
    sock.set_reuse_address(true)
        .map_err(io_err("SO_REUSEADDR"))?;
    // Bind to the group address, not 0.0.0.0, so that we only see this group's datagrams even
    // when another group uses the same port.
    let bind = SocketAddrV4::new(cfg.group, cfg.port);
    sock.bind(&bind.into()).map_err(io_err("bind"))?;
    let ifa = cfg.interface.unwrap_or(Ipv4Addr::UNSPECIFIED);
    sock.join_multicast_v4(&cfg.group, &ifa)
        .map_err(io_err("IP_ADD_MEMBERSHIP"))?;
    let _ = sock.set_multicast_all_v4(false);
    if let Some(ifa) = cfg.interface {
        // Replies to the sender leave from the same interface.
        let _ = sock.set_multicast_if_v4(&ifa);
    }
    set_buffers(&sock, cfg.buffer);
    enable_gro(&sock);
    into_tokio(sock)
}

/// The socket a receiver of a sender with unicast targets gets the stream on: the group's port
/// on its interface (all of them without `--interface`), no group joined.
pub fn unicast_receiver_socket(cfg: &MulticastConfig) -> Result<tokio::net::UdpSocket, CastError> {
    let sock =
        Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(io_err("socket"))?;
    let bind = SocketAddrV4::new(cfg.interface.unwrap_or(Ipv4Addr::UNSPECIFIED), cfg.port);
    sock.bind(&bind.into()).map_err(io_err("bind"))?;
    set_buffers(&sock, cfg.buffer);
    enable_gro(&sock);
    into_tokio(sock)
}

/// Asks for UDP GRO (`UDP_GRO`): a run of datagrams (a sender's UDP GSO super-datagram, or
/// packets the NIC coalesced) is then queued and received as one buffer with its segment size,
/// instead of one socket-queue entry and one copy per datagram. [`RecvBatch`] cuts such buffers
/// up again. Best effort: without it every datagram arrives on its own.
fn enable_gro(sock: &Socket) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: `on` is a live c_int and we pass its exact size; the fd is open (owned by `sock`).
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_GRO,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        debug!(error = %io::Error::last_os_error(), "UDP_GRO not available");
    }
}

/// A unicast UDP socket for a receiver's reports to the sender (separate from the group socket,
/// which is bound to the group address and so cannot source unicast).
pub fn unicast_socket(local: Option<Ipv4Addr>) -> Result<tokio::net::UdpSocket, CastError> {
    let sock =
        Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(io_err("socket"))?;
    let bind = SocketAddrV4::new(local.unwrap_or(Ipv4Addr::UNSPECIFIED), 0);
    sock.bind(&bind.into()).map_err(io_err("bind"))?;
    into_tokio(sock)
}

fn into_tokio(sock: Socket) -> Result<tokio::net::UdpSocket, CastError> {
    sock.set_nonblocking(true).map_err(io_err("O_NONBLOCK"))?;
    tokio::net::UdpSocket::from_std(sock.into()).map_err(io_err("register"))
}

/// Room for one control message of `UDP_GRO` (an int) or `UDP_SEGMENT` (a u16), 8-aligned.
const CMSG_BUF: usize = 64;

/// A control-message buffer with the alignment `cmsghdr` needs.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_BUF]);

/// Receives many datagrams per system call with `recvmmsg(2)`: at tens of thousands of
/// datagrams per second the per-call overhead is a large share of a receiver's CPU. With UDP
/// GRO on the socket one slot may hold a run of datagrams; [`RecvBatch::datagrams`] yields them
/// one by one.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    addrs: Vec<libc::sockaddr_in>,
    iovs: Vec<libc::iovec>,
    ctrl: Vec<CmsgBuf>,
    msgs: Vec<libc::mmsghdr>,
    /// Segment size of each received slot (0: one datagram).
    seg: Vec<usize>,
    received: usize,
}

// SAFETY: the raw pointers inside `iovs`/`msgs` point only into this struct's own heap
// buffers (`bufs`, `addrs`, `ctrl`), which move with it; nothing is shared with other threads.
unsafe impl Send for RecvBatch {}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("slots", &self.bufs.len())
            .field("received", &self.received)
            .finish()
    }
}

/// The `UDP_GRO` segment size in a received message's control data, if any.
fn gro_segment_size(hdr: &libc::msghdr) -> Option<usize> {
    // SAFETY: `hdr` was filled by a successful recvmmsg: `msg_control`/`msg_controllen`
    // describe our own aligned buffer, of which the kernel wrote `msg_controllen` bytes of
    // well-formed control messages; the CMSG_* helpers never step outside that length.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(v).ok().filter(|&v| v > 0);
            }
            c = libc::CMSG_NXTHDR(hdr, c);
        }
    }
    None
}

impl RecvBatch {
    /// `count` slots of `size` bytes each (64 KiB holds the largest GRO buffer).
    pub fn new(count: usize, size: usize) -> Self {
        let count = count.max(1);
        RecvBatch {
            bufs: (0..count).map(|_| vec![0u8; size]).collect(),
            // SAFETY: `sockaddr_in` is plain old data; all-zero is a valid value.
            addrs: vec![unsafe { std::mem::zeroed() }; count],
            iovs: Vec::with_capacity(count),
            ctrl: vec![CmsgBuf([0; CMSG_BUF]); count],
            // SAFETY: `mmsghdr` is plain old data; all-zero is a valid value.
            msgs: vec![unsafe { std::mem::zeroed() }; count],
            seg: vec![0; count],
            received: 0,
        }
    }

    /// Receives whatever is queued (at most one batch) without blocking; returns the number of
    /// slots filled. `Ok(0)` never happens: an empty queue is `Err(WouldBlock)`.
    pub fn recv(&mut self, sock: &tokio::net::UdpSocket) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        let fd = sock.as_raw_fd();
        self.received = 0;
        let n = sock.try_io(tokio::io::Interest::READABLE, || {
            self.iovs.clear();
            for b in &mut self.bufs {
                self.iovs.push(libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: b.len(),
                });
            }
            for (i, m) in self.msgs.iter_mut().enumerate() {
                // SAFETY: as in `new`, zero is a valid `msghdr`.
                m.msg_hdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_in).cast();
                m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
                m.msg_hdr.msg_iov = &mut self.iovs[i];
                m.msg_hdr.msg_iovlen = 1;
                m.msg_hdr.msg_control = self.ctrl[i].0.as_mut_ptr().cast();
                m.msg_hdr.msg_controllen = CMSG_BUF as _;
                m.msg_len = 0;
            }
            // SAFETY: every `mmsghdr` points at one `iovec` describing a live buffer of the
            // stated length, at a `sockaddr_in` of the stated size and at a control buffer of
            // the stated size, all owned by `self` and not touched until the call returns;
            // `vlen` equals the number of entries.
            let r = unsafe {
                libc::recvmmsg(
                    fd,
                    self.msgs.as_mut_ptr(),
                    self.msgs.len() as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(r as usize)
            }
        })?;
        for i in 0..n {
            self.seg[i] = gro_segment_size(&self.msgs[i].msg_hdr).unwrap_or(0);
        }
        self.received = n;
        Ok(n)
    }

    /// Every datagram of the last batch, in order: its bytes (truncated to the slot size) and
    /// sender. A GRO slot is cut at its segment size (the last piece may be shorter).
    pub fn datagrams(&self) -> impl Iterator<Item = (&[u8], SocketAddr)> + '_ {
        (0..self.received).flat_map(move |i| {
            let len = (self.msgs[i].msg_len as usize).min(self.bufs[i].len());
            let a = &self.addrs[i];
            let addr = SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            ));
            let data = &self.bufs[i][..len];
            let seg = match self.seg[i] {
                0 => len.max(1),
                s => s,
            };
            data.chunks(seg).map(move |d| (d, addr))
        })
    }
}

/// Most datagrams the kernel accepts in one UDP GSO send (`UDP_MAX_SEGMENTS`).
const GSO_MAX_SEGMENTS: usize = 64;
/// Largest UDP payload of one (super-)datagram.
const GSO_MAX_BYTES: usize = 65_507;

/// Queues datagrams and sends them with `sendmmsg(2)`, many per system call. With UDP GSO
/// (`UDP_SEGMENT`, on by default) each run of equal-size datagrams to one destination leaves as
/// a single super-datagram that the kernel cuts up as late as possible (after the bridge, at
/// the NIC, or in the receiver's socket): one trip through the stack instead of dozens. The
/// first refusal turns GSO off for good and the batch is sent datagram by datagram.
pub struct SendBatch {
    bufs: Vec<Vec<u8>>,
    dests: Vec<libc::sockaddr_in>,
    /// Datagrams queued: `bufs[start..start + len]`.
    start: usize,
    len: usize,
    sent_bytes: u64,
    sent_packets: u64,
    gso: bool,
}

impl std::fmt::Debug for SendBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBatch")
            .field("slots", &self.bufs.len())
            .field("queued", &self.len)
            .field("gso", &self.gso)
            .finish()
    }
}

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: `sockaddr_in` is plain old data; all-zero is valid, and we fill every field
    // that matters.
    let mut s: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    s.sin_family = libc::AF_INET as libc::sa_family_t;
    s.sin_port = a.port().to_be();
    s.sin_addr.s_addr = u32::from(*a.ip()).to_be();
    s
}

fn same_dest(a: &libc::sockaddr_in, b: &libc::sockaddr_in) -> bool {
    a.sin_port == b.sin_port && a.sin_addr.s_addr == b.sin_addr.s_addr
}

impl SendBatch {
    /// Room for `count` datagrams.
    pub fn new(count: usize) -> Self {
        let count = count.max(1);
        SendBatch {
            bufs: (0..count).map(|_| Vec::with_capacity(9216)).collect(),
            // SAFETY: plain old data; all-zero is valid.
            dests: vec![unsafe { std::mem::zeroed() }; count],
            start: 0,
            len: 0,
            sent_bytes: 0,
            sent_packets: 0,
            gso: true,
        }
    }

    /// Turns UDP GSO on or off (on by default; turned off by itself when the kernel refuses).
    pub fn set_gso(&mut self, on: bool) {
        self.gso = on;
    }

    /// Whether UDP GSO is in use.
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Payload bytes sent so far.
    pub fn sent_bytes(&self) -> u64 {
        self.sent_bytes
    }

    /// Datagrams sent so far (each segment of a GSO send counts).
    pub fn sent_packets(&self) -> u64 {
        self.sent_packets
    }

    /// The buffer for the next datagram (fill it, then [`SendBatch::push`]); `None` when full.
    pub fn next_buf(&mut self) -> Option<&mut Vec<u8>> {
        if self.start + self.len >= self.bufs.len() {
            return None;
        }
        self.bufs.get_mut(self.start + self.len)
    }

    /// The datagram queued last.
    pub fn last(&self) -> Option<&[u8]> {
        (self.len > 0).then(|| self.bufs[self.start + self.len - 1].as_slice())
    }

    /// Queues the datagram written to the buffer from [`SendBatch::next_buf`], truncated to
    /// `size`.
    pub fn push(&mut self, size: usize, dest: SocketAddrV4) {
        let i = self.start + self.len;
        if let Some(b) = self.bufs.get_mut(i) {
            b.truncate(size);
            self.dests[i] = sockaddr_in(dest);
            self.len += 1;
        }
    }

    /// Datagrams queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether no more datagrams fit.
    pub fn is_full(&self) -> bool {
        self.start + self.len >= self.bufs.len()
    }

    /// Drops everything queued.
    pub fn clear(&mut self) {
        self.start = 0;
        self.len = 0;
    }

    /// Cuts the queue into messages: `(first, count)` runs, each one GSO send (or one
    /// datagram without GSO). A run holds datagrams of one size to one destination; only its
    /// last may be shorter.
    fn runs(&self) -> Vec<(usize, usize)> {
        let mut runs = Vec::new();
        let end = self.start + self.len;
        let mut i = self.start;
        while i < end {
            let seg = self.bufs[i].len();
            let mut j = i + 1;
            let mut total = seg;
            if self.gso && seg > 0 {
                while j < end
                    && j - i < GSO_MAX_SEGMENTS
                    && same_dest(&self.dests[i], &self.dests[j])
                    && total + self.bufs[j].len() <= GSO_MAX_BYTES
                {
                    let l = self.bufs[j].len();
                    if l > seg || l == 0 {
                        break;
                    }
                    total += l;
                    j += 1;
                    if l < seg {
                        break;
                    }
                }
            }
            runs.push((i, j - i));
            i = j;
        }
        runs
    }

    /// Sends as much of the queue as the socket takes now; returns how many datagrams went
    /// out.
    pub fn send(&mut self, sock: &tokio::net::UdpSocket) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        if self.len == 0 {
            return Ok(0);
        }
        let fd = sock.as_raw_fd();
        let runs = self.runs();
        let res = sock.try_io(tokio::io::Interest::WRITABLE, || {
            let mut iovs: Vec<libc::iovec> = self.bufs[self.start..self.start + self.len]
                .iter_mut()
                .map(|b| libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: b.len(),
                })
                .collect();
            let mut ctrl = vec![CmsgBuf([0; CMSG_BUF]); runs.len()];
            let mut msgs: Vec<libc::mmsghdr> = Vec::with_capacity(runs.len());
            for (r, &(first, count)) in runs.iter().enumerate() {
                // SAFETY: plain old data; all-zero is valid.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_name = (&mut self.dests[first] as *mut libc::sockaddr_in).cast();
                m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
                m.msg_hdr.msg_iov = &mut iovs[first - self.start];
                m.msg_hdr.msg_iovlen = count as _;
                if count > 1 {
                    let seg = self.bufs[first].len() as u16;
                    let buf = &mut ctrl[r];
                    m.msg_hdr.msg_control = buf.0.as_mut_ptr().cast();
                    // SAFETY: CMSG_SPACE/CMSG_LEN are pure size arithmetic. The control
                    // buffer is 8-aligned and CMSG_BUF (64) bytes, more than CMSG_SPACE(2), so
                    // CMSG_FIRSTHDR returns a pointer into it and the header and the u16
                    // written through CMSG_DATA stay inside it.
                    unsafe {
                        m.msg_hdr.msg_controllen = libc::CMSG_SPACE(2) as _;
                        let c = libc::CMSG_FIRSTHDR(&m.msg_hdr);
                        (*c).cmsg_level = libc::SOL_UDP;
                        (*c).cmsg_type = libc::UDP_SEGMENT;
                        (*c).cmsg_len = libc::CMSG_LEN(2) as _;
                        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
                    }
                }
                msgs.push(m);
            }
            // SAFETY: `msgs` has `runs.len()` entries, each pointing at `count` consecutive
            // live `iovec`s (which point into queued buffers of the stated lengths), at a
            // filled `sockaddr_in` and, for runs, at a filled control buffer; all of them
            // outlive the call and are not otherwise accessed during it.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    msgs.as_mut_ptr(),
                    msgs.len() as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(r as usize)
            }
        });
        let sent_msgs = match res {
            Ok(n) => n.min(runs.len()),
            Err(e)
                if self.gso
                    && runs.iter().any(|&(_, c)| c > 1)
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EINVAL | libc::EIO | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
                    ) =>
            {
                // The kernel or the route cannot segment: send datagram by datagram from now
                // on (the queue is intact; the caller sends it again).
                debug!(error = %e, "UDP GSO refused; sending datagrams one by one");
                self.gso = false;
                return Ok(0);
            }
            Err(e) => return Err(e),
        };
        let n: usize = runs[..sent_msgs].iter().map(|&(_, c)| c).sum();
        self.sent_bytes += self.bufs[self.start..self.start + n]
            .iter()
            .map(|b| b.len() as u64)
            .sum::<u64>();
        self.sent_packets += n as u64;
        self.start += n;
        self.len -= n;
        if self.len == 0 {
            self.start = 0;
        }
        Ok(n)
    }
}

/// Raises this process's soft limit of open descriptors to its hard limit (at most 65,536):
/// a sender holds a catch-up connection per receiver that cannot hear the group, and a
/// thousand of those pass the usual soft limit of 1,024. Best effort.
pub fn raise_descriptor_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    let want = lim.maximum.map_or(65_536, |m| m.min(65_536));
    if lim.current.is_some_and(|c| c < want) {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(want),
                maximum: lim.maximum,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_addresses_and_loopback_name() {
        assert_eq!(
            resolve_interface("10.1.2.3").unwrap(),
            Ipv4Addr::new(10, 1, 2, 3)
        );
        assert_eq!(resolve_interface("lo").unwrap(), Ipv4Addr::LOCALHOST);
        let err = resolve_interface("no-such-if0").unwrap_err();
        assert!(err.to_string().contains("no-such-if0"), "{err}");
    }

    #[tokio::test]
    async fn recvmmsg_batch_gets_every_datagram_with_its_sender() {
        let rx = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tx = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = rx.local_addr().unwrap();
        for i in 0..5u8 {
            tx.send_to(&[i; 10], to).await.unwrap();
        }
        let mut batch = RecvBatch::new(4, 2048);
        rx.readable().await.unwrap();
        let mut got = Vec::new();
        for _ in 0..10 {
            match batch.recv(&rx) {
                Ok(_) => {
                    for (d, from) in batch.datagrams() {
                        assert_eq!(from, tx.local_addr().unwrap());
                        got.push(d.to_vec());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if got.len() == 5 {
                        break;
                    }
                    rx.readable().await.unwrap();
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, (0..5u8).map(|i| vec![i; 10]).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn sendmmsg_batch_delivers_in_order() {
        let rx = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tx = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let SocketAddr::V4(to) = rx.local_addr().unwrap() else {
            unreachable!("bound to IPv4")
        };
        let mut batch = SendBatch::new(3);
        for i in 0..3u8 {
            let b = batch.next_buf().unwrap();
            b.clear();
            b.extend_from_slice(&[i; 20]);
            batch.push(20 - usize::from(i), to);
        }
        assert!(batch.is_full() && batch.next_buf().is_none());
        while !batch.is_empty() {
            tx.writable().await.unwrap();
            let _ = batch.send(&tx);
        }
        let mut buf = [0u8; 64];
        for i in 0..3u8 {
            let (n, _) = rx.recv_from(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], &vec![i; 20 - usize::from(i)][..]);
        }
    }

    fn v4(s: &tokio::net::UdpSocket) -> SocketAddrV4 {
        match s.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!("bound to IPv4"),
        }
    }

    fn queue(batch: &mut SendBatch, len: usize, fill: u8, to: SocketAddrV4) {
        let b = batch.next_buf().unwrap();
        b.clear();
        b.resize(len, fill);
        batch.push(len, to);
    }

    #[test]
    fn gso_runs_group_equal_sizes_to_one_destination() {
        let a = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1000);
        let b = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1001);
        let mut batch = SendBatch::new(200);
        // 3 equal + 1 shorter (closes the run), then 2 to another destination, then a
        // larger one (starts a run), then 150 equal ones (cut at 64 segments / 64 KiB).
        for (len, to) in [
            (100, a),
            (100, a),
            (100, a),
            (40, a),
            (100, a),
            (100, b),
            (100, b),
        ] {
            queue(&mut batch, len, 1, to);
        }
        queue(&mut batch, 200, 2, b);
        for _ in 0..150 {
            queue(&mut batch, 1472, 3, b);
        }
        let runs = batch.runs();
        assert_eq!(&runs[..4], &[(0, 4), (4, 1), (5, 2), (7, 1)]);
        // 1472-byte datagrams: 44 fit in 65 507 bytes.
        assert_eq!(&runs[4..], &[(8, 44), (52, 44), (96, 44), (140, 18)]);
        batch.set_gso(false);
        assert!(batch.runs().iter().all(|&(_, c)| c == 1));
    }

    /// Sends `count` datagrams through a [`SendBatch`] (GSO as given) and receives them with a
    /// [`RecvBatch`] on a GRO-enabled socket: every datagram arrives, whole and in order.
    async fn send_and_receive(gso: bool, count: usize) -> SendBatch {
        let rx_std = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        rx_std
            .bind(&SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0).into())
            .unwrap();
        rx_std.set_recv_buffer_size(4 << 20).unwrap();
        enable_gro(&rx_std);
        let rx = into_tokio(rx_std).unwrap();
        let tx = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = v4(&rx);
        let mut batch = SendBatch::new(count);
        batch.set_gso(gso);
        let mut want = Vec::new();
        for i in 0..count {
            // All 1200 bytes but the last; content tells them apart.
            let len = if i + 1 == count { 300 } else { 1200 };
            let d: Vec<u8> = (0..len).map(|j| (i * 7 + j) as u8).collect();
            let b = batch.next_buf().unwrap();
            b.clear();
            b.extend_from_slice(&d);
            batch.push(len, to);
            want.push(d);
        }
        while !batch.is_empty() {
            tx.writable().await.unwrap();
            match batch.send(&tx) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(batch.sent_packets(), count as u64);
        let mut recv = RecvBatch::new(8, 65_536);
        let mut got = Vec::new();
        while got.len() < count {
            tokio::time::timeout(std::time::Duration::from_secs(2), rx.readable())
                .await
                .expect("all datagrams arrive")
                .unwrap();
            if recv.recv(&rx).is_ok() {
                for (d, from) in recv.datagrams() {
                    assert_eq!(from, tx.local_addr().unwrap());
                    got.push(d.to_vec());
                }
            }
        }
        assert_eq!(got, want);
        batch
    }

    #[tokio::test]
    async fn gso_sends_arrive_whole_and_in_order() {
        let batch = send_and_receive(true, 100).await;
        // Loopback segments UDP GSO in software, so the kernel must have accepted it.
        assert!(batch.gso(), "GSO refused on loopback");
        assert_eq!(batch.sent_bytes(), 99 * 1200 + 300);
    }

    #[tokio::test]
    async fn plain_sends_arrive_whole_and_in_order() {
        let batch = send_and_receive(false, 50).await;
        assert!(!batch.gso());
    }

    #[tokio::test]
    async fn multicast_on_loopback_reaches_two_receivers() {
        let cfg = MulticastConfig {
            group: Ipv4Addr::new(239, 77, 9, 1),
            port: 47_311,
            interface: Some(Ipv4Addr::LOCALHOST),
            ttl: 1,
            loopback: false,
            buffer: 1 << 20,
        };
        let r1 = receiver_socket(&cfg).unwrap();
        let r2 = receiver_socket(&cfg).unwrap();
        let s = sender_socket(&cfg).unwrap();
        s.send_to(b"hello", cfg.group_addr()).await.unwrap();
        let mut buf = [0u8; 16];
        for r in [r1, r2] {
            let (n, _) =
                tokio::time::timeout(std::time::Duration::from_secs(2), r.recv_from(&mut buf))
                    .await
                    .unwrap()
                    .unwrap();
            assert_eq!(&buf[..n], b"hello");
        }
    }

    /// A second sender socket for the same address and port gets a port of its own (sharing
    /// one, unicast reports would go to either at the kernel's whim), and a receiver can
    /// still bind the group's port after both.
    #[tokio::test]
    async fn a_second_sender_on_a_port_takes_another() {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = MulticastConfig {
            group: Ipv4Addr::new(239, 255, 91, 7),
            port,
            interface: Some(Ipv4Addr::LOCALHOST),
            ttl: 1,
            loopback: true,
            buffer: 1 << 20,
        };
        let first = sender_socket(&cfg).unwrap();
        let second = sender_socket(&cfg).unwrap();
        assert_eq!(first.local_addr().unwrap().port(), port);
        let other = second.local_addr().unwrap().port();
        assert_ne!(other, port, "two senders share port {port}");
        let r = receiver_socket(&cfg).unwrap();
        second
            .send_to(b"from the second", cfg.group_addr())
            .await
            .unwrap();
        let mut buf = [0u8; 32];
        let (n, from) =
            tokio::time::timeout(std::time::Duration::from_secs(2), r.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(&buf[..n], b"from the second");
        assert_eq!(from.port(), other, "its datagrams carry its own port");
    }

    /// A soft descriptor limit below the hard one is raised (to at most 65,536).
    #[test]
    fn the_soft_descriptor_limit_is_raised() {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let before = getrlimit(Resource::Nofile);
        let hard = before.maximum.map_or(65_536, |m| m.min(65_536));
        if hard <= 512 {
            eprintln!("SKIPPED: hard descriptor limit {hard} is too low to test raising it");
            return;
        }
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(512),
                maximum: before.maximum,
            },
        )
        .unwrap();
        raise_descriptor_limit();
        assert_eq!(getrlimit(Resource::Nofile).current, Some(hard));
    }
}
