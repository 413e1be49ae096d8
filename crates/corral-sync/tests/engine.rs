//! End-to-end tests of the engine on real directories: every file type, metadata, drift,
//! big-image chunk reuse, backups and rollback, hostile streams.

use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use corral_sync::filter::{IncludeAll, PathFilter};
use corral_sync::manifest::{Entry, Kind, Manifest};
use corral_sync::planner::{Op, PlanOptions, plan};
use corral_sync::proto::{Framed, Message, RunOptions, VERSION};
use corral_sync::scan::{ScanOptions, scan};
use corral_sync::session::{PushOptions, PushResult, ServeOptions};
use corral_sync::transport::{Dest, SshOptions, push_to};

fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(st.success(), "{cmd}");
}

fn push(src: &Path, dst: &Path, opts: &PushOptions) -> PushResult {
    push_to(
        src,
        &Dest::Local(dst.to_path_buf()),
        &SshOptions::default(),
        ServeOptions {
            cache: Some(dst.parent().unwrap().join(format!(
                "{}.cache",
                dst.file_name().unwrap().to_str().unwrap()
            ))),
            no_fsync: true,
        },
        &IncludeAll,
        opts,
        &mut |_| {},
    )
    .unwrap()
}

fn manifest(p: &Path) -> Manifest {
    scan(p, &ScanOptions::default()).unwrap().0
}

fn assert_same(a: &Manifest, b: &Manifest) {
    let pa: Vec<&str> = a.entries.iter().map(|e| e.path.as_str()).collect();
    let pb: Vec<&str> = b.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(pa, pb, "same paths");
    for (x, y) in a.entries.iter().zip(&b.entries) {
        assert_eq!(x, y, "entry {}", x.path);
    }
}

fn write(p: &Path, data: &[u8]) {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(p, data).unwrap();
}

/// Writes `n` files `d{i % dirs}/f{i}` under `root`, file `i` holding `body(i)`.
fn numbered_files(root: &Path, n: usize, dirs: usize, body: impl Fn(usize) -> Vec<u8>) {
    for i in 0..n {
        write(&root.join(format!("d{}/f{i}", i % dirs)), &body(i));
    }
}

fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn build_master(m: &Path) {
    write(&m.join("etc/hosts"), b"127.0.0.1 localhost\n");
    write(&m.join("etc/empty"), b"");
    write(&m.join("big/blob"), &pseudo_random(3 << 20, 7));
    write(&m.join("bin/tool"), b"#!/bin/sh\necho hi\n");
    std::fs::set_permissions(m.join("bin/tool"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::set_permissions(m.join("etc"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("../etc/hosts", m.join("bin/hosts-link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", m.join("dangling")).unwrap();
    std::fs::hard_link(m.join("etc/hosts"), m.join("bin/hosts-hard")).unwrap();
    sh(&format!("mkfifo {}", m.join("fifo").display()));
    sh(&format!(
        "setfattr -n user.colour -v blue {}",
        m.join("etc/hosts").display()
    ));
    // A sparse file: 8 MiB with data at 1 MiB and at the end.
    let mut f = std::fs::File::create(m.join("sparse.img")).unwrap();
    f.set_len(8 << 20).unwrap();
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(1 << 20)).unwrap();
    f.write_all(&pseudo_random(4096, 3)).unwrap();
    f.seek(std::io::SeekFrom::Start((8 << 20) - 4096)).unwrap();
    f.write_all(&pseudo_random(4096, 4)).unwrap();
    drop(f);
    // One that ends in a hole (its size comes from the truncate, not from a write).
    let f = std::fs::File::create(m.join("hole-tail.img")).unwrap();
    f.write_all_at(&pseudo_random(4096, 5), 0).unwrap();
    f.set_len(3 << 20).unwrap();
    drop(f);
    sh(&format!(
        "touch -d '2001-02-03 04:05:06.123456789' {}",
        m.join("etc/hosts").display()
    ));
    if corral_testkit::is_root() {
        sh(&format!("mknod {} c 1 3", m.join("null-dev").display()));
        sh(&format!("mknod {} b 7 200", m.join("loop-dev").display()));
        sh(&format!(
            "chown 1234:2345 {}",
            m.join("etc/empty").display()
        ));
        sh(&format!(
            "setfacl -m u:4321:r-x {}",
            m.join("bin/tool").display()
        ));
        sh(&format!(
            "setfacl -d -m g:4321:rwx {}",
            m.join("etc").display()
        ));
    }
}

#[test]
fn every_file_type_round_trips() {
    let t = tempfile::tempdir().unwrap();
    let (m, c) = (t.path().join("master"), t.path().join("child"));
    std::fs::create_dir(&m).unwrap();
    std::fs::create_dir(&c).unwrap();
    build_master(&m);
    let r = push(&m, &c, &PushOptions::default());
    assert!(r.report.failed.is_empty(), "{:?}", r.report.failed);
    assert_same(&manifest(&m), &manifest(&c));
    // Hard links are links on the child too; holes stay holes.
    let h1 = std::fs::metadata(c.join("etc/hosts")).unwrap();
    let h2 = std::fs::metadata(c.join("bin/hosts-hard")).unwrap();
    assert_eq!(h1.ino(), h2.ino());
    assert_eq!(
        std::fs::metadata(c.join("hole-tail.img")).unwrap().len(),
        3 << 20
    );
    let sp = std::fs::metadata(c.join("sparse.img")).unwrap();
    assert!(
        sp.blocks() * 512 < 1 << 20,
        "sparse file allocated {} blocks",
        sp.blocks()
    );
    assert_eq!(
        std::fs::read(m.join("sparse.img")).unwrap(),
        std::fs::read(c.join("sparse.img")).unwrap()
    );
    if corral_testkit::is_root() {
        let acl = Command::new("getfacl")
            .arg("-c")
            .arg(c.join("bin/tool"))
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&acl.stdout).contains("user:4321:r-x"));
        assert_eq!(std::fs::metadata(c.join("etc/empty")).unwrap().uid(), 1234);
    } else {
        eprintln!("SKIPPED every_file_type_round_trips (devices, owners, ACLs): needs root");
    }
    // A second run has nothing to do and reads nothing again.
    let r2 = push(&m, &c, &PushOptions::default());
    assert!(r2.plan.is_empty(), "{:?}", r2.plan.items);
    assert_eq!(r2.report.files_written, 0);
}

#[test]
fn drift_sees_same_size_edit_with_restored_mtime_and_new_xattr() {
    let t = tempfile::tempdir().unwrap();
    let (m, c) = (t.path().join("master"), t.path().join("child"));
    std::fs::create_dir(&m).unwrap();
    std::fs::create_dir(&c).unwrap();
    build_master(&m);
    push(&m, &c, &PushOptions::default());
    let cache = t.path().join("drift.cache");
    let child_scan = |p: &Path| {
        scan(
            p,
            &ScanOptions {
                cache: Some(cache.clone()),
                ..Default::default()
            },
        )
        .unwrap()
    };
    child_scan(&c); // warm the cache
    // Same size, different content, mtime put back.
    let f = c.join("etc/hosts");
    let before = std::fs::metadata(&f).unwrap();
    write(&f, b"127.0.0.1 evilhost!\n");
    sh(&format!(
        "touch -d '2001-02-03 04:05:06.123456789' {}",
        f.display()
    ));
    let after = std::fs::metadata(&f).unwrap();
    assert_eq!(
        (before.len(), before.mtime(), before.mtime_nsec()),
        (after.len(), after.mtime(), after.mtime_nsec())
    );
    sh(&format!(
        "setfattr -n user.planted -v 1 {}",
        c.join("bin/tool").display()
    ));
    // rsync without -c does not see the content edit.
    let out = Command::new("rsync")
        .args(["-a", "-n", "-i", "--no-X"])
        .arg(format!("{}/", m.display()))
        .arg(format!("{}/", c.display()))
        .output()
        .unwrap();
    let rs = String::from_utf8_lossy(&out.stdout);
    assert!(!rs.contains("etc/hosts"), "rsync -n -i: {rs}");
    let (child, st) = child_scan(&c);
    assert!(
        st.hashed >= 1 && st.hashed < 5,
        "only changed files are re-read: {st:?}"
    );
    let p = plan(&manifest(&m), &child, &IncludeAll, &PlanOptions::default());
    let lines: Vec<String> = p.items.iter().map(|i| i.line()).collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(">fc") && l.ends_with(" bin/hosts-hard")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(".f") && l.ends_with("x bin/tool")),
        "{lines:?}"
    );
}

#[test]
fn big_image_edit_sends_and_writes_only_changed_chunks() {
    let t = tempfile::tempdir().unwrap();
    let (m, c) = (t.path().join("master"), t.path().join("child"));
    std::fs::create_dir(&m).unwrap();
    std::fs::create_dir(&c).unwrap();
    let size = 64 << 20;
    let mut img = pseudo_random(size, 11);
    write(&m.join("disk.img"), &img);
    push(&m, &c, &PushOptions::default());
    // 32 KiB changed in 8 scattered places.
    for i in 0..8 {
        let off = (i * 7_919_333 + 123_457) % (size - 4096);
        img[off..off + 4096].copy_from_slice(&pseudo_random(4096, 100 + i as u64));
    }
    write(&m.join("disk.img"), &img);
    // A renamed copy of the old image costs nothing either.
    let r = push(&m, &c, &PushOptions::default());
    assert!(r.report.failed.is_empty(), "{:?}", r.report.failed);
    assert_eq!(std::fs::read(c.join("disk.img")).unwrap(), img);
    eprintln!(
        "big image: {:?} bytes on the wire {}",
        r.report, r.bytes_out
    );
    assert!(r.report.literal_bytes <= 2 << 20, "{:?}", r.report);
    assert!(r.bytes_out <= 2 << 20, "{}", r.bytes_out);
    // Either the file system cloned the old file (then little is written) or the rest came
    // from the child's own copy.
    assert_eq!(
        r.report.cloned_bytes + r.report.reused_bytes + r.report.literal_bytes,
        size as u64
    );
    // Renaming costs no data.
    std::fs::rename(m.join("disk.img"), m.join("disk2.img")).unwrap();
    let r = push(
        &m,
        &c,
        &PushOptions {
            plan: PlanOptions {
                delete: true,
                ..Default::default()
            },
            ..Default::default()
        },
    );
    assert_eq!(r.report.literal_bytes, 0, "{:?}", r.report);
    assert!(!c.join("disk.img").exists());
}

#[test]
fn a_large_new_file_is_hashed_by_the_scan_and_streamed_in_parts() {
    use corral_sync::session::Progress;
    let t = tempfile::tempdir().unwrap();
    let (m, c) = (t.path().join("master"), t.path().join("child"));
    std::fs::create_dir(&m).unwrap();
    std::fs::create_dir(&c).unwrap();
    let img = pseudo_random(6 << 20, 21);
    write(&m.join("disk.img"), &img);
    write(&m.join("small"), b"small file");
    let mut planned = 0;
    let mut steps: Vec<(String, u64)> = Vec::new();
    let r = push_to(
        &m,
        &Dest::Local(c.clone()),
        &SshOptions::default(),
        ServeOptions {
            cache: Some(t.path().join("child.cache")),
            no_fsync: true,
        },
        &IncludeAll,
        &PushOptions::default(),
        &mut |p| match p {
            Progress::Planned { bytes, .. } => planned = bytes,
            Progress::Step { path, bytes } => steps.push((path, bytes)),
        },
    )
    .unwrap();
    assert!(r.report.failed.is_empty(), "{:?}", r.report.failed);
    assert_eq!(std::fs::read(c.join("disk.img")).unwrap(), img);
    assert_eq!(std::fs::read(c.join("small")).unwrap(), b"small file");
    // The large file is hashed by the scan whether or not the child's answer came first
    // (its chunk list leads its data; the small one may be left for the send), then it is
    // sent a window at a time.
    let st = &r.master_scan;
    assert_eq!(st.hashed + st.deferred, 2, "{st:?}");
    assert!(st.hashed_bytes >= img.len() as u64, "{st:?}");
    let parts: Vec<u64> = steps
        .iter()
        .filter(|(p, _)| p == "disk.img")
        .map(|(_, b)| *b)
        .collect();
    assert!(parts.len() >= 4, "{parts:?}");
    assert_eq!(parts.iter().sum::<u64>(), img.len() as u64);
    assert_eq!(steps.iter().map(|(_, b)| b).sum::<u64>(), planned);
}

#[test]
fn an_image_edit_travels_as_deltas_against_the_ranges_it_replaces() {
    let t = tempfile::tempdir().unwrap();
    let (m, c) = (t.path().join("master"), t.path().join("child"));
    std::fs::create_dir(&m).unwrap();
    std::fs::create_dir(&c).unwrap();
    let size = 32 << 20;
    let mut img = pseudo_random(size, 31);
    write(&m.join("disk.img"), &img);
    push(&m, &c, &PushOptions::default());
    // 32 KiB changed in 8 scattered places, and 1,000 bytes inserted in the middle (the
    // chunks after it move: the range it replaces is found by its neighbours).
    for i in 0..8 {
        let off = (i * 3_919_333 + 123_457) % (size - 4096);
        img[off..off + 4096].copy_from_slice(&pseudo_random(4096, 300 + i as u64));
    }
    let mid = size / 2 + 777;
    img.splice(mid..mid, pseudo_random(1000, 400));
    write(&m.join("disk.img"), &img);
    let r = push(&m, &c, &PushOptions::default());
    assert!(r.report.failed.is_empty(), "{:?}", r.report.failed);
    assert_eq!(std::fs::read(c.join("disk.img")).unwrap(), img);
    eprintln!(
        "image edit: {:?}, {} out, {} in",
        r.report, r.bytes_out, r.bytes_in
    );
    // About the bytes changed travel (33 KiB, a few blocks around each edit), not the
    // chunks around them (9 or more chunks of 16-256 KiB: 600 KiB or more), nor the file's
    // whole chunk list (about 18 KiB for 32 MiB): it goes as edits of the child's.
    assert!(r.report.literal_bytes <= 64 << 10, "{:?}", r.report);
    assert!(r.bytes_out <= 64 << 10, "{}", r.bytes_out);
    // The child's answers: the signatures of the ranges (about 1 KB each) and, of its chunk
    // list (18.4 KB), only the ranges that changed.
    assert!(r.bytes_in <= 20 << 10, "{}", r.bytes_in);
    // And the child's copy is the master's, chunk for chunk.
    assert_same(&manifest(&m), &manifest(&c));
}

#[test]
fn a_large_tree_with_an_image_lists_only_the_image_chunks_that_changed() {
    // More entries than a child sends whole: the range exchange, the early signature request
    // for the small files that changed, and the image's chunk ranges, in one run.
    let t = tempfile::tempdir().unwrap();
    let (m, c) = (t.path().join("master"), t.path().join("child"));
    std::fs::create_dir(&m).unwrap();
    std::fs::create_dir(&c).unwrap();
    numbered_files(&m, 400, 20, |i| pseudo_random(3000 + i, i as u64));
    let size = 24 << 20;
    let mut img = pseudo_random(size, 41);
    write(&m.join("img/disk.img"), &img);
    push(&m, &c, &PushOptions::default());
    for i in [3usize, 150, 377] {
        let p = m.join(format!("d{}/f{i}", i % 20));
        let mut b = std::fs::read(&p).unwrap();
        b[100] ^= 0xff;
        write(&p, &b);
    }
    for i in 0..4 {
        let off = (i * 5_111_111 + 77_777) % (size - 4096);
        img[off..off + 4096].copy_from_slice(&pseudo_random(4096, 500 + i as u64));
    }
    write(&m.join("img/disk.img"), &img);
    let r = push(&m, &c, &PushOptions::default());
    assert!(r.report.failed.is_empty(), "{:?}", r.report.failed);
    assert_same(&manifest(&m), &manifest(&c));
    eprintln!(
        "tree + image: {:?}, {} out, {} in",
        r.report, r.bytes_out, r.bytes_in
    );
    // (The image's chunk list alone is 13.8 KB.)
    assert!(r.bytes_in <= 12 << 10, "{}", r.bytes_in);
    assert!(r.bytes_out <= 64 << 10, "{}", r.bytes_out);
    // A rename of the image: the child's old path is listed whole (the master has no copy
    // of its ranges) and its chunks are reused, none sent.
    std::fs::rename(m.join("img/disk.img"), m.join("img/disk2.img")).unwrap();
    let r = push(
        &m,
        &c,
        &PushOptions {
            plan: PlanOptions {
                delete: true,
                ..Default::default()
            },
            ..Default::default()
        },
    );
    assert_eq!(r.report.literal_bytes, 0, "{:?}", r.report);
    assert_same(&manifest(&m), &manifest(&c));
}

#[test]
fn backup_and_rollback_restore_the_previous_tree() {
    let t = tempfile::tempdir().unwrap();
    let (m, c) = (t.path().join("master"), t.path().join("child"));
    std::fs::create_dir(&m).unwrap();
    std::fs::create_dir(&c).unwrap();
    write(&m.join("a"), b"one");
    write(&m.join("d/b"), b"two");
    write(&m.join("gone"), b"old");
    push(&m, &c, &PushOptions::default());
    let before = manifest(&c);
    write(&m.join("a"), b"ONE!");
    std::fs::remove_file(m.join("gone")).unwrap();
    write(&m.join("d/new"), b"new");
    let opts = PushOptions {
        plan: PlanOptions {
            delete: true,
            ..Default::default()
        },
        run: RunOptions {
            backup: Some(("backup".into(), "run1".into())),
            ..Default::default()
        },
        ..Default::default()
    };
    let r = push(&m, &c, &opts);
    assert!(r.report.failed.is_empty(), "{:?}", r.report.failed);
    assert_eq!(std::fs::read(c.join("a")).unwrap(), b"ONE!");
    assert!(!c.join("gone").exists());
    assert_eq!(std::fs::read(c.join("backup/run1/gone")).unwrap(), b"old");
    let rep = corral_sync::rollback::rollback(&c, "backup", "run1").unwrap();
    assert!(rep.restored >= 2 && rep.removed >= 1, "{rep:?}");
    let after = scan(
        &c,
        &ScanOptions {
            skip: vec!["backup".into()],
            ..Default::default()
        },
    )
    .unwrap()
    .0;
    let strip = |m: &Manifest| -> Vec<(String, Option<corral_sync::manifest::Hash>)> {
        m.entries
            .iter()
            .filter(|e| e.kind != Kind::Dir)
            .map(|e| (e.path.clone(), e.content.as_ref().map(|c| c.hash)))
            .collect()
    };
    assert_eq!(strip(&before), strip(&after));
}

/// Sends raw messages to a receiver and returns its final result.
fn hostile(root: &Path, msgs: Vec<Message>) -> Result<(), corral_sync::SyncError> {
    let mut input = Vec::new();
    for m in [
        Message::Hello {
            version: VERSION,
            options: RunOptions::default(),
        },
        Message::Scan {
            key: [0; 32],
            k: corral_sync::ranges::RANGE_K,
        },
    ]
    .into_iter()
    .chain(msgs)
    {
        input.extend(corral_sync::proto::encode(&m).unwrap());
    }
    let mut out = Vec::new();
    let mut f = Framed::new(&input[..], &mut out);
    corral_sync::session::serve(root, &mut f, &ServeOptions::default())
}

fn file_entry(path: &str, data: &[u8]) -> Entry {
    Entry {
        path: path.into(),
        kind: Kind::File,
        meta: corral_sync::manifest::Meta {
            mode: 0o644,
            uid: 0,
            gid: 0,
            user: None,
            group: None,
            mtime: 0,
            mtime_ns: 0,
            xattrs: vec![],
        },
        content: Some(corral_sync::manifest::Content {
            size: data.len() as u64,
            hash: corral_sync::manifest::Hash::of(data),
            chunks: vec![],
            sparse: false,
        }),
    }
}

#[test]
fn hostile_stream_writes_nothing_outside_the_root() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let outside = t.path().join("outside");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(&outside).unwrap();
    write(&outside.join("precious"), b"keep");
    // A symlink inside the root pointing out (as if swapped in during the run).
    std::os::unix::fs::symlink(&outside, root.join("sneaky")).unwrap();
    let data = b"pwned";
    let zstd = corral_sync::proto::compress(data);
    let hash = corral_sync::manifest::Hash::of(data);
    // Paths with .. or absolute paths are refused at decode time.
    for bad in ["../outside/precious", "/tmp/x", "a/../../outside/x"] {
        let r = hostile(
            &root,
            vec![Message::Apply(Op::Delete {
                path: bad.into(),
                dir: false,
            })],
        );
        assert!(r.is_err(), "{bad}");
        let r = hostile(
            &root,
            vec![
                Message::Apply(Op::Write(file_entry(bad, data))),
                Message::Data {
                    hash,
                    payload: zstd.clone(),
                },
            ],
        );
        assert!(r.is_err(), "{bad}");
    }
    // Through the symlink: every step fails, nothing is written outside.
    let r = hostile(
        &root,
        vec![
            Message::Apply(Op::Write(file_entry("sneaky/new", data))),
            Message::Data {
                hash,
                payload: zstd.clone(),
            },
            Message::Apply(Op::Delete {
                path: "sneaky/precious".into(),
                dir: false,
            }),
            Message::Apply(Op::Link {
                path: "sneaky/l".into(),
                target: "sneaky/precious".into(),
            }),
            Message::Apply(Op::Mkdir(Entry {
                kind: Kind::Dir,
                content: None,
                ..file_entry("sneaky/d", b"")
            })),
            Message::Apply(Op::Meta(Entry {
                meta: corral_sync::manifest::Meta {
                    mode: 0o777,
                    ..file_entry("", b"").meta
                },
                ..file_entry("sneaky/precious", b"keep")
            })),
            Message::Finish,
        ],
    );
    assert!(r.is_ok(), "{r:?}");
    let names: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("precious")]);
    assert_eq!(std::fs::read(outside.join("precious")).unwrap(), b"keep");
    assert_ne!(
        std::fs::metadata(outside.join("precious")).unwrap().mode() & 0o777,
        0o777
    );
    // Data that does not match its hash ends the conversation.
    let r = hostile(
        &root,
        vec![
            Message::Apply(Op::Write(file_entry("x", data))),
            Message::Data {
                hash,
                payload: corral_sync::proto::compress(b"other"),
            },
        ],
    );
    assert!(r.is_err());
    assert!(!root.join("x").exists());
}

struct NoX;
impl PathFilter for NoX {
    fn transfers(&self, rel: &str, _d: bool) -> bool {
        !rel.rsplit('/').next().unwrap_or("").starts_with('x')
    }
    fn may_delete(&self, rel: &str, d: bool) -> bool {
        self.transfers(rel, d)
    }
}

#[test]
fn excluded_paths_are_neither_sent_nor_deleted() {
    let t = tempfile::tempdir().unwrap();
    let (m, c) = (t.path().join("master"), t.path().join("child"));
    write(&m.join("keep"), b"1");
    write(&m.join("xskip"), b"2");
    write(&m.join("xdir/inner"), b"3");
    write(&c.join("xlocal"), b"child's own");
    write(&c.join("stale"), b"delete me");
    let r = push_to(
        &m,
        &Dest::Local(c.clone()),
        &SshOptions::default(),
        ServeOptions::default(),
        &NoX,
        &PushOptions {
            plan: PlanOptions {
                delete: true,
                ..Default::default()
            },
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap();
    assert!(r.report.failed.is_empty());
    assert!(c.join("keep").exists() && !c.join("xskip").exists() && !c.join("xdir").exists());
    assert!(c.join("xlocal").exists(), "protected from deletion");
    assert!(!c.join("stale").exists());
}

/// Unmounts and removes a loop-mounted scratch file system when the test ends.
struct LoopMount(std::path::PathBuf);
impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn big_image_edit_on_a_reflink_file_system_writes_only_changed_chunks() {
    if !corral_testkit::is_root() {
        eprintln!(
            "SKIPPED big_image_edit_on_a_reflink_file_system_writes_only_changed_chunks: needs root (loop mount)"
        );
        return;
    }
    if Command::new("mkfs.xfs").arg("-V").output().is_err() {
        eprintln!(
            "SKIPPED big_image_edit_on_a_reflink_file_system_writes_only_changed_chunks: needs mkfs.xfs (package xfsprogs)"
        );
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("xfs.img");
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    std::fs::File::create(&img)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    sh(&format!("mkfs.xfs -q -f -m reflink=1 {}", img.display()));
    sh(&format!(
        "mount -o loop {} {}",
        img.display(),
        mnt.display()
    ));
    let _guard = LoopMount(mnt.clone());
    let (m, c) = (mnt.join("master"), mnt.join("child"));
    std::fs::create_dir(&m).unwrap();
    std::fs::create_dir(&c).unwrap();
    let size = 96 << 20;
    let mut data = pseudo_random(size, 21);
    write(&m.join("disk.img"), &data);
    push(&m, &c, &PushOptions::default());
    for i in 0..8 {
        let off = (i * 11_000_117 + 4_321) % (size - 4096);
        data[off..off + 4096].copy_from_slice(&pseudo_random(4096, 200 + i as u64));
    }
    write(&m.join("disk.img"), &data);
    let r = push(&m, &c, &PushOptions::default());
    assert!(r.report.failed.is_empty(), "{:?}", r.report.failed);
    assert_eq!(std::fs::read(c.join("disk.img")).unwrap(), data);
    eprintln!("reflink: {:?}, {} bytes on the wire", r.report, r.bytes_out);
    assert!(
        r.report.cloned_bytes > (size as u64) * 9 / 10,
        "{:?}",
        r.report
    );
    assert!(r.report.bytes_written <= 2 << 20, "{:?}", r.report);
}

fn push_durable(src: &Path, dst: &Path) -> PushResult {
    push_to(
        src,
        &Dest::Local(dst.to_path_buf()),
        &SshOptions::default(),
        ServeOptions {
            cache: None,
            no_fsync: false,
        },
        &IncludeAll,
        &PushOptions::default(),
        &mut |_| {},
    )
    .unwrap()
}

fn tree_bytes(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_string();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Pages of `p` in the page cache (util-linux `fincore`); `None` without it.
fn cached_pages(p: &Path) -> Option<u64> {
    let out = Command::new("fincore")
        .args(["--noheadings", "--output", "PAGES"])
        .arg(p)
        .output()
        .ok()?;
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

/// Writes `p` back and drops its pages from the page cache.
fn evict(p: &Path) {
    let f = std::fs::File::open(p).unwrap();
    f.sync_all().unwrap();
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
}

/// Files the master has not cached are read past the page cache, and the child's new files
/// written past it (`O_DIRECT`, 64 KiB and more), at every size around the limits (one
/// chunk, chunked, unaligned tails): every byte arrives, and the large files' pages stay out
/// of both ends' caches (unless `CORRAL_SYNC_DIRECT=0` is set or the file system refuses it).
#[test]
fn uncached_files_are_read_and_written_past_the_page_cache() {
    let t = tempfile::tempdir().unwrap();
    let (m, c) = (t.path().join("master"), t.path().join("child"));
    let sizes = [
        100usize,
        65_535,
        65_536,
        100_001,
        1_048_576,
        1_048_577,
        3 * 1_048_576 + 17,
    ];
    for (i, n) in sizes.iter().enumerate() {
        write(&m.join(format!("d/f{i}")), &pseudo_random(*n, i as u64 + 7));
    }
    for i in 0..sizes.len() {
        evict(&m.join(format!("d/f{i}")));
    }
    std::fs::create_dir(&c).unwrap();
    let r = push_durable(&m, &c);
    assert!(r.report.failed.is_empty(), "{:?}", r.report.failed);
    let direct_here = rustix::fs::open(
        t.path().join("probe"),
        rustix::fs::OFlags::CREATE | rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::DIRECT,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .is_ok();
    let off = std::env::var("CORRAL_SYNC_DIRECT").is_ok_and(|v| v.trim() == "0");
    // cachestat(2), by which the master tells an uncached file, came with Linux 6.5.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut v = release
        .split(['.', '-'])
        .map(|x| x.parse::<u32>().unwrap_or(0));
    let cachestat = (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (6, 5);
    match cached_pages(&m.join("d/f0")) {
        _ if !direct_here || off => {
            eprintln!(
                "SKIPPED: O_DIRECT refused here or turned off: where the pages went is not checked"
            )
        }
        None => eprintln!("SKIPPED: no fincore here: where the pages went is not checked"),
        Some(_) => {
            for (i, n) in sizes.iter().enumerate().filter(|(_, n)| **n >= 65_536) {
                let pages = n.div_ceil(4096) as u64;
                let child = cached_pages(&c.join(format!("d/f{i}"))).unwrap();
                // The child's chunks' unaligned heads and tails are written through the
                // cache, a page or two each.
                assert!(
                    child < pages / 4,
                    "child f{i}: {child} of {pages} pages cached"
                );
                // A one-chunk file is read whole, past the cache; a chunked one chunk by
                // chunk, and its chunks under 64 KiB through the cache.
                if *n <= 1_048_576 && cachestat {
                    let master = cached_pages(&m.join(format!("d/f{i}"))).unwrap();
                    assert_eq!(master, 0, "master f{i}: {master} of {pages} pages cached");
                }
            }
        }
    }
    assert_eq!(tree_bytes(&m), tree_bytes(&c));
}

/// More files than one install batch (1024) with durability on, then 64-byte edits in 1% of
/// them: every file arrives byte for byte, and the edits cost a few KB each on the wire.
#[test]
fn batched_install_and_small_edits_as_deltas() {
    let t = tempfile::tempdir().unwrap();
    let (m, c) = (t.path().join("master"), t.path().join("child"));
    std::fs::create_dir(&m).unwrap();
    std::fs::create_dir(&c).unwrap();
    let n = 1300;
    let size = |i: usize| 2048 + (i * 7919) % (96 * 1024);
    numbered_files(&m, n, 13, |i| {
        if i % 2 == 0 {
            pseudo_random(size(i), i as u64)
        } else {
            format!("line {i} of a text-like file\n")
                .repeat(size(i) / 20)
                .into_bytes()
        }
    });
    let r = push_durable(&m, &c);
    assert!(r.report.failed.is_empty(), "{:?}", r.report.failed);
    assert_eq!(r.report.files_written, n as u64);
    assert_eq!(tree_bytes(&m), tree_bytes(&c));
    assert_same(&manifest(&m), &manifest(&c));

    // 64 bytes edited in place in 13 files, and 100 bytes inserted in 2 more.
    let mut changed_bytes = 0;
    for i in (0..n).step_by(100) {
        let p = m.join(format!("d{}/f{i}", i % 13));
        let mut b = std::fs::read(&p).unwrap();
        let off = b.len() / 3;
        b[off..off + 64].copy_from_slice(&pseudo_random(64, 1000 + i as u64));
        changed_bytes += b.len();
        write(&p, &b);
    }
    for i in [7usize, 8] {
        let p = m.join(format!("d{}/f{i}", i % 13));
        let mut b = std::fs::read(&p).unwrap();
        b.splice(100..100, pseudo_random(100, i as u64));
        changed_bytes += b.len();
        write(&p, &b);
    }
    // The child sends its range digests (about 330 of 8 bytes) and lists only the ranges
    // around the 15 edited files, not its 1,300 entries (about 70 KB as a full listing): a
    // dry run exchanges little more than that.
    let dry = push(
        &m,
        &c,
        &PushOptions {
            dry_run: true,
            ..PushOptions::default()
        },
    );
    assert_eq!(
        dry.plan
            .ops
            .iter()
            .filter(|o| matches!(o, Op::Write(_)))
            .count(),
        15
    );
    eprintln!("dry run: {} bytes in, {} out", dry.bytes_in, dry.bytes_out);
    assert!(
        dry.bytes_in + dry.bytes_out < 10_000,
        "{} bytes received, {} sent",
        dry.bytes_in,
        dry.bytes_out
    );
    let r = push_durable(&m, &c);
    assert!(r.report.failed.is_empty(), "{:?}", r.report.failed);
    assert_eq!(r.report.files_written, 15);
    assert_eq!(tree_bytes(&m), tree_bytes(&c));
    eprintln!(
        "15 edited files of {changed_bytes} bytes: {} bytes sent, {:?}",
        r.bytes_out, r.report
    );
    // Whole files would be about `changed_bytes` (half of them random); deltas cost a few
    // blocks each (the Apply frames with their entries included).
    assert!(r.bytes_out < 15 * 4096, "{} bytes sent", r.bytes_out);

    assert!(r.report.literal_bytes < 15 * 2 * 2048, "{:?}", r.report);
    assert_eq!(
        r.report.literal_bytes + r.report.reused_bytes,
        changed_bytes as u64
    );
}

/// A master with a hash cache knows which of its files changed since its last run: it asks
/// for their signatures with its request for the child's ranges, before it has the listing,
/// and the child's answer to that is read after the plan. Files edited on the master travel
/// as deltas, one the child changed by itself (the master's copy unchanged) is asked for
/// after the plan, a file new on the master is asked for early and gets an empty signature,
/// and every byte arrives.
#[test]
fn signatures_of_the_masters_changed_files_are_asked_for_early() {
    let t = tempfile::tempdir().unwrap();
    let (m, c) = (t.path().join("master"), t.path().join("child"));
    std::fs::create_dir(&m).unwrap();
    std::fs::create_dir(&c).unwrap();
    let n = 600;
    numbered_files(&m, n, 7, |i| pseudo_random(4096 + i * 13, i as u64));
    let opts = PushOptions {
        cache: Some(t.path().join("master.cache")),
        ..PushOptions::default()
    };
    let r = push(&m, &c, &opts);
    assert_eq!(r.report.files_written, n as u64);
    // The master edits 6 files in place and adds one; the child edits another by itself.
    let edit = |root: &Path, i: usize, seed: u64| {
        let p = root.join(format!("d{}/f{i}", i % 7));
        let mut b = std::fs::read(&p).unwrap();
        b[1000..1064].copy_from_slice(&pseudo_random(64, seed));
        write(&p, &b);
    };
    for i in (0..n).step_by(100) {
        edit(&m, i, 7000 + i as u64);
    }
    write(&m.join("d0/new"), &pseudo_random(8192, 99));
    edit(&c, 55, 5);
    // The master's side of the conversation, recorded: Wanted, then SigRequest at once.
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let sent = std::sync::Mutex::new(Vec::new());
    let r = std::thread::scope(|s| {
        let c2 = c.clone();
        s.spawn(move || {
            let mut f = Framed::new(std::io::BufReader::new(b.try_clone().unwrap()), b);
            corral_sync::session::serve(&c2, &mut f, &ServeOptions::default())
        });
        let mut f = Framed::new(a.try_clone().unwrap(), Tee(a, &sent));
        corral_sync::session::push(&m, &mut f, &IncludeAll, &opts, &mut |_| {})
    })
    .unwrap();
    assert!(r.report.failed.is_empty(), "{:?}", r.report.failed);
    assert_eq!(r.report.files_written, 8);
    assert_eq!(tree_bytes(&m), tree_bytes(&c));
    // 8 files of a few KB each, 7 of them as deltas: far less than their size on the wire.
    assert!(r.bytes_out < 8 * 4096, "{} bytes sent", r.bytes_out);
    let sent = sent.into_inner().unwrap();
    let mut f = Framed::new(&sent[..], Vec::new());
    let mut seen = Vec::new();
    while let Ok(fr) = f.recv_data(1 << 24) {
        seen.push(match fr {
            corral_sync::proto::Frame::Data { .. } => "Data".to_string(),
            corral_sync::proto::Frame::Other(Message::SigRequest(p)) => format!("SigRequest {p:?}"),
            corral_sync::proto::Frame::Other(m) => format!("{m:?}")
                .split(['(', ' ', '{'])
                .next()
                .unwrap()
                .to_string(),
        });
    }
    let wanted = seen
        .iter()
        .position(|m| m == "Wanted")
        .expect("ranges asked for");
    assert_eq!(
        seen[wanted + 1],
        r#"SigRequest ["d0/f0", "d0/new", "d1/f400", "d2/f100", "d3/f500", "d4/f200", "d6/f300"]"#
    );
    let later: Vec<&String> = seen[wanted + 2..]
        .iter()
        .filter(|m| m.starts_with("SigRequest"))
        .collect();
    assert_eq!(later, [r#"SigRequest ["d6/f55"]"#]);
    assert!(seen.iter().any(|m| m == "Finish"), "{seen:?}");
}

/// A writer that keeps a copy of everything written through it.
struct Tee<'a>(
    std::os::unix::net::UnixStream,
    &'a std::sync::Mutex<Vec<u8>>,
);

impl std::io::Write for Tee<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        self.1.lock().unwrap().extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// A delta that does not rebuild the file (hostile or against a changed old copy) fails that
/// file's step and leaves the old copy; signatures are only made of files beneath the root.
#[test]
fn bad_delta_fails_the_step_and_keeps_the_old_file() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let old = pseudo_random(10_000, 5);
    write(&root.join("f"), &old);
    let new = pseudo_random(10_000, 6);
    let hash = corral_sync::manifest::Hash::of(&new);
    let mut input = Vec::new();
    for m in [
        Message::Hello {
            version: VERSION,
            options: RunOptions::default(),
        },
        Message::Scan {
            key: [0; 32],
            k: corral_sync::ranges::RANGE_K,
        },
        Message::SigRequest(vec!["f".into(), "missing".into()]),
        Message::Apply(Op::Write(file_entry("f", &new))),
        Message::Delta {
            hash,
            block: 256,
            ops: vec![corral_sync::delta::DeltaOp::Copy {
                index: 0,
                count: 39,
            }],
            literals: corral_sync::proto::compress(&new[..16]),
        },
        Message::Finish,
    ] {
        input.extend(corral_sync::proto::encode(&m).unwrap());
    }
    let mut out = Vec::new();
    let mut f = Framed::new(&input[..], &mut out);
    corral_sync::session::serve(&root, &mut f, &ServeOptions::default()).unwrap();
    let mut back = Framed::new(&out[..], Vec::new());
    let (mut sigs, mut report) = (None, None);
    while let Ok(m) = back.recv() {
        match m {
            Message::Sigs(s) => sigs = Some(s),
            Message::Report(r) => report = Some(r),
            _ => {}
        }
    }
    let sigs = sigs.expect("signatures answered");
    assert_eq!(sigs.len(), 2);
    assert_eq!(sigs[0].len, old.len() as u64);
    assert!(sigs[0].block > 0 && !sigs[0].blocks.is_empty());
    assert_eq!(sigs[1].block, 0, "no old copy, no signature");
    let report = report.expect("report");
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(report.failed[0].0, "f");
    assert_eq!(report.files_written, 0);
    assert_eq!(std::fs::read(root.join("f")).unwrap(), old);
    // No temporary file left behind.
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 1);
}

/// Protocol versions: a master or child of another version gets a clear error, not a
/// misread stream.
#[test]
fn other_protocol_version_is_refused_clearly() {
    let t = tempfile::tempdir().unwrap();
    let input = corral_sync::proto::encode(&Message::Hello {
        version: VERSION - 1,
        options: RunOptions::default(),
    })
    .unwrap();
    let mut out = Vec::new();
    let mut f = Framed::new(&input[..], &mut out);
    let e = corral_sync::session::serve(t.path(), &mut f, &ServeOptions::default()).unwrap_err();
    assert!(e.to_string().contains("version"), "{e}");
    // Both sides say what to do about it.
    let advice = "install the same corral release on both ends";
    assert!(e.to_string().ends_with(advice), "{e}");
    let mut back = Framed::new(&out[..], Vec::new());
    match back.recv().unwrap() {
        Message::Error(m) => assert!(
            m.contains(&format!("protocol version {} not supported", VERSION - 1))
                && m.ends_with(advice),
            "{m}"
        ),
        m => panic!("{m:?}"),
    }
    // The master's side.
    let input = corral_sync::proto::encode(&Message::Hello {
        version: VERSION - 1,
        options: RunOptions::default(),
    })
    .unwrap();
    let mut f = Framed::new(&input[..], Vec::new());
    let e = corral_sync::session::hello(&mut f, &RunOptions::default()).unwrap_err();
    assert!(
        matches!(
            e,
            corral_sync::SyncError::Proto(corral_sync::ProtoError::Version(v, w)) if v == VERSION - 1 && w == VERSION
        ),
        "{e}"
    );
}

/// Runs the master against a scripted child: its answers after `Hello`.
fn push_scripted(src: &Path, answers: Vec<Message>) -> Result<PushResult, corral_sync::SyncError> {
    let mut input = corral_sync::proto::encode(&Message::Hello {
        version: VERSION,
        options: RunOptions::default(),
    })
    .unwrap();
    for m in answers {
        input.extend(corral_sync::proto::encode(&m).unwrap());
    }
    let mut f = Framed::new(&input[..], Vec::new());
    corral_sync::session::push(
        src,
        &mut f,
        &IncludeAll,
        &PushOptions {
            dry_run: true,
            ..PushOptions::default()
        },
        &mut |_| {},
    )
}

/// Runs the master (a dry run) against a scripted child on a socket pair: `child` gets the
/// stream after the master's `Hello` and `Scan` (with the run's key and `k`) and the child's
/// `Hello` have been exchanged.
fn push_interactive(
    src: &Path,
    child: impl FnOnce(
        &mut Framed<std::os::unix::net::UnixStream, std::os::unix::net::UnixStream>,
        [u8; 32],
        u32,
    ) + Send,
) -> Result<PushResult, corral_sync::SyncError> {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut f = Framed::new(b.try_clone().unwrap(), b);
            assert!(matches!(f.recv().unwrap(), Message::Hello { .. }));
            let Message::Scan { key, k } = f.recv().unwrap() else {
                panic!("no scan request")
            };
            f.send(&Message::Hello {
                version: VERSION,
                options: RunOptions::default(),
            })
            .unwrap();
            f.flush().unwrap();
            child(&mut f, key, k);
            // The master may have stopped reading: a failed write is its refusal.
        });
        let mut f = Framed::new(a.try_clone().unwrap(), a);
        let r = corral_sync::session::push(
            src,
            &mut f,
            &IncludeAll,
            &PushOptions {
                dry_run: true,
                ..PushOptions::default()
            },
            &mut |_| {},
        );
        drop(f);
        r
    })
}

/// Sends `digests` as a child's range digests, in two batches.
fn send_digests<W: std::io::Write, R: std::io::Read>(
    f: &mut Framed<R, W>,
    digests: &[corral_sync::ranges::Digest],
) {
    let (x, y) = digests.split_at(digests.len() / 2);
    for m in [
        Message::RangeDigests(x.to_vec()),
        Message::RangeDigests(y.to_vec()),
        Message::RangesEnd,
    ] {
        let _ = f.send(&m);
    }
    let _ = f.flush();
}

/// The child sends its range digests made with the master's key unasked; the master asks
/// only for the ranges it does not hold and refuses a listing that does not fit its ranges,
/// with a clear error. A child with every range is asked nothing; one with none lists
/// nothing and plans as an empty child.
#[test]
fn child_answer_must_match_the_masters_ranges() {
    let t = tempfile::tempdir().unwrap();
    let m = t.path().join("m");
    numbered_files(&m, 200, 5, |i| format!("{i}").into_bytes());
    let master = manifest(&m);
    let msg = |r: Result<PushResult, corral_sync::SyncError>| match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    // Holding everything: nothing to do, and the next message is the dry run's Bye.
    let r = push_interactive(&m, |f, key, k| {
        send_digests(f, &corral_sync::ranges::digests(&key, &master.entries, k));
        assert_eq!(f.recv().unwrap(), Message::Bye);
    })
    .unwrap();
    assert!(r.plan.is_empty(), "{:?}", r.plan.items);
    // Holding nothing (no digests): an empty child, asked for nothing.
    let r = push_interactive(&m, |f, _, _| {
        send_digests(f, &[]);
        assert_eq!(f.recv().unwrap(), Message::Bye);
    })
    .unwrap();
    assert_eq!(r.plan.items.len(), master.entries.len());
    // One file edited on the child: the master asks for exactly its range and plans it.
    let mut edited = master.clone();
    let i = edited
        .entries
        .iter()
        .position(|e| e.path == "d1/f6")
        .unwrap();
    edited.entries[i].content.as_mut().unwrap().hash = corral_sync::manifest::Hash::of(b"x");
    let r = push_interactive(&m, |f, key, k| {
        send_digests(f, &corral_sync::ranges::digests(&key, &edited.entries, k));
        let Message::Wanted(bits) = f.recv().unwrap() else {
            panic!("no range request")
        };
        assert_eq!(bits.iter().map(|b| b.count_ones()).sum::<u32>(), 1);
        let listed = corral_sync::ranges::listing(k, &edited.entries, &bits).unwrap();
        assert!(listed.iter().any(|e| e.path == "d1/f6"));
        let _ = f.send(&Message::Entries(listed));
        let _ = f.send(&Message::EntriesEnd);
        let _ = f.flush();
        assert_eq!(f.recv().unwrap(), Message::Bye);
    })
    .unwrap();
    let changed: Vec<_> = r.plan.items.iter().map(|i| i.path.as_str()).collect();
    assert_eq!(changed, ["d1/f6"]);
    // Asked for a range, listing a path inside a range it claims to hold.
    let e = msg(push_interactive(&m, |f, key, k| {
        send_digests(f, &corral_sync::ranges::digests(&key, &edited.entries, k));
        let _ = f.recv();
        let _ = f.send(&Message::Entries(vec![master.entries[10].clone()]));
        let _ = f.send(&Message::EntriesEnd);
        let _ = f.flush();
    }));
    assert!(e.contains("does not match the ranges"), "{e}");
    // Something else than the listing.
    let e = msg(push_interactive(&m, |f, key, k| {
        send_digests(f, &corral_sync::ranges::digests(&key, &edited.entries, k));
        let _ = f.recv();
        let _ = f.send(&Message::RangesEnd);
        let _ = f.flush();
    }));
    assert!(e.contains("unexpected message"), "{e}");
    // Digests after entries.
    let e = msg(push_scripted(
        &m,
        vec![
            Message::Entries(vec![master.entries[3].clone()]),
            Message::RangeDigests(vec![[0; 8]]),
        ],
    ));
    assert!(e.contains("unexpected message"), "{e}");
}

/// A receiver refuses a range request before it has sent digests, and one whose bitmap does
/// not have one bit per range of its manifest.
#[test]
fn a_range_request_must_fit_the_childs_ranges() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    // Small: sent whole, no ranges to ask for.
    numbered_files(&root, 10, 2, |i| format!("{i}").into_bytes());
    let e = hostile(&root, vec![Message::Wanted(vec![1])]).unwrap_err();
    assert!(e.to_string().contains("unexpected message"), "{e}");
    // Large: a bitmap one byte too long.
    numbered_files(&root, 400, 4, |i| format!("{i}").into_bytes());
    let child = manifest(&root);
    let n = corral_sync::ranges::cut(&child.entries, corral_sync::ranges::RANGE_K).len();
    let e = hostile(&root, vec![Message::Wanted(vec![0; n.div_ceil(8) + 1])]).unwrap_err();
    assert!(e.to_string().contains("range bitmap has"), "{e}");
    hostile(
        &root,
        vec![Message::Wanted(vec![0; n.div_ceil(8)]), Message::Bye],
    )
    .unwrap();
}

/// A child may send its whole manifest instead of its range digests, but only a small one,
/// each path once.
#[test]
fn a_whole_child_manifest_is_small_and_consistent() {
    let t = tempfile::tempdir().unwrap();
    let m = t.path().join("m");
    numbered_files(&m, 20, 3, |i| format!("{i}").into_bytes());
    let master = manifest(&m);
    let msg = |r: Result<PushResult, corral_sync::SyncError>| match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    // The same path twice.
    let e = msg(push_scripted(
        &m,
        vec![
            Message::Entries(vec![master.entries[3].clone(), master.entries[3].clone()]),
            Message::EntriesEnd,
        ],
    ));
    assert!(e.contains("does not match the ranges"), "{e}");
    // More than WHOLE_MAX entries, in batches.
    let many: Vec<_> = (0..=corral_sync::proto::WHOLE_MAX)
        .map(|i| {
            let mut e = master.entries[3].clone();
            e.path = format!("x{i}");
            e
        })
        .collect();
    let (a, b) = many.split_at(10);
    let e = msg(push_scripted(
        &m,
        vec![
            Message::Entries(a.to_vec()),
            Message::Entries(b.to_vec()),
            Message::EntriesEnd,
        ],
    ));
    assert!(e.contains("more than"), "{e}");
    // The whole manifest, unsorted: the master sorts it and plans against it.
    let mut whole = master.entries.clone();
    whole.reverse();
    let r = push_scripted(&m, vec![Message::Entries(whole), Message::EntriesEnd]).unwrap();
    assert!(r.plan.is_empty(), "{:?}", r.plan.items);
    // An empty child: every entry is new, and a dry run lists every hash.
    let r = push_scripted(&m, vec![Message::EntriesEnd]).unwrap();
    assert_eq!(r.plan.items.len(), master.entries.len());
    let files = r
        .plan
        .items
        .iter()
        .filter(|i| i.itemize.starts_with(">f"))
        .collect::<Vec<_>>();
    assert_eq!(files.len(), 20);
    assert!(files.iter().all(|i| i.new.as_ref().unwrap().hash.is_some()));
}

/// A run with nothing to do writes nothing: neither end's hash cache is rewritten (same
/// inode, same mtime), and the child is untouched.
#[test]
fn no_change_run_rewrites_no_cache() {
    let t = tempfile::tempdir().unwrap();
    let (m, c) = (t.path().join("master"), t.path().join("child"));
    std::fs::create_dir(&m).unwrap();
    std::fs::create_dir(&c).unwrap();
    numbered_files(&m, 300, 7, |i| format!("file {i}").into_bytes());
    let master_cache = t.path().join("master.cache");
    let opts = PushOptions {
        cache: Some(master_cache.clone()),
        ..PushOptions::default()
    };
    push(&m, &c, &opts);
    // The child's cache is written by its first scan after the copy.
    let r = push(&m, &c, &opts);
    assert!(r.plan.is_empty(), "{:?}", r.plan.items);
    let child_cache = t.path().join("child.cache");
    let stamp = |p: &Path| {
        let md = std::fs::metadata(p).unwrap();
        (md.ino(), md.mtime(), md.mtime_nsec(), md.ctime_nsec())
    };
    let before = (stamp(&master_cache), stamp(&child_cache), stamp(&c));
    std::thread::sleep(std::time::Duration::from_millis(20));
    let r = push(&m, &c, &opts);
    assert!(r.plan.is_empty(), "{:?}", r.plan.items);
    assert_eq!(r.master_scan.hashed, 0, "{:?}", r.master_scan);
    assert_eq!(r.master_scan.cached, 300, "{:?}", r.master_scan);
    assert_eq!(
        before,
        (stamp(&master_cache), stamp(&child_cache), stamp(&c)),
        "a no-change run rewrote a cache or touched the child"
    );
    // One edit: the master's cache is rewritten, with the new hash.
    write(&m.join("d0/f0"), b"edited");
    let r = push(&m, &c, &opts);
    assert_eq!(r.master_scan.hashed, 1, "{:?}", r.master_scan);
    assert_ne!(stamp(&master_cache), before.0);
    assert_eq!(std::fs::read(c.join("d0/f0")).unwrap(), b"edited");
}

/// Extended attributes whose name list or value does not fit the scan's small first buffer
/// are read whole.
#[test]
fn long_xattr_lists_and_values_are_read_whole() {
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("f");
    write(&f, b"x");
    // Both over the 256 bytes of the first buffer, and within ext4's 4 KiB per inode.
    let long = "v".repeat(1000);
    let mut want = Vec::new();
    for i in 0..20 {
        let name = format!("user.attribute-number-{i:02}");
        let value = if i == 7 { long.clone() } else { format!("{i}") };
        let st = Command::new("setfattr")
            .args(["-n", &name, "-v", &value])
            .arg(&f)
            .status()
            .unwrap();
        if i == 0 && !st.success() {
            eprintln!("SKIPPED long_xattr_lists_and_values_are_read_whole: no user xattrs here");
            return;
        }
        assert!(st.success(), "setfattr {name}");
        want.push((name.into_bytes(), value.into_bytes()));
    }
    assert!(want.iter().map(|(n, _)| n.len() + 1).sum::<usize>() > 256);
    want.sort();
    assert_eq!(corral_sync::scan::read_xattrs(&f), want);
    let m = manifest(t.path());
    assert_eq!(m.get("f").unwrap().meta.xattrs, want);
}

/// The master sends `Hello` and `Scan` together; a child of another version still gets a
/// clear error back, and the master reports it.
#[test]
fn push_to_a_child_of_another_version_fails_clearly() {
    let t = tempfile::tempdir().unwrap();
    write(&t.path().join("m/a"), b"a");
    let input = corral_sync::proto::encode(&Message::Hello {
        version: VERSION + 1,
        options: RunOptions::default(),
    })
    .unwrap();
    let mut out = Vec::new();
    let mut f = Framed::new(&input[..], &mut out);
    let e = corral_sync::session::push(
        &t.path().join("m"),
        &mut f,
        &IncludeAll,
        &PushOptions::default(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            corral_sync::SyncError::Proto(corral_sync::ProtoError::Version(v, w)) if v == VERSION + 1 && w == VERSION
        ),
        "{e}"
    );
    // What the master sent: its hello, then the scan request.
    let mut sent = Framed::new(&out[..], Vec::new());
    assert!(matches!(sent.recv().unwrap(), Message::Hello { version, .. } if version == VERSION));
    assert!(matches!(
        sent.recv().unwrap(),
        Message::Scan { k, .. } if k == corral_sync::ranges::RANGE_K
    ));
}

/// The receiver's reader thread checks data before the file system sees it: a chunk whose
/// bytes do not match its hash, or a `Data` frame where no write expects one, ends the run
/// with an error and leaves no file behind.
#[test]
fn forged_or_stray_data_is_refused_by_the_receiver() {
    let good = b"the real content of the file\n".to_vec();
    let hash = corral_sync::manifest::Hash::of(&good);
    let forged = corral_sync::proto::compress(b"something else entirely\n");
    let t = tempfile::tempdir().unwrap();
    let e = hostile(
        t.path(),
        vec![
            Message::Apply(Op::Write(file_entry("f", &good))),
            Message::Data {
                hash,
                payload: forged.clone(),
            },
            Message::Finish,
        ],
    )
    .unwrap_err();
    assert!(
        matches!(e, corral_sync::SyncError::BadData(ref p) if p == "f"),
        "{e}"
    );
    assert!(!t.path().join("f").exists());

    let t = tempfile::tempdir().unwrap();
    let e = hostile(
        t.path(),
        vec![
            Message::Data {
                hash,
                payload: corral_sync::proto::compress(&good),
            },
            Message::Finish,
        ],
    )
    .unwrap_err();
    assert!(e.to_string().contains("data"), "{e}");
    assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);

    // The same frames with the right bytes write the file.
    let t = tempfile::tempdir().unwrap();
    hostile(
        t.path(),
        vec![
            Message::Apply(Op::Write(file_entry("f", &good))),
            Message::Data {
                hash,
                payload: corral_sync::proto::compress(&good),
            },
            Message::Finish,
        ],
    )
    .unwrap();
    assert_eq!(std::fs::read(t.path().join("f")).unwrap(), good);
}

/// A copy into an empty child: the child sends its whole (tiny) manifest, the master reads
/// the files it lacks only as it sends them, and still reports every hash, checks what it
/// sent, and leaves their hashes in its cache so that its next scan reads nothing.
#[test]
fn a_new_child_gets_files_read_once_and_cached() {
    let t = tempfile::tempdir().unwrap();
    let (m, c) = (t.path().join("master"), t.path().join("child"));
    std::fs::create_dir(&m).unwrap();
    std::fs::create_dir(&c).unwrap();
    numbered_files(&m, 300, 7, |i| pseudo_random(100 + i * 37, i as u64));
    write(&m.join("big/blob"), &pseudo_random(3 << 20, 9));
    write(&m.join("empty"), b"");
    let cache = t.path().join("master.cache");
    let r = push(
        &m,
        &c,
        &PushOptions {
            cache: Some(cache.clone()),
            ..PushOptions::default()
        },
    );
    assert!(r.report.failed.is_empty(), "{:?}", r.report.failed);
    assert_same(&manifest(&m), &manifest(&c));
    // Every write carries the content that was sent, and the change list its hash.
    let truth = manifest(&m);
    for op in &r.plan.ops {
        if let Op::Write(e) = op {
            assert_eq!(e.content, truth.get(&e.path).unwrap().content, "{}", e.path);
        }
    }
    for it in r.plan.items.iter().filter(|i| i.itemize.starts_with(">f")) {
        assert!(it.new.as_ref().unwrap().hash.is_some(), "{}", it.path);
    }
    eprintln!("master scan: {:?}", r.master_scan);
    // The master's next scan finds every file in its cache, deferred or not.
    let (again, st) = scan(
        &m,
        &ScanOptions {
            cache: Some(cache),
            ..ScanOptions::default()
        },
    )
    .unwrap();
    assert_eq!(st.hashed, 0, "{st:?}");
    assert_eq!(st.cached, 302, "{st:?}");
    assert_same(&again, &truth);
}
