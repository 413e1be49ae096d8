//! A plain corral TFTP server, for benchmarks and manual tests:
//! `tftp_server ROOT [LISTEN_ADDR] [MAX_TRANSFERS]` (default 0.0.0.0:69, 512).
//! Logs with `RUST_LOG` (default warn); stops on Ctrl-C.

use std::sync::Arc;

use corral_tftp::{NoHooks, TftpConfig, serve};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let mut args = std::env::args().skip(1);
    let root = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: tftp_server ROOT [LISTEN_ADDR] [MAX_TRANSFERS]"))?;
    let listen = args.next().unwrap_or_else(|| "0.0.0.0:69".into());
    let mut config = TftpConfig {
        root: root.into(),
        ..TftpConfig::default()
    };
    if let Some(m) = args.next() {
        config.max_transfers = m.parse()?;
    }
    let socket = tokio::net::UdpSocket::bind(&listen).await?;
    eprintln!(
        "tftp_server: serving {} on {}",
        config.root.display(),
        socket.local_addr()?
    );
    let cancel = tokio_util::sync::CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        c.cancel();
    });
    serve(socket, config, Arc::new(NoHooks), cancel).await?;
    Ok(())
}
