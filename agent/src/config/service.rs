//! Per-service traffic policy: balancing, connect retries, failure accrual, active health
//! checks, locality and draining. Every field has a default, so a service needs only a
//! name, addresses and endpoints.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

use super::http::{HttpConfig, Protocol};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    /// Addresses applications dial (`ip:port`, `[v6]:port`). A service without any is
    /// reachable only as the target of another service's route.
    #[serde(default)]
    pub addresses: Vec<SocketAddr>,
    /// Where the agent sends the connections (a concrete service)...
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    /// ...or to which other services (a logical service), decided per connection.
    #[serde(default)]
    pub route: Option<Route>,
    #[serde(default)]
    pub balance: BalanceKind,
    /// Keep each client on its endpoint (kube-proxy's `sessionAffinity: ClientIP`);
    /// none by default.
    #[serde(default)]
    pub session_affinity: Option<SessionAffinity>,
    #[serde(default)]
    pub connect: ConnectConfig,
    #[serde(default)]
    pub failure_accrual: FailureAccrualConfig,
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    #[serde(default)]
    pub locality: LocalityConfig,
    /// How long connections to a removed or terminating endpoint may go on.
    #[serde(default = "default_drain", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// What the service's connections speak (default: detect).
    #[serde(default)]
    pub protocol: Protocol,
    /// Who handles its connections: the agent (default) or the kernel alone.
    #[serde(default)]
    pub mode: ServiceMode,
    /// Per-request policy where they speak HTTP.
    #[serde(default)]
    pub http: HttpConfig,
    /// Which source defined it (set by the source, never read from a file).
    #[serde(skip_deserializing)]
    pub origin: Origin,
}

/// How a logical service reaches concrete ones (linkerd 1's delegation, in miniature):
/// exactly one of `split` and `failover`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Each new connection goes to one branch, chosen by weight (canary: 90/10).
    #[serde(default)]
    pub split: Vec<SplitBranch>,
    /// The first branch with a healthy endpoint takes new connections; a connection whose
    /// attempts all fail in one branch moves on to the next.
    #[serde(default)]
    pub failover: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SplitBranch {
    pub service: String,
    pub weight: u32,
}

impl Route {
    /// The services the route names, in order.
    pub fn targets(&self) -> Vec<&str> {
        self.split.iter().map(|b| b.service.as_str()).chain(self.failover.iter().map(String::as_str)).collect()
    }
}

impl ServiceConfig {
    /// A service with the default policy and no addresses or endpoints yet.
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            addresses: Vec::new(),
            endpoints: Vec::new(),
            route: None,
            balance: BalanceKind::default(),
            session_affinity: None,
            connect: ConnectConfig::default(),
            failure_accrual: FailureAccrualConfig::default(),
            health_check: None,
            locality: LocalityConfig::default(),
            drain_timeout: default_drain(),
            protocol: Protocol::default(),
            mode: ServiceMode::default(),
            http: HttpConfig::default(),
            origin: Origin::File,
        }
    }
}

/// Who handles a service's connections.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ServiceMode {
    /// The agent proxies them: per-connection retries and failover, protocol detection,
    /// per-request balancing of HTTP, live bytes.
    #[default]
    Proxy,
    /// The kernel sends each connect straight to an endpoint drawn from a weighted table
    /// the agent keeps (health, weights, locality, route splits): the speed of a direct
    /// connection, for plain L4 services, with no retry of a failed connect and no HTTP
    /// awareness. The agent still sees every connection (`/conns`, metrics, endpoint
    /// health) through the kernel's connection events.
    Kernel,
}

/// The source a service came from: names it in error messages.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    #[default]
    File,
    Catalog,
    Kubernetes,
}

impl Origin {
    /// How a problem names a service of this origin known by name only (a running one).
    pub fn named(&self, name: &str) -> String {
        match self {
            Origin::File => format!("the config file's service `{name}`"),
            Origin::Catalog => format!("the catalog's service `{name}`"),
            Origin::Kubernetes => format!("kubernetes service `{name}`"),
        }
    }

    /// How a problem names the `index`th service of this origin.
    pub fn label(&self, index: usize, name: &str) -> String {
        match self {
            Origin::File => format!("services[{index}]"),
            Origin::Catalog => format!("catalog services[{index}]"),
            Origin::Kubernetes => format!("kubernetes service `{name}`"),
        }
    }
}

fn default_drain() -> Duration {
    Duration::from_secs(30)
}

/// Where an endpoint is: an address, or a DNS name the agent resolves and re-resolves.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Addr(SocketAddr),
    /// `host:port`: every A and AAAA record of `host`, on `port`.
    Host {
        name: String,
        port: u16,
    },
    /// An SRV name (`_http._tcp.web.example`): its targets, ports and weights.
    Srv(String),
}

impl Target {
    /// `ip:port`, `[v6]:port` or `host:port`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(Target::Addr(addr));
        }
        let bad = || format!("`{text}` is neither ip:port ([v6]:port) nor host:port");
        let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if !is_dns_name(host) {
            return Err(bad());
        }
        Ok(Target::Host { name: host.trim_end_matches('.').to_ascii_lowercase(), port })
    }

    pub fn addr(&self) -> Option<SocketAddr> {
        match self {
            Target::Addr(a) => Some(*a),
            _ => None,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Addr(a) => write!(f, "{a}"),
            Target::Host { name, port } => write!(f, "{name}:{port}"),
            Target::Srv(name) => write!(f, "srv:{name}"),
        }
    }
}

/// RFC 1123 host name (underscores allowed, as SRV owner names use them). A numeric last
/// label is refused: it is a mistyped IP address (`10.0.0.300`), not a name.
pub fn is_dns_name(name: &str) -> bool {
    let name = name.trim_end_matches('.');
    let numeric_tld = name.rsplit('.').next().is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
    !name.is_empty()
        && !numeric_tld
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// An endpoint: `"ip:port"`, `"host:port"`, or a map with `address` (or `srv`) and
/// weight, locality and terminating.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointConfig {
    pub target: Target,
    /// Relative share of new connections (default 1).
    pub weight: u32,
    /// Terminating: no new connections; open ones drain (Kubernetes' `terminating`).
    pub terminating: bool,
    /// Where it runs (`None`: nowhere said).
    pub place: Option<Arc<Place>>,
}

/// Where an endpoint runs. One shared copy per distinct place where endpoints come by
/// the thousand (the Kubernetes source interns them): a cluster's 100,000 endpoints run
/// on a few hundred nodes, and one pointer per endpoint is 56 bytes less than four names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Place {
    pub zone: Option<Arc<str>>,
    pub region: Option<Arc<str>>,
    pub node: Option<Arc<str>>,
    /// The zones this endpoint serves, comma-separated (EndpointSlice `hints.forZones`,
    /// set by the Kubernetes source only): when given, the endpoint is local to nodes in
    /// those zones and remote to the others, whatever zone it is in.
    pub hints: Option<Arc<str>>,
}

impl Place {
    /// `None` for a place that says nothing.
    pub fn some(self) -> Option<Arc<Place>> {
        (self != Place::default()).then(|| Arc::new(self))
    }
}

/// The parts of an optional place (what a `None` place has: nothing).
pub trait PlaceOf {
    fn place(&self) -> Option<&Place>;
    fn zone(&self) -> Option<&str> {
        self.place()?.zone.as_deref()
    }
    fn region(&self) -> Option<&str> {
        self.place()?.region.as_deref()
    }
    fn node(&self) -> Option<&str> {
        self.place()?.node.as_deref()
    }
    fn hints(&self) -> Option<&str> {
        self.place()?.hints.as_deref()
    }
}

impl PlaceOf for Option<Arc<Place>> {
    fn place(&self) -> Option<&Place> {
        self.as_deref()
    }
}

impl EndpointConfig {
    pub fn new(target: Target) -> Self {
        Self { target, weight: 1, terminating: false, place: None }
    }
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct EndpointMap {
    address: Option<String>,
    srv: Option<String>,
    #[serde(default = "one")]
    weight: u32,
    zone: Option<Arc<str>>,
    region: Option<Arc<str>>,
    node: Option<Arc<str>>,
    #[serde(default)]
    terminating: bool,
}

fn one() -> u32 {
    1
}

/// Written back as the map form (for `/config`).
impl Serialize for EndpointConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (address, srv) = match &self.target {
            Target::Srv(name) => (None, Some(name.clone())),
            other => (Some(other.to_string()), None),
        };
        EndpointMap {
            address,
            srv,
            weight: self.weight,
            zone: self.place.as_ref().and_then(|p| p.zone.clone()),
            region: self.place.as_ref().and_then(|p| p.region.clone()),
            node: self.place.as_ref().and_then(|p| p.node.clone()),
            terminating: self.terminating,
        }
        .serialize(s)
    }
}

// By hand rather than `#[serde(untagged)]`, whose only error is "did not match any
// variant": this way a bad address or an unknown key is named as such.
impl<'de> Deserialize<'de> for EndpointConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = EndpointConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an endpoint: \"ip:port\", \"host:port\" or { address | srv, weight, zone, region, node, terminating }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Target::parse(v).map(EndpointConfig::new).map_err(E::custom)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let m = EndpointMap::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                let target = match (m.address, m.srv) {
                    (Some(a), None) => Target::parse(&a).map_err(A::Error::custom)?,
                    (None, Some(srv)) if is_dns_name(&srv) => {
                        Target::Srv(srv.trim_end_matches('.').to_ascii_lowercase())
                    }
                    (None, Some(srv)) => return Err(A::Error::custom(format!("`{srv}` is not a DNS name"))),
                    _ => return Err(A::Error::custom("give exactly one of `address` or `srv`")),
                };
                let place = Place { zone: m.zone, region: m.region, node: m.node, hints: None };
                Ok(EndpointConfig { target, weight: m.weight, terminating: m.terminating, place: place.some() })
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BalanceKind {
    /// Power of two choices over a peak-EWMA cost (linkerd, Finagle).
    #[default]
    P2cEwma,
    LeastConnections,
    RoundRobin,
    Random,
    /// Consistent hashing on the client (its cgroup: the pod or unit) for affinity.
    RingHash,
}

/// Session affinity: a client (its cgroup: the pod or unit) keeps its endpoint for new
/// connections until `timeout` passes without one; each restarts the timer. On top of
/// any `balance` policy; connections the kernel sends (`mode: kernel`) do not follow it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SessionAffinity {
    #[serde(default = "default_affinity_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl SessionAffinity {
    /// Kubernetes' limit on `sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);
}

impl Default for SessionAffinity {
    fn default() -> Self {
        Self { timeout: default_affinity_timeout() }
    }
}

/// Kubernetes' default `timeoutSeconds`: 3 h.
fn default_affinity_timeout() -> Duration {
    Duration::from_secs(10_800)
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectConfig {
    /// One connect attempt may take this long.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts per client connection, each on a different endpoint where there is one.
    pub attempts: u32,
    /// All attempts together may take this long.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
}

impl Default for ConnectConfig {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(1), attempts: 3, deadline: Duration::from_secs(3) }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FailureAccrualConfig {
    /// Consecutive connect failures that eject an endpoint.
    pub consecutive_failures: u32,
    /// First ejection lasts about this long (jittered); each one after doubles it.
    #[serde(with = "humantime_serde")]
    pub base_ejection: Duration,
    #[serde(with = "humantime_serde")]
    pub max_ejection: Duration,
    /// Panic threshold: when more than this share of endpoints is unhealthy, health is
    /// ignored rather than sending the whole service's traffic to a few (Envoy: 50).
    pub max_ejected_percent: u32,
}

impl Default for FailureAccrualConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(2),
            max_ejection: Duration::from_secs(60),
            max_ejected_percent: 50,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    pub kind: HealthCheckKind,
    /// HTTP only: the path to GET (default `/`).
    pub path: Option<String>,
    /// HTTP only: the status that means healthy (default 200).
    pub status: Option<u16>,
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "default_check_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive successes that bring an endpoint back.
    #[serde(default = "two")]
    pub rise: u32,
    /// Consecutive failures that take it out.
    #[serde(default = "three")]
    pub fall: u32,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheckKind {
    /// A TCP connect succeeds.
    Tcp,
    /// `GET path` answers with `status`.
    Http,
}

impl HealthCheckConfig {
    /// For an HTTP check: (path, expected status), defaults filled in.
    pub fn http(&self) -> Option<(&str, u16)> {
        (self.kind == HealthCheckKind::Http).then(|| (self.path.as_deref().unwrap_or("/"), self.status.unwrap_or(200)))
    }
}

fn default_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_check_timeout() -> Duration {
    Duration::from_secs(1)
}
fn two() -> u32 {
    2
}
fn three() -> u32 {
    3
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LocalityConfig {
    /// A locality tier keeps all of its traffic while at least this share of its
    /// endpoints is healthy; below it, the deficit spills to the next tier in proportion
    /// (Envoy's overprovisioning factor 1.4 is a threshold of about 0.71).
    pub spill_threshold: f64,
    /// Prefer endpoints by locality at all. Off, every endpoint is in one tier, as
    /// kube-proxy spreads a Service without `trafficDistribution` or topology hints.
    pub enabled: bool,
}

impl Default for LocalityConfig {
    fn default() -> Self {
        Self { spill_threshold: 0.7, enabled: true }
    }
}

impl ServiceConfig {
    /// Problems with the policy fields, named under `at` (e.g. `services[2]`).
    /// v4-mapped IPv6 addresses written as IPv4, the form the kernel and the lookups use.
    pub(crate) fn canonicalize(&mut self) {
        self.addresses.iter_mut().for_each(|a| *a = super::canonical(*a));
        for e in &mut self.endpoints {
            if let Target::Addr(a) = &mut e.target {
                *a = super::canonical(*a);
            }
        }
    }

    /// The checks of this service, shared by whole-config validation and by changes
    /// checked against the running state. What they need of the others: whether some
    /// route leads to it (`routed_to`), and which other service already has an address
    /// (`owner`, called once per usable address, returning how problems name that
    /// service). `label` names this one.
    pub(crate) fn own_problems(
        &self,
        label: &str,
        listeners: &[SocketAddr],
        routed_to: bool,
        owner: &mut impl FnMut(SocketAddr) -> Option<String>,
        problem: &mut impl FnMut(String, String),
    ) {
        let at = |field: &str| format!("{label}.{field}");
        if self.name.trim().is_empty() {
            problem(at("name"), "must not be empty".into());
        }
        if self.addresses.is_empty() && !routed_to {
            problem(
                at("addresses"),
                "must list at least one service address (ip:port), unless another service routes to it \
                 (or allows it as an override)"
                    .into(),
            );
        }
        for (j, addr) in self.addresses.iter().enumerate() {
            let field = at(&format!("addresses[{j}]"));
            let addr = super::canonical(*addr);
            if let Some(msg) = super::unusable(addr) {
                problem(field, msg);
            } else if listeners.contains(&addr) {
                problem(field, format!("{addr} is the agent's own listener; connections would loop"));
            } else if let Some(first) = owner(addr) {
                problem(field, format!("{addr} is already an address of {first}"));
            }
        }
        match &self.route {
            Some(_) if !self.endpoints.is_empty() => {
                problem(at("route"), "give either endpoints or a route, not both".into())
            }
            // A discovered service may have no endpoint for a while (none ready yet).
            None if self.endpoints.is_empty() && self.origin != Origin::Kubernetes => {
                problem(at("endpoints"), "must list at least one endpoint (ip:port), or give a route".into())
            }
            _ => {}
        }
        if self.route.is_some() && self.session_affinity.is_some() {
            problem(
                at("session_affinity"),
                "applies to a service's own endpoints, and this one has a route: set it on the services the \
                 route leads to"
                    .into(),
            );
        }
        let mut seen = std::collections::HashMap::new();
        for (j, ep) in self.endpoints.iter().enumerate() {
            if let Some(msg) = ep.target.addr().and_then(|a| super::unusable(super::canonical(a))) {
                problem(at(&format!("endpoints[{j}]")), msg);
            } else if let Some(first) = seen.insert(&ep.target, j) {
                problem(at(&format!("endpoints[{j}]")), format!("{} is already endpoints[{first}]", ep.target));
            }
        }
        self.policy_problems(label, problem);
    }

    /// The checks of the policy fields alone (what a Service annotation may set).
    pub(crate) fn policy_problems(&self, at: &str, problem: &mut impl FnMut(String, String)) {
        if self.mode == ServiceMode::Kernel && matches!(self.protocol, Protocol::Http1 | Protocol::Http2) {
            problem(
                format!("{at}.mode"),
                format!(
                    "`kernel` sends connections straight to an endpoint, so nothing balances requests: it \
                     cannot be combined with `protocol: {}` (use `mode: proxy`, or `protocol: tcp`)",
                    if self.protocol == Protocol::Http1 { "http1" } else { "http2" }
                ),
            );
        }
        let c = &self.connect;
        if c.timeout.is_zero() {
            problem(format!("{at}.connect.timeout"), "must be more than 0".into());
        }
        if !(1..=10).contains(&c.attempts) {
            problem(format!("{at}.connect.attempts"), format!("{} is not between 1 and 10", c.attempts));
        }
        if c.deadline < c.timeout {
            problem(format!("{at}.connect.deadline"), "must be at least connect.timeout".into());
        }
        let f = &self.failure_accrual;
        if f.consecutive_failures == 0 {
            problem(format!("{at}.failure_accrual.consecutive_failures"), "must be at least 1".into());
        }
        if f.base_ejection.is_zero() || f.max_ejection < f.base_ejection {
            problem(
                format!("{at}.failure_accrual"),
                "base_ejection must be more than 0 and max_ejection at least base_ejection".into(),
            );
        }
        if f.max_ejected_percent > 100 {
            problem(format!("{at}.failure_accrual.max_ejected_percent"), "must be from 0 to 100".into());
        }
        if let Some(h) = &self.health_check {
            if h.interval.is_zero() || h.timeout.is_zero() {
                problem(format!("{at}.health_check"), "interval and timeout must be more than 0".into());
            }
            if h.rise == 0 || h.fall == 0 {
                problem(format!("{at}.health_check"), "rise and fall must be at least 1".into());
            }
            if h.kind == HealthCheckKind::Tcp && (h.path.is_some() || h.status.is_some()) {
                problem(format!("{at}.health_check"), "path and status apply to kind: http only".into());
            }
            if let Some((path, status)) = h.http() {
                if !path.starts_with('/') {
                    problem(format!("{at}.health_check.path"), format!("`{path}` must start with /"));
                }
                if !(100..=599).contains(&status) {
                    problem(format!("{at}.health_check.status"), format!("{status} is not an HTTP status"));
                }
            }
        }
        let t = self.locality.spill_threshold;
        if !(t > 0.0 && t <= 1.0) {
            problem(format!("{at}.locality.spill_threshold"), format!("{t} is not in (0, 1]"));
        }
        self.http.problems(&format!("{at}.http"), problem);
        for (j, ep) in self.endpoints.iter().enumerate() {
            if ep.weight == 0 {
                problem(
                    format!("{at}.endpoints[{j}].weight"),
                    "must be at least 1 (mark the endpoint terminating to stop new connections)".into(),
                );
            }
        }
        if let Some(a) = &self.session_affinity {
            let field = format!("{at}.session_affinity.timeout");
            if a.timeout.is_zero() {
                problem(field, "must be more than 0".into());
            } else if a.timeout > SessionAffinity::MAX_TIMEOUT {
                problem(
                    field,
                    format!("{:?} is more than 86400s (24h), Kubernetes' limit for session affinity", a.timeout),
                );
            }
        }
    }
}
