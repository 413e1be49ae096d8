//! Binary-level tests for `corral serve` and `corral machine`.
