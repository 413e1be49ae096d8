//! rsync-compatible filter rules for `corral sync`.
//!
//! What it is: a parser for rsync 3.x filter rules (`--filter`, `--exclude`, `--include`,
//! `--exclude-from`, `--include-from`, merge files) and a [`Matcher`] that answers, per path
//! relative to the transfer root, the two questions a sync engine asks:
//! [`Matcher::transfers`] (sender side: is this path sent?) and [`Matcher::may_delete`]
//! (receiver side: may `--delete` remove this existing path?). The semantics follow the rsync
//! manual's "FILTER RULES", "INCLUDE/EXCLUDE PATTERN RULES" and "MERGE-FILE FILTER RULES"
//! sections and rsync's `exclude.c`/`wildmatch.c`, and are checked against a real `rsync -n -i`
//! by a differential test (`tests/rsync_diff.rs`).
//!
//! Supported: `+ - P R H S !` and their long names (`include exclude protect risk hide show
//! clear merge dir-merge`), `.`/`:` merge and per-directory merge files with the `- + C e n w
//! s r / p x` modifiers, `!` (negate), `s`/`r` sides, anchored `/` patterns (at the transfer
//! root, or at the merge file's directory for per-directory rules), trailing `/` (directories
//! only), `*`, `**`, `***`, `?`, `[...]`, first match wins, and `--delete-excluded`.
//!
//! What it is not: it does no file system access and reads no clock. Merge files are read
//! through a reader callback, and walking is the caller's job: an excluded directory must not
//! be descended into (rsync never looks inside it), and [`Matcher::for_dir`] must be called for
//! each directory, on its parent's matcher, before its children are matched. The `-C` rule
//! uses rsync's built-in CVS ignore list only (`$HOME/.cvsignore` and `$CVSIGNORE` are not
//! read); a per-directory merge file name with a directory part uses only its last component
//! (rsync's scan of the transfer root's parent directories is not done); `x` rules are parsed
//! and never match a path.
//!
//! Entry types: [`Rules`] (a parsed, ordered rule list), [`FilterOption`] (rsync-style options),
//! [`Matcher`], [`MatchOptions`], [`FilterError`].

mod list;
mod rule;
mod wildmatch;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use list::Rules;
use list::{Item, check};

/// A filter-rule error; `origin` says where the rule came from (`FILE:LINE` or the option).
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// The rule does not start with a known rule name.
    #[error(
        "{origin}: unknown filter rule `{rule}` (expected +, -, P, R, H, S, !, ., : or a long name)"
    )]
    UnknownRule {
        /// Where the rule came from.
        origin: String,
        /// The rule text.
        rule: String,
    },
    /// A modifier is unknown or not allowed on this rule.
    #[error("{origin}: invalid modifier '{modifier}' in filter rule `{rule}`")]
    InvalidModifier {
        /// Where the rule came from.
        origin: String,
        /// The offending modifier.
        modifier: char,
        /// The rule text.
        rule: String,
    },
    /// `!` (clear) followed by something.
    #[error("{origin}: '!' rule has trailing characters: `{rule}`")]
    ClearTrailing {
        /// Where the rule came from.
        origin: String,
        /// The rule text.
        rule: String,
    },
    /// A rule without a pattern.
    #[error("{origin}: unexpected end of filter rule `{rule}` (a pattern must follow)")]
    MissingPattern {
        /// Where the rule came from.
        origin: String,
        /// The rule text.
        rule: String,
    },
    /// A rule inside a merge file with a side (`s`/`r`) names a side itself.
    #[error("{origin}: specified-side merge file contains specified-side filter `{rule}`")]
    SideConflict {
        /// Where the rule came from.
        origin: String,
        /// The rule text.
        rule: String,
    },
    /// A `merge` file could not be read.
    #[error("{origin}: cannot read merge file {path}")]
    MergeFileUnreadable {
        /// Where the merge rule came from.
        origin: String,
        /// The merge file.
        path: PathBuf,
    },
    /// Merge files include each other too deeply (a loop).
    #[error("{origin}: merge files nested more than {limit} deep (a merge loop?)")]
    MergeTooDeep {
        /// Where the merge rule came from.
        origin: String,
        /// The nesting limit.
        limit: usize,
    },
}

/// An rsync command-line filter option, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterOption {
    /// `--exclude=PATTERN` (`+ `/`- ` prefixes and `!` allowed).
    Exclude(String),
    /// `--include=PATTERN`.
    Include(String),
    /// `--filter=RULE` (full rule syntax).
    Filter(String),
    /// `--exclude-from=FILE`: the file's text and its name for errors.
    ExcludeFrom(String, String),
    /// `--include-from=FILE`: the file's text and its name for errors.
    IncludeFrom(String, String),
    /// A filter file in full rule syntax (like `--filter='merge FILE'`): text and name.
    FilterFile(String, String),
}

/// Options for a [`Matcher`].
#[derive(Debug, Clone, Default)]
pub struct MatchOptions {
    /// `--delete-excluded`: rules without a side apply to the sender only, so excluded paths
    /// on the receiver are no longer protected from deletion.
    pub delete_excluded: bool,
    /// The absolute path of the transfer root, for rules with the `/` modifier (which match
    /// against the absolute path). `None` matches them against the path from the root.
    pub abs_root: Option<PathBuf>,
}

/// Which process asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Sender,
    Receiver,
}

#[derive(Debug)]
struct Inner {
    items: Vec<Item>,
    opts: MatchOptions,
    abs_root: Vec<u8>,
}

/// The filter rules in effect for one directory. Cheap to clone (an `Arc` inside); derive the
/// matcher of a subdirectory with [`Matcher::for_dir`].
#[derive(Debug, Clone)]
pub struct Matcher {
    inner: Arc<Inner>,
}

/// Normalize a relative path to bytes: no leading `./` or `/`, no trailing `/`.
pub(crate) fn rel_bytes(p: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let mut b: &[u8] = p.as_os_str().as_bytes();
    loop {
        if let Some(r) = b.strip_prefix(b"./") {
            b = r;
        } else if let Some(r) = b.strip_prefix(b"/") {
            b = r;
        } else {
            break;
        }
    }
    if b == b"." {
        b = b"";
    }
    while let Some(r) = b.strip_suffix(b"/") {
        b = r;
    }
    b.to_vec()
}

impl Matcher {
    /// A matcher for the transfer root's own entries before any per-directory merge file is
    /// read; call [`Matcher::for_dir`] with `""` on it to get the root directory's matcher.
    pub fn new(rules: Rules, opts: MatchOptions) -> Matcher {
        let abs_root = opts.abs_root.as_deref().map(rel_bytes).unwrap_or_default();
        Matcher {
            inner: Arc::new(Inner {
                items: rules.into_items(),
                opts,
                abs_root,
            }),
        }
    }

    /// The matcher for the directory `rel_dir` (relative to the transfer root, `""` = root),
    /// called on the matcher of its parent directory (or on [`Matcher::new`]'s result for the
    /// root). Reads the per-directory merge files (`dir-merge`/`:` rules) of `rel_dir` with
    /// `read(rel_path_of_merge_file)`; `None` means the file does not exist. Per rsync, a
    /// subdirectory's rules come before the inherited ones (unless `n`), and a `!` in the
    /// file clears the inherited ones.
    pub fn for_dir(
        &self,
        rel_dir: &Path,
        read: &mut dyn FnMut(&Path) -> Option<String>,
    ) -> Result<Matcher, FilterError> {
        let dir = rel_bytes(rel_dir);
        if !self.inner.items.iter().any(Item::is_dir_merge) {
            return Ok(self.clone());
        }
        let items = list::refresh(&self.inner.items, &dir, read)?;
        Ok(Matcher {
            inner: Arc::new(Inner {
                items,
                opts: self.inner.opts.clone(),
                abs_root: self.inner.abs_root.clone(),
            }),
        })
    }

    /// Sender side: is the path `rel` (relative to the transfer root, a child of this
    /// matcher's directory) transferred? Rules with the receiver side only (`P`, `R`, `r`)
    /// are ignored. A directory for which this is false must not be descended into.
    pub fn transfers(&self, rel: &Path, is_dir: bool) -> bool {
        let name = rel_bytes(rel);
        check(
            &self.inner.items,
            &name,
            is_dir,
            Side::Sender,
            &self.ctx(false),
        ) >= 0
    }

    /// Receiver side: may `--delete` remove the existing path `rel`, which the sender did not
    /// send? False when a receiver-side rule excludes it (excluded paths are protected unless
    /// `delete_excluded`; `P` protects, `R` risks; `H`/`S`/`s` rules are ignored). For a
    /// directory this answers for the directory itself; its contents are asked one by one
    /// with [`Matcher::may_delete_within_deleted`] (a protected child keeps the directory).
    /// As in rsync, the receiver's per-directory merge files are the destination's: build the
    /// matcher used here with a reader over the destination as it was before the run.
    pub fn may_delete(&self, rel: &Path, is_dir: bool) -> bool {
        let name = rel_bytes(rel);
        check(
            &self.inner.items,
            &name,
            is_dir,
            Side::Receiver,
            &self.ctx(false),
        ) >= 0
    }

    /// Like [`Matcher::may_delete`], for a path inside a directory that is being deleted:
    /// rsync ignores perishable (`p`) rules there, so they do not keep the directory alive.
    pub fn may_delete_within_deleted(&self, rel: &Path, is_dir: bool) -> bool {
        let name = rel_bytes(rel);
        check(
            &self.inner.items,
            &name,
            is_dir,
            Side::Receiver,
            &self.ctx(true),
        ) >= 0
    }

    fn ctx(&self, ignore_perishable: bool) -> list::Ctx<'_> {
        list::Ctx {
            delete_excluded: self.inner.opts.delete_excluded,
            abs_root: &self.inner.abs_root,
            ignore_perishable,
        }
    }
}
