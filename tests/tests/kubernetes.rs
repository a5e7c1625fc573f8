//! End to end: the agent's Kubernetes source against the API stand-in (tests/src/
//! kube_api.rs, which speaks the real list/watch protocol; no real API server can run
//! here). Services and EndpointSlices change while clients connect through the redirect;
//! the API fails, expires watches and serves bad objects.

mod manifests;

use std::{path::Path, process::Command, time::Duration};

use serde_json::{Value, json};
use switchyard_tests::{
    Agent, Proc, Topology, backends_py, eventually, host_v4,
    kube_api::{KubeApi, Resource, listen_in_netns},
    probe_bin, require_root,
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
    eventually(Duration::from_secs(5), "the held connection open through the agent", || {
        c.topo.open_conns("shop/web:main") == 1
    });

    // A new ready endpoint: how long until a connection uses it?
    let t0 = std::time::Instant::now();
    c.api.apply(Resource::EndpointSlices, slice("web", &[(0, true, false), (1, true, false)]));
    eventually(Duration::from_secs(10), "the new endpoint to be used", || c.spread("10.96.0.20:80", 6).contains(&h1));
    eprintln!("EndpointSlice change to first connection using it: {:?}", t0.elapsed());

    // The first endpoint terminates: no new connections, the open one drains.
    c.api.apply(Resource::EndpointSlices, slice("web", &[(0, false, true), (1, true, false)]));
    eventually(Duration::from_secs(10), "terminating endpoint to get nothing new", || {
        c.spread("10.96.0.20:80", 6).iter().all(|e| *e == h1)
    });

    // A new Service appears, another one goes.
    c.api.apply(Resource::Services, service("api", "10.96.0.21", 81));
    c.api.apply(Resource::EndpointSlices, slice("api", &[(2, true, false)]));
    eventually(Duration::from_secs(10), "new service", || c.reached("10.96.0.21:81").as_deref() == Some(h2.as_str()));
    c.api.delete(Resource::Services, "shop", "web");
    eventually(Duration::from_secs(10), "deleted service to leave the kernel map", || {
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

    // A change made as history is compacted past it: no watch sees it, and every live
    // watch ends with 410 Gone (and any watch from a version the agent has seen gets 410
    // too). Meanwhile every request fails: the watchers must back off and retry while
    // the agent keeps serving what it knew, then list again, which alone shows the change.
    let (before, lists_before, log_before) =
        (c.api.requests(), c.api.lists(Resource::EndpointSlices), c.agent.log_len());
    c.api.fail_next(u32::MAX);
    c.api.compact_expiring_watches(Resource::EndpointSlices, [slice("web", &[(1, true, false)])]);
    eventually(Duration::from_secs(20), "the agent to retry the failing API", || {
        assert_eq!(c.reached("10.96.0.20:80").as_deref(), Some(h0.as_str()), "last good state serves");
        c.api.requests() >= before + 4
    });
    c.api.fail_next(0);
    eventually(Duration::from_secs(20), "the compacted change, after the relist", || {
        c.reached("10.96.0.20:80").as_deref() == Some(h1.as_str())
    });
    let log = c.agent.log_since(log_before);
    assert!(
        log.lines().any(|l| l.contains("Kubernetes watch error") && l.contains("too old resource version")),
        "the 410 Gone reached the agent's watcher:\n{log}"
    );
    assert!(c.api.lists(Resource::EndpointSlices) > lists_before, "the agent listed EndpointSlices again");
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

/// The cluster's credentials as a pod has them: the API server over TLS with the cluster
/// CA, and a bearer token read from a file the kubelet rotates. A wrong CA and a revoked
/// token are clear errors, and the agent serves its last good state meanwhile.
#[test]
fn the_agent_trusts_the_cluster_ca_follows_token_rotation_and_keeps_serving_when_refused() {
    if !require_root("the_agent_trusts_the_cluster_ca_follows_token_rotation_and_keeps_serving_when_refused") {
        return;
    }
    let topo = Topology::with_hosts(2);
    let _servers: Vec<Proc> = (0..2).map(|i| topo.echo_server(i, 7000, 0)).collect();
    let api = KubeApi::serve_tls(listen_in_netns(&Path::new("/run/netns").join(&topo.node.name)), topo.dir.path());
    api.apply(Resource::Nodes, json!({"metadata": {"name": "node0"}}));
    api.apply(Resource::Services, service("web", "10.96.0.20", 80));
    api.apply(Resource::EndpointSlices, slice("web", &[(0, true, false)]));
    let (h0, h1) = (host_v4(0) + ":7000", host_v4(1) + ":7000");
    let reached = |target: &str| topo.probe(target, 0).get("hello").map(str::to_owned);
    // `sync_timeout`: how long start-up waits for the first lists. Short where they cannot
    // succeed (the wrong CA), ample where they must (TLS in a debug build on a busy machine).
    let config = |kubeconfig: &Path, sync_timeout: &str| {
        format!(
            "agent:\n  cgroup: {}\n  kubernetes: {{ kubeconfig: {}, node_name: node0, sync_timeout: {sync_timeout} }}\nservices:\n  - {{ name: static, addresses: [\"10.96.0.30:7000\"], endpoints: [\"{h0}\"] }}\n",
            topo.cgroup.path.display(),
            kubeconfig.display()
        )
    };

    // A CA that did not sign the API server's certificate: refused at the handshake, said
    // so, and the agent starts on its config file's services alone.
    let wrong = topo.dir.path().join("wrong-ca.crt");
    std::fs::write(&wrong, switchyard_tests::kube_api::unrelated_ca_pem()).unwrap();
    let creds = api.credentials.as_ref().unwrap();
    let wrong_kubeconfig = topo.dir.path().join("kubeconfig-wrong-ca");
    std::fs::write(
        &wrong_kubeconfig,
        api.kubeconfig().replace(&creds.ca.display().to_string(), &wrong.display().to_string()),
    )
    .unwrap();
    let agent = Agent::start(&topo, &config(&wrong_kubeconfig, "2s"));
    let log = agent.log();
    assert!(
        log.lines().any(|l| l.contains("Kubernetes watch error") && l.contains("invalid peer certificate")),
        "the untrusted certificate is named:\n{log}"
    );
    assert!(log.contains("Kubernetes API not synced yet"), "{log}");
    assert_eq!(reached("10.96.0.30:7000").as_deref(), Some(h0.as_str()), "the file's services serve");
    assert_eq!(topo.probe("10.96.0.20:80", 0).get("connect_errno"), Some(ENETUNREACH), "no cluster view");
    agent.stop();

    let kubeconfig = topo.dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let agent = Agent::start(&topo, &config(&kubeconfig, "30s"));
    assert_eq!(reached("10.96.0.20:80").as_deref(), Some(h0.as_str()), "synced over TLS with the token");
    assert_eq!(api.unauthorized(), 0);

    // The kubelet rotates the token and the old one is revoked at once; every watch
    // ends. The agent is refused until it reads the file again (kube-rs re-reads it 50 s
    // after the last read, at the next request), then resumes with the new token and sees
    // the change. Its watchers back off meanwhile (up to 30 s between tries), so this can
    // take up to about 90 s after the rotation: the bound leaves room above that.
    api.rotate_token("token-2");
    api.accept_only(&["token-2"]);
    api.compact_and_drop_watches();
    // Its watches are gone and its next requests refused: the change below can only
    // come through a watch made with the new token.
    eventually(Duration::from_secs(10), "the old token refused", || api.unauthorized() > 0);
    api.apply(Resource::EndpointSlices, slice("web", &[(1, true, false)]));
    assert_eq!(reached("10.96.0.20:80").as_deref(), Some(h0.as_str()), "the last good state serves meanwhile");
    eventually(Duration::from_secs(150), "the change seen with the rotated token", || {
        reached("10.96.0.20:80").as_deref() == Some(h1.as_str())
    });

    // Every token revoked: a clear error, retried, and the last good state serves on.
    let refused = api.unauthorized();
    api.accept_only(&[]);
    api.compact_and_drop_watches();
    eventually(Duration::from_secs(10), "the agent to be refused", || api.unauthorized() > refused);
    api.apply(Resource::EndpointSlices, slice("web", &[(0, true, false)]));
    eventually(Duration::from_secs(10), "the refusal logged", || {
        agent.log().lines().any(|l| l.contains("Kubernetes watch error") && l.contains("Unauthorized"))
    });
    for _ in 0..3 {
        assert_eq!(reached("10.96.0.20:80").as_deref(), Some(h1.as_str()), "the last good state serves");
        std::thread::sleep(Duration::from_millis(300));
    }
    agent.stop();
}

/// `service(name, ip, 80)` with more `spec` fields and `annotations`.
fn service_with(name: &str, ip: &str, spec: Value, annotations: Value) -> Value {
    let mut s = service(name, ip, 80);
    s["spec"].as_object_mut().unwrap().extend(spec.as_object().unwrap().clone());
    s["metadata"]["annotations"] = annotations;
    s
}

/// An endpoint on host `h` (port 7000), on `node`, in `zone`, with `conditions`, hinted
/// for `hint` if given.
fn endpoint(h: usize, node: &str, zone: &str, conditions: Value, hint: Option<&str>) -> Value {
    let mut e = json!({"addresses": [host_v4(h)], "nodeName": node, "zone": zone, "conditions": conditions});
    if let Some(zone) = hint {
        e["hints"] = json!({"forZones": [{"name": zone}]});
    }
    e
}

fn slice_of(svc: &str, endpoints: Vec<Value>) -> Value {
    let mut s = slice(svc, &[]);
    s["endpoints"] = Value::Array(endpoints);
    s
}

/// The hosts (indices) that `n` fresh connections reached; a failed one is `None`.
fn hosts_reached(c: &Cluster, target: &str, n: usize) -> Vec<Option<usize>> {
    c.spread(target, n).iter().map(|e| (0..3).find(|&h| *e == format!("{}:7000", host_v4(h)))).collect()
}

fn distinct(reached: &[Option<usize>]) -> std::collections::BTreeSet<Option<usize>> {
    reached.iter().copied().collect()
}

/// kube-proxy's semantics of Service fields, each through the stand-in API with real
/// connections from the node's cgroup. The agent's node is node0, in zone a.
#[test]
fn service_fields_decide_where_connections_go_as_kube_proxy_does() {
    let Some(c) = cluster("service_fields_decide_where_connections_go", 3, "  []\n") else { return };
    let ready = || json!({"ready": true, "serving": true, "terminating": false});
    let unready = || json!({"ready": false, "serving": false, "terminating": false});
    // Endpoints on three nodes: host 0 in zone b, hosts 1 and 2 in zone a (ours).
    let three = |conds: [Value; 3]| {
        let [c0, c1, c2] = conds;
        vec![
            endpoint(0, "node0", "b", c0, None),
            endpoint(1, "node1", "a", c1, None),
            endpoint(2, "node2", "a", c2, None),
        ]
    };
    let services = [
        ("spread", json!({})),
        ("local", json!({"internalTrafficPolicy": "Local"})),
        ("close", json!({"trafficDistribution": "PreferClose"})),
        ("unready", json!({"publishNotReadyAddresses": true})),
    ];
    for (i, (name, spec)) in services.iter().enumerate() {
        c.api.apply(Resource::Services, service_with(name, &format!("10.96.0.4{i}"), spec.clone(), json!({})));
        c.api.apply(Resource::EndpointSlices, slice_of(name, three([ready(), ready(), ready()])));
    }
    eventually(Duration::from_secs(5), "the services to be served", || {
        (0..4).all(|i| c.reached(&format!("10.96.0.4{i}:80")).is_some())
    });

    // No trafficDistribution and no hints: every endpoint alike, whatever its zone
    // (kube-proxy spreads; zone preference is opt-in in Kubernetes).
    let spread = hosts_reached(&c, "10.96.0.40:80", 30);
    assert_eq!(distinct(&spread), [Some(0), Some(1), Some(2)].into(), "{spread:?}");
    // internalTrafficPolicy Local: this node's endpoint only...
    assert_eq!(distinct(&hosts_reached(&c, "10.96.0.41:80", 12)), [Some(0)].into());
    // ...and none when this node has none: the connection fails, counted by service.
    c.api.apply(Resource::EndpointSlices, slice_of("local", three([unready(), ready(), ready()])));
    eventually(Duration::from_secs(5), "connections to fail with no local endpoint", || {
        c.reached("10.96.0.41:80").is_none()
    });
    let unserved =
        c.topo.metric("switchyard_unserved_connections_total", "reason=\"no_endpoint\",service=\"shop/local:main\"");
    assert!(unserved >= Some(1.0), "{unserved:?}");
    // PreferClose: the zone's endpoints (both of them)...
    let close = hosts_reached(&c, "10.96.0.42:80", 30);
    assert_eq!(distinct(&close), [Some(1), Some(2)].into(), "{close:?}");
    // ...and when the zone has none ready, the others.
    c.api.apply(Resource::EndpointSlices, slice_of("close", three([ready(), unready(), unready()])));
    eventually(Duration::from_secs(5), "spill out of the zone", || {
        distinct(&hosts_reached(&c, "10.96.0.42:80", 6)) == [Some(0)].into()
    });
    // Hints on every endpoint: host 0 (zone b) is hinted for zone a, hosts 1 and 2 for
    // zone b, so only host 0 is "close" to this node.
    c.api.apply(
        Resource::EndpointSlices,
        slice_of(
            "spread",
            vec![
                endpoint(0, "node0", "b", ready(), Some("a")),
                endpoint(1, "node1", "a", ready(), Some("b")),
                endpoint(2, "node2", "a", ready(), Some("b")),
            ],
        ),
    );
    eventually(Duration::from_secs(5), "the hints to be followed", || {
        distinct(&hosts_reached(&c, "10.96.0.40:80", 12)) == [Some(0)].into()
    });
    // publishNotReadyAddresses: a not-ready endpoint is used.
    c.api.apply(Resource::EndpointSlices, slice_of("unready", three([unready(), unready(), unready()])));
    eventually(Duration::from_secs(5), "not-ready endpoints used", || {
        distinct(&hosts_reached(&c, "10.96.0.43:80", 12)) == [Some(0), Some(1), Some(2)].into()
    });
    // sessionAffinity ClientIP: round robin would rotate, but the client (this cgroup)
    // keeps its endpoint, until timeoutSeconds pass without a connection from it.
    let sticky = service_with(
        "sticky",
        "10.96.0.46",
        json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 2}}}),
        json!({"switchyard.io/balance": "round-robin"}),
    );
    c.api.apply(Resource::Services, sticky);
    c.api.apply(Resource::EndpointSlices, slice_of("sticky", three([ready(), ready(), ready()])));
    eventually(Duration::from_secs(5), "the sticky service", || c.reached("10.96.0.46:80").is_some());
    let first = distinct(&hosts_reached(&c, "10.96.0.46:80", 12));
    assert_eq!(first.len(), 1, "one endpoint for one client: {first:?}");
    std::thread::sleep(Duration::from_millis(2500));
    let after = distinct(&hosts_reached(&c, "10.96.0.46:80", 12));
    assert!(
        after.len() == 1 && after != first,
        "idle past the timeout, the next round-robin endpoint: {first:?} {after:?}"
    );
    let services = c.topo.admin_get("/services/shop%2Fsticky:main");
    assert!(services.contains("\"timeout_secs\":2"), "{services}");
    // A named target port that differs by slice (pods of two versions): each slice's
    // endpoints on that slice's port.
    let _echo7001 = c.topo.echo_server(2, 7001, 0);
    c.api.apply(Resource::Services, service("versions", "10.96.0.47", 80));
    for (version, host, port) in [("v1", 1, 7000), ("v2", 2, 7001)] {
        let mut s = slice_of("versions", vec![json!({"addresses": [host_v4(host)], "conditions": {"ready": true}})]);
        s["metadata"]["name"] = json!(format!("versions-{version}"));
        s["ports"] = json!([{"name": "main", "port": port, "protocol": "TCP"}]);
        c.api.apply(Resource::EndpointSlices, s);
    }
    let want: std::collections::BTreeSet<String> = [host_v4(1) + ":7000", host_v4(2) + ":7001"].into();
    eventually(Duration::from_secs(5), "both versions, each on its own port", || {
        c.spread("10.96.0.47:80", 12).into_iter().collect::<std::collections::BTreeSet<_>>() == want
    });
    // Dual-stack: each ClusterIP leads to endpoints of its own family only.
    let v6 = "[fd10:1::2]:7000";
    let _echo6 = c.topo.host_server(1, Command::new(probe_bin()).args(["serve", "--listen", v6]), v6);
    let mut dual = service("dual", "10.96.0.45", 80);
    dual["spec"]["clusterIPs"] = json!(["10.96.0.45", "fd96::45"]);
    c.api.apply(Resource::Services, dual);
    for (family, address) in [("IPv4", host_v4(0)), ("IPv6", "fd10:1::2".to_owned())] {
        let mut s = slice_of("dual", vec![json!({"addresses": [address], "conditions": {"ready": true}})]);
        s["metadata"]["name"] = json!(format!("dual-{family}"));
        s["addressType"] = json!(family);
        c.api.apply(Resource::EndpointSlices, s);
    }
    eventually(Duration::from_secs(5), "both families served", || {
        c.reached("[fd96::45]:80").is_some() && c.reached("10.96.0.45:80").is_some()
    });
    assert_eq!(distinct(&hosts_reached(&c, "10.96.0.45:80", 12)), [Some(0)].into(), "IPv4: the IPv4 endpoint");
    let reached6: std::collections::BTreeSet<String> = c.spread("[fd96::45]:80", 12).into_iter().collect();
    assert_eq!(reached6, [v6.to_owned()].into(), "IPv6: the IPv6 endpoint");
    // Terminating: serving terminating endpoints get no new connections while another is
    // ready, and take them when none is (kube-proxy's fallback), rather than failing.
    let draining = || json!({"ready": false, "serving": true, "terminating": true});
    c.api.apply(Resource::EndpointSlices, slice_of("spread", three([draining(), ready(), draining()])));
    eventually(Duration::from_secs(5), "only the ready one", || {
        distinct(&hosts_reached(&c, "10.96.0.40:80", 12)) == [Some(1)].into()
    });
    c.api.apply(Resource::EndpointSlices, slice_of("spread", three([draining(), unready(), draining()])));
    eventually(Duration::from_secs(5), "the terminating ones, with none ready", || {
        distinct(&hosts_reached(&c, "10.96.0.40:80", 12)) == [Some(0), Some(2)].into()
    });
    c.agent.stop();
}

/// `appProtocol` and `switchyard.io/*` annotations: a gRPC port is balanced per call with
/// no detection (its port is one detection skips), policy changes live, and a bad
/// annotation is reported on its Service while the Service serves with the default.
#[test]
fn app_protocol_and_annotations_set_policy_live_and_a_bad_one_is_reported() {
    if !require_root("app_protocol_and_annotations_set_policy_live") {
        return;
    }
    let topo = Topology::with_hosts(3);
    let _servers: Vec<Proc> = (0..3)
        .map(|i| {
            let target = format!("{}:50051", host_v4(i));
            let mut cmd = backends_py();
            cmd.args(["grpc-server", "--listen", &target, "--id", &format!("h{i}")]);
            topo.host_server(i, &mut cmd, &target)
        })
        .collect();
    let api = KubeApi::serve(listen_in_netns(&Path::new("/run/netns").join(&topo.node.name)));
    api.apply(Resource::Nodes, json!({"metadata": {"name": "node0"}}));
    let grpc = |annotations: Value| {
        json!({"metadata": {"namespace": "shop", "name": "greeter", "annotations": annotations},
               "spec": {"clusterIP": "10.96.0.50", "clusterIPs": ["10.96.0.50"],
                        "ports": [{"name": "grpc", "port": 50051, "targetPort": 50051, "appProtocol": "grpc"}]}})
    };
    api.apply(Resource::Services, grpc(json!({"switchyard.io/balance": "round-robin"})));
    let eps: Vec<Value> = (0..3).map(|h| json!({"addresses": [host_v4(h)], "conditions": {"ready": true}})).collect();
    let mut slice = slice("greeter", &[]);
    slice["ports"] = json!([{"name": "grpc", "port": 50051}]);
    slice["endpoints"] = Value::Array(eps);
    api.apply(Resource::EndpointSlices, slice);
    let kubeconfig = topo.dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    // 50051 is an opaque port here: detection would take these connections as opaque
    // TCP and balance them per connection. Only appProtocol makes them HTTP/2.
    let agent = Agent::start(
        &topo,
        &format!(
            "agent:\n  cgroup: {}\n  detect: {{ opaque_ports: [50051] }}\n  kubernetes: {{ kubeconfig: {}, node_name: node0 }}\nservices: []\n",
            topo.cgroup.path.display(),
            kubeconfig.display()
        ),
    );
    let calls = |n: usize| {
        let mut cmd = backends_py();
        cmd.args(["grpc-client", "--target", "10.96.0.50:50051", "--calls", &n.to_string()]);
        let out = topo.client(&mut cmd);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
        let field = |k: &str| text.lines().find_map(|l| l.strip_prefix(&format!("{k}="))?.parse::<usize>().ok());
        assert_eq!(field("failures"), Some(0), "{text}");
        (0..3).map(|i| field(&format!("server.h{i}")).unwrap_or(0)).collect::<Vec<_>>()
    };
    // One channel, 30 calls: round robin per call, exactly (the annotation's balancer).
    assert_eq!(calls(30), [10, 10, 10], "per-call round robin over one HTTP/2 connection");

    // A live change: ring hash keeps this client on one endpoint.
    api.apply(Resource::Services, grpc(json!({"switchyard.io/balance": "ring-hash"})));
    eventually(Duration::from_secs(5), "the new balancer", || calls(12).iter().filter(|&&n| n > 0).count() == 1);

    // A bad annotation: named with its Service in the log and /status; the Service serves
    // on with the default policy, its other annotations applied.
    api.apply(
        Resource::Services,
        grpc(json!({"switchyard.io/balance": "fastest", "switchyard.io/http": "{request_timeout: 5s}"})),
    );
    eventually(Duration::from_secs(5), "the bad annotation reported", || {
        agent.log().lines().any(|l| {
            l.contains("Kubernetes object not used as given")
                && l.contains("object=Service shop/greeter")
                && l.contains("annotation switchyard.io/balance: unknown variant `fastest`")
        })
    });
    let status: Value = serde_json::from_str(&topo.admin_get("/status")).unwrap();
    let problems = &status["kubernetes_objects"]["Service shop/greeter"];
    assert!(problems[0].as_str().is_some_and(|p| p.contains("switchyard.io/balance")), "{status}");
    assert_eq!(calls(30).iter().sum::<usize>(), 30, "the Service still serves");
    let config: Value = serde_json::from_str(&topo.admin_get("/config")).unwrap();
    let greeter = config["services"].as_array().unwrap().iter().find(|s| s["name"] == "shop/greeter:grpc").unwrap();
    assert_eq!(
        (&greeter["balance"], &greeter["http"]["request_timeout"]),
        (&json!("p2c-ewma"), &json!("5s")),
        "{greeter}"
    );
    assert_eq!(greeter["protocol"], "http2", "from appProtocol: grpc");
    // Fixed: the problem leaves /status.
    api.apply(Resource::Services, grpc(json!({"switchyard.io/balance": "round-robin"})));
    eventually(Duration::from_secs(5), "the problem cleared", || {
        let status: Value = serde_json::from_str(&topo.admin_get("/status")).unwrap();
        status["kubernetes_objects"].as_object().is_some_and(|o| o.is_empty())
    });
    agent.stop();
}
