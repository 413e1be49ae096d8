//! The receiver's resume state: which blocks of which image are safely on disk.
//!
//! A small JSON file `{"version":1,"manifest":HEX,"blocks":N,"have":HEX-BITMAP}` written
//! atomically (temp file, fsync, rename, fsync of the directory). A block is recorded only after
//! the output was fsynced with it, so after a crash every block the file names is on disk; on
//! restart those blocks are still re-read and verified against the manifest before being
//! trusted.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{CastError, io_at};

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    manifest: String,
    blocks: u64,
    have: String,
}

/// Resume state for one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeState {
    /// BLAKE3 of the signed manifest bytes: which image this state belongs to.
    pub manifest_hash: [u8; 32],
    /// One bit per block, least significant bit first: on disk and fsynced.
    have: Vec<u8>,
    blocks: u64,
}

impl ResumeState {
    /// Empty state for an image of `blocks` blocks.
    pub fn new(manifest_hash: [u8; 32], blocks: u64) -> Self {
        ResumeState {
            manifest_hash,
            have: vec![0; usize::try_from(blocks.div_ceil(8)).unwrap_or(0)],
            blocks,
        }
    }

    /// Number of blocks in the image.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Whether block `i` is recorded as on disk.
    pub fn has(&self, i: u64) -> bool {
        i < self.blocks
            && self
                .have
                .get((i / 8) as usize)
                .is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    /// Records block `i` as on disk.
    pub fn set(&mut self, i: u64) {
        if i < self.blocks
            && let Some(b) = self.have.get_mut((i / 8) as usize)
        {
            *b |= 1 << (i % 8);
        }
    }

    /// Blocks recorded.
    pub fn count(&self) -> u64 {
        self.have.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// Reads a state file; `Ok(None)` if it does not exist.
    pub fn load(path: &Path) -> Result<Option<Self>, CastError> {
        let text = match fs_err::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_at(path)(e)),
        };
        let bad = |reason: String| CastError::State {
            path: path.to_owned(),
            reason,
        };
        let f: StateFile =
            serde_json::from_str(&text).map_err(|e| bad(format!("not a state file: {e}")))?;
        if f.version != 1 {
            return Err(bad(format!("unknown version {}", f.version)));
        }
        let mut manifest_hash = [0u8; 32];
        hex::decode_to_slice(&f.manifest, &mut manifest_hash)
            .map_err(|e| bad(format!("manifest hash: {e}")))?;
        let have = hex::decode(&f.have).map_err(|e| bad(format!("bitmap: {e}")))?;
        if have.len() as u64 != f.blocks.div_ceil(8) {
            return Err(bad(format!(
                "bitmap has {} bytes for {} blocks",
                have.len(),
                f.blocks
            )));
        }
        Ok(Some(ResumeState {
            manifest_hash,
            have,
            blocks: f.blocks,
        }))
    }

    /// Writes the state atomically.
    pub fn save(&self, path: &Path) -> Result<(), CastError> {
        let body = serde_json::to_string(&StateFile {
            version: 1,
            manifest: hex::encode(self.manifest_hash),
            blocks: self.blocks,
            have: hex::encode(&self.have),
        })
        .map_err(|e| CastError::State {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let mut f = fs_err::File::create(&tmp).map_err(io_at(&tmp))?;
        f.write_all(body.as_bytes()).map_err(io_at(&tmp))?;
        f.sync_all().map_err(io_at(&tmp))?;
        drop(f);
        fs_err::rename(&tmp, path).map_err(io_at(path))?;
        sync_dir(path);
        Ok(())
    }
}

/// Fsyncs the directory holding `path` so that a rename in it is durable. Best effort: some
/// filesystems refuse to open directories for sync.
pub(crate) fn sync_dir(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        assert_eq!(ResumeState::load(&path).unwrap(), None);
        let mut st = ResumeState::new([7; 32], 19);
        for i in [0, 5, 8, 18, 19, 400] {
            st.set(i);
        }
        assert_eq!(st.count(), 4);
        st.save(&path).unwrap();
        let back = ResumeState::load(&path).unwrap().unwrap();
        assert_eq!(back, st);
        assert!(back.has(18) && !back.has(19) && !back.has(1));
        std::fs::write(&path, "{\"version\":1,\"manifest\":\"zz\"}").unwrap();
        let err = ResumeState::load(&path).unwrap_err().to_string();
        assert!(err.contains("s.json"), "{err}");
    }
}
