//! Throughput of the audit store: events/s through the [`Recorder`] into a real file, against a
//! naive one-INSERT-per-transaction loop (what a straightforward "log every event" does) in the
//! same run.
//!
//! Run with `cargo run --release -p corral-store --example store_bench [-- EVENTS]`.

use std::time::{Duration, Instant};

use corral_model::{Event, MacAddr, Outcome, SessionId, Source, UnixMillis};
use corral_store::{Recorder, RecorderConfig, Store};

/// Event `i` of a boot storm: 2000 machines booting in turn, each boot a session of seven
/// events (DHCP discover/offer/request/ack, two TFTP reads, one HTTP get) carrying the
/// machine's MAC, hostname, IP and session, as the netboot engines record them.
fn event(i: u64) -> Event {
    const KINDS: [(Source, &str); 7] = [
        (Source::Dhcp, "discover"),
        (Source::Dhcp, "offer"),
        (Source::Dhcp, "request"),
        (Source::Dhcp, "ack"),
        (Source::Tftp, "read"),
        (Source::Tftp, "read"),
        (Source::Http, "get"),
    ];
    let boot = i / 7;
    let machine = boot % 2000;
    let (source, kind) = KINDS[(i % 7) as usize];
    let mac = MacAddr([0x52, 0x54, 0, 0, (machine >> 8) as u8, machine as u8]);
    Event::new(
        UnixMillis(1_700_000_000_000 + i as i64),
        source,
        kind,
        Outcome::Ok,
        "matched machine by MAC, profile debian12, state install",
    )
    .with_mac(mac)
    .with_hostname(format!("node{machine:04}"))
    .with_ip(std::net::IpAddr::from([
        10,
        0,
        (machine >> 8) as u8,
        machine as u8,
    ]))
    // As `SessionId::new` makes them: the boot's start second, then 32 random-looking bits.
    .with_session(SessionId::from_parts(
        (1_700_000_000 + boot * 7 / 1000) as u32,
        (boot.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32,
    ))
    .with_details(serde_json::json!({ "blksize": 1432, "seq": i }))
}

fn main() -> anyhow::Result<()> {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(500_000);
    let dir = tempfile::tempdir()?;
    // Other work on this machine skews absolute figures; the ratio below is what compares.
    let load = || fs_err::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at start: {}", load().trim());

    // 1. The Recorder, paced: the producer backs off when the queue is nearly full, so this
    //    measures what the writer sustains with nothing dropped.
    let path = dir.path().join("recorder.db");
    let config = RecorderConfig::default();
    let high_water = (config.capacity as u64) * 9 / 10;
    let rec = Recorder::open(&path, config)?;
    let start = Instant::now();
    for i in 0..n {
        while rec.backlog() > high_water {
            std::thread::sleep(Duration::from_micros(200));
        }
        rec.record(event(i));
    }
    rec.flush()?;
    let secs = start.elapsed().as_secs_f64();
    let sustained = n as f64 / secs;
    let dropped = rec.dropped();
    rec.shutdown()?;
    println!(
        "recorder (batched, paced producer): {n} events in {secs:.2} s = {sustained:.0} events/s, dropped {dropped}"
    );

    // 2. The Recorder, unpaced: the producer never waits; whatever the writer cannot take is
    //    dropped and counted (the network-path behaviour under overload).
    let path2 = dir.path().join("burst.db");
    let rec = Recorder::open(&path2, RecorderConfig::default())?;
    let start = Instant::now();
    for i in 0..n {
        rec.record(event(i));
    }
    let produce = start.elapsed().as_secs_f64();
    rec.flush()?;
    let secs = start.elapsed().as_secs_f64();
    let accepted = rec.accepted();
    let dropped = rec.dropped();
    let store = rec.shutdown()?.expect("first shutdown returns the store");
    let stored = store.event_count()?;
    println!(
        "recorder (unpaced burst): offered {n} in {produce:.2} s ({:.0}/s offered), accepted {accepted}, \
         dropped {dropped} (counted; stored {stored} rows incl. dropped notices), written at {:.0} events/s",
        n as f64 / produce,
        accepted as f64 / secs
    );

    // 3. The peer: one INSERT per transaction, same schema, same file settings (WAL,
    //    synchronous=NORMAL), same number of events (so both indexes grow to the same size).
    let naive_n = n;
    let mut naive = Store::open(dir.path().join("naive.db"))?;
    let start = Instant::now();
    for i in 0..naive_n {
        naive.insert_event(&event(i))?;
    }
    let secs = start.elapsed().as_secs_f64();
    let naive_rate = naive_n as f64 / secs;
    println!(
        "naive (one INSERT per transaction): {naive_n} events in {secs:.2} s = {naive_rate:.0} events/s"
    );
    println!("load average at end: {}", load().trim());
    println!(
        "ratio recorder/naive: {:.1}x (target: recorder >= 50000 events/s: {})",
        sustained / naive_rate,
        if sustained >= 50_000.0 {
            "met"
        } else {
            "MISSED"
        }
    );
    Ok(())
}
