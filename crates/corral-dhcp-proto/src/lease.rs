//! The lease table: who holds which address until when. In memory; the driver persists the
//! [`LeaseChange`]s that [`crate::Server::handle`] returns.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use corral_model::{MacAddr, UnixMillis};

/// The state of one address binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeaseState {
    /// Offered, not yet requested (held for [`crate::ServerConfig::offer_hold`]).
    Offered,
    /// Acknowledged: the client owns the address until `expires`.
    Bound,
    /// The lease ran out (the binding is remembered, so the client gets the same address back
    /// when it is still free).
    Expired,
    /// The client released it (remembered like an expired lease).
    Released,
    /// The client declined it (someone else uses it): quarantined until `expires`.
    Declined,
}

impl LeaseState {
    /// Lowercase name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseState::Offered => "offered",
            LeaseState::Bound => "bound",
            LeaseState::Expired => "expired",
            LeaseState::Released => "released",
            LeaseState::Declined => "declined",
        }
    }

    /// Parses [`LeaseState::as_str`].
    pub fn parse(s: &str) -> Option<LeaseState> {
        Some(match s {
            "offered" => LeaseState::Offered,
            "bound" => LeaseState::Bound,
            "expired" => LeaseState::Expired,
            "released" => LeaseState::Released,
            "declined" => LeaseState::Declined,
            _ => return None,
        })
    }
}

/// One binding of an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The address.
    pub ip: Ipv4Addr,
    /// Who holds (or last held) it; for a declined address, who declined it.
    pub mac: MacAddr,
    /// Its state.
    pub state: LeaseState,
    /// When the state ends (offer hold, lease end, quarantine end).
    pub expires: UnixMillis,
    /// The client's host name, when known.
    pub hostname: Option<String>,
}

impl Lease {
    /// True when `mac` may not take this address at `now`.
    pub(crate) fn blocks(&self, mac: MacAddr, now: UnixMillis) -> bool {
        match self.state {
            LeaseState::Declined => self.expires.0 > now.0,
            LeaseState::Offered | LeaseState::Bound => self.mac != mac && self.expires.0 > now.0,
            LeaseState::Expired | LeaseState::Released => false,
        }
    }

    /// True when the lease is still in force for its holder.
    pub fn active(&self, now: UnixMillis) -> bool {
        matches!(self.state, LeaseState::Offered | LeaseState::Bound) && self.expires.0 > now.0
    }
}

/// A change the driver must persist (bound, released, declined and expired leases; offers are
/// never persisted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseChange {
    /// Insert or replace the row for `lease.ip`.
    Upsert(Lease),
    /// Delete the row for this address.
    Remove(Ipv4Addr),
}

/// All leases, by address and by MAC.
#[derive(Debug, Default, Clone)]
pub struct LeaseTable {
    by_ip: HashMap<Ipv4Addr, Lease>,
    by_mac: HashMap<MacAddr, Ipv4Addr>,
    cursors: HashMap<(Ipv4Addr, Ipv4Addr), u32>,
}

impl LeaseTable {
    /// The lease of `ip`.
    pub fn get(&self, ip: Ipv4Addr) -> Option<&Lease> {
        self.by_ip.get(&ip)
    }

    /// The last address bound or offered to `mac`.
    pub fn by_mac(&self, mac: MacAddr) -> Option<&Lease> {
        self.by_mac
            .get(&mac)
            .and_then(|ip| self.by_ip.get(ip))
            .filter(|l| l.mac == mac)
    }

    /// Every lease.
    pub fn iter(&self) -> impl Iterator<Item = &Lease> {
        self.by_ip.values()
    }

    /// Number of leases (any state).
    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }

    /// Inserts or replaces the lease of `lease.ip`.
    pub fn insert(&mut self, lease: Lease) {
        if lease.state != LeaseState::Declined {
            self.by_mac.insert(lease.mac, lease.ip);
        } else if self.by_mac.get(&lease.mac) == Some(&lease.ip) {
            self.by_mac.remove(&lease.mac);
        }
        self.by_ip.insert(lease.ip, lease);
    }

    /// Removes the lease of `ip`.
    pub fn remove(&mut self, ip: Ipv4Addr) -> Option<Lease> {
        let l = self.by_ip.remove(&ip)?;
        if self.by_mac.get(&l.mac) == Some(&ip) {
            self.by_mac.remove(&l.mac);
        }
        Some(l)
    }

    /// True when `mac` may use `ip` at `now`.
    pub fn usable_by(&self, ip: Ipv4Addr, mac: MacAddr, now: UnixMillis) -> bool {
        self.by_ip.get(&ip).is_none_or(|l| !l.blocks(mac, now))
    }

    /// A free address in `start..=end` for `mac`: first one never leased (scanning from a
    /// per-pool cursor, so allocation is O(1) amortised), then the longest-expired one.
    /// `excluded` addresses (reservations, our own) are skipped.
    pub fn allocate(
        &mut self,
        (start, end): (Ipv4Addr, Ipv4Addr),
        mac: MacAddr,
        now: UnixMillis,
        excluded: &dyn Fn(Ipv4Addr) -> bool,
    ) -> Option<Ipv4Addr> {
        let (s, e) = (u32::from(start), u32::from(end));
        if e < s {
            return None;
        }
        let len = u64::from(e - s) + 1;
        let cursor = self.cursors.entry((start, end)).or_insert(0);
        for i in 0..len {
            let off = ((u64::from(*cursor) + i) % len) as u32;
            let ip = Ipv4Addr::from(s + off);
            if !self.by_ip.contains_key(&ip) && !excluded(ip) {
                *cursor = ((u64::from(off) + 1) % len) as u32;
                return Some(ip);
            }
        }
        // No never-used address: take the reusable one that ended longest ago.
        self.by_ip
            .values()
            .filter(|l| {
                let v = u32::from(l.ip);
                v >= s && v <= e && !l.blocks(mac, now) && !excluded(l.ip)
            })
            .min_by_key(|l| (l.expires.0, u32::from(l.ip)))
            .map(|l| l.ip)
    }

    /// Marks leases whose time ran out as expired (offers are forgotten, quarantines lifted);
    /// returns what to persist.
    pub fn expire(&mut self, now: UnixMillis) -> Vec<(LeaseChange, Lease)> {
        let due: Vec<Ipv4Addr> = self
            .by_ip
            .values()
            .filter(|l| {
                matches!(
                    l.state,
                    LeaseState::Offered | LeaseState::Bound | LeaseState::Declined
                ) && l.expires.0 <= now.0
            })
            .map(|l| l.ip)
            .collect();
        let mut out = Vec::new();
        for ip in due {
            let Some(l) = self.by_ip.get_mut(&ip) else {
                continue;
            };
            match l.state {
                LeaseState::Bound => {
                    l.state = LeaseState::Expired;
                    out.push((LeaseChange::Upsert(l.clone()), l.clone()));
                }
                LeaseState::Offered | LeaseState::Declined => {
                    let was_declined = l.state == LeaseState::Declined;
                    if let Some(l) = self.remove(ip)
                        && was_declined
                    {
                        out.push((LeaseChange::Remove(ip), l));
                    }
                }
                _ => {}
            }
        }
        out
    }
}
