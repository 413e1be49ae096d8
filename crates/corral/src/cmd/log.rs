//! `corral log` (stub: filled by the store work).

use crate::cli::{Global, SiteArg};
use crate::exit::Code;

/// Arguments of `corral log`.
#[derive(Debug, clap::Args)]
pub(crate) struct LogArgs {
    #[command(flatten)]
    site: SiteArg,
}

pub(crate) fn run(args: LogArgs, _global: &Global) -> anyhow::Result<Code> {
    anyhow::bail!(
        "corral log for {} is not built yet",
        args.site.site.display()
    )
}
