//! Binary-level tests for `corral log`.

use std::path::{Path, PathBuf};

use corral_model::{Event, MacAddr, Outcome, SessionId, Source, UnixMillis};
use corral_store::Store;

use crate::support::{corral, text};

/// A store under `<dir>/state/corral.db` (the default path for `--site <dir>`) with five events.
fn site_with_store(dir: &Path) -> PathBuf {
    let path = dir.join("state/corral.db");
    let mut store = Store::open(&path).unwrap();
    let now = UnixMillis::from_system_time(std::time::SystemTime::now()).0;
    let hour = 3_600_000;
    let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
    let events = [
        Event::new(
            UnixMillis(now - 5 * hour),
            Source::Dhcp,
            "offer",
            Outcome::Ok,
            "old offer",
        )
        .with_mac(mac),
        Event::new(
            UnixMillis(now - 60_000),
            Source::Dhcp,
            "offer",
            Outcome::Ok,
            "matched machine web01, profile debian12",
        )
        .with_mac(mac)
        .with_hostname("web01")
        .with_ip("10.0.0.5".parse().unwrap())
        .with_session(SessionId(0x0123_4567_89ab_cdef)),
        Event::new(
            UnixMillis(now - 50_000),
            Source::Tftp,
            "read",
            Outcome::Ok,
            "served pxelinux.0",
        )
        .with_hostname("web01")
        .with_session(SessionId(0x0123_4567_89ab_cdef)),
        Event::new(
            UnixMillis(now - 40_000),
            Source::Tftp,
            "read",
            Outcome::Denied,
            "path outside the root: ../etc/shadow",
        )
        .with_ip("10.0.0.9".parse().unwrap()),
        Event::new(
            UnixMillis(now - 30_000),
            Source::Cast,
            "verified",
            Outcome::Fail,
            "receiver db02 failed block 17",
        )
        .with_hostname("db02")
        .with_details(serde_json::json!({"block": 17})),
    ];
    store.insert_events(events.iter()).unwrap();
    path
}

fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

fn reasons(stdout: &str) -> Vec<String> {
    json_lines(stdout)
        .iter()
        .map(|v| v["reason"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn table_shows_all_events_with_header() {
    let dir = tempfile::tempdir().unwrap();
    site_with_store(dir.path());
    let out = corral(dir.path(), &["log", "--site", "."]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{stdout}");
    for h in [
        "TIME", "SOURCE", "KIND", "MACHINE", "IP", "SESSION", "OUTCOME", "REASON",
    ] {
        assert!(lines[0].contains(h), "{stdout}");
    }
    assert!(
        lines[2].contains("web01") && lines[2].contains("10.0.0.5"),
        "{stdout}"
    );
    assert!(lines[2].contains("0123456789abcdef"), "{stdout}");
    assert!(lines[1].contains("52:54:00:12:34:56"), "{stdout}");
    // Aligned: every row's REASON starts in the same column.
    let col = lines[0].find("REASON").unwrap();
    assert!(
        lines[2][col..].starts_with("matched machine web01"),
        "{stdout}"
    );
    assert!(lines[5][col..].starts_with("receiver db02"), "{stdout}");
}

#[test]
fn filters_select_events() {
    let dir = tempfile::tempdir().unwrap();
    let db = site_with_store(dir.path());
    let db = db.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["log", "--db", db, "--json"];
        args.extend_from_slice(extra);
        let out = corral(dir.path(), &args);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{extra:?}: {stderr}");
        reasons(&stdout)
    };
    assert_eq!(run(&["--machine", "web01"]).len(), 2);
    assert_eq!(run(&["--machine", "52-54-00-12-34-56"]).len(), 2);
    assert_eq!(run(&["--source", "tftp"]).len(), 2);
    assert_eq!(
        run(&["--kind", "verified"]),
        ["receiver db02 failed block 17"]
    );
    assert_eq!(run(&["--session", "0123456789abcdef"]).len(), 2);
    assert_eq!(
        run(&["--outcome", "denied"]),
        ["path outside the root: ../etc/shadow"]
    );
    assert_eq!(run(&["--since", "2h"]).len(), 4);
    assert_eq!(run(&["--until", "2h"]), ["old offer"]);
    assert_eq!(
        run(&["--limit", "2"]),
        [
            "path outside the root: ../etc/shadow",
            "receiver db02 failed block 17"
        ]
    );
    assert_eq!(
        run(&["--since", "1970-01-01T00:00:00Z", "--limit", "0"]).len(),
        5
    );
}

#[test]
fn json_lines_carry_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let db = site_with_store(dir.path());
    let out = corral(
        dir.path(),
        &[
            "log",
            "--db",
            db.to_str().unwrap(),
            "--json",
            "--source",
            "cast",
        ],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v = json_lines(&stdout);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0]["id"], 5);
    assert_eq!(v[0]["source"], "cast");
    assert_eq!(v[0]["outcome"], "fail");
    assert_eq!(v[0]["hostname"], "db02");
    assert_eq!(v[0]["details"]["block"], 17);
}

#[test]
fn sql_prints_table_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let db = site_with_store(dir.path());
    let db = db.to_str().unwrap();
    let sql = "SELECT source, count(*) AS n FROM events GROUP BY source ORDER BY source";
    let out = corral(dir.path(), &["log", "--db", db, "--sql", sql]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines,
        vec![
            vec!["source", "n"],
            vec!["cast", "1"],
            vec!["dhcp", "2"],
            vec!["tftp", "2"]
        ]
    );
    let out = corral(dir.path(), &["log", "--db", db, "--sql", sql, "--json"]);
    let (stdout, _) = text(&out);
    let v = json_lines(&stdout);
    assert_eq!(v[1], serde_json::json!({"source": "dhcp", "n": 2}));
}

#[test]
fn sql_write_is_refused_with_exit_3_and_file_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let db = site_with_store(dir.path());
    let before = std::fs::read(&db).unwrap();
    for sql in [
        "DELETE FROM events",
        "DROP TABLE events",
        "PRAGMA user_version = 9",
    ] {
        let out = corral(
            dir.path(),
            &["log", "--db", db.to_str().unwrap(), "--sql", sql],
        );
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(3), "{sql}: {stderr}");
        assert!(stderr.contains("read-only"), "{stderr}");
        assert!(stderr.contains("use SELECT"), "{stderr}");
    }
    assert_eq!(std::fs::read(&db).unwrap(), before);
    let s = Store::open_read_only(&db).unwrap();
    assert_eq!(s.event_count().unwrap(), 5);
}

#[test]
fn missing_store_names_the_path_and_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    let out = corral(dir.path(), &["log", "--site", "."]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("state/corral.db"), "{stderr}");
    assert!(stderr.contains("--db"), "{stderr}");
    assert!(
        !dir.path().join("state").exists(),
        "corral log must not create anything"
    );
}

#[test]
fn foreign_file_exits_3_and_is_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("notes.txt");
    std::fs::write(&db, "not a database at all, just some notes\n").unwrap();
    let out = corral(dir.path(), &["log", "--db", db.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("not an SQLite database"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&db).unwrap(),
        "not a database at all, just some notes\n"
    );
}

#[test]
fn bad_flag_values_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["log", "--source", "dhpc"][..],
        &["log", "--since", "last tuesday"],
        &["log", "--session", "xyz"],
        &["log", "--sql", "SELECT 1", "--source", "dhcp"],
    ] {
        let out = corral(dir.path(), args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {:?}", text(&out));
    }
}

#[test]
fn help_has_examples() {
    let out = corral(&std::env::temp_dir(), &["log", "--help"]);
    let (stdout, _) = text(&out);
    assert!(out.status.success());
    assert!(stdout.contains("Examples"), "{stdout}");
    assert!(stdout.contains("--follow"), "{stdout}");
    assert!(stdout.contains("--sql"), "{stdout}");
}

#[test]
fn follow_prints_new_events_as_they_arrive() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let db = site_with_store(dir.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_corral"))
        .args([
            "log",
            "--db",
            db.to_str().unwrap(),
            "--json",
            "--follow",
            "--limit",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill the child whatever happens below.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let _guard = Kill(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(first.contains("receiver db02"), "{first}");

    let mut store = Store::open(&db).unwrap();
    store
        .insert_event(&Event::new(
            UnixMillis(1),
            Source::Http,
            "get",
            Outcome::Ok,
            "followed event",
        ))
        .unwrap();
    let start = Instant::now();
    let line = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(line.contains("followed event"), "{line}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

/// `--site` finds the store where the site's `[store] path` says, even while another part of
/// the site is invalid (that is when the log is needed most).
#[test]
fn store_path_comes_from_site_toml() {
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("site");
    let out = corral(dir.path(), &["site", "init", site.to_str().unwrap()]);
    assert!(out.status.success(), "{:?}", text(&out));
    let toml_path = site.join("site.toml");
    let original = std::fs::read_to_string(&toml_path).unwrap();
    let mut edited: toml::Table = original.parse().unwrap();
    let mut store = toml::Table::new();
    store.insert("path".into(), toml::Value::String("var/audit.db".into()));
    edited.insert("store".into(), toml::Value::Table(store));
    std::fs::write(&toml_path, toml::to_string(&edited).unwrap()).unwrap();
    // The default place holds nothing; the configured place holds the five events.
    site_with_store(&dir.path().join("elsewhere"));
    std::fs::create_dir_all(site.join("var")).unwrap();
    std::fs::rename(
        dir.path().join("elsewhere/state/corral.db"),
        site.join("var/audit.db"),
    )
    .unwrap();
    let site_arg = site.to_str().unwrap();
    let out = corral(dir.path(), &["log", "--json", "--site", site_arg]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(json_lines(&stdout).len(), 5, "{stdout}");

    // Break a machine file: the site is invalid, the log still opens the configured store.
    std::fs::write(site.join("machines/broken.toml"), "mac = 'not a mac'\n").unwrap();
    let out = corral(dir.path(), &["log", "--json", "--site", site_arg]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(json_lines(&stdout).len(), 5, "{stdout}");
}
