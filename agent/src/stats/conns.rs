//! The live connection table: one entry per proxied connection from accept to close, with
//! who opened it, where it went and how many bytes moved so far (updated as bytes move,
//! not at close). Entries are removed, and a structured close line logged, when the
//! connection task drops its [`ConnHandle`].

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tracing::info;

use super::{
    signals::{Edges, Signals},
    tap::{Tap, TapClient, TapEvent},
};
use crate::{
    origin::Comm,
    workload::{Identity, Workloads},
};

/// Lifecycle of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum ConnState {
    /// Accepted; finding the original destination and service.
    Resolving = 0,
    /// Connecting upstream (possibly retrying).
    Connecting = 1,
    /// Bytes flowing.
    Open = 2,
}

/// Which path a connection's bytes take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// Through the agent, which proxies it.
    #[default]
    Agent,
    /// Straight from the client to the endpoint (`mode: kernel`, or the fallback): the
    /// agent follows it from the kernel's events, and learns its bytes at close.
    Kernel,
}

/// Who opened the connection, from the kernel's record at connect time, and who that
/// is (one shared [`Identity`] per cgroup: an idle connection carries a pointer, not
/// copies of names).
#[derive(Debug, Clone)]
pub struct Client {
    pub pid: u32,
    pub comm: Comm,
    pub cgroup_id: u64,
    pub original_dst: SocketAddr,
    /// Cookie of the client's network namespace (the kernel's `SO_NETNS_COOKIE`).
    pub netns: u64,
    /// True when that is not the agent's namespace: a pod.
    pub pod: bool,
    pub identity: Arc<Identity>,
}

impl Client {
    /// The client the kernel recorded (`origin`), who is `identity`.
    pub fn new(origin: &crate::origin::Origin, identity: Arc<Identity>) -> Self {
        Self {
            pid: origin.pid,
            comm: origin.comm,
            cgroup_id: origin.cgroup_id,
            original_dst: origin.dst,
            netns: origin.netns,
            pod: origin.pod,
            identity,
        }
    }

    /// As the operator names it: `shop/deployment/web`, `systemd/nginx.service`.
    pub fn workload(&self) -> String {
        self.identity.workload.display()
    }

    /// The pod, `namespace/name`, on a Kubernetes node.
    pub fn pod_name(&self) -> Option<String> {
        self.identity.pod.as_ref().map(|p| format!("{}/{}", p.namespace, p.name))
    }

    fn view(&self) -> ClientView {
        ClientView {
            pid: self.pid,
            comm: self.comm.to_string(),
            cgroup_id: self.cgroup_id,
            cgroup: self.identity.cgroup.clone(),
            workload: self.workload(),
            pod_name: self.pod_name(),
            container: self.identity.pod.as_ref().and_then(|p| p.container.clone()),
            original_dst: self.original_dst,
            netns: self.netns,
            pod: self.pod,
        }
    }
}

/// What `/conns` shows of a client.
#[derive(Debug, Clone, Serialize)]
pub struct ClientView {
    pub pid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    /// The cgroup path below the cgroup2 mount.
    pub cgroup: Option<String>,
    pub workload: String,
    /// The pod (`namespace/name`) and container, on a Kubernetes node.
    pub pod_name: Option<String>,
    pub container: Option<String>,
    pub original_dst: SocketAddr,
    pub netns: u64,
    pub pod: bool,
}

/// Where it went. (Service names are the snapshot's own, shared: no copy per connection.)
#[derive(Debug, Clone, Serialize)]
pub struct Route {
    pub service: Arc<str>,
    /// The concrete service, when routes led elsewhere.
    pub concrete: Arc<str>,
    pub endpoint: SocketAddr,
    pub locality: &'static str,
    pub attempts: u32,
    pub connect_us: u64,
}

#[derive(Debug)]
pub struct Conn {
    pub id: u64,
    pub peer: SocketAddr,
    /// When it was accepted (the wall-clock time `/conns` shows is worked out from it).
    started_at: Instant,
    via: Via,
    state: AtomicU8,
    client: OnceLock<Client>,
    service: OnceLock<Arc<str>>,
    route: OnceLock<Route>,
    /// Its route edge (client workload -> service), once the service is known.
    edge: OnceLock<Arc<Signals>>,
    outcome: OnceLock<&'static str>,
    /// What detection found: `http/1`, `h2`, `tls`, `tcp`.
    protocol: OnceLock<&'static str>,
    /// TLS: the server name in the ClientHello.
    sni: OnceLock<String>,
    /// HTTP: requests so far (each balanced on its own).
    pub requests: AtomicU64,
    pub bytes_out: AtomicU64,
    pub bytes_in: AtomicU64,
}

/// What `/conns` shows of one connection.
#[derive(Debug, Clone, Serialize)]
pub struct ConnView {
    pub id: u64,
    pub state: ConnState,
    pub via: Via,
    pub peer: SocketAddr,
    pub client: Option<ClientView>,
    pub service: Option<Arc<str>>,
    pub route: Option<Route>,
    pub protocol: Option<&'static str>,
    pub sni: Option<String>,
    pub requests: u64,
    pub started_unix_ms: u128,
    pub age_ms: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
}

impl Conn {
    /// Its route edge (client workload -> service), once the service is known.
    pub fn route_edge(&self) -> Option<&Arc<Signals>> {
        self.edge.get()
    }

    /// Who opened it, once known.
    pub fn client(&self) -> Option<&Client> {
        self.client.get()
    }

    pub fn view(&self) -> ConnView {
        let state = match self.state.load(Ordering::Relaxed) {
            0 => ConnState::Resolving,
            1 => ConnState::Connecting,
            _ => ConnState::Open,
        };
        let age = self.started_at.elapsed();
        ConnView {
            id: self.id,
            state,
            via: self.via,
            peer: self.peer,
            client: self.client.get().map(Client::view),
            service: self.service.get().cloned(),
            route: self.route.get().cloned(),
            protocol: self.protocol.get().copied(),
            sni: self.sni.get().cloned(),
            requests: self.requests.load(Ordering::Relaxed),
            started_unix_ms: SystemTime::now()
                .checked_sub(age)
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis()),
            age_ms: age.as_millis() as u64,
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
        }
    }
}

/// Every open connection, by id.
#[derive(Debug)]
pub struct ConnTable {
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    workloads: Arc<Workloads>,
    /// Where connections are counted by route (client workload -> service).
    edges: Arc<Edges>,
    /// Opaque connections are tapped as they connect and close.
    pub tap: Arc<Tap>,
    /// Off: handles are not registered and log nothing at close.
    enabled: bool,
}

impl ConnTable {
    /// `workloads`: who clients are, by cgroup; `edges`: where routes are counted.
    pub fn new(workloads: Arc<Workloads>, edges: Arc<Edges>, enabled: bool) -> Self {
        let conns = Mutex::new(HashMap::new());
        Self { conns, next_id: AtomicU64::new(1), workloads, edges, tap: Arc::default(), enabled }
    }

    /// An id for a new connection, unique for the agent's life.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Register a just-accepted connection (`via` the agent), or one the kernel reported.
    pub fn open(self: &Arc<Self>, id: u64, peer: SocketAddr, via: Via) -> ConnHandle {
        let conn = Arc::new(Conn {
            id,
            peer,
            started_at: Instant::now(),
            via,
            state: AtomicU8::new(ConnState::Resolving as u8),
            client: OnceLock::new(),
            service: OnceLock::new(),
            route: OnceLock::new(),
            edge: OnceLock::new(),
            outcome: OnceLock::new(),
            protocol: OnceLock::new(),
            sni: OnceLock::new(),
            requests: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
        });
        if self.enabled {
            self.conns.lock().unwrap().insert(id, Arc::clone(&conn));
        }
        ConnHandle { conn, table: Arc::clone(self) }
    }

    /// Every open connection, oldest first.
    pub fn list(&self) -> Vec<ConnView> {
        let conns: Vec<Arc<Conn>> = self.conns.lock().unwrap().values().cloned().collect();
        let mut views: Vec<ConnView> = conns.iter().map(|c| c.view()).collect();
        views.sort_by_key(|v| v.id);
        views
    }

    pub fn len(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Owned by the connection task; fills in the entry as the connection progresses and
/// removes it (logging one close line) when dropped.
pub struct ConnHandle {
    conn: Arc<Conn>,
    table: Arc<ConnTable>,
}

impl ConnHandle {
    pub fn conn(&self) -> &Conn {
        &self.conn
    }

    /// The entry itself, for HTTP bodies that count bytes after the handler returned.
    pub fn shared(&self) -> Arc<Conn> {
        Arc::clone(&self.conn)
    }

    /// What detection found; HTTP connections are open from here on (their endpoint is
    /// chosen per request, so they have no route).
    pub fn protocol(&self, protocol: &'static str, sni: Option<String>, http: bool) {
        let _ = self.conn.protocol.set(protocol);
        if let Some(sni) = sni {
            let _ = self.conn.sni.set(sni);
        }
        if http {
            self.conn.state.store(ConnState::Open as u8, Ordering::Relaxed);
        }
    }

    /// Who opened it, as the kernel recorded (`origin`), identified by its cgroup (not
    /// at all with the table off: nothing would read it).
    pub fn client(&self, origin: &crate::origin::Origin) {
        if self.table.enabled {
            let identity = self.table.workloads.identify(origin.cgroup_id);
            let _ = self.conn.client.set(Client::new(origin, identity));
        }
    }

    /// Its route edge, once the service is known.
    pub fn route_edge(&self) -> Option<&Arc<Signals>> {
        self.conn.route_edge()
    }

    /// The service the connection is for, once known.
    pub fn service_name(&self) -> Option<&str> {
        self.conn.service.get().map(|s| &**s)
    }

    /// The service it is for: from here on it counts on its route edge (client workload
    /// -> service), as open until it is dropped.
    pub fn service(&self, name: &Arc<str>) {
        let _ = self.conn.service.set(Arc::clone(name));
        self.conn.state.store(ConnState::Connecting as u8, Ordering::Relaxed);
        if let Some(client) = self.conn.client.get() {
            let edge = self.table.edges.route(&client.identity.workload, name);
            edge.opened();
            let _ = self.conn.edge.set(edge);
        }
    }

    pub fn connected(&self, route: Route) {
        if self.table.tap.active() {
            self.tap("connect", Some(&route));
        }
        let _ = self.conn.route.set(route);
        self.conn.state.store(ConnState::Open as u8, Ordering::Relaxed);
    }

    /// Tell taps about this (opaque) connection: `connect` or `close`.
    fn tap(&self, kind: &'static str, route: Option<&Route>) {
        let c = &self.conn;
        let closing = kind == "close";
        self.table.tap.send(TapEvent {
            kind,
            at_unix_ms: super::tap::unix_ms(),
            client: TapClient::of(c.client.get(), c.peer),
            service: c.service.get().map(|s| s.to_string()).unwrap_or_default(),
            endpoint: route.map(|r| r.endpoint),
            request: None,
            latency_ms: match route {
                Some(r) if !closing => r.connect_us as f64 / 1000.0,
                _ => c.started_at.elapsed().as_secs_f64() * 1000.0,
            },
            bytes_out: closing.then(|| c.bytes_out.load(Ordering::Relaxed)),
            bytes_in: closing.then(|| c.bytes_in.load(Ordering::Relaxed)),
            outcome: closing.then(|| c.outcome.get().copied().unwrap_or("closed")),
        });
    }

    /// How the connection ended (first call wins): `closed`, `error`, `drained`,
    /// `not_redirected`, `unknown_service`, `no_endpoint`.
    pub fn outcome(&self, outcome: &'static str) {
        let _ = self.conn.outcome.set(outcome);
    }
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        if let Some(edge) = self.conn.edge.get() {
            edge.closed();
        }
        if !self.table.enabled {
            return;
        }
        self.table.conns.lock().unwrap().remove(&self.conn.id);
        let c = &self.conn;
        // Connections that reached an endpoint as one stream (HTTP ones are tapped per
        // request).
        if self.table.tap.active() && c.route.get().is_some() {
            self.tap("close", c.route.get());
        }
        let client = c.client.get();
        let route = c.route.get();
        info!(
            target: "switchyard::conn",
            outcome = c.outcome.get().copied().unwrap_or("closed"),
            conn.id = c.id,
            via = ?c.via,
            client.addr = %c.peer,
            client.pid = client.map(|x| x.pid),
            client.comm = client.map(|x| x.comm.as_str()),
            client.cgroup = client.and_then(|x| x.identity.cgroup.as_deref()),
            client.workload = client.map(|x| x.workload()),
            client.pod_name = client.and_then(|x| x.pod_name()),
            client.netns = client.map(|x| x.netns),
            client.pod = client.map(|x| x.pod),
            orig.dst = client.map(|x| x.original_dst.to_string()),
            service = c.service.get().map(|s| &**s),
            protocol = c.protocol.get().copied(),
            tls.sni = c.sni.get().map(String::as_str),
            http.requests = c.requests.load(Ordering::Relaxed),
            endpoint = route.map(|r| r.endpoint.to_string()),
            attempts = route.map(|r| r.attempts),
            connect_us = route.map(|r| r.connect_us),
            duration_ms = c.started_at.elapsed().as_millis() as u64,
            bytes.out = c.bytes_out.load(Ordering::Relaxed),
            bytes.in = c.bytes_in.load(Ordering::Relaxed),
            "connection closed"
        );
    }
}

/// Age of a connection, for CLI tables.
pub fn age(ms: u64) -> String {
    let d = Duration::from_millis(ms);
    if d.as_secs() >= 3600 {
        format!("{}h{}m", d.as_secs() / 3600, d.as_secs() % 3600 / 60)
    } else if d.as_secs() >= 60 {
        format!("{}m{}s", d.as_secs() / 60, d.as_secs() % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_tracks_open_connections_and_shows_live_bytes() {
        let table = Arc::new(ConnTable::new(Workloads::new(None), Arc::default(), true));
        let h = table.open(7, "127.0.0.1:5000".parse().unwrap(), Via::Agent);
        h.service(&"web".into());
        assert_eq!(table.list()[0].state, ConnState::Connecting);
        h.conn().bytes_out.fetch_add(5, Ordering::Relaxed);
        assert_eq!(table.list()[0].bytes_out, 5, "visible while open");
        drop(h);
        assert!(table.is_empty());
    }

    #[test]
    fn a_disabled_table_registers_nothing() {
        let table = Arc::new(ConnTable::new(Workloads::new(None), Arc::default(), false));
        let h = table.open(1, "127.0.0.1:5000".parse().unwrap(), Via::Agent);
        h.service(&"web".into());
        assert!(table.list().is_empty());
        drop(h);
        assert!(table.is_empty());
    }
}
