//! Builds the kernel programs (`ebpf/programs`) for bpfel-unknown-none with aya-build, on the
//! pinned toolchain, with `-Z build-std=core` enabled for that sub-build only.
fn main() {
    // SAFETY: build scripts are single-threaded; the variable is read by the child cargo only.
    unsafe {
        std::env::set_var("RUSTC_BOOTSTRAP", "1");
        // Keep the child cargo's progress lines out of our build output; errors still show.
        std::env::set_var("CARGO_TERM_QUIET", "true");
    }
    let program = aya_build::Package {
        name: "ferrox-ebpf",
        root_dir: "../programs",
        ..Default::default()
    };
    if let Err(e) = aya_build::build_ebpf([program], aya_build::Toolchain::Custom("1.98.0")) {
        println!("cargo::error=building the kernel programs failed: {e:#}");
        std::process::exit(1);
    }
}
