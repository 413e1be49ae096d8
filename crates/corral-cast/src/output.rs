//! Where a receiver writes the image.
//!
//! - A regular file is written at block offsets into `PATH.corral-part` (every block verified
//!   before it is written), checked against the image hash, fsynced, then renamed over `PATH`:
//!   a failed transfer never leaves a half-written file under the final name (UDPcast's FEC
//!   mode left a 0-byte file and reported success). A file system without room for the image's non-zero blocks is refused when the manifest
//!   arrives, before anything is written (zero blocks stay holes in a new file). The space of
//!   the non-zero blocks is then reserved (`fallocate`) by a low-priority thread while the
//!   first blocks arrive: the file system places the image in one go instead of block by
//!   block. Not on tmpfs, which has nothing to place and where the reservation only made the
//!   writes beside it dearer.
//! - A block device is written in place, never truncated, and refused if smaller than the image.
//! - stdout (`-`) and `--pipe CMD` get the blocks strictly in order; blocks that arrive early
//!   wait in memory until the gap before them is filled.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;

use crate::error::{CastError, io_at};
use crate::state::sync_dir;

/// What the user asked the image to be written to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputSpec {
    /// A regular file or a block device.
    Path(PathBuf),
    /// Standard output, in order.
    Stdout,
    /// The standard input of `sh -c CMD`, in order.
    Pipe(String),
}

impl OutputSpec {
    /// `-` means stdout; anything else a path.
    pub fn from_arg(s: &str) -> Self {
        if s == "-" {
            OutputSpec::Stdout
        } else {
            OutputSpec::Path(PathBuf::from(s))
        }
    }
}

/// A file or block device written at offsets.
#[derive(Debug)]
pub(crate) struct RandomSink {
    file: std::fs::File,
    /// Where the bytes go now (the `.corral-part` file, or the device).
    write_path: PathBuf,
    /// The final name, for a regular file (renamed on success).
    final_path: Option<PathBuf>,
    /// The thread reserving the image's space, while it runs.
    reserver: Option<Reserver>,
}

/// How much one `fallocate` call reserves: the file's lock is held for one call, so writes
/// of arriving blocks wait at most this long behind it.
const RESERVE_CHUNK: u64 = 8 << 20;

/// The nice value of the reserving thread: it takes CPU the receiver's own work leaves.
const RESERVE_NICE: i32 = 10;

/// A thread reserving space for byte ranges of a file, stopped and joined when dropped.
#[derive(Debug)]
struct Reserver {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reserver {
    fn start(file: std::fs::File, path: PathBuf, ranges: Vec<(u64, u64)>) -> Option<Reserver> {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("cast-reserve".into())
            .spawn(move || {
                let _ = rustix::process::setpriority_process(None, RESERVE_NICE);
                reserve(&file, &path, &ranges, &stopped);
            })
            .ok()?;
        Some(Reserver {
            stop,
            thread: Some(thread),
        })
    }
}

#[cfg(test)]
impl Reserver {
    /// Waits for the thread to reserve everything.
    fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Reserver {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reserves `ranges` of `file` chunk by chunk until done, stopped, or refused. Refusal is not
/// an error: a file system without `fallocate` allocates as blocks are written, and one
/// without room fails the write that finds none (after the room check at the start).
fn reserve(
    file: &std::fs::File,
    path: &Path,
    ranges: &[(u64, u64)],
    stop: &std::sync::atomic::AtomicBool,
) {
    for &(start, end) in ranges {
        let mut at = start;
        while at < end {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            let len = RESERVE_CHUNK.min(end - at);
            if let Err(e) =
                rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), at, len)
            {
                if e != rustix::io::Errno::OPNOTSUPP {
                    tracing::warn!(path = %path.display(), error = %e,
                        "cannot reserve the image's space; blocks are allocated as they are written");
                }
                return;
            }
            at += len;
        }
    }
    tracing::debug!(path = %path.display(), "image space reserved");
}

/// Whether `file` lives on tmpfs (or ramfs: also memory, also no placement to gain).
///
/// Measured on a 2-core guest, eight receivers writing 512 MiB images into tmpfs: the
/// reserving threads' `fallocate` took 17 % of the run's CPU and the receivers' writes
/// another 15 %, about 0.37 CPU-s per receiver, where a plain write of 512 MiB into tmpfs
/// costs 0.23-0.31 CPU-s (allocation included).
fn on_tmpfs(file: &std::fs::File) -> bool {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    const RAMFS_MAGIC: u64 = 0x8584_58f6;
    rustix::fs::fstatfs(file).is_ok_and(|st| {
        // `f_type`'s integer type differs between targets; the magic numbers fit in 32 bits.
        #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
        let t = (st.f_type as i64 as u64) & 0xffff_ffff;
        t == TMPFS_MAGIC || t == RAMFS_MAGIC
    })
}

/// The byte ranges of an image's blocks that are not zero, neighbours merged.
pub(crate) fn data_ranges(blocks: impl Iterator<Item = (u64, u64, bool)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (offset, len, zero) in blocks {
        if zero || len == 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.1 == offset => last.1 = offset + len,
            _ => out.push((offset, offset + len)),
        }
    }
    out
}

/// The temporary name a regular-file output is written under until verified.
pub fn part_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".corral-part");
    PathBuf::from(s)
}

impl RandomSink {
    /// Opens `path` for an image of `len` bytes. With `resume`, an existing part file of the
    /// right size is kept (its blocks are re-verified by the caller).
    pub(crate) fn open(path: &Path, len: u64, resume: bool) -> Result<Self, CastError> {
        let meta = std::fs::metadata(path).ok();
        if meta
            .as_ref()
            .is_some_and(|m| m.file_type().is_block_device())
        {
            let mut file = fs_err::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(io_at(path))?
                .into_parts()
                .0;
            let size =
                std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0)).map_err(io_at(path))?;
            if size < len {
                return Err(CastError::DeviceTooSmall {
                    path: path.to_owned(),
                    device: size,
                    image: len,
                });
            }
            return Ok(RandomSink {
                file,
                write_path: path.to_owned(),
                final_path: None,
                reserver: None,
            });
        }
        let part = part_path(path);
        let keep = resume
            && std::fs::metadata(&part)
                .map(|m| m.is_file() && m.len() == len)
                .unwrap_or(false);
        let file = fs_err::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(!keep)
            .open(&part)
            .map_err(io_at(&part))?
            .into_parts()
            .0;
        if !keep {
            file.set_len(len).map_err(io_at(&part))?;
        }
        Ok(RandomSink {
            file,
            write_path: part,
            final_path: Some(path.to_owned()),
            reserver: None,
        })
    }

    /// Starts reserving the space of `ranges` (from [`data_ranges`]) of a regular-file output
    /// in the background; a device has its space. Writes may start at once. Not on tmpfs:
    /// there `fallocate` places nothing (memory has no extents), it only allocates the pages
    /// the writes would, and running beside the writes it makes them dearer (both take the
    /// inode's lock; see [`on_tmpfs`]).
    pub(crate) fn reserve(&mut self, ranges: Vec<(u64, u64)>) {
        if self.final_path.is_none() || ranges.is_empty() || on_tmpfs(&self.file) {
            return;
        }
        let Ok(file) = self.file.try_clone() else {
            return;
        };
        self.reserver = Reserver::start(file, self.write_path.clone(), ranges);
    }

    pub(crate) fn path(&self) -> &Path {
        &self.write_path
    }

    /// Refuses a regular-file output whose file system cannot take `data` more bytes (the
    /// image's non-zero blocks; zero blocks stay holes), less what the file already holds
    /// (a kept part file): better at the start than with ENOSPC at 90 %. A device was
    /// checked by its size; a file system that cannot say how much is free is not refused.
    pub(crate) fn check_room(&self, data: u64) -> Result<(), CastError> {
        use std::os::unix::fs::MetadataExt;
        if self.final_path.is_none() {
            return Ok(());
        }
        let Ok(st) = rustix::fs::fstatvfs(&self.file) else {
            return Ok(());
        };
        // Root may use the blocks reserved for it, others only the available ones.
        let blocks = if rustix::process::geteuid().is_root() {
            st.f_bfree
        } else {
            st.f_bavail
        };
        let unit = if st.f_frsize > 0 {
            st.f_frsize
        } else {
            st.f_bsize
        };
        let free = blocks.saturating_mul(unit);
        let held = self
            .file
            .metadata()
            .map(|m| m.blocks().saturating_mul(512))
            .unwrap_or(0);
        let need = data.saturating_sub(held);
        if need > free {
            return Err(CastError::NoRoom {
                path: self.write_path.clone(),
                need,
                free,
            });
        }
        Ok(())
    }

    pub(crate) fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), CastError> {
        self.file
            .write_all_at(data, offset)
            .map_err(io_at(&self.write_path))
    }

    pub(crate) fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), CastError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(io_at(&self.write_path))
    }

    pub(crate) fn sync(&self) -> Result<(), CastError> {
        self.file.sync_data().map_err(io_at(&self.write_path))
    }

    /// Fsyncs and moves a regular file to its final name. Call only after verification.
    pub(crate) fn commit(mut self) -> Result<PathBuf, CastError> {
        drop(self.reserver.take());
        self.file.sync_all().map_err(io_at(&self.write_path))?;
        match self.final_path {
            Some(final_path) => {
                fs_err::rename(&self.write_path, &final_path).map_err(io_at(&final_path))?;
                sync_dir(&final_path);
                Ok(final_path)
            }
            None => Ok(self.write_path),
        }
    }
}

/// stdout or a pipe, written strictly in block order.
pub(crate) struct StreamSink {
    writer: Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
    child: Option<(String, tokio::process::Child)>,
    next: u64,
    pending: BTreeMap<u64, Vec<u8>>,
    written: u64,
}

impl std::fmt::Debug for StreamSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSink")
            .field("next", &self.next)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl StreamSink {
    pub(crate) fn stdout() -> Self {
        StreamSink {
            writer: Box::new(tokio::io::stdout()),
            child: None,
            next: 0,
            pending: BTreeMap::new(),
            written: 0,
        }
    }

    pub(crate) fn pipe(command: &str) -> Result<Self, CastError> {
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdin(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| CastError::Pipe {
                command: command.to_owned(),
                reason: format!("cannot start: {e}"),
            })?;
        let Some(stdin) = child.stdin.take() else {
            return Err(CastError::Pipe {
                command: command.to_owned(),
                reason: "no stdin".into(),
            });
        };
        Ok(StreamSink {
            writer: Box::new(stdin),
            child: Some((command.to_owned(), child)),
            next: 0,
            pending: BTreeMap::new(),
            written: 0,
        })
    }

    fn err(&self, reason: String) -> CastError {
        match &self.child {
            Some((command, _)) => CastError::Pipe {
                command: command.clone(),
                reason,
            },
            None => CastError::Io {
                path: PathBuf::from("<stdout>"),
                source: std::io::Error::other(reason),
            },
        }
    }

    /// Accepts block `index`; writes it and every queued successor if it is the next one.
    pub(crate) async fn push(&mut self, index: u64, data: Vec<u8>) -> Result<(), CastError> {
        if index < self.next {
            return Ok(());
        }
        self.pending.insert(index, data);
        while let Some(data) = self.pending.remove(&self.next) {
            if let Err(e) = self.writer.write_all(&data).await {
                return Err(self.err(format!("write: {e}")));
            }
            self.written += data.len() as u64;
            self.next += 1;
        }
        Ok(())
    }

    /// Blocks written so far (all in order).
    #[cfg(test)]
    pub(crate) fn next_block(&self) -> u64 {
        self.next
    }

    /// Flushes, closes and (for a pipe) waits for the command; fails if it exited non-zero.
    pub(crate) async fn finish(mut self) -> Result<u64, CastError> {
        if let Err(e) = self.writer.flush().await {
            return Err(self.err(format!("flush: {e}")));
        }
        if let Err(e) = self.writer.shutdown().await {
            // stdout cannot be shut down on every platform; a pipe must close.
            if self.child.is_some() {
                return Err(self.err(format!("close: {e}")));
            }
        }
        // Dropping the writer closes the pipe, so the command sees end of input.
        self.writer = Box::new(tokio::io::sink());
        if let Some((command, mut child)) = self.child.take() {
            let status = child.wait().await.map_err(|e| CastError::Pipe {
                command: command.clone(),
                reason: format!("wait: {e}"),
            })?;
            if !status.success() {
                return Err(CastError::Pipe {
                    command,
                    reason: format!("exited with {status}"),
                });
            }
        }
        Ok(self.written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pipe_gets_blocks_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let mut sink = StreamSink::pipe(&format!("cat > '{}'", out.display())).unwrap();
        sink.push(2, b"cc".to_vec()).await.unwrap();
        sink.push(0, b"aa".to_vec()).await.unwrap();
        assert_eq!(sink.next_block(), 1);
        sink.push(1, b"bb".to_vec()).await.unwrap();
        sink.push(1, b"XX".to_vec()).await.unwrap();
        assert_eq!(sink.finish().await.unwrap(), 6);
        assert_eq!(std::fs::read(&out).unwrap(), b"aabbcc");
    }

    #[tokio::test]
    async fn failing_pipe_is_an_error() {
        let sink = StreamSink::pipe("exit 3").unwrap();
        let err = sink.finish().await.unwrap_err().to_string();
        assert!(err.contains("exit"), "{err}");
    }

    /// A file system without room for the image's data is refused before anything is
    /// written; one with room, or a need covered by what the part file already holds, is not.
    #[test]
    fn a_file_system_without_room_is_refused_up_front() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let sink = RandomSink::open(&path, 1 << 20, false).unwrap();
        let st = rustix::fs::statvfs(dir.path()).unwrap();
        let free = st.f_bfree.max(st.f_bavail) * st.f_frsize.max(1);
        sink.check_room(4096).unwrap();
        match sink.check_room(free + (1 << 40)) {
            Err(CastError::NoRoom { need, path: p, .. }) => {
                assert_eq!(need, free + (1 << 40), "a sparse new file holds nothing");
                assert_eq!(p, part_path(&path));
            }
            r => panic!("{r:?}"),
        }
        let err = sink.check_room(u64::MAX).unwrap_err().to_string();
        assert!(err.contains("write the image elsewhere"), "{err}");
        // What a kept part file already holds counts against the need.
        sink.write_at(0, &vec![7u8; 1 << 20]).unwrap();
        sink.sync().unwrap();
        let held = std::fs::metadata(part_path(&path)).unwrap();
        let held = std::os::unix::fs::MetadataExt::blocks(&held) * 512;
        assert!(held >= 1 << 20, "{held}");
        match sink.check_room(free + (1 << 40)) {
            Err(CastError::NoRoom { need, .. }) => assert_eq!(need, free + (1 << 40) - held),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn data_ranges_merge_neighbours_and_skip_zero_blocks() {
        let blocks = [
            (0, 10, false),
            (10, 10, false),
            (20, 10, true),
            (30, 10, false),
            (40, 0, false),
            (40, 5, false),
            (45, 5, true),
        ];
        assert_eq!(
            data_ranges(blocks.into_iter()),
            vec![(0, 20), (30, 45)],
            "one range per run of non-zero blocks"
        );
        assert!(data_ranges([(0, 10, true)].into_iter()).is_empty());
    }

    /// The data ranges' space is reserved in the background; zero ranges stay holes; the
    /// bytes written are the file's bytes.
    #[test]
    fn the_data_ranges_space_is_reserved_and_zero_ranges_stay_holes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let probe = std::fs::File::create(dir.path().join("probe")).unwrap();
        if rustix::fs::fallocate(&probe, rustix::fs::FallocateFlags::empty(), 0, 4096).is_err() {
            eprintln!("SKIPPED: this file system has no fallocate");
            return;
        }
        if on_tmpfs(&probe) {
            eprintln!("SKIPPED: the temporary directory is on tmpfs, where nothing is reserved");
            return;
        }
        let path = dir.path().join("img");
        let mib = 1u64 << 20;
        let mut sink = RandomSink::open(&path, 48 * mib, false).unwrap();
        // Data in the first and last 16 MiB, a hole between.
        sink.reserve(vec![(0, 16 * mib), (32 * mib, 48 * mib)]);
        sink.write_at(mib, &[9u8; 4096]).unwrap();
        sink.reserver.take().expect("a reserving thread").wait();
        let held = std::fs::metadata(part_path(&path)).unwrap().blocks() * 512;
        assert!(
            (32 * mib..40 * mib).contains(&held),
            "32 MiB reserved, the 16 MiB between not: {held}"
        );
        assert_eq!(sink.commit().unwrap(), path);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, 48 * mib);
        assert!(
            bytes[mib as usize..mib as usize + 4096]
                .iter()
                .all(|&b| b == 9)
        );
        assert!(bytes[..mib as usize].iter().all(|&b| b == 0));
        assert!(bytes[mib as usize + 4096..].iter().all(|&b| b == 0));
    }

    /// On tmpfs nothing is reserved (no placement to gain, and it makes the writes dearer);
    /// the image is written all the same.
    #[test]
    fn nothing_is_reserved_on_tmpfs() {
        let shm = Path::new("/dev/shm");
        let on_shm = std::fs::File::open(shm).ok().is_some_and(|f| on_tmpfs(&f));
        if !on_shm {
            eprintln!("SKIPPED: no tmpfs at /dev/shm");
            return;
        }
        let dir = tempfile::tempdir_in(shm).unwrap();
        let path = dir.path().join("img");
        let mut sink = RandomSink::open(&path, 8 << 20, false).unwrap();
        sink.reserve(vec![(0, 8 << 20)]);
        assert!(sink.reserver.is_none(), "a reserving thread on tmpfs");
        sink.write_at(4096, &[5u8; 4096]).unwrap();
        let mut back = [0u8; 4096];
        sink.read_at(4096, &mut back).unwrap();
        assert_eq!(back, [5u8; 4096]);
    }

    #[test]
    fn file_goes_through_part_and_rename() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let sink = RandomSink::open(&path, 10, false).unwrap();
        sink.write_at(5, b"hello").unwrap();
        assert!(!path.exists());
        assert_eq!(sink.commit().unwrap(), path);
        assert_eq!(std::fs::read(&path).unwrap(), b"\0\0\0\0\0hello");
        assert!(!part_path(&path).exists());
    }
}
