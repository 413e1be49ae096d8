//! The boot decision point and the events the server reports.
//!
//! The server does not know what a machine should boot: the netboot layer does. For every
//! client that wants to boot ([`crate::Firmware::wants_boot`]) the server builds a
//! [`BootQuery`] and asks the caller's decision function for a [`BootAnswer`]; plain DHCP
//! clients get an address without a query.

use std::net::Ipv4Addr;

use corral_model::{MacAddr, SessionId};

use crate::client::ClientInfo;

/// What the netboot layer is asked about one PXE/HTTP/iPXE client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootQuery {
    /// Who is asking.
    pub client: ClientInfo,
    /// The address the client gets (full mode) or has (proxy 4011 request), if known.
    pub ip: Option<Ipv4Addr>,
    /// The interface the request arrived on.
    pub interface: String,
    /// True in ProxyDHCP mode (another server hands out the address).
    pub proxy: bool,
}

/// What the client is told to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// Fetch `filename` by TFTP from us (siaddr = our address).
    Tftp {
        /// Path on the TFTP server.
        filename: String,
    },
    /// Fetch this URL (UEFI HTTP Boot, or iPXE's script).
    Http {
        /// An absolute http URL.
        url: String,
    },
    /// Full mode: an address without a boot file. Proxy mode: no answer, so the firmware
    /// goes on to its next boot device.
    NoBootFile,
    /// Do not answer at all.
    Ignore,
}

/// The decision with its reason (for the audit record) and the boot session it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootAnswer {
    /// What to hand out.
    pub boot: Boot,
    /// Why, in words ("matched machine web01, profile debian12: BIOS PXE gets undionly.kpxe").
    pub reason: String,
    /// The boot session, when the netboot layer opened or continued one.
    pub session: Option<SessionId>,
}

impl BootAnswer {
    /// An answer without a session.
    pub fn new(boot: Boot, reason: impl Into<String>) -> BootAnswer {
        BootAnswer {
            boot,
            reason: reason.into(),
            session: None,
        }
    }
}

/// What happened to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DhcpEventKind {
    /// DHCPOFFER sent.
    Offer,
    /// DHCPACK sent (lease bound or renewed).
    Ack,
    /// DHCPNAK sent.
    Nak,
    /// DHCPRELEASE received; the address is free again.
    Release,
    /// DHCPDECLINE received; the address is quarantined.
    Decline,
    /// DHCPINFORM answered.
    Inform,
    /// ProxyDHCP offer sent (port 67).
    ProxyOffer,
    /// ProxyDHCP ACK sent (port 4011).
    ProxyAck,
    /// A request was not answered; the reason says why.
    Dropped,
    /// An expired lease was reclaimed.
    Expired,
}

impl DhcpEventKind {
    /// Lowercase name for the store's `kind` column.
    pub fn as_str(self) -> &'static str {
        match self {
            DhcpEventKind::Offer => "offer",
            DhcpEventKind::Ack => "ack",
            DhcpEventKind::Nak => "nak",
            DhcpEventKind::Release => "release",
            DhcpEventKind::Decline => "decline",
            DhcpEventKind::Inform => "inform",
            DhcpEventKind::ProxyOffer => "proxy-offer",
            DhcpEventKind::ProxyAck => "proxy-ack",
            DhcpEventKind::Dropped => "dropped",
            DhcpEventKind::Expired => "expired",
        }
    }
}

/// One event, for the audit store (through the netboot layer's `BootPolicy::on_event`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpEvent {
    /// What happened.
    pub kind: DhcpEventKind,
    /// The client's MAC, when the request had one.
    pub mac: Option<MacAddr>,
    /// The address concerned (offered, acked, released...).
    pub ip: Option<Ipv4Addr>,
    /// The transaction id.
    pub xid: u32,
    /// The boot session, when a boot decision carried one.
    pub session: Option<SessionId>,
    /// Host name (reservation's, else the client's option 12).
    pub hostname: Option<String>,
    /// Why, in words.
    pub reason: String,
    /// What the client is, when classified.
    pub client: Option<ClientInfo>,
    /// What it was told to boot, when it asked.
    pub boot: Option<Boot>,
}
