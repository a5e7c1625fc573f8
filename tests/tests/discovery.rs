//! End to end: services and endpoints that change while the agent runs, from a watched
//! catalog file (edited the ways real editors save) and from a real DNS server (dnsmasq)
//! whose records the tests change and whose outage the agent must ride out.

use std::{
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use switchyard_tests::{Agent, Proc, Topology, echo_hosts, eventually, host_v4, require_tools, shares};

// `/status` is read with curl, so the catalog test needs it.

const ENETUNREACH: &str = "101";

fn svc(name: &str, addr: &str, endpoint: &str) -> String {
    format!("  - {{ name: {name}, addresses: [\"{addr}\"], endpoints: [\"{endpoint}\"] }}\n")
}

/// The endpoint one connection to `target` reaches (None if it fails), from the cgroup.
fn reached(topo: &Topology, target: &str) -> Option<String> {
    topo.probe(target, 0).get("hello").map(str::to_owned)
}

/// Save like vim or an atomic writer: write a temporary file, rename it over.
fn save_rename_over(path: &Path, text: &str) {
    let tmp = path.with_extension("swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Save like `>` in a shell or many editors: truncate, then write, in two steps.
fn save_truncate_write(path: &Path, text: &str) {
    let mut f = std::fs::File::create(path).unwrap();
    let (a, b) = text.split_at(text.len() / 2);
    f.write_all(a.as_bytes()).unwrap();
    f.flush().unwrap();
    thread::sleep(Duration::from_millis(10));
    f.write_all(b.as_bytes()).unwrap();
}

#[test]
fn catalog_edits_apply_live_and_broken_edits_keep_the_last_good_catalog() {
    let Some((topo, _servers)) = echo_hosts("catalog_edits_apply_live", 2) else { return };
    require_tools(&["curl"]);
    let (h0, h1) = (host_v4(0) + ":7000", host_v4(1) + ":7000");
    let catalog = topo.dir.path().join("catalog.yaml");
    std::fs::write(&catalog, format!("services:\n{}", svc("a", "10.96.0.10:7000", &h0))).unwrap();
    let config = format!(
        "agent:\n  cgroup: {}\n  catalog: {}\nservices:\n{}",
        topo.cgroup.path.display(),
        catalog.display(),
        svc("static", "10.96.0.1:7000", &h0)
    );
    let agent = Agent::start(&topo, &config);
    assert_eq!(reached(&topo, "10.96.0.10:7000").as_deref(), Some(h0.as_str()));
    assert_eq!(reached(&topo, "10.96.0.11:7000"), None, "not a service yet");

    // A connection held open across the edits must not be cut.
    let held = topo.load("10.96.0.10:7000", &["--conns", "1", "--hold-ms", "3000"], None);
    eventually(Duration::from_secs(5), "the held connection open through the agent", || topo.open_conns("a") == 1);

    // Rename-over save adding a service: how long until a connection uses it?
    let two = format!("services:\n{}{}", svc("a", "10.96.0.10:7000", &h0), svc("b", "10.96.0.11:7000", &h1));
    let t0 = Instant::now();
    save_rename_over(&catalog, &two);
    eventually(Duration::from_secs(1), "the new service to answer", || {
        reached(&topo, "10.96.0.11:7000").as_deref() == Some(h1.as_str())
    });
    eprintln!("catalog change to first connection using it: {:?}", t0.elapsed());

    // Truncate-and-write save moving service a to the other host.
    save_truncate_write(
        &catalog,
        &format!("services:\n{}{}", svc("a", "10.96.0.10:7000", &h1), svc("b", "10.96.0.11:7000", &h1)),
    );
    eventually(Duration::from_secs(2), "service a to move", || {
        reached(&topo, "10.96.0.10:7000").as_deref() == Some(h1.as_str())
    });

    // A broken edit is rejected, naming the field; the last good catalog stays.
    save_rename_over(
        &catalog,
        "services:\n  - { name: b, addresses: [\"10.96.0.11:7000\"], endpoints: [\"10.10.1.2:99999\"] }\n",
    );
    eventually(Duration::from_secs(2), "the rejection", || agent.log().contains("update rejected"));
    let line = agent.log().lines().find(|l| l.contains("update rejected")).unwrap().to_owned();
    assert!(line.contains("source=\"catalog\"") || line.contains("source=catalog"), "{line}");
    assert!(line.contains("services[0].endpoints[0]"), "names the field: {line}");
    // ...and in the agent's status, on the admin API.
    let mut curl = Command::new("curl");
    curl.args(["-sS", "--max-time", "5", "http://127.0.0.1:4191/status"]);
    let status = switchyard_tests::run(topo.in_node(&mut curl, false), Duration::from_secs(10));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status is JSON");
    let error = status["rejected"]["catalog"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("services[0].endpoints[0]"), "status names the rejected catalog: {status}");
    assert_eq!(reached(&topo, "10.96.0.11:7000").as_deref(), Some(h1.as_str()), "still serving b");
    assert_eq!(reached(&topo, "10.96.0.10:7000").as_deref(), Some(h1.as_str()), "still serving a");

    // A clash with the main config is rejected too.
    save_rename_over(&catalog, &format!("services:\n{}", svc("x", "10.96.0.1:7000", &h1)));
    eventually(Duration::from_secs(2), "the clash to be rejected", || {
        agent.log().lines().any(|l| l.contains("would be invalid") && l.contains("already an address of services[0]"))
    });

    // Removing a service removes its kernel entry: not redirected any more.
    save_rename_over(&catalog, &format!("services:\n{}", svc("a", "10.96.0.10:7000", &h1)));
    eventually(Duration::from_secs(2), "service b to be gone", || {
        topo.probe("10.96.0.11:7000", 0).get("connect_errno") == Some(ENETUNREACH)
    });
    assert_eq!(reached(&topo, "10.96.0.1:7000").as_deref(), Some(h0.as_str()), "static services unaffected");

    let held = held.wait();
    assert!(held.len() == 1 && held[0].outcome.as_deref() == Ok(h0.as_str()), "held connection survived: {held:?}");
    agent.stop();
}

/// dnsmasq on 127.0.0.1:5353 in the node namespace, with A records from files in
/// `hosts_dir` (re-read on change) and the given SRV records, TTL 1 s.
fn dnsmasq(topo: &Topology, hosts_dir: &Path, srv: &[&str]) -> Proc {
    let mut cmd = Command::new("dnsmasq");
    cmd.args(["-k", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--listen-address=127.0.0.1"])
        .args(["--bind-interfaces", "--port=5353", "--local-ttl=1", "--user=root", "--log-facility=-"])
        .arg(format!("--hostsdir={}", hosts_dir.display()));
    for s in srv {
        cmd.arg(format!("--srv-host={s}"));
    }
    let child = topo.in_node(&mut cmd, false).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("dnsmasq");
    let proc = Proc(child);
    eventually(Duration::from_secs(10), "dnsmasq to answer on 127.0.0.1:5353", || dns_answers(topo));
    proc
}

/// Whether a DNS server answers (anything, NXDOMAIN included) a query for an A record
/// sent to 127.0.0.1:5353 in the node namespace.
fn dns_answers(topo: &Topology) -> bool {
    switchyard_tests::in_netns(&topo.node, || {
        let Ok(sock) = std::net::UdpSocket::bind("127.0.0.1:0") else { return false };
        let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
        // Header: id 0x5359, recursion desired, one question; then `probe.test` A IN.
        let mut query = vec![0x53, 0x59, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in ["probe", "test"] {
            query.push(label.len() as u8);
            query.extend_from_slice(label.as_bytes());
        }
        query.extend_from_slice(&[0, 0, 1, 0, 1]);
        let mut answer = [0u8; 512];
        sock.send_to(&query, "127.0.0.1:5353").is_ok()
            && sock.recv(&mut answer).is_ok_and(|n| n >= 12 && answer[..2] == [0x53, 0x59])
    })
}

#[test]
fn dns_names_follow_record_changes_and_survive_an_outage() {
    let Some((topo, _servers)) = echo_hosts("dns_names_follow_record_changes", 3) else { return };
    require_tools(&["dnsmasq"]);
    let hosts = topo.dir.path().join("hosts");
    std::fs::create_dir(&hosts).unwrap();
    std::fs::write(
        hosts.join("records"),
        format!("{} echo.svc.test\n{} web1.svc.test\n{} web2.svc.test\n", host_v4(0), host_v4(1), host_v4(2)),
    )
    .unwrap();
    let mut dns = dnsmasq(
        &topo,
        &hosts,
        &["_echo._tcp.svc.test,web1.svc.test,7000,0,1", "_echo._tcp.svc.test,web2.svc.test,7000,0,1"],
    );
    let config = format!(
        "agent:\n  cgroup: {}\n  dns: {{ servers: [\"127.0.0.1:5353\"], min_ttl: 500ms }}\nservices:\n{}  - {{ name: srv, addresses: [\"10.96.0.11:7000\"], endpoints: [{{ srv: _echo._tcp.svc.test }}], balance: round-robin }}\n",
        topo.cgroup.path.display(),
        svc("named", "10.96.0.10:7000", "echo.svc.test:7000"),
    );
    let agent = Agent::start(&topo, &config);
    let (h0, h1, h2) = (host_v4(0) + ":7000", host_v4(1) + ":7000", host_v4(2) + ":7000");
    assert_eq!(reached(&topo, "10.96.0.10:7000").as_deref(), Some(h0.as_str()), "resolved at start-up");
    let srv = topo.load("10.96.0.11:7000", &["--conns", "20"], None).wait();
    let s = shares(&srv);
    let half = |e: &String| s.get(e).is_some_and(|v| (v - 0.5).abs() < 1e-9);
    assert!(half(&h1) && half(&h2), "round robin over both SRV targets: {s:?}");

    // The record changes: within a TTL or two, new connections follow.
    std::fs::write(
        hosts.join("records"),
        format!("{} echo.svc.test\n{} web1.svc.test\n{} web2.svc.test\n", host_v4(1), host_v4(1), host_v4(2)),
    )
    .unwrap();
    eventually(Duration::from_secs(5), "echo.svc.test to move", || {
        reached(&topo, "10.96.0.10:7000").as_deref() == Some(h1.as_str())
    });

    // The name disappears (NXDOMAIN): a bad answer, so the last one stays.
    std::fs::write(hosts.join("records"), format!("{} web1.svc.test\n{} web2.svc.test\n", host_v4(1), host_v4(2)))
        .unwrap();
    eventually(Duration::from_secs(5), "the failed lookup to be logged", || {
        agent.log().lines().any(|l| l.contains("keeping the last answer") && l.contains("echo.svc.test"))
    });
    assert_eq!(reached(&topo, "10.96.0.10:7000").as_deref(), Some(h1.as_str()));

    // The DNS server dies: everything keeps working on the last answers. First see the
    // agent's re-query of the SRV name (good until now) fail: without that, this would
    // only show that nothing was asked yet.
    let since = agent.log_len();
    dns.kill();
    assert!(!dns_answers(&topo), "dnsmasq is gone");
    eventually(Duration::from_secs(10), "a re-query after the outage to fail", || {
        agent
            .log_since(since)
            .lines()
            .any(|l| l.contains("DNS lookup failed; keeping the last answer") && l.contains("_echo._tcp.svc.test"))
    });
    assert_eq!(reached(&topo, "10.96.0.10:7000").as_deref(), Some(h1.as_str()));
    let srv = topo.load("10.96.0.11:7000", &["--conns", "10"], None).wait();
    assert!(srv.iter().all(|c| c.outcome.is_ok()), "{srv:?}");
    assert_eq!(shares(&srv).len(), 2, "both SRV targets kept: {srv:?}");
    agent.stop();
}
