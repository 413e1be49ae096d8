//! Sans-IO DHCPv4 server and ProxyDHCP for corral's netboot.
//!
//! This crate decides what to answer to one DHCP datagram: it classifies the client (PXE,
//! UEFI HTTP Boot, iPXE; architecture from option 93), chooses an address from the site's pools
//! and reservations, keeps the lease table, and builds the reply and its destination. It never
//! touches a socket, a file or the clock: the driver (`corral-dhcp`) passes `now`, the bytes
//! and a boot decision function, then persists [`LeaseChange`]s and sends the [`Reply`].
//!
//! It is *not* a DHCP client, not DHCPv6, and does not speak BOOTP without the DHCP message
//! type (option 53); it never pings or ARPs (it broadcasts to clients without an address).
//!
//! # Entry types
//! - [`Server`]: the state machine; [`Server::handle`] takes a [`Datagram`] and returns a
//!   [`Step`] (reply, lease changes to persist first, events); [`Server::expire`] reclaims.
//! - [`ServerConfig`], [`Network`], [`Reservation`], [`Mode`]: its configuration as data.
//! - [`ClientInfo`], [`Arch`] (the IANA table [`ARCH_TABLE`]), [`Firmware`]: who asks.
//! - [`BootQuery`] → [`BootAnswer`] ([`Boot`]): the decision point handed to the netboot layer.
//! - [`DhcpEvent`]: what happened and why, for the audit store.
//! - [`Packet`]: request decoding with option overload and RFC 3396 concatenation;
//!   [`DecodeError`] for malformed input.
//!
//! # RFCs
//! [RFC 2131](https://www.rfc-editor.org/rfc/rfc2131) (DHCP),
//! [RFC 2132](https://www.rfc-editor.org/rfc/rfc2132) (options),
//! [RFC 3004](https://www.rfc-editor.org/rfc/rfc3004) (user class),
//! [RFC 3011](https://www.rfc-editor.org/rfc/rfc3011) (subnet selection),
//! [RFC 3046](https://www.rfc-editor.org/rfc/rfc3046) (relay agent information, echoed),
//! [RFC 3396](https://www.rfc-editor.org/rfc/rfc3396) (long options),
//! [RFC 4578](https://www.rfc-editor.org/rfc/rfc4578) (PXE options), and the PXE 2.1
//! specification for ProxyDHCP and port 4011. The wire format of replies is `dhcproto`'s.

mod boot;
mod client;
mod config;
mod error;
mod lease;
mod packet;
mod server;

#[cfg(test)]
mod tests;

pub use boot::{Boot, BootAnswer, BootQuery, DhcpEvent, DhcpEventKind};
pub use client::{ARCH_TABLE, Arch, ArchRow, ClientInfo, Firmware, Platform};
pub use config::{Mode, Network, Reservation, ServerConfig};
pub use error::DecodeError;
pub use lease::{Lease, LeaseChange, LeaseState, LeaseTable};
pub use packet::{HEADER_LEN, MAGIC, Packet};
pub use server::{CLIENT_PORT, Datagram, PXE_PORT, Port, Reply, Server, Step};

/// Re-exported so callers (tests, the fuzz target) build requests with the same codec.
pub use dhcproto;
