//! Opaque TCP once connected: the bytes detection read go first, then a counted copy
//! both ways until close or the endpoint's drain deadline. Tunnels (HTTP upgrades and
//! CONNECT) use the same copy (`relay`).

use std::sync::atomic::Ordering;

use tokio::{io::AsyncWriteExt as _, net::TcpStream};
use tracing::debug;

use super::{Proxy, Relay, copy, copy::Count, outcome::Outcome, upstream::Upstream};
use prometheus_client::metrics::counter::Counter;

use crate::stats::{ConnHandle, conns::Conn, metrics::Direction, signals::Signals};

/// Proxy an opaque connection to the upstream that was opened for it (and recorded in
/// the connection table by the caller).
/// (Taken whole: what the caller moves in, it does not also keep.)
pub(super) async fn proxy(proxy: &Proxy, opened: Relay, conn: &ConnHandle) -> Outcome {
    let Relay { client, prefix, upstream: up } = opened;
    let drain = up.endpoint().state.drain_token();
    // The guard counts the connection against its endpoint until this returns.
    let Upstream { stream: mut upstream, service, index, guard: _guard, .. } = up;
    let handles = proxy.stats.enabled.then(|| service.endpoint_metrics(index));
    let _ = upstream.set_nodelay(true);
    let metrics = &proxy.stats.metrics;
    // What detection read goes first; written here, before the long copy phase, whose
    // state every idle connection's task carries.
    if !prefix.is_empty() {
        if let Err(e) = upstream.write_all(&prefix).await {
            debug!(error = %e, "could not send the client's first bytes upstream");
            return Outcome::Error;
        }
        conn.conn().bytes_out.fetch_add(prefix.len() as u64, Ordering::Relaxed);
        if let Some(r) = conn.route_edge() {
            r.bytes_out.fetch_add(prefix.len() as u64, Ordering::Relaxed);
        }
        if let Some(h) = handles {
            h.bytes(metrics, Direction::Out).inc_by(prefix.len() as u64);
            h.signals(metrics).bytes_out.fetch_add(prefix.len() as u64, Ordering::Relaxed);
        }
    }
    drop(prefix);
    let copy = async {
        let Some(h) = handles else { return relay(&client, &upstream, None).await };
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
        let outcome = relay(&client, &upstream, Some(meters)).await;
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
pub(super) async fn relay(client: &TcpStream, upstream: &TcpStream, meters: Option<Meters<'_>>) -> Outcome {
    let copied = match meters {
        None => copy::bidirectional(client, upstream, None, None).await,
        Some(m) => {
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
            copy::bidirectional(client, upstream, Some(out), Some(inbound)).await
        }
    };
    match copied {
        Ok((to_upstream, to_client)) => {
            debug!(bytes.out = to_upstream, bytes.in = to_client, "closed");
            Outcome::Closed
        }
        Err(e) => {
            debug!(error = %e, "connection ended with an error");
            Outcome::Error
        }
    }
}
