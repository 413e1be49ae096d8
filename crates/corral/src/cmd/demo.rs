//! `corral demo` (stub: filled by the testkit/demo work).

use crate::cli::Global;
use crate::exit::Code;

/// Arguments of `corral demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// How many receivers.
    #[arg(long, default_value_t = 3)]
    receivers: usize,
}

pub(crate) fn run(args: DemoArgs, _global: &Global) -> anyhow::Result<Code> {
    anyhow::bail!("demo with {} receivers is not built yet", args.receivers)
}
