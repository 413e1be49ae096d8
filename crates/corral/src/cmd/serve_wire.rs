//! Wiring of the DHCP and TFTP servers into `corral serve`.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use corral_dhcp::{DhcpConfig, Mode};
use corral_netboot::Netboot;
use corral_netboot::dhcp::DhcpPolicy;
use corral_netboot::tftp::TftpPolicy;
use corral_site::DhcpMode;
use corral_tftp::TftpConfig;
use tokio_util::sync::CancellationToken;

pub(crate) async fn spawn_tftp_dhcp(
    engine: &Arc<Netboot>,
    args: &super::serve::Args,
    dhcp_ifaces: &[(String, Ipv4Addr)],
    cancel: &CancellationToken,
    tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let site = engine.site().current();
    if site.server.tftp_port != 0 {
        let addr = SocketAddr::from((args.bind, site.server.tftp_port));
        let sock = tokio::net::UdpSocket::bind(addr).await.with_context(|| {
            format!("binding TFTP on {addr} (another TFTP server there? port 69 needs root; --tftp-port 0 turns TFTP off)")
        })?;
        let config = TftpConfig {
            root: site.paths.boot.clone(),
            ..TftpConfig::default()
        };
        let hooks = Arc::new(TftpPolicy(engine.clone()));
        let c = cancel.clone();
        tracing::info!(%addr, root = %site.paths.boot.display(), "TFTP server listening");
        tasks.spawn(async move {
            corral_tftp::serve(sock, config, hooks, c)
                .await
                .context("TFTP server")
        });
    }
    let mode = match site.dhcp.mode {
        DhcpMode::Off => return Ok(()),
        DhcpMode::Proxy => Mode::Proxy,
        DhcpMode::Full => Mode::Full,
    };
    // One server per named interface (SO_BINDTODEVICE): never any other.
    for (iface, ip) in dhcp_ifaces {
        let config = DhcpConfig {
            mode,
            interface: iface.clone(),
            server_ip: *ip,
            site: engine.site().clone(),
            store: Some(site.store.path.clone()),
            port: args.dhcp_port,
        };
        let policy = Arc::new(DhcpPolicy {
            engine: engine.clone(),
            server_ip: *ip,
        });
        let c = cancel.clone();
        let what = format!("DHCP ({mode:?}) on {iface}");
        tracing::info!(interface = %iface, %ip, ?mode, port = args.dhcp_port, "DHCP server starting");
        tasks.spawn(async move {
            corral_dhcp::serve(config, policy, c)
                .await
                .with_context(|| what)
        });
    }
    Ok(())
}
