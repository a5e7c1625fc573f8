//! End to end at cluster scale: 3,000 Services through the API stand-in (tests/src/
//! kube_api.rs), a few of them on the real echo servers and the rest on addresses that
//! never answer. While slices of many services change, the real services' pods are
//! replaced as a rolling update does it (new pod ready, old one terminating, old one
//! gone) and a client keeps connecting to one of them: no connection may fail, each must
//! reach an endpoint that was serving then, and in the end the agent must show exactly
//! the endpoints of the final slices. The speed targets of issue 15 are the benchmark's
//! (`cargo xtask bench --scale`); this test only allows each step generous time.

use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use switchyard_tests::{
    Agent, Topology, admin_request, epoch_ms, host_v4, in_netns,
    kube_api::{KubeApi, Resource, listen_in_netns},
    require_root,
};

const SERVICES: usize = 3_000;
/// The services whose endpoints are the echo servers; the load dials the first.
const REAL: [usize; 4] = [0, 750, 1_500, 2_250];
const FAKE_ENDPOINTS: usize = 4;
const PORT: u16 = 7000;
/// Generous, for a debug build of the agent on two cores: speed is the benchmark's.
const STEP: Duration = Duration::from_secs(60);

/// A slice endpoint: address and whether it is terminating (serving, no new connections).
type Ep = (String, bool);

/// Endpoints as `/resolve` shows them: (address, health), sorted.
type Shown = Vec<(String, String)>;

fn cluster_ip(i: usize) -> String {
    format!("10.96.{}.{}", 10 + i / 250, 1 + i % 250)
}

fn service(i: usize) -> Value {
    let ip = cluster_ip(i);
    json!({"metadata": {"namespace": "scale", "name": format!("svc-{i}")},
           "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                    "ports": [{"name": "main", "port": 80, "protocol": "TCP", "targetPort": PORT}]}})
}

fn slice(i: usize, endpoints: &[Ep]) -> Value {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|(ip, terminating)| {
            json!({"addresses": [ip], "nodeName": "node1", "zone": "a",
                   "conditions": {"ready": !terminating, "serving": true, "terminating": terminating}})
        })
        .collect();
    json!({"metadata": {"namespace": "scale", "name": format!("svc-{i}-abcde"),
                        "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
           "addressType": "IPv4",
           "ports": [{"name": "main", "port": PORT, "protocol": "TCP"}],
           "endpoints": eps})
}

/// Fake endpoint `k` (10.201.0.0/16 at first, 10.202.0.0/16 for replacements): nothing
/// routes there, and nothing connects to them.
fn fake(net: u8, k: usize) -> Ep {
    (format!("10.{net}.{}.{}", k >> 8, k & 255), false)
}

fn real(host: usize, terminating: bool) -> Ep {
    (host_v4(host), terminating)
}

/// `(address, health)` of each endpoint `/resolve` shows for service `i`, sorted; None
/// while the agent does not know the service. From a thread in the node's namespace.
fn resolved(i: usize) -> Option<Shown> {
    let (status, body) = admin_request(&format!("/resolve?target=scale/svc-{i}:main")).ok()?;
    let tree: Value = serde_json::from_str(&body).ok().filter(|_| status == 200)?;
    let mut eps: Shown = tree["endpoints"]
        .as_array()?
        .iter()
        .map(|e| (e["address"].as_str().unwrap_or("").to_owned(), e["health"].as_str().unwrap_or("").to_owned()))
        .collect();
    eps.sort();
    Some(eps)
}

/// What `/resolve` should show for `endpoints` (no health checks, so every endpoint is
/// healthy unless terminating).
fn expected(endpoints: &[Ep]) -> Shown {
    let mut eps: Shown = endpoints
        .iter()
        .map(|(ip, t)| (format!("{ip}:{PORT}"), if *t { "terminating" } else { "healthy" }.to_owned()))
        .collect();
    eps.sort();
    eps
}

/// Wait (in the node's namespace) until every service of `want` shows its endpoints;
/// returns when it was seen, in ms since the epoch (the load's clock).
fn until_shown(topo: &Topology, what: &str, want: &[(usize, Shown)]) -> u128 {
    in_netns(&topo.node, || {
        let deadline = Instant::now() + STEP;
        loop {
            let pending: Vec<(usize, Option<Shown>)> = want
                .iter()
                .filter(|(i, eps)| resolved(*i).as_ref() != Some(eps))
                .map(|(i, _)| (*i, resolved(*i)))
                .collect();
            if pending.is_empty() {
                return epoch_ms();
            }
            assert!(Instant::now() < deadline, "{what}: after {STEP:?}, still not shown: {pending:?}");
            thread::sleep(Duration::from_millis(25));
        }
    })
}

#[test]
fn thousands_of_services_roll_out_without_a_failed_connection() {
    if !require_root("thousands_of_services_roll_out_without_a_failed_connection") {
        return;
    }
    let test_started = Instant::now();
    let topo = Topology::with_hosts(3);
    let _servers: Vec<_> = (0..3).map(|h| topo.echo_server(h, PORT, 0)).collect();
    let api = KubeApi::serve(listen_in_netns(&Path::new("/run/netns").join(&topo.node.name)));
    api.apply(Resource::Nodes, json!({"metadata": {"name": "node0", "labels": {"topology.kubernetes.io/zone": "a"}}}));
    // Every service's endpoints as last applied.
    let mut slices: Vec<Vec<Ep>> = (0..SERVICES)
        .map(|i| {
            if REAL.contains(&i) {
                vec![real(0, false), real(1, false)]
            } else {
                (0..FAKE_ENDPOINTS).map(|j| fake(201, i * FAKE_ENDPOINTS + j)).collect()
            }
        })
        .collect();
    api.apply_many(Resource::Services, (0..SERVICES).map(service));
    api.apply_many(Resource::EndpointSlices, slices.iter().enumerate().map(|(i, eps)| slice(i, eps)));
    let kubeconfig = topo.dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let config = format!(
        "agent:\n  cgroup: {}\n  kubernetes: {{ kubeconfig: {}, node_name: node0 }}\nservices: []\n",
        topo.cgroup.path.display(),
        kubeconfig.display()
    );
    let bin = switchyard_tests::switchyard_bin();
    let agent = Agent::try_start_with(&bin, &topo, &config, &[("SWITCHYARD_LOG", "info")], STEP)
        .unwrap_or_else(|log| panic!("the agent was not ready with {SERVICES} services within {STEP:?}:\n{log}"));
    eprintln!("{SERVICES} services: ready after {:?}", test_started.elapsed());
    let ready = agent.log().lines().find(|l| l.contains("switchyard ready")).map(str::to_owned).unwrap_or_default();
    assert!(ready.contains(&format!("services={SERVICES}")), "ready with every service: {ready}");
    let initial: Vec<(usize, Shown)> =
        [1, 1_234, SERVICES - 1].into_iter().chain(REAL).map(|i| (i, expected(&slices[i]))).collect();
    until_shown(&topo, "the initial slices", &initial);

    // A client connecting to the first real service, one connection after another on two
    // workers, each held a moment so that some span every step of the rollout.
    let target = format!("{}:80", cluster_ip(REAL[0]));
    let load = topo.load(
        &target,
        &["--conns", "100000", "--concurrency", "2", "--hold-ms", "100", "--duration-ms", "300000"],
        None,
    );
    let stop = AtomicBool::new(false);
    let mut real_slices: Vec<Vec<Ep>> = REAL.iter().map(|&i| slices[i].clone()).collect();
    let (times, (churned, changes)) = thread::scope(|s| {
        // Meanwhile other services' pods are replaced, one endpoint per change, about
        // 200 changes a second (bounded), walking the services by a stride.
        let churn = s.spawn(|| {
            let mut changed: HashMap<usize, Vec<Ep>> = HashMap::new();
            let mut next = 0;
            for k in 0..4_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let i = (k * 7 + 1) % SERVICES;
                if REAL.contains(&i) {
                    continue;
                }
                let eps = changed.entry(i).or_insert_with(|| slices[i].clone());
                eps.remove(0);
                next += 1;
                eps.push(fake(202, next));
                api.apply(Resource::EndpointSlices, slice(i, eps));
                thread::sleep(Duration::from_millis(5));
            }
            (changed, next)
        });
        thread::sleep(Duration::from_secs(1));
        // The rolling update of the real services: a new pod on host 2 becomes ready, the
        // one on host 0 terminates (it still serves its connections), then it is gone.
        // Each step waits for the agent to show the one before, as a rollout waits for
        // readiness.
        let steps: [&[Ep]; 3] = [
            &[real(0, false), real(1, false), real(2, false)],
            &[real(0, true), real(1, false), real(2, false)],
            &[real(1, false), real(2, false)],
        ];
        let mut times = Vec::new();
        for (n, step) in steps.iter().enumerate() {
            let applied = epoch_ms();
            for (k, &i) in REAL.iter().enumerate() {
                real_slices[k] = step.to_vec();
                api.apply(Resource::EndpointSlices, slice(i, step));
            }
            let want: Vec<_> = REAL.iter().map(|&i| (i, expected(step))).collect();
            let shown = until_shown(&topo, &format!("rollout step {}", n + 1), &want);
            eprintln!("rollout step {}: shown after {} ms", n + 1, shown - applied);
            times.push((applied, shown));
            thread::sleep(Duration::from_secs(1));
        }
        stop.store(true, Ordering::Relaxed);
        (times, churn.join().expect("churn thread"))
    });
    let conns = load.stop();
    for (i, eps) in &churned {
        slices[*i] = eps.clone();
    }
    for (k, &i) in REAL.iter().enumerate() {
        slices[i] = real_slices[k].clone();
    }
    eprintln!("{changes} slice changes to {} services besides the rollout; {} connections", churned.len(), conns.len());

    // Every connection succeeded, and reached an endpoint serving then: host 2's only
    // once it was in the slice, host 0's only until the agent showed it terminating.
    let (h0, h1, h2) =
        (format!("{}:{PORT}", host_v4(0)), format!("{}:{PORT}", host_v4(1)), format!("{}:{PORT}", host_v4(2)));
    let failed: Vec<_> = conns.iter().filter(|c| c.outcome.is_err()).collect();
    assert!(failed.is_empty(), "{} of {} connections failed during the rollout: {failed:?}", failed.len(), conns.len());
    assert!(conns.len() >= 20, "the client kept connecting throughout: {} connections", conns.len());
    let (h2_added, h0_terminating) = (times[0].0, times[1].1);
    for c in &conns {
        let endpoint = c.outcome.as_ref().unwrap();
        let ok = match endpoint {
            e if *e == h1 => true,
            e if *e == h0 => c.start_ms <= h0_terminating,
            e if *e == h2 => c.end_ms >= h2_added,
            _ => false,
        };
        assert!(
            ok,
            "connection {c:?} reached an endpoint not serving then (host 2 added at {h2_added}, host 0 terminating from {h0_terminating})"
        );
    }
    assert!(conns.iter().any(|c| c.outcome.as_deref() == Ok(h2.as_str())), "the new pod got connections");

    // The end state: exactly the last slices, for the real services and a sample of the
    // others (changed ones and unchanged ones).
    let mut sample: BTreeSet<usize> = churned.keys().copied().step_by(churned.len().div_ceil(25).max(1)).collect();
    sample.extend([2, 3, 2_999].into_iter().filter(|i| !REAL.contains(i)));
    sample.extend(REAL);
    assert!(
        sample.iter().filter(|i| churned.contains_key(i)).count() >= 10,
        "a sample of changed services: {sample:?}"
    );
    let want: Vec<_> = sample.iter().map(|&i| (i, expected(&slices[i]))).collect();
    until_shown(&topo, "the final slices", &want);

    // New connections to every real service now go to hosts 1 and 2 only (host 0 still
    // listens: reaching it would be the agent's mistake).
    for i in REAL {
        let conns = topo.load(&format!("{}:80", cluster_ip(i)), &["--conns", "10", "--concurrency", "2"], None).wait();
        let reached: BTreeSet<&str> = conns.iter().map(|c| c.outcome.as_deref().unwrap_or("failed")).collect();
        assert!(
            conns.len() == 10 && reached.iter().all(|e| *e == h1 || *e == h2),
            "service {i} after the rollout: {reached:?}"
        );
    }
    eprintln!("whole test: {:?}", test_started.elapsed());
    agent.stop();
}
