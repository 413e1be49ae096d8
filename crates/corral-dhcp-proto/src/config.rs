//! The server's configuration as plain data (the driver builds it from the site directory).

use std::net::Ipv4Addr;
use std::time::Duration;

use corral_model::MacAddr;
use ipnet::Ipv4Net;

/// How the server takes part in DHCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// A full server: addresses from pools and reservations, plus boot answers.
    Full,
    /// ProxyDHCP (PXE spec §2.2.5, RFC 4578): boot answers only; another server hands out
    /// addresses.
    Proxy,
}

/// One served subnet (`[[dhcp.network]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// Name for logs.
    pub name: String,
    /// The subnet.
    pub cidr: Ipv4Net,
    /// Dynamic range (inclusive); `None`: only reservations are served.
    pub pool: Option<(Ipv4Addr, Ipv4Addr)>,
    /// Option 3.
    pub gateway: Option<Ipv4Addr>,
    /// Option 6.
    pub dns: Vec<Ipv4Addr>,
    /// Option 15.
    pub domain: Option<String>,
    /// Lease time (option 51); T1/T2 are 1/2 and 7/8 of it (RFC 2131 §4.4.5).
    pub lease: Duration,
}

/// A machine from `machines/`: a fixed address and/or a host name for a MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The machine's card.
    pub mac: MacAddr,
    /// Its fixed address; `None`: from the pool.
    pub ip: Option<Ipv4Addr>,
    /// Its host name (option 12).
    pub hostname: Option<String>,
}

/// Everything the state machine needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Full or proxy.
    pub mode: Mode,
    /// Our address on the served interface: server identifier (option 54) and siaddr.
    pub server_ip: Ipv4Addr,
    /// The served interface's name (for boot queries and events).
    pub interface: String,
    /// The UDP port we serve on (67 normally); replies to relays go to this port on giaddr.
    pub server_port: u16,
    /// Served subnets.
    pub networks: Vec<Network>,
    /// Fixed addresses and host names.
    pub reservations: Vec<Reservation>,
    /// How long an offered address stays reserved for the client (default 30 s).
    pub offer_hold: Duration,
    /// How long a declined address stays out of use (default 10 min).
    pub decline_quarantine: Duration,
}

impl ServerConfig {
    /// A configuration with the default timers.
    pub fn new(mode: Mode, server_ip: Ipv4Addr, interface: impl Into<String>) -> ServerConfig {
        ServerConfig {
            mode,
            server_ip,
            interface: interface.into(),
            server_port: 67,
            networks: Vec::new(),
            reservations: Vec::new(),
            offer_hold: Duration::from_secs(30),
            decline_quarantine: Duration::from_secs(600),
        }
    }
}
