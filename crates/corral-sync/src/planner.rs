//! The planner: a pure function from (master manifest, child manifest, filter, options) to a
//! plan. No file system, no clock: tested with manifests built in memory.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::filter::PathFilter;
use crate::manifest::{Entry, Kind, Manifest, Meta, path_order};

/// Options that change what a plan contains.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// Delete child paths the master does not have (unless the filter protects them).
    pub delete: bool,
    /// Compare owners by number only (otherwise by name when both sides know one).
    pub numeric_ids: bool,
    /// Do not compare or set owners (a non-root receiver).
    pub ignore_owner: bool,
}

/// One step of a plan, applied in order by the receiver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Remove a path (recursively for a directory) because the master's object has another
    /// kind; comes before the object is created.
    Replace {
        /// The path to clear.
        path: String,
    },
    /// Create a directory (its metadata is set by a later `DirMeta`).
    Mkdir(Entry),
    /// Write a regular file's content and metadata (atomically: temp file + rename).
    Write(Entry),
    /// Create or recreate a symlink, device node or fifo.
    Special(Entry),
    /// Make `path` a hard link to the file at `target` (written earlier or unchanged).
    Link {
        /// The new name.
        path: String,
        /// The existing file.
        target: String,
    },
    /// Set metadata of an existing non-directory whose content is already right.
    Meta(Entry),
    /// Set a directory's metadata; these come after all contents, deepest first.
    DirMeta(Entry),
    /// Delete a child path the master does not have; these come after all writes, deepest
    /// first.
    Delete {
        /// The path.
        path: String,
        /// It is a directory.
        dir: bool,
    },
}

impl Op {
    /// The path this step acts on.
    pub fn path(&self) -> &str {
        match self {
            Op::Replace { path } | Op::Link { path, .. } | Op::Delete { path, .. } => path,
            Op::Mkdir(e) | Op::Write(e) | Op::Special(e) | Op::Meta(e) | Op::DirMeta(e) => &e.path,
        }
    }
}

/// A change as shown to people: rsync's itemize string and both sides' summaries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// rsync-style `YXcstpoguax` string, e.g. `>f.st......`, or `*deleting  `.
    pub itemize: String,
    /// The path (directories end in `/` as in rsync's output).
    pub path: String,
    /// The child's object before the run.
    pub old: Option<Summary>,
    /// The master's object.
    pub new: Option<Summary>,
    /// Setuid/setgid or executable bits change (flagged first in drift reports).
    pub security: bool,
}

impl Item {
    /// The one-line rsync-style rendering.
    pub fn line(&self) -> String {
        format!("{} {}", self.itemize, self.path)
    }
}

/// One side of a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// `f`, `d`, `L`, `D`, `S`.
    pub kind: char,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits, octal.
    pub mode: String,
    /// Numeric owner.
    pub uid: u32,
    /// Numeric group.
    pub gid: u32,
    /// mtime, seconds.
    pub mtime: i64,
    /// mtime, nanoseconds.
    pub mtime_ns: u32,
    /// BLAKE3 of the content, hex.
    pub hash: Option<String>,
}

impl Summary {
    fn of(e: &Entry) -> Summary {
        Summary {
            kind: e.kind.letter(),
            size: e.size(),
            mode: format!("{:04o}", e.meta.mode),
            uid: e.meta.uid,
            gid: e.meta.gid,
            mtime: e.meta.mtime,
            mtime_ns: e.meta.mtime_ns,
            hash: e.content.as_ref().map(|c| c.hash.to_hex()),
        }
    }
}

/// The plan: steps for the receiver and the change list for people.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Steps in the order they must run.
    pub ops: Vec<Op>,
    /// Every change, one per path, in path order.
    pub items: Vec<Item>,
}

impl Plan {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

#[derive(Default)]
struct Diff {
    content: bool,
    size: bool,
    time: bool,
    perms: bool,
    owner: bool,
    group: bool,
    xattr: bool,
    acl: bool,
}

impl Diff {
    fn any_meta(&self) -> bool {
        self.time || self.perms || self.owner || self.group || self.xattr || self.acl
    }
}

fn is_acl(name: &[u8]) -> bool {
    name.starts_with(b"system.posix_acl_")
}

fn meta_diff(m: &Meta, c: &Meta, opts: &PlanOptions, kind: &Kind) -> Diff {
    let owner_eq = |mu: u32, mn: &Option<String>, cu: u32, cn: &Option<String>| match (mn, cn) {
        (Some(a), Some(b)) if !opts.numeric_ids => a == b,
        _ => mu == cu,
    };
    let split = |x: &[(Vec<u8>, Vec<u8>)], acl: bool| -> Vec<(Vec<u8>, Vec<u8>)> {
        x.iter().filter(|(n, _)| is_acl(n) == acl).cloned().collect()
    };
    let symlink = matches!(kind, Kind::Symlink(_));
    Diff {
        time: (m.mtime, m.mtime_ns) != (c.mtime, c.mtime_ns),
        // Linux symlinks have no permissions of their own.
        perms: !symlink && m.mode != c.mode,
        owner: !opts.ignore_owner && !owner_eq(m.uid, &m.user, c.uid, &c.user),
        group: !opts.ignore_owner && !owner_eq(m.gid, &m.group, c.gid, &c.group),
        xattr: split(&m.xattrs, false) != split(&c.xattrs, false),
        acl: split(&m.xattrs, true) != split(&c.xattrs, true),
        ..Diff::default()
    }
}

fn itemize(y: char, kind: &Kind, new: bool, d: &Diff) -> String {
    if new {
        return format!("{y}{}+++++++++", kind.letter());
    }
    let f = |b: bool, c: char| if b { c } else { '.' };
    format!(
        "{y}{}{}{}{}{}{}{}.{}{}",
        kind.letter(),
        f(d.content, 'c'),
        f(d.size, 's'),
        f(d.time, 't'),
        f(d.perms, 'p'),
        f(d.owner, 'o'),
        f(d.group, 'g'),
        f(d.acl, 'a'),
        f(d.xattr, 'x'),
    )
}

fn exec_or_setid(mode: u32) -> u32 {
    mode & 0o7111
}

fn shown(path: &str, kind: &Kind) -> String {
    match kind {
        Kind::Dir if path.is_empty() => "./".into(),
        Kind::Dir => format!("{path}/"),
        Kind::Symlink(t) => format!("{path} -> {}", String::from_utf8_lossy(t)),
        Kind::Hardlink(t) => format!("{path} => {t}"),
        _ => path.to_string(),
    }
}

fn is_under(path: &str, dir: &str) -> bool {
    dir.is_empty() && !path.is_empty()
        || path.len() > dir.len() && path.starts_with(dir) && path.as_bytes()[dir.len()] == b'/'
}

/// The master entries the filter transfers: an excluded directory excludes all below it.
pub fn filtered<'a>(master: &'a Manifest, filter: &dyn PathFilter) -> Vec<&'a Entry> {
    let mut out = Vec::with_capacity(master.entries.len());
    let mut excluded: Option<&str> = None;
    for e in &master.entries {
        if let Some(x) = excluded {
            if is_under(&e.path, x) {
                continue;
            }
            excluded = None;
        }
        if e.path.is_empty() || filter.transfers(&e.path, e.kind == Kind::Dir) {
            out.push(e);
        } else if e.kind == Kind::Dir {
            excluded = Some(&e.path);
        }
    }
    out
}

/// Computes the steps that make the child equal to the master (modulo the filter).
pub fn plan(
    master: &Manifest,
    child: &Manifest,
    filter: &dyn PathFilter,
    opts: &PlanOptions,
) -> Plan {
    let sel = filtered(master, filter);
    let sel_paths: HashSet<&str> = sel.iter().map(|e| e.path.as_str()).collect();
    let mut plan = Plan::default();
    let mut dirmeta = Vec::new();
    // Files whose inode is replaced in this run: their hard links must be redone.
    let mut rewritten: HashSet<&str> = HashSet::new();
    // Child paths removed by a Replace (recursively).
    let mut replaced: Vec<&str> = Vec::new();
    let child_get = |p: &str, replaced: &[&str]| {
        if replaced.iter().any(|r| p == *r || is_under(p, r)) {
            None
        } else {
            child.get(p)
        }
    };

    for m in &sel {
        let c = child_get(&m.path, &replaced);
        let same_kind = c.is_some_and(|c| match (&m.kind, &c.kind) {
            (Kind::Symlink(_), Kind::Symlink(_)) => true,
            (Kind::Hardlink(_), Kind::Hardlink(_) | Kind::File) => true,
            (Kind::File, Kind::File | Kind::Hardlink(_)) => true,
            (a, b) => a == b || std::mem::discriminant(a) == std::mem::discriminant(b),
        });
        let mut c = c;
        if c.is_some() && !same_kind {
            plan.ops.push(Op::Replace {
                path: m.path.clone(),
            });
            replaced.push(&m.path);
            c = None;
        }
        let new = c.is_none();
        let old = c.map(Summary::of);
        let mut d = c.map_or_else(Diff::default, |c| meta_diff(&m.meta, &c.meta, opts, &m.kind));
        let push_item = |plan: &mut Plan, y: char, d: &Diff, new: bool| {
            let security = match (&old, m.kind == Kind::File) {
                (Some(o), true) => {
                    u32::from_str_radix(&o.mode, 8).map(exec_or_setid).ok()
                        != Some(exec_or_setid(m.meta.mode))
                }
                (None, true) => exec_or_setid(m.meta.mode) & 0o6000 != 0,
                _ => false,
            };
            plan.items.push(Item {
                itemize: itemize(y, &m.kind, new, d),
                path: shown(&m.path, &m.kind),
                old: old.clone(),
                new: Some(Summary::of(m)),
                security,
            });
        };
        match &m.kind {
            Kind::Dir => {
                if new {
                    plan.ops.push(Op::Mkdir((*m).clone()));
                    push_item(&mut plan, 'c', &d, true);
                    dirmeta.push(*m);
                } else if d.any_meta() {
                    push_item(&mut plan, '.', &d, false);
                    dirmeta.push(*m);
                }
            }
            Kind::File => {
                let mc = m.content.as_ref();
                if let Some(c) = c {
                    let cc = c.content.as_ref();
                    d.content = mc.map(|x| x.hash) != cc.map(|x| x.hash);
                    d.size = m.size() != c.size();
                    // A child that is a second name of another file is rewritten as its own.
                    if matches!(c.kind, Kind::Hardlink(_)) {
                        d.content = true;
                    }
                }
                if new || d.content {
                    plan.ops.push(Op::Write((*m).clone()));
                    rewritten.insert(&m.path);
                    push_item(&mut plan, '>', &d, new);
                } else if d.any_meta() {
                    plan.ops.push(Op::Meta((*m).clone()));
                    push_item(&mut plan, '.', &d, false);
                }
            }
            Kind::Hardlink(target) => {
                let linked = c.is_some_and(|c| c.kind == m.kind);
                if !linked || rewritten.contains(target.as_str()) {
                    plan.ops.push(Op::Link {
                        path: m.path.clone(),
                        target: target.clone(),
                    });
                    plan.items.push(Item {
                        itemize: "hf+++++++++".into(),
                        path: shown(&m.path, &m.kind),
                        old,
                        new: Some(Summary::of(m)),
                        security: false,
                    });
                }
            }
            Kind::Symlink(_) | Kind::Char(_) | Kind::Block(_) | Kind::Fifo => {
                let differs = c.is_some_and(|c| c.kind != m.kind);
                if new || differs {
                    plan.ops.push(Op::Special((*m).clone()));
                    d.content = differs;
                    push_item(&mut plan, 'c', &d, new);
                } else if d.any_meta() {
                    plan.ops.push(Op::Meta((*m).clone()));
                    push_item(&mut plan, '.', &d, false);
                }
            }
        }
    }

    if opts.delete {
        // Child paths the master does not transfer. A path the filter protects keeps its
        // directories; a protected directory is not looked into; a deleted directory takes
        // its contents along.
        let mut cand: Vec<&Entry> = Vec::new();
        let mut skip: Option<&str> = None;
        // Directories being deleted, innermost last (to ask "within deleted").
        let mut deleting: Vec<&str> = Vec::new();
        let mut kept: HashSet<&str> = HashSet::new();
        for c in &child.entries {
            if c.path.is_empty() {
                continue;
            }
            if let Some(s) = skip {
                if is_under(&c.path, s) {
                    continue;
                }
                skip = None;
            }
            if replaced.iter().any(|r| c.path == *r || is_under(&c.path, r)) {
                continue;
            }
            while deleting.last().is_some_and(|d| !is_under(&c.path, d)) {
                deleting.pop();
            }
            if sel_paths.contains(c.path.as_str()) {
                continue;
            }
            let dir = c.kind == Kind::Dir;
            let inside = !deleting.is_empty();
            let ok = if inside {
                filter.may_delete_within_deleted(&c.path, dir)
            } else {
                filter.may_delete(&c.path, dir) && master_parent_kept(&c.path, &sel_paths)
            };
            if ok {
                cand.push(c);
                if dir {
                    deleting.push(&c.path);
                }
            } else {
                // Keep it and every directory above it.
                let mut p = c.path.as_str();
                while let Some(i) = p.rfind('/') {
                    p = &p[..i];
                    kept.insert(p);
                }
                if dir {
                    skip = Some(&c.path);
                }
            }
        }
        let dels: Vec<&Entry> = cand.into_iter().filter(|c| !kept.contains(c.path.as_str())).collect();
        // One step per top-most deleted path (deepest first); an item for each.
        let mut tops: Vec<&Entry> = Vec::new();
        for c in &dels {
            let covered = tops
                .last()
                .is_some_and(|t| t.kind == Kind::Dir && is_under(&c.path, &t.path));
            if !covered {
                tops.push(c);
            }
        }
        for c in tops.iter().rev() {
            plan.ops.push(Op::Delete {
                path: c.path.clone(),
                dir: c.kind == Kind::Dir,
            });
        }
        for c in dels {
            plan.items.push(Item {
                itemize: "*deleting  ".into(),
                path: shown(&c.path, &c.kind),
                old: Some(Summary::of(c)),
                new: None,
                security: false,
            });
        }
    }

    dirmeta.sort_by(|a, b| path_order(&b.path, &a.path));
    for m in dirmeta {
        plan.ops.push(Op::DirMeta(m.clone()));
    }
    plan.items.sort_by(|a, b| path_order(a.path.trim_end_matches('/'), b.path.trim_end_matches('/')));
    plan
}

/// rsync deletes only inside directories it transfers: a child path whose parent the master
/// does not have (or excludes) is left alone.
fn master_parent_kept(path: &str, sel: &HashSet<&str>) -> bool {
    match path.rfind('/') {
        None => true,
        Some(i) => sel.contains(&path[..i]),
    }
}
