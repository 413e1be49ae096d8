//! Stage two: read the directory, parse every file, convert raw values into typed ones and
//! cross-check them, collecting *every* problem instead of stopping at the first.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use corral_model::MacAddr;
use ipnet::Ipv4Net;
use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue};

use crate::handle::Fingerprint;
use crate::names::{Hostname, InterfaceName, MachineName, ProfileName};
use crate::problem::{Problem, ProblemKind, Severity, line_col};
use crate::raw::{self, OneOrMany, S};
use crate::site::{
    After, Boot, DEFAULT_HTTP_PORT, DEFAULT_IPXE_DIR, DEFAULT_LEASE, DEFAULT_STORE_PATH,
    DEFAULT_TFTP_PORT, Dhcp, DhcpMode, Discovery, Install, Machine, Network, Paths, Pool, Profile,
    Server, Site, Store, Template, host_range,
};

/// Upper bound on structural errors reported per file (each costs one re-deserialisation).
const MAX_STRUCTURAL: usize = 32;

/// One file's text and its name relative to the site directory, for locating problems.
pub(crate) struct Source {
    pub(crate) rel: PathBuf,
    pub(crate) text: String,
}

/// Collected problems.
#[derive(Default)]
pub(crate) struct Report {
    pub(crate) problems: Vec<Problem>,
}

impl Report {
    fn push(
        &mut self,
        file: &Path,
        at: Option<(usize, usize)>,
        severity: Severity,
        kind: ProblemKind,
        message: String,
    ) {
        self.problems.push(Problem {
            severity,
            kind,
            file: file.to_owned(),
            line: at.map(|a| a.0),
            column: at.map(|a| a.1),
            message,
        });
    }

    pub(crate) fn error(
        &mut self,
        src: &Source,
        span: Option<Range<usize>>,
        kind: ProblemKind,
        msg: String,
    ) {
        let at = span.map(|s| line_col(&src.text, s.start));
        self.push(&src.rel, at, Severity::Error, kind, msg);
    }

    fn warn(&mut self, src: &Source, span: Option<Range<usize>>, kind: ProblemKind, msg: String) {
        let at = span.map(|s| line_col(&src.text, s.start));
        self.push(&src.rel, at, Severity::Warning, kind, msg);
    }

    pub(crate) fn file_error(&mut self, rel: &Path, kind: ProblemKind, msg: String) {
        self.push(rel, None, Severity::Error, kind, msg);
    }

    pub(crate) fn file_warn(&mut self, rel: &Path, kind: ProblemKind, msg: String) {
        self.push(rel, None, Severity::Warning, kind, msg);
    }

    /// Orders problems as an operator reads the directory: site.toml, profiles, machines,
    /// and by position within each file.
    pub(crate) fn sort(&mut self) {
        let rank = |p: &Problem| {
            let f = p.file.to_string_lossy();
            if f == "." {
                0
            } else if f == "site.toml" {
                1
            } else if f.starts_with("profiles") {
                2
            } else if f.starts_with("machines") {
                3
            } else {
                4
            }
        };
        self.problems.sort_by(|a, b| {
            (rank(a), &a.file, a.line, a.column).cmp(&(rank(b), &b.file, b.line, b.column))
        });
    }

    pub(crate) fn has_errors(&self) -> bool {
        self.problems.iter().any(Problem::is_error)
    }
}

/// Parses `src` into `T`, reporting every syntax error, then every structural error (unknown
/// key, wrong type) by pruning the offending key and trying again. Returns the value and
/// whether anything was pruned (then "missing key" problems would be echoes, not news).
pub(crate) fn parse_file<T: DeserializeOwned>(
    src: &Source,
    report: &mut Report,
) -> Option<(T, bool)> {
    let (mut root, errors) = DeTable::parse_recoverable(&src.text);
    if !errors.is_empty() {
        for e in errors {
            let msg = e.message().trim().replace('\n', "; ");
            report.error(
                src,
                e.span(),
                ProblemKind::Syntax,
                format!("TOML syntax error: {msg}; see https://toml.io for the syntax"),
            );
        }
        return None;
    }
    let mut pruned = false;
    for _ in 0..MAX_STRUCTURAL {
        match T::deserialize(toml::de::Deserializer::from(root.clone())) {
            Ok(v) => return Some((v, pruned)),
            Err(e) => {
                let (kind, msg) = structural_message(e.message());
                report.error(src, e.span(), kind, msg);
                pruned = true;
                let removed = e.span().is_some_and(|sp| prune(root.get_mut(), &sp));
                if !removed {
                    return None;
                }
            }
        }
    }
    None
}

/// Rewrites serde's messages into ours.
fn structural_message(m: &str) -> (ProblemKind, String) {
    let unknown = m
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'));
    if let Some((key, tail)) = unknown {
        let allowed: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
        let msg = if allowed.is_empty() {
            format!("unknown key \"{key}\"; no keys are allowed here")
        } else {
            format!(
                "unknown key \"{key}\"; allowed keys here: {}",
                allowed.join(", ")
            )
        };
        return (ProblemKind::UnknownKey, msg);
    }
    let m = m.trim().replace('\n', "; ");
    match m.strip_prefix("invalid type: ") {
        Some(rest) => (ProblemKind::WrongType, format!("wrong type: {rest}")),
        None => (ProblemKind::WrongType, m),
    }
}

/// Removes the entry whose key or value (or array element) has exactly `span`.
fn prune(table: &mut DeTable<'_>, span: &Range<usize>) -> bool {
    let mut hit = None;
    for (k, v) in table.iter_mut() {
        if k.span() == *span || v.span() == *span {
            hit = Some(k.clone());
            break;
        }
        match v.get_mut() {
            DeValue::Table(t) => {
                let found = prune(t, span);
                if found {
                    return true;
                }
            }
            DeValue::Array(a) => {
                for item in a.iter_mut() {
                    if item.span() == *span {
                        hit = Some(k.clone());
                        break;
                    }
                    let found = match item.get_mut() {
                        DeValue::Table(t) => prune(t, span),
                        _ => false,
                    };
                    if found {
                        return true;
                    }
                }
                if hit.is_some() {
                    break;
                }
            }
            _ => {}
        }
    }
    match hit {
        Some(k) => table.remove(&k).is_some(),
        None => false,
    }
}

fn sp(s: &S) -> Option<Range<usize>> {
    Some(s.span())
}

fn parse_ip(src: &Source, r: &mut Report, s: &S) -> Option<Ipv4Addr> {
    match s.get_ref().parse() {
        Ok(ip) => Some(ip),
        Err(_) => {
            r.error(
                src,
                sp(s),
                ProblemKind::BadIp,
                format!(
                    "invalid IPv4 address {:?}: expected four decimal numbers like 10.0.0.5",
                    s.get_ref()
                ),
            );
            None
        }
    }
}

fn parse_duration(src: &Source, r: &mut Report, s: &S) -> Option<Duration> {
    match humantime::parse_duration(s.get_ref()) {
        Ok(d) if !d.is_zero() => Some(d),
        Ok(_) => {
            r.error(
                src,
                sp(s),
                ProblemKind::BadDuration,
                format!(
                    "duration {:?} is zero; give a positive duration like 12h",
                    s.get_ref()
                ),
            );
            None
        }
        Err(_) => {
            r.error(
                src,
                sp(s),
                ProblemKind::BadDuration,
                format!(
                    "invalid duration {:?}: expected a number and a unit like 30m, 12h or 90d",
                    s.get_ref()
                ),
            );
            None
        }
    }
}

fn parse_pool(src: &Source, r: &mut Report, s: &S) -> Option<Pool> {
    let text = s.get_ref();
    let parsed = text.split_once('-').and_then(|(a, b)| {
        Some((
            a.trim().parse::<Ipv4Addr>().ok()?,
            b.trim().parse::<Ipv4Addr>().ok()?,
        ))
    });
    match parsed {
        Some((start, end)) if start <= end => Some(Pool { start, end }),
        Some(_) => {
            r.error(
                src,
                sp(s),
                ProblemKind::BadPool,
                format!("pool {text:?} ends before it starts; write the lower address first"),
            );
            None
        }
        None => {
            r.error(
                src,
                sp(s),
                ProblemKind::BadPool,
                format!(
                    "invalid pool {text:?}: expected a range of two addresses like 10.0.0.100-10.0.0.199"
                ),
            );
            None
        }
    }
}

fn resolve(dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_owned()
    } else {
        dir.join(p)
    }
}

/// Stage-two conversion of `site.toml`. Returns `None` only when nothing usable is left.
struct SiteToml {
    server: Server,
    dhcp: Dhcp,
    networks_complete: bool,
    paths: Paths,
    store: Store,
    discovery: Discovery,
    /// Where `discovery.profile` is written, for the cross-check.
    discovery_span: Option<Range<usize>>,
}

fn convert_site(
    dir: &Path,
    src: &Source,
    raw: raw::RawSite,
    pruned: bool,
    r: &mut Report,
) -> SiteToml {
    // [server]
    let rs = raw.server;
    let mut interfaces = Vec::new();
    for s in rs
        .as_ref()
        .and_then(|s| s.interfaces.as_ref())
        .into_iter()
        .flatten()
    {
        match InterfaceName::parse(s.get_ref()) {
            Some(i) => interfaces.push(i),
            None => r.error(
                src,
                sp(s),
                ProblemKind::BadInterface,
                format!(
                    "invalid interface name {:?}: expected a Linux interface name like eth0 (1-15 characters, no spaces, '/' or ':')",
                    s.get_ref()
                ),
            ),
        }
    }
    let advertise = rs
        .as_ref()
        .and_then(|s| s.advertise.as_ref())
        .and_then(|s| parse_ip(src, r, s));
    let server = Server {
        name: rs
            .as_ref()
            .and_then(|s| s.name.clone())
            .unwrap_or_else(|| "corral".to_owned()),
        interfaces,
        advertise,
        http_port: rs
            .as_ref()
            .and_then(|s| s.http_port)
            .unwrap_or(DEFAULT_HTTP_PORT),
        tftp_port: rs
            .as_ref()
            .and_then(|s| s.tftp_port)
            .unwrap_or(DEFAULT_TFTP_PORT),
    };

    // [dhcp]
    let rd = raw.dhcp;
    let mode_span = rd.as_ref().and_then(|d| d.mode.as_ref()).map(|m| m.span());
    let mode = match rd.as_ref().and_then(|d| d.mode.as_ref()) {
        None => DhcpMode::Off,
        Some(m) => DhcpMode::parse(m.get_ref()).unwrap_or_else(|| {
            r.error(
                src,
                sp(m),
                ProblemKind::UnknownDhcpMode,
                format!(
                    "unknown DHCP mode {:?}: expected one of {}",
                    m.get_ref(),
                    DhcpMode::NAMES
                ),
            );
            DhcpMode::Off
        }),
    };
    let mut networks: Vec<Network> = Vec::new();
    // False when a network was dropped for errors: address checks against the remaining
    // networks would only echo that error.
    let mut networks_complete = true;
    let mut net_spans: Vec<Range<usize>> = Vec::new();
    for rn in rd.and_then(|d| d.network).into_iter().flatten() {
        let span = rn.span();
        let rn = rn.into_inner();
        let Some(cidr_s) = rn.cidr.as_ref() else {
            if !pruned {
                r.error(
                    src,
                    Some(span),
                    ProblemKind::MissingKey,
                    "missing key \"cidr\" in [[dhcp.network]]; add the subnet like cidr = \"10.0.0.0/24\"".to_owned(),
                );
            }
            networks_complete = false;
            continue;
        };
        let cidr = match cidr_s.get_ref().parse::<Ipv4Net>() {
            Ok(c) if c.network() == c.addr() => c,
            Ok(c) => {
                r.error(
                    src,
                    sp(cidr_s),
                    ProblemKind::BadCidr,
                    format!(
                        "network {:?} has host bits set; write {}",
                        cidr_s.get_ref(),
                        c.trunc()
                    ),
                );
                networks_complete = false;
                continue;
            }
            Err(_) => {
                r.error(
                    src,
                    sp(cidr_s),
                    ProblemKind::BadCidr,
                    format!(
                        "invalid network {:?}: expected an IPv4 network in CIDR form like 10.0.0.0/24",
                        cidr_s.get_ref()
                    ),
                );
                networks_complete = false;
                continue;
            }
        };
        let name = rn.name.clone().unwrap_or_else(|| cidr.to_string());
        let gateway = rn.gateway.as_ref().and_then(|g| {
            let ip = parse_ip(src, r, g)?;
            if !cidr.contains(&ip) {
                r.error(
                    src,
                    sp(g),
                    ProblemKind::GatewayOutsideNetwork,
                    format!("gateway {ip} is not inside network {cidr}; give an address in {cidr}"),
                );
            }
            Some(ip)
        });
        let dns = rn
            .dns
            .iter()
            .flatten()
            .filter_map(|d| parse_ip(src, r, d))
            .collect();
        let domain = rn.domain.as_ref().and_then(|d| {
            let h = Hostname::parse(d.get_ref());
            if h.is_none() {
                r.error(
                    src,
                    sp(d),
                    ProblemKind::InvalidHostname,
                    format!(
                        "invalid domain {:?}: use letters, digits and hyphens, 1-63 characters per dot-separated label, not starting or ending with a hyphen",
                        d.get_ref()
                    ),
                );
            }
            h
        });
        let pool = rn.pool.as_ref().and_then(|p| {
            let pool = parse_pool(src, r, p)?;
            let (first, last) = host_range(&cidr);
            if pool.start < first || pool.end > last {
                r.error(
                    src,
                    sp(p),
                    ProblemKind::PoolOutsideNetwork,
                    format!(
                        "pool {pool} is not inside network {cidr}; keep both ends between {first} and {last}"
                    ),
                );
                return None;
            }
            Some(pool)
        });
        let lease = rn
            .lease
            .as_ref()
            .and_then(|l| parse_duration(src, r, l))
            .unwrap_or(DEFAULT_LEASE);
        if let Some(prev) = networks.iter().find(|n| n.name == name) {
            r.error(
                src,
                Some(span.clone()),
                ProblemKind::DuplicateNetwork,
                format!(
                    "network name {name:?} is used twice (also {}); give each network its own name",
                    prev.cidr
                ),
            );
        } else if let Some(prev) = networks
            .iter()
            .find(|n| n.cidr.contains(&cidr.network()) || cidr.contains(&n.cidr.network()))
        {
            r.error(
                src,
                sp(cidr_s),
                ProblemKind::DuplicateNetwork,
                format!(
                    "network {cidr} overlaps network {:?} ({}); networks must not overlap",
                    prev.name, prev.cidr
                ),
            );
        }
        networks.push(Network {
            name,
            cidr,
            gateway,
            dns,
            domain,
            pool,
            lease,
        });
        net_spans.push(span);
    }
    if mode != DhcpMode::Off && server.interfaces.is_empty() {
        r.error(
            src,
            mode_span.clone(),
            ProblemKind::NoInterfaces,
            format!(
                "DHCP mode is \"{mode}\" but [server] interfaces is empty; name the interfaces to serve (corral never serves DHCP on an interface not listed) or set mode = \"off\""
            ),
        );
    }
    if mode == DhcpMode::Full && networks.is_empty() {
        r.error(
            src,
            mode_span,
            ProblemKind::NoNetworks,
            "DHCP mode is \"full\" but no [[dhcp.network]] is defined; add one with its cidr and pool".to_owned(),
        );
    }

    // [paths]
    let rp = raw.paths;
    let path_of =
        |v: Option<&String>, default: &str| resolve(dir, v.map_or(default, |s| s.as_str()));
    let paths = Paths {
        boot: path_of(rp.as_ref().and_then(|p| p.boot.as_ref()), "boot"),
        images: path_of(rp.as_ref().and_then(|p| p.images.as_ref()), "images"),
        trees: path_of(rp.as_ref().and_then(|p| p.trees.as_ref()), "trees"),
        ipxe: path_of(rp.as_ref().and_then(|p| p.ipxe.as_ref()), DEFAULT_IPXE_DIR),
    };
    for (key, p) in [
        ("boot", &paths.boot),
        ("images", &paths.images),
        ("trees", &paths.trees),
    ] {
        if !p.is_dir() {
            r.warn(
                src,
                None,
                ProblemKind::MissingDir,
                format!(
                    "[paths] {key} directory {} does not exist; create it or change [paths] {key}",
                    p.display()
                ),
            );
        }
    }

    // [store]
    let rst = raw.store;
    let store = Store {
        path: path_of(
            rst.as_ref().and_then(|s| s.path.as_ref()),
            DEFAULT_STORE_PATH,
        ),
        max_age: rst
            .as_ref()
            .and_then(|s| s.max_age.as_ref())
            .and_then(|d| parse_duration(src, r, d)),
        max_events: rst.as_ref().and_then(|s| s.max_events),
    };

    // [discovery]
    let rdi = raw.discovery;
    let enrol = rdi.as_ref().and_then(|d| d.enrol).unwrap_or(false);
    let dprof = rdi.as_ref().and_then(|d| d.profile.as_ref());
    if enrol && dprof.is_none() {
        r.error(
            src,
            None,
            ProblemKind::DiscoveryProfileMissing,
            "[discovery] enrol = true needs a profile for unknown machines; add profile = \"NAME\""
                .to_owned(),
        );
    }
    SiteToml {
        server,
        dhcp: Dhcp { mode, networks },
        networks_complete,
        paths,
        store,
        discovery: Discovery {
            enrol,
            profile: dprof.map(|p| ProfileName::new(p.get_ref())),
        },
        discovery_span: dprof.map(|p| p.span()),
    }
}

fn convert_profile(
    dir: &Path,
    name: &str,
    src: &Source,
    raw: raw::RawProfile,
    r: &mut Report,
) -> Profile {
    let boot = raw.boot.map(|b| {
        let span = b.span();
        let b = b.into_inner();
        let ipxe_template = b.ipxe_template.as_ref().and_then(|t| {
            let path = PathBuf::from(t.get_ref());
            let full = resolve(dir, t.get_ref());
            let read = if full.is_file() {
                fs_err::read_to_string(&full)
            } else if full.exists() {
                // Never open devices or FIFOs named by a config file: they may block forever.
                Err(std::io::Error::other("not a regular file"))
            } else {
                Err(std::io::ErrorKind::NotFound.into())
            };
            match read {
                Ok(text) => {
                    if !text.trim_start().starts_with("#!ipxe") {
                        r.warn(
                            src,
                            sp(t),
                            ProblemKind::TemplateNotIpxe,
                            format!(
                                "iPXE template {:?} does not start with #!ipxe; iPXE will not run it as a script",
                                t.get_ref()
                            ),
                        );
                    }
                    Some(Template { path, text })
                }
                Err(e) => {
                    r.error(
                        src,
                        sp(t),
                        ProblemKind::TemplateMissing,
                        format!(
                            "iPXE template {:?} cannot be read ({}); create it (paths are relative to the site directory) or fix boot.ipxe_template",
                            t.get_ref(),
                            io_reason(&e)
                        ),
                    );
                    None
                }
            }
        });
        let initrd: Vec<PathBuf> = match b.initrd {
            None => Vec::new(),
            Some(OneOrMany::One(s)) => vec![s.into()],
            Some(OneOrMany::Many(v)) => v.into_iter().map(PathBuf::from).collect(),
        };
        if b.kernel.is_none() && b.ipxe_template.is_none() {
            r.error(
                src,
                Some(span.clone()),
                ProblemKind::BadBoot,
                "[boot] boots nothing: give a kernel (and initrd) or an ipxe_template, or remove [boot] to boot from the local disk".to_owned(),
            );
        } else if b.kernel.is_none() && !initrd.is_empty() {
            r.error(
                src,
                Some(span),
                ProblemKind::BadBoot,
                "[boot] has an initrd but no kernel; add kernel = \"...\"".to_owned(),
            );
        }
        Boot {
            kernel: b.kernel.map(PathBuf::from),
            initrd,
            cmdline: b.cmdline,
            ipxe_template,
        }
    });
    let ri = raw.install;
    let after = match ri.as_ref().and_then(|i| i.after.as_ref()) {
        None => After::Local,
        Some(a) => After::parse(a.get_ref()).unwrap_or_else(|| {
            r.error(
                src,
                sp(a),
                ProblemKind::UnknownAfter,
                format!(
                    "unknown install.after {:?}: expected one of {}",
                    a.get_ref(),
                    After::NAMES
                ),
            );
            After::Local
        }),
    };
    Profile {
        name: ProfileName::new(name),
        description: raw.description,
        boot,
        install: Install {
            image: ri
                .as_ref()
                .and_then(|i| i.image.as_ref())
                .map(PathBuf::from),
            tree: ri.as_ref().and_then(|i| i.tree.as_ref()).map(PathBuf::from),
            after,
        },
    }
}

/// A converted machine plus the spans the cross-checks point at.
/// Fields that failed to convert are `None` (already reported); the rest still take part in
/// the cross-checks, so one bad MAC does not hide a duplicate IP in the same file.
struct MachineDraft {
    name: MachineName,
    macs: Vec<MacAddr>,
    hostname: Option<Hostname>,
    ip: Option<Ipv4Addr>,
    profile: Option<ProfileName>,
    groups: Vec<String>,
    vars: BTreeMap<String, String>,
    src_index: usize,
    mac_spans: Vec<Option<Range<usize>>>,
    ip_span: Option<Range<usize>>,
    hostname_span: Option<Range<usize>>,
    profile_span: Option<Range<usize>>,
}

fn convert_machine(
    name: &str,
    src: &Source,
    src_index: usize,
    raw: raw::RawMachine,
    pruned: bool,
    r: &mut Report,
) -> MachineDraft {
    let mut macs = Vec::new();
    let mut mac_spans = Vec::new();
    match raw.mac {
        None => {
            if !pruned {
                r.error(
                    src,
                    None,
                    ProblemKind::MissingKey,
                    "missing key \"mac\"; add the machine's MAC address like mac = \"52:54:00:12:34:56\"".to_owned(),
                );
            }
        }
        Some(m) => {
            let outer = m.span();
            let items: Vec<(String, Range<usize>)> = match m.into_inner() {
                OneOrMany::One(s) => vec![(s, outer.clone())],
                OneOrMany::Many(v) => v
                    .into_iter()
                    .map(|s| (s.get_ref().clone(), s.span()))
                    .collect(),
            };
            if items.is_empty() {
                r.error(
                    src,
                    Some(outer),
                    ProblemKind::MissingKey,
                    "mac is an empty list; give at least one MAC address".to_owned(),
                );
            }
            for (text, span) in items {
                match text.parse::<MacAddr>() {
                    Ok(mac) if mac.is_multicast() => {
                        r.error(
                            src,
                            Some(span),
                            ProblemKind::GroupMac,
                            format!(
                                "MAC address {mac} is a group (multicast) address and cannot identify one machine; use the network card's own address"
                            ),
                        );
                    }
                    Ok(mac) if macs.contains(&mac) => r.warn(
                        src,
                        Some(span),
                        ProblemKind::DuplicateMac,
                        format!("MAC address {mac} is listed twice for this machine; remove one"),
                    ),
                    Ok(mac) => {
                        macs.push(mac);
                        mac_spans.push(Some(span));
                    }
                    Err(e) => {
                        r.error(src, Some(span), ProblemKind::BadMac, e.to_string());
                    }
                }
            }
        }
    }
    let (hostname, hostname_span) = match &raw.hostname {
        Some(h) => match Hostname::parse(h.get_ref()) {
            Some(x) => (Some(x), sp(h)),
            None => {
                r.error(
                    src,
                    sp(h),
                    ProblemKind::InvalidHostname,
                    format!(
                        "invalid hostname {:?}: use letters, digits and hyphens, 1-63 characters per dot-separated label, not starting or ending with a hyphen",
                        h.get_ref()
                    ),
                );
                (None, None)
            }
        },
        None => match Hostname::parse(name) {
            Some(x) => (Some(x), None),
            None => {
                r.error(
                    src,
                    None,
                    ProblemKind::InvalidHostname,
                    format!(
                        "file name {name:?} is not a valid hostname; rename the file or set hostname = \"...\""
                    ),
                );
                (None, None)
            }
        },
    };
    let ip = raw.ip.as_ref().and_then(|s| parse_ip(src, r, s));
    let profile = match &raw.profile {
        Some(p) => Some(ProfileName::new(p.get_ref())),
        None => {
            if !pruned {
                r.error(
                    src,
                    None,
                    ProblemKind::MissingKey,
                    "missing key \"profile\"; name the profile this machine boots, like profile = \"debian\"".to_owned(),
                );
            }
            None
        }
    };
    MachineDraft {
        name: MachineName::new(name),
        macs,
        hostname,
        ip,
        profile,
        groups: raw.groups.unwrap_or_default(),
        vars: raw.vars.unwrap_or_default(),
        src_index,
        mac_spans,
        ip_span: raw.ip.as_ref().map(|s| s.span()),
        hostname_span,
        profile_span: raw.profile.as_ref().map(|s| s.span()),
    }
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        std::io::ErrorKind::NotFound => "no such file".to_owned(),
        std::io::ErrorKind::InvalidData => "not valid UTF-8 text".to_owned(),
        k => k.to_string(),
    }
}

/// Reads a file to text, reporting why not.
pub(crate) fn read_source(dir: &Path, rel: PathBuf, r: &mut Report) -> Option<Source> {
    let bytes = match fs_err::read(dir.join(&rel)) {
        Ok(b) => b,
        Err(e) => {
            let fix = match e.kind() {
                std::io::ErrorKind::PermissionDenied => {
                    "make it readable by the user running corral"
                }
                std::io::ErrorKind::NotFound => "it may be a dangling symlink; fix or remove it",
                _ => "check that it is a readable regular file",
            };
            r.file_error(
                &rel,
                ProblemKind::Unreadable,
                format!("cannot read file: {}; {fix}", io_reason(&e)),
            );
            return None;
        }
    };
    match String::from_utf8(bytes) {
        Ok(text) => Some(Source { rel, text }),
        Err(_) => {
            r.file_error(
                &rel,
                ProblemKind::Unreadable,
                "cannot read file: not valid UTF-8 text; save it as UTF-8".to_owned(),
            );
            None
        }
    }
}

/// Lists `dir/sub/*.toml` as (stem, relative path), warning about everything else. Dotfiles
/// (`.gitkeep`, editor swap files) are skipped silently.
pub(crate) fn list_toml(dir: &Path, sub: &str, r: &mut Report) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let entries = match fs_err::read_dir(dir.join(sub)) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return out,
        Err(e) => {
            r.file_error(
                Path::new(sub),
                ProblemKind::Unreadable,
                format!(
                    "cannot list directory: {}; {sub}/ must be a readable directory",
                    io_reason(&e)
                ),
            );
            return out;
        }
    };
    let mut names: Vec<std::ffi::OsString> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    names.sort();
    for name in names {
        let rel = Path::new(sub).join(&name);
        let Some(name) = name.to_str() else {
            r.file_warn(
                &rel,
                ProblemKind::IgnoredFile,
                "ignored: file name is not valid UTF-8".to_owned(),
            );
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        // Follows symlinks; a dangling link is reported when read.
        let is_dir = dir.join(&rel).metadata().is_ok_and(|m| m.is_dir());
        let stem = name.strip_suffix(".toml");
        if is_dir {
            r.file_warn(
                &rel,
                ProblemKind::IgnoredFile,
                format!("ignored: a directory where a .toml file is expected; {sub}/ holds one NAME.toml file per entry"),
            );
        } else if let Some(stem) = stem.filter(|s| !s.is_empty()) {
            out.push((stem.to_owned(), rel));
        } else {
            r.file_warn(
                &rel,
                ProblemKind::IgnoredFile,
                "ignored: not a .toml file; rename it to NAME.toml if it should be loaded"
                    .to_owned(),
            );
        }
    }
    out
}

/// Loads and validates the whole directory. On success the site carries its warnings.
pub(crate) fn load_site(dir: &Path) -> Result<Site, Vec<Problem>> {
    let mut r = Report::default();
    match dir.metadata() {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            r.file_error(
                Path::new("."),
                ProblemKind::MissingSiteDir,
                format!(
                    "{} is not a directory; give a site directory",
                    dir.display()
                ),
            );
            return Err(r.problems);
        }
        Err(e) => {
            r.file_error(
                Path::new("."),
                ProblemKind::MissingSiteDir,
                format!(
                    "site directory {} cannot be read ({}); create one with `corral site init DIR`",
                    dir.display(),
                    io_reason(&e)
                ),
            );
            return Err(r.problems);
        }
    }
    let fingerprint = Fingerprint::scan(dir);

    // site.toml
    let site_rel = PathBuf::from("site.toml");
    let site_toml = if dir.join(&site_rel).exists() {
        read_source(dir, site_rel, &mut r).and_then(|src| {
            let (raw, pruned) = parse_file::<raw::RawSite>(&src, &mut r)?;
            let conv = convert_site(dir, &src, raw, pruned, &mut r);
            Some((src, conv))
        })
    } else {
        r.file_error(
            &site_rel,
            ProblemKind::MissingSiteToml,
            "missing site.toml; is this a site directory? Create one with `corral site init DIR`"
                .to_owned(),
        );
        None
    };

    // profiles/
    let mut profiles = BTreeMap::new();
    for (stem, rel) in list_toml(dir, "profiles", &mut r) {
        let Some(src) = read_source(dir, rel, &mut r) else {
            continue;
        };
        if let Some((raw, _)) = parse_file::<raw::RawProfile>(&src, &mut r) {
            let p = convert_profile(dir, &stem, &src, raw, &mut r);
            profiles.insert(p.name.clone(), p);
        }
    }
    let profile_list = || {
        let names: Vec<&str> = profiles.keys().map(|p| p.as_str()).collect();
        if names.is_empty() {
            "(none yet)".to_owned()
        } else {
            names.join(", ")
        }
    };

    // machines/
    let mut sources = Vec::new();
    let mut drafts = Vec::new();
    for (stem, rel) in list_toml(dir, "machines", &mut r) {
        let Some(src) = read_source(dir, rel, &mut r) else {
            continue;
        };
        let draft = parse_file::<raw::RawMachine>(&src, &mut r)
            .map(|(raw, pruned)| convert_machine(&stem, &src, sources.len(), raw, pruned, &mut r));
        drafts.extend(draft);
        sources.push(src);
    }

    // Cross-checks.
    let missing_discovery = site_toml.as_ref().and_then(|(src, conv)| {
        let p = conv.discovery.profile.as_ref()?;
        (!profiles.contains_key(p)).then_some((src, conv, p))
    });
    if let Some((src, conv, p)) = missing_discovery {
        r.error(
            src,
            conv.discovery_span.clone(),
            ProblemKind::DiscoveryProfileMissing,
            format!(
                "discovery profile {:?} does not exist; create profiles/{p}.toml or use one of: {}",
                p.as_str(),
                profile_list()
            ),
        );
    }
    let loc = |d: &MachineDraft, span: &Option<Range<usize>>| {
        let src = &sources[d.src_index];
        match span {
            Some(s) => {
                let (l, c) = line_col(&src.text, s.start);
                format!("{}:{l}:{c}", src.rel.display())
            }
            None => src.rel.display().to_string(),
        }
    };
    let mut by_mac: HashMap<MacAddr, usize> = HashMap::new();
    let mut by_ip: HashMap<Ipv4Addr, usize> = HashMap::new();
    let mut by_host: HashMap<Hostname, usize> = HashMap::new();
    for (i, d) in drafts.iter().enumerate() {
        let src = &sources[d.src_index];
        let missing_profile = d.profile.as_ref().filter(|p| !profiles.contains_key(*p));
        if let Some(p) = missing_profile {
            r.error(
                src,
                d.profile_span.clone(),
                ProblemKind::MissingProfile,
                format!(
                    "profile {:?} does not exist; create profiles/{p}.toml or use one of: {}",
                    p.as_str(),
                    profile_list()
                ),
            );
        }
        for (mac, span) in d.macs.iter().zip(&d.mac_spans) {
            if let Some(&j) = by_mac.get(mac) {
                let o = &drafts[j];
                let k = o.macs.iter().position(|x| x == mac).unwrap_or(0);
                r.error(
                    src,
                    span.clone(),
                    ProblemKind::DuplicateMac,
                    format!(
                        "MAC address {mac} is also used by machine {} ({}); each MAC may belong to one machine only",
                        o.name,
                        loc(o, &o.mac_spans.get(k).cloned().flatten())
                    ),
                );
            } else {
                by_mac.insert(*mac, i);
            }
        }
        if let Some(&j) = d.hostname.as_ref().and_then(|h| by_host.get(h)) {
            let o = &drafts[j];
            r.error(
                src,
                d.hostname_span.clone(),
                ProblemKind::DuplicateHostname,
                format!(
                    "hostname {:?} is also used by machine {} ({}); hostnames must be unique",
                    o.hostname.as_ref().map_or("", |h| h.as_str()),
                    o.name,
                    loc(o, &o.hostname_span)
                ),
            );
        } else if let Some(h) = &d.hostname {
            by_host.insert(h.clone(), i);
        }
        if let Some(ip) = d.ip {
            if let Some(&j) = by_ip.get(&ip) {
                let o = &drafts[j];
                r.error(
                    src,
                    d.ip_span.clone(),
                    ProblemKind::DuplicateIp,
                    format!(
                        "address {ip} is also given to machine {} ({}); give each machine its own address",
                        o.name,
                        loc(o, &o.ip_span)
                    ),
                );
            } else {
                by_ip.insert(ip, i);
            }
            if let Some((_, conv)) = &site_toml {
                let nets = &conv.dhcp.networks;
                match nets.iter().find(|n| n.cidr.contains(&ip)) {
                    // With no network at all there is nothing to check against (full mode
                    // without networks is reported once, in site.toml).
                    None if conv.networks_complete && !nets.is_empty() => {
                        let list: Vec<String> = nets.iter().map(|n| n.cidr.to_string()).collect();
                        let list = list.join(", ");
                        r.error(
                            src,
                            d.ip_span.clone(),
                            ProblemKind::IpOutsideNetworks,
                            format!(
                                "address {ip} is not inside any [[dhcp.network]] in site.toml ({list}); fix the address or add a network"
                            ),
                        );
                    }
                    None => {}
                    Some(n) => {
                        let (first, last) = n.host_range();
                        if ip < first || ip > last || Some(ip) == n.gateway {
                            r.error(
                                src,
                                d.ip_span.clone(),
                                ProblemKind::UnusableIp,
                                format!(
                                    "address {ip} is the network, broadcast or gateway address of network {:?} ({}); choose a host address between {first} and {last}",
                                    n.name, n.cidr
                                ),
                            );
                        } else if let Some(pool) = n.pool.filter(|p| p.contains(ip)) {
                            r.warn(
                                src,
                                d.ip_span.clone(),
                                ProblemKind::IpInPool,
                                format!(
                                    "address {ip} is inside the dynamic pool {pool} of network {:?}; another machine may lease it, so choose an address outside the pool",
                                    n.name
                                ),
                            );
                        }
                    }
                }
            }
        }
    }

    r.sort();
    if r.has_errors() {
        return Err(r.problems);
    }
    let Some((_, conv)) = site_toml else {
        // A missing or unparsable site.toml is always reported as an error above.
        return Err(r.problems);
    };
    let mut machines = BTreeMap::new();
    let mut macs = HashMap::new();
    for d in drafts {
        // Both are Some when no error was reported (checked just above).
        let (Some(hostname), Some(profile)) = (d.hostname, d.profile) else {
            continue;
        };
        for mac in &d.macs {
            macs.insert(*mac, d.name.clone());
        }
        let m = Machine {
            name: d.name,
            macs: d.macs,
            hostname,
            ip: d.ip,
            profile,
            groups: d.groups,
            vars: d.vars,
        };
        machines.insert(m.name.clone(), m);
    }
    let templates: Vec<PathBuf> = profiles
        .values()
        .filter_map(|p: &Profile| p.boot.as_ref()?.ipxe_template.as_ref())
        .map(|t| resolve(dir, &t.path.to_string_lossy()))
        .collect();
    Ok(Site {
        dir: dir.to_owned(),
        server: conv.server,
        dhcp: conv.dhcp,
        paths: conv.paths,
        store: conv.store,
        discovery: conv.discovery,
        profiles,
        machines,
        by_mac: macs,
        warnings: r.problems,
        fingerprint: fingerprint.with_files(&templates),
    })
}

/// Problems in a `site.toml` text, without touching the disk beyond the site dir `/`
/// (paths checks are skipped). For fuzzing and tests: must never panic.
pub fn check_site_toml_str(text: &str) -> Vec<Problem> {
    let mut r = Report::default();
    let src = Source {
        rel: "site.toml".into(),
        text: text.to_owned(),
    };
    if let Some((raw, pruned)) = parse_file::<raw::RawSite>(&src, &mut r) {
        let _ = convert_site(
            Path::new("/nonexistent-corral-site"),
            &src,
            raw,
            pruned,
            &mut r,
        );
    }
    r.problems.retain(|p| p.kind != ProblemKind::MissingDir);
    r.sort();
    r.problems
}

/// Problems in one machine file's text (`machines/{stem}.toml`), alone. Never panics.
pub fn check_machine_str(stem: &str, text: &str) -> Vec<Problem> {
    let mut r = Report::default();
    let src = Source {
        rel: Path::new("machines").join(format!("{stem}.toml")),
        text: text.to_owned(),
    };
    if let Some((raw, pruned)) = parse_file::<raw::RawMachine>(&src, &mut r) {
        let _ = convert_machine(stem, &src, 0, raw, pruned, &mut r);
    }
    r.sort();
    r.problems
}

/// Problems in one profile file's text (`profiles/{stem}.toml`), alone; template paths are
/// resolved against a directory that does not exist. Never panics.
pub fn check_profile_str(stem: &str, text: &str) -> Vec<Problem> {
    let mut r = Report::default();
    let src = Source {
        rel: Path::new("profiles").join(format!("{stem}.toml")),
        text: text.to_owned(),
    };
    if let Some((raw, _)) = parse_file::<raw::RawProfile>(&src, &mut r) {
        let _ = convert_profile(
            Path::new("/nonexistent-corral-site"),
            stem,
            &src,
            raw,
            &mut r,
        );
    }
    r.problems
}
