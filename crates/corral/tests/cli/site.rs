//! Binary-level tests for `corral site`.

use crate::support::{corral, text};

#[test]
fn help_lists_every_subcommand() {
    let dir = std::env::temp_dir();
    let out = corral(&dir, &["--help"]);
    let (stdout, _) = text(&out);
    assert!(out.status.success());
    for sub in ["demo", "site", "log", "cast"] {
        assert!(stdout.contains(sub), "--help misses {sub}: {stdout}");
    }
    assert!(stdout.contains("Exit codes"), "{stdout}");
}

#[test]
fn usage_error_exits_2() {
    let out = corral(&std::env::temp_dir(), &["no-such-command"]);
    assert_eq!(out.status.code(), Some(2));
}
