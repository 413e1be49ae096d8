//! The engine every server asks: boot decisions with their events, lifecycle transitions in
//! the store, sessions, iPXE scripts, the iPXE binaries, and IP → machine lookups.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use corral_model::{Event, LifecycleState, MacAddr, Outcome, SessionId, Source, UnixMillis};
use corral_site::{Site, SiteHandle};
use corral_store::{MachineUpdate, Recorder, Store};

use crate::decision::{self, Answer, BootRequest, Decision, MachinePlan, Plan, UrlBase};
use crate::error::NetbootError;
use crate::firmware::ClientKind;
use crate::script;
use crate::session::Sessions;
use crate::state::StateWriter;

/// Event kinds recorded by this crate (source in parentheses).
pub mod kinds {
    /// A boot decision (dhcp).
    pub const BOOT: &str = "boot";
    /// A lifecycle state change (dhcp/http/cli).
    pub const LIFECYCLE: &str = "lifecycle";
    /// A TFTP read decided (tftp).
    pub const TFTP_READ: &str = "read";
    /// An iPXE script served (http).
    pub const SCRIPT: &str = "script";
    /// A file served (http).
    pub const FILE: &str = "file";
    /// The installer's done callback (http).
    pub const DONE: &str = "done";
    /// A request refused (http).
    pub const DENIED: &str = "denied";
    /// A syslog message (syslog).
    pub const MESSAGE: &str = "message";
    /// Site reloaded (site).
    pub const RELOAD: &str = "reload";
}

/// Engine settings that are not in the site directory.
#[derive(Debug, Clone)]
pub struct NetbootConfig {
    /// The x64 UEFI iPXE binary handed out: `snponly.efi` (default) or `ipxe.efi`.
    pub uefi_binary: String,
    /// Where installers send syslog, for the `syslog_server` template variable (`None`: off).
    pub syslog: Option<SocketAddr>,
    /// A boot session ends after this long without a request.
    pub session_idle: Duration,
}

impl Default for NetbootConfig {
    fn default() -> Self {
        NetbootConfig {
            uefi_binary: "snponly.efi".into(),
            syslog: None,
            session_idle: Duration::from_secs(120),
        }
    }
}

/// What the TFTP server should do with one read request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TftpAnswer {
    /// Serve the path from the boot root.
    Serve,
    /// Serve these bytes (an iPXE binary).
    Bytes(Bytes),
    /// Refuse with this message.
    Deny(String),
}

/// The netboot engine. Share it as `Arc<Netboot>`; every method is safe to call from any
/// server task. Machine state is read by primary key on the engine's own connection (after
/// the [`StateWriter`]'s queue, which holds the newest state) and written by the
/// [`StateWriter`]'s thread, so no boot decision waits for a commit; events go through the
/// never-blocking [`Recorder`].
#[derive(Debug)]
pub struct Netboot {
    site: SiteHandle,
    recorder: Recorder,
    store: Mutex<Store>,
    state: StateWriter,
    sessions: Mutex<Sessions>,
    binaries: Mutex<HashMap<PathBuf, Bytes>>,
    config: NetbootConfig,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_ms() -> UnixMillis {
    UnixMillis::from_system_time(SystemTime::now())
}

impl Netboot {
    /// An engine over `site`, with `store` (a file store: the engine reads lifecycle state on
    /// this connection and opens a second one on the same file for its state writer) and
    /// `recorder` (events).
    pub fn new(
        site: SiteHandle,
        store: Store,
        recorder: Recorder,
        config: NetbootConfig,
    ) -> Result<Arc<Netboot>, NetbootError> {
        let state = StateWriter::spawn(Store::open(store.path())?)?;
        Ok(Arc::new(Netboot {
            site,
            recorder,
            store: Mutex::new(store),
            state,
            sessions: Mutex::new(Sessions::new(config.session_idle)),
            binaries: Mutex::new(HashMap::new()),
            config,
        }))
    }

    /// The site handle.
    pub fn site(&self) -> &SiteHandle {
        &self.site
    }

    /// The event recorder.
    pub fn recorder(&self) -> &Recorder {
        &self.recorder
    }

    /// The engine settings.
    pub fn config(&self) -> &NetbootConfig {
        &self.config
    }

    /// Checks that the iPXE binaries the firmware table hands out exist (and caches them).
    pub fn check_binaries(&self) -> Result<(), NetbootError> {
        for f in ["undionly.kpxe", self.config.uefi_binary.as_str()] {
            self.binary(f)?;
        }
        Ok(())
    }

    /// An iPXE binary from `[paths] ipxe`, read once and cached. Only plain file names.
    pub fn binary(&self, file: &str) -> Result<Bytes, NetbootError> {
        let site = self.site.current();
        let dir = &site.paths.ipxe;
        let missing = || NetbootError::MissingIpxe {
            path: dir.join(file),
            file: file.to_owned(),
        };
        if crate::files::plain_relative(file).is_err() || file.contains('/') {
            return Err(missing());
        }
        let path = dir.join(file);
        if let Some(b) = lock(&self.binaries).get(&path) {
            return Ok(b.clone());
        }
        let resolved = crate::files::resolve_beneath(dir, file).map_err(|_| missing())?;
        let data = fs_err::read(&resolved).map_err(|_| missing())?;
        let b = Bytes::from(data);
        lock(&self.binaries).insert(path, b.clone());
        Ok(b)
    }

    /// The URL base for clients reached through `server_ip` (`[server] advertise` wins).
    pub fn urls(&self, site: &Site, server_ip: Ipv4Addr) -> UrlBase {
        UrlBase::new(
            site.server.advertise.unwrap_or(server_ip),
            site.server.http_port,
            &self.config.uefi_binary,
        )
    }

    /// The lifecycle state of `mac`: the newest queued one, else the store's.
    pub fn stored_state(&self, mac: MacAddr) -> Option<LifecycleState> {
        if let Some(s) = self.state.state(mac) {
            return Some(s);
        }
        match lock(&self.store).machine(mac) {
            Ok(m) => m.and_then(|m| m.state),
            Err(e) => {
                tracing::error!(%mac, error = %e, "cannot read machine state; treating as unknown");
                None
            }
        }
    }

    fn apply_plan(
        &self,
        mac: MacAddr,
        ip: Option<IpAddr>,
        plan: &MachinePlan,
        source: Source,
        session: Option<SessionId>,
    ) {
        let now = now_ms();
        let next = match &plan.plan {
            Plan::Install(p) => format!("install profile {p}"),
            Plan::Discover(p) => format!("discovery profile {p}"),
            Plan::Local => "boot from local disk".into(),
            Plan::Refuse => "not answered".into(),
        };
        self.state.update(MachineUpdate {
            seen: Some(now),
            hostname: plan.identity.hostname.clone(),
            ip,
            state: plan.new_state,
            next_action: Some(next),
            ..MachineUpdate::new(mac, now)
        });
        if let Some(state) = plan.new_state {
            let mut ev = Event::new(
                now,
                source,
                kinds::LIFECYCLE,
                Outcome::Info,
                format!(
                    "{} is now {state}: {}",
                    plan.identity.name.as_deref().unwrap_or("unknown machine"),
                    plan.reason
                ),
            )
            .with_mac(mac)
            .with_details(serde_json::json!({ "state": state }));
            if let Some(h) = &plan.identity.hostname {
                ev = ev.with_hostname(h.clone());
            }
            if let Some(s) = session {
                ev = ev.with_session(s);
            }
            self.recorder.record(ev);
        }
    }

    /// Decides the answer to a firmware's DHCP boot request, starts or continues its boot
    /// session, stores lifecycle changes and records the decision as an event.
    pub fn boot(
        &self,
        req: &BootRequest,
        server_ip: Ipv4Addr,
        interface: &str,
    ) -> (Decision, SessionId) {
        let site = self.site.current();
        let (session, new) = lock(&self.sessions).on_boot_request(
            req.mac,
            req.client,
            Instant::now(),
            SessionId::new,
        );
        if let Some(ip) = req.ip {
            lock(&self.sessions).learn_ip(req.mac, IpAddr::V4(ip));
        }
        let stored = self.stored_state(req.mac);
        let d = decision::decide(&site, stored, req, &self.urls(&site, server_ip));
        if d.answer != Answer::Ignore || site.machine_by_mac(&req.mac).is_some() {
            self.apply_plan(
                req.mac,
                req.ip.map(IpAddr::V4),
                &d.plan,
                Source::Dhcp,
                Some(session),
            );
        }
        let (answer, outcome) = match &d.answer {
            Answer::Tftp { filename } => (serde_json::json!({ "tftp": filename }), Outcome::Ok),
            Answer::Http { url } => (serde_json::json!({ "http": url }), Outcome::Ok),
            Answer::LocalBoot => (serde_json::json!("local"), Outcome::Ok),
            Answer::Ignore => (serde_json::json!("ignore"), Outcome::Info),
        };
        let mut ev = Event::new(
            now_ms(),
            Source::Dhcp,
            kinds::BOOT,
            outcome,
            d.reason.clone(),
        )
        .with_mac(req.mac)
        .with_session(session)
        .with_details(serde_json::json!({
            "answer": answer,
            "client": req.client,
            "platform": req.platform.to_string(),
            "proxy": req.proxy,
            "interface": interface,
            "state": d.plan.state,
            "new_session": new,
        }));
        if let Some(h) = &d.plan.identity.hostname {
            ev = ev.with_hostname(h.clone());
        }
        if let Some(ip) = req.ip {
            ev = ev.with_ip(IpAddr::V4(ip));
        }
        self.recorder.record(ev);
        (d, session)
    }

    /// Records that `mac` holds `ip` (from a DHCP lease), for later TFTP/HTTP/syslog lookups.
    pub fn learn_ip(&self, mac: MacAddr, ip: IpAddr) {
        lock(&self.sessions).learn_ip(mac, ip);
    }

    /// The current boot session of `mac`.
    pub fn session_of(&self, mac: MacAddr) -> Option<SessionId> {
        lock(&self.sessions).touch(mac, Instant::now())
    }

    /// The machine using `ip`: from DHCP leases and requests seen, else the kernel's
    /// neighbour table (the client ARPed for us before sending), else the store's last IP.
    pub fn mac_for_ip(&self, ip: IpAddr) -> Option<MacAddr> {
        if let Some(m) = lock(&self.sessions).mac_for_ip(ip) {
            return Some(m);
        }
        if let Some(m) = crate::neighbour::lookup(ip) {
            lock(&self.sessions).learn_ip(m, ip);
            return Some(m);
        }
        lock(&self.store).machine_by_ip(ip).ok()?.map(|m| m.mac)
    }

    /// A base event for `mac` (hostname from the site, current session).
    pub fn machine_event(
        &self,
        source: Source,
        kind: &str,
        outcome: Outcome,
        reason: String,
        mac: Option<MacAddr>,
        ip: Option<IpAddr>,
    ) -> Event {
        let mut ev = Event::new(now_ms(), source, kind, outcome, reason);
        if let Some(mac) = mac {
            ev = ev.with_mac(mac);
            if let Some(m) = self.site.current().machine_by_mac(&mac) {
                ev = ev.with_hostname(m.hostname.to_string());
            }
            if let Some(s) = self.session_of(mac) {
                ev = ev.with_session(s);
            }
        }
        if let Some(ip) = ip {
            ev = ev.with_ip(ip);
        }
        ev
    }

    /// Decides one TFTP read request and records it.
    ///
    /// iPXE binaries are served from `[paths] ipxe` (cached) — except to a machine whose
    /// next boot is local, which is refused so that a firmware that ignores the DHCP answer
    /// still cannot loop into an install. Every other path is served from the boot root.
    pub fn tftp_request(&self, peer: SocketAddr, path: &str) -> TftpAnswer {
        let mac = self.mac_for_ip(peer.ip());
        let file = path.trim_start_matches('/');
        let site = self.site.current();
        let plan = mac.map(|m| decision::plan_for(&site, m, self.stored_state(m)));
        let is_binary = [
            "undionly.kpxe",
            "undionly.kkpxe",
            "snponly.efi",
            "ipxe.efi",
            "ipxe.pxe",
        ]
        .contains(&file);
        let (answer, outcome, reason) = match (&plan, is_binary) {
            (Some(p), true) if matches!(p.plan, Plan::Local | Plan::Refuse) => (
                TftpAnswer::Deny(format!(
                    "{}: boot from local disk",
                    p.identity.name.as_deref().unwrap_or("this machine")
                )),
                Outcome::Denied,
                format!(
                    "{}; refused iPXE binary {file}: the machine boots from its local disk",
                    p.reason
                ),
            ),
            (_, true) => match self.binary(file) {
                Ok(b) => {
                    let why = format!(
                        "serving iPXE binary {file} ({} bytes) from {}",
                        b.len(),
                        site.paths.ipxe.display()
                    );
                    (TftpAnswer::Bytes(b), Outcome::Ok, why)
                }
                Err(e) => (
                    TftpAnswer::Deny(format!("{file} not available")),
                    Outcome::Fail,
                    e.to_string(),
                ),
            },
            (_, false) => (
                TftpAnswer::Serve,
                Outcome::Info,
                format!(
                    "read {file} from the boot root {}",
                    site.paths.boot.display()
                ),
            ),
        };
        if let Some(m) = mac {
            self.learn_ip(m, peer.ip());
        }
        self.recorder.record(
            self.machine_event(
                Source::Tftp,
                kinds::TFTP_READ,
                outcome,
                reason,
                mac,
                Some(peer.ip()),
            )
            .with_details(serde_json::json!({ "path": path })),
        );
        answer
    }

    /// Renders `mac`'s iPXE script for a request from `peer` to `local` (our address, for
    /// absolute URLs). Records the event. `Err` carries the reason for a 404.
    pub fn script(&self, mac: MacAddr, peer: IpAddr, local: Ipv4Addr) -> Result<String, String> {
        let site = self.site.current();
        let session = lock(&self.sessions).on_ipxe(mac, Instant::now(), SessionId::new);
        self.learn_ip(mac, peer);
        let stored = self.stored_state(mac);
        let plan = decision::plan_for(&site, mac, stored);
        if plan.plan != Plan::Refuse {
            self.apply_plan(mac, Some(peer), &plan, Source::Http, Some(session));
        }
        let urls = self.urls(&site, local);
        let syslog = self.config.syslog.map(|a| {
            let ip = match a.ip() {
                IpAddr::V4(v) if v.is_unspecified() => site.server.advertise.unwrap_or(local),
                IpAddr::V4(v) => v,
                IpAddr::V6(_) => local,
            };
            format!("{ip}:{}", a.port())
        });
        let vars = script::vars(&site, mac, Some(peer), &plan, session, &urls, syslog);
        let result = script::render(&site, &plan, &vars);
        let mut ev = Event::new(
            now_ms(),
            Source::Http,
            kinds::SCRIPT,
            Outcome::Ok,
            String::new(),
        )
        .with_mac(mac)
        .with_ip(peer)
        .with_session(session);
        if let Some(h) = &plan.identity.hostname {
            ev = ev.with_hostname(h.clone());
        }
        match result {
            Ok((text, origin)) => {
                ev.reason = format!("{}; iPXE script from {origin}", plan.reason);
                ev.details = serde_json::json!({ "state": plan.state, "template": origin, "bytes": text.len() });
                self.recorder.record(ev);
                Ok(text)
            }
            Err(e) => {
                ev.outcome = if plan.plan == Plan::Refuse {
                    Outcome::Denied
                } else {
                    Outcome::Fail
                };
                ev.reason = e.to_string();
                self.recorder.record(ev);
                Err(e.to_string())
            }
        }
    }

    /// The installer's done callback: `install` → `installed`, so the next boot is local.
    /// Returns the message for the response, `Err` when the machine was not installing.
    pub fn done(&self, mac: MacAddr, peer: IpAddr) -> Result<String, String> {
        let stored = self.stored_state(mac);
        let site = self.site.current();
        let name = site
            .machine_by_mac(&mac)
            .map(|m| m.name.to_string())
            .unwrap_or_else(|| mac.to_string());
        let result = if stored == Some(LifecycleState::Install) {
            let now = now_ms();
            let seq = self.state.update(MachineUpdate {
                seen: Some(now),
                ip: Some(peer),
                state: Some(LifecycleState::Installed),
                next_action: Some("boot from local disk".into()),
                ..MachineUpdate::new(mac, now)
            });
            // On disk before the installer hears "done": a lost `installed` would reinstall
            // the machine at its next boot.
            let r = self.state.flush(seq);
            match r {
                Ok(()) => Ok(format!(
                    "{name} is installed; its next boot is from the local disk"
                )),
                Err(e) => Err(format!("cannot store the new state of {name}: {e}")),
            }
        } else {
            Err(format!(
                "{name} is {}, not install: nothing changed",
                stored.map_or("unknown".to_owned(), |s| s.to_string())
            ))
        };
        let (outcome, reason) = match &result {
            Ok(m) => (Outcome::Ok, format!("installer reported done: {m}")),
            Err(m) => (Outcome::Warn, format!("done callback ignored: {m}")),
        };
        let ev = self.machine_event(Source::Http, kinds::DONE, outcome, reason, Some(mac), Some(peer))
            .with_details(serde_json::json!({ "state": if result.is_ok() { Some(LifecycleState::Installed) } else { stored } }));
        self.recorder.record(ev);
        result
    }

    /// The client kind's session start (exposed for drivers that see firmware requests).
    pub fn begin_boot(&self, mac: MacAddr, client: ClientKind) -> SessionId {
        lock(&self.sessions)
            .on_boot_request(mac, client, Instant::now(), SessionId::new)
            .0
    }
}
