//! Integration tests of the audit store: opening and refusing files, filters, the recorder,
//! retention, read-only SQL, and crash consistency under SIGKILL.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use corral_model::{Event, LifecycleState, MacAddr, Outcome, SessionId, Source, UnixMillis};
use corral_store::{
    EventFilter, MachineUpdate, Recorder, RecorderConfig, Retention, Store, StoreError,
    schema::APPLICATION_ID,
};

fn mac(s: &str) -> MacAddr {
    s.parse().unwrap()
}

fn ev(t: i64, source: Source, kind: &str, outcome: Outcome) -> Event {
    Event::new(
        UnixMillis(t),
        source,
        kind,
        outcome,
        format!("{kind} at {t}"),
    )
}

fn all(store: &Store) -> Vec<corral_store::StoredEvent> {
    store.events(&EventFilter::default()).unwrap()
}

fn file_bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Opening

/// A sender and its receivers open one new store at the same moment: every open succeeds and
/// each migration is applied once (regression: "table events already exists").
#[test]
fn concurrent_opens_of_a_new_file_all_succeed() {
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("corral.db");
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (path, barrier) = (path.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    Store::open(&path).map(|s| s.schema_version().unwrap())
                })
            })
            .collect();
        for h in handles {
            let v = h.join().unwrap();
            assert_eq!(
                v.unwrap_or_else(|e| panic!("round {round}: {e}")),
                corral_store::schema::latest_version()
            );
        }
    }
}

#[test]
fn open_creates_parent_dir_wal_and_header_ids() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state/deeper/corral.db");
    let store = Store::open(&path).unwrap();
    assert!(path.is_file());
    assert_eq!(
        store.schema_version().unwrap(),
        corral_store::schema::latest_version()
    );
    drop(store);
    let raw = rusqlite::Connection::open(&path).unwrap();
    let mode: String = raw
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let app: i32 = raw
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .unwrap();
    assert_eq!(app, APPLICATION_ID);
}

#[test]
fn reopen_keeps_events_and_does_not_remigrate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corral.db");
    let mut s = Store::open(&path).unwrap();
    s.insert_event(&ev(1, Source::Dhcp, "offer", Outcome::Ok))
        .unwrap();
    drop(s);
    let s = Store::open(&path).unwrap();
    assert_eq!(all(&s).len(), 1);
}

#[test]
fn empty_file_becomes_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corral.db");
    std::fs::write(&path, b"").unwrap();
    let err = Store::open_read_only(&path).unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
    let s = Store::open(&path).unwrap();
    assert_eq!(s.event_count().unwrap(), 0);
}

#[test]
fn non_sqlite_file_is_refused_and_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corral.db");
    let content = b"hostname web01\nthis is someone's notes, not a database\n".repeat(100);
    std::fs::write(&path, &content).unwrap();
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::NotSqlite { .. }), "{err}");
    assert!(err.to_string().contains("not an SQLite database"), "{err}");
    assert!(err.to_string().contains("corral.db"), "{err}");
    assert_eq!(file_bytes(&path), content);
    assert!(!dir.path().join("corral.db-wal").exists());
    let err = Store::open_read_only(&path).unwrap_err();
    assert!(matches!(err, StoreError::NotSqlite { .. }), "{err}");
}

#[test]
fn corrupt_sqlite_file_is_refused_and_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corral.db");
    // A valid header followed by garbage where the first page should be.
    let mut content = b"SQLite format 3\0".to_vec();
    content.extend((0..8192u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    std::fs::write(&path, &content).unwrap();
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("corrupt"), "{err}");
    assert_eq!(file_bytes(&path), content);
}

#[test]
fn foreign_database_is_refused_and_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TABLE leases (ip TEXT, mac TEXT); INSERT INTO leases VALUES ('10.0.0.2', 'x');",
        )
        .unwrap();
    }
    let before = file_bytes(&path);
    let err = Store::open(&path).unwrap_err();
    assert!(
        matches!(err, StoreError::Foreign { tables: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("another application"), "{err}");
    assert_eq!(file_bytes(&path), before);

    // Another application's id, even with no tables, is also foreign.
    let path2 = dir.path().join("other.db");
    {
        let c = rusqlite::Connection::open(&path2).unwrap();
        c.execute_batch("PRAGMA application_id = 1234").unwrap();
    }
    let before = file_bytes(&path2);
    let err = Store::open(&path2).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Foreign {
                application_id: 1234,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(file_bytes(&path2), before);
}

#[test]
fn newer_schema_is_refused_with_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corral.db");
    drop(Store::open(&path).unwrap());
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch("PRAGMA user_version = 99").unwrap();
    }
    let before = file_bytes(&path);
    let err = Store::open(&path).unwrap_err();
    let latest = corral_store::schema::latest_version();
    assert!(
        matches!(err, StoreError::TooNew { found: 99, supported, .. } if supported == latest),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("99") && msg.contains(&format!("version {latest}")),
        "{msg}"
    );
    assert_eq!(file_bytes(&path), before);
    assert!(matches!(
        Store::open_read_only(&path).unwrap_err(),
        StoreError::TooNew { .. }
    ));
}

#[test]
fn read_only_open_needs_an_existing_file_and_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.db");
    let err = Store::open_read_only(&path).unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
    assert!(!path.exists(), "a read-only open must not create the file");

    let path = dir.path().join("corral.db");
    drop(Store::open(&path).unwrap());
    let mut ro = Store::open_read_only(&path).unwrap();
    assert!(ro.is_read_only());
    assert!(
        ro.insert_event(&ev(1, Source::Cli, "x", Outcome::Ok))
            .is_err()
    );
}

// ---------------------------------------------------------------------------------------------
// Queries

/// Six events across machines, sources, sessions, outcomes and times.
fn sample_store() -> Store {
    let mut s = Store::open_in_memory().unwrap();
    let a = mac("52:54:00:00:00:0a");
    let b = mac("52:54:00:00:00:0b");
    let sess = SessionId(0xabc);
    let events = [
        ev(1000, Source::Dhcp, "offer", Outcome::Ok)
            .with_mac(a)
            .with_session(sess)
            .with_ip("10.0.0.10".parse().unwrap()),
        ev(2000, Source::Tftp, "read", Outcome::Ok)
            .with_mac(a)
            .with_hostname("web01")
            .with_session(sess),
        ev(3000, Source::Tftp, "read", Outcome::Denied).with_hostname("web01"),
        ev(4000, Source::Dhcp, "offer", Outcome::Ok).with_mac(b),
        ev(5000, Source::Cast, "verified", Outcome::Fail)
            .with_hostname("db02")
            .with_details(serde_json::json!({"block": 17})),
        ev(6000, Source::Dhcp, "ack", Outcome::Ok).with_mac(b),
    ];
    s.insert_events(events.iter()).unwrap();
    s
}

fn ids(store: &Store, f: EventFilter) -> Vec<i64> {
    store.events(&f).unwrap().iter().map(|e| e.id).collect()
}

#[test]
fn events_round_trip_exactly() {
    let s = sample_store();
    let got = all(&s);
    assert_eq!(got.len(), 6);
    assert_eq!(got[4].event.details["block"], 17);
    assert_eq!(got[0].event.ip, Some("10.0.0.10".parse().unwrap()));
    assert_eq!(got[0].event.session, Some(SessionId(0xabc)));
    assert_eq!(
        got.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6]
    );
}

#[test]
fn filter_by_machine_matches_mac_in_any_spelling_or_hostname() {
    let s = sample_store();
    let by = |m: &str| {
        ids(
            &s,
            EventFilter {
                machine: Some(m.into()),
                ..Default::default()
            },
        )
    };
    assert_eq!(by("52:54:00:00:00:0a"), vec![1, 2]);
    assert_eq!(by("52-54-00-00-00-0A"), vec![1, 2]);
    assert_eq!(by("web01"), vec![2, 3]);
    assert_eq!(by("db02"), vec![5]);
    assert_eq!(by("nobody"), Vec::<i64>::new());
}

#[test]
fn filter_by_source_kind_session_outcome() {
    let s = sample_store();
    assert_eq!(
        ids(
            &s,
            EventFilter {
                source: Some(Source::Dhcp),
                ..Default::default()
            }
        ),
        vec![1, 4, 6]
    );
    assert_eq!(
        ids(
            &s,
            EventFilter {
                kind: Some("read".into()),
                ..Default::default()
            }
        ),
        vec![2, 3]
    );
    assert_eq!(
        ids(
            &s,
            EventFilter {
                session: Some(SessionId(0xabc)),
                ..Default::default()
            }
        ),
        vec![1, 2]
    );
    assert_eq!(
        ids(
            &s,
            EventFilter {
                outcome: Some(Outcome::Denied),
                ..Default::default()
            }
        ),
        vec![3]
    );
    // Filters combine with AND.
    assert_eq!(
        ids(
            &s,
            EventFilter {
                source: Some(Source::Dhcp),
                kind: Some("offer".into()),
                machine: Some("52:54:00:00:00:0b".into()),
                ..Default::default()
            }
        ),
        vec![4]
    );
}

#[test]
fn filter_by_time_window_and_after_id() {
    let s = sample_store();
    assert_eq!(
        ids(
            &s,
            EventFilter {
                since: Some(UnixMillis(3000)),
                ..Default::default()
            }
        ),
        vec![3, 4, 5, 6]
    );
    assert_eq!(
        ids(
            &s,
            EventFilter {
                until: Some(UnixMillis(3000)),
                ..Default::default()
            }
        ),
        vec![1, 2]
    );
    assert_eq!(
        ids(
            &s,
            EventFilter {
                since: Some(UnixMillis(2000)),
                until: Some(UnixMillis(5000)),
                ..Default::default()
            }
        ),
        vec![2, 3, 4]
    );
    assert_eq!(
        ids(
            &s,
            EventFilter {
                after_id: Some(4),
                ..Default::default()
            }
        ),
        vec![5, 6]
    );
}

#[test]
fn limit_keeps_the_newest_in_oldest_first_order() {
    let s = sample_store();
    assert_eq!(
        ids(
            &s,
            EventFilter {
                limit: Some(2),
                ..Default::default()
            }
        ),
        vec![5, 6]
    );
    assert_eq!(
        ids(
            &s,
            EventFilter {
                source: Some(Source::Dhcp),
                limit: Some(2),
                ..Default::default()
            }
        ),
        vec![4, 6]
    );
    assert_eq!(
        ids(
            &s,
            EventFilter {
                limit: Some(0),
                ..Default::default()
            }
        ),
        Vec::<i64>::new()
    );
}

#[test]
fn machines_track_last_seen_ip_and_state() {
    let s = Store::open_in_memory().unwrap();
    let a = mac("52:54:00:00:00:0a");
    assert_eq!(s.machine(a).unwrap(), None);
    s.touch_machine(
        a,
        Some("web01"),
        Some("10.0.0.5".parse().unwrap()),
        UnixMillis(100),
    )
    .unwrap();
    s.touch_machine(a, None, None, UnixMillis(200)).unwrap();
    s.set_machine_state(a, LifecycleState::Install, UnixMillis(300))
        .unwrap();
    let m = s.machine(a).unwrap().unwrap();
    assert_eq!(m.hostname.as_deref(), Some("web01"), "None keeps hostname");
    assert_eq!(m.last_ip, Some("10.0.0.5".parse().unwrap()));
    assert_eq!(m.last_seen, Some(UnixMillis(200)));
    assert_eq!(m.state, Some(LifecycleState::Install));
    assert_eq!(m.updated, UnixMillis(300));

    let b = mac("52:54:00:00:00:01");
    s.set_machine_state(b, LifecycleState::New, UnixMillis(5))
        .unwrap();
    s.set_machine_next_action(b, Some("boot installer debian12"), UnixMillis(6))
        .unwrap();
    let ms = s.machines().unwrap();
    assert_eq!(
        ms.iter().map(|m| m.mac).collect::<Vec<_>>(),
        vec![b, a],
        "ordered by MAC"
    );
    assert_eq!(ms[0].last_seen, None);
    assert_eq!(
        ms[0].next_action.as_deref(),
        Some("boot installer debian12")
    );
}

#[test]
fn machine_by_ip_finds_the_latest_machine_seen_at_an_address_through_the_index() {
    let s = Store::open_in_memory().unwrap();
    let ip: std::net::IpAddr = "10.0.0.7".parse().unwrap();
    assert_eq!(s.machine_by_ip(ip).unwrap(), None, "empty store");
    let old = mac("52:54:00:00:00:01");
    let new = mac("52:54:00:00:00:02");
    s.touch_machine(old, None, Some(ip), UnixMillis(100))
        .unwrap();
    s.touch_machine(new, None, Some(ip), UnixMillis(200))
        .unwrap();
    s.touch_machine(
        mac("52:54:00:00:00:03"),
        None,
        Some("10.0.0.8".parse().unwrap()),
        UnixMillis(300),
    )
    .unwrap();
    assert_eq!(s.machine_by_ip(ip).unwrap().map(|m| m.mac), Some(new));
    // `old` comes back later at the same address: it is now the one seen last.
    s.touch_machine(old, None, Some(ip), UnixMillis(400))
        .unwrap();
    assert_eq!(s.machine_by_ip(ip).unwrap().map(|m| m.mac), Some(old));
    assert_eq!(s.machine_by_ip("10.0.0.9".parse().unwrap()).unwrap(), None);
}

#[test]
fn machine_updates_merge_and_apply_in_one_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path().join("m.db")).unwrap();
    let a = mac("52:54:00:00:00:0a");
    let b = mac("52:54:00:00:00:0b");
    s.touch_machine(
        a,
        Some("web01"),
        Some("10.0.0.5".parse().unwrap()),
        UnixMillis(1),
    )
    .unwrap();
    s.set_machine_state(a, LifecycleState::Install, UnixMillis(2))
        .unwrap();

    // Two updates of `a` folded into one: the later one's fields win, missing ones keep the
    // earlier ones'.
    let mut ua = MachineUpdate::new(a, UnixMillis(10));
    ua.seen = Some(UnixMillis(10));
    ua.next_action = Some("install profile debian12".into());
    ua.ip = Some("10.0.0.6".parse().unwrap());
    let mut later = MachineUpdate::new(a, UnixMillis(20));
    later.seen = Some(UnixMillis(20));
    later.state = Some(LifecycleState::Installed);
    later.next_action = Some("boot from local disk".into());
    ua.merge(later);
    assert_eq!(ua.seen, Some(UnixMillis(20)));
    assert_eq!(
        ua.ip,
        Some("10.0.0.6".parse().unwrap()),
        "kept from the earlier update"
    );
    assert_eq!(ua.state, Some(LifecycleState::Installed));
    assert_eq!(ua.now, UnixMillis(20));

    let mut ub = MachineUpdate::new(b, UnixMillis(15));
    ub.state = Some(LifecycleState::Discovered);
    s.update_machines(&[ua, ub]).unwrap();

    let ma = s.machine(a).unwrap().unwrap();
    assert_eq!(
        ma.hostname.as_deref(),
        Some("web01"),
        "None keeps the hostname"
    );
    assert_eq!(ma.last_ip, Some("10.0.0.6".parse().unwrap()));
    assert_eq!(ma.last_seen, Some(UnixMillis(20)));
    assert_eq!(ma.state, Some(LifecycleState::Installed));
    assert_eq!(ma.next_action.as_deref(), Some("boot from local disk"));
    assert_eq!(ma.updated, UnixMillis(20));
    let mb = s.machine(b).unwrap().unwrap();
    assert_eq!(mb.state, Some(LifecycleState::Discovered));
    assert_eq!(mb.last_seen, None, "a state change alone is not a sighting");

    // Another connection sees the committed rows (the engine reads on its own connection).
    let other = Store::open(dir.path().join("m.db")).unwrap();
    assert_eq!(
        other.machine(b).unwrap().unwrap().state,
        Some(LifecycleState::Discovered)
    );
}

// ---------------------------------------------------------------------------------------------
// Recorder

#[test]
fn recorder_is_cheap_clone_send_sync() {
    fn assert_traits<T: Clone + Send + Sync + 'static>() {}
    assert_traits::<Recorder>();
}

#[test]
fn recorder_writes_from_many_threads_and_flush_waits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corral.db");
    let rec = Recorder::open(&path, RecorderConfig::default()).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let rec = rec.clone();
            std::thread::spawn(move || {
                for i in 0..500 {
                    assert!(rec.record(ev(i, Source::Tftp, &format!("t{t}"), Outcome::Ok)));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    rec.flush().unwrap();
    assert_eq!(rec.backlog(), 0);
    // A separate reader sees everything flushed, while the recorder is still running.
    let ro = Store::open_read_only(&path).unwrap();
    assert_eq!(ro.event_count().unwrap(), 2000);
    assert_eq!(rec.dropped(), 0);
    let store = rec.shutdown().unwrap().unwrap();
    assert_eq!(store.event_count().unwrap(), 2000);
    assert!(
        rec.shutdown().unwrap().is_none(),
        "second shutdown is a no-op"
    );
}

#[test]
fn full_channel_drops_counts_and_records_a_notice() {
    let rec = Recorder::spawn(
        Store::open_in_memory().unwrap(),
        RecorderConfig {
            capacity: 4,
            ..Default::default()
        },
    )
    .unwrap();
    let pause = rec.pause_writer();
    let accepted: Vec<bool> = (0..10)
        .map(|i| rec.record(ev(i, Source::Dhcp, "discover", Outcome::Info)))
        .collect();
    assert_eq!(
        accepted,
        [
            true, true, true, true, false, false, false, false, false, false
        ]
    );
    assert_eq!(rec.dropped(), 6);
    assert_eq!(rec.backlog(), 4);
    drop(pause);
    rec.flush().unwrap();
    let store = rec.shutdown().unwrap().unwrap();
    let got = all(&store);
    assert_eq!(got.len(), 5, "{got:#?}");
    assert!(got[..4].iter().all(|e| e.event.source == Source::Dhcp));
    let notice = &got[4].event;
    assert_eq!(notice.source, Source::Store);
    assert_eq!(notice.kind.as_str(), "dropped");
    assert_eq!(notice.outcome, Outcome::Warn);
    assert_eq!(notice.reason, "dropped 6 events: channel full");
    assert_eq!(notice.details["dropped"], 6);
}

#[test]
fn shutdown_drains_everything_queued() {
    let rec = Recorder::spawn(Store::open_in_memory().unwrap(), RecorderConfig::default()).unwrap();
    let pause = rec.pause_writer();
    for i in 0..3000 {
        assert!(rec.record(ev(i, Source::Sync, "file", Outcome::Ok)));
    }
    drop(pause);
    let store = rec.shutdown().unwrap().unwrap();
    assert_eq!(store.event_count().unwrap(), 3000);
    // Recording after shutdown is a counted drop, not a hang or a panic.
    assert!(!rec.record(ev(0, Source::Sync, "late", Outcome::Ok)));
    assert_eq!(rec.dropped(), 1);
}

// ---------------------------------------------------------------------------------------------
// Retention

#[test]
fn retention_by_age_removes_old_and_keeps_new_in_chunks() {
    let mut s = Store::open_in_memory().unwrap();
    let now = 10_000_000;
    let old: Vec<Event> = (0..120)
        .map(|i| ev(i, Source::Dhcp, "old", Outcome::Ok))
        .collect();
    let new: Vec<Event> = (0..30)
        .map(|i| ev(now - 1000 + i, Source::Dhcp, "new", Outcome::Ok))
        .collect();
    s.insert_events(old.iter().chain(new.iter())).unwrap();
    let policy = Retention {
        max_age: Some(Duration::from_secs(60)),
        max_events: None,
    };
    let mut steps = 0;
    loop {
        let step = s.enforce_retention(&policy, UnixMillis(now), 50).unwrap();
        steps += 1;
        assert!(step.deleted <= 50);
        if !step.more {
            break;
        }
    }
    assert_eq!(steps, 3, "120 old events in chunks of 50");
    let left = all(&s);
    assert_eq!(left.len(), 30);
    assert!(left.iter().all(|e| e.event.kind.as_str() == "new"));
}

#[test]
fn retention_by_count_keeps_the_newest() {
    let mut s = Store::open_in_memory().unwrap();
    let evs: Vec<Event> = (0..100)
        .map(|i| ev(i, Source::Tftp, "read", Outcome::Ok))
        .collect();
    s.insert_events(evs.iter()).unwrap();
    let policy = Retention {
        max_age: None,
        max_events: Some(25),
    };
    while s
        .enforce_retention(&policy, UnixMillis(0), 10)
        .unwrap()
        .more
    {}
    let left: Vec<i64> = all(&s).iter().map(|e| e.id).collect();
    assert_eq!(left, (76..=100).collect::<Vec<_>>());
}

#[test]
fn writer_thread_enforces_retention() {
    let rec = Recorder::spawn(
        Store::open_in_memory().unwrap(),
        RecorderConfig {
            retention: Retention {
                max_age: Some(Duration::from_secs(3600)),
                max_events: None,
            },
            retention_interval: Duration::from_millis(5),
            retention_chunk: 7,
            batch_window: Duration::from_millis(5),
            ..Default::default()
        },
    )
    .unwrap();
    let now = UnixMillis::from_system_time(std::time::SystemTime::now()).0;
    for i in 0..40 {
        rec.record(ev(i, Source::Http, "get", Outcome::Ok));
    }
    for i in 0..10 {
        rec.record(ev(now + i, Source::Http, "fresh", Outcome::Ok));
    }
    rec.flush().unwrap();
    // The writer deletes in chunks between batches; give it a bounded time.
    std::thread::sleep(Duration::from_millis(300));
    let store = rec.shutdown().unwrap().unwrap();
    let left = all(&store);
    assert_eq!(left.len(), 10, "{left:#?}");
    assert!(left.iter().all(|e| e.event.kind.as_str() == "fresh"));
}

// ---------------------------------------------------------------------------------------------
// Ad-hoc SQL

#[test]
fn query_sql_returns_columns_and_json_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corral.db");
    let mut s = Store::open(&path).unwrap();
    s.insert_events(
        [
            ev(1, Source::Dhcp, "offer", Outcome::Ok).with_hostname("web01"),
            ev(2, Source::Dhcp, "ack", Outcome::Ok).with_hostname("web01"),
            ev(3, Source::Tftp, "read", Outcome::Denied),
        ]
        .iter(),
    )
    .unwrap();
    drop(s);
    let r = Store::query_sql(
        &path,
        "SELECT source, count(*) AS n, max(time_ms) / 2.0 AS half, NULL AS empty \
         FROM events GROUP BY source ORDER BY source",
    )
    .unwrap();
    assert_eq!(r.columns, ["source", "n", "half", "empty"]);
    assert_eq!(
        r.rows,
        vec![
            vec![
                serde_json::json!("dhcp"),
                2.into(),
                serde_json::json!(1.0),
                serde_json::Value::Null
            ],
            vec![
                serde_json::json!("tftp"),
                1.into(),
                serde_json::json!(1.5),
                serde_json::Value::Null
            ],
        ]
    );
    let r = Store::query_sql(
        &path,
        "-- a comment\nWITH x AS (SELECT 1 AS one) SELECT * FROM x",
    )
    .unwrap();
    assert_eq!(r.rows, vec![vec![serde_json::json!(1)]]);
    let r = Store::query_sql(&path, "PRAGMA table_info(machines)").unwrap();
    assert_eq!(r.rows.len(), 7);
}

#[test]
fn query_sql_refuses_writes_and_leaves_the_file_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corral.db");
    let mut s = Store::open(&path).unwrap();
    s.insert_event(&ev(1, Source::Dhcp, "offer", Outcome::Ok))
        .unwrap();
    drop(s); // checkpoints the WAL into the main file
    let before = file_bytes(&path);
    let other = dir.path().join("other.db");
    for sql in [
        "INSERT INTO events (time_ms, source, kind, outcome, reason) VALUES (1, 'cli', 'x', 'ok', 'r')",
        "DELETE FROM events",
        "UPDATE events SET reason = 'x'",
        "DROP TABLE events",
        "CREATE TABLE t (x)",
        &format!("ATTACH DATABASE '{}' AS o", other.display()),
        "DETACH DATABASE main",
        "PRAGMA user_version = 7",
        "PRAGMA journal_mode = DELETE",
        "PRAGMA query_only = OFF",
        "VACUUM",
        "REINDEX",
        "  /* sneaky */ delete from events",
        "SELECT 1; DELETE FROM events",
        "",
    ] {
        let err = Store::query_sql(&path, sql).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, StoreError::ReadOnly { .. })
                || msg.contains("multiple statements")
                || msg.contains("Multiple statements"),
            "{sql:?} was not refused as a write: {msg}"
        );
        if matches!(err, StoreError::ReadOnly { .. }) {
            assert!(msg.contains("the store is opened read-only"), "{msg}");
            assert!(msg.contains("use SELECT"), "{msg}");
        }
    }
    assert!(!other.exists(), "ATTACH must not create a file");
    assert_eq!(file_bytes(&path), before);
    let s = Store::open_read_only(&path).unwrap();
    assert_eq!(s.event_count().unwrap(), 1);
    assert_eq!(
        s.schema_version().unwrap(),
        corral_store::schema::latest_version()
    );
}

// ---------------------------------------------------------------------------------------------
// Crash consistency

const KILL9_ENV: &str = "CORRAL_STORE_KILL9_WRITER";

/// Not a test on its own: the child process of `kill9_mid_burst_leaves_a_consistent_store`.
/// Without the environment variable it returns at once.
#[test]
fn kill9_child_writer() {
    let Ok(path) = std::env::var(KILL9_ENV) else {
        return;
    };
    let rec = Recorder::open(
        &path,
        RecorderConfig {
            capacity: 4096,
            ..Default::default()
        },
    )
    .unwrap();
    let sess = SessionId(7);
    let mut i: i64 = 0;
    let start = Instant::now();
    // Bounded: the parent kills us long before this ends.
    while start.elapsed() < Duration::from_secs(30) {
        let e = ev(i, Source::Cast, "block", Outcome::Ok)
            .with_mac(mac("52:54:00:12:34:56"))
            .with_session(sess)
            .with_details(serde_json::json!({ "seq": i }));
        if rec.record(e) {
            i += 1;
        } else {
            std::thread::yield_now();
        }
        if i == 2000 {
            rec.flush().unwrap();
            println!("WRITER-READY");
        }
    }
}

#[test]
fn kill9_mid_burst_leaves_a_consistent_store() {
    if std::env::var(KILL9_ENV).is_ok() {
        return; // we are the child
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corral.db");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "kill9_child_writer",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(KILL9_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut ready = false;
    for line in BufReader::new(stdout).lines() {
        if line.unwrap().contains("WRITER-READY") {
            ready = true;
            break;
        }
    }
    assert!(ready, "the writer child never got going");
    std::thread::sleep(Duration::from_millis(150));
    child.kill().unwrap(); // SIGKILL on Unix
    let status = child.wait().unwrap();
    assert!(!status.success());

    let store = Store::open(&path).unwrap();
    assert_eq!(store.integrity_check().unwrap(), vec!["ok".to_owned()]);
    let n = store.event_count().unwrap();
    assert!(n >= 2000, "only {n} events survived");
    assert_eq!(
        store.last_event_id().unwrap(),
        n,
        "ids are contiguous 1..=N"
    );
    let got = all(&store);
    assert_eq!(got.len() as i64, n);
    let mut seq = 0;
    for (k, e) in got.iter().enumerate() {
        assert_eq!(e.id, k as i64 + 1);
        // The child retries dropped events, so the store may also hold `dropped` notices.
        if e.event.source == Source::Store {
            assert_eq!(e.event.kind.as_str(), "dropped");
            continue;
        }
        assert_eq!(e.event.details["seq"], seq, "batches commit in order");
        assert_eq!(e.event.session, Some(SessionId(7)));
        seq += 1;
    }
    eprintln!("kill -9 test: {n} events survived intact");
}

// ---------------------------------------------------------------------------------------------
// Round trips and hand-edited rows

mod round_trip {
    use super::*;
    use proptest::prelude::*;

    fn arb_event() -> impl Strategy<Value = Event> {
        (
            (
                any::<i64>(),
                0..Source::ALL.len(),
                "[a-z.-]{1,20}",
                0..Outcome::ALL.len(),
            ),
            (
                proptest::option::of(any::<[u8; 6]>()),
                proptest::option::of(".{0,30}"),
                proptest::option::of(any::<std::net::IpAddr>()),
                proptest::option::of(any::<u64>()),
            ),
            (".{0,100}", proptest::option::of((any::<i32>(), ".{0,10}"))),
        )
            .prop_map(
                |((t, s, kind, o), (mac, host, ip, sess), (reason, details))| {
                    let mut e =
                        Event::new(UnixMillis(t), Source::ALL[s], kind, Outcome::ALL[o], reason);
                    e.mac = mac.map(MacAddr);
                    e.hostname = host;
                    e.ip = ip;
                    e.session = sess.map(SessionId);
                    if let Some((n, s)) = details {
                        e.details = serde_json::json!({ "n": n, "s": s, "list": [1, null, true] });
                    }
                    e
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_event_reads_back_identical(events in proptest::collection::vec(arb_event(), 1..20)) {
            let mut s = Store::open_in_memory().unwrap();
            s.insert_events(events.iter()).unwrap();
            let back: Vec<Event> = all(&s).into_iter().map(|e| e.event).collect();
            prop_assert_eq!(back, events);
        }
    }
}

#[test]
fn hand_edited_row_is_a_decode_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corral.db");
    let mut s = Store::open(&path).unwrap();
    s.insert_event(&ev(1, Source::Dhcp, "offer", Outcome::Ok))
        .unwrap();
    drop(s);
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch("UPDATE events SET source = 'dhpc', mac = 'zz'")
            .unwrap();
    }
    let s = Store::open_read_only(&path).unwrap();
    let err = s.events(&EventFilter::default()).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Decode {
                id: 1,
                column: "source",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("event 1"), "{err}");
}

/// Counts WARN events emitted on this thread.
struct WarnCounter(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl tracing::Subscriber for WarnCounter {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if *event.metadata().level() == tracing::Level::WARN {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn drop_warnings_are_rate_limited() {
    let rec = Recorder::spawn(
        Store::open_in_memory().unwrap(),
        RecorderConfig {
            capacity: 1,
            warn_interval: Duration::from_secs(3600),
            ..Default::default()
        },
    )
    .unwrap();
    let pause = rec.pause_writer();
    let warns = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tracing::subscriber::with_default(WarnCounter(warns.clone()), || {
        for i in 0..1000 {
            rec.record(ev(i, Source::Dhcp, "discover", Outcome::Info));
        }
    });
    assert_eq!(rec.dropped(), 999);
    assert_eq!(
        warns.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one warning per interval, not one per drop"
    );
    drop(pause);
    rec.flush().unwrap();
    let store = rec.shutdown().unwrap().unwrap();
    assert_eq!(
        all(&store).last().unwrap().event.reason,
        "dropped 999 events: channel full"
    );
}
