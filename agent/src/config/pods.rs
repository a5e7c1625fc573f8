//! `agent.node_address`, `agent.pods`, `agent.exclude_cgroups`: how connects from pods (other
//! network namespaces) reach the agent. See docs/design.md, "Pods".

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use super::AgentConfig;

/// Default node addresses: link-local IPv4 "S.Y" (0x53, 0x59) and a ULA with the same
/// letters, chosen to stay clear of the link-local addresses others use (below).
pub const DEFAULT_NODE_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 83, 89);
pub const DEFAULT_NODE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x5359, 0, 0, 0, 0, 0, 1);

/// Link-local addresses with an owner on many nodes: cloud metadata (169.254.169.254),
/// NodeLocal DNSCache (169.254.20.10, and .25.10 on some distributions), the AWS/Azure
/// fabric and time services (169.254.7.127), Calico's and GKE's gateway (169.254.1.1).
const TAKEN: [Ipv4Addr; 5] = [
    Ipv4Addr::new(169, 254, 169, 254),
    Ipv4Addr::new(169, 254, 20, 10),
    Ipv4Addr::new(169, 254, 25, 10),
    Ipv4Addr::new(169, 254, 7, 127),
    Ipv4Addr::new(169, 254, 1, 1),
];

/// What happens to connects to service addresses made in another network namespace
/// than the agent's (pods).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PodsMode {
    /// Through the agent at the node address (probed per namespace; blocked namespaces
    /// take the in-kernel fallback).
    #[default]
    Redirect,
    /// Always the in-kernel fallback: a healthy endpoint picked in the kernel.
    Fallback,
    /// Untouched, as before pods were covered.
    Off,
}

impl PodsMode {
    /// The value the kernel programs read (`switchyard_common::pods`).
    pub fn kernel(self) -> u16 {
        use switchyard_common::pods;
        match self {
            Self::Redirect => pods::REDIRECT,
            Self::Fallback => pods::FALLBACK,
            Self::Off => pods::OFF,
        }
    }
}

pub fn default_node_address() -> Vec<IpAddr> {
    vec![DEFAULT_NODE_V4.into(), DEFAULT_NODE_V6.into()]
}

impl AgentConfig {
    /// The node address of each family, if configured.
    pub fn node_v4(&self) -> Option<Ipv4Addr> {
        self.node_address.iter().find_map(|a| match a {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
    }

    pub fn node_v6(&self) -> Option<Ipv6Addr> {
        self.node_address.iter().find_map(|a| match a {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        })
    }

    /// Problems of the pod settings; `service_ips` are the IPs of every service address,
    /// which a node address must not shadow.
    pub(super) fn pods_problems(&self, service_ips: &[IpAddr], problem: &mut impl FnMut(String, String)) {
        let (mut v4s, mut v6s) = (0, 0);
        for (i, ip) in self.node_address.iter().enumerate() {
            let field = format!("agent.node_address[{i}]");
            let why = match ip {
                IpAddr::V4(v4) if !v4.is_link_local() => {
                    Some("must be a link-local IPv4 address (169.254.0.0/16), which is never routed off the node")
                }
                IpAddr::V4(v4) if TAKEN.contains(v4) => Some(
                    "is used by others on many nodes (cloud metadata, NodeLocal DNSCache, cloud fabric, CNI \
                     gateways); pick another 169.254.x.y",
                ),
                IpAddr::V6(v6) if (v6.segments()[0] & 0xfe00) != 0xfc00 => Some(
                    "must be a unique local IPv6 address (fc00::/7): a link-local one needs a scope pods do not \
                     have, a global one may belong to someone",
                ),
                _ if service_ips.contains(ip) => Some("is a service address's IP"),
                _ => None,
            };
            if let Some(why) = why {
                problem(field.clone(), format!("{ip} {why}"));
            }
            match ip {
                IpAddr::V4(_) => v4s += 1,
                IpAddr::V6(_) => v6s += 1,
            }
        }
        if v4s > 1 || v6s > 1 {
            problem("agent.node_address".into(), "give at most one IPv4 and one IPv6 address".into());
        }
        if self.pods == PodsMode::Redirect && v4s == 0 && v6s == 0 {
            problem(
                "agent.node_address".into(),
                "must not be empty while agent.pods is redirect: pods reach the agent there (or set pods: \
                 fallback or off)"
                    .into(),
            );
        }
        for (i, cg) in self.exclude_cgroups.iter().enumerate() {
            if !cg.is_absolute() {
                problem(format!("agent.exclude_cgroups[{i}]"), format!("`{}` must be an absolute path", cg.display()));
            }
        }
        if self.blocked_retry.is_zero() {
            problem("agent.blocked_retry".into(), "must be more than 0".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{Config, ConfigError};

    /// The problems of `agent` (YAML) beside one service at 10.96.0.10:80, as "field: message".
    fn problems(agent: &str) -> Vec<String> {
        let text = format!(
            "agent:\n{agent}\nservices:\n  - {{ name: a, addresses: [\"10.96.0.10:80\"], endpoints: [\"10.0.0.1:80\"] }}\n"
        );
        match Config::parse(&text, Path::new("t.yaml")) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid { problems, .. }) => {
                problems.into_iter().map(|p| format!("{}: {}", p.field, p.message)).collect()
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn defaults_are_the_sy_addresses_and_redirect() {
        let a = AgentConfig::default();
        assert_eq!(a.pods, PodsMode::Redirect);
        assert_eq!((a.node_v4(), a.node_v6()), (Some(DEFAULT_NODE_V4), Some(DEFAULT_NODE_V6)));
        assert!(problems("  pods: redirect").is_empty());
    }

    #[test]
    fn addresses_others_use_or_that_route_off_the_node_are_refused() {
        for taken in ["169.254.169.254", "169.254.20.10", "169.254.25.10", "169.254.7.127", "169.254.1.1"] {
            let p = problems(&format!("  node_address: [{taken}]"));
            assert!(
                p.len() == 1 && p[0].starts_with("agent.node_address[0]: ") && p[0].contains("used by others"),
                "{p:?}"
            );
        }
        let p = problems("  node_address: [10.1.2.3, \"fe80::1\"]");
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("link-local IPv4") && p[1].contains("unique local"), "{p:?}");
        let p = problems("  node_address: [\"2001:db8::1\"]");
        assert!(p.len() == 1 && p[0].contains("unique local"), "{p:?}");
        let p = problems("  node_address: [169.254.1.2, 169.254.1.3]");
        assert_eq!(p, ["agent.node_address: give at most one IPv4 and one IPv6 address"]);
    }

    #[test]
    fn a_node_address_may_not_be_a_service_address_nor_missing_while_redirecting() {
        let text = "agent:\n  node_address: [169.254.9.9]\nservices:\n  - { name: a, addresses: [\"169.254.9.9:80\"], endpoints: [\"10.0.0.1:80\"] }\n";
        let Err(ConfigError::Invalid { problems: found, .. }) = Config::parse(text, Path::new("t.yaml")) else {
            panic!("accepted a node address that is a service's")
        };
        assert!(found.iter().any(|p| p.field == "agent.node_address[0]" && p.message.contains("service")));
        let p = problems("  node_address: []");
        assert!(p.len() == 1 && p[0].contains("must not be empty while agent.pods is redirect"), "{p:?}");
        assert!(problems("  node_address: []\n  pods: fallback").is_empty());
        assert!(problems("  node_address: []\n  pods: \"off\"").is_empty());
    }

    #[test]
    fn exclusions_must_be_absolute_and_retry_positive() {
        let p = problems("  exclude_cgroups: [kubepods/pod1]\n  blocked_retry: 0s");
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].starts_with("agent.exclude_cgroups[0]") && p[1].starts_with("agent.blocked_retry"));
        assert!(problems("  exclude_cgroups: [/sys/fs/cgroup/kubepods/pod1]\n  blocked_retry: 5s").is_empty());
    }
}
