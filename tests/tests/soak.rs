//! The soak: mixed real load for `SWITCHYARD_SOAK_SECS` seconds (default 120; `cargo
//! xtask soak --minutes N` sets it) while endpoints are killed and brought back, the
//! catalog is edited, and the agent is killed (kill -9), restarted and upgraded (hand-over)
//! at random moments. docs/reliability.md ("Soak") states what is asserted and why.
//!
//! Three backend hosts each run the probe echo server (bulk streams), nginx (HTTP/1.1 and
//! h2c), the gRPC server of backends.py and redis. Six loads run throughout, each a
//! process of tests/servers/soak.py in the test cgroup that checks every exchange exactly
//! and prints one timestamped line per exchange. Every failure is then put down to a cause:
//!
//! - cut by an endpoint kill: in flight, on a connection to that host (or, for HTTP,
//!   where the failed request does not say which endpoint it met, in flight at the kill);
//! - cut by agent kill -9: on a connection that was open through the agent when it died;
//! - otherwise a failed new connection (the connection's first exchange) or a cut
//!   established connection (a later one). Both must be zero, and so must corrupted bytes.
//!
//! An idle keep-alive connection that a stopping agent closes (HTTP/1.1) or ends with
//! GOAWAY (HTTP/2) is reconnected by the client, as clients do; these are counted and
//! must fall within an agent event.
//!
//! RSS and descriptors of every agent process are sampled each second; every one that
//! lived long enough must stay flat (bounds below). Every load is bounded in time and
//! count, every wait polls against a deadline, the events are drawn from a seeded
//! generator (the seed is printed; `SWITCHYARD_SOAK_SEED` repeats a run's draws: the same
//! events in the same order, at about the same moments), each agent's log is kept in
//! `target/soak/<seed>/`, and the topology's guards remove the agents, servers, cgroup
//! and namespaces however the test ends.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use switchyard_tests::{
    Agent, Proc, Topology, backends_py, epoch_ms, host_v4, redis_args, require_root, require_tools, switchyard_bin,
    variant_bin, wait_bounded, who_and_blob,
};

const HOSTS: usize = 3;
/// Samples an agent needs before its growth is judged, and those skipped at its start
/// (start-up allocations, the first connections of each upstream pool).
const MIN_SAMPLES: usize = 20;
const WARM_UP_SAMPLES: usize = 5;
/// Flat: the median of the last third of samples at most this far above the first
/// third's. Measured in runs (docs/reliability.md): RSS moves by well under 2 MiB and
/// descriptors by a handful with the load's own ups and downs.
const RSS_GROWTH_MAX: f64 = 0.10;
const RSS_GROWTH_SLACK_KB: u64 = 2048;
const FD_GROWTH_MAX: i64 = 8;

/// xorshift64*: the events' only source of chance, so a seed repeats a run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545f4914f6cdd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo))
    }
}

/// nginx on host `i`, one process (`master_process off`, so SIGKILL takes all of it):
/// HTTP/1.1 on :8080, h2c on :8081; `/who` names the host, `/blob` is `blob`.
fn nginx(topo: &Topology, i: usize, blob: &Path) -> Proc {
    let dir = topo.dir.path().join(format!("nginx-{i}"));
    topo.nginx(
        i,
        &dir,
        "master_process off;",
        "  access_log off;\n  keepalive_requests 100000;",
        &who_and_blob(i, blob),
    )
}

/// Every server of host `i`; killing the host's endpoints is dropping these.
fn start_host(topo: &Topology, i: usize, blob: &Path) -> Vec<Proc> {
    let ip = host_v4(i);
    let mut grpc = backends_py();
    grpc.args(["grpc-server", "--listen", &format!("{ip}:50051"), "--id", &format!("h{i}")]);
    let mut redis = Command::new("redis-server");
    redis.args(redis_args(&ip, 6379));
    vec![
        topo.echo_server(i, 7000, 0),
        nginx(topo, i, blob),
        topo.host_server(i, &mut grpc, &format!("{ip}:50051")),
        topo.host_server(i, &mut redis, &format!("{ip}:6379")),
    ]
}

fn endpoints(port: u16, weights: &[u32; HOSTS], removed: Option<usize>) -> String {
    (0..HOSTS)
        .filter(|h| Some(*h) != removed)
        .map(|h| format!("{{ address: \"{}:{port}\", weight: {} }}", host_v4(h), weights[h]))
        .collect::<Vec<_>>()
        .join(", ")
}

const CHECK: &str = "health_check: { kind: tcp, interval: 200ms, timeout: 500ms, rise: 1, fall: 1 }";

/// The file's services: bulk streams, HTTP/1.1, gRPC.
fn config(topo: &Topology, catalog: &Path) -> String {
    let all = endpoints(0, &[1; HOSTS], None);
    let eps = |port: u16| all.replace(":0\"", &format!(":{port}\""));
    format!(
        r#"agent:
  cgroup: {cg}
  catalog: {catalog}
  drain_timeout_secs: 10
services:
  - {{ name: bulk, addresses: ["10.96.0.10:7000"], endpoints: [{e7000}], {CHECK} }}
  - {{ name: web, addresses: ["10.96.0.30:80"], endpoints: [{e8080}], {CHECK} }}
  - {{ name: grpc, addresses: ["10.96.0.32:50051"], endpoints: [{e50051}], {CHECK} }}
"#,
        cg = topo.cgroup.path.display(),
        catalog = catalog.display(),
        e7000 = eps(7000),
        e8080 = eps(8080),
        e50051 = eps(50051),
    )
}

/// The catalog's services (h2c, redis, a second bulk service): weights and one endpoint
/// taken out are what the soak edits.
#[derive(Clone, Copy)]
struct CatalogState {
    weights: [u32; HOSTS],
    removed: Option<usize>,
}

fn catalog_text(s: CatalogState) -> String {
    let svc = |name: &str, addr: &str, port: u16| {
        format!(
            "  - {{ name: {name}, addresses: [\"{addr}\"], endpoints: [{}], {CHECK} }}\n",
            endpoints(port, &s.weights, s.removed)
        )
    };
    format!(
        "services:\n{}{}{}",
        svc("web-h2", "10.96.0.31:80", 8081),
        svc("redis", "10.96.0.50:6379", 6379),
        svc("bulk-cat", "10.96.0.11:7000", 7000)
    )
}

/// Save as editors do: write a temporary file, rename it over the catalog.
fn save_catalog(path: &Path, s: CatalogState) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, catalog_text(s)).expect("write catalog");
    std::fs::rename(&tmp, path).expect("rename catalog");
}

/// One load: a soak.py client in the test cgroup, its output read as it comes.
struct LoadProc {
    kind: &'static str,
    child: Child,
    out: thread::JoinHandle<Vec<String>>,
}

fn start_load(topo: &Topology, kind: &'static str, target: &str, args: &[&str], secs: u64, blob: &Path) -> LoadProc {
    let mut cmd = switchyard_tests::server_py("soak.py");
    cmd.args([kind, "--target", target, "--duration", &secs.to_string()])
        .args(["--max", &(secs * 200).to_string(), "--blob"])
        .arg(blob)
        .args(args);
    let mut child = topo.in_node(&mut cmd, true).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
    let stdout = child.stdout.take().expect("stdout");
    let out = thread::spawn(move || BufReader::new(stdout).lines().map_while(Result::ok).collect());
    LoadProc { kind, child, out }
}

/// One exchange of a load (see soak.py).
#[derive(Debug, Clone)]
struct Rec {
    kind: &'static str,
    conn_start: u128,
    start: u128,
    end: u128,
    first: bool,
    outcome: String,
    endpoint: Option<usize>,
    bytes: u64,
    detail: String,
}

fn parse(kind: &'static str, line: &str) -> Option<Rec> {
    let mut f = line.splitn(9, ' ');
    (f.next()? == "rec").then_some(())?;
    let mut num = || f.next()?.parse::<u128>().ok();
    let (conn_start, start, end) = (num()?, num()?, num()?);
    Some(Rec {
        kind,
        conn_start,
        start,
        end,
        first: f.next()? == "1",
        outcome: f.next()?.to_owned(),
        endpoint: f.next()?.parse().ok(),
        bytes: f.next()?.parse().ok()?,
        detail: f.next().unwrap_or("").to_owned(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    EndpointKill(usize),
    EndpointBack(usize),
    CatalogEdit,
    AgentKill,
    AgentStartAfterKill,
    Restart,
    Upgrade,
}

#[derive(Debug, Clone)]
struct Ev {
    kind: Kind,
    what: String,
    begin: u128,
    done: u128,
    /// When its effects are over: for a hand-over, when the old agent has drained and
    /// exited (its graceful closes come then); else `done`.
    settled: u128,
}

/// One agent process's samples: (ms since the soak began, VmRSS kB, open descriptors).
struct Life {
    label: String,
    pid: i32,
    sampling: bool,
    samples: Vec<(u128, u64, i64)>,
}

fn sample(pid: i32) -> Option<(u64, i64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as i64;
    Some((rss, fds))
}

/// A host other than `not`, drawn at random.
fn pick_host(rng: &mut Rng, not: Option<usize>) -> Option<usize> {
    let candidates: Vec<usize> = (0..HOSTS).filter(|h| Some(*h) != not).collect();
    candidates.get(rng.below(candidates.len() as u64) as usize).copied()
}

fn median<T: Copy + Ord>(v: &[T]) -> T {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

/// The agent in charge now, and how it came to be.
struct Running {
    agent: Agent,
    bin: PathBuf,
    life: usize,
}

struct Soak<'t> {
    topo: &'t Topology,
    config: String,
    lives: Arc<Mutex<Vec<Life>>>,
    events: Vec<Ev>,
    t0: u128,
    logs: PathBuf,
}

impl Soak<'_> {
    fn start_agent(&mut self, bin: &Path, label: String) -> Running {
        let agent = Agent::start_bin(bin, self.topo, &self.config);
        let mut lives = self.lives.lock().unwrap();
        lives.push(Life { label, pid: agent.pid(), sampling: true, samples: Vec::new() });
        Running { agent, bin: bin.to_owned(), life: lives.len() - 1 }
    }

    fn stop_sampling(&self, r: &Running) {
        self.lives.lock().unwrap()[r.life].sampling = false;
    }

    fn keep_log(&self, life: usize, log: &str) {
        let _ = std::fs::write(self.logs.join(format!("agent-{}.log", life + 1)), log);
    }

    fn event(&mut self, kind: Kind, what: String, begin: u128) {
        let done = epoch_ms();
        let ev = Ev { kind, what, begin, done, settled: done };
        let at = (ev.begin - self.t0) as f64 / 1000.0;
        eprintln!("soak event at +{at:.3}s: {} ({} ms)", ev.what, ev.done - ev.begin);
        self.events.push(ev);
    }

    /// A new agent process takes over from `old` by hand-over; `old` drains and exits.
    fn hand_over(&mut self, old: Running, bin: &Path, kind: Kind) -> Running {
        let begin = epoch_ms();
        self.stop_sampling(&old);
        let n = self.lives.lock().unwrap().len() + 1;
        let label = format!("agent {n} ({})", if kind == Kind::Upgrade { "upgrade" } else { "restart" });
        let new = self.start_agent(bin, label);
        let what = format!("{:?} to agent {n} ({})", kind, bin.display()).to_lowercase();
        self.event(kind, what, begin);
        let life = old.life;
        let (status, log) = old.agent.wait_exit(Duration::from_secs(30));
        self.events.last_mut().expect("the hand-over event").settled = epoch_ms();
        self.keep_log(life, &log);
        assert!(status.success() && log.contains("handed over to a new agent"), "old agent after hand-over: {status}");
        assert!(new.agent.log().contains("took over the running agent's listeners"), "{}", new.agent.log());
        new
    }
}

#[test]
fn soak() {
    if !require_root("soak") {
        return;
    }
    require_tools(&["nginx", "redis-server", "python3"]);
    let secs: u64 = std::env::var("SWITCHYARD_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(120).max(30);
    let seed: u64 = std::env::var("SWITCHYARD_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| epoch_ms() as u64 ^ u64::from(std::process::id()) << 32)
        | 1;
    println!("soak: {secs} s, seed {seed} (SWITCHYARD_SOAK_SEED={seed} repeats the events)");
    let mut rng = Rng(seed);

    let topo = Topology::with_hosts(HOSTS);
    let blob = topo.blob();
    let mut hosts: Vec<Vec<Proc>> = (0..HOSTS).map(|i| start_host(&topo, i, &blob)).collect();
    let catalog = topo.dir.path().join("catalog.yaml");
    let mut cat = CatalogState { weights: [1; HOSTS], removed: None };
    save_catalog(&catalog, cat);
    let logs = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../target/soak/{seed}"));
    std::fs::create_dir_all(&logs).expect("soak log dir");
    // Upgrades alternate between this build and another version of it (xtask's VARIANTS).
    let bins = [switchyard_bin(), variant_bin("next")];

    let lives = Arc::new(Mutex::new(Vec::new()));
    let mut soak = Soak { topo: &topo, config: config(&topo, &catalog), lives, events: Vec::new(), t0: 0, logs };
    let mut running = Some(soak.start_agent(&bins[0], "agent 1 (start)".into()));

    // Sampler: each agent process in charge, once a second.
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = epoch_ms();
    soak.t0 = t0;
    let sampler = {
        let (lives, stop) = (Arc::clone(&soak.lives), Arc::clone(&stop));
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for life in lives.lock().unwrap().iter_mut().filter(|l| l.sampling) {
                    if let Some((rss, fds)) = sample(life.pid) {
                        life.samples.push((epoch_ms() - t0, rss, fds));
                    }
                }
                thread::sleep(Duration::from_secs(1));
            }
        })
    };

    let bulk = ["--workers", "2", "--per-conn", "1", "--pause-ms", "50", "--bytes", "1048576"];
    let keepalive = ["--workers", "2", "--per-conn", "20", "--pause-ms", "20"];
    let loads = vec![
        start_load(&topo, "bulk", "10.96.0.10:7000", &bulk, secs, &blob),
        start_load(&topo, "bulk", "10.96.0.11:7000", &[&["--workers", "1"], &bulk[2..]].concat(), secs, &blob),
        start_load(&topo, "http1", "10.96.0.30:80", &keepalive, secs, &blob),
        start_load(&topo, "h2", "10.96.0.31:80", &keepalive, secs, &blob),
        start_load(&topo, "grpc", "10.96.0.32:50051", &["--workers", "1", "--per-conn", "30"], secs, &blob),
        start_load(&topo, "redis", "10.96.0.50:6379", &keepalive, secs, &blob),
    ];

    // Chaos. Agent events only in the first 60%, so the last agent lives long enough to
    // judge growth; endpoint kills and catalog edits go on to the end. Never more than
    // one host down; no kill -9 within 2 s of an endpoint kill (the kernel's fallback set
    // must have dropped the dead endpoint, since no agent will update it meanwhile), and
    // no endpoint kill within 2 s of the agent's start after a kill -9 (keep-alive
    // connections the kernel sent straight to an endpoint while no agent ran live on for
    // up to a second; their end at that endpoint's kill is neither the agent's doing nor
    // a cut through it).
    let end = Instant::now() + Duration::from_secs(secs);
    let agent_until = Instant::now() + Duration::from_secs(secs * 6 / 10);
    let mut next = Instant::now() + Duration::from_secs(3);
    let mut down: Option<(usize, Instant)> = None;
    let mut last_endpoint_kill = Instant::now() - Duration::from_secs(60);
    let mut last_start_after_kill = Instant::now() - Duration::from_secs(60);
    let mut bag: Vec<u8> = Vec::new();
    while Instant::now() + Duration::from_secs(4) < end {
        if let Some((h, at)) = down
            && Instant::now() >= at
        {
            let begin = epoch_ms();
            hosts[h] = start_host(&topo, h, &blob);
            soak.event(Kind::EndpointBack(h), format!("host {h} back"), begin);
            down = None;
        }
        if Instant::now() < next {
            thread::sleep(Duration::from_millis(50));
            continue;
        }
        next = Instant::now() + rng.millis(3000, 8000);
        if bag.is_empty() {
            bag = if Instant::now() < agent_until { vec![0, 1, 2, 3, 4] } else { vec![0, 1] };
        }
        let pick = bag.swap_remove(rng.below(bag.len() as u64) as usize);
        // Past the agent events' end, what is left of a round of them is dropped.
        if pick >= 2 && Instant::now() >= agent_until {
            next = Instant::now();
            continue;
        }
        match pick {
            0 if down.is_none() && last_start_after_kill.elapsed() > Duration::from_secs(2) => {
                let h = pick_host(&mut rng, cat.removed).expect("a host to kill");
                let begin = epoch_ms();
                for p in &mut hosts[h] {
                    p.kill();
                }
                soak.event(Kind::EndpointKill(h), format!("host {h} killed (echo, nginx, grpc, redis)"), begin);
                down = Some((h, Instant::now() + rng.millis(2000, 5000)));
                last_endpoint_kill = Instant::now();
            }
            1 => {
                let begin = epoch_ms();
                let what = match (cat.removed, rng.below(3)) {
                    (Some(h), _) => {
                        cat.removed = None;
                        format!("catalog: host {h} put back")
                    }
                    (None, 0) => {
                        let h = pick_host(&mut rng, down.map(|d| d.0)).expect("a host to take out");
                        cat.removed = Some(h);
                        format!("catalog: host {h} taken out")
                    }
                    _ => {
                        cat.weights = [(); HOSTS].map(|_| 1 + rng.below(5) as u32);
                        format!("catalog: weights {:?}", cat.weights)
                    }
                };
                save_catalog(&catalog, cat);
                soak.event(Kind::CatalogEdit, what, begin);
            }
            2 if last_endpoint_kill.elapsed() > Duration::from_secs(2) => {
                let mut r = running.take().expect("an agent runs");
                let begin = epoch_ms();
                soak.stop_sampling(&r);
                r.agent.kill();
                soak.event(Kind::AgentKill, "agent kill -9".into(), begin);
                soak.keep_log(r.life, &r.agent.log());
                thread::sleep(rng.millis(500, 2500));
                let begin = epoch_ms();
                let n = soak.lives.lock().unwrap().len() + 1;
                let bin = r.bin.clone();
                drop(r);
                running = Some(soak.start_agent(&bin, format!("agent {n} (after kill -9)")));
                soak.event(Kind::AgentStartAfterKill, format!("agent {n} started after kill -9"), begin);
                last_start_after_kill = Instant::now();
            }
            3 => {
                let old = running.take().expect("an agent runs");
                let bin = old.bin.clone();
                running = Some(soak.hand_over(old, &bin, Kind::Restart));
            }
            4 => {
                let old = running.take().expect("an agent runs");
                let bin = if old.bin == bins[0] { bins[1].clone() } else { bins[0].clone() };
                running = Some(soak.hand_over(old, &bin, Kind::Upgrade));
            }
            // Not possible now (a host already down, an endpoint just killed, an agent just
            // started after a kill -9): back in the round, and soon.
            _ => {
                bag.push(pick);
                next = Instant::now() + Duration::from_millis(500);
            }
        }
    }
    if let Some((h, _)) = down {
        let begin = epoch_ms();
        hosts[h] = start_host(&topo, h, &blob);
        soak.event(Kind::EndpointBack(h), format!("host {h} back"), begin);
    }

    // The loads end by themselves at `secs`; a minute more is the bound.
    let mut recs: Vec<Rec> = Vec::new();
    let mut per_kind: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for mut l in loads {
        let status = wait_bounded(&mut l.child, Duration::from_secs(90)).expect("load ends within its bound");
        let lines = l.out.join().expect("load output");
        assert!(status.success() && lines.last().is_some_and(|l| l == "done"), "{} load: {status}", l.kind);
        for r in lines.iter().filter_map(|line| parse(l.kind, line)) {
            let e = per_kind.entry(l.kind).or_default();
            if r.outcome == "ok" {
                e.0 += 1
            } else if r.outcome != "retried" {
                e.1 += 1
            }
            recs.push(r);
        }
    }
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    let last = running.take().expect("an agent runs");
    soak.stop_sampling(&last);
    let life = last.life;
    let log = last.agent.stop();
    soak.keep_log(life, &log);
    let elapsed = epoch_ms() - t0;

    // Every failure, put down to a cause.
    let kills = |k: fn(&Kind) -> Option<usize>| soak.events.iter().filter_map(|e| k(&e.kind).map(|h| (h, e))).collect();
    let endpoint_kills: Vec<(usize, &Ev)> = kills(|k| if let Kind::EndpointKill(h) = k { Some(*h) } else { None });
    let agent_kills: Vec<(usize, &Ev)> = kills(|k| (*k == Kind::AgentKill).then_some(0));
    let opaque = |r: &Rec| matches!(r.kind, "bulk" | "redis");
    let cut_by_endpoint = |r: &Rec| {
        endpoint_kills.iter().any(|(h, e)| {
            // Opaque bytes: on a connection to that host. HTTP: that request in flight.
            let from = if opaque(r) { r.conn_start } else { r.start };
            from <= e.done && r.end >= e.begin && r.endpoint.is_none_or(|ep| ep == *h)
        })
    };
    // Until the killed process is reaped its listener still takes connects: those are
    // the dead agent's too.
    let cut_by_agent_kill = |r: &Rec| agent_kills.iter().any(|(_, e)| r.conn_start <= e.done && r.end >= e.begin);
    let mut by_cause: BTreeMap<&str, Vec<&Rec>> = BTreeMap::new();
    let mut corrupted = 0u64;
    for r in &recs {
        let cause = match r.outcome.as_str() {
            "ok" => continue,
            "corrupt" => {
                corrupted += r.bytes;
                "corrupted"
            }
            "retried" => "keep-alive closed by the server, retried",
            _ if cut_by_agent_kill(r) => "cut by agent kill -9",
            _ if cut_by_endpoint(r) => "cut by an endpoint kill",
            _ if r.first => "failed new connection",
            _ => "cut established connection",
        };
        by_cause.entry(cause).or_default().push(r);
    }

    // The report.
    println!("\nsoak report: {:.1} s, seed {seed}", elapsed as f64 / 1000.0);
    println!("  exchanges per load (ok / failed):");
    for (kind, (ok, failed)) in &per_kind {
        println!("    {kind:<6} {ok:>7} / {failed}");
    }
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for e in &soak.events {
        let name = format!("{:?}", e.kind);
        *counts.entry(name.split('(').next().unwrap().to_owned()).or_default() += 1;
    }
    println!("  events: {counts:?}");
    for e in &soak.events {
        let at = |t: u128| (t - t0) as f64 / 1000.0;
        println!("    +{:.3}s..+{:.3}s {}", at(e.begin), at(e.done), e.what);
    }
    for cause in [
        "failed new connection",
        "cut established connection",
        "cut by an endpoint kill",
        "cut by agent kill -9",
        "keep-alive closed by the server, retried",
        "corrupted",
    ] {
        let list = by_cause.get(cause).map(Vec::as_slice).unwrap_or_default();
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for r in list {
            *kinds.entry(r.kind).or_default() += 1;
        }
        println!("  {cause:<42} {:>4} {kinds:?}", list.len());
        // The first three of each load, to read what went wrong.
        let mut shown: BTreeMap<&str, usize> = BTreeMap::new();
        for r in list {
            let n = shown.entry(r.kind).or_default();
            *n += 1;
            if *n > 3 {
                continue;
            }
            let at = |t: u128| (t as f64 - t0 as f64) / 1000.0;
            println!(
                "      {} conn +{:.3}s, exchange +{:.3}s..+{:.3}s, first={}, host {:?}: {}",
                r.kind,
                at(r.conn_start),
                at(r.start),
                at(r.end),
                r.first,
                r.endpoint,
                r.detail
            );
        }
    }
    println!("  corrupted bytes: {corrupted}");
    let lives = soak.lives.lock().unwrap();
    println!("  agent processes (RSS kB / descriptors: first, last, max over its samples):");
    for l in lives.iter() {
        let (Some(f), Some(z)) = (l.samples.first(), l.samples.last()) else { continue };
        let max_rss = l.samples.iter().map(|s| s.1).max().unwrap();
        let max_fd = l.samples.iter().map(|s| s.2).max().unwrap();
        println!(
            "    {:<26} {:>3} s  rss {:>6} {:>6} {:>6}  fds {:>4} {:>4} {:>4}",
            l.label,
            l.samples.len(),
            f.1,
            z.1,
            max_rss,
            f.2,
            z.2,
            max_fd
        );
    }

    // Growth over the life of each agent that lived long enough: medians of the first and
    // last third of its samples after the warm-up.
    let mut judged = 0;
    for l in lives.iter().filter(|l| l.samples.len() >= MIN_SAMPLES) {
        let s = &l.samples[WARM_UP_SAMPLES..];
        let third = s.len() / 3;
        let (early, late) = (&s[..third], &s[s.len() - third..]);
        let rss = |v: &[(u128, u64, i64)]| median(&v.iter().map(|x| x.1).collect::<Vec<_>>());
        let fds = |v: &[(u128, u64, i64)]| median(&v.iter().map(|x| x.2).collect::<Vec<_>>());
        let (rss0, rss1, fd0, fd1) = (rss(early), rss(late), fds(early), fds(late));
        // What a leak of one descriptor per connection would add between the two medians.
        let (from, to) = (t0 + early[third / 2].0, t0 + late[third / 2].0);
        let conns = recs.iter().filter(|r| r.first && r.conn_start >= from && r.conn_start < to).count() as i64;
        println!(
            "  growth of {}: rss {rss0} -> {rss1} kB, fds {fd0} -> {fd1}; {conns} connections between the medians",
            l.label
        );
        let rss_bound = rss0 + ((rss0 as f64 * RSS_GROWTH_MAX) as u64).max(RSS_GROWTH_SLACK_KB);
        assert!(rss1 <= rss_bound, "{}: RSS grew from {rss0} to {rss1} kB (bound {rss_bound})", l.label);
        assert!(fd1 - fd0 <= FD_GROWTH_MAX, "{}: descriptors grew from {fd0} to {fd1}", l.label);
        assert!(conns > 10 * FD_GROWTH_MAX, "too few connections ({conns}) for the descriptor bound to catch a leak");
        judged += 1;
    }
    assert!(judged > 0, "no agent process lived {MIN_SAMPLES} s to judge growth");

    for (kind, (ok, _)) in &per_kind {
        assert!(*ok > 0, "{kind}: no exchange succeeded");
    }
    assert_eq!(per_kind.len(), 5, "every kind of load ran: {per_kind:?}");
    assert_eq!(corrupted, 0, "corrupted bytes: {:?}", by_cause.get("corrupted"));
    for cause in ["failed new connection", "cut established connection", "corrupted"] {
        assert!(by_cause.get(cause).is_none_or(Vec::is_empty), "{cause}: {:?}", by_cause.get(cause));
    }
    // A server may close an idle keep-alive connection (HTTP/1.1) or send GOAWAY (HTTP/2)
    // at any time, and clients then go on on a new connection; the agent does so only
    // when a process stops serving: at a hand-over (graceful) or a kill -9. Anywhere else
    // it would be the agent dropping connections for nothing.
    let agent_event = |r: &Rec| {
        soak.events.iter().any(|e| {
            matches!(e.kind, Kind::AgentKill | Kind::Restart | Kind::Upgrade)
                && r.end >= e.begin
                && r.end <= e.settled + 1000
        })
    };
    let stray: Vec<&&Rec> = by_cause
        .get("keep-alive closed by the server, retried")
        .into_iter()
        .flatten()
        .filter(|r| !agent_event(r))
        .collect();
    assert!(stray.is_empty(), "keep-alive connections closed by the agent outside any agent event: {stray:?}");
    if secs >= 60 {
        for k in ["EndpointKill", "CatalogEdit", "AgentKill", "Restart", "Upgrade"] {
            assert!(counts.get(k).is_some_and(|n| *n > 0), "no {k} event in {secs} s: {counts:?}");
        }
    }
}
