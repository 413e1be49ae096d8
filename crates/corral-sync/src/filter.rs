//! What the planner asks of filter rules: a small trait, so the planner stays pure and the
//! rule engine (rsync-compatible rules) plugs in from its own crate.

/// Decides which paths take part in a sync.
pub trait PathFilter: Send + Sync {
    /// Sender side: is this master path transferred?
    fn transfers(&self, rel: &str, is_dir: bool) -> bool;
    /// Receiver side: may this child path be deleted by `--delete`?
    fn may_delete(&self, rel: &str, is_dir: bool) -> bool;
    /// Like `may_delete`, for a path inside a directory being deleted (rsync ignores
    /// perishable rules there). A path kept here keeps its directories.
    fn may_delete_within_deleted(&self, rel: &str, is_dir: bool) -> bool {
        self.may_delete(rel, is_dir)
    }
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

/// rsync-compatible rules ([`corral_sync_filter`]) as a [`PathFilter`]: per-directory merge
/// files (`dir-merge`, `:`) are read from the master's tree as the walk reaches each directory.
#[derive(Debug)]
pub struct RulesFilter {
    root: corral_sync_filter::Matcher,
    master: std::path::PathBuf,
    dirs: std::sync::Mutex<std::collections::HashMap<String, corral_sync_filter::Matcher>>,
}

impl RulesFilter {
    /// Rules applied to the tree at `master` (where per-directory merge files are read).
    pub fn new(
        rules: corral_sync_filter::Rules,
        opts: corral_sync_filter::MatchOptions,
        master: &std::path::Path,
    ) -> Self {
        RulesFilter {
            root: corral_sync_filter::Matcher::new(rules, opts),
            master: master.to_path_buf(),
            dirs: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn matcher(&self, dir: &str) -> corral_sync_filter::Matcher {
        if let Some(m) = self.dirs.lock().unwrap().get(dir) {
            return m.clone();
        }
        let parent = if dir.is_empty() {
            self.root.clone()
        } else {
            self.matcher(dir.rsplit_once('/').map_or("", |(p, _)| p))
        };
        let master = &self.master;
        let m = parent
            .for_dir(std::path::Path::new(dir), &mut |p| std::fs::read_to_string(master.join(p)).ok())
            .unwrap_or_else(|e| {
                tracing::warn!(dir, error = %e, "per-directory filter file unusable; using the parent's rules");
                parent.clone()
            });
        self.dirs.lock().unwrap().insert(dir.to_string(), m.clone());
        m
    }

    fn of(&self, rel: &str) -> corral_sync_filter::Matcher {
        self.matcher(rel.rsplit_once('/').map_or("", |(p, _)| p))
    }
}

impl PathFilter for RulesFilter {
    fn transfers(&self, rel: &str, is_dir: bool) -> bool {
        self.of(rel).transfers(std::path::Path::new(rel), is_dir)
    }
    fn may_delete(&self, rel: &str, is_dir: bool) -> bool {
        self.of(rel).may_delete(std::path::Path::new(rel), is_dir)
    }
    fn may_delete_within_deleted(&self, rel: &str, is_dir: bool) -> bool {
        self.of(rel)
            .may_delete_within_deleted(std::path::Path::new(rel), is_dir)
    }
}
