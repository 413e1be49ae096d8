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

/// The committed example, `examples/site/`.
fn example_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/site")
}

#[test]
fn committed_example_passes_check() {
    let ex = example_dir();
    let out = corral(
        &std::env::temp_dir(),
        &["site", "check", "--site", ex.to_str().unwrap()],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert_eq!(stdout, "site OK: 3 machines, 2 profiles, 1 network\n");
}

#[test]
fn init_output_passes_check_from_cwd_and_env() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("site");
    let out = corral(tmp.path(), &["site", "init", "site"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.starts_with(&format!(
            "wrote an example site to site ({} files)\n",
            corral_site::EXAMPLE_FILES.len()
        )),
        "{stdout}"
    );
    // Same bytes as the committed example.
    for f in [
        "site.toml",
        "profiles/discover.toml",
        "machines/db01.toml",
        "templates/discover.ipxe",
    ] {
        assert_eq!(
            std::fs::read(dir.join(f)).unwrap(),
            std::fs::read(example_dir().join(f)).unwrap(),
            "{f}"
        );
    }
    // Default --site: the current directory...
    let out = corral(&dir, &["site", "check"]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    // ...unless $CORRAL_SITE says otherwise.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(["site", "check"])
        .current_dir(tmp.path())
        .env("CORRAL_SITE", &dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    assert_eq!(text(&out).0, "site OK: 3 machines, 2 profiles, 1 network\n");
}

#[test]
fn init_refuses_non_empty_dir_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("notes.txt"), "mine").unwrap();
    let dir = tmp.path().to_str().unwrap();
    let out = corral(tmp.path(), &["site", "init", dir]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("is not empty; use --force"), "{stderr}");
    assert!(!tmp.path().join("site.toml").exists());
    let out = corral(tmp.path(), &["site", "init", "--force", dir]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    assert!(tmp.path().join("site.toml").exists());
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("notes.txt")).unwrap(),
        "mine"
    );
}

/// An example site with web01's MAC broken and a stray file.
fn broken_site() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let out = corral(tmp.path(), &["site", "init", "."]);
    assert!(out.status.success(), "{:?}", text(&out));
    std::fs::write(
        tmp.path().join("machines/web01.toml"),
        "mac = \"52:54:zz:00:00:01\"\nprofile = \"debian\"\n",
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("machines/web02.toml"),
        "mac = \"52:54:00:12:34:02\"\nprofile = \"ghost\"\n",
    )
    .unwrap();
    std::fs::write(tmp.path().join("machines/notes.txt"), "x").unwrap();
    tmp
}

#[test]
fn check_prints_every_problem_and_exits_3() {
    let tmp = broken_site();
    let out = corral(tmp.path(), &["site", "check"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stdout}{stderr}");
    assert_eq!(
        stdout,
        "machines/notes.txt: warning: ignored: not a .toml file; rename it to NAME.toml if it should be loaded\n\
         machines/web01.toml:1:7: error: invalid MAC address \"52:54:zz:00:00:01\": expected six hex byte pairs like 52:54:00:12:34:56\n\
         machines/web02.toml:2:11: error: profile \"ghost\" does not exist; create profiles/ghost.toml or use one of: debian, discover\n\
         2 errors, 1 warning\n"
    );
    assert!(
        stderr.contains("corral: error: site directory . is invalid"),
        "{stderr}"
    );
}

#[test]
fn check_warnings_alone_exit_0() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(corral(tmp.path(), &["site", "init", "."]).status.success());
    std::fs::write(tmp.path().join("profiles/README"), "x").unwrap();
    let out = corral(tmp.path(), &["site", "check"]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.ends_with("site OK: 3 machines, 2 profiles, 1 network (1 warning)\n"),
        "{stdout}"
    );
}

#[test]
fn check_json() {
    let tmp = broken_site();
    let out = corral(tmp.path(), &["site", "check", "--json"]);
    assert_eq!(out.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    assert_eq!(v["valid"], false);
    assert_eq!(v["errors"], 2);
    assert_eq!(v["warnings"], 1);
    let p = &v["problems"][1];
    assert_eq!(p["severity"], "error");
    assert_eq!(p["kind"], "bad_mac");
    assert_eq!(p["file"], "machines/web01.toml");
    assert_eq!(p["line"], 1);
    assert_eq!(p["column"], 7);

    let ex = example_dir();
    let out = corral(
        tmp.path(),
        &["site", "check", "--json", "--site", ex.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["machines"], 3);
    assert_eq!(v["problems"], serde_json::json!([]));
}

#[test]
fn check_of_a_missing_directory_exits_3() {
    let tmp = tempfile::tempdir().unwrap();
    let out = corral(tmp.path(), &["site", "check", "--site", "nope"]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stdout.starts_with(".: error: site directory nope cannot be read (no such file)"),
        "{stdout}"
    );
}

#[test]
fn subcommand_help_has_examples() {
    for sub in ["init", "check"] {
        let out = corral(&std::env::temp_dir(), &["site", sub, "--help"]);
        let (stdout, _) = text(&out);
        assert!(out.status.success());
        assert!(stdout.contains("Examples:"), "{sub}: {stdout}");
        assert!(
            stdout.contains(&format!("corral site {sub}")),
            "{sub}: {stdout}"
        );
    }
}
