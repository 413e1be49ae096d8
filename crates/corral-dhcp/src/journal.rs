//! The lease journal: a preallocated ring of 4 KiB blocks beside the store, written in place.
//!
//! An ACK waits for one small write of its lease changes here, not for SQLite: each record is
//! written at a block boundary with `O_DSYNC` (and `O_DIRECT` where the file system allows it),
//! into a file that was filled with zeros and fsynced when it was created, so a write never
//! changes the file's size or block allocation and the disk has only the record's own blocks
//! to make durable (no file system journal commit, no WAL index, no checkpoint in the way).
//! The lease table in the store is brought up to date behind the journal (see
//! `persist.rs`); a block is written over only after the records in it are durable there.
//!
//! Blocks 0 and 1 hold the *base* (written alternately, each with its checksum): every record
//! below that sequence number is durable in the store. The applier writes it after each fsync
//! of the store, and only then may the blocks of those records be written over, so every
//! record at or above the highest valid base is still intact unless its own write was torn.
//! Records start at block [`FIRST_RECORD_BLOCK`].
//!
//! Record layout (little endian), starting at a block boundary and padded to whole blocks:
//!
//! | bytes | field |
//! |-------|-------|
//! | 0..4  | magic `CLJ1` |
//! | 4..8  | checksum: the first 4 bytes of BLAKE3 of bytes 8..32+len |
//! | 8..16 | sequence number (from 1, one more for each record) |
//! | 16..24| the base when the record was placed (informational) |
//! | 24..28| len: payload bytes |
//! | 28..32| number of lease changes in the payload |
//! | 32..  | the changes: tag 1 upsert (ip 4, mac 6, state 1, expires i64, updated i64, hostname u16 length, 0xFFFF for none, and its bytes), tag 2 remove (ip 4) |
//!
//! Replay ([`replay`]) reads the base, scans every record block, keeps the records whose
//! checksum holds, and applies, in sequence order, those at or above the base: older records,
//! whatever is left of a previous lap or run, are in the store already. A record torn by a
//! crash fails its checksum and is ignored; its write had not returned, so no ACK had left for
//! it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use corral_model::{MacAddr, UnixMillis};
use corral_store::{LeaseStatus, LeaseWrite, StoredLease};

/// The journal's unit of writing and of allocation.
pub(crate) const BLOCK: usize = 4096;
/// Blocks in the journal: 16 MiB, about two seconds of records at 5000 ACKs/s one per record,
/// while the store catches up every fraction of a second.
pub(crate) const BLOCKS: u64 = 4096;
/// Smallest journal accepted: a record of [`crate::MAX_BATCH`] changes with the longest host
/// names (about 72 blocks) must fit many times over.
pub(crate) const MIN_BLOCKS: u64 = 256;

const MAGIC: &[u8; 4] = b"CLJ1";
const BASE_MAGIC: &[u8; 4] = b"CLJB";
/// Blocks 0 and 1 hold the base; records start here.
pub(crate) const FIRST_RECORD_BLOCK: u64 = 2;
const HEADER: usize = 32;

/// The journal's path for the store at `db`.
pub(crate) fn path_for(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push("-leasejournal");
    PathBuf::from(p)
}

/// The open journal file.
#[derive(Debug)]
pub(crate) struct Journal {
    file: File,
    path: PathBuf,
    blocks: u64,
    direct: bool,
}

impl Journal {
    /// Opens the journal at `path` for writing, creating it (`blocks` blocks of zeros, fsynced,
    /// then renamed into place) if it is missing or has another size. Call after [`replay`]
    /// and after the replayed changes are durable in the store: a new journal starts empty.
    pub(crate) fn open(path: &Path, blocks: u64) -> std::io::Result<Journal> {
        let blocks = blocks.max(MIN_BLOCKS);
        let size = blocks * BLOCK as u64;
        if std::fs::metadata(path).map(|m| m.len()).ok() != Some(size) {
            create_zeroed(path, size)?;
        }
        let dsync = rustix::fs::OFlags::DSYNC.bits();
        let direct = rustix::fs::OFlags::DIRECT.bits();
        let open = |flags: u32| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(flags as i32)
                .open(path)
        };
        // O_DIRECT where the file system has it (not tmpfs): the record goes to the disk
        // without a page-cache copy, as one write that the device may complete with FUA.
        let (file, direct) = match open(dsync | direct) {
            Ok(f) => (f, true),
            Err(_) => (open(dsync)?, false),
        };
        Ok(Journal {
            file,
            path: path.to_path_buf(),
            blocks,
            direct,
        })
    }

    /// Blocks in the ring.
    pub(crate) fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Whether records are written with `O_DIRECT`.
    pub(crate) fn direct(&self) -> bool {
        self.direct
    }

    /// Writes `base` (every record below it is durable in the store) into header slot
    /// `slot % 2`; durable when it returns `Ok`. Alternate the slots, so that a torn write
    /// leaves the previous base readable.
    pub(crate) fn write_base(&self, slot: u64, base: u64) -> std::io::Result<()> {
        let mut buf = vec![0u8; 2 * BLOCK];
        let off = buf.as_ptr().align_offset(BLOCK).min(BLOCK);
        let b = &mut buf[off..off + BLOCK];
        b[0..4].copy_from_slice(BASE_MAGIC);
        b[8..16].copy_from_slice(&base.to_le_bytes());
        let sum = checksum(&b[8..16]);
        b[4..8].copy_from_slice(&sum.to_le_bytes());
        self.file
            .write_all_at(&buf[off..off + BLOCK], (slot % 2) * BLOCK as u64)
    }

    /// Writes `record` at block `block`; durable when it returns `Ok` (`O_DSYNC`).
    pub(crate) fn write_at(&self, block: u64, record: &Record) -> std::io::Result<()> {
        let end = block + record.blocks();
        if block < FIRST_RECORD_BLOCK || end > self.blocks {
            return Err(std::io::Error::other(format!(
                "{}: record of {} blocks at block {block} runs past the end ({} blocks)",
                self.path.display(),
                record.blocks(),
                self.blocks
            )));
        }
        self.file.write_all_at(record.bytes(), block * BLOCK as u64)
    }
}

fn create_zeroed(path: &Path, size: u64) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = File::create(&tmp)?;
        let zeros = vec![0u8; 1 << 20];
        let mut left = size;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            f.write_all(&zeros[..n])?;
            left -= n as u64;
        }
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// One encoded record, padded to whole blocks, in a block-aligned buffer (for `O_DIRECT`).
#[derive(Debug)]
pub(crate) struct Record {
    buf: Vec<u8>,
    off: usize,
    len: usize,
}

impl Record {
    /// Encodes `writes` as the record `seq` with base `base`.
    pub(crate) fn new(seq: u64, base: u64, writes: &[LeaseWrite]) -> Record {
        let payload = encode_writes(writes);
        let len = (HEADER + payload.len()).div_ceil(BLOCK) * BLOCK;
        let mut buf = vec![0u8; len + BLOCK];
        let off = buf.as_ptr().align_offset(BLOCK).min(BLOCK);
        let r = &mut buf[off..off + len];
        r[0..4].copy_from_slice(MAGIC);
        r[8..16].copy_from_slice(&seq.to_le_bytes());
        r[16..24].copy_from_slice(&base.to_le_bytes());
        r[24..28].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        r[28..32].copy_from_slice(&(writes.len() as u32).to_le_bytes());
        r[HEADER..HEADER + payload.len()].copy_from_slice(&payload);
        let sum = checksum(&r[8..HEADER + payload.len()]);
        r[4..8].copy_from_slice(&sum.to_le_bytes());
        Record { buf, off, len }
    }

    /// Blocks the record takes.
    pub(crate) fn blocks(&self) -> u64 {
        (self.len / BLOCK) as u64
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.off..self.off + self.len]
    }
}

/// What a journal held: the changes to apply to the store, in order.
#[derive(Debug, Default)]
pub(crate) struct Replayed {
    /// The highest sequence number found, or the base less one if that is higher (0 for an
    /// empty or missing journal).
    pub(crate) last_seq: u64,
    /// Records applied (from the newest record's base on).
    pub(crate) records: usize,
    /// Their changes, in sequence order.
    pub(crate) writes: Vec<LeaseWrite>,
}

/// Reads the journal at `path` (missing: nothing to replay).
pub(crate) fn replay(path: &Path) -> std::io::Result<Replayed> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Replayed::default()),
        Err(e) => return Err(e),
    };
    Ok(replay_bytes(&data))
}

/// The base in a header slot, if its checksum holds.
fn parse_base(b: &[u8]) -> Option<u64> {
    if b.get(0..4)? != BASE_MAGIC {
        return None;
    }
    let sum = u32::from_le_bytes(b.get(4..8)?.try_into().ok()?);
    let v = b.get(8..16)?;
    (checksum(v) == sum).then(|| u64::from_le_bytes(v.try_into().unwrap_or([0; 8])))
}

fn replay_bytes(data: &[u8]) -> Replayed {
    let base = (0..FIRST_RECORD_BLOCK as usize)
        .filter_map(|i| parse_base(data.get(i * BLOCK..)?))
        .max()
        .unwrap_or(0);
    let mut records: Vec<(u64, u64, Vec<LeaseWrite>)> = Vec::new();
    let mut at = FIRST_RECORD_BLOCK as usize * BLOCK;
    while at + HEADER <= data.len() {
        match parse(&data[at..]) {
            Some((seq, base, writes, len)) => {
                records.push((seq, base, writes));
                at += len.div_ceil(BLOCK) * BLOCK;
            }
            None => at += BLOCK,
        }
    }
    let last_seq = records
        .iter()
        .map(|r| r.0)
        .max()
        .unwrap_or(0)
        .max(base.saturating_sub(1));
    records.retain(|r| r.0 >= base);
    records.sort_by_key(|r| r.0);
    Replayed {
        last_seq,
        records: records.len(),
        writes: records.into_iter().flat_map(|r| r.2).collect(),
    }
}

/// One record at the start of `b`: (seq, base, changes, bytes including the header).
fn parse(b: &[u8]) -> Option<(u64, u64, Vec<LeaseWrite>, usize)> {
    if b.get(0..4)? != MAGIC {
        return None;
    }
    let u32_at =
        |i: usize| -> Option<u32> { Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?)) };
    let u64_at =
        |i: usize| -> Option<u64> { Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?)) };
    let sum = u32_at(4)?;
    let seq = u64_at(8)?;
    let base = u64_at(16)?;
    let len = usize::try_from(u32_at(24)?).ok()?;
    let count = u32_at(28)?;
    let end = HEADER.checked_add(len)?;
    if checksum(b.get(8..end)?) != sum || seq == 0 {
        return None;
    }
    let writes = decode_writes(&b[HEADER..end], count)?;
    Some((seq, base, writes, end))
}

fn state_code(s: LeaseStatus) -> u8 {
    match s {
        LeaseStatus::Offered => 0,
        LeaseStatus::Bound => 1,
        LeaseStatus::Expired => 2,
        LeaseStatus::Released => 3,
        LeaseStatus::Declined => 4,
    }
}

fn state_of(c: u8) -> Option<LeaseStatus> {
    Some(match c {
        0 => LeaseStatus::Offered,
        1 => LeaseStatus::Bound,
        2 => LeaseStatus::Expired,
        3 => LeaseStatus::Released,
        4 => LeaseStatus::Declined,
        _ => return None,
    })
}

/// Longest host name kept (DHCP's option 12 holds at most 255 bytes).
const MAX_HOSTNAME: usize = 0xFFFE;

fn encode_writes(writes: &[LeaseWrite]) -> Vec<u8> {
    let mut out = Vec::with_capacity(writes.len() * 48);
    for w in writes {
        match w {
            LeaseWrite::Upsert(l) => {
                out.push(1);
                out.extend_from_slice(&l.ip.octets());
                out.extend_from_slice(&l.mac.0);
                out.push(state_code(l.state));
                out.extend_from_slice(&l.expires.0.to_le_bytes());
                out.extend_from_slice(&l.updated.0.to_le_bytes());
                match &l.hostname {
                    None => out.extend_from_slice(&0xFFFFu16.to_le_bytes()),
                    Some(h) => {
                        let mut n = h.len().min(MAX_HOSTNAME);
                        while !h.is_char_boundary(n) {
                            n -= 1;
                        }
                        out.extend_from_slice(&(n as u16).to_le_bytes());
                        out.extend_from_slice(&h.as_bytes()[..n]);
                    }
                }
            }
            LeaseWrite::Remove(ip) => {
                out.push(2);
                out.extend_from_slice(&ip.octets());
            }
        }
    }
    out
}

fn decode_writes(mut b: &[u8], count: u32) -> Option<Vec<LeaseWrite>> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (h, t) = (b.get(..n)?, b.get(n..)?);
        *b = t;
        Some(h)
    }
    fn arr<const N: usize>(b: &mut &[u8]) -> Option<[u8; N]> {
        take(b, N)?.try_into().ok()
    }
    let mut out = Vec::with_capacity(count.min(4096) as usize);
    for _ in 0..count {
        let [tag] = arr::<1>(&mut b)?;
        let ip = Ipv4Addr::from(arr::<4>(&mut b)?);
        match tag {
            1 => {
                let mac = MacAddr(arr::<6>(&mut b)?);
                let [st] = arr::<1>(&mut b)?;
                let state = state_of(st)?;
                let expires = UnixMillis(i64::from_le_bytes(arr::<8>(&mut b)?));
                let updated = UnixMillis(i64::from_le_bytes(arr::<8>(&mut b)?));
                let n = u16::from_le_bytes(arr::<2>(&mut b)?);
                let hostname = if n == 0xFFFF {
                    None
                } else {
                    Some(String::from_utf8(take(&mut b, usize::from(n))?.to_vec()).ok()?)
                };
                out.push(LeaseWrite::Upsert(StoredLease {
                    ip,
                    mac,
                    state,
                    expires,
                    hostname,
                    updated,
                }));
            }
            2 => out.push(LeaseWrite::Remove(ip)),
            _ => return None,
        }
    }
    b.is_empty().then_some(out)
}

/// The record and header checksum: the first four bytes of the data's BLAKE3 hash (the
/// workspace's hash; a torn or stale block fails it, and no table of our own to get wrong).
fn checksum(data: &[u8]) -> u32 {
    let h = blake3::hash(data);
    let b = h.as_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(i: u8, host: Option<&str>) -> LeaseWrite {
        LeaseWrite::Upsert(StoredLease {
            ip: Ipv4Addr::new(10, 0, 0, i),
            mac: MacAddr([2, 0, 0, 0, 0, i]),
            state: LeaseStatus::Bound,
            expires: UnixMillis(1_000 + i64::from(i)),
            hostname: host.map(str::to_owned),
            updated: UnixMillis(7),
        })
    }

    /// Place records in an in-memory journal image as the writer would (`block` counts from
    /// the first record block).
    fn put(img: &mut [u8], block: usize, r: &Record) {
        let at = (FIRST_RECORD_BLOCK as usize + block) * BLOCK;
        img[at..at + r.bytes().len()].copy_from_slice(r.bytes());
    }

    /// An image of `blocks` record blocks with `base` in header slot `slot`, through a real
    /// journal file (so the header is what `write_base` writes).
    fn image_with_base(blocks: usize, slot: u64, base: u64) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let j = Journal::open(&p, MIN_BLOCKS).unwrap();
        j.write_base(slot, base).unwrap();
        let mut img = std::fs::read(&p).unwrap();
        img.truncate((FIRST_RECORD_BLOCK as usize + blocks) * BLOCK);
        img
    }

    #[test]
    fn checksum_is_blake3s_first_four_bytes() {
        // BLAKE3("abc") starts 6437b3ac.
        assert_eq!(
            checksum(b"abc"),
            u32::from_le_bytes([0x64, 0x37, 0xb3, 0xac])
        );
        assert_ne!(checksum(b"abc"), checksum(b"abd"));
    }

    #[test]
    fn records_round_trip_in_sequence_order() {
        let mut img = vec![0u8; 18 * BLOCK];
        let a = vec![
            up(1, Some("host-1")),
            LeaseWrite::Remove(Ipv4Addr::new(10, 0, 0, 9)),
        ];
        let b = vec![up(2, None), up(1, Some("é"))];
        // Written out of place order (a ring that wrapped): seq 2 before seq 1.
        put(&mut img, 0, &Record::new(2, 1, &b));
        put(&mut img, 5, &Record::new(1, 1, &a));
        let r = replay_bytes(&img);
        assert_eq!(r.last_seq, 2);
        assert_eq!(r.records, 2);
        let want: Vec<LeaseWrite> = a.into_iter().chain(b).collect();
        assert_eq!(r.writes, want);
    }

    /// Records below the durable base are in the store already: not replayed, whichever
    /// header slot holds the higher base; a torn header slot leaves the other one in force.
    #[test]
    fn records_below_the_base_are_skipped() {
        for slot in [0, 1] {
            let mut img = image_with_base(8, slot, 6);
            put(&mut img, 0, &Record::new(5, 1, &[up(5, None)]));
            put(&mut img, 1, &Record::new(6, 6, &[up(6, None)]));
            put(&mut img, 2, &Record::new(7, 6, &[up(7, None)]));
            let r = replay_bytes(&img);
            assert_eq!(r.last_seq, 7);
            assert_eq!(r.writes, vec![up(6, None), up(7, None)], "slot {slot}");
            // The slot torn: no base, everything replayed in order.
            img[slot as usize * BLOCK + 9] ^= 0xFF;
            let r = replay_bytes(&img);
            assert_eq!(r.records, 3, "slot {slot} torn");
        }
        // A base above every record (all of them in the store): nothing to replay, and new
        // records must be numbered from the base on.
        let img = image_with_base(8, 0, 40);
        let r = replay_bytes(&img);
        assert_eq!((r.records, r.last_seq), (0, 39));
    }

    /// A torn record (a crash in the middle of its write) fails its checksum and is ignored,
    /// whether the tear is in its header or its payload; the others are still found.
    #[test]
    fn a_torn_record_is_ignored() {
        let long: Vec<LeaseWrite> = (0..200)
            .map(|i| up(i as u8, Some("a-long-host-name-for-padding")))
            .collect();
        let rec = Record::new(2, 1, &long);
        assert!(rec.blocks() > 1);
        for tear in [10, BLOCK + 100] {
            let mut img = vec![0u8; 10 * BLOCK];
            put(&mut img, 0, &Record::new(1, 1, &[up(1, None)]));
            put(&mut img, 1, &rec);
            // The second block never reached the disk (or the header got garbage).
            img[(FIRST_RECORD_BLOCK as usize + 1) * BLOCK + tear] ^= 0xFF;
            let r = replay_bytes(&img);
            assert_eq!(r.last_seq, 1, "tear at {tear}");
            assert_eq!(r.writes, vec![up(1, None)]);
        }
    }

    /// Any bytes at all: no panic, and no record unless the checksum holds.
    #[test]
    fn garbage_never_panics() {
        let mut img = vec![0u8; 4 * BLOCK];
        let mut x = 0x1234_5678u32;
        for b in img.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        img[..4].copy_from_slice(BASE_MAGIC);
        let at = FIRST_RECORD_BLOCK as usize * BLOCK;
        img[at..at + 4].copy_from_slice(MAGIC);
        img[at + 24..at + 28].copy_from_slice(&u32::MAX.to_le_bytes());
        let r = replay_bytes(&img);
        assert_eq!((r.records, r.last_seq), (0, 0));
        assert!(parse(MAGIC).is_none());
        assert!(parse_base(BASE_MAGIC).is_none());
    }

    #[test]
    fn journal_is_preallocated_and_records_land_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let j = Journal::open(&p, MIN_BLOCKS).unwrap();
        let size = MIN_BLOCKS * BLOCK as u64;
        assert_eq!(std::fs::metadata(&p).unwrap().len(), size);
        j.write_at(3, &Record::new(1, 1, &[up(3, None)])).unwrap();
        j.write_at(MIN_BLOCKS - 1, &Record::new(2, 1, &[up(4, None)]))
            .unwrap();
        assert!(
            j.write_at(1, &Record::new(3, 1, &[up(5, None)])).is_err(),
            "over the header"
        );
        let past = Record::new(
            3,
            1,
            &(0..250).map(|i| up(i as u8, Some("x"))).collect::<Vec<_>>(),
        );
        assert!(j.write_at(MIN_BLOCKS - 1, &past).is_err(), "past the end");
        assert_eq!(std::fs::metadata(&p).unwrap().len(), size, "size unchanged");
        drop(j);
        let r = replay(&p).unwrap();
        assert_eq!(r.writes, vec![up(3, None), up(4, None)]);
        // Reopening keeps the file (and its records) when the size is right.
        let _j = Journal::open(&p, MIN_BLOCKS).unwrap();
        assert_eq!(replay(&p).unwrap().records, 2);
    }
}
