//! Unit tests: the example site, every problem kind with its exact message, overrides,
//! reload.

use std::path::Path;

use crate::*;

/// A temporary site: the example files, with `changes` written on top (`None` deletes).
fn site(changes: &[(&str, Option<&str>)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path(), false).unwrap();
    for (rel, text) in changes {
        let p = dir.path().join(rel);
        match text {
            Some(t) => {
                fs_err::create_dir_all(p.parent().unwrap()).unwrap();
                fs_err::write(&p, t).unwrap();
            }
            None => fs_err::remove_file(&p).unwrap(),
        }
    }
    dir
}

fn lines(dir: &Path) -> Vec<String> {
    check(dir).iter().map(|p| p.to_string()).collect()
}

#[test]
fn example_is_clean() {
    let d = site(&[]);
    assert_eq!(lines(d.path()), Vec::<String>::new());
}
