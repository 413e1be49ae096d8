//! The lab really isolates, connects, drops and cleans up. Runs real `ip`, `iptables-legacy`
//! and `tc`; the datagram traffic comes from this test binary re-executed inside a host
//! namespace (`role` below), so no other tool is needed.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

use corral_testkit::{Lab, require_root};

const ROLE: &str = "CORRAL_TESTKIT_ROLE";

/// Re-executes this test binary as a datagram sender or receiver inside `host`.
fn role(host: &corral_testkit::Host, role: &str, arg: &str) -> Command {
    let mut c = host.command(std::env::current_exe().unwrap());
    c.args(["--exact", "role_entry", "--nocapture", "--test-threads=1"])
        .env(ROLE, format!("{role}:{arg}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Entry point of the re-executed binary; a no-op in a normal test run.
#[test]
fn role_entry() {
    let Ok(spec) = std::env::var(ROLE) else {
        return;
    };
    let (role, arg) = spec.split_once(':').unwrap();
    match role {
        // recv:GROUP:PORT — count datagrams for 1.5 s after the first (or 3 s of silence).
        "recv" => {
            let (group, port) = arg.rsplit_once(':').unwrap();
            let port: u16 = port.parse().unwrap();
            let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).unwrap();
            let group: Ipv4Addr = group.parse().unwrap();
            if group.is_multicast() {
                sock.join_multicast_v4(&group, &Ipv4Addr::UNSPECIFIED)
                    .unwrap();
            }
            sock.set_read_timeout(Some(Duration::from_millis(3000)))
                .unwrap();
            println!("READY");
            let mut n = 0u32;
            let mut buf = [0u8; 2048];
            let mut deadline: Option<std::time::Instant> = None;
            while let Ok(len) = sock.recv(&mut buf) {
                assert_eq!(&buf[..len], b"corral-testkit");
                n += 1;
                let d = *deadline
                    .get_or_insert_with(|| std::time::Instant::now() + Duration::from_millis(1500));
                sock.set_read_timeout(Some(
                    d.saturating_duration_since(std::time::Instant::now())
                        .max(Duration::from_millis(1)),
                ))
                .unwrap();
                if std::time::Instant::now() >= d {
                    break;
                }
            }
            println!("COUNT {n}");
        }
        // send:DEST:PORT:N — send N datagrams, paced.
        "send" => {
            let mut it = arg.split(':');
            let dest: Ipv4Addr = it.next().unwrap().parse().unwrap();
            let port: u16 = it.next().unwrap().parse().unwrap();
            let n: u32 = it.next().unwrap().parse().unwrap();
            let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
            sock.set_multicast_ttl_v4(1).unwrap();
            for _ in 0..n {
                sock.send_to(b"corral-testkit", SocketAddrV4::new(dest, port))
                    .unwrap();
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        other => panic!("unknown role {other}"),
    }
}

/// Runs receivers on `rx` hosts and one sender on host 0; returns each receiver's count.
fn exchange(lab: &Lab, rx: &[usize], dest: Ipv4Addr, port: u16, n: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    for &i in rx {
        let pid = lab
            .spawn(&mut role(lab.host(i), "recv", &format!("{dest}:{port}")))
            .unwrap();
        pids.push(pid);
    }
    std::thread::sleep(Duration::from_millis(500)); // receivers bind and join
    let out = role(lab.host(0), "send", &format!("{dest}:{port}:{n}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sender failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    pids.into_iter()
        .map(|pid| {
            let out = lab
                .wait(pid, Duration::from_secs(10))
                .expect("receiver exits");
            let text = String::from_utf8_lossy(&out.stdout);
            text.lines()
                .find_map(|l| l.strip_prefix("COUNT "))
                .unwrap_or_else(|| panic!("no count from receiver: {text}"))
                .trim()
                .parse()
                .unwrap()
        })
        .collect()
}

fn namespaces() -> String {
    String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned()
}

#[test]
fn hosts_reach_each_other_and_are_removed_on_drop() {
    if !require_root("hosts_reach_each_other_and_are_removed_on_drop") {
        return;
    }
    let lab = Lab::new("ping", 3).unwrap();
    let names: Vec<String> = lab.hosts().iter().map(|h| h.ns.clone()).collect();
    let ping = lab
        .host(2)
        .command("ping")
        .args(["-c1", "-W2", &lab.host(0).ip.to_string()])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );
    // The root namespace cannot reach the lab: it is isolated.
    assert!(!names.is_empty() && namespaces().contains(&names[0]));
    drop(lab);
    let after = namespaces();
    for n in names {
        assert!(!after.contains(&n), "{n} still exists after drop");
    }
}

#[test]
fn multicast_reaches_every_host_unless_blocked() {
    if !require_root("multicast_reaches_every_host_unless_blocked") {
        return;
    }
    let lab = Lab::new("mcast", 4).unwrap();
    lab.block_multicast(3).unwrap();
    let counts = exchange(&lab, &[1, 2, 3], Ipv4Addr::new(239, 77, 0, 1), 9100, 50);
    assert_eq!(counts[0], 50, "host 1 gets every datagram");
    assert_eq!(counts[1], 50, "host 2 gets every datagram");
    assert_eq!(counts[2], 0, "host 3 has multicast blocked");
}

#[test]
fn loss_drops_about_the_asked_fraction() {
    if !require_root("loss_drops_about_the_asked_fraction") {
        return;
    }
    let lab = Lab::new("loss", 2).unwrap();
    lab.set_loss(1, 0.5).unwrap();
    let counts = exchange(&lab, &[1], lab.host(1).ip, 9101, 400);
    // Binomial(400, 0.5): mean 200, sd 10; these bounds fail only if loss is not applied.
    assert!((120..=280).contains(&counts[0]), "got {} of 400", counts[0]);
}

#[test]
fn rate_limit_and_mtu_are_applied() {
    if !require_root("rate_limit_and_mtu_are_applied") {
        return;
    }
    let lab = Lab::new("rate", 2).unwrap();
    lab.set_rate(1, "100mbit").unwrap();
    lab.set_mtu(9000).unwrap();
    let q = Command::new("ip")
        .args([
            "netns",
            "exec",
            lab.hub(),
            "tc",
            "qdisc",
            "show",
            "dev",
            "vh1",
        ])
        .output()
        .unwrap();
    let q = String::from_utf8_lossy(&q.stdout);
    assert!(q.contains("tbf") && q.contains("100Mbit"), "{q}");
    let l = lab
        .host(0)
        .command("ip")
        .args(["link", "show", "eth0"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&l.stdout).contains("mtu 9000"));
    // A big datagram crosses at MTU 9000 without fragmentation.
    let ping = lab
        .host(0)
        .command("ping")
        .args([
            "-c1",
            "-W2",
            "-M",
            "do",
            "-s",
            "8900",
            &lab.host(1).ip.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );
}

#[test]
fn cleanup_happens_on_panic_too() {
    if !require_root("cleanup_happens_on_panic_too") {
        return;
    }
    let names = std::thread::spawn(|| {
        let lab = Lab::new("panic", 1).unwrap();
        let names = vec![lab.host(0).ns.clone(), lab.hub().to_owned()];
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _lab = lab;
            panic!("test body fails");
        }))
        .unwrap_err();
        names
    })
    .join()
    .unwrap();
    let after = namespaces();
    for n in names {
        assert!(!after.contains(&n), "{n} survived a panic");
    }
}
