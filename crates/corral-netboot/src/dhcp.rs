//! The DHCP policy: the netboot engine answering `corral-dhcp`'s boot questions and
//! recording its events (source `dhcp`).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use corral_dhcp::{Arch, Boot, BootAnswer, BootQuery, DhcpEventKind, Firmware};
use corral_dhcp::{BootPolicy, DhcpEvent};
use corral_model::{Event, Outcome, Source, UnixMillis};

use crate::decision::{Answer, BootRequest};
use crate::engine::Netboot;
use crate::firmware::{ClientKind, Platform};

/// [`BootPolicy`] backed by the engine, for one interface.
#[derive(Debug, Clone)]
pub struct DhcpPolicy {
    /// The engine.
    pub engine: Arc<Netboot>,
    /// Our address on the interface (for URLs when `[server] advertise` is unset).
    pub server_ip: Ipv4Addr,
}

/// Maps option 93 onto the firmware table's platforms.
pub fn platform_of(arch: Option<Arch>) -> Platform {
    match arch {
        Some(Arch::BiosX86 | Arch::HttpBiosX86) => Platform::Bios,
        Some(Arch::UefiX64 | Arch::HttpUefiX64) => Platform::UefiX64,
        Some(Arch::UefiIa32 | Arch::HttpUefiIa32) => Platform::UefiIa32,
        Some(Arch::UefiArm64 | Arch::HttpUefiArm64) => Platform::UefiArm64,
        Some(a) => Platform::Other(Some(a.code())),
        None => Platform::Other(None),
    }
}

impl BootPolicy for DhcpPolicy {
    fn decide(&self, q: &BootQuery) -> BootAnswer {
        let client = match q.client.firmware {
            Firmware::Pxe => ClientKind::Pxe,
            Firmware::HttpClient => ClientKind::HttpClient,
            Firmware::Ipxe => ClientKind::Ipxe,
            Firmware::None => return BootAnswer::new(Boot::Ignore, "not a boot request"),
        };
        let req = BootRequest {
            mac: q.client.mac,
            client,
            platform: platform_of(q.client.arch),
            ip: q.ip.or(q.client.ciaddr),
            proxy: q.proxy,
        };
        let (d, session) = self.engine.boot(&req, self.server_ip, &q.interface);
        let boot = match d.answer {
            Answer::Tftp { filename } => Boot::Tftp { filename },
            Answer::Http { url } => Boot::Http { url },
            Answer::LocalBoot => Boot::NoBootFile,
            Answer::Ignore => Boot::Ignore,
        };
        BootAnswer {
            boot,
            reason: d.reason,
            session: Some(session),
        }
    }

    fn on_event(&self, ev: DhcpEvent) {
        let e = &self.engine;
        if let (Some(mac), Some(ip)) = (ev.mac, ev.ip)
            && matches!(
                ev.kind,
                DhcpEventKind::Ack | DhcpEventKind::Offer | DhcpEventKind::ProxyAck
            )
        {
            e.learn_ip(mac, IpAddr::V4(ip));
        }
        let outcome = match ev.kind {
            DhcpEventKind::Offer
            | DhcpEventKind::Ack
            | DhcpEventKind::Inform
            | DhcpEventKind::ProxyOffer
            | DhcpEventKind::ProxyAck => Outcome::Ok,
            DhcpEventKind::Release | DhcpEventKind::Expired => Outcome::Info,
            DhcpEventKind::Nak | DhcpEventKind::Decline => Outcome::Warn,
            DhcpEventKind::Dropped => Outcome::Info,
        };
        let mut out = Event::new(
            UnixMillis::from_system_time(std::time::SystemTime::now()),
            Source::Dhcp,
            ev.kind.as_str(),
            outcome,
            ev.reason.clone(),
        );
        if let Some(mac) = ev.mac {
            out = out.with_mac(mac);
            if let Some(m) = e.site().current().machine_by_mac(&mac) {
                out = out.with_hostname(m.hostname.to_string());
            }
        }
        if out.hostname.is_none() {
            out.hostname = ev.hostname.clone();
        }
        if let Some(ip) = ev.ip {
            out = out.with_ip(IpAddr::V4(ip));
        }
        if let Some(s) = ev.session.or_else(|| ev.mac.and_then(|m| e.session_of(m))) {
            out = out.with_session(s);
        }
        out.details = serde_json::json!({
            "xid": format!("{:08x}", ev.xid),
            "boot": ev.boot.as_ref().map(|b| format!("{b:?}")),
        });
        e.recorder().record(out);
    }
}
