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
        let fut = async {
            self.stream.write_all(req).await?;
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
    pub(crate) async fn block(&mut self, index: u32) -> Result<Vec<u8>, CastError> {
        let mut req = [0u8; 5];
        req[0] = b'B';
        req[1..].copy_from_slice(&index.to_be_bytes());
        self.request(&req)
            .await?
            .ok_or_else(|| self.err(format!("sender has no block {index}")))
    }
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
}
