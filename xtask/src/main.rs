//! `cargo xtask <command>`: everything beyond a plain `cargo build`.
//!
//! * `bootstrap`: install what the build, tests and demo need (idempotent, fast when done).
//! * `build [--release]`: bootstrap the toolchain, then build the agent.
//! * `test [-- ARGS]`: bootstrap, build the agent and (as root) the debug image, then run
//!   unit and root end-to-end tests.
//! * `image [--debug]`: the container image (static musl binary, OCI layout, see image.rs).
//! * `demo`: bootstrap, build, then show a real client's traffic through the agent.

mod bench;
mod bootstrap;
mod demo;
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
    /// Unit tests and the root-only end-to-end tests. Extra args go to `cargo test`.
    Test {
        #[arg(last = true)]
        args: Vec<String>,
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
            let bin = build_agent(false)?;
            // The image test (tests/tests/image.rs) checks the image built here. A debug
            // build: a release musl build takes about 8 minutes on 2 cores, this about 3, and
            // both go through the same packaging. Unpacking needs root, like the other
            // end-to-end tests; without root the image test skips loudly (fails under CI).
            let image = if bootstrap::is_root() { Some(image::build(false)?) } else { None };
            test(&bin, image.as_ref(), &args)
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
        Cmd::Bench { quick, profile, scale } => {
            ensure!(bootstrap::is_root(), "the benchmark loads eBPF programs and creates namespaces: run it as root");
            bootstrap::all()?;
            if scale {
                // No proxies, backends or load generators: only the agent and the stand-in.
                return bench::run_scale(&build_agent(true)?, quick);
            }
            bootstrap::bench_tools()?;
            if profile {
                bootstrap::profile_tools()?;
            }
            let envoy = bootstrap::envoy(&target_dir().join("bench"))?;
            let bin = build_agent(true)?;
            bootstrap::status(cargo().args([
                "build",
                "--release",
                "--package",
                "switchyard-tests",
                "--bin",
                "sy-probe",
            ]))
            .context("build sy-probe")?;
            bench::run(&bin, &target_dir().join("release/sy-probe"), &envoy, quick, profile)
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

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

/// `cargo test --workspace` with the agent binary handed to the end-to-end tests, output
/// passed through, and one closing line that adds up every suite.
fn test(bin: &std::path::Path, image: Option<&image::Image>, args: &[String]) -> anyhow::Result<()> {
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
    println!("\ntotal: {passed} passed, {failed} failed");
    ensure!(status.success(), "cargo test failed ({status})");
    ensure!(passed > 0, "no test ran");
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
