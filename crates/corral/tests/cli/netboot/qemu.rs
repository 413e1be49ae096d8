//! Real firmware against `corral serve`: QEMU clients (TCG) on taps in a lab's hub namespace.
//!
//! One lab per DHCP mode, one `corral serve` per lab, every client in its own thread so the
//! slow TCG boots overlap. Each client boots twice without restarting QEMU: the first boot
//! fetches its per-machine script and a payload, reports done and reboots; the second boot
//! must be answered "boot from disk" on its path. Checked from the serial logs and from
//! corral's events in the store (same session across DHCP, TFTP and HTTP).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use corral_store::StoredEvent;
use corral_testkit::Lab;

use super::{events, write_site};

/// The client's firmware and route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fw {
    /// SeaBIOS with QEMU's iPXE ROM on an e1000: DHCP with user class iPXE → script URL.
    BiosIpxe,
    /// OVMF's own PXE on virtio-net → TFTP snponly.efi → iPXE → script.
    UefiPxe,
    /// OVMF's HTTP Boot (PXE disabled) → snponly.efi over HTTP → iPXE → script.
    UefiHttp,
}

pub(crate) const TEMPLATE: &str = "#!ipxe
echo MARK-SCRIPT {{ hostname }} {{ state }} {{ session }}
imgfetch --name payload {{ base_url }}/boot/payload.bin || goto fail
imgstat payload
echo MARK-PAYLOAD-FETCHED
imgfetch --name done {{ done_url }} || goto fail
echo MARK-DONE-REPORTED
reboot
:fail
echo MARK-FAIL
";

pub(crate) struct Vm {
    pub(crate) name: String,
    pub(crate) mac: String,
    pub(crate) fw: Fw,
    pub(crate) serial: PathBuf,
}

fn sh(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(st.success(), "{args:?} failed");
}

/// Starts QEMU for `fw` on a new tap `tap` in the lab's hub namespace.
pub(crate) fn start_vm(lab: &Lab, dir: &Path, name: &str, fw: Fw, mac: &str, tap: &str) -> Vm {
    let hub = lab.hub();
    sh(&["ip", "-n", hub, "tuntap", "add", "dev", tap, "mode", "tap"]);
    sh(&["ip", "-n", hub, "link", "set", tap, "master", "br0", "up"]);
    let serial = dir.join(format!("{name}.serial"));
    let netdev = format!("tap,id=n0,ifname={tap},script=no,downscript=no");
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        hub,
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-nodefaults",
    ])
    .args(["-vga", "none", "-display", "none", "-netdev", &netdev])
    .arg("-serial")
    .arg(format!("file:{}", serial.display()));
    match fw {
        Fw::BiosIpxe => {
            c.args(["-m", "256", "-device", "sga", "-boot", "n"])
                .args(["-device", &format!("e1000,netdev=n0,mac={mac}")]);
        }
        Fw::UefiPxe | Fw::UefiHttp => {
            let vars = dir.join(format!("{name}.vars.fd"));
            fs_err::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).unwrap();
            c.args(["-m", "512", "-machine", "q35"])
                .args([
                    "-drive",
                    "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
                ])
                .arg("-drive")
                .arg(format!("if=pflash,format=raw,file={}", vars.display()))
                .args([
                    "-device",
                    &format!("virtio-net-pci,netdev=n0,mac={mac},romfile="),
                ]);
            if fw == Fw::UefiHttp {
                c.args(["-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=n"]);
                c.args(["-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=n"]);
            }
        }
    }
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // The lab kills QEMU when it is dropped (Debian's iPXE has no poweroff).
    lab.spawn(&mut c).unwrap();
    Vm {
        name: name.into(),
        mac: mac.into(),
        fw,
        serial,
    }
}

pub(crate) fn serial(vm: &Vm) -> String {
    fs_err::read(&vm.serial)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Events of one machine.
pub(crate) fn machine_events(db: &Path, mac: &str) -> Vec<StoredEvent> {
    events(db)
        .into_iter()
        .filter(|e| e.event.mac.map(|m| m.to_string()).as_deref() == Some(mac))
        .collect()
}

fn kind(e: &StoredEvent) -> (&str, &str) {
    (e.event.source.as_str(), e.event.kind.as_str())
}

/// What the first and second boot of `vm` must show; polls until satisfied or `timeout`.
/// Returns a failure description, or None when everything was seen.
pub(crate) fn check_vm(vm: &Vm, db: &Path, uefi_binary: &str, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match verify(vm, db, uefi_binary) {
            Ok(()) => return None,
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Some(format!(
        "{} ({:?}, {}): {last}\n--- serial (tail) ---\n{}\n--- events ---\n{}",
        vm.name,
        vm.fw,
        vm.mac,
        tail(&serial(vm), 2500),
        machine_events(db, &vm.mac)
            .iter()
            .map(|e| format!(
                "{} {} {} {} {}",
                e.event.session.map(|s| s.to_string()).unwrap_or_default(),
                e.event.source,
                e.event.kind,
                e.event.outcome,
                e.event.reason
            ))
            .collect::<Vec<_>>()
            .join("\n")
    ))
}

fn tail(s: &str, n: usize) -> &str {
    let mut i = s.len().saturating_sub(n);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

fn verify(vm: &Vm, db: &Path, uefi_binary: &str) -> Result<(), String> {
    let log = serial(vm);
    for m in ["MARK-SCRIPT", "MARK-PAYLOAD-FETCHED", "MARK-DONE-REPORTED"] {
        if !log.contains(m) {
            return Err(format!("serial has no {m}"));
        }
    }
    if log.contains("MARK-FAIL") {
        return Err("the script reported MARK-FAIL".into());
    }
    let ev = machine_events(db, &vm.mac);
    // First boot: the script event and everything of its session.
    let script = ev
        .iter()
        .find(|e| {
            kind(e) == ("http", "script") && e.event.reason.contains("install")
                || kind(e) == ("http", "script") && e.event.reason.contains("discovery")
        })
        .ok_or("no http script event for the install boot")?;
    let s1 = script.event.session.ok_or("script event without session")?;
    let in_s1: Vec<&StoredEvent> = ev.iter().filter(|e| e.event.session == Some(s1)).collect();
    let has = |src: &str, k: &str, pred: &dyn Fn(&StoredEvent) -> bool| {
        in_s1.iter().any(|e| kind(e) == (src, k) && pred(e))
    };
    if !has("http", "file", &|e| {
        e.event.reason.contains("/boot/payload.bin: 300000 bytes")
    }) {
        return Err(format!(
            "session {s1}: no http file event for the whole payload"
        ));
    }
    if !has("http", "done", &|e| e.event.outcome.as_str() == "ok") {
        return Err(format!("session {s1}: no successful done callback"));
    }
    match vm.fw {
        Fw::BiosIpxe => {}
        Fw::UefiPxe => {
            if !has("dhcp", "boot", &|e| {
                e.event.details["answer"]["tftp"] == uefi_binary
            }) {
                return Err(format!(
                    "session {s1}: no DHCP answer with TFTP {uefi_binary}"
                ));
            }
            if !has("tftp", "read", &|e| {
                e.event.reason.contains(uefi_binary) && e.event.outcome.as_str() == "ok"
            }) {
                return Err(format!("session {s1}: no TFTP read of {uefi_binary}"));
            }
        }
        Fw::UefiHttp => {
            if !has("dhcp", "boot", &|e| {
                e.event.details["answer"]["http"]
                    .as_str()
                    .is_some_and(|u| u.ends_with(&format!("/ipxe-bin/{uefi_binary}")))
            }) {
                return Err(format!(
                    "session {s1}: no DHCP answer with the HTTP URL of {uefi_binary}"
                ));
            }
            if !has("http", "file", &|e| {
                e.event
                    .reason
                    .contains(&format!("GET /ipxe-bin/{uefi_binary}"))
            }) {
                return Err(format!("session {s1}: no HTTP GET of {uefi_binary}"));
            }
        }
    }
    // Second boot: a later session answered "boot from disk".
    let later: Vec<&StoredEvent> = ev
        .iter()
        .filter(|e| e.id > script.id && e.event.session.is_some_and(|s| s != s1))
        .collect();
    let local = match vm.fw {
        Fw::BiosIpxe => later
            .iter()
            .any(|e| kind(e) == ("http", "script") && e.event.details["state"] == "local"),
        Fw::UefiPxe | Fw::UefiHttp => later
            .iter()
            .any(|e| kind(e) == ("dhcp", "boot") && e.event.details["answer"] == "local"),
    };
    if !local {
        return Err("no local-boot answer in a later session".into());
    }
    // ... and never an install again.
    if later.iter().any(|e| {
        kind(e) == ("tftp", "read") && e.event.outcome.as_str() == "ok"
            || kind(e) == ("http", "file") && e.event.reason.contains("payload")
    }) {
        return Err("the machine was handed its installer again after done".into());
    }
    if vm.fw == Fw::BiosIpxe && !log.contains("is local: booting from local disk") {
        return Err("serial has no local-boot message".into());
    }
    Ok(())
}

/// Site for a lab: `mode` DHCP on eth0, network = the lab's /24, corral at host 0.
pub(crate) fn lab_site(dir: &Path, lab: &Lab, mode: &str, machines: &[(&str, &str)]) -> Ipv4Addr {
    let server = lab.host(0).ip;
    let o = server.octets();
    let net = format!("{}.{}.{}", o[0], o[1], o[2]);
    let site = format!(
        "[server]\nname = \"qemu\"\ninterfaces = [\"eth0\"]\nadvertise = \"{server}\"\n\
         [dhcp]\nmode = \"{mode}\"\n[[dhcp.network]]\ncidr = \"{net}.0/24\"\npool = \"{net}.100-{net}.150\"\nlease = \"1h\"\n\
         [discovery]\nprofile = \"discover\"\nenrol = true\n"
    );
    write_site(dir, &site, TEMPLATE);
    for (name, mac) in machines {
        fs_err::write(
            dir.join(format!("machines/{name}.toml")),
            format!("mac = \"{mac}\"\nprofile = \"test\"\n"),
        )
        .unwrap();
    }
    server
}

/// Starts `corral serve` in host 0 of `lab`. Returns its pid (tracked by the lab).
pub(crate) fn start_corral(lab: &Lab, site: &Path, extra: &[&str]) -> u32 {
    let log = fs_err::File::create(site.join("serve.log"))
        .unwrap()
        .into_file();
    let mut c = lab.host(0).command(env!("CARGO_BIN_EXE_corral"));
    c.args(["serve", "--site"])
        .arg(site)
        .args(extra)
        .env("RUST_LOG", "info,corral_dhcp=debug")
        .stdout(Stdio::null())
        .stderr(log);
    let pid = lab.spawn(&mut c).unwrap();
    // Wait for HTTP to answer inside the namespace.
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let ok = lab
            .host(0)
            .command("curl")
            .args(["-sf", "-o", "/dev/null", "http://127.0.0.1:8080/healthz"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return pid;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "corral serve did not start:\n{}",
        fs_err::read_to_string(site.join("serve.log")).unwrap_or_default()
    );
}

/// dnsmasq in host 1 as the site's own DHCP server, address only (`boot_url`: also hand iPXE
/// this URL, as an operator would in "off" mode).
pub(crate) fn start_dnsmasq(lab: &Lab, dir: &Path, boot_url: Option<&str>) -> u32 {
    let o = lab.host(1).ip.octets();
    let range = format!(
        "{}.{}.{}.160,{}.{}.{}.200,1h",
        o[0], o[1], o[2], o[0], o[1], o[2]
    );
    let mut c = lab.host(1).command("dnsmasq");
    c.args([
        "--no-daemon",
        "--port=0",
        "--interface=eth0",
        "--bind-interfaces",
        "--no-ping",
        "--log-dhcp",
        "--conf-file=/dev/null",
    ])
    .arg(format!("--dhcp-range={range}"))
    .arg(format!(
        "--dhcp-leasefile={}",
        dir.join("dnsmasq.leases").display()
    ))
    .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()));
    if let Some(url) = boot_url {
        c.args([
            "--dhcp-userclass=set:ipxe,iPXE",
            &format!("--dhcp-boot=tag:ipxe,{url}"),
        ]);
    }
    let log = fs_err::File::create(dir.join("dnsmasq.log"))
        .unwrap()
        .into_file();
    c.stdout(Stdio::null()).stderr(log);
    lab.spawn(&mut c).unwrap()
}

/// Runs `vms` (already started) to completion in parallel threads; panics with every failure.
pub(crate) fn check_all(vms: &[(&Vm, &Path)], uefi_binary: &str, timeout: Duration) {
    let failures: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = vms
            .iter()
            .map(|&(vm, db)| s.spawn(move || check_vm(vm, db, uefi_binary, timeout)))
            .collect();
        hs.into_iter().filter_map(|h| h.join().unwrap()).collect()
    });
    assert!(
        failures.is_empty(),
        "{} of {} firmware clients failed:\n{}",
        failures.len(),
        vms.len(),
        failures.join("\n\n")
    );
}

/// "off" mode: the site's own DHCP server (dnsmasq) sends iPXE to corral's script URL;
/// corral serves scripts, payload and callback, and the second boot gets the local script.
#[test]
fn qemu_bios_ipxe_with_dhcp_off() {
    if !corral_testkit::require_root("qemu_bios_ipxe_with_dhcp_off") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("site");
    let lab = Lab::new("nboff", 2).unwrap();
    let mac = "52:54:00:b0:00:01";
    let server = lab_site(&site, &lab, "off", &[("bios1", mac)]);
    start_corral(&lab, &site, &["--tftp-port", "0"]);
    let url = format!("http://{server}:8080/ipxe/${{mac}}");
    start_dnsmasq(&lab, dir.path(), Some(&url));
    let vm = start_vm(&lab, dir.path(), "bios1", Fw::BiosIpxe, mac, "tapoff0");
    let db = site.join("state/corral.db");
    check_all(&[(&vm, &db)], "snponly.efi", Duration::from_secs(240));
}

/// Full DHCP with real firmware, in parallel: BIOS (QEMU's iPXE ROM → script URL), UEFI PXE
/// (OVMF → TFTP snponly.efi → iPXE → script) and UEFI HTTP Boot (OVMF → snponly.efi over
/// HTTP → iPXE → script). Each client installs once
/// (script, payload, done callback), reboots, and is answered "boot from disk".
#[test]
fn qemu_firmware_full_dhcp() {
    if !corral_testkit::require_root("qemu_firmware_full_dhcp") {
        return;
    }
    run_lab(
        "nbfull",
        "full",
        &[
            ("fbios", "52:54:00:f0:00:01", Fw::BiosIpxe),
            ("fuefi", "52:54:00:f0:00:02", Fw::UefiPxe),
            ("fhttp", "52:54:00:f0:00:03", Fw::UefiHttp),
        ],
    );
}

/// ProxyDHCP beside dnsmasq (which hands out the addresses from another namespace), for BIOS
/// and for UEFI with its port 4011 request.
#[test]
fn qemu_firmware_proxy_dhcp() {
    if !corral_testkit::require_root("qemu_firmware_proxy_dhcp") {
        return;
    }
    run_lab(
        "nbproxy",
        "proxy",
        &[
            ("pbios", "52:54:00:e0:00:01", Fw::BiosIpxe),
            ("puefi", "52:54:00:e0:00:02", Fw::UefiPxe),
        ],
    );
}

/// One lab in `mode` (proxy: with dnsmasq owning the addresses), one `corral serve`, `clients`
/// booting in parallel; every check of [`check_vm`], plus who leased the addresses.
fn run_lab(tag: &str, mode: &str, clients: &[(&str, &str, Fw)]) {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::new(tag, if mode == "proxy" { 2 } else { 1 }).unwrap();
    let site = dir.path().join("site");
    let machines: Vec<(&str, &str)> = clients.iter().map(|(n, m, _)| (*n, *m)).collect();
    lab_site(&site, &lab, mode, &machines);
    if mode == "proxy" {
        start_dnsmasq(&lab, dir.path(), None);
    }
    start_corral(&lab, &site, &[]);
    let vms: Vec<Vm> = clients
        .iter()
        .enumerate()
        .map(|(i, (name, mac, fw))| {
            start_vm(&lab, dir.path(), name, *fw, mac, &format!("tap{tag}{i}"))
        })
        .collect();
    let db = site.join("state/corral.db");
    let checks: Vec<(&Vm, &Path)> = vms.iter().map(|vm| (vm, db.as_path())).collect();
    check_all(&checks, "snponly.efi", Duration::from_secs(420));
    let ev = events(&db);
    if mode == "proxy" {
        for (name, mac, fw) in clients {
            let mine: Vec<&StoredEvent> = ev
                .iter()
                .filter(|e| e.event.mac.map(|m| m.to_string()).as_deref() == Some(*mac))
                .collect();
            let boots = |k: &str, what: &str| {
                mine.iter().any(|e| {
                    kind(e) == ("dhcp", k)
                        && e.event.details["boot"]
                            .as_str()
                            .is_some_and(|b| b.contains(what))
                })
            };
            // iPXE (the BIOS ROM, and snponly.efi after UEFI PXE) is sent its script URL in
            // corral's proxy offer on port 67 (issue #4: it used to ignore it).
            assert!(
                boots("proxy-offer", "/ipxe/"),
                "{name}: no proxy offer with the script URL"
            );
            // OVMF's own PXE takes the port 4011 route for its TFTP boot file.
            if *fw == Fw::UefiPxe {
                assert!(
                    boots("proxy-ack", "snponly.efi"),
                    "{name}: no port 4011 ACK with snponly.efi"
                );
            }
        }
    }
    // The DHCP service's metrics on the HTTP server: full mode counted the clients' requests
    // and timed their durable ACKs.
    let out = lab
        .host(0)
        .command("curl")
        .args(["-sf", "http://127.0.0.1:8080/metrics"])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&out.stdout);
    let series = |prefix: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert!(
        metrics.contains("# TYPE corral_dhcp_reply_seconds histogram"),
        "{metrics}"
    );
    if mode == "full" {
        assert!(
            series("corral_dhcp_requests_received_total{") >= machines.len() as u64 * 2,
            "{metrics}"
        );
        assert!(
            series("corral_dhcp_reply_seconds_count{interface=\"eth0\",path=\"durable\"}")
                >= machines.len() as u64,
            "{metrics}"
        );
    }
    for (_, mac) in &machines {
        let acked = ev.iter().any(|e| {
            e.event.kind.as_str() == "ack"
                && e.event.mac.map(|m| m.to_string()).as_deref() == Some(*mac)
        });
        // Full mode: corral leased the address; proxy mode: dnsmasq did, corral never.
        assert_eq!(
            acked,
            mode == "full",
            "{mac}: DHCP ack by corral in {mode} mode"
        );
    }
}
