//! Conformance tests, filed by RFC section.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use corral_model::{MacAddr, UnixMillis};
use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

use crate::*;

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const T0: UnixMillis = UnixMillis(1_000_000_000);

fn mac(n: u8) -> MacAddr {
    MacAddr([0x52, 0x54, 0, 0, 0, n])
}

fn config() -> ServerConfig {
    let mut c = ServerConfig::new(Mode::Full, SERVER, "eth0");
    c.networks = vec![
        Network {
            name: "lab".into(),
            cidr: "10.0.0.0/24".parse().unwrap(),
            pool: Some((Ipv4Addr::new(10, 0, 0, 100), Ipv4Addr::new(10, 0, 0, 103))),
            gateway: Some(Ipv4Addr::new(10, 0, 0, 254)),
            dns: vec![Ipv4Addr::new(10, 0, 0, 53)],
            domain: Some("lab.example".into()),
            lease: Duration::from_secs(3600),
        },
        Network {
            name: "remote".into(),
            cidr: "10.9.0.0/24".parse().unwrap(),
            pool: Some((Ipv4Addr::new(10, 9, 0, 10), Ipv4Addr::new(10, 9, 0, 20))),
            gateway: Some(Ipv4Addr::new(10, 9, 0, 1)),
            dns: vec![],
            domain: None,
            lease: Duration::from_secs(600),
        },
    ];
    c.reservations = vec![Reservation {
        mac: mac(0xaa),
        ip: Some(Ipv4Addr::new(10, 0, 0, 50)),
        hostname: Some("web01".into()),
    }];
    c
}

fn msg(ty: MessageType, m: MacAddr) -> Message {
    let mut msg = Message::new_with_id(
        0x1234,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &m.octets(),
    );
    msg.opts_mut().insert(DhcpOption::MessageType(ty));
    msg
}

fn bytes(m: &Message) -> Vec<u8> {
    let mut b = Vec::new();
    m.encode(&mut Encoder::new(&mut b)).unwrap();
    b
}

fn decode(b: &[u8]) -> Message {
    Message::decode(&mut Decoder::new(b)).unwrap()
}

struct H {
    s: Server,
    queries: Vec<BootQuery>,
    boot: Boot,
}

impl H {
    fn new(c: ServerConfig) -> H {
        H {
            s: Server::new(c),
            queries: Vec::new(),
            boot: Boot::Tftp {
                filename: "undionly.kpxe".into(),
            },
        }
    }
    fn step_at(&mut self, now: UnixMillis, m: &Message, src: SocketAddrV4, port: Port) -> Step {
        let boot = self.boot.clone();
        let q = &mut self.queries;
        let mut decide = |bq: &BootQuery| {
            q.push(bq.clone());
            BootAnswer::new(boot.clone(), "test policy")
        };
        self.s.handle(
            now,
            Datagram {
                data: &bytes(m),
                src,
                port,
            },
            &mut decide,
        )
    }
    fn step(&mut self, m: &Message) -> Step {
        self.step_at(
            T0,
            m,
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
            Port::Dhcp,
        )
    }
    fn reply(&mut self, m: &Message) -> (Message, Reply) {
        let st = self.step(m);
        let r = st.reply.expect("a reply");
        (decode(&r.bytes), r)
    }
    /// DISCOVER + REQUEST: the bound address.
    fn lease(&mut self, m: MacAddr) -> Ipv4Addr {
        let (offer, _) = self.reply(&msg(MessageType::Discover, m));
        let mut req = msg(MessageType::Request, m);
        req.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
        req.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(offer.yiaddr()));
        let (ack, _) = self.reply(&req);
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        ack.yiaddr()
    }
}

fn bcast() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::BROADCAST, 68)
}

mod rfc2131_4_1 {
    use super::*;

    #[test]
    fn reply_without_address_is_broadcast_even_without_flag() {
        let mut h = H::new(config());
        let (_, r) = h.reply(&msg(MessageType::Discover, mac(1)));
        assert_eq!(r.dest, bcast());
    }

    #[test]
    fn relayed_request_answered_to_giaddr_port_67_from_relay_network() {
        let mut h = H::new(config());
        let mut d = msg(MessageType::Discover, mac(1));
        d.set_giaddr(Ipv4Addr::new(10, 9, 0, 1));
        let (o, r) = h.reply(&d);
        assert_eq!(r.dest, SocketAddrV4::new(Ipv4Addr::new(10, 9, 0, 1), 67));
        assert_eq!(o.yiaddr(), Ipv4Addr::new(10, 9, 0, 10));
        assert_eq!(o.giaddr(), Ipv4Addr::new(10, 9, 0, 1));
        assert_eq!(
            o.opts().get(OptionCode::Router),
            Some(&DhcpOption::Router(vec![Ipv4Addr::new(10, 9, 0, 1)]))
        );
    }

    #[test]
    fn relay_from_unknown_network_is_dropped() {
        let mut h = H::new(config());
        let mut d = msg(MessageType::Discover, mac(1));
        d.set_giaddr(Ipv4Addr::new(192, 168, 7, 1));
        let st = h.step(&d);
        assert!(st.reply.is_none());
        assert_eq!(st.events[0].kind, DhcpEventKind::Dropped);
    }

    #[test]
    fn renewal_with_ciaddr_is_unicast_to_ciaddr() {
        let mut h = H::new(config());
        let ip = h.lease(mac(1));
        let mut r = msg(MessageType::Request, mac(1));
        r.set_ciaddr(ip);
        let (ack, rep) = h.reply(&r);
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(rep.dest, SocketAddrV4::new(ip, 68));
    }

    #[test]
    fn nak_via_relay_sets_broadcast_bit() {
        let mut h = H::new(config());
        let mut r = msg(MessageType::Request, mac(1));
        r.set_giaddr(Ipv4Addr::new(10, 9, 0, 1));
        r.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
        r.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 0, 100)));
        let (nak, rep) = h.reply(&r);
        assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
        assert!(nak.flags().broadcast());
        assert_eq!(rep.dest.port(), 67);
    }

    #[test]
    fn option_overload_reads_file_and_sname_fields() {
        // Message type in the options field, requested address in `file`, hostname in `sname`.
        let mut b = bytes(&msg(MessageType::Discover, mac(7)));
        b.truncate(HEADER_LEN + 4);
        b.extend_from_slice(&[53, 1, 1, 52, 1, 3, 255]);
        let file = [50, 4, 10, 0, 0, 102, 255];
        b[108..108 + file.len()].copy_from_slice(&file);
        let sname = [12, 3, b'p', b'c', b'7', 255];
        b[44..44 + sname.len()].copy_from_slice(&sname);
        let p = Packet::decode(&b).unwrap();
        assert_eq!(p.requested_ip(), Some(Ipv4Addr::new(10, 0, 0, 102)));
        assert_eq!(p.opt(12), Some(&b"pc7"[..]));
        assert_eq!(p.opt(52), None);
        let mut h = H::new(config());
        let st = h.s.handle(
            T0,
            Datagram {
                data: &b,
                src: bcast(),
                port: Port::Dhcp,
            },
            &mut |_| unreachable!(),
        );
        assert_eq!(
            decode(&st.reply.unwrap().bytes).yiaddr(),
            Ipv4Addr::new(10, 0, 0, 102)
        );
    }

    #[test]
    fn overload_bad_value_and_truncation_are_errors() {
        let mut b = bytes(&msg(MessageType::Discover, mac(7)));
        b.truncate(HEADER_LEN + 4);
        let mut bad = b.clone();
        bad.extend_from_slice(&[53, 1, 1, 52, 1, 9, 255]);
        assert_eq!(Packet::decode(&bad).unwrap_err(), DecodeError::BadOverload);
        let mut trunc = b.clone();
        trunc.extend_from_slice(&[53, 1, 1, 12, 200, b'x']);
        assert_eq!(
            Packet::decode(&trunc).unwrap_err(),
            DecodeError::Truncated { code: 12 }
        );
        assert_eq!(
            Packet::decode(&b[..100]).unwrap_err(),
            DecodeError::TooShort { len: 100 }
        );
    }

    #[test]
    fn long_options_are_concatenated_rfc3396() {
        let mut b = bytes(&msg(MessageType::Discover, mac(7)));
        b.truncate(HEADER_LEN + 4);
        b.extend_from_slice(&[53, 1, 1, 12, 2, b'a', b'b', 12, 1, b'c', 255]);
        assert_eq!(Packet::decode(&b).unwrap().opt(12), Some(&b"abc"[..]));
    }

    #[test]
    fn relay_agent_information_is_echoed() {
        let mut h = H::new(config());
        let mut d = msg(MessageType::Discover, mac(1));
        d.set_giaddr(Ipv4Addr::new(10, 9, 0, 1));
        let mut b = bytes(&d);
        let end = b.iter().rposition(|&x| x == 255).unwrap();
        b.truncate(end);
        b.extend_from_slice(&[82, 4, 1, 2, b'p', b'1', 255]);
        let st = h.s.handle(
            T0,
            Datagram {
                data: &b,
                src: bcast(),
                port: Port::Dhcp,
            },
            &mut |_| unreachable!(),
        );
        let r = st.reply.unwrap().bytes;
        let p = Packet::decode(&r).unwrap();
        assert_eq!(p.opt(82), Some(&[1, 2, b'p', b'1'][..]));
    }
}

mod rfc2131_4_3_1 {
    use super::*;

    #[test]
    fn offer_from_pool_with_network_options() {
        let mut h = H::new(config());
        let st = h.step(&msg(MessageType::Discover, mac(1)));
        assert!(st.persist.is_empty(), "offers are not persisted");
        let o = decode(&st.reply.unwrap().bytes);
        assert_eq!(o.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(o.yiaddr(), Ipv4Addr::new(10, 0, 0, 100));
        assert_eq!(o.xid(), 0x1234);
        assert_eq!(
            o.opts().get(OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(SERVER))
        );
        assert_eq!(
            o.opts().get(OptionCode::AddressLeaseTime),
            Some(&DhcpOption::AddressLeaseTime(3600))
        );
        assert_eq!(
            o.opts().get(OptionCode::Renewal),
            Some(&DhcpOption::Renewal(1800))
        );
        assert_eq!(
            o.opts().get(OptionCode::Rebinding),
            Some(&DhcpOption::Rebinding(3150))
        );
        assert_eq!(
            o.opts().get(OptionCode::SubnetMask),
            Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
        );
        assert_eq!(
            o.opts().get(OptionCode::DomainName),
            Some(&DhcpOption::DomainName("lab.example".into()))
        );
        assert!(
            h.queries.is_empty(),
            "plain clients never reach the boot policy"
        );
        assert_eq!(st.events[0].kind, DhcpEventKind::Offer);
    }

    #[test]
    fn same_client_gets_same_offer_and_others_differ() {
        let mut h = H::new(config());
        let a = h.reply(&msg(MessageType::Discover, mac(1))).0.yiaddr();
        let a2 = h.reply(&msg(MessageType::Discover, mac(1))).0.yiaddr();
        let b = h.reply(&msg(MessageType::Discover, mac(2))).0.yiaddr();
        assert_eq!(a, a2);
        assert_ne!(a, b);
    }

    #[test]
    fn reservation_gets_fixed_address_and_hostname() {
        let mut h = H::new(config());
        let o = h.reply(&msg(MessageType::Discover, mac(0xaa))).0;
        assert_eq!(o.yiaddr(), Ipv4Addr::new(10, 0, 0, 50));
        assert_eq!(
            o.opts().get(OptionCode::Hostname),
            Some(&DhcpOption::Hostname("web01".into()))
        );
    }

    #[test]
    fn requested_address_is_honoured_when_free() {
        let mut h = H::new(config());
        let mut d = msg(MessageType::Discover, mac(1));
        d.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 0, 103)));
        assert_eq!(h.reply(&d).0.yiaddr(), Ipv4Addr::new(10, 0, 0, 103));
        // Outside the pool: ignored.
        let mut d = msg(MessageType::Discover, mac(2));
        d.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 0, 7)));
        assert_eq!(h.reply(&d).0.yiaddr(), Ipv4Addr::new(10, 0, 0, 100));
    }

    #[test]
    fn pool_exhaustion_is_reported_not_answered() {
        let mut h = H::new(config());
        for i in 0..4 {
            h.lease(mac(i));
        }
        let st = h.step(&msg(MessageType::Discover, mac(9)));
        assert!(st.reply.is_none());
        assert!(
            st.events[0].reason.contains("exhausted"),
            "{}",
            st.events[0].reason
        );
    }

    #[test]
    fn parameter_request_list_is_honoured() {
        let mut h = H::new(config());
        let mut d = msg(MessageType::Discover, mac(1));
        d.opts_mut().insert(DhcpOption::ParameterRequestList(vec![
            OptionCode::SubnetMask,
            OptionCode::Router,
        ]));
        let o = h.reply(&d).0;
        assert!(o.opts().get(OptionCode::Router).is_some());
        assert!(o.opts().get(OptionCode::DomainNameServer).is_none());
        assert!(o.opts().get(OptionCode::DomainName).is_none());
        assert!(
            o.opts().get(OptionCode::AddressLeaseTime).is_some(),
            "lease time is always sent"
        );
    }

    #[test]
    fn offered_address_expires_after_hold() {
        let mut h = H::new(config());
        let a = h.reply(&msg(MessageType::Discover, mac(1))).0.yiaddr();
        let later = UnixMillis(T0.0 + 31_000);
        let _ = h.s.expire(later);
        let b = h.step_at(
            later,
            &msg(MessageType::Discover, mac(2)),
            bcast(),
            Port::Dhcp,
        );
        // The cursor moves on, but the held address is free again (not leased).
        assert!(h.s.leases().get(a).is_none_or(|l| l.mac == mac(2)));
        assert!(b.reply.is_some());
    }
}

mod rfc2131_4_3_2 {
    use super::*;

    fn select(m: MacAddr, ip: Ipv4Addr, sid: Ipv4Addr) -> Message {
        let mut r = msg(MessageType::Request, m);
        r.opts_mut().insert(DhcpOption::ServerIdentifier(sid));
        r.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
        r
    }

    #[test]
    fn selecting_binds_and_persists() {
        let mut h = H::new(config());
        let ip = h.reply(&msg(MessageType::Discover, mac(1))).0.yiaddr();
        let st = h.step(&select(mac(1), ip, SERVER));
        assert_eq!(st.persist.len(), 1);
        match &st.persist[0] {
            LeaseChange::Upsert(l) => {
                assert_eq!((l.ip, l.mac, l.state), (ip, mac(1), LeaseState::Bound));
                assert_eq!(l.expires, UnixMillis(T0.0 + 3_600_000));
            }
            c => panic!("{c:?}"),
        }
        assert_eq!(decode(&st.reply.unwrap().bytes).yiaddr(), ip);
    }

    #[test]
    fn selecting_another_server_is_silent_and_frees_offer() {
        let mut h = H::new(config());
        let ip = h.reply(&msg(MessageType::Discover, mac(1))).0.yiaddr();
        let st = h.step(&select(mac(1), ip, Ipv4Addr::new(10, 0, 0, 2)));
        assert!(st.reply.is_none() && st.events.is_empty());
        assert!(h.s.leases().get(ip).is_none());
    }

    #[test]
    fn selecting_an_address_not_offered_is_naked() {
        let mut h = H::new(config());
        let st = h.step(&select(mac(1), Ipv4Addr::new(10, 0, 0, 101), SERVER));
        assert_eq!(
            decode(&st.reply.unwrap().bytes).opts().msg_type(),
            Some(MessageType::Nak)
        );
    }

    #[test]
    fn init_reboot_known_client_acked_wrong_network_naked_unknown_silent() {
        let mut h = H::new(config());
        let ip = h.lease(mac(1));
        let mut r = msg(MessageType::Request, mac(1));
        r.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
        assert_eq!(h.reply(&r).0.opts().msg_type(), Some(MessageType::Ack));

        let mut r = msg(MessageType::Request, mac(1));
        r.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(
                192, 168, 1, 5,
            )));
        assert_eq!(h.reply(&r).0.opts().msg_type(), Some(MessageType::Nak));

        let mut r = msg(MessageType::Request, mac(3));
        r.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 0, 102)));
        assert!(h.step(&r).reply.is_none());
    }

    #[test]
    fn address_of_another_client_is_naked() {
        let mut h = H::new(config());
        let ip = h.lease(mac(1));
        let mut r = msg(MessageType::Request, mac(2));
        r.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
        assert_eq!(h.reply(&r).0.opts().msg_type(), Some(MessageType::Nak));
    }

    #[test]
    fn renewing_extends_the_lease() {
        let mut h = H::new(config());
        let ip = h.lease(mac(1));
        let mut r = msg(MessageType::Request, mac(1));
        r.set_ciaddr(ip);
        let later = UnixMillis(T0.0 + 1_800_000);
        let st = h.step_at(later, &r, SocketAddrV4::new(ip, 68), Port::Dhcp);
        assert_eq!(
            h.s.leases().get(ip).unwrap().expires,
            UnixMillis(later.0 + 3_600_000)
        );
        assert_eq!(st.persist.len(), 1);
    }

    #[test]
    fn rebinding_after_expiry_is_acked_if_address_still_free() {
        let mut h = H::new(config());
        let ip = h.lease(mac(1));
        let later = UnixMillis(T0.0 + 4_000_000);
        let (ch, ev) = h.s.expire(later);
        assert_eq!(ch.len(), 1);
        assert_eq!(ev[0].kind, DhcpEventKind::Expired);
        assert_eq!(h.s.leases().get(ip).unwrap().state, LeaseState::Expired);
        let mut r = msg(MessageType::Request, mac(1));
        r.set_ciaddr(ip);
        r.set_flags(Flags::new(0).set_broadcast());
        let st = h.step_at(later, &r, SocketAddrV4::new(ip, 68), Port::Dhcp);
        assert_eq!(
            decode(&st.reply.unwrap().bytes).opts().msg_type(),
            Some(MessageType::Ack)
        );
    }

    #[test]
    fn reserved_client_asking_for_other_address_is_naked() {
        let mut h = H::new(config());
        let mut r = msg(MessageType::Request, mac(0xaa));
        r.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
        r.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 0, 100)));
        assert_eq!(h.reply(&r).0.opts().msg_type(), Some(MessageType::Nak));
        // Its fixed address is acknowledged even after a server restart without any record.
        let mut r = msg(MessageType::Request, mac(0xaa));
        r.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 0, 50)));
        assert_eq!(h.reply(&r).0.opts().msg_type(), Some(MessageType::Ack));
    }

    #[test]
    fn leases_reloaded_are_honoured() {
        let mut h = H::new(config());
        let ip = h.lease(mac(1));
        let saved: Vec<Lease> = h.s.leases().iter().cloned().collect();
        let mut h2 = H::new(config());
        h2.s.load_leases(saved);
        let mut r = msg(MessageType::Request, mac(1));
        r.set_ciaddr(ip);
        assert_eq!(h2.reply(&r).0.yiaddr(), ip);
        assert_eq!(h2.reply(&msg(MessageType::Discover, mac(1))).0.yiaddr(), ip);
    }
}

mod rfc2131_4_3_3 {
    use super::*;

    #[test]
    fn declined_address_is_quarantined() {
        let mut h = H::new(config());
        let ip = h.lease(mac(1));
        let mut d = msg(MessageType::Decline, mac(1));
        d.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
        d.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
        let st = h.step(&d);
        assert!(st.reply.is_none());
        assert_eq!(st.events[0].kind, DhcpEventKind::Decline);
        assert!(
            matches!(&st.persist[0], LeaseChange::Upsert(l) if l.state == LeaseState::Declined)
        );
        let again = h.reply(&msg(MessageType::Discover, mac(1))).0.yiaddr();
        assert_ne!(again, ip);
        for i in 2..4 {
            assert_ne!(h.reply(&msg(MessageType::Discover, mac(i))).0.yiaddr(), ip);
        }
        // The pool's last address is the declined one: not handed out during quarantine.
        assert!(h.step(&msg(MessageType::Discover, mac(4))).reply.is_none());
    }
}

mod rfc2131_4_3_4 {
    use super::*;

    #[test]
    fn release_frees_address_and_client_gets_it_back() {
        let mut h = H::new(config());
        let ip = h.lease(mac(1));
        let mut r = msg(MessageType::Release, mac(1));
        r.set_ciaddr(ip);
        r.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
        let st = h.step(&r);
        assert!(st.reply.is_none());
        assert!(
            matches!(&st.persist[0], LeaseChange::Upsert(l) if l.state == LeaseState::Released)
        );
        assert_eq!(h.reply(&msg(MessageType::Discover, mac(1))).0.yiaddr(), ip);
    }

    #[test]
    fn release_by_another_client_is_ignored() {
        let mut h = H::new(config());
        let ip = h.lease(mac(1));
        let mut r = msg(MessageType::Release, mac(2));
        r.set_ciaddr(ip);
        let st = h.step(&r);
        assert!(st.persist.is_empty());
        assert_eq!(h.s.leases().get(ip).unwrap().state, LeaseState::Bound);
    }
}

mod rfc2131_4_3_5 {
    use super::*;

    #[test]
    fn inform_gets_ack_without_address_or_lease_time() {
        let mut h = H::new(config());
        let mut r = msg(MessageType::Inform, mac(1));
        let ip = Ipv4Addr::new(10, 0, 0, 9);
        r.set_ciaddr(ip);
        let (ack, rep) = h.reply(&r);
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(ack.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert!(ack.opts().get(OptionCode::AddressLeaseTime).is_none());
        assert!(ack.opts().get(OptionCode::Router).is_some());
        assert_eq!(rep.dest, SocketAddrV4::new(ip, 68));
    }
}

mod rfc4578_pxe {
    use super::*;

    fn pxe(ty: MessageType, m: MacAddr, arch: u16, class: &str) -> Message {
        let mut d = msg(ty, m);
        d.opts_mut()
            .insert(DhcpOption::ClassIdentifier(class.as_bytes().to_vec()));
        d.opts_mut()
            .insert(DhcpOption::ClientSystemArchitecture(arch.into()));
        d.opts_mut()
            .insert(DhcpOption::ClientMachineIdentifier(vec![0; 17]));
        d
    }

    #[test]
    fn classification_of_arch_and_firmware() {
        let p = Packet::decode(&bytes(&pxe(
            MessageType::Discover,
            mac(1),
            9,
            "PXEClient:Arch:00009:UNDI:003016",
        )))
        .unwrap();
        let c = ClientInfo::from_packet(&p).unwrap();
        assert_eq!(c.arch, Some(Arch::UefiX64));
        assert_eq!(c.arch_code, Some(9));
        assert_eq!(c.firmware, Firmware::Pxe);
        let p = Packet::decode(&bytes(&pxe(
            MessageType::Discover,
            mac(1),
            16,
            "HTTPClient:Arch:00016",
        )))
        .unwrap();
        assert_eq!(
            ClientInfo::from_packet(&p).unwrap().firmware,
            Firmware::HttpClient
        );
        let mut d = pxe(MessageType::Discover, mac(1), 0, "PXEClient:Arch:00000");
        d.opts_mut().insert(DhcpOption::UserClass(b"iPXE".to_vec()));
        let p = Packet::decode(&bytes(&d)).unwrap();
        assert_eq!(
            ClientInfo::from_packet(&p).unwrap().firmware,
            Firmware::Ipxe
        );
    }

    #[test]
    fn full_mode_bios_pxe_gets_tftp_file_and_next_server() {
        let mut h = H::new(config());
        let o = h
            .reply(&pxe(
                MessageType::Discover,
                mac(1),
                0,
                "PXEClient:Arch:00000",
            ))
            .0;
        assert_eq!(o.yiaddr(), Ipv4Addr::new(10, 0, 0, 100));
        assert_eq!(o.siaddr(), SERVER);
        assert_eq!(
            o.fname_str().unwrap().unwrap().trim_end_matches('\0'),
            "undionly.kpxe"
        );
        assert_eq!(
            o.opts().get(OptionCode::ClassIdentifier),
            Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec()))
        );
        // EDK2 needs PXE vendor options here, or it re-asks on port 4011 ("BINL" offer).
        assert_eq!(
            o.opts().get(OptionCode::VendorExtensions),
            Some(&DhcpOption::VendorExtensions(vec![6, 1, 8, 255]))
        );
        assert_eq!(h.queries.len(), 1);
        assert_eq!(h.queries[0].ip, Some(Ipv4Addr::new(10, 0, 0, 100)));
        assert!(!h.queries[0].proxy);
    }

    #[test]
    fn http_client_gets_url_and_class_echoed() {
        let mut h = H::new(config());
        h.boot = Boot::Http {
            url: "http://10.0.0.1:8080/boot/x.efi".into(),
        };
        let o = h
            .reply(&pxe(
                MessageType::Discover,
                mac(1),
                16,
                "HTTPClient:Arch:00016",
            ))
            .0;
        assert_eq!(
            o.opts().get(OptionCode::ClassIdentifier),
            Some(&DhcpOption::ClassIdentifier(b"HTTPClient".to_vec()))
        );
        assert_eq!(
            o.fname_str().unwrap().unwrap().trim_end_matches('\0'),
            "http://10.0.0.1:8080/boot/x.efi"
        );
    }

    #[test]
    fn ignore_means_no_answer() {
        let mut h = H::new(config());
        h.boot = Boot::Ignore;
        let st = h.step(&pxe(MessageType::Discover, mac(1), 0, "PXEClient"));
        assert!(st.reply.is_none());
        assert_eq!(st.events[0].kind, DhcpEventKind::Dropped);
    }

    #[test]
    fn proxy_offer_bios_has_file_and_no_address() {
        let mut c = config();
        c.mode = Mode::Proxy;
        let mut h = H::new(c);
        let st = h.step(&pxe(
            MessageType::Discover,
            mac(1),
            0,
            "PXEClient:Arch:00000",
        ));
        let o = decode(&st.reply.unwrap().bytes);
        assert_eq!(o.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(o.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(o.siaddr(), SERVER);
        assert_eq!(
            o.fname_str().unwrap().unwrap().trim_end_matches('\0'),
            "undionly.kpxe"
        );
        assert_eq!(
            o.opts().get(OptionCode::VendorExtensions),
            Some(&DhcpOption::VendorExtensions(vec![6, 1, 8, 255]))
        );
        assert!(o.opts().get(OptionCode::AddressLeaseTime).is_none());
        assert_eq!(st.events[0].kind, DhcpEventKind::ProxyOffer);
        assert!(h.queries[0].proxy);
    }

    #[test]
    fn proxy_offer_uefi_has_no_file_then_4011_ack_has_it() {
        let mut c = config();
        c.mode = Mode::Proxy;
        let mut h = H::new(c);
        h.boot = Boot::Tftp {
            filename: "snponly.efi".into(),
        };
        let o = h
            .reply(&pxe(
                MessageType::Discover,
                mac(1),
                7,
                "PXEClient:Arch:00007",
            ))
            .0;
        assert_eq!(
            o.opts().get(OptionCode::ClassIdentifier),
            Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec()))
        );
        assert!(o.fname().is_none());
        assert!(o.opts().get(OptionCode::VendorExtensions).is_none());
        let mut r = pxe(MessageType::Request, mac(1), 7, "PXEClient:Arch:00007");
        let cip = Ipv4Addr::new(10, 0, 0, 77);
        r.set_ciaddr(cip);
        let src = SocketAddrV4::new(cip, 68);
        let st = h.step_at(T0, &r, src, Port::Pxe);
        let rep = st.reply.unwrap();
        assert_eq!(rep.dest, src);
        assert_eq!(rep.via, Port::Pxe);
        let a = decode(&rep.bytes);
        assert_eq!(a.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(
            a.fname_str().unwrap().unwrap().trim_end_matches('\0'),
            "snponly.efi"
        );
        assert_eq!(a.siaddr(), SERVER);
        // PXE vendor options with discovery control 8: "use the boot file in this packet".
        assert_eq!(
            a.opts().get(OptionCode::VendorExtensions),
            Some(&DhcpOption::VendorExtensions(vec![6, 1, 8, 255]))
        );
        assert_eq!(st.events[0].kind, DhcpEventKind::ProxyAck);
    }

    #[test]
    fn proxy_answers_to_ipxe_carry_option_43() {
        let mut c = config();
        c.mode = Mode::Proxy;
        let mut h = H::new(c);
        h.boot = Boot::Http {
            url: "http://10.0.0.1:8080/boot.ipxe".into(),
        };
        let mut d = pxe(MessageType::Discover, mac(1), 7, "PXEClient:Arch:00007");
        d.opts_mut().insert(DhcpOption::UserClass(b"iPXE".to_vec()));
        let o = h.reply(&d).0;
        assert_eq!(
            o.fname_str().unwrap().unwrap().trim_end_matches('\0'),
            "http://10.0.0.1:8080/boot.ipxe"
        );
        assert_eq!(
            o.opts().get(OptionCode::VendorExtensions),
            Some(&DhcpOption::VendorExtensions(vec![6, 1, 8, 255]))
        );
        let mut r = d.clone();
        r.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Request));
        r.set_ciaddr(Ipv4Addr::new(10, 0, 0, 77));
        let st = h.step_at(
            T0,
            &r,
            SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 77), 68),
            Port::Pxe,
        );
        let a = decode(&st.reply.unwrap().bytes);
        assert_eq!(
            a.opts().get(OptionCode::VendorExtensions),
            Some(&DhcpOption::VendorExtensions(vec![6, 1, 8, 255]))
        );
    }

    /// Issue #4. PXE 2.1 §2.2.5 (ProxyDHCP): iPXE takes the boot file of a `PXEClient` proxy
    /// answer only when it also names a next server (siaddr != 0, iPXE's `dhcp_has_pxeopts`);
    /// URLs were sent with siaddr 0, so iPXE dropped the offer and the port 4011 ACK alike
    /// and ended with "Nothing to boot".
    #[test]
    fn issue_4_proxy_url_answers_to_ipxe_name_us_as_next_server() {
        let mut c = config();
        c.mode = Mode::Proxy;
        let mut h = H::new(c);
        h.boot = Boot::Http {
            url: "http://10.0.0.1:8080/ipxe/52:54:00:00:00:01".into(),
        };
        let has_pxe_opts = |m: &Message| {
            m.siaddr() == SERVER
                && m.fname_str().unwrap().unwrap().trim_end_matches('\0')
                    == "http://10.0.0.1:8080/ipxe/52:54:00:00:00:01"
                && m.opts().get(OptionCode::ClassIdentifier)
                    == Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec()))
                && m.opts().get(OptionCode::ServerIdentifier)
                    == Some(&DhcpOption::ServerIdentifier(SERVER))
        };
        for arch in [0u16, 7] {
            let mut d = pxe(
                MessageType::Discover,
                mac(1),
                arch,
                &format!("PXEClient:Arch:{arch:05}:UNDI:002001"),
            );
            d.opts_mut().insert(DhcpOption::UserClass(b"iPXE".to_vec()));
            let (o, rep) = h.reply(&d);
            assert_eq!(o.opts().msg_type(), Some(MessageType::Offer));
            assert_eq!(rep.via, Port::Dhcp);
            assert_eq!(o.yiaddr(), Ipv4Addr::UNSPECIFIED);
            assert!(has_pxe_opts(&o), "arch {arch}: proxy offer {o:?}");
            // The ProxyDHCPREQUEST iPXE sends to 4011 from its new address.
            let cip = Ipv4Addr::new(10, 0, 0, 77);
            let mut r = d.clone();
            r.opts_mut()
                .insert(DhcpOption::MessageType(MessageType::Request));
            r.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
            r.set_ciaddr(cip);
            let src = SocketAddrV4::new(cip, 68);
            let rep = h.step_at(T0, &r, src, Port::Pxe).reply.unwrap();
            assert_eq!((rep.dest, rep.via), (src, Port::Pxe));
            let a = decode(&rep.bytes);
            assert_eq!(a.opts().msg_type(), Some(MessageType::Ack));
            assert!(has_pxe_opts(&a), "arch {arch}: 4011 ACK {a:?}");
        }
    }

    #[test]
    fn proxy_ignores_plain_clients_and_no_boot_file() {
        let mut c = config();
        c.mode = Mode::Proxy;
        let mut h = H::new(c);
        let st = h.step(&msg(MessageType::Discover, mac(1)));
        assert!(st.reply.is_none() && st.events.is_empty() && h.queries.is_empty());
        h.boot = Boot::NoBootFile;
        assert!(
            h.step(&pxe(MessageType::Discover, mac(1), 0, "PXEClient"))
                .reply
                .is_none()
        );
    }
}

mod hostile {
    use super::*;
    use proptest::prelude::*;

    fn run(data: &[u8], port: Port) {
        let mut s = Server::new(config());
        let _ = s.handle(
            T0,
            Datagram {
                data,
                src: bcast(),
                port,
            },
            &mut |_| {
                BootAnswer::new(
                    Boot::Tftp {
                        filename: "x".into(),
                    },
                    "t",
                )
            },
        );
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let _ = Packet::decode(&data);
            run(&data, Port::Dhcp);
            run(&data, Port::Pxe);
        }

        #[test]
        fn never_panics_on_mutated_requests(
            ty in 1u8..9,
            tail in proptest::collection::vec(any::<u8>(), 0..400),
            flips in proptest::collection::vec((0usize..240, any::<u8>()), 0..8),
        ) {
            let mut b = bytes(&msg(MessageType::from(ty), mac(1)));
            b.truncate(HEADER_LEN + 4);
            b.extend_from_slice(&[53, 1, ty]);
            b.extend_from_slice(&tail);
            for (i, v) in flips { b[i] = v; }
            run(&b, Port::Dhcp);
            run(&b, Port::Pxe);
        }
    }
}
