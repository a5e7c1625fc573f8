//! Bidirectional byte copy that holds no buffer while a connection is idle.
//!
//! `tokio::io::copy_bidirectional` gives every connection two 8 KiB buffers for its whole
//! life: 16 KiB per idle connection, and small reads for bulk transfers. Here each
//! direction waits for readiness with no buffer, borrows a 64 KiB buffer from a per-thread
//! pool only while bytes are in flight, and gives it back: idle connections cost their
//! sockets and task, bulk transfers move 64 KiB per system call.
//!
//! Semantics match `copy_bidirectional`: EOF in one direction shuts down the write side
//! of the other socket (half-close) and copying goes on the other way until it ends too;
//! an error in either direction ends both. One difference: the direction that ends last
//! does not shut its write side, as the caller closes both sockets then (see
//! `bidirectional`).

use std::{
    cell::RefCell,
    io,
    os::fd::AsRawFd as _,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll, ready},
};

use nix::sys::socket::MsgFlags;
use prometheus_client::metrics::counter::Counter;
use tokio::{io::Interest, net::TcpStream};

/// Size of a pooled buffer: large enough that a bulk transfer is syscall-cheap.
const BUF: usize = 64 * 1024;
/// Buffers a thread keeps for reuse; more are freed. Bounds idle memory at
/// threads x POOLED x BUF.
const POOLED: usize = 32;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take() -> Box<[u8]> {
    POOL.with(|p| p.borrow_mut().pop()).unwrap_or_else(|| vec![0u8; BUF].into_boxed_slice())
}

fn give(buf: Box<[u8]>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOLED {
            p.push(buf);
        }
    });
}

/// Where the bytes read from one side are counted, besides the returned total.
pub struct Count<'a> {
    /// The connection's entry.
    pub live: &'a AtomicU64,
    /// The endpoint's metric.
    pub metric: &'a Counter,
    /// The golden signals' edges: the connection's route (client workload -> service)
    /// and the endpoint's.
    pub edges: [Option<&'a AtomicU64>; 2],
}

impl Count<'_> {
    pub fn add(&self, n: usize) {
        self.live.fetch_add(n as u64, Ordering::Relaxed);
        self.metric.inc_by(n as u64);
        for e in self.edges.iter().flatten() {
            e.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// Copy both ways until both directions reach EOF, or one fails. Returns bytes copied
/// (a -> b, b -> a).
///
/// The caller closes both sockets when this returns: the half-close of the direction
/// that ends last is left to that close, which sends the same FIN (both receive queues
/// are empty by then, so it is a FIN and not a reset). A `shutdown` there was one system
/// call in 21 per proxied connection, for nothing.
///
/// Not an `async fn`: that would keep its arguments beside the two directions made of
/// them for the connection's whole life. This future is the directions and the two
/// totals, nothing else.
pub fn bidirectional<'a>(
    a: &'a TcpStream,
    b: &'a TcpStream,
    count_a: Option<Count<'a>>,
    count_b: Option<Count<'a>>,
) -> impl Future<Output = io::Result<(u64, u64)>> + 'a {
    let (mut ab, mut ba) = (OneWay::new(a, b, count_a), OneWay::new(b, a, count_b));
    let (mut out, mut back) = (None, None);
    std::future::poll_fn(move |cx| {
        if out.is_none()
            && let Poll::Ready(r) = ab.poll(cx, back.is_some())
        {
            out = Some(r?);
        }
        if back.is_none()
            && let Poll::Ready(r) = ba.poll(cx, out.is_some())
        {
            back = Some(r?);
        }
        match (out, back) {
            (Some(o), Some(b)) => Poll::Ready(Ok((o, b))),
            _ => Poll::Pending,
        }
    })
}

/// One direction, polled by hand rather than written as an `async fn`: it waits on the
/// sockets' own readiness (`poll_read_ready`, `poll_write_ready`: one waker slot per
/// direction in the socket's registration, which the one task running both directions
/// is the only user of), so an idle connection's task carries two of these (80 bytes
/// each) instead of two async frames holding a readiness future each (344 bytes each:
/// most of an idle connection's memory).
struct OneWay<'a> {
    from: &'a TcpStream,
    to: &'a TcpStream,
    count: Option<Count<'a>>,
    /// Bytes read and not yet all written: the borrowed buffer, and how far into it.
    pending: Option<(Box<[u8]>, usize, usize)>,
    total: u64,
}

impl<'a> OneWay<'a> {
    fn new(from: &'a TcpStream, to: &'a TcpStream, count: Option<Count<'a>>) -> Self {
        Self { from, to, count, pending: None, total: 0 }
    }

    /// Until EOF (then the other side's write half is shut, unless this direction is the
    /// `last` to end) or an error; the total copied. Bytes not yet written stay in
    /// `pending` while the task waits, so nothing is lost between polls.
    fn poll(&mut self, cx: &mut Context<'_>, last: bool) -> Poll<io::Result<u64>> {
        loop {
            if let Some((buf, at, end)) = &mut self.pending {
                while *at < *end {
                    ready!(self.to.poll_write_ready(cx))?;
                    match self.to.try_write(&buf[*at..*end]) {
                        Ok(n) => *at += n,
                        // Readiness is cleared: the next wait goes to epoll.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
                if let Some((buf, ..)) = self.pending.take() {
                    give(buf);
                }
            }
            ready!(self.from.poll_read_ready(cx))?;
            let mut buf = take();
            match read_burst(self.from, &mut buf) {
                Ok(0) => {
                    give(buf);
                    // Half-close: tell the other side we are done sending.
                    if !last {
                        let _ = nix::sys::socket::shutdown(self.to.as_raw_fd(), nix::sys::socket::Shutdown::Write);
                    }
                    return Poll::Ready(Ok(self.total));
                }
                Ok(n) => {
                    if let Some(c) = &self.count {
                        c.add(n);
                    }
                    self.total += n as u64;
                    self.pending = Some((buf, 0, n));
                }
                // Spurious readiness, now cleared: wait again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => give(buf),
                Err(e) => {
                    give(buf);
                    return Poll::Ready(Err(e));
                }
            }
        }
    }
}

/// Read what the socket holds. A read that drains it (fewer bytes than the buffer
/// holds: TCP returns short only when its receive queue ran dry) also clears the
/// socket's readiness, so the next wait goes to epoll at once instead of making one more
/// read only to learn that it would block: one system call per burst instead of two
/// (on a keep-alive request and its response, two of the relay's six calls). tokio
/// clears readiness only if no event came in since it was observed, so bytes that
/// arrive after the read still wake the task.
fn read_burst(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut drained = None;
    let read = from.try_io(Interest::READABLE, || {
        // recv, not read: the socket call skips the file layer's work (position lock,
        // permission hooks, the iterator), about 2% of TCP mode's keep-alive samples.
        let n = nix::sys::socket::recv(from.as_raw_fd(), buf, MsgFlags::empty()).map_err(io::Error::from)?;
        if n > 0 && n < buf.len() {
            drained = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (read, drained) {
        (Err(e), Some(n)) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
        (read, _) => read,
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (c, l.accept().await.unwrap().0)
    }

    #[tokio::test]
    async fn copies_both_ways_counts_and_forwards_half_close() {
        // client <-> (a | proxy | b) <-> server
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let (out, inbound) = (AtomicU64::new(0), AtomicU64::new(0));
        let metric = Counter::default();
        let (out_n, inbound_n, metric_n) = (&out, &inbound, &metric);
        // Owns the proxy's sockets and closes them when the copy returns, as the relay
        // does: the last direction's FIN (to the client here) comes from that close.
        let proxy = async move {
            let other = Counter::default();
            let count_a = Some(Count { live: out_n, metric: metric_n, edges: [None, None] });
            let count_b = Some(Count { live: inbound_n, metric: &other, edges: [None, None] });
            bidirectional(&a, &b, count_a, count_b).await
        };
        let peers = async {
            let payload = vec![7u8; 300 * 1024];
            client.write_all(&payload).await.unwrap();
            client.shutdown().await.unwrap(); // half-close towards the server
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap(); // EOF arrives through the proxy
            assert_eq!(got, payload);
            server.write_all(b"reply after half-close").await.unwrap();
            server.shutdown().await.unwrap();
            // A clean EOF, not a reset: the close found nothing unread.
            let mut reply = Vec::new();
            client.read_to_end(&mut reply).await.unwrap();
            assert_eq!(reply, b"reply after half-close");
        };
        let both = async { tokio::join!(proxy, peers) };
        let (copied, ()) = tokio::time::timeout(std::time::Duration::from_secs(10), both)
            .await
            .expect("both directions end and the client sees EOF");
        assert_eq!(copied.unwrap(), (300 * 1024, 22));
        assert_eq!((out.load(Ordering::Relaxed), metric.get()), (300 * 1024, 300 * 1024));
        assert_eq!(inbound.load(Ordering::Relaxed), 22);
    }

    #[tokio::test]
    async fn a_drained_read_still_wakes_for_the_next_bytes() {
        // Many small exchanges: each read drains the socket and clears its readiness, so
        // a lost wake-up would hang here (bounded by the timeout).
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let proxy = tokio::spawn(async move { bidirectional(&a, &b, None, None).await });
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            for i in 0..2000u32 {
                client.write_all(&i.to_be_bytes()).await.unwrap();
                let mut got = [0u8; 4];
                server.read_exact(&mut got).await.unwrap();
                assert_eq!(u32::from_be_bytes(got), i);
                server.write_all(&got).await.unwrap();
                client.read_exact(&mut got).await.unwrap();
            }
        })
        .await
        .expect("every exchange completes");
        drop(client);
        drop(server);
        let copied = proxy.await.unwrap().unwrap();
        assert_eq!(copied, (8000, 8000));
    }

    #[tokio::test]
    async fn a_slow_reader_holds_bytes_back_without_losing_any() {
        // 16 MiB towards a reader that waits before reading and then reads in small
        // pieces: the proxy's writes block with bytes pending, many times over. Every byte
        // must arrive, in order; a pending buffer dropped while waiting would show here.
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let proxy = tokio::spawn(async move { bidirectional(&a, &b, None, None).await });
        let payload: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let mut got = Vec::with_capacity(payload.len());
        let mut piece = [0u8; 1000];
        tokio::time::timeout(std::time::Duration::from_secs(30), async {
            loop {
                let n = server.read(&mut piece).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&piece[..n]);
            }
        })
        .await
        .expect("the copy finishes");
        assert!(got == payload, "{} bytes arrived of {}, or out of order", got.len(), payload.len());
        drop(server);
        drop(writer.await.unwrap());
        let (out, back) = proxy.await.unwrap().unwrap();
        assert_eq!((out, back), (16 << 20, 0));
    }
}
