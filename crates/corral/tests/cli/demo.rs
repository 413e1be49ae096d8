//! Binary-level tests for `corral demo`: the quick start's main job must really cast and verify.

use crate::support::{corral, text};

#[test]
fn demo_help_has_examples() {
    let dir = tempfile::tempdir().unwrap();
    let out = corral(dir.path(), &["demo", "--help"]);
    let (stdout, _) = text(&out);
    assert!(out.status.success());
    assert!(stdout.contains("Examples:"), "{stdout}");
    assert!(stdout.contains("--receivers"), "{stdout}");
}

#[test]
fn demo_rejects_bad_loss_as_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let out = corral(dir.path(), &["demo", "--loss", "0.9"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("--loss 0.9 is outside"), "{stderr}");
}

/// The demo over loopback multicast (works without root): two receivers, every copy checked,
/// and the audit store holds the session's events.
#[test]
fn demo_over_loopback_casts_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let out = corral(
        dir.path(),
        &[
            "demo",
            "--loopback",
            "--receivers",
            "2",
            "--size-mib",
            "4",
            "--loss",
            "0",
            "--keep",
            "--workdir",
            work.to_str().unwrap(),
        ],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("demo OK: 2 receivers"), "{stdout}");
    let image = std::fs::read(work.join("disk.img")).unwrap();
    assert_eq!(image.len(), 4 << 20);
    for i in 1..=2 {
        let copy = std::fs::read(work.join(format!("receiver{i}.img"))).unwrap();
        assert!(copy == image, "receiver{i}'s copy differs from the image");
    }
    // The store recorded the session from both ends.
    let db = work.join("corral.db");
    let log = corral(
        dir.path(),
        &[
            "log",
            "--json",
            "--source",
            "cast",
            "--db",
            db.to_str().unwrap(),
        ],
    );
    let (events, err) = text(&log);
    assert!(log.status.success(), "{err}");
    assert!(events.lines().count() >= 4, "{events}");
    assert!(
        events.contains("receiver1") && events.contains("receiver2"),
        "{events}"
    );
}

/// The full lab in network namespaces, with loss on one receiver (root only).
#[test]
fn demo_in_namespaces_with_loss() {
    if !corral_testkit::is_root() {
        eprintln!("SKIPPED demo_in_namespaces_with_loss: needs root for network namespaces");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = corral(
        dir.path(),
        &[
            "demo",
            "--receivers",
            "3",
            "--size-mib",
            "8",
            "--loss",
            "0.05",
        ],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("demo OK: 3 receivers"), "{stdout}");
    assert_eq!(
        stdout.matches("identical to the image").count(),
        3,
        "{stdout}"
    );
}
