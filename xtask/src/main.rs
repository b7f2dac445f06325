//! `cargo xtask setup | build | test | demo | lint`: the project's commands.
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
    /// cargo fmt --check and clippy with warnings denied.
    Lint,
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
            let mut c = cargo();
            c.args([
                "run",
                "--quiet",
                "-p",
                "ferrox-tests",
                "--bin",
                "ferrox-demo",
            ]);
            status("demo", &mut c)
        }
        Cmd::Lint => lint(),
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

fn test(args: &[String]) -> anyhow::Result<()> {
    require_root("the datapath and cluster tests load eBPF programs and build network namespaces")?;
    let started = Instant::now();
    build()?;
    let mut c = cargo();
    c.args(["test", "--no-fail-fast"]);
    if !args.is_empty() {
        c.arg("--").args(args);
    }
    let tests = status("tests", &mut c);
    // Whatever the result, nothing may be left behind.
    let leaks = status(
        "leak check",
        cargo().args([
            "run",
            "--quiet",
            "-p",
            "ferrox-tests",
            "--bin",
            "fx-leakcheck",
        ]),
    );
    tests?;
    leaks?;
    eprintln!("xtask: all tests passed in {:.0?}", started.elapsed());
    Ok(())
}

fn lint() -> anyhow::Result<()> {
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
