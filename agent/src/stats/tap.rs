//! Live tap: requests (and opaque connections) as they happen, for `switchyard tap` and
//! the dashboard. Nothing is built while nobody taps (one atomic load per request);
//! while someone does, events are sent at most [`MAX_PER_SECOND`] a second in all (the
//! rest are counted as dropped), through a bounded broadcast channel, so a tap never
//! slows the data path: a slow reader loses events, the proxy never waits.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tokio::sync::broadcast;

use super::conns::Client;

/// Events sent per second at most, over every tap.
pub const MAX_PER_SECOND: u64 = 2000;
/// Events a tap may fall behind by before it loses some.
const BUFFER: usize = 4096;

/// One thing that happened.
#[derive(Debug, Clone, Serialize)]
pub struct TapEvent {
    /// `request` (an HTTP or gRPC exchange, at its end), `connect` or `close` (an opaque
    /// connection).
    pub kind: &'static str,
    pub at_unix_ms: u64,
    pub client: TapClient,
    pub service: String,
    pub endpoint: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<TapRequest>,
    /// Requests: to the response headers. Connections: connect time (`connect`) or the
    /// connection's life (`close`).
    pub latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_out: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_in: Option<u64>,
    /// `close`: how the connection ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TapClient {
    pub workload: String,
    pub pod: Option<String>,
    pub pid: u32,
    pub comm: String,
    pub addr: SocketAddr,
}

impl TapClient {
    pub fn of(client: Option<&Client>, addr: SocketAddr) -> Self {
        Self {
            workload: client.map(|c| c.workload()).unwrap_or_default(),
            pod: client.and_then(|c| c.pod_name()),
            pid: client.map_or(0, |c| c.pid),
            comm: client.map(|c| c.comm.to_string()).unwrap_or_default(),
            addr,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TapRequest {
    pub method: String,
    pub authority: String,
    pub path: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u16>,
    pub success: bool,
}

#[derive(Debug)]
pub struct Tap {
    taps: AtomicUsize,
    tx: broadcast::Sender<Arc<TapEvent>>,
    /// The second being counted (unix seconds) and events sent in it.
    second: AtomicU64,
    sent: AtomicU64,
    pub dropped: AtomicU64,
}

impl Default for Tap {
    fn default() -> Self {
        Self {
            taps: AtomicUsize::new(0),
            tx: broadcast::channel(BUFFER).0,
            second: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Tap {
    /// Whether anyone taps: only then are events built.
    pub fn active(&self) -> bool {
        self.taps.load(Relaxed) > 0
    }

    /// Send `event` to every tap, unless this second's allowance is spent.
    pub fn send(&self, event: TapEvent) {
        let second = event.at_unix_ms / 1000;
        if self.second.swap(second, Relaxed) != second {
            self.sent.store(0, Relaxed);
        }
        if self.sent.fetch_add(1, Relaxed) >= MAX_PER_SECOND {
            self.dropped.fetch_add(1, Relaxed);
            return;
        }
        let _ = self.tx.send(Arc::new(event));
    }

    /// A new tap: events from now on, until it is dropped.
    pub fn subscribe(self: &Arc<Self>) -> Subscription {
        self.taps.fetch_add(1, Relaxed);
        Subscription { rx: self.tx.subscribe(), tap: Arc::clone(self) }
    }
}

/// One tap's events; the tap ends when this is dropped.
pub struct Subscription {
    pub rx: broadcast::Receiver<Arc<TapEvent>>,
    tap: Arc<Tap>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.tap.taps.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(at_unix_ms: u64) -> TapEvent {
        TapEvent {
            kind: "connect",
            at_unix_ms,
            client: TapClient::of(None, "127.0.0.1:1".parse().unwrap()),
            service: "web".into(),
            endpoint: None,
            request: None,
            latency_ms: 0.0,
            bytes_out: None,
            bytes_in: None,
            outcome: None,
        }
    }

    #[test]
    fn taps_see_events_within_the_allowance_and_end_when_dropped() {
        let tap = Arc::new(Tap::default());
        assert!(!tap.active());
        let mut sub = tap.subscribe();
        assert!(tap.active());
        for _ in 0..MAX_PER_SECOND + 10 {
            tap.send(event(5_000));
        }
        tap.send(event(6_000));
        let mut got = 0;
        while sub.rx.try_recv().is_ok() {
            got += 1;
        }
        assert_eq!(got, MAX_PER_SECOND + 1, "the allowance, then the next second's first");
        assert_eq!(tap.dropped.load(Relaxed), 10);
        drop(sub);
        assert!(!tap.active());
    }
}
