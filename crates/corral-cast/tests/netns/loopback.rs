//! Sender and receivers in this process, multicast on the loopback interface. No root needed.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use corral_cast::{CancellationToken, OutputSpec};

use crate::helper::{receive_options, send_options};
use crate::{hash_file, make_image};

const LO: Ipv4Addr = Ipv4Addr::LOCALHOST;

fn group(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(239, 77, (std::process::id() % 200) as u8 + 20, n)
}

fn port(n: u16) -> u16 {
    41_000 + (std::process::id() % 500) as u16 * 10 + n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_receivers_get_identical_images() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("image");
    make_image(&img, 8 << 20, 1, 4);
    let (g, p) = (group(1), port(1));
    let mut tasks = Vec::new();
    for i in 0..2 {
        let out = dir.path().join(format!("out{i}"));
        let opts = receive_options(
            OutputSpec::Path(out),
            g,
            p,
            LO,
            None,
            None,
            &format!("r{i}"),
            None,
            Duration::from_secs(30),
        );
        tasks.push(tokio::spawn(corral_cast::receive(
            opts,
            CancellationToken::new(),
        )));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sopts = send_options(
        img.clone(),
        g,
        p,
        LO,
        2,
        vec![],
        Some(400_000_000),
        Duration::from_secs(10),
        Duration::from_secs(10),
        None,
    );
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        corral_cast::send(sopts, CancellationToken::new()),
    )
    .await
    .expect("sender finishes")
    .expect("send works");
    assert_eq!(report.receivers.len(), 2, "{report:?}");
    assert!(report.all_ok(), "{report:?}");
    let want = hash_file(&img);
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap().expect("receiver succeeds");
        assert_eq!(r.image_bytes, 8 << 20);
        assert_eq!(hash_file(&dir.path().join(format!("out{i}"))), want);
        assert!(!corral_cast::part_path(&dir.path().join(format!("out{i}"))).exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipe_output_gets_the_image_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("image");
    make_image(&img, 4 << 20, 2, 0);
    let out = dir.path().join("piped");
    let (g, p) = (group(2), port(2));
    let opts = receive_options(
        OutputSpec::Pipe(format!("cat > '{}'", out.display())),
        g,
        p,
        LO,
        None,
        None,
        "pipe",
        None,
        Duration::from_secs(30),
    );
    let rx = tokio::spawn(corral_cast::receive(opts, CancellationToken::new()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sopts = send_options(
        img.clone(),
        g,
        p,
        LO,
        1,
        vec![],
        Some(400_000_000),
        Duration::from_secs(10),
        Duration::from_secs(10),
        None,
    );
    let report = corral_cast::send(sopts, CancellationToken::new())
        .await
        .unwrap();
    assert!(report.all_ok(), "{report:?}");
    rx.await.unwrap().expect("pipe receiver succeeds");
    assert_eq!(hash_file(&out), hash_file(&img));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_key_is_refused_and_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("image");
    make_image(&img, 2 << 20, 3, 0);
    let out = dir.path().join("out");
    let (g, p) = (group(3), port(3));
    let other = corral_cast::keys::SigningKey::from_bytes(&[9; 32]);
    let opts = receive_options(
        OutputSpec::Path(out.clone()),
        g,
        p,
        LO,
        None,
        None,
        "picky",
        Some(other.verifying_key().to_bytes()),
        Duration::from_secs(4),
    );
    let rx = tokio::spawn(corral_cast::receive(opts, CancellationToken::new()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sopts = send_options(
        img.clone(),
        g,
        p,
        LO,
        1,
        vec![],
        Some(200_000_000),
        Duration::from_secs(2),
        Duration::from_secs(3),
        Some([1; 32]),
    );
    let cancel = CancellationToken::new();
    let sender = tokio::spawn(corral_cast::send(sopts, cancel.clone()));
    let r = tokio::time::timeout(Duration::from_secs(30), rx)
        .await
        .expect("receiver gives up")
        .unwrap();
    assert!(r.is_err(), "a manifest signed by another key was accepted");
    cancel.cancel();
    let _ = sender.await;
    assert!(!out.exists(), "nothing may be written under the final name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_only_receiver_with_sender_address() {
    crate::init_logs();
    // The sender's datagrams go to an address nobody listens on (unicast to 127.0.0.2, as if
    // a firewall dropped them), so the receiver never hears the stream: it must fetch
    // everything over TCP from the --sender address.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("image");
    make_image(&img, 4 << 20, 4, 2);
    let out = dir.path().join("out");
    let p = port(4);
    let opts = receive_options(
        OutputSpec::Path(out.clone()),
        group(4),
        p,
        LO,
        Some(SocketAddr::from((LO, p))),
        None,
        "tcp-only",
        None,
        Duration::from_secs(30),
    );
    let mut sopts = send_options(
        img.clone(),
        group(4),
        p,
        LO,
        1,
        vec![],
        Some(200_000_000),
        Duration::ZERO,
        Duration::from_secs(10),
        None,
    );
    sopts.unicast = vec![std::net::SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), p)];
    let cancel = CancellationToken::new();
    let sender = tokio::spawn(corral_cast::send(sopts, cancel.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = tokio::time::timeout(
        Duration::from_secs(40),
        corral_cast::receive(opts, CancellationToken::new()),
    )
    .await
    .expect("receiver finishes")
    .expect("tcp fallback works");
    assert_eq!(r.blocks_multicast, 0, "{r:?}");
    assert!(r.blocks_tcp > 0, "{r:?}");
    assert_eq!(hash_file(&out), hash_file(&img));
    cancel.cancel();
    let _ = sender.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_refetches_only_missing_blocks() {
    crate::init_logs();
    // A receiver's earlier run left a part file with the first half of the image and a state
    // file saying so; the rerun must re-verify that half and fetch only the rest.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("image");
    let len = 8usize << 20;
    make_image(&img, len, 5, 0);
    let out = dir.path().join("out");
    let state = dir.path().join("state");
    let (g, p) = (group(6), port(6));

    // First run: a receiver that is cancelled after the first block is written.
    let first = receive_options(
        OutputSpec::Path(out.clone()),
        g,
        p,
        LO,
        None,
        Some(state.clone()),
        "resumer",
        None,
        Duration::from_secs(30),
    );
    let cancel_rx = CancellationToken::new();
    let rx = tokio::spawn(corral_cast::receive(first, cancel_rx.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sopts = send_options(
        img.clone(),
        g,
        p,
        LO,
        1,
        vec![],
        Some(20_000_000),
        Duration::from_secs(5),
        Duration::from_secs(2),
        Some([2; 32]),
    );
    let cancel_tx = CancellationToken::new();
    let sender = tokio::spawn(corral_cast::send(sopts.clone(), cancel_tx.clone()));
    // 20 Mbit/s: 8 MiB takes over 3 s. Stop the receiver once its state file (saved every
    // 0.5 s) lists two blocks, rather than after a fixed time: on a loaded machine the
    // rendezvous alone can take longer than any fixed guess, and the cancelled run then had
    // nothing to resume.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let listed = corral_cast::state::ResumeState::load(&state)
            .ok()
            .flatten()
            .map_or(0, |s| s.count());
        if listed >= 2 || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cancel_rx.cancel();
    assert!(
        rx.await.unwrap().is_err(),
        "cancelled receiver must not report success"
    );
    cancel_tx.cancel();
    let _ = sender.await;
    let saved = corral_cast::state::ResumeState::load(&state)
        .unwrap()
        .expect("state file written");
    let had = saved.count();
    assert!(
        had > 1 && had < saved.blocks(),
        "had {had} of {}",
        saved.blocks()
    );
    // One block the state file lists changes on disk meanwhile (one bit): the rerun must catch
    // it when it re-reads the resumed blocks, fetch it again, and still end with the image.
    let bad = (0..saved.blocks()).find(|&i| saved.has(i)).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let part = corral_cast::part_path(&out);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&part)
            .unwrap();
        let at = bad * (1 << 20) + 12_345;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x20], at).unwrap();
        f.sync_all().unwrap();
    }

    // Second run, same state file, same key (same image): only the rest is fetched.
    let second = receive_options(
        OutputSpec::Path(out.clone()),
        g,
        p,
        LO,
        None,
        Some(state.clone()),
        "resumer",
        None,
        Duration::from_secs(30),
    );
    let rx = tokio::spawn(corral_cast::receive(second, CancellationToken::new()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut sopts = sopts;
    sopts.rate = corral_cast::Rate::Fixed(400_000_000);
    let report = corral_cast::send(sopts, CancellationToken::new())
        .await
        .unwrap();
    assert!(report.all_ok(), "{report:?}");
    let r = rx.await.unwrap().expect("resumed receiver succeeds");
    assert_eq!(
        r.blocks_resumed,
        had - 1,
        "the changed block {bad} was trusted: {r:?}"
    );
    assert_eq!(hash_file(&out), hash_file(&img));
}

/// An image server of `images` with control port `control`, its slots from `group:port` on
/// loopback (its datagrams looped back), sessions signed with the key of `key_seed`, starting
/// once two receivers joined (after 200 ms; at most 3 s).
fn serve_options(
    images: &std::path::Path,
    control: SocketAddr,
    group: Ipv4Addr,
    port: u16,
    key_seed: [u8; 32],
) -> corral_cast::serve::ServeOptions {
    let mut multicast = receive_options(
        OutputSpec::Stdout,
        group,
        port,
        LO,
        None,
        None,
        "x",
        None,
        Duration::from_secs(1),
    )
    .multicast;
    multicast.loopback = true;
    corral_cast::serve::ServeOptions {
        dir: images.to_path_buf(),
        control,
        multicast,
        max_sessions: 4,
        rate: corral_cast::Rate::Fixed(400_000_000),
        packet_size: 1472,
        min_receivers: 2,
        min_wait: Duration::from_millis(200),
        max_wait: Duration::from_secs(3),
        compress_level: 1,
        key: Some(corral_cast::keys::SigningKey::from_bytes(&key_seed)),
        linger: Duration::from_secs(10),
        observer: Arc::new(corral_cast::NoObserver),
    }
}

/// `serve`: receivers ask for images by name; two images run as two sessions at once on two
/// groups, two receivers of one image share one session, and hostile requests are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_server_runs_a_session_per_image_and_refuses_bad_names() {
    use corral_cast::serve::{self, Answer, Request};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    make_image(&images.join("alpha.img"), 3 << 20, 11, 3);
    make_image(&images.join("beta.img"), 2 << 20, 12, 0);
    std::fs::write(images.join(".hidden"), b"secret").unwrap();
    std::fs::write(dir.path().join("outside"), b"outside the root").unwrap();
    std::os::unix::fs::symlink(dir.path().join("outside"), images.join("escape.img")).unwrap();

    let control: SocketAddr = (LO, port(9)).into();
    let opts = serve_options(&images, control, group(40), port(5), [7; 32]);
    let cancel = CancellationToken::new();
    let server = tokio::spawn(serve::serve(opts, cancel.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The list shows the two images, not the hidden file nor the symlink out of the root.
    match serve::ask(control, &Request::List).await.unwrap() {
        Answer::Images { images } => {
            let names: Vec<_> = images.iter().map(|i| i.name.as_str()).collect();
            assert_eq!(names, ["alpha.img", "beta.img"]);
            assert_eq!(images[0].bytes, 3 << 20);
        }
        other => panic!("unexpected answer {other:?}"),
    }
    for bad in [
        "../outside",
        "/etc/passwd",
        ".hidden",
        "escape.img",
        "missing.img",
        "",
    ] {
        let err = serve::request_image(control, bad, "rogue")
            .await
            .unwrap_err();
        assert!(
            matches!(err, corral_cast::CastError::Control { .. }),
            "{bad:?}: {err}"
        );
    }
    // Garbage and an over-long line get an error answer, not a dropped server.
    for junk in [b"not json\n".to_vec(), vec![b'x'; 10_000]] {
        let mut s = tokio::net::TcpStream::connect(control).await.unwrap();
        s.write_all(&junk).await.unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        assert!(answer.contains("\"status\":\"error\""), "{answer}");
    }

    // Three receivers: two want alpha (one session), one wants beta (a second session).
    let want = [("r1", "alpha.img"), ("r2", "alpha.img"), ("r3", "beta.img")];
    let mut tasks = Vec::new();
    let mut groups = Vec::new();
    for (name, image) in want {
        let offer = serve::request_image(control, image, name).await.unwrap();
        groups.push((image, offer.group, offer.port));
        let out = dir.path().join(format!("{name}.out"));
        let mut opts = crate::helper::receive_options(
            OutputSpec::Path(out),
            offer.group,
            offer.port,
            LO,
            Some(offer.sender),
            None,
            name,
            Some(
                corral_cast::keys::SigningKey::from_bytes(&[7; 32])
                    .verifying_key()
                    .to_bytes(),
            ),
            Duration::from_secs(30),
        );
        opts.multicast.loopback = true;
        tasks.push(tokio::spawn(corral_cast::receive(
            opts,
            CancellationToken::new(),
        )));
    }
    assert_eq!(
        groups[0].1, groups[1].1,
        "one session per image: {groups:?}"
    );
    assert_ne!(
        groups[0].1, groups[2].1,
        "distinct groups per session: {groups:?}"
    );
    assert_ne!(
        groups[0].2, groups[2].2,
        "distinct ports per session: {groups:?}"
    );
    for ((name, image), t) in want.iter().zip(tasks) {
        let r = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("receiver finishes")
            .unwrap()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            hash_file(&dir.path().join(format!("{name}.out"))),
            hash_file(&images.join(image)),
            "{name}"
        );
        assert!(r.blocks > 0);
    }
    cancel.cancel();
    server.await.unwrap().unwrap();
}

/// Collects the events of a session or server.
#[derive(Default)]
struct Events(std::sync::Mutex<Vec<corral_model::Event>>);

impl corral_cast::Observer for Events {
    fn event(&self, event: &corral_model::Event) {
        self.0.lock().unwrap().push(event.clone());
    }
}

/// `serve` names the catch-up port a session really listens on: another program holds the
/// slot's port, so the session listens on another, and that is the one offered (before, the
/// slot's port was offered, and a receiver that needed catch-up asked the program holding it).
/// The catch-up server there serves this session's manifest; a receiver given the offer
/// sends its reports to the sender's UDP port, not to that TCP port, so the sender hears it,
/// starts at once and counts it verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_catchup_port_is_taken_offers_the_port_it_listens_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    make_image(&images.join("gamma.img"), 2 << 20, 13, 2);
    // The slot's port, held by somebody else (who accepts connections and never answers).
    let squatter = std::net::TcpListener::bind((LO, 0)).unwrap();
    let taken = squatter.local_addr().unwrap().port();
    let control: SocketAddr = {
        let free = std::net::TcpListener::bind((LO, 0)).unwrap();
        free.local_addr().unwrap()
    };
    let key = corral_cast::keys::SigningKey::from_bytes(&[9; 32]);
    let events = Arc::new(Events::default());
    let mut opts = serve_options(&images, control, group(50), taken, [9; 32]);
    opts.max_sessions = 1;
    opts.min_receivers = 1;
    opts.min_wait = Duration::from_millis(100);
    // Long enough that a session starting without its receiver's join shows.
    opts.max_wait = Duration::from_secs(20);
    opts.observer = events.clone();
    let cancel = CancellationToken::new();
    let server = tokio::spawn(corral_cast::serve::serve(opts, cancel.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;

    let offer = corral_cast::serve::request_image(control, "gamma.img", "r1")
        .await
        .unwrap();
    assert_eq!(offer.port, taken, "the session's UDP port is the slot's");
    assert_ne!(
        offer.sender.port(),
        taken,
        "offered the catch-up port another program holds: {offer:?}"
    );
    // A second receiver joining the gathering session is told the same.
    let again = corral_cast::serve::request_image(control, "gamma.img", "r2")
        .await
        .unwrap();
    assert_eq!(again.sender, offer.sender);
    // The offered address serves this session's manifest (catch-up protocol: opening, then
    // `M` + group + port; status 2 while the sender still hashes its image, then 0 with the
    // sender's UDP port and the manifest).
    let mut tcp = tokio::net::TcpStream::connect(offer.sender).await.unwrap();
    let manifest = loop {
        let mut req = vec![b'C', b'U', 2, b'M'];
        req.extend_from_slice(&offer.group.octets());
        req.extend_from_slice(&offer.port.to_be_bytes());
        tcp.write_all(&req).await.unwrap();
        let status = tcp.read_u8().await.unwrap();
        let len = tcp.read_u32().await.unwrap();
        let mut body = vec![0u8; len as usize];
        tcp.read_exact(&mut body).await.unwrap();
        match status {
            0 => break body,
            2 => tokio::time::sleep(Duration::from_millis(50)).await,
            s => panic!("status {s} from the offered catch-up address"),
        }
        tcp = tokio::net::TcpStream::connect(offer.sender).await.unwrap();
    };
    assert_eq!(
        u16::from_be_bytes([manifest[0], manifest[1]]),
        taken,
        "the session's UDP port, told with the manifest"
    );
    assert!(manifest.len() > 2 + 64, "a signed manifest");
    drop(tcp);

    let out = dir.path().join("r1.out");
    let ropts = receive_options(
        OutputSpec::Path(out.clone()),
        offer.group,
        offer.port,
        LO,
        Some(offer.sender),
        None,
        "r1",
        Some(key.verifying_key().to_bytes()),
        Duration::from_secs(30),
    );
    let t0 = std::time::Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(60),
        corral_cast::receive(ropts, CancellationToken::new()),
    )
    .await
    .expect("the receiver finishes")
    .unwrap();
    assert!(r.blocks > 0);
    assert_eq!(hash_file(&out), hash_file(&images.join("gamma.img")));
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "the sender did not hear the receiver's join: it started at its max wait"
    );
    // The session ends with the receiver counted.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let end = loop {
        let end = events
            .0
            .lock()
            .unwrap()
            .iter()
            .find(|e| e.kind.0 == "serve-session-end")
            .cloned();
        if let Some(e) = end {
            break e;
        }
        assert!(std::time::Instant::now() < deadline, "no session end");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        end.reason.contains("1 receiver(s) verified"),
        "{}",
        end.reason
    );
    drop(squatter);
    cancel.cancel();
    server.await.unwrap().unwrap();
}

/// A receiver whose sender's catch-up server speaks another protocol version (a sender of
/// another corral release) stops at once with that reason and writes nothing, instead of
/// asking again until its idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_stops_at_a_catchup_server_of_another_version() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind((LO, 0)).await.unwrap();
    let sender = listener.local_addr().unwrap();
    // Answers every connection as a server of version 9 would.
    let server = tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut opening = [0u8; 3];
            s.read_exact(&mut opening).await.unwrap();
            s.write_all(&[4, 0, 0, 0, 1, 9]).await.unwrap();
            let _ = s.shutdown().await;
        }
    });
    let out = dir.path().join("out");
    // A group nobody sends to.
    let mut opts = receive_options(
        OutputSpec::Path(out.clone()),
        group(51),
        sender.port(),
        LO,
        Some(sender),
        None,
        "r1",
        None,
        Duration::from_secs(30),
    );
    opts.silent_after = Duration::from_secs(1);
    let started = std::time::Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        corral_cast::receive(opts, CancellationToken::new()),
    )
    .await
    .expect("the receiver stops before its idle timeout")
    .unwrap_err();
    assert!(
        matches!(
            err,
            corral_cast::CastError::CatchUpVersion { theirs: 9, .. }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("run the same corral release"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!out.exists(), "nothing written");
    assert!(!corral_cast::part_path(&out).exists(), "no part file");
    server.abort();
}

/// Two senders on one host with the same port and different groups: each hears its own
/// receiver, at once. They used to share the UDP port (SO_REUSEADDR), and the kernel hands
/// each unicast datagram to one of the sockets sharing a port (the newest, or one whose last
/// datagram came in on the same CPU), so each sender lost a share of its receivers' joins,
/// reports, NAKs and Dones to the other (retries hid it here). The second now takes an
/// ephemeral port, which its datagrams carry to its receivers (`socket`'s unit test pins
/// the ports).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_senders_on_one_port_each_hear_their_receivers() {
    let dir = tempfile::tempdir().unwrap();
    let p = std::net::UdpSocket::bind((LO, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    for (k, name) in ["a", "b"].into_iter().enumerate() {
        let img = dir.path().join(format!("image-{name}"));
        make_image(&img, 3 << 20, 20 + k as u64, 0);
        let g = group(52 + k as u8);
        let out = dir.path().join(format!("out-{name}"));
        let opts = receive_options(
            OutputSpec::Path(out.clone()),
            g,
            p,
            LO,
            None,
            None,
            name,
            None,
            Duration::from_secs(30),
        );
        receivers.push((
            img.clone(),
            out,
            tokio::spawn(corral_cast::receive(opts, CancellationToken::new())),
        ));
        senders.push(send_options(
            img,
            g,
            p,
            LO,
            1,
            vec![name.to_string()],
            Some(400_000_000),
            Duration::from_secs(8),
            Duration::from_secs(10),
            None,
        ));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = std::time::Instant::now();
    let sends: Vec<_> = senders
        .into_iter()
        .map(|o| tokio::spawn(corral_cast::send(o, CancellationToken::new())))
        .collect();
    for (s, name) in sends.into_iter().zip(["a", "b"]) {
        let report = tokio::time::timeout(Duration::from_secs(60), s)
            .await
            .expect("sender finishes")
            .unwrap()
            .expect("send works");
        assert!(report.all_ok(), "sender of {name}: {report:?}");
        assert_eq!(report.receivers.len(), 1, "{report:?}");
        assert_eq!(report.receivers[0].name, name);
    }
    assert!(
        t0.elapsed() < Duration::from_secs(7),
        "a sender waited for its max wait: its receiver's join did not reach it"
    );
    for (img, out, t) in receivers {
        t.await.unwrap().expect("receiver succeeds");
        assert_eq!(hash_file(&out), hash_file(&img));
    }
}
