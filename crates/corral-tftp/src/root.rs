//! Files served read-only from beneath one directory.
//!
//! Every open goes through `openat2(root_fd, path, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`
//! (Linux 5.6+): the kernel refuses any resolution that leaves the root, whether by `..`, an
//! absolute path or a symlink (absolute symlinks are refused even when they point back inside;
//! use relative links within the root). Names are already sanitised by
//! [`corral_tftp_proto::path::sanitize`]; this is the second, race-free wall. On kernels without
//! `openat2` the file is opened normally and the path the kernel reports for the open
//! descriptor (`/proc/self/fd/N`) must lie under the canonical root.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use corral_tftp_proto::Source;
use rustix::fs::{Mode, OFlags, ResolveFlags};

use crate::error::TftpError;

/// Why a file could not be served.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// No such file (TFTP error 1).
    NotFound,
    /// Refused (TFTP error 2); the reason is for the logs, the client gets a generic message.
    Denied(&'static str),
    /// Some other I/O error (TFTP error 0).
    Io(io::Error),
}

/// The served root, held open.
#[derive(Debug)]
pub(crate) struct Root {
    dir: OwnedFd,
    canonical: PathBuf,
}

impl Root {
    pub(crate) fn open(path: &Path) -> Result<Root, TftpError> {
        let canonical = fs_err::canonicalize(path).map_err(|source| TftpError::Root {
            path: path.to_owned(),
            source,
        })?;
        let dir = rustix::fs::open(
            &canonical,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| TftpError::Root {
            path: path.to_owned(),
            source: io::Error::new(
                io::Error::from(e).kind(),
                format!("cannot open {} as a directory: {e}", canonical.display()),
            ),
        })?;
        Ok(Root { dir, canonical })
    }

    /// Opens `rel` (already sanitised: relative, no `..`) for reading.
    pub(crate) fn open_file(&self, rel: &str) -> Result<FileSource, OpenError> {
        let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY;
        let file = match rustix::fs::openat2(
            self.dir.as_fd(),
            rel,
            flags,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
        ) {
            Ok(fd) => File::from(fd),
            Err(rustix::io::Errno::NOSYS) => self.open_checked(rel)?,
            Err(e) => return Err(map_errno(e)),
        };
        let meta = file.metadata().map_err(OpenError::Io)?;
        if !meta.is_file() {
            return Err(OpenError::Denied("not a regular file"));
        }
        Ok(FileSource::new(file, meta.len()))
    }

    /// Fallback without `openat2`: open, then check where the descriptor really points.
    fn open_checked(&self, rel: &str) -> Result<File, OpenError> {
        let file = File::open(self.canonical.join(rel)).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => OpenError::NotFound,
            io::ErrorKind::PermissionDenied => OpenError::Denied("permission denied"),
            _ => OpenError::Io(e),
        })?;
        let real = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(OpenError::Io)?;
        if !real.starts_with(&self.canonical) {
            return Err(OpenError::Denied("resolves outside the served root"));
        }
        Ok(file)
    }
}

fn map_errno(e: rustix::io::Errno) -> OpenError {
    use rustix::io::Errno;
    match e {
        Errno::NOENT | Errno::NOTDIR => OpenError::NotFound,
        Errno::XDEV => OpenError::Denied("resolves outside the served root"),
        Errno::LOOP => OpenError::Denied("too many symlinks"),
        Errno::ACCESS | Errno::PERM => OpenError::Denied("permission denied"),
        e => OpenError::Io(io::Error::from(e)),
    }
}

/// A file read with `pread` through a read-ahead buffer, so a window of blocks costs one
/// system call instead of one per block.
#[derive(Debug)]
pub(crate) struct FileSource {
    file: File,
    size: u64,
    buf: Vec<u8>,
    buf_offset: u64,
    buf_len: usize,
}

const READ_AHEAD: usize = 256 * 1024;

impl FileSource {
    fn new(file: File, size: u64) -> Self {
        FileSource {
            file,
            size,
            buf: Vec::new(),
            buf_offset: 0,
            buf_len: 0,
        }
    }
}

impl Source for FileSource {
    fn size(&self) -> Option<u64> {
        Some(self.size)
    }

    fn read_at(&mut self, offset: u64, out: &mut [u8]) -> io::Result<usize> {
        let in_buf = offset >= self.buf_offset && offset < self.buf_offset + self.buf_len as u64;
        if !in_buf {
            if self.buf.is_empty() {
                // Small files do not need a big buffer.
                let want = usize::try_from(self.size.min(READ_AHEAD as u64)).unwrap_or(READ_AHEAD);
                self.buf = vec![0; want.max(out.len())];
            }
            self.buf_offset = offset;
            self.buf_len = 0;
            loop {
                match self.file.read_at(&mut self.buf, offset) {
                    Ok(n) => {
                        self.buf_len = n;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if self.buf_len == 0 {
                return Ok(0);
            }
        }
        // `in_buf` or a fresh fill: offset lies inside [buf_offset, buf_offset + buf_len).
        let start = (offset - self.buf_offset) as usize;
        let n = out.len().min(self.buf_len - start);
        out[..n].copy_from_slice(&self.buf[start..start + n]);
        Ok(n)
    }
}
