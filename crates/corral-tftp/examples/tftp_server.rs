//! A plain corral TFTP server, for benchmarks and manual tests:
//! `tftp_server ROOT [LISTEN_ADDR] [MAX_TRANSFERS]` (default 0.0.0.0:69, 512).
//! Logs with `RUST_LOG` (default warn); stops on Ctrl-C. `TFTP_RUNTIME=current` uses tokio's
//! single-threaded runtime instead of the multi-threaded one.

use std::sync::Arc;

use corral_tftp::{NoHooks, TftpConfig, serve};

fn main() -> anyhow::Result<()> {
    // TFTP_RUNTIME=current runs everything on one thread (no cross-thread wake-ups per packet).
    let mut rt = if std::env::var("TFTP_RUNTIME").as_deref() == Ok("current") {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    rt.enable_all().build()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
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
