//! `cargo xtask demo`: the agent, real backends and real clients in a throwaway network
//! namespace and cgroup (the end-to-end harness's `Topology`), with a running commentary.
//! Everything it creates is removed when it ends, on error too (the harness's guards).

use std::{path::Path, process::Command};

use anyhow::{bail, ensure};
use switchyard_tests::{Agent, Topology, addr, kernel_counters};

pub fn run(bin: &Path) -> anyhow::Result<()> {
    if !crate::bootstrap::is_root() {
        bail!("the demo loads eBPF programs and creates network namespaces: run it as root");
    }
    let topo = Topology::new();
    let [b0, b1] = addr::BACKEND_V4;
    println!(
        "== Throwaway node: network namespace {} (agent + clients), cgroup {}",
        topo.node.name,
        topo.cgroup.path.display()
    );
    println!("   backends in namespace {} at {b0} and {b1}", topo.backend().name);

    // Three HTTP endpoints, each answering with its own name, and one redis.
    let endpoints = [(b0, 8080), (b1, 8080), (b0, 8081)];
    let mut servers = Vec::new();
    for (ip, port) in endpoints {
        let root = topo.dir.path().join(format!("www-{ip}-{port}"));
        std::fs::create_dir_all(&root)?;
        std::fs::write(root.join("index.html"), format!("hello from backend {ip}:{port}\n"))?;
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "http.server", &port.to_string(), "--bind", ip]).current_dir(&root);
        servers.push(topo.backend_server(&mut cmd, || topo.node_can_connect(&format!("{ip}:{port}"))));
    }
    let mut redis = Command::new("redis-server");
    redis.args(switchyard_tests::redis_args(b0, 6379)).current_dir(topo.dir.path());
    servers.push(topo.backend_server(&mut redis, || topo.node_can_connect(&format!("{b0}:6379"))));

    let config = format!(
        r#"agent:
  cgroup: {cg}
services:
  - name: web
    addresses: ["10.96.0.20:80", "[fd96::20]:80"]
    endpoints: ["{b0}:8080", "{b1}:8080", "{b0}:8081"]
    balance: round-robin
  - name: redis
    addresses: ["10.96.0.30:6379"]
    endpoints: ["{b0}:6379"]
"#,
        cg = topo.cgroup.path.display()
    );
    println!("\n== Config\n{config}");
    let agent = Agent::start_bin(bin, &topo, &config);
    println!("== Agent running (pid {}); attached to the cgroup: {:?}", agent.pid(), topo.attached_programs());

    let curl = |url: &str| -> anyhow::Result<()> {
        let w = "  (curl's peer: %{remote_ip}:%{remote_port})";
        let out = topo.client(Command::new("curl").args(["-sS", "--max-time", "5", "-w", w, url]));
        ensure!(out.status.success(), "curl {url} failed: {}", String::from_utf8_lossy(&out.stderr));
        println!("   curl {url:22} -> {}", String::from_utf8_lossy(&out.stdout).replace('\n', ""));
        Ok(())
    };
    println!("\n== curl, inside the cgroup, dialling the service address (no proxy settings):");
    for url in ["http://10.96.0.20/"; 6].into_iter().chain(["http://[fd96::20]/"]) {
        curl(url)?;
    }

    println!("\n== One curl, one keep-alive connection, six requests: each request picks its own endpoint:");
    let mut one_conn = Command::new("curl");
    one_conn.args(["-sS", "--max-time", "5", "-w", "  (connections opened: %{num_connects})\n"]);
    one_conn.args(["http://10.96.0.20/"; 6]);
    let out = topo.client(&mut one_conn);
    ensure!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("   {line}");
    }

    println!("\n== Backend {b1}:8080 dies; the clients do not notice (retried elsewhere, then ejected):");
    servers[1].kill();
    for url in ["http://10.96.0.20/"; 6] {
        curl(url)?;
    }

    println!("\n== redis-cli, dialling 10.96.0.30:6379:");
    for args in [&["SET", "demo", "hello"][..], &["INCR", "visits"], &["INCR", "visits"], &["GET", "demo"]] {
        let out = topo.client(Command::new("redis-cli").args(["-h", "10.96.0.30", "-p", "6379"]).args(args));
        ensure!(out.status.success(), "redis-cli failed: {}", String::from_utf8_lossy(&out.stderr));
        println!("   redis-cli {:18} -> {}", args.join(" "), String::from_utf8_lossy(&out.stdout).trim());
    }

    // A pod: a network namespace of its own, in a kubelet-style cgroup below the attached one.
    let pod = topo.pod("demo");
    println!(
        "\n== A pod: network namespace {} (address {}), cgroup {}",
        pod.netns.name,
        pod.v4,
        pod.container_cgroup()
    );
    println!(
        "   its connects to service addresses go to the agent on the node address {}:15001 (or [{}]:15001)",
        addr::NODE_ADDRESS_V4,
        addr::NODE_ADDRESS_V6
    );
    for url in ["http://10.96.0.20/", "http://10.96.0.20/", "http://[fd96::20]/"] {
        let w = "  (curl's peer: %{remote_ip}:%{remote_port})";
        let out = pod.client(Command::new("curl").args(["-sS", "--max-time", "5", "-w", w, url]));
        ensure!(out.status.success(), "curl {url} in the pod failed: {}", String::from_utf8_lossy(&out.stderr));
        println!("   pod: curl {url:22} -> {}", String::from_utf8_lossy(&out.stdout).replace('\n', ""));
    }
    let out = pod.client(Command::new("redis-cli").args(["-h", "10.96.0.30", "-p", "6379", "GET", "demo"]));
    ensure!(out.status.success(), "redis-cli in the pod failed: {}", String::from_utf8_lossy(&out.stderr));
    println!("   pod: redis-cli GET demo        -> {}", String::from_utf8_lossy(&out.stdout).trim());
    // A connection held open (BLPOP waits 2 s for a list that never fills), seen in /conns.
    let mut blpop =
        pod.spawn_client(Command::new("redis-cli").args(["-h", "10.96.0.30", "-p", "6379", "BLPOP", "pod-demo", "2"]));
    let pid = blpop.0.id();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let entry = loop {
        let all: serde_json::Value = serde_json::from_str(&topo.admin_get("/conns"))?;
        if let Some(c) = all.as_array().and_then(|a| a.iter().find(|c| c["client"]["pid"] == pid)) {
            break c.clone();
        }
        ensure!(std::time::Instant::now() < deadline, "the pod's redis-cli BLPOP never showed in /conns: {all}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let c = &entry["client"];
    println!(
        "   /conns while BLPOP waits: {}/{} pod={} netns={} from {} cgroup {}\n      dialled {} -> service {} endpoint {}",
        c["comm"].as_str().unwrap_or("?"),
        c["pid"],
        c["pod"],
        c["netns"],
        entry["peer"].as_str().unwrap_or("?"),
        c["cgroup"].as_str().unwrap_or("?"),
        c["original_dst"].as_str().unwrap_or("?"),
        entry["service"].as_str().unwrap_or("?"),
        entry["route"]["endpoint"].as_str().unwrap_or("?"),
    );
    let status = switchyard_tests::wait_bounded(&mut blpop.0, std::time::Duration::from_secs(10));
    ensure!(status.is_some_and(|s| s.success()), "the pod's redis-cli BLPOP failed");

    println!("\n== A destination that is not a service is not touched (no route for 10.96.0.99 here):");
    let out = topo.client(Command::new("curl").args(["-sS", "--max-time", "5", "http://10.96.0.99/"]));
    println!("   curl http://10.96.0.99/ -> {}", String::from_utf8_lossy(&out.stderr).trim());

    let log = agent.stop();
    println!("\n== What the agent did (ejections, then one line per proxied connection):");
    for line in log.lines().filter_map(|l| l.find("ejecting endpoint").map(|at| &l[at..])) {
        println!("   {line}");
    }
    // The agent's one close line per connection (target switchyard::conn).
    for event in log.lines().filter_map(|l| l.split_once("switchyard::conn: connection closed").map(|(_, e)| e)) {
        let fields: Vec<&str> = event
            .split_whitespace()
            .filter(|w| {
                [
                    "outcome=",
                    "client.comm=",
                    "orig.dst=",
                    "service=",
                    "protocol=",
                    "http.requests=",
                    "endpoint=",
                    "bytes.",
                ]
                .iter()
                .any(|p| w.starts_with(p))
            })
            .collect();
        println!("   {}", fields.join(" "));
    }
    let counters = kernel_counters(&log);
    let order =
        ["redirected", "redirected_pod", "passed", "skipped_mark", "orig_dst_published", "peer_rewritten", "errors"];
    let shown: Vec<String> = order.iter().map(|k| format!("{k}={}", counters.get(*k).copied().unwrap_or(0))).collect();
    println!("\n== Kernel counters (per decision, summed over CPUs): {}", shown.join(" "));
    println!(
        "   the agent served {} connections from the pod ({}): redirected_pod counts the kernel's side of them",
        pod.closed_conns(&log),
        pod.v4
    );
    drop(servers);
    let left = topo.attached_programs();
    ensure!(left.is_empty(), "programs still attached after the agent stopped: {left:?}");
    println!("\n== Agent stopped; nothing left attached. Removing the namespaces and cgroup.");
    Ok(())
}
