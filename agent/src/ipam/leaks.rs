//! Addresses leaked by pods that went away without a CNI DEL (a node crash, a runtime that
//! lost its state): the agent compares the IPAM store with this node's pods in the API and,
//! after a grace period, releases what no pod holds, as a DEL would (address, veth, program,
//! endpoint entry). [`leaked`] is the pure decision; [`collect_leaks`] the periodic shell, which
//! also destroys the host veths DEL retired (`ferrox_cni::pod::retire`).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use ferrox_cni::{ipam::Store, node_config::NodeConfig};
use kube::{Api, Client, api::ListParams};
use tracing::{info, warn};

/// An attachment's identity: container id and interface name.
type AttachmentId = (String, String);

/// The allocations to release at `now`: those recording a pod that has been gone from this node
/// (or has had another address) for longer than `grace`. `pods` maps (namespace, name) of the
/// node's pods to their IPv4 addresses (empty while a pod has none yet). Allocations without a
/// pod name (plugins run without CNI_ARGS) are never judged. `missing_since` carries the state
/// between rounds.
pub fn leaked(
    allocations: &[ferrox_cni::ipam::Allocation],
    pods: &BTreeMap<(String, String), Vec<Ipv4Addr>>,
    missing_since: &mut BTreeMap<AttachmentId, Instant>,
    now: Instant,
    grace: Duration,
) -> Vec<ferrox_cni::ipam::Allocation> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for a in allocations {
        if a.pod_name.is_empty() {
            continue;
        }
        let orphan = match pods.get(&(a.pod_namespace.clone(), a.pod_name.clone())) {
            None => true,
            // A pod whose address is known and is another one: this allocation belongs to one
            // of its earlier sandboxes.
            Some(ips) => !ips.is_empty() && !ips.contains(&a.ip),
        };
        let id = (a.container_id.clone(), a.ifname.clone());
        if !orphan {
            continue;
        }
        seen.insert(id.clone());
        let since = *missing_since.entry(id).or_insert(now);
        if now.saturating_duration_since(since) >= grace {
            out.push(a.clone());
        }
    }
    missing_since.retain(|id, _| seen.contains(id));
    out
}

/// Releases, every `interval`, the addresses (and veths, programs, endpoint entries) of pods
/// that no longer exist on this node, after `grace`. The pods come from the API; the rest from
/// the node configuration and the store.
pub async fn collect_leaks(
    client: Client,
    node: String,
    config_path: PathBuf,
    interval: Duration,
    grace: Duration,
) {
    use k8s_openapi::api::core::v1::Pod;
    let pods_api = Api::<Pod>::all(client);
    let params = ListParams::default().fields(&format!("spec.nodeName={node}"));
    let mut missing_since = BTreeMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let config = match NodeConfig::read(&config_path) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "IPAM leak check: no node configuration");
                continue;
            }
        };
        // Host veths that DEL retired and no namespace deletion took with it, then the links
        // of their programs.
        let layout = ferrox_datapath::PinLayout::new(&config.bpffs_root);
        let swept = tokio::task::spawn_blocking(move || {
            let veths = ferrox_cni::pod::remove_retired().map_err(anyhow::Error::from)?;
            let links =
                ferrox_datapath::remove_retired_links(&layout, ferrox_cni::pod::link_exists)?;
            anyhow::Ok((veths, links))
        })
        .await;
        match swept {
            Ok(Ok((0, 0))) => {}
            Ok(Ok((veths, links))) => {
                info!(veths, links, "removed retired pod veths and their links")
            }
            Ok(Err(e)) => warn!(error = %e, "removing retired pod veths"),
            Err(e) => warn!(error = %e, "removing retired pod veths"),
        }
        let allocations = match Store::new(&config.ipam_dir).tidy() {
            Ok(scan) => {
                for b in &scan.bad {
                    warn!(path = %b.path.display(), reason = %b.reason, ip = ?b.ip, "IPAM store: a file is not a readable allocation record; its address stays out of use (`ferrox ipam check`, `ferrox ipam release IP`)");
                }
                scan.allocations
            }
            Err(e) => {
                warn!(error = %e, "IPAM leak check: reading the store failed");
                continue;
            }
        };
        // Listed after the allocations: a pod created in between is seen, never judged gone.
        let pods = match pods_api.list(&params).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "IPAM leak check: listing this node's pods failed");
                continue;
            }
        };
        let pods: BTreeMap<(String, String), Vec<Ipv4Addr>> = pods
            .items
            .iter()
            .map(|p| {
                let ips = p
                    .status
                    .iter()
                    .flat_map(|s| {
                        s.pod_ips
                            .iter()
                            .flatten()
                            .map(|i| i.ip.clone())
                            .chain(s.pod_ip.clone())
                    })
                    .filter_map(|ip| ip.parse().ok())
                    .collect();
                (
                    (
                        p.metadata.namespace.clone().unwrap_or_default(),
                        p.metadata.name.clone().unwrap_or_default(),
                    ),
                    ips,
                )
            })
            .collect();
        let gone = leaked(
            &allocations,
            &pods,
            &mut missing_since,
            Instant::now(),
            grace,
        );
        tracing::debug!(
            allocations = allocations.len(),
            pods = pods.len(),
            leaked = gone.len(),
            "IPAM leak check"
        );
        for a in gone {
            match ferrox_cni::plugin::release_attachment(&config, &a.container_id, &a.ifname) {
                Ok(_) => info!(
                    ip = %a.ip,
                    pod = %format!("{}/{}", a.pod_namespace, a.pod_name),
                    container = %a.container_id,
                    "released the address of a pod that is gone (no DEL came)"
                ),
                Err(e) => warn!(ip = %a.ip, error = %e, "IPAM leak check: releasing failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "tests: a failure should stop the test with its context"
    )]

    use super::*;

    fn alloc(ip: &str, cid: &str, pod: &str) -> ferrox_cni::ipam::Allocation {
        ferrox_cni::ipam::Allocation {
            ip: ip.parse().unwrap(),
            container_id: cid.into(),
            ifname: "eth0".into(),
            pod_namespace: if pod.is_empty() { "" } else { "default" }.into(),
            pod_name: pod.into(),
        }
    }

    #[test]
    fn allocations_of_gone_pods_are_released_after_the_grace_period() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(900);
        let allocations = vec![
            alloc("10.244.1.2", "c-live", "live"),
            alloc("10.244.1.3", "c-gone", "gone"),
            alloc("10.244.1.4", "c-old-sandbox", "restarted"),
            alloc("10.244.1.5", "c-new-sandbox", "restarted"),
            alloc("10.244.1.6", "c-starting", "starting"),
            alloc("10.244.1.7", "c-anonymous", ""),
        ];
        let pods = BTreeMap::from([
            (
                ("default".into(), "live".into()),
                vec!["10.244.1.2".parse().unwrap()],
            ),
            (
                ("default".into(), "restarted".into()),
                vec!["10.244.1.5".parse().unwrap()],
            ),
            // No address reported yet: not judged.
            (("default".into(), "starting".into()), vec![]),
        ]);
        let mut state = BTreeMap::new();
        assert!(
            leaked(&allocations, &pods, &mut state, t0, grace).is_empty(),
            "grace first"
        );
        assert_eq!(state.len(), 2, "two suspects: {state:?}");
        let later = t0 + grace;
        let gone: Vec<String> = leaked(&allocations, &pods, &mut state, later, grace)
            .into_iter()
            .map(|a| a.container_id)
            .collect();
        assert_eq!(gone, ["c-gone", "c-old-sandbox"]);
        // A pod that came back (its object re-created) is no longer suspect.
        let mut pods = pods;
        pods.insert(("default".into(), "gone".into()), vec![]);
        let mut state = BTreeMap::new();
        leaked(&allocations, &pods, &mut state, t0, grace);
        assert_eq!(state.len(), 1);
    }
}
