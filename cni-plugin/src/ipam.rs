//! The local IPAM store: which addresses of this node's blocks are in use, by which pod.
//!
//! Layout under the store directory: `lock` (flock'ed for every change, so concurrent plugin
//! processes never hand out one address twice), `allocations/<ip>` (one JSON record per address,
//! written to a temporary file and renamed: a plugin killed at any point leaves either no record
//! or a whole one), and `last` (the last address handed out; allocation continues after it, so a
//! freed address is not reused at once).
//!
//! Durability by design, not by fsync: a record must last as long as the pod that holds its
//! address can be alive. A killed plugin or agent loses nothing (what it wrote is in the page
//! cache, which every later reader sees); only a kernel crash or power loss can lose unsynced
//! writes, and no pod survives either (network namespaces and veths are kernel objects; the
//! runtime creates every sandbox anew after a reboot). So nothing is fsync'ed (four fsyncs per
//! ADD cost ~0.4 ms on this VM's disk, milliseconds on a cloud volume). What a power loss can
//! leave, an empty or torn record, is written before this boot: [`Store::tidy`] removes those,
//! since no live pod can hold their address.
//! The store allocates from the CIDRs the node configuration lists, read under the lock (the
//! agent takes a block out of the configuration before it checks, under the same lock, that the
//! block is empty and releases it: an ADD never allocates from a released block).
//!
//! `attachments/<container id>:<ifname>` (the index) holds the address of that attachment's
//! record, so ADD and DEL find it, and ADD finds a free address, without reading every record:
//! their cost does not grow with the pods on the node. The index is written before the record
//! and checked against it on every read (an entry whose record is missing or names another
//! attachment is stale and ignored), so a plugin killed between the two writes leaves nothing
//! a retry would trip on; a store without an index (written by an older version) gets one
//! built from its records, once, under the lock.
//!
//! A file under `allocations/` that is not a readable record (corrupt, truncated, a stray file
//! or directory) never stops ADD or DEL: a name that is not an address is moved to `set-aside/`
//! by the next change; an address whose record cannot be read stays out of use (a pod may hold
//! it) and is moved aside by [`Store::tidy`] (the agent, periodically); both are reported
//! ([`Scan::bad`], `ferrox ipam check`, the agent's log and metrics) until released by hand
//! (`ferrox ipam release IP`, [`Store::forget_set_aside`]).

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
    #[error("reading the node configuration for its blocks: {0}")]
    Blocks(String),
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

/// A file of the store that is not a readable allocation record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BadRecord {
    pub path: PathBuf,
    /// Why it cannot be read.
    pub reason: String,
    /// The address its name holds: not handed out while the file is there.
    pub ip: Option<Ipv4Addr>,
}

/// What the store holds: the records, and the files that are not records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    pub allocations: Vec<Allocation>,
    /// In `allocations/` (moved aside by the next change) or already in `set-aside/`.
    pub bad: Vec<BadRecord>,
}

/// The directory unreadable records are moved to.
pub const SET_ASIDE_DIR: &str = "set-aside";

/// The directory of the attachment index.
pub const ATTACHMENTS_DIR: &str = "attachments";

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

    fn set_aside_dir(&self) -> PathBuf {
        self.dir.join(SET_ASIDE_DIR)
    }

    fn attachments_dir(&self) -> PathBuf {
        self.dir.join(ATTACHMENTS_DIR)
    }

    /// The index entry of (container, ifname); `None` for names a file name cannot carry
    /// (those attachments are found by a scan).
    fn index_path(&self, container_id: &str, ifname: &str) -> Option<PathBuf> {
        let name = format!("{container_id}:{ifname}");
        let plain = !container_id.is_empty()
            && !ifname.is_empty()
            && name.len() <= 250
            && !name.contains(['/', '\0'])
            && !name.starts_with('.');
        plain.then(|| self.attachments_dir().join(name))
    }

    /// Builds the index from the records when the store has none (called with the lock held).
    fn ensure_index(&self) -> Result<(), IpamError> {
        let dir = self.attachments_dir();
        if dir.is_dir() {
            return Ok(());
        }
        let tmp = self.dir.join(format!("{ATTACHMENTS_DIR}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io("creating", &tmp))?;
        for a in self.scan()?.allocations {
            if let Some(path) = self.index_path(&a.container_id, &a.ifname)
                && let Some(name) = path.file_name()
            {
                let entry = tmp.join(name);
                std::fs::write(&entry, a.ip.to_string()).map_err(io("writing", &entry))?;
            }
        }
        std::fs::rename(&tmp, &dir).map_err(io("renaming", &dir))
    }

    /// The record of (container, ifname): through the index, or by a scan for names the index
    /// cannot carry (called with the lock held).
    fn find_attachment(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<Allocation>, IpamError> {
        let matches = |a: &Allocation| a.container_id == container_id && a.ifname == ifname;
        let Some(path) = self.index_path(container_id, ifname) else {
            return Ok(self.scan()?.allocations.into_iter().find(matches));
        };
        Ok(std::fs::read_to_string(&path)
            .ok()
            .and_then(|ip| ip.trim().parse().ok())
            .and_then(|ip| self.get(ip))
            .filter(matches))
    }

    /// Addresses that may not be handed out, from file names alone: every name under
    /// `allocations/` that is an address (readable or not), and those of set-aside records.
    /// Names that are not addresses are moved aside on the way (called with the lock held).
    fn taken(&self) -> Result<std::collections::BTreeSet<Ipv4Addr>, IpamError> {
        let mut taken = std::collections::BTreeSet::new();
        let mut strays = Vec::new();
        for path in list_dir(&self.allocations_dir())? {
            let name = file_name(&path);
            if name.ends_with(".tmp") {
                continue;
            }
            match name.parse::<Ipv4Addr>() {
                Ok(ip) => {
                    taken.insert(ip);
                }
                Err(_) => strays.push(BadRecord {
                    path,
                    reason: "not an allocation record (its name is not an address)".into(),
                    ip: None,
                }),
            }
        }
        taken.extend(self.set_aside_files()?.into_iter().filter_map(|(_, ip)| ip));
        self.set_aside(&Scan {
            allocations: Vec::new(),
            bad: strays,
        });
        Ok(taken)
    }

    /// The record of (container, ifname), through the index (a scan when the store has no
    /// index yet, or when the index knows no such attachment).
    pub fn find(&self, container_id: &str, ifname: &str) -> Result<Option<Allocation>, IpamError> {
        if self.attachments_dir().is_dir()
            && let Some(a) = self.find_attachment(container_id, ifname)?
        {
            return Ok(Some(a));
        }
        Ok(self
            .scan()?
            .allocations
            .into_iter()
            .find(|a| a.container_id == container_id && a.ifname == ifname))
    }

    /// Moves every unreadable file under `allocations/` to `set-aside/`, under the lock, and
    /// returns what the store holds: the agent's periodic pass (ADD and DEL read no record
    /// but their own).
    pub fn tidy(&self) -> Result<Scan, IpamError> {
        self.tidy_since(boot_time())
    }

    /// [`Store::tidy`], with this boot's start given: unreadable files last written before it
    /// (a power loss tore or emptied them) are removed, not kept out of use, since no pod of an
    /// earlier boot is alive.
    pub fn tidy_since(&self, boot: Option<std::time::SystemTime>) -> Result<Scan, IpamError> {
        let _lock = self.lock()?;
        let mut scan = self.scan()?;
        if let Some(boot) = boot {
            scan.bad.retain(|b| {
                let before_boot = std::fs::metadata(&b.path)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t < boot);
                !(before_boot && std::fs::remove_file(&b.path).is_ok())
            });
        }
        self.set_aside(&scan);
        // Index entries whose record is gone or names another attachment (a plugin killed
        // between its writes, and never retried nor deleted) go too.
        let live: std::collections::BTreeSet<String> = scan
            .allocations
            .iter()
            .map(|a| format!("{}:{}:{}", a.container_id, a.ifname, a.ip))
            .collect();
        for path in list_dir(&self.attachments_dir())? {
            let name = file_name(&path);
            let ip = std::fs::read_to_string(&path).unwrap_or_default();
            if !live.contains(&format!("{name}:{}", ip.trim())) {
                let _ = std::fs::remove_file(&path);
            }
        }
        self.scan()
    }

    /// Every allocation record, and every file that is not one.
    pub fn scan(&self) -> Result<Scan, IpamError> {
        let mut scan = Scan::default();
        let dir = self.allocations_dir();
        for path in list_dir(&dir)? {
            let name = file_name(&path);
            if name.ends_with(".tmp") {
                continue; // a write that never finished (or is in progress)
            }
            let ip = name.parse::<Ipv4Addr>().ok();
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                // Released by a concurrent DEL between the listing and the read.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    scan.bad.push(BadRecord {
                        path,
                        reason: format!("unreadable: {e}"),
                        ip,
                    });
                    continue;
                }
            };
            match serde_json::from_slice::<Allocation>(&bytes) {
                Ok(a) if Some(a.ip) == ip => scan.allocations.push(a),
                Ok(a) => scan.bad.push(BadRecord {
                    path,
                    reason: format!("the record is for {}, not its file name", a.ip),
                    ip,
                }),
                Err(e) if ip.is_some() => scan.bad.push(BadRecord {
                    path,
                    reason: format!("corrupt or truncated record: {e}"),
                    ip,
                }),
                Err(_) => scan.bad.push(BadRecord {
                    path,
                    reason: "not an allocation record (its name is not an address)".into(),
                    ip,
                }),
            }
        }
        for (path, ip) in self.set_aside_files()? {
            scan.bad.push(BadRecord {
                reason: "set aside: unreadable when it was found".into(),
                ip,
                path,
            });
        }
        scan.allocations.sort_by_key(|a| a.ip);
        Ok(scan)
    }

    /// The record of `ip`, if there is a readable one (one file read, no scan).
    pub fn get(&self, ip: Ipv4Addr) -> Option<Allocation> {
        let bytes = std::fs::read(self.allocations_dir().join(ip.to_string())).ok()?;
        serde_json::from_slice::<Allocation>(&bytes)
            .ok()
            .filter(|a| a.ip == ip)
    }

    /// The files under `set-aside/`, each with the address its original name held
    /// (`<name>.<unix seconds>`, see `set_aside`).
    fn set_aside_files(&self) -> Result<Vec<(PathBuf, Option<Ipv4Addr>)>, IpamError> {
        Ok(list_dir(&self.set_aside_dir())?
            .into_iter()
            .map(|path| {
                let name = file_name(&path);
                let original = name.rsplit_once('.').map_or(name.as_str(), |(n, _)| n);
                let ip = original.parse().ok();
                (path, ip)
            })
            .collect())
    }

    /// Every allocation record (files that are not records are left out; see [`Store::scan`]).
    pub fn list(&self) -> Result<Vec<Allocation>, IpamError> {
        Ok(self.scan()?.allocations)
    }

    /// Moves the unreadable files of `scan` that are still under `allocations/` to `set-aside/`
    /// (called with the lock held). Best effort: a file that cannot be moved stays reported.
    fn set_aside(&self, scan: &Scan) {
        let into = self.set_aside_dir();
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for bad in scan
            .bad
            .iter()
            .filter(|b| b.path.starts_with(self.allocations_dir()))
        {
            let Some(name) = bad.path.file_name() else {
                continue;
            };
            if std::fs::create_dir_all(&into).is_ok() {
                let to = into.join(format!("{}.{stamp}", name.to_string_lossy()));
                let _ = std::fs::rename(&bad.path, to);
            }
        }
    }

    /// Removes the unreadable records that name `ip`, set aside or not (an operator found the
    /// address free); returns how many there were.
    pub fn forget_set_aside(&self, ip: Ipv4Addr) -> Result<usize, IpamError> {
        let _lock = self.lock()?;
        let mut n = 0;
        for b in self.scan()?.bad {
            if b.ip == Some(ip) {
                std::fs::remove_file(&b.path).map_err(io("removing", &b.path))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Allocates an address for (container, ifname) from `blocks`, or returns the one it already
    /// has (a retried ADD gets the same address).
    pub fn allocate(
        &self,
        blocks: &[Ipv4Net],
        record: Allocation,
    ) -> Result<Allocation, IpamError> {
        self.allocate_from(|| Ok(blocks.to_vec()), record)
    }

    /// [`Store::allocate`] from the blocks `blocks()` returns, called with the lock held (the
    /// plugin re-reads the node configuration there, so a block the agent released while this
    /// ADD waited for the lock is never used).
    pub fn allocate_from(
        &self,
        blocks: impl FnOnce() -> Result<Vec<Ipv4Net>, IpamError>,
        mut record: Allocation,
    ) -> Result<Allocation, IpamError> {
        let _lock = self.lock()?;
        self.ensure_index()?;
        if let Some(a) = self.find_attachment(&record.container_id, &record.ifname)? {
            return Ok(a);
        }
        let blocks = blocks()?;
        let used = self.taken()?;
        let last = std::fs::read_to_string(self.dir.join("last"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let ip = next_free(&blocks, &used, last).ok_or_else(|| IpamError::Exhausted {
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
        // The index entry first: a record always has one, and an entry without its record is
        // stale (ignored, overwritten).
        if let Some(entry) = self.index_path(&record.container_id, &record.ifname) {
            write_atomically(&entry, ip.to_string().as_bytes())?;
        }
        write_atomically(&self.allocations_dir().join(ip.to_string()), &body)?;
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
        self.ensure_index()?;
        let index = self.index_path(container_id, ifname);
        let found = match self.find_attachment(container_id, ifname)? {
            Some(a) => Some(a),
            // Not through the index: a scan makes sure (a DEL of something never added, or
            // already released, pays for it; ADD's retry never does).
            None if index.is_some() => self
                .scan()?
                .allocations
                .into_iter()
                .find(|a| a.container_id == container_id && a.ifname == ifname),
            None => None,
        };
        let Some(a) = found else {
            if let Some(entry) = index {
                let _ = std::fs::remove_file(entry);
            }
            return Ok(None);
        };
        let path = self.allocations_dir().join(a.ip.to_string());
        std::fs::remove_file(&path).map_err(io("removing", &path))?;
        if let Some(entry) = index {
            match std::fs::remove_file(&entry) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io("removing", &entry)(e));
                }
                _ => {}
            }
        }
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

/// The last component of `path`, as text.
fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The entries of `dir` (none when it does not exist).
fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, IpamError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io("listing", dir)(e)),
    };
    entries
        .map(|e| e.map(|e| e.path()).map_err(io("listing", dir)))
        .collect()
}

/// Writes `body` to `path` whole or not at all, for readers and for a writer killed midway (not
/// across a power loss: see the module's note on durability).
fn write_atomically(path: &Path, body: &[u8]) -> Result<(), IpamError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io("creating", &tmp))?;
    f.write_all(body).map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("renaming", path))
}

/// When this boot started (`btime` of `/proc/stat`).
pub fn boot_time() -> Option<std::time::SystemTime> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let secs: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
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
        assert_eq!(store.get(a.ip), Some(a.clone()));
        assert_eq!(store.release("a", "eth0").unwrap().unwrap().ip, a.ip);
        assert_eq!(store.get(a.ip), None, "released");
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
    fn a_store_without_an_index_gets_one_and_keeps_its_attachments() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let allocs = dir.path().join("allocations");
        std::fs::create_dir_all(&allocs).unwrap();
        // Records as an older version wrote them, without an index.
        for (c, ip) in [("a", "10.244.1.1"), ("b", "10.244.1.2")] {
            let r = Allocation {
                ip: ip.parse().unwrap(),
                ..rec(c)
            };
            std::fs::write(allocs.join(ip), serde_json::to_vec(&r).unwrap()).unwrap();
        }
        let blocks = vec!["10.244.1.0/29".parse().unwrap()];
        assert_eq!(
            store.allocate(&blocks, rec("a")).unwrap().ip.to_string(),
            "10.244.1.1",
            "a retried ADD finds its address through the built index"
        );
        assert!(dir.path().join("attachments/a:eth0").exists());
        assert!(dir.path().join("attachments/b:eth0").exists());
        let c = store.allocate(&blocks, rec("c")).unwrap();
        assert_eq!(c.ip.to_string(), "10.244.1.3");
        assert_eq!(
            store.release("b", "eth0").unwrap().unwrap().ip.to_string(),
            "10.244.1.2"
        );
        assert!(!dir.path().join("attachments/b:eth0").exists());
        assert_eq!(store.list().unwrap().len(), 2);
    }

    #[test]
    fn stale_index_entries_are_ignored_and_add_reads_no_other_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let blocks = vec!["10.244.1.0/29".parse().unwrap()];
        let a = store.allocate(&blocks, rec("a")).unwrap();
        let index = dir.path().join("attachments");
        // A plugin killed between its two writes: an entry without its record; and an entry
        // naming a record that belongs to another attachment.
        std::fs::write(index.join("x:eth0"), "10.244.1.5").unwrap();
        std::fs::write(index.join("y:eth0"), a.ip.to_string()).unwrap();
        let x = store.allocate(&blocks, rec("x")).unwrap();
        let y = store.allocate(&blocks, rec("y")).unwrap();
        assert_ne!(y.ip, a.ip, "another attachment's record is not y's");
        assert_eq!(store.get(x.ip).unwrap().container_id, "x");
        assert_eq!(store.get(a.ip), Some(a.clone()), "a's record untouched");
        // DEL of an attachment that never was, with a stale entry: nothing, and the entry goes.
        std::fs::write(index.join("z:eth0"), a.ip.to_string()).unwrap();
        assert_eq!(store.release("z", "eth0").unwrap(), None);
        assert!(!index.join("z:eth0").exists());
        assert_eq!(store.get(a.ip), Some(a.clone()));
        // The agent's pass removes stale entries and keeps live ones.
        std::fs::write(index.join("w:eth0"), "10.244.1.4").unwrap();
        std::fs::write(index.join("v:eth0"), a.ip.to_string()).unwrap();
        store.tidy().unwrap();
        let mut entries: Vec<String> = std::fs::read_dir(&index)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        entries.sort();
        assert_eq!(entries, ["a:eth0", "x:eth0", "y:eth0"]);
        // Records are not read to find a free address: one that cannot be read still holds it.
        let held = "10.244.1.6";
        std::fs::write(dir.path().join("allocations").join(held), b"{").unwrap();
        let mut got = BTreeSet::new();
        while let Ok(n) = store.allocate(&blocks, rec(&format!("n{}", got.len()))) {
            got.insert(n.ip);
        }
        assert!(!got.contains(&held.parse().unwrap()), "{got:?}");
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

    /// What a power loss can leave (records are not fsync'ed): an empty or torn record written
    /// before this boot holds no live pod's address, so the agent's pass frees it; one written
    /// since is set aside and kept out of use.
    #[test]
    fn unreadable_records_from_before_the_boot_are_freed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let blocks: Vec<Ipv4Net> = vec!["10.244.1.0/29".parse().unwrap()]; // .1 to .6
        let kept = store.allocate(&blocks, rec("live")).unwrap();
        let allocs = dir.path().join("allocations");
        let boot = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        std::fs::write(allocs.join("10.244.1.3"), b"").unwrap();
        std::fs::File::options()
            .write(true)
            .open(allocs.join("10.244.1.3"))
            .unwrap()
            .set_modified(boot - std::time::Duration::from_secs(3600))
            .unwrap();
        std::fs::write(allocs.join("10.244.1.4"), br#"{"ip":"10.2"#).unwrap();
        assert_eq!(store.scan().unwrap().bad.len(), 2);

        let scan = store.tidy_since(Some(boot)).unwrap();
        assert_eq!(scan.allocations, [kept]);
        let bad: Vec<_> = scan.bad.iter().map(|b| b.ip).collect();
        assert_eq!(
            bad,
            [Some("10.244.1.4".parse().unwrap())],
            "{:#?}",
            scan.bad
        );
        let mut got = BTreeSet::new();
        while let Ok(n) = store.allocate(&blocks, rec(&format!("n{}", got.len()))) {
            got.insert(n.ip);
        }
        assert!(got.contains(&"10.244.1.3".parse().unwrap()), "{got:?}");
        assert!(!got.contains(&"10.244.1.4".parse().unwrap()), "{got:?}");
        // The agent's pass reads this machine's boot time.
        assert!(boot_time().is_some_and(|b| b < std::time::SystemTime::now()));
    }

    #[test]
    fn unreadable_files_are_set_aside_reported_and_never_stop_add_or_del() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let blocks: Vec<Ipv4Net> = vec!["10.244.1.0/29".parse().unwrap()]; // .1 to .6
        let a = store.allocate(&blocks, rec("a")).unwrap();
        let allocs = dir.path().join("allocations");
        // A truncated record, a record under the wrong name, a stray file and a directory.
        std::fs::write(allocs.join("10.244.1.2"), br#"{"ip":"10.244.1.2","contai"#).unwrap();
        std::fs::write(
            allocs.join("10.244.1.3"),
            serde_json::to_vec(&Allocation {
                ip: "10.244.1.5".parse().unwrap(),
                ..rec("x")
            })
            .unwrap(),
        )
        .unwrap();
        std::fs::write(allocs.join("notes.txt"), b"hello").unwrap();
        std::fs::create_dir(allocs.join("junk")).unwrap();

        let scan = store.scan().unwrap();
        assert_eq!(scan.allocations, std::slice::from_ref(&a));
        assert_eq!(scan.bad.len(), 4, "{:#?}", scan.bad);
        // ADD goes on, around the addresses whose records cannot be read.
        let b = store.allocate(&blocks, rec("b")).unwrap();
        let c = store.allocate(&blocks, rec("c")).unwrap();
        let taken: BTreeSet<Ipv4Addr> = [a.ip, b.ip, c.ip].into();
        for held in ["10.244.1.2", "10.244.1.3"] {
            assert!(!taken.contains(&held.parse().unwrap()), "{held} handed out");
        }
        // ADD moved the names that are not addresses aside at once; the agent's periodic
        // pass moves the unreadable records. All stay reported.
        let scan = store.scan().unwrap();
        let aside = |scan: &Scan| {
            scan.bad
                .iter()
                .filter(|b| b.path.starts_with(dir.path().join(SET_ASIDE_DIR)))
                .count()
        };
        assert_eq!((scan.bad.len(), aside(&scan)), (4, 2), "{:#?}", scan.bad);
        let scan = store.tidy().unwrap();
        assert_eq!(scan.allocations.len(), 3);
        assert_eq!(scan.bad.len(), 4);
        assert!(
            scan.bad
                .iter()
                .all(|b| b.path.starts_with(dir.path().join(SET_ASIDE_DIR))),
            "{:#?}",
            scan.bad
        );
        // DEL goes on.
        assert_eq!(store.release("b", "eth0").unwrap().unwrap().ip, b.ip);
        // An operator frees one address by hand; it can be handed out again.
        assert_eq!(
            store
                .forget_set_aside("10.244.1.2".parse().unwrap())
                .unwrap(),
            1
        );
        assert_eq!(store.scan().unwrap().bad.len(), 3);
        let mut got = BTreeSet::new();
        while let Ok(n) = store.allocate(&blocks, rec(&format!("n{}", got.len()))) {
            got.insert(n.ip);
        }
        assert!(got.contains(&"10.244.1.2".parse().unwrap()), "{got:?}");
        assert!(!got.contains(&"10.244.1.3".parse().unwrap()), "{got:?}");
    }

    /// Replaces the blocks file atomically, as the agent writes the node configuration.
    fn write_blocks(config: &Path, blocks: &[Ipv4Net]) {
        let tmp = config.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(blocks).unwrap()).unwrap();
        std::fs::rename(&tmp, config).unwrap();
    }

    /// The agent's way of releasing a block: out of the configuration first, then, under the
    /// store's lock, a check that it is still empty. Returns whether it released the block.
    fn release_block(store: &Store, config: &Path, keep: &[Ipv4Net], block: Ipv4Net) -> bool {
        write_blocks(config, keep);
        store
            .with_lock(|| !store.list().unwrap().iter().any(|a| block.contains(&a.ip)))
            .unwrap()
    }

    #[test]
    fn adds_racing_a_block_release_never_allocate_from_the_released_block() {
        let read = |config: &Path| -> Result<Vec<Ipv4Net>, IpamError> {
            let bytes = std::fs::read(config).map_err(|e| IpamError::Blocks(e.to_string()))?;
            serde_json::from_slice(&bytes).map_err(|e| IpamError::Blocks(e.to_string()))
        };
        let full: Ipv4Net = "10.250.0.0/30".parse().unwrap();
        let leaving: Ipv4Net = "10.250.1.0/28".parse().unwrap();
        // Deterministic: ADDs that read the configuration while the block was there, then wait
        // for the lock the release holds.
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("blocks.json");
        std::fs::write(&config, serde_json::to_vec(&[full, leaving]).unwrap()).unwrap();
        let store = Store::new(dir.path().join("store"));
        store.allocate(&[full], rec("f1")).unwrap();
        store.allocate(&[full], rec("f2")).unwrap();
        let (locked_tx, locked_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let holder = {
            let path = dir.path().join("store");
            std::thread::spawn(move || {
                Store::new(&path)
                    .with_lock(|| {
                        locked_tx.send(()).unwrap();
                        go_rx.recv().unwrap();
                    })
                    .unwrap();
            })
        };
        locked_rx.recv().unwrap();
        let seen_before = read(&config).unwrap();
        assert!(seen_before.contains(&leaving));
        let adds: Vec<_> = (0..4)
            .map(|i| {
                let (path, config) = (dir.path().join("store"), config.clone());
                std::thread::spawn(move || {
                    Store::new(&path).allocate_from(|| read(&config), rec(&format!("a{i}")))
                })
            })
            .collect();
        // The release: out of the configuration while the ADDs wait, then the check.
        write_blocks(&config, &[full]);
        go_tx.send(()).unwrap();
        holder.join().unwrap();
        assert!(release_block(&store, &config, &[full], leaving));
        for add in adds {
            let r = add.join().unwrap();
            assert!(
                matches!(r, Err(IpamError::Exhausted { .. })),
                "an ADD got an address after its block left: {r:?}"
            );
        }
        // Racing for real: ADDs and releases on threads, many rounds; after each round the
        // released block holds nothing, and no address was handed out twice.
        for round in 0..30 {
            let dir = tempfile::tempdir().unwrap();
            let config = dir.path().join("blocks.json");
            write_blocks(&config, &[full, leaving]);
            let store = Store::new(dir.path().join("store"));
            store.allocate(&[full], rec("f1")).unwrap();
            store.allocate(&[full], rec("f2")).unwrap();
            let adds: Vec<_> = (0..6)
                .map(|i| {
                    let (path, config) = (dir.path().join("store"), config.clone());
                    std::thread::spawn(move || {
                        Store::new(&path)
                            .allocate_from(|| read(&config), rec(&format!("r{round}-{i}")))
                            .ok()
                    })
                })
                .collect();
            let released = release_block(&store, &config, &[full], leaving);
            let got: Vec<Allocation> = adds.into_iter().filter_map(|a| a.join().unwrap()).collect();
            let all = store.list().unwrap();
            let unique: BTreeSet<Ipv4Addr> = all.iter().map(|a| a.ip).collect();
            assert_eq!(unique.len(), all.len(), "round {round}: {all:?}");
            if released {
                assert!(
                    !all.iter().any(|a| leaving.contains(&a.ip)),
                    "round {round}: {leaving} released but holds {got:?}"
                );
            } else {
                // The release saw an allocation and kept the block (the agent writes it back).
                assert!(all.iter().any(|a| leaving.contains(&a.ip)), "round {round}");
            }
        }
    }
}
