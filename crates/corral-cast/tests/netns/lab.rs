//! Network-namespace tests (root).
