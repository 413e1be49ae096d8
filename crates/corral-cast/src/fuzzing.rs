//! Entry points for the fuzz targets `cast_catchup_client` and `cast_catchup_server` (in
//! `fuzz/`), and for the tests here that run the same checks in CI: each end of the TCP
//! catch-up protocol fed whatever bytes the other end might send. Not an API.
//!
//! Both run the real code (the crate's catch-up module) over an in-memory pipe, on a runtime
//! of their own, and end when the bytes do: a peer that closes the connection is how every
//! exchange here ends, so nothing waits for a timer.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::catchup::{self, CatchUpClient, CatchUpProvider, ManifestReply, Stream};

/// The stream both ends are of.
const STREAM: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(239, 255, 77, 1), 9000);
/// The UDP port the server tells.
const REPORT_PORT: u16 = 9001;
/// Blocks the client asks for once it has a manifest.
const ASKED: u32 = 16;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
}

/// What a client made of a server's bytes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ClientOutcome {
    /// The manifest's length, if one came (with a preparing reply first, or not).
    pub manifest: Option<usize>,
    /// The report port told with it.
    pub report_port: Option<u16>,
    /// Blocks received, in order of index from 0.
    pub blocks: Vec<Vec<u8>>,
    /// The error that ended the exchange, if any.
    pub error: Option<String>,
}

/// A receiver's catch-up client against a server that sends `server` and closes: it asks for
/// the manifest (again after each "preparing" reply), then for blocks 0 to 15 through the
/// pipelined batch path. Returns what it got; never panics, and holds no more memory than the
/// bytes given (a reply that claims more is an error when they run out).
pub fn catchup_client(server: &[u8]) -> ClientOutcome {
    runtime().block_on(async {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let bytes = server.to_vec();
        // The server: its bytes, then the end of the connection; what the client sends is
        // read and dropped (so that the client's writes never wait).
        tokio::spawn(async move {
            let (mut rd, mut wr) = tokio::io::split(&mut theirs);
            let drain = async {
                let mut sink = [0u8; 4096];
                while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
            };
            let send = async {
                let _ = wr.write_all(&bytes).await;
                let _ = wr.shutdown().await;
            };
            tokio::join!(drain, send);
        });
        let peer = SocketAddr::from((Ipv4Addr::LOCALHOST, STREAM.port()));
        let mut out = ClientOutcome::default();
        let run = async {
            let mut c = CatchUpClient::over(ours, peer).await?;
            let m = loop {
                match c.manifest(STREAM).await? {
                    ManifestReply::Ready(m) => break m,
                    ManifestReply::Preparing(p) => assert!(p.bytes_done <= p.image_size),
                }
            };
            out.manifest = Some(m.len());
            out.report_port = c.report_port();
            let (tx, mut rx) = tokio::sync::mpsc::channel(ASKED as usize);
            let indices: Vec<u32> = (0..ASKED).collect();
            let r = c.blocks(&indices, &tx, |i, b| (i, b)).await;
            drop(tx);
            while let Some((i, b)) = rx.recv().await {
                assert_eq!(i as usize, out.blocks.len(), "blocks come in order");
                out.blocks.push(b);
            }
            r.map(|_| ())
        };
        if let Err(e) = run.await {
            out.error = Some(e.to_string());
        }
        out
    })
}

/// What the server serves: a manifest, and blocks 0 to 3.
struct Provider;

impl CatchUpProvider for Provider {
    fn manifest(&self) -> ManifestReply {
        ManifestReply::Ready(vec![0x4d; 100])
    }

    fn block(&self, index: u32) -> Option<Arc<Vec<u8>>> {
        (index < 4).then(|| Arc::new(vec![index as u8; 100]))
    }
}

/// What a client of this release opens its connection with (the fuzz target puts it in
/// front of most inputs: a fuzzer seldom finds three exact bytes on its own).
pub const OPENING: [u8; 3] = catchup::OPENING;

/// A sender's catch-up server on one connection whose client sends `client` and closes:
/// returns every byte the server answered. Never panics; ends when the client's bytes do (or
/// at the first one it refuses).
pub fn catchup_server(client: &[u8]) -> Vec<u8> {
    runtime().block_on(async {
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let (mut rd, mut wr) = tokio::io::split(theirs);
        let bytes = client.to_vec();
        let send = tokio::spawn(async move {
            let _ = wr.write_all(&bytes).await;
            let _ = wr.shutdown().await;
        });
        let read = tokio::spawn(async move {
            let mut got = Vec::new();
            let _ = rd.read_to_end(&mut got).await;
            got
        });
        let _ = catchup::serve_one(
            ours,
            Arc::new(Provider),
            &Stream::Group(STREAM),
            REPORT_PORT,
            Duration::from_secs(10),
        )
        .await;
        let _ = send.await;
        read.await.unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply: status, length, bytes.
    fn reply(status: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![status];
        v.extend_from_slice(&(body.len() as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    /// A well-formed server stream: a preparing reply, the manifest with its port, then
    /// blocks 0..16.
    fn good_server() -> Vec<u8> {
        let mut v = reply(
            2,
            &[[0, 0, 0, 0, 0, 0, 0, 10], [0, 0, 0, 0, 0, 0, 0, 5]].concat(),
        );
        let mut m = 7000u16.to_be_bytes().to_vec();
        m.extend_from_slice(b"the manifest");
        v.extend(reply(0, &m));
        for i in 0..ASKED {
            v.extend(reply(0, &[i as u8; 3]));
        }
        v
    }

    /// A well-formed client stream: the opening, a manifest request, blocks 0 to 4.
    fn good_client() -> Vec<u8> {
        let mut v = OPENING.to_vec();
        v.push(b'M');
        v.extend_from_slice(&STREAM.ip().octets());
        v.extend_from_slice(&STREAM.port().to_be_bytes());
        for i in 0..5u32 {
            v.push(b'B');
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }

    #[test]
    fn a_well_formed_exchange_gives_everything() {
        let got = catchup_client(&good_server());
        assert_eq!(got.error, None);
        assert_eq!(got.manifest, Some(12));
        assert_eq!(got.report_port, Some(7000));
        assert_eq!(got.blocks.len(), ASKED as usize);
        assert!(
            got.blocks
                .iter()
                .enumerate()
                .all(|(i, b)| *b == [i as u8; 3])
        );

        let answered = catchup_server(&good_client());
        let mut want = reply(
            0,
            &[REPORT_PORT.to_be_bytes().to_vec(), vec![0x4d; 100]].concat(),
        );
        for i in 0..4u8 {
            want.extend(reply(0, &[i; 100]));
        }
        want.extend(reply(1, &[]));
        assert_eq!(answered, want);
    }

    /// Cut anywhere, or with bytes flipped, neither end panics or hangs; a cut server stream
    /// gives at most what came whole, and a cut client stream is answered at most in full.
    #[test]
    fn cut_or_corrupted_streams_end_cleanly() {
        let (server, client) = (good_server(), good_client());
        let whole = catchup_server(&client);
        for cut in 0..server.len() {
            let got = catchup_client(&server[..cut]);
            assert!(got.error.is_some(), "cut at {cut}: {got:?}");
            assert!(got.blocks.len() < ASKED as usize);
        }
        for cut in 0..client.len() {
            let got = catchup_server(&client[..cut]);
            assert!(whole.starts_with(&got), "cut at {cut}");
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..300 {
            let (mut s, mut c) = (server.clone(), client.clone());
            for _ in 0..1 + next() % 4 {
                let i = next() as usize % s.len();
                s[i] ^= 1 << (next() % 8);
                let i = next() as usize % c.len();
                c[i] = next() as u8;
            }
            let _ = catchup_client(&s);
            let _ = catchup_server(&c);
        }
        // Pure noise.
        for len in [1usize, 5, 64, 4096] {
            let noise: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            assert!(catchup_client(&noise).error.is_some());
            let _ = catchup_server(&noise);
        }
    }
}
