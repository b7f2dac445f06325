//! Datapath tier: maps sized to the node, and resized without losing what they hold. A pinned
//! map of another capacity (or with the flags of an older version) is replaced by one of the
//! asked size holding the same entries; the programs are loaded again against it and the hooks
//! move to them; what the previous programs wrote meanwhile is merged when the resize ends; an
//! agent that died in the middle finishes it on its next start. Needs root.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::path::Path;

use aya::{maps::MapInfo, programs::ProgramInfo};
use ferrox_abi::{
    CtEntry, CtKey, PolicyCtKey, PolicyCtValue, ServiceKey, ServiceValue, capacity, ct_flags,
    map_names, policy_direction, program_names,
};
use ferrox_datapath::{Datapath, MapCopy, PinLayout, Sizing, bpffs::ScratchBpffs};

mod netns;
mod pins;
use netns::NetNs;

fn key(n: u32) -> CtKey {
    CtKey {
        saddr: u32::from_ne_bytes([198, 18, 0, 200]),
        daddr: u32::from_ne_bytes([198, 18, 0, 11]),
        sport: (10_000 + n as u16).to_be(),
        dport: 30080u16.to_be(),
        proto: 6,
        _pad: [0; 3],
    }
}

fn flow(n: u32) -> CtEntry {
    CtEntry {
        nat_daddr: u32::from_ne_bytes([10, 244, 1, 5]),
        nat_dport: 8080u16.to_be(),
        backend_id: n,
        rev_nat_id: 3,
        flags: ct_flags::LOCAL_BACKEND,
        ..CtEntry::default()
    }
}

fn sizing(conntrack: u32, sock_revnat: u32, affinity: u32) -> Sizing {
    Sizing {
        memory: 0,
        conntrack,
        sock_revnat,
        affinity,
        policy_ct: 16_384,
    }
}

fn capacity_of(layout: &PinLayout, name: &str) -> (u32, u32, u32) {
    let info = MapInfo::from_pin(layout.map(name)).unwrap();
    (info.id(), info.max_entries(), info.map_flags())
}

/// The maps a pinned program runs against.
/// The program a pod's hook runs (its filter's, or an earlier version's link's).
fn pod_program(layout: &PinLayout, host_ifname: &str) -> u32 {
    ferrox_datapath::pod_hook(layout, host_ifname, ferrox_datapath::PodSide::FromPod)
        .unwrap()
        .expect("the pod program is attached")
        .prog_id()
}

fn program_maps(layout: &PinLayout, program: &str) -> Vec<u32> {
    ProgramInfo::from_pin(layout.program(program))
        .unwrap()
        .map_ids()
        .unwrap()
        .unwrap()
}

#[test]
fn a_grown_map_keeps_its_flows_and_the_hooks_move_to_it() {
    let ns = NetNs::new(format!("fxt-rsz{}", std::process::id()));
    ns.ip(&[
        "link", "add", "pod1", "type", "veth", "peer", "name", "pod1p",
    ]);
    ns.ip(&["link", "set", "pod1", "up"]);
    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-resize-test").unwrap();
    let layout = bpffs.layout();
    ns.run(|| {
        let mut dp = Datapath::open_with(&layout, &sizing(4096, 2048, 1024)).unwrap();
        assert!(dp.resized().is_empty());
        ferrox_datapath::attach_pod(&layout, "pod1", ferrox_datapath::PodAttach::Filter).unwrap();
        for n in 0..300 {
            dp.maps_mut().conntrack.insert(&key(n), &flow(n)).unwrap();
        }
        let svc = ServiceKey::master(u32::from_ne_bytes([10, 96, 0, 10]), 80u16.to_be(), 6);
        let frontend = ServiceValue {
            count: 2,
            rev_nat_id: 3,
            ..ServiceValue::default()
        };
        dp.maps_mut().services.insert(&svc, &frontend).unwrap();
        let (old_ct, cap, _) = capacity_of(&layout, map_names::CONNTRACK);
        assert_eq!(cap, 4096);
        let (services_id, _, services_flags) = capacity_of(&layout, map_names::SERVICES);
        assert_eq!(services_flags, 1, "services are not preallocated");
        let old_program = pod_program(&layout, "pod1");
        assert!(program_maps(&layout, program_names::TC_FROM_POD).contains(&old_ct));
        drop(dp);

        // The node is given more room for flows.
        let mut dp = Datapath::open_with(&layout, &sizing(16_384, 2048, 1024)).unwrap();
        let resized: Vec<_> = dp
            .resized()
            .iter()
            .map(|r| (r.map, r.from_entries, r.to_entries, r.copy))
            .collect();
        assert_eq!(
            resized,
            [(
                map_names::CONNTRACK,
                4096,
                16_384,
                MapCopy {
                    copied: 300,
                    present: 0,
                    failed: 0
                }
            )]
        );
        let (new_ct, cap, _) = capacity_of(&layout, map_names::CONNTRACK);
        assert_eq!(cap, 16_384);
        assert_ne!(new_ct, old_ct);
        assert_eq!(dp.maps().conntrack.capacity(), 16_384);
        for n in 0..300 {
            assert_eq!(dp.maps().conntrack.get(&key(n)).unwrap(), Some(flow(n)));
        }
        // The other maps are the same maps, with what they held.
        assert_eq!(capacity_of(&layout, map_names::SERVICES).0, services_id);
        assert_eq!(dp.maps().services.get(&svc).unwrap(), Some(frontend));
        // Every program was loaded again against the new map...
        for program in [program_names::TC_FROM_POD, program_names::TC_UPLINK_INGRESS] {
            let maps = program_maps(&layout, program);
            assert!(
                maps.contains(&new_ct) && !maps.contains(&old_ct),
                "{program}"
            );
            assert!(maps.contains(&services_id), "{program}");
        }
        // ...while the hook still runs the previous program, whose map waits under resize/.
        let staged = layout.maps_dir().join("resize").join(map_names::CONNTRACK);
        assert_eq!(MapInfo::from_pin(&staged).unwrap().id(), old_ct);
        assert_eq!(pod_program(&layout, "pod1"), old_program);

        // The previous program tracks one more flow before its hook moves.
        pins::update(&staged, &key(1000), &flow(1000));
        // And the new programs already wrote flow 0 anew: the merge must not overwrite it.
        let newer = CtEntry {
            backend_id: 77,
            ..flow(0)
        };
        dp.maps_mut().conntrack.insert(&key(0), &newer).unwrap();

        let moved = dp.update_pod_links().unwrap();
        assert_eq!(moved.updated, ["pod1"]);
        // The hook runs the pinned program now, the one against the new map.
        let pinned = ProgramInfo::from_pin(layout.program(program_names::TC_FROM_POD)).unwrap();
        assert_eq!(pod_program(&layout, "pod1"), pinned.id());
        let finished = dp.finish_upgrade().unwrap();
        assert_eq!(finished.leftovers.len(), 1);
        assert_eq!(
            finished.leftovers[0].merged,
            Some(MapCopy {
                copied: 1,
                present: 300,
                failed: 0
            })
        );
        assert!(!staged.exists(), "the previous map is unpinned at the end");
        assert_eq!(dp.maps().conntrack.get(&key(0)).unwrap(), Some(newer));
        assert_eq!(
            dp.maps().conntrack.get(&key(1000)).unwrap(),
            Some(flow(1000))
        );
        assert_eq!(dp.maps().conntrack.len().unwrap(), 301);
        drop(dp);

        // The same sizes again: nothing replaced, the programs re-adopted.
        let dp = Datapath::open_with(&layout, &sizing(16_384, 2048, 1024)).unwrap();
        assert!(dp.resized().is_empty());
        assert_eq!(*dp.origin(), ferrox_datapath::Origin::Adopted);
        assert_eq!(capacity_of(&layout, map_names::CONNTRACK).0, new_ct);
    });
}

#[test]
fn a_map_shrinks_only_when_its_entries_fit_in_half() {
    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-resize-test").unwrap();
    let layout = bpffs.layout();
    let mut dp = Datapath::open_with(&layout, &sizing(8192, 2048, 2048)).unwrap();
    for n in 0..600 {
        dp.maps_mut().conntrack.insert(&key(n), &flow(n)).unwrap();
    }
    drop(dp);
    // 600 flows do not fit in half of 1,024: kept at 8,192, and said so.
    let dp = Datapath::open_with(&layout, &sizing(1024, 2048, 1024)).unwrap();
    let kept: Vec<_> = dp
        .kept_larger()
        .iter()
        .map(|k| (k.map, k.capacity, k.wanted, k.entries))
        .collect();
    assert_eq!(kept, [(map_names::CONNTRACK, 8192, 1024, 600)]);
    // The affinity map is empty: it shrinks.
    let resized: Vec<_> = dp.resized().iter().map(|r| (r.map, r.to_entries)).collect();
    assert_eq!(resized, [(map_names::AFFINITY, 1024)]);
    assert_eq!(dp.maps().conntrack.capacity(), 8192);
    assert_eq!(dp.maps().affinity.capacity(), 1024);
    drop(dp);
    // 600 flows fit in half of 2,048: shrunk, every flow kept.
    let mut dp = Datapath::open_with(&layout, &sizing(2048, 2048, 1024)).unwrap();
    assert_eq!(dp.maps().conntrack.capacity(), 2048);
    assert!(dp.kept_larger().is_empty());
    dp.finish_upgrade().unwrap();
    assert_eq!(dp.maps().conntrack.len().unwrap(), 600);
}

#[test]
fn an_older_versions_preallocated_services_map_is_rebuilt_with_its_entries() {
    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-resize-test").unwrap();
    let layout = bpffs.layout();
    std::fs::create_dir_all(layout.maps_dir()).unwrap();
    // What an earlier version pinned: the services map preallocated (flags 0).
    let pin = layout.map(map_names::SERVICES);
    pins::create(
        &pin,
        "hash",
        size_of::<ServiceKey>(),
        size_of::<ServiceValue>(),
        capacity::SERVICES,
        "SVC_V1",
    );
    let svc = ServiceKey::master(u32::from_ne_bytes([10, 96, 0, 11]), 53u16.to_be(), 17);
    let frontend = ServiceValue {
        count: 1,
        rev_nat_id: 9,
        ..ServiceValue::default()
    };
    pins::update(&pin, &svc, &frontend);

    let mut dp = Datapath::open_with(&layout, &sizing(4096, 2048, 1024)).unwrap();
    let resized: Vec<_> = dp
        .resized()
        .iter()
        .map(|r| (r.map, r.from_flags, r.to_flags, r.copy.copied))
        .collect();
    assert_eq!(resized, [(map_names::SERVICES, 0, 1, 1)]);
    assert_eq!(dp.maps().services.get(&svc).unwrap(), Some(frontend));
    let (_, cap, flags) = capacity_of(&layout, map_names::SERVICES);
    assert_eq!((cap, flags), (capacity::SERVICES, 1));
    let finished = dp.finish_upgrade().unwrap();
    // The services map is the agent's: not merged back, just unpinned.
    assert_eq!(finished.leftovers.len(), 1);
    assert_eq!(finished.leftovers[0].merged, None);
    let memory = ferrox_datapath::map_memory(&layout).unwrap();
    let services = memory
        .iter()
        .find(|m| m.name == map_names::SERVICES)
        .unwrap();
    assert!(!services.preallocated);
    let conntrack = memory
        .iter()
        .find(|m| m.name == map_names::CONNTRACK)
        .unwrap();
    assert!(conntrack.preallocated);
    assert!(
        services.bytes < u64::from(capacity::SERVICES) * 32,
        "{services:?}"
    );
}

#[test]
fn a_resize_interrupted_after_the_exchange_is_finished_on_the_next_start() {
    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-resize-test").unwrap();
    let layout = bpffs.layout();
    let mut dp = Datapath::open_with(&layout, &sizing(4096, 2048, 1024)).unwrap();
    for n in 0..10 {
        dp.maps_mut().conntrack.insert(&key(n), &flow(n)).unwrap();
    }
    drop(dp);
    // The agent dies after the exchange: the previous map waits under resize/.
    let dp = Datapath::open_with(&layout, &sizing(8192, 2048, 1024)).unwrap();
    let staged = layout.maps_dir().join("resize").join(map_names::CONNTRACK);
    assert!(staged.exists());
    let current = capacity_of(&layout, map_names::CONNTRACK).0;
    drop(dp);
    // The previous programs go on tracking flows into it meanwhile.
    pins::update(&staged, &key(500), &flow(500));

    let dp = Datapath::open_with(&layout, &sizing(8192, 2048, 1024)).unwrap();
    assert!(!staged.exists());
    assert!(dp.resized().is_empty());
    assert_eq!(capacity_of(&layout, map_names::CONNTRACK).0, current);
    assert_eq!(dp.maps().conntrack.len().unwrap(), 11);
    assert_eq!(dp.maps().conntrack.get(&key(500)).unwrap(), Some(flow(500)));
    // The programs were loaded again, so none runs against the unpinned map.
    assert!(matches!(
        dp.origin(),
        ferrox_datapath::Origin::Upgraded { .. }
    ));
    for program in [program_names::TC_FROM_POD, program_names::TC_UPLINK_INGRESS] {
        assert!(program_maps(&layout, program).contains(&current));
    }
}

#[test]
fn the_flow_maps_of_a_4_gib_node_take_a_fifth_of_a_20_gib_nodes() {
    let small = Sizing::for_memory(4 << 30);
    let large = Sizing::for_memory(20 << 30);
    assert_eq!(large, {
        let mut c = Sizing::ceiling();
        c.memory = 20 << 30;
        c
    });
    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-resize-test").unwrap();
    let layout = bpffs.layout();
    let dp = Datapath::open_with(&layout, &small).unwrap();
    assert_eq!(dp.maps().conntrack.capacity(), small.conntrack);
    assert_eq!(dp.maps().sock_revnat.capacity(), small.sock_revnat);
    assert_eq!(dp.maps().affinity.capacity(), small.affinity);
    assert_eq!(dp.maps().policy_ct.capacity(), small.policy_ct);
    let total: u64 = ferrox_datapath::map_memory(&layout)
        .unwrap()
        .iter()
        .map(|m| m.bytes)
        .sum();
    eprintln!("{} KiB of maps on a 4 GiB node", total >> 10);
    assert!(
        total < 32 << 20,
        "{} MiB of maps on a 4 GiB node",
        total >> 20
    );
}

/// The ids of the maps the programs reach through the hash of maps `outer` (key 0).
fn previous_ids(layout: &PinLayout, outer: &str) -> Vec<u32> {
    let data = aya::maps::MapData::from_pin(layout.map(outer)).unwrap();
    let map = aya::maps::Map::from_map_data(data).unwrap();
    let map: aya::maps::HashOfMaps<_, u32, aya::maps::MapData> =
        aya::maps::HashOfMaps::try_from(map).unwrap();
    map.keys()
        .map(|k| map.get(&k.unwrap(), 0).unwrap().info().unwrap().id())
        .collect()
}

#[test]
fn the_previous_flow_maps_are_reachable_by_the_programs_until_the_resize_ends() {
    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-resize-test").unwrap();
    let layout = bpffs.layout();
    let outers = [
        (map_names::CONNTRACK, map_names::CONNTRACK_PREVIOUS),
        (map_names::SOCK_REVNAT, map_names::SOCK_REVNAT_PREVIOUS),
        (map_names::AFFINITY, map_names::AFFINITY_PREVIOUS),
    ];
    let dp = Datapath::open_with(&layout, &sizing(4096, 2048, 1024)).unwrap();
    let before: Vec<u32> = outers
        .iter()
        .map(|(m, _)| capacity_of(&layout, m).0)
        .collect();
    for (_, outer) in outers {
        assert!(previous_ids(&layout, outer).is_empty(), "{outer}");
    }
    drop(dp);
    let mut dp = Datapath::open_with(&layout, &sizing(8192, 4096, 2048)).unwrap();
    for ((_, outer), old) in outers.iter().zip(&before) {
        assert_eq!(previous_ids(&layout, outer), [*old], "{outer}");
    }
    for ((map, _), old) in outers.iter().zip(&before) {
        assert_ne!(capacity_of(&layout, map).0, *old, "{map} replaced");
    }
    dp.finish_upgrade().unwrap();
    for (_, outer) in outers {
        assert!(previous_ids(&layout, outer).is_empty(), "{outer}");
    }
}

/// The policy flows (`POLICY_CT_V1`) follow the node's memory like the other flow maps: grown,
/// the map keeps every remembered flow, and what the previous programs remembered after the
/// copy is merged when the upgrade finishes (so replies of allowed flows keep passing).
#[test]
fn policy_flows_survive_a_resize() {
    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-resize-test").unwrap();
    let layout = bpffs.layout();
    let pkey = |n: u32| PolicyCtKey {
        pod: u32::from_ne_bytes([10, 244, 1, 5]),
        peer: u32::from_ne_bytes([10, 244, 2, 7]),
        pod_port: (40_000 + n as u16).to_be(),
        peer_port: 80u16.to_be(),
        proto: 6,
        direction: policy_direction::EGRESS,
        _pad: [0; 2],
    };
    let value = PolicyCtValue {
        policy: 7,
        rule: 1,
        _pad: 0,
    };
    let small = Sizing {
        policy_ct: 16_384,
        ..sizing(16_384, 2048, 1024)
    };
    let mut dp = Datapath::open_with(&layout, &small).unwrap();
    for n in 0..200 {
        dp.maps_mut().policy_ct.insert(&pkey(n), &value).unwrap();
    }
    drop(dp);
    let larger = Sizing {
        policy_ct: 32_768,
        ..small
    };
    let mut dp = Datapath::open_with(&layout, &larger).unwrap();
    let resized: Vec<_> = dp
        .resized()
        .iter()
        .map(|r| (r.map, r.from_entries, r.to_entries, r.copy.copied))
        .collect();
    assert_eq!(resized, [(map_names::POLICY_CT, 16_384, 32_768, 200)]);
    assert_eq!(dp.maps().policy_ct.capacity(), 32_768);
    // A flow the previous programs remember before their hooks move.
    let staged = layout.maps_dir().join("resize").join(map_names::POLICY_CT);
    {
        let data = aya::maps::MapData::from_pin(&staged).unwrap();
        let map = aya::maps::Map::from_map_data(data).unwrap();
        let mut previous: aya::maps::HashMap<_, PolicyCtKey, PolicyCtValue> =
            aya::maps::HashMap::try_from(map).unwrap();
        previous.insert(&pkey(500), &value, 0).unwrap();
    }
    let finished = dp.finish_upgrade().unwrap();
    assert_eq!(
        finished
            .leftovers
            .iter()
            .map(|l| (l.map.as_str(), l.merged.map(|m| m.copied)))
            .collect::<Vec<_>>(),
        [(map_names::POLICY_CT, Some(1))]
    );
    assert!(!staged.exists());
    for n in (0..200).chain([500]) {
        assert_eq!(dp.maps().policy_ct.get(&pkey(n)).unwrap(), Some(value));
    }
}
