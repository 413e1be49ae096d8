//! Binary-level tests: run the real `corral` executable in temporary directories.
//!
//! One integration-test binary for the crate; each area has its own module.

mod cast;
mod demo;
mod log;
mod netboot;
mod site;
mod support;
mod sync;
