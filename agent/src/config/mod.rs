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

pub use http::{DetectConfig, HttpConfig, Protocol, RetryConfig};
use serde::{Deserialize, Serialize};
pub use service::{
    BalanceKind, ConnectConfig, EndpointConfig, FailureAccrualConfig, HealthCheckConfig, HealthCheckKind,
    LocalityConfig, Origin, Route, ServiceConfig, ServiceMode, SplitBranch, Target,
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

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// A kubeconfig file; default: in-cluster service account, else $KUBECONFIG/~/.kube/config.
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (for its zone and region labels); default $NODE_NAME.
    pub node_name: Option<String>,
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
            detect: DetectConfig::default(),
            stats: true,
            bpffs_dir: PathBuf::from(DEFAULT_BPFFS_DIR),
            handover_socket: PathBuf::from(DEFAULT_HANDOVER_SOCKET),
            node_address: pods::default_node_address(),
            pods: PodsMode::default(),
            exclude_cgroups: Vec::new(),
            blocked_retry: Duration::from_secs(60),
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
        a.detect.problems(&mut problem);
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
        assert_eq!(c.agent, AgentConfig::default());
        assert_eq!(c.services[0].addresses[2], "10.96.0.11:6379".parse().unwrap(), "v4-mapped is canonicalised");
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
    fn pin_directory_and_handover_socket_default_and_must_be_absolute() {
        let c = parse("agent: {}\n").unwrap();
        assert_eq!(c.agent.bpffs_dir, Path::new("/sys/fs/bpf/switchyard"));
        assert_eq!(c.agent.handover_socket, Path::new("/run/switchyard/handover.sock"));
        let fields = problems("agent: { bpffs_dir: pins, handover_socket: ho.sock }\n");
        assert_eq!(fields, ["agent.bpffs_dir", "agent.handover_socket"]);
    }

    #[test]
    fn invalid_display_lists_problems() {
        let err = parse("agent: { listen_port: 0 }\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("test.yaml has 1 problem(s)"), "{text}");
        assert!(text.contains("agent.listen_port: must be a port"), "{text}");
    }
}
