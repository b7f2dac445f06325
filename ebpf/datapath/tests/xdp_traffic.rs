//! Datapath tier: the XDP attach helper on a real interface. Two network namespaces joined by a
//! veth; the uplink XDP program is attached natively to one end through a pinned link, and a
//! ping from the other end moves its counters. Needs root.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::{os::fd::AsRawFd as _, path::Path, process::Command};

use ferrox_abi::{Hook, Reason};
use ferrox_datapath::{AttachOutcome, Datapath, LinkTarget, XdpAttachMode, bpffs::ScratchBpffs};

struct NetNs(String);

impl NetNs {
    fn new(name: String) -> Self {
        run(&["netns", "add", &name]);
        Self(name)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` on a thread that lives in network namespace `ns`.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(Path::new("/run/netns").join(ns)).unwrap();
            // SAFETY: setns on this scoped thread only.
            assert_eq!(
                unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            f()
        })
        .join()
        .unwrap()
    })
}

#[test]
fn native_xdp_on_a_veth_counts_real_packets_and_is_re_adopted() {
    let id = std::process::id();
    let a = NetNs::new(format!("fxt-xdp{id}-a"));
    let b = NetNs::new(format!("fxt-xdp{id}-b"));
    run(&[
        "-n", &a.0, "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", &b.0,
    ]);
    run(&["-n", &a.0, "addr", "add", "192.0.2.1/24", "dev", "up0"]);
    run(&["-n", &a.0, "link", "set", "up0", "up"]);
    run(&["-n", &b.0, "addr", "add", "192.0.2.2/24", "dev", "eth0"]);
    run(&["-n", &b.0, "link", "set", "eth0", "up"]);

    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-dp-test").unwrap();
    let layout = bpffs.layout();
    let (first, ifindex) = in_netns(&a.0, || {
        let mut dp = Datapath::open(&layout).unwrap();
        let att = dp.attach_uplink_xdp("up0", XdpAttachMode::Native).unwrap();
        (att, ferrox_datapath::ifindex("up0").unwrap())
    });
    assert_eq!(first.outcome, AttachOutcome::Created);
    let info = ferrox_datapath::pinned_link_info(&first.pin).unwrap();
    assert_eq!(info.target, LinkTarget::Xdp { ifindex });

    let ping = Command::new("ip")
        .args([
            "netns",
            "exec",
            &b.0,
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "2",
            "192.0.2.1",
        ])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "ping through the XDP program: {}",
        String::from_utf8_lossy(&ping.stdout)
    );

    let again = in_netns(&a.0, || {
        Datapath::open(&layout)
            .unwrap()
            .attach_uplink_xdp("up0", XdpAttachMode::Native)
            .unwrap()
    });
    assert_eq!(
        again.outcome,
        AttachOutcome::Adopted,
        "a second start re-adopts the pinned link"
    );
    assert_eq!(again.link_id, first.link_id);

    let maps = ferrox_datapath::Maps::open(&layout).unwrap();
    let icmp = maps
        .counters
        .get(Hook::XdpUplink, Reason::PassIcmp)
        .unwrap()
        .packets;
    assert!(icmp >= 3, "echo requests seen by XDP: {icmp}");
    drop(maps);
    ferrox_datapath::cleanup(&layout).unwrap();
}
