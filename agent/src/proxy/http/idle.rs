//! How long a client connection has had no request in flight, for `idle_timeout`.
//!
//! hyper's server closes an HTTP/1 connection that sends no request head within
//! `header_read_timeout`, but has no such limit for HTTP/2, where a client may hold a
//! connection open without streams (and keep it alive with PINGs) for ever. A request is
//! in flight from when hyper hands it to the service until its response body is dropped
//! (sent to the end, or the stream reset), which is also when an HTTP/2 stream ends;
//! Envoy's `idle_timeout` counts the same way.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::{sync::Notify, time::Instant};

/// The requests in flight on one client connection, and when the last one ended.
///
/// Two atomic writes per request and no wake-up: the idle check looks at these when its
/// own timer fires (an idle timeout is coarse; a wake per request, as a watch channel
/// gives, cost the HTTP path measurably). The one wake-up is for the connection's first
/// request, which a draining connection may wait for.
#[derive(Clone)]
pub struct InFlight(Arc<State>);

struct State {
    open: AtomicUsize,
    /// When the last request ended, in milliseconds since `start`.
    last_ms: AtomicU64,
    start: Instant,
    /// Whether any request has begun, and the one wake-up that says so (a draining
    /// connection waits for its first request: see `drain` in `proxy::http`).
    begun: AtomicBool,
    first: Notify,
}

impl InFlight {
    pub fn new() -> Self {
        Self(Arc::new(State {
            open: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            start: Instant::now(),
            begun: AtomicBool::new(false),
            first: Notify::new(),
        }))
    }

    /// Count a request until the returned token is dropped.
    pub fn begin(&self) -> Active {
        self.0.open.fetch_add(1, Ordering::Relaxed);
        if !self.0.begun.load(Ordering::Relaxed) {
            self.0.begun.store(true, Ordering::Release);
            // A permit is kept if no one waits yet, so the waiter cannot miss it.
            self.0.first.notify_one();
        }
        Active(Arc::clone(&self.0))
    }

    /// Whether a request has begun on this connection.
    pub fn begun(&self) -> bool {
        self.0.begun.load(Ordering::Acquire)
    }

    /// Completes once a request has begun (at once if one has).
    pub async fn first_request(&self) {
        if !self.begun() {
            self.0.first.notified().await;
        }
    }

    /// Completes once no request has been in flight for `timeout`.
    pub async fn idle_for(&self, timeout: Duration) {
        let mut deadline = self.0.start + timeout;
        loop {
            tokio::time::sleep_until(deadline).await;
            if self.0.open.load(Ordering::Acquire) > 0 {
                deadline = Instant::now() + timeout;
                continue;
            }
            let idle_since = self.0.start + Duration::from_millis(self.0.last_ms.load(Ordering::Acquire));
            if Instant::now() >= idle_since + timeout {
                return;
            }
            deadline = idle_since + timeout;
        }
    }
}

/// One request in flight (see [`InFlight::begin`]).
pub struct Active(Arc<State>);

impl Drop for Active {
    fn drop(&mut self) {
        // The time first: whoever sees the count drop sees when it did.
        let ms = self.0.start.elapsed().as_millis() as u64;
        self.0.last_ms.fetch_max(ms, Ordering::Release);
        self.0.open.fetch_sub(1, Ordering::Release);
    }
}

/// A response body that keeps its request counted as in flight until it is dropped.
pub struct Tracked<B> {
    inner: B,
    _active: Active,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, active: Active) -> Self {
        Self { inner, _active: active }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_when_the_last_request_ends() {
        let t0 = Instant::now();
        let flight = InFlight::new();
        let a = flight.begin();
        let b = flight.begin();
        let f = flight.clone();
        let idle = tokio::spawn(async move {
            f.idle_for(Duration::from_secs(10)).await;
            Instant::now()
        });
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(a);
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(b);
        // A request that comes and goes restarts the count.
        tokio::time::sleep(Duration::from_secs(8)).await;
        drop(flight.begin());
        let done = idle.await.unwrap();
        assert_eq!(done - t0, Duration::from_secs(30 + 5 + 8 + 10));
    }
}
