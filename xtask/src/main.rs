//! `cargo xtask setup | build | test | demo | lint | image`: the project's commands.
//!
//! `test`, `demo` and `build` run `setup` first when something is missing, so both commands of
//! the README work on a fresh machine.

mod setup;

use std::{
    path::PathBuf,
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what this machine lacks: apt packages, LLVM 22, bpf-linker (idempotent).
    Setup,
    /// Build every binary and the kernel programs.
    Build,
    /// Run every test tier: unit, datapath (BPF_PROG_TEST_RUN), cluster (netns); then check
    /// that nothing was left behind.
    Test {
        /// Passed to `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// A two-node cluster with a Service backed by pods on both nodes; Ctrl-C tears it down.
    Demo,
    /// Module graph (no import cycle, nothing imports the agent's CLI), cargo fmt --check and
    /// clippy with warnings denied.
    Lint,
    /// Packet-path benchmarks (release build): writes bench/results/<time>.json and
    /// docs/benchmarks.md.
    Bench {
        /// A few minutes' version: fewer runs per figure.
        #[arg(long)]
        quick: bool,
    },
    /// The OCI image archive of ferrox (static musl binaries, no Docker), checked, then
    /// validated with skopeo and umoci.
    Image {
        /// Where to write the archive.
        #[arg(long, default_value = "target/image/ferrox-image.tar")]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn status(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: {what}: {cmd:?}");
    let s = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !s.success() {
        bail!("{what} failed ({s})");
    }
    Ok(())
}

fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Setup => setup::run(setup::Mode::Always),
        Cmd::Build => {
            setup::run(setup::Mode::IfMissing)?;
            build()
        }
        Cmd::Test { args } => {
            setup::run(setup::Mode::IfMissing)?;
            test(&args)
        }
        Cmd::Demo => {
            setup::run(setup::Mode::IfMissing)?;
            build()?;
            require_root("the demo builds network namespaces and loads eBPF programs")?;
            status("demo", &mut test_bin("ferrox-demo", &[]))
        }
        Cmd::Lint => lint(),
        Cmd::Bench { quick } => {
            setup::run(setup::Mode::IfMissing)?;
            require_root("the benchmarks load eBPF programs and build network namespaces")?;
            // The throughput section runs the real agent, plugin and fx-echo, release-built.
            status(
                "bench (release build)",
                cargo().args(["build", "--release", "--quiet", "--bins"]),
            )?;
            let mut c = cargo();
            c.args([
                "run",
                "--release",
                "--quiet",
                "-p",
                "ferrox-tests",
                "--bin",
                "fx-bench",
                "--",
            ]);
            if quick {
                c.arg("--quick");
            }
            status("bench", &mut c)
        }
        Cmd::Image { out } => {
            setup::run(setup::Mode::IfMissing)?;
            image(&workspace_root().join(out))
        }
    }
}

fn require_root(why: &str) -> anyhow::Result<()> {
    if !setup::is_root() {
        bail!("this needs root: {why}");
    }
    Ok(())
}

fn build() -> anyhow::Result<()> {
    // Default members: everything but the kernel programs, which build.rs compiles for bpf.
    status("build", cargo().args(["build", "--bins"]))
}

/// `cargo run` of the binary `bin` of the tests crate, with `args`.
fn test_bin(bin: &str, args: &[&str]) -> Command {
    let mut c = cargo();
    c.args(["run", "--quiet", "-p", "ferrox-tests", "--bin", bin, "--"])
        .args(args);
    c
}

/// `fx-leakcheck` with `args`.
fn leakcheck(args: &[&str]) -> Command {
    test_bin("fx-leakcheck", args)
}

fn test(args: &[String]) -> anyhow::Result<()> {
    require_root("the datapath and cluster tests load eBPF programs and build network namespaces")?;
    let started = Instant::now();
    build()?;
    // What a killed run (a demo, a benchmark, a test binary) left is not this run's leak:
    // tear it down first, saying what it was.
    if let Err(e) = status("sweep of interrupted runs", &mut leakcheck(&["--sweep"])) {
        eprintln!("xtask: {e:#}; the leak check after the tests will name what is left");
    }
    let mut c = cargo();
    c.args(["test", "--no-fail-fast"]);
    if !args.is_empty() {
        c.arg("--").args(args);
    }
    let tests = status("tests", &mut c);
    // Whatever the result, nothing may be left behind.
    let leaks = status("leak check", &mut leakcheck(&[]));
    tests?;
    leaks?;
    eprintln!("xtask: all tests passed in {:.0?}", started.elapsed());
    Ok(())
}

/// Crates whose top-level modules must import each other without a cycle, each with the modules
/// nothing else in it may import.
const LAYERED: &[(&str, &[&str])] = &[
    ("agent/src", &["cli"]),
    ("cni-plugin/src", &[]),
    ("ebpf/datapath/src", &[]),
    ("ebpf/programs/src", &[]),
    ("tests/src", &[]),
];

fn lint() -> anyhow::Result<()> {
    for (dir, leaves) in LAYERED {
        let g = xtask::modgraph::graph(&workspace_root().join(dir))
            .with_context(|| format!("reading {dir}"))?;
        let problems = xtask::modgraph::violations(&g, leaves);
        if !problems.is_empty() {
            bail!("{dir}: {}", problems.join("\n"));
        }
        eprintln!(
            "xtask: module graph of {dir}: {} modules, no cycle",
            g.len()
        );
    }
    status("format check", cargo().args(["fmt", "--all", "--check"]))?;
    status(
        "clippy",
        cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]),
    )?;
    // The kernel programs, for their own target (a separate target dir keeps the host cache).
    status(
        "clippy (kernel programs)",
        cargo()
            .args([
                "clippy",
                "-p",
                "ferrox-ebpf",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
            ])
            .args(["--", "-D", "warnings"])
            .env("RUSTC_BOOTSTRAP", "1")
            .env("CARGO_TARGET_DIR", workspace_root().join("target/bpf-lint")),
    )
}

const MUSL: &str = "x86_64-unknown-linux-musl";

/// Static binaries for musl, in a target directory of their own (so an image build never
/// holds the lock of the development builds), assembled into an OCI archive and checked.
fn image(out: &std::path::Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(workspace_root())
        .output()
        .context("running rustup")?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == MUSL)
    {
        status(
            "adding the musl target",
            Command::new("rustup")
                .args(["target", "add", MUSL])
                .current_dir(workspace_root()),
        )?;
    }
    let target_dir = workspace_root().join("target/image");
    status(
        "static build",
        cargo()
            .args(["build", "--release", "--target", MUSL, "--bins"])
            .args(["-p", "ferrox", "-p", "ferrox-cni"])
            .env("CARGO_TARGET_DIR", &target_dir),
    )?;
    let bins = target_dir.join(MUSL).join("release");
    let spec = xtask::oci::ferrox_spec(&bins, true);
    let built = xtask::oci::build(&spec, out)?;
    let report = xtask::oci::check(out, &spec.reference)?;
    if !report.entrypoint_static {
        bail!("{} is not a static executable", report.entrypoint[0]);
    }
    eprintln!(
        "xtask: structural check passed: {} -> {:?} {:?}, files {:?}",
        report.reference, report.entrypoint, report.cmd, report.files
    );
    // Independent readers: skopeo parses the archive as runtimes do; umoci unpacks the layers
    // into a runtime bundle whose config must start our entrypoint.
    status(
        "skopeo inspect",
        Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci-archive:{}", out.display())),
    )?;
    let scratch = target_dir.join("umoci-check");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    status(
        "unpacking the archive",
        Command::new("tar")
            .arg("-xf")
            .arg(out)
            .arg("-C")
            .arg(&scratch),
    )?;
    let bundle = target_dir.join("umoci-bundle");
    let _ = std::fs::remove_dir_all(&bundle);
    status(
        "umoci unpack",
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:{}", scratch.display(), spec.reference))
            .arg(&bundle),
    )?;
    let runtime: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json"))?)?;
    let args = &runtime["process"]["args"];
    if args[0] != "/usr/bin/ferrox" || !bundle.join("rootfs/usr/bin/ferrox-cni").is_file() {
        bail!("umoci's bundle does not start /usr/bin/ferrox or lacks ferrox-cni: {args}");
    }
    std::fs::remove_dir_all(&scratch)?;
    std::fs::remove_dir_all(&bundle)?;
    eprintln!(
        "xtask: {} ({}) -> {} ({:.1} MiB; layer {:.1} MiB gzip, {:.1} MiB tar), validated by skopeo and umoci, in {:.0?}",
        spec.reference,
        built.manifest_digest,
        built.archive.display(),
        built.archive_size as f64 / 1048576.0,
        built.layer_size as f64 / 1048576.0,
        built.uncompressed_layer_size as f64 / 1048576.0,
        started.elapsed()
    );
    eprintln!(
        "xtask: import with `ctr -n k8s.io images import {0}` or `podman load -i {0}`",
        built.archive.display()
    );
    Ok(())
}
