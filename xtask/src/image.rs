//! `cargo xtask image`: the container image, built without Docker.
//!
//! One layer holding one file, `/switchyard`, a static musl build (nothing else: no shell,
//! no libc, no CA bundle; the agent reads the cluster CA from its service account). umoci
//! (Debian) writes it as an OCI image layout, which is also tarred into an oci-archive that
//! `skopeo copy oci-archive:...` pushes and `ctr images import` loads.
//!
//! umoci 0.4.7 (Debian 12) is used through `new` + `unpack` + `repack` only: its `insert`
//! writes layers without the tar end-of-archive blocks (umoci#436), which GNU tar and
//! scanners reject. tests/tests/image.rs checks the layer is a complete tar.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, ensure};

use crate::bootstrap::{self, status};

/// The target of the image's binary: statically linked, so the image needs no base.
pub const MUSL: &str = "x86_64-unknown-linux-musl";

/// An image on disk.
pub struct Image {
    /// The OCI image layout directory.
    pub layout: PathBuf,
    /// The tag inside the layout (`org.opencontainers.image.ref.name`).
    pub tag: String,
    /// The same layout as one tar file (an oci-archive).
    pub archive: PathBuf,
}

/// Build the agent for musl and package it. `release: false` builds the unoptimised
/// binary without debug info (about twice as fast to build; what `cargo xtask test`
/// checks) and tags it `<version>-debug`.
pub fn build(release: bool) -> anyhow::Result<Image> {
    ensure!(bootstrap::is_root(), "building the image unpacks layers as root (umoci): run it as root");
    bootstrap::image_tools()?;
    let bin = build_musl(release)?;
    let version = binary_version(&bin)?;
    let flavour = if release { "release" } else { "debug" };
    let tag = if release { version.clone() } else { format!("{version}-debug") };
    let out = crate::target_dir().join("image").join(flavour);
    let layout = out.join("oci");
    let bundle = out.join("bundle");
    for dir in [&layout, &bundle] {
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("remove the previous {}", dir.display()))?;
        }
    }
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;

    let image = format!("{}:{tag}", layout.display());
    status(Command::new("umoci").args(["init", "--layout"]).arg(&layout))?;
    // An image with no layers: the OCI equivalent of `FROM scratch`.
    status(Command::new("umoci").args(["new", "--image", &image]))?;
    status(Command::new("umoci").args(["unpack", "--image", &image]).arg(&bundle))?;
    let dest = bundle.join("rootfs/switchyard");
    std::fs::copy(&bin, &dest).with_context(|| format!("copy {} into the image", bin.display()))?;
    std::fs::set_permissions(&dest, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .with_context(|| format!("chmod {}", dest.display()))?;
    status(
        Command::new("umoci")
            .args(["repack", "--image", &image, "--history.created_by"])
            .arg(format!("cargo xtask image ({flavour} {MUSL} build)"))
            .arg(&bundle),
    )?;
    std::fs::remove_dir_all(&bundle).with_context(|| format!("remove {}", bundle.display()))?;

    let mut config = Command::new("umoci");
    config.args(["config", "--image", &image, "--no-history"]);
    config.args(["--config.entrypoint", "/switchyard"]);
    // The DaemonSet passes its own args; these make `ctr run IMAGE` do the usual thing.
    for arg in ["run", "--config", "/etc/switchyard/config.yaml"] {
        config.args(["--config.cmd", arg]);
    }
    // Root, but only with the capabilities the DaemonSet grants (see deploy/daemonset.yaml).
    config.args(["--config.user", "0:0", "--config.stopsignal", "SIGTERM"]);
    let mut labels = vec![
        ("org.opencontainers.image.title", "switchyard".to_owned()),
        ("org.opencontainers.image.description", "Transparent node agent for service-to-service traffic".into()),
        ("org.opencontainers.image.version", version.clone()),
        ("org.opencontainers.image.licenses", "Apache-2.0".into()),
    ];
    if let Some(rev) = git_revision() {
        labels.push(("org.opencontainers.image.revision", rev));
    }
    for (key, value) in labels {
        config.arg("--config.label").arg(format!("{key}={value}"));
    }
    status(&mut config)?;
    // `config` leaves the previous manifest and config blobs behind.
    status(Command::new("umoci").args(["gc", "--layout"]).arg(&layout))?;

    let archive = out.join(format!("switchyard-{tag}.oci.tar"));
    status(
        Command::new("tar")
            .args(["--create", "--sort=name", "--numeric-owner", "--owner=0", "--group=0", "--file"])
            .arg(&archive)
            .arg("--directory")
            .arg(&layout)
            .args(["oci-layout", "index.json", "blobs"]),
    )?;
    let image = Image { layout, tag, archive };
    println!("{}", summary(&image, &bin)?);
    Ok(image)
}

fn build_musl(release: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = crate::cargo();
    cmd.args(["build", "--package", "switchyard", "--target", MUSL]);
    if release {
        cmd.arg("--release");
    } else {
        // Only the musl units (and so only this build): debug info would make the binary
        // 200 MB and the build slower, and the image test needs neither.
        cmd.env("CARGO_PROFILE_DEV_DEBUG", "false");
    }
    // ring's C and assembly must be built against musl, not glibc (Debian's musl-tools).
    cmd.env(format!("CC_{}", MUSL.replace('-', "_")), "musl-gcc");
    status(&mut cmd).context("build the agent for musl")?;
    Ok(crate::target_dir().join(MUSL).join(if release { "release" } else { "debug" }).join("switchyard"))
}

/// "0.1.0" from `switchyard --version`: the tag follows what the binary says it is.
fn binary_version(bin: &Path) -> anyhow::Result<String> {
    let out = Command::new(bin).arg("--version").output().with_context(|| format!("run {}", bin.display()))?;
    ensure!(out.status.success(), "{} --version failed", bin.display());
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().strip_prefix("switchyard ").map(str::to_owned).with_context(|| format!("odd --version output `{text}`"))
}

fn git_revision() -> Option<String> {
    let out = Command::new("git").args(["rev-parse", "HEAD"]).current_dir(crate::workspace_root()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn summary(image: &Image, bin: &Path) -> anyhow::Result<String> {
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).with_context(|| format!("stat {}", p.display()));
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    Ok(format!(
        "image {}:{}\n  binary {:.1} MiB, oci-archive {} {:.1} MiB (the compressed layer is nearly all of it)",
        image.layout.display(),
        image.tag,
        mib(size(bin)?),
        image.archive.display(),
        mib(size(&image.archive)?),
    ))
}
