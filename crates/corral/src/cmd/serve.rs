//! `corral serve`: placeholder until its engine lands (see the open issue); owned by that work.

use crate::cli::Global;
use crate::exit::Code;

/// Arguments of `corral serve`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {}

pub(crate) fn run(_args: Args, _global: &Global) -> anyhow::Result<Code> {
    anyhow::bail!("`corral serve` is not built yet")
}
