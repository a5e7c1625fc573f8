//! The configuration file: serde types, defaults and validation.
//!
//! A config is either wholly valid or rejected with every problem listed, each naming its
//! field (`services[1].addresses[0]`) and, for syntax errors, the line and column. The
//! agent never starts half-configured.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

pub use http::{DetectConfig, HttpConfig, HttpLimits, Protocol, RetryConfig};
use serde::{Deserialize, Serialize};
pub use service::{
    BalanceKind, ConnectConfig, EndpointConfig, FailureAccrualConfig, HealthCheckConfig, HealthCheckKind,
    LocalityConfig, Origin, Place, PlaceOf, Route, ServiceConfig, ServiceMode, SessionAffinity, SplitBranch, Target,
};

mod http;
mod pods;
mod service;

pub use pods::{DEFAULT_NODE_V4, DEFAULT_NODE_V6, PodsMode};

/// Default port of the agent's outbound listener (same as linkerd2-proxy and ztunnel's
/// outbound port, so operators recognise it).
pub const DEFAULT_LISTEN_PORT: u16 = 15001;
/// Default SO_MARK of the agent's upstream sockets: "SY" in ASCII. Must not be 0, the mark
/// every ordinary socket carries.
pub const DEFAULT_MARK: u32 = 0x5359;
/// Default time the agent lets open connections finish after SIGTERM.
pub const DEFAULT_DRAIN_SECS: u64 = 5;
/// Default directory for the pinned maps and links (in the bpffs most hosts mount at
/// /sys/fs/bpf, as Cilium and bpftool expect).
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/switchyard";
/// Default unix socket where a running agent hands its listeners to its successor.
pub const DEFAULT_HANDOVER_SOCKET: &str = "/run/switchyard/handover.sock";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {} is not valid YAML for switchyard", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("config file {} has {} problem(s):\n{}", path.display(), problems.len(), Problems(problems))]
    Invalid { path: PathBuf, problems: Vec<Problem> },
}

/// One validation problem: the field path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub message: String,
}

struct Problems<'a>(&'a [Problem]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  {}: {}", p.field, p.message)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub agent: AgentConfig,
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Port of the outbound listener on 127.0.0.1 and [::1].
    pub listen_port: u16,
    /// cgroup v2 directory to attach to. Default: the cgroup2 root found in /proc/mounts.
    pub cgroup: Option<PathBuf>,
    /// SO_MARK of the agent's upstream sockets; such sockets are never redirected.
    pub mark: u32,
    /// Seconds open connections may run on after SIGTERM before they are cut.
    pub drain_timeout_secs: u64,
    /// Where this node is, for locality-aware balancing (Kubernetes' topology.kubernetes.io
    /// zone and region labels). Without a zone, every endpoint counts as local.
    pub zone: Option<String>,
    pub region: Option<String>,
    /// A file of more services (`services:` only), watched: edits apply within a second,
    /// a broken edit is rejected and the last good catalog stays in force.
    pub catalog: Option<PathBuf>,
    /// How endpoint host names and SRV names are resolved.
    pub dns: DnsConfig,
    /// Watch a Kubernetes API server for Services, EndpointSlices and this Node.
    pub kubernetes: Option<KubernetesConfig>,
    /// Where the admin API listens (keep it on loopback); `null` turns it off.
    pub admin: Option<SocketAddr>,
    /// A second listener serving only `GET /metrics` (and `/live`, `/ready`), for a
    /// Prometheus off the node to scrape without the rest of the admin API (connections,
    /// tap, log level) being reachable: `0.0.0.0:4192` in the DaemonSet. Off by default.
    pub metrics: Option<SocketAddr>,
    /// How connections' protocols are detected.
    pub detect: DetectConfig,
    /// Per-connection bookkeeping (the /conns table, live byte counts, per-connection
    /// metrics and close lines). On by default; `false` exists to measure its cost.
    pub stats: bool,
    /// Directory inside a mounted bpffs where the maps and program links are pinned, so
    /// that they outlive the process (in-kernel fallback while no agent runs, hand-over
    /// to the next agent). One directory per agent; `switchyard uninstall` removes it.
    pub bpffs_dir: PathBuf,
    /// Unix socket where the running agent hands its listening sockets to a newer agent
    /// started on the same node (upgrade without a refused connection).
    pub handover_socket: PathBuf,
    /// Addresses the agent adds to `lo` and listens on, at `listen_port`, for connects
    /// from pods: at most one IPv4 (link-local) and one IPv6 (unique local) address.
    pub node_address: Vec<IpAddr>,
    /// Connects from other network namespaces than the agent's (pods).
    pub pods: PodsMode,
    /// cgroup v2 directories whose processes' connects are never touched (pods that run
    /// their own mesh sidecar, say), with everything below them. Paths that do not exist
    /// yet take effect when they appear.
    pub exclude_cgroups: Vec<PathBuf>,
    /// How long a pod namespace whose path to the node address is blocked is served by
    /// the in-kernel fallback before it is probed again (doubling while it stays blocked).
    #[serde(with = "humantime_serde")]
    pub blocked_retry: Duration,
    /// Connections the agent holds before it is saturated and new ones go straight to
    /// endpoints in the kernel (see `capacity`). Default: what the open-files limit allows,
    /// two descriptors per connection after a headroom.
    pub max_connections: Option<usize>,
    /// What HTTP clients may send.
    pub http_limits: HttpLimits,
}

/// Default admin API address (linkerd2-proxy's admin port).
pub const DEFAULT_ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 4191);

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Name servers to ask (`ip:port`); empty means the host's /etc/resolv.conf.
    pub servers: Vec<SocketAddr>,
    /// Answers are re-resolved when their TTL runs out, clamped to [min_ttl, max_ttl].
    #[serde(with = "humantime_serde")]
    pub min_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self { servers: Vec::new(), min_ttl: Duration::from_secs(1), max_ttl: Duration::from_secs(300) }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// A kubeconfig file; default: in-cluster service account, else $KUBECONFIG/~/.kube/config.
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (for its zone and region labels); default $NODE_NAME.
    pub node_name: Option<String>,
    /// How long start-up waits for the first complete view of the cluster; past it the
    /// agent starts with what it has (its config file's services) and the cluster's
    /// follow as they come.
    #[serde(with = "humantime_serde")]
    pub sync_timeout: Duration,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self { kubeconfig: None, node_name: None, sync_timeout: Duration::from_secs(30) }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            listen_port: DEFAULT_LISTEN_PORT,
            cgroup: None,
            mark: DEFAULT_MARK,
            drain_timeout_secs: DEFAULT_DRAIN_SECS,
            zone: None,
            region: None,
            catalog: None,
            dns: DnsConfig::default(),
            kubernetes: None,
            admin: Some(DEFAULT_ADMIN),
            metrics: None,
            detect: DetectConfig::default(),
            stats: true,
            bpffs_dir: PathBuf::from(DEFAULT_BPFFS_DIR),
            handover_socket: PathBuf::from(DEFAULT_HANDOVER_SOCKET),
            node_address: pods::default_node_address(),
            pods: PodsMode::default(),
            exclude_cgroups: Vec::new(),
            blocked_retry: Duration::from_secs(60),
            max_connections: None,
            http_limits: HttpLimits::default(),
        }
    }
}

impl AgentConfig {
    /// Where the agent's own listener answers: a service address there would loop.
    pub fn listeners(&self) -> Vec<SocketAddr> {
        [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)]
            .into_iter()
            .chain(self.node_address.iter().copied())
            .map(|ip| SocketAddr::new(ip, self.listen_port))
            .collect()
    }
}

impl Config {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    /// Parse and validate config text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config =
            serde_yaml_ng::from_str(text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config.canonical())
        } else {
            Err(ConfigError::Invalid { path: path.to_owned(), problems })
        }
    }

    /// Every validation problem, in field order.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut problem = |field: String, message: String| out.push(Problem { field, message });
        let a = &self.agent;
        if a.listen_port == 0 {
            problem("agent.listen_port".into(), "must be a port from 1 to 65535".into());
        }
        if a.mark == 0 {
            problem(
                "agent.mark".into(),
                "must not be 0: every ordinary socket has mark 0, so nothing would be redirected".into(),
            );
        }
        if a.metrics.is_some() && a.admin.is_none() {
            problem("agent.metrics".into(), "is served beside the admin API: turn agent.admin on too".into());
        }
        if let Some(m) = a.metrics {
            if a.admin.is_some_and(|admin| admin.port() == m.port()) {
                problem(
                    "agent.metrics".into(),
                    format!("{m} shares its port with agent.admin: give it a port of its own"),
                );
            }
            if m.port() == a.listen_port || m.port() == 0 {
                problem("agent.metrics".into(), format!("{m} needs a port of its own (not 0, not agent.listen_port)"));
            }
        }
        a.detect.problems(&mut problem);
        a.http_limits.problems(&mut problem);
        if a.max_connections == Some(0) {
            problem(
                "agent.max_connections".into(),
                "must be at least 1 (or left out: derived from the open-files limit)".into(),
            );
        }
        if let Some(cg) = &a.cgroup
            && !cg.is_absolute()
        {
            problem("agent.cgroup".into(), format!("`{}` must be an absolute path", cg.display()));
        }
        for (field, path) in [("agent.bpffs_dir", &a.bpffs_dir), ("agent.handover_socket", &a.handover_socket)] {
            if !path.is_absolute() {
                problem(field.into(), format!("`{}` must be an absolute path", path.display()));
            }
        }
        let service_ips: Vec<IpAddr> =
            self.services.iter().flat_map(|s| &s.addresses).map(|a| canonical(*a).ip()).collect();
        a.pods_problems(&service_ips, &mut problem);
        let listeners = a.listeners();
        let by_name: HashMap<&str, &ServiceConfig> = self.services.iter().map(|s| (s.name.as_str(), s)).collect();
        // Names some route (or override allowance) leads to: they need no address.
        let routed: HashSet<&str> = self
            .services
            .iter()
            .flat_map(|o| {
                o.route.iter().flat_map(|r| r.targets()).chain(o.http.allow_override.iter().map(String::as_str))
            })
            .collect();

        let mut names: HashMap<&str, String> = HashMap::new();
        let mut owners: HashMap<SocketAddr, String> = HashMap::new();
        let mut per_origin: HashMap<&Origin, usize> = HashMap::new();
        for svc in &self.services {
            let index = per_origin.entry(&svc.origin).or_default();
            let label = svc.origin.label(*index, &svc.name);
            *index += 1;
            let at = |field: &str| format!("{label}.{field}");
            if let Some(first) = names.insert(&svc.name, label.clone())
                && !svc.name.trim().is_empty()
            {
                problem(at("name"), format!("`{}` is already the name of {first}", svc.name));
            }
            let mut owner = |addr| owners.insert(addr, label.clone());
            svc.own_problems(&label, &listeners, routed.contains(svc.name.as_str()), &mut owner, &mut problem);
            if let Some(route) = &svc.route
                && svc.endpoints.is_empty()
            {
                route_problems(&by_name, svc, route, &at, &mut problem);
            }
            for target in &svc.http.allow_override {
                if !by_name.contains_key(target.as_str()) {
                    problem(at("http.allow_override"), format!("names `{target}`, which is not a service"));
                }
            }
        }
        out
    }

    /// The service called `name`.
    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.name == name)
    }

    /// The same config with v4-mapped IPv6 addresses written as IPv4, the form the kernel
    /// and the lookups use.
    pub(crate) fn canonical(mut self) -> Self {
        self.services.iter_mut().for_each(ServiceConfig::canonicalize);
        self
    }
}

/// Route targets must exist, weights must add up to something, and following routes
/// must end at concrete services: no cycles, at most `MAX_ROUTE_DEPTH` hops.
fn route_problems(
    services: &HashMap<&str, &ServiceConfig>,
    svc: &ServiceConfig,
    route: &Route,
    at: &impl Fn(&str) -> String,
    problem: &mut impl FnMut(String, String),
) {
    if route.split.is_empty() == route.failover.is_empty() {
        problem(at("route"), "give exactly one of `split` (weighted) or `failover` (ordered)".into());
    }
    if !route.split.is_empty() && route.split.iter().map(|b| b.weight).sum::<u32>() == 0 {
        problem(at("route.split"), "weights must not all be 0".into());
    }
    for target in route.targets() {
        if !services.contains_key(target) {
            problem(at("route"), format!("names `{target}`, which is not a service"));
        }
    }
    // Depth-first walk from this service; finding it again is a cycle.
    let mut stack: Vec<(&str, usize)> = route.targets().into_iter().map(|t| (t, 1)).collect();
    while let Some((name, depth)) = stack.pop() {
        if name == svc.name {
            problem(at("route"), format!("leads back to `{}` (a cycle)", svc.name));
            return;
        }
        if depth > MAX_ROUTE_DEPTH {
            problem(at("route"), format!("is more than {MAX_ROUTE_DEPTH} routes deep"));
            return;
        }
        if let Some(next) = services.get(name).and_then(|s| s.route.as_ref()) {
            stack.extend(next.targets().into_iter().map(|t| (t, depth + 1)));
        }
    }
}

/// Longest chain of routes a connection may follow.
pub const MAX_ROUTE_DEPTH: usize = 8;

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn unusable(addr: SocketAddr) -> Option<String> {
    if addr.port() == 0 {
        Some(format!("{addr} has port 0"))
    } else if addr.ip().is_unspecified() {
        Some(format!("{addr} is the unspecified address"))
    } else if addr.ip().is_multicast() {
        Some(format!("{addr} is a multicast address"))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.yaml"))
    }

    fn problems(text: &str) -> Vec<String> {
        match parse(text) {
            Err(ConfigError::Invalid { problems, .. }) => problems.into_iter().map(|p| p.field).collect(),
            other => panic!("expected validation problems, got {other:?}"),
        }
    }

    #[test]
    fn full_config_parses_with_defaults() {
        let c = parse(
            "services:\n  - name: redis\n    addresses: [\"10.96.0.10:6379\", \"[fd96::10]:6379\", \"[::ffff:10.96.0.11]:6379\"]\n    endpoints: [\"10.0.0.2:6379\"]\n",
        )
        .unwrap();
        assert_eq!(c.services[0].addresses[2], "10.96.0.11:6379".parse().unwrap(), "v4-mapped is canonicalised");
    }

    /// Every default the README's config block (and docs/http.md) documents, pinned to
    /// the documented literal: comparing the parsed config with `Default::default()`
    /// would pass whatever the defaults were.
    #[test]
    fn documented_defaults_are_the_parsed_defaults() {
        let c = parse(
            "services:\n  - name: redis\n    addresses: [\"10.96.0.10:6379\"]\n    endpoints: [\"10.0.1.5:6379\"]\n",
        )
        .unwrap();
        let a = &c.agent;
        let secs = Duration::from_secs;
        // agent:
        assert_eq!(a.listen_port, 15001);
        assert_eq!(a.cgroup, None, "the cgroup2 root, found at start");
        assert_eq!(a.mark, 0x5359);
        assert_eq!(a.drain_timeout_secs, 5);
        assert_eq!((a.zone.as_deref(), a.region.as_deref()), (None, None));
        assert_eq!(a.admin, Some("127.0.0.1:4191".parse().unwrap()));
        assert_eq!(a.metrics, None, "metrics beyond the admin API only when asked for");
        assert!(a.stats);
        assert_eq!(a.bpffs_dir, Path::new("/sys/fs/bpf/switchyard"));
        assert_eq!(a.handover_socket, Path::new("/run/switchyard/handover.sock"));
        assert_eq!(a.catalog, None);
        assert_eq!(a.dns.servers, Vec::<SocketAddr>::new(), "empty: /etc/resolv.conf");
        assert_eq!((a.dns.min_ttl, a.dns.max_ttl), (secs(1), secs(300)));
        assert_eq!(a.kubernetes, None);
        assert_eq!(a.detect.timeout, Duration::from_millis(100));
        assert_eq!(a.detect.opaque_ports, [25, 587, 3306, 4444, 5432, 6379, 9300, 11211]);
        let node: Vec<IpAddr> = vec!["169.254.83.89".parse().unwrap(), "fd00:5359::1".parse().unwrap()];
        assert_eq!(a.node_address, node);
        assert_eq!(a.pods, PodsMode::Redirect);
        assert_eq!(a.exclude_cgroups, Vec::<PathBuf>::new());
        assert_eq!(a.blocked_retry, secs(60));
        assert_eq!(a.max_connections, None, "derived from the open-files limit");
        let l = &a.http_limits;
        assert_eq!((l.header_read_timeout, l.idle_timeout), (Some(secs(30)), Some(secs(3600))));
        assert_eq!((l.max_header_bytes, l.max_concurrent_streams, l.max_pending_reset_streams), (61440, 200, 20));
        // services[]: "Everything below is optional; these are the defaults."
        let s = &c.services[0];
        let ep = &s.endpoints[0];
        assert_eq!((ep.weight, ep.terminating), (1, false), "plain ip:port: weight 1");
        assert_eq!(ep.place, None, "no locality");
        assert_eq!(s.balance, BalanceKind::P2cEwma);
        assert_eq!(s.session_affinity, None, "default: none");
        assert_eq!((s.connect.timeout, s.connect.attempts, s.connect.deadline), (secs(1), 3, secs(3)));
        let fa = &s.failure_accrual;
        assert_eq!(
            (fa.consecutive_failures, fa.base_ejection, fa.max_ejection, fa.max_ejected_percent),
            (3, secs(2), secs(60), 50)
        );
        assert_eq!(s.health_check, None, "default: none");
        assert_eq!(s.locality.spill_threshold, 0.7);
        assert_eq!(s.drain_timeout, secs(30));
        assert_eq!(s.protocol, Protocol::Auto);
        assert_eq!(s.mode, ServiceMode::Proxy);
        let h = &s.http;
        assert_eq!(h.request_timeout, Some(secs(15)));
        assert_eq!(h.attempt_timeout, None, "optional; the request timeout");
        let r = &h.retry;
        assert_eq!(
            (r.attempts, r.on_status.as_slice(), r.on_grpc.as_slice(), r.max_body),
            (3, &[503][..], &[14][..], 65536)
        );
        assert_eq!((r.budget_ratio, r.budget_min_per_second, r.budget_window), (0.2, 10, secs(10)));
        assert_eq!(h.allow_override, Vec::<String>::new());
        assert_eq!(h.pool_idle_timeout, secs(90));
        // Health checks: the documented defaults of the fields a check leaves out.
        let c = parse("services:\n  - name: web\n    addresses: [\"10.96.0.10:80\"]\n    endpoints: [\"10.0.1.5:80\"]\n    health_check: { kind: http }\n")
            .unwrap();
        let hc = c.services[0].health_check.as_ref().unwrap();
        assert_eq!(hc.http(), Some(("/", 200)), "GET / expecting 200");
        assert_eq!((hc.interval, hc.timeout, hc.rise, hc.fall), (secs(5), secs(1), 2, 3));
    }

    #[test]
    fn syntax_errors_name_field_and_line() {
        let err =
            parse("services:\n  - name: web\n    addresses: [\"10.96.0.300:80\"]\n    endpoints: []\n").unwrap_err();
        let ConfigError::Parse { source, .. } = &err else { panic!("{err:?}") };
        let msg = source.to_string();
        assert!(msg.contains("services[0].addresses[0]"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
    }

    #[test]
    fn endpoint_errors_name_the_endpoint_and_what_is_wrong() {
        let msg = |text: &str| match parse(text).unwrap_err() {
            ConfigError::Parse { source, .. } => source.to_string(),
            e => panic!("{e:?}"),
        };
        let head = "services:\n  - name: a\n    addresses: [\"10.96.0.1:80\"]\n";
        let bad_addr = msg(&format!("{head}    endpoints: [\"10.0.0.1:80\", \"10.0.0.300:80\"]\n"));
        assert!(
            bad_addr.contains("services[0].endpoints[1]") && bad_addr.contains("`10.0.0.300:80` is neither ip:port"),
            "{bad_addr}"
        );
        let bad_key = msg(&format!("{head}    endpoints: [{{ address: \"10.0.0.1:80\", wieght: 2 }}]\n"));
        assert!(bad_key.contains("unknown field `wieght`"), "{bad_key}");
        let ok =
            parse(&format!("{head}    endpoints: [{{ address: \"10.0.0.1:80\", weight: 2, zone: a }}]\n")).unwrap();
        assert_eq!(ok.services[0].endpoints[0].weight, 2);
        assert_eq!(ok.services[0].endpoints[0].place.zone(), Some("a"));
    }

    #[test]
    fn routes_must_reach_concrete_services_without_cycles() {
        let ok = parse(
            "services:\n  - { name: web, addresses: [\"10.96.0.1:80\"], route: { split: [{ service: v1, weight: 90 }, { service: v2, weight: 10 }] } }\n  - { name: v1, endpoints: [\"10.0.0.1:80\"] }\n  - { name: v2, route: { failover: [v1] } }\n",
        );
        assert!(ok.is_ok(), "{ok:?}");
        let fields = problems(
            "services:\n  - { name: a, addresses: [\"10.96.0.1:80\"], route: { failover: [b, nope] } }\n  - { name: b, route: { split: [{ service: a, weight: 1 }] } }\n  - { name: c, endpoints: [\"10.0.0.1:80\"] }\n  - { name: d, addresses: [\"10.96.0.2:80\"], endpoints: [\"10.0.0.1:80\"], route: { failover: [c] } }\n  - { name: e, endpoints: [\"10.0.0.1:80\"] }\n",
        );
        assert_eq!(
            fields,
            [
                "services[0].route",
                "services[0].route",
                "services[1].route",
                "services[3].route",
                "services[4].addresses"
            ],
            "missing target, cycle (from both ends), unreachable service, endpoints and route together"
        );
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = parse("agent:\n  listen_prot: 1\n").unwrap_err();
        let ConfigError::Parse { source, .. } = &err else { panic!("{err:?}") };
        assert!(source.to_string().contains("listen_prot"), "{source}");
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let fields = problems(
            r#"
agent: { mark: 0, listen_port: 15001 }
services:
  - name: a
    addresses: ["10.96.0.1:80", "127.0.0.1:15001"]
    endpoints: []
  - name: a
    addresses: ["[::ffff:10.96.0.1]:80", "0.0.0.0:80"]
    endpoints: ["10.0.0.1:0"]
  - name: ""
    addresses: []
    endpoints: ["10.0.0.1:80"]
"#,
        );
        assert_eq!(
            fields,
            [
                "agent.mark",
                "services[0].addresses[1]",
                "services[0].endpoints",
                "services[1].name",
                "services[1].addresses[0]",
                "services[1].addresses[1]",
                "services[1].endpoints[0]",
                "services[2].name",
                "services[2].addresses",
            ]
        );
    }

    #[test]
    fn protocol_and_http_policy_problems_name_their_fields() {
        let fields = problems(
            r#"
agent: { detect: { timeout: 0s, opaque_ports: [0] } }
services:
  - name: web
    addresses: ["10.96.0.1:80"]
    endpoints: ["10.0.0.1:80"]
    protocol: http2
    http:
      request_timeout: 0s
      retry: { attempts: 0, on_status: [700], on_grpc: [17], budget_ratio: -1, budget_window: 0s }
      allow_override: [nowhere, canary]
  - { name: canary, endpoints: ["10.0.0.2:80"] }
  - { name: fast, addresses: ["10.96.0.3:80"], endpoints: ["10.0.0.3:80"], mode: kernel, protocol: http1 }
"#,
        );
        assert_eq!(
            fields,
            [
                "agent.detect.timeout",
                "agent.detect.opaque_ports",
                "services[0].http.request_timeout",
                "services[0].http.retry.attempts",
                "services[0].http.retry.on_status",
                "services[0].http.retry.on_grpc",
                "services[0].http.retry.budget_ratio",
                "services[0].http.retry.budget_window",
                "services[0].http.allow_override",
                "services[2].mode",
            ]
        );
        let err = parse(
            "services: [{ name: a, addresses: [\"10.96.0.1:80\"], endpoints: [\"10.0.0.1:80\"], mode: kernel, protocol: http2 }]\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("cannot be combined with `protocol: http2`"), "{err}");
        let kernel = parse(
            "services: [{ name: a, addresses: [\"10.96.0.1:80\"], endpoints: [\"10.0.0.1:80\"], mode: kernel }]\n",
        )
        .unwrap();
        assert_eq!(kernel.services[0].mode, ServiceMode::Kernel);
        assert!(
            parse("services: [{ name: a, addresses: [\"10.96.0.1:80\"], endpoints: [\"10.0.0.1:80\"], mode: ebpf }]\n")
                .is_err()
        );
        let err = parse(
            "services: [{ name: a, addresses: [\"10.96.0.1:80\"], endpoints: [\"10.0.0.1:80\"], protocol: h3 }]\n",
        );
        let ConfigError::Parse { source, .. } = err.unwrap_err() else { panic!("a parse error") };
        let text = source.to_string();
        assert!(text.contains("unknown variant `h3`, expected one of `auto`, `tcp`, `http1`, `http2`"), "{text}");
    }

    #[test]
    fn session_affinity_defaults_to_kubernetes_timeout_and_keeps_within_its_limit() {
        let svc = |affinity: &str| {
            format!(
                "services: [{{ name: a, addresses: [\"10.96.0.1:80\"], endpoints: [\"10.0.0.1:80\"], session_affinity: {affinity} }}]\n"
            )
        };
        let timeout = |affinity: &str| parse(&svc(affinity)).unwrap().services[0].session_affinity.clone();
        assert_eq!(timeout("{}").unwrap().timeout, Duration::from_secs(10_800), "kube-proxy's default, 3 h");
        assert_eq!(timeout("{}"), Some(SessionAffinity::default()));
        assert_eq!(timeout("{ timeout: 2s }").unwrap().timeout, Duration::from_secs(2));
        assert_eq!(timeout("{ timeout: 24h }").unwrap().timeout, Duration::from_secs(86_400), "the limit itself");
        assert_eq!(timeout("null"), None);
        let ConfigError::Parse { source, .. } = parse(&svc("{ timeot: 2s }")).unwrap_err() else { panic!() };
        assert!(source.to_string().contains("unknown field `timeot`"), "{source}");

        for bad in ["{ timeout: 0s }", "{ timeout: 86401s }"] {
            assert_eq!(problems(&svc(bad)), ["services[0].session_affinity.timeout"], "{bad}");
        }
        let err = parse(&svc("{ timeout: 25h }")).unwrap_err().to_string();
        assert!(err.contains("services[0].session_affinity.timeout: 90000s is more than 86400s (24h)"), "{err}");
        let err = parse(&svc("{ timeout: 0s }")).unwrap_err().to_string();
        assert!(err.contains("services[0].session_affinity.timeout: must be more than 0"), "{err}");
        // Accepted with `mode: kernel` (the kernel's connections do not follow it).
        let kernel = svc("{}").replace("session_affinity", "mode: kernel, session_affinity");
        assert!(parse(&kernel).unwrap().services[0].session_affinity.is_some());
        // A route has no endpoints of its own to keep clients on.
        assert_eq!(
            problems(
                "services:\n  - { name: web, addresses: [\"10.96.0.1:80\"], route: { failover: [v1] }, session_affinity: {} }\n  - { name: v1, endpoints: [\"10.0.0.1:80\"] }\n"
            ),
            ["services[0].session_affinity"]
        );
    }

    #[test]
    fn pin_directory_and_handover_socket_default_and_must_be_absolute() {
        let c = parse("agent: {}\n").unwrap();
        assert_eq!(c.agent.bpffs_dir, Path::new("/sys/fs/bpf/switchyard"));
        assert_eq!(c.agent.handover_socket, Path::new("/run/switchyard/handover.sock"));
        let fields = problems("agent: { bpffs_dir: pins, handover_socket: ho.sock }\n");
        assert_eq!(fields, ["agent.bpffs_dir", "agent.handover_socket"]);
    }

    #[test]
    fn the_metrics_listener_needs_a_port_of_its_own() {
        let c = parse("agent: { metrics: \"0.0.0.0:4192\" }\n").unwrap();
        assert_eq!(c.agent.metrics, Some("0.0.0.0:4192".parse().unwrap()));
        assert_eq!(problems("agent: { metrics: \"0.0.0.0:4191\" }\n"), ["agent.metrics"]);
        assert_eq!(problems("agent: { metrics: \"0.0.0.0:15001\" }\n"), ["agent.metrics"]);
    }

    #[test]
    fn invalid_display_lists_problems() {
        let err = parse("agent: { listen_port: 0 }\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("test.yaml has 1 problem(s)"), "{text}");
        assert!(text.contains("agent.listen_port: must be a port"), "{text}");
    }
}
