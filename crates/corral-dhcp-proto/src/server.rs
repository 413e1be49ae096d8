//! The server state machine: one datagram in, at most one reply out, plus the lease changes to
//! persist before that reply is sent and the events to record.
//!
//! Sections of [RFC 2131] implemented here:
//! - §4.1 where replies go (relay, ciaddr, broadcast flag) and option overload (in
//!   [`crate::Packet`]);
//! - §4.3.1 DISCOVER → OFFER (address choice: reservation, previous binding, requested
//!   address, pool);
//! - §4.3.2 REQUEST in SELECTING, INIT-REBOOT, RENEWING and REBINDING states → ACK/NAK/silence;
//! - §4.3.3 DECLINE (quarantine), §4.3.4 RELEASE, §4.3.5 INFORM;
//! - §4.4.5 T1/T2 timers.
//!
//! ProxyDHCP follows the PXE 2.1 specification §2.2.5 and [RFC 4578]: a proxy offer on port
//! 67 carries no address (yiaddr 0), option 60 `PXEClient`, siaddr = us and, for BIOS PXE and
//! iPXE clients, the boot file; UEFI PXE clients get no boot file there so that they ask
//! again on port 4011, where the ACK carries the file. What real firmware requires of these
//! answers is in the quirks table of `Server::add_boot`.
//!
//! [RFC 2131]: https://www.rfc-editor.org/rfc/rfc2131
//! [RFC 4578]: https://www.rfc-editor.org/rfc/rfc4578

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use corral_model::{MacAddr, SessionId, UnixMillis};
use dhcproto::v4::relay::RelayAgentInformation;
use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

use crate::boot::{Boot, BootAnswer, BootQuery, DhcpEvent, DhcpEventKind};
use crate::client::{ClientInfo, Firmware, Platform};
use crate::config::{Mode, Network, Reservation, ServerConfig};
use crate::lease::{Lease, LeaseChange, LeaseState, LeaseTable};
use crate::packet::Packet;

/// The DHCP client port (RFC 2131 §4.1).
pub const CLIENT_PORT: u16 = 68;
/// The PXE boot server port (PXE 2.1 §2.2.6): ProxyDHCP REQUESTs from UEFI firmware.
pub const PXE_PORT: u16 = 4011;

/// Which of our sockets a datagram arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Port {
    /// The DHCP server port (67, or the configured test port).
    Dhcp,
    /// The PXE boot server port 4011.
    Pxe,
}

/// One received datagram.
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    /// Its bytes.
    pub data: &'a [u8],
    /// Where it came from.
    pub src: SocketAddrV4,
    /// Which socket received it.
    pub port: Port,
}

/// A reply to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The encoded message.
    pub bytes: Vec<u8>,
    /// Destination (255.255.255.255:68 for broadcasts).
    pub dest: SocketAddrV4,
    /// Send from this socket.
    pub via: Port,
    /// The decoded message type (for logs).
    pub kind: MessageType,
}

/// The result of handling one datagram.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Step {
    /// The reply, if any. When `persist` is not empty the reply must only be sent after the
    /// changes are durable (a client told "ACK" must find its lease after a crash).
    pub reply: Option<Reply>,
    /// Lease changes to persist.
    pub persist: Vec<LeaseChange>,
    /// Events to record.
    pub events: Vec<DhcpEvent>,
}

/// The DHCP server: configuration, lease table, and the request handlers.
#[derive(Debug)]
pub struct Server {
    config: ServerConfig,
    reservations: HashMap<MacAddr, Reservation>,
    leases: LeaseTable,
}

/// Options always sent in OFFER/ACK when we have them, whatever the parameter request list
/// says (RFC 2131 §4.3.1 table 3: 51, 54 MUST; 1, 58, 59 expected by every client).
const ALWAYS: &[u8] = &[1, 51, 54, 58, 59];

struct Ctx<'a> {
    now: UnixMillis,
    pkt: &'a Packet,
    client: ClientInfo,
    src: SocketAddrV4,
    port: Port,
    xid: u32,
}

impl Server {
    /// A server with an empty lease table.
    pub fn new(config: ServerConfig) -> Server {
        let mut s = Server {
            config: config.clone(),
            reservations: HashMap::new(),
            leases: LeaseTable::default(),
        };
        s.set_config(config);
        s
    }

    /// Replaces the configuration (site reload); leases are kept.
    pub fn set_config(&mut self, config: ServerConfig) {
        self.reservations = config
            .reservations
            .iter()
            .map(|r| (r.mac, r.clone()))
            .collect();
        self.config = config;
    }

    /// The configuration in force.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Loads persisted leases (on start).
    pub fn load_leases(&mut self, leases: impl IntoIterator<Item = Lease>) {
        for l in leases {
            self.leases.insert(l);
        }
    }

    /// The lease table.
    pub fn leases(&self) -> &LeaseTable {
        &self.leases
    }

    /// Reclaims leases whose time ran out: bound leases become expired, quarantines end,
    /// stale offers are forgotten. Returns what to persist and the events.
    pub fn expire(&mut self, now: UnixMillis) -> (Vec<LeaseChange>, Vec<DhcpEvent>) {
        let mut changes = Vec::new();
        let mut events = Vec::new();
        for (change, lease) in self.leases.expire(now) {
            events.push(DhcpEvent {
                kind: DhcpEventKind::Expired,
                mac: Some(lease.mac),
                ip: Some(lease.ip),
                xid: 0,
                session: None,
                hostname: lease.hostname.clone(),
                reason: match lease.state {
                    LeaseState::Declined => "quarantine of declined address ended".into(),
                    _ => "lease expired".into(),
                },
                client: None,
                boot: None,
            });
            changes.push(change);
        }
        (changes, events)
    }

    /// Handles one datagram at time `now`. `decide` is asked for a boot answer for every client
    /// that wants to boot; it must not block (it runs on the packet path).
    pub fn handle(
        &mut self,
        now: UnixMillis,
        dgram: Datagram<'_>,
        decide: &mut dyn FnMut(&BootQuery) -> BootAnswer,
    ) -> Step {
        let pkt = match Packet::decode(dgram.data) {
            Ok(p) => p,
            Err(e) => {
                return dropped(
                    None,
                    None,
                    0,
                    format!("malformed request from {}: {e}", dgram.src),
                );
            }
        };
        let xid = pkt.header.xid();
        if !pkt.is_request() {
            // A BOOTREPLY (another server's answer seen on the wire): not for us.
            return Step::default();
        }
        let Some(client) = ClientInfo::from_packet(&pkt) else {
            return dropped(
                None,
                None,
                xid,
                "not an Ethernet client (htype/hlen)".into(),
            );
        };
        let Some(ty) = pkt.msg_type() else {
            return dropped(
                Some(client),
                None,
                xid,
                "BOOTP request without DHCP message type: not served".into(),
            );
        };
        let cx = Ctx {
            now,
            pkt: &pkt,
            client,
            src: dgram.src,
            port: dgram.port,
            xid,
        };
        if dgram.port == Port::Pxe {
            return self.pxe_request(cx, decide);
        }
        match self.config.mode {
            Mode::Proxy => match ty {
                MessageType::Discover | MessageType::Request => self.proxy_offer(cx, ty, decide),
                _ => Step::default(),
            },
            Mode::Full => match ty {
                MessageType::Discover => self.discover(cx, decide),
                MessageType::Request => self.request(cx, decide),
                MessageType::Decline => self.decline(cx),
                MessageType::Release => self.release(cx),
                MessageType::Inform => self.inform(cx),
                _ => Step::default(),
            },
        }
    }

    /// The network the client is on: by relay (giaddr), by subnet selection (option 118,
    /// RFC 3011), by its own address, else the network our address is in.
    fn network_for(&self, cx: &Ctx<'_>) -> Option<&Network> {
        let key = cx
            .pkt
            .ip_opt(118)
            .or(cx.client.relay)
            .or(cx.client.ciaddr)
            .unwrap_or(self.config.server_ip);
        self.config
            .networks
            .iter()
            .filter(|n| n.cidr.contains(&key))
            .max_by_key(|n| n.cidr.prefix_len())
    }

    fn excluded(&self, mac: MacAddr) -> impl Fn(Ipv4Addr) -> bool + '_ {
        move |ip: Ipv4Addr| {
            ip == self.config.server_ip
                || self
                    .config
                    .reservations
                    .iter()
                    .any(|r| r.ip == Some(ip) && r.mac != mac)
        }
    }

    fn boot_answer(
        &self,
        cx: &Ctx<'_>,
        ip: Option<Ipv4Addr>,
        proxy: bool,
        decide: &mut dyn FnMut(&BootQuery) -> BootAnswer,
    ) -> Option<BootAnswer> {
        cx.client.firmware.wants_boot().then(|| {
            decide(&BootQuery {
                client: cx.client.clone(),
                ip,
                interface: self.config.interface.clone(),
                proxy,
            })
        })
    }

    // RFC 2131 §4.3.1
    fn discover(&mut self, cx: Ctx<'_>, decide: &mut dyn FnMut(&BootQuery) -> BootAnswer) -> Step {
        let Some(net) = self.network_for(&cx).cloned() else {
            let r = no_network(&cx);
            return dropped(Some(cx.client), None, cx.xid, r);
        };
        let mac = cx.client.mac;
        let now = cx.now;
        let resv = self.reservations.get(&mac).cloned();
        let ip = match self.choose_address(&cx, &net, resv.as_ref()) {
            Ok(ip) => ip,
            Err(reason) => return dropped(Some(cx.client), None, cx.xid, reason),
        };
        let answer = self.boot_answer(&cx, Some(ip), false, decide);
        if let Some(a) = &answer
            && a.boot == Boot::Ignore
        {
            return ignored(cx, Some(ip), a);
        }
        // Hold the address for the client, without downgrading a binding it already has.
        let hostname = hostname_for(&cx.client, resv.as_ref());
        let keep = self
            .leases
            .get(ip)
            .is_some_and(|l| l.mac == mac && l.active(now) && l.state == LeaseState::Bound);
        if !keep {
            self.leases.insert(Lease {
                ip,
                mac,
                state: LeaseState::Offered,
                expires: add(now, self.config.offer_hold),
                hostname: hostname.clone(),
            });
        }
        let reply = self.build(
            &cx,
            MessageType::Offer,
            ip,
            Some(&net),
            resv.as_ref(),
            answer.as_ref(),
        );
        let reason = match &answer {
            Some(a) => format!("offered {ip} on {}; {}", net.name, a.reason),
            None => format!("offered {ip} on {}", net.name),
        };
        Step {
            reply: Some(reply),
            persist: Vec::new(),
            events: vec![event(
                DhcpEventKind::Offer,
                &cx,
                Some(ip),
                hostname,
                reason,
                answer,
            )],
        }
    }

    fn choose_address(
        &mut self,
        cx: &Ctx<'_>,
        net: &Network,
        resv: Option<&Reservation>,
    ) -> Result<Ipv4Addr, String> {
        let mac = cx.client.mac;
        let now = cx.now;
        if let Some(ip) = resv.and_then(|r| r.ip) {
            if net.cidr.contains(&ip) {
                return Ok(ip);
            }
            return Err(format!(
                "reserved address {ip} is not on network {} where the client is",
                net.name
            ));
        }
        let Some(pool) = net.pool else {
            return Err(format!(
                "network {} has no pool and {mac} has no fixed address",
                net.name
            ));
        };
        let in_pool = |ip: Ipv4Addr| pool.0 <= ip && ip <= pool.1;
        // The client's previous binding, if still free for it.
        if let Some(l) = self.leases.by_mac(mac)
            && in_pool(l.ip)
            && l.state != LeaseState::Declined
        {
            let ip = l.ip;
            if self.leases.usable_by(ip, mac, now) && !(self.excluded(mac))(ip) {
                return Ok(ip);
            }
        }
        // The address it asks for (RFC 2131 §4.3.1: "the address requested ... if valid and
        // not already allocated").
        if let Some(ip) = cx.pkt.requested_ip()
            && in_pool(ip)
            && self.leases.usable_by(ip, mac, now)
            && !(self.excluded(mac))(ip)
        {
            return Ok(ip);
        }
        let excl: Vec<Ipv4Addr> = self
            .config
            .reservations
            .iter()
            .filter(|r| r.mac != mac)
            .filter_map(|r| r.ip)
            .chain([self.config.server_ip])
            .collect();
        self.leases
            .allocate(pool, mac, now, &|ip| excl.contains(&ip))
            .ok_or_else(|| format!("pool {}-{} of {} is exhausted", pool.0, pool.1, net.name))
    }

    // RFC 2131 §4.3.2
    fn request(&mut self, cx: Ctx<'_>, decide: &mut dyn FnMut(&BootQuery) -> BootAnswer) -> Step {
        let mac = cx.client.mac;
        let now = cx.now;
        let server_id = cx.pkt.server_id();
        let requested = cx.pkt.requested_ip();
        let ciaddr = cx.client.ciaddr;
        let state;
        let ip = match (server_id, requested, ciaddr) {
            (Some(sid), _, _) => {
                // SELECTING: the client chose one server's offer.
                state = "selecting";
                if sid != self.config.server_ip {
                    // It chose another server: forget our offer (§4.3.2, "not selected").
                    if let Some(l) = self.leases.by_mac(mac)
                        && l.state == LeaseState::Offered
                    {
                        let ip = l.ip;
                        self.leases.remove(ip);
                    }
                    return Step::default();
                }
                match requested.or(ciaddr) {
                    Some(ip) => ip,
                    None => {
                        return self.nak(cx, "SELECTING request without requested address".into());
                    }
                }
            }
            (None, Some(ip), None) => {
                state = "init-reboot";
                ip
            }
            (None, _, Some(ip)) => {
                state = "renewing/rebinding";
                ip
            }
            (None, None, None) => {
                return dropped(
                    Some(cx.client),
                    None,
                    cx.xid,
                    "REQUEST without server identifier, requested address or ciaddr".into(),
                );
            }
        };
        let Some(net) = self.network_for(&cx).cloned() else {
            if state == "init-reboot" {
                // §4.3.2: the client is on a network we do not know: stay silent.
                let r = no_network(&cx);
                return dropped(Some(cx.client), Some(ip), cx.xid, r);
            }
            return self.nak(cx, format!("{ip} is on no network served here"));
        };
        if !net.cidr.contains(&ip) {
            return self.nak(cx, format!("{ip} is not on network {} ({state})", net.name));
        }
        let resv = self.reservations.get(&mac).cloned();
        let fixed = resv.as_ref().and_then(|r| r.ip);
        let known = match self.leases.get(ip) {
            Some(l) if l.mac == mac && l.state != LeaseState::Declined => true,
            Some(l) if l.blocks(mac, now) => {
                return self.nak(cx, format!("{ip} is leased to {}", l.mac));
            }
            _ => false,
        };
        if let Some(f) = fixed
            && f != ip
        {
            return self.nak(cx, format!("{mac} has fixed address {f}, not {ip}"));
        }
        let in_pool = net.pool.is_some_and(|(s, e)| s <= ip && ip <= e);
        if fixed.is_none() && !in_pool {
            return self.nak(cx, format!("{ip} is outside the pool of {}", net.name));
        }
        if fixed.is_none() && (self.excluded(mac))(ip) {
            return self.nak(cx, format!("{ip} is reserved for another machine"));
        }
        if !known && fixed.is_none() && state != "selecting" {
            // §4.3.2 INIT-REBOOT / RENEWING: "If the DHCP server has no record of this client,
            // then it MUST remain silent" — unless the address is simply free, in which case
            // confirming it is what Kea and dnsmasq do after a lost lease file; we keep leases
            // across restarts, so an unknown client here is one we never saw: stay silent.
            return dropped(
                Some(cx.client),
                Some(ip),
                cx.xid,
                format!("{state} request for {ip}: no record of this client, staying silent"),
            );
        }
        if !known && fixed.is_none() && state == "selecting" {
            return self.nak(cx, format!("{ip} was not offered to {mac}"));
        }
        let answer = self.boot_answer(&cx, Some(ip), false, decide);
        if let Some(a) = &answer
            && a.boot == Boot::Ignore
        {
            return ignored(cx, Some(ip), a);
        }
        let hostname = hostname_for(&cx.client, resv.as_ref());
        let lease = Lease {
            ip,
            mac,
            state: LeaseState::Bound,
            expires: add(now, net.lease),
            hostname: hostname.clone(),
        };
        // A client moving to another address leaves its old binding behind as released.
        let mut persist = Vec::new();
        if let Some(old) = self.leases.by_mac(mac).cloned()
            && old.ip != ip
            && old.state == LeaseState::Bound
        {
            let mut old = old;
            old.state = LeaseState::Released;
            old.expires = now;
            self.leases.insert(old.clone());
            persist.push(LeaseChange::Upsert(old));
        }
        self.leases.insert(lease.clone());
        persist.push(LeaseChange::Upsert(lease));
        let reply = self.build(
            &cx,
            MessageType::Ack,
            ip,
            Some(&net),
            resv.as_ref(),
            answer.as_ref(),
        );
        let reason = match &answer {
            Some(a) => format!(
                "{state}: {ip} bound on {} for {}s; {}",
                net.name,
                net.lease.as_secs(),
                a.reason
            ),
            None => format!(
                "{state}: {ip} bound on {} for {}s",
                net.name,
                net.lease.as_secs()
            ),
        };
        Step {
            reply: Some(reply),
            persist,
            events: vec![event(
                DhcpEventKind::Ack,
                &cx,
                Some(ip),
                hostname,
                reason,
                answer,
            )],
        }
    }

    fn nak(&mut self, cx: Ctx<'_>, reason: String) -> Step {
        let mut m = base_reply(&cx, MessageType::Nak, self.config.server_ip);
        m.set_yiaddr(Ipv4Addr::UNSPECIFIED);
        m.set_siaddr(Ipv4Addr::UNSPECIFIED);
        m.set_ciaddr(Ipv4Addr::UNSPECIFIED);
        m.opts_mut().insert(DhcpOption::Message(reason.clone()));
        // §4.1: a NAK goes to the relay with the broadcast bit set, else is broadcast.
        let dest = match cx.client.relay {
            Some(g) => {
                m.set_flags(Flags::new(0).set_broadcast());
                SocketAddrV4::new(g, self.config.server_port)
            }
            None => SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT),
        };
        let reply = Reply {
            bytes: encode(&m),
            dest,
            via: Port::Dhcp,
            kind: MessageType::Nak,
        };
        Step {
            reply: Some(reply),
            persist: Vec::new(),
            events: vec![event(
                DhcpEventKind::Nak,
                &cx,
                cx.pkt.requested_ip().or(cx.client.ciaddr),
                None,
                reason,
                None,
            )],
        }
    }

    // RFC 2131 §4.3.3
    fn decline(&mut self, cx: Ctx<'_>) -> Step {
        if cx
            .pkt
            .server_id()
            .is_some_and(|s| s != self.config.server_ip)
        {
            return Step::default();
        }
        let Some(ip) = cx.pkt.requested_ip() else {
            return dropped(
                Some(cx.client),
                None,
                cx.xid,
                "DECLINE without requested address".into(),
            );
        };
        match self.leases.get(ip) {
            Some(l) if l.mac == cx.client.mac => {}
            _ => {
                return dropped(
                    Some(cx.client),
                    Some(ip),
                    cx.xid,
                    format!("DECLINE of {ip}, which is not leased to this client: ignored"),
                );
            }
        }
        let lease = Lease {
            ip,
            mac: cx.client.mac,
            state: LeaseState::Declined,
            expires: add(cx.now, self.config.decline_quarantine),
            hostname: None,
        };
        self.leases.insert(lease.clone());
        let reason = format!(
            "client reports {ip} in use by another host; quarantined for {}s",
            self.config.decline_quarantine.as_secs()
        );
        Step {
            reply: None,
            persist: vec![LeaseChange::Upsert(lease)],
            events: vec![event(
                DhcpEventKind::Decline,
                &cx,
                Some(ip),
                None,
                reason,
                None,
            )],
        }
    }

    // RFC 2131 §4.3.4
    fn release(&mut self, cx: Ctx<'_>) -> Step {
        if cx
            .pkt
            .server_id()
            .is_some_and(|s| s != self.config.server_ip)
        {
            return Step::default();
        }
        let Some(ip) = cx.client.ciaddr else {
            return dropped(
                Some(cx.client),
                None,
                cx.xid,
                "RELEASE without ciaddr".into(),
            );
        };
        let Some(l) = self
            .leases
            .get(ip)
            .filter(|l| l.mac == cx.client.mac)
            .cloned()
        else {
            return dropped(
                Some(cx.client),
                Some(ip),
                cx.xid,
                format!("RELEASE of {ip}, which is not leased to this client: ignored"),
            );
        };
        let lease = Lease {
            state: LeaseState::Released,
            expires: cx.now,
            ..l
        };
        self.leases.insert(lease.clone());
        let hostname = lease.hostname.clone();
        Step {
            reply: None,
            persist: vec![LeaseChange::Upsert(lease)],
            events: vec![event(
                DhcpEventKind::Release,
                &cx,
                Some(ip),
                hostname,
                format!("{ip} released"),
                None,
            )],
        }
    }

    // RFC 2131 §4.3.5
    fn inform(&mut self, cx: Ctx<'_>) -> Step {
        let Some(ciaddr) = cx
            .client
            .ciaddr
            .or(Some(*cx.src.ip()).filter(|a| !a.is_unspecified()))
        else {
            return dropped(
                Some(cx.client),
                None,
                cx.xid,
                "INFORM without ciaddr".into(),
            );
        };
        let Some(net) = self.network_for(&cx).cloned() else {
            let r = no_network(&cx);
            return dropped(Some(cx.client), Some(ciaddr), cx.xid, r);
        };
        let resv = self.reservations.get(&cx.client.mac).cloned();
        let mut m = base_reply(&cx, MessageType::Ack, self.config.server_ip);
        m.set_ciaddr(ciaddr);
        self.add_net_options(&mut m, &cx, &net, resv.as_ref(), false);
        let dest = match cx.client.relay {
            Some(g) => SocketAddrV4::new(g, self.config.server_port),
            None => SocketAddrV4::new(ciaddr, CLIENT_PORT),
        };
        let reply = Reply {
            bytes: encode(&m),
            dest,
            via: Port::Dhcp,
            kind: MessageType::Ack,
        };
        Step {
            reply: Some(reply),
            persist: Vec::new(),
            events: vec![event(
                DhcpEventKind::Inform,
                &cx,
                Some(ciaddr),
                None,
                format!("configuration of {} sent to {ciaddr}", net.name),
                None,
            )],
        }
    }

    /// ProxyDHCP on port 67 (PXE 2.1 §2.2.5): boot information only.
    fn proxy_offer(
        &mut self,
        cx: Ctx<'_>,
        ty: MessageType,
        decide: &mut dyn FnMut(&BootQuery) -> BootAnswer,
    ) -> Step {
        if !cx.client.firmware.wants_boot() {
            // Plain DHCP traffic for the site's server: not ours to answer or record.
            return Step::default();
        }
        if ty == MessageType::Request
            && cx
                .pkt
                .server_id()
                .is_some_and(|s| s != self.config.server_ip)
        {
            // The client's REQUEST to the site's address server.
            return Step::default();
        }
        let Some(answer) = self.boot_answer(&cx, cx.client.ciaddr, true, decide) else {
            return Step::default();
        };
        if matches!(answer.boot, Boot::Ignore | Boot::NoBootFile) {
            return ignored(cx, None, &answer);
        }
        let kind = if ty == MessageType::Discover {
            MessageType::Offer
        } else {
            MessageType::Ack
        };
        let mut m = base_reply(&cx, kind, self.config.server_ip);
        m.set_yiaddr(Ipv4Addr::UNSPECIFIED);
        let uefi_pxe =
            cx.client.firmware == Firmware::Pxe && cx.client.platform() == Platform::Uefi;
        // UEFI PXE clients get no boot file on port 67, so that they send their REQUEST to
        // 4011 (EDK2 treats such an offer as "ProxyBinl" and asks there).
        self.add_boot(&mut m, &cx, &answer.boot, !uefi_pxe, true);
        let dest = self.reply_dest(&cx, Ipv4Addr::UNSPECIFIED, &m);
        let reply = Reply {
            bytes: encode(&m),
            dest,
            via: Port::Dhcp,
            kind,
        };
        let reason = if uefi_pxe {
            format!(
                "proxy offer without boot file (UEFI asks on port 4011); {}",
                answer.reason
            )
        } else {
            format!("proxy offer; {}", answer.reason)
        };
        Step {
            reply: Some(reply),
            persist: Vec::new(),
            events: vec![event(
                DhcpEventKind::ProxyOffer,
                &cx,
                None,
                None,
                reason,
                Some(answer),
            )],
        }
    }

    /// A REQUEST on port 4011 (PXE boot server discovery): ACK with the boot file, unicast
    /// back to where it came from.
    fn pxe_request(
        &mut self,
        cx: Ctx<'_>,
        decide: &mut dyn FnMut(&BootQuery) -> BootAnswer,
    ) -> Step {
        if !matches!(
            cx.pkt.msg_type(),
            Some(MessageType::Request | MessageType::Inform)
        ) {
            return dropped(
                Some(cx.client),
                None,
                cx.xid,
                "port 4011 takes only REQUEST".into(),
            );
        }
        if !cx.client.firmware.wants_boot() {
            return dropped(
                Some(cx.client),
                None,
                cx.xid,
                "port 4011 request from a client that is not PXE".into(),
            );
        }
        let ip = cx
            .client
            .ciaddr
            .or(Some(*cx.src.ip()).filter(|a| !a.is_unspecified()));
        let Some(answer) = self.boot_answer(&cx, ip, self.config.mode == Mode::Proxy, decide)
        else {
            return Step::default();
        };
        if matches!(answer.boot, Boot::Ignore | Boot::NoBootFile) {
            return ignored(cx, ip, &answer);
        }
        let mut m = base_reply(&cx, MessageType::Ack, self.config.server_ip);
        m.set_yiaddr(Ipv4Addr::UNSPECIFIED);
        self.add_boot(&mut m, &cx, &answer.boot, true, true);
        let dest = if cx.src.ip().is_unspecified() {
            SocketAddrV4::new(Ipv4Addr::BROADCAST, cx.src.port())
        } else {
            cx.src
        };
        let reply = Reply {
            bytes: encode(&m),
            dest,
            via: Port::Pxe,
            kind: MessageType::Ack,
        };
        let reason = format!("boot server ACK on port 4011; {}", answer.reason);
        Step {
            reply: Some(reply),
            persist: Vec::new(),
            events: vec![event(
                DhcpEventKind::ProxyAck,
                &cx,
                ip,
                None,
                reason,
                Some(answer),
            )],
        }
    }

    fn build(
        &self,
        cx: &Ctx<'_>,
        kind: MessageType,
        ip: Ipv4Addr,
        net: Option<&Network>,
        resv: Option<&Reservation>,
        answer: Option<&BootAnswer>,
    ) -> Reply {
        let mut m = base_reply(cx, kind, self.config.server_ip);
        m.set_yiaddr(ip);
        if let Some(net) = net {
            self.add_net_options(&mut m, cx, net, resv, true);
        }
        if let Some(a) = answer {
            self.add_boot(&mut m, cx, &a.boot, true, false);
        }
        let dest = self.reply_dest(cx, ip, &m);
        Reply {
            bytes: encode(&m),
            dest,
            via: Port::Dhcp,
            kind,
        }
    }

    /// RFC 2131 §4.1, "If the 'giaddr' field ... is nonzero": to the relay; else to ciaddr;
    /// else broadcast when the flag asks for it — and also when it does not: unicasting to a
    /// client without an address needs an ARP entry we will not add, and a broadcast reaches
    /// it just as well.
    fn reply_dest(&self, cx: &Ctx<'_>, _yiaddr: Ipv4Addr, _m: &Message) -> SocketAddrV4 {
        if let Some(g) = cx.client.relay {
            return SocketAddrV4::new(g, self.config.server_port);
        }
        if let Some(c) = cx.client.ciaddr {
            return SocketAddrV4::new(c, CLIENT_PORT);
        }
        SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT)
    }

    fn add_net_options(
        &self,
        m: &mut Message,
        cx: &Ctx<'_>,
        net: &Network,
        resv: Option<&Reservation>,
        with_lease: bool,
    ) {
        let prl = cx.pkt.parameter_request_list();
        let wanted = |code: u8| ALWAYS.contains(&code) || prl.is_none_or(|p| p.contains(&code));
        let o = m.opts_mut();
        if wanted(1) {
            o.insert(DhcpOption::SubnetMask(net.cidr.netmask()));
        }
        if wanted(28) {
            o.insert(DhcpOption::BroadcastAddr(net.cidr.broadcast()));
        }
        if let Some(g) = net.gateway
            && wanted(3)
        {
            o.insert(DhcpOption::Router(vec![g]));
        }
        if !net.dns.is_empty() && wanted(6) {
            o.insert(DhcpOption::DomainNameServer(net.dns.clone()));
        }
        if let Some(d) = &net.domain
            && wanted(15)
        {
            o.insert(DhcpOption::DomainName(d.clone()));
        }
        if let Some(h) = resv.and_then(|r| r.hostname.clone())
            && wanted(12)
        {
            o.insert(DhcpOption::Hostname(h));
        }
        if with_lease {
            let secs = u32::try_from(net.lease.as_secs()).unwrap_or(u32::MAX);
            o.insert(DhcpOption::AddressLeaseTime(secs));
            o.insert(DhcpOption::Renewal(secs / 2));
            o.insert(DhcpOption::Rebinding((u64::from(secs) * 7 / 8) as u32));
        }
    }

    /// Boot options: siaddr (next server = us) and file for TFTP and HTTP alike (file = the
    /// URL), option 60 echoed so PXE and HTTP Boot firmware accept the offer, option 97 echoed
    /// (PXE 2.1 requires it when sent), and for answers with a boot file to PXE and iPXE option
    /// 43 with discovery control "use the boot file in this packet" (PXE 2.1 §2.4.2.1,
    /// sub-option 6, bit 3).
    ///
    /// Firmware quirks these rules follow (checked with QEMU against Debian 12's iPXE
    /// 1.0.0+git-20190125 and OVMF 2022.11, and compared packet by packet with dnsmasq):
    ///
    /// | firmware | what it requires | without it |
    /// |---|---|---|
    /// | iPXE (BIOS ROM, snponly.efi), ProxyDHCP | an answer with option 60 `PXEClient` has "PXE options" only if siaddr is non-zero *and* it has a boot file, or a 43.9 boot menu (`dhcp_has_pxeopts` in iPXE's `dhcp.c`; option 43.6 alone does not count) | iPXE does not take the proxy offer as is, sends ProxyDHCPREQUESTs to 4011, drops each ACK for the same reason and ends with "Nothing to boot" (issue #4: URLs went out with siaddr 0) |
    /// | iPXE, ProxyDHCPACK | it comes from port 4011, option 54 equals the proxy offer's | ACK ignored |
    /// | EDK2/OVMF PXE, ProxyDHCP | option 60 `PXEClient` in the proxy offer; corral gives no boot file there, and OVMF asks on 4011 and fetches the ACK's file by TFTP (seen in captures) | (not tried) |
    /// | EDK2/OVMF PXE, full mode | an offer with option 60 `PXEClient` must also carry option 43, or EDK2 classes it "BINL" and asks siaddr:4011 instead of fetching the file (seen by the netboot tests before a60f187). dnsmasq sends neither 60 nor 43 (file in option 67) and OVMF fetches the file at once too; corral sends both | no TFTP request, PXE-E16 |
    fn add_boot(&self, m: &mut Message, cx: &Ctx<'_>, boot: &Boot, with_file: bool, proxy: bool) {
        let class: &[u8] = match cx.client.firmware {
            Firmware::HttpClient => b"HTTPClient",
            Firmware::Pxe | Firmware::Ipxe => b"PXEClient",
            Firmware::None => return,
        };
        let o = m.opts_mut();
        if cx.client.firmware != Firmware::Ipxe || proxy {
            o.insert(DhcpOption::ClassIdentifier(class.to_vec()));
        }
        if let Some(id) = &cx.client.machine_id {
            o.insert(DhcpOption::ClientMachineIdentifier(id.clone()));
        }
        match boot {
            Boot::Tftp { filename } => {
                m.set_siaddr(self.config.server_ip);
                if with_file {
                    m.set_fname_str(trunc(filename, 127));
                    if filename.len() > 127 {
                        m.opts_mut()
                            .insert(DhcpOption::BootfileName(filename.as_bytes().to_vec()));
                    }
                }
            }
            Boot::Http { url } => {
                // Next server = us for URLs too: iPXE takes a proxy answer's boot file only
                // when siaddr is non-zero (see the firmware quirks above `add_boot`).
                m.set_siaddr(self.config.server_ip);
                if with_file {
                    m.set_fname_str(trunc(url, 127));
                    m.opts_mut()
                        .insert(DhcpOption::BootfileName(url.as_bytes().to_vec()));
                }
            }
            Boot::NoBootFile | Boot::Ignore => {}
        }
        // Answers that carry a boot file to PXE/iPXE clients also carry PXE vendor options
        // (discovery control: "use the boot file in this packet"): EDK2 classifies a full-mode
        // offer with option 60 but without them as "BINL" and re-asks on port 4011 instead of
        // fetching the file; BIOS PXE ROMs skip boot server discovery. (iPXE does not need
        // them: it wants siaddr and a file, see the table above.) UEFI PXE proxy offers on 67
        // have no file and no option 43, so that EDK2 asks on port 4011 as the PXE spec intends.
        let has_file = with_file && matches!(boot, Boot::Tftp { .. } | Boot::Http { .. });
        if has_file && matches!(cx.client.firmware, Firmware::Pxe | Firmware::Ipxe) {
            m.opts_mut()
                .insert(DhcpOption::VendorExtensions(vec![6, 1, 0x08, 255]));
        }
    }
}

fn trunc(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn base_reply(cx: &Ctx<'_>, kind: MessageType, server_ip: Ipv4Addr) -> Message {
    let h = &cx.pkt.header;
    let mut m = Message::new_with_id(
        cx.xid,
        h.ciaddr(),
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        h.giaddr(),
        &cx.client.mac.octets(),
    );
    m.set_opcode(Opcode::BootReply);
    m.set_flags(h.flags());
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    m.opts_mut().insert(DhcpOption::ServerIdentifier(server_ip));
    // RFC 3046 §2.2: relay agent information is echoed back unchanged.
    if let Some(v) = cx.pkt.opt(82)
        && let Ok(info) = RelayAgentInformation::decode(&mut Decoder::new(v))
    {
        m.opts_mut().insert(DhcpOption::RelayAgentInformation(info));
    }
    let _ = cx.port;
    m
}

fn encode(m: &Message) -> Vec<u8> {
    let mut buf = Vec::with_capacity(576);
    let mut e = Encoder::new(&mut buf);
    // Encoding our own message into a Vec cannot fail: every option we insert has a length
    // below 256 or is split by dhcproto's long-option encoder.
    if m.encode(&mut e).is_err() {
        tracing::error!("encoding a DHCP reply failed");
        return Vec::new();
    }
    // Pad to the BOOTP minimum of 300 bytes (RFC 1542 §2.1): some PXE ROMs drop shorter ones.
    if buf.len() < 300 {
        buf.resize(300, 0);
    }
    buf
}

fn add(now: UnixMillis, d: Duration) -> UnixMillis {
    UnixMillis(
        now.0
            .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
    )
}

fn hostname_for(client: &ClientInfo, resv: Option<&Reservation>) -> Option<String> {
    resv.and_then(|r| r.hostname.clone())
        .or_else(|| client.hostname.clone())
}

fn no_network(cx: &Ctx<'_>) -> String {
    match cx.client.relay {
        Some(g) => format!("relay {g} is on no network served here"),
        None => "no [[dhcp.network]] contains this server's address".into(),
    }
}

fn event(
    kind: DhcpEventKind,
    cx: &Ctx<'_>,
    ip: Option<Ipv4Addr>,
    hostname: Option<String>,
    reason: String,
    answer: Option<BootAnswer>,
) -> DhcpEvent {
    let (session, boot): (Option<SessionId>, Option<Boot>) = match answer {
        Some(a) => (a.session, Some(a.boot)),
        None => (None, None),
    };
    DhcpEvent {
        kind,
        mac: Some(cx.client.mac),
        ip,
        xid: cx.xid,
        session,
        hostname: hostname.or_else(|| cx.client.hostname.clone()),
        reason,
        client: Some(cx.client.clone()),
        boot,
    }
}

fn ignored(cx: Ctx<'_>, ip: Option<Ipv4Addr>, a: &BootAnswer) -> Step {
    let mut e = event(
        DhcpEventKind::Dropped,
        &cx,
        ip,
        None,
        format!("not answered: {}", a.reason),
        Some(a.clone()),
    );
    e.session = a.session;
    Step {
        reply: None,
        persist: Vec::new(),
        events: vec![e],
    }
}

fn dropped(client: Option<ClientInfo>, ip: Option<Ipv4Addr>, xid: u32, reason: String) -> Step {
    tracing::debug!(%reason, "dhcp request dropped");
    Step {
        reply: None,
        persist: Vec::new(),
        events: vec![DhcpEvent {
            kind: DhcpEventKind::Dropped,
            mac: client.as_ref().map(|c| c.mac),
            ip,
            xid,
            session: None,
            hostname: client.as_ref().and_then(|c| c.hostname.clone()),
            reason,
            client,
            boot: None,
        }],
    }
}
