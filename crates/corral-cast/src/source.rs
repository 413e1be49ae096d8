//! The image a sender offers: a regular file, a block device, or stdin spooled to a temporary
//! file (the manifest, which covers every block, must be signed before the first block goes
//! out, so a stream has to be read whole first).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{CastError, io_at};

/// See [`ImageSource::identity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileIdentity {
    /// The same file, changed or not.
    pub(crate) fn same_file(&self, other: &FileIdentity) -> bool {
        self.dev == other.dev && self.ino == other.ino
    }

    /// The file's length when its identity was taken.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Whether the file last changed (ctime) at least `margin` before `t`: then any later
    /// write gives it another ctime even where timestamps are coarse (whole seconds).
    pub(crate) fn settled_before(&self, t: std::time::SystemTime, margin: Duration) -> bool {
        let Ok(since_epoch) = t.duration_since(std::time::UNIX_EPOCH) else {
            return false;
        };
        let (sec, nsec) = self.ctime;
        let (Ok(sec), Ok(nsec)) = (u64::try_from(sec), u32::try_from(nsec)) else {
            return false;
        };
        Duration::new(sec, nsec.min(999_999_999)) + margin <= since_epoch
    }
}

/// An opened, sized, randomly readable image.
#[derive(Debug)]
pub struct ImageSource {
    file: std::fs::File,
    path: PathBuf,
    len: u64,
    /// Keeps a spooled stdin alive (deleted on drop).
    _spool: Option<tempfile::TempPath>,
}

impl ImageSource {
    /// Opens `spec`: a path, or `-` for stdin (spooled to `$TMPDIR`).
    pub fn open(spec: &Path) -> Result<Self, CastError> {
        if spec == Path::new("-") {
            return Self::spool(&mut std::io::stdin().lock());
        }
        let mut file = fs_err::File::open(spec)
            .map_err(io_at(spec))?
            .into_parts()
            .0;
        // Seeking to the end gives the size of block devices too (metadata says 0 for them).
        let len = file.seek(SeekFrom::End(0)).map_err(io_at(spec))?;
        Ok(ImageSource {
            file,
            path: spec.to_owned(),
            len,
            _spool: None,
        })
    }

    /// Reads a stream to its end into a temporary file and opens that.
    pub fn spool(input: &mut dyn Read) -> Result<Self, CastError> {
        let tmp_dir = std::env::temp_dir();
        let mut tmp = tempfile::NamedTempFile::new_in(&tmp_dir).map_err(io_at(&tmp_dir))?;
        let len = std::io::copy(input, &mut tmp).map_err(io_at(tmp.path()))?;
        let (file, path) = tmp.into_parts();
        Ok(ImageSource {
            file,
            path: path.to_path_buf(),
            len,
            _spool: Some(path),
        })
    }

    /// The image's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the image is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where the image is read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What identifies this image's bytes for as long as they stay the same: device, inode,
    /// size, mtime and ctime of a regular file (any write changes its ctime). `None` for a
    /// block device (its node's times do not follow writes to the disk) and for spooled
    /// stdin (a temporary file whose inode may be reused).
    pub(crate) fn identity(&self) -> Option<FileIdentity> {
        use std::os::unix::fs::MetadataExt;
        if self._spool.is_some() {
            return None;
        }
        let m = self.file.metadata().ok()?;
        m.file_type().is_file().then(|| FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }

    /// Appends `len` bytes at `offset` to `buf` (fewer only at the end of the image), read
    /// straight into its spare capacity: no zeroing of memory the read overwrites (a block's
    /// worth per block sent, when the buffer is new).
    pub fn read_append(
        &self,
        offset: u64,
        buf: &mut Vec<u8>,
        len: usize,
    ) -> Result<usize, CastError> {
        let start = buf.len();
        let end = start + len;
        buf.reserve(len);
        while buf.len() < end {
            let at = offset + (buf.len() - start) as u64;
            match rustix::io::pread(&self.file, rustix::buffer::spare_capacity(buf), at) {
                Ok(0) => break,
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(io_at(&self.path)(e.into())),
            }
        }
        // The spare capacity may have held more than was asked for.
        buf.truncate(end);
        Ok(buf.len() - start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appended reads stop at the length asked for (whatever the spare capacity) or at the
    /// end of the image, and keep what the buffer held.
    #[test]
    fn read_append_reads_the_range_into_spare_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let src = ImageSource::open(&p).unwrap();
        let mut buf = Vec::with_capacity(64 * 1024);
        buf.extend_from_slice(b"kept");
        assert_eq!(src.read_append(1000, &mut buf, 5000).unwrap(), 5000);
        assert_eq!(&buf[..4], b"kept");
        assert_eq!(&buf[4..], &data[1000..6000]);
        let mut buf = Vec::new();
        assert_eq!(src.read_append(99_000, &mut buf, 5000).unwrap(), 1000);
        assert_eq!(buf, &data[99_000..]);
    }

    #[test]
    fn spooled_stream_reads_back() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let src = ImageSource::spool(&mut &data[..]).unwrap();
        assert_eq!(src.len(), data.len() as u64);
        let mut buf = Vec::new();
        assert_eq!(src.read_append(99_500, &mut buf, 1000).unwrap(), 500);
        assert_eq!(&buf[..500], &data[99_500..]);
        let path = src.path().to_owned();
        drop(src);
        assert!(!path.exists(), "spool file is removed");
    }
}
