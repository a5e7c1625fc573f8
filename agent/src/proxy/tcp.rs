//! Opaque TCP once connected: the bytes detection read go first, then a counted copy
//! both ways until close or the endpoint's drain deadline. Tunnels (HTTP upgrades and
//! CONNECT) use the same copy (`relay`).

use std::sync::atomic::Ordering;

use futures::FutureExt as _;
use tokio::{io::AsyncWriteExt as _, net::TcpStream};
use tracing::debug;

use super::{Proxy, Relay, copy, copy::Count, outcome::Outcome, upstream::Upstream};
use prometheus_client::metrics::counter::Counter;

use crate::stats::{ConnHandle, conns::Conn, metrics::Direction, signals::Signals};

/// Send what detection read from the client to the upstream opened for it, counted as
/// the relay counts. Done before the relay phase (by `decide`), so that the state of this
/// write is not part of the long copy phase every idle connection's task carries.
pub(super) async fn send_first(
    proxy: &Proxy,
    up: &mut Upstream,
    prefix: &[u8],
    conn: &ConnHandle,
) -> Result<(), Outcome> {
    if prefix.is_empty() {
        return Ok(());
    }
    if let Err(e) = up.stream.write_all(prefix).await {
        debug!(error = %e, "could not send the client's first bytes upstream");
        return Err(Outcome::Error);
    }
    let n = prefix.len() as u64;
    conn.conn().bytes_out.fetch_add(n, Ordering::Relaxed);
    if let Some(r) = conn.route_edge() {
        r.bytes_out.fetch_add(n, Ordering::Relaxed);
    }
    if proxy.stats.enabled {
        let (metrics, h) = (&proxy.stats.metrics, up.service.endpoint_metrics(up.index));
        h.bytes(metrics, Direction::Out).inc_by(n);
        h.signals(metrics).bytes_out.fetch_add(n, Ordering::Relaxed);
    }
    Ok(())
}

/// Proxy an opaque connection to the upstream that was opened for it (and recorded in
/// the connection table by the caller), until both sides close or the endpoint's drain
/// deadline passes.
///
/// The relay's parts are used where they lie in `opened`, never moved out: an async fn
/// keeps its arguments for its whole life, so a part moved into a local would be held
/// twice by every idle connection's task. (Boxed for the same reason: an async fn also
/// keeps a copy of each argument beside the argument itself, and the caller the value
/// it matched to get it.)
pub(super) async fn proxy(proxy: &Proxy, opened: Box<Relay>, conn: &ConnHandle) -> Outcome {
    let (client, up) = (&opened.client, &opened.upstream);
    // The guard in `opened.upstream` counts the connection against its endpoint until
    // this returns.
    let drain = up.endpoint().state.drain_token();
    let handles = proxy.stats.enabled.then(|| up.service.endpoint_metrics(up.index));
    let metrics = &proxy.stats.metrics;
    let copy = async {
        let Some(h) = handles else { return relay(client, &up.stream, None).await };
        h.connections(metrics).inc();
        let open = h.open(metrics);
        open.inc();
        let endpoint = h.signals(metrics);
        endpoint.opened();
        let meters = Meters {
            conn: conn.conn(),
            out: h.bytes(metrics, Direction::Out),
            inbound: h.bytes(metrics, Direction::In),
            endpoint: Some(endpoint),
        };
        let outcome = relay(client, &up.stream, Some(meters)).await;
        open.dec();
        endpoint.closed();
        outcome
    };
    tokio::select! {
        outcome = copy => outcome,
        _ = drain.cancelled() => {
            debug!("endpoint left service and its drain deadline passed; closing");
            Outcome::Drained
        }
    }
}

/// Where relayed bytes are counted: the connection's entry and route, the endpoint's
/// metrics and signals.
pub(super) struct Meters<'a> {
    pub conn: &'a Conn,
    pub out: &'a Counter,
    pub inbound: &'a Counter,
    pub endpoint: Option<&'a Signals>,
}

/// Copy both ways until both sides close, counting bytes as they move (reads from the
/// client are bytes out, reads from upstream bytes in).
///
/// Not an `async fn`, for the reason `copy::bidirectional` gives: the future is the copy
/// and nothing kept beside it (every idle connection's task holds it).
pub(super) fn relay<'a>(
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    meters: Option<Meters<'a>>,
) -> impl Future<Output = Outcome> + 'a {
    let counts = meters.map(|m| {
        let (route, endpoint) = (m.conn.route_edge(), m.endpoint);
        let out = Count {
            live: &m.conn.bytes_out,
            metric: m.out,
            edges: [route.map(|r| &r.bytes_out), endpoint.map(|e| &e.bytes_out)],
        };
        let inbound = Count {
            live: &m.conn.bytes_in,
            metric: m.inbound,
            edges: [route.map(|r| &r.bytes_in), endpoint.map(|e| &e.bytes_in)],
        };
        (out, inbound)
    });
    let (out, inbound) = counts.unzip();
    copy::bidirectional(client, upstream, out, inbound).map(|copied| match copied {
        Ok((to_upstream, to_client)) => {
            debug!(bytes.out = to_upstream, bytes.in = to_client, "closed");
            Outcome::Closed
        }
        Err(e) => {
            debug!(error = %e, "connection ended with an error");
            Outcome::Error
        }
    })
}
