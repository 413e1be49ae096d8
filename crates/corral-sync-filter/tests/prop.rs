//! Property tests: hostile rule text and paths never panic; matching laws hold.

use std::path::Path;

use corral_sync_filter::{FilterOption, MatchOptions, Matcher, Rules};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Random bytes as rule text: parse errors are fine, panics are not; whatever parses
    /// can be matched against random paths.
    #[test]
    fn random_rules_never_panic(text in proptest::collection::vec(any::<u8>(), 0..200),
                                path in "[a-z*?\\[\\]/.!]{0,30}", dir in any::<bool>()) {
        let text = String::from_utf8_lossy(&text).into_owned();
        let mut read = |_: &Path| Some("- x\n:n .y\n".to_owned());
        if let Ok(r) = Rules::parse_with(&text, "fuzz", &mut read) {
            let m = Matcher::new(r, MatchOptions::default());
            let _ = m.transfers(Path::new(&path), dir);
            let _ = m.may_delete(Path::new(&path), dir);
            if let Ok(sub) = m.for_dir(Path::new("d"), &mut read) {
                let _ = sub.transfers(Path::new(&path), dir);
            }
        }
        let _ = Rules::from_options(&[FilterOption::Exclude(text.clone()),
                                      FilterOption::Filter(text)]);
    }

    /// Structured rules: an exclude of a literal name excludes exactly that basename anywhere.
    #[test]
    fn literal_exclude_matches_basename(name in "[a-z]{1,8}", dirs in proptest::collection::vec("[a-z]{1,4}", 0..4),
                                        other in "[a-z]{1,8}") {
        let m = Matcher::new(Rules::parse(&format!("- {name}"), "t").unwrap(), MatchOptions::default());
        let mut p = dirs.join("/");
        if !p.is_empty() { p.push('/'); }
        let hit = format!("{p}{name}");
        let miss = format!("{p}{other}");
        prop_assert!(!m.transfers(Path::new(&hit), false));
        prop_assert_eq!(m.transfers(Path::new(&miss), false), other != name);
    }

    /// `!` negates: `-! PAT` excludes exactly what `- PAT` does not.
    #[test]
    fn negation_is_complement(pat in "[a-c*?/]{1,6}", path in "[a-c]{1,3}(/[a-c]{1,3}){0,2}", dir in any::<bool>()) {
        let pos = Rules::parse(&format!("- {pat}"), "t");
        let neg = Rules::parse(&format!("-! {pat}"), "t");
        if let (Ok(pos), Ok(neg)) = (pos, neg) {
            let pos = Matcher::new(pos, MatchOptions::default());
            let neg = Matcher::new(neg, MatchOptions::default());
            let p = Path::new(&path);
            // A directory-only pattern fails both ways for files; otherwise complementary.
            if !pat.ends_with('/') || dir {
                prop_assert_ne!(pos.transfers(p, dir), neg.transfers(p, dir));
            }
        }
    }
}
