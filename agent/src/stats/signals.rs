//! Golden signals per edge of the traffic graph: per route (client workload -> service)
//! and per endpoint (service -> endpoint). Requests and their success and latency (HTTP
//! and gRPC), connections opened, open and failed, and bytes.
//!
//! Each edge is one [`Signals`] of plain atomics, found once per connection (a route) or
//! once per endpoint and then held, so the data path adds to counters and never builds
//! labels. The same atomics feed `/metrics` (through [`Edges`], a prometheus-client
//! collector), `/stat` and `/edges` (through [`Window`], rates and latency over the last
//! minute), so the three always agree.
//!
//! Cardinality is bounded: routes are labelled by workload (a Deployment, a systemd
//! unit), never by pod or pid, and at most [`MAX_WORKLOADS`] workloads are told apart;
//! more are counted as workload `other`.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicI64, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};
use serde::Serialize;

use crate::workload::Workload;

/// Upper bounds of the latency buckets, in seconds (one more, +Inf, holds the rest):
/// from a sub-millisecond local answer to a 10 s timeout, about three per decade as
/// linkerd's and Prometheus's defaults have.
pub const LATENCY_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const BUCKETS: usize = LATENCY_BUCKETS.len() + 1;

/// Workloads told apart in route metrics; beyond this, new ones are `other`.
pub const MAX_WORKLOADS: usize = 1000;

/// The counters of one edge.
#[derive(Debug, Default)]
pub struct Signals {
    requests: AtomicU64,
    failures: AtomicU64,
    /// Response latency (to the response headers), by bucket, and its sum in µs.
    latency: [AtomicU64; BUCKETS],
    latency_sum_us: AtomicU64,
    connections: AtomicU64,
    open: AtomicI64,
    /// Route: connections the agent could connect nowhere. Endpoint: connect attempts
    /// that failed.
    connect_failures: AtomicU64,
    pub bytes_out: AtomicU64,
    pub bytes_in: AtomicU64,
    /// Totals every [`SAMPLE`], the last minute of them: what rates are taken over.
    window: Mutex<VecDeque<(Instant, Totals)>>,
}

/// An edge's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    pub requests: u64,
    pub failures: u64,
    pub latency: [u64; BUCKETS],
    pub latency_sum_us: u64,
    pub connections: u64,
    pub connect_failures: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
}

impl Signals {
    /// A new edge, its window starting now at zero (rates of a young edge are over its
    /// life).
    fn born() -> Arc<Self> {
        let s = Self::default();
        s.window.lock().unwrap().push_back((Instant::now(), Totals::default()));
        Arc::new(s)
    }

    /// A response, `success` as classified (not 5xx, gRPC status OK), `latency` to its
    /// headers.
    pub fn response(&self, success: bool, latency: Duration) {
        self.requests.fetch_add(1, Relaxed);
        if !success {
            self.failures.fetch_add(1, Relaxed);
        }
        let secs = latency.as_secs_f64();
        let bucket = LATENCY_BUCKETS.iter().position(|b| secs <= *b).unwrap_or(BUCKETS - 1);
        self.latency[bucket].fetch_add(1, Relaxed);
        self.latency_sum_us.fetch_add(latency.as_micros() as u64, Relaxed);
    }

    /// A connection opened on this edge; it counts as open until [`Signals::closed`].
    pub fn opened(&self) {
        self.connections.fetch_add(1, Relaxed);
        self.open.fetch_add(1, Relaxed);
    }

    pub fn closed(&self) {
        self.open.fetch_sub(1, Relaxed);
    }

    pub fn connect_failed(&self) {
        self.connect_failures.fetch_add(1, Relaxed);
    }

    pub fn open(&self) -> i64 {
        self.open.load(Relaxed)
    }

    pub fn totals(&self) -> Totals {
        Totals {
            requests: self.requests.load(Relaxed),
            failures: self.failures.load(Relaxed),
            latency: std::array::from_fn(|i| self.latency[i].load(Relaxed)),
            latency_sum_us: self.latency_sum_us.load(Relaxed),
            connections: self.connections.load(Relaxed),
            connect_failures: self.connect_failures.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
        }
    }

    /// Keep the totals now for later rates (called every [`SAMPLE`]).
    fn sample(&self, now: Instant) {
        let totals = self.totals();
        let mut w = self.window.lock().unwrap();
        w.push_back((now, totals));
        while w.len() > WINDOW_SAMPLES {
            w.pop_front();
        }
    }

    /// What happened over the last `window` (up to a minute), ending now.
    pub fn over(&self, window: Duration, now: Instant) -> Window {
        let end = self.totals();
        let w = self.window.lock().unwrap();
        // The oldest sample inside the window; an edge younger than the window counts
        // from zero at its first sample.
        let start = w.iter().find(|(t, _)| now.duration_since(*t) <= window + SAMPLE / 2).or(w.front());
        let (since, begin) = match start {
            Some((t, totals)) => (now.duration_since(*t), *totals),
            None => (Duration::ZERO, Totals::default()),
        };
        Window::between(&begin, &end, since, self.open())
    }
}

impl Totals {
    fn add(&mut self, o: &Totals) {
        self.requests += o.requests;
        self.failures += o.failures;
        for (a, b) in self.latency.iter_mut().zip(o.latency) {
            *a += b;
        }
        self.latency_sum_us += o.latency_sum_us;
        self.connections += o.connections;
        self.connect_failures += o.connect_failures;
        self.bytes_out += o.bytes_out;
        self.bytes_in += o.bytes_in;
    }

    fn minus(&self, o: &Totals) -> Totals {
        Totals {
            requests: self.requests.saturating_sub(o.requests),
            failures: self.failures.saturating_sub(o.failures),
            latency: std::array::from_fn(|i| self.latency[i].saturating_sub(o.latency[i])),
            latency_sum_us: self.latency_sum_us.saturating_sub(o.latency_sum_us),
            connections: self.connections.saturating_sub(o.connections),
            connect_failures: self.connect_failures.saturating_sub(o.connect_failures),
            bytes_out: self.bytes_out.saturating_sub(o.bytes_out),
            bytes_in: self.bytes_in.saturating_sub(o.bytes_in),
        }
    }

    /// The `q` quantile of the latency, in ms, as Prometheus's `histogram_quantile`
    /// estimates it: linear within the bucket it falls in (the last finite bound when it
    /// falls in +Inf). None without requests.
    pub fn latency_quantile_ms(&self, q: f64) -> Option<f64> {
        let count: u64 = self.latency.iter().sum();
        if count == 0 {
            return None;
        }
        let rank = q * count as f64;
        let mut seen = 0u64;
        for (i, n) in self.latency.iter().enumerate() {
            if *n > 0 && (seen + n) as f64 >= rank {
                let Some(upper) = LATENCY_BUCKETS.get(i) else { break };
                let lower = if i == 0 { 0.0 } else { LATENCY_BUCKETS[i - 1] };
                let within = ((rank - seen as f64) / *n as f64).clamp(0.0, 1.0);
                return Some((lower + (upper - lower) * within) * 1000.0);
            }
            seen += n;
        }
        Some(LATENCY_BUCKETS[LATENCY_BUCKETS.len() - 1] * 1000.0)
    }
}

/// How often every edge's totals are kept, and how many are kept (a minute's).
pub const SAMPLE: Duration = Duration::from_secs(5);
const WINDOW_SAMPLES: usize = 13;

/// An edge over a window: totals since the agent started, and rates over the window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Window {
    /// Since the agent started.
    pub requests: u64,
    pub failures: u64,
    pub connections: u64,
    pub connect_failures: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub open: i64,
    /// Over the window.
    pub window_secs: f64,
    pub request_rate: f64,
    /// Successful responses over all, in the window (None without requests in it).
    pub success_rate: Option<f64>,
    pub connection_rate: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    #[serde(skip)]
    totals: Totals,
    #[serde(skip)]
    delta: Totals,
}

impl Window {
    fn between(begin: &Totals, end: &Totals, since: Duration, open: i64) -> Self {
        let mut w = Window {
            totals: *end,
            delta: end.minus(begin),
            window_secs: since.as_secs_f64(),
            open,
            ..Window::default()
        };
        w.fill();
        w
    }

    /// Derived figures from `totals` and `delta`.
    fn fill(&mut self) {
        let (t, d) = (&self.totals, &self.delta);
        // An edge younger than a second is rated over a second, not its few milliseconds.
        let secs = self.window_secs.max(1.0);
        self.requests = t.requests;
        self.failures = t.failures;
        self.connections = t.connections;
        self.connect_failures = t.connect_failures;
        self.bytes_out = t.bytes_out;
        self.bytes_in = t.bytes_in;
        self.request_rate = d.requests as f64 / secs;
        self.connection_rate = d.connections as f64 / secs;
        self.success_rate = (d.requests > 0).then(|| (d.requests - d.failures) as f64 / d.requests as f64);
        self.latency_p50_ms = d.latency_quantile_ms(0.50);
        self.latency_p95_ms = d.latency_quantile_ms(0.95);
        self.latency_p99_ms = d.latency_quantile_ms(0.99);
    }

    /// Add another edge's window (rows of `stat` by service sum their routes).
    pub fn add(&mut self, o: &Window) {
        self.totals.add(&o.totals);
        self.delta.add(&o.delta);
        self.open += o.open;
        self.window_secs = self.window_secs.max(o.window_secs);
        self.fill();
    }

    pub fn is_idle(&self) -> bool {
        self.delta.requests == 0 && self.delta.connections == 0 && self.open == 0
    }
}

/// A route: who called which service.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteKey {
    pub client: Arc<Workload>,
    pub service: String,
}

/// Edges by service name.
type ByName = HashMap<String, Arc<Signals>>;

/// Every edge, for metrics and `/stat`.
#[derive(Debug, Default)]
pub struct Edges {
    /// By client workload, then service: found without allocating on the data path.
    routes: RwLock<HashMap<Arc<Workload>, ByName>>,
    /// By service, then endpoint.
    endpoints: RwLock<HashMap<String, HashMap<SocketAddr, Arc<Signals>>>>,
}

impl Edges {
    /// The route from `client` to `service`, made on first use.
    pub fn route(&self, client: &Arc<Workload>, service: &str) -> Arc<Signals> {
        if let Some(s) = self.routes.read().unwrap().get(client).and_then(|m| m.get(service)) {
            return Arc::clone(s);
        }
        let mut routes = self.routes.write().unwrap();
        let client = if routes.contains_key(client) || routes.len() < MAX_WORKLOADS {
            Arc::clone(client)
        } else {
            Arc::new(Workload::other())
        };
        Arc::clone(routes.entry(client).or_default().entry(service.to_owned()).or_insert_with(Signals::born))
    }

    /// The edge from `service` to `endpoint`, made on first use.
    pub fn endpoint(&self, service: &str, endpoint: SocketAddr) -> Arc<Signals> {
        if let Some(s) = self.endpoints.read().unwrap().get(service).and_then(|m| m.get(&endpoint)) {
            return Arc::clone(s);
        }
        let mut endpoints = self.endpoints.write().unwrap();
        Arc::clone(endpoints.entry(service.to_owned()).or_default().entry(endpoint).or_insert_with(Signals::born))
    }

    /// Every route, with its signals.
    pub fn routes(&self) -> Vec<(RouteKey, Arc<Signals>)> {
        let routes = self.routes.read().unwrap();
        let mut all: Vec<_> = routes
            .iter()
            .flat_map(|(client, m)| {
                m.iter().map(|(service, s)| {
                    (RouteKey { client: Arc::clone(client), service: service.clone() }, Arc::clone(s))
                })
            })
            .collect();
        all.sort_by(|a, b| (a.0.client.display(), &a.0.service).cmp(&(b.0.client.display(), &b.0.service)));
        all
    }

    /// Every endpoint edge, by service and endpoint.
    pub fn endpoints(&self) -> Vec<((String, SocketAddr), Arc<Signals>)> {
        let endpoints = self.endpoints.read().unwrap();
        let mut all: Vec<_> = endpoints
            .iter()
            .flat_map(|(service, m)| m.iter().map(|(e, s)| ((service.clone(), *e), Arc::clone(s))))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Keep every edge's totals now (every [`SAMPLE`], from the admin thread).
    pub fn sample(&self, now: Instant) {
        for (_, s) in self.routes() {
            s.sample(now);
        }
        for (_, s) in self.endpoints() {
            s.sample(now);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    client_namespace: String,
    client_workload: String,
    service: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EndpointLabels {
    service: String,
    endpoint: String,
}

/// `/metrics` of every edge: `switchyard_route_*` (client_namespace, client_workload,
/// service) and `switchyard_endpoint_*` (service, endpoint).
#[derive(Debug, Clone, Default)]
pub struct EdgeCollector(pub Arc<Edges>);

impl Collector for EdgeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let routes: Vec<(RouteLabels, Totals, i64)> = self
            .0
            .routes()
            .into_iter()
            .map(|(k, s)| {
                let labels = RouteLabels {
                    client_namespace: k.client.namespace.clone().unwrap_or_default(),
                    client_workload: k.client.label(),
                    service: k.service,
                };
                (labels, s.totals(), s.open())
            })
            .collect();
        encode_edges(&mut encoder, "route", "client workload and service", &routes, true)?;
        let endpoints: Vec<(EndpointLabels, Totals, i64)> = self
            .0
            .endpoints()
            .into_iter()
            .map(|((service, endpoint), s)| (EndpointLabels { service, endpoint: endpoint.to_string() }, s.totals(), 0))
            .collect();
        // Connections, bytes and connect failures per endpoint are the older
        // `switchyard_connections_total` & co.: only requests here.
        encode_edges(&mut encoder, "endpoint", "service and endpoint", &endpoints, false)
    }
}

fn encode_edges<L: EncodeLabelSet + Clone + std::fmt::Debug>(
    encoder: &mut DescriptorEncoder,
    prefix: &str,
    by: &str,
    edges: &[(L, Totals, i64)],
    connections: bool,
) -> Result<(), std::fmt::Error> {
    if edges.is_empty() {
        return Ok(());
    }
    let name = |what: &str| format!("{prefix}_{what}");
    {
        let n = name("requests");
        let help = format!("HTTP and gRPC responses by {by}, classified (failure: 5xx or a gRPC status other than OK)");
        let mut e = encoder.encode_descriptor(&n, &help, None, MetricType::Counter)?;
        for (labels, t, _) in edges {
            for (value, n) in [("success", t.requests - t.failures), ("failure", t.failures)] {
                let l = (labels.clone(), [("classification", value)]);
                ConstCounter::new(n).encode(e.encode_family(&l)?)?;
            }
        }
    }
    {
        let n = name("response_latency_seconds");
        let help = format!("Time from an HTTP request to its response headers, by {by}");
        let mut e = encoder.encode_descriptor(&n, &help, None, MetricType::Histogram)?;
        for (labels, t, _) in edges {
            // Per bucket: the encoder makes them cumulative.
            let buckets: Vec<(f64, u64)> = t
                .latency
                .iter()
                .enumerate()
                .map(|(i, n)| (LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY), *n))
                .collect();
            let count = t.latency.iter().sum();
            let sum = t.latency_sum_us as f64 / 1e6;
            e.encode_family(labels)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)?;
        }
    }
    if !connections {
        return Ok(());
    }
    type Get = fn(&Totals) -> u64;
    let counters: [(&str, &str, Get); 2] = [
        ("connections", "Connections opened", |t| t.connections),
        ("connect_failures", "Connections the agent could connect to no endpoint", |t| t.connect_failures),
    ];
    for (what, help, get) in counters {
        let n = name(what);
        let mut e = encoder.encode_descriptor(&n, &format!("{help}, by {by}"), None, MetricType::Counter)?;
        for (labels, t, _) in edges {
            ConstCounter::new(get(t)).encode(e.encode_family(labels)?)?;
        }
    }
    {
        let n = name("connections_open");
        let mut e =
            encoder.encode_descriptor(&n, &format!("Connections open now, by {by}"), None, MetricType::Gauge)?;
        for (labels, _, open) in edges {
            ConstGauge::new(*open).encode(e.encode_family(labels)?)?;
        }
    }
    let n = name("bytes");
    let help = format!("Bytes on the client's connection (out: from the client), by {by}");
    let mut e = encoder.encode_descriptor(&n, &help, None, MetricType::Counter)?;
    for (labels, t, _) in edges {
        for (value, n) in [("out", t.bytes_out), ("in", t.bytes_in)] {
            ConstCounter::new(n).encode(e.encode_family(&(labels.clone(), [("direction", value)]))?)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn quantiles_fall_in_the_bucket_of_the_latency() {
        let s = Signals::default();
        for _ in 0..90 {
            s.response(true, ms(3)); // (2.5, 5] ms
        }
        for _ in 0..10 {
            s.response(false, ms(300)); // (250, 500] ms
        }
        let t = s.totals();
        assert_eq!((t.requests, t.failures), (100, 10));
        let p50 = t.latency_quantile_ms(0.5).unwrap();
        assert!((2.5..=5.0).contains(&p50), "{p50}");
        let p99 = t.latency_quantile_ms(0.99).unwrap();
        assert!((250.0..=500.0).contains(&p99), "{p99}");
        assert_eq!(Totals::default().latency_quantile_ms(0.5), None);
    }

    #[test]
    fn a_window_counts_only_what_happened_in_it() {
        let s = Signals::default();
        let t0 = Instant::now();
        s.response(true, ms(1));
        s.sample(t0);
        for _ in 0..10 {
            s.response(true, ms(1));
        }
        s.response(false, ms(1));
        s.opened();
        let w = s.over(Duration::from_secs(60), t0 + Duration::from_secs(10));
        assert_eq!(w.requests, 12, "totals since start");
        assert_eq!(w.request_rate, 11.0 / 10.0);
        assert_eq!(w.success_rate, Some(10.0 / 11.0));
        assert_eq!((w.connections, w.open), (1, 1));
        s.closed();
        assert_eq!(s.open(), 0);
    }

    #[test]
    fn workloads_past_the_bound_are_counted_as_other() {
        let edges = Edges::default();
        let w = |i: usize| Arc::new(Workload { namespace: None, kind: "cgroup", name: format!("/c{i}") });
        for i in 0..MAX_WORKLOADS + 50 {
            edges.route(&w(i), "web").opened();
        }
        let routes = edges.routes();
        assert_eq!(routes.len(), MAX_WORKLOADS + 1);
        let other = routes.iter().find(|(k, _)| k.client.kind == "other").expect("an `other` workload");
        assert_eq!(other.1.totals().connections, 50);
        // A workload already known keeps its own series.
        edges.route(&w(3), "web").opened();
        assert_eq!(edges.routes().len(), MAX_WORKLOADS + 1);
    }

    #[test]
    fn metrics_render_routes_with_bounded_labels_and_classified_requests() {
        let edges = Arc::new(Edges::default());
        let client = Arc::new(Workload { namespace: Some("shop".into()), kind: "deployment", name: "web".into() });
        let r = edges.route(&client, "shop/cart");
        r.response(true, ms(2));
        r.response(false, ms(2));
        r.opened();
        r.bytes_out.fetch_add(7, Relaxed);
        let mut registry = prometheus_client::registry::Registry::with_prefix("switchyard");
        registry.register_collector(Box::new(EdgeCollector(Arc::clone(&edges))));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        let l = r#"client_namespace="shop",client_workload="deployment/web",service="shop/cart""#;
        for line in [
            format!("switchyard_route_requests_total{{{l},classification=\"success\"}} 1"),
            format!("switchyard_route_requests_total{{{l},classification=\"failure\"}} 1"),
            format!("switchyard_route_response_latency_seconds_bucket{{{l},le=\"0.0025\"}} 2"),
            format!("switchyard_route_response_latency_seconds_bucket{{{l},le=\"+Inf\"}} 2"),
            format!("switchyard_route_connections_open{{{l}}} 1"),
            format!("switchyard_route_bytes_total{{{l},direction=\"out\"}} 7"),
        ] {
            assert!(text.contains(&line), "{line} in\n{text}");
        }
    }
}
