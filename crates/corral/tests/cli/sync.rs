//! Binary-level tests for `corral sync` and `corral drift`.
