//! Receiving requests together with the local address they were sent to (`IP_PKTINFO`,
//! `IPV6_RECVPKTINFO`), so a server bound to `0.0.0.0` answers each client from the address
//! that client used: PXE ROMs drop replies from any other address.
//!
//! This is the only module of the crate allowed to use `unsafe` (`setsockopt`, `recvmsg` and the
//! `CMSG_*` walk); socket2 and tokio expose neither the option nor the control messages.
//! Every block has a `// SAFETY:` comment.
#![allow(unsafe_code)]

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};

use tokio::io::Interest;
use tokio::net::UdpSocket;

/// One received datagram.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Received {
    pub len: usize,
    pub peer: SocketAddr,
    /// The destination address of the datagram, when the kernel told us.
    pub local: Option<IpAddr>,
    /// Interface index it arrived on (0 if unknown); the scope of IPv6 link-local replies.
    pub ifindex: u32,
}

fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: `fd` is an open socket borrowed for the call; the option value points to a live
    // c_int and the length passed is its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks the kernel to attach the destination address to every datagram.
pub(crate) fn enable_pktinfo(socket: &UdpSocket) -> io::Result<()> {
    let fd = socket.as_raw_fd();
    match socket.local_addr()? {
        SocketAddr::V4(_) => setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO),
        SocketAddr::V6(_) => {
            setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)?;
            // Dual-stack sockets also see IPv4 (v4-mapped) traffic; best effort.
            let _ = setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO);
            Ok(())
        }
    }
}

/// Receives one datagram with its destination address.
pub(crate) async fn recv(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<Received> {
    socket
        .async_io(Interest::READABLE, || recvmsg(socket.as_raw_fd(), buf))
        .await
}

fn recvmsg(fd: RawFd, buf: &mut [u8]) -> io::Result<Received> {
    // SAFETY: all-zero is a valid `sockaddr_storage` and `msghdr` (plain C structs).
    let mut addr: libc::sockaddr_storage = unsafe { zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // u64 elements keep the control buffer aligned for `cmsghdr`.
    let mut control = [0u64; 32];
    // SAFETY: see above.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&mut addr as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 32]>() as _;
    // SAFETY: `msg` points at `addr`, `iov` (which points at `buf`) and `control`, all live and
    // writable for the call with the lengths given; the socket is non-blocking (tokio).
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let peer = sockaddr_to_std(&addr)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unknown address family"))?;
    let mut local = None;
    let mut ifindex = 0;
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR only walk within
    // `msg_control[..msg_controllen]` and return null at the end.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: non-null headers from CMSG_FIRSTHDR/NXTHDR lie inside `control`.
        let hdr = unsafe { &*cmsg };
        // SAFETY: CMSG_DATA of a valid header points inside the same control message; the
        // payload is read unaligned and only when the level/type say it holds that struct.
        let data = unsafe { libc::CMSG_DATA(cmsg) };
        if hdr.cmsg_level == libc::IPPROTO_IP && hdr.cmsg_type == libc::IP_PKTINFO {
            // SAFETY: see above; IP_PKTINFO carries an `in_pktinfo`.
            let info: libc::in_pktinfo = unsafe { std::ptr::read_unaligned(data.cast()) };
            let dst = Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr));
            let spec = Ipv4Addr::from(u32::from_be(info.ipi_spec_dst.s_addr));
            // A broadcast or multicast request is answered from our own address.
            let ip = if dst.is_broadcast() || dst.is_multicast() {
                spec
            } else {
                dst
            };
            local = Some(IpAddr::V4(ip));
            ifindex = info.ipi_ifindex as u32;
        } else if hdr.cmsg_level == libc::IPPROTO_IPV6 && hdr.cmsg_type == libc::IPV6_PKTINFO {
            // SAFETY: see above; IPV6_PKTINFO carries an `in6_pktinfo`.
            let info: libc::in6_pktinfo = unsafe { std::ptr::read_unaligned(data.cast()) };
            local = Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
            ifindex = info.ipi6_ifindex;
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok(Received {
        len: n as usize,
        peer,
        local,
        ifindex,
    })
}

fn sockaddr_to_std(addr: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(addr.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a `sockaddr_in`, which it is large and
            // aligned enough for.
            let a =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above for `sockaddr_in6`.
            let a =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// The address a transfer socket binds to so that replies leave from `local`.
pub(crate) fn reply_addr(
    listen: SocketAddr,
    peer: SocketAddr,
    local: Option<IpAddr>,
    ifindex: u32,
) -> SocketAddr {
    let ip = if !listen.ip().is_unspecified() {
        listen.ip()
    } else {
        local.unwrap_or(listen.ip())
    };
    match (peer, ip) {
        (SocketAddr::V6(_), IpAddr::V4(v4)) => {
            SocketAddr::V6(SocketAddrV6::new(v4.to_ipv6_mapped(), 0, 0, 0))
        }
        (_, IpAddr::V6(v6)) => {
            let scope = if v6.is_unicast_link_local() {
                ifindex
            } else {
                0
            };
            SocketAddr::V6(SocketAddrV6::new(v6, 0, 0, scope))
        }
        (_, IpAddr::V4(v4)) => SocketAddr::V4(SocketAddrV4::new(v4, 0)),
    }
}

/// `UDP_SEGMENT` from `linux/udp.h` (UDP generic segmentation offload, Linux 4.18+); not in
/// libc for glibc targets.
const UDP_SEGMENT: libc::c_int = 103;

/// Largest GSO super-datagram: an IP datagram's size limit.
pub(crate) const GSO_MAX_BYTES: usize = 65000;

/// Sends `buf` to `peer` as datagrams of `segment` bytes each (the last may be shorter) in one
/// `sendmsg` with UDP GSO: a window of DATA packets costs one system call.
pub(crate) async fn send_segments(
    socket: &UdpSocket,
    buf: &[u8],
    segment: u16,
    peer: SocketAddr,
) -> io::Result<()> {
    socket
        .async_io(Interest::WRITABLE, || {
            sendmsg_gso(socket.as_raw_fd(), buf, segment, peer)
        })
        .await
        .map(|_| ())
}

fn sendmsg_gso(fd: RawFd, buf: &[u8], segment: u16, peer: SocketAddr) -> io::Result<usize> {
    let addr = socket2::SockAddr::from(peer);
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut control = [0u64; 4];
    // SAFETY: all-zero is a valid `msghdr`.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = addr.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = addr.len();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as _;
    // SAFETY: `msg_control` points at `control` (32 bytes, aligned), which has room for one
    // header plus a u16 (CMSG_SPACE(2) = 24 bytes), so CMSG_FIRSTHDR is non-null and the
    // header and its data lie inside `control`.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment);
    }
    // SAFETY: `msg` points at `addr`, `iov` (pointing at `buf`, only read by the kernel) and
    // `control`, all alive for the call.
    let n = unsafe { libc::sendmsg(fd, &msg, 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
