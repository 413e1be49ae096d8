//! Range digests: how the child tells the master what it holds without listing what the
//! master already has. Pure functions, no file system, no I/O.
//!
//! Both ends sort their entries in manifest order ([`crate::manifest::path_order`]) and cut
//! them into ranges at content-defined boundaries: a range starts at the first entry and at
//! every entry whose path hashes to 0 modulo `k` ([`is_boundary`]), so adding or removing a
//! path moves no boundary elsewhere. The master sends one [`Digest`] per range: the first 8
//! bytes of a BLAKE3 hash, keyed with a random key fresh for each run, over every field of
//! every entry of the range ([`encode`]: path, kind, size, hash, chunks, mode, owner, mtime,
//! xattrs — a superset of what the planner compares). The master
//! sends the key and `k` with its scan request, so the child sends the digests of its own
//! ranges as soon as it has scanned, without waiting for the master's. The master matches
//! them against its own ([`matching`]): a bitmap of its ranges the child holds exactly, and
//! the child's ranges it holds no copy of, whose full entries it asks for ([`listing`]; a
//! no-change run asks for none, and costs no round trip after the scans). The master rebuilds
//! the child's manifest from its own entries for the ranges the child holds and from the
//! listed ones ([`rebuild`]): the planner gets the child's manifest, entry for entry, so the
//! plan is the one a full listing gives.
//!
//! Why 8 bytes are enough: the key is chosen by the master per run and never stored, so
//! neither chance nor a prepared file on the child makes two different ranges agree with
//! probability better than 2⁻⁶⁴ per range; a child that lies on purpose could as well list
//! false entries, which no digest can prevent.

use std::collections::HashMap;

use rayon::prelude::*;

use crate::manifest::{Chunk, Content, Entry, Kind, Manifest, Meta, path_order};

/// A range digest: the first 8 bytes of a keyed BLAKE3 hash of the range's entries.
pub type Digest = [u8; 8];

/// Expected number of entries per range. Smaller ranges list fewer unchanged entries next to
/// a changed one but cost more digests: with `n` entries, `d` changed ones, 9 bytes per
/// digest and about 55 bytes per listed entry, the bytes are about `9n/k + 55d(2k - 1)` (a
/// changed entry falls in a range of `2k - 1` entries on average); with 1% changed that is
/// least near `k = 3`, and `k = 4` costs 7% more there and less when fewer entries changed.
pub const RANGE_K: u32 = 4;
/// Largest `k` accepted from a peer.
pub const MAX_K: u32 = 1 << 20;
/// Most range digests a master accepts from a child.
pub const MAX_RANGES: usize = 32 << 20;
/// Most entries a master accepts from a child's listing.
pub const MAX_LISTED: usize = 16 << 20;

/// An inconsistent or oversized answer from a child.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// The bitmap does not have one bit per master range.
    #[error("child's range bitmap has {got} bytes for {ranges} ranges")]
    BitmapLength {
        /// Bytes received.
        got: usize,
        /// The master's ranges.
        ranges: usize,
    },
    /// A listed path is also covered by a range the child says it holds, or is listed twice.
    #[error("child's listing does not match the ranges it claims to hold (at {0:?})")]
    Inconsistent(String),
    /// More entries than [`MAX_LISTED`].
    #[error("child listed more than {0} entries")]
    TooMany(usize),
    /// A `k` of 0 or over [`MAX_K`], or more digests than [`MAX_RANGES`].
    #[error("range parameters out of bounds: {0}")]
    Bounds(String),
}

/// Whether a range starts at `path` (the first entry always starts one).
pub fn is_boundary(path: &str, k: u32) -> bool {
    path_hash(path.as_bytes()).is_multiple_of(u64::from(k.max(1)))
}

/// The 64-bit hash that places range boundaries: the path 8 bytes at a time (the last word
/// padded with zeros, the length mixed in first), each word xored in and multiplied, then
/// SplitMix64's finaliser. Not keyed and not cryptographic, and need not be: a boundary only
/// decides where a range is cut, so paths that cut badly cost listing bytes, never a wrong
/// plan (the digests are keyed). Both ends must cut alike: this function is part of the
/// protocol ([`crate::proto::VERSION`]). BLAKE3 of each path cost 130 ns of the 10 ms a
/// 50,000-entry tree's digests took; this costs about 30.
pub fn path_hash(p: &[u8]) -> u64 {
    const M: u64 = 0xbf58_476d_1ce4_e5b9;
    let mut h = 0x9e37_79b9_7f4a_7c15 ^ p.len() as u64;
    let mut words = p.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(b)).wrapping_mul(M);
        h ^= h >> 29;
    }
    let rest = words.remainder();
    let mut b = [0u8; 8];
    b[..rest.len()].copy_from_slice(rest);
    h = (h ^ u64::from_le_bytes(b)).wrapping_mul(M);
    h ^= h >> 30;
    h = h.wrapping_mul(M);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Cuts sorted entries into ranges: start indices, one per range (in order).
pub fn cut(entries: &[Entry], k: u32) -> Vec<usize> {
    (0..entries.len())
        .filter(|&i| i == 0 || is_boundary(&entries[i].path, k))
        .collect()
}

/// Least ranges per rayon task in the digests (a no-change run of 50,000 entries waits for
/// both ends' digests: they are spread over the cores).
const PAR_MIN: usize = 256;

fn spans(starts: &[usize], len: usize) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    starts
        .iter()
        .enumerate()
        .map(move |(i, &s)| s..starts.get(i + 1).copied().unwrap_or(len))
}

/// The digest of a run of entries.
pub fn digest(key: &[u8; 32], entries: &[Entry]) -> Digest {
    digest_in(&mut Vec::new(), key, entries)
}

/// [`digest`] with a buffer to reuse: the entries' encodings are hashed in pieces of at
/// least 16 KiB (BLAKE3 hashes a long input several chunks at a time), the last at the end.
fn digest_in(buf: &mut Vec<u8>, key: &[u8; 32], entries: &[Entry]) -> Digest {
    let mut h = blake3::Hasher::new_keyed(key);
    buf.clear();
    for e in entries {
        encode(buf, e);
        if buf.len() >= 16 << 10 {
            h.update(buf);
            buf.clear();
        }
    }
    h.update(buf);
    let mut d = [0u8; 8];
    d.copy_from_slice(&h.finalize().as_bytes()[..8]);
    d
}

/// Appends what a digest hashes of one entry: every field of it, in declaration order,
/// unsigned integers as LEB128, signed ones zigzagged first, variable-length fields after
/// their length, an `Option` or enum after a tag byte, hashes as their 32 bytes. Each
/// entry's encoding ends where its fields say, so a run of them reads back one way only.
/// Written by hand: the postcard encoding it replaces (the same integers, through serde)
/// took half of a digest's time. Every field is named below, so a field added to an
/// [`Entry`] does not compile until it is hashed too.
pub fn encode(buf: &mut Vec<u8>, e: &Entry) {
    let Entry {
        path,
        kind,
        meta,
        content,
    } = e;
    bytes(buf, path.as_bytes());
    match kind {
        Kind::File => buf.push(0),
        Kind::Dir => buf.push(1),
        Kind::Symlink(t) => {
            buf.push(2);
            bytes(buf, t);
        }
        Kind::Hardlink(t) => {
            buf.push(3);
            bytes(buf, t.as_bytes());
        }
        Kind::Char(r) => {
            buf.push(4);
            uint(buf, *r);
        }
        Kind::Block(r) => {
            buf.push(5);
            uint(buf, *r);
        }
        Kind::Fifo => buf.push(6),
    }
    let Meta {
        mode,
        uid,
        gid,
        user,
        group,
        mtime,
        mtime_ns,
        xattrs,
    } = meta;
    uint(buf, u64::from(*mode));
    uint(buf, u64::from(*uid));
    uint(buf, u64::from(*gid));
    for name in [user, group] {
        match name {
            None => buf.push(0),
            Some(n) => {
                buf.push(1);
                bytes(buf, n.as_bytes());
            }
        }
    }
    uint(buf, ((*mtime << 1) ^ (*mtime >> 63)) as u64);
    uint(buf, u64::from(*mtime_ns));
    uint(buf, xattrs.len() as u64);
    for (name, value) in xattrs {
        bytes(buf, name);
        bytes(buf, value);
    }
    match content {
        None => buf.push(0),
        Some(Content {
            size,
            hash,
            chunks,
            sparse,
        }) => {
            buf.push(1);
            uint(buf, *size);
            buf.extend_from_slice(&hash.0);
            uint(buf, chunks.len() as u64);
            for Chunk { len, hash } in chunks {
                uint(buf, u64::from(*len));
                buf.extend_from_slice(&hash.0);
            }
            buf.push(u8::from(*sparse));
        }
    }
}

/// `v` as LEB128: seven bits a byte, low bits first, the high bit set on all but the last.
fn uint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push(v as u8 | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// A length, then the bytes.
fn bytes(buf: &mut Vec<u8>, b: &[u8]) {
    uint(buf, b.len() as u64);
    buf.extend_from_slice(b);
}

/// One digest per range of sorted entries (each end digests its own).
pub fn digests(key: &[u8; 32], entries: &[Entry], k: u32) -> Vec<Digest> {
    let starts = cut(entries, k);
    let ranges: Vec<std::ops::Range<usize>> = spans(&starts, entries.len()).collect();
    par_digests(key, entries, &ranges)
}

/// The digests of `ranges` of `entries`, in order, on rayon's pool.
fn par_digests(
    key: &[u8; 32],
    entries: &[Entry],
    ranges: &[std::ops::Range<usize>],
) -> Vec<Digest> {
    ranges
        .par_iter()
        .with_min_len(PAR_MIN)
        .map_init(
            || Vec::with_capacity(4096),
            |buf, r| digest_in(buf, key, &entries[r.clone()]),
        )
        .collect()
}

/// Which ranges the two ends share, from both ends' digests (each in its own range order):
/// a bitmap over the master's ranges (bit `i % 8` of byte `i / 8` set: the child holds master
/// range `i` exactly) and one over the child's ranges (bit set: a child range that matches no
/// master range, whose entries the master needs). Each master range matches at most one child
/// range, taken in the child's order.
pub fn matching(master: &[Digest], child: &[Digest]) -> (Vec<u8>, Vec<u8>) {
    let mut index: HashMap<Digest, usize> = HashMap::with_capacity(master.len());
    for (i, d) in master.iter().enumerate() {
        index.entry(*d).or_insert(i);
    }
    let mut held = vec![0u8; master.len().div_ceil(8)];
    let mut wanted = vec![0u8; child.len().div_ceil(8)];
    for (j, d) in child.iter().enumerate() {
        match index.remove(d) {
            Some(i) => held[i / 8] |= 1 << (i % 8),
            None => wanted[j / 8] |= 1 << (j % 8),
        }
    }
    (held, wanted)
}

/// A listed entry's chunk list is sent as chunk-range digests ([`chunk_digests`]) instead of
/// whole when it has at least this many chunks (36 bytes each whole: a 1 GiB image's list is
/// about half a megabyte, its digests a few kilobytes).
pub const CHUNK_DIGESTS_MIN: usize = 64;
/// Expected chunks per chunk range: a range starts at the first chunk and at every chunk
/// whose hash's first 8 bytes are 0 mod this.
pub const CHUNK_K: u64 = 16;

/// Where the ranges of a chunk list start (content-defined, as [`cut`] does for entries:
/// an inserted or removed chunk moves no boundary elsewhere).
pub fn chunk_cut(chunks: &[Chunk]) -> Vec<usize> {
    (0..chunks.len())
        .filter(|&i| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&chunks[i].hash.0[..8]);
            i == 0 || u64::from_le_bytes(w).is_multiple_of(CHUNK_K)
        })
        .collect()
}

/// The chunk-range digests of a chunk list: per range ([`chunk_cut`]), its number of chunks
/// and the first 8 bytes of the BLAKE3, keyed with the run's key, of its chunks' lengths and
/// hashes.
pub fn chunk_digests(key: &[u8; 32], chunks: &[Chunk]) -> Vec<(u32, Digest)> {
    let starts = chunk_cut(chunks);
    spans(&starts, chunks.len())
        .map(|r| {
            let mut h = blake3::Hasher::new_keyed(key);
            for c in &chunks[r.clone()] {
                h.update(&c.len.to_le_bytes());
                h.update(&c.hash.0);
            }
            let mut d = [0u8; 8];
            d.copy_from_slice(&h.finalize().as_bytes()[..8]);
            (r.len() as u32, d)
        })
        .collect()
}

/// The child's chunk list rebuilt from its chunk-range digests `theirs`: the ranges whose
/// digest (and count) one of `ours` (the master's list of the same path) has are the master's
/// chunks; the others, in order, come from `listed` (what the child sent of the ranges the
/// master marked in `wanted`, [`chunks_wanted`]). `None` when `listed` does not hold exactly
/// their chunks.
pub fn rebuild_chunks(
    key: &[u8; 32],
    ours: &[Chunk],
    theirs: &[(u32, Digest)],
    listed: &[Chunk],
) -> Option<Vec<Chunk>> {
    let known = known_chunk_ranges(key, ours);
    let mut out = Vec::new();
    let mut from_list = 0usize;
    for (n, d) in theirs {
        let n = *n as usize;
        match known.get(&(n, *d)) {
            Some(&start) => out.extend_from_slice(&ours[start..start + n]),
            None => {
                out.extend_from_slice(listed.get(from_list..from_list.checked_add(n)?)?);
                from_list += n;
            }
        }
    }
    (from_list == listed.len()).then_some(out)
}

/// The master's side: a bitmap of the child's chunk ranges (`theirs`) it has no copy of.
pub fn chunks_wanted(key: &[u8; 32], ours: &[Chunk], theirs: &[(u32, Digest)]) -> Vec<u8> {
    let known = known_chunk_ranges(key, ours);
    let mut bits = vec![0u8; theirs.len().div_ceil(8)];
    for (j, (n, d)) in theirs.iter().enumerate() {
        if !known.contains_key(&(*n as usize, *d)) {
            bits[j / 8] |= 1 << (j % 8);
        }
    }
    bits
}

/// The child's side: the chunks of the ranges of `chunks` that `wanted` marks, in order;
/// `None` when the bitmap does not have one bit per range.
pub fn chunks_listed(chunks: &[Chunk], wanted: &[u8]) -> Option<Vec<Chunk>> {
    let starts = chunk_cut(chunks);
    if wanted.len() != starts.len().div_ceil(8) {
        return None;
    }
    let mut out = Vec::new();
    for (j, r) in spans(&starts, chunks.len()).enumerate() {
        if wanted[j / 8] & (1 << (j % 8)) != 0 {
            out.extend_from_slice(&chunks[r]);
        }
    }
    Some(out)
}

/// The master's chunk ranges of `ours` by (count, digest): where each starts.
fn known_chunk_ranges(key: &[u8; 32], ours: &[Chunk]) -> HashMap<(usize, Digest), usize> {
    let starts = chunk_cut(ours);
    chunk_digests(key, ours)
        .into_iter()
        .zip(starts)
        .map(|((n, d), s)| ((n as usize, d), s))
        .collect()
}

/// The child's side: its entries of the ranges `wanted` names (a bitmap over the ranges of
/// its sorted entries cut with `k`, as [`matching`] makes it), in order. Refuses a `k` out of
/// bounds and a bitmap that does not have one bit per range.
pub fn listing(k: u32, child: &[Entry], wanted: &[u8]) -> Result<Vec<Entry>, RangeError> {
    if k == 0 || k > MAX_K {
        return Err(RangeError::Bounds(format!("k = {k}")));
    }
    let starts = cut(child, k);
    check_bitmap(wanted, starts.len())?;
    let mut listed = Vec::new();
    for (j, r) in spans(&starts, child.len()).enumerate() {
        if wanted[j / 8] & (1 << (j % 8)) != 0 {
            listed.extend_from_slice(&child[r]);
        }
    }
    Ok(listed)
}

/// Both steps of the child's part in one (for tests and fuzzing): given the master's digests,
/// the bitmap of the master's ranges the child holds and the child's entries of every other
/// range, in order. `child` must be sorted.
pub fn answer(
    key: &[u8; 32],
    k: u32,
    master: &[Digest],
    child: &[Entry],
) -> Result<(Vec<u8>, Vec<Entry>), RangeError> {
    if k == 0 || k > MAX_K {
        return Err(RangeError::Bounds(format!("k = {k}")));
    }
    if master.len() > MAX_RANGES {
        return Err(RangeError::Bounds(format!("{} digests", master.len())));
    }
    let (held, wanted) = matching(master, &digests(key, child, k));
    Ok((held, listing(k, child, &wanted)?))
}

/// Refuses a bitmap over `n` ranges that does not have exactly one bit per range (its length,
/// or a bit set past the `n`th).
fn check_bitmap(bits: &[u8], n: usize) -> Result<(), RangeError> {
    if bits.len() != n.div_ceil(8)
        || (!n.is_multiple_of(8) && bits.last().is_some_and(|b| b >> (n % 8) != 0))
    {
        return Err(RangeError::BitmapLength {
            got: bits.len(),
            ranges: n,
        });
    }
    Ok(())
}

/// Whether `bits` is the bitmap of a child that holds all of `n` ranges (every bit set, no
/// bit past the `n`th).
pub fn all_held(bits: &[u8], n: usize) -> bool {
    bits.len() == n.div_ceil(8)
        && bits.iter().enumerate().all(|(i, &b)| {
            let want = if (i + 1) * 8 <= n {
                0xff
            } else {
                (1u8 << (n % 8)) - 1
            };
            b == want
        })
}

/// The master's side: the child's manifest from the master's sorted entries, the child's
/// bitmap and its listed entries. Refuses a bitmap of the wrong length, a listing over
/// [`MAX_LISTED`], and a listing that contradicts the bitmap (a listed path inside a range
/// the child holds, or a path twice). (A copy of [`rebuild_refs`]'s answer.)
pub fn rebuild(
    master: &[Entry],
    k: u32,
    bits: &[u8],
    listed: Vec<Entry>,
) -> Result<Manifest, RangeError> {
    let entries = rebuild_refs(master, k, bits, &listed)?
        .into_iter()
        .cloned()
        .collect();
    Ok(Manifest { entries })
}

/// [`rebuild`] without copying an entry: the child's manifest as references into the
/// master's entries (the ranges the child holds) and the listed ones (copying 50,000 entries,
/// four allocations each, and sorting them took ~30 ms of a 1 %-changed run). The listed
/// entries are sorted and merged with the held ranges, which come in order when the
/// master's entries are strictly in order (as a scan makes them; otherwise all is sorted).
pub fn rebuild_refs<'a>(
    master: &'a [Entry],
    k: u32,
    bits: &[u8],
    listed: &'a [Entry],
) -> Result<Vec<&'a Entry>, RangeError> {
    let starts = cut(master, k);
    let n = starts.len();
    check_bitmap(bits, n)?;
    if listed.len() > MAX_LISTED {
        return Err(RangeError::TooMany(MAX_LISTED));
    }
    let in_order = master
        .windows(2)
        .all(|w| path_order(&w[0].path, &w[1].path).is_lt());
    // The child holds every range and lists nothing (a no-change run): its manifest is the
    // master's, as the general path below would rebuild it (master entries strictly in
    // order: no path twice).
    if listed.is_empty() && all_held(bits, n) && in_order {
        return Ok(master.iter().collect());
    }
    let held: Vec<std::ops::Range<usize>> = spans(&starts, master.len())
        .enumerate()
        .filter(|(i, _)| bits[i / 8] & (1 << (i % 8)) != 0)
        .map(|(_, r)| r)
        .collect();
    let held_len: usize = held.iter().map(|r| r.len()).sum();
    if listed.len() + held_len > MAX_LISTED.saturating_mul(2) {
        return Err(RangeError::TooMany(MAX_LISTED));
    }
    // (entry, the master range it comes from; None: listed by the child), in path order; on
    // a tie the listed entry first (then the check below refuses the path twice).
    let mut lst: Vec<(&Entry, Option<usize>)> = listed.iter().map(|e| (e, None)).collect();
    lst.sort_by(|a, b| path_order(&a.0.path, &b.0.path));
    let from_master = held
        .iter()
        .enumerate()
        .flat_map(|(i, r)| master[r.clone()].iter().map(move |e| (e, Some(i))));
    let mut all: Vec<(&Entry, Option<usize>)> = Vec::with_capacity(lst.len() + held_len);
    if in_order {
        let mut a = lst.into_iter().peekable();
        for m in from_master {
            while let Some(l) = a.next_if(|l| path_order(&l.0.path, &m.0.path).is_le()) {
                all.push(l);
            }
            all.push(m);
        }
        all.extend(a);
    } else {
        all.extend(lst);
        all.extend(from_master);
        all.sort_by(|a, b| path_order(&a.0.path, &b.0.path));
    }
    // Each held range must come out as one unbroken run of its own entries.
    let mut pos = 0;
    while pos < all.len() {
        if pos > 0 && all[pos - 1].0.path == all[pos].0.path {
            return Err(RangeError::Inconsistent(all[pos].0.path.clone()));
        }
        match all[pos].1 {
            Some(i) => {
                let len = held[i].len();
                let run = &all[pos..all.len().min(pos + len)];
                if let Some((e, _)) = run.iter().find(|(_, t)| *t != Some(i)) {
                    return Err(RangeError::Inconsistent(e.path.clone()));
                }
                if run.len() != len {
                    return Err(RangeError::Inconsistent(all[pos].0.path.clone()));
                }
                pos += len;
            }
            None => pos += 1,
        }
    }
    Ok(all.into_iter().map(|(e, _)| e).collect())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::filter::{IncludeAll, PathFilter};
    use crate::manifest::{Content, Hash, Kind, Meta};
    use crate::planner::{PlanOptions, plan};

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

    fn chunk_list(n: usize, seed: u8) -> Vec<Chunk> {
        (0..n)
            .map(|i| Chunk {
                len: 16_384 + i as u32,
                hash: Hash::of(&[seed, (i % 251) as u8, (i / 251) as u8]),
            })
            .collect()
    }

    #[test]
    fn a_chunk_list_comes_back_from_its_digests_and_the_ranges_that_differ() {
        let key = [9u8; 32];
        let ours = chunk_list(2000, 1);
        // The child's: two chunks changed, one inserted, a run removed.
        let mut theirs = ours.clone();
        theirs[100] = chunk_list(1, 7)[0];
        theirs[1500] = chunk_list(2, 8)[1];
        theirs.insert(800, chunk_list(3, 9)[2]);
        theirs.drain(1200..1210);
        let digests = chunk_digests(&key, &theirs);
        assert!(digests.len() > 50, "about one range per {CHUNK_K} chunks");
        let wanted = chunks_wanted(&key, &ours, &digests);
        let listed = chunks_listed(&theirs, &wanted).unwrap();
        assert!(
            listed.len() < 200,
            "only the ranges that differ: {}",
            listed.len()
        );
        assert_eq!(
            rebuild_chunks(&key, &ours, &digests, &listed).unwrap(),
            theirs
        );
        // Nothing in common (no file of that path on the master): all of it listed.
        let all = chunks_wanted(&key, &[], &digests);
        let listed_all = chunks_listed(&theirs, &all).unwrap();
        assert_eq!(listed_all, theirs);
        assert_eq!(
            rebuild_chunks(&key, &[], &digests, &listed_all).unwrap(),
            theirs
        );
        // A listing with a chunk too few or too many, or another key, does not rebuild it.
        assert!(rebuild_chunks(&key, &ours, &digests, &listed[1..]).is_none());
        let mut more = listed.clone();
        more.push(ours[0]);
        assert!(rebuild_chunks(&key, &ours, &digests, &more).is_none());
        assert_ne!(
            rebuild_chunks(&[8u8; 32], &ours, &digests, &listed),
            Some(theirs.clone())
        );
        // A bitmap of the wrong length is refused.
        assert!(chunks_listed(&theirs, &wanted[1..]).is_none());
    }

    fn meta(mode: u32, mtime: i64) -> Meta {
        Meta {
            mode,
            uid: 0,
            gid: 0,
            user: Some("root".into()),
            group: None,
            mtime,
            mtime_ns: 0,
            xattrs: vec![],
        }
    }

    fn file(path: &str, data: u8, mode: u32, mtime: i64) -> Entry {
        Entry {
            path: path.into(),
            kind: Kind::File,
            meta: meta(mode, mtime),
            content: Some(Content {
                size: 1 + u64::from(data % 2),
                hash: Hash::of(&[data]),
                chunks: vec![],
                sparse: false,
            }),
        }
    }

    /// A tree: the root, directories `d0`..`d3` (and `xd`, excluded by [`NoX`]) and files in
    /// them named by number (`x` files are excluded too).
    fn tree(files: &BTreeMap<String, (u8, u8, u8)>) -> Manifest {
        let mut m = Manifest::default();
        let mut dirs = std::collections::BTreeSet::new();
        dirs.insert(String::new());
        for (p, (data, mode, t)) in files {
            if let Some((d, _)) = p.rsplit_once('/') {
                dirs.insert(d.to_string());
            }
            let mode = [0o644, 0o755, 0o4755][*mode as usize % 3];
            let mut e = file(p, *data, mode, i64::from(*t));
            if data % 11 == 10 {
                e.kind = Kind::Symlink(vec![b'a' + data % 3]);
                e.content = None;
            }
            m.entries.push(e);
        }
        for d in dirs {
            m.entries.push(Entry {
                path: d,
                kind: Kind::Dir,
                meta: meta(0o755, 1),
                content: None,
            });
        }
        m.sort();
        m
    }

    fn path(d: u8, f: u16) -> String {
        let dir = ["d0", "d1", "d2", "d3", "xd"][d as usize % 5];
        if f.is_multiple_of(13) {
            format!("{dir}/x{f}")
        } else {
            format!("{dir}/f{f}")
        }
    }

    /// An edit of the master's files: 0 content, 1 mtime, 2 mode, 3 delete, 4 rename, 5 add.
    type Edit = (u8, usize, u8, u16);

    fn child_of(
        master: &BTreeMap<String, (u8, u8, u8)>,
        edits: &[Edit],
    ) -> BTreeMap<String, (u8, u8, u8)> {
        let mut c = master.clone();
        let keys: Vec<String> = master.keys().cloned().collect();
        for &(what, at, d, f) in edits {
            if keys.is_empty() {
                break;
            }
            let p = &keys[at % keys.len()];
            let Some(v) = c.get(p).copied() else { continue };
            match what % 6 {
                0 => drop(c.insert(p.clone(), (v.0.wrapping_add(1), v.1, v.2))),
                1 => drop(c.insert(p.clone(), (v.0, v.1, v.2.wrapping_add(1)))),
                2 => drop(c.insert(p.clone(), (v.0, v.1.wrapping_add(1), v.2))),
                3 => drop(c.remove(p)),
                4 => {
                    c.remove(p);
                    c.insert(path(d, f), v);
                }
                _ => drop(c.insert(path(d, f), (v.0, v.1, 7))),
            }
        }
        c
    }

    fn files() -> impl Strategy<Value = BTreeMap<String, (u8, u8, u8)>> {
        proptest::collection::btree_map(
            (0u8..5, 0u16..400).prop_map(|(d, f)| path(d, f)),
            (any::<u8>(), any::<u8>(), 0u8..3),
            0..120,
        )
    }

    fn exchange(master: &Manifest, child: &Manifest, k: u32) -> Manifest {
        let key = [7u8; 32];
        let ds = digests(&key, &master.entries, k);
        let (bits, listed) = answer(&key, k, &ds, &child.entries).unwrap();
        rebuild(&master.entries, k, &bits, listed).unwrap()
    }

    /// An entry with every field set (a file with chunks, names, xattrs, holes).
    fn full() -> Entry {
        Entry {
            path: "etc/ssl/cert.pem".into(),
            kind: Kind::File,
            meta: Meta {
                mode: 0o4755,
                uid: 1000,
                gid: 100,
                user: Some("alice".into()),
                group: Some("users".into()),
                mtime: -86_400,
                mtime_ns: 999_999_999,
                xattrs: vec![(b"user.a".to_vec(), b"1".to_vec())],
            },
            content: Some(Content {
                size: 3 << 20,
                hash: Hash::of(b"whole"),
                chunks: vec![
                    Chunk {
                        len: 1 << 20,
                        hash: Hash::of(b"c1"),
                    },
                    Chunk {
                        len: 2 << 20,
                        hash: Hash::of(b"c2"),
                    },
                ],
                sparse: true,
            }),
        }
    }

    /// The digest and the boundaries are part of the protocol: both ends must compute them
    /// alike, so these values only change with [`crate::proto::VERSION`].
    #[test]
    fn digests_and_boundaries_are_pinned() {
        assert_eq!(path_hash(b""), 0x5c47_22af_355e_9512);
        assert_eq!(path_hash(b"etc"), 0xb78e_0ba3_7ec6_233c);
        assert_eq!(
            path_hash(b"usr/share/doc/x/changelog.gz"),
            0xa74b_b4db_671b_4571
        );
        let mut e = full();
        let d1 = digest(&[9u8; 32], std::slice::from_ref(&e));
        e.kind = Kind::Symlink(b"../x".to_vec());
        e.content = None;
        let d2 = digest(&[9u8; 32], &[full(), e]);
        assert_eq!(d1, [247, 48, 198, 11, 192, 129, 80, 143]);
        assert_eq!(d2, [33, 35, 17, 71, 253, 91, 50, 203]);
        // The LEB128 and zigzag forms, byte for byte.
        let mut b = Vec::new();
        uint(&mut b, 0);
        uint(&mut b, 127);
        uint(&mut b, 128);
        uint(&mut b, u64::MAX);
        assert_eq!(
            b,
            [
                0, 127, 0x80, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1
            ]
        );
    }

    /// A range's digest is the keyed BLAKE3 of its entries' encodings one after another,
    /// however long the range (the encodings are hashed in pieces).
    #[test]
    fn a_digest_hashes_the_entries_encodings_in_order() {
        let key = [3u8; 32];
        let m = big(2000);
        let mut want = blake3::Hasher::new_keyed(&key);
        let mut all = Vec::new();
        for e in &m.entries {
            encode(&mut all, e);
        }
        assert!(
            all.len() > 40 << 10,
            "{} bytes: more than two pieces",
            all.len()
        );
        want.update(&all);
        assert_eq!(digest(&key, &m.entries), want.finalize().as_bytes()[..8]);
        assert_eq!(
            digest(&key, &[]),
            blake3::Hasher::new_keyed(&key).finalize().as_bytes()[..8]
        );
        assert_ne!(
            digest(&key, &m.entries[..39]),
            digest(&key, &m.entries[..40])
        );
    }

    /// Any one field changed changes the digest, and so does a byte moved from one
    /// variable-length field to the next (each is framed by its length).
    #[test]
    fn every_field_is_in_the_digest() {
        let key = [5u8; 32];
        let base = full();
        let d = |e: &Entry| digest(&key, std::slice::from_ref(e));
        type Edit = fn(&mut Entry);
        let edits: Vec<(&str, Edit)> = vec![
            ("path", |e| e.path.push('x')),
            ("kind dir", |e| e.kind = Kind::Dir),
            ("kind fifo", |e| e.kind = Kind::Fifo),
            ("kind char", |e| e.kind = Kind::Char(0)),
            ("kind block", |e| e.kind = Kind::Block(0)),
            ("hardlink", |e| e.kind = Kind::Hardlink(String::new())),
            ("symlink", |e| e.kind = Kind::Symlink(Vec::new())),
            ("mode", |e| e.meta.mode = 0o755),
            ("uid", |e| e.meta.uid = 0),
            ("gid", |e| e.meta.gid = 0),
            ("user", |e| e.meta.user = None),
            ("group", |e| e.meta.group = None),
            ("user name", |e| e.meta.user = Some("alicf".into())),
            ("mtime", |e| e.meta.mtime = 86_400),
            ("mtime sign", |e| e.meta.mtime = 86_399),
            ("mtime_ns", |e| e.meta.mtime_ns = 0),
            ("xattr value", |e| e.meta.xattrs[0].1 = b"2".to_vec()),
            ("xattr gone", |e| e.meta.xattrs.clear()),
            ("content", |e| e.content = None),
            ("size", |e| e.content.as_mut().unwrap().size += 1),
            ("hash", |e| {
                e.content.as_mut().unwrap().hash = Hash::of(b"other")
            }),
            ("chunk len", |e| {
                e.content.as_mut().unwrap().chunks[0].len += 1
            }),
            ("chunk hash", |e| {
                e.content.as_mut().unwrap().chunks[1].hash = Hash::of(b"c3")
            }),
            ("chunks", |e| e.content.as_mut().unwrap().chunks.clear()),
            ("sparse", |e| e.content.as_mut().unwrap().sparse = false),
            // A byte moved across a field boundary.
            ("path into user", |e| {
                e.path.pop();
                e.meta.user = Some("malice".into())
            }),
            ("xattr name into value", |e| {
                e.meta.xattrs[0] = (b"user.".to_vec(), b"a1".to_vec())
            }),
        ];
        let mut seen = std::collections::HashSet::from([d(&base)]);
        for (what, edit) in edits {
            let mut e = base.clone();
            edit(&mut e);
            assert_ne!(e, base, "{what}: the edit changed nothing");
            assert!(seen.insert(d(&e)), "{what}: digest unchanged or shared");
        }
        // Two entries are not one entry with the other's bytes appended.
        let two = [file("a", 1, 0o644, 1), file("b", 1, 0o644, 1)];
        assert_ne!(digest(&key, &two), digest(&key, &two[..1]));
    }

    /// Boundaries fall about once in `k` paths, over paths that differ in one character.
    #[test]
    fn boundaries_fall_once_in_k_paths() {
        for k in [2u32, 4, 16] {
            let n = 20_000u32;
            let hits = (0..n)
                .filter(|i| is_boundary(&format!("usr/lib/x86_64/lib{i}.so"), k))
                .count() as f64;
            let want = f64::from(n) / f64::from(k);
            assert!((hits - want).abs() < want * 0.1, "k {k}: {hits} of {n}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// The plan from the range exchange is the plan from the full manifest, for random
        /// trees with edits, deletes, renames and additions on the child, with and without
        /// `--delete` and a filter that excludes and protects paths.
        #[test]
        fn range_exchange_plans_like_the_full_manifest(
            m in files(),
            edits in proptest::collection::vec((any::<u8>(), any::<usize>(), 0u8..5, 0u16..400), 0..12),
            k in 1u32..9,
        ) {
            let master = tree(&m);
            let child = tree(&child_of(&m, &edits));
            let got = exchange(&master, &child, k);
            prop_assert_eq!(&got, &child);
            for delete in [false, true] {
                let opts = PlanOptions { delete, ..PlanOptions::default() };
                prop_assert_eq!(plan(&master, &got, &NoX, &opts), plan(&master, &child, &NoX, &opts));
                prop_assert_eq!(plan(&master, &got, &IncludeAll, &opts), plan(&master, &child, &IncludeAll, &opts));
            }
        }
    }

    fn big(n: usize) -> Manifest {
        let m: BTreeMap<String, (u8, u8, u8)> = (0..n)
            .map(|i| (path((i % 4) as u8, i as u16), (i as u8, 0, 1)))
            .collect();
        tree(&m)
    }

    #[test]
    fn equal_trees_list_nothing_and_one_edit_lists_one_range() {
        let master = big(2000);
        let key = [1u8; 32];
        let ds = digests(&key, &master.entries, RANGE_K);
        // About n/k ranges.
        let n = master.entries.len();
        assert!(ds.len() > n / 8 && ds.len() < n / 2, "{} ranges", ds.len());
        let (bits, listed) = answer(&key, RANGE_K, &ds, &master.entries).unwrap();
        assert!(listed.is_empty());
        assert_eq!(
            bits.iter().map(|b| b.count_ones()).sum::<u32>() as usize,
            ds.len()
        );
        assert!(all_held(&bits, ds.len()));
        assert!(!all_held(&bits[1..], ds.len()));
        let r = ds.len();
        let mut padded = vec![0xffu8; r.div_ceil(8)];
        assert_eq!(all_held(&padded, r), r.is_multiple_of(8));
        padded[0] = 0xfe;
        assert!(!all_held(&padded, r));
        assert!(all_held(&[0b111], 3) && !all_held(&[0b1111], 3) && !all_held(&[0b101], 3));
        assert!(all_held(&[], 0));
        // Every range held, nothing listed: the child's manifest is the master's.
        let got = rebuild(&master.entries, RANGE_K, &bits, listed).unwrap();
        assert_eq!(got, master);
        // One range not held and not listed: the child lacks those entries.
        let mut partial = bits.clone();
        partial[0] &= !1;
        let got = rebuild(&master.entries, RANGE_K, &partial, Vec::new()).unwrap();
        let first = cut(&master.entries, RANGE_K)[1];
        assert_eq!(got.entries, master.entries[first..]);
        // A same-size edit with the mtime put back changes only the content hash.
        let mut child = master.clone();
        let i = child
            .entries
            .iter()
            .position(|e| e.path == "d1/f5")
            .unwrap();
        child.entries[i].content.as_mut().unwrap().hash = Hash::of(b"edited");
        let (bits, listed) = answer(&key, RANGE_K, &ds, &child.entries).unwrap();
        assert!(listed.iter().any(|e| e.path == "d1/f5"));
        assert!(listed.len() < 40, "{} listed", listed.len());
        let got = rebuild(&master.entries, RANGE_K, &bits, listed).unwrap();
        assert_eq!(got, child);
        // Another key makes other digests: nothing matches.
        let (_, listed) = answer(&[2u8; 32], RANGE_K, &ds, &master.entries).unwrap();
        assert_eq!(listed.len(), n);
    }

    #[test]
    fn inserts_and_deletes_move_no_other_boundary() {
        let master = big(1000);
        let mut child = master.clone();
        child.entries.remove(500);
        child.entries.push(file("d2/new", 1, 0o644, 1));
        child.sort();
        let key = [3u8; 32];
        let ds = digests(&key, &master.entries, RANGE_K);
        let (_, listed) = answer(&key, RANGE_K, &ds, &child.entries).unwrap();
        assert!(listed.len() < 60, "{} listed", listed.len());
    }

    #[test]
    fn hostile_answers_are_refused() {
        let master = big(300);
        let key = [4u8; 32];
        let ds = digests(&key, &master.entries, RANGE_K);
        let (bits, _) = answer(&key, RANGE_K, &ds, &master.entries).unwrap();
        let short = &bits[..bits.len() - 1];
        assert!(matches!(
            rebuild(&master.entries, RANGE_K, short, vec![]),
            Err(RangeError::BitmapLength { .. })
        ));
        let mut extra = bits.clone();
        extra.push(1);
        assert!(rebuild(&master.entries, RANGE_K, &extra, vec![]).is_err());
        // Bits past the last range.
        if !ds.len().is_multiple_of(8) {
            let mut b = bits.clone();
            *b.last_mut().unwrap() = 0xff;
            assert!(rebuild(&master.entries, RANGE_K, &b, vec![]).is_err());
        }
        // A listed path inside a held range, or one the held ranges already have.
        let inside = master.entries[ds.len() / 2 + 3].clone();
        let e = rebuild(&master.entries, RANGE_K, &bits, vec![inside]).unwrap_err();
        assert!(matches!(e, RangeError::Inconsistent(_)), "{e}");
        // A path between two entries of a held range (one range: k is large).
        let one = tree(
            &[("d0/f1", 1), ("d0/f3", 1)]
                .iter()
                .map(|(p, d)| (p.to_string(), (*d, 0, 1)))
                .collect(),
        );
        let ds1 = digests(&key, &one.entries, MAX_K);
        assert_eq!(ds1.len(), 1);
        let (b1, l1) = answer(&key, MAX_K, &ds1, &one.entries).unwrap();
        assert_eq!((b1.clone(), l1.len()), (vec![1], 0));
        let e = rebuild(&one.entries, MAX_K, &b1, vec![file("d0/f2", 1, 0o644, 1)]).unwrap_err();
        assert!(
            matches!(e, RangeError::Inconsistent(ref p) if p == "d0/f2"),
            "{e}"
        );
        assert!(rebuild(&one.entries, MAX_K, &b1, vec![file("d0/f4", 1, 0o644, 1)]).is_ok());
        let dup = vec![master.entries[0].clone(), master.entries[0].clone()];
        assert!(rebuild(&master.entries, RANGE_K, &vec![0; bits.len()], dup).is_err());
        // Bad parameters from a master.
        assert!(answer(&key, 0, &ds, &master.entries).is_err());
        assert!(answer(&key, MAX_K + 1, &ds, &master.entries).is_err());
    }

    /// The child's manifest is put together by merging its listing (in whatever order it
    /// came) with the held ranges, and comes out as a full sort of both would: the same
    /// entries in manifest order, listed ones in the ranges the child does not hold.
    #[test]
    fn a_listing_in_any_order_merges_into_the_manifest() {
        let master = big(2000);
        let key = [5u8; 32];
        let ds = digests(&key, &master.entries, RANGE_K);
        let mut child = master.clone();
        for i in [100, 900, 1500] {
            let e = &mut child.entries[i];
            let h = Hash::of(e.path.as_bytes());
            e.content.as_mut().expect("a file").hash = h;
        }
        child.entries.push(file("d3/zz-new", 1, 0o644, 1));
        child.sort();
        let (bits, listed) = answer(&key, RANGE_K, &ds, &child.entries).unwrap();
        assert!(listed.len() > 3 && listed.len() < 200, "{}", listed.len());
        let got = rebuild_refs(&master.entries, RANGE_K, &bits, &listed).unwrap();
        assert!(got.iter().copied().eq(child.entries.iter()));
        let mut shuffled = listed.clone();
        shuffled.reverse();
        shuffled.swap(0, 1);
        let got = rebuild_refs(&master.entries, RANGE_K, &bits, &shuffled).unwrap();
        assert!(
            got.iter().copied().eq(child.entries.iter()),
            "a listing out of order"
        );
        assert_eq!(
            rebuild(&master.entries, RANGE_K, &bits, shuffled).unwrap(),
            child
        );
    }
}
