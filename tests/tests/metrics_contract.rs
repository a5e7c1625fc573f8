//! The Grafana dashboard (deploy/grafana/switchyard.json) and the scrape configs
//! (deploy/prometheus/) against what the agent exports. Every query of the dashboard is
//! parsed (promql-parser's syntax tree: the metrics it reads and the labels it filters and
//! groups on); as root, a real agent carries traffic that gives every family the dashboard
//! reads a series, a real Prometheus scrapes it through both scrape configs from another
//! host, and then each metric and label must be in `/metrics` (parsed with the Prometheus
//! project's own parser) or added by the scrape, and each query must return series.
//!
//! Debian's Prometheus has no Kubernetes discovery, so the pod that the Kubernetes API
//! would list for the DaemonSet on this node is given through file discovery, with the
//! same `__meta_kubernetes_pod_*` labels; the relabelling is Prometheus's own.

mod manifests;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use manifests::Manifests;
use serde_json::{Value, json};
use switchyard_tests::{
    Agent, Proc, Topology, backends_py, eventually, eventually_some, host_v4, require_root, require_tools, run,
    server_py,
};

fn deploy_file(path: &str) -> PathBuf {
    manifests::deploy_dir().join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn dashboard() -> Value {
    let path = deploy_file("grafana/switchyard.json");
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn yaml(path: &str) -> Value {
    let path = deploy_file(path);
    serde_yaml_ng::from_str(&read(&path)).unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
}

/// The metrics listener's address in the deployed config (deploy/20-config.yaml).
fn deployed_metrics(m: &Manifests) -> SocketAddr {
    let config = switchyard::config::Config::parse(m.agent_config(), Path::new("deploy ConfigMap config.yaml"))
        .unwrap_or_else(|e| panic!("the ConfigMap's config is refused by the agent: {e}"));
    config.agent.metrics.expect("the deployed config has a metrics listener (agent.metrics)")
}

fn pod_template(m: &Manifests) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
    m.daemon_set.spec.as_ref().and_then(|s| s.template.metadata.as_ref()).expect("DaemonSet pod template metadata")
}

fn annotation<'a>(m: &'a Manifests, key: &str) -> &'a str {
    let annotations = pod_template(m).annotations.as_ref().expect("pod template annotations");
    annotations.get(key).unwrap_or_else(|| panic!("the DaemonSet's pod template has no {key} annotation"))
}

/// One PromQL query of the dashboard.
#[derive(Debug)]
struct Query {
    /// The panel and refId, or the variable, for messages.
    at: String,
    /// As written.
    expr: String,
    /// For a `label_values(selector, label)` variable: the label.
    label: Option<String>,
}

/// Every PromQL query: panels' targets (rows' nested panels too) and the variables'
/// `label_values(...)`.
fn queries(d: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    for v in variables(d) {
        if v["type"] != "query" {
            continue;
        }
        let name = v["name"].as_str().expect("variable name");
        let q = v["query"].get("query").unwrap_or(&v["query"]).as_str().expect("variable query");
        let inner = q.strip_prefix("label_values(").and_then(|r| r.strip_suffix(')'));
        let (selector, label) = inner
            .and_then(|i| i.rsplit_once(','))
            .unwrap_or_else(|| panic!("variable {name}: {q:?} is not label_values(selector, label)"));
        assert_eq!(v["definition"].as_str(), Some(q), "variable {name}: definition and query differ");
        out.push(Query {
            at: format!("variable {name}"),
            expr: selector.trim().to_owned(),
            label: Some(label.trim().to_owned()),
        });
    }
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("panel {:?}: a target without expr", p["title"]));
            out.push(Query { at: format!("panel {} {}", p["title"], t["refId"]), expr: expr.to_owned(), label: None });
        }
    }
    out
}

fn variables(d: &Value) -> &[Value] {
    d["templating"]["list"].as_array().map(Vec::as_slice).unwrap_or_default()
}

/// Panels that show data (rows' nested panels included, rows themselves not).
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().into_iter().flatten() {
        if p["type"] == "row" {
            out.extend(p["panels"].as_array().into_iter().flatten());
        } else {
            out.push(p);
        }
    }
    out
}

/// `expr` as Prometheus gets it from Grafana: `$var`, `${var}` and `${var:format}` of the
/// dashboard's variables replaced by `values` (default `.*`, what All means with the
/// dashboard's `allValue`), and Grafana's interval variables by an interval that holds a
/// few of the test's 1 s scrapes. Panics on a variable the dashboard does not define.
fn substitute(expr: &str, defined: &BTreeSet<String>, values: &BTreeMap<&str, &str>) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, len) = match after.strip_prefix('{') {
            Some(braced) => {
                let end = braced.find('}').unwrap_or_else(|| panic!("unclosed ${{ in {expr}"));
                (braced[..end].split(':').next().unwrap(), end + 2)
            }
            None => {
                let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        let value = match name {
            "__rate_interval" | "__interval" => "20s",
            "__range" => "1h",
            _ => {
                assert!(defined.contains(name), "{expr}: ${name} is not a variable of the dashboard");
                values.get(name).copied().unwrap_or(".*")
            }
        };
        out.push_str(value);
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// A metric a query reads, and the labels it needs that metric's series to have: those it
/// matches on, and those of the `by (...)`, `on (...)` and `group_left (...)` around it.
#[derive(Debug, serde::Deserialize)]
struct Selector {
    metric: String,
    labels: BTreeSet<String>,
}

/// promql-parser (the Rust PromQL parser's Python binding) on every query; panics naming
/// the query that does not parse.
fn selectors(queries: &[Query], promql: &[String]) -> Vec<Vec<Selector>> {
    let input = serde_json::to_vec(promql).unwrap();
    let out = python(SELECTORS_PY, &input);
    let answers: Vec<Value> = serde_json::from_slice(&out).expect("selectors JSON");
    queries
        .iter()
        .zip(promql)
        .zip(answers)
        .map(|((q, p), a)| {
            if let Some(e) = a.get("error") {
                panic!("{}: {p:?} is not PromQL that the dashboard can use: {e}", q.at);
            }
            let mut s: Vec<Selector> = serde_json::from_value(a["selectors"].clone()).unwrap();
            if let Some(label) = &q.label {
                s.iter_mut().for_each(|s| {
                    s.labels.insert(label.clone());
                });
            }
            s
        })
        .collect()
}

/// Walks promql-parser's tree. Functions that make labels up (label_replace, label_join)
/// are refused: what they need could not be checked.
const SELECTORS_PY: &str = r#"
import json, sys
import promql_parser as p

def walk(e, need, out):
    kind = type(e).__name__
    if kind == "VectorSelector":
        if not e.name:
            raise ValueError("a selector without a metric name")
        matchers = list(e.matchers.matchers) + [m for group in e.matchers.or_matchers for m in group]
        out.append({"metric": e.name, "labels": sorted(need | {m.name for m in matchers if m.name != "__name__"})})
    elif kind == "MatrixSelector":
        walk(e.vector_selector, need, out)
    elif kind in ("ParenExpr", "UnaryExpr", "SubqueryExpr"):
        walk(e.expr, need, out)
    elif kind == "AggregateExpr":
        m = e.modifier
        by = set(m.labels) if m is not None and m.type == p.AggModifierType.By else set()
        walk(e.expr, need | by, out)
        if e.param is not None:
            walk(e.param, need, out)
    elif kind == "BinaryExpr":
        m, on = e.modifier, set()
        if m is not None:
            if m.matching is not None and m.matching.type == p.LabelModifierType.Include:
                on |= set(m.matching.labels)
            on |= set(m.group_labels)
        walk(e.lhs, need | on, out)
        walk(e.rhs, need | on, out)
    elif kind == "Call":
        if e.func.name in ("label_replace", "label_join"):
            raise ValueError(e.func.name + " makes labels this check cannot follow")
        for a in e.args:
            walk(a, need, out)
    elif kind not in ("NumberLiteral", "StringLiteral"):
        raise ValueError("unexpected node " + kind)

answers = []
for expr in json.load(sys.stdin):
    try:
        out = []
        walk(p.parse(expr), set(), out)
        answers.append({"selectors": out})
    except Exception as e:
        answers.append({"error": str(e)})
print(json.dumps(answers))
"#;

fn python(script: &str, stdin: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    child.stdin.take().unwrap().write_all(stdin).expect("python3 stdin");
    let out = child.wait_with_output().expect("python3");
    assert!(
        out.status.success(),
        "python3 (`cargo xtask bootstrap` installs its packages): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn the_dashboard_parses_and_reads_only_switchyard_metrics_through_its_variables() {
    require_tools(&["python3"]);
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64() >= Some(36), "schemaVersion {}: Grafana 9 or later", d["schemaVersion"]);
    let vars = variables(&d);
    let datasource = vars.iter().find(|v| v["type"] == "datasource").expect("a data source variable");
    assert_eq!(datasource["query"], "prometheus", "the data source variable lists Prometheus data sources");
    let defined: BTreeSet<String> = vars.iter().map(|v| v["name"].as_str().expect("name").to_owned()).collect();
    let uses_datasource =
        json!({"type": "prometheus", "uid": format!("${{{}}}", datasource["name"].as_str().unwrap())});
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert_eq!(v["datasource"], uses_datasource, "variable {}", v["name"]);
    }

    let mut ids = BTreeSet::new();
    let rows = d["panels"].as_array().expect("panels").iter().filter(|p| p["type"] == "row");
    for p in rows.chain(panels(&d)) {
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "panel id {} twice", p["id"]);
    }
    for p in panels(&d) {
        let title = &p["title"];
        assert_eq!(p["datasource"], uses_datasource, "panel {title} uses the data source variable");
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("panel {title} has no targets"));
        let refs: BTreeSet<&str> = targets.iter().map(|t| t["refId"].as_str().expect("refId")).collect();
        assert_eq!(refs.len(), targets.len(), "panel {title}: refIds are unique");
        for t in targets {
            assert_eq!(t["datasource"], uses_datasource, "panel {title} {}", t["refId"]);
        }
        assert!(p["fieldConfig"]["defaults"].is_object(), "panel {title} has field defaults");
    }

    let qs = queries(&d);
    let promql: Vec<String> = qs.iter().map(|q| substitute(&q.expr, &defined, &BTreeMap::new())).collect();
    let metrics: BTreeSet<String> = selectors(&qs, &promql).into_iter().flatten().map(|s| s.metric).collect();
    assert!(metrics.len() >= 15, "the dashboard reads {metrics:?}");
    for name in &metrics {
        assert!(name.starts_with("switchyard_"), "{name} is not the agent's");
    }
}

#[test]
fn scrape_configs_read_the_pod_annotations_which_point_at_the_deployed_metrics_listener() {
    let m = manifests::load();
    let metrics = deployed_metrics(&m);
    assert_eq!(annotation(&m, "prometheus.io/scrape"), "true");
    assert_eq!(
        annotation(&m, "prometheus.io/port"),
        metrics.port().to_string(),
        "the port of agent.metrics ({metrics})"
    );
    assert!(metrics.ip().is_unspecified(), "agent.metrics {metrics} is reachable from Prometheus, off the node");
    assert_eq!(annotation(&m, "prometheus.io/path"), "/metrics", "the metrics listener serves /metrics");
    let namespace = m.daemon_set.metadata.namespace.clone().expect("DaemonSet namespace");
    let labels = pod_template(&m).labels.clone().expect("pod labels");

    let prom = yaml("prometheus/prometheus.yml");
    let jobs = prom["scrape_configs"].as_array().expect("prometheus.yml has scrape_configs");
    assert_eq!(jobs.len(), 1, "one job");
    let sd = &jobs[0]["kubernetes_sd_configs"];
    assert_eq!(sd[0]["role"], "pod", "pods are discovered, not a Service's endpoints");
    let names = sd[0]["namespaces"]["names"].as_array().expect("discovery limited to namespaces");
    assert!(names.contains(&json!(namespace)), "prometheus.yml discovers in {names:?}, not {namespace}");

    let pm = yaml("prometheus/podmonitor.yaml");
    assert_eq!(
        (pm["apiVersion"].as_str(), pm["kind"].as_str()),
        (Some("monitoring.coreos.com/v1"), Some("PodMonitor"))
    );
    assert_eq!(pm["metadata"]["namespace"], json!(namespace), "the PodMonitor lives beside the DaemonSet");
    let names = pm["spec"]["namespaceSelector"]["matchNames"].as_array().expect("namespaceSelector.matchNames");
    assert!(names.contains(&json!(namespace)), "the PodMonitor selects in {names:?}, not {namespace}");
    for (k, v) in pm["spec"]["selector"]["matchLabels"].as_object().expect("selector.matchLabels") {
        assert_eq!(labels.get(k).map(String::as_str), v.as_str(), "the PodMonitor's selector {k} matches the pods");
    }
    let endpoints = pm["spec"]["podMetricsEndpoints"].as_array().expect("podMetricsEndpoints");
    assert_eq!(endpoints.len(), 1);
    // A `port` selects by the name of a declared container port, and the agent's pod
    // declares none (tests/deploy.rs): it would find no target.
    assert!(endpoints[0].get("port").is_none() && endpoints[0].get("targetPort").is_none(), "{:?}", endpoints[0]);
}

/// The `__meta_kubernetes_*` labels Prometheus's pod discovery gives the DaemonSet's pod
/// on a node whose address is `ip` (a host-network pod's IP is its node's): one target
/// for its one container, which declares no port, so `__address__` is the bare IP.
fn pod_target(m: &Manifests, ip: &str, node: &str) -> Value {
    let meta = pod_template(m);
    let sanitize = |k: &str| k.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect::<String>();
    let ds = m.daemon_set.metadata.name.clone().expect("DaemonSet name");
    let mut labels: BTreeMap<String, String> = [
        ("__meta_kubernetes_namespace", m.daemon_set.metadata.namespace.clone().unwrap()),
        ("__meta_kubernetes_pod_name", format!("{ds}-x7k2q")),
        ("__meta_kubernetes_pod_ip", ip.to_owned()),
        ("__meta_kubernetes_pod_host_ip", ip.to_owned()),
        ("__meta_kubernetes_pod_node_name", node.to_owned()),
        ("__meta_kubernetes_pod_phase", "Running".to_owned()),
        ("__meta_kubernetes_pod_ready", "true".to_owned()),
        ("__meta_kubernetes_pod_controller_kind", "DaemonSet".to_owned()),
        ("__meta_kubernetes_pod_controller_name", ds),
        ("__meta_kubernetes_pod_container_name", m.agent_container().name.clone()),
        ("__meta_kubernetes_pod_container_init", "false".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    for (kind, map) in [("label", &meta.labels), ("annotation", &meta.annotations)] {
        for (k, v) in map.iter().flatten() {
            labels.insert(format!("__meta_kubernetes_pod_{kind}_{}", sanitize(k)), v.clone());
            labels.insert(format!("__meta_kubernetes_pod_{kind}present_{}", sanitize(k)), "true".to_owned());
        }
    }
    json!([{ "targets": [ip], "labels": labels }])
}

/// prometheus.yml's job, found through `files` instead of the Kubernetes API.
fn prometheus_yml_job(files: &Path) -> Value {
    let mut job = yaml("prometheus/prometheus.yml")["scrape_configs"][0].clone();
    let job_map = job.as_object_mut().unwrap();
    job_map.remove("kubernetes_sd_configs").expect("kubernetes_sd_configs");
    job_map.insert("file_sd_configs".into(), json!([{ "files": [files] }]));
    job
}

/// The job prometheus-operator makes of the PodMonitor (pkg/prometheus/promcfg.go,
/// generatePodMonitorConfig, for an endpoint without port): its own rules (running pods,
/// the selector, namespace, container and pod labels, job), then the endpoint's
/// relabelings.
fn pod_monitor_job(files: &Path) -> Value {
    let pm = yaml("prometheus/podmonitor.yaml");
    let spec = &pm["spec"];
    let sanitize = |k: &str| k.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect::<String>();
    let (ns, name) = (pm["metadata"]["namespace"].as_str().unwrap(), pm["metadata"]["name"].as_str().unwrap());
    let mut rules = vec![
        json!({"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"}),
        json!({"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"}),
    ];
    let mut selector: Vec<(&String, &Value)> = spec["selector"]["matchLabels"].as_object().unwrap().iter().collect();
    selector.sort_by_key(|(k, _)| *k);
    for (k, v) in selector {
        let k = sanitize(k);
        rules.push(json!({
            "action": "keep",
            "source_labels": [format!("__meta_kubernetes_pod_label_{k}"), format!("__meta_kubernetes_pod_labelpresent_{k}")],
            "regex": format!("({});true", v.as_str().unwrap()),
        }));
    }
    rules.extend([
        json!({"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"}),
        json!({"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"}),
        json!({"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"}),
        json!({"target_label": "job", "replacement": format!("{ns}/{name}")}),
    ]);
    if let Some(label) = spec["jobLabel"].as_str() {
        rules.push(json!({
            "source_labels": [format!("__meta_kubernetes_pod_label_{}", sanitize(label))],
            "target_label": "job", "regex": "(.+)", "replacement": "${1}",
        }));
    }
    let ep = &spec["podMetricsEndpoints"][0];
    for r in ep["relabelings"].as_array().into_iter().flatten() {
        let mut snake = serde_json::Map::new();
        for (k, v) in r.as_object().unwrap() {
            let k = match k.as_str() {
                "sourceLabels" => "source_labels",
                "targetLabel" => "target_label",
                "regex" | "replacement" | "action" | "separator" | "modulus" => k.as_str(),
                other => panic!("podmonitor.yaml: relabeling field {other} is not translated here"),
            };
            snake.insert(k.to_owned(), v.clone());
        }
        rules.push(Value::Object(snake));
    }
    let mut job = json!({
        "job_name": format!("podMonitor/{ns}/{name}/0"),
        "file_sd_configs": [{ "files": [files] }],
        "relabel_configs": rules,
    });
    if let Some(path) = ep["path"].as_str() {
        job["metrics_path"] = json!(path);
    }
    job
}

/// Prometheus in backend host 0, scraping every second.
struct Prometheus<'t> {
    topo: &'t Topology,
    _proc: Proc,
    url: String,
    log: PathBuf,
}

impl<'t> Prometheus<'t> {
    fn start(topo: &'t Topology, jobs: Vec<Value>) -> Self {
        let dir = topo.dir.path().join("prometheus");
        std::fs::create_dir_all(&dir).unwrap();
        let config = json!({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": jobs,
        });
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, serde_yaml_ng::to_string(&config).unwrap()).unwrap();
        let listen = format!("{}:9090", host_v4(0));
        let log = dir.join("log");
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={listen}"));
        let out = std::fs::File::create(&log).unwrap();
        let child = topo.in_host(0, &mut cmd).stdout(out.try_clone().unwrap()).stderr(out).spawn();
        let prom =
            Prometheus { topo, _proc: Proc(child.expect("spawn prometheus")), url: format!("http://{listen}"), log };
        eventually(Duration::from_secs(30), "Prometheus to be ready", || prom.get("/-/ready", &[]).is_some());
        prom
    }

    /// GET `path` with `params` (URL-encoded) from host 0; the body, if it answered 2xx.
    fn get(&self, path: &str, params: &[(&str, &str)]) -> Option<String> {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--fail", "--max-time", "10", "-G"]).arg(format!("{}{path}", self.url));
        for (k, v) in params {
            cmd.arg("--data-urlencode").arg(format!("{k}={v}"));
        }
        let out = run(self.topo.in_host(0, &mut cmd), Duration::from_secs(15));
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// An API call's `data`; panics with Prometheus's error.
    fn api(&self, path: &str, params: &[(&str, &str)]) -> Value {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "10", "-G"]).arg(format!("{}{path}", self.url));
        for (k, v) in params {
            cmd.arg("--data-urlencode").arg(format!("{k}={v}"));
        }
        let out = run(self.topo.in_host(0, &mut cmd), Duration::from_secs(15));
        let body: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{path} {params:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)));
        assert_eq!(body["status"], "success", "{path} {params:?}: {body}\nPrometheus log:\n{}", read(&self.log));
        body["data"].clone()
    }

    /// An instant query's result vector.
    fn query(&self, promql: &str) -> Vec<Value> {
        self.api("/api/v1/query", &[("query", promql)])["result"].as_array().cloned().unwrap_or_default()
    }

    /// The value at `time` (seconds since the epoch) of a query that gives one series.
    fn value_at(&self, promql: &str, time: &str) -> Option<f64> {
        let result = self.api("/api/v1/query", &[("query", promql), ("time", time)]);
        result["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

/// Sample names in `/metrics` (`_total`, `_bucket`, ... as Prometheus stores them), each
/// with the label names its series have and whether some series gives the label a value
/// (Prometheus drops a label whose value is empty), from the Prometheus project's Python
/// parser.
fn exported(text: &str) -> BTreeMap<String, BTreeMap<String, bool>> {
    let out = python(
        r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        labels = out.setdefault(s.name, {})
        for k, v in s.labels.items():
            labels[k] = labels.get(k, False) or v != ""
print(json.dumps(out))
"#,
        text.as_bytes(),
    );
    serde_json::from_slice(&out).expect("parsed metrics")
}

/// A script that runs the agent with its open-files limit at `nofile`, so that holding
/// connections makes it short of descriptors (`switchyard_local_errors_total`), as in
/// tests/reliability.rs.
fn limited_agent(topo: &Topology, nofile: u32) -> PathBuf {
    let path = topo.dir.path().join("switchyard-limited");
    let bin = switchyard_tests::switchyard_bin();
    let script = format!("#!/bin/sh\nexec prlimit --nofile={nofile}:{nofile} -- {} \"$@\"\n", bin.display());
    std::fs::write(&path, script).expect("write wrapper");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod wrapper");
    path
}

/// Waits until Prometheus has scraped `n` requests to the web service through both jobs
/// (told apart by the PodMonitor's `namespace` label).
fn web_requests_scraped(prom: &Prometheus, n: f64) {
    let query = r#"sum by (namespace) (switchyard_route_requests_total{service="web"})"#;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let seen: Vec<Option<f64>> =
            prom.query(query).iter().map(|r| r["value"][1].as_str().and_then(|v| v.parse().ok())).collect();
        if seen == [Some(n), Some(n)] {
            return;
        }
        if std::time::Instant::now() > deadline {
            let targets = prom.api("/api/v1/targets", &[]);
            panic!("Prometheus saw {seen:?} of {n} requests to web; targets: {targets}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// curl in the test cgroup: GET each path once, on one connection.
fn curl(topo: &Topology, base: &str, paths: &[&str]) -> String {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "30", "-w", "%{http_code}\n"]);
    for p in paths {
        cmd.args(["-o", "/dev/null"]).arg(format!("{base}{p}"));
    }
    let out = topo.client(&mut cmd);
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_metric_and_label_the_dashboard_reads_is_exported_and_scraped_through_both_configs() {
    let test = "every_metric_and_label_the_dashboard_reads_is_exported_and_scraped";
    if !require_root(test) {
        return;
    }
    require_tools(&["prometheus", "curl", "python3", "prlimit"]);
    let m = manifests::load();
    let topo = Topology::with_hosts(2);
    let _echo: Vec<Proc> = (0..2).map(|i| topo.echo_server(i, 7000, 0)).collect();
    let _golden: Vec<Proc> = (0..2)
        .map(|i| {
            let target = format!("{}:8080", host_v4(i));
            topo.host_server(i, backends_py().args(["golden", "--listen", &target]), &target)
        })
        .collect();

    // The deployed config (its metrics listener on every address, the admin API on
    // loopback), with this test's services instead of a cluster.
    let mut config: Value = serde_yaml_ng::from_str(m.agent_config()).expect("deployed config");
    let agent = config["agent"].as_object_mut().expect("agent section");
    agent.remove("kubernetes");
    agent.insert("cgroup".into(), json!(topo.cgroup.path));
    // More than the 200 open files below allow: holding connections runs it short.
    agent.insert("max_connections".into(), json!(1000));
    let (h0, h1) = (host_v4(0), host_v4(1));
    config["services"] = serde_yaml_ng::from_str(&format!(
        r#"
- {{ name: web, addresses: ["10.96.0.70:80"], endpoints: ["{h0}:8080", "{h1}:8080"], protocol: http1,
    balance: round-robin, http: {{ retry: {{ on_status: [500] }} }} }}
- {{ name: flaky, addresses: ["10.96.0.71:7000"], endpoints: ["{h0}:7000", "{h1}:7001"], protocol: tcp,
    balance: round-robin }}
- {{ name: down, addresses: ["10.96.0.72:7000"], endpoints: ["{h0}:7001"], protocol: tcp }}
- {{ name: echo, addresses: ["10.96.0.73:7000"], endpoints: ["{h0}:7000"], protocol: tcp }}
"#
    ))
    .unwrap();
    let agent = Agent::start_bin(&limited_agent(&topo, 200), &topo, &serde_yaml_ng::to_string(&config).unwrap());

    // Both scrape configs, from another host, through the node's address there.
    let node_ip = switchyard_tests::addr::NODE_V4;
    let files = topo.dir.path().join("pods.json");
    std::fs::write(&files, pod_target(&m, node_ip, "node-a").to_string()).unwrap();
    let prom = Prometheus::start(&topo, vec![prometheus_yml_job(&files), pod_monitor_job(&files)]);
    let url =
        format!("http://{node_ip}:{}{}", annotation(&m, "prometheus.io/port"), annotation(&m, "prometheus.io/path"));
    let targets = eventually_some(Duration::from_secs(20), "both jobs' targets up", || {
        let t = prom.api("/api/v1/targets", &[("state", "active")])["activeTargets"].as_array().cloned()?;
        (t.len() == 2 && t.iter().all(|t| t["health"] == "up")).then_some(t)
    });
    for t in &targets {
        assert_eq!(t["scrapeUrl"], json!(url), "{t}");
        assert_eq!((&t["labels"]["job"], &t["labels"]["instance"]), (&json!("switchyard"), &json!("node-a")), "{t}");
        let labels = t["labels"].as_object().unwrap();
        assert!(!labels.contains_key("pod") && !labels.contains_key("container"), "no per-pod target labels: {t}");
    }

    // Off the node, the metrics port answers metrics and nothing else; the admin API is
    // not there at all.
    let status_from_host = |url: &str| {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", url]);
        String::from_utf8_lossy(&run(topo.in_host(0, &mut cmd), Duration::from_secs(15)).stdout).into_owned()
    };
    let port = annotation(&m, "prometheus.io/port");
    assert_eq!(status_from_host(&format!("http://{node_ip}:{port}/metrics")), "200");
    assert_eq!(status_from_host(&format!("http://{node_ip}:{port}/conns")), "404", "only metrics and health");
    assert_eq!(status_from_host(&format!("http://{node_ip}:4191/conns")), "000", "the admin API stays on loopback");

    // Traffic that gives every family the dashboard reads a series. The web service's
    // are made first and scraped, so that the rates checked last see the requests after
    // them (a series' first sample has no rate).
    assert_eq!(curl(&topo, "http://10.96.0.70", &["/ok", "/fail"]), "200\n500\n");
    web_requests_scraped(&prom, 2.0);
    // flaky: connect failures (refused) to one endpoint, which is ejected.
    let conns = topo.load("10.96.0.71:7000", &["--conns", "20", "--concurrency", "1"], None).wait();
    assert!(conns.iter().all(|c| c.outcome.is_ok()), "flaky: every connection fails over to the good endpoint");
    // down: connections served by no endpoint (unserved, the route's connect failures).
    for _ in 0..3 {
        let _ = topo.probe("10.96.0.72:7000", 10);
    }
    // Local errors: 150 held connections need 300 descriptors (tests/reliability.rs). hold
    // prints its line once it has tried them all.
    let mut hold = server_py("hostile.py");
    hold.args(["hold", "--connect", "10.96.0.73:7000", "--count", "150", "--seconds", "60"]).stdin(Stdio::piped());
    let mut holder = topo.spawn_client(&mut hold);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(holder.0.stdout.as_mut().unwrap()), &mut line).unwrap();
    drop(holder);
    // web: successes, failures (500, retried on the other endpoint: retries) and slow ones.
    let paths: Vec<&str> = [["/ok"; 30].as_slice(), &["/fail"; 10], &["/slow"; 5]].concat();
    let codes = curl(&topo, "http://10.96.0.70", &paths);
    assert_eq!(codes.lines().filter(|c| *c == "500").count(), 10, "{codes}");
    web_requests_scraped(&prom, 47.0);
    // The overview's rates are read at this moment, whose 20 s window holds the samples
    // before and after those requests however long the checks in between take.
    let scraped_at = format!("{:.3}", switchyard_tests::epoch_ms() as f64 / 1000.0);

    let text = topo.admin_get("/metrics");
    let exported = exported(&text);
    let d = dashboard();
    let defined: BTreeSet<String> = variables(&d).iter().map(|v| v["name"].as_str().unwrap().to_owned()).collect();
    let qs = queries(&d);
    let promql: Vec<String> = qs.iter().map(|q| substitute(&q.expr, &defined, &BTreeMap::new())).collect();

    // What the dashboard reads is exported, with those labels, or added by the scrape
    // (the same by both configs).
    let target_labels = |t: &Value| t["labels"].as_object().unwrap().keys().cloned().collect::<BTreeSet<String>>();
    let added = target_labels(&targets[0]).intersection(&target_labels(&targets[1])).cloned().collect::<BTreeSet<_>>();
    for (q, selectors) in qs.iter().zip(selectors(&qs, &promql)) {
        for s in selectors {
            let have = exported.get(&s.metric).unwrap_or_else(|| {
                panic!("{}: {} is not in /metrics (misspelt, or no traffic made it):\n{text}", q.at, s.metric)
            });
            let missing: Vec<&String> =
                s.labels.iter().filter(|l| !have.contains_key(*l) && !added.contains(*l)).collect();
            assert!(
                missing.is_empty(),
                "{}: {} has no label {missing:?}; it has {have:?}, the scrape adds {added:?}",
                q.at,
                s.metric
            );
        }
    }
    // A target label that the agent's metrics also have would be renamed exported_*.
    let labels = prom.api("/api/v1/labels", &[("match[]", r#"{__name__=~"switchyard_.+"}"#)]);
    let renamed: Vec<&Value> =
        labels.as_array().unwrap().iter().filter(|l| l.as_str().unwrap().starts_with("exported_")).collect();
    assert!(renamed.is_empty(), "target labels collide with the agent's: {renamed:?}");

    // Every query gives series in Prometheus: a matcher's value (classification="success")
    // is right too, not only its label. A variable lists the values of its label, where
    // there are any: client_namespace is empty for host processes, as every client here.
    for (q, p) in qs.iter().zip(&promql) {
        let Some(label) = &q.label else {
            assert!(!prom.query(p).is_empty(), "{}: no series for\n{p}", q.at);
            continue;
        };
        let series = prom.api("/api/v1/series", &[("match[]", p)]);
        let series = series.as_array().unwrap();
        assert!(!series.is_empty(), "{}: no series for {p}", q.at);
        let metric = p.split('{').next().unwrap();
        let valued = added.contains(label) || exported[metric].get(label) == Some(&true);
        if valued {
            assert!(series.iter().any(|s| s[label].as_str().is_some()), "{}: no series of {p} has {label}", q.at);
        }
    }

    // The overview reads right for the web service: 35 of the 45 requests in the rate
    // window succeeded, and 5 took 200 ms (more than p99's 1%).
    let web = BTreeMap::from([("service", "web")]);
    let overview = |title: &str| {
        let q = qs.iter().find(|q| q.at.starts_with(&format!("panel \"{title}\""))).expect(title);
        prom.value_at(&substitute(&q.expr, &defined, &web), &scraped_at)
            .unwrap_or_else(|| panic!("{title}: no value at {scraped_at}"))
    };
    let success = overview("Success rate");
    assert!((0.6..0.9).contains(&success), "success rate of web {success}, not about 35/45");
    let p99 = overview("p99 latency");
    assert!((0.1..=0.5).contains(&p99), "p99 latency of web {p99} s: the slow requests' bucket");
    agent.stop();
}
