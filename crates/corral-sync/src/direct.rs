//! File data read and written past the page cache (`O_DIRECT`), for large files only.
//!
//! A full copy moves every byte of a tree through the page cache twice: the master reads
//! files it has not read before (the kernel reads them into cache pages, then copies them
//! into the reader's buffer) and the child writes files it did not have (copied into new
//! cache pages, written back later). On a virtual machine whose free memory goes back to its
//! host (a balloon, free page reporting) each of those fresh pages costs the guest a fault
//! in the host the first time it is touched: measured on this project's machines, a cold
//! buffered read of 2 GB spent 1.6-3.0 s of system time against 0.13-0.21 s with `O_DIRECT`,
//! and a full copy's child spent a seventh of all the copy's CPU copying into new cache
//! pages. With `O_DIRECT` the disk reads into and writes from a buffer of ours that stays
//! mapped. It also leaves the page cache to what the machines are for: a sync that reads a
//! master's whole tree or writes a child's does not evict their working sets.
//!
//! The rules: only ranges of at least [`DIRECT_MIN`] bytes (a small file's single
//! synchronous disk request would cost more than the copy it saves); a read goes direct only
//! when none of its range is cached (`cachestat(2)`, Linux 6.5: a warm file is read from
//! memory as before; without `cachestat`, reads stay buffered); a write sends its whole
//! aligned blocks direct and its unaligned head and tail buffered, and only the receiver's
//! files the child lacks are written so (a replaced file is part of the child's working set,
//! and the next run's signature request reads it back). Where a file system refuses
//! `O_DIRECT`, or `CORRAL_SYNC_DIRECT=0` is set, everything is buffered as before.
//! Durability is unchanged: the receiver's `syncfs` still flushes the device's cache and the
//! file's metadata before a file is given its name.
#![allow(unsafe_code)] // cachestat(2) has no safe wrapper (rustix and libc lack it); see `cached`.

use std::os::fd::{AsFd, AsRawFd};

use rustix::fs::OFlags;
use rustix::io::Errno;

/// The smallest range read or written direct.
pub(crate) const DIRECT_MIN: usize = 64 * 1024;

/// Alignment of direct I/O: offsets, lengths and buffer addresses (the largest logical block
/// size of the devices met here; 512-byte devices accept it as well).
const ALIGN: usize = 4096;

/// Whether direct I/O is on (`CORRAL_SYNC_DIRECT=0` turns it off), read once.
pub(crate) fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("CORRAL_SYNC_DIRECT").map_or(true, |v| v.trim() != "0"))
}

/// A buffer whose window starts at an [`ALIGN`]ed address, one per thread, kept for the
/// thread's life (its pages stay mapped: that is the point).
fn with_aligned<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < len + ALIGN {
            *b = vec![0u8; len + ALIGN];
        }
        let at = b.as_ptr().align_offset(ALIGN);
        f(&mut b[at..at + len])
    })
}

/// `struct cachestat_range` of `<linux/mman.h>`.
#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

/// `struct cachestat` of `<linux/mman.h>`.
#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// The number of `cachestat` in the system call table every Linux architecture has shared
/// since 5.1 (libc 0.2 names it for a few architectures only).
const SYS_CACHESTAT: libc::c_long = 451;

/// Whether any page of `fd` in `off..off + len` is in the page cache; `None` when the kernel
/// cannot say (before 6.5: `ENOSYS`).
fn cached(fd: impl AsFd, off: u64, len: u64) -> Option<bool> {
    static MISSING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if MISSING.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    let range = CachestatRange { off, len };
    let mut st = Cachestat::default();
    // SAFETY: cachestat(2) reads `range` and writes `st`, both live, properly laid out
    // (`repr(C)`, the kernel's field order) and exclusively borrowed for the call; the
    // descriptor is borrowed for the call as well.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            fd.as_fd().as_raw_fd(),
            &range as *const CachestatRange,
            &mut st as *mut Cachestat,
            0u32,
        )
    };
    if r != 0 {
        if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
            MISSING.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        return None;
    }
    Some(st.nr_cache > 0)
}

/// `O_DIRECT` set on `fd` for the life of the guard, its flags as they were afterwards
/// (`None`: the file system refuses it).
struct DirectGuard<'f, F: AsFd> {
    fd: &'f F,
    before: OFlags,
}

impl<'f, F: AsFd> DirectGuard<'f, F> {
    fn on(fd: &'f F) -> Option<Self> {
        let before = rustix::fs::fcntl_getfl(fd).ok()?;
        rustix::fs::fcntl_setfl(fd, before | OFlags::DIRECT).ok()?;
        Some(DirectGuard { fd, before })
    }
}

impl<F: AsFd> Drop for DirectGuard<'_, F> {
    fn drop(&mut self) {
        let _ = rustix::fs::fcntl_setfl(self.fd, self.before);
    }
}

/// Appends up to `want` bytes of `f` from offset `off` to `buf`, stopping early only at the
/// end of the file: past the page cache when the range is large and not cached, else
/// straight into the spare capacity, in as few `pread`s as the file allows (`read_to_end`
/// through `Take` starts at 8 KiB and doubles: seven reads for a 1 MiB chunk).
pub(crate) fn read_at_into(
    f: &std::fs::File,
    buf: &mut Vec<u8>,
    mut off: u64,
    want: usize,
) -> std::io::Result<()> {
    if read_direct_into(f, buf, off, want)? {
        return Ok(());
    }
    let end = buf.len() + want;
    buf.reserve_exact(want);
    while buf.len() < end {
        match rustix::io::pread(f, rustix::buffer::spare_capacity(buf), off) {
            Ok(0) => break,
            Ok(n) => off += n as u64,
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // The spare capacity may have held more than was wanted.
    buf.truncate(end);
    Ok(())
}

/// Appends `want` bytes of `f` from `off` to `buf` (fewer at the end of the file) with a
/// direct read, when the range is large enough and none of it is cached. `Ok(false)`: not
/// done, nothing appended (read it buffered).
fn read_direct_into(
    f: &impl AsFd,
    buf: &mut Vec<u8>,
    off: u64,
    want: usize,
) -> std::io::Result<bool> {
    read_with(f, off, want, |b| buf.extend_from_slice(b))
}

/// Fills `out` from `f` at `off` (fewer bytes at the end of the file) with a direct read
/// under the same rules; `None`: not done (read it buffered).
pub(crate) fn read_at(f: &impl AsFd, out: &mut [u8], off: u64) -> std::io::Result<Option<usize>> {
    let mut n = 0;
    let went = read_with(f, off, out.len(), |b| {
        out[..b.len()].copy_from_slice(b);
        n = b.len();
    })?;
    Ok(went.then_some(n))
}

/// A direct read of `want` bytes from `off` (fewer at the end of the file), handed to `sink`
/// from the thread's aligned buffer; `Ok(false)` without a call when it is not for direct I/O.
fn read_with(
    f: &impl AsFd,
    off: u64,
    want: usize,
    sink: impl FnOnce(&[u8]),
) -> std::io::Result<bool> {
    if want < DIRECT_MIN || !enabled() || cached(f, off, want as u64) != Some(false) {
        return Ok(false);
    }
    let Some(_direct) = DirectGuard::on(f) else {
        return Ok(false);
    };
    let start = off & !(ALIGN as u64 - 1);
    let skip = (off - start) as usize;
    let len = (skip + want).next_multiple_of(ALIGN);
    with_aligned(len, |b| {
        let mut got = 0;
        while got < len {
            match rustix::io::pread(f, &mut b[got..], start + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(Errno::INTR) => continue,
                // Refused after all (an alignment the device does not take, a file system
                // that takes the flag but not the read): read it buffered.
                Err(Errno::INVAL) if got == 0 => return Ok(false),
                Err(e) => return Err(e.into()),
            }
            // The end of the file, within a block: a read from an unaligned offset would
            // be refused.
            if got % ALIGN != 0 {
                break;
            }
        }
        sink(&b[skip.min(got)..got.min(skip + want)]);
        Ok(true)
    })
}

/// Writes the whole [`ALIGN`]ed blocks of `data` (the bytes of `f` from `off`) direct, when
/// there are enough of them, and returns the part of `data` so written (empty when none):
/// the caller writes the rest, before and after it, buffered.
pub(crate) fn write_at(
    f: &impl AsFd,
    data: &[u8],
    off: u64,
) -> Result<std::ops::Range<usize>, Errno> {
    let head = ((ALIGN as u64 - off % ALIGN as u64) % ALIGN as u64) as usize;
    let whole = data.len().saturating_sub(head) & !(ALIGN - 1);
    if whole < DIRECT_MIN || !enabled() {
        return Ok(0..0);
    }
    let Some(_direct) = DirectGuard::on(f) else {
        return Ok(0..0);
    };
    let at = off + head as u64;
    let went = with_aligned(whole, |b| {
        b.copy_from_slice(&data[head..head + whole]);
        let mut done = 0;
        while done < whole {
            match rustix::io::pwrite(f, &b[done..], at + done as u64) {
                Ok(0) => return Err(Errno::IO),
                Ok(n) => done += n,
                Err(Errno::INTR) => {}
                // Refused after all: nothing written, all of it goes buffered.
                Err(Errno::INVAL) if done == 0 => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    })?;
    Ok(if went { head..head + whole } else { 0..0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| (i * 7919 % 251) as u8 ^ (i >> 12) as u8)
            .collect()
    }

    /// Evicts `path`'s pages (written back first) so that its reads are uncached.
    fn evict(path: &std::path::Path) {
        let f = std::fs::File::open(path).unwrap();
        f.sync_all().unwrap();
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    }

    /// Reads of every alignment and length, cached and not, return exactly the file's bytes
    /// of the range (fewer at its end), after what the buffer held.
    #[test]
    fn reads_return_the_range_whatever_its_alignment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let all = data(1_000_003);
        std::fs::write(&path, &all).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let mut direct = 0;
        for (off, want) in [
            (0u64, 1_000_003usize),
            (0, 1_000_004),
            (0, 65_536),
            (1, 65_536),
            (4095, 200_000),
            (4096, 131_072),
            (900_001, 200_000),
            (999_000, 70_000),
            (1_000_003, 70_000),
            (2_000_000, 70_000),
            (10, 100),
        ] {
            evict(&path);
            let mut buf = vec![7u8];
            let went = read_direct_into(&f, &mut buf, off, want).unwrap();
            if !went {
                // Not direct: nothing appended.
                assert_eq!(buf, [7], "{off} {want}");
                continue;
            }
            direct += 1;
            let s = (off as usize).min(all.len());
            let e = (s + want).min(all.len());
            assert_eq!(buf[0], 7);
            assert_eq!(&buf[1..], &all[s..e], "{off} {want}");
        }
        if cached(&f, 0, 0).is_none() {
            eprintln!("SKIPPED: no cachestat(2) here (Linux < 6.5): reads stay buffered");
        } else if direct == 0 {
            eprintln!("SKIPPED: this file system refuses O_DIRECT");
        } else {
            // The direct reads leave the file uncached; a cached range is read buffered.
            assert_eq!(cached(&f, 0, 0), Some(false));
            let _ = std::fs::read(&path).unwrap();
            let mut buf = Vec::new();
            assert!(!read_direct_into(&f, &mut buf, 0, 100_000).unwrap());
            assert!(buf.is_empty());
        }
        // Small ranges never go direct.
        evict(&path);
        assert!(!read_direct_into(&f, &mut Vec::new(), 0, DIRECT_MIN - 1).unwrap());
    }

    /// Writes of any length from aligned and unaligned offsets, their rest written
    /// buffered by the caller, leave the file holding exactly the data, the descriptor's
    /// flags as they were.
    #[test]
    fn writes_leave_exactly_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let mut direct = 0;
        for (off, n) in [
            (0u64, 1_000_003usize),
            (0, 65_536),
            (0, 65_535),
            (4096, 300_001),
            (100, 200_000),
            (100, 69_000),
            (5000, 3000),
        ] {
            let path = dir.path().join(format!("w{off}-{n}"));
            let f = std::fs::File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .unwrap();
            let flags = rustix::fs::fcntl_getfl(&f).unwrap();
            let d = data(n);
            let r = write_at(&f, &d, off).unwrap();
            if r.is_empty() {
                assert_eq!(r, 0..0);
            } else {
                direct += 1;
                assert!(r.len() >= DIRECT_MIN && r.len() % ALIGN == 0, "{r:?}");
                assert_eq!((off + r.start as u64) % ALIGN as u64, 0, "{r:?}");
            }
            for (s, e) in [(0, r.start), (r.end.max(r.start), n)] {
                let mut at = 0;
                while s + at < e {
                    at += rustix::io::pwrite(&f, &d[s + at..e], off + (s + at) as u64).unwrap();
                }
            }
            assert_eq!(rustix::fs::fcntl_getfl(&f).unwrap(), flags);
            let got = std::fs::read(&path).unwrap();
            assert_eq!(got.len() as u64, off + n as u64);
            assert!(got[..off as usize].iter().all(|b| *b == 0));
            assert_eq!(&got[off as usize..], &d[..], "{off} {n}");
        }
        if direct == 0 {
            eprintln!("SKIPPED: this file system refuses O_DIRECT: every write was buffered");
        }
    }
}
