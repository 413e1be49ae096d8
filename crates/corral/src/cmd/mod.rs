//! One module per subcommand: its clap `Args` and the `run` that carries it out.

pub(crate) mod cast;
pub(crate) mod cast_metrics;
pub(crate) mod demo;
pub(crate) mod drift;
pub(crate) mod log;
pub(crate) mod machine;
pub(crate) mod serve;
pub(crate) mod serve_wire;
pub(crate) mod site;
pub(crate) mod sync;

use crate::cli::{Command, Global};
use crate::exit::Code;

/// Runs one parsed command.
pub(crate) fn run(command: Command, global: &Global) -> anyhow::Result<Code> {
    match command {
        Command::Demo(args) => demo::run(args, global),
        Command::Site(args) => site::run(args, global),
        Command::Log(args) => log::run(args, global),
        Command::Cast(args) => cast::run(args, global),
        Command::Serve(args) => serve::run(args, global),
        Command::Machine(args) => machine::run(args, global),
        Command::Sync(args) => sync::run(args, global),
        Command::Drift(args) => drift::run(args, global),
    }
}
