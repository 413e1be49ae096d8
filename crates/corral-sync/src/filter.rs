//! What the planner asks of filter rules: a small trait, so the planner stays pure and the
//! rule engine (rsync-compatible rules) plugs in from its own crate.

/// Decides which paths take part in a sync.
pub trait PathFilter: Send + Sync {
    /// Sender side: is this master path transferred?
    fn transfers(&self, rel: &str, is_dir: bool) -> bool;
    /// Receiver side: may this child path be deleted by `--delete`?
    fn may_delete(&self, rel: &str, is_dir: bool) -> bool;
}

/// Transfers everything and protects nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct IncludeAll;

impl PathFilter for IncludeAll {
    fn transfers(&self, _rel: &str, _is_dir: bool) -> bool {
        true
    }
    fn may_delete(&self, _rel: &str, _is_dir: bool) -> bool {
        true
    }
}
