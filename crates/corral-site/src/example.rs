//! The example site written by `corral site init`: the very files committed in
//! `examples/site/`, embedded at build time so the two can never drift apart.

use std::path::{Path, PathBuf};

use crate::error::SiteError;

/// Every example file: path relative to the site directory, and its contents.
pub const EXAMPLE_FILES: &[(&str, &str)] = &[
    (
        "site.toml",
        include_str!("../../../examples/site/site.toml"),
    ),
    (
        "profiles/debian.toml",
        include_str!("../../../examples/site/profiles/debian.toml"),
    ),
    (
        "profiles/discover.toml",
        include_str!("../../../examples/site/profiles/discover.toml"),
    ),
    (
        "machines/web01.toml",
        include_str!("../../../examples/site/machines/web01.toml"),
    ),
    (
        "machines/web02.toml",
        include_str!("../../../examples/site/machines/web02.toml"),
    ),
    (
        "machines/db01.toml",
        include_str!("../../../examples/site/machines/db01.toml"),
    ),
    (
        "templates/discover.ipxe",
        include_str!("../../../examples/site/templates/discover.ipxe"),
    ),
    (
        "templates/install.ipxe",
        include_str!("../../../examples/site/templates/install.ipxe"),
    ),
    (
        "templates/local.ipxe",
        include_str!("../../../examples/site/templates/local.ipxe"),
    ),
    ("boot/.gitkeep", ""),
    ("images/.gitkeep", ""),
    ("trees/.gitkeep", ""),
    (
        "trees/web.toml",
        include_str!("../../../examples/site/trees/web.toml"),
    ),
    (
        "filters/web.rules",
        include_str!("../../../examples/site/filters/web.rules"),
    ),
    (
        "filters/web01.rules",
        include_str!("../../../examples/site/filters/web01.rules"),
    ),
    (
        ".gitignore",
        include_str!("../../../examples/site/.gitignore"),
    ),
];

/// Writes the example site into `dir` (created if missing) and returns the files written.
///
/// Refuses a directory that has any entry unless `force`; with `force` the example files are
/// overwritten and other files are left alone.
pub fn init(dir: &Path, force: bool) -> Result<Vec<PathBuf>, SiteError> {
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| SiteError::Write { path, source }
    };
    if !force {
        match fs_err::read_dir(dir) {
            Ok(mut rd) => {
                if rd.next().is_some() {
                    return Err(SiteError::NotEmpty {
                        dir: dir.to_owned(),
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(write_err(dir)(e)),
        }
    }
    let mut written = Vec::new();
    for (rel, text) in EXAMPLE_FILES {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            fs_err::create_dir_all(parent).map_err(write_err(parent))?;
        }
        fs_err::write(&path, text).map_err(write_err(&path))?;
        written.push(path);
    }
    Ok(written)
}
