//! End to end: naming and routing. A logical service splits connections between concrete
//! sets by weight (canary) or fails over between them in order; the rules change at run
//! time; `switchyard resolve` shows the tree with live health.

use std::{process::Command, time::Duration};

use switchyard_tests::{Agent, Proc, Topology, epoch_ms, host_v4, require_root, shares};

fn config(topo: &Topology, v1_weight: u32, v2_weight: u32) -> String {
    format!(
        r#"agent:
  cgroup: {cg}
services:
  - name: web
    addresses: ["10.96.0.20:80"]
    route: {{ split: [{{ service: web-v1, weight: {v1_weight} }}, {{ service: web-v2, weight: {v2_weight} }}] }}
  - {{ name: web-v1, endpoints: ["{h0}:7000"] }}
  - {{ name: web-v2, endpoints: ["{h1}:7000"] }}
  - name: db
    addresses: ["10.96.0.21:80"]
    route: {{ failover: [db-local, db-remote] }}
  - {{ name: db-local, endpoints: ["{h0}:7001"], failure_accrual: {{ consecutive_failures: 1, base_ejection: 30s, max_ejection: 30s }} }}
  - {{ name: db-remote, endpoints: ["{h1}:7001"] }}
"#,
        cg = topo.cgroup.path.display(),
        h0 = host_v4(0),
        h1 = host_v4(1),
    )
}

fn resolve(topo: &Topology, args: &[&str]) -> String {
    let mut cmd = Command::new(switchyard_tests::switchyard_bin());
    cmd.arg("resolve").args(args);
    let out = switchyard_tests::run(topo.in_node(&mut cmd, false), Duration::from_secs(10));
    assert!(out.status.success(), "resolve {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn split_and_failover_routes_apply_per_connection_and_change_at_run_time() {
    if !require_root("split_and_failover_routes_apply_per_connection_and_change_at_run_time") {
        return;
    }
    let topo = Topology::with_hosts(2);
    let _web: Vec<Proc> = (0..2).map(|i| topo.echo_server(i, 7000, 0)).collect();
    let mut db_local = topo.echo_server(0, 7001, 0);
    let _db_remote = topo.echo_server(1, 7001, 0);
    let agent = Agent::start(&topo, &config(&topo, 90, 10));
    let (v1, v2) = (host_v4(0) + ":7000", host_v4(1) + ":7000");

    // Canary 90/10, drawn per connection.
    let conns = topo.load("10.96.0.20:80", &["--conns", "400", "--concurrency", "2"], None).wait();
    let s = shares(&conns);
    let canary = s.get(&v2).copied().unwrap_or(0.0);
    assert!((0.05..0.16).contains(&canary), "90/10 split sent {canary} to the canary: {s:?}");

    let tree = resolve(&topo, &["web"]);
    assert!(tree.starts_with("web [10.96.0.20:80]  split (healthy)"), "{tree}");
    assert!(tree.contains("├─ 90% web-v1  endpoints (healthy)") && tree.contains("└─ 10% web-v2"), "{tree}");
    assert!(tree.contains(&format!("{v1}  healthy  weight=1")), "{tree}");

    // Failover: everything to the first set while it is healthy...
    let db_local_addr = host_v4(0) + ":7001";
    let first = topo.load("10.96.0.21:80", &["--conns", "20"], None).wait();
    assert!(first.iter().all(|c| c.outcome.as_deref() == Ok(db_local_addr.as_str())), "{first:?}");
    // ...and when it dies, no connection fails: each moves on to the next set.
    let load = topo.load("10.96.0.21:80", &["--conns", "100000", "--concurrency", "2", "--duration-ms", "2000"], None);
    // Under way before the kill: a few connections reach the first set.
    switchyard_tests::eventually(Duration::from_secs(5), "the load to reach db-local", || topo.open_conns("db") > 0);
    db_local.kill();
    // Reaped, so its listener is closed; confirmed from the node. No connection begun
    // after this may fail.
    switchyard_tests::eventually(Duration::from_secs(5), "db-local to refuse connects", || {
        !topo.node_can_connect(&db_local_addr)
    });
    let t_kill = epoch_ms();
    let conns = load.wait();
    let after: Vec<_> = conns.iter().filter(|c| c.start_ms > t_kill).collect();
    assert!(
        after.len() > 50 && after.iter().all(|c| c.outcome.as_deref() == Ok((host_v4(1) + ":7001").as_str())),
        "{after:?}"
    );
    let tree = resolve(&topo, &["10.96.0.21:80"]);
    assert!(tree.contains("#1 db-local  endpoints (NO HEALTHY ENDPOINT)"), "{tree}");
    assert!(tree.contains(&format!("{db_local_addr}  ejected")), "{tree}");
    let json: serde_json::Value = serde_json::from_str(&resolve(&topo, &["db", "--json"])).expect("--json is JSON");
    assert_eq!(json["kind"], "failover");
    assert_eq!(json["healthy"], true);

    // The operator shifts the canary to 50/50 at run time.
    topo.rewrite_config(&config(&topo, 50, 50));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent.pid()), nix::sys::signal::Signal::SIGHUP).unwrap();
    switchyard_tests::eventually(Duration::from_secs(5), "the new split", || {
        resolve(&topo, &["web"]).contains("50% web-v2")
    });
    assert!(
        !agent.log().contains("only change on restart"),
        "the reload took the agent-settings-changed branch, not the plain services one:\n{}",
        agent.log()
    );
    let s = shares(&topo.load("10.96.0.20:80", &["--conns", "400", "--concurrency", "2"], None).wait());
    let canary = s.get(&v2).copied().unwrap_or(0.0);
    assert!((0.40..0.60).contains(&canary), "50/50 split sent {canary}: {s:?}");

    // Unknown targets are a clear error.
    let mut cmd = Command::new(switchyard_tests::switchyard_bin());
    cmd.args(["resolve", "nope"]);
    let out = switchyard_tests::run(topo.in_node(&mut cmd, false), Duration::from_secs(10));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no service is named `nope`"));
    agent.stop();
}
