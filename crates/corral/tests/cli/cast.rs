//! Binary-level tests for `corral cast`: keygen, flag validation, and real sends over loopback
//! multicast (no root needed).

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{corral, text};

fn port(n: u16) -> String {
    (43_000 + (std::process::id() % 400) as u16 * 5 + n).to_string()
}

fn image(dir: &std::path::Path, len: usize) -> std::path::PathBuf {
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let p = dir.join("image");
    std::fs::write(&p, data).unwrap();
    p
}

fn receiver(dir: &std::path::Path, args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(["cast", "receive", "--interface", "127.0.0.1"])
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("corral runs")
}

/// The JSON line of `type` in `stdout` (the last one).
fn json_line(stdout: &str, kind: &str) -> serde_json::Value {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .rfind(|v| v["type"] == kind)
        .unwrap_or_else(|| panic!("no {kind} line: {stdout}"))
}

/// `corral cast send SOURCE` over loopback with key `k`, no minimum wait, 200 Mbit/s and JSON
/// lines, then `args`.
fn sender_args<'a>(source: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec![
        "cast",
        "send",
        source,
        "--interface",
        "127.0.0.1",
        "--key",
        "k",
    ];
    all.extend(["--min-wait", "0s", "--rate", "200M", "--json"]);
    all.extend(args);
    all
}

#[test]
fn keygen_writes_private_key_and_public_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = corral(dir.path(), &["cast", "keygen", "--out", "cast.key"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("cast.key.pub"), "{stdout}");
    let key = std::fs::read_to_string(dir.path().join("cast.key")).unwrap();
    let public = std::fs::read_to_string(dir.path().join("cast.key.pub")).unwrap();
    assert_eq!(key.trim().len(), 64);
    assert_eq!(public.trim().len(), 64);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("cast.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // Never overwrites a key.
    let again = corral(dir.path(), &["cast", "keygen", "--out", "cast.key"]);
    assert!(!again.status.success());
}

#[test]
fn bad_flags_are_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let out = corral(dir.path(), &["cast", "send", "x", "--rate", "fast"]);
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    let out = corral(dir.path(), &["cast", "send", "x", "--group", "10.0.0.1"]);
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    std::fs::write(dir.path().join("bad.pub"), "zz\n").unwrap();
    let out = corral(
        dir.path(),
        &["cast", "receive", "-o", "out", "--trusted-key", "bad.pub"],
    );
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    let out = corral(dir.path(), &["cast", "receive"]);
    assert_eq!(out.status.code(), Some(2), "--output or --pipe is required");
}

#[test]
fn help_has_examples() {
    for sub in ["send", "receive", "keygen", "serve", "list"] {
        let out = corral(&std::env::temp_dir(), &["cast", sub, "--help"]);
        let (stdout, _) = text(&out);
        assert!(out.status.success());
        assert!(stdout.contains("Example"), "{sub}: {stdout}");
    }
}

#[test]
fn send_and_receive_over_loopback_with_trusted_key() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 3 << 20);
    let k = corral(dir.path(), &["cast", "keygen", "--out", "k"]);
    assert!(k.status.success());
    let p = port(1);
    let rx = receiver(
        dir.path(),
        &[
            "--group",
            "239.77.3.1",
            "--port",
            &p,
            "--output",
            "out.img",
            "--trusted-key",
            "k.pub",
            "--name",
            "alpha",
            "--json",
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    let tx = corral(
        dir.path(),
        &sender_args(
            img.to_str().unwrap(),
            &["--group", "239.77.3.1", "--port", &p, "--expect", "alpha"],
        )
        .into_iter()
        .chain(["--db", "events.db"])
        .collect::<Vec<_>>(),
    );
    let (stdout, stderr) = text(&tx);
    assert!(tx.status.success(), "{stdout}\n{stderr}");
    // The same events went to the audit store.
    let log = corral(
        dir.path(),
        &["log", "--db", "events.db", "--source", "cast", "--json"],
    );
    let (logged, err) = text(&log);
    assert!(log.status.success(), "{err}");
    assert!(
        logged.contains("receiver-joined") && logged.contains("session-end"),
        "{logged}"
    );
    let summary = json_line(&stdout, "summary");
    assert_eq!(summary["report"]["receivers"][0]["name"], "alpha");
    assert_eq!(summary["report"]["receivers"][0]["ok"], true);
    assert_eq!(summary["report"]["ephemeral_key"], false);
    // The pre-pass over the image reports its progress, ending at the image's size.
    let hashed = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .rfind(|v| v["type"] == "progress" && v["progress"]["side"] == "hashing")
        .expect("a hashing progress line");
    let image_len = std::fs::metadata(&img).unwrap().len();
    assert_eq!(hashed["progress"]["bytes_done"], image_len);
    assert_eq!(hashed["progress"]["image_bytes"], image_len);
    let events: Vec<String> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "event")
        .map(|v| v["event"]["kind"].as_str().unwrap_or("").to_owned())
        .collect();
    for kind in [
        "session-start",
        "receiver-joined",
        "receiver-done",
        "session-end",
    ] {
        assert!(
            events.iter().any(|k| k == kind),
            "no {kind} event: {events:?}"
        );
    }
    let out = rx.wait_with_output().unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(
        std::fs::read(dir.path().join("out.img")).unwrap(),
        std::fs::read(&img).unwrap()
    );
}

#[test]
fn sender_exits_1_and_names_the_receiver_that_never_came() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 1 << 20);
    let p = port(2);
    let rx = receiver(
        dir.path(),
        &[
            "--group",
            "239.77.3.2",
            "--port",
            &p,
            "--output",
            "out.img",
            "--name",
            "alpha",
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    let tx = corral(
        dir.path(),
        &[
            "cast",
            "send",
            img.to_str().unwrap(),
            "--interface",
            "127.0.0.1",
            "--group",
            "239.77.3.2",
            "--port",
            &p,
            "--expect",
            "alpha,ghost",
            "--min-wait",
            "0s",
            "--max-wait",
            "2s",
            "--rate",
            "200M",
        ],
    );
    let (stdout, stderr) = text(&tx);
    assert_eq!(tx.status.code(), Some(1), "{stdout}\n{stderr}");
    // stdout is not a terminal, so the summary is a JSON line.
    let summary = json_line(&stdout, "summary");
    let rxs = summary["report"]["receivers"].as_array().unwrap();
    let ghost = rxs
        .iter()
        .find(|r| r["name"] == "ghost")
        .expect("ghost listed");
    assert_eq!(ghost["ok"], false);
    assert!(
        ghost["reason"].as_str().unwrap().contains("never joined"),
        "{ghost}"
    );
    let alpha = rxs
        .iter()
        .find(|r| r["name"] == "alpha")
        .expect("alpha listed");
    assert_eq!(alpha["ok"], true, "{alpha}");
    assert!(stderr.contains("ephemeral key"), "{stderr}");
    let out = rx.wait_with_output().unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
}

/// Daemon mode end to end with the real binary: `cast serve` offers a site's images directory,
/// `cast list` shows it, `cast receive --server --image` gets a verified copy, and the serve
/// events land in the site's store.
#[test]
fn serve_offers_site_images_to_receivers_that_ask_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("site");
    let out = corral(dir.path(), &["site", "init", site.to_str().unwrap()]);
    assert!(out.status.success(), "{:?}", text(&out));
    let images = site.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let img = image(dir.path(), 2 << 20);
    std::fs::rename(&img, images.join("web.img")).unwrap();
    let (control, data) = (port(3), port(4));
    let metrics_addr = format!("127.0.0.1:{}", crate::netboot::free_port());
    let mut server = Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(["cast", "serve", "--json", "--interface", "127.0.0.1"])
        .args(["--site", site.to_str().unwrap()])
        .args(["--control-port", &control, "--port", &data])
        .args(["--metrics", &metrics_addr])
        .args(["--min-wait", "100ms", "--max-wait", "5s"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let server_addr = format!("127.0.0.1:{control}");
    let list = corral(dir.path(), &["cast", "list", "--server", &server_addr]);
    let (stdout, stderr) = text(&list);
    assert!(list.status.success(), "{stderr}");
    assert!(
        stdout.contains("web.img") && stdout.contains("2097152"),
        "{stdout}"
    );

    let copy = dir.path().join("copy.img");
    let rx = receiver(
        dir.path(),
        &[
            "--server",
            &server_addr,
            "--image",
            "web.img",
            "--name",
            "web01",
            "--output",
            copy.to_str().unwrap(),
        ],
    );
    let out = rx.wait_with_output().unwrap();
    let missing = corral(
        dir.path(),
        &[
            "cast",
            "receive",
            "--server",
            &server_addr,
            "--image",
            "nope.img",
            "-o",
            "x",
        ],
    );
    // /metrics counts the session once it ended (the receiver may exit a moment before the
    // sender has its Done): one session ok, one receiver verified, the image's bytes.
    let mut scraped = String::new();
    for _ in 0..50 {
        scraped = http_get(&metrics_addr, "/metrics");
        if scraped.contains("corral_cast_sessions_total{outcome=\"ok\"} 1") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for series in [
        "corral_cast_sessions_total{outcome=\"ok\"} 1",
        "corral_cast_sessions_total{outcome=\"fail\"} 0",
        "corral_cast_sessions_active 0",
        "corral_cast_receivers_total{result=\"verified\"} 1",
        "corral_cast_receivers_total{result=\"failed\"} 0",
        "corral_cast_image_bytes_total 2097152",
        "corral_cast_events_total{kind=\"image-request\",outcome=\"denied\"} 1",
    ] {
        assert!(
            scraped.lines().any(|l| l == series),
            "{series} missing from /metrics:\n{scraped}"
        );
    }
    let sent: u64 = scraped
        .lines()
        .find_map(|l| l.strip_prefix("corral_cast_sent_bytes_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(sent >= 2 << 20, "sent bytes {sent} below the image's size");

    // SIGTERM: the server stops cleanly and flushes its events to the store.
    let term = Command::new("kill")
        .arg(server.id().to_string())
        .status()
        .unwrap();
    assert!(term.success());
    let stopped = server.wait().unwrap();
    assert!(
        stopped.success(),
        "cast serve exits 0 on SIGTERM: {stopped:?}"
    );
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(
        std::fs::read(&copy).unwrap() == std::fs::read(images.join("web.img")).unwrap(),
        "the copy differs from the image"
    );
    assert_eq!(missing.status.code(), Some(1), "{:?}", text(&missing));
    assert!(
        text(&missing).1.contains("no image \"nope.img\""),
        "{:?}",
        text(&missing)
    );

    // The server recorded the request in the site's store.
    let log = corral(
        dir.path(),
        &[
            "log",
            "--json",
            "--kind",
            "image-request",
            "--site",
            site.to_str().unwrap(),
        ],
    );
    let (events, err) = text(&log);
    assert!(log.status.success(), "{err}");
    assert!(events.contains("receiver web01"), "{events}");
    assert!(events.contains("nope.img"), "{events}");
}

/// The body of an HTTP/1.0 GET (status line and headers checked, then dropped).
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    write!(c, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut r = String::new();
    c.read_to_string(&mut r).unwrap();
    let (head, body) = r.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_owned()
}

/// Waits up to `limit` for `child` to exit; kills it and fails the test if it does not.
fn wait_at_most(mut child: std::process::Child, limit: Duration) -> std::process::Output {
    let t0 = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("still running after {limit:?}: {:?}", text(&out));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

/// Runs `corral cast send -` (key `k`, 200 Mbit/s, no minimum wait) with `args`, feeding
/// `data` to its standard input in `chunks` pieces half a second apart, and waits for it.
fn slow_stdin_sender(
    dir: &std::path::Path,
    args: &[&str],
    data: &[u8],
    chunks: usize,
) -> std::process::Output {
    use std::io::Write;
    let mut tx = Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(sender_args("-", args))
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("corral runs");
    let mut stdin = tx.stdin.take().unwrap();
    for chunk in data.chunks(data.len().div_ceil(chunks)) {
        std::thread::sleep(Duration::from_millis(500));
        stdin.write_all(chunk).unwrap();
    }
    drop(stdin);
    wait_at_most(tx, Duration::from_secs(60))
}

/// The JSON progress lines in which a receiver says it waits for a sender still at work.
fn waiting_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "progress" && v["progress"]["side"] == "waiting")
        .collect()
}

/// A receiver (`--output out.img`, trusting key `k`, JSON lines, plus `rx_args`, `PORT` in
/// them replaced by a free port) against a sender of a 2 MiB image spooled from a slow
/// standard input in `chunks` half-second pieces (`tx_args`, `PORT` replaced likewise): both
/// must succeed and the copy be byte-identical. Returns the receiver's standard output.
fn against_a_slow_sender(rx_args: &[&str], tx_args: &[&str], chunks: usize) -> String {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 2 << 20);
    let data = std::fs::read(&img).unwrap();
    assert!(
        corral(dir.path(), &["cast", "keygen", "--out", "k"])
            .status
            .success()
    );
    let p = crate::netboot::free_port().to_string();
    let with_port =
        |args: &[&str]| -> Vec<String> { args.iter().map(|a| a.replace("PORT", &p)).collect() };
    let mut rx_all = vec!["--port", "PORT", "--output", "out.img"];
    rx_all.extend(["--trusted-key", "k.pub", "--json"]);
    rx_all.extend(rx_args);
    let rx_all = with_port(&rx_all);
    let rx = receiver(
        dir.path(),
        &rx_all.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut tx_all = vec!["--port", "PORT"];
    tx_all.extend(tx_args);
    let tx_all = with_port(&tx_all);
    let tx = slow_stdin_sender(
        dir.path(),
        &tx_all.iter().map(String::as_str).collect::<Vec<_>>(),
        &data,
        chunks,
    );
    let (stdout, stderr) = text(&tx);
    assert!(tx.status.success(), "{stdout}\n{stderr}");
    let out = wait_at_most(rx, Duration::from_secs(30));
    let (rx_out, rx_err) = text(&out);
    assert!(out.status.success(), "{rx_out}\n{rx_err}");
    assert_eq!(std::fs::read(dir.path().join("out.img")).unwrap(), data);
    rx_out
}

/// A sender still reading its image (here: spooling a slow standard input for ~4 s) tells the
/// group so every second: a receiver with a 2 s idle timeout waits for it, shows that it is
/// waiting, and then gets a verified copy.
#[test]
fn a_receiver_waits_for_a_sender_that_is_still_reading_its_image() {
    let rx_out = against_a_slow_sender(
        &[
            "--group",
            "239.77.3.5",
            "--name",
            "beta",
            "--idle-timeout",
            "2s",
        ],
        &["--group", "239.77.3.5", "--expect", "beta"],
        8,
    );
    // It said it was waiting for a sender still at work (size not known while spooling).
    let waiting = waiting_lines(&rx_out);
    assert!(!waiting.is_empty(), "no waiting line: {rx_out}");
    assert_eq!(waiting[0]["progress"]["sender_image_bytes"], 0);
}

/// A receiver that hears nothing of the stream (here: the sender's datagrams go to another
/// address, as when a firewall drops them) and is given --sender asks over TCP after 5 s; a
/// sender still reading its image (spooling a slow standard input for ~8 s) answers that it is
/// preparing, and the receiver, whose idle timeout is 6 s, waits for it, says so, and gets a
/// verified copy over TCP.
#[test]
fn a_receiver_that_cannot_hear_the_group_waits_over_tcp_for_a_sender_still_reading() {
    let rx_out = against_a_slow_sender(
        &[
            "--group",
            "239.77.3.7",
            "--sender",
            "127.0.0.1:PORT",
            "--idle-timeout",
            "6s",
        ],
        &["--unicast", "127.0.0.2", "--min-receivers", "1"],
        16,
    );
    assert!(
        !waiting_lines(&rx_out).is_empty(),
        "no waiting line: {rx_out}"
    );
    let done = json_line(&rx_out, "summary");
    assert_eq!(done["report"]["blocks_multicast"], 0, "{done}");
    assert!(done["report"]["blocks_tcp"].as_u64() > Some(0), "{done}");
}

/// A receiver given --sender HOST that reaches the catch-up server of another sender on that
/// host (same port, another group: the second sender to start finds the port taken and
/// listens elsewhere) is told whose server it reached and stops, with nothing written: it is
/// never handed the other sender's image, though one site key signs both.
#[test]
fn a_receiver_that_reaches_another_streams_sender_is_told_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 1 << 20);
    assert!(
        corral(dir.path(), &["cast", "keygen", "--out", "k"])
            .status
            .success()
    );
    let p = crate::netboot::free_port().to_string();
    let mut other = Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(sender_args(
            img.to_str().unwrap(),
            &[
                "--group",
                "239.77.3.9",
                "--port",
                &p,
                "--min-receivers",
                "1",
            ],
        ))
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("corral runs");
    std::thread::sleep(Duration::from_millis(500));
    let rx = receiver(
        dir.path(),
        &[
            "--group",
            "239.77.3.10",
            "--port",
            &p,
            "--sender",
            "127.0.0.1",
            "--trusted-key",
            "k.pub",
            "--output",
            "out.img",
            "--idle-timeout",
            "20s",
        ],
    );
    let out = wait_at_most(rx, Duration::from_secs(30));
    let _ = other.kill();
    let _ = other.wait();
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    let all = format!("{stdout}{stderr}");
    assert!(
        all.contains(&format!(
            "serves the stream to 239.77.3.9:{p}, not ours (239.77.3.10:{p})"
        )),
        "{all}"
    );
    assert!(all.contains("--sender HOST:PORT"), "{all}");
    assert!(!dir.path().join("out.img").exists());
    assert!(!dir.path().join("out.img.corral-part").exists());
}

/// A receiver given --sender whose sender never answers gives up after --idle-timeout: a
/// refused TCP connection is not word from a sender.
#[test]
fn a_receiver_gives_up_on_an_absent_sender_after_its_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let p = crate::netboot::free_port().to_string();
    let rx = receiver(
        dir.path(),
        &[
            "--group",
            "239.77.3.6",
            "--port",
            &p,
            "--sender",
            &format!("127.0.0.1:{p}"),
            "--output",
            "out.img",
            // Longer than the 5 s after which it tries TCP, so that attempts fail before.
            "--idle-timeout",
            "8s",
        ],
    );
    let out = wait_at_most(rx, Duration::from_secs(30));
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(
        format!("{stdout}{stderr}").contains("nothing heard from a sender for 8 s"),
        "{stdout}\n{stderr}"
    );
    assert!(!dir.path().join("out.img").exists());
}

/// Unicast targets: two receivers that join no group (`--unicast`, each on its own port) get
/// the stream from a sender given their addresses, verify it and are reported; the sender
/// waits for both (its default --min-receivers is the number of targets).
#[test]
fn a_sender_with_unicast_targets_reaches_receivers_that_join_no_group() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 3 << 20);
    assert!(
        corral(dir.path(), &["cast", "keygen", "--out", "k"])
            .status
            .success()
    );
    let ports: Vec<String> = (0..3)
        .map(|_| crate::netboot::free_port().to_string())
        .collect();
    let rxs: Vec<std::process::Child> = ["a", "b"]
        .iter()
        .zip(&ports[1..])
        .map(|(name, p)| {
            let out = format!("{name}.img");
            receiver(
                dir.path(),
                &[
                    "--unicast",
                    "--port",
                    p,
                    "--output",
                    &out,
                    "--trusted-key",
                    "k.pub",
                    "--name",
                    name,
                    "--json",
                ],
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let targets = format!("127.0.0.1:{},127.0.0.1:{}", ports[1], ports[2]);
    let tx = corral(
        dir.path(),
        &sender_args(
            img.to_str().unwrap(),
            &["--port", &ports[0], "--unicast", &targets],
        ),
    );
    let (stdout, stderr) = text(&tx);
    assert!(tx.status.success(), "{stdout}\n{stderr}");
    let summary = json_line(&stdout, "summary");
    let names: Vec<&str> = summary["report"]["receivers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["ok"] == true)
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(names.len(), 2, "{summary}");
    let want = std::fs::read(&img).unwrap();
    for (rx, name) in rxs.into_iter().zip(["a", "b"]) {
        let out = wait_at_most(rx, Duration::from_secs(30));
        let (rx_out, rx_err) = text(&out);
        assert!(out.status.success(), "{rx_out}\n{rx_err}");
        let r = json_line(&rx_out, "summary");
        // Over the UDP stream, not TCP catch-up.
        assert_eq!(r["report"]["blocks_tcp"], 0, "{r}");
        assert!(r["report"]["blocks_multicast"].as_u64() > Some(0), "{r}");
        assert_eq!(
            std::fs::read(dir.path().join(format!("{name}.img"))).unwrap(),
            want
        );
    }
}
