//! `cargo xtask bench [--quick]`: Switchyard side by side with direct connections, HAProxy,
//! nginx and Envoy, in one run, on one machine, as ratios (absolute numbers on a shared 2-core
//! machine drift; ratios taken minutes apart in the same run hold much better).
//!
//! Everything runs in a throwaway topology (the end-to-end harness's): backends (nginx,
//! iperf3, redis-server) on a "host" namespace, proxies and load generators in the "node"
//! namespace. Every proxy is pinned to CPU 0 with one worker; load generators and
//! backends share CPU 1. Every load is bounded by a duration or a request count.
//! Results: a table on the terminal and JSON in target/bench/. Last comes the scale phase
//! (scale.rs, alone with `--scale`): the agent against clusters of up to 50,000 Services.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

mod profile;
mod scale;

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};
use switchyard_tests::{Agent, Pod, Proc, Topology, host_v4};

/// The load paths compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Via {
    Direct,
    Switchyard,
    /// The same services, dialled from a pod (a network namespace of its own): through
    /// the agent's node address instead of loopback.
    SwitchyardPod,
    /// The same agent, to a service left to protocol detection: HTTP/1.1 served by
    /// hyper, balanced per request over pooled upstream connections.
    SwitchyardHttp,
    /// The same backends behind `mode: kernel` services: the connect program dials the
    /// endpoint, nothing proxies (the CPU figure is the agent following the events).
    SwitchyardKernel,
    /// The same agent, restarted with `agent.stats: false`: what bookkeeping costs.
    SwitchyardNoStats,
    HaproxyTcp,
    NginxTcp,
    EnvoyTcp,
    HaproxyHttp,
    NginxHttp,
    EnvoyHttp,
}

impl Via {
    /// Whether the path goes through the Switchyard agent (whose admin API can say what
    /// went wrong).
    fn is_agent(self) -> bool {
        matches!(
            self,
            Via::Switchyard | Via::SwitchyardPod | Via::SwitchyardHttp | Via::SwitchyardKernel | Via::SwitchyardNoStats
        )
    }

    fn name(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Switchyard => "switchyard (redirect, tcp)",
            Via::SwitchyardPod => "switchyard (pod -> service, tcp)",
            Via::SwitchyardHttp => "switchyard (redirect, http)",
            Via::SwitchyardKernel => "switchyard (kernel mode)",
            Via::SwitchyardNoStats => "switchyard, stats off",
            Via::HaproxyTcp => "haproxy tcp",
            Via::NginxTcp => "nginx stream",
            Via::EnvoyTcp => "envoy tcp_proxy",
            Via::HaproxyHttp => "haproxy http",
            Via::NginxHttp => "nginx http",
            Via::EnvoyHttp => "envoy http",
        }
    }
}

/// Backend ports on host 0, and the ports each proxy listens on for them.
const HTTP: u16 = 8080;
const IPERF: u16 = 5201;
const REDIS: u16 = 6379;

struct Setup {
    topo: Topology,
    _backends: Vec<Proc>,
    agent: Option<Agent>,
    agent_bin: PathBuf,
    agent_config: String,
    haproxy: Proc,
    nginx: Proc,
    envoy: Proc,
    probe: PathBuf,
}

impl Setup {
    /// Address to dial for `backend_port` through `path`, and whether the client must
    /// be in the redirected cgroup.
    fn target(&self, path: Via, backend_port: u16) -> (String, bool) {
        let index = match backend_port {
            HTTP => 0,
            IPERF => 1,
            _ => 2,
        };
        match path {
            Via::Direct => (format!("{}:{backend_port}", host_v4(0)), false),
            Via::Switchyard | Via::SwitchyardNoStats | Via::SwitchyardPod => {
                (format!("10.96.0.{}:{backend_port}", 80 + index), true)
            }
            Via::SwitchyardHttp => (format!("10.96.0.83:{backend_port}"), true),
            Via::SwitchyardKernel => (format!("10.96.0.{}:{backend_port}", 84 + index), true),
            Via::HaproxyTcp => (format!("127.0.0.1:{}", 9001 + index), false),
            Via::EnvoyTcp => (format!("127.0.0.1:{}", 9101 + index), false),
            Via::NginxTcp => (format!("127.0.0.1:{}", 9201 + index), false),
            Via::HaproxyHttp => ("127.0.0.1:9011".into(), false),
            Via::EnvoyHttp => ("127.0.0.1:9111".into(), false),
            Via::NginxHttp => ("127.0.0.1:9211".into(), false),
        }
    }

    fn proxy_pid(&self, path: Via) -> Option<u32> {
        match path {
            Via::Direct => None,
            Via::Switchyard
            | Via::SwitchyardPod
            | Via::SwitchyardHttp
            | Via::SwitchyardKernel
            | Via::SwitchyardNoStats => self.agent.as_ref().map(|a| a.pid() as u32),
            Via::HaproxyTcp | Via::HaproxyHttp => Some(self.haproxy.0.id()),
            Via::NginxTcp | Via::NginxHttp => Some(self.nginx.0.id()),
            Via::EnvoyTcp | Via::EnvoyHttp => Some(self.envoy.0.id()),
        }
    }

    /// (Re)start the agent pinned to CPU 0 with one worker, bookkeeping on or off.
    fn start_agent(&mut self, stats: bool) -> anyhow::Result<()> {
        // Stop the running one first: both would want the same listener port.
        if let Some(old) = self.agent.take() {
            old.stop();
        }
        let config = self.agent_config.replace("  stats: true", &format!("  stats: {stats}"));
        let env = [("SWITCHYARD_WORKERS", "1"), ("SWITCHYARD_LOG", "warn,switchyard::app=info")];
        let agent = Agent::start_with(&self.agent_bin, &self.topo, &config, &env);
        let pinned = Command::new("taskset").args(["-a", "-p", "-c", "0", &agent.pid().to_string()]).output()?;
        ensure!(pinned.status.success(), "pin the agent to CPU 0");
        self.agent = Some(agent);
        Ok(())
    }

    /// Run a load generator on CPU 1 in the node namespace (in the cgroup if asked), or in
    /// `pod`.
    fn load(&self, args: &[&str], in_cgroup: bool, pod: Option<&Pod>, limit: Duration) -> anyhow::Result<String> {
        let mut cmd = Command::new("taskset");
        cmd.arg("-c").arg("1").args(args);
        let cmd = match pod {
            Some(pod) => pod.in_pod(&mut cmd),
            None => self.topo.in_node(&mut cmd, in_cgroup),
        };
        let out = switchyard_tests::run(cmd, limit);
        ensure!(
            out.status.success(),
            "{args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// CPU time (user + system, all threads) of a process, in microseconds.
fn cpu_us(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after ") ".
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0) + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks * 1e6 / hz
}

/// A `kB` field of /proc/PID/status: `VmRSS` (resident now), `VmHWM` (the peak).
fn status_kib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0)
}

fn rss_kib(pid: u32) -> f64 {
    status_kib(pid, "VmRSS")
}

/// One measured figure.
#[derive(Debug, Clone)]
struct Sample {
    value: f64,
    /// Proxy CPU per request (µs), or per GiB for bulk transfers.
    cpu: Option<f64>,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
}

fn wrk_latency_us(text: &str, pct: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.trim_start().starts_with(pct))?;
    let v = line.split_whitespace().nth(1)?;
    let (num, mult) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        (v, 1.0)
    };
    num.parse::<f64>().ok().map(|n| n * mult)
}

/// One run of `case` through `path`; `pod` is where the pod path's clients run.
fn measure(
    setup: &Setup,
    pod: Option<&Pod>,
    case: &str,
    path: Via,
    secs: u64,
    requests: u64,
) -> anyhow::Result<Sample> {
    let pid = setup.proxy_pid(path);
    let pod = pod.filter(|_| path == Via::SwitchyardPod);
    let cpu_before = pid.map(cpu_us);
    let limit = Duration::from_secs(secs + 60);
    let d = format!("{secs}s");
    let (value, count, p50, p99) = match case {
        "http keep-alive" | "http new connection" => {
            let (target, cg) = setup.target(path, HTTP);
            let url = format!("http://{target}/");
            let mut args = vec!["wrk", "-t1", "-c16", "-d", &d, "--latency"];
            if case == "http new connection" {
                args.extend(["-H", "Connection: close"]);
            }
            args.push(&url);
            let out = setup.load(&args, cg, pod, limit)?;
            let rps: f64 = out
                .lines()
                .find_map(|l| l.strip_prefix("Requests/sec:"))
                .and_then(|v| v.trim().parse().ok())
                .with_context(|| format!("no Requests/sec in wrk output:\n{out}"))?;
            let errors = out.lines().any(|l| l.contains("Socket errors") || l.contains("Non-2xx"));
            if errors {
                eprintln!("   note: wrk reported errors for {} / {case}:\n{out}", path.name());
                if path.is_agent() {
                    eprintln!("   the agent's failure counters now:\n{}", failure_counters(setup));
                }
            }
            (rps, rps * secs as f64, wrk_latency_us(&out, "50%"), wrk_latency_us(&out, "99%"))
        }
        "tcp bulk" => {
            let (target, cg) = setup.target(path, IPERF);
            let (host, port) = target.rsplit_once(':').unwrap();
            let out = setup.load(&["iperf3", "-c", host, "-p", port, "-t", &secs.to_string(), "-J"], cg, pod, limit)?;
            let v: Value = serde_json::from_str(&out).context("iperf3 -J output")?;
            let bps = v["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 gave no result")?;
            // "requests" for CPU accounting: GiB moved.
            (bps / 1e9, bps * secs as f64 / 8.0 / (1u64 << 30) as f64, None, None)
        }
        "redis get" | "redis set" => {
            let (target, cg) = setup.target(path, REDIS);
            let (host, port) = target.rsplit_once(':').unwrap();
            let test = if case == "redis get" { "get" } else { "set" };
            let n = requests.to_string();
            let out = setup.load(
                &["redis-benchmark", "-h", host, "-p", port, "-t", test, "-n", &n, "-c", "16", "-q", "--csv"],
                cg,
                pod,
                limit,
            )?;
            let rps: f64 = out
                .lines()
                .filter(|l| l.to_lowercase().starts_with(&format!("\"{test}\"")))
                .find_map(|l| l.split(',').nth(1).map(|v| v.trim_matches('"').to_owned()))
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no {test} result in redis-benchmark output:\n{out}"))?;
            (rps, requests as f64, None, None)
        }
        other => bail!("unknown case {other}"),
    };
    let cpu = match (pid, cpu_before) {
        (Some(pid), Some(before)) if count > 0.0 => Some((cpu_us(pid) - before) / count),
        _ => None,
    };
    Ok(Sample { value, cpu, p50_us: p50, p99_us: p99 })
}

/// Keep-alive through the agent with `conns` connections held open, first quiet, then
/// while its admin API is scraped (`/metrics` and `/conns`, 10 times a second each, as
/// an eager Prometheus and a dashboard would): whether the admin side steals latency
/// from the data path. Returns (quiet, scraped, scrapes made).
fn scraped(setup: &Setup, conns: u64, secs: u64) -> anyhow::Result<(Sample, Sample, u64)> {
    let mut child = hold(setup, Via::Switchyard, conns, Duration::from_secs(2 * secs + 30))?;
    let quiet = measure(setup, None, "http keep-alive", Via::Switchyard, secs, 0)?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (busy, scrapes) = thread::scope(|s| {
        let scraper = s.spawn(|| {
            switchyard_tests::in_netns(&setup.topo.node, || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for path in ["/metrics", "/conns"] {
                        n += u64::from(switchyard_tests::admin_request(path).is_ok());
                    }
                    thread::sleep(Duration::from_millis(100));
                }
                n
            })
        });
        let busy = measure(setup, None, "http keep-alive", Via::Switchyard, secs, 0);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (busy, scraper.join().unwrap_or(0))
    });
    // Ours, started above: end it now rather than wait out its hold time.
    let _ = child.kill();
    let _ = child.wait();
    Ok((quiet, busy?, scrapes))
}

/// The agent's counters of what went wrong (connections closed unserved, failed
/// connects, ejections, saturation), non-zero ones only: why a load saw errors.
fn failure_counters(setup: &Setup) -> String {
    match switchyard_tests::in_netns(&setup.topo.node, || switchyard_tests::admin_request("/metrics")) {
        Ok((_, text)) => match nonzero_failures(&text) {
            lines if lines.is_empty() => "     (none)".into(),
            lines => format!("     {}", lines.join("\n     ")),
        },
        Err(e) => format!("     (the admin API did not answer: {e})"),
    }
}

/// The series of the agent's failure counters in a `/metrics` text that are not zero.
fn nonzero_failures(metrics: &str) -> Vec<&str> {
    const FAILURES: [&str; 4] = [
        "switchyard_unserved_connections_total",
        "switchyard_connect_failures_total",
        "switchyard_ejections_total",
        "switchyard_saturations_total",
    ];
    metrics.lines().filter(|l| FAILURES.iter().any(|f| l.starts_with(f)) && !l.ends_with(" 0")).collect()
}

/// `conns` connections to the HTTP backend through `path`, held open for `time` by the
/// probe (returned once they are all open).
fn hold(setup: &Setup, path: Via, conns: u64, time: Duration) -> anyhow::Result<std::process::Child> {
    let (target, cg) = setup.target(path, HTTP);
    let mut cmd = Command::new(&setup.probe);
    let hold_ms = time.as_millis().to_string();
    cmd.args(["hold", "--connect", &target, "--conns", &conns.to_string(), "--hold-ms", &hold_ms]);
    let mut child = setup.topo.in_node(&mut cmd, cg).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line)?;
    ensure!(line.starts_with("held="), "{} could not hold {conns} connections: {line}", path.name());
    Ok(child)
}

/// Memory of a proxy holding `conns` idle proxied connections.
fn idle_memory(setup: &Setup, path: Via, conns: u64) -> anyhow::Result<(f64, f64)> {
    let pid = setup.proxy_pid(path).expect("a proxy");
    let before = rss_kib(pid);
    let mut child = hold(setup, path, conns, Duration::from_secs(4))?;
    thread::sleep(Duration::from_millis(500));
    let during = rss_kib(pid);
    let _ = switchyard_tests::wait_bounded(&mut child, Duration::from_secs(30));
    Ok((during / 1024.0, (during - before).max(0.0) * 1024.0 / conns as f64))
}

fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, text).with_context(|| format!("write {}", p.display()))?;
    Ok(p)
}

fn start(topo: &Topology, in_host: bool, args: &[&str], cpu: &str) -> anyhow::Result<Proc> {
    let mut cmd = Command::new("taskset");
    cmd.arg("-c").arg(cpu).args(args).stdout(Stdio::null()).stderr(Stdio::null());
    let cmd = if in_host { topo.in_host(0, &mut cmd) } else { topo.in_node(&mut cmd, false) };
    Ok(Proc(cmd.spawn().with_context(|| format!("start {args:?}"))?))
}

fn wait_up(topo: &Topology, target: &str) -> anyhow::Result<()> {
    for _ in 0..200 {
        if topo.node_can_connect(target) {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("{target} did not come up")
}

fn setup(bin: &Path, probe: &Path, envoy: &Path, maxconn: u64) -> anyhow::Result<Setup> {
    let topo = Topology::with_hosts(1);
    let dir = topo.dir.path().to_owned();
    let h = host_v4(0);
    // One nginx process (no master): the process we start is the one serving, pinned to
    // CPU 1, and killing it leaves no orphaned worker behind.
    let nginx = write(
        &dir,
        "nginx.conf",
        &format!(
            "user root; master_process off; worker_rlimit_nofile 65536; daemon off; pid {d}/nginx.pid; error_log {d}/nginx.err;\n\
             events {{ worker_connections 32768; }}\n\
             http {{ access_log off; keepalive_requests 10000000; client_body_temp_path {d}; proxy_temp_path {d};\n\
               fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
               server {{ listen {h}:{HTTP} backlog=4096; location / {{ return 200 \"hello from nginx\\n\"; }} }} }}\n",
            d = dir.display()
        ),
    )?;
    let nginx_conf = nginx.to_string_lossy().into_owned();
    let mut redis = vec!["redis-server".to_owned()];
    redis.extend(switchyard_tests::redis_args(&h, REDIS));
    redis.extend(["--maxclients".into(), "20000".into(), "--dir".into(), dir.to_string_lossy().into_owned()]);
    let redis: Vec<&str> = redis.iter().map(String::as_str).collect();
    let backends = vec![
        start(&topo, true, &["nginx", "-c", &nginx_conf], "1")?,
        start(&topo, true, &["iperf3", "-s", "-B", &h, "-p", &IPERF.to_string()], "1")?,
        start(&topo, true, &redis, "1")?,
    ];
    for port in [HTTP, IPERF, REDIS] {
        wait_up(&topo, &format!("{h}:{port}"))?;
    }

    // b0 is forced to opaque TCP (the like of HAProxy's tcp mode); b3 is the same
    // backend left to detection (HTTP mode); iperf3 and redis are detected as opaque;
    // b4..b6 are the three backends in kernel mode.
    let kernel = [(HTTP, "tcp", "kernel"), (IPERF, "tcp", "kernel"), (REDIS, "tcp", "kernel")];
    let proxied = [(HTTP, "tcp", "proxy"), (IPERF, "auto", "proxy"), (REDIS, "auto", "proxy"), (HTTP, "auto", "proxy")];
    let mut services: String = proxied
        .iter()
        .chain(kernel.iter())
        .enumerate()
        .map(|(i, (p, protocol, mode))| {
            format!(
                "  - {{ name: b{i}, addresses: [\"10.96.0.{}:{p}\"], endpoints: [\"{h}:{p}\"], protocol: {protocol}, mode: {mode} }}\n",
                80 + i
            )
        })
        .collect();
    services.push('\n');
    let agent_config =
        format!("agent:\n  cgroup: {}\n  stats: true\nservices:\n{services}", topo.cgroup.path.display());

    let haproxy_cfg = write(
        &dir,
        "haproxy.cfg",
        &format!(
            "global\n  maxconn {maxconn}\n  nbthread 1\ndefaults\n  timeout connect 2s\n  timeout client 120s\n  timeout server 120s\n\
             listen http_tcp\n  mode tcp\n  bind 127.0.0.1:9001\n  server s {h}:{HTTP}\n\
             listen iperf_tcp\n  mode tcp\n  bind 127.0.0.1:9002\n  server s {h}:{IPERF}\n\
             listen redis_tcp\n  mode tcp\n  bind 127.0.0.1:9003\n  server s {h}:{REDIS}\n\
             listen http_http\n  mode http\n  option http-keep-alive\n  bind 127.0.0.1:9011\n  server s {h}:{HTTP}\n"
        ),
    )?;
    let haproxy = start(&topo, false, &["haproxy", "-db", "-f", &haproxy_cfg.to_string_lossy()], "0")?;

    // nginx as a proxy: one process (no master, one worker loop), stream (L4) for the
    // three backends, http with a keep-alive upstream pool for the HTTP one.
    let nginx_proxy = write(
        &dir,
        "nginx-proxy.conf",
        &format!(
            "load_module {module};\n\
             user root; master_process off; worker_rlimit_nofile 65536; daemon off; pid {d}/nginx-proxy.pid; error_log {d}/nginx-proxy.err;\n\
             events {{ worker_connections {conns}; }}\n\
             stream {{ server {{ listen 127.0.0.1:9201; proxy_pass {h}:{HTTP}; }}\n\
               server {{ listen 127.0.0.1:9202; proxy_pass {h}:{IPERF}; }}\n\
               server {{ listen 127.0.0.1:9203; proxy_pass {h}:{REDIS}; }} }}\n\
             http {{ access_log off; keepalive_requests 10000000; client_body_temp_path {d}; proxy_temp_path {d};\n\
               fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
               upstream b {{ server {h}:{HTTP}; keepalive 64; }}\n\
               server {{ listen 127.0.0.1:9211 backlog=4096; location / {{ proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }} }}\n",
            module = crate::bootstrap::NGINX_STREAM_MODULE,
            conns = 2 * maxconn + 1024,
            d = dir.display()
        ),
    )?;
    let nginx = start(&topo, false, &["nginx", "-c", &nginx_proxy.to_string_lossy()], "0")?;

    let tcp = |name: &str, port: u16, backend: u16| {
        format!(
            "  - name: {name}\n    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.tcp_proxy\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy\n          stat_prefix: {name}\n          cluster: c{backend}\n"
        )
    };
    let cluster = |backend: u16| {
        format!(
            "  - name: c{backend}\n    connect_timeout: 2s\n    type: STATIC\n    load_assignment:\n      cluster_name: c{backend}\n      endpoints:\n      - lb_endpoints:\n        - endpoint: {{ address: {{ socket_address: {{ address: {h}, port_value: {backend} }} }} }}\n"
        )
    };
    let http = "  - name: http_http\n    address: { socket_address: { address: 127.0.0.1, port_value: 9111 } }\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          stat_prefix: http\n          http_filters:\n          - name: envoy.filters.http.router\n            typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }\n          route_config:\n            virtual_hosts:\n            - name: all\n              domains: [\"*\"]\n              routes:\n              - match: { prefix: / }\n                route: { cluster: c8080 }\n";
    let envoy_cfg = write(
        &dir,
        "envoy.yaml",
        &format!(
            "static_resources:\n  listeners:\n{}{}{}{http}  clusters:\n{}{}{}",
            tcp("http_tcp", 9101, HTTP),
            tcp("iperf_tcp", 9102, IPERF),
            tcp("redis_tcp", 9103, REDIS),
            cluster(HTTP),
            cluster(IPERF),
            cluster(REDIS)
        ),
    )?;
    let envoy_bin = envoy.to_string_lossy().into_owned();
    let envoy = start(
        &topo,
        false,
        &[
            &envoy_bin,
            "-c",
            &envoy_cfg.to_string_lossy(),
            "--concurrency",
            "1",
            "--log-level",
            "error",
            "--base-id",
            &std::process::id().to_string(),
        ],
        "0",
    )?;
    for port in [9001, 9002, 9003, 9011, 9101, 9102, 9103, 9111, 9201, 9202, 9203, 9211] {
        wait_up(&topo, &format!("127.0.0.1:{port}"))?;
    }
    let mut setup = Setup {
        topo,
        _backends: backends,
        agent: None,
        agent_bin: bin.to_owned(),
        agent_config,
        haproxy,
        nginx,
        envoy,
        probe: probe.to_owned(),
    };
    setup.start_agent(true)?;
    Ok(setup)
}

/// Idle proxied connections cost a proxy two descriptors each: lift this process's soft
/// open-files limit to the hard one (children inherit it) and size the idle case to fit.
/// Returns the limit.
fn raise_fd_limit() -> u64 {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        lim.rlim_cur
    }
}

/// "CASE via PATH": what `--only` matches against.
fn pair_name(case: &str, path: Via) -> String {
    format!("{case} via {}", path.name())
}

/// What `--only` keeps: a case and path pair is measured when "CASE via PATH" contains
/// one of the given strings; with none given, everything is.
pub struct Only(pub Vec<String>);

impl Only {
    fn keeps(&self, case: &str, path: Via) -> bool {
        self.0.is_empty() || self.matches(&pair_name(case, path))
    }

    /// Whether one of the given strings is in `name` (a [`pair_name`]).
    fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|o| name.contains(o.as_str()))
    }

    fn everything(&self) -> bool {
        self.0.is_empty()
    }
}

pub fn run(bin: &Path, probe: &Path, envoy: &Path, quick: bool, profiling: bool, only: &Only) -> anyhow::Result<()> {
    let fd_limit = raise_fd_limit();
    let (secs, rounds, redis_n, idle) = if quick { (2, 1, 20_000, 1_000) } else { (5, 2, 100_000, 10_000) };
    // Two descriptors per proxied connection, plus headroom for listeners and logs.
    let idle = idle.min(fd_limit.saturating_sub(2_000) / 2);
    let tcp_paths = [
        Via::Direct,
        Via::SwitchyardKernel,
        Via::Switchyard,
        Via::SwitchyardPod,
        Via::HaproxyTcp,
        Via::NginxTcp,
        Via::EnvoyTcp,
    ];
    // The HTTP cases go through every L4 path and the HTTP ones too.
    let http_paths: Vec<Via> = tcp_paths
        .iter()
        .copied()
        .chain([Via::SwitchyardHttp, Via::HaproxyHttp, Via::NginxHttp, Via::EnvoyHttp])
        .collect();
    let cases: [Case; 5] = [
        ("http keep-alive", "req/s", &http_paths),
        ("http new connection", "req/s", &http_paths),
        ("tcp bulk", "Gbit/s", &tcp_paths),
        ("redis get", "req/s", &tcp_paths),
        ("redis set", "req/s", &tcp_paths),
    ];
    if !only.everything() {
        let all: Vec<String> = cases
            .iter()
            .enumerate()
            .flat_map(|(ci, (case, _, paths))| {
                paths.iter().chain((ci < NO_STATS_CASES).then_some(&Via::SwitchyardNoStats)).map(move |p| (case, p))
            })
            .chain(IDLE_PATHS.iter().map(|p| (&IDLE_CASE, p)))
            .map(|(case, p)| pair_name(case, *p))
            .collect();
        ensure!(
            all.iter().any(|name| only.matches(name)),
            "--only {:?} matches nothing measured; the pairs are:\n  {}",
            only.0,
            all.join("\n  ")
        );
    }
    let mut setup = setup(bin, probe, envoy, idle + 100)?;
    // The agent at rest (started, serving its seven file services, nothing connected
    // yet) and the peak of its start-up.
    let agent_pid = setup.proxy_pid(Via::Switchyard).expect("the agent runs");
    let at_rest = json!({
        "rss_mib": status_kib(agent_pid, "VmRSS") / 1024.0,
        "startup_peak_mib": status_kib(agent_pid, "VmHWM") / 1024.0,
        "binary_mib": std::fs::metadata(bin).map(|m| m.len() as f64 / (1 << 20) as f64).unwrap_or(0.0),
    });
    let mut samples: BTreeMap<(usize, Via), Vec<Sample>> = BTreeMap::new();
    {
        // A pod whose clients reach the services through the node address.
        let pod = setup.topo.pod("bench");
        for round in 0..rounds {
            for (ci, (case, _, paths)) in cases.iter().enumerate() {
                for &path in paths.iter().filter(|&&p| only.keeps(case, p)) {
                    eprintln!("bench: round {}/{rounds}: {case} via {}", round + 1, path.name());
                    let s = measure(&setup, Some(&pod), case, path, secs, redis_n)?;
                    samples.entry((ci, path)).or_default().push(s);
                }
            }
        }
    }
    // What the per-connection bookkeeping costs: the same agent with it off.
    let no_stats: Vec<usize> =
        (0..NO_STATS_CASES).filter(|&ci| only.keeps(cases[ci].0, Via::SwitchyardNoStats)).collect();
    if !no_stats.is_empty() {
        setup.start_agent(false)?;
    }
    for round in 0..rounds {
        for (ci, (case, _, _)) in cases.iter().enumerate().filter(|(ci, _)| no_stats.contains(ci)) {
            eprintln!("bench: round {}/{rounds}: {case} via {}", round + 1, Via::SwitchyardNoStats.name());
            let s = measure(&setup, None, case, Via::SwitchyardNoStats, secs, redis_n)?;
            samples.entry((ci, Via::SwitchyardNoStats)).or_default().push(s);
        }
    }
    if !no_stats.is_empty() {
        setup.start_agent(true)?;
    }
    let out_dir = crate::workspace_root().join("target/bench");
    // Profiles before the phases that hold thousands of connections: 9,000 held through
    // each of four proxies leave about 64,000 sockets in TIME_WAIT in the node's
    // namespace for a minute, and new connects from one address to one backend then
    // run out of ports (seen: the agent's connects failing with EADDRNOTAVAIL, counted
    // as `local_error`, and wrk getting 4 req/s under perf).
    if profiling {
        profile::run(&setup, secs, &out_dir.join("profile"), only)?;
    }
    if !only.everything() {
        // A partial run: the table of what was measured, no other phase.
        let memory = idle_phase(&setup, idle, only)?;
        let (rows, report) = report(&cases, &samples);
        println!("\n{}", table(&REPORT_HEADER, &rows));
        print_memory(&memory);
        let doc = json!({"quick": quick, "rounds": rounds, "seconds_per_run": secs, "only": only.0,
                         "results": report, "idle_memory": memory});
        let path = write(&out_dir, "only.json", &serde_json::to_string_pretty(&doc)?)?;
        println!("\nJSON: {} (latest.json is left as the last full run wrote it)", path.display());
        return Ok(());
    }
    let held = idle.min(3_000);
    eprintln!("bench: http keep-alive via switchyard, {held} connections open, quiet then admin scraped");
    let (quiet, busy, scrapes) = scraped(&setup, held, secs)?;
    let scraping = json!({
        "connections_open": held, "scrapes": scrapes,
        "quiet": {"rps": quiet.value, "p50_us": quiet.p50_us, "p99_us": quiet.p99_us},
        "scraped": {"rps": busy.value, "p50_us": busy.p50_us, "p99_us": busy.p99_us},
    });
    let memory = idle_phase(&setup, idle, only)?;

    // The agent idle again after every load above: what its working set grew to.
    let mut at_rest = at_rest;
    if let Some(pid) = setup.proxy_pid(Via::Switchyard) {
        at_rest["rss_after_load_mib"] = json!(status_kib(pid, "VmRSS") / 1024.0);
    }

    let (rows, report) = report(&cases, &samples);
    println!("\n{}", table(&REPORT_HEADER, &rows));
    print_memory(&memory);
    println!(
        "\nagent at rest: RSS {:.1} MiB after start-up, {:.1} MiB idle after the loads; start-up peak {:.1} MiB, binary {:.1} MiB",
        at_rest["rss_mib"].as_f64().unwrap_or(0.0),
        at_rest["rss_after_load_mib"].as_f64().unwrap_or(0.0),
        at_rest["startup_peak_mib"].as_f64().unwrap_or(0.0),
        at_rest["binary_mib"].as_f64().unwrap_or(0.0)
    );
    let us = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.0} us"));
    println!(
        "\nadmin API scraped (/metrics and /conns 10 times a second each, {held} connections open, {scrapes} scrapes):\n  \
         keep-alive via switchyard: quiet {:.0} req/s, p99 {}; scraped {:.0} req/s, p99 {}",
        quiet.value,
        us(quiet.p99_us),
        busy.value,
        us(busy.p99_us)
    );
    std::fs::create_dir_all(&out_dir)?;
    // The proxies and their backends go first: the scale phase measures the agent's CPU.
    drop(setup);
    let scale = scale::run(bin, quick)?;
    let doc = json!({
        "quick": quick, "rounds": rounds, "seconds_per_run": secs,
        "cpus": "proxy on CPU 0 (one worker), load generator and backends on CPU 1",
        "results": report, "idle_memory": memory, "agent_at_rest": at_rest, "admin_scraped": scraping,
        "scale": scale,
    });
    let path = write(&out_dir, "latest.json", &serde_json::to_string_pretty(&doc)?)?;
    println!("\nJSON: {}", path.display());
    Ok(())
}

/// `cargo xtask bench --scale`: the scale phase alone. Its result replaces the `scale`
/// entry of target/bench/latest.json (the rest of that file stays from the last full run),
/// and is also written on its own to target/bench/scale.json.
pub fn run_scale(bin: &Path, quick: bool) -> anyhow::Result<()> {
    let scale = scale::run(bin, quick)?;
    let out_dir = crate::workspace_root().join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    write(&out_dir, "scale.json", &serde_json::to_string_pretty(&scale)?)?;
    let latest = out_dir.join("latest.json");
    let mut doc: Value = std::fs::read_to_string(&latest)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}));
    doc["scale"] = scale;
    let path = write(&out_dir, "latest.json", &serde_json::to_string_pretty(&doc)?)?;
    println!("\nJSON: {} (and scale.json beside it)", path.display());
    Ok(())
}

/// Memory per idle connection through each L4 proxy (those `only` keeps, as "idle
/// connections via PATH").
fn idle_phase(setup: &Setup, idle: u64, only: &Only) -> anyhow::Result<Vec<Value>> {
    let mut memory = Vec::new();
    for path in IDLE_PATHS.into_iter().filter(|&p| only.keeps(IDLE_CASE, p)) {
        eprintln!("bench: {idle} idle connections via {}", path.name());
        let (rss_mib, per_conn) = idle_memory(setup, path, idle)?;
        memory.push(json!({"proxy": path.name(), "idle_connections": idle, "rss_mib": rss_mib, "bytes_per_connection": per_conn}));
    }
    Ok(memory)
}

const IDLE_CASE: &str = "idle connections";
const IDLE_PATHS: [Via; 4] = [Via::Switchyard, Via::HaproxyTcp, Via::NginxTcp, Via::EnvoyTcp];

fn print_memory(memory: &[Value]) {
    println!("\nidle connections (memory):");
    for m in memory {
        println!(
            "  {:<28} {} conns: RSS {:.1} MiB, {:.0} bytes per connection",
            m["proxy"].as_str().unwrap_or(""),
            m["idle_connections"],
            m["rss_mib"].as_f64().unwrap_or(0.0),
            m["bytes_per_connection"].as_f64().unwrap_or(0.0)
        );
    }
}

type Case<'a> = (&'a str, &'a str, &'a [Via]);

/// The agent without bookkeeping (`agent.stats: false`) runs the first this many cases.
const NO_STATS_CASES: usize = 3;

const REPORT_HEADER: [&str; 9] =
    ["case", "path", "result", "/direct", "/haproxy", "spread", "p50 us", "p99 us", "proxy cpu us/req (/GiB)"];

/// The table rows and JSON entries of what was measured: mean, spread across rounds,
/// ratios to direct and to HAProxy tcp (NaN when those were not measured, as in a
/// partial run).
fn report(cases: &[Case], samples: &BTreeMap<(usize, Via), Vec<Sample>>) -> (Vec<Vec<String>>, Vec<Value>) {
    let mean = |v: &[Sample], f: fn(&Sample) -> Option<f64>| {
        let xs: Vec<f64> = v.iter().filter_map(f).collect();
        (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
    };
    let value_of =
        |ci: usize, path: Via| samples.get(&(ci, path)).and_then(|v| mean(v, |s| Some(s.value))).unwrap_or(f64::NAN);
    let mut rows = Vec::new();
    let mut report = Vec::new();
    for (ci, (case, unit, paths)) in cases.iter().enumerate() {
        let (direct, haproxy) = (value_of(ci, Via::Direct), value_of(ci, Via::HaproxyTcp));
        let measured: Vec<Via> = samples.keys().filter(|(c, _)| *c == ci).map(|(_, v)| *v).collect();
        for &path in paths.iter().chain(measured.iter().filter(|v| !paths.contains(v))) {
            let Some(v) = samples.get(&(ci, path)) else { continue };
            let m = mean(v, |s| Some(s.value)).unwrap_or(f64::NAN);
            let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(lo, hi), s| (lo.min(s.value), hi.max(s.value)));
            let spread = if v.len() > 1 { (hi - lo) / m * 100.0 } else { 0.0 };
            let cpu = mean(v, |s| s.cpu);
            let (p50, p99) = (mean(v, |s| s.p50_us), mean(v, |s| s.p99_us));
            rows.push(vec![
                case.to_string(),
                path.name().into(),
                format!("{m:.2} {unit}"),
                format!("{:.2}x", m / direct),
                format!("{:.2}x", m / haproxy),
                if v.len() > 1 { format!("±{spread:.0}%") } else { "-".into() },
                p50.map_or("-".into(), |x| format!("{x:.0}")),
                p99.map_or("-".into(), |x| format!("{x:.0}")),
                cpu.map_or("-".into(), |x| format!("{x:.1}")),
            ]);
            report.push(json!({
                "case": case, "path": path.name(), "unit": unit, "values": v.iter().map(|s| s.value).collect::<Vec<_>>(),
                "mean": m, "spread_pct": spread, "ratio_to_direct": m / direct, "ratio_to_haproxy_tcp": m / haproxy,
                "p50_us": p50, "p99_us": p99,
                "proxy_cpu_us_per_unit": cpu, "cpu_unit": if *case == "tcp bulk" { "GiB" } else { "request" },
            }));
        }
    }
    (rows, report)
}

fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line =
        |cells: Vec<String>| cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ");
    std::iter::once(line(header.iter().map(|h| h.to_string()).collect()))
        .chain(rows.iter().map(|r| line(r.clone())))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_failure_counters_that_moved_are_shown() {
        let text = "# HELP switchyard_unserved_connections Redirected connections closed without an endpoint\n\
                    switchyard_unserved_connections_total{service=\"web\",reason=\"no_endpoint\"} 776\n\
                    switchyard_unserved_connections_total{service=\"db\",reason=\"no_endpoint\"} 0\n\
                    switchyard_connect_failures_total{service=\"web\",reason=\"refused\"} 10\n\
                    switchyard_connections_total{service=\"web\",endpoint=\"10.0.0.1:80\"} 5\n\
                    switchyard_saturations_total 0\n";
        assert_eq!(
            nonzero_failures(text),
            [
                "switchyard_unserved_connections_total{service=\"web\",reason=\"no_endpoint\"} 776",
                "switchyard_connect_failures_total{service=\"web\",reason=\"refused\"} 10",
            ]
        );
    }
}
