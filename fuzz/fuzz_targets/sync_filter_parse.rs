//! Fuzz the rsync filter-rule parser and matcher: arbitrary bytes as a rule file (with merge
//! and per-directory merge files served from the same bytes), then matched against paths
//! taken from the input. Errors are fine; panics and hangs are not.
//!
//! Run: `cargo fuzz run sync_filter_parse` (from `fuzz/`). The crate's proptest
//! `random_rules_never_panic` runs the same check in CI.

#![no_main]

use std::path::Path;

use corral_sync_filter::{FilterOption, MatchOptions, Matcher, Rules};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // Split: rules | merge-file text | paths.
    let mut parts = text.splitn(3, '\u{0}');
    let rules = parts.next().unwrap_or("");
    let merged = parts.next().unwrap_or("").to_owned();
    let paths = parts.next().unwrap_or("a/b/c");
    let mut read = |_: &Path| Some(merged.clone());
    let _ = Rules::from_options_with(
        &[
            FilterOption::Exclude(rules.to_owned()),
            FilterOption::Include(rules.to_owned()),
            FilterOption::ExcludeFrom(rules.to_owned(), "fuzz".to_owned()),
        ],
        &mut read,
    );
    let Ok(r) = Rules::parse_with(rules, "fuzz", &mut read) else {
        return;
    };
    for delete_excluded in [false, true] {
        let m = Matcher::new(
            r.clone(),
            MatchOptions {
                delete_excluded,
                ..Default::default()
            },
        );
        let Ok(root) = m.for_dir(Path::new(""), &mut read) else {
            return;
        };
        for p in paths.lines() {
            let path = Path::new(p);
            let _ = root.transfers(path, true);
            let _ = root.transfers(path, false);
            let _ = root.may_delete(path, false);
            let _ = root.may_delete_within_deleted(path, true);
            if let Ok(sub) = root.for_dir(path, &mut read) {
                let _ = sub.transfers(Path::new("x"), false);
            }
        }
    }
});
