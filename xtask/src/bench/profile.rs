//! `cargo xtask bench --profile`: where the agent's time goes, measured the same way on
//! every run (docs/performance.md reads these). For each case: `perf record` of the agent
//! for the run (on-CPU samples with call chains; software clock, which works where
//! hardware counters do not), reported by symbol; then the same run under `strace -c`,
//! reported as system calls per request; then under `perf stat` of uprobes on the C
//! allocator's entry points, reported as heap allocations per request. Reports (and the
//! perf.data files, for other views with `perf report -i`) land in
//! target/bench/profile/.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;

use super::{Only, Setup, Via, measure};

/// (case, path, file stem) profiled.
const PROFILED: [(&str, Via, &str); 4] = [
    ("http keep-alive", Via::Switchyard, "tcp-keepalive"),
    ("http new connection", Via::Switchyard, "tcp-new-connection"),
    ("http keep-alive", Via::SwitchyardHttp, "http-keepalive"),
    ("http new connection", Via::SwitchyardHttp, "http-new-connection"),
];

pub fn run(setup: &Setup, secs: u64, dir: &Path, only: &Only) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let pid = setup.proxy_pid(Via::Switchyard).context("the agent runs")?.to_string();
    for (case, path, stem) in PROFILED.into_iter().filter(|(case, path, _)| only.keeps(case, *path)) {
        eprintln!("bench: profiling {case} via {} (perf)", path.name());
        let data = dir.join(format!("{stem}.perf.data"));
        let mut perf =
            tracer("perf", &["record", "-q", "-F", "1999", "-g", "-e", "cpu-clock", "-p", &pid, "-o"], &data)?;
        let sample = measure(setup, None, case, path, secs, 0);
        stop(&mut perf, "perf record");
        let sample = sample?;
        let report = Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "--percent-limit",
                "0.8",
                "--sort",
                "dso,symbol",
                "-g",
                "none",
                "-i",
            ])
            .arg(&data)
            .output()
            .context("perf report")?;
        let by_dso = Command::new("perf")
            .args(["report", "--stdio", "--no-children", "--sort", "dso", "-g", "none", "-i"])
            .arg(&data)
            .output()
            .context("perf report by object")?;
        let text = format!("{}\n{}", String::from_utf8_lossy(&by_dso.stdout), String::from_utf8_lossy(&report.stdout));
        std::fs::write(
            dir.join(format!("{stem}.perf.txt")),
            format!("{case} via {}: {:.0} req/s\n\n{text}", path.name(), sample.value),
        )?;
        // perf.data stays beside the report, for `perf report -i` with other views.

        eprintln!("bench: profiling {case} via {} (strace -c)", path.name());
        let out = dir.join(format!("{stem}.strace.txt"));
        let mut strace = tracer("strace", &["-c", "-f", "-p", &pid, "-o"], &out)?;
        // Let it attach to every thread before the load starts.
        std::thread::sleep(Duration::from_millis(300));
        let traced = measure(setup, None, case, path, secs, 0);
        stop(&mut strace, "strace");
        let requests = traced?.value * secs as f64;
        let summary = std::fs::read_to_string(&out).unwrap_or_default();
        let per_request = per_request(&summary, requests);
        std::fs::write(
            &out,
            format!(
                "{case} via {} under strace: {requests:.0} requests\n\n{summary}\nper request:\n{per_request}",
                path.name()
            ),
        )?;
        eprintln!("   system calls per request: {}", per_request.lines().take(6).collect::<Vec<_>>().join(", "));

        eprintln!("bench: profiling {case} via {} (allocations)", path.name());
        let out = dir.join(format!("{stem}.alloc.txt"));
        let report = allocations(setup, case, path, secs, &pid, &out)?;
        eprintln!("   heap allocations per request: {}", report.lines().last().unwrap_or_default());
    }
    Ok(())
}

/// The allocator entry points counted: a call to any of them is one heap allocation (a
/// realloc may move a block, and counts as one).
const ALLOCATORS: [&str; 3] = ["malloc", "calloc", "realloc"];
/// The uprobe group, ours alone, so that removing it removes nothing else.
const PROBES: &str = "switchyard_bench";

/// Count the agent's heap allocations over one run of `case`, with uprobes on the C
/// allocator of the libc it has mapped (the agent uses the system allocator), and write
/// the report to `out`. The probes fire only in the agent (perf stat filters by pid) and
/// are removed when this returns, whatever happened.
fn allocations(setup: &Setup, case: &str, path: Via, secs: u64, pid: &str, out: &Path) -> anyhow::Result<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).context("read the agent's maps")?;
    let libc = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/libc.so"))
        .context("the agent maps no libc")?
        .to_string();
    let mut add = Command::new("perf");
    add.args(["probe", "-q", "-x", &libc]);
    for f in ALLOCATORS {
        add.args(["-a", &format!("{PROBES}:{f}={f}")]);
    }
    let _probes = Probes::add(add)?;
    let events = ALLOCATORS.map(|f| format!("{PROBES}:{f}")).join(",");
    let mut stat = tracer("perf", &["stat", "-x", ",", "-e", &events, "-p", pid, "-o"], out)?;
    std::thread::sleep(Duration::from_millis(300));
    let counted = measure(setup, None, case, path, secs, 0);
    stop(&mut stat, "perf stat");
    let requests = counted?.value * secs as f64;
    let csv = std::fs::read_to_string(out).unwrap_or_default();
    let counts = stat_counts(&csv);
    anyhow::ensure!(counts.len() == ALLOCATORS.len(), "perf stat counted {counts:?}, not the allocator probes:\n{csv}");
    let mut report = format!("{case} via {} under allocator probes: {requests:.0} requests\n\n", path.name());
    for (event, n) in &counts {
        report += &format!("{event} {:.2} per request ({n} calls)\n", *n as f64 / requests.max(1.0));
    }
    let total: u64 = counts.iter().map(|(_, n)| n).sum();
    report += &format!("total {:.2}\n", total as f64 / requests.max(1.0));
    std::fs::write(out, &report)?;
    Ok(report)
}

/// `perf stat -x ,` lines as (event, count); uncounted events are left out.
fn stat_counts(csv: &str) -> Vec<(String, u64)> {
    csv.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let n = f.first()?.parse().ok()?;
            let event = f.get(2)?.strip_prefix(PROBES)?.trim_start_matches(':');
            Some((event.to_string(), n))
        })
        .collect()
}

/// Our uprobes while they exist: added by `add`, removed on drop.
struct Probes;

impl Probes {
    fn add(mut add: Command) -> anyhow::Result<Self> {
        // Left over from a run that was killed: would make the add fail.
        Self::remove();
        let status = add.status().context("run perf probe")?;
        anyhow::ensure!(status.success(), "perf probe could not add uprobes on the allocator ({status})");
        Ok(Self)
    }

    fn remove() {
        let _ = Command::new("perf")
            .args(["probe", "-q", "-d", &format!("{PROBES}:*")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        Self::remove();
    }
}

/// Start `program args out` (a tracer attaching to the agent, writing its report to
/// `out`), quietly.
fn tracer(program: &str, args: &[&str], out: &Path) -> anyhow::Result<std::process::Child> {
    Command::new(program)
        .args(args)
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("start {program} {}", args.first().unwrap_or(&"")))
}

/// End a tracer we started the way it expects (SIGINT: detach and write its report).
fn stop(child: &mut std::process::Child, what: &str) {
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    if switchyard_tests::wait_bounded(child, Duration::from_secs(60)).is_none() {
        eprintln!("   {what} did not stop on SIGINT; killed");
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// `strace -c`'s table as calls per request, most frequent first.
fn per_request(summary: &str, requests: f64) -> String {
    let mut rows: Vec<(String, f64)> = summary
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // % time, seconds, usecs/call, calls, [errors], syscall
            let calls: f64 = f.get(3)?.parse().ok()?;
            let name = f.last()?.to_string();
            (name != "total").then_some((name, calls))
        })
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    if rows.is_empty() {
        return "(strace reported no system calls)".into();
    }
    rows.iter().map(|(n, c)| format!("{n} {:.2}", c / requests.max(1.0))).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perf_stat_csv_gives_each_probe_its_count() {
        let csv = "# started on Mon Dec  7 12:41:22 2026\n\n15696,,switchyard_bench:malloc,961579633,100.00,,\n\
                   <not counted>,,switchyard_bench:calloc,0,0.00,,\n298235,,switchyard_bench:realloc,961577460,100.00,,\n\
                   12,,other:malloc,1,100.00,,\n";
        assert_eq!(stat_counts(csv), vec![("malloc".to_string(), 15696), ("realloc".to_string(), 298235)]);
    }
}
