//! Helpers shared by the binary-level tests.

use std::path::Path;
use std::process::{Command, Output};

/// Runs the `corral` binary built for this test run with `args`, in `dir`.
pub(crate) fn corral(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(args)
        .current_dir(dir)
        .env_remove("CORRAL_SITE")
        .env_remove("RUST_LOG")
        .output()
        .expect("the corral binary runs")
}

/// The process's stdout and stderr as text, for assertions and failure messages.
pub(crate) fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
