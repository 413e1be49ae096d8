//! `corral cast send|receive|serve|keygen` (stub: filled by the cast work).

use crate::cli::Global;
use crate::exit::Code;

/// Cast commands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum CastCommand {
    /// Send an image to every receiver.
    Send,
}

pub(crate) fn run(_cmd: CastCommand, _global: &Global) -> anyhow::Result<Code> {
    anyhow::bail!("cast is not built yet")
}
