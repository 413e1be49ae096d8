//! TCP catch-up: the sender serves its signed manifest and encoded blocks by index, so that a
//! receiver that missed multicast data (silent group, blocked multicast, blocks still missing
//! after the sender's pass) can fetch exactly what it lacks. Everything fetched here is verified
//! by the receiver exactly like multicast data, so this channel needs no trust of its own.
//!
//! Wire format (all integers big-endian):
//! - request `M` — the manifest; request `B` + u32 index — one encoded block.
//! - reply: u8 status (0 ok, 1 unknown) + u32 length + that many bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::CastError;

/// Largest reply a client accepts (a block is far smaller).
const MAX_REPLY: u32 = 256 * 1024 * 1024;
/// How long a client waits for one reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Block requests a client keeps in flight. The server answers in order; with one request at
/// a time the link idles for a round trip per block, which on a slow or distant link (the
/// receivers that end up here) costs a large share of its rate.
pub(crate) const PIPELINE: usize = 8;

/// What the catch-up server serves.
pub(crate) trait CatchUpProvider: Send + Sync + 'static {
    /// The signed manifest bytes.
    fn manifest(&self) -> Vec<u8>;
    /// Encoded block `index` (as it travels in a data packet), or `None` if there is none.
    fn block(&self, index: u32) -> Option<Vec<u8>>;
}

/// Serves catch-up requests on `listener` until `cancel` fires.
pub(crate) async fn serve(
    listener: TcpListener,
    provider: Arc<dyn CatchUpProvider>,
    cancel: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "catch-up accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let provider = provider.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = serve_one(stream, provider) => {
                    if let Err(e) = r {
                        debug!(%peer, error = %e, "catch-up connection ended");
                    }
                }
            }
        });
    }
}

async fn serve_one(
    mut stream: TcpStream,
    provider: Arc<dyn CatchUpProvider>,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut served = 0u64;
    loop {
        let op = match stream.read_u8().await {
            Ok(op) => op,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                debug!(served, "catch-up client done");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let reply = match op {
            b'M' => Some(provider.manifest()),
            b'B' => {
                let index = stream.read_u32().await?;
                let p = provider.clone();
                served += 1;
                // Reading and compressing a block is blocking work.
                tokio::task::spawn_blocking(move || p.block(index))
                    .await
                    .ok()
                    .flatten()
            }
            _ => return Err(std::io::Error::other("unknown catch-up request")),
        };
        match reply {
            Some(bytes) => {
                stream.write_u8(0).await?;
                stream.write_u32(bytes.len() as u32).await?;
                stream.write_all(&bytes).await?;
            }
            None => {
                stream.write_u8(1).await?;
                stream.write_u32(0).await?;
            }
        }
    }
}

/// A receiver's connection to a sender's catch-up server.
#[derive(Debug)]
pub(crate) struct CatchUpClient {
    stream: TcpStream,
    peer: SocketAddr,
}

impl CatchUpClient {
    pub(crate) async fn connect(peer: SocketAddr) -> Result<Self, CastError> {
        let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(peer))
            .await
            .map_err(|_| CastError::CatchUp {
                peer,
                reason: "connect timed out".into(),
            })?
            .map_err(|e| CastError::CatchUp {
                peer,
                reason: format!("connect: {e}"),
            })?;
        let _ = stream.set_nodelay(true);
        Ok(CatchUpClient { stream, peer })
    }

    fn err(&self, reason: impl Into<String>) -> CastError {
        CastError::CatchUp {
            peer: self.peer,
            reason: reason.into(),
        }
    }

    async fn request(&mut self, req: &[u8]) -> Result<Option<Vec<u8>>, CastError> {
        self.stream
            .write_all(req)
            .await
            .map_err(|e| self.err(e.to_string()))?;
        self.reply().await
    }

    /// Reads the next reply.
    async fn reply(&mut self) -> Result<Option<Vec<u8>>, CastError> {
        let fut = async {
            let status = self.stream.read_u8().await?;
            let len = self.stream.read_u32().await?;
            if len > MAX_REPLY {
                return Err(std::io::Error::other(format!("reply of {len} bytes")));
            }
            let mut buf = vec![0u8; len as usize];
            self.stream.read_exact(&mut buf).await?;
            Ok::<_, std::io::Error>((status, buf))
        };
        match tokio::time::timeout(REPLY_TIMEOUT, fut).await {
            Err(_) => Err(self.err("reply timed out")),
            Ok(Err(e)) => Err(self.err(e.to_string())),
            Ok(Ok((0, buf))) => Ok(Some(buf)),
            Ok(Ok(_)) => Ok(None),
        }
    }

    /// The signed manifest bytes (unverified: the caller verifies them).
    pub(crate) async fn manifest(&mut self) -> Result<Vec<u8>, CastError> {
        self.request(b"M")
            .await?
            .ok_or_else(|| self.err("sender has no manifest"))
    }

    /// Encoded block `index` (unverified).
    #[cfg(test)]
    pub(crate) async fn block(&mut self, index: u32) -> Result<Vec<u8>, CastError> {
        self.request(&block_request(index))
            .await?
            .ok_or_else(|| self.err(format!("sender has no block {index}")))
    }

    /// Encoded blocks `indices` (unverified), in order, with up to [`PIPELINE`] requests in
    /// flight; each is sent to `out` as `wrap(index, bytes)`. `Ok(false)`: `out` was closed
    /// and the batch stopped early. After an early stop or an error, replies may still be on
    /// their way: the connection is then done.
    pub(crate) async fn blocks<T>(
        &mut self,
        indices: &[u32],
        out: &tokio::sync::mpsc::Sender<T>,
        wrap: impl Fn(u32, Vec<u8>) -> T,
    ) -> Result<bool, CastError> {
        let mut sent = 0;
        for (k, &index) in indices.iter().enumerate() {
            let ahead = indices.len().min(k + PIPELINE);
            if sent < ahead {
                let req: Vec<u8> = indices[sent..ahead]
                    .iter()
                    .flat_map(|&i| block_request(i))
                    .collect();
                self.stream
                    .write_all(&req)
                    .await
                    .map_err(|e| self.err(e.to_string()))?;
                sent = ahead;
            }
            let b = self
                .reply()
                .await?
                .ok_or_else(|| self.err(format!("sender has no block {index}")))?;
            if out.send(wrap(index, b)).await.is_err() {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

fn block_request(index: u32) -> [u8; 5] {
    let mut req = [0u8; 5];
    req[0] = b'B';
    req[1..].copy_from_slice(&index.to_be_bytes());
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl CatchUpProvider for Fixed {
        fn manifest(&self) -> Vec<u8> {
            b"manifest".to_vec()
        }
        fn block(&self, index: u32) -> Option<Vec<u8>> {
            (index < 3).then(|| vec![index as u8; 1000])
        }
    }

    #[tokio::test]
    async fn serves_manifest_and_blocks() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn(serve(listener, Arc::new(Fixed), cancel.clone()));
        let mut c = CatchUpClient::connect(addr).await.unwrap();
        assert_eq!(c.manifest().await.unwrap(), b"manifest");
        assert_eq!(c.block(2).await.unwrap(), vec![2u8; 1000]);
        assert!(c.block(9).await.is_err());
        assert_eq!(c.block(0).await.unwrap(), vec![0u8; 1000]);
        cancel.cancel();
    }

    #[tokio::test]
    async fn pipelined_blocks_arrive_in_order_and_a_missing_one_fails_the_batch() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn(serve(listener, Arc::new(Fixed), cancel.clone()));
        let mut c = CatchUpClient::connect(addr).await.unwrap();
        // More indices than the pipeline holds, with repeats, all present.
        let want: Vec<u32> = (0..3 * PIPELINE as u32).map(|i| (i * 7) % 3).collect();
        let (tx, mut rx) = tokio::sync::mpsc::channel(want.len());
        assert!(c.blocks(&want, &tx, |i, b| (i, b)).await.unwrap());
        let mut got = Vec::new();
        while let Ok(x) = rx.try_recv() {
            got.push(x);
        }
        assert_eq!(got.len(), want.len());
        for ((i, b), w) in got.iter().zip(&want) {
            assert_eq!(i, w);
            assert_eq!(b, &vec![*w as u8; 1000], "block {i} in its place");
        }
        // A batch fails at the first block the sender does not have, after delivering the
        // ones before it.
        let mut c = CatchUpClient::connect(addr).await.unwrap();
        let r = c.blocks(&[0, 1, 9, 2], &tx, |i, b| (i, b)).await;
        assert!(r.is_err(), "block 9 does not exist");
        let mut n = 0;
        while rx.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, 2, "the blocks before the missing one were delivered");
        // A closed receiving end stops the batch.
        drop(rx);
        let mut c = CatchUpClient::connect(addr).await.unwrap();
        assert!(!c.blocks(&[0, 1], &tx, |i, b| (i, b)).await.unwrap());
        cancel.cancel();
    }
}
