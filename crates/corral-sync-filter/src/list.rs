//! The ordered rule list: reading rule files and options into it, per-directory merge lists,
//! and rsync's `check_filter` walk over it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::rule::{DEFAULT_CVSIGNORE, Rule, Sides, Syntax, Template, Token, parse_token};
use crate::{FilterError, FilterOption, Side};

/// How deep merge files may include merge files.
const MERGE_DEPTH_LIMIT: usize = 16;

/// A per-directory merge rule (`:`/`dir-merge`) and the rules it holds for one directory.
#[derive(Debug)]
pub(crate) struct DirMerge {
    spec: Arc<MergeSpec>,
    /// Rules in effect for the current directory: its own file's rules, then inherited ones.
    list: Vec<Item>,
}

#[derive(Debug)]
struct MergeSpec {
    /// The file name looked up in each directory.
    name: Vec<u8>,
    template: Template,
    no_inherit: bool,
}

#[derive(Debug, Clone)]
pub(crate) enum Item {
    Rule(Arc<Rule>),
    DirMerge(Arc<DirMerge>),
}

impl Item {
    pub(crate) fn is_dir_merge(&self) -> bool {
        matches!(self, Item::DirMerge(_))
    }
}

/// An ordered, parsed list of rsync filter rules (first match wins).
#[derive(Debug, Clone, Default)]
pub struct Rules {
    items: Vec<Item>,
}

type Reader<'r> = &'r mut dyn FnMut(&Path) -> Option<String>;

struct Builder<'r> {
    items: Vec<Item>,
    cleared: bool,
    read: Option<Reader<'r>>,
    /// Set while reading a per-directory merge file: that directory (anchors `/` patterns,
    /// and merge file names are relative to it).
    dir: Option<Vec<u8>>,
}

fn origin_line(name: &str, line: usize) -> String {
    format!("{name}:{line}")
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        name.to_vec()
    } else {
        let mut v = dir.to_vec();
        v.push(b'/');
        v.extend_from_slice(name);
        v
    }
}

fn path_of(b: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    PathBuf::from(std::ffi::OsStr::from_bytes(b))
}

impl Builder<'_> {
    /// Rules from one string that holds one rule (or, word-split, several).
    fn add_str(
        &mut self,
        s: &[u8],
        origin: &str,
        template: &Template,
        syntax: Syntax,
        depth: usize,
    ) -> Result<(), FilterError> {
        let mut pos = 0;
        let anchor = self.dir.clone();
        while let Some(tok) = parse_token(s, &mut pos, template, syntax, origin, anchor.as_deref())?
        {
            self.add_token(tok, origin, depth)?;
            if pos >= s.len() {
                break;
            }
        }
        Ok(())
    }

    /// Rules from a file's text (rsync's `parse_filter_file`): lines end at `\n` or `\r`;
    /// empty lines and, unless word-split, lines starting with `#` or `;` are skipped.
    fn add_text(
        &mut self,
        text: &str,
        name: &str,
        template: &Template,
        syntax: Syntax,
        depth: usize,
    ) -> Result<(), FilterError> {
        for (n, line) in text.split(['\n', '\r']).enumerate() {
            let origin = origin_line(name, n + 1);
            let b = line.as_bytes();
            if template.word_split {
                for word in b.split(|c| c.is_ascii_whitespace() || *c == 0x0b) {
                    if !word.is_empty() {
                        self.add_str(word, &origin, template, syntax, depth)?;
                    }
                }
            } else if !b.is_empty() && b[0] != b'#' && b[0] != b';' {
                self.add_str(b, &origin, template, syntax, depth)?;
            }
        }
        Ok(())
    }

    fn add_token(&mut self, tok: Token, origin: &str, depth: usize) -> Result<(), FilterError> {
        match tok {
            Token::Rule(r) => self.items.push(Item::Rule(Arc::new(r))),
            Token::Clear => {
                self.items.clear();
                self.cleared = true;
            }
            Token::Cvs(sides, perishable) => {
                let t = Template {
                    sides,
                    perishable,
                    ..Template::default()
                };
                for pat in DEFAULT_CVSIGNORE.split_ascii_whitespace() {
                    let r = Rule::new(pat.as_bytes(), false, false, &t, None);
                    self.items.push(Item::Rule(Arc::new(r)));
                }
            }
            Token::Merge {
                file,
                template,
                per_dir,
                no_inherit,
                exclude_self,
            } => {
                let fb = file.as_bytes();
                let base = match fb.iter().rposition(|&c| c == b'/') {
                    Some(i) => &fb[i + 1..],
                    None => fb,
                };
                if exclude_self {
                    let r = Rule::new(base, false, false, &Template::default(), None);
                    self.items.push(Item::Rule(Arc::new(r)));
                }
                if per_dir {
                    let spec = Arc::new(MergeSpec {
                        name: base.to_vec(),
                        template,
                        no_inherit,
                    });
                    let list = match self.dir.clone() {
                        // Declared inside a per-directory file: active from this directory on.
                        Some(dir) => match self.read.as_mut() {
                            Some(read) => load_dir_merge(&spec, &dir, &mut **read, &[], depth + 1)?,
                            None => Vec::new(),
                        },
                        None => Vec::new(),
                    };
                    self.items
                        .push(Item::DirMerge(Arc::new(DirMerge { spec, list })));
                    return Ok(());
                }
                if depth >= MERGE_DEPTH_LIMIT {
                    return Err(FilterError::MergeTooDeep {
                        origin: origin.to_owned(),
                        limit: MERGE_DEPTH_LIMIT,
                    });
                }
                let rel = match &self.dir {
                    Some(dir) if fb.first() != Some(&b'/') => join(dir, fb),
                    _ => fb.to_vec(),
                };
                let path = path_of(&rel);
                let text = self.read.as_mut().and_then(|read| read(&path));
                let Some(text) = text else {
                    return Err(FilterError::MergeFileUnreadable {
                        origin: origin.to_owned(),
                        path,
                    });
                };
                let name = path.display().to_string();
                self.add_text(&text, &name, &template, Syntax::Full, depth + 1)?;
            }
        }
        Ok(())
    }
}

/// Read the per-directory merge file of `spec` in `dir` and build that directory's list:
/// the file's rules, then (unless `n` or a `!` in the file) the `inherited` ones refreshed
/// for `dir`.
fn load_dir_merge(
    spec: &MergeSpec,
    dir: &[u8],
    read: &mut dyn FnMut(&Path) -> Option<String>,
    inherited: &[Item],
    depth: usize,
) -> Result<Vec<Item>, FilterError> {
    if depth >= MERGE_DEPTH_LIMIT {
        return Err(FilterError::MergeTooDeep {
            origin: String::from_utf8_lossy(&join(dir, &spec.name)).into_owned(),
            limit: MERGE_DEPTH_LIMIT,
        });
    }
    let path = path_of(&join(dir, &spec.name));
    let text = read(&path);
    tracing::trace!(path = %path.display(), found = text.is_some(), "per-directory merge file");
    let mut b = Builder {
        items: Vec::new(),
        cleared: false,
        read: Some(&mut *read),
        dir: Some(dir.to_vec()),
    };
    if let Some(text) = text {
        let name = path.display().to_string();
        b.add_text(&text, &name, &spec.template, Syntax::Full, depth)?;
    }
    let (mut items, cleared) = (b.items, b.cleared);
    if !cleared && !spec.no_inherit {
        items.extend(refresh_depth(inherited, dir, read, depth + 1)?);
    }
    Ok(items)
}

/// The list `items` (a parent directory's) as it applies in `dir`: every per-directory merge
/// rule reads its file in `dir`.
pub(crate) fn refresh(
    items: &[Item],
    dir: &[u8],
    read: &mut dyn FnMut(&Path) -> Option<String>,
) -> Result<Vec<Item>, FilterError> {
    refresh_depth(items, dir, read, 0)
}

fn refresh_depth(
    items: &[Item],
    dir: &[u8],
    read: &mut dyn FnMut(&Path) -> Option<String>,
    depth: usize,
) -> Result<Vec<Item>, FilterError> {
    let mut out = Vec::with_capacity(items.len());
    for it in items {
        match it {
            Item::Rule(_) => out.push(it.clone()),
            Item::DirMerge(dm) => {
                let list = load_dir_merge(&dm.spec, dir, read, &dm.list, depth)?;
                out.push(Item::DirMerge(Arc::new(DirMerge {
                    spec: dm.spec.clone(),
                    list,
                })));
            }
        }
    }
    Ok(out)
}

/// What a check needs besides the list.
#[derive(Debug)]
pub(crate) struct Ctx<'a> {
    pub(crate) delete_excluded: bool,
    pub(crate) abs_root: &'a [u8],
    pub(crate) ignore_perishable: bool,
}

fn applies(sides: Sides, side: Side, delete_excluded: bool) -> bool {
    match (sides.sender, sides.receiver) {
        (true, true) => true,
        (true, false) => side == Side::Sender,
        (false, true) => side == Side::Receiver,
        // --delete-excluded makes side-less rules sender-only (rsync's send_rules).
        (false, false) => side == Side::Sender || !delete_excluded,
    }
}

/// rsync's `check_filter`: 1 = included, -1 = excluded, 0 = no rule matched.
pub(crate) fn check(items: &[Item], name: &[u8], is_dir: bool, side: Side, ctx: &Ctx<'_>) -> i8 {
    if name.is_empty() {
        return 0;
    }
    for it in items {
        match it {
            Item::Rule(r) => {
                if !applies(r.sides, side, ctx.delete_excluded)
                    || (ctx.ignore_perishable && r.perishable)
                {
                    continue;
                }
                if r.matches(name, is_dir, ctx.abs_root) {
                    return if r.include { 1 } else { -1 };
                }
            }
            Item::DirMerge(dm) => {
                let rc = check(&dm.list, name, is_dir, side, ctx);
                if rc != 0 {
                    return rc;
                }
            }
        }
    }
    0
}

impl Rules {
    /// Rules from rsync filter syntax (one rule per line, `#`/`;` comments); `origin` names
    /// the source in errors (`ORIGIN:LINE`). A `merge` (`.`) rule is an error here, since
    /// there is nothing to read it with: use [`Rules::parse_with`].
    pub fn parse(text: &str, origin: &str) -> Result<Rules, FilterError> {
        Self::build(None, |b| {
            b.add_text(text, origin, &Template::default(), Syntax::Full, 0)
        })
    }

    /// Like [`Rules::parse`], reading `merge` files with `read(path)` (the path as written in
    /// the rule; `None` = cannot be read, an error as in rsync).
    pub fn parse_with(
        text: &str,
        origin: &str,
        read: &mut dyn FnMut(&Path) -> Option<String>,
    ) -> Result<Rules, FilterError> {
        Self::build(Some(read), |b| {
            b.add_text(text, origin, &Template::default(), Syntax::Full, 0)
        })
    }

    /// Rules from rsync-style command-line options, in order as given. A `merge` rule in a
    /// `Filter` is an error here: use [`Rules::from_options_with`].
    pub fn from_options(opts: &[FilterOption]) -> Result<Rules, FilterError> {
        Self::build(None, |b| add_options(b, opts))
    }

    /// Like [`Rules::from_options`], reading `merge` files with `read(path)`.
    pub fn from_options_with(
        opts: &[FilterOption],
        read: &mut dyn FnMut(&Path) -> Option<String>,
    ) -> Result<Rules, FilterError> {
        Self::build(Some(read), |b| add_options(b, opts))
    }

    /// Append `other`'s rules after these (as if given later on the command line).
    pub fn extend(&mut self, other: Rules) {
        self.items.extend(other.items);
    }

    /// True when there are no rules (everything is transferred, nothing protected).
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// True when some rule reads per-directory merge files (so walkers must call
    /// [`crate::Matcher::for_dir`] with a reader).
    pub fn has_dir_merge(&self) -> bool {
        self.items.iter().any(Item::is_dir_merge)
    }

    pub(crate) fn into_items(self) -> Vec<Item> {
        self.items
    }

    fn build<'r>(
        read: Option<Reader<'r>>,
        f: impl FnOnce(&mut Builder<'r>) -> Result<(), FilterError>,
    ) -> Result<Rules, FilterError> {
        let mut b = Builder {
            items: Vec::new(),
            cleared: false,
            read,
            dir: None,
        };
        f(&mut b)?;
        Ok(Rules { items: b.items })
    }
}

fn add_options(b: &mut Builder<'_>, opts: &[FilterOption]) -> Result<(), FilterError> {
    let t = Template::default();
    for o in opts {
        match o {
            FilterOption::Exclude(p) => b.add_str(
                p.as_bytes(),
                "--exclude",
                &t,
                Syntax::OldPrefixes { include: false },
                0,
            )?,
            FilterOption::Include(p) => b.add_str(
                p.as_bytes(),
                "--include",
                &t,
                Syntax::OldPrefixes { include: true },
                0,
            )?,
            FilterOption::Filter(r) => b.add_str(r.as_bytes(), "--filter", &t, Syntax::Full, 0)?,
            FilterOption::ExcludeFrom(text, origin) => {
                b.add_text(text, origin, &t, Syntax::OldPrefixes { include: false }, 0)?
            }
            FilterOption::IncludeFrom(text, origin) => {
                b.add_text(text, origin, &t, Syntax::OldPrefixes { include: true }, 0)?
            }
            FilterOption::FilterFile(text, origin) => {
                b.add_text(text, origin, &t, Syntax::Full, 0)?
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MatchOptions, Matcher};
    use std::collections::HashMap;

    fn matcher(text: &str) -> Matcher {
        Matcher::new(Rules::parse(text, "test").unwrap(), MatchOptions::default())
    }
    fn sends(m: &Matcher, p: &str, dir: bool) -> bool {
        m.transfers(Path::new(p), dir)
    }
    fn deletes(m: &Matcher, p: &str, dir: bool) -> bool {
        m.may_delete(Path::new(p), dir)
    }

    #[test]
    fn include_exclude_first_match_wins() {
        let m = matcher("+ keep.o\n- *.o\n");
        assert!(sends(&m, "a/keep.o", false));
        assert!(!sends(&m, "a/x.o", false));
        assert!(sends(&m, "a/x.c", false));
        let m = matcher("- *.o\n+ keep.o\n");
        assert!(!sends(&m, "a/keep.o", false));
    }

    #[test]
    fn long_names_and_comma_modifiers() {
        let m = matcher("include,! *.c\nexclude *\n# comment\n; comment\n\n");
        // "include,! *.c": include everything that is not *.c.
        assert!(sends(&m, "x.h", false));
        assert!(!sends(&m, "x.c", false));
    }

    #[test]
    fn anchored_and_slash_patterns() {
        let m = matcher("- /tmp\n- var/log\n");
        assert!(!sends(&m, "tmp", true));
        assert!(sends(&m, "usr/tmp", true));
        assert!(!sends(&m, "var/log", true));
        assert!(
            !sends(&m, "x/var/log", true),
            "a slash inside matches the path tail"
        );
        assert!(sends(&m, "x/avar/log", true));
    }

    #[test]
    fn trailing_slash_is_directories_only() {
        let m = matcher("- cache/\n");
        assert!(!sends(&m, "a/cache", true));
        assert!(sends(&m, "a/cache", false));
    }

    #[test]
    fn stars() {
        let m = matcher("+ /a/***\n+ /b/**/c\n- *\n");
        assert!(sends(&m, "a", true), "*** matches the directory itself");
        assert!(sends(&m, "a/x/y", false));
        assert!(sends(&m, "b/x/y/c", false));
        assert!(
            !sends(&m, "b/c", false),
            "** needs at least one directory here"
        );
        assert!(!sends(&m, "z", false));
    }

    #[test]
    fn hide_show_protect_risk() {
        let m = matcher("H secret\nP local.conf\nR *.tmp\n- *.tmp\n- excl\n");
        assert!(!sends(&m, "secret", false));
        assert!(deletes(&m, "secret", false), "hide is sender-side only");
        assert!(
            sends(&m, "local.conf", false),
            "protect is receiver-side only"
        );
        assert!(!deletes(&m, "local.conf", false));
        assert!(
            deletes(&m, "x.tmp", false),
            "risk overrides the later exclude on the receiver"
        );
        assert!(!sends(&m, "x.tmp", false));
        assert!(!deletes(&m, "excl", false), "excluded paths are protected");
        let m = Matcher::new(
            Rules::parse("- excl\nP prot\n", "t").unwrap(),
            MatchOptions {
                delete_excluded: true,
                ..Default::default()
            },
        );
        assert!(deletes(&m, "excl", false), "--delete-excluded");
        assert!(
            !deletes(&m, "prot", false),
            "P still protects with --delete-excluded"
        );
    }

    #[test]
    fn side_modifiers() {
        let m = matcher("-s a\n-r b\n");
        assert!(!sends(&m, "a", false));
        assert!(deletes(&m, "a", false));
        assert!(sends(&m, "b", false));
        assert!(!deletes(&m, "b", false));
    }

    #[test]
    fn clear_resets_the_list() {
        let m = matcher("- a\n!\n- b\n");
        assert!(sends(&m, "a", false));
        assert!(!sends(&m, "b", false));
        let m = Matcher::new(
            Rules::from_options(&[
                FilterOption::Exclude("a".into()),
                FilterOption::Exclude("!".into()),
                FilterOption::Include("- b".into()),
            ])
            .unwrap(),
            MatchOptions::default(),
        );
        assert!(sends(&m, "a", false));
        assert!(!sends(&m, "b", false));
    }

    #[test]
    fn cvs_default_list() {
        let m = matcher("-C\n");
        assert!(!sends(&m, "x/foo.o", false));
        assert!(!sends(&m, ".git", true));
        assert!(sends(&m, ".git", false), ".git/ is directories only");
        assert!(sends(&m, "main.rs", false));
    }

    #[test]
    fn merge_files_through_the_reader() {
        let mut files: HashMap<PathBuf, String> = HashMap::new();
        files.insert("inc.rules".into(), "- *.log\n".into());
        files.insert("names".into(), "a b\nc\n".into());
        let mut read = |p: &Path| files.get(p).cloned();
        let rules = Rules::parse_with(". inc.rules\nmerge,-w names\n", "top", &mut read).unwrap();
        let m = Matcher::new(rules, MatchOptions::default());
        assert!(!sends(&m, "x.log", false));
        assert!(!sends(&m, "a", false));
        assert!(!sends(&m, "b", false));
        assert!(!sends(&m, "c", false));
        assert!(sends(&m, "d", false));
        let err = Rules::parse_with("merge missing", "top", &mut read).unwrap_err();
        assert!(
            matches!(err, FilterError::MergeFileUnreadable { .. }),
            "{err}"
        );
        let err = Rules::parse("merge inc.rules", "top").unwrap_err();
        assert!(
            matches!(err, FilterError::MergeFileUnreadable { .. }),
            "{err}"
        );
    }

    #[test]
    fn merge_loop_is_an_error() {
        let mut read = |_: &Path| Some(". self\n".to_owned());
        let err = Rules::parse_with(". self", "top", &mut read).unwrap_err();
        assert!(matches!(err, FilterError::MergeTooDeep { .. }), "{err}");
    }

    #[test]
    fn dir_merge_inherits_anchors_and_clears() {
        let mut files: HashMap<PathBuf, String> = HashMap::new();
        files.insert(".f".into(), "- *.tmp\n".into());
        files.insert("a/.f".into(), "+ keep.tmp\n- /only-here\n".into());
        files.insert("a/b/.f".into(), "!\n- x\n".into());
        let mut read = |p: &Path| files.get(p).cloned();
        let root = Matcher::new(
            Rules::parse(": .f\n", "t").unwrap(),
            MatchOptions::default(),
        )
        .for_dir(Path::new(""), &mut read)
        .unwrap();
        assert!(!sends(&root, "z.tmp", false));
        assert!(sends(&root, "only-here", false));
        let a = root.for_dir(Path::new("a"), &mut read).unwrap();
        assert!(sends(&a, "a/keep.tmp", false), "subdir rules come first");
        assert!(!sends(&a, "a/z.tmp", false), "parent rules are inherited");
        assert!(
            !sends(&a, "a/only-here", false),
            "anchored at the file's directory"
        );
        let ab = a.for_dir(Path::new("a/b"), &mut read).unwrap();
        assert!(!sends(&ab, "a/b/only-here/q", true) || sends(&ab, "a/b/only-here", true));
        assert!(
            sends(&ab, "a/b/z.tmp", false),
            "! cleared the inherited rules"
        );
        assert!(!sends(&ab, "a/b/x", false));
        let c = a.for_dir(Path::new("a/c"), &mut read).unwrap();
        assert!(sends(&c, "a/c/only-here", false));
        assert!(!sends(&c, "a/c/z.tmp", false));
    }

    #[test]
    fn syntax_errors_name_their_origin() {
        for (text, want) in [
            ("x foo", "unknown filter rule"),
            ("excludeme foo", "unknown filter rule"),
            ("-z foo", "invalid modifier"),
            ("-e foo", "invalid modifier"),
            ("! x", "trailing characters"),
            ("- ", "unexpected end"),
            ("+", "unexpected end"),
            ("H,s foo", "invalid modifier"),
        ] {
            let err = Rules::parse(&format!("# c\n{text}\n"), "rules.txt").unwrap_err();
            let msg = err.to_string();
            assert!(msg.starts_with("rules.txt:2:"), "{msg}");
            assert!(msg.contains(want), "{text:?}: {msg}");
        }
    }

    /// Checked against `rsync -rni` run in /tmp/abst with the same rules.
    #[test]
    fn slash_modifier_matches_the_absolute_path() {
        let m = |text: &str| {
            Matcher::new(
                Rules::parse(text, "t").unwrap(),
                MatchOptions {
                    abs_root: Some("/tmp/abst/src".into()),
                    ..Default::default()
                },
            )
        };
        let r = m("-/ /tmp/abst/src/a/b/x\n-/ /tmp/abst/src/c\n");
        assert!(!sends(&r, "a/b/x", false));
        assert!(!sends(&r, "c", true));
        assert!(sends(&r, "x", false));
        let r = m("-/ /tmp/abst/src/**/x\n");
        assert!(!sends(&r, "a/b/x", false));
        assert!(sends(&r, "x", false));
        let r = m("-/ src/a\n");
        assert!(!sends(&r, "a", true));
        assert!(sends(&r, "c", true));
        let r = m("-/ x\n");
        assert!(!sends(&r, "a/b/x", false));
    }

    #[test]
    fn root_path_is_never_matched() {
        let m = matcher("- *\n");
        assert!(sends(&m, "", true));
        assert!(sends(&m, ".", true));
    }
}
