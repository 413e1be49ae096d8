//! Binary-level tests for `corral cast`.
