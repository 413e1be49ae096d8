//! Runs a cast role (sender, receiver, rogue) in a child process, so that it can live in a
//! network namespace: the test binary re-executes itself with `CORRAL_CAST_HELPER` set to a
//! JSON [`Role`], and the `helper` test below runs that role and exits.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use corral_cast::socket::MulticastConfig;
use corral_cast::{CancellationToken, OutputSpec, Rate, ReceiveOptions, SendOptions};

/// The environment variable holding the role.
pub(crate) const ENV: &str = "CORRAL_CAST_HELPER";
/// Prefix of the line that carries the result as JSON.
pub(crate) const RESULT: &str = "HELPER-RESULT ";

/// What a helper process does.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) enum Role {
    /// `corral_cast::send`.
    Send {
        source: PathBuf,
        group: Ipv4Addr,
        port: u16,
        interface: Ipv4Addr,
        min_receivers: usize,
        expect: Vec<String>,
        rate: Option<u64>,
        max_wait_ms: u64,
        linger_ms: u64,
        key_seed: Option<[u8; 32]>,
        /// Unicast targets instead of the group.
        #[serde(default)]
        unicast: Vec<SocketAddrV4>,
    },
    /// `corral_cast::receive`.
    Receive {
        output: Option<PathBuf>,
        pipe: Option<String>,
        group: Ipv4Addr,
        port: u16,
        interface: Ipv4Addr,
        sender: Option<SocketAddr>,
        state: Option<PathBuf>,
        name: String,
        trusted_key: Option<[u8; 32]>,
        idle_ms: u64,
        /// Take the stream by unicast on `port` instead of joining the group.
        #[serde(default)]
        unicast: bool,
    },
    /// Holds a UDP port (as another program on the sender's host would) for `seconds`,
    /// counting the datagrams that reach it.
    Hold { port: u16, seconds: u64 },
    /// Listens to the group and re-sends corrupted copies of what it hears, plus garbage.
    Rogue {
        group: Ipv4Addr,
        port: u16,
        interface: Ipv4Addr,
        seconds: u64,
    },
}

/// A command that runs `role` through this test binary (wrap it in a namespace with
/// `host.command(exe)` by passing the program and args separately).
pub(crate) fn command(base: Command, role: &Role) -> Command {
    let mut c = base;
    c.args([
        "helper::helper",
        "--exact",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env(ENV, serde_json::to_string(role).expect("roles serialise"))
    .env("RUST_LOG", "corral_cast=debug,corral_cast_proto=info");
    c
}

/// The test binary's own path.
pub(crate) fn exe() -> PathBuf {
    std::env::current_exe().expect("test binary path")
}

/// Parses the result line out of a helper's stdout.
pub(crate) fn result(stdout: &[u8]) -> Option<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .find_map(|l| l.find(RESULT).map(|i| &l[i + RESULT.len()..]))
        .and_then(|j| serde_json::from_str(j).ok())
}

fn mcast(group: Ipv4Addr, port: u16, interface: Ipv4Addr) -> MulticastConfig {
    MulticastConfig {
        group,
        port,
        interface: Some(interface),
        ttl: 1,
        loopback: false,
        buffer: corral_cast::socket::DEFAULT_SOCKET_BUFFER,
    }
}

/// Options for a sender with test-friendly timings.
#[allow(clippy::too_many_arguments)]
pub(crate) fn send_options(
    source: PathBuf,
    group: Ipv4Addr,
    port: u16,
    interface: Ipv4Addr,
    min_receivers: usize,
    expect: Vec<String>,
    rate: Option<u64>,
    max_wait: Duration,
    linger: Duration,
    key_seed: Option<[u8; 32]>,
) -> SendOptions {
    SendOptions {
        source,
        multicast: mcast(group, port, interface),
        unicast: Vec::new(),
        catchup_port: port,
        catchup_listener: None,
        rate: rate.map(Rate::Fixed).unwrap_or(Rate::Adaptive),
        packet_size: 1472,
        min_receivers,
        expect,
        min_wait: Duration::from_millis(200),
        max_wait,
        compress_level: 1,
        key: key_seed.map(|s| corral_cast::keys::SigningKey::from_bytes(&s)),
        linger,
        observer: Arc::new(corral_cast::NoObserver),
    }
}

/// Options for a receiver with test-friendly timings.
#[allow(clippy::too_many_arguments)]
pub(crate) fn receive_options(
    output: OutputSpec,
    group: Ipv4Addr,
    port: u16,
    interface: Ipv4Addr,
    sender: Option<SocketAddr>,
    state: Option<PathBuf>,
    name: &str,
    trusted_key: Option<[u8; 32]>,
    idle: Duration,
) -> ReceiveOptions {
    ReceiveOptions {
        output,
        multicast: mcast(group, port, interface),
        unicast: false,
        sender,
        trusted_key: trusted_key
            .map(|k| corral_cast::keys::VerifyingKey::from_bytes(&k).expect("valid test key")),
        state,
        name: name.to_owned(),
        silent_after: Duration::from_secs(5),
        idle_timeout: idle,
        observer: Arc::new(corral_cast::NoObserver),
    }
}

async fn run_role(role: Role) -> (bool, serde_json::Value) {
    match role {
        Role::Send {
            source,
            group,
            port,
            interface,
            min_receivers,
            expect,
            rate,
            max_wait_ms,
            linger_ms,
            key_seed,
            unicast,
        } => {
            let mut opts = send_options(
                source,
                group,
                port,
                interface,
                min_receivers,
                expect,
                rate,
                Duration::from_millis(max_wait_ms),
                Duration::from_millis(linger_ms),
                key_seed,
            );
            opts.unicast = unicast;
            match corral_cast::send(opts, CancellationToken::new()).await {
                Ok(r) => (
                    r.all_ok(),
                    serde_json::json!({"ok": r.all_ok(), "report": r}),
                ),
                Err(e) => (
                    false,
                    serde_json::json!({"ok": false, "error": e.to_string()}),
                ),
            }
        }
        Role::Receive {
            output,
            pipe,
            group,
            port,
            interface,
            sender,
            state,
            name,
            trusted_key,
            idle_ms,
            unicast,
        } => {
            let spec = match (output, pipe) {
                (_, Some(p)) => OutputSpec::Pipe(p),
                (Some(o), None) => OutputSpec::Path(o),
                (None, None) => OutputSpec::Stdout,
            };
            let mut opts = receive_options(
                spec,
                group,
                port,
                interface,
                sender,
                state,
                &name,
                trusted_key,
                Duration::from_millis(idle_ms),
            );
            opts.unicast = unicast;
            match corral_cast::receive(opts, CancellationToken::new()).await {
                Ok(r) => (true, serde_json::json!({"ok": true, "report": r})),
                Err(e) => (
                    false,
                    serde_json::json!({"ok": false, "error": e.to_string()}),
                ),
            }
        }
        Role::Hold { port, seconds } => {
            let sock = tokio::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))
                .await
                .expect("bind the held port");
            let mut buf = [0u8; 2048];
            let mut heard = 0u64;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
            while let Ok(r) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await {
                if r.is_ok() {
                    heard += 1;
                }
            }
            (true, serde_json::json!({"ok": true, "heard": heard}))
        }
        Role::Rogue {
            group,
            port,
            interface,
            seconds,
        } => {
            let sent = rogue(group, port, interface, Duration::from_secs(seconds)).await;
            (true, serde_json::json!({"ok": true, "sent": sent}))
        }
    }
}

/// Hears the group and sends back corrupted copies of every packet (one byte flipped in the
/// second half, where symbol bytes are), truncated copies, and random garbage.
async fn rogue(group: Ipv4Addr, port: u16, interface: Ipv4Addr, dur: Duration) -> u64 {
    let cfg = mcast(group, port, interface);
    let rx = corral_cast::socket::receiver_socket(&cfg).expect("rogue receiver socket");
    let tx = corral_cast::socket::unicast_socket(Some(interface)).expect("rogue sender socket");
    let dest = cfg.group_addr();
    let deadline = tokio::time::Instant::now() + dur;
    let mut buf = vec![0u8; 65536];
    let mut sent = 0u64;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    loop {
        let r = tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return sent,
            r = rx.recv_from(&mut buf) => r,
        };
        let Ok((n, _)) = r else { continue };
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut forged = buf[..n].to_vec();
        if n > 20 {
            let at = n / 2 + (x as usize % (n / 2));
            forged[at] ^= 0x5a;
        }
        let _ = tx.send_to(&forged, dest).await;
        let _ = tx.send_to(&buf[..n / 3], dest).await;
        let garbage: Vec<u8> = (0..64).map(|i| (x >> (i % 8)) as u8).collect();
        let _ = tx.send_to(&garbage, dest).await;
        sent += 3;
    }
}

/// The entry point of helper processes; a no-op in a normal test run.
#[test]
fn helper() {
    let Ok(json) = std::env::var(ENV) else {
        return;
    };
    let role: Role = serde_json::from_str(&json).expect("a valid helper role");
    let _ = tracing_subscriber_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (ok, value) = rt.block_on(run_role(role));
    println!("\n{RESULT}{value}");
    std::process::exit(if ok { 0 } else { 1 });
}

fn tracing_subscriber_init() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init()
}
