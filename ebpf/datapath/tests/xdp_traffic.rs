//! Datapath tier: the XDP attach helper on a real interface. Two network namespaces joined by a
//! veth; the uplink XDP program is attached natively to one end through a pinned link, and a
//! ping from the other end moves its counters. Needs root.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::path::Path;

use ferrox_abi::{Hook, Reason};
use ferrox_datapath::{AttachOutcome, Datapath, LinkTarget, XdpAttachMode, bpffs::ScratchBpffs};

mod netns;
use netns::NetNs;

#[test]
fn native_xdp_on_a_veth_counts_real_packets_and_is_re_adopted() {
    let id = std::process::id();
    let a = NetNs::new(format!("fxt-xdp{id}-a"));
    let b = NetNs::new(format!("fxt-xdp{id}-b"));
    a.ip(&[
        "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", &b.0,
    ]);
    a.ip(&["addr", "add", "192.0.2.1/24", "dev", "up0"]);
    a.ip(&["link", "set", "up0", "up"]);
    b.ip(&["addr", "add", "192.0.2.2/24", "dev", "eth0"]);
    b.ip(&["link", "set", "eth0", "up"]);

    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-dp-test").unwrap();
    let layout = bpffs.layout();
    let (first, ifindex) = a.run(|| {
        let mut dp = Datapath::open(&layout).unwrap();
        let att = dp.attach_uplink_xdp("up0", XdpAttachMode::Native).unwrap();
        (att, ferrox_datapath::ifindex("up0").unwrap())
    });
    assert_eq!(first.outcome, AttachOutcome::Created);
    let info = ferrox_datapath::pinned_link_info(&first.pin).unwrap();
    assert_eq!(info.target, LinkTarget::Xdp { ifindex });

    let ping = b.exec(&["ping", "-c", "3", "-i", "0.2", "-W", "2", "192.0.2.1"]);
    assert!(
        ping.status.success(),
        "ping through the XDP program: {}",
        String::from_utf8_lossy(&ping.stdout)
    );

    let again = a.run(|| {
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
