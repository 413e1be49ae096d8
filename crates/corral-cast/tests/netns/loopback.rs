//! Sender and receivers in this process, multicast on the loopback interface. No root needed.

use std::net::{Ipv4Addr, SocketAddr};
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
    // The receiver listens on another group, so it never hears multicast data: it must fetch
    // everything over TCP from the --sender address.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("image");
    make_image(&img, 4 << 20, 4, 2);
    let out = dir.path().join("out");
    let p = port(4);
    let opts = receive_options(
        OutputSpec::Path(out.clone()),
        group(5),
        p,
        LO,
        Some(SocketAddr::from((LO, p))),
        None,
        "tcp-only",
        None,
        Duration::from_secs(30),
    );
    let sopts = send_options(
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
    // 20 Mbit/s: 8 MiB takes over 3 s; stop the receiver after about 1.5 s.
    tokio::time::sleep(Duration::from_millis(1500)).await;
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
        had > 0 && had < saved.blocks(),
        "had {had} of {}",
        saved.blocks()
    );

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
    assert_eq!(r.blocks_resumed, had, "{r:?}");
    assert_eq!(hash_file(&out), hash_file(&img));
}
