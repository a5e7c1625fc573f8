//! Prometheus metrics (prometheus-client), labelled by service and endpoint only: never
//! per connection, so cardinality follows the service catalog, not the traffic.
//! Per-connection byte counters hold clones of their metric handles, so bytes show up
//! in `/metrics` while connections are open, not only when they close.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{OnceLock, RwLock},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub service: String,
    pub endpoint: String,
}

/// Encoded lower case (`direction="out"`), as Prometheus label values are.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// client -> endpoint
    Out = 0,
    /// endpoint -> client
    In = 1,
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut prometheus_client::encoding::LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        encoder.write_str(match self {
            Direction::Out => "out",
            Direction::In => "in",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub service: String,
    pub endpoint: String,
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub service: String,
    pub endpoint: String,
    /// refused, timeout, unreachable, other
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub service: String,
    /// The endpoint that answered; empty when the agent answered itself.
    pub endpoint: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub service: String,
    /// status (a retryable response), timeout, connect, error (connection broke), closed
    /// (a pooled connection the server had closed)
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UnservedLabels {
    /// not_redirected, unknown_service, no_endpoint, local_error
    pub reason: &'static str,
    /// The service, once known (empty for not_redirected and unknown_service): a service
    /// with no endpoint to offer, as one with `internalTrafficPolicy: Local` on a node
    /// without its pods, shows by name.
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LocalErrorLabels {
    /// What the agent was doing: accept, connect, health_check
    pub op: &'static str,
    /// emfile, enfile, enobufs, enomem, eaddrnotavail
    pub error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NetnsLabels {
    /// reachable, probing, blocked
    pub state: &'static str,
}

fn latency_histogram() -> Histogram {
    // 100 us .. ~3.3 s, doubling.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    pub connections: Family<EndpointLabels, Counter>,
    pub open: Family<EndpointLabels, Gauge>,
    pub bytes: Family<BytesLabels, Counter>,
    pub connect_failures: Family<FailureLabels, Counter>,
    pub ejections: Family<EndpointLabels, Counter>,
    pub connect_latency: Family<ServiceLabels, Histogram, fn() -> Histogram>,
    pub unserved: Family<UnservedLabels, Counter>,
    pub kernel: Family<DecisionLabels, Gauge>,
    pub pod_netns: Family<NetnsLabels, Gauge>,
    pub requests: Family<RequestLabels, Counter>,
    pub retries: Family<RetryLabels, Counter>,
    pub budget_exhausted: Family<ServiceLabels, Counter>,
    pub request_latency: Family<ServiceLabels, Histogram, fn() -> Histogram>,
    pub local_errors: Family<LocalErrorLabels, Counter>,
    /// The agent's connection limit, connections counted against it, and whether it is
    /// saturated: set from `capacity::Capacity` when scraped.
    pub max_connections: Gauge,
    pub agent_connections: Gauge,
    pub saturated: Gauge,
    pub saturations: Counter,
    /// Golden signals per route and endpoint (`switchyard_route_*`, `switchyard_endpoint_*`).
    pub edges: std::sync::Arc<super::signals::Edges>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Self {
            registry: Registry::with_prefix("switchyard"),
            connections: Family::default(),
            open: Family::default(),
            bytes: Family::default(),
            connect_failures: Family::default(),
            ejections: Family::default(),
            connect_latency: Family::new_with_constructor(latency_histogram),
            unserved: Family::default(),
            kernel: Family::default(),
            pod_netns: Family::default(),
            requests: Family::default(),
            retries: Family::default(),
            budget_exhausted: Family::default(),
            request_latency: Family::new_with_constructor(latency_histogram),
            local_errors: Family::default(),
            max_connections: Gauge::default(),
            agent_connections: Gauge::default(),
            saturated: Gauge::default(),
            saturations: Counter::default(),
            edges: Default::default(),
        };
        let r = &mut m.registry;
        r.register("connections", "Connections proxied, by service and endpoint", m.connections.clone());
        r.register("connections_open", "Connections open now", m.open.clone());
        r.register("bytes", "Bytes proxied, counted as they move", m.bytes.clone());
        r.register("connect_failures", "Upstream connect attempts that failed, by reason", m.connect_failures.clone());
        r.register("ejections", "Endpoints ejected by failure accrual", m.ejections.clone());
        r.register("connect_latency_seconds", "Upstream connect latency", m.connect_latency.clone());
        r.register("unserved_connections", "Redirected connections closed without an endpoint", m.unserved.clone());
        r.register("http_requests", "HTTP requests answered, by service, endpoint and status", m.requests.clone());
        r.register("http_retries", "HTTP request attempts retried on another endpoint, by reason", m.retries.clone());
        r.register(
            "http_retry_budget_exhausted",
            "HTTP retries not made because the retry budget was spent",
            m.budget_exhausted.clone(),
        );
        r.register(
            "http_response_latency_seconds",
            "Time from an HTTP request to its response headers, retries included",
            m.request_latency.clone(),
        );
        r.register(
            "local_errors",
            "The agent's own resource shortages (descriptors, buffers, memory, ephemeral ports), by operation; never counted against an endpoint",
            m.local_errors.clone(),
        );
        r.register("max_connections", "Connections the agent holds before it is saturated", m.max_connections.clone());
        r.register("agent_connections", "Connections the agent holds now", m.agent_connections.clone());
        r.register(
            "saturated",
            "1 while the agent is at max_connections and new connections go straight to endpoints in the kernel",
            m.saturated.clone(),
        );
        r.register("saturations", "Times the agent reached max_connections", m.saturations.clone());
        r.register_collector(Box::new(super::signals::EdgeCollector(std::sync::Arc::clone(&m.edges))));
        r.register(
            "kernel_decisions",
            "Decisions of the kernel programs since they were installed on this node (cumulative; the counters are pinned, so they survive agent restarts)",
            m.kernel.clone(),
        );
        r.register(
            "pod_netns",
            "Pod network namespaces the kernel has seen, by their path to the agent's node address (blocked ones are served by the in-kernel fallback)",
            m.pod_netns.clone(),
        );
        m
    }
}

impl Metrics {
    /// The Prometheus text exposition format (0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// The counter of shortages of kind `error` met while doing `op`.
    pub fn local_error(&self, op: &'static str, error: &'static str) -> Counter {
        self.local_errors.get_or_create(&LocalErrorLabels { op, error }).clone()
    }

    pub fn endpoint(service: &str, endpoint: std::net::SocketAddr) -> EndpointLabels {
        EndpointLabels { service: service.to_owned(), endpoint: endpoint.to_string() }
    }
}

/// Why an HTTP attempt was retried (the `reason` label of `http_retries`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    Status = 0,
    Timeout = 1,
    Connect = 2,
    Error = 3,
    Closed = 4,
}

impl RetryReason {
    pub fn name(self) -> &'static str {
        ["status", "timeout", "connect", "error", "closed"][self as usize]
    }
}

/// Why a connect failed (the `reason` label of `connect_failures`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    Refused = 0,
    Timeout = 1,
    Unreachable = 2,
    Other = 3,
}

impl FailReason {
    pub fn of(e: &std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::ConnectionRefused => Self::Refused,
            std::io::ErrorKind::TimedOut => Self::Timeout,
            std::io::ErrorKind::NetworkUnreachable | std::io::ErrorKind::HostUnreachable => Self::Unreachable,
            _ => Self::Other,
        }
    }

    pub fn name(self) -> &'static str {
        ["refused", "timeout", "unreachable", "other"][self as usize]
    }
}

/// Metric handles of one service and its endpoints, kept with the service in the
/// snapshot. Each is looked up in its family on first use and then held, so a connection
/// or request touches its counters without building label strings; series still appear
/// in `/metrics` only once something happened.
#[derive(Debug)]
pub struct ServiceMetrics {
    name: String,
    connect_latency: OnceLock<Histogram>,
    request_latency: OnceLock<Histogram>,
    retries: [OnceLock<Counter>; 5],
    budget_exhausted: OnceLock<Counter>,
    /// `http_requests` by (endpoint that answered, or none when the agent did; status):
    /// the dialled service's, whichever concrete service the endpoint belongs to.
    answers: RwLock<HashMap<(Option<SocketAddr>, u16), Counter>>,
    endpoints: Box<[EndpointMetrics]>,
}

/// Small until first used (a cluster's endpoints mostly never are from one node): the
/// handles are boxed and made on first use.
#[derive(Debug, Default)]
pub struct EndpointMetrics {
    handles: OnceLock<Box<Handles>>,
}

#[derive(Debug)]
struct Handles {
    addr: SocketAddr,
    connections: OnceLock<Counter>,
    open: OnceLock<Gauge>,
    /// Indexed by `Direction as usize`.
    bytes: [OnceLock<Counter>; 2],
    failures: [OnceLock<Counter>; 4],
    ejections: OnceLock<Counter>,
    /// Its golden signals (`/stat`, `/edges`), shared with HTTP requests' counts.
    signals: OnceLock<std::sync::Arc<super::signals::Signals>>,
}

impl ServiceMetrics {
    pub fn new(name: &str, endpoints: usize) -> Self {
        Self {
            name: name.to_owned(),
            connect_latency: OnceLock::new(),
            request_latency: OnceLock::new(),
            retries: Default::default(),
            budget_exhausted: OnceLock::new(),
            answers: RwLock::default(),
            endpoints: (0..endpoints).map(|_| EndpointMetrics::default()).collect(),
        }
    }

    fn labels(&self) -> ServiceLabels {
        ServiceLabels { service: self.name.clone() }
    }

    pub fn connect_latency<'a>(&'a self, m: &Metrics) -> &'a Histogram {
        self.connect_latency.get_or_init(|| m.connect_latency.get_or_create(&self.labels()).clone())
    }

    pub fn request_latency<'a>(&'a self, m: &Metrics) -> &'a Histogram {
        self.request_latency.get_or_init(|| m.request_latency.get_or_create(&self.labels()).clone())
    }

    pub fn retried(&self, m: &Metrics, reason: RetryReason) {
        let labels = || RetryLabels { service: self.name.clone(), reason: reason.name() };
        self.retries[reason as usize].get_or_init(|| m.retries.get_or_create(&labels()).clone()).inc();
    }

    pub fn budget_exhausted(&self, m: &Metrics) {
        self.budget_exhausted.get_or_init(|| m.budget_exhausted.get_or_create(&self.labels()).clone()).inc();
    }

    /// Count an HTTP answer to a request for this service: from `endpoint`, or made by
    /// the agent (`None`).
    pub fn answered(&self, m: &Metrics, endpoint: Option<SocketAddr>, status: u16) {
        if let Some(c) = self.answers.read().unwrap().get(&(endpoint, status)) {
            c.inc();
            return;
        }
        let labels = RequestLabels {
            service: self.name.clone(),
            endpoint: endpoint.map(|e| e.to_string()).unwrap_or_default(),
            status,
        };
        let c = m.requests.get_or_create(&labels).clone();
        c.inc();
        self.answers.write().unwrap().insert((endpoint, status), c);
    }

    /// The handles of endpoint `i` of the service (indexed like its balancer's
    /// endpoints, which they are built with; `addr` is its address), with the service's
    /// name for labels.
    pub fn endpoint(&self, i: usize, addr: SocketAddr) -> EndpointHandles<'_> {
        let e = self.endpoints[i].handles.get_or_init(|| {
            Box::new(Handles {
                addr,
                connections: OnceLock::new(),
                open: OnceLock::new(),
                bytes: Default::default(),
                failures: Default::default(),
                ejections: OnceLock::new(),
                signals: OnceLock::new(),
            })
        });
        EndpointHandles { service: &self.name, e }
    }
}

/// One endpoint's handles, bound to its service.
#[derive(Clone, Copy)]
pub struct EndpointHandles<'a> {
    service: &'a str,
    e: &'a Handles,
}

impl<'a> EndpointHandles<'a> {
    fn labels(&self) -> EndpointLabels {
        Metrics::endpoint(self.service, self.e.addr)
    }

    pub fn connections(&self, m: &Metrics) -> &'a Counter {
        self.e.connections.get_or_init(|| m.connections.get_or_create(&self.labels()).clone())
    }

    pub fn open(&self, m: &Metrics) -> &'a Gauge {
        self.e.open.get_or_init(|| m.open.get_or_create(&self.labels()).clone())
    }

    pub fn bytes(&self, m: &Metrics, direction: Direction) -> &'a Counter {
        self.e.bytes[direction as usize].get_or_init(|| {
            let l = self.labels();
            m.bytes.get_or_create(&BytesLabels { service: l.service, endpoint: l.endpoint, direction }).clone()
        })
    }

    /// The endpoint's golden signals (`/stat` by endpoint).
    pub fn signals(&self, m: &Metrics) -> &'a std::sync::Arc<super::signals::Signals> {
        self.e.signals.get_or_init(|| m.edges.endpoint(self.service, self.e.addr))
    }

    pub fn connect_failed(&self, m: &Metrics, reason: FailReason) {
        self.signals(m).connect_failed();
        let make = || {
            let l = self.labels();
            m.connect_failures
                .get_or_create(&FailureLabels { service: l.service, endpoint: l.endpoint, reason: reason.name() })
                .clone()
        };
        self.e.failures[reason as usize].get_or_init(make).inc();
    }

    pub fn ejected(&self, m: &Metrics) {
        self.e.ejections.get_or_init(|| m.ejections.get_or_create(&self.labels()).clone()).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_bounded_labels() {
        let m = Metrics::default();
        let ep = Metrics::endpoint("web", "10.0.0.1:80".parse().unwrap());
        m.connections.get_or_create(&ep).inc();
        m.bytes
            .get_or_create(&BytesLabels {
                service: "web".into(),
                endpoint: "10.0.0.1:80".into(),
                direction: Direction::Out,
            })
            .inc_by(42);
        m.connect_latency.get_or_create(&ServiceLabels { service: "web".into() }).observe(0.0003);
        let text = m.render();
        assert!(text.contains("switchyard_connections_total{service=\"web\",endpoint=\"10.0.0.1:80\"} 1"), "{text}");
        assert!(
            text.contains("switchyard_bytes_total{service=\"web\",endpoint=\"10.0.0.1:80\",direction=\"out\"} 42"),
            "{text}"
        );
        assert!(text.contains("# TYPE switchyard_connect_latency_seconds histogram"), "{text}");
    }
}
