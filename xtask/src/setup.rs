//! Installs what a fresh machine lacks, and nothing else: each step checks first and says what
//! it does. Debian packages come from apt; bpf-linker is built against Debian's LLVM 22 (the
//! LLVM of the pinned rustc), as shared/TOOLCHAIN.md describes.

use std::process::Command;

use anyhow::{Context as _, bail};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `cargo xtask setup`: check everything, report, install what is missing.
    Always,
    /// Before build/test/demo: the same, quietly when nothing is missing.
    IfMissing,
}

/// Packages the build, the tests, the demo and the benchmarks need.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "iproute2",
    "iputils-ping",
    "iperf3",
    "bird2",
    // The other routers of the BGP interop tests: FRR (zebra + bgpd, vtysh) and GoBGP (gobgpd
    // and its gobgp client, one package).
    "frr",
    "gobgpd",
    "iptables",
    "nftables",
    "tcpdump",
    // The XDP tests and bench set veth offloads (checksums, GRO) as a NIC's wire behaves.
    "ethtool",
    "bpftool",
    // `cargo xtask bench` profiles the per-packet paths with perf.
    "linux-perf",
    "conntrack",
    "containernetworking-plugins",
    // The container runtime tier: containerd 1.6 (with ctr) and runc drive pods through the
    // CRI; busybox-static is the test images' shell and pause process.
    "containerd",
    "runc",
    "busybox-static",
    // `cargo xtask image`: static binaries, and two independent OCI image readers.
    "musl-tools",
    "skopeo",
    "umoci",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn bpf_linker_ok() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
}

fn step(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("setup: {what}");
    let s = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !s.success() {
        bail!("{what} failed ({s}): {cmd:?}");
    }
    Ok(())
}

pub fn run(mode: Mode) -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        if mode == Mode::Always {
            eprintln!("setup: apt packages present ({})", APT_PACKAGES.join(" "));
        }
    } else {
        if !is_root() {
            bail!(
                "missing packages {}; run `cargo xtask setup` as root",
                missing.join(" ")
            );
        }
        step(
            "apt-get update",
            Command::new("apt-get").args(["update", "-q"]),
        )?;
        step(
            &format!("installing {}", missing.join(" ")),
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        // The routers the tests run live in the tests' namespaces; the packages' own services
        // would run in the machine's. Stopped and disabled when this run installed them (a
        // router the machine already ran is left alone); nothing to do without systemd.
        let services: Vec<String> = [("frr", "frr.service"), ("gobgpd", "gobgpd.service")]
            .iter()
            .filter(|(pkg, _)| missing.contains(pkg))
            .map(|(_, unit)| (*unit).to_owned())
            .collect();
        if !services.is_empty() && std::path::Path::new("/run/systemd/system").exists() {
            step(
                &format!("disabling the packaged {}", services.join(", ")),
                Command::new("systemctl")
                    .args(["disable", "--now"])
                    .args(&services),
            )?;
        }
    }

    if bpf_linker_ok() {
        if mode == Mode::Always {
            eprintln!("setup: bpf-linker {BPF_LINKER_VERSION} present");
        }
    } else {
        let path = format!(
            "{LLVM_PREFIX}/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        step(
            &format!(
                "building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 6 minutes on 2 cores)"
            ),
            Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                .args([
                    "install",
                    &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                    "--locked",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("PATH", path)
                .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX),
        )?;
    }
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
