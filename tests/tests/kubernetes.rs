//! End to end: the agent's Kubernetes source against the API stand-in (tests/src/
//! kube_api.rs, which speaks the real list/watch protocol; no real API server can run
//! here). Services and EndpointSlices change while clients connect through the redirect;
//! the API fails, expires watches and serves bad objects.

mod manifests;

use std::{path::Path, thread, time::Duration};

use serde_json::{Value, json};
use switchyard_tests::{
    Agent, Proc, Topology, eventually, host_v4,
    kube_api::{KubeApi, Resource, listen_in_netns},
    require_root,
};

const ENETUNREACH: &str = "101";

fn service(name: &str, ip: &str, port: u16) -> Value {
    json!({"metadata": {"namespace": "shop", "name": name},
           "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                    "ports": [{"name": "main", "port": port, "protocol": "TCP", "targetPort": 7000}]}})
}

/// An EndpointSlice for `svc` with (host index, ready, terminating) endpoints on 7000.
fn slice(svc: &str, endpoints: &[(usize, bool, bool)]) -> Value {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|&(h, ready, terminating)| {
            json!({"addresses": [host_v4(h)], "nodeName": format!("node{h}"), "zone": "a",
                   "conditions": {"ready": ready, "serving": ready || terminating, "terminating": terminating}})
        })
        .collect();
    json!({"metadata": {"namespace": "shop", "name": format!("{svc}-abcde"),
                        "labels": {"kubernetes.io/service-name": svc}},
           "addressType": "IPv4",
           "ports": [{"name": "main", "port": 7000, "protocol": "TCP"}],
           "endpoints": eps})
}

struct Cluster {
    api: KubeApi,
    agent: Agent,
    topo: Topology,
    _servers: Vec<Proc>,
}

fn cluster(test: &str, hosts: usize, static_services: &str) -> Option<Cluster> {
    if !require_root(test) {
        return None;
    }
    let topo = Topology::with_hosts(hosts);
    let servers = (0..hosts).map(|i| topo.echo_server(i, 7000, 0)).collect();
    let api = KubeApi::serve(listen_in_netns(&Path::new("/run/netns").join(&topo.node.name)));
    api.apply(
        Resource::Nodes,
        json!({"metadata": {"name": "node0", "labels": {"topology.kubernetes.io/zone": "a",
                                                        "topology.kubernetes.io/region": "r1"}}}),
    );
    api.apply(Resource::Services, service("web", "10.96.0.20", 80));
    api.apply(Resource::EndpointSlices, slice("web", &[(0, true, false)]));
    let kubeconfig = topo.dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let config = format!(
        "agent:\n  cgroup: {}\n  kubernetes: {{ kubeconfig: {}, node_name: node0 }}\nservices:\n{static_services}",
        topo.cgroup.path.display(),
        kubeconfig.display()
    );
    let agent = Agent::start(&topo, &config);
    Some(Cluster { api, agent, topo, _servers: servers })
}

impl Cluster {
    fn reached(&self, target: &str) -> Option<String> {
        self.topo.probe(target, 0).get("hello").map(str::to_owned)
    }

    /// Endpoints `n` fresh connections reach.
    fn spread(&self, target: &str, n: usize) -> Vec<String> {
        let conns = self.topo.load(target, &["--conns", &n.to_string()], None).wait();
        conns.into_iter().map(|c| c.outcome.unwrap_or_else(|e| format!("failed: {e}"))).collect()
    }
}

#[test]
fn cluster_changes_reach_new_connections_and_never_cut_open_ones() {
    let Some(c) = cluster("cluster_changes_reach_new_connections", 3, "  []\n") else { return };
    let (h0, h1, h2) = (host_v4(0) + ":7000", host_v4(1) + ":7000", host_v4(2) + ":7000");
    assert_eq!(c.reached("10.96.0.20:80").as_deref(), Some(h0.as_str()), "synced before ready");
    assert!(c.agent.log().contains("zone=Some(\"a\")"), "node locality from its labels");
    let held = c.topo.load("10.96.0.20:80", &["--conns", "1", "--hold-ms", "4000"], None);
    thread::sleep(Duration::from_millis(300));

    // A new ready endpoint: how long until a connection uses it?
    let t0 = std::time::Instant::now();
    c.api.apply(Resource::EndpointSlices, slice("web", &[(0, true, false), (1, true, false)]));
    eventually(Duration::from_secs(2), "the new endpoint to be used", || c.spread("10.96.0.20:80", 6).contains(&h1));
    eprintln!("EndpointSlice change to first connection using it: {:?}", t0.elapsed());

    // The first endpoint terminates: no new connections, the open one drains.
    c.api.apply(Resource::EndpointSlices, slice("web", &[(0, false, true), (1, true, false)]));
    eventually(Duration::from_secs(2), "terminating endpoint to get nothing new", || {
        c.spread("10.96.0.20:80", 6).iter().all(|e| *e == h1)
    });

    // A new Service appears, another one goes.
    c.api.apply(Resource::Services, service("api", "10.96.0.21", 81));
    c.api.apply(Resource::EndpointSlices, slice("api", &[(2, true, false)]));
    eventually(Duration::from_secs(2), "new service", || c.reached("10.96.0.21:81").as_deref() == Some(h2.as_str()));
    c.api.delete(Resource::Services, "shop", "web");
    eventually(Duration::from_secs(2), "deleted service to leave the kernel map", || {
        c.topo.probe("10.96.0.20:80", 0).get("connect_errno") == Some(ENETUNREACH)
    });

    let held = held.wait();
    assert!(held.len() == 1 && held[0].outcome.as_deref() == Ok(h0.as_str()), "open connection kept: {held:?}");
    c.agent.stop();
}

#[test]
fn api_errors_expired_watches_and_bad_objects_keep_the_last_good_state() {
    let static_svc = "  - { name: static, addresses: [\"10.96.0.30:7000\"], endpoints: [\"10.10.0.2:7000\"] }\n";
    let Some(c) = cluster("api_errors_expired_watches_and_bad_objects", 2, static_svc) else { return };
    let (h0, h1) = (host_v4(0) + ":7000", host_v4(1) + ":7000");

    // History compacted, every watch dropped, and the next requests fail: the watcher must
    // back off, relist and resume, while the agent keeps serving what it knew.
    let before = c.api.requests();
    c.api.fail_next(4);
    c.api.compact_and_drop_watches();
    for _ in 0..5 {
        assert_eq!(c.reached("10.96.0.20:80").as_deref(), Some(h0.as_str()), "last good state serves");
        thread::sleep(Duration::from_millis(200));
    }
    c.api.apply(Resource::EndpointSlices, slice("web", &[(1, true, false)]));
    eventually(Duration::from_secs(20), "the change after recovery", || {
        c.reached("10.96.0.20:80").as_deref() == Some(h1.as_str())
    });
    assert!(c.api.requests() > before + 4, "the agent came back after the failures");

    // A bad object is named in the log and skipped; the rest goes on.
    c.api.apply(Resource::Services, service("broken", "999.1.1.1", 80));
    eventually(Duration::from_secs(5), "the bad object to be reported", || {
        c.agent.log().contains("Service shop/broken: clusterIP `999.1.1.1` is not an IP address")
    });
    // A Service clashing with the config file is held back and reported; the static
    // service is untouched, and the rest of the cluster keeps applying meanwhile.
    c.api.apply(Resource::Services, service("clash", "10.96.0.30", 7000));
    c.api.apply(Resource::EndpointSlices, slice("clash", &[(1, true, false)]));
    eventually(Duration::from_secs(5), "the clash to be rejected", || {
        c.agent.log().lines().any(|l| l.contains("kubernetes") && l.contains("would be invalid"))
    });
    assert_eq!(c.reached("10.96.0.30:7000").as_deref(), Some(h0.as_str()), "the static service is untouched");
    assert_eq!(c.reached("10.96.0.20:80").as_deref(), Some(h1.as_str()), "the last good cluster view stays");
    let status = c.topo.admin_get("/status");
    assert!(status.contains("held back") && status.contains("shop/clash:main"), "{status}");
    c.api.apply(Resource::EndpointSlices, slice("web", &[(0, true, false)]));
    eventually(Duration::from_secs(5), "another Service's change to apply beside the held one", || {
        c.reached("10.96.0.20:80").as_deref() == Some(h0.as_str())
    });
    c.agent.stop();
}

/// The deployed ClusterRole is least privilege: what the agent asks the API server for,
/// from start to watching, is exactly what the role grants, no more (it would be refused
/// in a cluster) and no less (a grant nobody uses).
#[test]
fn the_agent_asks_for_exactly_what_the_deployed_cluster_role_grants() {
    let Some(c) = cluster("the_agent_asks_for_exactly_what_the_deployed_cluster_role_grants", 1, "  []\n") else {
        return;
    };
    let role = manifests::load().cluster_role;
    let mut granted = std::collections::BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    granted.insert((verb.clone(), group.clone(), resource.clone()));
                }
            }
        }
    }
    assert_eq!(c.reached("10.96.0.20:80").as_deref(), Some(format!("{}:7000", host_v4(0)).as_str()), "synced");
    // Watches open right after the first lists.
    eventually(
        Duration::from_secs(5),
        "every grant of the ClusterRole to be used (one never used is more than the agent needs)",
        || c.api.access().is_superset(&granted),
    );
    assert_eq!(c.api.access(), granted, "requests (left) against the ClusterRole in deploy/ (right)");
    c.agent.stop();
}
