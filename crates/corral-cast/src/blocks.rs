//! The sender's side of the image: hashing it into a signed manifest, and encoding blocks for
//! the protocol's `Sender` (and the TCP catch-up server) with a read-ahead encoder thread, so
//! that zstd and disk reads do not stall the packet loop.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};

use corral_cast_proto::{
    BlockSource, Compression, EncodedBlock, ManifestBuilder, SignedManifest, encode_block_vec,
};
use corral_model::SessionId;

use crate::catchup::CatchUpProvider;
use crate::error::CastError;
use crate::source::ImageSource;

/// Reads the whole image once, hashing every block, and signs the manifest.
pub(crate) fn build_manifest(
    source: &ImageSource,
    session: SessionId,
    block_size: u32,
    symbol_size: u16,
    compression: Compression,
    secret: &[u8; 32],
) -> Result<SignedManifest, CastError> {
    let mut builder = ManifestBuilder::new(session, block_size, symbol_size, compression);
    let mut buf = vec![0u8; block_size as usize];
    let mut offset = 0u64;
    while offset < source.len() {
        let want = (source.len() - offset).min(u64::from(block_size)) as usize;
        let n = source.read_at(offset, &mut buf[..want])?;
        if n != want {
            return Err(CastError::Io {
                path: source.path().to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "image shrank while reading",
                ),
            });
        }
        builder.push_block(&buf[..n]);
        offset += n as u64;
    }
    let manifest = builder.finish()?;
    Ok(SignedManifest::sign(manifest, secret))
}

/// How many blocks the encoder thread keeps ready ahead of the sender.
const READ_AHEAD: u32 = 16;

struct Cache {
    ready: HashMap<u32, Arc<EncodedBlock>>,
    /// The highest block the sender asked for (the encoder stays `READ_AHEAD` beyond it).
    wanted: u32,
    /// Next block the encoder thread will encode.
    next: u32,
    stop: bool,
}

/// Encoded blocks of one image, shared by the protocol sender, the catch-up server and the
/// read-ahead thread.
pub(crate) struct Blocks {
    source: Arc<ImageSource>,
    signed: SignedManifest,
    cache: Mutex<Cache>,
    cv: Condvar,
}

impl std::fmt::Debug for Blocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blocks").finish_non_exhaustive()
    }
}

impl Blocks {
    /// Wraps the image and starts the read-ahead thread (stopped by [`Blocks::stop`]).
    pub(crate) fn start(source: Arc<ImageSource>, signed: SignedManifest) -> Arc<Self> {
        let b = Arc::new(Blocks {
            source,
            signed,
            cache: Mutex::new(Cache {
                ready: HashMap::new(),
                wanted: 0,
                next: 0,
                stop: false,
            }),
            cv: Condvar::new(),
        });
        let worker = b.clone();
        std::thread::Builder::new()
            .name("cast-encode".into())
            .spawn(move || worker.read_ahead())
            .ok();
        b
    }

    pub(crate) fn stop(&self) {
        self.lock().stop = true;
        self.cv.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read_ahead(&self) {
        let count = self.signed.manifest().block_count();
        loop {
            let index = {
                let mut c = self.lock();
                loop {
                    if c.stop || c.next >= count {
                        return;
                    }
                    if c.next <= c.wanted.saturating_add(READ_AHEAD) {
                        break;
                    }
                    c = self.cv.wait(c).unwrap_or_else(|e| e.into_inner());
                }
                let i = c.next;
                c.next += 1;
                i
            };
            let m = self.signed.manifest();
            if m.blocks.get(index as usize).is_some_and(|e| e.zero) {
                continue;
            }
            if let Ok(b) = self.encode(index) {
                let mut c = self.lock();
                c.ready.insert(index, Arc::new(b));
            }
        }
    }

    /// Reads and encodes block `index` now.
    pub(crate) fn encode(&self, index: u32) -> std::io::Result<EncodedBlock> {
        let m = self.signed.manifest();
        if index >= m.block_count() {
            return Err(std::io::Error::other(format!("no block {index}")));
        }
        let len = m.block_len(index) as usize;
        // Room for the padding of the last symbol: a block sent raw keeps this buffer.
        let mut buf = Vec::with_capacity(
            corral_cast_proto::source_count(len, m.symbol_size) * usize::from(m.symbol_size),
        );
        buf.resize(len, 0);
        let n = self
            .source
            .read_at(m.block_offset(index), &mut buf)
            .map_err(std::io::Error::other)?;
        if n != len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("block {index}: image shrank"),
            ));
        }
        encode_block_vec(index, buf, m.compression, m.symbol_size).map_err(std::io::Error::other)
    }

    /// Block `index`, from the read-ahead cache or encoded now.
    pub(crate) fn get(&self, index: u32) -> std::io::Result<Arc<EncodedBlock>> {
        {
            let mut c = self.lock();
            if index > c.wanted {
                c.wanted = index;
                // Drop blocks well behind the sender (repairs of them re-encode inline).
                let floor = index.saturating_sub(READ_AHEAD);
                c.ready.retain(|&i, _| i >= floor);
                self.cv.notify_all();
            }
            if let Some(b) = c.ready.get(&index) {
                return Ok(b.clone());
            }
        }
        Ok(Arc::new(self.encode(index)?))
    }
}

/// The protocol sender's view of [`Blocks`].
pub(crate) struct SharedBlocks(pub(crate) Arc<Blocks>);

impl BlockSource for SharedBlocks {
    fn encoded_block(&mut self, index: u32) -> std::io::Result<Arc<EncodedBlock>> {
        self.0.get(index)
    }
}

impl CatchUpProvider for Blocks {
    fn manifest(&self) -> Vec<u8> {
        self.signed.as_bytes().to_vec()
    }

    fn block(&self, index: u32) -> Option<Vec<u8>> {
        // Catch-up requests are random access: encode directly, leaving the read-ahead alone.
        self.encode(index).ok().map(|b| b.to_bytes())
    }
}
