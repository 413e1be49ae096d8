//! The `corral` binary: argument parsing, runtime, logging and wiring. Nothing else.
fn main() {}
