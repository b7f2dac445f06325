//! Datapath tier: NetworkPolicy's compiled tables written into the kernel's maps (ipcache,
//! policy entries, isolated endpoints) give the reference model's verdict for every pod,
//! direction, peer, protocol and port of the sample worlds, looked up as the programs will
//! (longest-prefix matches in the kernel's tries); an update rewrites only what changed and
//! leaves nothing stale. Needs root (bpf).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use ferrox::policy::{
    compile::compile,
    model::World,
    tables::{table_verdict, write},
    testing::{disagreements, sample_worlds},
};
use ferrox_datapath::{Datapath, bpffs::ScratchBpffs};

fn local(w: &World) -> BTreeMap<String, Ipv4Addr> {
    w.pods
        .iter()
        .map(|p| (format!("{}/{}", p.namespace, p.name), p.ip))
        .collect()
}

#[test]
fn the_kernel_tables_give_the_models_verdicts_and_updates_leave_nothing_stale() {
    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-policy-test").unwrap();
    let mut dp = Datapath::open(&bpffs.layout()).unwrap();
    let worlds = sample_worlds();
    let mut failures = Vec::new();
    // Each world written over the previous one: the diff must leave exactly its tables.
    for (what, w) in &worlds {
        let l = local(w);
        let names: Vec<String> = l.keys().cloned().collect();
        let c = compile(w, &names);
        let first = write(dp.maps_mut(), &c, &l).unwrap();
        failures.extend(disagreements(what, w, |pod, dir, peer, protocol, port| {
            table_verdict(dp.maps(), pod.ip, dir, peer, protocol, port).unwrap()
        }));
        let again = write(dp.maps_mut(), &c, &l).unwrap();
        if again != Default::default() {
            failures.push(format!(
                "{what}: a second write changed {again:?} (first {first:?})"
            ));
        }
        let entries: usize = c.endpoints.values().map(|e| e.entries.len()).sum();
        let in_kernel = dp.maps().policies.entries().unwrap().len();
        if in_kernel > entries {
            failures.push(format!(
                "{what}: {in_kernel} policy entries in the kernel for {entries} compiled"
            ));
        }
        let isolated = dp.maps().policy_endpoints.entries().unwrap().len();
        if isolated != c.endpoints.len() {
            failures.push(format!(
                "{what}: {isolated} isolated endpoints in the kernel, {} compiled",
                c.endpoints.len()
            ));
        }
    }
    // Back to no policy: the tables empty but for the world's identity.
    let none = World {
        pods: worlds[0].1.pods.clone(),
        namespaces: worlds[0].1.namespaces.clone(),
        policies: vec![],
    };
    let l = local(&none);
    let c = compile(&none, &l.keys().cloned().collect::<Vec<_>>());
    write(dp.maps_mut(), &c, &l).unwrap();
    assert!(dp.maps().policies.entries().unwrap().is_empty());
    assert!(dp.maps().policy_endpoints.entries().unwrap().is_empty());
    assert_eq!(dp.maps().ipcache.entries().unwrap().len(), c.ipcache.len());
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures[..failures.len().min(30)].join("\n")
    );
}
