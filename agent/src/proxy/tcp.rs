//! Opaque TCP: one endpoint per connection (with the service's connect retries), the
//! bytes detection read sent first, then a copy both ways until close or the endpoint's
//! drain deadline.

use std::time::Instant;

use bytes::BytesMut;
use tokio::{io::AsyncWriteExt as _, net::TcpStream};
use tracing::{debug, field};

use super::{
    Proxy, copy,
    copy::Count,
    reset,
    upstream::{self, ConnectError, Upstream},
};
use crate::{
    state::{Service, Snapshot},
    stats::{
        ConnHandle, Metrics,
        conns::Route,
        metrics::{BytesLabels, Direction, UnservedLabels},
    },
};

#[allow(clippy::too_many_arguments)]
pub(super) async fn proxy(
    proxy: &Proxy,
    client: TcpStream,
    prefix: BytesMut,
    snapshot: &Snapshot,
    service: &Service,
    key: u64,
    conn: &ConnHandle,
    // Boxed: an async fn keeps room for its arguments for its whole life, and this one's
    // life is mostly an idle copy.
    opened: Option<Box<Result<Upstream<'_>, ConnectError>>>,
) {
    let metrics = &proxy.stats.metrics;
    // Routes are followed per connection; affinity (ring hash) follows the client
    // workload: its cgroup. Detection may have connected already.
    let opened = match opened {
        Some(r) => *r,
        None => {
            let candidates = snapshot.concrete_for(service, Instant::now());
            upstream::connect(&candidates, key, proxy.mark, metrics).await
        }
    };
    let up = match opened {
        Ok(up) => up,
        Err(e) => {
            debug!(error = %e, "no endpoint could be reached; resetting client");
            conn.outcome("no_endpoint");
            metrics.unserved.get_or_create(&UnservedLabels { reason: "no_endpoint".into() }).inc();
            reset(&client);
            return;
        }
    };
    tracing::Span::current().record("endpoint", field::display(up.endpoint.addr));
    debug!(
        concrete = %up.service.name,
        attempts = up.attempts,
        locality = up.tier.name(),
        connect_us = up.connect_latency.as_micros() as u64,
        "connected"
    );
    conn.connected(Route {
        service: service.name.clone(),
        concrete: up.service.name.clone(),
        endpoint: up.endpoint.addr,
        locality: up.tier.name(),
        attempts: up.attempts,
        connect_us: up.connect_latency.as_micros() as u64,
    });
    let mut upstream = up.stream;
    let _ = upstream.set_nodelay(true);
    let drain = up.endpoint.state.drain_token();
    // What detection read goes first; written here, before the long copy phase, whose
    // state every idle connection's task carries.
    if !prefix.is_empty() {
        if let Err(e) = upstream.write_all(&prefix).await {
            debug!(error = %e, "could not send the client's first bytes upstream");
            conn.outcome("error");
            return;
        }
        conn.conn().bytes_out.fetch_add(prefix.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }
    let sent_first = prefix.len() as u64;
    drop(prefix);
    let copy = async {
        if !proxy.stats.enabled {
            return copy::bidirectional(&client, &upstream, None, None).await;
        }
        let labels = Metrics::endpoint(&up.service.name, up.endpoint.addr);
        metrics.connections.get_or_create(&labels).inc();
        let open = metrics.open.get_or_create(&labels).clone();
        open.inc();
        let bytes = |direction| {
            let l = BytesLabels { service: labels.service.clone(), endpoint: labels.endpoint.clone(), direction };
            metrics.bytes.get_or_create(&l).clone()
        };
        // Reads are counted as they happen: client reads are bytes out, upstream reads
        // bytes in.
        let c = conn.conn();
        let out = Count { live: &c.bytes_out, metric: bytes(Direction::Out) };
        out.metric.inc_by(sent_first);
        let inbound = Count { live: &c.bytes_in, metric: bytes(Direction::In) };
        let copied = copy::bidirectional(&client, &upstream, Some(out), Some(inbound)).await;
        open.dec();
        copied
    };
    tokio::select! {
        r = copy => match r {
            Ok((to_upstream, to_client)) => debug!(bytes.out = to_upstream, bytes.in = to_client, "closed"),
            Err(e) => {
                debug!(error = %e, "connection ended with an error");
                conn.outcome("error");
            }
        },
        _ = drain.cancelled() => {
            debug!("endpoint left service and its drain deadline passed; closing");
            conn.outcome("drained");
        }
    }
    drop(up.guard);
}
