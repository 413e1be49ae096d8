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
        x.iter()
            .filter(|(n, _)| is_acl(n) == acl)
            .cloned()
            .collect()
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

/// The master entries the filter transfers: an excluded directory excludes all below it. A
/// hard-link group whose first name is excluded is led by its first transferred name.
pub fn filtered(master: &Manifest, filter: &dyn PathFilter) -> Vec<Entry> {
    selected(master, filter)
        .into_iter()
        .map(|p| match p {
            Picked::Kept(e) => e.clone(),
            Picked::Led(e) => *e,
        })
        .collect()
}

/// A master entry the filter transfers: as it is, or (a hard link whose leader is
/// excluded) changed. A reference, not a copy: the 50,000 entries of a no-change run are
/// not copied (11 MB written, and as many pages faulted in, for nothing).
enum Picked<'m> {
    Kept(&'m Entry),
    Led(Box<Entry>),
}

impl std::ops::Deref for Picked<'_> {
    type Target = Entry;

    fn deref(&self) -> &Entry {
        match self {
            Picked::Kept(e) => e,
            Picked::Led(e) => e,
        }
    }
}

/// [`filtered`], borrowing the entries it keeps as they are (all but new hard-link leaders).
fn selected<'m>(master: &'m Manifest, filter: &dyn PathFilter) -> Vec<Picked<'m>> {
    let mut out: Vec<Picked<'m>> = Vec::with_capacity(master.entries.len());
    let mut excluded: Option<&str> = None;
    let mut dropped: HashSet<&str> = HashSet::new();
    // Excluded leader -> its first transferred name.
    let mut new_leader: std::collections::HashMap<&str, String> = std::collections::HashMap::new();
    for e in &master.entries {
        if let Some(x) = excluded {
            if is_under(&e.path, x) {
                dropped.insert(&e.path);
                continue;
            }
            excluded = None;
        }
        if e.path.is_empty() || filter.transfers(&e.path, e.kind == Kind::Dir) {
            let mut picked = Picked::Kept(e);
            if let Kind::Hardlink(t) = &e.kind
                && dropped.contains(t.as_str())
            {
                let mut e2 = e.clone();
                match new_leader.get(t.as_str()) {
                    Some(l) => e2.kind = Kind::Hardlink(l.clone()),
                    None => {
                        let leader = master.get(t);
                        e2.kind = Kind::File;
                        e2.content = leader.and_then(|l| l.content.clone());
                        if let Some(l) = leader {
                            e2.meta = l.meta.clone();
                        }
                        new_leader.insert(t.as_str(), e.path.clone());
                    }
                }
                picked = Picked::Led(Box::new(e2));
            }
            out.push(picked);
        } else {
            dropped.insert(&e.path);
            if e.kind == Kind::Dir {
                excluded = Some(&e.path);
            }
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
    let sel = selected(master, filter);
    // The child is the master itself (a no-change push: every range of the child matched
    // the master's, so the session plans the master against itself) and the filter keeps
    // every entry as it is: each entry meets itself, nothing differs and nothing is extra on
    // the child, so the plan is empty (what the full pass below finds, tested), without
    // 50,000 look-ups and comparisons.
    if std::ptr::eq(master, child)
        && sel.len() == master.entries.len()
        && sel.iter().all(|p| matches!(p, Picked::Kept(_)))
    {
        return Plan::default();
    }
    plan_selected(&sel, &child.entries, filter, opts)
}

/// [`plan`] against a child manifest given as its entries in manifest order, borrowed from
/// wherever they are (the master's session rebuilds the child's manifest from the master's
/// own entries and the few the child listed, without copying 50,000 entries).
pub fn plan_over<T: std::borrow::Borrow<Entry>>(
    master: &Manifest,
    child: &[T],
    filter: &dyn PathFilter,
    opts: &PlanOptions,
) -> Plan {
    let sel = selected(master, filter);
    plan_selected(&sel, child, filter, opts)
}

fn plan_selected<T: std::borrow::Borrow<Entry>>(
    sel: &[Picked<'_>],
    child: &[T],
    filter: &dyn PathFilter,
    opts: &PlanOptions,
) -> Plan {
    let sel: Vec<&Entry> = sel.iter().map(|e| &**e).collect();
    // Path look-ups in both manifests go forward in manifest order: one pass each instead of
    // a hash or a binary search per path (50,000 paths on a no-change run).
    let mut sel_paths = Members::of(&sel);
    let mut child_at = Cursor::new(child);
    let mut plan = Plan::default();
    let mut dirmeta = Vec::new();
    // Files whose inode is replaced in this run: their hard links must be redone.
    let mut rewritten: HashSet<&str> = HashSet::new();
    // Child paths removed by a Replace (recursively).
    let mut replaced: Vec<&str> = Vec::new();
    let mut child_get = |p: &str, replaced: &[&str]| {
        if replaced.iter().any(|r| p == *r || is_under(p, r)) {
            None
        } else {
            child_at.find(p)
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
        // The child's summary is made only for the entries that get an item (on a no-change
        // run, none: no hex of 50,000 hashes).
        let old = || c.map(Summary::of);
        let mut d = c.map_or_else(Diff::default, |c| {
            meta_diff(&m.meta, &c.meta, opts, &m.kind)
        });
        let push_item = |plan: &mut Plan, y: char, d: &Diff, new: bool| {
            let old = old();
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
                old,
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
                        old: old(),
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
        for c in child.iter().map(std::borrow::Borrow::borrow) {
            let c: &Entry = c;
            if c.path.is_empty() {
                continue;
            }
            if let Some(s) = skip {
                if is_under(&c.path, s) {
                    continue;
                }
                skip = None;
            }
            if replaced
                .iter()
                .any(|r| c.path == *r || is_under(&c.path, r))
            {
                continue;
            }
            while deleting.last().is_some_and(|d| !is_under(&c.path, d)) {
                deleting.pop();
            }
            if sel_paths.contains(&c.path) {
                continue;
            }
            let dir = c.kind == Kind::Dir;
            let inside = !deleting.is_empty();
            let ok = if inside {
                filter.may_delete_within_deleted(&c.path, dir)
            } else {
                filter.may_delete(&c.path, dir) && master_parent_kept(&c.path, &mut sel_paths)
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
        let dels: Vec<&Entry> = cand
            .into_iter()
            .filter(|c| !kept.contains(c.path.as_str()))
            .collect();
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

    // A directory whose entries this plan adds, replaces or removes gets a new mtime from
    // the file system: set its metadata again at the end, even if it matched before.
    let mut touched: HashSet<&str> = HashSet::new();
    for op in &plan.ops {
        if !matches!(op, Op::Meta(_) | Op::DirMeta(_)) {
            let p = op.path();
            touched.insert(p.rsplit_once('/').map_or("", |(d, _)| d));
        }
    }
    let have: HashSet<&str> = dirmeta.iter().map(|e| e.path.as_str()).collect();
    let extra: Vec<&Entry> = sel
        .iter()
        .filter(|e| {
            e.kind == Kind::Dir
                && touched.contains(e.path.as_str())
                && !have.contains(e.path.as_str())
        })
        .copied()
        .collect();
    dirmeta.extend(extra);
    dirmeta.sort_by(|a, b| path_order(&b.path, &a.path));
    for m in dirmeta {
        plan.ops.push(Op::DirMeta(m.clone()));
    }
    plan.items
        .sort_by(|a, b| path_order(a.path.trim_end_matches('/'), b.path.trim_end_matches('/')));
    plan
}

/// rsync deletes only inside directories it transfers: a child path whose parent the master
/// does not have (or excludes) is left alone.
fn master_parent_kept(path: &str, sel: &mut Members<'_>) -> bool {
    match path.rfind('/') {
        None => true,
        Some(i) => sel.contains(&path[..i]),
    }
}

/// Finds paths in entries sorted in manifest order: a cursor moves forward for paths asked
/// in ascending order (one pass over the entries for a whole walk of the other manifest);
/// a path asked out of order is found by binary search.
struct Cursor<'a, T> {
    items: &'a [T],
    at: usize,
}

impl<'a, T: std::borrow::Borrow<Entry>> Cursor<'a, T> {
    fn new(items: &'a [T]) -> Self {
        Cursor { items, at: 0 }
    }
    fn path(&self, i: usize) -> &'a str {
        &self.items[i].borrow().path
    }
    /// The entry at `path`.
    fn find(&mut self, path: &str) -> Option<&'a Entry> {
        let n = self.items.len();
        if self.at > 0 && path_order(self.path(self.at - 1), path).is_ge() {
            let i = self
                .items
                .binary_search_by(|e| path_order(&e.borrow().path, path))
                .ok()?;
            return Some(self.items[i].borrow());
        }
        while self.at < n && path_order(self.path(self.at), path).is_lt() {
            self.at += 1;
        }
        (self.at < n && self.path(self.at) == path).then(|| self.items[self.at].borrow())
    }
}

/// The set of selected master paths: a [`Cursor`] when they are strictly in manifest order
/// (as a scanned manifest is), else a hash set.
enum Members<'a> {
    Sorted(Cursor<'a, &'a Entry>),
    Hashed(HashSet<&'a str>),
}

impl<'a> Members<'a> {
    fn of(sel: &'a [&'a Entry]) -> Self {
        if sel
            .windows(2)
            .all(|w| path_order(&w[0].path, &w[1].path).is_lt())
        {
            Members::Sorted(Cursor::new(sel))
        } else {
            Members::Hashed(sel.iter().map(|e| e.path.as_str()).collect())
        }
    }
    fn contains(&mut self, path: &str) -> bool {
        match self {
            Members::Sorted(c) => c.find(path).is_some(),
            Members::Hashed(h) => h.contains(path),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::manifest::{Content, Hash};

    /// Excludes (and so protects) every path with a component starting with `x`.
    struct NoX;
    impl PathFilter for NoX {
        fn transfers(&self, rel: &str, _d: bool) -> bool {
            !rel.rsplit('/').next().unwrap_or("").starts_with('x')
        }
        fn may_delete(&self, rel: &str, d: bool) -> bool {
            self.transfers(rel, d)
        }
    }

    fn meta(mode: u32, mtime: i64) -> Meta {
        Meta {
            mode,
            uid: 0,
            gid: 0,
            user: None,
            group: None,
            mtime,
            mtime_ns: 0,
            xattrs: vec![],
        }
    }

    /// Builds a manifest from (path components, kind, content, mode, mtime) choices.
    fn build(spec: Vec<(Vec<u8>, u8, u8, u8, u8)>) -> Manifest {
        let names = ["a", "b", "xa", "c"];
        let mut map: BTreeMap<String, (u8, u8, u8, u8)> = BTreeMap::new();
        for (comps, k, c, m, t) in spec {
            let parts: Vec<&str> = comps.iter().map(|i| names[*i as usize % 4]).collect();
            for i in 1..parts.len() {
                map.entry(parts[..i].join("/")).or_insert((3, 0, m, t));
            }
            map.entry(parts.join("/")).or_insert((k, c, m, t));
        }
        let paths: Vec<String> = map.keys().cloned().collect();
        let is_parent = |p: &str| paths.iter().any(|q| is_under(q, p));
        let mut m = Manifest {
            entries: vec![Entry {
                path: String::new(),
                kind: Kind::Dir,
                meta: meta(0o755, 1),
                content: None,
            }],
        };
        for (p, (k, c, md, t)) in map {
            let mode = [0o644, 0o755, 0o4755, 0o600][md as usize % 4];
            let mut kind = match k % 5 {
                _ if is_parent(&p) => Kind::Dir,
                0 | 4 => Kind::File,
                1 => Kind::Symlink(vec![b'a' + c % 3]),
                2 => Kind::Fifo,
                _ => Kind::Dir,
            };
            if k % 7 == 6 && kind == Kind::File {
                // A second name for the first regular file, if one precedes.
                let first = m
                    .entries
                    .iter()
                    .find(|e| e.kind == Kind::File)
                    .map(|e| e.path.clone());
                if let Some(f) = first {
                    kind = Kind::Hardlink(f);
                }
            }
            let content = (kind == Kind::File).then(|| Content {
                size: u64::from(c % 3),
                hash: Hash::of(&[c % 3]),
                chunks: vec![],
                sparse: false,
            });
            m.entries.push(Entry {
                path: p,
                kind,
                meta: meta(mode, i64::from(t % 3)),
                content,
            });
        }
        m.sort();
        m
    }

    fn remove_under(model: &mut BTreeMap<String, Entry>, p: &str) {
        model.retain(|k, _| k != p && !is_under(k, p));
    }

    fn apply(child: &Manifest, plan: &Plan) -> Result<BTreeMap<String, Entry>, String> {
        let mut model: BTreeMap<String, Entry> = child
            .entries
            .iter()
            .map(|e| (e.path.clone(), e.clone()))
            .collect();
        let parent_ok = |model: &BTreeMap<String, Entry>, p: &str| {
            let parent = p.rsplit_once('/').map_or("", |(d, _)| d);
            model.get(parent).is_some_and(|e| e.kind == Kind::Dir)
        };
        for op in &plan.ops {
            match op {
                Op::Replace { path } | Op::Delete { path, .. } => remove_under(&mut model, path),
                Op::Mkdir(e) | Op::Write(e) | Op::Special(e) => {
                    if !parent_ok(&model, &e.path) {
                        return Err(format!("{op:?}: no parent"));
                    }
                    if model.get(&e.path).is_some_and(|c| c.kind == Kind::Dir)
                        && e.kind != Kind::Dir
                    {
                        return Err(format!("{op:?}: a directory is in the way"));
                    }
                    let mut e = e.clone();
                    if let Op::Mkdir(_) = op {
                        e.meta = meta(0o700, 99);
                    }
                    model.insert(e.path.clone(), e);
                }
                Op::Link { path, target } => {
                    if !parent_ok(&model, path) {
                        return Err(format!("{op:?}: no parent"));
                    }
                    let t = model
                        .get(target)
                        .cloned()
                        .ok_or(format!("{op:?}: no target"))?;
                    model.insert(
                        path.clone(),
                        Entry {
                            path: path.clone(),
                            kind: Kind::Hardlink(target.clone()),
                            meta: t.meta,
                            content: None,
                        },
                    );
                }
                Op::Meta(e) | Op::DirMeta(e) => {
                    let c = model.get_mut(&e.path).ok_or(format!("{op:?}: missing"))?;
                    c.meta = e.meta.clone();
                }
            }
        }
        Ok(model)
    }

    fn spec() -> impl Strategy<Value = Vec<(Vec<u8>, u8, u8, u8, u8)>> {
        proptest::collection::vec(
            (
                proptest::collection::vec(0u8..4, 1..4),
                any::<u8>(),
                any::<u8>(),
                any::<u8>(),
                any::<u8>(),
            ),
            0..14,
        )
    }

    /// Transfers everything.
    struct All;
    impl PathFilter for All {
        fn transfers(&self, _rel: &str, _d: bool) -> bool {
            true
        }
        fn may_delete(&self, _rel: &str, _d: bool) -> bool {
            true
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        /// A manifest planned against itself (how a no-change push plans) gives the plan of
        /// the manifest against an equal copy: empty when the filter keeps everything, and
        /// the full plan when it leaves paths out or a hard link gets a new leader.
        #[test]
        fn a_manifest_against_itself_plans_as_against_a_copy(ms in spec()) {
            let master = build(ms);
            let copy = master.clone();
            for delete in [false, true] {
                let opts = PlanOptions { delete, ..PlanOptions::default() };
                let same = plan(&master, &master, &All, &opts);
                prop_assert!(same.ops.is_empty() && same.items.is_empty());
                prop_assert_eq!(same, plan(&master, &copy, &All, &opts));
                prop_assert_eq!(plan(&master, &master, &NoX, &opts), plan(&master, &copy, &NoX, &opts));
            }
        }

        /// After applying the plan the child equals the master, except excluded paths, which
        /// are neither sent nor deleted.
        #[test]
        fn applying_the_plan_makes_child_equal_master(ms in spec(), cs in spec()) {
            let master = build(ms);
            let child = build(cs);
            let opts = PlanOptions { delete: true, ..PlanOptions::default() };
            let p = plan(&master, &child, &NoX, &opts);
            let model = apply(&child, &p).map_err(TestCaseError::fail)?;
            let has_x = |p: &str| p.split('/').any(|c| c.starts_with('x'));
            // A directory the master lacks stays when it holds a protected path.
            let keeps_protected = |k: &str| master.get(k).is_none() && model.keys().any(|q| is_under(q, k) && has_x(q));
            let got: Vec<(&String, &Kind, Option<Hash>)> = model
                .iter()
                .filter(|(k, _)| !has_x(k) && !keeps_protected(k))
                .map(|(k, e)| (k, &e.kind, e.content.as_ref().map(|c| c.hash)))
                .collect();
            let sel = filtered(&master, &NoX);
            let want: Vec<(&String, &Kind, Option<Hash>)> = sel
                .iter()
                .filter(|e| !has_x(&e.path))
                .map(|e| (&e.path, &e.kind, e.content.as_ref().map(|c| c.hash)))
                .collect();
            prop_assert_eq!(got, want);
            for e in sel.iter().filter(|e| !has_x(&e.path)) {
                match e.kind {
                    Kind::Hardlink(_) => {}
                    // Linux symlinks have no permissions of their own.
                    Kind::Symlink(_) => prop_assert_eq!(
                        Meta { mode: 0, ..model[&e.path].meta.clone() },
                        Meta { mode: 0, ..e.meta.clone() },
                        "meta of {}", e.path
                    ),
                    _ => prop_assert_eq!(&model[&e.path].meta, &e.meta, "meta of {}", e.path),
                }
            }
            // Protected child paths survive (where their directory still exists).
            for e in child.entries.iter().filter(|e| has_x(&e.path)) {
                let parent = e.path.rsplit_once('/').map_or("", |(d, _)| d);
                let parent_is_master_dir = master.get(parent).is_some_and(|m| m.kind == Kind::Dir) || has_x(parent);
                if parent_is_master_dir && !has_x(parent) {
                    prop_assert!(model.contains_key(&e.path), "protected {} deleted", e.path);
                }
            }
            // A second plan has nothing left to do.
            let again = Manifest { entries: model.into_values().collect() };
            let mut again = again;
            again.sort();
            let p2 = plan(&master, &again, &NoX, &opts);
            prop_assert!(p2.is_empty(), "{:?}", p2.items);
        }
    }

    #[test]
    fn cursor_finds_paths_asked_in_and_out_of_order() {
        let e = |p: &str| Entry {
            path: p.into(),
            kind: Kind::Dir,
            meta: meta(0o755, 1),
            content: None,
        };
        let mut m = Manifest {
            entries: ["", "a", "a/b", "a/c", "a-b", "b", "b/x"]
                .into_iter()
                .map(e)
                .collect(),
        };
        m.sort();
        let mut c = Cursor::new(&m.entries);
        let found = |c: &mut Cursor<'_, Entry>, p: &str| c.find(p).map(|e| e.path.clone());
        // In order, with misses between hits.
        assert_eq!(found(&mut c, ""), Some(String::new()));
        assert_eq!(found(&mut c, "a/b"), Some("a/b".into()));
        assert_eq!(found(&mut c, "a/bb"), None);
        assert_eq!(found(&mut c, "a-b"), Some("a-b".into()));
        // Out of order (a parent after its child; the same path twice).
        assert_eq!(found(&mut c, "a"), Some("a".into()));
        assert_eq!(found(&mut c, "a-b"), Some("a-b".into()));
        assert_eq!(found(&mut c, "a/z"), None);
        // Forward again, to the end and past it.
        assert_eq!(found(&mut c, "b/x"), Some("b/x".into()));
        assert_eq!(found(&mut c, "c"), None);
        assert_eq!(found(&mut c, "b"), Some("b".into()));
        // A selection out of manifest order is looked up in a hash set, with the same answers.
        let refs: Vec<&Entry> = m.entries.iter().rev().collect();
        let mut h = Members::of(&refs);
        assert!(matches!(h, Members::Hashed(_)));
        let sorted: Vec<&Entry> = m.entries.iter().collect();
        let mut s = Members::of(&sorted);
        assert!(matches!(s, Members::Sorted(_)));
        for p in ["b/x", "a", "zz", "a/c", "", "a/b/c", "b"] {
            assert_eq!(h.contains(p), s.contains(p), "{p}");
            assert_eq!(s.contains(p), m.get(p).is_some(), "{p}");
        }
    }

    #[test]
    fn itemize_strings_look_like_rsync() {
        let mut a = Manifest::default();
        let mut b = Manifest::default();
        let f = |p: &str, size: u8, mode: u32, t: i64| Entry {
            path: p.into(),
            kind: Kind::File,
            meta: meta(mode, t),
            content: Some(Content {
                size: u64::from(size),
                hash: Hash::of(&[size]),
                chunks: vec![],
                sparse: false,
            }),
        };
        a.entries = vec![
            f("new", 1, 0o644, 1),
            f("same", 1, 0o644, 1),
            f("sz", 2, 0o644, 2),
            f("suid", 1, 0o4755, 1),
        ];
        b.entries = vec![
            f("gone", 1, 0o644, 1),
            f("same", 1, 0o644, 1),
            f("suid", 1, 0o755, 1),
            f("sz", 1, 0o644, 1),
        ];
        a.sort();
        b.sort();
        let p = plan(
            &a,
            &b,
            &crate::filter::IncludeAll,
            &PlanOptions {
                delete: true,
                ..Default::default()
            },
        );
        let lines: Vec<String> = p.items.iter().map(Item::line).collect();
        assert_eq!(
            lines,
            vec![
                "*deleting   gone",
                ">f+++++++++ new",
                ".f...p..... suid",
                ">fcst...... sz"
            ]
        );
        assert!(p.items.iter().find(|i| i.path == "suid").unwrap().security);
    }
}
