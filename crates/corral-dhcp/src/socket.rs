//! The server's UDP sockets: bound to one interface only (`SO_BINDTODEVICE`), able to
//! broadcast, and sharing the port with servers on other interfaces (`SO_REUSEADDR`).

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};

use socket2::{Domain, Protocol, Socket, Type};

use crate::error::DhcpError;

/// The receive and send buffer we ask for. A burst of 2000 clients booting at once is 2000
/// DISCOVERs of about 2.3 KiB of kernel memory each (`skb` truesize): the kernel's default cap
/// (`net.core.rmem_max`, 208 KiB on a stock Debian) holds about 90 of them.
pub(crate) const SOCKET_BUFFER: usize = 16 << 20;

/// A tokio UDP socket on `0.0.0.0:port` that only sees and sends traffic of `interface`.
pub(crate) fn bind(interface: &str, port: u16) -> Result<tokio::net::UdpSocket, DhcpError> {
    let err = |op: &'static str| {
        move |source| DhcpError::Bind {
            interface: interface.to_owned(),
            port,
            op,
            source,
        }
    };
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(err("socket"))?;
    // Never answer on another interface: the kernel delivers only this device's packets.
    s.bind_device(Some(interface.as_bytes()))
        .map_err(err("SO_BINDTODEVICE"))?;
    s.set_reuse_address(true).map_err(err("SO_REUSEADDR"))?;
    s.set_broadcast(true).map_err(err("SO_BROADCAST"))?;
    set_buffers(&s, SOCKET_BUFFER);
    s.set_nonblocking(true).map_err(err("O_NONBLOCK"))?;
    s.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into())
        .map_err(err("bind"))?;
    tokio::net::UdpSocket::from_std(s.into()).map_err(err("tokio registration"))
}

/// What [`set_buffers`] obtained, in usable bytes (the kernel reports twice this).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Buffers {
    pub(crate) recv: usize,
    pub(crate) send: usize,
}

/// Asks for `want` bytes of receive and send buffer. When `net.core.rmem_max`/`wmem_max` caps
/// the request, retries with `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE` (allowed with
/// `CAP_NET_ADMIN`, which a DHCP server on port 67 normally has), and warns with the sysctl to
/// raise only if that fails too. Never fails: a small buffer costs drops in bursts, not
/// correctness.
pub(crate) fn set_buffers(sock: &Socket, want: usize) -> Buffers {
    type Set = fn(&Socket, usize) -> io::Result<()>;
    type Get = fn(&Socket) -> io::Result<usize>;
    let mut got = [0usize; 2];
    for (i, (name, sysctl, force, set, get)) in [
        (
            "SO_RCVBUF",
            "net.core.rmem_max",
            (|s: &Socket, v: usize| rustix::net::sockopt::set_socket_recv_buffer_size_force(s, v))
                as Force,
            Socket::set_recv_buffer_size as Set,
            Socket::recv_buffer_size as Get,
        ),
        (
            "SO_SNDBUF",
            "net.core.wmem_max",
            (|s: &Socket, v: usize| rustix::net::sockopt::set_socket_send_buffer_size_force(s, v))
                as Force,
            Socket::set_send_buffer_size as Set,
            Socket::send_buffer_size as Get,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        if let Err(e) = set(sock, want) {
            tracing::warn!(option = name, error = %e, "cannot set the DHCP socket buffer size");
        }
        // Linux doubles the value it stores (bookkeeping overhead): usable is half.
        let usable = |s: &Socket| get(s).map(|g| g / 2).unwrap_or(0);
        if usable(sock) < want
            && let Err(e) = force(sock, want)
        {
            tracing::debug!(option = name, error = %e, "forcing the socket buffer size refused");
        }
        got[i] = usable(sock);
        if got[i] < want {
            tracing::warn!(
                option = name,
                asked = want,
                got = got[i],
                "kernel capped the DHCP socket buffer: a burst of clients booting at once will \
                 lose packets; raise it with `sysctl -w {sysctl}={want}` or run with CAP_NET_ADMIN"
            );
        }
    }
    Buffers {
        recv: got[0],
        send: got[1],
    }
}

/// `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE` (socket2 does not wrap them; rustix does).
type Force = fn(&Socket, usize) -> rustix::io::Result<()>;

#[cfg(test)]
mod tests {
    use super::*;

    fn rmem_max() -> usize {
        std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .expect("read net.core.rmem_max")
            .trim()
            .parse()
            .expect("rmem_max is a number")
    }

    /// Asking beyond `net.core.rmem_max`: root gets the whole buffer (`SO_RCVBUFFORCE`),
    /// anyone else gets the cap, and the result says which.
    #[test]
    fn buffers_beyond_rmem_max_are_forced_when_privileged() {
        let want = 2 * rmem_max().max(SOCKET_BUFFER);
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        let got = set_buffers(&s, want);
        if corral_testkit::is_root() {
            assert!(got.recv >= want, "root asked {want}, got {got:?}");
            assert!(got.send >= want, "root asked {want}, got {got:?}");
        } else {
            eprintln!("not root: checking only that the cap is reported");
            assert!(
                got.recv < want,
                "{got:?} beyond rmem_max without privilege?"
            );
        }
        assert_eq!(s.recv_buffer_size().unwrap() / 2, got.recv);
    }

    /// A modest request is granted as asked, without forcing.
    #[test]
    fn small_buffers_are_granted() {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        let got = set_buffers(&s, 64 << 10);
        assert_eq!(got.recv, 64 << 10);
        assert_eq!(got.send, 64 << 10);
    }
}
