//! corral's network boot engine: what each machine's firmware is handed, and the HTTP and
//! syslog servers of a boot.
//!
//! A PXE, UEFI HTTP Boot or iPXE client asks to boot; [`decide`] answers from the site (is
//! the MAC a declared machine, which profile), the machine's lifecycle state in the store
//! (`new → discovered → install → installed → local`) and the firmware table
//! ([`firmware::FIRMWARE_TABLE`]: BIOS PXE gets `undionly.kpxe` by TFTP, UEFI x64 PXE
//! `snponly.efi`, UEFI HTTP Boot the same over HTTP, iPXE its per-machine script). A machine
//! whose install reported done gets "boot from disk" on every path, so it never loops into a
//! reinstall.
//!
//! # Entry types
//! - [`decide`] / [`plan_for`]: the pure boot decision (no sockets, no clock, no files).
//! - [`Netboot`]: the engine the DHCP, TFTP and HTTP servers share: sessions (one
//!   [`SessionId`](corral_model::SessionId) per boot across DHCP, TFTP and HTTP), lifecycle
//!   transitions in the store, events with reasons, iPXE binaries, scripts ([`script`],
//!   rendered with `minijinja`).
//! - [`http::serve`]: scripts, `/ipxe-bin/*`, `/boot/*` and `/images/*` (HEAD and Range,
//!   confined beneath their roots, symlinks included: [`files`]), the installer's
//!   `/api/v1/machines/<mac>/done` callback, `/healthz`, `/metrics` (Prometheus text of the
//!   DHCP services, the TFTP servers and the HTTP server itself).
//! - [`service::syslog_receiver`] (RFC 3164 and RFC 5424, [`syslog`]) and
//!   [`service::watch_site`] (hot reload).
//!
//! # What it is not
//! - Not a DHCP or TFTP implementation: those are `corral-dhcp` and `corral-tftp`; this
//!   crate answers their policy questions.
//! - Not a network prober: it never picks interfaces; the binary passes bound sockets.

mod decision;
pub mod dhcp;
mod engine;
mod error;
pub mod files;
pub mod firmware;
pub mod http;
pub mod neighbour;
pub mod script;
pub mod service;
pub mod session;
pub mod state;
pub mod syslog;
pub mod tftp;

pub use decision::{
    Answer, BootRequest, Decision, Identity, MachinePlan, Plan, UrlBase, decide, plan_for,
};
pub use engine::{Netboot, NetbootConfig, TftpAnswer, kinds};
pub use error::NetbootError;
pub use firmware::{ClientKind, Platform};
