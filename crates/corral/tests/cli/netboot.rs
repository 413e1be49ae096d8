//! Binary-level tests for `corral serve` and `corral machine`: the real binary, real `curl`,
//! and (as root) real firmware in QEMU against it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use corral_store::{EventFilter, Store, StoredEvent};

use crate::support::{corral, text};

mod power_cut;
mod qemu;

/// A free TCP/UDP port on loopback (bound then released).
pub(crate) fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = l.local_addr().unwrap().port();
    let u = std::net::UdpSocket::bind(("127.0.0.1", p));
    if u.is_err() {
        return free_port();
    }
    p
}

/// Writes a small site: `off` DHCP, one declared machine (web01) with a test template, a
/// discovery profile, and a payload in boot/.
pub(crate) fn write_site(dir: &Path, site_toml: &str, template: &str) -> Vec<u8> {
    let w = |p: &str, t: &[u8]| {
        let p = dir.join(p);
        fs_err::create_dir_all(p.parent().unwrap()).unwrap();
        fs_err::write(p, t).unwrap();
    };
    w("site.toml", site_toml.as_bytes());
    w(
        "profiles/test.toml",
        b"[boot]\nipxe_template = \"templates/test.ipxe\"\nkernel = \"payload.bin\"\n",
    );
    w(
        "profiles/discover.toml",
        b"[boot]\nipxe_template = \"templates/test.ipxe\"\n",
    );
    w("templates/test.ipxe", template.as_bytes());
    w(
        "machines/web01.toml",
        b"mac = \"52:54:00:aa:00:01\"\nprofile = \"test\"\n[vars]\ndisk = \"/dev/vda\"\n",
    );
    // A payload whose every byte the clients check.
    let payload: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    w("boot/payload.bin", &payload);
    for d in ["images", "trees"] {
        fs_err::create_dir_all(dir.join(d)).unwrap();
    }
    payload
}

/// `corral serve` running as a child; killed (SIGTERM, then SIGKILL) on drop.
pub(crate) struct Serve {
    pub(crate) child: Child,
    pub(crate) http: u16,
    pub(crate) tftp: u16,
    pub(crate) db: PathBuf,
}

impl Serve {
    pub(crate) fn start(site: &Path, extra: &[&str]) -> Serve {
        let http = free_port();
        let syslog = free_port();
        let tftp = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_corral"))
            .args(["serve", "--site"])
            .arg(site)
            .args([
                "--dhcp",
                "off",
                "--bind",
                "127.0.0.1",
                "--tftp-port",
                &tftp.to_string(),
            ])
            .args([
                "--http-port",
                &http.to_string(),
                "--syslog-port",
                &syslog.to_string(),
            ])
            .args(extra)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let s = Serve {
            child,
            http,
            tftp,
            db: site.join("state/corral.db"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", http)).is_ok() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("corral serve did not listen on {http}");
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http)
    }

    /// Stops with SIGTERM and returns the exit status and stderr.
    pub(crate) fn stop(mut self) -> (std::process::ExitStatus, String) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                return (st, err);
            }
            assert!(
                Instant::now() < deadline,
                "corral serve did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn curl(args: &[&str]) -> (u16, Vec<u8>, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--path-as-is",
            "-D",
            "/dev/stderr",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
        ])
        .args(args)
        .output()
        .expect("curl runs");
    let mut body = out.stdout;
    let pos = body.iter().rposition(|&b| b == b'\n').unwrap();
    let code = String::from_utf8_lossy(&body[pos + 1..])
        .parse()
        .unwrap_or(0);
    body.truncate(pos);
    (
        code,
        body,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub(crate) fn events(db: &Path) -> Vec<StoredEvent> {
    match Store::open_read_only(db) {
        Ok(s) => s.events(&EventFilter::default()).unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

/// Waits until `pred` holds for the store's events.
pub(crate) fn wait_events(
    db: &Path,
    timeout: Duration,
    pred: impl Fn(&[StoredEvent]) -> bool,
) -> Vec<StoredEvent> {
    let deadline = Instant::now() + timeout;
    loop {
        let ev = events(db);
        if pred(&ev) || Instant::now() > deadline {
            return ev;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

const TEMPLATE: &str =
    "#!ipxe\necho MARK-SCRIPT {{ hostname }} {{ mac }} {{ state }} {{ vars.disk }} {{ session }}\n";

fn off_site() -> String {
    "[server]\nname = \"t\"\n[dhcp]\nmode = \"off\"\n[discovery]\nprofile = \"discover\"\nenrol = true\n".to_owned()
}

#[test]
fn serve_and_machine_help_have_examples() {
    let dir = tempfile::tempdir().unwrap();
    for cmd in [
        &["serve", "--help"][..],
        &["machine", "--help"],
        &["machine", "adopt", "--help"],
    ] {
        let out = corral(dir.path(), cmd);
        let (stdout, _) = text(&out);
        assert!(out.status.success());
        if cmd.len() == 2 {
            assert!(stdout.contains("Examples:"), "{stdout}");
        }
    }
}

#[test]
fn serve_refuses_dhcp_on_unnamed_or_missing_interfaces() {
    let dir = tempfile::tempdir().unwrap();
    write_site(
        dir.path(),
        "[dhcp]\nmode = \"full\"\n[[dhcp.network]]\ncidr = \"10.9.0.0/24\"\n",
        TEMPLATE,
    );
    let site = dir.path().to_str().unwrap();
    let out = corral(dir.path(), &["serve", "--site", site, "--syslog-port", "0"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("interfaces is empty"), "{stderr}");
    write_site(
        dir.path(),
        "[server]\ninterfaces = [\"nosuch0\"]\n[dhcp]\nmode = \"full\"\n[[dhcp.network]]\ncidr = \"10.9.0.0/24\"\n",
        TEMPLATE,
    );
    let out = corral(dir.path(), &["serve", "--site", site, "--syslog-port", "0"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("\"nosuch0\"") && stderr.contains("does not exist; refusing to start DHCP"),
        "{stderr}"
    );
}

#[test]
fn serve_names_the_ipxe_package_when_binaries_are_missing() {
    let dir = tempfile::tempdir().unwrap();
    write_site(
        dir.path(),
        &format!("{}[paths]\nipxe = \"no-ipxe-here\"\n", off_site()),
        TEMPLATE,
    );
    let out = corral(
        dir.path(),
        &[
            "serve",
            "--site",
            dir.path().to_str().unwrap(),
            "--dhcp",
            "off",
            "--syslog-port",
            "0",
            "--http-port",
            "0",
        ],
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("Debian package `ipxe`") && stderr.contains("undionly.kpxe"),
        "{stderr}"
    );
}

/// HTTP with curl: scripts, HEAD, Range, hostile paths, the done callback and boot-once, the
/// syslog receiver, `corral machine`, and a hot reload (good and bad edits).
#[test]
fn serve_http_scripts_files_done_and_reload() {
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path();
    let payload = write_site(site, &off_site(), TEMPLATE);
    // Outside the root, and a symlink to it inside.
    fs_err::write(dir.path().join("secret.txt"), b"TOPSECRET-CONTENT").unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret.txt"), site.join("boot/escape")).unwrap();
    fs_err::create_dir_all(site.join("images")).unwrap();
    fs_err::write(site.join("images/disk.img"), &payload[..1000]).unwrap();
    let s = Serve::start(site, &[]);

    let (code, body, _) = curl(&[&s.url("/healthz")]);
    assert_eq!((code, body.as_slice()), (200, &b"ok\n"[..]));
    // Prometheus text (no DHCP service in "off" mode: the families, no series).
    let (code, body, headers) = curl(&[&s.url("/metrics")]);
    let prom = String::from_utf8(body).unwrap();
    assert_eq!(code, 200, "{prom}");
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("text/plain; version=0.0.4"),
        "{headers}"
    );
    assert!(
        prom.contains("# TYPE corral_dhcp_requests_received_total counter")
            && !prom.contains("corral_dhcp_requests_received_total{"),
        "{prom}"
    );
    // TFTP and HTTP counters move by what a few fetches did (scraped before and after).
    let tftp_label = format!("{{listen=\"127.0.0.1:{}\"", s.tftp);
    let tftp_keys = [
        format!("corral_tftp_transfers_started_total{tftp_label}}}"),
        format!("corral_tftp_transfers_completed_total{tftp_label}}}"),
        format!("corral_tftp_requests_refused_total{tftp_label},reason=\"not_found\"}}"),
        format!("corral_tftp_data_bytes_sent_total{tftp_label}}}"),
        format!("corral_tftp_blocks_retransmitted_total{tftp_label}}}"),
        format!("corral_tftp_errors_sent_total{tftp_label}}}"),
        format!("corral_tftp_active_transfers{tftp_label}}}"),
    ];
    let http_keys = [
        "corral_http_requests_total{route=\"boot\",code=\"200\"}",
        "corral_http_requests_total{route=\"boot\",code=\"404\"}",
        "corral_http_requests_total{route=\"other\",code=\"404\"}",
        "corral_http_response_bytes_total{route=\"boot\"}",
    ];
    let scrape = |keys: &[&str]| -> Vec<u64> {
        let (code, body, _) = curl(&[&s.url("/metrics")]);
        assert_eq!(code, 200);
        let text = String::from_utf8(body).unwrap();
        for family in [
            "corral_tftp_transfers_started_total",
            "corral_http_requests_total",
        ] {
            let ty = format!("# TYPE {family} counter\n");
            assert_eq!(text.matches(&ty).count(), 1, "{ty} in\n{text}");
        }
        keys.iter()
            .map(|k| {
                // A series not yet seen (an HTTP status) counts as zero.
                text.lines()
                    .find_map(|l| l.strip_prefix(k)?.strip_prefix(' ')?.parse().ok())
                    .unwrap_or(0)
            })
            .collect()
    };
    let tftp_refs: Vec<&str> = tftp_keys.iter().map(String::as_str).collect();
    let (tftp0, http0) = (scrape(&tftp_refs), scrape(&http_keys));
    let (code, body, _) = curl(&[&s.url("/boot/payload.bin")]);
    assert!(code == 200 && body == payload);
    let (code, _, _) = curl(&["-I", &s.url("/boot/payload.bin")]);
    assert_eq!(code, 200);
    let (code, refusal, _) = curl(&[&s.url("/boot/missing.bin")]);
    assert_eq!(code, 404);
    assert_eq!(curl(&[&s.url("/nowhere")]).0, 404);
    let out = Command::new("curl")
        .args(["-sS", "--tftp-blksize", "1432"])
        .arg(format!("tftp://127.0.0.1:{}/payload.bin", s.tftp))
        .output()
        .unwrap();
    assert!(out.status.success() && out.stdout == payload);
    let out = Command::new("curl")
        .args(["-sS"])
        .arg(format!("tftp://127.0.0.1:{}/missing.bin", s.tftp))
        .output()
        .unwrap();
    assert!(!out.status.success());
    // The server counts a transfer as completed once it has read the last ACK, which can be
    // just after curl exits.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut tftp1 = scrape(&tftp_refs);
    while tftp1[1] == tftp0[1] && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        tftp1 = scrape(&tftp_refs);
    }
    let http1 = scrape(&http_keys);
    let d = |a: &[u64], b: &[u64], i: usize| b[i] - a[i];
    assert_eq!(
        (0..3).map(|i| d(&tftp0, &tftp1, i)).collect::<Vec<_>>(),
        [1, 1, 1],
        "started, completed, refused not_found: {tftp0:?} -> {tftp1:?}"
    );
    // DATA bytes: the file once, plus any block sent again on this loaded machine.
    let (bytes, again) = (d(&tftp0, &tftp1, 3), d(&tftp0, &tftp1, 4));
    assert!(
        (300_000..=300_000 + again * 1432).contains(&bytes),
        "DATA bytes {bytes}, blocks retransmitted {again}"
    );
    assert_eq!(d(&tftp0, &tftp1, 5), 1, "one ERROR packet (file not found)");
    assert_eq!(tftp1[6], 0, "no transfer active");
    assert_eq!(
        (0..4).map(|i| d(&http0, &http1, i)).collect::<Vec<_>>(),
        // GET and HEAD; the missing file; the unknown route; the bytes of the file, once
        // (HEAD sends none), and of the refusal's text.
        [2, 1, 1, 300_000 + refusal.len() as u64],
        "{http0:?} -> {http1:?}"
    );
    // web01 is declared, never seen: it installs; the script carries its variables.
    let (code, body, _) = curl(&[&s.url("/ipxe/52-54-00-AA-00-01")]);
    let script = String::from_utf8(body).unwrap();
    assert_eq!(code, 200, "{script}");
    assert!(
        script.starts_with("#!ipxe\necho MARK-SCRIPT web01 52:54:00:aa:00:01 install /dev/vda "),
        "{script}"
    );
    // The script and done routes take a MAC in every spelling `MacAddr` parses (one parser,
    // corral-model's), and refuse anything else with 400.
    for form in ["5254.00aa.0001", "525400AA0001", "52:54:00:aa:00:01"] {
        let (code, body, _) = curl(&[&s.url(&format!("/ipxe/{form}"))]);
        let b = String::from_utf8_lossy(&body);
        assert!(
            code == 200 && b.contains("MARK-SCRIPT web01 52:54:00:aa:00:01 install"),
            "{form}: {code} {b}"
        );
    }
    for bad in [
        "52:54:00:aa:00",
        "52:54:00:aa:00:0g",
        "5254.00aa.00011",
        "52:5400:aa:00:01",
    ] {
        let (code, _, _) = curl(&[&s.url(&format!("/ipxe/{bad}"))]);
        assert_eq!(code, 400, "/ipxe/{bad}");
        let (code, _, _) = curl(&[
            "-X",
            "POST",
            &s.url(&format!("/api/v1/machines/{bad}/done")),
        ]);
        assert_eq!(code, 400, "done for {bad}");
    }
    // Whole file, HEAD, ranges.
    let (code, body, _) = curl(&[&s.url("/boot/payload.bin")]);
    assert_eq!(code, 200);
    assert!(body == payload, "payload differs");
    let (code, _, headers) = curl(&["-I", &s.url("/boot/payload.bin")]);
    assert_eq!(code, 200);
    let h = headers.to_ascii_lowercase();
    assert!(
        h.contains("content-length: 300000") && h.contains("accept-ranges: bytes"),
        "{headers}"
    );
    let (code, body, headers) = curl(&["-r", "1000-1999", &s.url("/boot/payload.bin")]);
    assert_eq!(code, 206);
    assert!(body == payload[1000..2000]);
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("content-range: bytes 1000-1999/300000"),
        "{headers}"
    );
    let (code, body, _) = curl(&["-r", "-100", &s.url("/boot/payload.bin")]);
    assert_eq!(code, 206);
    assert!(body == payload[300_000 - 100..]);
    let (code, _, headers) = curl(&["-r", "400000-", &s.url("/boot/payload.bin")]);
    assert_eq!(code, 416);
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("content-range: bytes */300000"),
        "{headers}"
    );
    let (code, body, _) = curl(&[&s.url("/images/disk.img")]);
    assert_eq!((code, body.as_slice()), (200, &payload[..1000]));
    // Hostile paths: refused, never the file outside.
    for p in [
        "/boot/../../etc/passwd",
        "/boot/%2e%2e/%2e%2e/etc/passwd",
        "/boot/..%2f..%2fetc%2fpasswd",
        "/boot/%2fetc%2fpasswd",
        "/boot/escape",
        "/boot/..%5c..%5cetc%5cpasswd",
        "/images/../secret.txt",
        "/ipxe-bin/..%2f..%2f..%2fetc%2fpasswd",
    ] {
        let (code, body, _) = curl(&[&s.url(p)]);
        assert!(code == 403 || code == 404 || code == 400, "{p}: {code}");
        let b = String::from_utf8_lossy(&body);
        assert!(
            !b.contains("root:x:0") && !b.contains("TOPSECRET"),
            "{p}: leaked {b}"
        );
    }
    // iPXE binaries over HTTP (for UEFI HTTP Boot), byte for byte.
    let (code, body, _) = curl(&[&s.url("/ipxe-bin/snponly.efi")]);
    assert_eq!(code, 200);
    assert!(body == fs_err::read("/usr/lib/ipxe/snponly.efi").unwrap());
    // TFTP (curl as the client, blksize option): the iPXE binary and a boot-root file.
    let tftp = |path: &str| {
        Command::new("curl")
            .args([
                "-sS",
                "--tftp-blksize",
                "1432",
                &format!("tftp://127.0.0.1:{}/{path}", s.tftp),
            ])
            .output()
            .unwrap()
    };
    let out = tftp("undionly.kpxe");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == fs_err::read("/usr/lib/ipxe/undionly.kpxe").unwrap());
    let out = tftp("payload.bin");
    assert!(out.status.success() && out.stdout == payload);
    // An unknown MAC is discovered and gets the discovery profile.
    let (code, body, _) = curl(&[&s.url("/ipxe/52:54:00:aa:00:99")]);
    assert_eq!(code, 200);
    assert!(
        String::from_utf8_lossy(&body)
            .contains("unknown-52-54-00-aa-00-99 52:54:00:aa:00:99 discovered")
    );
    // Done callback: install -> installed; the next script boots the local disk.
    let (code, body, _) = curl(&[
        "-X",
        "POST",
        &s.url("/api/v1/machines/52:54:00:aa:00:01/done"),
    ]);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let (code, _, _) = curl(&[&s.url("/api/v1/machines/52:54:00:aa:00:01/done")]);
    assert_eq!(code, 409, "a second done changes nothing");
    let (_, body, _) = curl(&[&s.url("/ipxe/52:54:00:aa:00:01")]);
    let local = String::from_utf8(body).unwrap();
    assert!(
        local.contains("is local: booting from local disk")
            && local.contains("sanboot --no-describe --drive 0x80"),
        "{local}"
    );
    // Boot once over TFTP too: the machine using this address (web01, local now) is refused
    // its iPXE binary.
    let out = tftp("undionly.kpxe");
    assert!(
        !out.status.success() && out.stdout.is_empty(),
        "iPXE binary handed to a local machine"
    );
    // Syslog, RFC 5424 and 3164, attributed to the machine by IP (loopback = web01's last IP).
    let port = {
        let args: Vec<String> = std::env::args().collect();
        let _ = args;
        // The syslog port is the one passed to serve; find it from the child's command line.
        let cmdline = fs_err::read_to_string(format!("/proc/{}/cmdline", s.child.id())).unwrap();
        let parts: Vec<&str> = cmdline.split('\0').collect();
        let i = parts.iter().position(|p| *p == "--syslog-port").unwrap();
        parts[i + 1].parse::<u16>().unwrap()
    };
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.send_to(
        b"<11>1 2026-12-01T10:00:00Z web01 installer 42 - - disk /dev/vda partitioned",
        ("127.0.0.1", port),
    )
    .unwrap();
    sock.send_to(
        b"<14>Dec  1 10:00:01 web01 curtin: copying image",
        ("127.0.0.1", port),
    )
    .unwrap();
    sock.send_to(b"not syslog at all", ("127.0.0.1", port))
        .unwrap();
    let ev = wait_events(&s.db, Duration::from_secs(10), |e| {
        e.iter()
            .filter(|e| e.event.source.as_str() == "syslog")
            .count()
            >= 2
    });
    let sys: Vec<&StoredEvent> = ev
        .iter()
        .filter(|e| e.event.source.as_str() == "syslog")
        .collect();
    assert_eq!(sys.len(), 2, "{sys:?}");
    assert_eq!(sys[0].event.reason, "installer: disk /dev/vda partitioned");
    assert_eq!(sys[0].event.outcome.as_str(), "fail");
    assert_eq!(sys[1].event.reason, "curtin: copying image");
    assert_eq!(
        sys[0].event.mac.map(|m| m.to_string()).as_deref(),
        Some("52:54:00:aa:00:01"),
        "web01 fetched the last script from 127.0.0.1"
    );
    // Every HTTP request was recorded, hostile ones as denied.
    let denied = ev
        .iter()
        .filter(|e| e.event.kind.as_str() == "denied")
        .count();
    assert!(denied >= 8, "{denied} denied events");
    assert!(
        ev.iter()
            .any(|e| e.event.kind.as_str() == "done" && e.event.outcome.as_str() == "ok")
    );

    // corral machine list/show/reinstall while serving.
    let sitearg = site.to_str().unwrap();
    let out = corral(site, &["machine", "list", "--site", sitearg, "--json"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let web01 = rows.iter().find(|r| r["name"] == "web01").unwrap();
    assert_eq!(web01["state"], "local");
    let unknown = rows
        .iter()
        .find(|r| r["mac"] == "52:54:00:aa:00:99")
        .unwrap();
    assert_eq!(
        (unknown["state"].as_str(), unknown["declared"].as_bool()),
        (Some("discovered"), Some(false))
    );
    let out = corral(site, &["machine", "reinstall", "web01", "--site", sitearg]);
    assert!(out.status.success(), "{:?}", text(&out));
    let (_, body, _) = curl(&[&s.url("/ipxe/52:54:00:aa:00:01")]);
    assert!(
        String::from_utf8_lossy(&body).contains(" install /dev/vda"),
        "reinstall takes effect at once"
    );
    let out = corral(site, &["machine", "show", "web01", "--site", sitearg]);
    let (stdout, _) = text(&out);
    assert!(stdout.contains("state:      install"), "{stdout}");
    // Adopt the discovered machine; the running server picks the new file up (hot reload).
    let out = corral(
        site,
        &[
            "machine",
            "adopt",
            "52:54:00:aa:00:99",
            "--name",
            "web09",
            "--profile",
            "test",
            "--site",
            sitearg,
        ],
    );
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(
        fs_err::read_to_string(site.join("machines/web09.toml"))
            .unwrap()
            .contains("mac = \"52:54:00:aa:00:99\"")
    );
    let out = corral(
        site,
        &[
            "machine",
            "adopt",
            "52:54:00:aa:00:98",
            "--name",
            "web09",
            "--site",
            sitearg,
        ],
    );
    assert_eq!(out.status.code(), Some(3), "name taken");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, body, _) = curl(&[&s.url("/ipxe/52:54:00:aa:00:99")]);
        if String::from_utf8_lossy(&body).contains("MARK-SCRIPT web09 ") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "adopted machine not picked up by the reload"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // An invalid edit is reported and the last good site stays in force.
    fs_err::write(
        site.join("machines/broken.toml"),
        b"mac = \"zz\"\nprofile = \"nope\"\n",
    )
    .unwrap();
    let ev = wait_events(&s.db, Duration::from_secs(15), |e| {
        e.iter()
            .any(|e| e.event.kind.as_str() == "reload" && e.event.outcome.as_str() == "fail")
    });
    let bad = ev
        .iter()
        .find(|e| e.event.kind.as_str() == "reload" && e.event.outcome.as_str() == "fail")
        .expect("rejected reload recorded");
    assert!(
        bad.event.reason.contains("broken.toml"),
        "{}",
        bad.event.reason
    );
    let (code, body, _) = curl(&[&s.url("/ipxe/52:54:00:aa:00:99")]);
    assert_eq!(code, 200);
    assert!(String::from_utf8_lossy(&body).contains("MARK-SCRIPT web09 "));
    let (status, stderr) = s.stop();
    assert!(
        status.success(),
        "SIGTERM is a clean stop: {status:?}\n{stderr}"
    );
}
