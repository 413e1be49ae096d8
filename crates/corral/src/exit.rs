//! Exit codes and error reporting. Never exit 0 after an error.

use std::process::ExitCode;

/// The documented exit codes (also listed in `corral --help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(dead_code)] // Not every code is produced by every build stage of the CLI.
pub(crate) enum Code {
    /// Everything worked.
    Success = 0,
    /// A runtime failure: I/O, network, a peer or receiver failed.
    Runtime = 1,
    /// Bad command-line usage (clap also exits with 2).
    Usage = 2,
    /// Bad input: an invalid site directory, a corrupt or foreign file, failed verification.
    BadInput = 3,
    /// The command worked and found differences it was asked to look for (`corral drift`
    /// found drift), like `diff`'s 1, but kept apart from runtime failures.
    Differences = 4,
}

impl From<Code> for ExitCode {
    fn from(c: Code) -> ExitCode {
        ExitCode::from(c as u8)
    }
}

/// Marks an error as the user's input being wrong (exit code 3) rather than a runtime failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct BadInput(pub(crate) String);

/// Wraps an error so that it is reported with exit code 3.
#[allow(dead_code)] // Used by the subcommands that validate input.
pub(crate) fn bad_input(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(BadInput(msg.into()))
}

/// Prints the error chain on stderr and picks the exit code.
pub(crate) fn report(err: &anyhow::Error) -> Code {
    eprintln!("corral: error: {err:#}");
    if err.chain().any(|c| c.is::<BadInput>()) {
        Code::BadInput
    } else {
        Code::Runtime
    }
}
