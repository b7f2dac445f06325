//! Where the datapath's objects are pinned: `<root>/v1/{maps,progs,links}`.
//!
//! The root is configurable (default `/sys/fs/bpf/ferrox`) so that several nodes can share one
//! machine in tests; the version directory changes whenever the ABI does.

use std::path::{Path, PathBuf};

use ferrox_abi::PIN_VERSION;

/// The default bpffs root of a node.
pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/ferrox";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The configured root, e.g. `/sys/fs/bpf/ferrox`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/v1`: everything this ABI version pins.
    pub fn versioned(&self) -> PathBuf {
        self.root.join(PIN_VERSION)
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.versioned().join("maps")
    }

    pub fn progs_dir(&self) -> PathBuf {
        self.versioned().join("progs")
    }

    pub fn links_dir(&self) -> PathBuf {
        self.versioned().join("links")
    }

    /// Links of the pod-facing program as versions before the pod filters pinned them, one per
    /// pod veth (pods attached since have a `cls_bpf` filter, which needs no pin).
    pub fn pod_links_dir(&self) -> PathBuf {
        self.links_dir().join("pods")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.progs_dir().join(name)
    }

    pub fn link(&self, name: &str) -> PathBuf {
        self.links_dir().join(name)
    }

    pub fn pod_link(&self, host_ifname: &str) -> PathBuf {
        self.pod_links_dir().join(host_ifname)
    }

    /// Links of the program at the egress of a pod's host veth (packets into the pod), for pods
    /// whose veth cannot take a filter (see [`Self::pod_links_dir`]).
    pub fn to_pod_links_dir(&self) -> PathBuf {
        self.links_dir().join("to-pods")
    }

    pub fn to_pod_link(&self, host_ifname: &str) -> PathBuf {
        self.to_pod_links_dir().join(host_ifname)
    }

    /// Links of released pods whose veth is retired but not yet destroyed, by ifindex.
    pub fn retired_links_dir(&self) -> PathBuf {
        self.links_dir().join("retired")
    }

    pub fn retired_link(&self, ifindex: u32) -> PathBuf {
        self.retired_links_dir().join(ifindex.to_string())
    }

    /// The retired link of the program into the pod behind `ifindex`.
    pub fn retired_to_pod_link(&self, ifindex: u32) -> PathBuf {
        self.retired_links_dir().join(format!("{ifindex}-to-pod"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_versioned_under_the_root() {
        let l = PinLayout::new("/sys/fs/bpf/ferrox");
        assert_eq!(
            l.map("SVC_V1"),
            Path::new("/sys/fs/bpf/ferrox/v1/maps/SVC_V1")
        );
        assert_eq!(
            l.program("tc_from_pod"),
            Path::new("/sys/fs/bpf/ferrox/v1/progs/tc_from_pod")
        );
        assert_eq!(
            l.pod_link("fx0123"),
            Path::new("/sys/fs/bpf/ferrox/v1/links/pods/fx0123")
        );
    }
}
