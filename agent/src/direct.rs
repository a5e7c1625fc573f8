//! Connections the kernel sent straight to an endpoint (`mode: kernel` services, and the
//! fallback while no agent listened), followed from the kernel's connection events: each
//! shows in `/conns` and the close log like a proxied one (`via: kernel`), counts in the
//! same metrics, and feeds its connect result back into the endpoint's health, so an
//! endpoint that refuses is ejected and leaves the kernel's table at the next tick.
//!
//! What the events cannot give: bytes while the connection is open (they come with the
//! close), and a retry of a failed connect (the client sees the failure, as with a direct
//! connection).

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use prometheus_client::metrics::gauge::Gauge;
use switchyard_common::{ConnEventV1, event, tcp_state};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::{
    balance::ActiveGuard,
    proxy::{attempt::Target, upstream::ConnectTime},
    redirect::Events,
    state::{Service, Snapshot},
    stats::{
        ConnHandle, Stats,
        conns::{Route, Via},
        metrics::{Direction, FailReason},
    },
};

/// How often entries whose close was never reported (a full ring) are looked for.
const PRUNE_EVERY: Duration = Duration::from_secs(5);

/// The follower: run it as a background task.
pub struct Direct {
    events: Events,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    stats: Arc<Stats>,
    live: HashMap<u64, Live>,
}

/// A connection between its connect and its close, by socket cookie.
struct Live {
    conn: ConnHandle,
    dst: SocketAddr,
    endpoint: SocketAddr,
    connect_ns: u64,
    open: Option<Open>,
}

/// Once its handshake completed: what it holds against its endpoint.
struct Open {
    service: Arc<Service>,
    index: usize,
    gauge: Gauge,
    /// The endpoint's golden signals: open until the close.
    signals: Arc<crate::stats::signals::Signals>,
    _active: ActiveGuard,
}

impl Direct {
    pub fn new(events: Events, snapshot: watch::Receiver<Arc<Snapshot>>, stats: Arc<Stats>) -> Self {
        Self { events, snapshot, stats, live: HashMap::new() }
    }

    pub async fn run(mut self) {
        let mut batch = Vec::new();
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        loop {
            let read = tokio::select! {
                r = self.events.read(&mut batch) => r,
                _ = prune.tick() => {
                    self.prune();
                    continue;
                }
            };
            if let Err(e) = read {
                warn!(error = %e, "cannot read the kernel's connection events; connections sent straight to endpoints are no longer shown");
                return;
            }
            for ev in batch.drain(..) {
                self.apply(&ev);
            }
        }
    }

    fn apply(&mut self, ev: &ConnEventV1) {
        match ev.kind {
            event::CONNECT => self.connect(ev),
            event::ESTABLISHED => self.established(ev),
            event::CLOSED => self.closed(ev),
            _ => {}
        }
    }

    fn connect(&mut self, ev: &ConnEventV1) {
        let o = &ev.orig;
        let dst = canonical(o.dst.to_socket_addr());
        let conns = &self.stats.conns;
        let conn = conns.open(conns.next_id(), ev.client.to_socket_addr(), Via::Kernel);
        let origin = crate::origin::Origin::recorded(o, dst, o.netns_cookie != self.events.host_netns);
        conn.client(&origin);
        if let Some(service) = self.snapshot.borrow().service_for(dst) {
            conn.service(&service.name);
        }
        let endpoint = canonical(ev.endpoint.to_socket_addr());
        self.live.insert(ev.cookie, Live { conn, dst, endpoint, connect_ns: ev.ts_ns, open: None });
    }

    fn established(&mut self, ev: &ConnEventV1) {
        let Some(live) = self.live.get_mut(&ev.cookie) else { return };
        let snapshot = Arc::clone(&self.snapshot.borrow());
        let Some((dialled, concrete, index)) = locate(&snapshot, live.dst, live.endpoint) else {
            debug!(endpoint = %live.endpoint, "a kernel connection's endpoint is no longer in its service");
            return;
        };
        let metrics = &self.stats.metrics;
        let service = Arc::clone(snapshot.service(concrete));
        let target = Target { service: &service, index };
        let latency = Duration::from_nanos(ev.ts_ns.saturating_sub(live.connect_ns));
        target.connected(metrics, ConnectTime::one(latency));
        let handles = target.handles();
        handles.connections(metrics).inc();
        let gauge = handles.open(metrics).clone();
        gauge.inc();
        let signals = Arc::clone(handles.signals(metrics));
        signals.opened();
        let endpoint = target.endpoint();
        live.conn.connected(Route {
            service: snapshot.service(dialled).name.clone(),
            concrete: service.name.clone(),
            endpoint: endpoint.addr,
            locality: endpoint.tier.name(),
            attempts: 1,
            connect_us: latency.as_micros() as u64,
        });
        let active = endpoint.state.begin();
        live.open = Some(Open { service: Arc::clone(&service), index, gauge, signals, _active: active });
    }

    fn closed(&mut self, ev: &ConnEventV1) {
        let Some(live) = self.live.remove(&ev.cookie) else { return };
        let metrics = &self.stats.metrics;
        match &live.open {
            Some(open) => {
                let handles = Target { service: &open.service, index: open.index }.handles();
                let (out, received) = payload(ev);
                handles.bytes(metrics, Direction::Out).inc_by(out);
                handles.bytes(metrics, Direction::In).inc_by(received);
                let c = live.conn.conn();
                c.bytes_out.store(out, std::sync::atomic::Ordering::Relaxed);
                c.bytes_in.store(received, std::sync::atomic::Ordering::Relaxed);
                for edge in [live.conn.route_edge(), Some(&open.signals)].into_iter().flatten() {
                    edge.bytes_out.fetch_add(out, std::sync::atomic::Ordering::Relaxed);
                    edge.bytes_in.fetch_add(received, std::sync::atomic::Ordering::Relaxed);
                }
                open.gauge.dec();
                open.signals.closed();
            }
            None if ev.old_state == tcp_state::SYN_SENT => {
                let snapshot = Arc::clone(&self.snapshot.borrow());
                if let Some((_, concrete, index)) = locate(&snapshot, live.dst, live.endpoint) {
                    // A reset answers a SYN at once; only unanswered SYNs are retransmitted.
                    let reason = if ev.retrans == 0 { FailReason::Refused } else { FailReason::Timeout };
                    Target { service: snapshot.service(concrete), index }.connect_failed(metrics, reason);
                }
                if let Some(edge) = live.conn.route_edge() {
                    edge.connect_failed();
                }
                live.conn.outcome("connect_failed");
            }
            // Its handshake was never reported (a full ring): nothing to account.
            None => {}
        }
    }

    /// Drop entries whose socket the kernel no longer follows: their close record was
    /// lost. Sockets are checked first and the ring read after, so a close recorded just
    /// before its socket went is still applied.
    fn prune(&mut self) {
        let gone: Vec<u64> = self.live.keys().copied().filter(|&c| !self.events.tracked(c)).collect();
        if gone.is_empty() {
            return;
        }
        let mut batch = Vec::new();
        self.events.read_now(&mut batch);
        for ev in &batch {
            self.apply(ev);
        }
        for cookie in gone {
            if let Some(live) = self.live.remove(&cookie) {
                live.conn.outcome("lost");
                if let Some(open) = &live.open {
                    open.gauge.dec();
                    open.signals.closed();
                }
            }
        }
    }
}

/// (dialled service, concrete service, endpoint index) of a kernel connection.
fn locate(snapshot: &Snapshot, dst: SocketAddr, endpoint: SocketAddr) -> Option<(usize, usize, usize)> {
    let dialled = snapshot.index_for(dst)?;
    let (concrete, index) = snapshot.endpoint_in(dialled, endpoint)?;
    Some((dialled, concrete, index))
}

/// v4-mapped addresses as plain IPv4, as the snapshot keeps them.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The payload bytes (out, in) of a closed connection the kernel sent straight to an
/// endpoint. The kernel's `bytes_acked` and `bytes_received` count sequence space, not
/// data: our SYN (acked on every established connection), our FIN once acked and the
/// peer's FIN once received take one each (an exact test of the byte metrics showed two
/// too many out and one in per connection). Which FINs there were follows from the
/// state the socket closed from. (One that times out in FIN_WAIT2 without the peer's FIN
/// is counted one byte short in; orphans past tcp_fin_timeout are rare.)
fn payload(ev: &ConnEventV1) -> (u64, u64) {
    let (our_fin_acked, peer_fin) = match ev.old_state {
        // Closed after our FIN was acked: through TIME_WAIT (FIN_WAIT2 on the peer's FIN,
        // CLOSING on the last ACK) or from LAST_ACK (the peer closed first).
        tcp_state::FIN_WAIT2 | tcp_state::CLOSING | tcp_state::LAST_ACK => (1, 1),
        // Reset after the peer closed: its FIN came, ours never went.
        tcp_state::CLOSE_WAIT => (0, 1),
        _ => (0, 0),
    };
    (ev.bytes_acked.saturating_sub(1 + our_fin_acked), ev.bytes_received.saturating_sub(peer_fin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_leaves_out_the_syn_and_fins() {
        let ev = |old_state, bytes_acked, bytes_received| ConnEventV1 {
            kind: event::CLOSED,
            old_state,
            bytes_acked,
            bytes_received,
            ..Default::default()
        };
        // 64 bytes each way, both FINs, through TIME_WAIT or LAST_ACK.
        assert_eq!(payload(&ev(tcp_state::FIN_WAIT2, 66, 65)), (64, 64));
        assert_eq!(payload(&ev(tcp_state::LAST_ACK, 66, 65)), (64, 64));
        // Reset while established: the SYN only.
        assert_eq!(payload(&ev(tcp_state::ESTABLISHED, 65, 64)), (64, 64));
        assert_eq!(payload(&ev(tcp_state::CLOSE_WAIT, 65, 65)), (64, 64));
    }
}
