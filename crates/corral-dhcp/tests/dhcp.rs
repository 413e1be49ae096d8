//! corral-dhcp against real clients in network namespaces: busybox `udhcpc`, ISC `dhclient`,
//! Kea's `perfdhcp` (as a relay agent), and crafted PXE requests for ProxyDHCP and port 4011.
//! Root only (namespaces); each test prints a loud SKIPPED line otherwise.
#![allow(unsafe_code)] // setns(2): run the server inside a lab namespace (see `enter_netns`).

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use corral_dhcp::{
    Boot, BootAnswer, BootPolicy, BootQuery, DhcpConfig, DhcpError, DhcpEvent, DhcpEventKind,
    Firmware, Mode,
};
use corral_dhcp_proto::dhcproto::v4::{DhcpOption, Flags, Message, MessageType, OptionCode};
use corral_dhcp_proto::dhcproto::{Decodable, Decoder, Encodable, Encoder};
use corral_model::MacAddr;
use corral_store::{LeaseStatus, Store};
use corral_testkit::{Lab, is_root};
use tokio_util::sync::CancellationToken;

fn skip(name: &str) -> bool {
    if !is_root() {
        eprintln!("SKIPPED {name}: needs root (network namespaces)");
        return true;
    }
    false
}

/// Moves the calling thread into network namespace `ns` (only this thread: setns(2) with
/// CLONE_NEWNET affects the caller alone).
fn enter_netns(ns: &str) {
    let f = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("netns file");
    use std::os::fd::AsRawFd;
    // SAFETY: setns takes a valid open namespace fd (kept open across the call) and a flag; it
    // changes only the calling thread's network namespace and touches no Rust-visible memory.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns({ns}): {}", std::io::Error::last_os_error());
}

/// A boot policy that answers every boot client with a fixed answer and keeps every event.
#[derive(Debug)]
struct TestPolicy {
    boot: Boot,
    events: Mutex<Vec<DhcpEvent>>,
    queries: Mutex<Vec<BootQuery>>,
}

impl TestPolicy {
    fn new(boot: Boot) -> Arc<TestPolicy> {
        Arc::new(TestPolicy {
            boot,
            events: Mutex::new(Vec::new()),
            queries: Mutex::new(Vec::new()),
        })
    }
    fn events(&self) -> Vec<DhcpEvent> {
        self.events.lock().unwrap().clone()
    }
    fn count(&self, kind: DhcpEventKind, mac: MacAddr) -> usize {
        self.events()
            .iter()
            .filter(|e| e.kind == kind && e.mac == Some(mac))
            .count()
    }
}

impl BootPolicy for TestPolicy {
    fn decide(&self, q: &BootQuery) -> BootAnswer {
        self.queries.lock().unwrap().push(q.clone());
        BootAnswer::new(self.boot.clone(), "test policy")
    }
    fn on_event(&self, e: DhcpEvent) {
        self.events.lock().unwrap().push(e);
    }
}

/// A server running in a namespace on its own thread; stopped (and joined) on drop.
struct Running {
    cancel: CancellationToken,
    thread: Option<JoinHandle<Result<(), DhcpError>>>,
}

impl Running {
    fn start(ns: &str, config: DhcpConfig, policy: Arc<TestPolicy>) -> Running {
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        let ns = ns.to_owned();
        let thread = std::thread::spawn(move || {
            enter_netns(&ns);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(corral_dhcp::serve(config, policy, c))
        });
        // Let it bind before clients start (they retry anyway).
        std::thread::sleep(Duration::from_millis(300));
        assert!(!thread.is_finished(), "server stopped at start");
        Running {
            cancel,
            thread: Some(thread),
        }
    }

    fn stop(mut self) {
        self.cancel.cancel();
        if let Some(t) = self.thread.take() {
            t.join().unwrap().expect("serve returned an error");
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn net_of(ip: Ipv4Addr) -> [u8; 3] {
    let o = ip.octets();
    [o[0], o[1], o[2]]
}

fn ip_in(ip: Ipv4Addr, last: u8) -> Ipv4Addr {
    let [a, b, c] = net_of(ip);
    Ipv4Addr::new(a, b, c, last)
}

/// A site directory with one network (the lab's /24, pool .100-.150, lease 1h) and the given
/// machines (name, MAC, fixed last octet).
fn site(
    dir: &Path,
    server: Ipv4Addr,
    mode: &str,
    machines: &[(&str, MacAddr, u8)],
) -> corral_site::SiteHandle {
    let [a, b, c] = net_of(server);
    std::fs::create_dir_all(dir.join("machines")).unwrap();
    std::fs::create_dir_all(dir.join("profiles")).unwrap();
    std::fs::write(
        dir.join("site.toml"),
        format!(
            "[server]\ninterfaces = [\"eth0\"]\n[dhcp]\nmode = \"{mode}\"\n\
             [[dhcp.network]]\nname = \"lab\"\ncidr = \"{a}.{b}.{c}.0/24\"\ngateway = \"{server}\"\n\
             dns = [\"{server}\"]\ndomain = \"lab.test\"\npool = \"{a}.{b}.{c}.100-{a}.{b}.{c}.150\"\nlease = \"1h\"\n\
             [[dhcp.network]]\nname = \"relayed\"\ncidr = \"10.250.{c}.0/24\"\ngateway = \"10.250.{c}.1\"\n\
             pool = \"10.250.{c}.10-10.250.{c}.250\"\nlease = \"1h\"\n"
        ),
    )
    .unwrap();
    std::fs::write(dir.join("profiles/p.toml"), "description = \"test\"\n").unwrap();
    for (name, mac, last) in machines {
        std::fs::write(
            dir.join(format!("machines/{name}.toml")),
            format!("mac = \"{mac}\"\nip = \"{a}.{b}.{c}.{last}\"\nprofile = \"p\"\n"),
        )
        .unwrap();
    }
    corral_site::SiteHandle::open(dir, Default::default()).expect("test site loads")
}

fn mac_of(ns: &str) -> MacAddr {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", "eth0"])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    let i = s.find("link/ether ").expect("ether address") + 11;
    s[i..i + 17].parse().unwrap()
}

fn flush(ns: &str) {
    let st = Command::new("ip")
        .args(["-n", ns, "addr", "flush", "dev", "eth0"])
        .status()
        .unwrap();
    assert!(st.success());
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// A client script (for udhcpc and dhclient) that logs its environment and configures the
/// address, without touching /etc/resolv.conf.
fn client_script(dir: &Path, log: &Path) -> PathBuf {
    let p = dir.join("client.sh");
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\n\
             L={log}\n\
             if [ -n \"$reason\" ]; then\n\
               echo \"dhclient $reason ip=$new_ip_address mask=$new_subnet_mask router=$new_routers dns=$new_domain_name_servers domain=$new_domain_name lease=$new_dhcp_lease_time server=$new_dhcp_server_identifier host=$new_host_name\" >> $L\n\
               case $reason in BOUND|RENEW|REBIND|REBOOT) ip addr flush dev $interface; ip addr add $new_ip_address/24 brd + dev $interface;; esac\n\
               exit 0\n\
             fi\n\
             echo \"udhcpc $1 ip=$ip mask=$mask router=$router dns=$dns domain=$domain lease=$lease server=$serverid host=$hostname\" >> $L\n\
             case $1 in bound|renew) ip addr flush dev $interface; ip addr add $ip/$mask brd + dev $interface;; deconfig) ip addr flush dev $interface;; esac\n\
             exit 0\n",
            log = log.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or("")
}

fn stored(db: &Path, ip: Ipv4Addr) -> Option<LeaseStatus> {
    let s = Store::open_read_only(db).ok()?;
    s.leases()
        .ok()?
        .into_iter()
        .find(|l| l.ip == ip)
        .map(|l| l.state)
}

#[test]
fn udhcpc_lease_renew_release_and_reservation() {
    if skip("udhcpc_lease_renew_release_and_reservation") {
        return;
    }
    let lab = Lab::new("dhudh", 3).unwrap();
    let server = lab.host(0);
    let (dyn_host, fixed_host) = (lab.host(1), lab.host(2));
    flush(&dyn_host.ns);
    flush(&fixed_host.ns);
    let fixed_mac = mac_of(&fixed_host.ns);
    let dyn_mac = mac_of(&dyn_host.ns);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state/corral.db");
    let handle = site(
        &dir.path().join("site"),
        server.ip,
        "full",
        &[("fixed01", fixed_mac, 50)],
    );
    let policy = TestPolicy::new(Boot::NoBootFile);
    let running = Running::start(
        &server.ns,
        DhcpConfig {
            mode: Mode::Full,
            interface: "eth0".into(),
            server_ip: server.ip,
            site: handle,
            store: Some(db.clone()),
            port: 67,
        },
        policy.clone(),
    );
    let log = dir.path().join("udhcpc.log");
    let script = client_script(dir.path(), &log);

    // The reserved machine: its fixed address and its hostname, in one quick exchange.
    let out = fixed_host
        .command("timeout")
        .args([
            "20", "busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "5", "-T", "1", "-O",
            "hostname", "-s",
        ])
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "udhcpc (reserved): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let l = read(&log);
    let bound = l
        .lines()
        .find(|x| x.starts_with("udhcpc bound"))
        .expect("bound line");
    assert_eq!(field(bound, "ip"), ip_in(server.ip, 50).to_string(), "{l}");
    assert_eq!(field(bound, "host"), "fixed01", "{l}");

    // A dynamic client, kept running for renew (SIGUSR1) and release (SIGUSR2).
    std::fs::write(&log, "").unwrap();
    let pid = lab
        .spawn(
            dyn_host
                .command("busybox")
                .args(["udhcpc", "-i", "eth0", "-f", "-t", "5", "-T", "1", "-s"])
                .arg(&script),
        )
        .unwrap();
    wait_for("udhcpc bound", Duration::from_secs(20), || {
        read(&log).contains("udhcpc bound")
    });
    let l = read(&log);
    let bound = l
        .lines()
        .find(|x| x.starts_with("udhcpc bound"))
        .unwrap()
        .to_owned();
    let ip: Ipv4Addr = field(&bound, "ip").parse().unwrap();
    let o = ip.octets()[3];
    assert!((100..=150).contains(&o), "{bound}");
    assert_eq!(field(&bound, "mask"), "24"); // busybox gives the prefix length
    assert_eq!(field(&bound, "router"), server.ip.to_string());
    assert_eq!(field(&bound, "dns"), server.ip.to_string());
    assert_eq!(field(&bound, "domain"), "lab.test");
    assert_eq!(field(&bound, "lease"), "3600");
    assert_eq!(field(&bound, "server"), server.ip.to_string());
    // Durable (in the lease journal) before the ACK left; the store's table follows within
    // moments (what `corral machine` reads).
    wait_for("bound in store", Duration::from_secs(2), || {
        stored(&db, ip) == Some(LeaseStatus::Bound)
    });
    let acks = policy.count(DhcpEventKind::Ack, dyn_mac);
    assert_eq!(acks, 1);

    // Renew: unicast REQUEST from the bound address, unicast ACK back.
    let kill = |sig: &str| {
        assert!(
            Command::new("kill")
                .args([sig, &pid.to_string()])
                .status()
                .unwrap()
                .success()
        );
    };
    kill("-USR1");
    wait_for("udhcpc renew", Duration::from_secs(20), || {
        read(&log).contains("udhcpc renew")
    });
    let l = read(&log);
    let renew = l.lines().find(|x| x.starts_with("udhcpc renew")).unwrap();
    assert_eq!(field(renew, "ip"), ip.to_string());
    wait_for("second ack", Duration::from_secs(5), || {
        policy.count(DhcpEventKind::Ack, dyn_mac) == 2
    });

    // Release.
    kill("-USR2");
    wait_for("release event", Duration::from_secs(10), || {
        policy.count(DhcpEventKind::Release, dyn_mac) == 1
    });
    wait_for("released in store", Duration::from_secs(5), || {
        stored(&db, ip) == Some(LeaseStatus::Released)
    });
    lab.kill(pid);
    running.stop();
    // Plain clients never reach the boot policy.
    assert!(policy.queries.lock().unwrap().is_empty());
}

#[test]
fn dhclient_lease_survives_server_restart_then_release() {
    if skip("dhclient_lease_survives_server_restart_then_release") {
        return;
    }
    let lab = Lab::new("dhdcl", 2).unwrap();
    let server = lab.host(0);
    let client = lab.host(1);
    flush(&client.ns);
    let mac = mac_of(&client.ns);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("corral.db");
    let site_dir = dir.path().join("site");
    let cfg = |handle| DhcpConfig {
        mode: Mode::Full,
        interface: "eth0".into(),
        server_ip: server.ip,
        site: handle,
        store: Some(db.clone()),
        port: 67,
    };
    let policy = TestPolicy::new(Boot::NoBootFile);
    let running = Running::start(
        &server.ns,
        cfg(site(&site_dir, server.ip, "full", &[])),
        policy.clone(),
    );
    let log = dir.path().join("dhclient.log");
    let script = client_script(dir.path(), &log);
    let lf = dir.path().join("dhclient.leases");
    let pf = dir.path().join("dhclient.pid");
    let dhclient = |extra: &[&str]| {
        let out = client
            .command("timeout")
            .arg("30")
            .arg("dhclient")
            .args(extra)
            .arg("-sf")
            .arg(&script)
            .arg("-lf")
            .arg(&lf)
            .arg("-pf")
            .arg(&pf)
            .arg("eth0")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "dhclient {extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let stop_daemon = || {
        if let Ok(p) = std::fs::read_to_string(&pf) {
            let _ = Command::new("kill").arg(p.trim()).status();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    dhclient(&["-1"]);
    stop_daemon();
    let l = read(&log);
    let bound = l
        .lines()
        .find(|x| x.contains("dhclient BOUND"))
        .unwrap_or_else(|| panic!("{l}"));
    let ip: Ipv4Addr = field(bound, "ip").parse().unwrap();
    assert_eq!(field(bound, "lease"), "3600");
    assert_eq!(field(bound, "server"), server.ip.to_string());
    wait_for("bound in store", Duration::from_secs(2), || {
        stored(&db, ip) == Some(LeaseStatus::Bound)
    });

    // Restart the server on the same store: the client's INIT-REBOOT request for its address
    // is acknowledged with the same address (the lease was reloaded), not NAKed or ignored.
    running.stop();
    let policy2 = TestPolicy::new(Boot::NoBootFile);
    let running = Running::start(
        &server.ns,
        cfg(site(&site_dir, server.ip, "full", &[])),
        policy2.clone(),
    );
    std::fs::write(&log, "").unwrap();
    dhclient(&["-1"]);
    stop_daemon();
    let l = read(&log);
    let again = l
        .lines()
        .find(|x| x.contains("dhclient REBOOT") || x.contains("dhclient BOUND"))
        .unwrap_or_else(|| panic!("{l}"));
    assert_eq!(field(again, "ip"), ip.to_string(), "{l}");
    assert_eq!(policy2.count(DhcpEventKind::Nak, mac), 0);
    assert_eq!(policy2.count(DhcpEventKind::Ack, mac), 1);

    // Release.
    dhclient(&["-r"]);
    wait_for("release", Duration::from_secs(5), || {
        policy2.count(DhcpEventKind::Release, mac) == 1
    });
    wait_for("released in store", Duration::from_secs(5), || {
        stored(&db, ip) == Some(LeaseStatus::Released)
    });
    running.stop();
}

/// Namespaces built by hand: a server with two interfaces, each to its own client namespace.
struct TwoSegments {
    names: Vec<String>,
}

impl TwoSegments {
    fn new(tag: &str) -> TwoSegments {
        let base = format!("cdh{}{tag}", std::process::id());
        let names: Vec<String> = ["s", "a", "b"]
            .iter()
            .map(|n| format!("{base}{n}"))
            .collect();
        let t = TwoSegments { names };
        let sh = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().unwrap();
            assert!(st.success(), "ip {args:?}");
        };
        let (s, a, b) = (&t.names[0], &t.names[1], &t.names[2]);
        for n in &t.names {
            sh(&["netns", "add", n]);
            sh(&["-n", n, "link", "set", "lo", "up"]);
        }
        sh(&[
            "-n", s, "link", "add", "ifa", "type", "veth", "peer", "name", "eth0", "netns", a,
        ]);
        sh(&[
            "-n", s, "link", "add", "ifb", "type", "veth", "peer", "name", "eth0", "netns", b,
        ]);
        sh(&[
            "-n",
            s,
            "addr",
            "add",
            "10.251.1.1/24",
            "brd",
            "+",
            "dev",
            "ifa",
        ]);
        sh(&[
            "-n",
            s,
            "addr",
            "add",
            "10.251.2.1/24",
            "brd",
            "+",
            "dev",
            "ifb",
        ]);
        for (n, i) in [(s, "ifa"), (s, "ifb"), (a, "eth0"), (b, "eth0")] {
            sh(&["-n", n, "link", "set", i, "up"]);
        }
        t
    }
}

impl Drop for TwoSegments {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip")
                .args(["netns", "pids", n])
                .output()
                .map(|o| {
                    for p in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                        let _ = Command::new("kill").args(["-9", p]).status();
                    }
                });
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

#[test]
fn server_on_interface_a_never_answers_on_b() {
    if skip("server_on_interface_a_never_answers_on_b") {
        return;
    }
    let net = TwoSegments::new("ab");
    let dir = tempfile::tempdir().unwrap();
    let site_dir = dir.path().join("site");
    std::fs::create_dir_all(site_dir.join("machines")).unwrap();
    std::fs::write(
        site_dir.join("site.toml"),
        "[server]\ninterfaces = [\"ifa\"]\n[dhcp]\nmode = \"full\"\n\
         [[dhcp.network]]\ncidr = \"10.251.1.0/24\"\npool = \"10.251.1.100-10.251.1.110\"\n\
         [[dhcp.network]]\ncidr = \"10.251.2.0/24\"\npool = \"10.251.2.100-10.251.2.110\"\n",
    )
    .unwrap();
    let handle = corral_site::SiteHandle::open(&site_dir, Default::default()).unwrap();
    let policy = TestPolicy::new(Boot::NoBootFile);
    let running = Running::start(
        &net.names[0],
        DhcpConfig {
            mode: Mode::Full,
            interface: "ifa".into(),
            server_ip: Ipv4Addr::new(10, 251, 1, 1),
            site: handle,
            store: None,
            port: 67,
        },
        policy.clone(),
    );
    let udhcpc = |ns: &str| {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "timeout",
                "15",
                "busybox",
                "udhcpc",
                "-i",
                "eth0",
                "-n",
                "-q",
                "-f",
                "-t",
                "3",
                "-T",
                "1",
                "-s",
                "/bin/true",
            ])
            .output()
            .unwrap()
    };
    let a = udhcpc(&net.names[1]);
    assert!(
        a.status.success(),
        "client on the served interface gets a lease: {}",
        String::from_utf8_lossy(&a.stderr)
    );
    let b = udhcpc(&net.names[2]);
    assert!(
        !b.status.success(),
        "client on the other interface must get nothing"
    );
    let mac_b = {
        let out = Command::new("ip")
            .args(["-n", &net.names[2], "-o", "link", "show", "eth0"])
            .output()
            .unwrap();
        let s = String::from_utf8_lossy(&out.stdout).to_string();
        let i = s.find("link/ether ").unwrap() + 11;
        s[i..i + 17].parse::<MacAddr>().unwrap()
    };
    assert!(
        policy.events().iter().all(|e| e.mac != Some(mac_b)),
        "the server never even saw B's requests"
    );
    running.stop();
}

#[test]
fn perfdhcp_relayed_exchanges() {
    if skip("perfdhcp_relayed_exchanges") {
        return;
    }
    if Command::new("perfdhcp").arg("-v").output().is_err() {
        panic!("perfdhcp is missing: install package kea-admin (scripts/quickstart does)");
    }
    let lab = Lab::new("dhperf", 2).unwrap();
    let server = lab.host(0);
    let relay = lab.host(1);
    let dir = tempfile::tempdir().unwrap();
    // perfdhcp relays from its own address: add one inside the "relayed" network so that the
    // server picks that network by giaddr.
    let c = net_of(server.ip)[2];
    let giaddr = Ipv4Addr::new(10, 250, c, 1);
    relay
        .ip(&["addr", "add", &format!("{giaddr}/32"), "dev", "eth0"])
        .unwrap();
    server
        .ip(&[
            "route",
            "add",
            &format!("10.250.{c}.0/24"),
            "via",
            &relay.ip.to_string(),
        ])
        .unwrap();
    let policy = TestPolicy::new(Boot::NoBootFile);
    let running = Running::start(
        &server.ns,
        DhcpConfig {
            mode: Mode::Full,
            interface: "eth0".into(),
            server_ip: server.ip,
            site: site(&dir.path().join("site"), server.ip, "full", &[]),
            store: Some(dir.path().join("corral.db")),
            port: 67,
        },
        policy.clone(),
    );
    let out = relay
        .command("timeout")
        .args([
            "30",
            "perfdhcp",
            "-4",
            "-r",
            "100",
            "-R",
            "200",
            "-n",
            "200",
            "-W",
            "2000000",
            "-p",
            "10",
            "-l",
            &giaddr.to_string(),
        ])
        .arg(server.ip.to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("{text}");
    // "sent packets: N" / "received packets: N" for DISCOVER-OFFER and REQUEST-ACK.
    let received: Vec<u64> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("received packets: "))
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let sent: Vec<u64> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("sent packets: "))
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    assert_eq!(
        received.len(),
        2,
        "perfdhcp output:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        sent[0] >= 150 && received[0] == sent[0],
        "all DISCOVERs offered: {text}"
    );
    assert!(
        received[1] == sent[1] && received[1] >= 150,
        "all REQUESTs acked: {text}"
    );
    let acks: Vec<DhcpEvent> = policy
        .events()
        .into_iter()
        .filter(|e| e.kind == DhcpEventKind::Ack)
        .collect();
    assert!(
        acks.iter()
            .all(|e| e.ip.is_some_and(|ip| ip.octets()[..3] == [10, 250, c])),
        "relayed clients get addresses of the relay's network"
    );
    running.stop();
}

fn encode(m: &Message) -> Vec<u8> {
    let mut b = Vec::new();
    m.encode(&mut Encoder::new(&mut b)).unwrap();
    b
}

fn pxe_msg(ty: MessageType, mac: MacAddr, arch: u16) -> Message {
    let mut m = Message::new_with_id(
        0xC0FFEE,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac.octets(),
    );
    m.set_flags(Flags::new(0).set_broadcast());
    m.opts_mut().insert(DhcpOption::MessageType(ty));
    m.opts_mut().insert(DhcpOption::ClassIdentifier(
        format!("PXEClient:Arch:{arch:05}:UNDI:003016").into_bytes(),
    ));
    m.opts_mut()
        .insert(DhcpOption::ClientSystemArchitecture(arch.into()));
    m.opts_mut()
        .insert(DhcpOption::ClientNetworkInterface(1, 3, 16));
    m.opts_mut().insert(DhcpOption::ClientMachineIdentifier(
        [vec![0], vec![7; 16]].concat(),
    ));
    m
}

/// Sends `req` from `ns` (port 68, on eth0) to `dest` and returns the first reply with the
/// same xid, or `None` after `wait`.
fn exchange(ns: &str, req: &Message, dest: SocketAddrV4, wait: Duration) -> Option<Message> {
    let ns = ns.to_owned();
    let bytes = encode(req);
    let xid = req.xid();
    std::thread::spawn(move || {
        enter_netns(&ns);
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.set_broadcast(true).unwrap();
        s.bind_device(Some(b"eth0")).unwrap();
        s.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68).into())
            .unwrap();
        let s: UdpSocket = s.into();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 1500];
        let mut next_send = Instant::now();
        while Instant::now() < deadline {
            if Instant::now() >= next_send {
                s.send_to(&bytes, dest).unwrap();
                next_send = Instant::now() + Duration::from_secs(1);
            }
            if let Ok((n, _)) = s.recv_from(&mut buf)
                && let Ok(m) = Message::decode(&mut Decoder::new(&buf[..n]))
                && m.xid() == xid
            {
                return Some(m);
            }
        }
        None
    })
    .join()
    .unwrap()
}

fn file(m: &Message) -> String {
    m.fname_str()
        .and_then(Result::ok)
        .map(|s| s.trim_end_matches('\0').to_owned())
        .unwrap_or_default()
}

#[test]
fn proxy_mode_pxe_bios_and_uefi_with_port_4011() {
    if skip("proxy_mode_pxe_bios_and_uefi_with_port_4011") {
        return;
    }
    let lab = Lab::new("dhpxe", 2).unwrap();
    let server = lab.host(0);
    let client = lab.host(1);
    let dir = tempfile::tempdir().unwrap();
    let policy = TestPolicy::new(Boot::Tftp {
        filename: "undionly.kpxe".into(),
    });
    let running = Running::start(
        &server.ns,
        DhcpConfig {
            mode: Mode::Proxy,
            interface: "eth0".into(),
            server_ip: server.ip,
            site: site(&dir.path().join("site"), server.ip, "proxy", &[]),
            store: None,
            port: 67,
        },
        policy.clone(),
    );
    let bmac: MacAddr = "52:54:00:aa:00:01".parse().unwrap();
    let umac: MacAddr = "52:54:00:aa:00:02".parse().unwrap();
    let bcast = SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);

    // BIOS: the proxy offer carries the boot file, next-server, PXEClient and option 43.
    let offer = exchange(
        &client.ns,
        &pxe_msg(MessageType::Discover, bmac, 0),
        bcast,
        Duration::from_secs(5),
    )
    .expect("BIOS proxy offer");
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(offer.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(offer.siaddr(), server.ip);
    assert_eq!(file(&offer), "undionly.kpxe");
    assert_eq!(
        offer.opts().get(OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(server.ip))
    );
    assert_eq!(
        offer.opts().get(OptionCode::ClassIdentifier),
        Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec()))
    );
    assert!(offer.opts().get(OptionCode::VendorExtensions).is_some());
    assert!(
        offer
            .opts()
            .get(OptionCode::ClientMachineIdentifier)
            .is_some()
    );
    assert!(offer.opts().get(OptionCode::AddressLeaseTime).is_none());

    // UEFI: no boot file on 67 ...
    let offer = exchange(
        &client.ns,
        &pxe_msg(MessageType::Discover, umac, 7),
        bcast,
        Duration::from_secs(5),
    )
    .expect("UEFI proxy offer");
    assert_eq!(
        offer.opts().get(OptionCode::ClassIdentifier),
        Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec()))
    );
    assert_eq!(file(&offer), "");
    // ... so it asks on 4011 (unicast, from its address) and gets the file there.
    let mut req = pxe_msg(MessageType::Request, umac, 7);
    req.set_ciaddr(client.ip);
    req.set_flags(Flags::new(0));
    let ack = exchange(
        &client.ns,
        &req,
        SocketAddrV4::new(server.ip, 4011),
        Duration::from_secs(5),
    )
    .expect("4011 ACK");
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(file(&ack), "undionly.kpxe");
    assert_eq!(ack.siaddr(), server.ip);

    // A plain DHCP client gets nothing from a proxy.
    let mut plain = Message::new_with_id(
        7,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &[2, 0, 0, 0, 0, 9],
    );
    plain
        .opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Discover));
    assert!(exchange(&client.ns, &plain, bcast, Duration::from_millis(1500)).is_none());

    let q = policy.queries.lock().unwrap().clone();
    assert!(
        q.iter()
            .all(|q| q.proxy && q.client.firmware == Firmware::Pxe)
    );
    assert!(
        q.iter()
            .any(|q| q.client.arch == Some(corral_dhcp::Arch::UefiX64) && q.ip == Some(client.ip))
    );
    let ev = policy.events();
    assert!(
        ev.iter()
            .any(|e| e.kind == DhcpEventKind::ProxyOffer && e.mac == Some(bmac))
    );
    assert!(
        ev.iter()
            .any(|e| e.kind == DhcpEventKind::ProxyAck && e.mac == Some(umac))
    );
    running.stop();
}

#[test]
fn full_mode_pxe_offer_carries_boot_file() {
    if skip("full_mode_pxe_offer_carries_boot_file") {
        return;
    }
    let lab = Lab::new("dhfpx", 2).unwrap();
    let server = lab.host(0);
    let client = lab.host(1);
    let dir = tempfile::tempdir().unwrap();
    let policy = TestPolicy::new(Boot::Tftp {
        filename: "undionly.kpxe".into(),
    });
    let running = Running::start(
        &server.ns,
        DhcpConfig {
            mode: Mode::Full,
            interface: "eth0".into(),
            server_ip: server.ip,
            site: site(&dir.path().join("site"), server.ip, "full", &[]),
            store: None,
            port: 67,
        },
        policy.clone(),
    );
    let mac: MacAddr = "52:54:00:bb:00:01".parse().unwrap();
    let offer = exchange(
        &client.ns,
        &pxe_msg(MessageType::Discover, mac, 0),
        SocketAddrV4::new(Ipv4Addr::BROADCAST, 67),
        Duration::from_secs(5),
    )
    .expect("offer");
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    assert!((100..=150).contains(&offer.yiaddr().octets()[3]));
    assert_eq!(offer.siaddr(), server.ip);
    assert_eq!(file(&offer), "undionly.kpxe");
    let q = policy.queries.lock().unwrap().clone();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].ip, Some(offer.yiaddr()));
    assert!(!q[0].proxy);
    running.stop();
}

/// `serve` runs its packet loop on a thread of its own; dropping the `serve` future (here by
/// a timeout, as a caller's `select!` would) stops that thread too. Seen through the metrics
/// registry: a service is listed while it runs (`corral_dhcp::metrics::prometheus_text`,
/// labelled with its interface) and falls out once its loop has ended.
#[test]
fn dropping_serve_stops_its_packet_thread() {
    if skip("dropping_serve_stops_its_packet_thread") {
        return;
    }
    let net = TwoSegments::new("dr");
    // An interface name no other test uses, so that the registry shows this service alone.
    let st = Command::new("ip")
        .args(["-n", &net.names[0], "link", "set", "ifa", "name", "ifdrop"])
        .status()
        .unwrap();
    assert!(st.success());
    let label = "interface=\"ifdrop\"";
    let dir = tempfile::tempdir().unwrap();
    let site_dir = dir.path().join("site");
    std::fs::create_dir_all(site_dir.join("machines")).unwrap();
    std::fs::write(
        site_dir.join("site.toml"),
        "[server]\ninterfaces = [\"ifdrop\"]\n[dhcp]\nmode = \"full\"\n\
         [[dhcp.network]]\ncidr = \"10.251.1.0/24\"\npool = \"10.251.1.100-10.251.1.110\"\n",
    )
    .unwrap();
    let config = DhcpConfig {
        mode: Mode::Full,
        interface: "ifdrop".into(),
        server_ip: Ipv4Addr::new(10, 251, 1, 1),
        site: corral_site::SiteHandle::open(&site_dir, Default::default()).unwrap(),
        store: Some(dir.path().join("leases.db")),
        port: 67,
    };
    let policy = TestPolicy::new(Boot::NoBootFile);
    let ns = net.names[0].clone();
    let listed_while_running = std::thread::spawn(move || {
        enter_netns(&ns);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let serve = corral_dhcp::serve(config, policy, CancellationToken::new());
            let watch = async {
                tokio::time::sleep(Duration::from_millis(500)).await;
                corral_dhcp::metrics::prometheus_text().contains(label)
            };
            tokio::select! {
                r = serve => panic!("serve returned on its own: {r:?}"),
                listed = watch => listed,
            }
            // `serve` is dropped here, its token never cancelled.
        })
    })
    .join()
    .unwrap();
    assert!(listed_while_running, "the running service is listed");
    wait_for(
        "the dropped service to stop",
        Duration::from_secs(5),
        || !corral_dhcp::metrics::prometheus_text().contains(label),
    );
}
