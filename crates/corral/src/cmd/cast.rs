//! `corral cast send|receive|keygen`: multicast an image to many machines, verified block by
//! block against a signed manifest.

use std::io::IsTerminal;
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use corral_cast::CancellationToken;
use corral_cast::socket::{DEFAULT_SOCKET_BUFFER, MulticastConfig};
use corral_cast::{Observer, OutputSpec, Progress, Rate, ReceiveOptions, SendOptions, keys};
use corral_model::Event;
use corral_store::{Recorder, RecorderConfig};
use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressStyle};

use crate::cli::Global;
use crate::exit::{Code, bad_input};

/// Cast commands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum CastCommand {
    /// Send an image to every receiver.
    #[command(after_help = "\
Examples:
  corral cast send disk.img --min-receivers 4 --max-wait 60s
  corral cast send /dev/sda --interface eth1 --rate 800M --key cast.key
  zcat image.gz | corral cast send - --expect web01,web02,web03 --json
  corral cast send disk.img --unicast 10.1.0.5,10.1.0.6 --key cast.key   # no multicast")]
    Send(SendArgs),
    /// Receive an image, verify every block, write it to a file, device, stdout or a pipe.
    #[command(after_help = "\
Examples:
  corral cast receive --output /dev/sda --trusted-key cast.key.pub --state /tmp/cast.state
  corral cast receive --output disk.img --interface eth0 --name web01
  corral cast receive --pipe 'tar -x -C /mnt' --sender 10.0.0.1
  corral cast receive --output /dev/sda --unicast --sender 10.0.0.1   # sender has --unicast
  corral cast receive --server 10.0.0.1 --image debian12.img --output /dev/sda")]
    Receive(ReceiveArgs),
    /// Offer the images of a directory; receivers ask for one by name (daemon mode).
    #[command(after_help = "\
Receivers ask with `corral cast receive --server HOST --image NAME`; a session for an image starts
when its start condition holds (--min-receivers after --min-wait, or --max-wait), and requests
that come later open the next session. Sessions run at once on groups GROUP, GROUP+1, ... and
ports PORT, PORT+1, ... (one per --max-sessions slot).

Examples:
  corral cast serve --site /etc/corral             the site's [paths] images directory
  corral cast serve --dir /srv/images --interface eth1 --min-receivers 8 --max-wait 2m
  corral cast serve --dir /srv/images --key /etc/corral/cast.key --db /var/lib/corral/corral.db
  corral cast serve --site /etc/corral --metrics 127.0.0.1:9478   Prometheus text at /metrics")]
    Serve(ServeArgs),
    /// List the images a `corral cast serve` offers.
    #[command(after_help = "\
Example:
  corral cast list --server 10.0.0.1")]
    List(ListArgs),
    /// Make a signing key pair: KEY (secret, mode 0600) and KEY.pub.
    #[command(after_help = "\
Both files hold 32 bytes as 64 hexadecimal digits and a newline; readers also accept the raw 32
bytes. Give KEY to `cast send --key`, and KEY.pub to every `cast receive --trusted-key`.

Example:
  corral cast keygen --out /etc/corral/cast.key")]
    Keygen(KeygenArgs),
}

/// Flags shared by send and receive: where the group is.
#[derive(Debug, clap::Args)]
pub(crate) struct GroupArgs {
    /// Multicast group address.
    #[arg(long, default_value = "239.255.77.1")]
    group: Ipv4Addr,
    /// UDP port of the group; the sender's TCP catch-up server listens on the same number.
    #[arg(long, default_value_t = 9000)]
    port: u16,
    /// Interface to use: a name (`eth0`) or one of its IPv4 addresses. Default: the route to
    /// the group.
    #[arg(long, value_name = "IFACE|ADDR")]
    interface: Option<String>,
}

impl GroupArgs {
    fn multicast(&self, ttl: u32) -> anyhow::Result<MulticastConfig> {
        let interface = match &self.interface {
            Some(spec) => Some(corral_cast::socket::resolve_interface(spec)?),
            None => None,
        };
        if !self.group.is_multicast() {
            return Err(bad_input(format!(
                "--group {} is not a multicast address (224.0.0.0/4)",
                self.group
            )));
        }
        Ok(MulticastConfig {
            group: self.group,
            port: self.port,
            interface,
            ttl,
            loopback: false,
            buffer: DEFAULT_SOCKET_BUFFER,
        })
    }
}

/// Arguments of `corral cast send`.
#[derive(Debug, clap::Args)]
pub(crate) struct SendArgs {
    /// The image: a file, a block device, `-` for stdin (read whole first: the manifest is
    /// signed before anything is sent), or the name of an image in the site's images directory.
    source: PathBuf,
    #[command(flatten)]
    site: crate::cli::SiteArg,
    #[command(flatten)]
    group: GroupArgs,
    /// Multicast TTL (1 keeps the traffic on the local network).
    #[arg(long, default_value_t = 1)]
    ttl: u32,
    /// Sending rate in bit/s (`800M`, `1G`) or `adaptive` (back off when receivers lose data).
    #[arg(long, default_value = "adaptive")]
    rate: String,
    /// Link MTU; datagrams are sized to fit it (payload = MTU - 28).
    #[arg(long, default_value_t = 1500, conflicts_with = "packet_size")]
    mtu: usize,
    /// UDP payload size per datagram (overrides --mtu).
    #[arg(long)]
    packet_size: Option<usize>,
    /// Start once this many receivers have joined (and --min-wait has passed). Default: the
    /// number of --expect names, else of --unicast targets, else 1.
    #[arg(long)]
    min_receivers: Option<usize>,
    /// Send to these receivers by unicast instead of to the group (`HOST` or `HOST:PORT`,
    /// default port --port), for networks where multicast does not work; they run
    /// `corral cast receive --unicast`. Every datagram goes once per target, so the sender's
    /// link carries one copy per receiver: for a few machines.
    #[arg(long, value_delimiter = ',', value_name = "HOST,...")]
    unicast: Vec<String>,
    /// Receivers (their --name) that must join before the start and must all succeed.
    #[arg(long, value_delimiter = ',', value_name = "HOST,...")]
    expect: Vec<String>,
    /// Wait at least this long for receivers to join.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    min_wait: Duration,
    /// Start after this long even if fewer receivers joined (0: wait forever).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    max_wait: Duration,
    /// zstd level per block (0 stores blocks uncompressed; 1-3 is fast and enough for zeros).
    #[arg(long, default_value_t = 1)]
    compress: i32,
    /// Secret signing key from `corral cast keygen` (default: an ephemeral key, printed).
    #[arg(long, value_name = "KEY")]
    key: Option<PathBuf>,
    /// Stop waiting for a receiver that made no progress for this long after the last pass.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    linger: Duration,
    /// JSON event lines on stdout (also the default when stdout is not a terminal).
    #[arg(long)]
    json: bool,
    /// Also record every event (session start, joins, failures, result) in this audit store.
    #[arg(long, value_name = "PATH")]
    db: Option<PathBuf>,
}

/// Arguments of `corral cast receive`.
#[derive(Debug, clap::Args)]
pub(crate) struct ReceiveArgs {
    /// Where to write the image: a file (written as FILE.corral-part, renamed when verified;
    /// refused at once if its file system lacks room for the image's data), a block device
    /// (written in place, never truncated; refused if smaller than the image), or `-` for
    /// stdout (in order).
    #[arg(long, short, value_name = "PATH|-", required_unless_present = "pipe")]
    output: Option<String>,
    /// Feed the image, in order, to the standard input of `sh -c CMD`.
    #[arg(long, value_name = "CMD", conflicts_with = "output")]
    pipe: Option<String>,
    #[command(flatten)]
    group: GroupArgs,
    /// The sender's address (`HOST` or `HOST:PORT`, TCP; default port = --port): fetch over TCP
    /// even without ever hearing an announcement.
    #[arg(long, value_name = "ADDR", conflicts_with = "server")]
    sender: Option<String>,
    /// Take the stream by unicast on --port (from a sender given this machine in its
    /// --unicast list) instead of joining --group.
    #[arg(long, conflicts_with = "server")]
    unicast: bool,
    /// Ask this `corral cast serve` (`HOST` or `HOST:PORT`, default port 9100) for --image;
    /// it says which group, port and sender to use.
    #[arg(long, value_name = "ADDR", requires = "image")]
    server: Option<String>,
    /// The image to ask --server for (see `corral cast list`).
    #[arg(long, value_name = "NAME", requires = "server")]
    image: Option<String>,
    /// Only accept images signed by this public key (KEY.pub from `corral cast keygen`).
    #[arg(long, value_name = "KEY.pub")]
    trusted_key: Option<PathBuf>,
    /// Resume state: blocks already written are re-verified and not fetched again.
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,
    /// The name reported to the sender (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Give up when nothing was heard from any sender for this long (a sender still reading
    /// and hashing a large image says so every second, and is waited for).
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// JSON event lines (on stdout, or on stderr when the image goes to stdout).
    #[arg(long)]
    json: bool,
    /// Also record every event in this audit store.
    #[arg(long, value_name = "PATH")]
    db: Option<PathBuf>,
}

/// Arguments of `corral cast serve`.
#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    /// Directory of images to offer (default: the site's `[paths] images`).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    #[command(flatten)]
    site: crate::cli::SiteArg,
    /// First multicast group of the session pool.
    #[arg(long, default_value = "239.255.77.1")]
    group: Ipv4Addr,
    /// First UDP port of the session pool (TCP catch-up uses the same numbers).
    #[arg(long, default_value_t = 9000)]
    port: u16,
    /// Interface to use: a name (`eth0`) or one of its IPv4 addresses.
    #[arg(long, value_name = "IFACE|ADDR")]
    interface: Option<String>,
    /// TCP port where receivers ask for images.
    #[arg(long, default_value_t = corral_cast::serve::DEFAULT_CONTROL_PORT)]
    control_port: u16,
    /// Sessions that may run at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    max_sessions: u16,
    /// Multicast TTL.
    #[arg(long, default_value_t = 1)]
    ttl: u32,
    /// Sending rate in bit/s (`800M`, `1G`) or `adaptive`.
    #[arg(long, default_value = "adaptive")]
    rate: String,
    /// Link MTU; datagrams are sized to fit it.
    #[arg(long, default_value_t = 1500)]
    mtu: usize,
    /// Start a session once this many receivers asked for its image (after --min-wait).
    #[arg(long, default_value_t = 1)]
    min_receivers: usize,
    /// Wait at least this long for more receivers after the first one asks.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    min_wait: Duration,
    /// Start after this long even with fewer than --min-receivers.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    max_wait: Duration,
    /// zstd level per block.
    #[arg(long, default_value_t = 1)]
    compress: i32,
    /// Secret signing key (default: an ephemeral key for this server's life, printed).
    #[arg(long, value_name = "KEY")]
    key: Option<PathBuf>,
    /// Stop waiting for a receiver that made no progress for this long after the pass.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    linger: Duration,
    /// JSON event lines on stdout (also the default when stdout is not a terminal).
    #[arg(long)]
    json: bool,
    /// Record every event in this audit store (default: the site's store, when --site has a
    /// site.toml).
    #[arg(long, value_name = "PATH")]
    db: Option<PathBuf>,
    /// Serve Prometheus metrics (sessions, receivers, bytes and packets sent, events) at
    /// http://ADDR/metrics, e.g. `127.0.0.1:9478`.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,
}

/// Arguments of `corral cast list`.
#[derive(Debug, clap::Args)]
pub(crate) struct ListArgs {
    /// The `corral cast serve` to ask (`HOST` or `HOST:PORT`, default port 9100).
    #[arg(long, value_name = "ADDR")]
    server: String,
    /// One JSON object per image.
    #[arg(long)]
    json: bool,
}

/// Arguments of `corral cast keygen`.
#[derive(Debug, clap::Args)]
pub(crate) struct KeygenArgs {
    /// The secret key file to write (refuses to overwrite); the public key goes to OUT.pub.
    #[arg(long, value_name = "KEY")]
    out: PathBuf,
}

pub(crate) fn run(cmd: CastCommand, _global: &Global) -> anyhow::Result<Code> {
    match cmd {
        CastCommand::Keygen(a) => keygen(a),
        CastCommand::Send(a) => runtime()?.block_on(send(a)),
        // One thread: the receive loop polls its own sockets, so no wakeup crosses threads
        // per batch of datagrams (a measurable share of CPU with 8 receivers on 2 cores).
        CastCommand::Receive(a) => current_thread_runtime()?.block_on(receive(a)),
        CastCommand::Serve(a) => runtime()?.block_on(serve(a)),
        CastCommand::List(a) => runtime()?.block_on(list(a)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn current_thread_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn keygen(a: KeygenArgs) -> anyhow::Result<Code> {
    let key = keys::generate()?;
    let pub_path = keys::write_keypair(&a.out, &key)?;
    println!(
        "wrote secret key {} (0600) and public key {}",
        a.out.display(),
        pub_path.display()
    );
    println!("public key: {}", hex_key(&key.verifying_key()));
    Ok(Code::Success)
}

fn hex_key(k: &corral_cast::keys::VerifyingKey) -> String {
    k.to_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// Cancels `token` on Ctrl-C or SIGTERM.
fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let term_fut = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term_fut => {}
        }
        token.cancel();
    });
}

async fn send(a: SendArgs) -> anyhow::Result<Code> {
    let rate: Rate = a.rate.parse().map_err(bad_input)?;
    let packet_size = a.packet_size.unwrap_or(a.mtu.saturating_sub(28));
    if !(512..=65_000).contains(&packet_size) {
        return Err(bad_input(format!(
            "packet size {packet_size} out of range (512..=65000; check --mtu/--packet-size)"
        )));
    }
    let key = match &a.key {
        Some(p) => Some(keys::read_signing_key(p).map_err(|e| bad_input(e.to_string()))?),
        None => None,
    };
    let json = a.json || !std::io::stdout().is_terminal();
    let source = site_image(&a.source, &a.site.site)?;
    let observer = Arc::new(CliObserver::new(json, JsonTo::Stdout, recorder(&a.db)?));
    let unicast = a
        .unicast
        .iter()
        .map(|h| match resolve_sender(h, a.group.port)? {
            SocketAddr::V4(v4) => Ok(v4),
            SocketAddr::V6(_) => Err(bad_input(format!("--unicast {h:?}: not an IPv4 address"))),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let min_receivers = a
        .min_receivers
        .unwrap_or(a.expect.len().max(unicast.len()).max(1));
    let opts = SendOptions {
        source,
        multicast: a.group.multicast(a.ttl)?,
        unicast,
        catchup_port: a.group.port,
        catchup_listener: None,
        rate,
        packet_size,
        min_receivers,
        expect: a.expect.clone(),
        min_wait: a.min_wait,
        max_wait: a.max_wait,
        compress_level: a.compress,
        key,
        linger: a.linger,
        observer: observer.clone(),
    };
    let cancel = CancellationToken::new();
    cancel_on_signal(cancel.clone());
    let report = corral_cast::send(opts, cancel).await?;
    observer.finish();
    if report.ephemeral_key {
        eprintln!(
            "note: no --key given; the manifest was signed with an ephemeral key {}",
            report.public_key
        );
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"type": "summary", "report": report})
        );
    } else {
        let mbit = if report.elapsed_s > 0.0 {
            report.image_bytes as f64 * 8.0 / report.elapsed_s / 1e6
        } else {
            0.0
        };
        println!(
            "session {}: {} bytes in {} blocks, {:.1} s, {:.0} Mbit/s",
            report.session, report.image_bytes, report.blocks, report.elapsed_s, mbit
        );
        for r in &report.receivers {
            println!(
                "  {:<20} {:<22} {:<4} {}",
                r.name,
                r.addr.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
                if r.ok { "ok" } else { "FAIL" },
                r.reason
            );
        }
    }
    Ok(if report.all_ok() && !report.receivers.is_empty() {
        Code::Success
    } else {
        Code::Runtime
    })
}

async fn receive(a: ReceiveArgs) -> anyhow::Result<Code> {
    let output = match (&a.output, &a.pipe) {
        (_, Some(cmd)) => OutputSpec::Pipe(cmd.clone()),
        (Some(o), None) => OutputSpec::from_arg(o),
        (None, None) => return Err(bad_input("give --output PATH|- or --pipe CMD")),
    };
    let name = a.name.clone().unwrap_or_else(hostname);
    let mut multicast = a.group.multicast(1)?;
    let sender = match (&a.sender, &a.server, &a.image) {
        (Some(s), _, _) => Some(resolve_sender(s, a.group.port)?),
        (None, Some(server), Some(image)) => {
            let server = resolve_sender(server, corral_cast::serve::DEFAULT_CONTROL_PORT)?;
            let offer = corral_cast::serve::request_image(server, image, &name).await?;
            eprintln!(
                "image server {server}: {} ({} bytes) on {}:{}, sender {}",
                offer.image, offer.bytes, offer.group, offer.port, offer.sender
            );
            multicast.group = offer.group;
            multicast.port = offer.port;
            Some(offer.sender)
        }
        _ => None,
    };
    let trusted_key = match &a.trusted_key {
        Some(p) => Some(keys::read_verifying_key(p).map_err(|e| bad_input(e.to_string()))?),
        None => None,
    };
    let to_stdout = output == OutputSpec::Stdout;
    let json = a.json || (!to_stdout && !std::io::stdout().is_terminal());
    let observer = Arc::new(CliObserver::new(
        json,
        if to_stdout {
            JsonTo::Stderr
        } else {
            JsonTo::Stdout
        },
        recorder(&a.db)?,
    ));
    let opts = ReceiveOptions {
        output,
        multicast,
        unicast: a.unicast,
        sender,
        trusted_key,
        state: a.state.clone(),
        name,
        silent_after: Duration::from_secs(5),
        idle_timeout: a.idle_timeout,
        observer: observer.clone(),
    };
    let cancel = CancellationToken::new();
    cancel_on_signal(cancel.clone());
    let result = corral_cast::receive(opts, cancel).await;
    observer.finish();
    let report = result?;
    let line = serde_json::json!({"type": "summary", "report": report});
    if json {
        observer.json_line(&line);
    } else {
        eprintln!(
            "received and verified {} bytes ({} blocks: {} {}, {} tcp, {} resumed) in {:.1} s -> {}",
            report.image_bytes,
            report.blocks,
            report.blocks_multicast,
            if a.unicast { "unicast" } else { "multicast" },
            report.blocks_tcp,
            report.blocks_resumed,
            report.elapsed_s,
            report.output
        );
    }
    Ok(Code::Success)
}

async fn serve(a: ServeArgs) -> anyhow::Result<Code> {
    let rate: Rate = a.rate.parse().map_err(bad_input)?;
    let packet_size = a.mtu.saturating_sub(28);
    if !(512..=65_000).contains(&packet_size) {
        return Err(bad_input(format!(
            "--mtu {} out of range (540..=65028)",
            a.mtu
        )));
    }
    let site_toml = a.site.site.join("site.toml");
    let site = if site_toml.is_file() {
        Some(corral_site::Site::load(&a.site.site).map_err(|e| bad_input(format!("{e:#}")))?)
    } else {
        None
    };
    let dir = match (&a.dir, &site) {
        (Some(d), _) => d.clone(),
        (None, Some(site)) => site.paths.images.clone(),
        (None, None) => {
            return Err(bad_input(format!(
                "no image directory: give --dir DIR, or --site DIR with a site.toml ({} has none)",
                a.site.site.display()
            )));
        }
    };
    if !dir.is_dir() {
        return Err(bad_input(format!(
            "image directory {} does not exist; create it and put images in it",
            dir.display()
        )));
    }
    let db =
        a.db.clone()
            .or_else(|| site.as_ref().map(|s| s.store.path.clone()));
    let key = match &a.key {
        Some(p) => Some(keys::read_signing_key(p).map_err(|e| bad_input(e.to_string()))?),
        None => None,
    };
    let group = GroupArgs {
        group: a.group,
        port: a.port,
        interface: a.interface.clone(),
    };
    let multicast = group.multicast(a.ttl)?;
    let control_ip = multicast.interface.unwrap_or(Ipv4Addr::UNSPECIFIED);
    let json = a.json || !std::io::stdout().is_terminal();
    let observer = Arc::new(CliObserver::new(json, JsonTo::Stdout, recorder(&db)?));
    let cancel = CancellationToken::new();
    let metrics = Arc::new(super::cast_metrics::CastMetrics::default());
    if let Some(addr) = a.metrics {
        let bound =
            super::cast_metrics::serve_metrics(addr, metrics.clone(), cancel.clone()).await?;
        eprintln!("metrics on http://{bound}/metrics");
    }
    let images = corral_cast::serve::list_images(&dir)?;
    eprintln!(
        "offering {} image(s) from {} on control port {}:{}",
        images.len(),
        dir.display(),
        control_ip,
        a.control_port
    );
    let opts = corral_cast::serve::ServeOptions {
        dir,
        control: SocketAddr::from((control_ip, a.control_port)),
        multicast,
        max_sessions: a.max_sessions,
        rate,
        packet_size,
        min_receivers: a.min_receivers,
        min_wait: a.min_wait,
        max_wait: a.max_wait,
        compress_level: a.compress,
        key,
        linger: a.linger,
        observer: Arc::new(super::cast_metrics::MetricsObserver {
            inner: observer.clone(),
            metrics,
        }),
    };
    cancel_on_signal(cancel.clone());
    let result = corral_cast::serve::serve(opts, cancel).await;
    observer.finish();
    result?;
    Ok(Code::Success)
}

async fn list(a: ListArgs) -> anyhow::Result<Code> {
    let server = resolve_sender(&a.server, corral_cast::serve::DEFAULT_CONTROL_PORT)?;
    match corral_cast::serve::ask(server, &corral_cast::serve::Request::List).await? {
        corral_cast::serve::Answer::Images { images } => {
            for i in &images {
                if a.json {
                    println!("{}", serde_json::to_string(i)?);
                } else {
                    println!("{:<40} {:>14} bytes", i.name, i.bytes);
                }
            }
            Ok(Code::Success)
        }
        corral_cast::serve::Answer::Error { reason } => {
            anyhow::bail!("image server {server}: {reason}")
        }
        corral_cast::serve::Answer::Offer(_) => {
            anyhow::bail!("image server {server} answered an offer to a list request")
        }
    }
}

/// `SOURCE` as given when it exists (or is `-`), else the image of that name in the site's
/// images directory.
fn site_image(source: &std::path::Path, site_dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    if source == std::path::Path::new("-") || source.exists() {
        return Ok(source.to_owned());
    }
    let name = source.to_string_lossy();
    if site_dir.join("site.toml").is_file()
        && let Ok(site) = corral_site::Site::load(site_dir)
    {
        let root = fs_err::canonicalize(&site.paths.images).ok();
        if let Some(root) = root
            && let Ok(p) = corral_cast::serve::resolve_image(&root, &name)
        {
            return Ok(p);
        }
        return Err(bad_input(format!(
            "{name}: no such file, and no image of that name in {}",
            site.paths.images.display()
        )));
    }
    Err(bad_input(format!("{name}: no such file")))
}

fn recorder(db: &Option<PathBuf>) -> anyhow::Result<Option<Recorder>> {
    match db {
        Some(p) => Ok(Some(
            Recorder::open(p, RecorderConfig::default())
                .with_context(|| format!("cannot open the audit store {}", p.display()))?,
        )),
        None => Ok(None),
    }
}

fn resolve_sender(s: &str, port: u16) -> anyhow::Result<SocketAddr> {
    let with_port = if s.contains(':') {
        s.to_owned()
    } else {
        format!("{s}:{port}")
    };
    with_port
        .to_socket_addrs()
        .ok()
        .and_then(|mut it| it.find(|a| a.is_ipv4()))
        .ok_or_else(|| bad_input(format!("--sender {s:?}: not an address")))
}

fn hostname() -> String {
    fs_err::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "receiver".into())
}

#[derive(Debug, Clone, Copy)]
enum JsonTo {
    Stdout,
    Stderr,
}

/// Draws progress (bars on a terminal, JSON lines otherwise) and prints events.
#[derive(Debug)]
struct CliObserver {
    json: Option<JsonTo>,
    bars: Mutex<Bars>,
    recorder: Option<Recorder>,
}

#[derive(Debug, Default)]
struct Bars {
    multi: Option<MultiProgress>,
    main: Option<ProgressBar>,
    /// The sender's pre-pass over the image (finished and cleared when it is done).
    hashing: Option<ProgressBar>,
    /// A receiver's wait for a sender still hashing its image (cleared once it announces).
    waiting: Option<ProgressBar>,
    receivers: Vec<(String, ProgressBar)>,
}

/// A spinner with a message.
fn spinner(multi: &MultiProgress) -> ProgressBar {
    let b = multi.add(ProgressBar::new_spinner());
    b.set_style(bar_style("{spinner} {msg}"));
    b
}

/// A bar of `len` bytes with rate and ETA, after `label`.
fn bytes_bar(multi: &MultiProgress, len: u64, label: &str) -> ProgressBar {
    let b = multi.add(ProgressBar::new(len));
    b.set_style(bar_style(&format!(
        "{label}{{bar:40}} {{bytes}}/{{total_bytes}} {{bytes_per_sec}} ETA {{eta}}"
    )));
    b
}

impl CliObserver {
    fn new(json: bool, to: JsonTo, recorder: Option<Recorder>) -> Self {
        let bars = if !json && std::io::stderr().is_terminal() {
            Bars {
                multi: Some(MultiProgress::new()),
                ..Bars::default()
            }
        } else {
            Bars::default()
        };
        CliObserver {
            json: json.then_some(to),
            bars: Mutex::new(bars),
            recorder,
        }
    }

    fn json_line(&self, v: &serde_json::Value) {
        match self.json {
            Some(JsonTo::Stdout) => println!("{v}"),
            Some(JsonTo::Stderr) | None => eprintln!("{v}"),
        }
    }

    fn finish(&self) {
        if let Some(r) = &self.recorder
            && let Err(e) = r.flush()
        {
            eprintln!("corral: warning: audit store: {e}");
        }
        let bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = &bars.waiting {
            b.finish_and_clear();
        }
        if let Some(b) = &bars.main {
            b.finish();
        }
        for (_, b) in &bars.receivers {
            b.finish();
        }
    }
}

fn bar_style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

impl Observer for CliObserver {
    fn event(&self, event: &Event) {
        if let Some(r) = &self.recorder {
            r.record(event.clone());
        }
        if self.json.is_some() {
            self.json_line(&serde_json::json!({"type": "event", "event": event}));
            return;
        }
        let bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        let line = format!("{} {}: {}", event.outcome, event.kind, event.reason);
        match &bars.multi {
            Some(m) => {
                let _ = m.println(line);
            }
            None => eprintln!("{line}"),
        }
    }

    fn progress(&self, p: &Progress) {
        if self.json.is_some() {
            self.json_line(&serde_json::json!({"type": "progress", "progress": p}));
            return;
        }
        let mut bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        let Some(multi) = bars.multi.clone() else {
            return;
        };
        match p {
            Progress::Waiting {
                sender_image_bytes,
                sender_bytes_done,
                ..
            } => {
                let bar = bars.waiting.get_or_insert_with(|| spinner(&multi));
                bar.set_message(if *sender_image_bytes == 0 {
                    "waiting: the sender is reading its image".to_owned()
                } else {
                    format!(
                        "waiting: the sender has read and hashed {} of {} ({:.0} %)",
                        HumanBytes(*sender_bytes_done),
                        HumanBytes(*sender_image_bytes),
                        *sender_bytes_done as f64 * 100.0 / *sender_image_bytes as f64
                    )
                });
                bar.tick();
            }
            Progress::Receiver {
                image_bytes,
                bytes_done,
                ..
            } => {
                if let Some(w) = bars.waiting.take() {
                    w.finish_and_clear();
                }
                let bar = bars
                    .main
                    .get_or_insert_with(|| bytes_bar(&multi, *image_bytes, ""));
                bar.set_length(*image_bytes);
                bar.set_position(*bytes_done);
            }
            Progress::Hashing {
                image_bytes,
                bytes_done,
                ..
            } => {
                let bar = bars
                    .hashing
                    .get_or_insert_with(|| bytes_bar(&multi, *image_bytes, "hashing the image "));
                bar.set_position(*bytes_done);
                if bytes_done >= image_bytes {
                    bar.finish_and_clear();
                }
            }
            Progress::Sender {
                blocks_total,
                image_bytes,
                bytes_sent,
                elapsed_s,
                receivers,
            } => {
                let main = bars.main.get_or_insert_with(|| spinner(&multi));
                let rate = if *elapsed_s > 0.0 {
                    *bytes_sent as f64 * 8.0 / elapsed_s / 1e6
                } else {
                    0.0
                };
                main.set_message(format!(
                    "sending {image_bytes} bytes: {bytes_sent} sent, {rate:.0} Mbit/s, {} receivers",
                    receivers.len()
                ));
                main.tick();
                for r in receivers {
                    if !bars.receivers.iter().any(|(n, _)| n == &r.name) {
                        let b = multi.add(ProgressBar::new(*blocks_total));
                        b.set_style(bar_style("{prefix:>16} {bar:40} {pos}/{len} blocks"));
                        b.set_prefix(r.name.clone());
                        bars.receivers.push((r.name.clone(), b));
                    }
                    if let Some((_, b)) = bars.receivers.iter().find(|(n, _)| n == &r.name) {
                        b.set_position(r.blocks_done);
                    }
                }
            }
        }
    }
}
