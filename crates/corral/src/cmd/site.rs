//! `corral site init|check` (stub: filled by the site-directory work).

use crate::cli::{Global, SiteArg};
use crate::exit::Code;

/// Site directory commands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum SiteCommand {
    /// Validate a site directory offline and report every problem at once.
    Check(CheckArgs),
}

/// Arguments of `corral site check`.
#[derive(Debug, clap::Args)]
pub(crate) struct CheckArgs {
    #[command(flatten)]
    site: SiteArg,
}

pub(crate) fn run(cmd: SiteCommand, _global: &Global) -> anyhow::Result<Code> {
    match cmd {
        SiteCommand::Check(a) => {
            anyhow::bail!("site check of {} is not built yet", a.site.site.display())
        }
    }
}
