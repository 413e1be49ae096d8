//! A standalone DHCP server over a site directory, for benchmarks and manual tests.
//!
//! ```text
//! cargo run --release -p corral-dhcp --example dhcp_server -- \
//!     --site DIR --interface eth0 --server-ip 10.0.0.1 [--store FILE] [--mode full|proxy] [--port 67]
//! ```
//!
//! Every boot client is told to fetch `undionly.kpxe` by TFTP (a fixed policy); events are
//! counted and printed on exit (SIGINT/SIGTERM).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, bail};
use corral_dhcp::{
    Boot, BootAnswer, BootPolicy, BootQuery, DhcpConfig, DhcpEvent, DhcpEventKind, Mode,
};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Default)]
struct Fixed {
    acks: AtomicU64,
    offers: AtomicU64,
    other: AtomicU64,
}

impl BootPolicy for Fixed {
    fn decide(&self, _q: &BootQuery) -> BootAnswer {
        BootAnswer::new(
            Boot::Tftp {
                filename: "undionly.kpxe".into(),
            },
            "example policy: everyone gets undionly.kpxe",
        )
    }

    fn on_event(&self, e: DhcpEvent) {
        let c = match e.kind {
            DhcpEventKind::Ack => &self.acks,
            DhcpEventKind::Offer => &self.offers,
            _ => &self.other,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let mut site = None;
    let mut interface = None;
    let mut server_ip = None;
    let mut store = None;
    let mut mode = Mode::Full;
    let mut port = 67u16;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--site" => site = Some(PathBuf::from(val()?)),
            "--interface" => interface = Some(val()?),
            "--server-ip" => server_ip = Some(val()?.parse::<Ipv4Addr>()?),
            "--store" => store = Some(PathBuf::from(val()?)),
            "--port" => port = val()?.parse()?,
            "--mode" => {
                mode = match val()?.as_str() {
                    "full" => Mode::Full,
                    "proxy" => Mode::Proxy,
                    m => bail!("unknown mode {m}; use full or proxy"),
                }
            }
            _ => bail!("unknown argument {a}"),
        }
    }
    let site =
        corral_site::SiteHandle::open(site.context("--site is required")?, Default::default())?;
    let config = DhcpConfig {
        mode,
        interface: interface.context("--interface is required")?,
        server_ip: server_ip.context("--server-ip is required")?,
        site,
        store,
        port,
    };
    let policy = Arc::new(Fixed::default());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    rt.block_on(async {
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            c2.cancel();
        });
        eprintln!("dhcp_server: ready");
        corral_dhcp::serve(config, policy.clone(), cancel).await
    })?;
    eprintln!(
        "dhcp_server: offers={} acks={} other={}",
        policy.offers.load(Ordering::Relaxed),
        policy.acks.load(Ordering::Relaxed),
        policy.other.load(Ordering::Relaxed)
    );
    Ok(())
}
