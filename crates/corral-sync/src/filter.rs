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
    /// No rule at all (and so no per-directory merge file to read): every path is sent and
    /// may be deleted, as the matcher would answer, without a look-up per path (a lock, a
    /// hash of the directory and a copy of the path, 50,000 times in a run's plan).
    none: bool,
}

impl RulesFilter {
    /// Rules applied to the tree at `master` (where per-directory merge files are read).
    pub fn new(
        rules: corral_sync_filter::Rules,
        opts: corral_sync_filter::MatchOptions,
        master: &std::path::Path,
    ) -> Self {
        RulesFilter {
            none: rules.is_empty(),
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
        self.none || self.of(rel).transfers(std::path::Path::new(rel), is_dir)
    }
    fn may_delete(&self, rel: &str, is_dir: bool) -> bool {
        self.none || self.of(rel).may_delete(std::path::Path::new(rel), is_dir)
    }
    fn may_delete_within_deleted(&self, rel: &str, is_dir: bool) -> bool {
        self.none
            || self
                .of(rel)
                .may_delete_within_deleted(std::path::Path::new(rel), is_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(text: &str, delete_excluded: bool) -> RulesFilter {
        RulesFilter::new(
            corral_sync_filter::Rules::parse(text, "test").unwrap(),
            corral_sync_filter::MatchOptions {
                delete_excluded,
                abs_root: None,
            },
            std::path::Path::new("/nonexistent"),
        )
    }

    /// Without rules every path is sent and may be deleted (as the matcher answers); with a
    /// rule the matcher decides, protection of excluded paths included.
    #[test]
    fn no_rules_answer_like_the_matcher_and_rules_still_apply() {
        let paths = [
            ("a", true),
            ("a/b.o", false),
            ("c/d/e", false),
            ("x.o", false),
        ];
        let none = filter("", false);
        assert!(none.none);
        let m = corral_sync_filter::Matcher::new(
            corral_sync_filter::Rules::parse("", "test").unwrap(),
            corral_sync_filter::MatchOptions::default(),
        );
        for (p, d) in paths {
            let path = std::path::Path::new(p);
            assert_eq!(none.transfers(p, d), m.transfers(path, d), "{p}");
            assert_eq!(none.may_delete(p, d), m.may_delete(path, d), "{p}");
            assert_eq!(
                none.may_delete_within_deleted(p, d),
                m.may_delete_within_deleted(path, d),
                "{p}"
            );
            assert!(none.transfers(p, d) && none.may_delete(p, d));
        }
        let some = filter("- *.o\n", false);
        assert!(!some.none);
        assert!(!some.transfers("x.o", false) && !some.transfers("a/b.o", false));
        assert!(some.transfers("c/d/e", false));
        assert!(
            !some.may_delete("x.o", false),
            "excluded paths are protected"
        );
        assert!(filter("- *.o\n", true).may_delete("x.o", false));
    }
}
