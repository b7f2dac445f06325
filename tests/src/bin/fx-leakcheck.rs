//! Exits non-zero, listing them, when the test suite left network namespaces, cgroups, bpffs
//! mounts or directories behind. `cargo xtask test` runs it after every test run.

fn main() -> std::process::ExitCode {
    let leaks = ferrox_tests::harness::leaks::find("");
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
