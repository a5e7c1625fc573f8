//! Node lifecycle under continuous load: the agent killed (kill -9), restarted, upgraded
//! to a new process by hand-over, and removed, while real clients in the test cgroup keep
//! opening connections to a service address. Each step counts failed new connections and
//! cut established ones (docs/lifecycle.md; the figures are in the README).
//!
//! Every step is bounded: the load runs a fixed time with a connection cap, every wait
//! polls against a deadline, and the topology's guards remove the agents, pins (the
//! topology's own bpffs), cgroup and namespaces however the test ends.

use std::{process::Command, time::Duration};

use nix::sys::signal::Signal;
use switchyard_tests::{
    Agent, Conn, Event, KernelObjects, Topology, echo_hosts, epoch_ms, eventually, figures, host_v4, kernel_counters,
    probe_bin, require_tools,
};

/// One service, one endpoint on each of two backend hosts, active TCP checks so an
/// endpoint that dies leaves the kernel table quickly.
fn config(topo: &Topology) -> String {
    format!(
        r#"
agent:
  cgroup: {cg}
  drain_timeout_secs: 5
services:
  - name: echo
    addresses: ["10.96.0.10:7000"]
    endpoints: ["{a}:7000", "{b}:7000"]
    health_check: {{ kind: tcp, interval: 200ms, timeout: 500ms, rise: 1, fall: 1 }}
"#,
        cg = topo.cgroup.path.display(),
        a = host_v4(0),
        b = host_v4(1),
    )
}

/// Clients of [`load`], each one connection at a time.
const CLIENTS: usize = 4;

/// Continuous load: 4 clients, each connection greets, echoes, holds 300 ms and echoes
/// again (so one cut while held fails), for at most `secs` seconds and 3,000 connections (after removal, connects fail at once).
fn load(topo: &Topology, secs: u64) -> switchyard_tests::Load {
    let duration = (secs * 1000).to_string();
    let concurrency = CLIENTS.to_string();
    let args =
        ["--conns", "3000", "--concurrency", &concurrency, "--hold-ms", "300", "--duration-ms", duration.as_str()];
    topo.load("10.96.0.10:7000", &args, None)
}

fn now() -> u128 {
    epoch_ms()
}

/// Let the load run on for `ms` between events (the load itself is what we wait for).
fn run_load_for(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// Wait until each client is in the middle of a connection through the agent: exactly
/// [`CLIENTS`] open, each begun at least a few ms ago and with most of its 300 ms hold
/// still ahead. A kill -9 at such a moment cuts all of them, and no client ends one or
/// begins the next while the dying agent's listener still takes connects (those would be
/// the dying process's, not the kernel's fallback's). The clients start together and
/// keep in step, so such a moment comes within a cycle or two.
fn wait_for_clients_mid_connection(topo: &Topology) {
    eventually(Duration::from_secs(10), "every client mid-connection through the agent", || {
        let started = topo.open_conns_started("echo");
        let now = now();
        started.len() == CLIENTS && started.iter().all(|s| (5..=150).contains(&now.saturating_sub(*s)))
    });
}

#[test]
fn kill_restart_upgrade_and_remove_under_load() {
    let Some((topo, _servers)) = echo_hosts("kill_restart_upgrade_and_remove_under_load", 2) else { return };
    require_tools(&["bpftool"]);
    let mut first = Agent::start(&topo, &config(&topo));
    let objects = KernelObjects::attached_to(&topo.cgroup.path);
    assert_eq!(objects.progs.len(), 5, "five programs attached: {objects:?}");
    assert!(objects.maps.len() >= 6 && objects.links.len() == 5, "{objects:?}");

    // Long enough for every step; after removal each connect fails at once and the
    // connection cap ends the run.
    let load = load(&topo, 40);
    let started = now();
    run_load_for(1500);

    // 1. kill -9: the listener goes with the process; the kernel sends new connects
    //    straight to an endpoint.
    wait_for_clients_mid_connection(&topo);
    let kill = Event { name: "kill -9", begin: now(), done: 0 };
    first.kill();
    let kill = Event { done: now(), ..kill };
    assert_eq!(topo.attached_programs().len(), 5, "pinned programs stay attached after kill -9");
    run_load_for(2000);

    // 2. Restart: a new agent reuses the pins and swaps its programs into the links.
    let restart_begin = now();
    let second = Agent::start(&topo, &config(&topo));
    let restart = Event { name: "restart", begin: restart_begin, done: now() };
    assert!(second.log().contains("replaced_in_place=5"), "{}", second.log());
    run_load_for(2000);

    // 3. Upgrade: a third agent takes the listeners from the second, which drains and
    //    exits by itself. Besides the load, one connection streams for 3 s across it.
    let mut long = topo.spawn_client(Command::new(probe_bin()).args([
        "client",
        "--connect",
        "10.96.0.10:7000",
        "--bytes",
        &(30 * 65536).to_string(),
        "--chunk-delay-ms",
        "100",
    ]));
    run_load_for(300);
    let upgrade_begin = now();
    let third = Agent::start(&topo, &config(&topo));
    let upgrade = Event { name: "upgrade (hand-over)", begin: upgrade_begin, done: now() };
    let (status, old_log) = second.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "the old agent exits cleanly after the hand-over: {status}\n{old_log}");
    assert!(old_log.contains("handed over to a new agent"), "{old_log}");
    assert!(third.log().contains("took over the running agent's listeners"), "{}", third.log());
    assert_eq!(topo.attached_programs().len(), 5, "still exactly one set of programs");
    assert!(topo.pin_dir().exists(), "the old agent left the pins to its successor");
    let status = switchyard_tests::wait_bounded(&mut long.0, Duration::from_secs(20)).expect("long client ends");
    assert!(status.success(), "a connection streaming through the old agent survived the upgrade");
    run_load_for(1000);

    // 4. Removal: SIGTERM with no successor uninstalls (detach, unpin), then drains.
    let remove_begin = now();
    let log = third.stop();
    let remove = Event { name: "remove (SIGTERM)", begin: remove_begin, done: now() };
    let conns = load.wait();
    let ended = now();

    let counters = kernel_counters(&log);
    // Figures, per event.
    let events = [(kill, restart.begin), (restart, upgrade.begin), (upgrade, remove.begin), (remove, ended)];
    let steady: Vec<&Conn> = conns.iter().filter(|c| c.end_ms < kill.begin).collect();
    let steady_failed: Vec<&&Conn> = steady.iter().filter(|c| c.outcome.is_err()).collect();
    println!("lifecycle under load: {} connections in {} ms", conns.len(), ended - started);
    println!("  steady state: {} connections, {} failed", steady.len(), steady_failed.len());
    let mut all = Vec::new();
    for (event, until) in events {
        let f = figures(&conns, event, until);
        println!(
            "  {:<20} took {:>4} ms; open at the start {:>2}, cut {:>2}; begun during {:>3}, failed {:>3}; begun after {:>4}, failed {:>4}",
            event.name,
            event.done - event.begin,
            f.in_flight,
            f.cut.len(),
            f.during,
            f.failed_during.len(),
            f.new,
            f.failed_new.len()
        );
        all.push((event, f));
    }
    println!("  kernel counters at removal: {counters:?}");
    assert!(!steady.is_empty() && steady_failed.is_empty(), "steady state: {steady_failed:?}");
    let [(_, killed), (_, restarted), (_, upgraded), (_, removed)] = all.try_into().unwrap();
    // The README's table, as assertions. Counts: each of the 4 clients is inside a
    // connection at any instant (the gap between two of its connections is microseconds,
    // the clock milliseconds), so exactly 4 are open when a step begins.
    for (name, f) in [("kill -9", &killed), ("restart", &restarted), ("upgrade", &upgraded), ("remove", &removed)] {
        assert_eq!(f.in_flight, CLIENTS, "{name}: one connection open per client when it began: {f:?}");
    }
    // kill -9 cuts exactly what the dead agent was proxying (all 4); nothing begun during
    // or after it may fail: the kernel sends those connects straight to an endpoint.
    assert_eq!(killed.cut.len(), killed.in_flight, "kill -9 cuts the dead agent's connections: {killed:?}");
    assert!(killed.failed_during.is_empty(), "connections begun during kill -9 failed: {:?}", killed.failed_during);
    assert!(killed.failed_new.is_empty(), "new connections failed after kill -9: {:?}", killed.failed_new);
    for (name, f) in [("restart", &restarted), ("upgrade", &upgraded)] {
        assert!(f.cut.is_empty() && f.failed_during.is_empty() && f.failed_new.is_empty(), "{name}: {f:?}");
    }
    // Begun after each step: every client keeps going at its pace (a connection holds
    // 300 ms; allow it 600 ms in all), so a fallback or a new agent that stalls connects
    // shows as too few.
    for ((event, until), (name, f)) in
        events.iter().zip([("kill -9", &killed), ("restart", &restarted), ("upgrade", &upgraded)])
    {
        let at_least = CLIENTS * ((until - event.done) / 600) as usize;
        assert!(f.new >= at_least, "{name}: {} connections begun after it, at least {at_least}: {f:?}", f.new);
    }
    // Durations. A restart or hand-over stuck on a timeout (the hand-over's socket reads
    // wait 10 s) would take seconds; the README's run took ~120 ms, a loaded CI machine
    // a few times that. (kill -9's own time is the kernel's, not the agent's.)
    for event in [restart, upgrade] {
        let took = event.done - event.begin;
        assert!(took < 2000, "{}: took {took} ms (README: ~120 ms)", event.name);
    }
    // Removal drains: it ends only after the connections open when it began have ended
    // (not at once, cutting them; `cut` is empty below), and long before the 5 s drain
    // timeout (a drain that waited for the timeout rather than for the connections).
    let last_open_end = conns.iter().filter(|c| c.start_ms < remove.begin).map(|c| c.end_ms).max().unwrap();
    assert!(
        remove.done >= last_open_end,
        "removal returned at {} before its open connections ended at {last_open_end}",
        remove.done
    );
    let took = remove.done - remove.begin;
    assert!(took < 2000, "removal took {took} ms: the drain waited for its 5 s timeout, not for the connections");
    // Removal drains what is open; what starts afterwards is no longer redirected, and in
    // this namespace a service address without the redirect is unreachable.
    assert!(removed.cut.is_empty(), "removal cut open connections: {:?}", removed.cut);
    let unreachable = |c: &Conn| c.outcome.as_ref().is_err_and(|e| e.contains("unreachable"));
    assert!(
        removed.failed_during.iter().chain(&removed.failed_new).all(unreachable),
        "after removal connects go to the service address itself: {removed:?}"
    );
    // The pinned counters survived the kill and the restarts: the connects the kernel
    // served while no agent ran are still counted.
    assert!(counters["fallback"] as usize >= killed.new, "{counters:?} vs {killed:?}");

    // Nothing of ours is left: not attached, not pinned, not loaded.
    assert!(topo.attached_programs().is_empty());
    assert!(!topo.pin_dir().exists(), "{} still exists", topo.pin_dir().display());
    eventually(Duration::from_secs(10), "our programs, maps and links to be freed", || {
        objects.still_loaded().is_empty()
    });
    // And the command is idempotent: a second removal finds nothing to do.
    let (ok, out) = topo.uninstall();
    assert!(ok && out.contains("nothing of switchyard's is pinned"), "{out}");
}

#[test]
fn while_no_agent_runs_the_kernel_sends_connects_to_healthy_endpoints_only() {
    let Some((topo, mut servers)) =
        echo_hosts("while_no_agent_runs_the_kernel_sends_connects_to_healthy_endpoints_only", 2)
    else {
        return;
    };
    let mut agent = Agent::start(&topo, &config(&topo));
    // Host 1's endpoint dies; the agent's checks take it out and the kernel's fallback set
    // follows.
    let updates = |log: &str| log.matches("kernel endpoint tables updated").count();
    let before = updates(&agent.log());
    servers[1].kill();
    eventually(Duration::from_secs(5), "the dead endpoint checked out", || agent.log().contains("health checks fail"));
    eventually(Duration::from_secs(5), "the kernel table updated", || updates(&agent.log()) > before);
    agent.kill();

    let conns = load(&topo, 2).wait();
    let ok: Vec<&String> = conns.iter().filter_map(|c| c.outcome.as_ref().ok()).collect();
    println!("fallback with one endpoint dead: {} connections, {} ok", conns.len(), ok.len());
    assert!(!conns.is_empty() && ok.len() == conns.len(), "every connect served: {conns:?}");
    let live = format!("{}:7000", host_v4(0));
    assert!(ok.iter().all(|e| **e == live), "only the healthy endpoint is used: {ok:?}");

    // The next agent finds the counts the kernel kept meanwhile.
    let agent = Agent::start(&topo, &config(&topo));
    let (status, log) = agent.stop_with(Signal::SIGTERM);
    assert!(status.success(), "{log}");
    let counters = kernel_counters(&log);
    assert!(counters["fallback"] as usize >= conns.len(), "{counters:?}");
    assert!(!topo.pin_dir().exists());
}

#[test]
fn a_start_that_fails_leaves_the_running_agent_serving() {
    let Some((topo, _servers)) = echo_hosts("a_start_that_fails_leaves_the_running_agent_serving", 2) else { return };
    let first = Agent::start(&topo, &config(&topo));
    // Same node, same hand-over socket, but another listen port: the hand-over is refused
    // before the old agent stops anything.
    let bad = topo.dir.path().join("bad.yaml");
    let text = config(&topo).replacen("agent:\n", "agent:\n  listen_port: 15002\n", 1);
    std::fs::write(&bad, topo.node_config(&text)).unwrap();
    let mut cmd = Command::new(switchyard_tests::switchyard_bin());
    cmd.arg("run").arg("--config").arg(&bad);
    let out = switchyard_tests::run(topo.in_node(&mut cmd, true), Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("agent.listen_port is 15002") && stderr.contains("stop the previous agent first"),
        "{stderr}"
    );
    let conns = load(&topo, 1).wait();
    assert!(!conns.is_empty() && conns.iter().all(|c| c.outcome.is_ok()), "{conns:?}");
    let log = first.stop();
    assert!(log.contains("a hand-over did not complete; still serving"), "{log}");
    assert!(!log.contains("handed over to a new agent"), "{log}");
    assert!(kernel_counters(&log)["fallback"] == 0, "the first agent served everything: {log}");
}

#[test]
fn a_newer_agent_removes_pins_of_map_layouts_it_no_longer_uses() {
    let Some((topo, _servers)) = echo_hosts("a_newer_agent_removes_pins_of_map_layouts_it_no_longer_uses", 1) else {
        return;
    };
    require_tools(&["bpftool"]);
    // What an older agent with another SY_SOCK_ORIG layout would have left pinned.
    std::fs::create_dir_all(topo.pin_dir()).unwrap();
    let stale = topo.pin_dir().join("SY_SOCK_ORIG1");
    let mut create = Command::new("bpftool");
    create.args(["map", "create"]).arg(&stale).args(["type", "hash", "key", "8", "value", "48", "entries", "16"]);
    switchyard_tests::sh(create.args(["name", "SY_SOCK_ORIG1"]));
    assert!(stale.exists());
    let agent = Agent::start(&topo, &config(&topo));
    assert!(agent.log().contains("stale_maps_removed=1"), "{}", agent.log());
    assert!(!stale.exists(), "the pin of the old layout is gone");
    assert!(topo.pin_dir().join("SY_SOCK_ORIG3").exists(), "the current layout is pinned");
    agent.stop();
}

#[test]
fn uninstall_while_the_agent_runs_detaches_everything_and_the_agent_still_stops_cleanly() {
    let Some((topo, _servers)) =
        echo_hosts("uninstall_while_the_agent_runs_detaches_everything_and_the_agent_still_stops_cleanly", 1)
    else {
        return;
    };
    require_tools(&["bpftool"]);
    let agent = Agent::start(&topo, &config(&topo));
    assert!(topo.probe("10.96.0.10:7000", 100).ok().get("hello").is_some());
    let config_file = topo.dir.path().join("switchyard.yaml");
    // In the node namespace: uninstall also takes the node addresses off its `lo`.
    let mut uninstall = Command::new(switchyard_tests::switchyard_bin());
    uninstall.arg("uninstall").arg("--config").arg(&config_file);
    let out = topo.in_node(&mut uninstall, false).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("detached 5 programs"), "{stdout}");
    assert!(topo.attached_programs().is_empty(), "detached although the agent still runs");
    assert!(!topo.pin_dir().exists());
    let after = topo.probe("10.96.0.10:7000", 0);
    assert_eq!(after.get("connect_errno"), Some("101"), "no longer redirected: {}", after.stdout);
    let log = agent.stop();
    assert!(log.contains("uninstalled programs=0 maps=0"), "{log}");
}
