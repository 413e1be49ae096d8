//! The crate's error.

use std::path::PathBuf;

/// Why the DHCP service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    /// A socket could not be created, bound to the interface, or bound to the port.
    #[error(
        "cannot listen for DHCP on interface {interface} port {port} ({op}): {source}; check \
         that the interface exists, that no other DHCP server (dnsmasq, dhcpd, kea) uses the \
         port, and that corral runs as root or with CAP_NET_BIND_SERVICE and CAP_NET_RAW"
    )]
    Bind {
        /// The interface.
        interface: String,
        /// The UDP port.
        port: u16,
        /// The step that failed.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Receiving failed on a socket.
    #[error("receiving DHCP on interface {interface}: {source}")]
    Receive {
        /// The interface.
        interface: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The lease store could not be opened or read.
    #[error("lease store {path}: {source}")]
    Store {
        /// The database file.
        path: PathBuf,
        /// What the store said.
        #[source]
        source: Box<corral_store::StoreError>,
    },
    /// The lease journal (beside the store) could not be read, created or opened.
    #[error(
        "lease journal {path}: {source}; it holds acknowledged leases not yet in the store: \
         fix the file's permissions or the disk rather than deleting it"
    )]
    Journal {
        /// The journal file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The lease writer thread could not be started.
    #[error("starting the lease writer thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The service's packet thread or its runtime could not be started, or it died.
    #[error("the DHCP packet thread: {0}")]
    PacketThread(#[source] std::io::Error),
}
