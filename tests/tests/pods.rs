//! Every pod on the node is covered: clients in network namespaces of their own (pods,
//! see the harness's `Pod`), in kubelet-style cgroups below the attached one, dial
//! service addresses and reach them through the agent on its node address, or, when the
//! agent is gone or a pod cannot reach it, through the kernel's fallback; nothing else is
//! touched, and nothing is left on the node afterwards.
//!
//! A pod connection that succeeded is not proof that the agent served it (the fallback
//! serves too): the tests count the agent's close lines from each pod's address, read
//! `/conns` and `/status`, and check the kernel's counters exactly where the design fixes
//! them. Every run is bounded (loads of a second or a few, polls against deadlines).

use std::{collections::HashMap, process::Command, thread, time::Duration};

use serde_json::json;
use switchyard_tests::{
    Agent, Conn, Event, Load, Pod, Proc, Topology, addr, cgroup_relative, closed_conn_clients, epoch_ms, eventually,
    eventually_some, figures, host_v4, kernel_counters, probe_bin, require_root, require_tools,
};

/// The errnos of a connect nothing routes: the node has no route for service addresses
/// and answers the pod with ICMP unreachable (ENETUNREACH, EHOSTUNREACH).
const UNREACHABLE: [&str; 2] = ["101", "113"];
const ECHO: &str = "10.96.0.10:7000";
const ECHO6: &str = "[fd96::10]:7000";
const OTHER: &str = "10.96.0.11:7000";
/// The endpoint of `other`, on a host of its own.
const OTHER_ENDPOINT: &str = "10.10.1.2:7001";

fn echo_endpoints() -> Vec<String> {
    addr::BACKEND_V4.iter().map(|a| format!("{a}:7000")).collect()
}

fn echo6_endpoints() -> Vec<String> {
    addr::BACKEND_V6.iter().map(|a| format!("[{a}]:7000")).collect()
}

/// Three services: `echo` (v4) and `echo6` on host 0, `other` on host 1, so a connection
/// that reached the wrong one shows. `agent` lines go under `agent:` as they are.
fn config(topo: &Topology, agent: &[&str]) -> String {
    let extra: String = agent.iter().map(|l| format!("  {l}\n")).collect();
    format!(
        r#"
agent:
  cgroup: {cg}
{extra}services:
  - {{ name: echo, addresses: ["{ECHO}"], endpoints: ["{e0}", "{e1}"] }}
  - {{ name: echo6, addresses: ["{ECHO6}"], endpoints: ["{s0}", "{s1}"] }}
  - {{ name: other, addresses: ["{OTHER}"], endpoints: ["{OTHER_ENDPOINT}"] }}
"#,
        cg = topo.cgroup.path.display(),
        e0 = echo_endpoints()[0],
        e1 = echo_endpoints()[1],
        s0 = echo6_endpoints()[0],
        s1 = echo6_endpoints()[1],
    )
}

/// Root check, then a node with two backend hosts: echo servers on every address of host
/// 0 (v4 and v6, port 7000) and on host 1's port 7001.
fn node(test: &str) -> Option<(Topology, Vec<Proc>)> {
    if !require_root(test) {
        return None;
    }
    require_tools(&["curl", "bpftool"]);
    let topo = Topology::with_hosts(2);
    assert_eq!(host_v4(1) + ":7001", OTHER_ENDPOINT);
    let servers = vec![topo.echo_servers(7000), topo.echo_server(1, 7001, 0)];
    Some((topo, servers))
}

/// A pod's first connect from its namespace is the agent's path probe: make it one
/// checked connection of its own, so that every later one finds the path confirmed.
fn warm_up(pod: &Pod) {
    let run = pod.probe(ECHO, 1000).ok();
    assert_eq!(run.get("peer"), Some(ECHO), "pod {}: {}", pod.name, run.stdout);
    assert_eq!(run.get("echo_bytes"), Some("1000"), "pod {}: {}", pod.name, run.stdout);
}

/// `sy-probe load` arguments: `concurrency` workers for `ms` milliseconds (at most 400
/// connections), each connection echoing, holding `hold_ms` (which paces the load) and
/// echoing again.
fn load_args(concurrency: u32, ms: u64, hold_ms: u64) -> Vec<String> {
    ["--conns", "400", "--concurrency", &concurrency.to_string(), "--duration-ms", &ms.to_string()]
        .into_iter()
        .chain(["--hold-ms", &hold_ms.to_string()])
        .map(String::from)
        .collect()
}

fn start_load(pod: &Pod, target: &str, args: &[String]) -> Load {
    pod.load(target, &args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// A probe client that keeps its connection open about four seconds, moving bytes.
fn held_client() -> Command {
    let mut cmd = Command::new(probe_bin());
    cmd.args(["client", "--connect", ECHO, "--bytes", &(40 * 65536).to_string(), "--chunk-delay-ms", "100"]);
    cmd
}

/// A kernel counter, naming them all if it is missing.
fn counter(counters: &HashMap<String, u64>, name: &str) -> usize {
    *counters.get(name).unwrap_or_else(|| panic!("no kernel counter {name:?} in {counters:?}")) as usize
}

/// Panics unless every connection succeeded and reached one of `endpoints`.
fn all_reached(what: &str, conns: &[Conn], endpoints: &[String]) {
    assert!(!conns.is_empty(), "{what}: the load made no connection");
    let wrong: Vec<&Conn> =
        conns.iter().filter(|c| c.outcome.as_ref().map_or(true, |e| !endpoints.contains(e))).collect();
    assert!(
        wrong.is_empty(),
        "{what}: {} of {} connections failed or reached another service: {wrong:?}",
        wrong.len(),
        conns.len()
    );
}

fn errno(probe: &switchyard_tests::Probe) -> &str {
    probe.get("connect_errno").unwrap_or("none")
}

#[test]
fn pod_clients_reach_services_through_the_agent_as_themselves() {
    let Some((topo, _servers)) = node("pod_clients_reach_services_through_the_agent_as_themselves") else { return };
    let agent = Agent::start(&topo, &config(&topo, &[]));
    let lo = topo.node_addresses_on_lo();
    for a in [addr::NODE_ADDRESS_V4, addr::NODE_ADDRESS_V6] {
        assert!(lo.iter().any(|l| l == a), "node address {a} not on the node's lo: {lo:?}");
    }
    let pods = [topo.pod("a"), topo.pod("b"), topo.pod("c")];
    for pod in &pods {
        warm_up(pod);
    }

    // Held open meanwhile, for /conns: one connection from pod a, one from the host.
    let mut held_pod = pods[0].spawn_client(&mut held_client());
    let mut held_host = topo.spawn_client(&mut held_client());
    // Real clients in three pods at once; a and c dial echo while b dials other.
    let args = load_args(3, 2000, 20);
    let loads =
        [start_load(&pods[0], ECHO, &args), start_load(&pods[1], OTHER, &args), start_load(&pods[2], ECHO, &args)];

    let (pod_pid, host_pid) = (held_pod.0.id(), held_host.0.id());
    let (pod_conn, host_conn) = eventually_some(Duration::from_secs(5), "both held connections open in /conns", || {
        let all = topo.admin_json("/conns");
        let find =
            |pid: u32| all.as_array()?.iter().find(|c| c["client"]["pid"] == pid && c["state"] == "open").cloned();
        Some((find(pod_pid)?, find(host_pid)?))
    });
    let (pc, hc) = (&pod_conn["client"], &host_conn["client"]);
    assert_eq!(pc["comm"], "sy-probe", "{pod_conn}");
    assert_eq!(pc["cgroup"], pods[0].container_cgroup(), "the pod's container cgroup: {pod_conn}");
    assert_eq!(pc["pod"], true, "{pod_conn}");
    assert_eq!(pc["netns"], pods[0].netns_cookie(), "the pod's netns cookie: {pod_conn}");
    assert_eq!(pc["original_dst"], ECHO, "{pod_conn}");
    let peer: std::net::SocketAddr = pod_conn["peer"].as_str().expect("peer").parse().expect("peer address");
    assert_eq!(peer.ip().to_canonical().to_string(), pods[0].v4, "accepted from the pod's address: {pod_conn}");
    assert!(echo_endpoints().iter().any(|e| pod_conn["route"]["endpoint"] == e.as_str()), "{pod_conn}");
    assert_eq!(hc["pod"], false, "{host_conn}");
    assert_eq!(hc["netns"], topo.node_netns_cookie(), "{host_conn}");
    assert_ne!(hc["netns"], pc["netns"], "a pod's netns is not the host's");
    assert_eq!(hc["cgroup"], cgroup_relative(&topo.cgroup.path), "{host_conn}");

    let [a, b, c] = loads.map(Load::wait);
    all_reached("pod a -> echo", &a, &echo_endpoints());
    all_reached("pod b -> other", &b, &[OTHER_ENDPOINT.to_owned()]);
    all_reached("pod c -> echo", &c, &echo_endpoints());
    for (who, held) in [("pod a", &mut held_pod), ("host", &mut held_host)] {
        let status = switchyard_tests::wait_bounded(&mut held.0, Duration::from_secs(20)).expect("held client ends");
        assert!(status.success(), "{who}'s held connection failed (bytes not echoed intact)");
    }

    let log = agent.stop();
    // The agent accepted every pod connection from the pod's own address: warm-up, load
    // and (pod a) the held one. None went to the fallback.
    let mut pod_conns = 0;
    for (pod, load, held) in [(&pods[0], &a, 1), (&pods[1], &b, 0), (&pods[2], &c, 0)] {
        let made = 1 + load.len() + held;
        assert_eq!(pod.closed_conns(&log), made, "pod {}: connections the agent closed vs made", pod.name);
        pod_conns += made;
    }
    let counters = kernel_counters(&log);
    println!("{} pod connections; kernel counters: {counters:?}", pod_conns);
    assert_eq!(counter(&counters, "redirected_pod"), pod_conns, "{counters:?}");
    assert_eq!(counter(&counters, "redirected"), pod_conns + 1, "pods and the host's one: {counters:?}");
    assert_eq!(counter(&counters, "fallback_blocked"), 0, "{counters:?}");
    assert_eq!(counter(&counters, "fallback"), 0, "{counters:?}");
    assert_eq!(counter(&counters, "skipped_netns"), 0, "{counters:?}");
    assert_eq!(counter(&counters, "errors"), 0, "{counters:?}");
}

#[test]
fn pods_dial_v6_and_v4_mapped_service_addresses() {
    let Some((topo, _servers)) = node("pods_dial_v6_and_v4_mapped_service_addresses") else { return };
    let agent = Agent::start(&topo, &config(&topo, &[]));
    let (six, mapped) = (topo.pod("six"), topo.pod("mapped"));
    let v4_mapped = "[::ffff:10.96.0.10]:7000";

    // Each pod's first connect (its path probe) is the one under test: v6 for one, a
    // v4-mapped address on an AF_INET6 socket for the other.
    let run = six.probe(ECHO6, 1 << 20).ok();
    assert_eq!(run.get("peer"), Some(ECHO6), "{}", run.stdout);
    assert_eq!(run.get("echo_bytes"), Some("1048576"));
    assert!(echo6_endpoints().iter().any(|e| run.get("hello") == Some(e)), "{}", run.stdout);
    let run = mapped.probe(v4_mapped, 1 << 20).ok();
    assert_eq!(run.get("peer"), Some(v4_mapped), "{}", run.stdout);
    assert_eq!(run.get("echo_bytes"), Some("1048576"));
    assert!(echo_endpoints().iter().any(|e| run.get("hello") == Some(e)), "{}", run.stdout);
    // And the other family from each.
    assert_eq!(six.probe(ECHO, 1000).ok().get("peer"), Some(ECHO));
    assert_eq!(mapped.probe(ECHO6, 1000).ok().get("peer"), Some(ECHO6));

    let args = load_args(2, 1000, 20);
    let (l6, lm) = (start_load(&six, ECHO6, &args), start_load(&mapped, v4_mapped, &args));
    let (l6, lm) = (l6.wait(), lm.wait());
    all_reached("v6 load", &l6, &echo6_endpoints());
    all_reached("v4-mapped load", &lm, &echo_endpoints());

    let log = agent.stop();
    let from = |ip: &str| closed_conn_clients(&log).iter().filter(|a| a.to_string() == ip).count();
    assert_eq!(from(&six.v6), 1 + l6.len(), "v6 connections the agent accepted from pod six");
    assert_eq!(from(&six.v4), 1, "pod six's one v4 connection");
    assert_eq!(from(&mapped.v4), 1 + lm.len(), "v4-mapped connections the agent accepted from pod mapped");
    assert_eq!(from(&mapped.v6), 1, "pod mapped's one v6 connection");
    let counters = kernel_counters(&log);
    assert_eq!(counter(&counters, "redirected_pod"), 4 + l6.len() + lm.len(), "{counters:?}");
    assert_eq!(counter(&counters, "fallback_blocked") + counter(&counters, "fallback"), 0, "{counters:?}");
}

#[test]
fn killing_restarting_and_upgrading_the_agent_under_pod_load() {
    let Some((topo, _servers)) = node("killing_restarting_and_upgrading_the_agent_under_pod_load") else { return };
    let config = config(&topo, &[]);
    let mut first = Agent::start(&topo, &config);
    let pods = [topo.pod("a"), topo.pod("b")];
    for pod in &pods {
        warm_up(pod);
    }
    let args = load_args(2, 8000, 200);
    let loads = pods.each_ref().map(|p| start_load(p, ECHO, &args));
    thread::sleep(Duration::from_millis(1200));

    // kill -9: new pod connects go straight to an endpoint (the in-kernel fallback).
    let kill_begin = epoch_ms();
    first.kill();
    let kill = Event { name: "kill -9", begin: kill_begin, done: epoch_ms() };
    let first_log = first.log();
    let lo = topo.node_addresses_on_lo();
    assert!(lo.iter().any(|a| a == addr::NODE_ADDRESS_V4), "a killed agent leaves its node addresses: {lo:?}");
    thread::sleep(Duration::from_millis(1500));

    // Restart: pods go through the new agent again.
    let restart_begin = epoch_ms();
    let second = Agent::start(&topo, &config);
    let restart = Event { name: "restart", begin: restart_begin, done: epoch_ms() };
    thread::sleep(Duration::from_millis(1500));

    // Upgrade: a third agent takes the listeners (the node addresses' too) from the second.
    let upgrade_begin = epoch_ms();
    let third = Agent::start(&topo, &config);
    let upgrade = Event { name: "upgrade", begin: upgrade_begin, done: epoch_ms() };
    let (status, second_log) = second.wait_exit(Duration::from_secs(15));
    assert!(status.success() && second_log.contains("handed over to a new agent"), "{status}\n{second_log}");
    let lo = topo.node_addresses_on_lo();
    for a in [addr::NODE_ADDRESS_V4, addr::NODE_ADDRESS_V6] {
        assert!(lo.iter().any(|l| l == a), "the old agent removed node address {a} when handing over: {lo:?}");
    }

    let per_pod = loads.map(Load::wait);
    let ended = epoch_ms();
    let third_log = third.stop();
    let conns: Vec<Conn> = per_pod.iter().flatten().cloned().collect();
    let steady: Vec<&Conn> = conns.iter().filter(|c| c.end_ms < kill.begin).collect();
    let [killed, restarted, upgraded] =
        [(kill, restart.begin), (restart, upgrade.begin), (upgrade, ended)].map(|(e, until)| figures(&conns, e, until));
    println!("pod load: {} connections; steady {}", conns.len(), steady.len());
    println!("  kill -9:  cut {:?}, begun after {} failed {}", killed.cut.len(), killed.new, killed.failed_new.len());
    println!("  restart:  {restarted:?}");
    println!("  upgrade:  {upgraded:?}");

    assert!(!steady.is_empty() && steady.iter().all(|c| c.outcome.is_ok()), "steady state: {steady:?}");
    let through = |log: &str| pods.iter().map(|p| p.closed_conns(log)).sum::<usize>();
    // Steady-state pod connections went through the first agent (close lines lag a little).
    let settled = steady.iter().filter(|c| c.end_ms + 300 < kill.begin).count();
    assert!(through(&first_log) >= pods.len() + settled, "{} closed vs {settled} settled", through(&first_log));
    // kill -9 cuts what the dead agent proxied (reported); no new pod connection fails.
    assert!(killed.new > 0, "the load ran while no agent did: {killed:?}");
    assert!(killed.failed_during.is_empty(), "pod connects begun during kill -9 failed: {:?}", killed.failed_during);
    assert!(killed.failed_new.is_empty(), "pod connects failed after kill -9: {:?}", killed.failed_new);
    for (name, f) in [("restart", &restarted), ("upgrade", &upgraded)] {
        assert!(f.new > 0, "{name}: no connection after it: {f:?}");
        assert!(f.cut.is_empty() && f.failed_during.is_empty() && f.failed_new.is_empty(), "{name}: {f:?}");
    }
    // Both later agents served pod connections themselves.
    assert!(through(&second_log) > 0, "no pod connection reached the restarted agent:\n{second_log}");
    assert!(through(&third_log) > 0, "no pod connection reached the upgraded agent:\n{third_log}");
    let counters = kernel_counters(&third_log);
    // The pinned counters survive: what the kernel served while no agent ran is there.
    assert!(counter(&counters, "fallback") >= killed.new, "{counters:?} vs {killed:?}");
    assert!(counter(&counters, "redirected_pod") >= through(&first_log), "{counters:?}");
}

#[test]
fn a_pod_that_cannot_reach_the_agent_is_served_by_the_fallback_and_reported() {
    let Some((topo, _servers)) = node("a_pod_that_cannot_reach_the_agent_is_served_by_the_fallback_and_reported")
    else {
        return;
    };
    require_tools(&["nft"]);
    let agent = Agent::start(&topo, &config(&topo, &["blocked_retry: 3s"]));
    let (good, blocked) = (topo.pod("good"), topo.pod("blocked"));
    warm_up(&good);
    blocked.block_node_address();

    // 1.5 s of new connections: the blocked pod's first connect is its path probe (lost:
    // its SYNs are dropped, it times out after 5 s); the agent marks the netns blocked
    // within about a second, and the retry (3 s later) comes after the load's last start.
    let args = load_args(3, 1500, 20);
    let (lg, lb) = (start_load(&good, ECHO, &args), start_load(&blocked, ECHO, &args));
    // Reported while it is blocked (until blocked_retry runs out).
    let status = eventually_some(Duration::from_secs(4), "the blocked pod's netns in /status pods.blocked", || {
        let status = topo.admin_json("/status");
        (!status["pods"]["blocked"].as_array()?.is_empty()).then_some(status)
    });
    let blocked_metric = topo.metric("switchyard_pod_netns", "state=\"blocked\"");
    let pods = &status["pods"];
    assert_eq!(pods["mode"], "redirect", "{status}");
    assert_eq!(pods["node_address"], json!(["169.254.83.89:15001", "[fd00:5359::1]:15001"]), "{status}");
    let listed = pods["blocked"].as_array().expect("pods.blocked");
    assert_eq!(listed.len(), 1, "{status}");
    assert_eq!(listed[0]["netns"], blocked.netns_cookie(), "the blocked pod's netns: {status}");
    let since = listed[0]["since_unix_ms"].as_u64().unwrap_or(0) as u128;
    assert!(since > 0 && since <= epoch_ms(), "{status}");
    assert_eq!(pods["reachable"], 1, "the good pod is reachable, the blocked one not: {status}");
    assert_eq!(blocked_metric, Some(1.0), "switchyard_pod_netns{{state=\"blocked\"}}");
    eventually(Duration::from_secs(5), "a warning that the pod is not reaching the agent", || {
        agent.log().lines().any(|l| l.contains("WARN") && l.contains("not reaching the agent"))
    });

    let (good_conns, blocked_conns) = (lg.wait(), lb.wait());
    all_reached("the good pod", &good_conns, &echo_endpoints());
    let (lost, served): (Vec<&Conn>, Vec<&Conn>) = blocked_conns.iter().partition(|c| c.outcome.is_err());
    println!("blocked pod: {} connections, {} lost", blocked_conns.len(), lost.len());
    assert!(lost.len() <= 1, "more than the probe lost: {lost:?}");
    assert!(lost.iter().all(|c| c.outcome.as_ref().is_err_and(|e| e.starts_with("connect"))), "{lost:?}");
    let served: Vec<Conn> = served.into_iter().cloned().collect();
    all_reached("the blocked pod (fallback)", &served, &echo_endpoints());
    // Every connection of the good pod went through the agent, none of the blocked one's.
    eventually(Duration::from_secs(5), "the good pod's close lines", || {
        good.closed_conns(&agent.log()) > good_conns.len()
    });
    let log = agent.log();
    assert_eq!(good.closed_conns(&log), 1 + good_conns.len(), "the good pod's connections through the agent");
    assert_eq!(blocked.closed_conns(&log), 0, "a blocked pod's connection reached the agent");

    // Unblocked: after blocked_retry, a connect probes again, reaches the agent, and the
    // netns is reachable. Every connect meanwhile is served (fallback or agent).
    blocked.unblock_node_address();
    eventually(Duration::from_secs(10), "a connect from the unblocked pod to reach the agent", || {
        let run = blocked.probe(ECHO, 100).ok();
        assert_eq!(run.get("peer"), Some(ECHO));
        thread::sleep(Duration::from_millis(100));
        blocked.closed_conns(&agent.log()) > 0
    });
    eventually(Duration::from_secs(5), "both pods reachable", || {
        let pods = &topo.admin_json("/status")["pods"];
        pods["reachable"] == 2 && pods["blocked"] == json!([])
    });
    let after = topo.metric("switchyard_pod_netns", "state=\"blocked\"");
    assert!(matches!(after, None | Some(0.0)), "blocked netns metric after recovery: {after:?}");
    let counters = kernel_counters(&agent.stop());
    assert!(counter(&counters, "fallback_blocked") >= served.len(), "{counters:?}");
    // The good pod's, the lost probe and the re-probe: all agent-bound.
    let agent_bound = 1 + good_conns.len() + lost.len() + 1;
    assert!(counter(&counters, "redirected_pod") >= agent_bound, "{counters:?}");
}

#[test]
fn a_pod_whose_path_breaks_after_it_worked_is_noticed_and_served_by_the_fallback() {
    let Some((topo, _servers)) = node("a_pod_whose_path_breaks_after_it_worked_is_noticed_and_served_by_the_fallback")
    else {
        return;
    };
    require_tools(&["nft"]);
    let agent = Agent::start(&topo, &config(&topo, &["blocked_retry: 60s"]));
    let pod = topo.pod("later");
    warm_up(&pod);
    // /status follows the kernel's map on the agent's 500 ms tick.
    eventually(Duration::from_secs(3), "the pod reachable in /status", || {
        topo.admin_json("/status")["pods"]["reachable"] == 1
    });
    // A NetworkPolicy arrives: the path was confirmed, so the kernel keeps sending the
    // pod's connects to the agent until the agent sees SYNs that never arrive.
    pod.block_node_address();
    let workers = 3;
    let load = start_load(&pod, ECHO, &load_args(workers, 7000, 20));
    let status = eventually_some(Duration::from_secs(5), "the netns in /status pods.blocked", || {
        let status = topo.admin_json("/status");
        (status["pods"]["blocked"].as_array()?.len() == 1).then_some(status)
    });
    assert_eq!(status["pods"]["blocked"][0]["netns"], pod.netns_cookie(), "{status}");
    assert_eq!(status["pods"]["reachable"], 0, "{status}");
    let conns = load.wait();
    let (lost, served): (Vec<&Conn>, Vec<&Conn>) = conns.iter().partition(|c| c.outcome.is_err());
    println!("path broken under load: {} connections, {} lost", conns.len(), lost.len());
    // What was in flight when the path broke (one connect per worker, hanging until its
    // 5 s timeout) is lost; everything begun after the agent noticed is served.
    assert!(lost.len() <= workers as usize, "more lost than the connects in flight: {lost:?}");
    assert!(served.len() > 10 * lost.len().max(1), "the fallback served the rest: {} served", served.len());
    let served: Vec<Conn> = served.into_iter().cloned().collect();
    all_reached("the pod after its path broke", &served, &echo_endpoints());
    let log = agent.log();
    assert!(log.lines().any(|l| l.contains("WARN") && l.contains("not reaching the agent")), "{log}");
    assert_eq!(pod.closed_conns(&log), 1, "only the warm-up went through the agent");
    let counters = kernel_counters(&agent.stop());
    assert!(counter(&counters, "fallback_blocked") >= served.len(), "{counters:?}");
}

#[test]
fn excluded_cgroups_are_passed_untouched_in_any_netns() {
    let Some((topo, _servers)) = node("excluded_cgroups_are_passed_untouched_in_any_netns") else { return };
    let (excluded, normal) = (topo.pod("excluded"), topo.pod("normal"));
    let host_excluded = topo.child_cgroup("excluded");
    let exclude =
        format!("exclude_cgroups: [\"{}\", \"{}\"]", excluded.pod_cgroup.path.display(), host_excluded.path.display());
    let agent = Agent::start(&topo, &config(&topo, &[&exclude]));

    // The excluded pod (its pod-level cgroup, so every container in it): service connects
    // leave as they are, and nothing routes them.
    for target in [ECHO, ECHO6] {
        let run = excluded.probe(target, 0);
        assert!(UNREACHABLE.contains(&errno(&run)), "{target} from an excluded pod: {}", run.stdout);
    }
    // Untouched, not cut off: a real endpoint dialled directly is reached.
    let direct = excluded.probe("10.10.0.2:7000", 100).ok();
    assert_eq!(direct.get("hello"), Some("10.10.0.2:7000"));
    // An excluded cgroup in the host's netns: the same.
    let host = topo.load(ECHO, &["--conns", "2", "--concurrency", "1"], Some(&host_excluded)).wait();
    assert!(
        host.len() == 2 && host.iter().all(|c| c.outcome.as_ref().is_err_and(|e| e.contains("unreachable"))),
        "{host:?}"
    );

    // Everyone else as before: the other pod through the node address, the host's
    // clients through loopback.
    assert_eq!(normal.probe(ECHO, 1000).ok().get("peer"), Some(ECHO));
    assert_eq!(topo.probe(ECHO, 1000).ok().get("peer"), Some(ECHO));
    let log = agent.stop();
    assert_eq!(normal.closed_conns(&log), 1, "the other pod's connection through the agent");
    assert_eq!(excluded.closed_conns(&log), 0, "an excluded pod's connection reached the agent");
    let loopback = closed_conn_clients(&log).iter().filter(|a| a.is_loopback()).count();
    assert_eq!(loopback, 1, "the host client came through loopback");
    let counters = kernel_counters(&log);
    assert!(counter(&counters, "skipped_excluded") >= 4, "two pod and two host connects: {counters:?}");
    assert_eq!(counter(&counters, "redirected"), 2, "{counters:?}");
    assert_eq!(counter(&counters, "redirected_pod"), 1, "{counters:?}");
    assert_eq!(counter(&counters, "fallback") + counter(&counters, "fallback_blocked"), 0, "{counters:?}");
}

#[test]
fn with_pods_off_pod_connects_are_passed_untouched() {
    let Some((topo, _servers)) = node("with_pods_off_pod_connects_are_passed_untouched") else { return };
    let agent = Agent::start(&topo, &config(&topo, &["pods: off"]));
    let pod = topo.pod("p");
    for target in [ECHO, ECHO6] {
        let run = pod.probe(target, 0);
        assert!(UNREACHABLE.contains(&errno(&run)), "{target} from a pod with pods: off: {}", run.stdout);
    }
    assert_eq!(topo.probe(ECHO, 1000).ok().get("peer"), Some(ECHO), "the host's clients are still served");
    assert_eq!(topo.admin_json("/status")["pods"]["mode"], "off");
    let log = agent.stop();
    assert_eq!(pod.closed_conns(&log), 0);
    let counters = kernel_counters(&log);
    assert!(counter(&counters, "skipped_netns") >= 2, "{counters:?}");
    assert_eq!(counter(&counters, "redirected_pod"), 0, "{counters:?}");
    assert_eq!(counter(&counters, "redirected"), 1, "{counters:?}");
    assert_eq!(counter(&counters, "fallback") + counter(&counters, "fallback_blocked"), 0, "{counters:?}");
}

#[test]
fn with_pods_fallback_the_kernel_serves_pods_and_the_agent_never_does() {
    let Some((topo, _servers)) = node("with_pods_fallback_the_kernel_serves_pods_and_the_agent_never_does") else {
        return;
    };
    let agent = Agent::start(&topo, &config(&topo, &["pods: fallback"]));
    let pod = topo.pod("p");
    let run = pod.probe(ECHO, 100_000).ok();
    assert_eq!(run.get("peer"), Some(ECHO), "getpeername shows the service: {}", run.stdout);
    assert!(echo_endpoints().iter().any(|e| run.get("hello") == Some(e)), "{}", run.stdout);
    let run = pod.probe(ECHO6, 100_000).ok();
    assert_eq!(run.get("peer"), Some(ECHO6), "{}", run.stdout);
    assert!(echo6_endpoints().iter().any(|e| run.get("hello") == Some(e)), "{}", run.stdout);
    let conns = start_load(&pod, ECHO, &load_args(2, 1000, 20)).wait();
    all_reached("pod load with pods: fallback", &conns, &echo_endpoints());
    assert_eq!(topo.probe(ECHO, 1000).ok().get("peer"), Some(ECHO));
    assert_eq!(topo.admin_json("/status")["pods"]["mode"], "fallback");

    let log = agent.stop();
    assert_eq!(pod.closed_conns(&log), 0, "a pod connection went through the agent");
    let counters = kernel_counters(&log);
    assert_eq!(counter(&counters, "fallback"), 2 + conns.len(), "every pod connect, in the kernel: {counters:?}");
    assert_eq!(counter(&counters, "redirected_pod"), 0, "{counters:?}");
    assert_eq!(counter(&counters, "redirected"), 1, "the host's one: {counters:?}");
}

#[test]
fn stopping_or_uninstalling_removes_the_node_addresses_too() {
    let Some((topo, _servers)) = node("stopping_or_uninstalling_removes_the_node_addresses_too") else { return };
    let config = config(&topo, &[]);
    let pod = topo.pod("p");

    // SIGTERM with no successor: Agent::stop checks programs, pins and addresses.
    let agent = Agent::start(&topo, &config);
    let mut lo = topo.node_addresses_on_lo();
    lo.sort();
    assert_eq!(lo, [addr::NODE_ADDRESS_V4, addr::NODE_ADDRESS_V6], "the node addresses while the agent runs");
    warm_up(&pod);
    agent.stop();
    assert!(UNREACHABLE.contains(&errno(&pod.probe(ECHO, 0))), "a pod's connect is no longer redirected");

    // kill -9 leaves everything; `switchyard uninstall` removes it all.
    let mut agent = Agent::start(&topo, &config);
    warm_up(&pod);
    agent.kill();
    let mut lo = topo.node_addresses_on_lo();
    lo.sort();
    assert_eq!(lo, [addr::NODE_ADDRESS_V4, addr::NODE_ADDRESS_V6], "a killed agent cannot remove them");
    assert_eq!(pod.probe(ECHO, 1000).ok().get("peer"), Some(ECHO), "the kernel serves the pod meanwhile");
    let (ok, out) = topo.uninstall();
    assert!(ok, "uninstall: {out}");
    assert!(topo.attached_programs().is_empty(), "programs left after uninstall: {out}");
    assert!(!topo.pin_dir().exists(), "{} left after uninstall", topo.pin_dir().display());
    let lo = topo.node_addresses_on_lo();
    assert!(lo.is_empty(), "node addresses left on the node's lo after uninstall: {lo:?}\n{out}");
    assert!(UNREACHABLE.contains(&errno(&pod.probe(ECHO, 0))), "a pod's connect is no longer redirected");
}

/// The harness itself, no agent: a pod reaches the backend hosts through the node (the
/// path the in-kernel fallback takes), v4 and v6; service addresses lead nowhere; its
/// clients run in its container cgroup; `block_node_address` drops exactly the node
/// addresses; and dropping the pod removes it.
#[test]
fn harness_a_pod_reaches_backend_hosts_through_the_node_and_nothing_else() {
    let Some((topo, _servers)) = node("harness_a_pod_reaches_backend_hosts_through_the_node_and_nothing_else") else {
        return;
    };
    require_tools(&["nft", "cat"]);
    let pod = topo.pod("h");
    for target in ["10.10.0.2:7000", "10.10.0.3:7000", "[fd10::2]:7000", "[fd10::3]:7000", OTHER_ENDPOINT] {
        let run = pod.probe(target, 10_000).ok();
        assert_eq!(run.get("hello"), Some(target), "{}", run.stdout);
        assert_eq!(run.get("peer"), Some(target), "{}", run.stdout);
    }
    for target in [ECHO, ECHO6, "[::ffff:10.96.0.10]:7000"] {
        let run = pod.probe(target, 0);
        assert!(UNREACHABLE.contains(&errno(&run)), "{target} went somewhere: {}", run.stdout);
    }
    let out = pod.client(Command::new("cat").arg("/proc/self/cgroup"));
    // The cgroup v2 line (a hybrid host lists v1 hierarchies too).
    let cgroups = String::from_utf8_lossy(&out.stdout).into_owned();
    let v2 = cgroups.lines().find_map(|l| l.strip_prefix("0::"));
    assert_eq!(v2, Some(pod.container_cgroup().as_str()), "{cgroups}");
    let parts: Vec<String> =
        pod.container.path.iter().rev().take(4).map(|p| p.to_string_lossy().into_owned()).collect();
    assert!(parts[0].len() == 64 && parts[0].chars().all(|c| c.is_ascii_hexdigit()), "container id: {parts:?}");
    assert!(parts[1].starts_with("pod") && parts[1].len() == 3 + 36, "pod uid: {parts:?}");
    assert_eq!(&parts[2..], ["burstable", "kubepods"]);
    assert_ne!(pod.netns_cookie(), topo.node_netns_cookie());

    // A listener on the node addresses (put on lo by hand, as the agent does).
    for a in ["169.254.83.89/32", "fd00:5359::1/128"] {
        switchyard_tests::sh(Command::new("ip").args(["-n", &topo.node.name, "addr", "add", a, "dev", "lo"]));
    }
    let (v4, v6) = ("169.254.83.89:15001", "[fd00:5359::1]:15001");
    let mut serve = Command::new(probe_bin());
    serve.args(["serve", "--listen", v4, "--listen", v6]).stdout(std::process::Stdio::null());
    let _listener = Proc(topo.in_node(&mut serve, false).spawn().expect("spawn listener"));
    eventually(Duration::from_secs(5), "the pod to reach the node addresses", || {
        pod.can_connect(v4) && pod.can_connect(v6)
    });
    pod.block_node_address();
    assert!(!pod.can_connect(v4) && !pod.can_connect(v6), "blocked, yet connected");
    assert!(pod.can_connect("10.10.0.2:7000"), "only the node addresses are blocked");
    pod.unblock_node_address();
    assert!(pod.can_connect(v4) && pod.can_connect(v6), "unblocked, yet not connected");

    let (netns, cgroup) = (format!("/run/netns/{}", pod.netns.name), pod.pod_cgroup.path.clone());
    drop(pod);
    assert!(!std::path::Path::new(&netns).exists(), "{netns} left");
    assert!(!cgroup.exists(), "{} left", cgroup.display());
}

#[test]
fn a_node_without_ipv6_on_lo_still_serves_pods_over_ipv4() {
    let Some((topo, _servers)) = node("a_node_without_ipv6_on_lo_still_serves_pods_over_ipv4") else { return };
    // IPv6 off on the node's lo: no ::1, and no IPv6 address can go there.
    switchyard_tests::sysctl(&topo.node, "net/ipv6/conf/lo/disable_ipv6", "1");
    let agent = Agent::start(&topo, &config(&topo, &[]));
    assert!(agent.log().contains("no IPv6 node address"), "{}", agent.log());
    assert_eq!(topo.node_addresses_on_lo(), [addr::NODE_ADDRESS_V4], "only the IPv4 node address");
    let pod = topo.pod("v4only");
    warm_up(&pod);
    let status = topo.admin_json("/status");
    assert_eq!(status["pods"]["node_address"], json!(["169.254.83.89:15001"]), "{status}");
    let counters = kernel_counters(&agent.stop());
    assert_eq!(counter(&counters, "redirected_pod"), 1, "the pod's connect went through the agent: {counters:?}");
}
