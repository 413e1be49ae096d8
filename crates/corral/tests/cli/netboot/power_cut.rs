//! DHCP leases survive a power cut: `corral serve` runs inside a Linux VM (QEMU, TCG) with its
//! store on a virtio disk, Kea's `perfdhcp` (a relay agent, a real client nobody here wrote)
//! leases addresses from it, and QEMU is killed with SIGKILL mid-run: the guest's RAM and page
//! cache are gone, as in a power cut. The disk is then mounted on the host (the file system
//! replays its own journal, as at the next boot), `corral serve` starts on what it holds (and
//! replays the lease journal), and every address perfdhcp saw ACKed must be bound in the store.
//!
//! A control in the same VM shows the cut is a real one: a shell loop appends a counter to a
//! file without fsync and prints each value on the serial console; the last values printed
//! before the cut must be missing from the file on the recovered disk. A server that ACKed
//! before its lease write reached the disk would lose leases the same way.
//!
//! What is not modelled: the disk's own volatile write cache (QEMU hands every guest write to the
//! host file at once), so this shows that an ACK leaves only after the lease left the guest's
//! memory for the device, with `O_DSYNC` asking the device to make it durable.
//!
//! The VM: Debian's kernel (unpacked by `scripts/quickstart install-deps` into
//! `/var/cache/corral-test/linux`, or `$CORRAL_TEST_LINUX`), a busybox initramfs with the
//! virtio and ext4 modules, and the test's own `corral` binary with its libraries on the disk.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use corral_store::{LeaseStatus, Store};
use corral_testkit::Lab;

/// Runs a command, panicking with its output if it fails.
fn run(c: &mut Command) -> String {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("{c:?} did not start: {e}"));
    assert!(
        out.status.success(),
        "{c:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// The unpacked Debian kernel: (its root, version).
fn lab_kernel() -> (PathBuf, String) {
    let root = std::env::var_os("CORRAL_TEST_LINUX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/corral-test/linux"));
    let kver = fs_err::read_dir(root.join("lib/modules"))
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned());
    let Some(kver) = kver else {
        panic!(
            "no lab kernel in {}: run `scripts/quickstart install-deps` (it unpacks Debian's \
             linux-image-amd64 there) or set CORRAL_TEST_LINUX",
            root.display()
        )
    };
    if !root
        .join("lib/modules")
        .join(&kver)
        .join("modules.dep")
        .exists()
    {
        // An unpacked package has no module index; scripts/quickstart makes one.
        run(&mut cmd("depmod", &["-b", root.to_str().unwrap(), &kver]));
    }
    (root, kver)
}

/// Guest init: modules, the disk at /data, the network, the unsynced-counter control, then
/// `corral serve` from the disk.
fn init_script(guest: Ipv4Addr, relay: Ipv4Addr) -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /data /tmp
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in virtio_pci virtio_net virtio_blk crc32c_generic ext4; do modprobe $m; done
mount -t ext4 /dev/vda /data || echo PCUT-NO-DISK
ip link set lo up; ip link set eth0 up
ip addr add {guest}/24 dev eth0; ip route add 10.251.0.0/16 via {relay}
(i=0; while true; do i=$((i+1)); echo "counter $i" >> /data/unsynced; echo "PCUT-UNSYNCED $i"; sleep 0.2; done) &
/data/lib/ld-linux-x86-64.so.2 --library-path /data/lib /data/bin/corral serve --site /data/site --syslog-port 0 --tftp-port 0 > /dev/console 2>&1 &
while true; do sleep 60; done
"#
    )
}

fn site_toml(advertise: Ipv4Addr) -> String {
    format!(
        "[server]\nname = \"pcut\"\ninterfaces = [\"eth0\"]\nadvertise = \"{advertise}\"\n\
         [dhcp]\nmode = \"full\"\n[[dhcp.network]]\ncidr = \"10.251.0.0/16\"\n\
         pool = \"10.251.1.1-10.251.200.254\"\nlease = \"1h\"\n[paths]\nipxe = \"ipxe\"\n"
    )
}

/// Builds the initramfs (busybox, modules, init) at `out`.
fn build_initramfs(dir: &Path, kernel: &Path, kver: &str, init: &str, out: &Path) {
    let root = dir.join("initramfs");
    fs_err::create_dir_all(root.join("bin")).unwrap();
    fs_err::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let kroot = kernel.to_str().unwrap();
    let mut modules = BTreeSet::new();
    for m in [
        "virtio_pci",
        "virtio_net",
        "virtio_blk",
        "crc32c_generic",
        "ext4",
    ] {
        let deps = run(&mut cmd(
            "modprobe",
            &["-d", kroot, "-S", kver, "--show-depends", m],
        ));
        for line in deps.lines() {
            if let Some(path) = line.split_whitespace().nth(1) {
                modules.insert(PathBuf::from(path));
            }
        }
    }
    assert!(modules.len() >= 5, "modprobe found no modules in {kroot}");
    for m in &modules {
        let rel = m.strip_prefix(kernel).unwrap();
        let to = root.join(rel);
        fs_err::create_dir_all(to.parent().unwrap()).unwrap();
        fs_err::copy(m, to).unwrap();
    }
    run(&mut cmd("depmod", &["-b", root.to_str().unwrap(), kver]));
    let init_path = root.join("init");
    fs_err::write(&init_path, init).unwrap();
    run(&mut cmd("chmod", &["755", init_path.to_str().unwrap()]));
    run(Command::new("sh").arg("-c").arg(format!(
        "cd '{}' && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 > '{}'",
        root.display(),
        out.display()
    )));
}

/// Builds the ext4 disk image holding the corral binary, its libraries and the site.
fn build_disk(dir: &Path, site: &str, out: &Path) {
    let data = dir.join("data");
    for d in [
        "bin",
        "lib",
        "site/machines",
        "site/profiles",
        "site/boot",
        "site/images",
    ] {
        fs_err::create_dir_all(data.join(d)).unwrap();
    }
    for d in ["site/trees", "site/ipxe"] {
        fs_err::create_dir_all(data.join(d)).unwrap();
    }
    let bin = env!("CARGO_BIN_EXE_corral");
    fs_err::copy(bin, data.join("bin/corral")).unwrap();
    // Its shared libraries and loader (ldd: "name => /path (addr)" or "/path (addr)").
    let ldd = run(&mut cmd("ldd", &[bin]));
    let mut loader = false;
    for line in ldd.lines() {
        let path = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(PathBuf::from);
        if let Some(p) = path {
            let name = p.file_name().unwrap().to_owned();
            loader |= name.to_string_lossy().starts_with("ld-linux");
            fs_err::copy(&p, data.join("lib").join(name)).unwrap();
        }
    }
    assert!(loader, "ldd named no ld-linux loader:\n{ldd}");
    fs_err::write(data.join("site/site.toml"), site).unwrap();
    // The site must name iPXE binaries; the VM serves no PXE clients, any bytes do.
    for f in ["undionly.kpxe", "snponly.efi", "ipxe.efi"] {
        fs_err::write(data.join("site/ipxe").join(f), b"not used").unwrap();
    }
    run(&mut cmd("truncate", &["-s", "512M", out.to_str().unwrap()]));
    run(&mut cmd(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-d",
            data.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    ));
}

fn read_lossy(p: &Path) -> String {
    fs_err::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool, log: &Path) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = read_lossy(log);
    panic!(
        "{what} within {timeout:?}; last lines of {}:\n{}",
        log.display(),
        text.lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The addresses of "***Leases for REQUEST-ACK***" in perfdhcp's `-x l` output.
fn acked_addresses(perf: &str) -> BTreeSet<Ipv4Addr> {
    perf.lines()
        .skip_while(|l| !l.contains("Leases for REQUEST-ACK"))
        .skip(1)
        .take_while(|l| !l.contains("***"))
        .filter_map(|l| l.split(',').nth(1))
        .filter_map(|a| a.trim().parse().ok())
        .collect()
}

/// The last counter value printed on the serial console by the control loop.
fn last_printed_counter(serial: &str) -> Option<u64> {
    serial
        .lines()
        .filter_map(|l| l.trim().strip_prefix("PCUT-UNSYNCED "))
        .filter_map(|v| v.trim().parse().ok())
        .max()
}

#[test]
fn dhcp_leases_survive_a_power_cut() {
    if !corral_testkit::require_root("dhcp_leases_survive_a_power_cut") {
        return;
    }
    let (kernel, kver) = lab_kernel();
    let vmlinuz = kernel.join(format!("boot/vmlinuz-{kver}"));
    assert!(vmlinuz.exists(), "{} is missing", vmlinuz.display());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // Host 0 is the relay agent (perfdhcp); the VM sits on a tap on the lab's bridge.
    let lab = Lab::new("pcut", 1).unwrap();
    let relay = lab.host(0);
    let o = relay.ip.octets();
    let guest = Ipv4Addr::new(o[0], o[1], o[2], 200);
    let giaddr = Ipv4Addr::new(10, 251, 0, 1);
    relay
        .ip(&["addr", "add", &format!("{giaddr}/32"), "dev", "eth0"])
        .unwrap();
    let hub = lab.hub();
    run(&mut cmd(
        "ip",
        &["-n", hub, "tuntap", "add", "dev", "pcut0", "mode", "tap"],
    ));
    run(&mut cmd(
        "ip",
        &["-n", hub, "link", "set", "pcut0", "master", "br0", "up"],
    ));

    let initrd = dir.join("initrd.gz");
    build_initramfs(dir, &kernel, &kver, &init_script(guest, relay.ip), &initrd);
    let disk = dir.join("disk.img");
    build_disk(dir, &site_toml(guest), &disk);

    let serial = dir.join("serial.log");
    let mut q = Command::new("ip");
    q.args(["netns", "exec", hub, "qemu-system-x86_64", "-accel", "tcg"])
        .args(["-nodefaults", "-display", "none", "-m", "512", "-no-reboot"])
        .arg("-kernel")
        .arg(&vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .args(["-netdev", "tap,id=n0,ifname=pcut0,script=no,downscript=no"])
        .args(["-device", "virtio-net-pci,netdev=n0,mac=52:54:00:77:00:02"])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", disk.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // `ip netns exec` execs QEMU: this pid is QEMU's own.
    let qemu = lab.spawn(&mut q).unwrap();
    wait_for(
        "the VM's corral serve did not start its DHCP service",
        Duration::from_secs(180),
        || read_lossy(&serial).contains("DHCP service started"),
        &serial,
    );

    // perfdhcp leases addresses through the relay for 8 s; the power goes at 3 s.
    let mut perf = relay.command("timeout");
    perf.args(["60", "perfdhcp", "-4", "-r", "100", "-R", "100000"])
        .args(["-p", "8", "-W", "1000000", "-x", "l", "-l"])
        .arg(giaddr.to_string())
        .arg(guest.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let perf_pid = lab.spawn(&mut perf).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    lab.kill(qemu);
    let cut_serial = read_lossy(&serial);
    let out = lab
        .wait(perf_pid, Duration::from_secs(60))
        .expect("perfdhcp did not finish");
    let perf_text = String::from_utf8_lossy(&out.stdout).into_owned();
    let acked = acked_addresses(&perf_text);
    eprintln!(
        "perfdhcp saw {} addresses ACKed before the cut\n{}",
        acked.len(),
        perf_text
            .lines()
            .take_while(|l| !l.contains("Leases for"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        acked.len() >= 20,
        "too few ACKs before the cut to test anything ({}); perfdhcp said:\n{perf_text}\nVM serial:\n{cut_serial}",
        acked.len()
    );
    let sent_requests = perf_text
        .lines()
        .skip_while(|l| !l.contains("REQUEST-ACK"))
        .find_map(|l| l.trim().strip_prefix("sent packets: "))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let discovers = perf_text
        .lines()
        .find_map(|l| l.trim().strip_prefix("sent packets: "))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    assert!(
        discovers > sent_requests && discovers > acked.len(),
        "the cut did not interrupt the run (DISCOVERs {discovers}, REQUESTs {sent_requests}, \
         ACKs {})",
        acked.len()
    );

    // The next boot: mount the disk on the host (ext4 replays its journal), take the site.
    let mnt = dir.join("mnt");
    fs_err::create_dir_all(&mnt).unwrap();
    run(&mut cmd(
        "mount",
        &["-o", "loop", disk.to_str().unwrap(), mnt.to_str().unwrap()],
    ));
    let recovered = dir.join("recovered");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(mnt.join("site"))
        .arg(&recovered)
        .status();
    let unsynced = read_lossy(&mnt.join("unsynced"));
    let _ = Command::new("umount").arg(&mnt).status();
    assert!(
        copied.unwrap().success(),
        "copying the site off the disk failed"
    );

    // The control: the counter's last values printed before the cut never reached the disk.
    let printed = last_printed_counter(&cut_serial).expect("the control loop printed nothing");
    let on_disk = unsynced
        .lines()
        .filter_map(|l| l.strip_prefix("counter "))
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    eprintln!("control: counter {printed} printed before the cut, {on_disk} on the disk");
    assert!(
        on_disk < printed,
        "the unsynced control file holds every value printed before the cut ({on_disk} of \
         {printed}): the VM's page cache survived, so this was no power cut"
    );

    // corral serve on the recovered site (in the relay's namespace: it has an eth0) replays
    // the lease journal into the store.
    let log = recovered.join("replay.log");
    let mut serve = relay.command(env!("CARGO_BIN_EXE_corral"));
    serve
        .args(["serve", "--site"])
        .arg(&recovered)
        .args(["--advertise", &relay.ip.to_string(), "--syslog-port", "0"])
        .args(["--tftp-port", "0", "--http-port", "18080"])
        .stdout(Stdio::null())
        .stderr(fs_err::File::create(&log).unwrap().into_file());
    let pid = lab.spawn(&mut serve).unwrap();
    wait_for(
        "corral serve did not start on the recovered site",
        Duration::from_secs(30),
        || read_lossy(&log).contains("DHCP service started"),
        &log,
    );
    run(&mut cmd("kill", &["-TERM", &pid.to_string()]));
    lab.wait(pid, Duration::from_secs(20))
        .expect("corral serve did not stop on SIGTERM");

    let store = Store::open(recovered.join("state/corral.db")).unwrap();
    let bound: BTreeSet<Ipv4Addr> = store
        .leases()
        .unwrap()
        .into_iter()
        .filter(|l| l.state == LeaseStatus::Bound)
        .map(|l| l.ip)
        .collect();
    let lost: Vec<&Ipv4Addr> = acked.difference(&bound).collect();
    eprintln!(
        "{} ACKed before the cut, {} bound after it, {} lost; replay: {}",
        acked.len(),
        bound.len(),
        lost.len(),
        read_lossy(&log)
            .lines()
            .filter(|l| l.contains("replayed") || l.contains("leases loaded"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    assert!(
        lost.is_empty(),
        "{} of {} ACKed leases were lost in the power cut: {:?}",
        lost.len(),
        acked.len(),
        lost.iter().take(20).collect::<Vec<_>>()
    );
}

#[test]
fn perfdhcp_lease_list_parses() {
    let text = "***Leases for DISCOVER-OFFER***\nclient_id,adrress,prefix\n,10.251.1.9,\n\n\
                ***Leases for REQUEST-ACK***\nclient_id,adrress,prefix\n,10.251.1.1,\n,10.251.1.2,\n\n";
    let got: Vec<Ipv4Addr> = acked_addresses(text).into_iter().collect();
    assert_eq!(
        got,
        vec![Ipv4Addr::new(10, 251, 1, 1), Ipv4Addr::new(10, 251, 1, 2)]
    );
    assert_eq!(
        last_printed_counter("x\nPCUT-UNSYNCED 3\r\nPCUT-UNSYNCED 12\nPCUT-UNSYNCED 4"),
        Some(12)
    );
}
