//! Binary-level tests for `corral demo`.
