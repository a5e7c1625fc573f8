//! The fuzz targets in `fuzz/` (docs/fuzzing.md): built once by cargo-fuzz on nightly,
//! then each run for a fixed time, quietly, from the committed seeds. `cargo xtask test`
//! runs every target for [`TEST_SECONDS`]; `cargo xtask fuzz` for as long as asked.
//!
//! libFuzzer writes every input that finds new coverage into the first corpus directory
//! it is given, so that is a scratch directory under target/ (kept between runs, so a
//! long run's findings help the next) and the committed seeds in fuzz/corpus/ come second,
//! read only. Its chatter goes to a log per target; a crash prints the log's tail and
//! where the crashing input was saved.

use std::{
    fs::File,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, ensure};

/// Seconds each target runs in `cargo xtask test`: past the seeds and the easy
/// branches, while seven targets and the build stay within about three and a half
/// minutes.
pub const TEST_SECONDS: u64 = 20;

/// Seconds each target runs by default in `cargo xtask fuzz`.
pub const DEFAULT_SECONDS: u64 = 300;

/// No single input may take longer than this: a hang is reported like a crash.
const INPUT_TIMEOUT_SECS: u64 = 10;

/// How one target's run ended.
pub struct Run {
    pub target: String,
    /// Inputs tried (libFuzzer's closing "Done N runs" line), when it got that far.
    pub inputs: Option<u64>,
    /// The input that crashed, hung or ran out of memory, as libFuzzer saved it.
    pub crash: Option<Crash>,
}

pub struct Crash {
    /// Where libFuzzer saved the input, as it printed it.
    pub artifact: Option<String>,
    pub log: PathBuf,
}

fn fuzz_dir() -> PathBuf {
    crate::workspace_root().join("fuzz")
}

/// Build outputs apart from the main workspace's: other flags (instrumentation), another
/// toolchain; under target/ so that `cargo clean` and .gitignore cover them.
fn fuzz_target_dir() -> PathBuf {
    crate::target_dir().join("fuzz")
}

/// `cargo +nightly fuzz <sub>` with the options every build and run share (a run with
/// other options would rebuild everything).
fn cargo_fuzz(sub: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args(["+nightly", "fuzz", sub])
        // The agent's code is safe Rust: AddressSanitizer would mostly slow the build and
        // the runs. Overflow checks and debug assertions stay on.
        .args(["--sanitizer", "none", "--debug-assertions"])
        // cargo-fuzz's default of 1 serialises the build of each crate on our two cores.
        .args(["--codegen-units", "16"])
        .arg("--target-dir")
        .arg(fuzz_target_dir())
        .current_dir(crate::workspace_root())
        // Ours is the stable cargo (`cargo xtask` runs under it); the proxy must choose.
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

/// The targets fuzz/ defines, in its order.
pub fn targets() -> anyhow::Result<Vec<String>> {
    let out = cargo_fuzz_list().output().context("run `cargo +nightly fuzz list`")?;
    ensure!(out.status.success(), "`cargo +nightly fuzz list` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    ensure!(!names.is_empty(), "fuzz/ defines no fuzz targets");
    Ok(names)
}

fn cargo_fuzz_list() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args(["+nightly", "fuzz", "list"]).current_dir(crate::workspace_root()).env_remove("CARGO");
    cmd
}

/// Build the targets, then run each for `seconds`; every target runs even after one
/// crashes. Prints a line per target.
pub fn run_all(targets: &[String], seconds: u64) -> anyhow::Result<Vec<Run>> {
    let started = Instant::now();
    eprintln!("xtask: building {} fuzz targets (nightly, instrumented; target/fuzz)", targets.len());
    crate::bootstrap::status(&mut cargo_fuzz("build")).context("build the fuzz targets (fuzz/)")?;
    println!(
        "fuzz: built in {} s; running {} targets for {seconds} s each",
        started.elapsed().as_secs(),
        targets.len()
    );
    let runs = targets.iter().map(|t| run(t, seconds)).collect::<anyhow::Result<Vec<_>>>()?;
    println!("fuzz: done in {} s", started.elapsed().as_secs());
    Ok(runs)
}

fn run(target: &str, seconds: u64) -> anyhow::Result<Run> {
    let seeds = fuzz_dir().join("corpus").join(target);
    ensure!(seeds.is_dir(), "fuzz target `{target}` has no seed corpus at {}", seeds.display());
    let scratch = crate::target_dir().join("fuzz-corpus").join(target);
    let logs = crate::target_dir().join("fuzz-logs");
    for dir in [&scratch, &logs] {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let log = logs.join(format!("{target}.log"));
    let file = File::create(&log).with_context(|| format!("create {}", log.display()))?;
    let status = cargo_fuzz("run")
        .arg(target)
        .arg(&scratch)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .stdout(file.try_clone()?)
        .stderr(file)
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("run fuzz target {target}"))?;
    let (mut inputs, mut artifact) = (None, None);
    for line in BufReader::new(File::open(&log)?).lines() {
        let line = line?;
        inputs = inputs.or(done_runs(&line));
        artifact = artifact.or(saved_input(&line).map(str::to_owned));
    }
    let run = Run {
        target: target.to_owned(),
        inputs,
        crash: (!status.success() || artifact.is_some()).then(|| Crash { artifact, log: log.clone() }),
    };
    match &run.crash {
        None => println!(
            "fuzz {target}: ok, {} inputs in {seconds} s",
            inputs.map_or_else(|| "?".to_owned(), |n| n.to_string())
        ),
        Some(crash) => {
            print_tail(&log)?;
            println!("fuzz {target}: FAILED ({status}); {}", crash.describe(target));
        }
    }
    Ok(run)
}

impl Crash {
    /// What failed and how to see it again.
    pub fn describe(&self, target: &str) -> String {
        match &self.artifact {
            Some(a) => format!(
                "input saved at {a}; reproduce with `cargo +nightly fuzz run {target} {a}`; log {}",
                self.log.display()
            ),
            None => format!("no input was saved (a build or libFuzzer error?); see {}", self.log.display()),
        }
    }
}

/// The last lines of a log: the panic message and backtrace of a crash.
fn print_tail(log: &Path) -> anyhow::Result<()> {
    const LINES: usize = 60;
    let text = std::fs::read_to_string(log).with_context(|| format!("read {}", log.display()))?;
    let lines: Vec<&str> = text.lines().collect();
    for line in &lines[lines.len().saturating_sub(LINES)..] {
        println!("    {line}");
    }
    Ok(())
}

/// The input count of libFuzzer's last line: `Done 123456 runs in 21 second(s)`.
fn done_runs(line: &str) -> Option<u64> {
    line.strip_prefix("Done ")?.split_whitespace().next()?.parse().ok()
}

/// Where libFuzzer saved a crashing, hanging or memory-hungry input:
/// `artifact_prefix='fuzz/artifacts/x/'; Test unit written to fuzz/artifacts/x/crash-0a1b`.
fn saved_input(line: &str) -> Option<&str> {
    Some(line.split_once("Test unit written to ")?.1.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_lines() {
        assert_eq!(done_runs("Done 123456 runs in 21 second(s)"), Some(123456));
        assert_eq!(done_runs("#2048\tpulse  cov: 1 ft: 2 corp: 3/4b"), None);
        assert_eq!(
            saved_input(
                "artifact_prefix='/w/fuzz/artifacts/config/'; Test unit written to /w/fuzz/artifacts/config/crash-0a1b\n"
            ),
            Some("/w/fuzz/artifacts/config/crash-0a1b")
        );
        assert_eq!(saved_input("INFO: Seed: 1"), None);
    }
}
