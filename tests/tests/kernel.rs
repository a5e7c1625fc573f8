//! End to end: `mode: kernel` services. The connect program sends each connection
//! straight to an endpoint drawn from the agent's weighted table, so the agent proxies
//! nothing, yet getpeername still shows the service, the connection shows in `/conns` and
//! the metrics from the kernel's events, and an endpoint that refuses is ejected and
//! leaves the table.

use std::{process::Command, time::Duration};

use serde_json::Value;
use switchyard_tests::{Agent, Topology, echo_hosts, eventually, host_v4, probe_bin, shares};

const SERVICE: &str = "10.96.0.40:7000";

fn config(topo: &Topology, extra: &str) -> String {
    format!(
        "agent:\n  cgroup: {}\nservices:\n  - name: fast\n    addresses: [\"{SERVICE}\"]\n    mode: kernel\n    \
         endpoints: [{{ address: \"{}:7000\", weight: 3 }}, \"{}:7000\"]\n{extra}",
        topo.cgroup.path.display(),
        host_v4(0),
        host_v4(1),
    )
}

#[test]
fn kernel_mode_goes_straight_to_endpoints_by_weight_and_the_agent_still_sees_it() {
    let Some((topo, _servers)) = echo_hosts("kernel_mode_goes_straight_to_endpoints_by_weight", 2) else { return };
    let agent = Agent::start(&topo, &config(&topo, ""));

    // Bytes intact, and the application sees the service as its peer.
    let p = topo.probe(SERVICE, 200_000).ok();
    assert_eq!(p.get("peer"), Some(SERVICE), "{}", p.stdout);
    assert_eq!(p.get("echo_bytes"), Some("200000"), "{}", p.stdout);

    // Weights 3:1 in the table: over 600 connections the heavier endpoint's share is
    // 0.75 (standard deviation 0.018); 0.65..0.85 fails a table that ignored weights.
    let conns = topo.load(SERVICE, &["--conns", "600", "--concurrency", "2"], None).wait();
    assert!(conns.iter().all(|c| c.outcome.is_ok()), "{conns:?}");
    let s = shares(&conns);
    let heavy = s.get(&format!("{}:7000", host_v4(0))).copied().unwrap_or(0.0);
    assert!((0.65..0.85).contains(&heavy), "3:1 weights, shares {s:?}");

    // Nothing went through the agent: the kernel counted each connect as its own, and
    // the agent's listener saw none.
    let kernel = topo.metric("switchyard_kernel_decisions", "decision=\"kernel\"").unwrap_or(0.0);
    assert!(kernel >= 601.0, "kernel decisions: {kernel}");
    let redirected = topo.metric("switchyard_kernel_decisions", "decision=\"redirected\"").unwrap_or(0.0);
    assert_eq!(redirected, 0.0, "a kernel-mode connect went to the agent");

    // Yet the agent counted every connection and the probe's bytes, from the events.
    eventually(Duration::from_secs(5), "601 kernel connections in the metrics", || {
        let total: f64 = (0..2)
            .filter_map(|i| topo.metric("switchyard_connections_total", &format!("endpoint=\"{}:7000\"", host_v4(i))))
            .sum();
        total == 601.0
    });
    // Exactly: the probe's 200,000 bytes each way and its greeting (`HELLO 10.10.i.2:7000\n`,
    // 21 bytes), and each load connection's 64 bytes each way and its greeting.
    let bytes = |direction: &str| -> f64 {
        (0..2)
            .filter_map(|i| {
                let labels = format!("endpoint=\"{}:7000\",direction=\"{direction}\"", host_v4(i));
                topo.metric("switchyard_bytes_total", &labels)
            })
            .sum()
    };
    assert_eq!(bytes("out"), 200_000.0 + 600.0 * 64.0, "bytes out counted at close");
    assert_eq!(bytes("in"), 200_021.0 + 600.0 * (64.0 + 21.0), "bytes in counted at close");

    // Open connections show in /conns as the kernel's, with who, where and the endpoint.
    let mut hold = Command::new(probe_bin());
    hold.args(["hold", "--connect", SERVICE, "--conns", "3", "--hold-ms", "20000"]);
    let holder = topo.spawn_client(&mut hold);
    let pid = holder.0.id();
    let held = |body: &str| -> Vec<Value> {
        let all: Value = serde_json::from_str(body).expect("/conns is JSON");
        all.as_array().unwrap().iter().filter(|c| c["client"]["pid"] == pid).cloned().collect()
    };
    eventually(Duration::from_secs(5), "the held connections in /conns", || {
        held(&topo.admin_get("/conns")).iter().filter(|c| c["state"] == "open").count() == 3
    });
    let conns = held(&topo.admin_get("/conns"));
    assert_eq!(conns.len(), 3, "{conns:?}");
    for c in conns {
        assert_eq!(c["via"], "kernel", "{c}");
        assert_eq!(c["service"], "fast", "{c}");
        assert_eq!(c["client"]["comm"], "sy-probe", "{c}");
        assert_eq!(c["client"]["original_dst"], SERVICE, "{c}");
        let endpoint = c["route"]["endpoint"].as_str().unwrap_or_default().to_owned();
        assert!(endpoint.ends_with(":7000") && endpoint.starts_with("10."), "{c}");
    }
    drop(holder);
    eventually(Duration::from_secs(5), "closed connections leave /conns", || {
        held(&topo.admin_get("/conns")).is_empty()
    });
    let log = agent.stop();
    assert!(log.contains("via=Kernel"), "kernel connections get a close line: {log}");
}

#[test]
fn an_endpoint_that_refuses_is_ejected_from_the_kernel_table() {
    let Some((topo, mut servers)) = echo_hosts("an_endpoint_that_refuses_is_ejected_from_the_kernel_table", 2) else {
        return;
    };
    let policy = "    failure_accrual: { consecutive_failures: 1, base_ejection: 30s, max_ejection: 30s }\n";
    let agent = Agent::start(&topo, &config(&topo, policy));
    servers[0].kill();
    // The kernel still draws the dead endpoint (3 of 4 slots) until a refused connect is
    // reported and the table is rewritten (next tick, 500 ms); the client sees those
    // refusals itself, as with a direct connection.
    eventually(Duration::from_secs(10), "the dead endpoint ejected", || {
        let _ = topo.load(SERVICE, &["--conns", "5", "--concurrency", "1"], None).wait();
        agent.log().contains("ejecting endpoint after connect failures")
    });
    // Then the kernel's table is rewritten without it (next tick): wait for that, not a
    // guess at how long it takes.
    eventually(Duration::from_secs(5), "the kernel table rewritten after the ejection", || {
        let log = agent.log();
        let ejected = log.find("ejecting endpoint after connect failures").expect("ejected above");
        log[ejected..].contains("kernel endpoint tables updated")
    });
    let conns = topo.load(SERVICE, &["--conns", "200", "--concurrency", "2"], None).wait();
    let failed: Vec<_> = conns.iter().filter(|c| c.outcome.is_err()).collect();
    assert!(failed.is_empty(), "connections after the ejection failed: {failed:?}");
    assert!(shares(&conns).keys().all(|e| *e == format!("{}:7000", host_v4(1))));
    let refused = topo.metric("switchyard_connect_failures_total", "reason=\"refused\"").unwrap_or(0.0);
    assert!(refused >= 1.0, "the refusal is counted with its reason: {refused}");
    drop(agent);
}

#[test]
fn pods_dial_kernel_mode_services_straight() {
    let Some((topo, _servers)) = echo_hosts("pods_dial_kernel_mode_services_straight", 2) else { return };
    let agent = Agent::start(&topo, &config(&topo, ""));
    let pod = topo.pod("p");
    for _ in 0..20 {
        let run = pod.probe(SERVICE, 10_000).ok();
        assert_eq!(run.get("peer"), Some(SERVICE), "{}", run.stdout);
        assert_eq!(run.get("echo_bytes"), Some("10000"), "{}", run.stdout);
    }
    let kernel = topo.metric("switchyard_kernel_decisions", "decision=\"kernel\"").unwrap_or(0.0);
    assert!(kernel >= 20.0, "kernel decisions: {kernel}");
    // The agent reads the kernel's events every 50 ms: let it catch up before stopping.
    let pod_lines =
        |log: &str| log.lines().filter(|l| l.contains("connection closed") && l.contains("client.pod=true")).count();
    eventually(Duration::from_secs(5), "the pod's close lines", || pod_lines(&agent.log()) >= 20);
    let log = agent.stop();
    assert_eq!(pod.closed_conns(&log), 0, "a pod connection went through the agent");
    assert_eq!(pod_lines(&log), 20, "each pod connection is logged from the kernel's events: {log}");
}
