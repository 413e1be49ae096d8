//! Boot sessions: one [`SessionId`] per boot, from the firmware's first DHCP request through
//! TFTP and HTTP, so `corral log --session` shows one boot's timeline.
//!
//! A new session starts when a machine's *firmware* (PXE or HTTP Boot, not iPXE) asks to boot
//! and the machine has no session, its session has been idle longer than the idle limit, or
//! the session already reached iPXE (so this firmware request is a new boot). Pure: the
//! caller passes `now`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use corral_model::{MacAddr, SessionId};

use crate::firmware::ClientKind;

/// At most this many machines are tracked; past it, idle ones are forgotten first.
pub const MAX_TRACKED: usize = 65_536;

#[derive(Debug, Clone)]
struct Boot {
    id: SessionId,
    last: Instant,
    reached_ipxe: bool,
    script_served: bool,
}

/// The session table: MAC → current boot, IP → MAC.
#[derive(Debug)]
pub struct Sessions {
    idle: Duration,
    by_mac: HashMap<MacAddr, Boot>,
    by_ip: HashMap<IpAddr, MacAddr>,
}

impl Sessions {
    /// An empty table; sessions idle longer than `idle` end.
    pub fn new(idle: Duration) -> Sessions {
        Sessions {
            idle,
            by_mac: HashMap::new(),
            by_ip: HashMap::new(),
        }
    }

    /// The session of a DHCP boot request from `mac` by `client`, starting one if this is a
    /// new boot. Returns the id and whether it is new.
    pub fn on_boot_request(
        &mut self,
        mac: MacAddr,
        client: ClientKind,
        now: Instant,
        fresh: impl FnOnce() -> SessionId,
    ) -> (SessionId, bool) {
        let idle = self.idle;
        let new_boot = match self.by_mac.get(&mac) {
            None => true,
            Some(b) => {
                now.saturating_duration_since(b.last) > idle
                    || (client != ClientKind::Ipxe && b.reached_ipxe)
                    || b.script_served
            }
        };
        if new_boot {
            self.evict(now);
            let id = fresh();
            self.by_mac.insert(
                mac,
                Boot {
                    id,
                    last: now,
                    reached_ipxe: client == ClientKind::Ipxe,
                    script_served: false,
                },
            );
            return (id, true);
        }
        let b = self
            .by_mac
            .get_mut(&mac)
            .expect("checked above: present and not new");
        b.last = now;
        b.reached_ipxe |= client == ClientKind::Ipxe;
        (b.id, false)
    }

    /// Marks that `mac`'s boot fetched its iPXE script, returning its session. Starts a new
    /// one if it has none, if it is idle, or if this boot already fetched its script (DHCP is
    /// off and another server sends iPXE to us: each script fetch is a boot).
    pub fn on_ipxe(
        &mut self,
        mac: MacAddr,
        now: Instant,
        fresh: impl FnOnce() -> SessionId,
    ) -> SessionId {
        let idle = self.idle;
        match self.by_mac.get_mut(&mac) {
            Some(b) if now.saturating_duration_since(b.last) <= idle && !b.script_served => {
                b.last = now;
                b.reached_ipxe = true;
                b.script_served = true;
                b.id
            }
            _ => {
                self.evict(now);
                let id = fresh();
                self.by_mac.insert(
                    mac,
                    Boot {
                        id,
                        last: now,
                        reached_ipxe: true,
                        script_served: true,
                    },
                );
                id
            }
        }
    }

    /// The current session of `mac`, refreshing its idle timer.
    pub fn touch(&mut self, mac: MacAddr, now: Instant) -> Option<SessionId> {
        let idle = self.idle;
        let b = self.by_mac.get_mut(&mac)?;
        if now.saturating_duration_since(b.last) > idle {
            return None;
        }
        b.last = now;
        Some(b.id)
    }

    /// Records that `mac` uses `ip` (a DHCP lease, a request's source address).
    pub fn learn_ip(&mut self, mac: MacAddr, ip: IpAddr) {
        if self.by_ip.len() >= MAX_TRACKED && !self.by_ip.contains_key(&ip) {
            self.by_ip.clear();
        }
        self.by_ip.insert(ip, mac);
    }

    /// The MAC last seen using `ip`.
    pub fn mac_for_ip(&self, ip: IpAddr) -> Option<MacAddr> {
        self.by_ip.get(&ip).copied()
    }

    fn evict(&mut self, now: Instant) {
        if self.by_mac.len() < MAX_TRACKED {
            return;
        }
        let idle = self.idle;
        self.by_mac
            .retain(|_, b| now.saturating_duration_since(b.last) <= idle);
        if self.by_mac.len() >= MAX_TRACKED {
            self.by_mac.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_session_per_boot() {
        let mac: MacAddr = "52:54:00:00:00:01".parse().unwrap();
        let t0 = Instant::now();
        let mut s = Sessions::new(Duration::from_secs(60));
        let mut n = 0u64;
        let mut fresh = || {
            n += 1;
            SessionId(n)
        };
        let (a, new) = s.on_boot_request(mac, ClientKind::Pxe, t0, &mut fresh);
        assert!(new);
        // PXE REQUEST, then iPXE's own DHCP: same boot.
        assert_eq!(
            s.on_boot_request(
                mac,
                ClientKind::Pxe,
                t0 + Duration::from_secs(1),
                &mut fresh
            ),
            (a, false)
        );
        assert_eq!(
            s.on_boot_request(
                mac,
                ClientKind::Ipxe,
                t0 + Duration::from_secs(9),
                &mut fresh
            ),
            (a, false)
        );
        assert_eq!(s.on_ipxe(mac, t0 + Duration::from_secs(10), &mut fresh), a);
        assert_eq!(s.touch(mac, t0 + Duration::from_secs(11)), Some(a));
        // A second script fetch without DHCP in between is another boot (DHCP off).
        let (a2, ..) = (s.on_ipxe(mac, t0 + Duration::from_secs(12), &mut fresh),);
        assert_ne!(a2, a);
        // iPXE asking DHCP after its script was served is a reboot (iPXE ROM): a new session.
        let (a3, new) = s.on_boot_request(
            mac,
            ClientKind::Ipxe,
            t0 + Duration::from_secs(14),
            &mut fresh,
        );
        assert!(new && a3 != a2);
        // The firmware asking again after iPXE ran is a reboot: a new session.
        let (b, new) = s.on_boot_request(
            mac,
            ClientKind::Pxe,
            t0 + Duration::from_secs(20),
            &mut fresh,
        );
        assert!(new && b != a);
        // An idle session ends.
        assert_eq!(s.touch(mac, t0 + Duration::from_secs(200)), None);
        let (c, new) = s.on_boot_request(
            mac,
            ClientKind::Pxe,
            t0 + Duration::from_secs(201),
            &mut fresh,
        );
        assert!(new && c != b);
    }
}
