//! Rebuild the kernel programs when the bpf-linker binary changes (a new LLVM, a new linker),
//! and have LLVM expand small memory copies and fills inline.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo::rerun-if-changed={}", linker.display());
    }
    // By default bpf-linker has LLVM expand memcpy "in order" and nothing else inline: every
    // zeroed key padding, every struct copied from a packet became a call to a byte-at-a-time
    // loop (`memset`, `memmove`), tens of ns per packet. Without that option LLVM expands
    // fixed-size copies and fills into plain loads and stores.
    println!("cargo::rustc-link-arg-bins=--disable-expand-memcpy-in-order");
}
