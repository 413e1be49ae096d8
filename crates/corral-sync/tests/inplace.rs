//! In-place updates of large files behind an undo journal: bytes written, a receiver killed
//! mid-update and recovered, the fallbacks (hard links, backups).
//!
//! Each push runs in a child process (this test binary re-run with [`HELPER`] set) so that
//! the receiver's threshold can be lowered through its environment, the process can abort
//! mid-update, and `/proc/self/io` counts only that push.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use corral_sync::filter::IncludeAll;
use corral_sync::journal;
use corral_sync::proto::{Report, RunOptions};
use corral_sync::session::{PushOptions, ServeOptions};
use corral_sync::transport::{Dest, SshOptions, push_to};

const HELPER: &str = "CORRAL_INPLACE_TEST_HELPER";
const SIZE: usize = 16 << 20;

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

fn write_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/io").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Not a test: the body of a helper process (does nothing unless [`HELPER`] is set).
#[test]
fn helper_push_child_process() {
    let Ok(spec) = std::env::var(HELPER) else {
        return;
    };
    let mut parts = spec.split('|');
    let (src, dst, backup) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let dst = Path::new(dst);
    // Earlier dirty pages of the child's files must not hide this push's writes.
    let d = std::fs::File::open(dst).unwrap();
    rustix::fs::syncfs(&d).unwrap();
    let before = write_bytes();
    let r = push_to(
        Path::new(src),
        &Dest::Local(dst.to_path_buf()),
        &SshOptions::default(),
        ServeOptions {
            cache: None,
            no_fsync: false,
        },
        &IncludeAll,
        &PushOptions {
            run: RunOptions {
                backup: (!backup.is_empty()).then(|| (backup.to_string(), "run1".to_string())),
                ..RunOptions::default()
            },
            ..PushOptions::default()
        },
        &mut |_| {},
    )
    .unwrap();
    let after = write_bytes();
    println!(
        "HELPER-RESULT {} {}",
        after - before,
        serde_json::to_string(&r.report).unwrap()
    );
}

struct Run {
    ok: bool,
    write_bytes: u64,
    report: Option<Report>,
}

/// Pushes `src` to `dst` in a child process whose receiver updates files of 4 MiB and more
/// in place; `crash_after` makes it abort after that many extent writes.
fn push(src: &Path, dst: &Path, backup: &str, crash_after: Option<u64>) -> Run {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "--exact",
        "helper_push_child_process",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(
        HELPER,
        format!("{}|{}|{backup}", src.display(), dst.display()),
    )
    .env("CORRAL_SYNC_IN_PLACE_MIN", (4u64 << 20).to_string())
    .env_remove("CORRAL_SYNC_CRASH_AFTER_EXTENTS");
    if let Some(n) = crash_after {
        c.env("CORRAL_SYNC_CRASH_AFTER_EXTENTS", n.to_string());
    }
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.split_once("HELPER-RESULT ").map(|(_, r)| r));
    let (wb, report) = match line {
        Some(l) => {
            let (a, b) = l.split_once(' ').unwrap();
            (a.parse().unwrap(), Some(serde_json::from_str(b).unwrap()))
        }
        None => (0, None),
    };
    if crash_after.is_none() {
        assert!(
            out.status.success(),
            "helper failed: {}\n{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Run {
        ok: out.status.success(),
        write_bytes: wb,
        report,
    }
}

/// A master with a 16 MiB image pushed once to the child; returns (master, child) and the
/// image before and after 32 KiB of scattered edits (already written on the master).
fn setup(t: &Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>, Vec<u8>) {
    let (m, c) = (t.join("master"), t.join("child"));
    std::fs::create_dir(&m).unwrap();
    std::fs::create_dir(&c).unwrap();
    let old = pseudo_random(SIZE, 11);
    std::fs::write(m.join("disk.img"), &old).unwrap();
    std::fs::write(m.join("small"), b"small file").unwrap();
    push(&m, &c, "", None);
    assert_eq!(std::fs::read(c.join("disk.img")).unwrap(), old);
    let mut new = old.clone();
    for i in 0..8 {
        let off = (i * 1_979_333 + 123_457) % (SIZE - 4096);
        new[off..off + 4096].copy_from_slice(&pseudo_random(4096, 100 + i as u64));
    }
    std::fs::write(m.join("disk.img"), &new).unwrap();
    (m, c, old, new)
}

#[test]
fn scattered_edits_are_written_in_place_with_about_the_changed_bytes() {
    let t = tempfile::tempdir().unwrap();
    let (m, c, _old, new) = setup(t.path());
    let ino = std::fs::metadata(c.join("disk.img")).unwrap().ino();
    let r = push(&m, &c, "", None);
    let rep = r.report.unwrap();
    eprintln!("in place: {rep:?}, write_bytes {}", r.write_bytes);
    assert!(rep.failed.is_empty(), "{:?}", rep.failed);
    assert_eq!(std::fs::read(c.join("disk.img")).unwrap(), new);
    assert_eq!(
        std::fs::metadata(c.join("disk.img")).unwrap().ino(),
        ino,
        "updated in place, not replaced"
    );
    assert!(!c.join(journal::DIR).exists(), "journal removed");
    // 8 edits of 4 KiB touch at most 16 chunks (<= 256 KiB each, 64 KiB on average):
    // written = the new chunks + the journal of their old bytes, a small part of 16 MiB.
    assert!(rep.cloned_bytes >= (SIZE as u64) * 3 / 4, "{rep:?}");
    assert!(rep.bytes_written <= 4 << 20, "{rep:?}");
    assert!(rep.bytes_written >= 2 * 32 * 1024, "{rep:?}");
    // Each byte of the new image counted once: kept in place, or a changed chunk pulled.
    assert!(rep.literal_bytes > 0, "{rep:?}");
    assert_eq!(
        rep.cloned_bytes + rep.literal_bytes + rep.reused_bytes,
        SIZE as u64,
        "{rep:?}"
    );
    // The kernel's count of what the process wrote agrees (plus file system metadata).
    assert!(
        r.write_bytes <= rep.bytes_written + (1 << 20),
        "write_bytes {} for {rep:?}",
        r.write_bytes
    );
}

#[test]
fn a_hard_linked_image_is_replaced_not_changed_in_place() {
    let t = tempfile::tempdir().unwrap();
    let (m, c, old, new) = setup(t.path());
    std::fs::hard_link(c.join("disk.img"), t.path().join("other-link")).unwrap();
    let ino = std::fs::metadata(c.join("disk.img")).unwrap().ino();
    let r = push(&m, &c, "", None);
    let rep = r.report.unwrap();
    assert_eq!(std::fs::read(c.join("disk.img")).unwrap(), new);
    assert_ne!(std::fs::metadata(c.join("disk.img")).unwrap().ino(), ino);
    // The other name keeps the old content; the whole file was rewritten.
    assert_eq!(std::fs::read(t.path().join("other-link")).unwrap(), old);
    assert!(rep.bytes_written >= SIZE as u64, "{rep:?}");
    assert!(
        r.write_bytes >= SIZE as u64 / 2,
        "write_bytes {}",
        r.write_bytes
    );
}

#[test]
fn with_a_backup_dir_the_old_image_is_kept_whole() {
    let t = tempfile::tempdir().unwrap();
    let (m, c, old, new) = setup(t.path());
    let r = push(&m, &c, ".corral-backup", None);
    assert!(r.report.unwrap().failed.is_empty());
    assert_eq!(std::fs::read(c.join("disk.img")).unwrap(), new);
    assert_eq!(
        std::fs::read(c.join(".corral-backup/run1/disk.img")).unwrap(),
        old
    );
}

#[test]
fn a_receiver_killed_mid_update_is_rolled_back_then_a_rerun_makes_it_new() {
    let t = tempfile::tempdir().unwrap();
    let (m, c, old, new) = setup(t.path());
    let img = c.join("disk.img");
    let old_md = std::fs::metadata(&img).unwrap();
    // Abort after two of the changed extents are written.
    let r = push(&m, &c, "", Some(2));
    assert!(!r.ok, "the helper must have died");
    let mixed = std::fs::read(&img).unwrap();
    assert_ne!(mixed, old, "some new bytes were written before the abort");
    assert_ne!(mixed, new, "not all of them");
    let jd = c.join(journal::DIR);
    assert_eq!(
        std::fs::read_dir(&jd).unwrap().count(),
        1,
        "one journal left"
    );
    // Recovery alone (what `corral sync recover` runs) makes it old again, byte for byte.
    let rep = journal::recover_path(&c, true).unwrap();
    assert_eq!(rep.restored, vec!["disk.img".to_string()]);
    assert_eq!(std::fs::read(&img).unwrap(), old);
    let md = std::fs::metadata(&img).unwrap();
    assert_eq!(
        (md.mtime(), md.mtime_nsec(), md.mode(), md.len()),
        (
            old_md.mtime(),
            old_md.mtime_nsec(),
            old_md.mode(),
            old_md.len()
        )
    );
    assert!(!jd.exists());

    // Killed again; this time the next run recovers by itself and then makes it new.
    let r = push(&m, &c, "", Some(1));
    assert!(!r.ok);
    assert_ne!(std::fs::read(&img).unwrap(), old);
    assert!(jd.exists());
    let r = push(&m, &c, "", None);
    let rep = r.report.unwrap();
    assert!(rep.failed.is_empty(), "{:?}", rep.failed);
    assert_eq!(std::fs::read(&img).unwrap(), new);
    assert!(!jd.exists());
    assert!(rep.bytes_written <= 4 << 20, "{rep:?}");
}

#[test]
fn a_shrinking_and_a_growing_image_are_updated_in_place() {
    let t = tempfile::tempdir().unwrap();
    let (m, c, old, _) = setup(t.path());
    let img = c.join("disk.img");
    let ino = std::fs::metadata(&img).unwrap().ino();
    // Cut 1 MiB off the end, then kill the update: recovery must bring the tail back.
    let short = old[..SIZE - (1 << 20)].to_vec();
    std::fs::write(m.join("disk.img"), &short).unwrap();
    assert!(!push(&m, &c, "", Some(1)).ok || std::fs::read(&img).unwrap() == short);
    journal::recover_path(&c, true).unwrap();
    assert_eq!(std::fs::read(&img).unwrap(), old);
    let r = push(&m, &c, "", None);
    assert!(r.report.unwrap().failed.is_empty());
    assert_eq!(std::fs::read(&img).unwrap(), short);
    assert_eq!(std::fs::metadata(&img).unwrap().ino(), ino);
    // Grow it by 1 MiB of new data.
    let mut long = short.clone();
    long.extend_from_slice(&pseudo_random(2 << 20, 5));
    std::fs::write(m.join("disk.img"), &long).unwrap();
    let r = push(&m, &c, "", None);
    assert!(r.report.unwrap().failed.is_empty());
    assert_eq!(std::fs::read(&img).unwrap(), long);
    assert_eq!(std::fs::metadata(&img).unwrap().ino(), ino);
}

/// The 4 KiB pages (aligned in the file) where `a` and `b` differ, merged into runs.
fn differing_pages(a: &[u8], b: &[u8]) -> Vec<(u64, usize)> {
    let mut runs: Vec<(u64, usize)> = Vec::new();
    for (i, (x, y)) in a.chunks(4096).zip(b.chunks(4096)).enumerate() {
        if x != y {
            let at = (i * 4096) as u64;
            match runs.last_mut() {
                Some((o, l)) if *o + *l as u64 == at => *l += x.len(),
                _ => runs.push((at, x.len())),
            }
        }
    }
    runs
}

#[test]
fn only_the_differing_pages_are_journaled_and_written() {
    let t = tempfile::tempdir().unwrap();
    let (m, c, old, new) = setup(t.path());
    let img = c.join("disk.img");
    let want = differing_pages(&old, &new);
    // 8 unaligned edits of 4 KiB: each spans two pages.
    assert_eq!(want.iter().map(|(_, l)| l).sum::<usize>(), 8 * 8192);
    // Killed after the first run is written: the journal holds the old bytes of exactly the
    // differing pages.
    assert!(!push(&m, &c, "", Some(1)).ok);
    let jd = c.join(journal::DIR);
    let j = std::fs::read_dir(&jd)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let (h, ext) = journal::decode(&std::fs::read(&j).unwrap()).unwrap();
    assert_eq!(h.path, "disk.img");
    // Every extent lies in a differing page, holds the old bytes, and every differing byte
    // is in an extent (a page can be cut short where an unchanged chunk starts inside it).
    let mut covered = vec![false; SIZE];
    let mut total = 0;
    for (o, b) in &ext {
        let (o, n) = (*o as usize, b.len());
        assert!(
            want.iter()
                .any(|(w, l)| *w as usize <= o && o + n <= *w as usize + l),
            "extent {o}+{n} outside the differing pages {want:?}"
        );
        assert_eq!(b[..], old[o..o + n]);
        covered[o..o + n].fill(true);
        total += n;
    }
    for (i, (x, y)) in old.iter().zip(&new).enumerate() {
        assert!(
            x == y || covered[i],
            "byte {i} changes but is not journaled"
        );
    }
    assert!(total > 8 * 4096 && total <= 8 * 8192, "{total}");
    // Only the first extent's pages are new so far.
    let mixed = std::fs::read(&img).unwrap();
    assert_eq!(differing_pages(&old, &mixed), want[..1]);
    journal::recover_path(&c, true).unwrap();
    assert_eq!(std::fs::read(&img).unwrap(), old);
    // The full update: 64 KiB of pages written, their 64 KiB of old bytes journaled.
    let r = push(&m, &c, "", None);
    let rep = r.report.unwrap();
    assert!(rep.failed.is_empty(), "{:?}", rep.failed);
    assert_eq!(std::fs::read(&img).unwrap(), new);
    assert!(!jd.exists());
    assert!(rep.bytes_written >= 2 * total as u64, "{rep:?}");
    assert!(rep.bytes_written <= 2 * total as u64 + 4096, "{rep:?}");
}

#[test]
fn without_a_journal_the_pulled_chunks_rewrite_the_image_whole() {
    let t = tempfile::tempdir().unwrap();
    let (m, c, _old, new) = setup(t.path());
    let img = c.join("disk.img");
    let ino = std::fs::metadata(&img).unwrap().ino();
    // An immutable journal directory: no journal can be created there, so the chunks already
    // pulled for the in-place update must feed the temporary-file path instead.
    let jd = c.join(journal::DIR);
    std::fs::create_dir(&jd).unwrap();
    let chattr = |flag: &str| {
        Command::new("chattr")
            .args([flag, jd.to_str().unwrap()])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !chattr("+i") {
        eprintln!("SKIP: chattr +i does not work here");
        return;
    }
    let r = push(&m, &c, "", None);
    assert!(chattr("-i"));
    let rep = r.report.unwrap();
    assert!(rep.failed.is_empty(), "{:?}", rep.failed);
    assert_eq!(std::fs::read(&img).unwrap(), new);
    assert_ne!(std::fs::metadata(&img).unwrap().ino(), ino, "replaced");
    assert!(rep.bytes_written >= SIZE as u64, "{rep:?}");
    assert_eq!(std::fs::read_dir(&jd).unwrap().count(), 0);
    // The chunks pulled for the in-place attempt are counted once, where the temporary
    // file is written: the changed ones as literal bytes, the rest as reused (or cloned).
    assert!(rep.literal_bytes > 0, "{rep:?}");
    assert!(rep.literal_bytes < SIZE as u64 / 4, "{rep:?}");
    assert_eq!(
        rep.cloned_bytes + rep.literal_bytes + rep.reused_bytes,
        SIZE as u64,
        "{rep:?}"
    );
}
