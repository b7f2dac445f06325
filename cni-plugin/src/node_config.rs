//! The node configuration file (`/run/ferrox/node.json`): written by the agent once the
//! datapath is up, read by the CNI plugin on every ADD/DEL. It is the whole contract between
//! the two: the plugin never calls the API server.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;

/// Default path of the node configuration.
pub const DEFAULT_PATH: &str = "/run/ferrox/node.json";
/// Version of the file's schema; the plugin refuses files from a newer agent.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TunnelMode {
    /// Pod traffic between nodes is routed as is (Calico's `Never`).
    #[serde(alias = "none")]
    Never,
    /// IP-in-IP to every other node.
    Always,
    /// IP-in-IP only to nodes in other subnets.
    CrossSubnet,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeConfig {
    pub version: u32,
    pub node_name: String,
    /// The blocks this node allocates pod addresses from.
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Vec<Ipv4Net>,
    /// The pods' default gateway (link-local, answered by proxy ARP on the host veth).
    pub gateway: Ipv4Addr,
    /// MTU for pod interfaces.
    pub mtu: u32,
    pub tunnel_mode: TunnelMode,
    /// Where the datapath is pinned (the plugin attaches the pod program from there).
    pub bpffs_root: PathBuf,
    /// Where the IPAM store lives.
    pub ipam_dir: PathBuf,
    /// Where `pod_cidrs` come from; with pools, the agent claims another block on demand.
    #[serde(default)]
    pub ipam_mode: IpamMode,
}

/// How the node's blocks are managed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IpamMode {
    /// `Node.spec.podCIDRs`, fixed.
    #[default]
    Kubernetes,
    /// Blocks the agent claims from IP pools through the API, more when they fill up.
    Pools,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeConfigError {
    #[error("node configuration {path} not found: is the ferrox agent running on this node?")]
    Missing { path: PathBuf },
    #[error("reading node configuration {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("node configuration {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "node configuration {path} has schema version {found}; this plugin understands up to {SCHEMA_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("writing node configuration {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl NodeConfig {
    pub fn read(path: &Path) -> Result<Self, NodeConfigError> {
        let bytes = std::fs::read(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                NodeConfigError::Missing { path: path.into() }
            } else {
                NodeConfigError::Read {
                    path: path.into(),
                    source,
                }
            }
        })?;
        let cfg: Self =
            serde_json::from_slice(&bytes).map_err(|source| NodeConfigError::Parse {
                path: path.into(),
                source,
            })?;
        if cfg.version > SCHEMA_VERSION {
            return Err(NodeConfigError::Version {
                path: path.into(),
                found: cfg.version,
            });
        }
        Ok(cfg)
    }

    /// Writes the file atomically: a reader sees the old or the new file, never a partial one.
    pub fn write(&self, path: &Path) -> Result<(), NodeConfigError> {
        let err = |source| NodeConfigError::Write {
            path: path.into(),
            source,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(err)?;
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(self).map_err(|e| err(std::io::Error::other(e)))?;
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&body).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NodeConfig {
        NodeConfig {
            version: SCHEMA_VERSION,
            node_name: "node-1".into(),
            pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
            gateway: Ipv4Addr::new(169, 254, 1, 1),
            mtu: 1500,
            tunnel_mode: TunnelMode::Never,
            bpffs_root: "/sys/fs/bpf/ferrox".into(),
            ipam_dir: "/var/lib/ferrox/ipam".into(),
            ipam_mode: IpamMode::Kubernetes,
        }
    }

    #[test]
    fn round_trips_and_uses_the_documented_field_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.json");
        sample().write(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"podCIDRs\""), "{text}");
        assert!(text.contains("\"tunnelMode\": \"never\""), "{text}");
        assert_eq!(NodeConfig::read(&path).unwrap(), sample());
    }

    #[test]
    fn missing_file_says_to_check_the_agent() {
        let err = NodeConfig::read(Path::new("/nonexistent/node.json")).unwrap_err();
        assert!(
            err.to_string().contains("is the ferrox agent running"),
            "{err}"
        );
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.json");
        let mut c = sample();
        c.version = SCHEMA_VERSION + 1;
        c.write(&path).unwrap();
        assert!(matches!(
            NodeConfig::read(&path),
            Err(NodeConfigError::Version { .. })
        ));
    }
}
