//! Who the speaker peers with, from configuration: `BGPPeer` objects (one per external
//! neighbour), `--bgp-peers`, the route-reflector annotation of Nodes, and the MD5 keys mounted
//! from a Secret. Pure parsing into [`speaker::Peer`]s; the watch that feeds it is in
//! [`crate::routing`].

use std::net::Ipv4Addr;

use super::speaker;

/// The MD5 key of the peer `name`: the file `<dir>/<name>` (a Kubernetes Secret mounted there,
/// one key per peer name), trimmed; `None` when there is no such file.
pub fn password(dir: &std::path::Path, name: &str) -> anyhow::Result<Option<String>> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Ok(None);
    }
    match std::fs::read_to_string(dir.join(name)) {
        Ok(s) => Ok(Some(s.trim().to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("reading the BGP password of {name}: {e}")),
    }
}

pub const PEER_GROUP: &str = "bgp.ferrox.io";
pub const PEER_VERSION: &str = "v1";
pub const PEER_KIND: &str = "BGPPeer";
pub const PEER_PLURAL: &str = "bgppeers";

/// The Node annotation that makes a node a route reflector (when the full mesh is off): its
/// value is the cluster ID, an IPv4 address. Nodes without it peer only with the reflectors.
pub const RR_CLUSTER_ID_ANNOTATION: &str = "bgp.ferrox.io/route-reflector-cluster-id";

/// The route-reflector cluster ID a Node carries; an error for a value that is not an IPv4
/// address.
pub fn rr_cluster_id(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
) -> Result<Option<Ipv4Addr>, String> {
    match annotations.and_then(|a| a.get(RR_CLUSTER_ID_ANNOTATION)) {
        None => Ok(None),
        Some(v) => {
            v.trim().parse().map(Some).map_err(|e| {
                format!("{RR_CLUSTER_ID_ANNOTATION} {v:?}: {e} (want an IPv4 address)")
            })
        }
    }
}

/// The `BGPPeer` resource: one object per external neighbour (`manifests/ferrox.yaml`). A custom
/// resource rather than a ConfigMap: each peer has its own lifecycle and history, is listed with
/// `kubectl get bgppeers`, validated by its schema and watched one by one.
pub fn peer_resource() -> kube::api::ApiResource {
    kube::api::ApiResource {
        group: PEER_GROUP.into(),
        version: PEER_VERSION.into(),
        api_version: format!("{PEER_GROUP}/{PEER_VERSION}"),
        kind: PEER_KIND.into(),
        plural: PEER_PLURAL.into(),
    }
}

/// The peer a `BGPPeer` object describes for node `node`: `Ok(None)` when its `spec.nodes` list
/// leaves this node out. `spec`: `address`, `asn`, optional `holdTime`, `maxPrefixes`,
/// `password` (the key's file name in the password directory), `nodes`, `export`. Without
/// `maxPrefixes` the peer has no limit of its own ([`speaker::Peer::max_prefixes`] `None`; the
/// caller applies the global one).
pub fn peer_from_object(
    o: &kube::api::DynamicObject,
    node: &str,
    port: u16,
    password_dir: &std::path::Path,
) -> Result<Option<speaker::Peer>, String> {
    let name = o.metadata.name.clone().unwrap_or_default();
    let spec = o.data.get("spec").ok_or("no spec")?;
    if let Some(nodes) = spec.get("nodes").and_then(|n| n.as_array())
        && !nodes.iter().any(|n| n.as_str() == Some(node))
    {
        return Ok(None);
    }
    let addr: Ipv4Addr = spec
        .get("address")
        .and_then(|a| a.as_str())
        .ok_or("spec.address missing")?
        .parse()
        .map_err(|e| format!("spec.address: {e}"))?;
    let asn = spec
        .get("asn")
        .and_then(serde_json::Value::as_u64)
        .and_then(|a| u32::try_from(a).ok())
        .ok_or("spec.asn missing or not a 32-bit number")?;
    let hold_time = match spec.get("holdTime").and_then(serde_json::Value::as_u64) {
        None => None,
        Some(h) if h == 0 || (3..=65535).contains(&h) => Some(h as u16),
        Some(h) => return Err(format!("spec.holdTime {h}: 0, or 3 to 65535")),
    };
    let max_prefixes = match spec.get("maxPrefixes") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => match v.as_u64().map(u32::try_from) {
            Some(Ok(m)) if m > 0 => Some(m),
            _ => {
                return Err(format!(
                    "spec.maxPrefixes {v}: 1 to 4294967295 (leave it out for the global limit)"
                ));
            }
        },
    };
    let export = match spec.get("export") {
        None => speaker::Export::default(),
        Some(e) => {
            let names = e.as_array().ok_or("spec.export: a list")?;
            speaker::Export::parse(names.iter().map(|n| n.as_str().unwrap_or("")))
                .map_err(|e| format!("spec.{e}"))?
        }
    };
    let password = match spec.get("password").and_then(|p| p.as_str()) {
        Some(key) => Some(
            password(password_dir, key)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("no key {key:?} in {}", password_dir.display()))?,
        ),
        None => None,
    };
    Ok(Some(speaker::Peer {
        name,
        addr,
        asn,
        port,
        passive: false,
        password,
        hold_time,
        max_prefixes,
        rr_client: false,
        export,
    }))
}

/// Parses a `--bgp-peers` entry: `name=address:as` or `address:as`; such peers are sent what
/// `export` names.
pub fn parse_peer(s: &str, port: u16, export: speaker::Export) -> anyhow::Result<speaker::Peer> {
    let (name, rest) = match s.split_once('=') {
        Some((n, r)) => (n.trim().to_owned(), r),
        None => (String::new(), s),
    };
    let (addr, asn) = rest
        .trim()
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("BGP peer {s:?}: want name=address:as"))?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|e| anyhow::anyhow!("BGP peer {s:?}: address: {e}"))?;
    let asn: u32 = asn
        .parse()
        .map_err(|e| anyhow::anyhow!("BGP peer {s:?}: AS number: {e}"))?;
    Ok(speaker::Peer {
        name: if name.is_empty() {
            addr.to_string()
        } else {
            name
        },
        addr,
        asn,
        port,
        passive: false,
        password: None,
        hold_time: None,
        max_prefixes: None,
        rr_client: false,
        export,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn bgp_peer_objects_become_peers_or_clear_errors() {
        let dir = std::env::temp_dir().join(format!("ferrox-bgp-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tor"), "k3y\n").unwrap();
        let obj = |spec: serde_json::Value| -> kube::api::DynamicObject {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "bgp.ferrox.io/v1", "kind": "BGPPeer",
                "metadata": { "name": "tor" }, "spec": spec
            }))
            .unwrap()
        };
        let ok = super::peer_from_object(
            &obj(
                serde_json::json!({"address": "10.0.0.1", "asn": 4200000000u32,
                "holdTime": 30, "maxPrefixes": 500, "password": "tor", "nodes": ["node-1"], "export": ["podBlocks", "serviceLoadBalancerIPs"]}),
            ),
            "node-1",
            179,
            &dir,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (
                ok.name.as_str(),
                ok.asn,
                ok.hold_time,
                ok.max_prefixes,
                ok.password.as_deref()
            ),
            ("tor", 4_200_000_000, Some(30), Some(500), Some("k3y"))
        );
        assert_eq!(
            ok.export,
            super::speaker::Export {
                pod_blocks: true,
                cluster_ips: false,
                external_ips: false,
                load_balancer_ips: true,
            }
        );
        let other_node = super::peer_from_object(
            &obj(serde_json::json!({"address": "10.0.0.1", "asn": 1, "nodes": ["node-2"]})),
            "node-1",
            179,
            &dir,
        );
        assert_eq!(other_node, Ok(None));
        for (spec, want) in [
            (serde_json::json!({"asn": 1}), "spec.address missing"),
            (
                serde_json::json!({"address": "10.0.0", "asn": 1}),
                "spec.address",
            ),
            (serde_json::json!({"address": "10.0.0.1"}), "spec.asn"),
            (
                serde_json::json!({"address": "10.0.0.1", "asn": 1, "holdTime": 2}),
                "spec.holdTime 2",
            ),
            (
                serde_json::json!({"address": "10.0.0.1", "asn": 1, "maxPrefixes": 0}),
                "spec.maxPrefixes 0: 1 to 4294967295",
            ),
            (
                serde_json::json!({"address": "10.0.0.1", "asn": 1, "maxPrefixes": -3}),
                "spec.maxPrefixes -3",
            ),
            (
                serde_json::json!({"address": "10.0.0.1", "asn": 1, "export": ["serviceIPs"]}),
                "spec.export \"serviceIPs\": one of podBlocks, serviceClusterIPs",
            ),
            (
                serde_json::json!({"address": "10.0.0.1", "asn": 1, "password": "nope"}),
                "no key \"nope\"",
            ),
        ] {
            let e = super::peer_from_object(&obj(spec.clone()), "node-1", 179, &dir).unwrap_err();
            assert!(e.contains(want), "{spec}: {e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn peers_parse_with_and_without_a_name() {
        let p = super::parse_peer("tor=198.18.0.1:4200000000", 179, Default::default()).unwrap();
        assert_eq!(
            (p.name.as_str(), p.addr.to_string(), p.asn),
            ("tor", "198.18.0.1".into(), 4_200_000_000)
        );
        let p = super::parse_peer("198.18.0.1:65001", 179, Default::default()).unwrap();
        assert_eq!(p.name, "198.18.0.1");
        for bad in ["tor=198.18.0.1", "x=1.2.3:65001", "x=1.2.3.4:as"] {
            assert!(
                super::parse_peer(bad, 179, Default::default()).is_err(),
                "{bad}"
            );
        }
    }
}
