//! The HTTP server's listener: a bounded number of connections, each closed once it has been
//! idle too long.
//!
//! `axum::serve` holds every connection for as long as its peer likes (hyper's header-read
//! timeout needs a timer that `axum::serve` does not set), so a host that opens connections
//! and sends nothing, or keeps them alive unused, could take every descriptor of the process
//! that also answers DHCP and TFTP (a TFTP transfer needs a socket of its own). Here at most
//! [`Limits::max_connections`] are open at once (the next accept waits for one to close; the
//! kernel's backlog holds newcomers meanwhile), and a connection that moves no byte either way
//! for [`Limits::idle`] is closed: an idle keep-alive connection, a request that never ends,
//! a client that stopped reading a download.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// How many connections, and how long one may idle.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// A connection that moves no byte for this long is closed.
    pub idle: Duration,
}

impl Default for Limits {
    /// 1,024 connections (an iPXE client holds one or two while it boots), 60 s idle.
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            idle: Duration::from_secs(60),
        }
    }
}

/// A [`TcpListener`] that hands out at most `max_connections` connections at once, each an
/// [`Idle`] stream.
#[derive(Debug)]
pub struct Guarded {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    idle: Duration,
}

impl Guarded {
    /// Guards `inner` with `limits`.
    pub fn new(inner: TcpListener, limits: Limits) -> Self {
        Guarded {
            inner,
            slots: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            idle: limits.idle,
        }
    }
}

impl axum::serve::Listener for Guarded {
    type Io = Idle;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Idle, SocketAddr) {
        let slot = match self.slots.clone().acquire_owned().await {
            Ok(s) => s,
            // The semaphore is never closed.
            Err(_) => std::future::pending().await,
        };
        loop {
            match self.inner.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    return (Idle::new(stream, slot, self.idle), peer);
                }
                // A connection that failed before it was accepted concerns nobody else.
                Err(e) if is_connection_error(&e) => {}
                // Out of descriptors or memory: wait, as `axum::serve` does.
                Err(e) => {
                    tracing::error!(error = %e, "HTTP accept failed; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// A connection that fails its reads and writes with `TimedOut` once no byte has moved either
/// way for its idle time, and gives its slot back when dropped.
#[derive(Debug)]
pub struct Idle {
    inner: TcpStream,
    idle: Duration,
    /// When a byte last moved (kept cheaply on every read and write; the timer is moved to
    /// it only when it fires).
    last: Instant,
    deadline: Pin<Box<Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl Idle {
    fn new(inner: TcpStream, slot: OwnedSemaphorePermit, idle: Duration) -> Self {
        Idle {
            inner,
            idle,
            last: Instant::now(),
            deadline: Box::pin(tokio::time::sleep(idle)),
            _slot: slot,
        }
    }

    /// The connection.
    pub fn get_ref(&self) -> &TcpStream {
        &self.inner
    }

    fn moved(&mut self) {
        self.last = Instant::now();
    }

    /// What a pending read or write comes to: still pending, or timed out.
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        loop {
            if self.deadline.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let due = self.last + self.idle;
            if due <= Instant::now() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no byte moved for {:?}", self.idle),
                )));
            }
            // Bytes moved since the timer was set: it runs from the last of them.
            self.deadline.as_mut().reset(due);
        }
    }

    /// What a read or write of the connection comes to: `moved` says whether its result
    /// moved a byte.
    fn settle<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<T>>,
        moved: impl FnOnce(&T) -> bool,
    ) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(Ok(v)) => {
                if moved(&v) {
                    self.moved();
                }
                Poll::Ready(Ok(v))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.pending(cx),
        }
    }
}

impl AsyncRead for Idle {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let after = buf.filled().len();
        this.settle(cx, r, |()| after > before)
    }
}

impl AsyncWrite for Idle {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.settle(cx, r, |&n| n > 0)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.settle(cx, r, |&n| n > 0)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves a one-route router through a guarded listener with `limits`.
    async fn start(limits: Limits) -> (SocketAddr, tokio_util::sync::CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/x", axum::routing::get(|| async { "served\n" }));
        let cancel = tokio_util::sync::CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            axum::serve(Guarded::new(listener, limits), app)
                .with_graceful_shutdown(async move { c.cancelled().await })
                .await
        });
        (addr, cancel)
    }

    /// One request on a new connection: the body, or `None` when nothing came back.
    async fn get(addr: SocketAddr) -> Option<String> {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /x HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.ok()?;
        answer.ends_with("served\n").then_some(answer)
    }

    /// Reads until the peer closes; how long that took, or `None` past `within`.
    async fn closed_after(s: &mut TcpStream, within: Duration) -> Option<Duration> {
        let t0 = Instant::now();
        let mut sink = Vec::new();
        tokio::time::timeout(within, s.read_to_end(&mut sink))
            .await
            .ok()
            .map(|_| t0.elapsed())
    }

    #[tokio::test]
    async fn a_connection_that_moves_nothing_is_closed_after_its_idle_time() {
        let (addr, cancel) = start(Limits {
            max_connections: 8,
            idle: Duration::from_millis(300),
        })
        .await;
        // Sends nothing at all.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        // Sends half a request line and stops.
        let mut partial = TcpStream::connect(addr).await.unwrap();
        partial.write_all(b"GET /x HT").await.unwrap();
        // A request, then the connection kept alive unused.
        let mut kept = TcpStream::connect(addr).await.unwrap();
        kept.write_all(b"GET /x HTTP/1.1\r\nhost: t\r\n\r\n")
            .await
            .unwrap();
        for (name, s) in [
            ("silent", &mut silent),
            ("partial", &mut partial),
            ("kept alive", &mut kept),
        ] {
            let took = closed_after(s, Duration::from_secs(5))
                .await
                .unwrap_or_else(|| panic!("{name}: still open after 5 s"));
            assert!(took < Duration::from_secs(2), "{name}: {took:?}");
        }
        assert!(get(addr).await.is_some(), "the server still serves");
        cancel.cancel();
    }

    #[tokio::test]
    async fn past_the_limit_a_connection_waits_for_a_slot() {
        let (addr, cancel) = start(Limits {
            max_connections: 2,
            idle: Duration::from_millis(800),
        })
        .await;
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Both slots taken by silent connections: a request waits until one is closed.
        let t0 = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(5), get(addr))
            .await
            .expect("served once a slot is free");
        assert!(answer.is_some());
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(500),
            "served at once with every slot taken: {waited:?}"
        );
        // With the silent ones gone, at once.
        drop(held);
        let t0 = Instant::now();
        assert!(get(addr).await.is_some());
        assert!(t0.elapsed() < Duration::from_millis(500));
        cancel.cancel();
    }
}
