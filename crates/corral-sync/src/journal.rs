//! The undo journal of an in-place file update, and its recovery.
//!
//! Where the file system has no copy-on-write clones, rebuilding a 1 GiB image in a temporary
//! file to change 32 KiB of it writes 1 GiB. The receiver instead updates such a file in place
//! (see [`crate::apply`]) behind an undo journal:
//!
//! 1. the old bytes of every range about to be overwritten (and of the tail a shrink cuts
//!    off), with the old size, mode, owner, mtime and xattrs, are written to a journal file in
//!    [`DIR`] beneath the root, ending in a BLAKE3 checksum and a commit marker;
//! 2. the journal and its directory are synced;
//! 3. the new bytes are written into the file, its size and metadata set, the file synced;
//! 4. the journal is removed and the directory synced before the step counts as done.
//!
//! [`recover`] replays every journal it finds in [`DIR`]: the old bytes go back, so the file is
//! old again; then the journal is removed. The receiver runs it before its scan at the start of
//! every run (`corral sync serve`, local push), and `corral sync recover DEST` runs it alone.
//! A journal whose checksum or commit marker is wrong was torn by a crash while it was being
//! written, before the file was touched (step 3 starts only once the journal is durable), and
//! is removed without replay.
//!
//! So a run killed at any moment leaves every file old or new *after recovery*. Between the
//! crash and the next run (or `corral sync recover`), a file caught in step 3 can hold a mix of
//! old and new bytes.
//!
//! The journal is read back from disk, where anyone with root on the child can edit it; the
//! decoder checks every length and offset ([`MAX_EXTENT`], [`MAX_PATH`], ...), the path is
//! resolved beneath the root without following symlinks, and no extent may reach past the
//! old size it records.
//!
//! Format (integers little-endian): `CORRALJ1`, then the header (path, size u64, mode u32,
//! uid u32, gid u32, mtime i64, mtime_ns u32, xattr count u32 and each name/value with u32
//! lengths), then records (`1`, offset u64, length u32, bytes) ended by `0`, then the BLAKE3
//! of everything before it (32 bytes) and `COMMITTD`.

use std::io::{BufWriter, Read, Write};
use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// Directory beneath the root that holds pending journals (removed when empty).
pub const DIR: &str = ".corral-sync-journal";
/// Suffix of a journal file's name.
pub const SUFFIX: &str = ".journal";
/// Largest extent record (longer ranges are split into several records).
pub const MAX_EXTENT: u32 = 1 << 20;
/// Longest path a journal may name.
pub const MAX_PATH: usize = 4096;
/// Most xattrs a journal may record.
pub const MAX_XATTRS: usize = 1024;
/// Longest xattr name.
pub const MAX_XATTR_NAME: usize = 255;
/// Longest xattr value.
pub const MAX_XATTR_VALUE: usize = 64 * 1024;

const MAGIC: &[u8; 8] = b"CORRALJ1";
const COMMIT: &[u8; 8] = b"COMMITTD";
const TRAILER: u64 = 32 + 8;

/// The old state of a file, recorded before it is changed in place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Header {
    /// Path beneath the root.
    pub path: String,
    /// Old size.
    pub size: u64,
    /// Old mode (permission bits incl. setuid).
    pub mode: u32,
    /// Old owner.
    pub uid: u32,
    /// Old group.
    pub gid: u32,
    /// Old mtime, seconds.
    pub mtime: i64,
    /// Old mtime, nanoseconds.
    pub mtime_ns: u32,
    /// Old `user.*` and `system.posix_acl_*` xattrs.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Why a journal cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// No commit marker or a wrong checksum: torn while being written (the file was not
    /// touched) or edited.
    #[error("journal is not committed (torn or edited)")]
    NotCommitted,
    /// Committed but its content does not make sense.
    #[error("journal is corrupt: {0}")]
    Corrupt(&'static str),
    /// Reading or applying it failed.
    #[error("journal I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Old bytes at an offset, as recorded in a journal.
pub type Extent = (u64, Vec<u8>);

/// Called with each extent of a journal being parsed.
type Visit<'a> = dyn FnMut(&Header, u64, &[u8]) -> Result<(), JournalError> + 'a;

fn corrupt(what: &'static str) -> JournalError {
    JournalError::Corrupt(what)
}

/// Writes a journal: header, extents, then [`Writer::commit`].
pub struct Writer {
    out: BufWriter<std::fs::File>,
    hash: blake3::Hasher,
    /// Bytes written so far.
    pub bytes: u64,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl Writer {
    /// Starts a journal in the (new, empty) file `f`.
    pub fn new(f: OwnedFd, h: &Header) -> std::io::Result<Writer> {
        let mut w = Writer {
            out: BufWriter::with_capacity(1 << 20, std::fs::File::from(f)),
            hash: blake3::Hasher::new(),
            bytes: 0,
        };
        w.put(MAGIC)?;
        w.put(&(h.path.len() as u32).to_le_bytes())?;
        w.put(h.path.as_bytes())?;
        w.put(&h.size.to_le_bytes())?;
        w.put(&h.mode.to_le_bytes())?;
        w.put(&h.uid.to_le_bytes())?;
        w.put(&h.gid.to_le_bytes())?;
        w.put(&h.mtime.to_le_bytes())?;
        w.put(&h.mtime_ns.to_le_bytes())?;
        w.put(&(h.xattrs.len() as u32).to_le_bytes())?;
        for (k, v) in &h.xattrs {
            w.put(&(k.len() as u32).to_le_bytes())?;
            w.put(k)?;
            w.put(&(v.len() as u32).to_le_bytes())?;
            w.put(v)?;
        }
        Ok(w)
    }

    fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.hash.update(b);
        self.bytes += b.len() as u64;
        self.out.write_all(b)
    }

    /// Records the old bytes at `off` (split into records of at most [`MAX_EXTENT`]).
    pub fn extent(&mut self, mut off: u64, bytes: &[u8]) -> std::io::Result<()> {
        for piece in bytes.chunks(MAX_EXTENT as usize) {
            self.put(&[1])?;
            self.put(&off.to_le_bytes())?;
            self.put(&(piece.len() as u32).to_le_bytes())?;
            self.put(piece)?;
            off += piece.len() as u64;
        }
        Ok(())
    }

    /// Ends the journal with its checksum and commit marker; with `sync`, makes it durable.
    pub fn commit(mut self, sync: bool) -> std::io::Result<u64> {
        self.put(&[0])?;
        let sum = *self.hash.finalize().as_bytes();
        self.out.write_all(&sum)?;
        self.out.write_all(COMMIT)?;
        let f = self.out.into_inner().map_err(|e| e.into_error())?;
        if sync {
            f.sync_all()?;
        }
        Ok(self.bytes + TRAILER)
    }
}

/// Checks the checksum and commit marker of a journal of `len` bytes read from `r`.
fn verify<R: Read>(mut r: R, len: u64) -> Result<(), JournalError> {
    if len < MAGIC.len() as u64 + TRAILER {
        return Err(JournalError::NotCommitted);
    }
    let body = len - TRAILER;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut left = body;
    while left > 0 {
        let n = (left.min(buf.len() as u64)) as usize;
        r.read_exact(&mut buf[..n])?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    let mut t = [0u8; TRAILER as usize];
    r.read_exact(&mut t)?;
    if &t[32..] != COMMIT || t[..32] != *h.finalize().as_bytes() {
        return Err(JournalError::NotCommitted);
    }
    Ok(())
}

fn take<R: Read, const N: usize>(r: &mut R) -> Result<[u8; N], JournalError> {
    let mut b = [0u8; N];
    r.read_exact(&mut b).map_err(|_| corrupt("truncated"))?;
    Ok(b)
}

fn take_vec<R: Read>(r: &mut R, n: usize) -> Result<Vec<u8>, JournalError> {
    let mut b = vec![0u8; n];
    r.read_exact(&mut b).map_err(|_| corrupt("truncated"))?;
    Ok(b)
}

fn u32_of<R: Read>(r: &mut R) -> Result<u32, JournalError> {
    Ok(u32::from_le_bytes(take(r)?))
}

fn u64_of<R: Read>(r: &mut R) -> Result<u64, JournalError> {
    Ok(u64::from_le_bytes(take(r)?))
}

/// Parses a verified journal body: returns the header after handing each extent to `visit`
/// (in order; every extent lies within the recorded old size).
fn parse<R: Read>(mut r: R, body: u64, visit: &mut Visit<'_>) -> Result<Header, JournalError> {
    let mut r = (&mut r).take(body);
    if take::<_, 8>(&mut r)? != *MAGIC {
        return Err(corrupt("bad magic"));
    }
    let n = u32_of(&mut r)? as usize;
    if n == 0 || n > MAX_PATH {
        return Err(corrupt("path length"));
    }
    let path = String::from_utf8(take_vec(&mut r, n)?).map_err(|_| corrupt("path not UTF-8"))?;
    if !crate::manifest::check_rel_path(&path) {
        return Err(corrupt("path not beneath the root"));
    }
    let mut h = Header {
        path,
        size: u64_of(&mut r)?,
        mode: u32_of(&mut r)?,
        uid: u32_of(&mut r)?,
        gid: u32_of(&mut r)?,
        mtime: i64::from_le_bytes(take(&mut r)?),
        mtime_ns: u32_of(&mut r)?,
        xattrs: Vec::new(),
    };
    if h.mtime_ns >= 1_000_000_000 {
        return Err(corrupt("mtime nanoseconds"));
    }
    let nx = u32_of(&mut r)? as usize;
    if nx > MAX_XATTRS {
        return Err(corrupt("xattr count"));
    }
    for _ in 0..nx {
        let kn = u32_of(&mut r)? as usize;
        if kn == 0 || kn > MAX_XATTR_NAME {
            return Err(corrupt("xattr name length"));
        }
        let k = take_vec(&mut r, kn)?;
        if k.contains(&0) {
            return Err(corrupt("xattr name"));
        }
        let vn = u32_of(&mut r)? as usize;
        if vn > MAX_XATTR_VALUE {
            return Err(corrupt("xattr value length"));
        }
        let v = take_vec(&mut r, vn)?;
        h.xattrs.push((k, v));
    }
    let mut buf = Vec::new();
    loop {
        match take::<_, 1>(&mut r)?[0] {
            0 => break,
            1 => {}
            _ => return Err(corrupt("record tag")),
        }
        let off = u64_of(&mut r)?;
        let len = u32_of(&mut r)?;
        if len == 0 || len > MAX_EXTENT {
            return Err(corrupt("extent length"));
        }
        if off.checked_add(u64::from(len)).is_none_or(|e| e > h.size) {
            return Err(corrupt("extent beyond the old size"));
        }
        buf.resize(len as usize, 0);
        r.read_exact(&mut buf).map_err(|_| corrupt("truncated"))?;
        visit(&h, off, &buf)?;
    }
    if r.limit() != 0 {
        return Err(corrupt("bytes after the end record"));
    }
    Ok(h)
}

/// Decodes a whole journal held in memory: the header and its extents. This is what
/// [`replay`] checks before it touches a file (and the fuzz target's entry point).
pub fn decode(b: &[u8]) -> Result<(Header, Vec<Extent>), JournalError> {
    verify(b, b.len() as u64)?;
    let mut ext = Vec::new();
    let h = parse(b, b.len() as u64 - TRAILER, &mut |_, off, x| {
        ext.push((off, x.to_vec()));
        Ok(())
    })?;
    Ok((h, ext))
}

/// Appends the checksum and commit marker to a journal body (what [`Writer::commit`] does):
/// lets tests and the fuzz target hand [`decode`] bodies that pass the checksum.
pub fn seal(body: &[u8]) -> Vec<u8> {
    let mut b = body.to_vec();
    b.extend_from_slice(blake3::hash(body).as_bytes());
    b.extend_from_slice(COMMIT);
    b
}

fn beneath() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

fn pwrite_all(f: &impl AsFd, mut b: &[u8], mut off: u64) -> std::io::Result<()> {
    while !b.is_empty() {
        let n = rustix::io::pwrite(f, b, off)?;
        if n == 0 {
            return Err(std::io::Error::from(Errno::IO));
        }
        b = &b[n..];
        off += n as u64;
    }
    Ok(())
}

/// Sets a file's xattrs to exactly `want` (among `user.*` and `system.posix_acl_*`).
pub(crate) fn set_xattrs(p: &str, want: &[(Vec<u8>, Vec<u8>)]) -> std::io::Result<()> {
    for n in list_xattrs(p) {
        if !want.iter().any(|(k, _)| *k == n) {
            rustix::fs::removexattr(p, n.as_slice())?;
        }
    }
    for (k, v) in want {
        rustix::fs::setxattr(p, k.as_slice(), v, rustix::fs::XattrFlags::empty())?;
    }
    Ok(())
}

fn list_xattrs(p: &str) -> Vec<Vec<u8>> {
    let mut names = vec![0u8; 64 * 1024];
    match rustix::fs::listxattr(p, &mut names[..]) {
        Ok(n) => names[..n]
            .split(|b| *b == 0)
            .filter(|n| !n.is_empty())
            .filter(|n| crate::apply::managed_xattr(n))
            .map(<[u8]>::to_vec)
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// The `user.*` and `system.posix_acl_*` xattrs of the file at `p` (a `/proc/self/fd` path).
pub(crate) fn get_xattrs(p: &str) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    for n in list_xattrs(p) {
        let mut v = vec![0u8; MAX_XATTR_VALUE];
        let len = rustix::fs::getxattr(p, n.as_slice(), &mut v[..])?;
        v.truncate(len);
        out.push((n, v));
    }
    Ok(out)
}

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replayed {
    /// The file was put back to its old state.
    Restored(String),
    /// The journal was not committed (torn by a crash before the file was touched): removed.
    Torn,
    /// The file named by the journal no longer exists: journal removed.
    Gone(String),
}

/// Replays journal `name` in `jdir` onto the tree at `root`, then removes it (durably when
/// `sync`). Only a journal that verifies is applied; every extent is checked before the first
/// byte is written.
pub fn replay(
    root: &OwnedFd,
    jdir: &OwnedFd,
    name: &str,
    sync: bool,
) -> Result<Replayed, JournalError> {
    let j = rustix::fs::openat(
        jdir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(std::io::Error::from)?;
    let st = rustix::fs::fstat(&j).map_err(std::io::Error::from)?;
    if st.st_mode & 0o170000 != 0o100000 {
        return Err(corrupt("not a regular file"));
    }
    let len = st.st_size as u64;
    let mut f = std::fs::File::from(j);
    let done = |jdir: &OwnedFd| -> Result<(), JournalError> {
        rustix::fs::unlinkat(jdir, name, AtFlags::empty()).map_err(std::io::Error::from)?;
        if sync {
            rustix::fs::fsync(jdir).map_err(std::io::Error::from)?;
        }
        Ok(())
    };
    match verify(std::io::BufReader::new(&mut f), len) {
        Ok(()) => {}
        Err(JournalError::NotCommitted) => {
            done(jdir)?;
            return Ok(Replayed::Torn);
        }
        Err(e) => return Err(e),
    }
    // First pass: check every record without touching the file.
    use std::io::Seek;
    f.rewind()?;
    let h = parse(
        std::io::BufReader::new(&mut f),
        len - TRAILER,
        &mut |_, _, _| Ok(()),
    )?;
    let target = match rustix::fs::openat2(
        root,
        h.path.as_str(),
        OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
        beneath(),
    ) {
        Ok(t) => t,
        Err(Errno::NOENT) => {
            tracing::warn!(path = %h.path, "in-place journal names a file that is gone; removed");
            done(jdir)?;
            return Ok(Replayed::Gone(h.path));
        }
        Err(e) => return Err(std::io::Error::from(e).into()),
    };
    let tst = rustix::fs::fstat(&target).map_err(std::io::Error::from)?;
    if tst.st_mode & 0o170000 != 0o100000 {
        return Err(corrupt(
            "journal names something that is not a regular file",
        ));
    }
    f.rewind()?;
    parse(
        std::io::BufReader::new(&mut f),
        len - TRAILER,
        &mut |_, off, b| pwrite_all(&target, b, off).map_err(JournalError::Io),
    )?;
    let io = |e: Errno| JournalError::Io(e.into());
    rustix::fs::ftruncate(&target, h.size).map_err(io)?;
    let p = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&target));
    if rustix::process::geteuid().is_root() {
        rustix::fs::fchown(
            &target,
            Some(rustix::fs::Uid::from_raw(h.uid)),
            Some(rustix::fs::Gid::from_raw(h.gid)),
        )
        .map_err(io)?;
    }
    set_xattrs(&p, &h.xattrs)?;
    rustix::fs::fchmod(&target, Mode::from_raw_mode(h.mode & 0o7777)).map_err(io)?;
    rustix::fs::futimens(
        &target,
        &rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_OMIT,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: h.mtime,
                tv_nsec: h.mtime_ns.into(),
            },
        },
    )
    .map_err(io)?;
    if sync {
        rustix::fs::fsync(&target).map_err(io)?;
    }
    done(jdir)?;
    Ok(Replayed::Restored(h.path))
}

/// What [`recover`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RecoverReport {
    /// Files put back to their old state.
    pub restored: Vec<String>,
    /// Torn journals removed (their files had not been touched).
    pub torn: u64,
    /// Journals whose file was gone, removed.
    pub gone: Vec<String>,
}

/// Replays every journal left beneath `root` by a killed run, then removes the journal
/// directory. Fails (touching nothing further) on a journal that cannot be replayed: the run
/// must not go on to change a file that may be half-written.
pub fn recover(root: &OwnedFd, sync: bool) -> Result<RecoverReport, crate::SyncError> {
    let mut rep = RecoverReport::default();
    let fs = |op: &'static str, e: std::io::Error| crate::SyncError::fs(op, DIR, e);
    let jdir = match rustix::fs::openat2(
        root,
        DIR,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        beneath(),
    ) {
        Ok(d) => d,
        Err(Errno::NOENT) => return Ok(rep),
        Err(e) => return Err(fs("open journal directory", e.into())),
    };
    let mut names = Vec::new();
    for de in rustix::fs::Dir::read_from(&jdir).map_err(|e| fs("read", e.into()))? {
        let de = de.map_err(|e| fs("read", e.into()))?;
        let n = de.file_name().to_string_lossy().into_owned();
        if n.ends_with(SUFFIX) {
            names.push(n);
        }
    }
    names.sort();
    for n in names {
        match replay(root, &jdir, &n, sync) {
            Ok(Replayed::Restored(p)) => {
                tracing::warn!(path = %p, "interrupted in-place update rolled back to the old file");
                rep.restored.push(p);
            }
            Ok(Replayed::Torn) => rep.torn += 1,
            Ok(Replayed::Gone(p)) => rep.gone.push(p),
            Err(e) => {
                return Err(crate::SyncError::fs(
                    "replay journal",
                    format!("{DIR}/{n}"),
                    std::io::Error::other(e.to_string()),
                ));
            }
        }
    }
    remove_dir(root, sync);
    Ok(rep)
}

/// [`recover`] for the tree at `root`.
pub fn recover_path(root: &std::path::Path, sync: bool) -> Result<RecoverReport, crate::SyncError> {
    let fd = rustix::fs::open(
        root,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| crate::SyncError::fs("open root", root, e.into()))?;
    recover(&fd, sync)
}

/// Removes the journal directory if it is empty (a tree copied onward then carries no trace).
pub(crate) fn remove_dir(root: &OwnedFd, sync: bool) {
    if rustix::fs::unlinkat(root, DIR, AtFlags::REMOVEDIR).is_ok() && sync {
        let _ = rustix::fs::fsync(root);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(path: &str, size: u64) -> Header {
        Header {
            path: path.into(),
            size,
            mode: 0o640,
            uid: 0,
            gid: 0,
            mtime: 1_700_000_000,
            mtime_ns: 5,
            xattrs: vec![(b"user.k".to_vec(), b"v".to_vec())],
        }
    }

    fn write_journal(path: &std::path::Path, h: &Header, ext: &[(u64, Vec<u8>)]) -> u64 {
        let f = std::fs::File::create(path).unwrap();
        let mut w = Writer::new(f.into(), h).unwrap();
        for (o, b) in ext {
            w.extent(*o, b).unwrap();
        }
        w.commit(false).unwrap()
    }

    #[test]
    fn round_trip_and_split_extents() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("j");
        let big = vec![7u8; MAX_EXTENT as usize + 10];
        let h = header("a/b.img", 3 << 20);
        let n = write_journal(&p, &h, &[(5, b"hello".to_vec()), (1 << 20, big.clone())]);
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(n, bytes.len() as u64);
        let (got, ext) = decode(&bytes).unwrap();
        assert_eq!(got, h);
        assert_eq!(ext.len(), 3, "the long extent is split");
        assert_eq!(ext[0], (5, b"hello".to_vec()));
        assert_eq!(ext[1].0, 1 << 20);
        assert_eq!(ext[2].0, (1 << 20) + u64::from(MAX_EXTENT));
        assert_eq!([&ext[1].1[..], &ext[2].1[..]].concat(), big);
    }

    #[test]
    fn torn_or_edited_journals_are_not_committed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("j");
        write_journal(&p, &header("f", 100), &[(0, vec![1; 50])]);
        let bytes = std::fs::read(&p).unwrap();
        for cut in [0, 8, 20, bytes.len() - 41, bytes.len() - 8, bytes.len() - 1] {
            assert!(
                matches!(decode(&bytes[..cut]), Err(JournalError::NotCommitted)),
                "cut at {cut}"
            );
        }
        let mut edited = bytes.clone();
        edited[30] ^= 1;
        assert!(matches!(decode(&edited), Err(JournalError::NotCommitted)));
    }

    /// A committed journal with a valid checksum but hostile content is refused.
    fn sealed(body: &[u8]) -> Vec<u8> {
        seal(body)
    }

    #[test]
    fn hostile_committed_journals_are_refused() {
        let mut base = Vec::new();
        base.extend_from_slice(MAGIC);
        let head = |path: &[u8], size: u64| {
            let mut b = base.clone();
            b.extend_from_slice(&(path.len() as u32).to_le_bytes());
            b.extend_from_slice(path);
            b.extend_from_slice(&size.to_le_bytes());
            b.extend_from_slice(&[0; 4 + 4 + 4 + 8 + 4]);
            b.extend_from_slice(&0u32.to_le_bytes());
            b
        };
        let ext = |mut b: Vec<u8>, off: u64, len: u32, data: usize| {
            b.push(1);
            b.extend_from_slice(&off.to_le_bytes());
            b.extend_from_slice(&len.to_le_bytes());
            b.extend(std::iter::repeat_n(9u8, data));
            b
        };
        let ok = {
            let mut b = ext(head(b"f", 10), 0, 4, 4);
            b.push(0);
            b
        };
        assert!(decode(&sealed(&ok)).is_ok());
        let cases: Vec<Vec<u8>> = vec![
            [head(b"../etc/passwd", 10), vec![0]].concat(),
            [head(b"/etc/passwd", 10), vec![0]].concat(),
            [head(b"", 10), vec![0]].concat(),
            [ext(head(b"f", 10), 8, 4, 4), vec![0]].concat(),
            [ext(head(b"f", 10), u64::MAX, 4, 4), vec![0]].concat(),
            [ext(head(b"f", u64::MAX), 0, MAX_EXTENT + 1, 0), vec![0]].concat(),
            [ext(head(b"f", 10), 0, 4, 2)].concat(),
            [head(b"f", 10), vec![2]].concat(),
            [head(b"f", 10), vec![0, 0]].concat(),
            head(b"f", 10),
        ];
        for (i, c) in cases.iter().enumerate() {
            assert!(
                matches!(decode(&sealed(c)), Err(JournalError::Corrupt(_))),
                "case {i}"
            );
        }
    }

    proptest::proptest! {
        /// What the fuzz target `sync_journal` checks, on random bytes, raw and sealed.
        #[test]
        fn random_journals_never_panic_and_stay_in_bounds(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            prefix in proptest::prelude::any::<bool>(),
        ) {
            let mut b = Vec::new();
            if prefix {
                b.extend_from_slice(MAGIC);
            }
            b.extend_from_slice(&body);
            for data in [b.clone(), seal(&b)] {
                if let Ok((h, ext)) = decode(&data) {
                    proptest::prop_assert!(!h.path.is_empty());
                    for (off, x) in ext {
                        proptest::prop_assert!(off + x.len() as u64 <= h.size);
                    }
                }
            }
        }
    }

    fn root_fd(p: &std::path::Path) -> OwnedFd {
        rustix::fs::open(p, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap()
    }

    #[test]
    fn replay_puts_old_bytes_back_and_removes_the_journal() {
        let d = tempfile::tempdir().unwrap();
        let old: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        let f = d.path().join("sub/f");
        std::fs::write(&f, &old).unwrap();
        // The update: two ranges overwritten, the file grown.
        let jd = d.path().join(DIR);
        std::fs::create_dir(&jd).unwrap();
        let mut h = header("sub/f", old.len() as u64);
        h.xattrs.clear();
        write_journal(
            &jd.join(format!("1{SUFFIX}")),
            &h,
            &[
                (10, old[10..20].to_vec()),
                (50_000, old[50_000..60_000].to_vec()),
            ],
        );
        let mut new = old.clone();
        new[10..20].fill(0xee);
        new[50_000..60_000].fill(0xdd);
        new.extend_from_slice(&[1; 5000]);
        std::fs::write(&f, &new).unwrap();
        // A torn journal next to it.
        std::fs::write(jd.join(format!("2{SUFFIX}")), b"CORRALJ1 partial").unwrap();
        let root = root_fd(d.path());
        let rep = recover(&root, true).unwrap();
        assert_eq!(rep.restored, vec!["sub/f".to_string()]);
        assert_eq!(rep.torn, 1);
        assert_eq!(std::fs::read(&f).unwrap(), old);
        let md = std::fs::metadata(&f).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(md.mode() & 0o7777, 0o640);
        assert_eq!((md.mtime(), md.mtime_nsec()), (1_700_000_000, 5));
        assert!(!jd.exists(), "journal directory removed once empty");
        // Nothing left: a second recovery does nothing.
        assert_eq!(recover(&root, true).unwrap(), RecoverReport::default());
    }

    #[test]
    fn a_corrupt_committed_journal_stops_recovery_without_touching_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), b"0123456789").unwrap();
        let jd = d.path().join(DIR);
        std::fs::create_dir(&jd).unwrap();
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&1u32.to_le_bytes());
        b.push(b'f');
        b.extend_from_slice(&4u64.to_le_bytes());
        b.extend_from_slice(&[0; 24]);
        b.extend_from_slice(&0u32.to_le_bytes());
        // First extent fine, second beyond the old size: nothing may be written.
        for off in [0u64, 2] {
            b.push(1);
            b.extend_from_slice(&off.to_le_bytes());
            b.extend_from_slice(&3u32.to_le_bytes());
            b.extend_from_slice(b"XYZ");
        }
        b.push(0);
        std::fs::write(jd.join(format!("x{SUFFIX}")), sealed(&b)).unwrap();
        let root = root_fd(d.path());
        assert!(recover(&root, false).is_err());
        assert_eq!(std::fs::read(d.path().join("f")).unwrap(), b"0123456789");
        assert!(jd.join(format!("x{SUFFIX}")).exists(), "kept for a human");
    }

    #[test]
    fn a_journal_cannot_reach_outside_the_root() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join(DIR)).unwrap();
        std::fs::write(d.path().join("outside"), b"keep").unwrap();
        std::os::unix::fs::symlink(d.path().join("outside"), root.join("link")).unwrap();
        let mut h = header("link", 4);
        h.xattrs.clear();
        write_journal(
            &root.join(DIR).join(format!("l{SUFFIX}")),
            &h,
            &[(0, b"EVIL".to_vec())],
        );
        assert!(recover(&root_fd(&root), false).is_err());
        assert_eq!(std::fs::read(d.path().join("outside")).unwrap(), b"keep");
    }
}
