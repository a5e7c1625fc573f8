//! End to end: what operators see. Connections made by real clients appear in `/conns`
//! (and `switchyard conns`) with the right process, service and endpoint, with byte
//! counts that grow while they are open; `/metrics` parses with the Prometheus project's
//! own parser; every closed connection is one JSON log line; the dashboard, in a real
//! headless Chromium, shows the service map, golden signals, a live tap and connections
//! of real traffic.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::{Value, json};
use switchyard_tests::{Agent, Proc, Topology, backends_py, eventually, host_v4, probe_bin, require_tools};

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
    // The client sends 64 KiB every 100 ms: the counts must grow while it is open.
    let second = switchyard_tests::eventually_some(Duration::from_secs(3), "bytes to grow while open", || {
        let second = conn_of(&topo.admin_get(&format!("/conns?client={pid}"))).expect("filter by client pid keeps it");
        (second["bytes_out"].as_u64() > first["bytes_out"].as_u64()).then_some(second)
    });
    assert_eq!(first["id"], second["id"]);
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
    // Each load connection sends 64 bytes and gets the greeting (`HELLO 10.10.i.2:7000\n`,
    // 21 bytes) and its 64 back: exact, per direction.
    let bytes = |direction: &str| -> f64 {
        parsed["switchyard_bytes_total"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["labels"]["direction"] == direction)
            .map(|s| s["value"].as_f64().unwrap())
            .sum()
    };
    assert_eq!(bytes("out"), 20.0 * 64.0, "bytes to the endpoints: {text}");
    assert_eq!(bytes("in"), 20.0 * (64.0 + 21.0), "bytes from the endpoints: {text}");
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

/// The dashboard's test adds an HTTP service to the echo one: the golden backend (GET
/// /ok 200, /fail 500, /slow 200 after 200 ms) on two hosts, balanced round-robin per
/// request.
fn dashboard_config(topo: &Topology) -> String {
    format!(
        "{}  - {{ name: golden, addresses: [\"10.96.0.20:80\"], endpoints: [\"{}:8080\", \"{}:8080\"], protocol: http1, balance: round-robin }}\n",
        config(topo),
        host_v4(0),
        host_v4(1)
    )
}

/// GETs of `paths` on the golden service, on one connection (curl reuses it), from the
/// test cgroup; the bodies, one line each (`200 /ok`).
fn golden_gets(topo: &Topology, paths: &[&str]) -> String {
    let out = topo.client(
        Command::new("curl")
            .args(["-sS", "--max-time", "30"])
            .args(paths.iter().map(|p| format!("http://10.96.0.20{p}"))),
    );
    assert!(out.status.success(), "curl {paths:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The dashboard's external references: anything with a scheme (`http://`, `ws://`,
/// `//host` in a `src` or `href`) but the SVG namespace, which is a name, not a fetch.
fn external_references(html: &str) -> Vec<String> {
    let schemes =
        html.match_indices("://").map(|(i, _)| i).filter(|&i| !html[i..].starts_with("://www.w3.org/2000/svg"));
    let relative = ["src=\"//", "href=\"//", "src='//", "href='//", "url(//"]
        .iter()
        .flat_map(|p| html.match_indices(p).map(|(i, _)| i))
        .collect::<Vec<_>>();
    schemes.chain(relative).map(|i| html[i.saturating_sub(30)..(i + 40).min(html.len())].to_owned()).collect()
}

#[test]
fn the_dashboard_maps_services_shows_golden_signals_taps_requests_and_names_workloads_in_headless_chromium() {
    let Some((topo, _servers)) = setup("the_dashboard_maps_services_shows_golden_signals_taps_requests") else {
        return;
    };
    require_tools(&["node", "chromium"]);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(
        dir.join("dashboard/node_modules/playwright-core").is_dir(),
        "playwright-core is not installed in tests/dashboard: `cargo xtask bootstrap` installs it"
    );
    // Air-gapped nodes: the page references nothing outside itself (check.mjs also sees
    // every request the page makes go to the agent).
    let html = std::fs::read_to_string(dir.join("../agent/src/dashboard.html")).expect("dashboard.html");
    assert_eq!(external_references(&html), Vec::<String>::new(), "the dashboard must not reference other sites");

    let _golden: Vec<Proc> = (0..2)
        .map(|i| {
            let target = format!("{}:8080", host_v4(i));
            topo.host_server(i, backends_py().args(["golden", "--listen", &target]), &target)
        })
        .collect();
    let agent = Agent::start(&topo, &dashboard_config(&topo));
    let cgroup_name = topo.cgroup.path.file_name().unwrap().to_string_lossy().into_owned();
    let workload = format!("cgroup//{cgroup_name}");
    // Opaque TCP, open for up to 2 minutes (ended with the test): the page must still
    // list it after Chromium's start and the waits below (tens of seconds when other
    // tests run alongside).
    let _client = slow_client(&topo, 1200);
    // Known HTTP traffic: 25 requests, 20 of them successful.
    let answers = golden_gets(&topo, &[["/ok"; 20].as_slice(), &["/fail"; 5]].concat());
    assert_eq!(answers.lines().filter(|l| *l == "200 /ok").count(), 20, "{answers}");
    assert_eq!(answers.lines().filter(|l| *l == "500 /fail").count(), 5, "{answers}");

    let shot = dir.join("../target/dashboard.png");
    let stderr_path = topo.dir.path().join("check.stderr");
    let mut cmd = Command::new("node");
    cmd.arg(dir.join("dashboard/check.mjs"))
        .arg("http://127.0.0.1:4191/")
        .arg(&shot)
        .args(["echo", "golden", &workload, "25", "3"])
        .env("HOME", topo.dir.path());
    // The browser runs in the node namespace, where the admin API listens.
    let mut check = Proc(
        topo.in_node(&mut cmd, false)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("spawn node check.mjs"),
    );
    let (tx, lines) = mpsc::channel();
    let stdout = BufReader::new(check.0.stdout.take().unwrap());
    std::thread::spawn(move || stdout.lines().map_while(Result::ok).try_for_each(|l| tx.send(l)));
    let failed = |what: &str| -> String {
        format!("dashboard check: {what}; its stderr:\n{}", std::fs::read_to_string(&stderr_path).unwrap_or_default())
    };
    let started = lines.recv_timeout(Duration::from_secs(90)).unwrap_or_else(|_| panic!("{}", failed("no output")));
    assert_eq!(started, "tap-started", "{}", failed("the tap did not start"));
    // Tapped: three more requests, once the tap listens.
    assert_eq!(golden_gets(&topo, &["/slow", "/ok", "/fail"]), "200 /slow\n200 /ok\n500 /fail\n");
    let line = lines.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("{}", failed("no result")));
    let status = switchyard_tests::wait_bounded(&mut check.0, Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{}", failed("it failed"));
    let r: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("check.mjs prints JSON ({e}): {line}"));

    assert_eq!(r["errors"], json!([]), "no script or console errors on the page");
    assert_eq!(r["offsite"], json!([]), "every request the page makes goes to the agent");

    // Golden signals, exact: 25 requests on one connection, 80% successful.
    let golden = &r["signals"]["golden"];
    assert_eq!(golden["requests"], 25, "{golden}");
    assert_eq!(golden["success"], 0.8, "{golden}");
    assert_eq!(golden["health"], "bad", "80% is failing: {golden}");
    assert_eq!(golden["connections"], 1, "{golden}");
    assert_eq!(golden["open"], 0, "{golden}");
    for column in ["rps", "p50", "p95", "p99", "bytes"] {
        assert!(golden[column].as_f64().is_some_and(|v| v > 0.0), "{column}: {golden}");
    }
    assert!(golden["text"].as_str().unwrap().contains("80.00%"), "{golden}");
    let echo = &r["signals"]["echo"];
    assert_eq!(echo["requests"], 0, "opaque TCP has no requests: {echo}");
    assert_eq!((&echo["success"], &echo["p50"]), (&Value::Null, &Value::Null), "{echo}");
    assert_eq!(echo["open"], 1, "the slow client: {echo}");
    assert_eq!(r["workloads"][&workload]["requests"], 25, "{}", r["workloads"]);
    assert_eq!(r["workloads"][&workload]["success"], 0.8, "{}", r["workloads"]);

    // The service map: the client workload -> both services -> their endpoints.
    let edge = |kind: &str, from: &str, to: &str| -> Value {
        let edges = r["edges"].as_array().unwrap();
        edges
            .iter()
            .find(|e| e["kind"] == kind && e["from"] == from && e["to"] == to)
            .unwrap_or_else(|| panic!("no {kind} edge {from} -> {to}: {}", r["edges"]))
            .clone()
    };
    let to_golden = edge("route", &workload, "golden");
    assert_eq!((&to_golden["requests"], &to_golden["success"]), (&json!(25), &json!(0.8)), "{to_golden}");
    assert!(to_golden["rps"].as_f64().is_some_and(|v| v > 0.0), "{to_golden}");
    assert!(to_golden["class"].as_str().unwrap().contains("bad"), "drawn as failing: {to_golden}");
    assert!(to_golden["label"].as_str().unwrap().ends_with("rps · 80.00%"), "{to_golden}");
    // Round-robin per request: the 20 /ok alternate, and all 25 are counted once. (The
    // /fail ones may get an endpoint ejected for a while: no exact split.)
    let per_endpoint: Vec<u64> = (0..2)
        .map(|i| edge("endpoint", "golden", &format!("{}:8080", host_v4(i)))["requests"].as_u64().unwrap())
        .collect();
    assert_eq!(per_endpoint.iter().sum::<u64>(), 25, "{per_endpoint:?}");
    assert!(per_endpoint.iter().all(|n| *n >= 10), "round-robin: {per_endpoint:?}");
    let to_echo = edge("route", &workload, "echo");
    assert_eq!((&to_echo["success"], &to_echo["open"]), (&Value::Null, &json!(1)), "{to_echo}");
    assert!(to_echo["cps"].as_f64().is_some_and(|v| v > 0.0), "opaque: a connection rate: {to_echo}");
    assert!(to_echo["label"].as_str().unwrap().contains("conn/s · 1 open"), "{to_echo}");
    // Opaque TCP on the endpoint side too: the one endpoint the slow client went to.
    let echo_endpoints: Vec<&Value> =
        r["edges"].as_array().unwrap().iter().filter(|e| e["kind"] == "endpoint" && e["from"] == "echo").collect();
    assert_eq!(echo_endpoints.len(), 1, "the slow client's one endpoint: {}", r["edges"]);
    let e = echo_endpoints[0];
    assert!([host_v4(0) + ":7000", host_v4(1) + ":7000"].contains(&e["to"].as_str().unwrap().to_owned()), "{e}");
    assert_eq!((&e["open"], &e["success"]), (&json!(1), &Value::Null), "{e}");
    assert!(
        e["cps"].as_f64().is_some_and(|v| v > 0.0) && e["label"].as_str().unwrap().ends_with("conn/s · 1 open"),
        "{e}"
    );
    for (kind, name) in [("workload", workload.as_str()), ("service", "golden"), ("service", "echo")] {
        assert!(
            r["nodes"].as_array().unwrap().iter().any(|n| n["kind"] == kind && n["name"] == name),
            "a {kind} node {name}: {}",
            r["nodes"]
        );
    }

    // Connections name the workload, not only pid and command.
    let conns = r["conns"].as_array().unwrap();
    assert!(
        conns.iter().any(|c| c["service"] == "echo"
            && c["workload"] == workload
            && c["client"].as_str().unwrap().starts_with(&workload)),
        "{}",
        r["conns"]
    );

    // The tap, filtered to golden: exactly the three requests, newest first, with path,
    // status, client and endpoint.
    let tapped: Vec<(String, u64)> = r["tap"]
        .as_array()
        .unwrap()
        .iter()
        .inspect(|t| {
            assert_eq!(
                (&t["kind"], &t["service"], &t["workload"]),
                (&json!("request"), &json!("golden"), &json!(workload))
            );
            assert!(t["endpoint"].as_str().unwrap().ends_with(":8080"), "{t}");
        })
        .map(|t| (t["path"].as_str().unwrap().to_owned(), t["status"].as_u64().unwrap()))
        .collect();
    assert_eq!(tapped, [("/fail".into(), 500), ("/ok".into(), 200), ("/slow".into(), 200)], "{}", r["tap"]);
    assert_eq!(r["stopped"], json!({"button": "stopped", "aborted": true}), "stopping aborts the stream");
    assert!(
        r["failed"].as_array().unwrap().iter().all(|f| f["url"].as_str().unwrap().starts_with("/tap?")),
        "only the stopped tap's request fails: {}",
        r["failed"]
    );

    // Charts: one card per service, each with a latency and a traffic canvas; golden's
    // latency chart has drawn both lines.
    assert_eq!(r["chart"]["canvases"], 4, "{}", r["chart"]);
    assert!(r["chart"]["p50"].as_u64() > Some(0) && r["chart"]["p99"].as_u64() > Some(0), "{}", r["chart"]);
    assert!(r["services"].as_str().unwrap().contains(&(host_v4(0) + ":7000")), "{}", r["services"]);
    assert!(
        std::fs::metadata(&shot).map(|m| m.len() > 10_000).unwrap_or(false),
        "screenshot written to {}",
        shot.display()
    );
    agent.stop();
}
