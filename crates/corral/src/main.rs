//! The `corral` binary: argument parsing, runtime, logging and wiring. Nothing else.
//!
//! Each subcommand's arguments and its `run` live in `cmd/<name>.rs`; this file only parses,
//! installs logging, dispatches, and turns the result into an exit code (see [`exit`]).

mod cli;
mod cmd;
mod exit;
mod logging;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    if let Err(e) = logging::init(&cli.global) {
        eprintln!("corral: cannot set up logging: {e:#}");
        return exit::Code::Runtime.into();
    }
    match cmd::run(cli.command, &cli.global) {
        Ok(code) => code.into(),
        Err(err) => exit::report(&err).into(),
    }
}
