//! Rerun when bpf-linker changes: a new linker can change the object we embed.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
