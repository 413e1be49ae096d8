//! Binary-level tests for `corral log`.
