//! The loaded, validated site: typed values only, no TOML.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use corral_model::MacAddr;
use ipnet::Ipv4Net;

use crate::handle::Fingerprint;
use crate::names::{Hostname, InterfaceName, MachineName, ProfileName};
use crate::problem::Problem;

/// Default HTTP port for boot files, iPXE scripts and the API.
pub const DEFAULT_HTTP_PORT: u16 = 8080;
/// Default TFTP port (RFC 1350).
pub const DEFAULT_TFTP_PORT: u16 = 69;
/// Default directory of iPXE binaries (Debian's `ipxe` package).
pub const DEFAULT_IPXE_DIR: &str = "/usr/lib/ipxe";
/// Default store path, relative to the site directory.
pub const DEFAULT_STORE_PATH: &str = "state/corral.db";
/// Default lease time when a network gives none.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(12 * 3600);

/// A whole site directory, loaded and validated. Immutable: share it as `Arc<Site>`, and get
/// a new one from [`Site::load`] or [`crate::SiteHandle::reload`].
#[derive(Debug, Clone)]
pub struct Site {
    pub(crate) dir: PathBuf,
    /// `[server]`.
    pub server: Server,
    /// `[dhcp]`.
    pub dhcp: Dhcp,
    /// `[paths]`, all absolute.
    pub paths: Paths,
    /// `[store]`.
    pub store: Store,
    /// `[discovery]`.
    pub discovery: Discovery,
    pub(crate) profiles: BTreeMap<ProfileName, Profile>,
    pub(crate) machines: BTreeMap<MachineName, Machine>,
    pub(crate) by_mac: HashMap<MacAddr, MachineName>,
    pub(crate) warnings: Vec<Problem>,
    pub(crate) fingerprint: Fingerprint,
}

/// `[server]`: who we are and where we listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// A name for this server, shown in the UI and logs. Default `corral`.
    pub name: String,
    /// The interfaces corral serves DHCP on. corral never answers DHCP on any other.
    pub interfaces: Vec<InterfaceName>,
    /// The address clients are told to fetch URLs from; `None`: the serving interface's own.
    pub advertise: Option<Ipv4Addr>,
    /// HTTP port. Default [`DEFAULT_HTTP_PORT`].
    pub http_port: u16,
    /// TFTP port. Default [`DEFAULT_TFTP_PORT`].
    pub tftp_port: u16,
}

/// `[dhcp]`: whether and how corral answers DHCP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dhcp {
    /// Off, ProxyDHCP beside another server, or a full server. Default off.
    pub mode: DhcpMode,
    /// The networks served, from `[[dhcp.network]]`.
    pub networks: Vec<Network>,
}

/// How corral takes part in DHCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DhcpMode {
    /// No DHCP at all: another server points clients at us (next-server/filename).
    Off,
    /// ProxyDHCP (PXE spec): another server hands out addresses, corral only adds boot info.
    Proxy,
    /// A full DHCP server: addresses from pools and fixed machine addresses.
    Full,
}

impl DhcpMode {
    /// The accepted spellings, for messages.
    pub const NAMES: &'static str = "off, proxy, full";

    /// Parses `off`, `proxy` or `full`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "off" => Some(DhcpMode::Off),
            "proxy" => Some(DhcpMode::Proxy),
            "full" => Some(DhcpMode::Full),
            _ => None,
        }
    }
}

impl fmt::Display for DhcpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DhcpMode::Off => "off",
            DhcpMode::Proxy => "proxy",
            DhcpMode::Full => "full",
        })
    }
}

/// One `[[dhcp.network]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// Name for logs and the UI. Default: the CIDR text.
    pub name: String,
    /// The subnet.
    pub cidr: Ipv4Net,
    /// Default route handed to clients (option 3).
    pub gateway: Option<Ipv4Addr>,
    /// DNS servers handed to clients (option 6).
    pub dns: Vec<Ipv4Addr>,
    /// DNS domain handed to clients (option 15).
    pub domain: Option<Hostname>,
    /// Dynamic addresses for machines without a fixed `ip` (full mode).
    pub pool: Option<Pool>,
    /// Lease time. Default [`DEFAULT_LEASE`].
    pub lease: Duration,
}

impl Network {
    /// The first and last host address (excluding network and broadcast for prefixes < 31).
    pub fn host_range(&self) -> (Ipv4Addr, Ipv4Addr) {
        host_range(&self.cidr)
    }
}

pub(crate) fn host_range(net: &Ipv4Net) -> (Ipv4Addr, Ipv4Addr) {
    let (n, b) = (u32::from(net.network()), u32::from(net.broadcast()));
    if net.prefix_len() >= 31 {
        (n.into(), b.into())
    } else {
        ((n + 1).into(), (b - 1).into())
    }
}

/// An inclusive range of IPv4 addresses, written `10.0.0.100-10.0.0.199`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    /// First address.
    pub start: Ipv4Addr,
    /// Last address (inclusive).
    pub end: Ipv4Addr,
}

impl Pool {
    /// True when `ip` is in the range.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.start <= ip && ip <= self.end
    }

    /// Number of addresses.
    pub fn len(&self) -> u64 {
        u64::from(u32::from(self.end)) - u64::from(u32::from(self.start)) + 1
    }

    /// Never true (a pool has at least one address); here for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

/// `[paths]`, resolved to absolute paths (relative ones are relative to the site directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// Kernels, initrds and other boot files, served over HTTP and TFTP. Default `boot`.
    pub boot: PathBuf,
    /// Disk images for `cast`. Default `images`.
    pub images: PathBuf,
    /// Trees for `sync`. Default `trees`.
    pub trees: PathBuf,
    /// iPXE binaries (`undionly.kpxe`, `ipxe.efi`, `snponly.efi`). Default `/usr/lib/ipxe`.
    pub ipxe: PathBuf,
}

/// `[store]`: the audit database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Store {
    /// Database file. Default `state/corral.db` in the site directory.
    pub path: PathBuf,
    /// Events older than this are pruned. `None`: kept forever.
    pub max_age: Option<Duration>,
    /// At most this many events are kept. `None`: no limit.
    pub max_events: Option<u64>,
}

/// `[discovery]`: what unknown machines get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    /// Whether unknown machines are recorded (enrolled) when they boot. Default false.
    pub enrol: bool,
    /// The profile unknown machines boot. `None`: unknown machines get no boot answer.
    pub profile: Option<ProfileName>,
}

/// `profiles/NAME.toml`: what a kind of machine gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// The file stem.
    pub name: ProfileName,
    /// Free text for people.
    pub description: Option<String>,
    /// How it boots. `None`: boot from local disk.
    pub boot: Option<Boot>,
    /// What gets installed.
    pub install: Install,
}

/// A profile's `[boot]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boot {
    /// Kernel, relative to [`Paths::boot`].
    pub kernel: Option<PathBuf>,
    /// Initrds in load order, relative to [`Paths::boot`].
    pub initrd: Vec<PathBuf>,
    /// Kernel command line; may use template variables.
    pub cmdline: Option<String>,
    /// A custom iPXE script template, read at load time (so a reload swaps it atomically).
    pub ipxe_template: Option<Template>,
}

/// An iPXE script template file.
///
/// This crate only loads its text (at load time, so a reload swaps it with the rest of the
/// site). The HTTP engine fills it in: `{{ base_url }}`, `{{ kernel }}`, `{{ initrd }}`,
/// `{{ cmdline }}`, `{{ hostname }}`, `{{ profile }}` and `{{ vars.NAME }}` (the machine's
/// `[vars]`), as the example `templates/discover.ipxe` shows. `${...}` is left to iPXE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// Path relative to the site directory, as written.
    pub path: PathBuf,
    /// Its text.
    pub text: String,
}

/// A profile's `[install]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Install {
    /// Image to cast onto the disk, relative to [`Paths::images`].
    pub image: Option<PathBuf>,
    /// Tree to sync from, relative to [`Paths::trees`].
    pub tree: Option<PathBuf>,
    /// What the machine does after installing. Default [`After::Local`].
    pub after: After,
}

/// What happens after an install.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum After {
    /// Boot from the local disk from now on.
    #[default]
    Local,
    /// Reboot (and netboot this profile again).
    Reboot,
    /// Power off.
    Poweroff,
    /// Stay in the installer environment (for debugging).
    Stay,
}

impl After {
    /// The accepted spellings, for messages.
    pub const NAMES: &'static str = "local, reboot, poweroff, stay";

    /// Parses one of [`After::NAMES`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "local" => Some(After::Local),
            "reboot" => Some(After::Reboot),
            "poweroff" => Some(After::Poweroff),
            "stay" => Some(After::Stay),
            _ => None,
        }
    }
}

/// `machines/NAME.toml`: one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// The file stem.
    pub name: MachineName,
    /// Its network cards (at least one).
    pub macs: Vec<MacAddr>,
    /// Hostname. Default: the file stem.
    pub hostname: Hostname,
    /// Fixed address (full DHCP mode); `None`: from a pool.
    pub ip: Option<Ipv4Addr>,
    /// The profile it boots.
    pub profile: ProfileName,
    /// Groups, for selecting machines in commands.
    pub groups: Vec<String>,
    /// Free-form variables for templates (`${disk}` ...).
    pub vars: BTreeMap<String, String>,
}

impl Site {
    /// The site directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The machine owning `mac`, if any.
    pub fn machine_by_mac(&self, mac: &MacAddr) -> Option<&Machine> {
        self.by_mac.get(mac).and_then(|n| self.machines.get(n))
    }

    /// The machine from `machines/NAME.toml`.
    pub fn machine(&self, name: &str) -> Option<&Machine> {
        self.machines.get(name)
    }

    /// The profile from `profiles/NAME.toml`.
    pub fn profile(&self, name: &str) -> Option<&Profile> {
        self.profiles.get(name)
    }

    /// All machines, by name.
    pub fn machines(&self) -> impl Iterator<Item = &Machine> {
        self.machines.values()
    }

    /// All profiles, by name.
    pub fn profiles(&self) -> impl Iterator<Item = &Profile> {
        self.profiles.values()
    }

    /// The configured network containing `ip`.
    pub fn network_for(&self, ip: Ipv4Addr) -> Option<&Network> {
        self.dhcp.networks.iter().find(|n| n.cidr.contains(&ip))
    }

    /// The profile a machine boots: its own, or for unknown machines the discovery profile.
    pub fn profile_for_mac(&self, mac: &MacAddr) -> Option<&Profile> {
        match self.machine_by_mac(mac) {
            Some(m) => self.profiles.get(&m.profile),
            None => self
                .discovery
                .profile
                .as_ref()
                .and_then(|p| self.profiles.get(p)),
        }
    }

    /// Warnings found while loading (errors prevent loading).
    pub fn warnings(&self) -> &[Problem] {
        &self.warnings
    }

    /// The directory state this site was loaded from.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }
}
