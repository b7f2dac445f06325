//! Which blocks of the cluster's IP pools this node hands pod addresses out of, Calico-style.
//!
//! Pools (CIDRs) are cut into blocks (default /26). A node owns the blocks whose `IPAMBlock`
//! object names it (`ipamblocks.ipam.ferrox.io`, cluster-scoped, one per claimed block, named
//! after its CIDR). Claiming is creating that object: the API server admits one create per name,
//! so two nodes racing for a block never both get it — the loser sees `AlreadyExists` and tries
//! the next block. Releasing deletes it with a precondition on its uid, so a block released and
//! claimed again by another node is never deleted by a stale owner. Why a custom resource rather
//! than a ConfigMap or a Lease: a block is a cluster-wide fact with its own identity, listed and
//! watched on its own, with its own RBAC (nodes create and delete blocks and nothing else); the
//! CRD is `manifests/ipam-crd.yaml`.
//!
//! The agent keeps this node's blocks in the node configuration the CNI plugin reads (the plugin
//! never calls the API): it claims another block when few addresses are left, or when the plugin
//! left a demand marker after finding every block full (ADD then fails with "try again later",
//! and the runtime's retry finds the new block), and it releases a block that stayed empty for a
//! while, taking it out of the node configuration before checking, under the store's lock, that
//! it is still empty.
//!
//! [`leaks`] releases the addresses of pods that are gone without a CNI DEL.

pub mod leaks;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ferrox_cni::{ipam::Store, node_config::NodeConfig};
use ipnet::Ipv4Net;
use kube::{
    Api, Client,
    api::{
        ApiResource, DeleteParams, DynamicObject, ListParams, ObjectMeta, PostParams, Preconditions,
    },
};
use tracing::{info, warn};

pub const GROUP: &str = "ipam.ferrox.io";
pub const VERSION: &str = "v1";
pub const KIND: &str = "IPAMBlock";
pub const PLURAL: &str = "ipamblocks";

/// The `IPAMBlock` resource.
pub fn block_resource() -> ApiResource {
    ApiResource {
        group: GROUP.into(),
        version: VERSION.into(),
        api_version: format!("{GROUP}/{VERSION}"),
        kind: KIND.into(),
        plural: PLURAL.into(),
    }
}

/// The object name of a block: its CIDR with `.` and `/` as `-` (`10-244-0-64-26`).
pub fn block_name(cidr: Ipv4Net) -> String {
    format!("{}-{}", cidr.network(), cidr.prefix_len()).replace('.', "-")
}

/// The cluster's pools and their block size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pools {
    pub pools: Vec<Ipv4Net>,
    pub block_prefix: u8,
}

impl Pools {
    /// Every block of every pool, in the order `node` tries them: from an offset given by a
    /// hash of its name, so nodes that start together seldom race for the same block.
    pub fn candidates(&self, node: &str) -> Vec<Ipv4Net> {
        let all: Vec<Ipv4Net> = self
            .pools
            .iter()
            .flat_map(|p| {
                p.subnets(self.block_prefix.max(p.prefix_len()))
                    .into_iter()
                    .flatten()
            })
            .collect();
        if all.is_empty() {
            return all;
        }
        let h = node.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let start = (h % all.len() as u64) as usize;
        all[start..].iter().chain(&all[..start]).copied().collect()
    }
}

/// A claimed block as the API holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    pub cidr: Ipv4Net,
    pub node: String,
    pub uid: Option<String>,
}

fn block_of(o: &DynamicObject) -> Option<Block> {
    let spec = o.data.get("spec")?;
    Some(Block {
        cidr: spec.get("cidr")?.as_str()?.parse().ok()?,
        node: spec.get("node")?.as_str()?.to_owned(),
        uid: o.metadata.uid.clone(),
    })
}

fn api(client: &Client) -> Api<DynamicObject> {
    Api::all_with(client.clone(), &block_resource())
}

/// Every claimed block.
pub async fn list_blocks(client: &Client) -> anyhow::Result<Vec<Block>> {
    let list = api(client)
        .list(&ListParams::default())
        .await
        .context("listing IPAM blocks")?;
    Ok(list.items.iter().filter_map(block_of).collect())
}

/// Claims a free block for `node`; `None` when every block of the pools is taken.
pub async fn claim(client: &Client, pools: &Pools, node: &str) -> anyhow::Result<Option<Block>> {
    let taken: BTreeSet<Ipv4Net> = list_blocks(client)
        .await?
        .into_iter()
        .map(|b| b.cidr)
        .collect();
    let api = api(client);
    for cidr in pools.candidates(node) {
        if taken.contains(&cidr) {
            continue;
        }
        let mut obj = DynamicObject::new(&block_name(cidr), &block_resource());
        obj.metadata = ObjectMeta {
            name: Some(block_name(cidr)),
            labels: Some(BTreeMap::from([(
                "ipam.ferrox.io/node".to_owned(),
                node.to_owned(),
            )])),
            ..Default::default()
        };
        obj.data = serde_json::json!({ "spec": { "cidr": cidr.to_string(), "node": node } });
        match api.create(&PostParams::default(), &obj).await {
            Ok(created) => {
                info!(block = %cidr, node, "claimed an IPAM block");
                return Ok(block_of(&created));
            }
            // Another node got it first.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e).context(format!("claiming block {cidr}")),
        }
    }
    Ok(None)
}

/// Releases `block`, unless its object is no longer the one this node claimed.
pub async fn release(client: &Client, block: &Block) -> anyhow::Result<()> {
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: block.uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api(client).delete(&block_name(block.cidr), &dp).await {
        Ok(_) => {
            info!(block = %block.cidr, "released an empty IPAM block");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e).context(format!("releasing block {}", block.cidr)),
    }
}

/// How the agent manages this node's blocks.
#[derive(Clone, Debug)]
pub struct Settings {
    pub pools: Pools,
    /// Claim another block when fewer free addresses than this are left.
    pub low_water: usize,
    /// Release a block (not the node's last) once it has been empty this long.
    pub release_after: Duration,
    /// How often usage is checked (a demand marker is noticed within this time).
    pub interval: Duration,
}

/// The name of the marker the CNI plugin leaves in the store directory when every block is
/// full; its presence asks the agent for another block at once.
pub const DEMAND_MARKER: &str = ferrox_cni::ipam::DEMAND_MARKER;

/// This node's blocks at start: the ones the API says it owns, or a freshly claimed one.
pub async fn initial_blocks(
    client: &Client,
    settings: &Settings,
    node: &str,
) -> anyhow::Result<Vec<Block>> {
    let mut mine: Vec<Block> = list_blocks(client)
        .await?
        .into_iter()
        .filter(|b| b.node == node)
        .collect();
    if mine.is_empty() {
        match claim(client, &settings.pools, node).await? {
            Some(b) => mine.push(b),
            None => anyhow::bail!(
                "every block of the IP pools {:?} is taken: no addresses for pods on this node",
                settings.pools.pools
            ),
        }
    }
    mine.sort_by_key(|b| b.cidr);
    Ok(mine)
}

/// What to do about this node's blocks, from their usage: pure, so it is tested on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Nothing,
    Claim,
    Release(Ipv4Net),
}

/// Usable addresses of a block (without its network and broadcast addresses).
fn capacity(block: Ipv4Net) -> usize {
    block.hosts().count()
}

/// `used`: allocations per block; `empty_since`: when each block was first seen empty.
pub fn decide(
    blocks: &[Ipv4Net],
    used: &BTreeMap<Ipv4Net, usize>,
    empty_since: &BTreeMap<Ipv4Net, Instant>,
    demand: bool,
    settings: &Settings,
    now: Instant,
) -> Decision {
    let free: usize = blocks
        .iter()
        .map(|b| capacity(*b).saturating_sub(used.get(b).copied().unwrap_or(0)))
        .sum();
    if demand || free < settings.low_water {
        return Decision::Claim;
    }
    // Release at most one block per round, never the last, and only if the others keep
    // enough room that the next round would not claim again.
    if blocks.len() > 1 {
        for b in blocks.iter().rev() {
            let empty_long = used.get(b).copied().unwrap_or(0) == 0
                && empty_since
                    .get(b)
                    .is_some_and(|t| now.saturating_duration_since(*t) >= settings.release_after);
            if empty_long && free - capacity(*b) >= settings.low_water {
                return Decision::Release(*b);
            }
        }
    }
    Decision::Nothing
}

/// The blocks this node holds become the pod blocks its BGP speaker announces (a block is
/// announced once claimed, withdrawn once released).
fn announce(
    exports: Option<&tokio::sync::watch::Sender<crate::bgp::speaker::Exports>>,
    blocks: &[Ipv4Net],
) {
    if let Some(tx) = exports {
        tx.send_if_modified(|e| {
            let changed = e.pod_blocks != blocks;
            if changed {
                e.pod_blocks = blocks.to_vec();
            }
            changed
        });
    }
}

fn in_block(ip: Ipv4Addr, blocks: &[Ipv4Net]) -> Option<Ipv4Net> {
    blocks.iter().find(|b| b.contains(&ip)).copied()
}

/// Keeps this node's blocks in step with its pods' needs, until the process ends. `config` is
/// the node configuration as first written (with the initial blocks). `exports`: the BGP
/// speaker's, whose pod blocks follow the blocks this node holds.
pub async fn run(
    client: Client,
    node: String,
    settings: Settings,
    mut blocks: Vec<Block>,
    mut config: NodeConfig,
    config_path: PathBuf,
    exports: Option<std::sync::Arc<tokio::sync::watch::Sender<crate::bgp::speaker::Exports>>>,
) {
    let store = Store::new(&config.ipam_dir);
    let demand_path = config.ipam_dir.join(DEMAND_MARKER);
    let mut empty_since: BTreeMap<Ipv4Net, Instant> = BTreeMap::new();
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let cidrs: Vec<Ipv4Net> = blocks.iter().map(|b| b.cidr).collect();
        announce(exports.as_deref(), &cidrs);
        let allocations = match store.list() {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "IPAM: reading the store failed");
                continue;
            }
        };
        let mut used: BTreeMap<Ipv4Net, usize> = BTreeMap::new();
        for a in &allocations {
            if let Some(b) = in_block(a.ip, &cidrs) {
                *used.entry(b).or_default() += 1;
            }
        }
        let now = Instant::now();
        for b in &cidrs {
            if used.get(b).copied().unwrap_or(0) == 0 {
                empty_since.entry(*b).or_insert(now);
            } else {
                empty_since.remove(b);
            }
        }
        let demand = demand_path.exists();
        match decide(&cidrs, &used, &empty_since, demand, &settings, now) {
            Decision::Nothing => {}
            Decision::Claim => match claim(&client, &settings.pools, &node).await {
                Ok(Some(b)) => {
                    blocks.push(b);
                    blocks.sort_by_key(|b| b.cidr);
                    config.pod_cidrs = blocks.iter().map(|b| b.cidr).collect();
                    announce(exports.as_deref(), &config.pod_cidrs);
                    if let Err(e) = config.write(&config_path) {
                        warn!(error = %e, "IPAM: writing the node configuration failed");
                    }
                    let _ = std::fs::remove_file(&demand_path);
                }
                Ok(None) => warn!(
                    pools = ?settings.pools.pools,
                    "IPAM: every block of the pools is taken; pods on this node may get no address"
                ),
                Err(e) => warn!(error = %format!("{e:#}"), "IPAM: claiming a block failed"),
            },
            Decision::Release(cidr) => {
                // Out of the configuration first, so no new ADD allocates from it; then, under
                // the store's lock, make sure no ADD did meanwhile.
                let rest: Vec<Ipv4Net> = cidrs.iter().copied().filter(|b| *b != cidr).collect();
                config.pod_cidrs = rest;
                if let Err(e) = config.write(&config_path) {
                    warn!(error = %e, "IPAM: writing the node configuration failed");
                    config.pod_cidrs = cidrs.clone();
                    continue;
                }
                // Withdrawn before it goes back to the pool, so no other node that claims it
                // announces it while this one still does.
                announce(exports.as_deref(), &config.pod_cidrs);
                let still_empty = store.with_lock(|| {
                    store
                        .list()
                        .map(|all| !all.iter().any(|a| cidr.contains(&a.ip)))
                });
                match still_empty {
                    Ok(Ok(true)) => {
                        let block = blocks.iter().find(|b| b.cidr == cidr).cloned();
                        if let Some(block) = block {
                            match release(&client, &block).await {
                                Ok(()) => {
                                    blocks.retain(|b| b.cidr != cidr);
                                    empty_since.remove(&cidr);
                                }
                                Err(e) => {
                                    warn!(error = %format!("{e:#}"), "IPAM: releasing a block failed");
                                }
                            }
                        }
                    }
                    _ => {
                        // An allocation appeared, or the store could not be read: keep it.
                        config.pod_cidrs = cidrs.clone();
                        if let Err(e) = config.write(&config_path) {
                            warn!(error = %e, "IPAM: writing the node configuration failed");
                        }
                    }
                }
                // A block that stays in the configuration but left the API would be handed
                // out twice: rewrite from what this node owns.
                config.pod_cidrs = blocks.iter().map(|b| b.cidr).collect();
                if let Err(e) = config.write(&config_path) {
                    warn!(error = %e, "IPAM: writing the node configuration failed");
                }
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

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn settings() -> Settings {
        Settings {
            pools: Pools {
                pools: vec![net("10.250.0.0/24")],
                block_prefix: 26,
            },
            low_water: 8,
            release_after: Duration::from_secs(60),
            interval: Duration::from_secs(1),
        }
    }

    #[test]
    fn pools_are_cut_into_blocks_tried_from_a_per_node_offset() {
        let p = settings().pools;
        let a = p.candidates("node-a");
        assert_eq!(a.len(), 4);
        let set: BTreeSet<Ipv4Net> = a.iter().copied().collect();
        assert_eq!(
            set,
            BTreeSet::from([
                net("10.250.0.0/26"),
                net("10.250.0.64/26"),
                net("10.250.0.128/26"),
                net("10.250.0.192/26")
            ])
        );
        assert_eq!(a, p.candidates("node-a"), "stable");
        // Different nodes start in different places (not always, but for these names).
        let starts: BTreeSet<Ipv4Net> = ["node-a", "node-b", "node-c", "node-d", "node-e"]
            .iter()
            .map(|n| p.candidates(n)[0])
            .collect();
        assert!(starts.len() > 1, "{starts:?}");
        assert_eq!(block_name(net("10.250.0.64/26")), "10-250-0-64-26");
        // A pool smaller than a block is one block.
        let small = Pools {
            pools: vec![net("10.9.0.0/28")],
            block_prefix: 26,
        };
        assert_eq!(small.candidates("n"), vec![net("10.9.0.0/28")]);
    }

    #[test]
    fn claims_when_nearly_full_or_asked_and_releases_long_empty_blocks() {
        let s = settings();
        let now = Instant::now();
        let b1 = net("10.250.0.0/26");
        let b2 = net("10.250.0.64/26");
        let none = BTreeMap::new();
        // 62 usable addresses; 55 used leaves 7 < 8.
        let used = BTreeMap::from([(b1, 55)]);
        assert_eq!(decide(&[b1], &used, &none, false, &s, now), Decision::Claim);
        let used = BTreeMap::from([(b1, 54)]);
        assert_eq!(
            decide(&[b1], &used, &none, false, &s, now),
            Decision::Nothing
        );
        assert_eq!(
            decide(&[b1], &used, &none, true, &s, now),
            Decision::Claim,
            "demand"
        );
        // A second block empty for long enough goes; not sooner, and never the last one.
        let used = BTreeMap::from([(b1, 3)]);
        let long_ago = now.checked_sub(Duration::from_secs(61)).unwrap();
        let recent = now.checked_sub(Duration::from_secs(10)).unwrap();
        assert_eq!(
            decide(
                &[b1, b2],
                &used,
                &BTreeMap::from([(b2, long_ago)]),
                false,
                &s,
                now
            ),
            Decision::Release(b2)
        );
        assert_eq!(
            decide(
                &[b1, b2],
                &used,
                &BTreeMap::from([(b2, recent)]),
                false,
                &s,
                now
            ),
            Decision::Nothing
        );
        assert_eq!(
            decide(
                &[b1],
                &BTreeMap::new(),
                &BTreeMap::from([(b1, long_ago)]),
                false,
                &s,
                now
            ),
            Decision::Nothing
        );
        // Not when the rest would be below the low-water mark at once.
        let used = BTreeMap::from([(b1, 58)]);
        assert_eq!(
            decide(
                &[b1, b2],
                &used,
                &BTreeMap::from([(b2, long_ago)]),
                false,
                &s,
                now
            ),
            Decision::Nothing
        );
    }
}
