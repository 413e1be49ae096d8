//! The server's UDP sockets: bound to one interface only (`SO_BINDTODEVICE`), able to
//! broadcast, and sharing the port with servers on other interfaces (`SO_REUSEADDR`).

use std::net::{Ipv4Addr, SocketAddrV4};

use socket2::{Domain, Protocol, Socket, Type};

use crate::error::DhcpError;

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
    // Bursts of thousands of clients: a large receive buffer absorbs them (the kernel may cap
    // it at net.core.rmem_max; that is fine).
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.set_nonblocking(true).map_err(err("O_NONBLOCK"))?;
    s.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into())
        .map_err(err("bind"))?;
    tokio::net::UdpSocket::from_std(s.into()).map_err(err("tokio registration"))
}
