//! Wiring of the DHCP and TFTP servers into `corral serve` (filled in when corral-dhcp and
//! corral-tftp land).

use std::net::Ipv4Addr;
use std::sync::Arc;

use corral_netboot::Netboot;
use tokio_util::sync::CancellationToken;

pub(crate) async fn spawn_tftp_dhcp(
    _engine: &Arc<Netboot>,
    _args: &super::serve::Args,
    _dhcp_ifaces: &[(String, Ipv4Addr)],
    _cancel: &CancellationToken,
    _tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    Ok(())
}
