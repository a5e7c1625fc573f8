//! Lingering close for client connections the agent ends (nginx's `lingering_close`).
//!
//! When the agent ends an HTTP connection (HTTP/2 after its GOAWAY and last stream, an
//! HTTP/1.1 connection at a drain or timeout), the client may still be writing: an HTTP/2
//! client acknowledges the last DATA frames with WINDOW_UPDATE, a PING ACK crosses the
//! GOAWAY. Closing a socket with unread bytes makes the kernel answer with RST instead of
//! FIN, and the client's next write fails (EPIPE) though its response came whole; some
//! stacks also drop what they had received but not yet read. So after the agent's FIN,
//! read and discard until the client closes too, bounded in time and bytes. A client
//! that closed first (its EOF already read) is not waited for.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Sleep,
};

/// How long a closing connection waits for the client's own close. Clients on the node
/// close within a scheduling delay of reading the FIN; one that never reads is not
/// waited for longer than this (nginx waits up to 5 s per read, 30 s in all).
const LINGER: Duration = Duration::from_secs(2);
/// What a closing connection discards at most before it closes anyway.
const LINGER_BYTES: usize = 256 * 1024;

pub struct Lingering<T> {
    inner: T,
    state: State,
}

enum State {
    Open,
    /// The client closed its side: nothing will come that could turn the close into RST.
    ClientClosed,
    /// FIN sent; discarding what the client still sends until its close or the deadline.
    Draining {
        deadline: Pin<Box<Sleep>>,
        discarded: usize,
    },
    Closed,
}

impl<T> Lingering<T> {
    pub fn new(inner: T) -> Self {
        Self { inner, state: State::Open }
    }

    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Lingering<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if buf.filled().len() == before && buf.remaining() > 0 && matches!(this.state, State::Open) {
            this.state = State::ClientClosed;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Lingering<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    /// Send FIN, then (unless the client closed first) drain until the client's close.
    /// The connection's task ends only then, so an agent draining for a hand-over waits
    /// for it too (within its drain deadline).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Open | State::ClientClosed => {
                    ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
                    this.state = match this.state {
                        State::Open => State::Draining { deadline: Box::pin(tokio::time::sleep(LINGER)), discarded: 0 },
                        _ => State::Closed,
                    };
                }
                State::Draining { deadline, discarded } => {
                    if deadline.as_mut().poll(cx).is_ready() {
                        this.state = State::Closed;
                        continue;
                    }
                    let mut scratch = [0u8; 4096];
                    let mut buf = ReadBuf::new(&mut scratch);
                    match ready!(Pin::new(&mut this.inner).poll_read(cx, &mut buf)) {
                        Ok(()) if !buf.filled().is_empty() && *discarded < LINGER_BYTES => {
                            *discarded += buf.filled().len();
                        }
                        // The client's close (or an error, or too much): done.
                        _ => this.state = State::Closed,
                    }
                }
                State::Closed => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    async fn pair() -> (TcpStream, Lingering<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, Lingering::new(server))
    }

    /// The case this exists for: the client writes after the server's last bytes and
    /// before it sees the FIN. Without lingering the server's close with those bytes
    /// unread sends RST and the client's next write fails.
    #[tokio::test]
    async fn a_client_writing_as_the_agent_closes_gets_fin_not_rst() {
        let (mut client, mut server) = pair().await;
        server.write_all(b"last response").await.unwrap();
        client.write_all(b"window update").await.unwrap();
        let closing = tokio::spawn(async move {
            server.shutdown().await.unwrap();
            drop(server);
        });
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("a clean EOF, no reset");
        assert_eq!(got, b"last response");
        // Written after the FIN came: the server still reads, so no RST comes back.
        client.write_all(b"late ack").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!closing.is_finished(), "the agent waits for the client's close");
        client.write_all(b"another").await.expect("no reset while the agent lingers");
        drop(client);
        tokio::time::timeout(Duration::from_secs(1), closing).await.expect("done at the client's close").unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_closes_is_waited_for_at_most_the_linger_time() {
        let (_client, mut server) = pair().await;
        let t0 = tokio::time::Instant::now();
        server.shutdown().await.unwrap();
        let waited = t0.elapsed();
        assert!(waited >= LINGER && waited < LINGER * 2, "{waited:?}");
    }

    #[tokio::test]
    async fn a_client_that_closed_first_is_not_waited_for() {
        let (client, mut server) = pair().await;
        drop(client);
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        tokio::time::timeout(Duration::from_millis(100), server.shutdown()).await.expect("no linger").unwrap();
    }
}
