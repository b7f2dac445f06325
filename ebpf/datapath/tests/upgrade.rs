//! Datapath tier: what an upgrade carries over. The flows of the version 1 conntrack map (as a
//! previous ferrox pinned it) are copied into the current map when the datapath opens and once
//! more when the upgrade finishes, never over an entry the current programs wrote, and the old
//! map is unpinned; pod links still running an earlier program are moved to the current one.
//! Needs root.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::path::Path;

use aya::programs::{SchedClassifier, TcAttachType, tc::TcAttach};
use ferrox_abi::{CtEntry, CtEntryV1, CtKey, ct_flags, fwd_flags, map_names, program_names};
use ferrox_datapath::{
    ConntrackCopy, Datapath, PinLayout, PodAttach, PodSide, bpffs::ScratchBpffs, pinned_link_info,
};

mod netns;
mod pins;
use netns::NetNs;

/// Writes one flow into the pinned `CT_V1` the way a previous version's programs would.
fn write_v1(layout: &PinLayout, k: &CtKey, v: &CtEntryV1) {
    pins::update(&layout.map(map_names::CONNTRACK_V1), k, v);
}

fn key(n: u16) -> CtKey {
    CtKey {
        saddr: u32::from_ne_bytes([198, 18, 0, 200]),
        daddr: u32::from_ne_bytes([198, 18, 0, 11]),
        sport: (40_000 + n).to_be(),
        dport: 30080u16.to_be(),
        proto: 6,
        _pad: [0; 3],
    }
}

fn v1(n: u16) -> CtEntryV1 {
    CtEntryV1 {
        nat_saddr: u32::from_ne_bytes([198, 18, 0, 200]),
        nat_daddr: u32::from_ne_bytes([10, 244, 1, 5]),
        nat_sport: (40_000 + n).to_be(),
        nat_dport: 8080u16.to_be(),
        backend_id: 7,
        rev_nat_id: 3,
        flags: ct_flags::LOCAL_BACKEND,
        _pad: [0; 5],
        last_seen_ns: 1_000_000 + u64::from(n),
    }
}

#[test]
fn conntrack_v1_flows_are_carried_into_v2_and_the_old_map_unpinned() {
    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-upgrade-test").unwrap();
    let layout = bpffs.layout();
    // What a previous version left pinned: its conntrack map (LRU hash, 16-byte keys, 32-byte
    // values) with three flows.
    std::fs::create_dir_all(layout.maps_dir()).unwrap();
    let old_pin = layout.map(map_names::CONNTRACK_V1);
    pins::create(&old_pin, "lru_hash", 16, 32, 1024, "CT_V1");
    for n in 0..3 {
        write_v1(&layout, &key(n), &v1(n));
    }

    let mut dp = Datapath::open(&layout).unwrap();
    for n in 0..3 {
        let got = dp.maps().conntrack.get(&key(n)).unwrap();
        assert_eq!(
            got,
            Some(CtEntry::from(v1(n))),
            "flow {n} after the first pass"
        );
    }
    assert!(old_pin.exists(), "the old map stays until the upgrade ends");

    // Meanwhile the previous programs (still attached) track a fourth flow, and the current
    // ones cache a route in flow 0's entry: the last pass copies the first, keeps the second.
    write_v1(&layout, &key(3), &v1(3));
    let cached = CtEntry {
        fwd_flags: fwd_flags::DIRECT,
        fwd_ifindex: 9,
        fwd_max_len: 1500,
        ..CtEntry::from(v1(0))
    };
    dp.maps_mut().conntrack.insert(&key(0), &cached).unwrap();
    let report = dp.finish_upgrade().unwrap().conntrack_v1;
    assert_eq!(
        report,
        Some(ConntrackCopy {
            copied: 1,
            present: 3,
            failed: 0
        })
    );
    assert_eq!(dp.maps().conntrack.get(&key(0)).unwrap(), Some(cached));
    assert_eq!(
        dp.maps().conntrack.get(&key(3)).unwrap(),
        Some(CtEntry::from(v1(3)))
    );
    assert!(!old_pin.exists(), "the old map is unpinned at the end");
    // Nothing left to carry: later starts and finishes do nothing.
    assert_eq!(dp.finish_upgrade().unwrap(), Default::default());
    drop(dp);
    let mut dp = Datapath::open(&layout).unwrap();
    assert_eq!(dp.finish_upgrade().unwrap(), Default::default());
    assert_eq!(dp.maps().conntrack.entries().unwrap().len(), 4);
}

#[test]
fn pod_links_move_to_the_current_program_and_defunct_ones_are_reported() {
    let ns = NetNs::new(format!("fxt-upg{}", std::process::id()));
    for (a, b) in [
        ("pod1", "pod1p"),
        ("pod2", "pod2p"),
        ("pod3", "pod3p"),
        ("pod4", "pod4p"),
        ("pod5", "pod5p"),
    ] {
        ns.ip(&["link", "add", a, "type", "veth", "peer", "name", b]);
        ns.ip(&["link", "set", a, "up"]);
    }
    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-upgrade-test").unwrap();
    let layout = bpffs.layout();
    ns.run(|| {
        let mut dp = Datapath::open(&layout).unwrap();
        // pod1: attached by the CNI plugin with the current program (a cls_bpf filter).
        ferrox_datapath::attach_pod(&layout, "pod1", PodAttach::Filter).unwrap();
        // pod4: attached by the CNI plugin for a pod whose egress the bandwidth plugin shapes
        // (a TCX link: the ingress qdisc is the bandwidth plugin's).
        ferrox_datapath::attach_pod(&layout, "pod4", PodAttach::Link).unwrap();
        // pod5: a filter out of the pod only, as versions before the program into the pod
        // attached it.
        ferrox_datapath::attach_pod(&layout, "pod5", PodAttach::Filter).unwrap();
        let del = std::process::Command::new("tc")
            .args(["filter", "del", "dev", "pod5", "egress"])
            .status()
            .unwrap();
        assert!(del.success());
        assert_eq!(
            ferrox_datapath::pod_hook(&layout, "pod5", PodSide::ToPod).unwrap(),
            None
        );
        // pod2 and pod3: links pinned by an earlier version, running another program (here
        // the uplink's egress program stands in for the previous pod program).
        let mut other =
            SchedClassifier::from_pin(layout.program(program_names::TC_UPLINK_EGRESS)).unwrap();
        for pod in ["pod2", "pod3"] {
            let ifindex = ferrox_datapath::ifindex(pod).unwrap();
            let id = other
                .attach(
                    ifindex,
                    TcAttach::Tcx {
                        attach_type: TcAttachType::Ingress,
                        order: Default::default(),
                    },
                )
                .unwrap();
            let link = other.take_link(id).unwrap();
            aya::programs::links::FdLink::try_from(link)
                .unwrap()
                .pin(layout.pod_link(pod))
                .unwrap();
        }
        let current = SchedClassifier::from_pin(layout.program(program_names::TC_FROM_POD))
            .unwrap()
            .info()
            .unwrap()
            .id();
        let current_to_pod = SchedClassifier::from_pin(layout.program(program_names::TC_TO_POD))
            .unwrap()
            .info()
            .unwrap()
            .id();
        // pod3's interface goes away without a CNI DEL.
        ferrox_datapath::ifindex("pod3").unwrap();
        std::process::Command::new("ip")
            .args(["link", "del", "pod3"])
            .status()
            .unwrap();

        let got = dp.update_pod_links().unwrap();
        assert_eq!(got.updated, ["pod2"]);
        assert_eq!(got.current, ["pod1", "pod4"]);
        // Pods attached without the program into the pod get it, the way their other side is
        // attached.
        assert_eq!(got.added, ["pod2", "pod5"]);
        assert_eq!(got.defunct, ["pod3"]);
        assert_eq!(
            ferrox_datapath::pod_hook(&layout, "pod5", PodSide::ToPod).unwrap(),
            Some(ferrox_datapath::PodHook::Filter {
                ifindex: ferrox_datapath::ifindex("pod5").unwrap(),
                prog_id: current_to_pod
            }),
            "pod5 got a filter into the pod"
        );
        for pod in ["pod2", "pod4"] {
            let info = pinned_link_info(&layout.to_pod_link(pod)).unwrap();
            assert_eq!(info.prog_id, current_to_pod, "{pod}'s link into the pod");
        }
        assert_eq!(
            ferrox_datapath::pod_hook(&layout, "pod1", PodSide::FromPod).unwrap(),
            Some(ferrox_datapath::PodHook::Filter {
                ifindex: ferrox_datapath::ifindex("pod1").unwrap(),
                prog_id: current
            }),
            "pod1 has a filter running the current program"
        );
        assert!(!layout.pod_link("pod1").exists(), "a filter needs no pin");
        for pod in ["pod2", "pod4"] {
            let info = pinned_link_info(&layout.pod_link(pod)).unwrap();
            assert_eq!(
                info.prog_id, current,
                "{pod}'s link runs the current program"
            );
        }
        let again = dp.update_pod_links().unwrap();
        assert!(again.updated.is_empty(), "{again:?}");
        assert!(again.added.is_empty(), "{again:?}");
        assert_eq!(again.current, ["pod1", "pod2", "pod4", "pod5"]);
    });
}
