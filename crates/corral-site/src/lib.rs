//! The site directory: `site.toml`, `profiles/` and `machines/` loaded, validated and
//! hot-swapped.
//!
//! Operators keep their fleet's description in git as plain files. A site directory is:
//!
//! ```text
//! site.toml              the server: [server] [dhcp] [[dhcp.network]] [paths] [store] [discovery]
//! profiles/NAME.toml     what a kind of machine gets: [boot] and [install]
//! machines/NAME.toml     one machine: mac, hostname, ip, profile, groups, [vars]
//! templates/*.ipxe       optional iPXE script templates named by profiles
//! trees/NAME.toml        optional sync tree descriptions (see [`Tree`], `corral sync run`)
//! ```
//!
//! `examples/site/` in the repository (also written by `corral site init`, see [`init`]) is the
//! commented reference for every key. In short:
//!
//! * **`site.toml`** — every key is optional.
//!   * `[server]` `name` (default `"corral"`), `interfaces` (list; corral never serves DHCP on
//!     an interface not named here), `advertise` (the IPv4 address put into URLs handed to
//!     clients; default: the serving interface's), `http_port` (8080), `tftp_port` (69).
//!   * `[dhcp]` `mode` = `"off"` (default) | `"proxy"` | `"full"`, and `[[dhcp.network]]`
//!     entries: `name` (default: the CIDR), `cidr` (required, `"10.0.0.0/24"`), `gateway`,
//!     `dns` (list), `domain`, `pool` (`"10.0.0.100-10.0.0.199"`, inside the network's host
//!     addresses), `lease` (a duration, `"12h"` default).
//!   * `[paths]` `boot` (`"boot"`), `images` (`"images"`), `trees` (`"trees"`), `ipxe`
//!     (`"/usr/lib/ipxe"`); relative paths are relative to the site directory.
//!   * `[store]` `path` (`"state/corral.db"`), `max_age` (duration, e.g. `"90d"`; default keep
//!     forever), `max_events` (count; default unlimited).
//!   * `[discovery]` `enrol` (bool, default false), `profile` (what unknown machines boot).
//! * **`profiles/NAME.toml`** — `description`; `[boot]` `kernel`, `initrd` (string or list),
//!   `cmdline`, `ipxe_template` (path relative to the site directory; a template or a kernel is
//!   required; no `[boot]` means boot from the local disk); `[install]` `image` (relative to
//!   `paths.images`), `tree` (relative to `paths.trees`), `after` = `"local"` (default) |
//!   `"reboot"` | `"poweroff"` | `"stay"`.
//! * **`machines/NAME.toml`** — `mac` (required; one string or a list), `hostname` (default:
//!   the file stem), `ip` (fixed address; must lie in a `[[dhcp.network]]`), `profile`
//!   (required), `groups` (list of strings), `[vars]` (string table for templates).
//!
//! Loading is two-staged: serde structs that mirror the files (`deny_unknown_fields`), then a
//! pure conversion into typed values ([`MacAddr`](corral_model::MacAddr),
//! [`Ipv4Net`](ipnet::Ipv4Net), [`Duration`](std::time::Duration), enums, newtypes). Every
//! problem is collected — syntax, unknown keys, bad values, cross-file conflicts — each with
//! its file, line and column ([`Problem`]), so one `corral site check` shows them all.
//!
//! Entry types: [`Site`] (one immutable, validated snapshot; share it as `Arc<Site>`),
//! [`check`], [`SiteHandle`] (hot reload with [`arc_swap`]), [`Overrides`] (command-line flags
//! that beat the file), [`init`], [`SiteError`].
//!
//! This crate is *not* a server: it opens no sockets and probes no network cards. The DHCP,
//! TFTP, HTTP, cast and sync engines read a [`Site`]; they never parse TOML.

mod error;
mod example;
mod handle;
mod load;
mod names;
mod problem;
mod raw;
mod site;
mod tree;

use std::net::Ipv4Addr;
use std::path::Path;

pub use error::SiteError;
pub use example::{EXAMPLE_FILES, init};
pub use handle::{Fingerprint, ReloadOutcome, SiteHandle};
pub use load::{check_machine_str, check_profile_str, check_site_toml_str};
pub use names::{Hostname, InterfaceName, MachineName, ProfileName};
pub use problem::{Problem, ProblemKind, Severity};
pub use site::{
    After, Boot, DEFAULT_HTTP_PORT, DEFAULT_IPXE_DIR, DEFAULT_LEASE, DEFAULT_STORE_PATH,
    DEFAULT_TFTP_PORT, Dhcp, DhcpMode, Discovery, Install, Machine, Network, Paths, Pool, Profile,
    Server, Site, Store, Template,
};

/// Validates the site directory `dir` offline and returns every problem (errors and warnings),
/// in file order. Empty means a clean site.
pub fn check(dir: impl AsRef<Path>) -> Vec<Problem> {
    let mut p = match load::load_site(dir.as_ref()) {
        Ok(site) => site.warnings,
        Err(problems) => problems,
    };
    p.extend(tree::check_trees(dir.as_ref()));
    p
}

pub use tree::{Tree, TreeChild, TreeCompress, load_tree};

/// Settings given on the command line, which beat the file (precedence: defaults < file <
/// flags). `None` leaves the file's value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Replaces `[server] interfaces`.
    pub interfaces: Option<Vec<InterfaceName>>,
    /// Replaces `[server] advertise`.
    pub advertise: Option<Ipv4Addr>,
    /// Replaces `[server] http_port`.
    pub http_port: Option<u16>,
    /// Replaces `[server] tftp_port`.
    pub tftp_port: Option<u16>,
    /// Replaces `[dhcp] mode`.
    pub dhcp_mode: Option<DhcpMode>,
}

impl Site {
    /// Loads and validates `dir`. On failure [`SiteError::Invalid`] carries every problem; on
    /// success the warnings are in [`Site::warnings`].
    pub fn load(dir: impl AsRef<Path>) -> Result<Site, SiteError> {
        let dir = dir.as_ref();
        load::load_site(dir).map_err(|problems| SiteError::Invalid {
            dir: dir.to_owned(),
            problems,
        })
    }

    /// This site with `o` applied on top, re-checking the rules the flags can break (DHCP on
    /// with no interface).
    pub fn with_overrides(mut self, o: &Overrides) -> Result<Site, SiteError> {
        if let Some(i) = &o.interfaces {
            self.server.interfaces = i.clone();
        }
        if let Some(a) = o.advertise {
            self.server.advertise = Some(a);
        }
        if let Some(p) = o.http_port {
            self.server.http_port = p;
        }
        if let Some(p) = o.tftp_port {
            self.server.tftp_port = p;
        }
        if let Some(m) = o.dhcp_mode {
            self.dhcp.mode = m;
        }
        let mut problems = Vec::new();
        if self.dhcp.mode != DhcpMode::Off && self.server.interfaces.is_empty() {
            problems.push(Problem {
                severity: Severity::Error,
                kind: ProblemKind::NoInterfaces,
                file: "site.toml".into(),
                line: None,
                column: None,
                message: format!(
                    "DHCP mode is \"{}\" but no interface is given (file or --interface); name the interfaces to serve or set mode = \"off\"",
                    self.dhcp.mode
                ),
            });
        }
        if self.dhcp.mode == DhcpMode::Full && self.dhcp.networks.is_empty() {
            problems.push(Problem {
                severity: Severity::Error,
                kind: ProblemKind::NoNetworks,
                file: "site.toml".into(),
                line: None,
                column: None,
                message: "DHCP mode is \"full\" but no [[dhcp.network]] is defined; add one with its cidr and pool".to_owned(),
            });
        }
        if problems.is_empty() {
            Ok(self)
        } else {
            Err(SiteError::Invalid {
                dir: self.dir.clone(),
                problems,
            })
        }
    }

    /// Shorthand for [`Site::with_overrides`] with only `interfaces`.
    pub fn with_interfaces(self, interfaces: Vec<InterfaceName>) -> Result<Site, SiteError> {
        self.with_overrides(&Overrides {
            interfaces: Some(interfaces),
            ..Overrides::default()
        })
    }
}

#[cfg(test)]
mod tests;
