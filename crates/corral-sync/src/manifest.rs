//! The manifest: what a tree holds, entry by entry. Pure data, no file system access.

use serde::{Deserialize, Serialize};

/// A BLAKE3 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Hash {
        Hash(*blake3::hash(data).as_bytes())
    }
    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl std::fmt::Debug for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

/// One content-defined chunk of a large file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// Length in bytes.
    pub len: u32,
    /// BLAKE3 of the chunk's bytes.
    pub hash: Hash,
}

/// The content of a regular file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Content {
    /// Size in bytes.
    pub size: u64,
    /// BLAKE3 of the whole content.
    pub hash: Hash,
    /// Content-defined chunks (FastCDC) for files larger than [`CHUNK_THRESHOLD`]; empty for
    /// smaller files, which are one chunk (`size`, `hash`).
    pub chunks: Vec<Chunk>,
    /// The file has holes (allocated blocks < size): the receiver leaves zero blocks as holes.
    pub sparse: bool,
}

/// Files above this size are split into content-defined chunks.
pub const CHUNK_THRESHOLD: u64 = 1024 * 1024;

impl Content {
    /// The chunk list with offsets: one chunk for small files.
    pub fn chunk_list(&self) -> Vec<(u64, Chunk)> {
        self.chunk_iter().collect()
    }

    /// [`Content::chunk_list`] without allocating: the chunks with their offsets, one chunk
    /// (`size`, `hash`) for a small file, none for an empty one.
    pub fn chunk_iter(&self) -> impl Iterator<Item = (u64, Chunk)> + '_ {
        let whole = (self.chunks.is_empty() && self.size > 0).then(|| {
            (
                0,
                Chunk {
                    len: u32::try_from(self.size).unwrap_or(u32::MAX),
                    hash: self.hash,
                },
            )
        });
        let mut off = 0;
        whole.into_iter().chain(self.chunks.iter().map(move |c| {
            let o = off;
            off += u64::from(c.len);
            (o, *c)
        }))
    }
}

/// What kind of file system object an entry is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A regular file (the first path of a hard-link group).
    File,
    /// A directory.
    Dir,
    /// A symbolic link with its target bytes.
    Symlink(Vec<u8>),
    /// Another name for the regular file at this path (same inode on the master).
    Hardlink(String),
    /// A character device with its `rdev`.
    Char(u64),
    /// A block device with its `rdev`.
    Block(u64),
    /// A named pipe.
    Fifo,
}

impl Kind {
    /// rsync's itemize letter for this kind.
    pub fn letter(&self) -> char {
        match self {
            Kind::File | Kind::Hardlink(_) => 'f',
            Kind::Dir => 'd',
            Kind::Symlink(_) => 'L',
            Kind::Char(_) | Kind::Block(_) => 'D',
            Kind::Fifo => 'S',
        }
    }
}

/// Owner, permissions, times and extended attributes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    /// Numeric owner.
    pub uid: u32,
    /// Numeric group.
    pub gid: u32,
    /// Owner name, when the sender's system knows one.
    pub user: Option<String>,
    /// Group name, when the sender's system knows one.
    pub group: Option<String>,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds of the modification time.
    pub mtime_ns: u32,
    /// Extended attributes sorted by name, including `system.posix_acl_access` and
    /// `system.posix_acl_default` (POSIX ACLs).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

#[cfg(test)]
impl Meta {
    /// A regular file's metadata as unit tests use it: mode 0644, root's by number, no
    /// names, mtime 0, no attributes.
    pub(crate) fn test_file() -> Meta {
        Meta {
            mode: 0o644,
            uid: 0,
            gid: 0,
            user: None,
            group: None,
            mtime: 0,
            mtime_ns: 0,
            xattrs: vec![],
        }
    }
}

/// One path in a tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Path relative to the tree root, `/`-separated, no leading `/`; `""` is the root itself.
    pub path: String,
    /// The object's kind.
    pub kind: Kind,
    /// Its metadata.
    pub meta: Meta,
    /// Content of regular files (`Kind::File`).
    pub content: Option<Content>,
}

impl Entry {
    /// Size of the content (0 for anything but a regular file).
    pub fn size(&self) -> u64 {
        self.content.as_ref().map_or(0, |c| c.size)
    }
}

/// A whole tree, entries sorted by path (parents before children).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Entries sorted with [`path_order`].
    pub entries: Vec<Entry>,
}

/// The order of paths in a manifest: component by component, so that a directory's entries
/// follow it directly (`a`, `a/b`, `a.b` and not `a`, `a.b`, `a/b`).
///
/// This is the byte order of the paths with `/` taken as lower than every other byte (the
/// same order as comparing the components one by one, without splitting).
pub fn path_order(a: &str, b: &str) -> std::cmp::Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let same = common_prefix(a, b);
    // The end of a path sorts first, then `/`, then every other byte in byte order.
    let key = |c: Option<&u8>| c.map(|&c| if c == b'/' { 0u16 } else { u16::from(c) + 1 });
    key(a.get(same)).cmp(&key(b.get(same)))
}

/// The length of the longest common prefix of `a` and `b`, eight bytes at a time (the sorts,
/// merges and searches of 50,000 paths compare paths millions of times; a byte-at-a-time
/// loop was a third of their time).
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let (mut wa, mut wb) = (a[..n].chunks_exact(8), b[..n].chunks_exact(8));
    let mut at = 0;
    for (x, y) in (&mut wa).zip(&mut wb) {
        let x = u64::from_le_bytes(x.try_into().unwrap_or([0; 8]));
        let y = u64::from_le_bytes(y.try_into().unwrap_or([0; 8]));
        if x != y {
            // Little-endian: the lowest differing byte is the first.
            return at + ((x ^ y).trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    at + wa
        .remainder()
        .iter()
        .zip(wb.remainder())
        .take_while(|(x, y)| x == y)
        .count()
}

impl Manifest {
    /// Sorts the entries into manifest order.
    pub fn sort(&mut self) {
        self.entries.sort_by(|a, b| path_order(&a.path, &b.path));
    }
    /// The entry at `path`.
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.position(path).map(|i| &self.entries[i])
    }
    /// The index of the entry at `path` (the manifest sorted, [`Manifest::sort`]).
    pub fn position(&self, path: &str) -> Option<usize> {
        self.entries
            .binary_search_by(|e| path_order(&e.path, path))
            .ok()
    }
    /// Number of regular files and their total size.
    pub fn totals(&self) -> (u64, u64) {
        self.entries
            .iter()
            .filter(|e| e.kind == Kind::File)
            .fold((0, 0), |(n, s), e| (n + 1, s + e.size()))
    }
}

/// Checks that a path from an untrusted peer is a plain relative path: no empty, `.` or `..`
/// component, no leading `/`, no NUL. `""` (the root) is allowed.
pub fn check_rel_path(path: &str) -> bool {
    if path.is_empty() {
        return true;
    }
    !path.contains('\0')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_puts_children_after_parent() {
        let mut v = vec!["a.b", "a/b", "a", "", "a/b/c", "b"];
        v.sort_by(|a, b| path_order(a, b));
        assert_eq!(v, vec!["", "a", "a/b", "a/b/c", "a.b", "b"]);
    }

    /// The byte-wise order is the component-wise one, on paths made of separators and bytes
    /// on both sides of `/` in ASCII (`-`, `.`, `0`, `a`) and beyond it.
    #[test]
    fn order_matches_component_order() {
        let alphabet = ["", "/", "-", ".", "0", "a", "é", "a/b", "a.b", "a-b"];
        let mut paths = Vec::new();
        for x in alphabet {
            for y in alphabet {
                for z in alphabet {
                    paths.push(format!("{x}{y}{z}"));
                }
                // Long ones, past the first 8-byte words.
                paths.push(format!("usr/share/doc/{x}{y}"));
                paths.push(format!("usr/share/doc/x/{x}{y}"));
            }
        }
        // Paths that first differ at every place of an 8-byte word.
        let base = "0123456789abcdef/0123456789abcdef";
        for i in 0..base.len() {
            for c in ["/", ".", "z", ""] {
                paths.push(format!("{}{c}{}", &base[..i], &base[i..]));
                paths.push(format!("{}{c}", &base[..i]));
            }
        }
        for a in &paths {
            for b in &paths {
                assert_eq!(
                    path_order(a, b),
                    a.split('/').cmp(b.split('/')),
                    "{a:?} {b:?}"
                );
            }
        }
    }

    #[test]
    fn rel_paths() {
        assert!(check_rel_path(""));
        assert!(check_rel_path("a/b"));
        for bad in ["/a", "a/../b", "..", "a//b", "a/", "./a", "a\0b"] {
            assert!(!check_rel_path(bad), "{bad}");
        }
    }
}
