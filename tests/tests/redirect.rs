//! End to end: real kernel, real sockets, real servers and clients, the real agent binary.
//! See the harness (src/lib.rs) for the topology every test builds.

use std::{collections::HashSet, process::Command, time::Duration};

use nix::sys::signal::Signal;
use switchyard_tests::{Agent, Proc, Topology, addr, kernel_counters, require_root, require_tools};

const ENETUNREACH: &str = "101";

/// One service, v4 and v6 addresses, both backends on port 7000.
fn echo_config(topo: &Topology) -> String {
    format!(
        r#"
agent:
  cgroup: {cg}
services:
  - name: echo
    addresses: ["10.96.0.10:7000"]
    endpoints: ["{b0}:7000", "{b1}:7000"]
    balance: round-robin
  - name: echo6
    addresses: ["[fd96::10]:7000"]
    endpoints: ["[{c0}]:7000", "[{c1}]:7000"]
"#,
        cg = topo.cgroup.path.display(),
        b0 = addr::BACKEND_V4[0],
        b1 = addr::BACKEND_V4[1],
        c0 = addr::BACKEND_V6[0],
        c1 = addr::BACKEND_V6[1],
    )
}

/// The start of most tests: root check, tools, a topology, echo servers on port 7000 of
/// every backend address. `None` means skipped (loudly, and never under CI=true).
fn echo_node(test: &str, tools: &[&str]) -> Option<(Topology, Proc)> {
    if !require_root(test) {
        return None;
    }
    require_tools(tools);
    let topo = Topology::new();
    let servers = topo.echo_servers(7000);
    Some((topo, servers))
}

#[test]
fn v4_service_reaches_every_endpoint_with_bytes_intact() {
    let Some((topo, _servers)) = echo_node("v4_service_reaches_every_endpoint_with_bytes_intact", &[]) else { return };
    let agent = Agent::start(&topo, &echo_config(&topo));

    let mut reached = HashSet::new();
    // One large transfer, then small ones: every run streams both ways at once and
    // half-closes, so the echo only completes if the proxy forwards the half-close.
    for bytes in [32 << 20, 1000, 1, 0] {
        let run = topo.probe("10.96.0.10:7000", bytes).ok();
        assert_eq!(run.get("peer"), Some("10.96.0.10:7000"), "getpeername shows the service address");
        assert_eq!(run.get("echo_bytes"), Some(bytes.to_string().as_str()));
        reached.insert(run.get("hello").expect("greeting").to_owned());
    }
    let expected: HashSet<String> = addr::BACKEND_V4.iter().map(|a| format!("{a}:7000")).collect();
    assert_eq!(reached, expected, "round robin reaches both endpoints");

    let log = agent.stop();
    let counters = kernel_counters(&log);
    assert_eq!(counters["redirected"], 4, "{log}");
    assert_eq!(counters["orig_dst_published"], 4, "{log}");
    assert_eq!(counters["errors"], 0, "{log}");
    assert!(counters["peer_rewritten"] >= 4, "{log}");
    // Every client socket has closed, so the kernel tracks none of them any more.
    assert_eq!(counters["tracked_sockets"], 0, "{log}");
    // The agent recovered each original destination and named the service.
    assert!(log.matches("orig.dst=10.96.0.10:7000").count() >= 4, "{log}");
}

#[test]
fn v6_and_v4_mapped_service_addresses_are_redirected() {
    let Some((topo, _servers)) = echo_node("v6_and_v4_mapped_service_addresses_are_redirected", &[]) else { return };
    let agent = Agent::start(&topo, &echo_config(&topo));

    let v6 = topo.probe("[fd96::10]:7000", 1 << 20).ok();
    assert_eq!(v6.get("peer"), Some("[fd96::10]:7000"));
    let hello = v6.get("hello").unwrap();
    assert!(addr::BACKEND_V6.iter().any(|a| hello == format!("[{a}]:7000")), "v6 endpoint, got {hello}");

    // A dual-stack (AF_INET6) socket dialling the v4 service as ::ffff:10.96.0.10.
    let mapped = topo.probe("[::ffff:10.96.0.10]:7000", 1 << 20).ok();
    assert_eq!(mapped.get("peer"), Some("[::ffff:10.96.0.10]:7000"));
    let hello = mapped.get("hello").unwrap();
    assert!(addr::BACKEND_V4.iter().any(|a| hello == format!("{a}:7000")), "v4 endpoint, got {hello}");

    let counters = kernel_counters(&agent.stop());
    assert_eq!(counters["redirected"], 2);
}

#[test]
fn curl_and_redis_cli_reach_real_servers_through_service_addresses() {
    if !require_root("curl_and_redis_cli_reach_real_servers_through_service_addresses") {
        return;
    }
    require_tools(&["curl", "redis-server", "redis-cli", "python3"]);
    let topo = Topology::new();
    let b = addr::BACKEND_V4[0];

    // nginx-style static HTTP server (Python's http.server) with a 2 MiB file.
    let root = topo.dir.path().join("www");
    std::fs::create_dir(&root).unwrap();
    let body: Vec<u8> = (0..2u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(root.join("blob"), &body).unwrap();
    let _http = topo.backend_server(
        Command::new("python3").args(["-m", "http.server", "8080", "--bind", b]).current_dir(&root),
        || topo.node_can_connect(&format!("{b}:8080")),
    );
    let _redis = topo.backend_server(
        Command::new("redis-server").args(switchyard_tests::redis_args(b, 6379)).current_dir(topo.dir.path()),
        || topo.node_can_connect(&format!("{b}:6379")),
    );
    let config = format!(
        r#"
agent: {{ cgroup: {cg} }}
services:
  - {{ name: web, addresses: ["10.96.0.20:80"], endpoints: ["{b}:8080"] }}
  - {{ name: redis, addresses: ["10.96.0.30:6379"], endpoints: ["{b}:6379"] }}
"#,
        cg = topo.cgroup.path.display()
    );
    let agent = Agent::start(&topo, &config);

    let out_file = topo.dir.path().join("downloaded");
    let curl = topo.client(Command::new("curl").args(["-sS", "--max-time", "20", "-o"]).arg(&out_file).args([
        "-w",
        "%{http_code} %{remote_ip}:%{remote_port}",
        "http://10.96.0.20/blob",
    ]));
    assert!(curl.status.success(), "curl: {}", String::from_utf8_lossy(&curl.stderr));
    // curl reads remote_ip with getpeername: it sees the service, not the loopback hop.
    assert_eq!(String::from_utf8_lossy(&curl.stdout), "200 10.96.0.20:80");
    assert!(std::fs::read(&out_file).unwrap() == body, "downloaded body differs");

    let redis = |args: &[&str]| {
        let out = topo.client(Command::new("redis-cli").args(["-h", "10.96.0.30", "-p", "6379"]).args(args));
        assert!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(redis(&["SET", "switchyard", "through-the-redirect"]), "OK");
    assert_eq!(redis(&["GET", "switchyard"]), "through-the-redirect");

    let log = agent.stop();
    assert!(log.contains("service=\"web\"") || log.contains("service=web"), "{log}");
    assert!(log.contains("service=\"redis\"") || log.contains("service=redis"), "{log}");
}

#[test]
fn destinations_that_are_not_services_are_untouched() {
    let Some((topo, _servers)) = echo_node("destinations_that_are_not_services_are_untouched", &[]) else { return };
    let agent = Agent::start(&topo, &echo_config(&topo));

    // A real endpoint dialled directly: reached as is, peer not rewritten.
    let direct = topo.probe("10.10.0.3:7000", 4096).ok();
    assert_eq!(direct.get("peer"), Some("10.10.0.3:7000"));
    assert_eq!(direct.get("hello"), Some("10.10.0.3:7000"));
    // A service IP on a port that is not a service: not redirected, so no route.
    let other_port = topo.probe("10.96.0.10:7001", 0);
    assert_eq!(other_port.get("connect_errno"), Some(ENETUNREACH), "{}", other_port.stdout);
    let unknown = topo.probe("[fd96::99]:7000", 0);
    assert_eq!(unknown.get("connect_errno"), Some(ENETUNREACH), "{}", unknown.stdout);

    let counters = kernel_counters(&agent.stop());
    assert_eq!(counters["redirected"], 0);
    assert!(counters["passed"] >= 3, "{counters:?}");
}

#[test]
fn the_agents_own_connections_are_not_redirected_back_to_it() {
    let Some((topo, _servers)) = echo_node("the_agents_own_connections_are_not_redirected_back_to_it", &[]) else {
        return;
    };
    // The service address is also the endpoint's real address, and the agent runs in the
    // hooked cgroup: without the mark check its upstream connect would come back to it.
    let ep = format!("{}:7000", addr::BACKEND_V4[0]);
    let config = format!(
        "agent: {{ cgroup: {} }}\nservices:\n  - {{ name: self, addresses: [\"{ep}\"], endpoints: [\"{ep}\"] }}\n",
        topo.cgroup.path.display()
    );
    let agent = Agent::start(&topo, &config);
    let run = topo.probe(&ep, 100_000).ok();
    assert_eq!(run.get("hello"), Some(ep.as_str()));
    let log = agent.stop();
    let counters = kernel_counters(&log);
    assert_eq!(counters["redirected"], 1, "the client's connect was redirected: {log}");
    assert_eq!(counters["skipped_mark"], 1, "the agent's upstream connect was let through: {log}");
}

#[test]
fn stopping_detaches_everything_and_killing_leaves_the_kernel_serving() {
    let Some((topo, _servers)) =
        echo_node("stopping_detaches_everything_and_killing_leaves_the_kernel_serving", &["bpftool"])
    else {
        return;
    };
    assert!(topo.attached_programs().is_empty(), "fresh cgroup has nothing attached");
    let ours = ["sy_connect4", "sy_connect6", "sy_getpeername4", "sy_getpeername6", "sy_sock_ops"];

    // SIGTERM with no successor: a full uninstall.
    let agent = Agent::start(&topo, &echo_config(&topo));
    let mut attached = topo.attached_programs();
    attached.sort();
    assert_eq!(attached, ours);
    topo.probe("10.96.0.10:7000", 10).ok();
    let (status, log) = agent.stop_with(Signal::SIGTERM);
    assert!(status.success(), "clean exit on SIGTERM: {status}\n{log}");
    assert!(log.contains("detaching redirect programs"), "{log}");
    assert!(topo.attached_programs().is_empty(), "detached on SIGTERM");
    assert!(!topo.pin_dir().exists(), "pins removed on SIGTERM");
    // Traffic to non-services still flows; service addresses are no longer caught.
    assert_eq!(topo.probe("10.10.0.2:7000", 10).ok().get("hello"), Some("10.10.0.2:7000"));
    assert_eq!(topo.probe("10.96.0.10:7000", 0).get("connect_errno"), Some(ENETUNREACH));

    // SIGKILL: the pinned programs stay and the kernel serves service connects itself.
    let mut agent = Agent::start(&topo, &echo_config(&topo));
    agent.kill();
    let mut attached = topo.attached_programs();
    attached.sort();
    assert_eq!(attached, ours, "pinned programs outlive a killed agent");
    let run = topo.probe("10.96.0.10:7000", 1000).ok();
    assert_eq!(run.get("peer"), Some("10.96.0.10:7000"), "getpeername still shows the service");
    let hello = run.get("hello").unwrap();
    assert!(addr::BACKEND_V4.iter().any(|a| hello == format!("{a}:7000")), "fallback reached an endpoint: {hello}");
    // `switchyard uninstall` removes what the killed agent left.
    let (ok, out) = topo.uninstall();
    assert!(ok && out.contains("detached 5 programs and removed 10 pinned maps"), "uninstall: {out}");
    assert!(topo.attached_programs().is_empty());
    assert!(!topo.pin_dir().exists());
    assert_eq!(topo.probe("10.96.0.10:7000", 0).get("connect_errno"), Some(ENETUNREACH));
}

#[test]
fn a_second_agent_on_a_busy_port_refuses_to_start_and_attaches_nothing() {
    let Some((topo, _servers)) =
        echo_node("a_second_agent_on_a_busy_port_refuses_to_start_and_attaches_nothing", &["bpftool"])
    else {
        return;
    };
    let first = Agent::start(&topo, &echo_config(&topo));
    // Another agent, not an upgrade of the first: it has a hand-over socket of its own,
    // so it does not ask the first for its listeners.
    let other = topo.dir.path().join("other.yaml");
    let own_socket = topo.dir.path().join("other.sock");
    let config =
        echo_config(&topo).replacen("agent:\n", &format!("agent:\n  handover_socket: {}\n", own_socket.display()), 1);
    std::fs::write(&other, topo.node_config(&config)).unwrap();
    let mut cmd = Command::new(switchyard_tests::switchyard_bin());
    cmd.arg("run").arg("--config").arg(&other);
    let second = switchyard_tests::run(topo.in_node(&mut cmd, true), Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second agent started on the same port:\n{stderr}");
    assert!(stderr.contains("cannot listen on 127.0.0.1:15001"), "{stderr}");
    assert!(stderr.contains("agent.listen_port"), "the message says what to change: {stderr}");
    // The first agent is untouched and still the only one attached.
    assert_eq!(topo.attached_programs().len(), 5);
    assert_eq!(topo.probe("10.96.0.10:7000", 1000).ok().get("echo_bytes"), Some("1000"));
    first.stop();
}

#[test]
fn a_bad_config_is_refused_with_the_field_named() {
    if !require_root("a_bad_config_is_refused_with_the_field_named") {
        return;
    }
    require_tools(&["bpftool"]);
    let topo = Topology::new();
    let write = |name: &str, text: &str| {
        let path = topo.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let cases = [
        (
            write(
                "syntax.yaml",
                "services:\n  - name: a\n    addresses: [\"10.96.0.1:80\"]\n    endpoints: [\"10.0.0.1:80\", \"10.0.0.300:80\"]\n",
            ),
            vec!["services[0].endpoints[1]", "line 4"],
        ),
        (
            write(
                "dup.yaml",
                "services:\n  - { name: a, addresses: [\"10.96.0.1:80\"], endpoints: [\"10.0.0.1:80\"] }\n  - { name: b, addresses: [\"10.96.0.1:80\"], endpoints: [] }\n",
            ),
            vec!["services[1].addresses[0]", "already an address of services[0]", "services[1].endpoints"],
        ),
        (write("unknown.yaml", "agent:\n  listen_prot: 1\n"), vec!["listen_prot", "line 2"]),
        (
            write("cgroup.yaml", "agent: { cgroup: /nonexistent/switchyard }\nservices: []\n"),
            vec!["/nonexistent/switchyard", "agent.cgroup"],
        ),
    ];
    let bin = switchyard_tests::switchyard_bin();
    for (path, needles) in &cases {
        // `check` validates only; `run` must refuse before attaching anything.
        let check = Command::new(&bin).arg("check").arg("--config").arg(path).output().unwrap();
        let stderr = String::from_utf8_lossy(&check.stderr);
        let is_host_problem = path.ends_with("cgroup.yaml");
        if is_host_problem {
            assert!(check.status.success(), "the cgroup is a host matter, not a syntax one: {stderr}");
        } else {
            assert!(!check.status.success(), "check accepted {}", path.display());
            for n in needles {
                assert!(stderr.contains(n), "check of {}: {n:?} missing from:\n{stderr}", path.display());
            }
        }
        let mut cmd = Command::new(&bin);
        cmd.arg("run").arg("--config").arg(path);
        let run = switchyard_tests::run(topo.in_node(&mut cmd, true), Duration::from_secs(20));
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "run started with {}", path.display());
        for n in needles {
            assert!(stderr.contains(n), "run with {}: {n:?} missing from:\n{stderr}", path.display());
        }
        assert!(topo.attached_programs().is_empty(), "nothing attached after a refused config");
    }
}

#[test]
fn missing_privileges_or_cgroup2_are_reported_plainly() {
    if !require_root("missing_privileges_or_cgroup2_are_reported_plainly") {
        return;
    }
    require_tools(&["setpriv", "unshare"]);
    let topo = Topology::new();
    let config = topo.dir.path().join("ok.yaml");
    std::fs::write(&config, echo_config(&topo)).unwrap();
    // Readable by the unprivileged user below.
    let world_readable = |p: &std::path::Path, mode| {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap()
    };
    world_readable(topo.dir.path(), 0o755);
    world_readable(&config, 0o644);
    let bin = switchyard_tests::switchyard_bin();

    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--"])
        .arg(&bin)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("needs root, or the capabilities CAP_BPF"), "{stderr}");
    assert!(stderr.contains("missing CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN"), "{stderr}");

    // In a private mount namespace with the cgroup2 mount taken away (the host's mounts
    // are untouched): the agent must say there is no cgroup v2.
    let cg2 = switchyard_tests::cgroup2_root();
    let script = format!("umount -l {} && exec \"$0\" run --config \"$1\"", cg2.display());
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .arg(&bin)
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no cgroup v2 (cgroup2) file system is mounted"), "{stderr}");
}
