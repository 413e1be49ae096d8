//! Installs the tracing subscriber: `-v/-q`, `RUST_LOG`, `--log-format text|json`, on stderr.

use tracing_subscriber::EnvFilter;

use crate::cli::{Global, LogFormat};

/// Sets up logging for the whole process.
pub(crate) fn init(global: &Global) -> anyhow::Result<()> {
    let default = match (global.quiet, global.verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let res = match global.log_format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    res.map_err(|e| anyhow::anyhow!(e))
}
