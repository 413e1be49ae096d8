//! Fuzzes the DHCP request decoder (option overload, RFC 3396 concatenation) and one server
//! step in full and proxy mode on both ports: errors are fine, panics are bugs.
#![no_main]

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use corral_dhcp_proto::{
    Boot, BootAnswer, Datagram, Mode, Network, Packet, Port, Server, ServerConfig,
};
use corral_model::UnixMillis;
use libfuzzer_sys::fuzz_target;

fn server(mode: Mode) -> Server {
    let mut c = ServerConfig::new(mode, Ipv4Addr::new(10, 0, 0, 1), "eth0");
    c.networks = vec![Network {
        name: "lab".into(),
        cidr: "10.0.0.0/24".parse().unwrap(),
        pool: Some((Ipv4Addr::new(10, 0, 0, 100), Ipv4Addr::new(10, 0, 0, 110))),
        gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
        dns: vec![],
        domain: None,
        lease: Duration::from_secs(60),
    }];
    Server::new(c)
}

fuzz_target!(|data: &[u8]| {
    let _ = Packet::decode(data);
    for mode in [Mode::Full, Mode::Proxy] {
        let mut s = server(mode);
        for port in [Port::Dhcp, Port::Pxe] {
            let _ = s.handle(
                UnixMillis(1_000),
                Datagram {
                    data,
                    src: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
                    port,
                },
                &mut |_| {
                    BootAnswer::new(
                        Boot::Tftp {
                            filename: "undionly.kpxe".into(),
                        },
                        "fuzz",
                    )
                },
            );
        }
        let _ = s.expire(UnixMillis(1_000_000));
    }
});
