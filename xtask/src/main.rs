//! `cargo xtask <command>`: everything beyond a plain `cargo build`.
//!
//! * `bootstrap`: install what the build, tests and demo need (idempotent, fast when done).
//! * `build [--release]`: bootstrap the toolchain, then build the agent.
//! * `test [-- ARGS]`: bootstrap, build the agent and (as root) the debug image, then run
//!   unit and root end-to-end tests, then every fuzz target for a short while.
//! * `fuzz [--seconds N] [TARGET...]`: the fuzz targets (all by default), longer.
//! * `image [--debug]`: the container image (static musl binary, OCI layout, see image.rs).
//! * `soak [--minutes N]`: bootstrap, build, then only the soak test (tests/tests/soak.rs)
//!   for N minutes (default 10), its report passed through.
//! * `demo`: bootstrap, build, then show a real client's traffic through the agent.

mod bench;
mod bootstrap;
mod demo;
mod fuzz;
mod image;

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, ensure};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install rust-src, bpf-linker and the Debian tools the tests and demo use.
    Bootstrap,
    /// Build the agent (target/debug/switchyard, or target/release with --release).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Unit tests, the root-only end-to-end tests, then each fuzz target for a short
    /// while. Extra args go to `cargo test` (and skip the fuzz targets).
    Test {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the fuzz targets in fuzz/ (all, or those named) for a while each; crashing
    /// inputs are saved under fuzz/artifacts/<target>/ (docs/fuzzing.md).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = fuzz::DEFAULT_SECONDS)]
        seconds: u64,
        targets: Vec<String>,
    },
    /// Mixed real load while endpoints, the catalog and the agent itself are disrupted at
    /// random moments (tests/tests/soak.rs; `test` runs a 2-minute one). As root.
    Soak {
        #[arg(long, default_value_t = 10)]
        minutes: u64,
    },
    /// Run the agent against local backends in a throwaway namespace and cgroup.
    Demo,
    /// Build the container image (static musl binary on an empty base) as an OCI layout
    /// and oci-archive under target/image/release/ (target/image/debug/ with --debug).
    Image {
        /// Unoptimised build, tagged <version>-debug: what `cargo xtask test` checks.
        #[arg(long)]
        debug: bool,
    },
    /// Compare Switchyard with direct connections, HAProxy, nginx and Envoy, then measure
    /// it against clusters of 1k-50k Services (table + JSON in target/bench/). About 20
    /// minutes; --quick for a smoke run.
    Bench {
        #[arg(long)]
        quick: bool,
        /// Also profile the agent (perf, strace -c) on the main cases and write the
        /// reports to target/bench/profile/.
        #[arg(long)]
        profile: bool,
        /// Only the scale phase (Kubernetes source, 1k/10k/50k Services; 1k/10k with
        /// --quick): a few minutes.
        #[arg(long, conflicts_with = "profile")]
        scale: bool,
        /// Measure only the case/path pairs whose "CASE via PATH" contains this (repeat
        /// for more), e.g. `--only "keep-alive via switchyard (redirect, http)"` or
        /// `--only "idle connections via switchyard"`; no other phase runs and the result
        /// goes to target/bench/only.json. For working on one figure; the README's table
        /// comes from full runs.
        #[arg(long, conflicts_with = "scale")]
        only: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Bootstrap => bootstrap::all(),
        Cmd::Build { release } => {
            bootstrap::toolchain()?;
            build_agent(release).map(|bin| println!("{}", bin.display()))
        }
        Cmd::Test { args } => {
            bootstrap::all()?;
            // Other builds first: each rebuilds the agent crate in place, and the build
            // under test comes last.
            build_variants()?;
            let bin = build_agent(false)?;
            // The image test (tests/tests/image.rs) checks the image built here. A debug
            // build: a release musl build takes about 8 minutes on 2 cores, this about 3, and
            // both go through the same packaging. Unpacking needs root, like the other
            // end-to-end tests; without root the image test skips loudly (fails under CI).
            let image = if bootstrap::is_root() { Some(image::build(false)?) } else { None };
            let tests = test(&bin, image.as_ref(), &args)?;
            // A filter means "these tests": the fuzz phase would only add minutes.
            let fuzzed = if args.is_empty() {
                fuzz::run_all(&fuzz::targets()?, fuzz::TEST_SECONDS)?
            } else {
                eprintln!("xtask: tests filtered: fuzz targets not run (`cargo xtask fuzz` runs them)");
                Vec::new()
            };
            println!("\ntotal: {}", totals(&tests, &fuzzed));
            ensure!(tests.status.success(), "cargo test failed ({})", tests.status);
            ensure!(tests.passed > 0, "no test ran");
            fuzz_verdict(&fuzzed)
        }
        Cmd::Fuzz { seconds, targets } => {
            bootstrap::cargo_fuzz()?;
            bootstrap::toolchain()?;
            let all = fuzz::targets()?;
            if let Some(unknown) = targets.iter().find(|t| !all.contains(t)) {
                anyhow::bail!("no fuzz target `{unknown}`; fuzz/ has {}", all.join(", "));
            }
            let fuzzed = fuzz::run_all(if targets.is_empty() { &all } else { &targets }, seconds)?;
            println!("\ntotal: {}", fuzz_totals(&fuzzed));
            fuzz_verdict(&fuzzed)
        }
        Cmd::Soak { minutes } => {
            ensure!(bootstrap::is_root(), "the soak loads eBPF programs and creates namespaces: run it as root");
            ensure!(minutes > 0, "--minutes must be at least 1");
            bootstrap::all()?;
            build_variants()?;
            let bin = build_agent(false)?;
            soak(&bin, minutes)
        }
        Cmd::Image { debug } => {
            bootstrap::toolchain()?;
            image::build(!debug).map(drop)
        }
        Cmd::Demo => {
            bootstrap::all()?;
            let bin = build_agent(false)?;
            demo::run(&bin)
        }
        Cmd::Bench { quick, profile, scale, only } => {
            ensure!(bootstrap::is_root(), "the benchmark loads eBPF programs and creates namespaces: run it as root");
            bootstrap::all()?;
            // Another agent build in this run's place (a before/after comparison, with
            // `--only` or `--scale`): SWITCHYARD_BENCH_AGENT=/path/to/switchyard.
            let agent = || match std::env::var_os("SWITCHYARD_BENCH_AGENT") {
                Some(other) => Ok(PathBuf::from(other)),
                None => build_agent(true),
            };
            if scale {
                // No proxies, backends or load generators: only the agent and the stand-in.
                return bench::run_scale(&agent()?, quick);
            }
            bootstrap::bench_tools()?;
            if profile {
                bootstrap::profile_tools()?;
            }
            let envoy = bootstrap::envoy(&target_dir().join("bench"))?;
            let bin = agent()?;
            bootstrap::status(cargo().args([
                "build",
                "--release",
                "--package",
                "switchyard-tests",
                "--bin",
                "sy-probe",
            ]))
            .context("build sy-probe")?;
            bench::run(&bin, &target_dir().join("release/sy-probe"), &envoy, quick, profile, &bench::Only(only))
        }
    }
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Build the agent binary and return its path.
fn build_agent(release: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "--package", "switchyard"]);
    if release {
        cmd.arg("--release");
    }
    bootstrap::status(&mut cmd).context("build the agent")?;
    Ok(target_dir().join(if release { "release" } else { "debug" }).join("switchyard"))
}

/// Other builds of the agent, for the upgrade test in tests/tests/reliability.rs: one with
/// another version and the same hand-over protocols, one that speaks only a later
/// protocol. Set at build time (agent/src/handover.rs reads them).
const VARIANTS: [(&str, &[(&str, &str)]); 2] = [
    ("next", &[("SWITCHYARD_BUILD_VERSION", "switchyard/0.2.0-next")]),
    (
        "protocol3",
        &[("SWITCHYARD_BUILD_VERSION", "switchyard/0.3.0-protocol3"), ("SWITCHYARD_HANDOVER_PROTOCOLS", "3-3")],
    ),
];

/// Build each of [`VARIANTS`] (debug) into target/variants/switchyard-<name>.
fn build_variants() -> anyhow::Result<()> {
    let dir = target_dir().join("variants");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    for (name, env) in VARIANTS {
        let mut cmd = cargo();
        cmd.args(["build", "--package", "switchyard"]).envs(env.iter().copied());
        bootstrap::status(&mut cmd).with_context(|| format!("build the agent variant `{name}`"))?;
        let to = dir.join(format!("switchyard-{name}"));
        std::fs::copy(target_dir().join("debug/switchyard"), &to)
            .with_context(|| format!("copy to {}", to.display()))?;
    }
    Ok(())
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

/// What `cargo test --workspace` reported, added up over its suites.
struct Tests {
    passed: u64,
    failed: u64,
    status: std::process::ExitStatus,
}

/// The closing line of `cargo xtask test`: tests, then fuzz targets (each counts once:
/// clean or crashed).
fn totals(tests: &Tests, fuzzed: &[fuzz::Run]) -> String {
    let mut line = format!("{} passed, {} failed", tests.passed, tests.failed);
    if !fuzzed.is_empty() {
        line += &format!("; {}", fuzz_totals(fuzzed));
    }
    line
}

fn fuzz_totals(fuzzed: &[fuzz::Run]) -> String {
    let crashed = fuzzed.iter().filter(|r| r.crash.is_some()).count();
    let inputs: u64 = fuzzed.iter().filter_map(|r| r.inputs).sum();
    format!("fuzz targets: {} clean, {crashed} crashed ({inputs} inputs)", fuzzed.len() - crashed)
}

/// Fails naming every target that crashed and where its input is.
fn fuzz_verdict(fuzzed: &[fuzz::Run]) -> anyhow::Result<()> {
    let crashes: Vec<String> = fuzzed
        .iter()
        .filter_map(|r| {
            r.crash.as_ref().map(|c| format!("fuzz target `{}` crashed: {}", r.target, c.describe(&r.target)))
        })
        .collect();
    ensure!(crashes.is_empty(), "{}", crashes.join("\n"));
    Ok(())
}

/// `cargo test --workspace` with the agent binary handed to the end-to-end tests, output
/// passed through and every suite's counts added up.
fn test(bin: &std::path::Path, image: Option<&image::Image>, args: &[String]) -> anyhow::Result<Tests> {
    if !bootstrap::is_root() {
        eprintln!("xtask: not root: the end-to-end tests will be SKIPPED (and fail under CI=true)");
    }
    let mut cmd = cargo();
    cmd.args(["test", "--workspace"]).args(args).env("SWITCHYARD_BIN", bin).stdout(Stdio::piped());
    if let Some(image) = image {
        cmd.env("SWITCHYARD_IMAGE", format!("{}:{}", image.layout.display(), image.tag));
    }
    let mut child = cmd.spawn().context("run cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let line = line.context("read cargo test output")?;
        println!("{line}");
        if let Some((p, f)) = suite_counts(&line) {
            passed += p;
            failed += f;
        }
    }
    let status = child.wait().context("wait for cargo test")?;
    Ok(Tests { passed, failed, status })
}

/// Only the soak test, `minutes` long, with its report (`--nocapture`) passed through.
/// The same debug build `test` runs: the soak's figures are of the binary the suite
/// checks. Its own seed is printed; `SWITCHYARD_SOAK_SEED` in the environment repeats it.
fn soak(bin: &std::path::Path, minutes: u64) -> anyhow::Result<()> {
    let status = cargo()
        .args(["test", "--package", "switchyard-tests", "--test", "soak", "--", "--nocapture"])
        .env("SWITCHYARD_BIN", bin)
        .env("SWITCHYARD_SOAK_SECS", (minutes * 60).to_string())
        .status()
        .context("run the soak")?;
    ensure!(status.success(), "the soak failed ({status})");
    Ok(())
}

/// (passed, failed) from a libtest summary line:
/// `test result: ok. 8 passed; 0 failed; 0 ignored; ...`.
fn suite_counts(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let count = |word: &str| {
        rest.split(';')
            .find_map(|part| part.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").strip_suffix(word))
            .and_then(|n| n.trim().parse().ok())
    };
    Some((count(" passed")?, count(" failed")?))
}

#[cfg(test)]
mod tests {
    use super::suite_counts;

    #[test]
    fn reads_libtest_summaries() {
        assert_eq!(
            suite_counts("test result: ok. 8 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out"),
            Some((8, 0))
        );
        assert_eq!(suite_counts("test result: FAILED. 3 passed; 5 failed; 0 ignored"), Some((3, 5)));
        assert_eq!(suite_counts("running 8 tests"), None);
    }
}
