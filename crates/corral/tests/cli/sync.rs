//! Binary-level tests for `corral sync` and `corral drift`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::support::{corral, text};

fn write(p: &Path, data: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

/// Runs corral with a private state directory (hash caches) under `dir`.
fn corral_state(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(args)
        .current_dir(dir)
        .env("CORRAL_STATE_DIR", dir.join("state"))
        .env_remove("CORRAL_SITE")
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

/// `corral sync run os --site SITE --all` plus `extra`, with `dir`'s state; fails the test
/// unless it exits 0. Returns stdout.
fn run_os(dir: &Path, site: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "sync",
        "run",
        "os",
        "--site",
        site.to_str().unwrap(),
        "--all",
    ];
    args.extend_from_slice(extra);
    let out = corral_state(dir, &args);
    let (so, se) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{so}{se}");
    so
}

/// Every regular file below `root` with its content, skipping `skip` (a top-level name).
fn files(root: &Path, skip: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == skip || rel.starts_with(&format!("{skip}/")) {
                continue;
            }
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn sync_push_dry_run_filters_and_json() {
    let t = tempfile::tempdir().unwrap();
    let (m, c) = (t.path().join("m"), t.path().join("c"));
    write(&m.join("keep.conf"), b"a");
    write(&m.join("skip.tmp"), b"b");
    write(&m.join("logs/x.log"), b"c");
    write(&c.join("stale"), b"old");
    let ms = m.to_str().unwrap();
    let cs = c.to_str().unwrap();
    let out = corral_state(
        t.path(),
        &[
            "sync",
            "push",
            ms,
            cs,
            "--dry-run",
            "--delete",
            "--exclude",
            "*.tmp",
            "--exclude",
            "logs/",
        ],
    );
    let (so, se) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{so}{se}");
    assert!(so.contains(">f+++++++++ keep.conf"), "{so}");
    assert!(so.contains("*deleting   stale"), "{so}");
    assert!(!so.contains("skip.tmp") && !so.contains("logs"), "{so}");
    assert!(c.join("stale").exists(), "dry run changes nothing");
    // Include before exclude wins (rsync order).
    let out = corral_state(
        t.path(),
        &[
            "sync",
            "push",
            ms,
            cs,
            "--json",
            "--include",
            "*.tmp",
            "--exclude",
            "*",
        ],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0));
    let paths: Vec<&str> = v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["path"].as_str().unwrap())
        .collect();
    assert!(
        paths.contains(&"skip.tmp") && !paths.contains(&"keep.conf"),
        "{paths:?}"
    );
    assert_eq!(std::fs::read(c.join("skip.tmp")).unwrap(), b"b");
    // Bad rules are bad input.
    write(&t.path().join("bad.rules"), b"x nonsense\n");
    let out = corral_state(
        t.path(),
        &[
            "sync",
            "push",
            ms,
            cs,
            "--filter-file",
            t.path().join("bad.rules").to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    let out = corral(t.path(), &["sync", "push", "--help"]);
    assert!(text(&out).0.contains("Examples:"));
}

fn tree_file(site: &Path, name: &str, source: &Path, children: &[(&Path, Option<&Path>)]) {
    let mut s = format!("source = {:?}\ndelete = true\n", source.to_str().unwrap());
    for (dest, sub_site) in children {
        s.push_str(&format!("[[child]]\ndest = {:?}\n", dest.to_str().unwrap()));
        if let Some(ss) = sub_site {
            s.push_str(&format!(
                "recurse = true\nsite = {:?}\n",
                ss.to_str().unwrap()
            ));
        }
    }
    write(
        &site.join("trees").join(format!("{name}.toml")),
        s.as_bytes(),
    );
}

#[test]
fn sync_run_three_tiers_recursive_and_drift() {
    let t = tempfile::tempdir().unwrap();
    let p = |n: &str| -> PathBuf { t.path().join(n) };
    let (m, cm, c1, c2) = (p("master"), p("cluster"), p("child1"), p("child2"));
    write(&m.join("etc/motd"), b"welcome\n");
    write(&m.join("bin/tool"), &vec![7u8; 3 << 20]);
    std::fs::create_dir_all(&c2).unwrap();
    write(&c2.join("junk"), b"to be deleted");
    let (s1, s2) = (p("site1"), p("site2"));
    tree_file(&s1, "os", &m, &[(&cm, Some(&s2))]);
    tree_file(&s2, "os", &cm, &[(&c1, None), (&c2, None)]);
    let so = run_os(t.path(), &s1, &["--recursive", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&so).unwrap();
    let top = &v["hosts"][0];
    assert_eq!(top["status"], "changed", "{so}");
    let kids = top["children"].as_array().unwrap();
    assert_eq!(kids.len(), 2, "{so}");
    assert!(kids.iter().all(|k| k["status"] == "changed"), "{so}");
    let want = files(&m, "");
    assert_eq!(files(&cm, ""), want);
    assert_eq!(files(&c1, ""), want);
    assert_eq!(files(&c2, ""), want);
    // Nothing to do the second time: every tier reports unchanged.
    let so = run_os(t.path(), &s1, &["--recursive"]);
    assert_eq!(so.matches("unchanged").count(), 3, "{so}");
    // Drift: same-size edit with mtime restored, and a new setuid bit.
    let db = p("audit.db");
    let drift = |args: &[&str]| {
        let mut a = vec![
            "drift",
            "os",
            "--site",
            s2.to_str().unwrap(),
            "--db",
            db.to_str().unwrap(),
        ];
        a.extend_from_slice(args);
        corral_state(t.path(), &a)
    };
    let out = drift(&["--all"]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let motd = c1.join("etc/motd");
    let old = std::fs::metadata(&motd).unwrap();
    std::fs::write(&motd, b"WELCOME\n").unwrap();
    let st = Command::new("touch")
        .arg("-d")
        .arg(format!("@{}", {
            use std::os::unix::fs::MetadataExt;
            format!("{}.{:09}", old.mtime(), old.mtime_nsec())
        }))
        .arg(&motd)
        .status()
        .unwrap();
    assert!(st.success());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(c1.join("bin/tool"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    let out = drift(&["-s", c1.to_str().unwrap()]);
    let (so, se) = text(&out);
    assert_eq!(out.status.code(), Some(4), "drift found: exit 4\n{so}{se}");
    let first = so.lines().nth(1).unwrap_or("");
    assert!(
        first.contains("bin/tool") && first.contains("[setuid/exec]"),
        "setuid first: {so}"
    );
    assert!(so.contains(">fc") && so.contains("etc/motd"), "{so}");
    // The events are in the store.
    let log = corral(
        t.path(),
        &["log", "--db", db.to_str().unwrap(), "--source", "drift"],
    );
    let (lo, le) = text(&log);
    assert!(lo.contains("drifted"), "{lo}{le}");
    // A child that cannot be compared (its tree is now a plain file) is a failure: exit 1,
    // which wins over the drift of child 1.
    std::fs::remove_dir_all(&c2).unwrap();
    std::fs::write(&c2, b"not a directory").unwrap();
    let out = drift(&["--all"]);
    let (so, se) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed child: exit 1\n{so}{se}"
    );
    assert!(so.contains("FAILED"), "{so}{se}");
}

/// Runs `corral sync push SRC DEST` with `dir`'s state and kills it (SIGKILL) after `delay_ms`.
fn push_killed_after(dir: &Path, src: &str, dest: &str, delay_ms: u64) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(["sync", "push", src, dest, "-q"])
        .env("CORRAL_STATE_DIR", dir.join("state"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(delay_ms));
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
}

/// The files `fI` beneath `root` (none if it does not exist) under their real names, with
/// their number `I`: temporary files, never under a real name, are left out.
fn named_files(root: &Path) -> Vec<(String, usize, Vec<u8>)> {
    if !root.exists() {
        return Vec::new();
    }
    files(root, "")
        .into_iter()
        .filter_map(|(rel, data)| {
            let name = rel.rsplit('/').next().unwrap().to_string();
            if name.ends_with(".corral-tmp") {
                return None;
            }
            Some((rel, name[1..].parse().unwrap(), data))
        })
        .collect()
}

#[test]
fn kill_9_mid_run_leaves_every_file_old_or_new() {
    let t = tempfile::tempdir().unwrap();
    let (m, c) = (t.path().join("m"), t.path().join("c"));
    let n = 1500;
    let body = |g: u8, i: usize| -> Vec<u8> { vec![g.wrapping_add(i as u8); 20_000 + i] };
    for i in 0..n {
        write(&m.join(format!("d{}/f{i}", i % 10)), &body(1, i));
    }
    let (ms, cs) = (
        m.to_str().unwrap().to_string(),
        c.to_str().unwrap().to_string(),
    );
    let out = corral_state(t.path(), &["sync", "push", &ms, &cs, "--no-fsync"]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    for i in 0..n {
        write(&m.join(format!("d{}/f{i}", i % 10)), &body(2, i));
    }
    for delay in [50u64, 150, 400] {
        push_killed_after(t.path(), &ms, &cs, delay);
        for (rel, i, data) in named_files(&c) {
            assert!(
                data == body(1, i) || data == body(2, i),
                "{rel} is neither old nor new after kill -9 at {delay} ms"
            );
        }
    }
    let out = corral_state(t.path(), &["sync", "push", &ms, &cs]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    assert_eq!(
        files(&c, ""),
        files(&m, ""),
        "the next run completes and removes temporaries"
    );
}

/// Issue #5, kill -9 during a first copy: a file the child did not have appears only whole
/// (it is written without a name, or under a temporary one, and named once durable), so a
/// killed run leaves each file absent or complete, and the next run completes the copy.
#[test]
fn kill_9_during_a_first_copy_leaves_every_file_absent_or_whole() {
    let t = tempfile::tempdir().unwrap();
    let m = t.path().join("m");
    let n = 4000;
    let body = |i: usize| -> Vec<u8> { vec![(i % 251) as u8; 10_000 + i] };
    for i in 0..n {
        write(&m.join(format!("d{}/f{i}", i % 10)), &body(i));
    }
    let ms = m.to_str().unwrap().to_string();
    // How long a whole first copy takes here: the kills come at a quarter, half and three
    // quarters of it.
    let c0 = t.path().join("c0");
    let t0 = std::time::Instant::now();
    let out = corral_state(t.path(), &["sync", "push", &ms, c0.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let whole_run = t0.elapsed().as_millis() as u64;
    let mut seen = Vec::new();
    for delay in [whole_run / 4, whole_run / 2, whole_run * 3 / 4] {
        let c = t.path().join(format!("c{delay}"));
        let cs = c.to_str().unwrap().to_string();
        push_killed_after(t.path(), &ms, &cs, delay);
        let mut whole = 0;
        for (rel, i, data) in named_files(&c) {
            assert!(
                data == body(i),
                "{rel} is there but not whole after kill -9 at {delay} ms"
            );
            whole += 1;
        }
        seen.push(whole);
        let out = corral_state(t.path(), &["sync", "push", &ms, &cs]);
        assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
        assert_eq!(
            files(&c, ""),
            files(&m, ""),
            "the next run completes the copy (killed at {delay} ms with {whole} files whole)"
        );
    }
    eprintln!(
        "a first copy took {whole_run} ms; files whole when killed at 1/4, 1/2, 3/4 of it: \
         {seen:?} of {n}"
    );
}

#[test]
fn an_in_place_update_killed_midway_is_undone_by_sync_recover() {
    let t = tempfile::tempdir().unwrap();
    let (m, c) = (t.path().join("m"), t.path().join("c"));
    let size = 8usize << 20;
    let mut x = 7u64;
    let old: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    write(&m.join("disk.img"), &old);
    let (ms, cs) = (
        m.to_str().unwrap().to_string(),
        c.to_str().unwrap().to_string(),
    );
    let push = |crash: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_corral"));
        cmd.args(["sync", "push", &ms, &cs, "-q"])
            .env("CORRAL_STATE_DIR", t.path().join("state"))
            .env("CORRAL_SYNC_IN_PLACE_MIN", (2u64 << 20).to_string())
            .env_remove("CORRAL_SYNC_CRASH_AFTER_EXTENTS");
        if let Some(n) = crash {
            cmd.env("CORRAL_SYNC_CRASH_AFTER_EXTENTS", n);
        }
        cmd.output().unwrap()
    };
    let out = push(None);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let mut new = old.clone();
    for i in 0..6 {
        let off = (i * 1_300_007 + 77_777) % (size - 4096);
        new[off..off + 4096].fill(i as u8 + 1);
    }
    write(&m.join("disk.img"), &new);
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(c.join("disk.img")).unwrap());
    // The receiver dies after the first changed extent is written.
    let out = push(Some("1"));
    assert_ne!(out.status.code(), Some(0));
    let mixed = std::fs::read(c.join("disk.img")).unwrap();
    assert!(mixed != old && mixed != new, "killed midway");
    let out = corral_state(t.path(), &["sync", "recover", &cs]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    assert!(
        text(&out).0.contains("1 file(s) rolled back"),
        "{:?}",
        text(&out)
    );
    assert_eq!(std::fs::read(c.join("disk.img")).unwrap(), old);
    assert!(!c.join(".corral-sync-journal").exists());
    let out = push(None);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    assert_eq!(std::fs::read(c.join("disk.img")).unwrap(), new);
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(c.join("disk.img")).unwrap()),
        ino,
        "updated in place"
    );
    // Nothing to recover: still success.
    let out = corral_state(t.path(), &["sync", "recover", &cs]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills sshd when the test ends, also on failure.
struct Sshd(std::process::Child);
impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn sync_over_real_sshd_with_forced_command_key() {
    if !corral_testkit::is_root() {
        eprintln!("SKIPPED sync_over_real_sshd_with_forced_command_key: needs root (sshd)");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (m, c, decoy) = (d.join("m"), d.join("c"), d.join("decoy"));
    write(&m.join("etc/passwd-like"), b"root:x:0:0\n");
    write(&m.join("big"), &vec![3u8; 2 << 20]);
    // c is not there yet: the receiver makes its root, as a local push does.
    std::fs::create_dir_all(&decoy).unwrap();
    let keygen = |p: &Path| {
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(p)
            .status()
            .unwrap();
        assert!(st.success());
    };
    keygen(&d.join("host_key"));
    keygen(&d.join("client_key"));
    let pubkey = std::fs::read_to_string(d.join("client_key.pub")).unwrap();
    let corral_bin = env!("CARGO_BIN_EXE_corral");
    // The documented line: the key may only run the receiver, beneath c, from loopback.
    let line = format!(
        "command=\"CORRAL_STATE_DIR={} {corral_bin} sync serve --stdio --root {}\",from=\"127.0.0.1\",restrict {}",
        d.join("state-remote").display(),
        c.display(),
        pubkey.trim()
    );
    write(&d.join("authorized_keys"), line.as_bytes());
    let port = free_port();
    let cfg = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\nStrictModes no\nPermitRootLogin forced-commands-only\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n",
        d.join("host_key").display(),
        d.join("authorized_keys").display(),
        d.join("sshd.pid").display()
    );
    write(&d.join("sshd_config"), cfg.as_bytes());
    std::fs::create_dir_all("/run/sshd").unwrap();
    let _sshd = Sshd(
        Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "sshd did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let ssh_args = [
        "--ssh-arg=-p".to_string(),
        format!("--ssh-arg={port}"),
        "--ssh-arg=-i".into(),
        format!("--ssh-arg={}", d.join("client_key").display()),
        "--ssh-arg=-oStrictHostKeyChecking=no".into(),
        "--ssh-arg=-oUserKnownHostsFile=/dev/null".into(),
        "--ssh-arg=-oLogLevel=ERROR".into(),
    ];
    // The path asked for is ignored: the forced command pins the root to c.
    let dest = format!("root@127.0.0.1:{}", decoy.display());
    let mut args: Vec<&str> = vec!["sync", "push", m.to_str().unwrap(), &dest, "--json"];
    args.extend(ssh_args.iter().map(String::as_str));
    let out = corral_state(d, &args);
    let (so, se) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{so}{se}");
    assert_eq!(files(&c, ""), files(&m, ""));
    assert!(files(&decoy, "").is_empty());
    // The connection is kept for the next run (ControlPersist), its socket in the private
    // control directory beneath the state directory.
    let ctl = d.join("state").join("ssh");
    let ssh_ctl = |op: &str| {
        Command::new("ssh")
            .args(["-p", &port.to_string(), "-i"])
            .arg(d.join("client_key"))
            .args([
                "-oStrictHostKeyChecking=no",
                "-oUserKnownHostsFile=/dev/null",
                "-oLogLevel=ERROR",
            ])
            .arg(format!("-oControlPath={}/%C", ctl.display()))
            .args(["-O", op, "root@127.0.0.1"])
            .output()
            .unwrap()
    };
    let check = ssh_ctl("check");
    assert!(
        check.status.success(),
        "no kept ssh connection after the first run: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    // Second run over ssh (through the kept connection): nothing to send but the manifests.
    let out = corral_state(d, &args);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["changes"].as_array().unwrap().len(),
        0,
        "{v}\nfirst run: {so}"
    );
    assert_eq!(v["report"]["literal_bytes"], 0);
    // Close the kept connection rather than leave it to its 60 s timer.
    assert!(ssh_ctl("exit").status.success());
    // Without sharing (--ssh-persist 0) a run still works, over a connection of its own.
    args.push("--ssh-persist=0");
    let out = corral_state(d, &args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
    assert!(!ssh_ctl("check").status.success(), "a connection was kept");
}

/// `--compress never`, `always` and `auto` give byte-identical trees; `never` sends more
/// bytes than `always` for compressible data, and `auto` on a plan large enough to probe
/// switches between the two as it measures (the JSON says where it stood).
#[test]
fn sync_push_compress_modes_give_identical_trees() {
    let t = tempfile::tempdir().unwrap();
    let m = t.path().join("m");
    // 128 MiB: above auto's 64 MiB threshold, so its probe runs (compressed 0-96 MiB, then
    // raw): half text-like, half random, in 2 MiB files (chunked) and small ones.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..64 {
        let mut data = Vec::with_capacity(2 << 20);
        while data.len() < 2 << 20 {
            if i % 2 == 0 {
                data.extend_from_slice(format!("line {} of file {i}\n", rnd() % 1000).as_bytes());
            } else {
                data.extend_from_slice(&rnd().to_le_bytes());
            }
        }
        write(&m.join(format!("big/{i}.bin")), &data);
    }
    for i in 0..300 {
        let n = 100 + (rnd() % 20_000) as usize;
        let data: Vec<u8> = (0..n).map(|j| b"abcdefgh\n"[(j + i) % 9]).collect();
        write(&m.join(format!("small/{}/{i}.txt", i % 7)), &data);
    }
    let want = files(&m, "");
    let mut sent = std::collections::HashMap::new();
    for mode in ["never", "always", "auto"] {
        let c = t.path().join(format!("c-{mode}"));
        std::fs::create_dir_all(&c).unwrap();
        let out = corral_state(
            t.path(),
            &[
                "sync",
                "push",
                m.to_str().unwrap(),
                c.to_str().unwrap(),
                "--no-fsync",
                "--json",
                &format!("--compress={mode}"),
            ],
        );
        assert_eq!(out.status.code(), Some(0), "{mode}: {}", text(&out).1);
        assert_eq!(files(&c, ""), want, "{mode}: trees differ");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let comp = &v["compression"];
        assert_eq!(comp["policy"], mode, "{v}");
        assert!(comp["planned"].as_u64().unwrap() >= 128 << 20, "{v}");
        let summary = v["compression_summary"].as_str().unwrap();
        match mode {
            "never" => assert_eq!(summary, "raw (never)"),
            "always" => assert_eq!(summary, "zstd (always)"),
            _ => {
                // Past the first (compressed) window, in the raw ones, when the run ended.
                assert_eq!(comp["last"], "raw", "{v}");
                assert!(
                    summary.contains("ended before a probe finished"),
                    "{summary}"
                );
            }
        }
        sent.insert(mode, v["bytes_sent"].as_u64().unwrap());
    }
    assert!(
        sent["never"] > sent["always"] + (8 << 20),
        "compressible data shrinks: {sent:?}"
    );
    assert!(
        sent["auto"] > sent["always"] && sent["auto"] < sent["never"],
        "auto compressed part of the data: {sent:?}"
    );
    // Not a flag value: refused with the choices.
    let out = corral_state(
        t.path(),
        &[
            "sync",
            "push",
            m.to_str().unwrap(),
            "/nonexistent-x",
            "--compress=fast",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("never"), "{}", text(&out).1);
}

/// A stand-in for `ssh` in `dir` that runs the remote command line (its last argument)
/// locally with the child's own environment, as sshd would: `CORRAL_STATE_DIR` is
/// `child_default`, never the master's.
fn fake_ssh(dir: &Path, child_default: &Path) -> PathBuf {
    let prog = dir.join("fake-ssh");
    write(
        &prog,
        format!(
            "#!/bin/sh\nfor last; do :; done\nexport CORRAL_STATE_DIR='{}'\nexec sh -c \"$last\"\n",
            child_default.display()
        )
        .as_bytes(),
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
    prog
}

/// Issue #5: a tree file's `[[child]] state_dir` reaches the child's receiver as
/// `corral sync serve --state-dir`, so its hash cache lands there, not in the child's own
/// default state directory (ssh passes no environment; the master's is not the child's).
/// `ssh` here is a stand-in that runs the remote command line locally with the child's
/// own environment (as sshd would), so the test runs without root or sshd.
#[test]
fn a_childs_state_dir_from_the_tree_file_reaches_its_receiver() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (m, c) = (d.join("m"), d.join("c"));
    write(&m.join("etc/motd"), b"hello\n");
    write(&m.join("bin/tool"), &vec![5u8; 70_000]);
    std::fs::create_dir_all(&c).unwrap();
    let (child_default, child_state) = (d.join("child-default"), d.join("child-state"));
    let fake_ssh = fake_ssh(d, &child_default);
    let site = d.join("site");
    let tree = format!(
        "source = {:?}\n[ssh]\nprogram = {:?}\nremote_corral = {:?}\npersist = \"0s\"\n[[child]]\nname = \"c1\"\nhost = \"child1\"\ndest = {:?}\nstate_dir = {:?}\n",
        m.to_str().unwrap(),
        fake_ssh.to_str().unwrap(),
        env!("CARGO_BIN_EXE_corral"),
        c.to_str().unwrap(),
        child_state.to_str().unwrap(),
    );
    write(&site.join("trees/os.toml"), tree.as_bytes());
    let caches = |dir: &Path| -> usize {
        std::fs::read_dir(dir.join("sync")).map_or(0, |rd| {
            rd.filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "cache")
            })
            .count()
        })
    };
    run_os(d, &site, &[]);
    assert_eq!(files(&c, ""), files(&m, ""));
    assert_eq!(
        caches(&child_state),
        1,
        "the child's cache is in its state_dir"
    );
    assert_eq!(caches(&child_default), 0, "not in the child's default");
    assert_eq!(caches(&d.join("state")), 1, "the master's own cache only");
    // `corral sync push host:path --remote-state-dir DIR` does the same for a one-off.
    let other = d.join("other-state");
    let dest = format!("child1:{}", c.display());
    let ssh_prog = format!("--ssh={}", fake_ssh.display());
    let remote = format!("--remote-corral={}", env!("CARGO_BIN_EXE_corral"));
    let rsd = format!("--remote-state-dir={}", other.display());
    write(&m.join("etc/motd"), b"changed\n");
    let out = corral_state(
        d,
        &[
            "sync",
            "push",
            m.to_str().unwrap(),
            &dest,
            &ssh_prog,
            &remote,
            &rsd,
            "--ssh-persist=0s",
        ],
    );
    let (so, se) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{so}{se}");
    assert_eq!(files(&c, ""), files(&m, ""));
    assert_eq!(caches(&other), 1, "{so}{se}");
    assert_eq!(caches(&child_default), 0);
}

/// A recursive run: the cluster master's own run (its hash cache as a master, its children's
/// receivers) keeps its state in the `state_dir` the top tree gives it, not in the default of
/// the environment ssh gives it.
#[test]
fn a_recursive_childs_own_run_keeps_its_state_in_its_state_dir() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (m, cm, c1) = (d.join("m"), d.join("cluster"), d.join("leaf"));
    write(&m.join("etc/motd"), b"hello\n");
    write(&m.join("bin/tool"), &vec![5u8; 70_000]);
    std::fs::create_dir_all(&cm).unwrap();
    std::fs::create_dir_all(&c1).unwrap();
    let (cm_default, cm_state) = (d.join("cluster-default"), d.join("cluster-state"));
    let fake_ssh = fake_ssh(d, &cm_default);
    let (s1, s2) = (d.join("site1"), d.join("site2"));
    write(
        &s1.join("trees/os.toml"),
        format!(
            "source = {:?}\n[ssh]\nprogram = {:?}\nremote_corral = {:?}\npersist = \"0s\"\n[[child]]\nname = \"cm\"\nhost = \"cluster\"\ndest = {:?}\nstate_dir = {:?}\nrecurse = true\nsite = {:?}\n",
            m.to_str().unwrap(),
            fake_ssh.to_str().unwrap(),
            env!("CARGO_BIN_EXE_corral"),
            cm.to_str().unwrap(),
            cm_state.to_str().unwrap(),
            s2.to_str().unwrap(),
        )
        .as_bytes(),
    );
    tree_file(&s2, "os", &cm, &[(&c1, None)]);
    run_os(d, &s1, &["--recursive"]);
    assert_eq!(files(&c1, ""), files(&m, ""));
    let listing = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir.join("sync")).map_or(Vec::new(), |rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".cache"))
                .collect()
        })
    };
    assert!(
        listing(&cm_default).is_empty(),
        "nothing in the cluster's default state: {:?}",
        listing(&cm_default)
    );
    // The cluster's receiver cache, its master-side cache (same root) and its leaf's
    // receiver cache.
    assert_eq!(listing(&cm_state).len(), 2, "{:?}", listing(&cm_state));
}

/// A remote end that does not start (here: no corral on the child, as `sh` says it) is an
/// error as soon as ssh ends, not after the master has read and hashed its whole tree: the
/// files not hashed yet stay unread, so the master's hash cache holds few of them (all 3,000
/// without the early stop: at least 32 bytes of hash each).
#[test]
fn a_remote_end_that_does_not_start_fails_the_push_before_the_tree_is_read() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let m = d.join("m");
    for i in 0..3000u32 {
        let body: Vec<u8> = (0..16384u32)
            .map(|j| (j.wrapping_mul(2_654_435_761).wrapping_add(i) >> 13) as u8)
            .collect();
        write(&m.join(format!("d{}/f{i}", i % 30)), &body);
    }
    let ssh = d.join("no-corral-ssh");
    write(
        &ssh,
        b"#!/bin/sh\necho 'sh: 1: corral: not found' >&2\nexit 127\n",
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ssh_prog = format!("--ssh={}", ssh.display());
    let start = std::time::Instant::now();
    let out = corral_state(
        d,
        &[
            "sync",
            "push",
            m.to_str().unwrap(),
            "child1:/srv/m",
            &ssh_prog,
            "--ssh-persist=0s",
        ],
    );
    let (so, se) = text(&out);
    assert_ne!(out.status.code(), Some(0), "{so}{se}");
    assert!(se.contains("127"), "ssh's exit status is reported: {se}");
    let cached: u64 = std::fs::read_dir(d.join("state/sync")).map_or(0, |rd| {
        rd.map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "cache"))
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum()
    });
    assert!(
        cached < 3000 * 32 / 4,
        "the master hashed most of its tree before reporting the failed child: cache {cached} bytes, {:?}",
        start.elapsed()
    );
}
