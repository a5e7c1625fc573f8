//! Byte counting at the socket, for HTTP: what crosses the wire (request and status
//! lines, headers, framing and bodies), so that an HTTP connection's counts mean what an
//! opaque one's do (whose relay counts every byte it copies). The client's side counts
//! into its connection entry and route edge, an upstream connection's into its
//! endpoint's metrics.

use std::{
    io::{self, IoSlice},
    pin::Pin,
    sync::{Arc, atomic::Ordering::Relaxed},
    task::{Context, Poll, ready},
};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::stats::{conns::Conn, signals::Signals};

/// Where one stream's bytes are counted (cloned for the two halves of a split socket).
#[derive(Clone)]
pub enum Tally {
    /// The client's connection: reads are bytes out (towards the service).
    Client { conn: Arc<Conn>, route: Option<Arc<Signals>> },
    /// An upstream connection: writes are bytes out, reads bytes in; into the endpoint's
    /// metrics and signals.
    Endpoint { out: Counter, inbound: Counter, signals: Arc<Signals> },
}

impl Tally {
    /// The client's side of `conn`, with its route edge.
    pub fn client(conn: &Arc<Conn>) -> Self {
        Tally::Client { conn: Arc::clone(conn), route: conn.route_edge().cloned() }
    }

    pub(crate) fn read(&self, n: usize) {
        let n = n as u64;
        match self {
            Tally::Client { conn, route } => {
                conn.bytes_out.fetch_add(n, Relaxed);
                if let Some(r) = route {
                    r.bytes_out.fetch_add(n, Relaxed);
                }
            }
            Tally::Endpoint { inbound, signals, .. } => {
                inbound.inc_by(n);
                signals.bytes_in.fetch_add(n, Relaxed);
            }
        }
    }

    pub(crate) fn written(&self, n: usize) {
        let n = n as u64;
        match self {
            Tally::Client { conn, route } => {
                conn.bytes_in.fetch_add(n, Relaxed);
                if let Some(r) = route {
                    r.bytes_in.fetch_add(n, Relaxed);
                }
            }
            Tally::Endpoint { out, signals, .. } => {
                out.inc_by(n);
                signals.bytes_out.fetch_add(n, Relaxed);
            }
        }
    }
}

/// `inner`, counted (not at all without a tally: stats off).
pub struct Counted<T> {
    inner: T,
    tally: Option<Tally>,
}

impl<T> Counted<T> {
    pub fn new(inner: T, tally: Option<Tally>) -> Self {
        Self { inner, tally }
    }

    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if let Some(t) = &this.tally {
            t.read(buf.filled().len() - before);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        if let Some(t) = &this.tally {
            t.written(n);
        }
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        if let Some(t) = &this.tally {
            t.written(n);
        }
        Poll::Ready(Ok(n))
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
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn reads_and_writes_are_counted_as_they_cross() {
        let (a, mut b) = tokio::io::duplex(1024);
        let (out, inbound) = (Counter::default(), Counter::default());
        let tally = Tally::Endpoint { out: out.clone(), inbound: inbound.clone(), signals: Arc::default() };
        let mut counted = Counted::new(a, Some(tally));
        counted.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        b.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let n = counted.read(&mut buf).await.unwrap();
        assert_eq!((out.get(), inbound.get()), (18, n as u64));
        assert_eq!(n, 17);
    }
}
