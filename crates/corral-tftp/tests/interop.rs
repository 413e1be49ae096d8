//! corral-tftp against real clients (curl, atftp) and hand-made hostile packets, over loopback;
//! one test in network namespaces with packet loss (root only).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corral_tftp::{RequestOptions, TftpConfig, TftpDecision, TftpEvent, TftpHooks, serve};
use tokio::net::UdpSocket;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<TftpEvent>>,
    requests: Mutex<Vec<(SocketAddr, String)>>,
}

impl TftpHooks for Recorder {
    fn on_request(&self, peer: SocketAddr, path: &str, _opts: &RequestOptions) -> TftpDecision {
        self.requests.lock().unwrap().push((peer, path.to_owned()));
        match path {
            "generated.ipxe" => TftpDecision::ServeBytes(bytes::Bytes::from_static(
                b"#!ipxe\nchain http://10.0.0.1/boot\n",
            )),
            "alias.bin" => TftpDecision::ServePath("/small.bin".into()),
            "evil-alias" => TftpDecision::ServePath("../../etc/passwd".into()),
            "forbidden.bin" => TftpDecision::Deny("machine web01 is set to boot locally".into()),
            _ => TftpDecision::Serve,
        }
    }

    fn on_event(&self, event: TftpEvent) {
        self.events.lock().unwrap().push(event);
    }
}

impl Recorder {
    fn failures(&self) -> Vec<(String, String)> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                TftpEvent::Failed { path, reason, .. } => Some((path.clone(), reason.clone())),
                _ => None,
            })
            .collect()
    }

    fn finished(&self) -> Vec<(String, u64)> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                TftpEvent::Finished { path, bytes, .. } => Some((path.clone(), *bytes)),
                _ => None,
            })
            .collect()
    }
}

struct Server {
    addr: SocketAddr,
    hooks: Arc<Recorder>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), corral_tftp::TftpError>>,
    root: tempfile::TempDir,
    _outside: tempfile::TempDir,
    secret: Vec<u8>,
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

async fn start(listen: &str, config: impl FnOnce(&mut TftpConfig)) -> Server {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let secret = b"SECRET-OUTSIDE-THE-ROOT\n".repeat(10);
    std::fs::write(outside.path().join("secret"), &secret).unwrap();
    std::fs::write(root.path().join("small.bin"), pseudo_random(70_001, 1)).unwrap();
    std::fs::write(root.path().join("empty"), b"").unwrap();
    std::fs::write(root.path().join("exact512"), pseudo_random(512 * 4, 2)).unwrap();
    std::fs::create_dir_all(root.path().join("pxelinux.cfg")).unwrap();
    std::fs::write(root.path().join("pxelinux.cfg/default"), b"DEFAULT local\n").unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("escape")).unwrap();
    std::os::unix::fs::symlink(
        "../../../../../../../etc/passwd",
        root.path().join("rel-escape"),
    )
    .unwrap();
    std::os::unix::fs::symlink("small.bin", root.path().join("inside-link")).unwrap();
    let mut cfg = TftpConfig {
        root: root.path().to_owned(),
        ..TftpConfig::default()
    };
    config(&mut cfg);
    let socket = UdpSocket::bind(listen).await.unwrap();
    let addr = socket.local_addr().unwrap();
    let hooks = Arc::new(Recorder::default());
    let cancel = CancellationToken::new();
    let task = tokio::spawn(serve(socket, cfg, hooks.clone(), cancel.clone()));
    Server {
        addr,
        hooks,
        cancel,
        task,
        root,
        _outside: outside,
        secret,
    }
}

impl Server {
    fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    fn url(&self, name: &str) -> String {
        format!("tftp://127.0.0.1:{}/{name}", self.addr.port())
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("serve stops on cancel")
            .unwrap()
            .unwrap();
    }
}

fn have(prog: &str) -> bool {
    let ok = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {prog}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIPPED: {prog} is not installed (scripts/quickstart installs it)");
    }
    ok
}

async fn curl(url: &str, out: &Path, blksize: Option<u16>) -> std::process::Output {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "60", "-o"]).arg(out).arg(url);
    if let Some(b) = blksize {
        c.args(["--tftp-blksize", &b.to_string()]);
    }
    c.output().await.unwrap()
}

async fn atftp(
    port: u16,
    remote: &str,
    out: &Path,
    options: &[&str],
    host: &str,
) -> std::process::Output {
    let mut c = Command::new("atftp");
    for o in options {
        c.args(["--option", o]);
    }
    c.args(["-g", "-r", remote, "-l"])
        .arg(out)
        .args([host, &port.to_string()]);
    tokio::time::timeout(Duration::from_secs(120), c.output())
        .await
        .expect("atftp finished")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_atftp_fetch_with_options() {
    if !have("curl") || !have("atftp") {
        return;
    }
    let s = start("127.0.0.1:0", |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let want = std::fs::read(s.path("small.bin")).unwrap();
    for (i, blk) in [None, Some(8u16), Some(1432), Some(1468), Some(9000)]
        .into_iter()
        .enumerate()
    {
        let out = dir.path().join(format!("curl{i}"));
        let o = curl(&s.url("small.bin"), &out, blk).await;
        assert!(o.status.success(), "curl {blk:?}: {o:?}");
        assert!(std::fs::read(&out).unwrap() == want, "curl blksize {blk:?}");
    }
    for (i, opts) in [
        vec![],
        vec!["blksize 1432", "tsize 0", "windowsize 16"],
        vec!["blksize 512", "windowsize 64", "timeout 2"],
        vec!["tsize 0", "windowsize 1"],
    ]
    .into_iter()
    .enumerate()
    {
        for file in [
            "small.bin",
            "empty",
            "exact512",
            "/pxelinux.cfg/default",
            "inside-link",
        ] {
            let out = dir.path().join(format!("atftp{i}"));
            let o = atftp(s.addr.port(), file, &out, &opts, "127.0.0.1").await;
            assert!(o.status.success(), "atftp {opts:?} {file}: {o:?}");
            let want = std::fs::read(s.path(file.trim_start_matches('/'))).unwrap();
            assert!(
                std::fs::read(&out).unwrap() == want,
                "atftp {opts:?} {file}"
            );
        }
    }
    // Hook-generated content and an alias.
    let out = dir.path().join("gen");
    let o = curl(&s.url("generated.ipxe"), &out, None).await;
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        std::fs::read(&out).unwrap(),
        b"#!ipxe\nchain http://10.0.0.1/boot\n"
    );
    let o = curl(&s.url("alias.bin"), &out, Some(1432)).await;
    assert!(o.status.success(), "{o:?}");
    assert!(std::fs::read(&out).unwrap() == want);
    assert!(s.hooks.failures().is_empty(), "{:?}", s.hooks.failures());
    let fin = s.hooks.finished();
    assert!(fin.contains(&("small.bin".to_string(), 70_001)));
    assert!(fin.contains(&("pxelinux.cfg/default".to_string(), 14)));
    assert!(fin.contains(&("empty".to_string(), 0)));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_leak_nothing() {
    if !have("curl") || !have("atftp") {
        return;
    }
    let s = start("127.0.0.1:0", |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cases: &[(&str, &str)] = &[
        ("missing.bin", "file not found"),
        ("../../etc/passwd", "`..`"),
        ("..\\..\\etc\\passwd", "`..`"),
        ("/etc/passwd", "file not found"), // absolute: looked up inside the root
        ("escape", "outside the served root"),
        ("rel-escape", "outside the served root"),
        ("pxelinux.cfg", "not a regular file"),
        ("forbidden.bin", "boot locally"),
        ("evil-alias", "invalid path"),
    ];
    for (name, why) in cases {
        let _ = std::fs::remove_file(&out);
        let o = atftp(s.addr.port(), name, &out, &["tsize 0"], "127.0.0.1").await;
        assert!(!o.status.success(), "{name} must fail: {o:?}");
        let got = std::fs::read(&out).unwrap_or_default();
        assert!(got.is_empty(), "{name}: bytes leaked: {got:?}");
        let fails = s.hooks.failures();
        assert!(
            fails.iter().any(|(_, r)| r.contains(why)),
            "{name}: no failure event with {why:?}: {fails:?}"
        );
    }
    // curl reports the TFTP error and writes nothing of the secret.
    let o = curl(&s.url("escape"), &out, None).await;
    assert!(!o.status.success());
    let got = std::fs::read(&out).unwrap_or_default();
    assert!(
        !got.windows(6).any(|w| w == b"SECRET"),
        "{:?}",
        s.secret.len()
    );
    // A write request is refused: read-only server.
    let up = dir.path().join("upload");
    std::fs::write(&up, b"data").unwrap();
    let o = Command::new("atftp")
        .args(["-p", "-l"])
        .arg(&up)
        .args(["-r", "upload", "127.0.0.1", &s.addr.port().to_string()])
        .output()
        .await
        .unwrap();
    assert!(!o.status.success(), "{o:?}");
    assert!(!s.path("upload").exists());
    assert!(
        s.hooks
            .failures()
            .iter()
            .any(|(p, r)| p == "upload" && r.contains("read-only"))
    );
    assert!(s.hooks.finished().is_empty(), "{:?}", s.hooks.finished());
    s.stop().await;
}

async fn raw_exchange(server: SocketAddr, req: &[u8]) -> (Vec<u8>, SocketAddr) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(req, server).await.unwrap();
    let mut buf = vec![0u8; 70000];
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    (buf[..n].to_vec(), from)
}

fn error_code(p: &[u8]) -> u16 {
    assert_eq!(&p[..2], b"\x00\x05", "not an ERROR packet: {p:?}");
    u16::from_be_bytes([p[2], p[3]])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_error_packets() {
    let s = start("127.0.0.1:0", |_| {}).await;
    let cases: &[(&[u8], u16)] = &[
        (b"\x00\x09garbage", 4),                                // unknown opcode
        (b"\x00", 4),                                           // truncated
        (b"\x00\x01no-nul", 4),                                 // unterminated file name
        (b"\x00\x01f\x00weird\x00", 4),                         // unknown mode
        (b"\x00\x01small.bin\x00mail\x00", 4),                  // mail mode
        (b"\x00\x02x\x00octet\x00", 2),                         // WRQ
        (b"\x00\x04\x00\x01", 4),                               // ACK to port 69
        (b"\x00\x01small.bin\x00octet\x00blksize\x004\x00", 8), // blksize < 8
        (b"\x00\x01small.bin\x00octet\x00blksize\x00x1\x00", 8),
        (b"\x00\x01small.bin\x00octet\x00windowsize\x000\x00", 8),
        (b"\x00\x01small.bin\x00octet\x00timeout\x00999\x00", 8),
        (b"\x00\x01../x\x00octet\x00", 2),
        (b"\x00\x01a\x01b\x00octet\x00", 2), // control character
        (b"\x00\x01missing\x00octet\x00", 1),
    ];
    for (req, code) in cases {
        let (p, _) = raw_exchange(s.addr, req).await;
        assert_eq!(error_code(&p), *code, "request {req:?} answered {p:?}");
    }
    // An ERROR sent to the server port is never answered.
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(b"\x00\x05\x00\x00x\x00", s.addr)
        .await
        .unwrap();
    let mut buf = [0u8; 100];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf))
            .await
            .is_err()
    );
    // Options: unknown ones ignored, blksize clamped, tsize answered, OACK from a new port.
    let (p, from) = raw_exchange(
        s.addr,
        b"\x00\x01small.bin\x00octet\x00BLKSIZE\x0070000\x00foo\x00bar\x00tsize\x000\x00",
    )
    .await;
    assert_ne!(from.port(), s.addr.port());
    assert_eq!(p, b"\x00\x06blksize\x001468\x00tsize\x0070001\x00");
    s.stop().await;
}

/// RFC 1350 §4: a packet from a stranger's port gets error 5 and the transfer goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_transfer_id_and_duplicate_rrq() {
    let s = start("127.0.0.1:0", |_| {}).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let rrq = b"\x00\x01small.bin\x00octet\x00";
    client.send_to(rrq, s.addr).await.unwrap();
    // A retransmitted RRQ from the same port must not start a second transfer.
    client.send_to(rrq, s.addr).await.unwrap();
    let mut buf = vec![0u8; 2048];
    let (n, tid) = client.recv_from(&mut buf).await.unwrap();
    assert_eq!(&buf[..4], b"\x00\x03\x00\x01");
    assert_eq!(n, 516);
    let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    stranger.send_to(b"\x00\x04\x00\x01", tid).await.unwrap();
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), stranger.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(error_code(&buf[..n]), 5);
    // The real client goes on; fetch the whole file in lock-step and check it.
    let want = std::fs::read(s.path("small.bin")).unwrap();
    let mut got = Vec::new();
    let mut expect: u16 = 1;
    // Block 1 was already received above; re-read it from the retransmission-free path.
    client.send_to(b"\x00\x04\x00\x00", tid).await.unwrap(); // stale ACK 0: ignored
    got.extend_from_slice(&want[..512]);
    client.send_to(&[0, 4, 0, expect as u8], tid).await.unwrap();
    expect += 1;
    loop {
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .expect("data")
            .unwrap();
        assert_eq!(from, tid, "a second transfer answered");
        assert_eq!(&buf[..2], b"\x00\x03");
        let block = u16::from_be_bytes([buf[2], buf[3]]);
        assert_eq!(block, expect);
        got.extend_from_slice(&buf[4..n]);
        let ack = [0, 4, buf[2], buf[3]];
        client.send_to(&ack, tid).await.unwrap();
        if n < 516 {
            break;
        }
        expect += 1;
    }
    assert!(got == want);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.hooks.requests.lock().unwrap().len(), 1);
    assert_eq!(s.hooks.finished(), vec![("small.bin".to_string(), 70_001)]);
    s.stop().await;
}

/// The reply comes from the address the client sent to, even when the listener is bound to
/// the wildcard (loopback answers on all of 127/8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_comes_from_the_address_asked() {
    let s = start("0.0.0.0:0", |_| {}).await;
    for last in [1u8, 2, 77] {
        let ip = Ipv4Addr::new(127, 0, 0, last);
        let (p, from) = raw_exchange(
            SocketAddr::from((ip, s.addr.port())),
            b"\x00\x01empty\x00octet\x00",
        )
        .await;
        assert_eq!(p, b"\x00\x03\x00\x01");
        assert_eq!(from.ip(), ip);
        // An error comes from the right address too.
        let (p, from) = raw_exchange(
            SocketAddr::from((ip, s.addr.port())),
            b"\x00\x01nope\x00octet\x00",
        )
        .await;
        assert_eq!(error_code(&p), 1);
        assert_eq!(from.ip(), ip);
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_transfers_answers_busy() {
    let s = start("127.0.0.1:0", |c| c.max_transfers = 2).await;
    // Two transfers that never ACK hold both slots.
    let mut holders = Vec::new();
    for _ in 0..2 {
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.send_to(b"\x00\x01small.bin\x00octet\x00", s.addr)
            .await
            .unwrap();
        let mut buf = [0u8; 600];
        c.recv_from(&mut buf).await.unwrap();
        holders.push(c);
    }
    let (p, _) = raw_exchange(s.addr, b"\x00\x01small.bin\x00octet\x00").await;
    assert_eq!(error_code(&p), 0);
    assert!(String::from_utf8_lossy(&p).contains("busy"));
    assert!(
        s.hooks
            .failures()
            .iter()
            .any(|(_, r)| r.contains("max_transfers"))
    );
    s.stop().await;
}

/// 200 curl clients at once (plus a 33 MiB file at blksize 512: block numbers wrap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_clients_and_rollover() {
    if !have("curl") || !have("atftp") {
        return;
    }
    let s = start("127.0.0.1:0", |_| {}).await;
    let big = pseudo_random(512 * 65536 + 4321, 9);
    std::fs::write(s.path("big.bin"), &big).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let big_out = dir.path().join("big");
    let port = s.addr.port();
    // `timeout 5` (RFC 2349: the server's retransmit interval for this transfer): with 200
    // curls starting beside it on a loaded CI machine, atftp's ACK of the OACK once came after
    // the default 1 s, the server sent the OACK again, and atftp aborts on a second OACK.
    let rollover = {
        let big_out = big_out.clone();
        tokio::spawn(async move {
            atftp(
                port,
                "big.bin",
                &big_out,
                &["blksize 512", "windowsize 32", "tsize 0", "timeout 5"],
                "127.0.0.1",
            )
            .await
        })
    };
    let want = std::fs::read(s.path("small.bin")).unwrap();
    let mut joins = Vec::new();
    for i in 0..200 {
        let url = s.url("small.bin");
        let out = dir.path().join(format!("c{i}"));
        joins.push(tokio::spawn(async move {
            let o = curl(&url, &out, Some(1432)).await;
            (o, std::fs::read(&out).unwrap_or_default())
        }));
    }
    let mut ok = 0;
    for j in joins {
        let (o, got) = j.await.unwrap();
        assert!(o.status.success(), "{o:?}");
        assert!(got == want);
        ok += 1;
    }
    assert_eq!(ok, 200);
    let o = rollover.await.unwrap();
    assert!(o.status.success(), "{o:?}");
    assert!(
        std::fs::read(&big_out).unwrap() == big,
        "rollover file differs"
    );
    // The same file in lock-step at blksize 512 with curl (65538 round trips).
    let o = curl(&s.url("big.bin"), &big_out, Some(512)).await;
    assert!(o.status.success(), "{o:?}");
    assert!(
        std::fs::read(&big_out).unwrap() == big,
        "curl rollover differs"
    );
    assert_eq!(s.hooks.finished().len(), 202);
    s.stop().await;
}

/// Between two network namespaces with 5% of the packets to the client dropped: atftp with
/// windowsize 16 and in lock-step gets every byte. (curl asks for `timeout 6`, which RFC 2349
/// makes the server's retransmit interval, so curl under loss is slow by design; it is tested
/// over loopback.)
#[test]
fn lossy_link_in_namespaces() {
    if !corral_testkit::require_root("corral-tftp lossy_link_in_namespaces") {
        return;
    }
    if !have("atftp") || !have("curl") {
        return;
    }
    let lab = corral_testkit::Lab::new("tftploss", 2).unwrap();
    let root = tempfile::tempdir().unwrap();
    let data = pseudo_random(600_000, 5);
    std::fs::write(root.path().join("f.bin"), &data).unwrap();
    // The server runs in host 0's namespace: enter it on a dedicated thread.
    let ns = lab.host(0).ns.clone();
    let server_ip = lab.host(0).ip;
    let root_path = root.path().to_owned();
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
        rustix_setns(&f);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let sock = UdpSocket::bind("0.0.0.0:69").await.unwrap();
            tx.send(()).unwrap();
            // A short retransmit timeout keeps lock-step under loss quick.
            let cfg = TftpConfig {
                root: root_path,
                timeout: Duration::from_millis(200),
                retries: 20,
                ..TftpConfig::default()
            };
            serve(sock, cfg, Arc::new(corral_tftp::NoHooks), c2)
                .await
                .unwrap();
        });
    });
    rx.recv().unwrap();
    lab.set_loss(1, 0.05).unwrap();
    let out = root.path().join("out");
    for opts in [
        vec!["blksize 1432", "windowsize 16", "tsize 0"],
        vec!["blksize 1432"],
    ] {
        let _ = std::fs::remove_file(&out);
        let t0 = std::time::Instant::now();
        let mut cmd = lab.host(1).command("atftp");
        for o in &opts {
            cmd.args(["--option", o]);
        }
        let o = cmd
            .args(["-g", "-r", "f.bin", "-l"])
            .arg(&out)
            .arg(server_ip.to_string())
            .output()
            .unwrap();
        assert!(o.status.success(), "atftp {opts:?}: {o:?}");
        assert!(std::fs::read(&out).unwrap() == data, "atftp {opts:?} bytes");
        eprintln!("atftp {opts:?} over a lossy link: {:?}", t0.elapsed());
    }
    cancel.cancel();
    server.join().unwrap();
}

fn rustix_setns(f: &std::fs::File) {
    rustix::thread::move_into_link_name_space(
        std::os::fd::AsFd::as_fd(f),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .unwrap();
}

/// A dual-stack listener on `[::]`: IPv6 clients and IPv4 clients (v4-mapped) are both answered
/// from the address they asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_listener() {
    if !have("curl") {
        return;
    }
    let s = start("[::]:0", |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    let want = std::fs::read(s.path("small.bin")).unwrap();
    for host in ["[::1]", "127.0.0.1"] {
        let _ = std::fs::remove_file(&out);
        let url = format!("tftp://{host}:{}/small.bin", s.addr.port());
        let o = curl(&url, &out, Some(1432)).await;
        assert!(o.status.success(), "{url}: {o:?}");
        assert!(std::fs::read(&out).unwrap() == want, "{url}");
    }
    s.stop().await;
}

/// Receives one datagram within `within`, or panics with `what`.
async fn recv_within(sock: &UdpSocket, within: Duration, what: &str) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 2048];
    let (n, from) = tokio::time::timeout(within, sock.recv_from(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("no {what} within {within:?}"))
        .unwrap();
    buf.truncate(n);
    (buf, from)
}

/// A lock-step transfer (driven on its own thread) retransmits an unacknowledged block after
/// the timeout, no earlier, and gives up with an error packet after `retries` retransmissions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockstep_retransmits_then_gives_up() {
    let s = start("127.0.0.1:0", |c| {
        c.timeout = Duration::from_millis(300);
        c.retries = 2;
    })
    .await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client
        .send_to(b"\x00\x01small.bin\x00octet\x00", s.addr)
        .await
        .unwrap();
    let (first, tid) = recv_within(&client, Duration::from_secs(5), "DATA 1").await;
    assert_eq!(&first[..4], b"\x00\x03\x00\x01");
    for _ in 0..2 {
        let t0 = std::time::Instant::now();
        let (again, from) = recv_within(&client, Duration::from_secs(3), "retransmission").await;
        let waited = t0.elapsed();
        assert_eq!(from, tid);
        assert_eq!(again, first, "the same block is sent again");
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_millis(1000),
            "retransmitted after {waited:?}, timeout is 300 ms"
        );
    }
    let (err, _) = recv_within(&client, Duration::from_secs(3), "error").await;
    assert_eq!(error_code(&err), 0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let failures = s.hooks.failures();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0].1.contains("timed out"), "{failures:?}");
    s.stop().await;
}

/// Cancelling the server ends a running lock-step transfer at once: the client gets "server
/// shutting down" and `serve` returns well within a retransmit timeout it would otherwise wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_a_lockstep_transfer_promptly() {
    let s = start("127.0.0.1:0", |c| c.timeout = Duration::from_secs(10)).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client
        .send_to(b"\x00\x01small.bin\x00octet\x00", s.addr)
        .await
        .unwrap();
    let (first, _) = recv_within(&client, Duration::from_secs(5), "DATA 1").await;
    assert_eq!(&first[..4], b"\x00\x03\x00\x01");
    let t0 = std::time::Instant::now();
    s.cancel.cancel();
    let (err, _) = recv_within(&client, Duration::from_secs(2), "shutdown error").await;
    assert_eq!(error_code(&err), 0);
    assert!(String::from_utf8_lossy(&err).contains("shutting down"));
    tokio::time::timeout(Duration::from_secs(2), s.task)
        .await
        .expect("serve returns promptly")
        .unwrap()
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2));
}

/// The value of one series in Prometheus text (`name{labels}`), if present.
fn series(text: &str, name_and_labels: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name_and_labels)?
            .strip_prefix(' ')?
            .parse()
            .ok()
    })
}

/// The TFTP counters (`corral_tftp::metrics`): a lock-step and a windowed transfer
/// move started/completed and the DATA bytes by exactly the files' sizes, a missing file is
/// a refusal with one ERROR packet, and nothing stays active.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_transfers_refusals_and_bytes() {
    if !have("curl") || !have("atftp") {
        return;
    }
    // A long retransmit timeout: on a loaded machine a retransmission would add bytes.
    let s = start("127.0.0.1:0", |c| c.timeout = Duration::from_secs(10)).await;
    let label = format!("{{listen=\"{}\"", s.addr);
    let get = |name: &str, extra: &str| {
        series(
            &corral_tftp::metrics::prometheus_text(),
            &format!("corral_tftp_{name}{label}{extra}}}"),
        )
    };
    // `serve` registers its counters when its task first runs.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while get("transfers_started_total", "").is_none() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(get("transfers_started_total", ""), Some(0));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // Lock-step (curl, blksize 1432) and windowed with GSO runs (atftp, windowsize 16).
    let o = curl(&s.url("small.bin"), &out, Some(1432)).await;
    assert!(o.status.success(), "{o:?}");
    let o = atftp(
        s.addr.port(),
        "exact512",
        &out,
        &["blksize 512", "windowsize 16"],
        "127.0.0.1",
    )
    .await;
    assert!(o.status.success(), "{o:?}");
    let o = curl(&s.url("missing.bin"), &out, None).await;
    assert!(!o.status.success());
    // The server counts a transfer's end when it has read the last ACK, which may be just
    // after the client exits.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while get("transfers_completed_total", "") != Some(2) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = corral_tftp::metrics::prometheus_text();
    for (name, extra, want) in [
        ("transfers_started_total", "", 2),
        ("transfers_completed_total", "", 2),
        ("transfers_failed_total", ",reason=\"timeout\"", 0),
        ("requests_refused_total", ",reason=\"not_found\"", 1),
        ("requests_refused_total", ",reason=\"denied\"", 0),
        ("active_transfers", "", 0),
        ("data_bytes_sent_total", "", 70_001 + 512 * 4),
        ("blocks_retransmitted_total", "", 0),
        ("errors_sent_total", "", 1),
    ] {
        let key = format!("corral_tftp_{name}{label}{extra}}}");
        assert_eq!(series(&text, &key), Some(want), "{key} in\n{text}");
    }
    let before = s.addr;
    s.stop().await;
    assert!(
        !corral_tftp::metrics::prometheus_text().contains(&before.to_string()),
        "a stopped server's series are dropped"
    );
}
