//! `corral serve`: network boot from the site directory — DHCP (off, proxy or full, only on
//! named interfaces), TFTP, HTTP (iPXE scripts, boot files, images, callbacks) and syslog.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use corral_netboot::{Netboot, NetbootConfig};
use corral_site::{DhcpMode, InterfaceName, Overrides, SiteError, SiteHandle};
use corral_store::{Recorder, RecorderConfig, Retention, Store};
use tokio_util::sync::CancellationToken;

use crate::cli::{Global, SiteArg};
use crate::exit::{self, Code};

/// Arguments of `corral serve`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
DHCP runs only on the interfaces site.toml ([server] interfaces) or --interface names, in the
mode [dhcp] mode (or --dhcp) gives: off (TFTP and HTTP only; point your own DHCP server's
next-server/filename at corral), proxy (boot answers beside an existing DHCP server, including
port 4011), full (addresses from [[dhcp.network]] pools and machines' fixed IPs). The audit
store is [store] path. Edits of the site directory take effect without a restart; an invalid
edit is reported and the last good site stays in force. SIGINT/SIGTERM stop cleanly.

Examples:
  corral serve --site /srv/corral                      everything as site.toml says
  corral serve --site ./site --interface eth1          serve DHCP on eth1 only
  corral serve --site ./site --dhcp proxy -i eth1      beside the office DHCP server
  corral serve --site ./site --dhcp off                TFTP + HTTP only
  corral serve --site ./site --http-port 8081 --syslog-port 0   other HTTP port, no syslog
  corral log --site ./site --source dhcp -f            watch the boot decisions")]
pub(crate) struct Args {
    #[command(flatten)]
    pub(crate) site: SiteArg,
    /// Serve DHCP on this interface (repeatable); replaces `[server] interfaces`.
    #[arg(long, short = 'i', value_name = "IF")]
    pub(crate) interface: Vec<String>,
    /// DHCP mode: off, proxy or full; replaces `[dhcp] mode`.
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    pub(crate) dhcp: Option<DhcpMode>,
    /// The address put into URLs handed to clients; replaces `[server] advertise`.
    #[arg(long, value_name = "IP")]
    pub(crate) advertise: Option<Ipv4Addr>,
    /// HTTP port; replaces `[server] http_port`.
    #[arg(long, value_name = "PORT")]
    pub(crate) http_port: Option<u16>,
    /// TFTP port (0: no TFTP); replaces `[server] tftp_port`.
    #[arg(long, value_name = "PORT")]
    pub(crate) tftp_port: Option<u16>,
    /// DHCP server port (tests use others; clients always send to 67).
    #[arg(long, value_name = "PORT", default_value_t = 67)]
    pub(crate) dhcp_port: u16,
    /// Syslog receiver port (UDP; 0: off).
    #[arg(long, value_name = "PORT", default_value_t = 514)]
    pub(crate) syslog_port: u16,
    /// The x64 UEFI iPXE binary handed out: snponly.efi (any card, firmware's driver) or
    /// ipxe.efi (iPXE's own drivers).
    #[arg(long, value_name = "FILE", default_value = "snponly.efi", value_parser = ["snponly.efi", "ipxe.efi"])]
    pub(crate) uefi_binary: String,
    /// The address to bind TFTP, HTTP and syslog to.
    #[arg(long, value_name = "IP", default_value = "0.0.0.0")]
    pub(crate) bind: Ipv4Addr,
}

fn parse_mode(s: &str) -> Result<DhcpMode, String> {
    DhcpMode::parse(s).ok_or_else(|| format!("{s:?}: expected one of {}", DhcpMode::NAMES))
}

pub(crate) fn run(args: Args, _global: &Global) -> anyhow::Result<Code> {
    let interfaces = if args.interface.is_empty() {
        None
    } else {
        let mut v = Vec::new();
        for i in &args.interface {
            v.push(InterfaceName::parse(i).ok_or_else(|| {
                exit::bad_input(format!(
                    "--interface {i:?}: not an interface name (1-15 characters, no space, / or :)"
                ))
            })?);
        }
        Some(v)
    };
    let overrides = Overrides {
        interfaces,
        advertise: args.advertise,
        http_port: args.http_port,
        tftp_port: args.tftp_port,
        dhcp_mode: args.dhcp,
    };
    let handle = SiteHandle::open(&args.site.site, overrides).map_err(site_error)?;
    let site = handle.current();
    for w in site.warnings() {
        tracing::warn!("{w}");
    }
    // DHCP only on named interfaces that exist, each with an IPv4 address: checked before
    // anything is started.
    let mut dhcp_ifaces = Vec::new();
    if site.dhcp.mode != DhcpMode::Off {
        for name in &site.server.interfaces {
            let ip = interface_ipv4(name.as_str())?;
            dhcp_ifaces.push((name.to_string(), ip));
        }
    }
    let store_path = site.store.path.clone();
    let retention = Retention {
        max_age: site.store.max_age,
        max_events: site.store.max_events,
    };
    let recorder = Recorder::open(
        &store_path,
        RecorderConfig {
            retention,
            ..RecorderConfig::default()
        },
    )
    .with_context(|| format!("opening the audit store {}", store_path.display()))?;
    let store = Store::open(&store_path)
        .with_context(|| format!("opening the audit store {}", store_path.display()))?;
    let syslog_addr =
        (args.syslog_port != 0).then(|| SocketAddr::from((args.bind, args.syslog_port)));
    let engine = Netboot::new(
        handle,
        store,
        recorder.clone(),
        NetbootConfig {
            uefi_binary: args.uefi_binary.clone(),
            syslog: syslog_addr,
            ..NetbootConfig::default()
        },
    )
    .with_context(|| {
        format!(
            "starting the machine state writer on {}",
            store_path.display()
        )
    })?;
    engine
        .check_binaries()
        .map_err(|e| exit::bad_input(e.to_string()))?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = rt.block_on(serve(engine, &args, dhcp_ifaces, syslog_addr));
    rt.shutdown_timeout(Duration::from_secs(5));
    recorder.shutdown().context("flushing the audit store")?;
    result.map(|()| Code::Success)
}

fn site_error(e: SiteError) -> anyhow::Error {
    match e {
        SiteError::Invalid { .. } => {
            let mut msg = e.to_string();
            for p in e.problems() {
                msg.push_str(&format!("\n  {p}"));
            }
            msg.push_str(
                "\n  fix the site directory (corral site check --site DIR lists every problem)",
            );
            exit::bad_input(msg)
        }
        e => anyhow::Error::new(e),
    }
}

/// The first IPv4 address of interface `name` (from `ip -4 -o addr show dev NAME`), with a
/// clear error when the interface does not exist or has no IPv4 address.
fn interface_ipv4(name: &str) -> anyhow::Result<Ipv4Addr> {
    if !std::path::Path::new("/sys/class/net").join(name).exists() {
        return Err(exit::bad_input(format!(
            "interface {name:?} (named in site.toml [server] interfaces or --interface) does not exist; \
             refusing to start DHCP. Name an existing interface (see `ip link`)"
        )));
    }
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", name])
        .output()
        .context("running `ip -4 -o addr show` (install iproute2)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next()?.parse().ok())
        .ok_or_else(|| {
            exit::bad_input(format!(
                "interface {name:?} has no IPv4 address; DHCP needs one (ip addr add ... dev {name})"
            ))
        })
}

async fn serve(
    engine: Arc<Netboot>,
    args: &Args,
    dhcp_ifaces: Vec<(String, Ipv4Addr)>,
    syslog_addr: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let site = engine.site().current();
    let cancel = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();

    let http_addr = SocketAddr::from((args.bind, site.server.http_port));
    let listener = tokio::net::TcpListener::bind(http_addr)
        .await
        .with_context(|| {
            format!(
                "binding HTTP on {http_addr} (another server there? ports below 1024 need root)"
            )
        })?;
    {
        let (e, c) = (engine.clone(), cancel.clone());
        tasks.spawn(async move {
            corral_netboot::http::serve(listener, e, c)
                .await
                .context("HTTP server")
        });
    }
    if let Some(addr) = syslog_addr {
        let sock = tokio::net::UdpSocket::bind(addr).await.with_context(|| {
            format!("binding syslog on {addr} (use --syslog-port 0 to turn it off)")
        })?;
        let (e, c) = (engine.clone(), cancel.clone());
        tasks.spawn(async move {
            corral_netboot::service::syslog_receiver(sock, e, c).await;
            Ok(())
        });
    }
    {
        let (e, c) = (engine.clone(), cancel.clone());
        tasks.spawn(async move {
            corral_netboot::service::watch_site(e, Duration::from_secs(1), c).await;
            Ok(())
        });
    }
    crate::cmd::serve_wire::spawn_tftp_dhcp(&engine, args, &dhcp_ifaces, &cancel, &mut tasks)
        .await?;

    tracing::info!(
        site = %site.dir().display(),
        dhcp = %site.dhcp.mode,
        interfaces = ?dhcp_ifaces,
        http = %http_addr,
        "corral serve running; Ctrl-C or SIGTERM to stop"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut first_error = None;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        Some(r) = tasks.join_next() => {
            if let Ok(Err(e)) = r { first_error = Some(e); }
        }
    }
    cancel.cancel();
    let drain = async {
        while let Some(r) = tasks.join_next().await {
            if let Ok(Err(e)) = r {
                first_error.get_or_insert(e);
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        tracing::warn!("some services did not stop within 5 s");
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
