//! Builds the kernel programs (`ebpf/`) with the nightly toolchain and bpf-linker, and
//! leaves the object in OUT_DIR for `redirect` to embed. `cargo xtask bootstrap` installs
//! what this needs; run it first on a fresh machine.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR is not set")?;
    let root = std::path::Path::new(&manifest).parent().context("agent/ has no parent")?;
    let ebpf = root.join("ebpf");
    // The kernel programs also compile the shared types; rebuild when those change.
    println!("cargo:rerun-if-changed={}", root.join("agent-common").display());
    let ebpf = ebpf.to_str().context("ebpf/ path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "switchyard-ebpf", root_dir: ebpf, ..Default::default() }],
        aya_build::Toolchain::Nightly,
    )
    .context("building the eBPF programs (run `cargo xtask bootstrap` if bpf-linker or rust-src is missing)")
}
