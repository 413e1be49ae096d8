//! UDP sockets for multicast: group membership on a chosen interface, TTL, loopback, large
//! buffers (with a warning when the kernel caps them), and interface-name resolution.
//!
//! This is the only module of the crate allowed to use `unsafe` (for `getifaddrs`); every block
//! says why it is sound.
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

/// Asks for `want` bytes of receive and send buffer and warns when the kernel gives less.
fn set_buffers(sock: &Socket, want: usize) {
    for (name, set, get) in [
        (
            "SO_RCVBUF",
            Socket::set_recv_buffer_size as fn(&Socket, usize) -> io::Result<()>,
            Socket::recv_buffer_size as fn(&Socket) -> io::Result<usize>,
        ),
        (
            "SO_SNDBUF",
            Socket::set_send_buffer_size,
            Socket::send_buffer_size,
        ),
    ] {
        if let Err(e) = set(sock, want) {
            warn!(option = name, error = %e, "cannot set socket buffer size");
            continue;
        }
        // Linux doubles the value it stores (bookkeeping overhead), so compare against half.
        match get(sock) {
            Ok(got) if got / 2 < want => warn!(
                option = name,
                asked = want,
                got = got / 2,
                "kernel capped the socket buffer (raise net.core.rmem_max/wmem_max); \
                 expect more loss at high rates"
            ),
            Ok(got) => debug!(option = name, got, "socket buffer"),
            Err(e) => warn!(option = name, error = %e, "cannot read socket buffer size"),
        }
    }
}

/// A non-blocking UDP socket for sending to the group and receiving receivers' unicast
/// reports, bound to the interface address and the group's port.
pub fn sender_socket(cfg: &MulticastConfig) -> Result<tokio::net::UdpSocket, CastError> {
    let sock =
        Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(io_err("socket"))?;
    // Bound to the group's port number so that a receiver told `--sender HOST` knows where to
    // send its reports without ever hearing an announcement.
    sock.set_reuse_address(true)
        .map_err(io_err("SO_REUSEADDR"))?;
    // Without this, a socket bound to the wildcard address gets every group's traffic on the
    // port as soon as any local socket joined it.
    let _ = sock.set_multicast_all_v4(false);
    let bind = SocketAddrV4::new(cfg.interface.unwrap_or(Ipv4Addr::UNSPECIFIED), cfg.port);
    sock.bind(&bind.into()).map_err(io_err("bind"))?;
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
    into_tokio(sock)
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

/// Receives up to `count` datagrams per system call with `recvmmsg(2)`: at tens of thousands
/// of datagrams per second the per-call overhead is a large share of a receiver's CPU.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    addrs: Vec<libc::sockaddr_in>,
    iovs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    received: usize,
}

// SAFETY: the raw pointers inside `iovs`/`msgs` point only into this struct's own heap
// buffers (`bufs`, `addrs`), which move with it; nothing is shared with other threads.
unsafe impl Send for RecvBatch {}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("slots", &self.bufs.len())
            .field("received", &self.received)
            .finish()
    }
}

impl RecvBatch {
    /// `count` slots of `size` bytes each.
    pub fn new(count: usize, size: usize) -> Self {
        let count = count.max(1);
        RecvBatch {
            bufs: (0..count).map(|_| vec![0u8; size]).collect(),
            // SAFETY: `sockaddr_in` is plain old data; all-zero is a valid value.
            addrs: vec![unsafe { std::mem::zeroed() }; count],
            iovs: Vec::with_capacity(count),
            // SAFETY: `mmsghdr` is plain old data; all-zero is a valid value.
            msgs: vec![unsafe { std::mem::zeroed() }; count],
            received: 0,
        }
    }

    /// Receives whatever is queued (at most one batch) without blocking. `Ok(0)` never
    /// happens: an empty queue is `Err(WouldBlock)`.
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
                m.msg_len = 0;
            }
            // SAFETY: every `mmsghdr` points at one `iovec` describing a live buffer of the
            // stated length and at a `sockaddr_in` of the stated size, all owned by `self` and
            // not touched until the call returns; `vlen` equals the number of entries.
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
        self.received = n;
        Ok(n)
    }

    /// Datagram `i` of the last batch: its bytes (truncated to the slot size) and sender.
    pub fn get(&self, i: usize) -> Option<(&[u8], SocketAddr)> {
        if i >= self.received {
            return None;
        }
        let len = (self.msgs[i].msg_len as usize).min(self.bufs[i].len());
        let a = &self.addrs[i];
        let addr = SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
            u16::from_be(a.sin_port),
        ));
        Some((&self.bufs[i][..len], addr))
    }
}

/// Queues datagrams and sends them with `sendmmsg(2)`, many per system call.
pub struct SendBatch {
    bufs: Vec<Vec<u8>>,
    dests: Vec<libc::sockaddr_in>,
    /// Datagrams queued: `bufs[start..start + len]`.
    start: usize,
    len: usize,
    sent_bytes: u64,
}

impl std::fmt::Debug for SendBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBatch")
            .field("slots", &self.bufs.len())
            .field("queued", &self.len)
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
        }
    }

    /// Payload bytes sent so far.
    pub fn sent_bytes(&self) -> u64 {
        self.sent_bytes
    }

    /// The buffer for the next datagram (fill it, then [`SendBatch::push`]); `None` when full.
    pub fn next_buf(&mut self) -> Option<&mut Vec<u8>> {
        if self.start + self.len >= self.bufs.len() {
            return None;
        }
        self.bufs.get_mut(self.start + self.len)
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

    /// Sends as much of the queue as the socket takes now; returns how many went out.
    pub fn send(&mut self, sock: &tokio::net::UdpSocket) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        if self.len == 0 {
            return Ok(0);
        }
        let fd = sock.as_raw_fd();
        let (start, len) = (self.start, self.len);
        let n = sock.try_io(tokio::io::Interest::WRITABLE, || {
            let mut iovs: Vec<libc::iovec> = self.bufs[start..start + len]
                .iter_mut()
                .map(|b| libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: b.len(),
                })
                .collect();
            let mut msgs: Vec<libc::mmsghdr> = (0..len)
                .map(|i| {
                    // SAFETY: plain old data; all-zero is valid.
                    let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    m.msg_hdr.msg_name =
                        (&mut self.dests[start + i] as *mut libc::sockaddr_in).cast();
                    m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
                    m.msg_hdr.msg_iov = &mut iovs[i];
                    m.msg_hdr.msg_iovlen = 1;
                    m
                })
                .collect();
            // SAFETY: `msgs` has `len` entries, each pointing at one live `iovec` (which points
            // into a queued buffer of the stated length) and at a filled `sockaddr_in`; all of
            // them outlive the call and are not otherwise accessed during it.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    msgs.as_mut_ptr(),
                    len as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(r as usize)
            }
        })?;
        let n = n.min(self.len);
        self.sent_bytes += self.bufs[self.start..self.start + n]
            .iter()
            .map(|b| b.len() as u64)
            .sum::<u64>();
        self.start += n;
        self.len -= n;
        if self.len == 0 {
            self.start = 0;
        }
        Ok(n)
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
                Ok(n) => {
                    for i in 0..n {
                        let (d, from) = batch.get(i).unwrap();
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
        assert!(batch.get(4).is_none());
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
}
