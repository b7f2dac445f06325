//! Rebuild the kernel programs when the bpf-linker binary changes (a new LLVM, a new linker).
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo::rerun-if-changed={}", linker.display());
    }
}
