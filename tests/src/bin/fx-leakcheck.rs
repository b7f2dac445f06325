//! Exits non-zero, listing them, when the test suite left network namespaces, cgroups, bpffs
//! mounts or directories behind. `cargo xtask test` runs it after every test run.
//!
//! With `--sweep` (run before the tests) it first tears down what a killed run left: clusters
//! and scratch mounts whose owning process is gone. Clusters whose owner still runs (a demo or
//! a benchmark next to the tests) are in use and never counted.

fn main() -> std::process::ExitCode {
    use ferrox_tests::harness::leaks;
    if std::env::args().any(|a| a == "--sweep") {
        let swept = leaks::sweep_stale();
        if !swept.is_empty() {
            eprintln!(
                "leak check: removed {} things an interrupted earlier run left:",
                swept.len()
            );
            for s in &swept {
                eprintln!("  {s}");
            }
        }
    }
    let (leaks, in_use) = leaks::left_behind();
    for u in &in_use {
        eprintln!("leak check: not counted, {u}");
    }
    if leaks.is_empty() {
        eprintln!("leak check: nothing left behind");
        std::process::ExitCode::SUCCESS
    } else {
        eprintln!("leak check: {} things left behind:", leaks.len());
        for l in &leaks {
            eprintln!("  {l}");
        }
        std::process::ExitCode::FAILURE
    }
}
