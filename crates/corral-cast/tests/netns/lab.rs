//! Network-namespace tests (root): host 0 sends, the others receive, as child processes of
//! this test binary (see `helper`). Loss, rate limits and blocked multicast come from
//! corral-testkit; every received image is compared byte for byte (hash) with the original.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use corral_testkit::{Lab, require_root};

use crate::helper::{self, Role};
use crate::{hash_file, make_image};

const PORT: u16 = 9000;
const KEY: [u8; 32] = [7; 32];

fn group(tag: u8) -> Ipv4Addr {
    Ipv4Addr::new(239, 255, 90, tag)
}

fn trusted() -> Option<[u8; 32]> {
    Some(
        corral_cast::keys::SigningKey::from_bytes(&KEY)
            .verifying_key()
            .to_bytes(),
    )
}

struct Cast<'a> {
    lab: &'a Lab,
    group: Ipv4Addr,
}

impl Cast<'_> {
    fn spawn(&self, host: usize, role: &Role) -> u32 {
        let h = self.lab.host(host);
        let mut cmd = helper::command(h.command(helper::exe()), role);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        self.lab.spawn(&mut cmd).expect("spawn helper")
    }

    fn receiver(&self, host: usize, out: &Path) -> Role {
        Role::Receive {
            output: Some(out.to_owned()),
            pipe: None,
            group: self.group,
            port: PORT,
            interface: self.lab.host(host).ip,
            sender: None,
            state: None,
            name: format!("r{host}"),
            trusted_key: trusted(),
            idle_ms: 60_000,
            unicast: false,
        }
    }

    fn sender(&self, image: &Path, min_receivers: usize, rate: Option<u64>) -> Role {
        Role::Send {
            source: image.to_owned(),
            group: self.group,
            port: PORT,
            interface: self.lab.host(0).ip,
            min_receivers,
            expect: vec![],
            rate,
            max_wait_ms: 20_000,
            linger_ms: 20_000,
            key_seed: Some(KEY),
            unicast: Vec::new(),
        }
    }

    /// Receiver 1 as usual, and receiver 2 (the host whose multicast the test blocks) told
    /// the sender's host; their pids.
    fn multicast_and_told_receivers(&self, out1: &Path, out2: &Path) -> (u32, u32) {
        let r1 = self.spawn(1, &self.receiver(1, out1));
        let mut role2 = self.receiver(2, out2);
        if let Role::Receive { sender, .. } = &mut role2 {
            *sender = Some(SocketAddr::from((self.lab.host(0).ip, PORT)));
        }
        (r1, self.spawn(2, &role2))
    }

    fn wait(&self, pid: u32, what: &str) -> (Output, serde_json::Value) {
        let out = self
            .lab
            .wait(pid, Duration::from_secs(90))
            .unwrap_or_else(|| panic!("{what} did not finish in 90 s"));
        let v = helper::result(&out.stdout).unwrap_or_else(|| {
            panic!(
                "{what} printed no result ({}); stdout:\n{}\nstderr:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                tail(&out)
            )
        });
        (out, v)
    }
}

fn tail(out: &Output) -> String {
    let s = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn setup(tag: &str, hosts: usize) -> Option<(Lab, tempfile::TempDir)> {
    if !require_root(tag) {
        return None;
    }
    let lab = Lab::new(tag, hosts).expect("lab");
    Some((lab, tempfile::tempdir().expect("tempdir")))
}

#[test]
fn four_receivers_two_lossy_all_identical() {
    let Some((lab, dir)) = setup("loss4", 5) else {
        return;
    };
    lab.set_loss(1, 0.05).unwrap();
    lab.set_loss(2, 0.10).unwrap();
    let cast = Cast {
        lab: &lab,
        group: group(1),
    };
    let img = dir.path().join("image");
    make_image(&img, 16 << 20, 11, 3);
    let rx: Vec<(u32, PathBuf)> = (1..=4)
        .map(|h| {
            let out = dir.path().join(format!("out{h}"));
            (cast.spawn(h, &cast.receiver(h, &out)), out)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let tx = cast.spawn(0, &cast.sender(&img, 4, Some(300_000_000)));
    let (sout, sres) = cast.wait(tx, "sender");
    assert!(sout.status.success(), "{sres}\n{}", tail(&sout));
    let want = hash_file(&img);
    for (pid, out) in rx {
        let (o, r) = cast.wait(pid, "receiver");
        assert!(o.status.success(), "{r}\n{}", tail(&o));
        assert_eq!(hash_file(&out), want, "{}", out.display());
    }
    assert_eq!(
        sres["report"]["receivers"].as_array().map(Vec::len),
        Some(4)
    );
}

#[test]
fn killed_receiver_is_reported_and_resumes_with_its_state_file() {
    let Some((lab, dir)) = setup("kill", 3) else {
        return;
    };
    let cast = Cast {
        lab: &lab,
        group: group(2),
    };
    let img = dir.path().join("image");
    make_image(&img, 24 << 20, 12, 0);
    let out1 = dir.path().join("out1");
    let out2 = dir.path().join("out2");
    let state = dir.path().join("r2.state");
    let r1 = cast.spawn(1, &cast.receiver(1, &out1));
    let mut role2 = cast.receiver(2, &out2);
    if let Role::Receive { state: s, .. } = &mut role2 {
        *s = Some(state.clone());
    }
    let r2 = cast.spawn(2, &role2);
    std::thread::sleep(Duration::from_millis(300));
    // 40 Mbit/s: 24 MiB takes about 5 s.
    let tx = cast.spawn(0, &cast.sender(&img, 2, Some(40_000_000)));
    std::thread::sleep(Duration::from_millis(2000));
    lab.kill(r2);
    let saved = corral_cast::state::ResumeState::load(&state)
        .unwrap()
        .expect("state file written before the kill");
    assert!(saved.count() > 0, "nothing recorded before the kill");
    // Long enough for the sender to declare it dead (dead_after 2 s).
    std::thread::sleep(Duration::from_millis(2500));
    let r2b = cast.spawn(2, &role2);
    let (o, r) = cast.wait(r2b, "restarted receiver");
    assert!(o.status.success(), "{r}\n{}", tail(&o));
    let rep = &r["report"];
    let resumed = rep["blocks_resumed"].as_u64().unwrap();
    let fetched = rep["blocks_multicast"].as_u64().unwrap() + rep["blocks_tcp"].as_u64().unwrap();
    assert!(resumed >= saved.count(), "{rep}");
    assert_eq!(resumed + fetched, rep["blocks"].as_u64().unwrap(), "{rep}");
    assert_eq!(hash_file(&out2), hash_file(&img));
    let (o1, _) = cast.wait(r1, "receiver 1");
    assert!(o1.status.success());
    let (sout, sres) = cast.wait(tx, "sender");
    // The killed incarnation is a failed receiver: the sender must say so and exit non-zero.
    assert!(!sout.status.success(), "{sres}");
    let rxs = sres["report"]["receivers"].as_array().unwrap();
    assert!(
        rxs.iter().any(|x| x["name"] == "r2"
            && x["ok"] == false
            && !x["reason"].as_str().unwrap().is_empty()),
        "{sres}"
    );
    assert!(
        rxs.iter().any(|x| x["name"] == "r1" && x["ok"] == true),
        "{sres}"
    );
}

#[test]
fn rate_limited_receiver_does_not_slow_the_others() {
    let Some((lab, dir)) = setup("slow", 4) else {
        return;
    };
    lab.set_rate(1, "100mbit").unwrap();
    let cast = Cast {
        lab: &lab,
        group: group(3),
    };
    let img = dir.path().join("image");
    make_image(&img, 24 << 20, 13, 0);
    let outs: Vec<PathBuf> = (1..=3)
        .map(|h| dir.path().join(format!("out{h}")))
        .collect();
    let pids: Vec<u32> = (1..=3)
        .map(|h| cast.spawn(h, &cast.receiver(h, &outs[h - 1])))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let tx = cast.spawn(0, &cast.sender(&img, 3, Some(400_000_000)));
    let mut done: Vec<Option<Duration>> = vec![None; 3];
    let deadline = Instant::now() + Duration::from_secs(90);
    while done.iter().any(Option::is_none) && Instant::now() < deadline {
        for (i, pid) in pids.iter().enumerate() {
            if done[i].is_none()
                && let Some(o) = lab.wait(*pid, Duration::from_millis(5))
            {
                assert!(
                    o.status.success(),
                    "receiver {} failed\n{}",
                    i + 1,
                    tail(&o)
                );
                done[i] = Some(t0.elapsed());
            }
        }
    }
    let done: Vec<Duration> = done.into_iter().map(|d| d.expect("all finish")).collect();
    let want = hash_file(&img);
    for o in &outs {
        assert_eq!(hash_file(o), want);
    }
    let fast = done[1].max(done[2]);
    // 24 MiB through 100 Mbit/s takes at least 2 s; the others must not be held to that.
    assert!(
        fast < done[0].mul_f64(0.7),
        "fast receivers took {fast:?}, the rate-limited one {:?}",
        done[0]
    );
    let _ = cast.wait(tx, "sender");
}

#[test]
fn rogue_host_forging_packets_changes_no_byte() {
    let Some((lab, dir)) = setup("rogue", 4) else {
        return;
    };
    let cast = Cast {
        lab: &lab,
        group: group(4),
    };
    let img = dir.path().join("image");
    make_image(&img, 16 << 20, 14, 4);
    let outs: Vec<PathBuf> = (1..=2)
        .map(|h| dir.path().join(format!("out{h}")))
        .collect();
    let pids: Vec<u32> = (1..=2)
        .map(|h| cast.spawn(h, &cast.receiver(h, &outs[h - 1])))
        .collect();
    let rogue = cast.spawn(
        3,
        &Role::Rogue {
            group: cast.group,
            port: PORT,
            interface: lab.host(3).ip,
            seconds: 20,
        },
    );
    std::thread::sleep(Duration::from_millis(300));
    let tx = cast.spawn(0, &cast.sender(&img, 2, Some(200_000_000)));
    let want = hash_file(&img);
    for (pid, out) in pids.into_iter().zip(&outs) {
        let (o, r) = cast.wait(pid, "receiver");
        assert!(o.status.success(), "{r}\n{}", tail(&o));
        assert_eq!(hash_file(out), want);
    }
    let (sout, sres) = cast.wait(tx, "sender");
    assert!(sout.status.success(), "{sres}");
    lab.kill(rogue);
}

#[test]
fn receiver_without_multicast_falls_back_to_unicast() {
    let Some((lab, dir)) = setup("nomcast", 3) else {
        return;
    };
    lab.block_multicast(2).unwrap();
    let cast = Cast {
        lab: &lab,
        group: group(5),
    };
    let img = dir.path().join("image");
    make_image(&img, 8 << 20, 15, 0);
    let out1 = dir.path().join("out1");
    let out2 = dir.path().join("out2");
    let (r1, r2) = cast.multicast_and_told_receivers(&out1, &out2);
    std::thread::sleep(Duration::from_millis(300));
    let tx = cast.spawn(0, &cast.sender(&img, 2, Some(200_000_000)));
    let (o, r) = cast.wait(r2, "unicast receiver");
    assert!(o.status.success(), "{r}\n{}", tail(&o));
    assert_eq!(r["report"]["blocks_multicast"], 0, "{r}");
    assert!(r["report"]["blocks_tcp"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(hash_file(&out2), hash_file(&img));
    let (o1, _) = cast.wait(r1, "multicast receiver");
    assert!(o1.status.success());
    assert_eq!(hash_file(&out1), hash_file(&img));
    let (sout, sres) = cast.wait(tx, "sender");
    assert!(sout.status.success(), "{sres}");
}

/// A receiver that cannot hear the group, told the sender's host, while another program
/// holds the stream's UDP port there (so the sender binds another): it learns that port with
/// the manifest over TCP, and the sender hears its join and Done. Before, its reports went
/// to the other program: the sender waited out its max wait for the second receiver and
/// its summary left it out.
#[test]
fn a_receiver_without_multicast_reports_to_a_sender_on_another_port() {
    let Some((lab, dir)) = setup("nomcport", 3) else {
        return;
    };
    lab.block_multicast(2).unwrap();
    let cast = Cast {
        lab: &lab,
        group: group(6),
    };
    let img = dir.path().join("image");
    make_image(&img, 4 << 20, 16, 0);
    let holder = cast.spawn(
        0,
        &Role::Hold {
            port: PORT,
            seconds: 60,
        },
    );
    let out1 = dir.path().join("out1");
    let out2 = dir.path().join("out2");
    let (r1, r2) = cast.multicast_and_told_receivers(&out1, &out2);
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let tx = cast.spawn(0, &cast.sender(&img, 2, Some(200_000_000)));
    let (o, r) = cast.wait(r2, "receiver without multicast");
    assert!(o.status.success(), "{r}\n{}", tail(&o));
    assert_eq!(r["report"]["blocks_multicast"], 0, "{r}");
    assert_eq!(hash_file(&out2), hash_file(&img));
    let (o1, _) = cast.wait(r1, "multicast receiver");
    assert!(o1.status.success());
    assert_eq!(hash_file(&out1), hash_file(&img));
    let (sout, sres) = cast.wait(tx, "sender");
    let took = t0.elapsed();
    lab.kill(holder);
    assert!(sout.status.success(), "{sres}\n{}", tail(&sout));
    let rxs = sres["report"]["receivers"].as_array().unwrap();
    for name in ["r1", "r2"] {
        assert!(
            rxs.iter().any(|x| x["name"] == name && x["ok"] == true),
            "{name} missing from the sender's summary: {sres}"
        );
    }
    // Started on the second join (after r2's 5 s of multicast silence and its manifest over
    // TCP), not at the 20 s max wait.
    assert!(took < Duration::from_secs(18), "took {took:?}: {sres}");
}

/// Unicast targets where multicast does not work at all: every host drops multicast, the
/// sender sends to two receivers' addresses and both finish byte-identical from the UDP
/// stream (no TCP catch-up); the sender reports both.
#[test]
fn unicast_targets_without_any_multicast() {
    let Some((lab, dir)) = setup("ucast", 3) else {
        return;
    };
    for h in 0..3 {
        lab.block_multicast(h).unwrap();
    }
    let cast = Cast {
        lab: &lab,
        group: group(7),
    };
    let img = dir.path().join("image");
    make_image(&img, 8 << 20, 17, 4);
    let outs: Vec<PathBuf> = (1..=2)
        .map(|h| dir.path().join(format!("out{h}")))
        .collect();
    let rxs: Vec<u32> = (1..=2)
        .map(|h| {
            let mut role = cast.receiver(h, &outs[h - 1]);
            if let Role::Receive { unicast, .. } = &mut role {
                *unicast = true;
            }
            cast.spawn(h, &role)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut role = cast.sender(&img, 2, Some(200_000_000));
    if let Role::Send { unicast, .. } = &mut role {
        *unicast = (1..=2)
            .map(|h| std::net::SocketAddrV4::new(lab.host(h).ip, PORT))
            .collect();
    }
    let tx = cast.spawn(0, &role);
    for (pid, out) in rxs.into_iter().zip(&outs) {
        let (o, r) = cast.wait(pid, "unicast receiver");
        assert!(o.status.success(), "{r}\n{}", tail(&o));
        assert_eq!(r["report"]["blocks_tcp"], 0, "{r}");
        assert!(r["report"]["blocks_multicast"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(hash_file(out), hash_file(&img));
    }
    let (sout, sres) = cast.wait(tx, "sender");
    assert!(sout.status.success(), "{sres}");
    assert_eq!(
        sres["report"]["receivers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["ok"] == true)
            .count(),
        2,
        "{sres}"
    );
}

/// A loop device over a file; detached on drop.
struct Loop {
    dev: String,
}

impl Loop {
    fn new(backing: &Path, bytes: u64) -> Loop {
        let f = std::fs::File::create(backing).unwrap();
        f.set_len(bytes).unwrap();
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing)
            .output()
            .expect("losetup runs");
        assert!(out.status.success(), "losetup: {out:?}");
        Loop {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.dev])
            .status();
    }
}

/// A tmpfs of `bytes` mounted on `dir`; unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn new(dir: &Path, bytes: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount runs");
        assert!(st.success(), "mount tmpfs on {}", dir.display());
        Tmpfs {
            dir: dir.to_owned(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
    }
}

/// Outputs other than a plain file: a block device bigger than the image (written in place,
/// not truncated), a pipe, a device too small (refused), a file on a file system without room
/// for the image's data (refused at the manifest, nothing left behind), and one with room
/// for the data but not for the whole image (zero blocks stay holes: accepted).
#[test]
fn block_device_pipe_and_small_file_system_outputs() {
    let Some((lab, dir)) = setup("loopdev", 6) else {
        return;
    };
    let cast = Cast {
        lab: &lab,
        group: group(6),
    };
    let img = dir.path().join("image");
    let len = 12usize << 20;
    make_image(&img, len, 16, 3);
    let big = Loop::new(&dir.path().join("big.img"), 32 << 20);
    let small = Loop::new(&dir.path().join("small.img"), 4 << 20);
    // Garbage on the device first: zero blocks of the image must be written as zeros.
    std::fs::write(&big.dev, vec![0xAB; 32 << 20]).unwrap();
    let piped = dir.path().join("piped");
    let r1 = cast.spawn(1, &cast.receiver(1, Path::new(&big.dev)));
    let mut role2 = cast.receiver(2, Path::new("-"));
    if let Role::Receive { output, pipe, .. } = &mut role2 {
        *output = None;
        *pipe = Some(format!("cat > '{}'", piped.display()));
    }
    let r2 = cast.spawn(2, &role2);
    let r3 = cast.spawn(3, &cast.receiver(3, Path::new(&small.dev)));
    // The image holds 8 MiB of data and 4 MiB of zero blocks.
    let full = Tmpfs::new(&dir.path().join("full"), 6 << 20);
    let roomy = Tmpfs::new(&dir.path().join("roomy"), 10 << 20);
    let r4 = cast.spawn(4, &cast.receiver(4, &full.dir.join("out")));
    let r5 = cast.spawn(5, &cast.receiver(5, &roomy.dir.join("out")));
    std::thread::sleep(Duration::from_millis(300));
    let tx = cast.spawn(0, &cast.sender(&img, 2, Some(200_000_000)));
    let (o, r) = cast.wait(r1, "device receiver");
    assert!(o.status.success(), "{r}\n{}", tail(&o));
    let dev = std::fs::read(&big.dev).unwrap();
    assert_eq!(dev.len(), 32 << 20, "device must not be truncated");
    assert_eq!(
        blake3::hash(&dev[..len]).to_hex().to_string(),
        hash_file(&img)
    );
    assert!(
        dev[len..].iter().all(|&b| b == 0xAB),
        "bytes past the image untouched"
    );
    let (o, r) = cast.wait(r2, "pipe receiver");
    assert!(o.status.success(), "{r}\n{}", tail(&o));
    assert_eq!(hash_file(&piped), hash_file(&img));
    let (o, r) = cast.wait(r3, "small-device receiver");
    assert!(
        !o.status.success(),
        "a too-small device must be refused: {r}"
    );
    assert!(
        r["error"].as_str().unwrap_or("").contains("device holds"),
        "{r}"
    );
    let (o, r) = cast.wait(r4, "receiver on a full file system");
    assert!(!o.status.success(), "no room, yet accepted: {r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap_or("")
            .contains("more bytes on this file system"),
        "{r}"
    );
    assert_eq!(
        std::fs::read_dir(&full.dir).unwrap().count(),
        0,
        "nothing left on the full file system"
    );
    let (o, r) = cast.wait(r5, "receiver on a small file system");
    assert!(o.status.success(), "{r}\n{}", tail(&o));
    assert_eq!(hash_file(&roomy.dir.join("out")), hash_file(&img));
    let (_, sres) = cast.wait(tx, "sender");
    let rxs = sres["report"]["receivers"].as_array().unwrap();
    assert!(
        rxs.iter().any(|x| x["name"] == "r5" && x["ok"] == true),
        "{sres}"
    );
    assert!(
        !rxs.iter().any(|x| x["name"] == "r4" && x["ok"] == true),
        "{sres}"
    );
}
