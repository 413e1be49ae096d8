//! The boot decision: a pure function of the site, the machine's stored lifecycle state and
//! the request. No sockets, no clock, no files: every server (DHCP, TFTP, HTTP) asks it and
//! records its answer and reason.

use std::net::Ipv4Addr;

use corral_model::{LifecycleState, MacAddr};
use corral_site::Site;

use crate::firmware::{self, Binary, ClientKind, Platform, Step};

/// One firmware's request to boot, as the DHCP layer saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootRequest {
    /// The client's hardware address.
    pub mac: MacAddr,
    /// PXE, HTTP Boot or iPXE.
    pub client: ClientKind,
    /// From option 93.
    pub platform: Platform,
    /// The client's address, when known (full mode: the address offered; proxy: ciaddr).
    pub ip: Option<Ipv4Addr>,
    /// True when answering as ProxyDHCP (another server owns addresses).
    pub proxy: bool,
}

/// Where URLs point and which binaries are handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlBase {
    /// `http://ADDR:PORT`, no trailing slash: absolute URLs always, because under ProxyDHCP
    /// `${next-server}` is somebody else's server.
    pub base: String,
    /// The x64 UEFI iPXE file name (`snponly.efi` or `ipxe.efi`).
    pub uefi_binary: String,
}

impl UrlBase {
    /// `http://ADDR:PORT`.
    pub fn new(addr: Ipv4Addr, port: u16, uefi_binary: &str) -> UrlBase {
        UrlBase {
            base: format!("http://{addr}:{port}"),
            uefi_binary: uefi_binary.to_owned(),
        }
    }

    /// The URL of `mac`'s iPXE script.
    pub fn script(&self, mac: MacAddr) -> String {
        format!("{}/ipxe/{mac}", self.base)
    }

    /// The URL of an iPXE binary.
    pub fn binary(&self, file: &str) -> String {
        format!("{}/ipxe-bin/{file}", self.base)
    }

    /// The installer's done callback for `mac`.
    pub fn done(&self, mac: MacAddr) -> String {
        format!("{}/api/v1/machines/{mac}/done", self.base)
    }

    /// The file name of `b`.
    pub fn file_name(&self, b: Binary) -> &str {
        match b {
            Binary::Undionly => "undionly.kpxe",
            Binary::UefiX64 => &self.uefi_binary,
        }
    }
}

/// What a machine's next boot does.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase", tag = "plan", content = "profile")]
pub enum Plan {
    /// Run the profile's installer (iPXE script from the profile).
    Install(String),
    /// An unknown machine boots the site's discovery profile.
    Discover(String),
    /// Boot from the local disk.
    Local,
    /// Not answered (unknown machine and no discovery profile).
    Refuse,
}

/// Who the machine is, as far as the site knows.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Identity {
    /// `machines/NAME.toml` stem, for declared machines.
    pub name: Option<String>,
    /// Hostname from the site.
    pub hostname: Option<String>,
    /// The profile booted (the machine's, or the discovery profile).
    pub profile: Option<String>,
}

/// The machine's plan, state and identity: what every path (DHCP, TFTP, HTTP) acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachinePlan {
    /// Who.
    pub identity: Identity,
    /// What the next boot does.
    pub plan: Plan,
    /// The lifecycle state after this boot's decision.
    pub state: LifecycleState,
    /// A state to store, when it differs from the stored one.
    pub new_state: Option<LifecycleState>,
    /// A sentence: which rule matched.
    pub reason: String,
}

/// Decides what `mac`'s next boot does from the site and its stored state.
///
/// Lifecycle: a declared machine never seen (`new`, or `discovered` before it was adopted)
/// is installed; `install` stays until the installer's callback moves it to `installed`;
/// `installed` and `local` boot from disk (`installed` becomes `local` on that first local
/// boot). A profile without `[boot]` always boots from disk. Unknown MACs get the site's
/// discovery profile (and are `discovered`), or no answer when there is none.
pub fn plan_for(site: &Site, mac: MacAddr, stored: Option<LifecycleState>) -> MachinePlan {
    use LifecycleState as S;
    match site.machine_by_mac(&mac) {
        Some(m) => {
            let identity = Identity {
                name: Some(m.name.to_string()),
                hostname: Some(m.hostname.to_string()),
                profile: Some(m.profile.to_string()),
            };
            let has_boot = site
                .profile(m.profile.as_str())
                .is_some_and(|p| p.boot.is_some());
            let state = match stored {
                None | Some(S::New) | Some(S::Discovered) => S::Install,
                Some(S::Installed) => S::Local,
                Some(s) => s,
            };
            let (plan, state) = if !has_boot {
                (Plan::Local, state)
            } else if state == S::Install {
                (Plan::Install(m.profile.to_string()), state)
            } else {
                (Plan::Local, state)
            };
            let was = stored.map_or("never seen".to_owned(), |s| format!("state {s}"));
            let what = match &plan {
                Plan::Install(p) => format!("installs profile {p}"),
                Plan::Local if !has_boot => {
                    format!("profile {} has no [boot]: local disk", m.profile)
                }
                _ => "boots from local disk".to_owned(),
            };
            MachinePlan {
                reason: format!("matched machine {} ({was}): {what}", m.name),
                new_state: (stored != Some(state)).then_some(state),
                identity,
                plan,
                state,
            }
        }
        None => match &site.discovery.profile {
            Some(p) => {
                let state = stored.unwrap_or(S::Discovered);
                let plan = match state {
                    S::Installed | S::Local => Plan::Local,
                    _ => Plan::Discover(p.to_string()),
                };
                MachinePlan {
                    reason: format!(
                        "unknown MAC {mac} ({}): discovery profile {p}",
                        stored.map_or("first seen".to_owned(), |s| format!("state {s}"))
                    ),
                    new_state: (stored.is_none() && site.discovery.enrol).then_some(state),
                    identity: Identity {
                        profile: Some(p.to_string()),
                        ..Identity::default()
                    },
                    plan,
                    state,
                }
            }
            None => MachinePlan {
                reason: format!("unknown MAC {mac} and no [discovery] profile in site.toml"),
                identity: Identity::default(),
                plan: Plan::Refuse,
                state: stored.unwrap_or(S::Discovered),
                new_state: None,
            },
        },
    }
}

/// The answer to one DHCP boot request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Next-server is us, boot file `filename` by TFTP.
    Tftp {
        /// File name (root-relative).
        filename: String,
    },
    /// Boot from this absolute http URL (HTTP Boot binary, or iPXE script).
    Http {
        /// The URL.
        url: String,
    },
    /// Boot from the local disk: full DHCP gives an address without a boot file; ProxyDHCP
    /// does not answer, so the firmware moves on to its next boot device.
    LocalBoot,
    /// Do not answer at all.
    Ignore,
}

/// A boot decision with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What to answer.
    pub answer: Answer,
    /// The machine's plan behind it.
    pub plan: MachinePlan,
    /// The full human reason: plan and firmware rule.
    pub reason: String,
}

/// Decides the DHCP answer for `req`. Pure: the caller stores [`MachinePlan::new_state`].
pub fn decide(
    site: &Site,
    stored: Option<LifecycleState>,
    req: &BootRequest,
    urls: &UrlBase,
) -> Decision {
    let plan = plan_for(site, req.mac, stored);
    let fw = format!("{} on {}", req.client, req.platform);
    let (answer, why) = match (&plan.plan, firmware::rule_for(req.client, req.platform)) {
        (Plan::Refuse, _) => (Answer::Ignore, "not answered".to_owned()),
        (_, None) => (
            Answer::Ignore,
            format!("no boot program for {fw} in the firmware table; not answered"),
        ),
        // iPXE always gets its script: for a local machine the script itself boots the disk.
        (_, Some(rule)) if rule.step == Step::Script => {
            let url = urls.script(req.mac);
            let why = format!("{fw}: {}: {url}", rule.why);
            (Answer::Http { url }, why)
        }
        (Plan::Local, Some(_)) => (
            Answer::LocalBoot,
            if req.proxy {
                format!(
                    "{fw}: no ProxyDHCP answer, the firmware boots its next device (local disk)"
                )
            } else {
                format!("{fw}: address only, no boot file: the firmware boots its local disk")
            },
        ),
        (_, Some(rule)) => match rule.step {
            Step::TftpBinary(b) => {
                let filename = urls.file_name(b).to_owned();
                (
                    Answer::Tftp {
                        filename: filename.clone(),
                    },
                    format!("{fw}: {}: {filename}", rule.why),
                )
            }
            Step::HttpBinary(b) => {
                let url = urls.binary(urls.file_name(b));
                (
                    Answer::Http { url: url.clone() },
                    format!("{fw}: {}: {url}", rule.why),
                )
            }
            Step::Script => {
                let url = urls.script(req.mac);
                (
                    Answer::Http { url: url.clone() },
                    format!("{fw}: {}: {url}", rule.why),
                )
            }
        },
    };
    Decision {
        reason: format!("{}; {why}", plan.reason),
        answer,
        plan,
    }
}

#[cfg(test)]
mod tests;
