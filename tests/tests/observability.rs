//! End to end: what operators see. Connections made by real clients appear in `/conns`
//! (and `switchyard conns`) with the right process, service and endpoint, with byte
//! counts that grow while they are open; `/metrics` parses with the Prometheus project's
//! own parser; every closed connection is one JSON log line; the dashboard renders in a
//! real headless Chromium.

use std::{path::Path, process::Command, thread, time::Duration};

use serde_json::Value;
use switchyard_tests::{Agent, Proc, Topology, eventually, host_v4, probe_bin, require_tools};

fn setup(test: &str) -> Option<(Topology, Vec<Proc>)> {
    let setup = switchyard_tests::echo_hosts(test, 2)?;
    require_tools(&["curl", "python3"]);
    Some(setup)
}

fn config(topo: &Topology) -> String {
    format!(
        "agent:\n  cgroup: {}\nservices:\n  - {{ name: echo, addresses: [\"10.96.0.10:7000\"], endpoints: [\"{}:7000\", \"{}:7000\"] }}\n",
        topo.cgroup.path.display(),
        host_v4(0),
        host_v4(1)
    )
}

/// A client that keeps its connection open for a few seconds, moving bytes all along.
fn slow_client(topo: &Topology, chunks: u64) -> Proc {
    topo.spawn_client(Command::new(probe_bin()).args([
        "client",
        "--connect",
        "10.96.0.10:7000",
        "--bytes",
        &(chunks * 65536).to_string(),
        "--chunk-delay-ms",
        "100",
    ]))
}

#[test]
fn live_connections_show_who_where_and_growing_bytes_and_close_as_json_lines() {
    let Some((topo, _servers)) = setup("live_connections_show_who_where_and_growing_bytes") else { return };
    let agent = Agent::start_env(&topo, &config(&topo), &[("SWITCHYARD_LOG_FORMAT", "json")]);
    let mut client = slow_client(&topo, 40);
    let pid = client.0.id();

    let conn_of = |body: &str| -> Option<Value> {
        let all: Value = serde_json::from_str(body).expect("/conns is JSON");
        all.as_array()?.iter().find(|c| c["client"]["pid"] == pid).cloned()
    };
    eventually(Duration::from_secs(5), "the client's connection in /conns", || {
        conn_of(&topo.admin_get("/conns")).is_some_and(|c| c["state"] == "open")
    });
    let first = conn_of(&topo.admin_get("/conns?service=echo")).expect("filter by service keeps it");
    thread::sleep(Duration::from_millis(800));
    let second = conn_of(&topo.admin_get(&format!("/conns?client={pid}"))).expect("filter by client pid keeps it");
    assert_eq!(first["id"], second["id"]);
    assert!(second["bytes_out"].as_u64() > first["bytes_out"].as_u64(), "bytes grow while open: {first} -> {second}");
    assert!(second["bytes_in"].as_u64() > Some(0));
    assert_eq!(second["client"]["comm"], "sy-probe");
    assert_eq!(second["client"]["original_dst"], "10.96.0.10:7000");
    let cgroup_name = topo.cgroup.path.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(second["client"]["cgroup"], format!("/{cgroup_name}"), "cgroup path, not only the id");
    assert_eq!(second["service"], "echo");
    let endpoint = second["route"]["endpoint"].as_str().unwrap().to_owned();
    assert!(endpoint == host_v4(0) + ":7000" || endpoint == host_v4(1) + ":7000", "{endpoint}");
    let none: Value = serde_json::from_str(&topo.admin_get("/conns?service=other")).unwrap();
    assert_eq!(none, Value::Array(vec![]), "filters exclude");

    // The CLI shows the same, as tables.
    let bin = switchyard_tests::switchyard_bin();
    let conns = topo.node_output(Command::new(&bin).args(["conns", "--service", "echo"]));
    assert!(
        conns.starts_with("ID") && conns.contains(&format!("sy-probe/{pid}")) && conns.contains(&endpoint),
        "{conns}"
    );
    let services = topo.node_output(Command::new(&bin).arg("services"));
    assert!(services.contains("echo") && services.contains("2/2") && services.contains("p2c-ewma"), "{services}");
    let top = topo.node_output(Command::new(&bin).args(["top", "--iterations", "2", "--interval-ms", "300"]));
    assert!(top.contains("RATE") && top.contains(&format!("sy-probe/{pid}")), "{top}");

    // When it closes: gone from /conns, and one JSON log line with its story.
    let status = switchyard_tests::wait_bounded(&mut client.0, Duration::from_secs(30)).expect("client finishes");
    assert!(status.success());
    eventually(Duration::from_secs(5), "the connection to leave /conns", || {
        conn_of(&topo.admin_get("/conns")).is_none()
    });
    let log = agent.stop();
    let closed: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "switchyard::conn" && v["client.pid"] == pid)
        .collect();
    assert_eq!(closed.len(), 1, "one close line per connection:\n{log}");
    let c = &closed[0];
    assert_eq!(c["message"], "connection closed");
    assert_eq!(c["outcome"], "closed");
    assert_eq!(c["service"], "echo");
    assert_eq!(c["endpoint"], endpoint.as_str());
    assert_eq!(c["bytes.out"], 40 * 65536);
    // In: the echo plus the server's greeting line.
    assert_eq!(c["bytes.in"], 40 * 65536 + format!("HELLO {endpoint}\n").len());
}

#[test]
fn metrics_parse_with_the_prometheus_parser_and_admin_endpoints_answer() {
    let Some((topo, _servers)) = setup("metrics_parse_with_the_prometheus_parser") else { return };
    let agent = Agent::start(&topo, &config(&topo));
    let conns = topo.load("10.96.0.10:7000", &["--conns", "20", "--concurrency", "2"], None).wait();
    assert!(conns.iter().all(|c| c.outcome.is_ok()));
    let text = topo.admin_get("/metrics");
    // The Prometheus project's Python client parses the exposition; a parse error fails.
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.setdefault(s.name, []).append({"labels": s.labels, "value": s.value, "type": fam.type})
print(json.dumps(out))
"#;
    let path = topo.dir.path().join("metrics.txt");
    std::fs::write(&path, &text).unwrap();
    let out = Command::new("python3").args(["-c", script]).stdin(std::fs::File::open(&path).unwrap()).output().unwrap();
    assert!(
        out.status.success(),
        "prometheus parser rejected /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let sum = |name: &str| -> f64 {
        parsed[name].as_array().map(|v| v.iter().map(|s| s["value"].as_f64().unwrap()).sum()).unwrap_or(0.0)
    };
    assert_eq!(sum("switchyard_connections_total"), 20.0, "{text}");
    assert_eq!(parsed["switchyard_connections_total"][0]["type"], "counter");
    assert!(sum("switchyard_bytes_total") >= 20.0 * 64.0 * 2.0, "{text}");
    let labels = &parsed["switchyard_connections_total"][0]["labels"];
    assert_eq!(
        labels.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["endpoint", "service"],
        "labels bounded to service and endpoint"
    );
    assert!(sum("switchyard_connect_latency_seconds_count") >= 20.0);
    let redirected = parsed["switchyard_kernel_decisions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["labels"]["decision"] == "redirected")
        .unwrap();
    assert!(redirected["value"].as_f64().unwrap() >= 20.0);

    // The other admin endpoints.
    let services: Value = serde_json::from_str(&topo.admin_get("/services")).unwrap();
    assert_eq!(services[0]["service"], "echo");
    let one: Value = serde_json::from_str(&topo.admin_get("/services/echo")).unwrap();
    assert_eq!(one["endpoints"].as_array().unwrap().len(), 2);
    let cfg: Value = serde_json::from_str(&topo.admin_get("/config")).unwrap();
    assert_eq!(cfg["services"][0]["name"], "echo");
    assert_eq!(topo.admin_get("/ready").trim(), "ready");
    assert_eq!(topo.admin_get("/live").trim(), "live");

    // The log level changes at run time; a bad filter is refused with a reason.
    let put = |body: &str| {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-X", "PUT", "--data", body, "-w", " %{http_code}", "http://127.0.0.1:4191/log-level"]);
        switchyard_tests::run(topo.in_node(&mut cmd, false), Duration::from_secs(10))
    };
    assert!(String::from_utf8_lossy(&put("debug").stdout).ends_with(" 200"));
    assert_eq!(topo.admin_get("/log-level").trim(), "debug");
    let bad = String::from_utf8_lossy(&put("no=such=level").stdout).into_owned();
    assert!(bad.ends_with(" 400") && bad.contains("is not a log filter"), "{bad}");
    agent.stop();
}

#[test]
fn the_dashboard_renders_services_and_live_connections_in_headless_chromium() {
    let Some((topo, _servers)) = setup("the_dashboard_renders_services_and_live_connections") else { return };
    require_tools(&["node", "chromium"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboard/check.mjs");
    assert!(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboard/node_modules/playwright-core").is_dir(),
        "playwright-core is not installed in tests/dashboard: `cargo xtask bootstrap` installs it"
    );
    let agent = Agent::start(&topo, &config(&topo));
    // Open for 15 s: the page must still list it after Chromium's start (seconds when
    // other tests run alongside) and the 2.5 s the check lets the chart fill.
    let _client = slow_client(&topo, 150);
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard.png");
    let mut cmd = Command::new("node");
    cmd.arg(&script).arg("http://127.0.0.1:4191/").arg("echo").arg(&shot).env("HOME", topo.dir.path());
    // The browser runs in the node namespace, where the admin API listens.
    let out = switchyard_tests::run(topo.in_node(&mut cmd, false), Duration::from_secs(60));
    assert!(
        out.status.success(),
        "dashboard check failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).expect("check.mjs prints JSON");
    assert_eq!(result["errors"], Value::Array(vec![]), "no script errors on the page");
    assert!(result["services"].as_str().unwrap().contains(&(host_v4(0) + ":7000")), "{result}");
    assert!(result["conns"].as_u64().unwrap() >= 1, "{result}");
    assert!(result["charts"].as_u64().unwrap() >= 1, "{result}");
    assert!(
        std::fs::metadata(&shot).map(|m| m.len() > 10_000).unwrap_or(false),
        "screenshot written to {}",
        shot.display()
    );
    agent.stop();
}
