//! The container image `cargo xtask image` writes (`cargo xtask test` builds the debug one
//! first and names it in $SWITCHYARD_IMAGE): read as a container runtime reads it, from
//! the OCI layout with every digest checked, not through the tool that wrote it. Its one
//! layer must hold only a static `/switchyard`, and that binary must run alone in the
//! unpacked root filesystem: `--version`, and `check` on deploy/'s config.

mod manifests;

use std::{
    collections::BTreeMap,
    io::Read as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use object::{
    Endianness,
    elf::{DT_NEEDED, PT_DYNAMIC, PT_INTERP},
    read::elf::{Dyn as _, ElfFile64, FileHeader as _, ProgramHeader as _},
};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use switchyard_tests::{require_root, run, switchyard_bin};

/// The layout directory and tag under test: $SWITCHYARD_IMAGE (`DIR:TAG`), else the one
/// `cargo xtask image --debug` writes.
fn image_under_test() -> (PathBuf, String) {
    let spec = std::env::var("SWITCHYARD_IMAGE").unwrap_or_else(|_| {
        let version = tool_version(&switchyard_bin());
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/image/debug/oci");
        format!("{}:{version}-debug", dir.display())
    });
    let (dir, tag) = spec.rsplit_once(':').unwrap_or_else(|| panic!("SWITCHYARD_IMAGE `{spec}` is not DIR:TAG"));
    let dir = PathBuf::from(dir);
    assert!(
        dir.join("index.json").is_file(),
        "no OCI layout at {}: build it with `cargo xtask image --debug`",
        dir.display()
    );
    (dir, tag.to_owned())
}

fn tool_version(bin: &Path) -> String {
    let out = Command::new(bin).arg("--version").output().unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
    assert!(out.status.success(), "{} --version failed", bin.display());
    String::from_utf8_lossy(&out.stdout).trim().strip_prefix("switchyard ").expect("`switchyard X`").to_owned()
}

/// A blob by descriptor, with its size and sha256 checked as a runtime would.
fn blob(layout: &Path, descriptor: &Value) -> Vec<u8> {
    let digest = descriptor["digest"].as_str().expect("descriptor digest");
    let hex = digest.strip_prefix("sha256:").unwrap_or_else(|| panic!("{digest}: not sha256"));
    let path = layout.join("blobs/sha256").join(hex);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("read blob {}: {e}", path.display()));
    assert_eq!(Some(bytes.len() as u64), descriptor["size"].as_u64(), "size of {digest}");
    assert_eq!(format!("{:x}", Sha256::digest(&bytes)), hex, "content of {digest}");
    bytes
}

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("JSON blob")
}

/// What the layer holds, path to (mode, uid, gid, contents for regular files).
type Files = BTreeMap<String, (u32, u64, u64, Option<Vec<u8>>)>;

struct Image {
    config: Value,
    files: Files,
}

fn read_image() -> Image {
    let (layout, tag) = image_under_test();
    let marker = json(&std::fs::read(layout.join("oci-layout")).expect("oci-layout file"));
    assert_eq!(marker["imageLayoutVersion"], "1.0.0");
    let index = json(&std::fs::read(layout.join("index.json")).expect("index.json"));
    let manifests = index["manifests"].as_array().expect("index manifests");
    let entry = manifests
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag.as_str())
        .unwrap_or_else(|| panic!("no manifest tagged {tag} in {}", layout.display()));
    assert_eq!(entry["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    let manifest = json(&blob(&layout, entry));
    assert_eq!(manifest["config"]["mediaType"], "application/vnd.oci.image.config.v1+json");
    let config = json(&blob(&layout, &manifest["config"]));

    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "one layer on an empty base: {layers:?}");
    assert_eq!(layers[0]["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip");
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(&blob(&layout, &layers[0])[..]).read_to_end(&mut tar).expect("gunzip the layer");
    // The runtime matches the uncompressed layer against the config's diff_ids.
    let diff_ids = config["rootfs"]["diff_ids"].as_array().expect("diff_ids");
    assert_eq!(diff_ids.len(), 1);
    assert_eq!(diff_ids[0], format!("sha256:{:x}", Sha256::digest(&tar)).as_str(), "diff_id of the layer");
    // A complete archive ends in two zero blocks; umoci 0.4.7's `insert` leaves them out,
    // and GNU tar and image scanners then reject the layer.
    assert!(
        tar.len() % 512 == 0 && tar.len() >= 1024 && tar[tar.len() - 1024..].iter().all(|b| *b == 0),
        "the layer is not a complete tar archive"
    );

    let mut files = Files::new();
    let mut archive = tar::Archive::new(&tar[..]);
    for entry in archive.entries().expect("tar entries") {
        let mut entry = entry.expect("tar entry");
        let h = entry.header().clone();
        let path = entry.path().expect("entry path").to_string_lossy().trim_start_matches("./").to_owned();
        let contents = h.entry_type().is_file().then(|| {
            let mut buf = Vec::new();
            entry.read_to_end(&mut buf).expect("read entry");
            buf
        });
        files.insert(path, (h.mode().unwrap(), h.uid().unwrap(), h.gid().unwrap(), contents));
    }
    Image { config, files }
}

/// The one binary, checked to be ELF with no interpreter and no shared library.
fn static_binary(files: &Files) -> &[u8] {
    let regular: Vec<&String> = files.iter().filter(|(_, f)| f.3.is_some()).map(|(p, _)| p).collect();
    assert_eq!(regular, ["switchyard"], "the image holds the agent and nothing else (no shell, no libc)");
    let dirs: Vec<&String> = files.iter().filter(|(_, f)| f.3.is_none()).map(|(p, _)| p).collect();
    assert!(dirs.iter().all(|d| matches!(d.as_str(), "" | "." | "/")), "only the root directory besides: {dirs:?}");
    let (mode, uid, gid, bytes) = &files["switchyard"];
    assert_eq!((mode & 0o7777, uid, gid), (0o755, &0, &0), "root-owned, executable, no setuid");
    bytes.as_deref().unwrap()
}

#[test]
fn image_is_one_static_binary_on_an_empty_base() {
    // Only root builds the image (umoci unpacks as root), so `cargo xtask test` without
    // root has none: skip loudly then, as the other end-to-end tests do.
    if !require_root("image_is_one_static_binary_on_an_empty_base") {
        return;
    }
    let image = read_image();
    let c = &image.config;
    assert_eq!((c["os"].as_str(), c["architecture"].as_str()), (Some("linux"), Some("amd64")));
    assert_eq!(c["config"]["Entrypoint"], serde_json::json!(["/switchyard"]));
    assert_eq!(c["config"]["User"], "0:0");
    let labels = &c["config"]["Labels"];
    assert_eq!(labels["org.opencontainers.image.title"], "switchyard");
    assert_eq!(labels["org.opencontainers.image.version"], tool_version(&switchyard_bin()).as_str());

    let bytes = static_binary(&image.files);
    let elf = ElfFile64::<Endianness>::parse(bytes).expect("the binary is a 64-bit ELF");
    let (header, endian) = (elf.elf_header(), elf.endian());
    assert_eq!(header.e_machine(endian), object::elf::EM_X86_64);
    let segments = header.program_headers(endian, bytes).expect("program headers");
    assert!(
        segments.iter().all(|s| s.p_type(endian) != PT_INTERP),
        "the binary names a dynamic loader (PT_INTERP): it would not run on an empty base"
    );
    // A static-pie has a PT_DYNAMIC for its own relocations, but needs no library.
    for segment in segments.iter().filter(|s| s.p_type(endian) == PT_DYNAMIC) {
        let entries = segment.dynamic(endian, bytes).expect("dynamic section").unwrap_or_default();
        assert!(
            entries.iter().all(|d| d.tag32(endian) != Some(DT_NEEDED as i32)),
            "the binary needs shared libraries (DT_NEEDED)"
        );
    }
}

#[test]
fn image_binary_runs_alone_in_its_root_filesystem() {
    if !require_root("image_binary_runs_alone_in_its_root_filesystem") {
        return;
    }
    let image = read_image();
    let bytes = static_binary(&image.files);
    // The layer's files only: chroot into them, so nothing of the host's can help it.
    let root = tempfile::tempdir().expect("temp dir");
    let bin = root.path().join("switchyard");
    std::fs::write(&bin, bytes).expect("write binary");
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    std::fs::create_dir(root.path().join("etc")).expect("mkdir etc");
    std::fs::write(root.path().join("etc/config.yaml"), manifests::load().agent_config()).expect("write config");
    std::fs::write(root.path().join("etc/bad.yaml"), "agent:\n  listen_port: 0\n").expect("write bad config");
    let in_image = |args: &[&str]| {
        let out = run(Command::new("chroot").arg(root.path()).arg("/switchyard").args(args), Duration::from_secs(30));
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };

    let (ok, out) = in_image(&["--version"]);
    assert!(ok, "{out}");
    assert_eq!(out.trim(), format!("switchyard {}", tool_version(&switchyard_bin())));

    let (ok, out) = in_image(&["check", "--config", "/etc/config.yaml"]);
    assert!(ok && out.contains("/etc/config.yaml: ok"), "the ConfigMap's config, checked by the image: {out}");
    let (ok, out) = in_image(&["check", "--config", "/etc/bad.yaml"]);
    assert!(!ok && out.contains("agent.listen_port"), "a bad config is refused by name: {out}");
}
