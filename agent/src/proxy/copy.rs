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
//! an error in either direction ends both.

use std::{
    cell::RefCell,
    io,
    os::fd::AsRawFd as _,
    sync::atomic::{AtomicU64, Ordering},
};

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
pub async fn bidirectional(
    a: &TcpStream,
    b: &TcpStream,
    count_a: Option<Count<'_>>,
    count_b: Option<Count<'_>>,
) -> io::Result<(u64, u64)> {
    tokio::try_join!(one_way(a, b, count_a), one_way(b, a, count_b))
}

async fn one_way(from: &TcpStream, to: &TcpStream, count: Option<Count<'_>>) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        from.readable().await?;
        let mut buf = take();
        let n = match read_burst(from, &mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                give(buf);
                continue;
            }
            Err(e) => {
                give(buf);
                return Err(e);
            }
        };
        if n == 0 {
            give(buf);
            // Half-close: the peer sees EOF; the other direction keeps going.
            let _ = nix::sys::socket::shutdown(to.as_raw_fd(), nix::sys::socket::Shutdown::Write);
            return Ok(total);
        }
        if let Some(c) = &count {
            c.add(n);
        }
        let written = write_all(to, &buf[..n]).await;
        give(buf);
        written?;
        total += n as u64;
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
        let n = nix::unistd::read(from, buf).map_err(io::Error::from)?;
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

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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
        let proxy = async {
            let other = Counter::default();
            let count_a = Some(Count { live: &out, metric: &metric, edges: [None, None] });
            let count_b = Some(Count { live: &inbound, metric: &other, edges: [None, None] });
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
            let mut reply = Vec::new();
            client.read_to_end(&mut reply).await.unwrap();
            assert_eq!(reply, b"reply after half-close");
        };
        let (copied, ()) = tokio::join!(proxy, peers);
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
}
