//! iPXE scripts: a profile's template rendered with `minijinja` and the machine's variables.

use std::net::IpAddr;

use corral_model::{MacAddr, SessionId};
use corral_site::Site;
use minijinja::Environment;

use crate::decision::{MachinePlan, Plan, UrlBase};
use crate::error::NetbootError;

/// The install script used when a profile with `[boot]` names no `ipxe_template`.
pub const DEFAULT_INSTALL_TEMPLATE: &str =
    include_str!("../../../examples/site/templates/install.ipxe");
/// The script sent to machines that boot from their local disk.
pub const DEFAULT_LOCAL_TEMPLATE: &str =
    include_str!("../../../examples/site/templates/local.ipxe");

/// Everything a template may use. Serialised as the template's context.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScriptVars {
    /// The machine's hostname (site), else `unknown-<mac dashed>`.
    pub hostname: String,
    /// `machines/NAME.toml` stem, empty for unknown machines.
    pub name: String,
    /// `52:54:00:12:34:56`.
    pub mac: String,
    /// The client's address, when known.
    pub ip: String,
    /// The profile booted.
    pub profile: String,
    /// The machine's groups.
    pub groups: Vec<String>,
    /// The machine's `[vars]`.
    pub vars: std::collections::BTreeMap<String, String>,
    /// The lifecycle state.
    pub state: String,
    /// The boot session id (16 hex digits).
    pub session: String,
    /// `http://ADDR:PORT`.
    pub base_url: String,
    /// The profile's kernel, relative to the boot root (empty when none).
    pub kernel: String,
    /// The first initrd, relative to the boot root (empty when none).
    pub initrd: String,
    /// Absolute URL of the kernel (empty when none).
    pub kernel_url: String,
    /// Absolute URLs of the initrds, in load order.
    pub initrd_urls: Vec<String>,
    /// The profile's kernel command line, itself rendered with these variables.
    pub cmdline: String,
    /// The installer's done callback (GET or POST).
    pub done_url: String,
    /// Where installers send syslog (`ADDR:PORT`), empty when the receiver is off.
    pub syslog_server: String,
    /// `[server] name`.
    pub server_name: String,
    /// What the profile does after installing (`local`, `reboot`, `poweroff`, `stay`).
    pub after: String,
}

/// Builds the variables for `mac` under `plan`.
#[allow(clippy::too_many_arguments)]
pub fn vars(
    site: &Site,
    mac: MacAddr,
    ip: Option<IpAddr>,
    plan: &MachinePlan,
    session: SessionId,
    urls: &UrlBase,
    syslog_server: Option<String>,
) -> ScriptVars {
    let machine = site.machine_by_mac(&mac);
    let profile = plan
        .identity
        .profile
        .as_deref()
        .and_then(|p| site.profile(p));
    let boot = profile.and_then(|p| p.boot.as_ref());
    let rel = |p: &std::path::Path| p.to_string_lossy().trim_start_matches('/').to_owned();
    let kernel = boot
        .and_then(|b| b.kernel.as_deref())
        .map(rel)
        .unwrap_or_default();
    let initrds: Vec<String> = boot
        .map(|b| b.initrd.iter().map(|p| rel(p)).collect())
        .unwrap_or_default();
    let url = |p: &str| format!("{}/boot/{}", urls.base, p);
    let mut v = ScriptVars {
        hostname: plan
            .identity
            .hostname
            .clone()
            .unwrap_or_else(|| format!("unknown-{}", mac.dashed())),
        name: plan.identity.name.clone().unwrap_or_default(),
        mac: mac.to_string(),
        ip: ip.map(|i| i.to_string()).unwrap_or_default(),
        profile: plan.identity.profile.clone().unwrap_or_default(),
        groups: machine.map(|m| m.groups.clone()).unwrap_or_default(),
        vars: machine.map(|m| m.vars.clone()).unwrap_or_default(),
        state: plan.state.to_string(),
        session: session.to_string(),
        base_url: urls.base.clone(),
        kernel_url: if kernel.is_empty() {
            String::new()
        } else {
            url(&kernel)
        },
        initrd_urls: initrds.iter().map(|i| url(i)).collect(),
        initrd: initrds.first().cloned().unwrap_or_default(),
        kernel,
        cmdline: String::new(),
        done_url: urls.done(mac),
        syslog_server: syslog_server.unwrap_or_default(),
        server_name: site.server.name.clone(),
        after: profile
            .map(|p| serde_json::to_value(p.install.after).ok())
            .and_then(|v| v.and_then(|v| v.as_str().map(str::to_owned)))
            .unwrap_or_else(|| "local".into()),
    };
    if let Some(c) = boot.and_then(|b| b.cmdline.as_deref()) {
        // The command line may use the same variables; a broken one is shown as written.
        v.cmdline = render_text(c, &v).unwrap_or_else(|_| c.to_owned());
    }
    v
}

/// The template text for `plan` and where it came from.
pub fn template_for<'a>(site: &'a Site, plan: &MachinePlan) -> Option<(&'a str, String)> {
    match &plan.plan {
        Plan::Install(p) | Plan::Discover(p) => {
            let t = site.profile(p)?.boot.as_ref()?.ipxe_template.as_ref();
            Some(match t {
                Some(t) => (t.text.as_str(), t.path.display().to_string()),
                None => (DEFAULT_INSTALL_TEMPLATE, "built-in install template".into()),
            })
        }
        Plan::Local => Some((
            DEFAULT_LOCAL_TEMPLATE,
            "built-in local-boot template".into(),
        )),
        Plan::Refuse => None,
    }
}

/// Renders `text` with `vars`.
pub fn render_text(text: &str, vars: &ScriptVars) -> Result<String, minijinja::Error> {
    let mut env = Environment::new();
    env.set_keep_trailing_newline(true);
    env.set_trim_blocks(true);
    env.render_str(text, vars)
}

/// Renders the script for `plan`: the template named by the profile (or a built-in one).
pub fn render(
    site: &Site,
    plan: &MachinePlan,
    vars: &ScriptVars,
) -> Result<(String, String), NetbootError> {
    let (text, origin) = template_for(site, plan).ok_or_else(|| NetbootError::NoScript {
        reason: plan.reason.clone(),
    })?;
    let mut out = render_text(text, vars).map_err(|e| NetbootError::Template {
        template: origin.clone(),
        reason: format!("{e:#}"),
    })?;
    // iPXE reads line by line; make sure the last command has its newline.
    if !out.ends_with('\n') {
        out.push('\n');
    }
    Ok((out, origin))
}
