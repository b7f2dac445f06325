//! The local IPAM store: which addresses of this node's blocks are in use, by which pod.
//!
//! Layout under the store directory: `lock` (flock'ed for every change, so concurrent plugin
//! processes never hand out one address twice), `allocations/<ip>` (one JSON record per address,
//! written to a temporary file, fsync'ed, renamed, directory fsync'ed: a plugin killed at any
//! point leaves either no record or a whole one), and `last` (the last address handed out;
//! allocation continues after it, so a freed address is not reused at once).
//! Block management (claiming /26 blocks from pools through the API) is a later layer; this
//! store allocates from whatever CIDRs the node configuration lists.

use std::{
    fs::File,
    io::Write as _,
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    pub ip: Ipv4Addr,
    pub container_id: String,
    pub ifname: String,
    #[serde(default)]
    pub pod_namespace: String,
    #[serde(default)]
    pub pod_name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("no free address in {blocks}")]
    Exhausted { blocks: String },
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("allocation record {path} is corrupt")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> IpamError + 'a {
    move |source| IpamError::Io {
        op,
        path: path.into(),
        source,
    }
}

/// The marker ADD leaves in the store directory when every block is full (pools mode): the
/// agent claims another block as soon as it sees it.
pub const DEMAND_MARKER: &str = "demand";

/// The store at one directory.
pub struct Store {
    dir: PathBuf,
}

/// Holds the store's lock until dropped.
struct Locked {
    _file: File,
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn allocations_dir(&self) -> PathBuf {
        self.dir.join("allocations")
    }

    fn lock(&self) -> Result<Locked, IpamError> {
        std::fs::create_dir_all(self.allocations_dir()).map_err(io("creating", &self.dir))?;
        let path = self.dir.join("lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io("opening", &path))?;
        // SAFETY: flock on a file descriptor we own; blocks until the lock is ours.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(IpamError::Io {
                op: "locking",
                path,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Locked { _file: file })
    }

    /// Runs `f` with the store locked: no allocation or release happens meanwhile.
    pub fn with_lock<T>(&self, f: impl FnOnce() -> T) -> Result<T, IpamError> {
        let _lock = self.lock()?;
        Ok(f())
    }

    /// Asks the agent for another block (see [`DEMAND_MARKER`]).
    pub fn demand_block(&self) -> Result<(), IpamError> {
        let path = self.dir.join(DEMAND_MARKER);
        File::create(&path).map(drop).map_err(io("creating", &path))
    }

    /// Every allocation record.
    pub fn list(&self) -> Result<Vec<Allocation>, IpamError> {
        let dir = self.allocations_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => {
                return Err(IpamError::Io {
                    op: "listing",
                    path: dir,
                    source: e,
                });
            }
        };
        let mut out = Vec::new();
        for entry in entries {
            let path = entry.map_err(io("listing", &dir))?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                continue; // a write that never finished
            }
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                // Released by a concurrent DEL between the listing and the read.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io("reading", &path)(e)),
            };
            out.push(
                serde_json::from_slice(&bytes).map_err(|source| IpamError::Corrupt {
                    path: path.clone(),
                    source,
                })?,
            );
        }
        out.sort_by_key(|a: &Allocation| a.ip);
        Ok(out)
    }

    /// Allocates an address for (container, ifname) from `blocks`, or returns the one it already
    /// has (a retried ADD gets the same address).
    pub fn allocate(
        &self,
        blocks: &[Ipv4Net],
        mut record: Allocation,
    ) -> Result<Allocation, IpamError> {
        let _lock = self.lock()?;
        let existing = self.list()?;
        if let Some(a) = existing
            .iter()
            .find(|a| a.container_id == record.container_id && a.ifname == record.ifname)
        {
            return Ok(a.clone());
        }
        let used: std::collections::BTreeSet<Ipv4Addr> = existing.iter().map(|a| a.ip).collect();
        let last = std::fs::read_to_string(self.dir.join("last"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let ip = next_free(blocks, &used, last).ok_or_else(|| IpamError::Exhausted {
            blocks: blocks
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        })?;
        record.ip = ip;
        let body = serde_json::to_vec_pretty(&record).map_err(|e| IpamError::Io {
            op: "encoding",
            path: self.dir.clone(),
            source: std::io::Error::other(e),
        })?;
        write_durably(&self.allocations_dir().join(ip.to_string()), &body)?;
        // Only a hint (allocation goes on after it, so freed addresses are not reused at once):
        // written under the lock but not synced; after a crash it may name an older address.
        let last = self.dir.join("last");
        std::fs::write(&last, ip.to_string()).map_err(io("writing", &last))?;
        Ok(record)
    }

    /// Releases the address of (container, ifname). Returns it, or None when there was none.
    pub fn release(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<Allocation>, IpamError> {
        let _lock = self.lock()?;
        let Some(a) = self
            .list()?
            .into_iter()
            .find(|a| a.container_id == container_id && a.ifname == ifname)
        else {
            return Ok(None);
        };
        let path = self.allocations_dir().join(a.ip.to_string());
        std::fs::remove_file(&path).map_err(io("removing", &path))?;
        let dir = self.allocations_dir();
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io("syncing", &dir))?;
        Ok(Some(a))
    }
}

/// The first usable address after `last` (wrapping), skipping used ones and each block's
/// network and broadcast addresses.
pub fn next_free(
    blocks: &[Ipv4Net],
    used: &std::collections::BTreeSet<Ipv4Addr>,
    last: Option<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    let candidates: Vec<Ipv4Addr> = blocks.iter().flat_map(|b| b.hosts()).collect();
    if candidates.is_empty() {
        return None;
    }
    let start = last
        .and_then(|l| candidates.iter().position(|c| *c == l))
        .map_or(0, |i| i + 1);
    (0..candidates.len())
        .map(|i| candidates[(start + i) % candidates.len()])
        .find(|c| !used.contains(c))
}

fn write_durably(path: &Path, body: &[u8]) -> Result<(), IpamError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io("creating", &tmp))?;
    f.write_all(body).map_err(io("writing", &tmp))?;
    f.sync_all().map_err(io("syncing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("renaming", path))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing", dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn rec(c: &str) -> Allocation {
        Allocation {
            ip: Ipv4Addr::UNSPECIFIED,
            container_id: c.into(),
            ifname: "eth0".into(),
            pod_namespace: "default".into(),
            pod_name: c.into(),
        }
    }

    #[test]
    fn next_free_skips_used_network_and_broadcast_and_wraps() {
        let b: Vec<Ipv4Net> = vec!["10.0.0.0/30".parse().unwrap()]; // hosts .1 and .2
        let used = BTreeSet::from(["10.0.0.1".parse().unwrap()]);
        assert_eq!(
            next_free(&b, &used, None),
            Some("10.0.0.2".parse().unwrap())
        );
        assert_eq!(
            next_free(&b, &BTreeSet::new(), Some("10.0.0.2".parse().unwrap())),
            Some("10.0.0.1".parse().unwrap())
        );
        let all = BTreeSet::from(["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()]);
        assert_eq!(next_free(&b, &all, None), None);
    }

    #[test]
    fn allocations_are_unique_sticky_and_released() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let blocks = vec!["10.244.1.0/29".parse().unwrap()];
        let a = store.allocate(&blocks, rec("a")).unwrap();
        let b = store.allocate(&blocks, rec("b")).unwrap();
        assert_ne!(a.ip, b.ip);
        assert_eq!(
            store.allocate(&blocks, rec("a")).unwrap().ip,
            a.ip,
            "a retried ADD keeps its address"
        );
        assert_eq!(store.release("a", "eth0").unwrap().unwrap().ip, a.ip);
        assert_eq!(
            store.release("a", "eth0").unwrap(),
            None,
            "release is idempotent"
        );
        // A freed address is not handed out again at once.
        let c = store.allocate(&blocks, rec("c")).unwrap();
        assert_ne!(c.ip, a.ip);
        assert_eq!(store.list().unwrap().len(), 2);
    }

    #[test]
    fn exhaustion_names_the_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let blocks = vec!["10.244.1.0/30".parse().unwrap()];
        store.allocate(&blocks, rec("a")).unwrap();
        store.allocate(&blocks, rec("b")).unwrap();
        let e = store.allocate(&blocks, rec("c")).unwrap_err();
        assert!(e.to_string().contains("10.244.1.0/30"), "{e}");
    }

    #[test]
    fn concurrent_processes_never_share_an_address() {
        // Threads open the store independently, as separate plugin processes would.
        let dir = tempfile::tempdir().unwrap();
        let blocks: Vec<Ipv4Net> = vec!["10.244.1.0/24".parse().unwrap()];
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let path = dir.path().to_path_buf();
                let blocks = blocks.clone();
                std::thread::spawn(move || {
                    (0..8)
                        .map(|j| {
                            Store::new(&path)
                                .allocate(&blocks, rec(&format!("c{i}-{j}")))
                                .unwrap()
                                .ip
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let ips: Vec<Ipv4Addr> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let unique: BTreeSet<_> = ips.iter().collect();
        assert_eq!(unique.len(), ips.len());
        assert_eq!(Store::new(dir.path()).list().unwrap().len(), 128);
    }

    #[test]
    fn an_unfinished_write_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        std::fs::create_dir_all(dir.path().join("allocations")).unwrap();
        std::fs::write(dir.path().join("allocations/10.244.1.9.tmp"), b"{\"ip\":").unwrap();
        assert!(store.list().unwrap().is_empty());
    }
}
