//! End to end: golden signals per workload. Real clients run in cgroups laid out as
//! kubelet lays out pods (its systemd and cgroupfs drivers) and as systemd lays out a
//! unit; the pods come from the Pod watch through the API stand-in (tests/src/kube_api.rs,
//! the real list/watch protocol; no API server can run here). They talk to a real HTTP
//! server (known answers and a known delay), a real gRPC server (a known share of
//! UNAVAILABLE) and an echo server. `/stat` (and `switchyard stat`) must count exactly
//! what they did, by workload; `/edges` must list exactly the pairs that talked; `tap`
//! must show requests as they happen and stop by itself; 1,000 short-lived client
//! processes must not add 1,000 series.

use std::{path::Path, process::Command, time::Duration};

use serde_json::{Value, json};
use switchyard_tests::{
    Agent, NestedCgroup, Proc, Topology, backends_py, eventually, host_v4,
    kube_api::{KubeApi, Resource, listen_in_netns},
    require_root, require_tools,
};

/// A pod on node0 owned by `owner` (kind, name), its container `app` with `container_id`.
fn pod(name: &str, uid: &str, owner: (&str, &str), labels: Value, container_id: &str) -> Value {
    json!({
        "metadata": {"namespace": "shop", "name": name, "uid": uid, "labels": labels,
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": owner.0, "name": owner.1,
                                          "uid": "0000", "controller": true}]},
        "spec": {"nodeName": "node0", "containers": [{"name": "app", "image": "x"}]},
        "status": {"phase": "Running",
                   "containerStatuses": [{"name": "app", "containerID": format!("containerd://{container_id}"),
                                          "ready": true, "restartCount": 0, "image": "x", "imageID": "x"}]}
    })
}

const FRONTEND_UID: &str = "6f1c2a9e-3b4d-4c5e-8f70-1a2b3c4d5e6f";
const WORKER_UID: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
const FRONTEND_CONTAINER: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const WORKER_CONTAINER: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

struct Clients {
    /// shop/frontend-6d8f9c7b5-x2x4q of Deployment frontend, kubelet's systemd driver.
    frontend: NestedCgroup,
    /// shop/worker-0 of StatefulSet worker, kubelet's cgroupfs driver.
    worker: NestedCgroup,
    /// A systemd unit on the node, no pod.
    batch: NestedCgroup,
}

fn clients(topo: &Topology) -> Clients {
    let systemd_uid = FRONTEND_UID.replace('-', "_");
    Clients {
        frontend: topo.nested_cgroup(&format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{systemd_uid}.slice/cri-containerd-{FRONTEND_CONTAINER}.scope"
        )),
        worker: topo.nested_cgroup(&format!("kubepods/besteffort/pod{WORKER_UID}/{WORKER_CONTAINER}")),
        batch: topo.nested_cgroup("system.slice/batch.service"),
    }
}

/// `times` GETs of `url` on one connection from `who`; returns the bytes curl sent and
/// received, as it counts them (request; response headers and body).
fn curl(topo: &Topology, who: &NestedCgroup, url: &str, times: usize) -> (u64, u64) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "30", "-w", "%{size_request} %{size_header} %{size_download}\n"]);
    for _ in 0..times {
        cmd.args(["-o", "/dev/null", url]);
    }
    let out = topo.client_in(who.leaf(), &mut cmd);
    assert!(out.status.success(), "curl {url}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().fold((0, 0), |(sent, received), line| {
        let n: Vec<u64> = line.split(' ').map(|v| v.parse().unwrap()).collect();
        (sent + n[0], received + n[1] + n[2])
    })
}

fn row<'a>(rows: &'a Value, workload: &str, service: &str) -> &'a Value {
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["workload"] == workload && r["service"] == service)
        .unwrap_or_else(|| panic!("no route {workload} -> {service} in {rows:#}"))
}

#[test]
fn golden_signals_tap_and_edges_name_workloads_and_count_exactly_what_clients_did() {
    let test = "golden_signals_tap_and_edges_name_workloads";
    if !require_root(test) {
        return;
    }
    require_tools(&["curl", "python3"]);
    let topo = Topology::with_hosts(2);
    let mut servers: Vec<Proc> = (0..2).map(|i| topo.echo_server(i, 7000, 0)).collect();
    for i in 0..2 {
        let target = format!("{}:8080", host_v4(i));
        servers.push(topo.host_server(i, backends_py().args(["golden", "--listen", &target]), &target));
    }
    let grpc = format!("{}:50051", host_v4(0));
    let mut cmd = backends_py();
    cmd.args(["grpc-server", "--listen", &grpc, "--id", "h0", "--unavailable-every", "4"]);
    servers.push(topo.host_server(0, &mut cmd, &grpc));

    let api = KubeApi::serve(listen_in_netns(&Path::new("/run/netns").join(&topo.node.name)));
    let hash = "6d8f9c7b5";
    api.apply(
        Resource::Pods,
        pod(
            &format!("frontend-{hash}-x2x4q"),
            FRONTEND_UID,
            ("ReplicaSet", &format!("frontend-{hash}")),
            json!({"app": "frontend", "pod-template-hash": hash}),
            FRONTEND_CONTAINER,
        ),
    );
    api.apply(
        Resource::Pods,
        pod("worker-0", WORKER_UID, ("StatefulSet", "worker"), json!({"app": "worker"}), WORKER_CONTAINER),
    );
    let kubeconfig = topo.dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let (h0, h1) = (host_v4(0), host_v4(1));
    // UNAVAILABLE is not retried for `rpc`, so every fourth call fails as the client sees.
    let config = format!(
        r#"agent:
  cgroup: {cgroup}
  kubernetes: {{ kubeconfig: {kubeconfig}, node_name: node0 }}
services:
  - {{ name: web, addresses: ["10.96.0.20:80"], endpoints: ["{h0}:8080", "{h1}:8080"], balance: round-robin }}
  - {{ name: rpc, addresses: ["10.96.0.21:50051"], endpoints: ["{h0}:50051"], http: {{ retry: {{ on_grpc: [] }} }} }}
  - {{ name: echo, addresses: ["10.96.0.10:7000"], endpoints: ["{h0}:7000", "{h1}:7000"] }}
"#,
        cgroup = topo.cgroup.path.display(),
        kubeconfig = kubeconfig.display(),
    );
    // Ready does not wait for the Pod list, and a connection is named when it is
    // accepted: the pods must be known before the first client connects.
    let agent = Agent::start(&topo, &config);
    eventually(Duration::from_secs(10), "the node's two pods listed", || {
        agent.log().contains("this node's pods listed pods=2")
    });
    let c = clients(&topo);

    // What each workload does, exactly.
    let ok = curl(&topo, &c.frontend, "http://10.96.0.20/ok", 12);
    let fail = curl(&topo, &c.frontend, "http://10.96.0.20/fail", 4);
    curl(&topo, &c.worker, "http://10.96.0.20/slow", 4);
    let out = topo.client_in(
        c.worker.leaf(),
        backends_py().args(["grpc-client", "--target", "10.96.0.21:50051", "--calls", "20"]),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("failures=5"), "every fourth call UNAVAILABLE, not retried:\n{text}");
    let load = topo.load("10.96.0.10:7000", &["--conns", "10"], Some(c.batch.leaf())).wait();
    assert!(load.iter().all(|c| c.outcome.is_ok()), "{load:?}");

    let frontend = "shop/deployment/frontend";
    let worker = "shop/statefulset/worker";
    let batch = "systemd/batch.service";
    // Requests are counted when their responses end; the last may still be finishing.
    let routes = switchyard_tests::eventually_some(Duration::from_secs(10), "every request counted", || {
        let routes: Value = serde_json::from_str(&topo.admin_get("/stat?by=route")).unwrap();
        let n: u64 = routes.as_array()?.iter().filter_map(|r| r["requests"].as_u64()).sum();
        (n == 12 + 4 + 4 + 20).then_some(routes)
    });
    let f = row(&routes, frontend, "web");
    assert_eq!((f["requests"].as_u64(), f["failures"].as_u64()), (Some(16), Some(4)), "{f:#}");
    assert_eq!(f["success_rate"].as_f64(), Some(0.75), "{f:#}");
    assert_eq!(f["connections"].as_u64(), Some(2), "one curl connection per run: {f:#}");
    // HTTP bytes are what crossed the client's socket, as curl counts them: request
    // lines and headers too, not only bodies.
    let wire = (f["bytes_out"].as_u64().unwrap(), f["bytes_in"].as_u64().unwrap());
    assert_eq!(wire, (ok.0 + fail.0, ok.1 + fail.1), "{f:#}");
    // 200 ms from the backend: the (100, 250] ms bucket, whatever else the machine does.
    let w = row(&routes, worker, "web");
    assert_eq!(w["requests"].as_u64(), Some(4));
    for p in ["latency_p50_ms", "latency_p99_ms"] {
        let ms = w[p].as_f64().unwrap();
        assert!((100.0..=250.0).contains(&ms), "{p} of a 200 ms backend is in its bucket: {ms}");
    }
    let fast = f["latency_p50_ms"].as_f64().unwrap();
    assert!(fast < 100.0, "instant answers stay below the slow bucket: {fast}");
    let g = row(&routes, worker, "rpc");
    assert_eq!(
        (g["requests"].as_u64(), g["failures"].as_u64()),
        (Some(20), Some(5)),
        "grpc-status 14 in trailers is a failure: {g:#}"
    );
    let b = row(&routes, batch, "echo");
    assert_eq!((b["connections"].as_u64(), b["requests"].as_u64()), (Some(10), Some(0)), "{b:#}");
    // Each load connection sends 64 bytes and gets the greeting (21) and the echo back.
    assert_eq!((b["bytes_out"].as_u64(), b["bytes_in"].as_u64()), (Some(640), Some(10 * (64 + 21))), "{b:#}");
    assert_eq!(routes.as_array().unwrap().len(), 4, "only the routes that were used: {routes:#}");

    // By service and by workload: sums of the routes.
    let services: Value = serde_json::from_str(&topo.admin_get("/stat")).unwrap();
    let web = services.as_array().unwrap().iter().find(|r| r["service"] == "web").unwrap();
    assert_eq!((web["requests"].as_u64(), web["failures"].as_u64()), (Some(20), Some(4)), "{web:#}");
    let by_endpoint: Value = serde_json::from_str(&topo.admin_get("/stat?by=endpoint&service=web")).unwrap();
    let per_endpoint: Vec<u64> =
        by_endpoint.as_array().unwrap().iter().filter_map(|r| r["requests"].as_u64()).collect();
    assert_eq!(per_endpoint, [10, 10], "round robin over both endpoints: {by_endpoint:#}");
    let upstream_bytes: u64 = by_endpoint.as_array().unwrap().iter().filter_map(|r| r["bytes_in"].as_u64()).sum();
    assert!(upstream_bytes > 20 * 17, "HTTP endpoint bytes are the upstream wire's, headers too: {by_endpoint:#}");
    let echo: Value = serde_json::from_str(&topo.admin_get("/stat?by=endpoint&service=echo")).unwrap();
    let sum = |k: &str| echo.as_array().unwrap().iter().filter_map(|r| r[k].as_u64()).sum::<u64>();
    assert_eq!((sum("connections"), sum("open"), sum("bytes_out")), (10, 0, 640), "opaque TCP per endpoint: {echo:#}");
    let bin = switchyard_tests::switchyard_bin();
    let cli = topo.node_output(Command::new(&bin).args(["stat", "workloads"]));
    assert!(cli.starts_with("WORKLOAD") && cli.contains(frontend) && cli.contains("75.00%"), "{cli}");
    let cli = topo.node_output(Command::new(&bin).args(["stat", "routes", "--service", "rpc"]));
    assert!(cli.contains(worker) && cli.contains("75.00%") && !cli.contains(frontend), "{cli}");

    // Metrics: the same figures, labelled by workload.
    let success = "switchyard_route_requests_total{client_namespace=\"shop\",client_workload=\"deployment/frontend\",service=\"web\",classification=\"success\"} 12";
    let metrics = topo.admin_get("/metrics");
    assert!(metrics.contains(success), "{success} in\n{metrics}");

    // Edges: exactly the pairs that talked.
    let edges: Value = serde_json::from_str(&topo.admin_get("/edges")).unwrap();
    let mut pairs: Vec<(String, String)> = edges["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["workload"].as_str().unwrap().to_owned(), r["service"].as_str().unwrap().to_owned()))
        .collect();
    pairs.sort();
    let want = [(frontend, "web"), (worker, "rpc"), (worker, "web"), (batch, "echo")];
    assert_eq!(pairs, want.map(|(a, b)| (a.to_owned(), b.to_owned())), "{edges:#}");
    let to_endpoints: Vec<&str> =
        edges["endpoints"].as_array().unwrap().iter().filter_map(|r| r["endpoint"].as_str()).collect();
    assert!(
        to_endpoints.contains(&format!("{h0}:8080").as_str()) && to_endpoints.contains(&format!("{h1}:8080").as_str()),
        "{edges:#}"
    );
    let cli = topo.node_output(Command::new(&bin).arg("edges"));
    assert!(cli.contains(&format!("{frontend}  ->  web")), "{cli}");

    // Connections show the pod by name, with its container.
    let mut slow = topo.spawn_client_in(
        c.frontend.leaf(),
        Command::new(switchyard_tests::probe_bin()).args([
            "client",
            "--connect",
            "10.96.0.10:7000",
            "--bytes",
            "2621440",
            "--chunk-delay-ms",
            "100",
        ]),
    );
    let conn = switchyard_tests::eventually_some(Duration::from_secs(5), "the frontend's connection in /conns", || {
        let conns: Value = serde_json::from_str(&topo.admin_get("/conns?service=echo")).unwrap();
        conns.as_array()?.iter().find(|c| c["client"]["pid"] == slow.0.id()).cloned()
    });
    assert_eq!(conn["client"]["pod_name"], format!("shop/frontend-{hash}-x2x4q"));
    assert_eq!(conn["client"]["container"], "app");
    assert_eq!(conn["client"]["workload"], frontend);
    slow.kill();

    // Tap: requests as they happen, filtered, and it ends by itself at its limit.
    let mut tap_cmd = Command::new(&bin);
    tap_cmd.args(["tap", "--service", "web", "--path", "/ok", "--limit", "3", "--seconds", "30", "--json"]);
    let tap = topo.in_node(&mut tap_cmd, false).stdout(std::process::Stdio::piped()).spawn().expect("spawn tap");
    let tap_pid = tap.id();
    // Until the tap is listening, requests are not shown: make them until it has three.
    let lines = std::thread::scope(|s| {
        let reader = s.spawn(move || tap.wait_with_output().expect("tap output"));
        for _ in 0..50 {
            curl(&topo, &c.worker, "http://10.96.0.20/fail", 1);
            curl(&topo, &c.frontend, "http://10.96.0.20/ok", 1);
            if reader.is_finished() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        reader.join().expect("tap reader")
    });
    assert!(lines.status.success(), "tap {tap_pid} exits 0 at its limit");
    let events: Vec<Value> =
        String::from_utf8_lossy(&lines.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events[0]["kind"], "started");
    assert_eq!(events.len(), 4, "the start line and exactly the limit: {events:#?}");
    for e in &events[1..] {
        assert_eq!((e["kind"].as_str(), e["service"].as_str()), (Some("request"), Some("web")), "{e}");
        assert_eq!((e["request"]["path"].as_str(), e["request"]["status"].as_u64()), (Some("/ok"), Some(200)), "{e}");
        assert_eq!(e["client"]["workload"], frontend, "{e}");
        assert_eq!(e["client"]["pod"], format!("shop/frontend-{hash}-x2x4q"), "{e}");
        assert!(e["endpoint"].as_str().is_some_and(|ep| ep.ends_with(":8080")), "{e}");
    }
    // A tap with a time limit ends on time too, with nothing to show.
    let t0 = std::time::Instant::now();
    let quiet = topo.node_output(Command::new(&bin).args(["tap", "--service", "nothing", "--seconds", "1", "--json"]));
    assert_eq!(quiet.trim(), r#"{"kind":"started"}"#);
    assert!(t0.elapsed() < Duration::from_secs(10), "a 1 s tap took {:?}", t0.elapsed());

    // 1,000 short-lived processes in one unit: one workload, not a thousand series.
    let before = topo.admin_get("/metrics").lines().filter(|l| l.starts_with("switchyard_route_")).count();
    let script = "for i in $(seq 1000); do (exec 3<>/dev/tcp/10.96.0.10/7000 && head -c 10 <&3 >/dev/null); done";
    let out = topo.client_in(c.batch.leaf(), Command::new("bash").args(["-c", script]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eventually(Duration::from_secs(10), "the thousand connections counted", || {
        let batch_echo = "/stat?by=route&service=echo&workload=systemd/batch.service";
        let routes: Value = serde_json::from_str(&topo.admin_get(batch_echo)).unwrap();
        routes[0]["connections"].as_u64() == Some(10 + 1000)
    });
    let after = topo.admin_get("/metrics").lines().filter(|l| l.starts_with("switchyard_route_")).count();
    assert_eq!(before, after, "the same series, their values grown");
    agent.stop();
}
