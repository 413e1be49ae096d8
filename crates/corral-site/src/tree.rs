//! Sync tree descriptions: `trees/NAME.toml` in the site directory, one per master tree.
//!
//! ```toml
//! source = "/srv/trees/web"          # the master's root on this machine (absolute)
//! filter = "filters/web.rules"       # optional global rsync-style filter file (site-relative)
//! delete = true                      # optional default for --delete (false)
//! backup_dir = ".corral-backup"      # optional default for --backup-dir (beneath each child)
//! [ssh]                              # optional transport options
//! program = "ssh"
//! args = ["-i", "/etc/corral/sync_key"]
//! remote_corral = "corral"           # the program run on the child
//! persist = "60s"                    # keep the connection for the next run ("0s": never)
//! compress = "auto"                  # file data: auto (measured per run), always, never
//! [[child]]
//! name = "web01"                     # optional label (default: host, else dest)
//! host = "web01.example.net"         # ssh host; absent: a directory on this machine
//! dest = "/"                         # the child's root
//! filter = "filters/web01.rules"     # optional extra rules for this child (after the global)
//! recurse = false                    # the child is itself a master: sync its children next
//! site = "/etc/corral/site"          # its site directory (for recurse)
//! tree = "web"                       # its tree name (default: this tree's name)
//! state_dir = "/srv/corral-state"    # optional: the child's state directory (hash cache),
//!                                    # given to its receiver as `corral sync serve --state-dir`
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::load::{Report, Source, list_toml, parse_file, read_source};
use crate::problem::{Problem, ProblemKind};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTree {
    source: Option<String>,
    filter: Option<String>,
    #[serde(default)]
    delete: bool,
    backup_dir: Option<String>,
    ssh: Option<RawSsh>,
    #[serde(default)]
    child: Vec<RawChild>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSsh {
    program: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    remote_corral: Option<String>,
    persist: Option<String>,
    compress: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChild {
    name: Option<String>,
    host: Option<String>,
    dest: Option<String>,
    filter: Option<String>,
    #[serde(default)]
    recurse: bool,
    site: Option<String>,
    tree: Option<String>,
    state_dir: Option<String>,
}

/// A validated tree description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    /// The tree's name (file stem).
    pub name: String,
    /// The master's root.
    pub source: PathBuf,
    /// Global filter file, resolved against the site directory.
    pub filter: Option<PathBuf>,
    /// Delete by default.
    pub delete: bool,
    /// Default backup directory beneath each child.
    pub backup_dir: Option<String>,
    /// ssh program.
    pub ssh_program: Option<String>,
    /// ssh arguments before the host.
    pub ssh_args: Vec<String>,
    /// Program run on the child.
    pub remote_corral: Option<String>,
    /// How long the ssh connection is kept for the next run (`None`: the default, 60 s;
    /// zero: never).
    pub ssh_persist: Option<std::time::Duration>,
    /// Whether file data is compressed on the wire (`[ssh] compress`).
    pub compress: TreeCompress,
    /// The children.
    pub children: Vec<TreeChild>,
}

/// `[ssh] compress` of a tree: how file data travels (`corral sync run --compress`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TreeCompress {
    /// Compressed for a small plan; for a large one, whichever of compressed and raw the
    /// run measures to be faster.
    #[default]
    Auto,
    /// Always compressed (where a sample compresses).
    Always,
    /// Always raw.
    Never,
}

/// One child of a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeChild {
    /// Label in reports and for `-s`.
    pub name: String,
    /// ssh host; `None` for a local directory.
    pub host: Option<String>,
    /// The child's root.
    pub dest: String,
    /// Extra filter file, resolved against the site directory.
    pub filter: Option<PathBuf>,
    /// Sync this child's own children after it.
    pub recurse: bool,
    /// The child's site directory (for `recurse`).
    pub site: Option<String>,
    /// The child's tree name (for `recurse`).
    pub tree: String,
    /// The state directory of the child's receiver (its hash cache; `corral sync serve
    /// --state-dir`); `None`: the child's default (`$CORRAL_STATE_DIR` there, else
    /// `/var/lib/corral`). An absolute path on the child.
    pub state_dir: Option<String>,
}

fn convert(dir: &Path, name: &str, src: &Source, raw: RawTree, r: &mut Report) -> Option<Tree> {
    let rel = src.rel.clone();
    let bad = |r: &mut Report, msg: String| r.file_error(&rel, ProblemKind::BadTree, msg);
    let source = match raw.source {
        Some(s) if Path::new(&s).is_absolute() => PathBuf::from(s),
        Some(s) => {
            bad(
                r,
                format!("source = {s:?} must be an absolute path (the master's root)"),
            );
            return None;
        }
        None => {
            bad(r, "missing key `source`: the master's root directory, e.g. source = \"/srv/trees/web\"".into());
            return None;
        }
    };
    let file = |f: Option<String>, r: &mut Report| -> Option<PathBuf> {
        let f = f?;
        let p = dir.join(&f);
        if !p.is_file() {
            r.file_error(
                &src.rel,
                ProblemKind::BadTree,
                format!("filter file {f:?} not found (paths are relative to the site directory)"),
            );
        }
        Some(p)
    };
    let filter = file(raw.filter, r);
    if let Some(b) = &raw.backup_dir
        && (b.is_empty() || b.starts_with('/') || b.split('/').any(|c| c == ".." || c.is_empty()))
    {
        bad(
            r,
            format!("backup_dir = {b:?} must be a relative path beneath the child's root"),
        );
    }
    if raw.child.is_empty() {
        r.file_warn(
            &src.rel,
            ProblemKind::BadTree,
            "no [[child]]: nothing to sync".into(),
        );
    }
    let mut children = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, c) in raw.child.into_iter().enumerate() {
        let Some(dest) = c.dest else {
            bad(
                r,
                format!(
                    "[[child]] #{} has no `dest` (the child's root, e.g. dest = \"/\")",
                    i + 1
                ),
            );
            continue;
        };
        if c.host.is_none() && !Path::new(&dest).is_absolute() {
            bad(
                r,
                format!(
                    "[[child]] #{}: a local dest must be absolute, got {dest:?}",
                    i + 1
                ),
            );
        }
        if let Some(h) = &c.host
            && (h.is_empty() || h.starts_with('-') || h.contains(char::is_whitespace))
        {
            bad(
                r,
                format!("[[child]] #{}: host {h:?} is not a host name", i + 1),
            );
        }
        let cname = c
            .name
            .or_else(|| c.host.clone())
            .unwrap_or_else(|| dest.clone());
        if !seen.insert(cname.clone()) {
            bad(
                r,
                format!("two children named {cname:?}; give each a distinct `name`"),
            );
        }
        if let Some(s) = &c.state_dir
            && !Path::new(s).is_absolute()
        {
            bad(
                r,
                format!(
                    "child {cname:?}: state_dir = {s:?} must be an absolute path on the child, e.g. \"/var/lib/corral\""
                ),
            );
        }
        if c.recurse && c.host.is_none() && c.site.is_none() {
            bad(
                r,
                format!("child {cname:?} recurses but has no `site` (its site directory)"),
            );
        }
        children.push(TreeChild {
            name: cname,
            host: c.host,
            dest,
            filter: file(c.filter, r),
            recurse: c.recurse,
            site: c.site,
            tree: c.tree.unwrap_or_else(|| name.to_string()),
            state_dir: c.state_dir,
        });
    }
    let (ssh_program, ssh_args, remote_corral, persist, compress) = match raw.ssh {
        Some(s) => (s.program, s.args, s.remote_corral, s.persist, s.compress),
        None => (None, Vec::new(), None, None, None),
    };
    let compress = match compress.as_deref() {
        None | Some("auto") => TreeCompress::Auto,
        Some("always") => TreeCompress::Always,
        Some("never") => TreeCompress::Never,
        Some(c) => {
            bad(
                r,
                format!(
                    "[ssh] compress = {c:?}: give \"auto\" (measure per run), \"always\" or \"never\""
                ),
            );
            TreeCompress::Auto
        }
    };
    let ssh_persist = match persist.as_deref().map(humantime::parse_duration) {
        None => None,
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => {
            bad(
                r,
                format!(
                    "[ssh] persist = {:?}: {e}; give a duration like \"60s\" (\"0s\": never keep the connection)",
                    persist.unwrap_or_default()
                ),
            );
            None
        }
    };
    Some(Tree {
        name: name.to_string(),
        source,
        filter,
        delete: raw.delete,
        backup_dir: raw.backup_dir,
        ssh_program,
        ssh_args,
        remote_corral,
        ssh_persist,
        compress,
        children,
    })
}

/// Loads `SITE/trees/NAME.toml`. Errors carry every problem found.
pub fn load_tree(site_dir: &Path, name: &str) -> Result<Tree, Vec<Problem>> {
    let (t, p) = load_tree_report(site_dir, name);
    t.ok_or(p)
}

fn load_tree_report(site_dir: &Path, name: &str) -> (Option<Tree>, Vec<Problem>) {
    let mut r = Report::default();
    let rel = Path::new("trees").join(format!("{name}.toml"));
    if !site_dir.join(&rel).is_file() {
        r.file_error(
            &rel,
            ProblemKind::BadTree,
            format!(
                "no tree named {name:?}: {} does not exist",
                site_dir.join(&rel).display()
            ),
        );
        return (None, r.problems);
    }
    let tree = read_source(site_dir, rel, &mut r).and_then(|src| {
        parse_file::<RawTree>(&src, &mut r)
            .and_then(|(raw, _)| convert(site_dir, name, &src, raw, &mut r))
    });
    match tree {
        Some(t) if !r.has_errors() => (Some(t), r.problems),
        _ => (None, r.problems),
    }
}

/// Problems in every `trees/*.toml` (directories beside them, tree data, are not reported).
pub(crate) fn check_trees(site_dir: &Path) -> Vec<Problem> {
    let mut listing = Report::default();
    let names = list_toml(site_dir, "trees", &mut listing);
    let mut out = Vec::new();
    for (stem, _) in names {
        out.extend(load_tree_report(site_dir, &stem).1);
    }
    out
}
