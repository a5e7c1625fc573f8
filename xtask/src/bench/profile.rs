//! `cargo xtask bench --profile`: where the agent's time goes, measured the same way on
//! every run (docs/performance.md reads these). For each case: `perf record` of the agent
//! for the run (on-CPU samples with call chains; software clock, which works where
//! hardware counters do not), reported by symbol; then the same run under `strace -c`,
//! reported as system calls per request. Reports (and the perf.data files, for other
//! views with `perf report -i`) land in target/bench/profile/.

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
        let mut perf = Command::new("perf")
            .args(["record", "-q", "-F", "1999", "-g", "-e", "cpu-clock", "-p", &pid, "-o"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start perf record")?;
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
        let mut strace = Command::new("strace")
            .args(["-c", "-f", "-p", &pid, "-o"])
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start strace")?;
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
    }
    Ok(())
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
