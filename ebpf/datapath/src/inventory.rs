//! What is pinned, with kernel ids: the proof that a restart re-adopted rather than re-created,
//! and the first thing to look at on a node.

use std::path::PathBuf;

use aya::{maps::MapInfo, programs::ProgramInfo};

use crate::{
    DatapathError, PinLayout, Result,
    link_info::{LinkTarget, pinned_link_info},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ObjectKind {
    Map,
    Program,
    Link,
    /// A pod's `cls_bpf` filter (no pin: `id` is its program's).
    Filter,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PinnedObject {
    pub kind: ObjectKind,
    /// Path relative to `<root>/v1`, e.g. `maps/SVC_V1`.
    pub name: String,
    /// Where it is pinned (none for a filter).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    pub id: u32,
    /// For links: what they are attached to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<LinkTarget>,
}

fn files(dir: &std::path::Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(DatapathError::io("listing", dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| DatapathError::io("listing", dir, e))?;
        let path = entry.path();
        if path.is_dir() {
            out.extend(files(&path)?);
        } else {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Every object pinned under the layout's version directory, then the pod filters of the
/// calling thread's network namespace.
pub fn inventory(layout: &PinLayout) -> Result<Vec<PinnedObject>> {
    let base = layout.versioned();
    let name_of = |p: &PathBuf| p.strip_prefix(&base).unwrap_or(p).display().to_string();
    let mut out = Vec::new();
    for path in files(&layout.maps_dir())? {
        let info =
            MapInfo::from_pin(&path).map_err(|e| DatapathError::map("inspecting", "pinned", e))?;
        out.push(PinnedObject {
            kind: ObjectKind::Map,
            name: name_of(&path),
            id: info.id(),
            path: Some(path),
            target: None,
        });
    }
    for path in files(&layout.progs_dir())? {
        let info = ProgramInfo::from_pin(&path)
            .map_err(|e| DatapathError::program("inspecting", "pinned", e))?;
        out.push(PinnedObject {
            kind: ObjectKind::Program,
            name: name_of(&path),
            id: info.id(),
            path: Some(path),
            target: None,
        });
    }
    for path in files(&layout.links_dir())? {
        let info = pinned_link_info(&path)?;
        out.push(PinnedObject {
            kind: ObjectKind::Link,
            name: name_of(&path),
            id: info.id,
            path: Some(path),
            target: Some(info.target),
        });
    }
    for f in crate::attach::pod_filters(layout)? {
        out.push(PinnedObject {
            kind: ObjectKind::Filter,
            name: match f.side {
                crate::PodSide::FromPod => format!("filters/{}", f.interface),
                crate::PodSide::ToPod => format!("filters-to-pod/{}", f.interface),
            },
            path: None,
            id: f.filter.prog_id,
            target: Some(LinkTarget::TcFilter {
                ifindex: f.filter.ifindex,
                priority: f.filter.priority,
                handle: f.filter.handle,
            }),
        });
    }
    Ok(out)
}

/// Capacity and kernel memory of one pinned map.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapMemory {
    /// Path relative to `<root>/v1/maps`, e.g. `CT_V2` (or `resize/CT_V2` while a resize
    /// finishes).
    pub name: String,
    pub capacity: u32,
    /// Allocated at full capacity when created (false: `BPF_F_NO_PREALLOC`, or a type that
    /// allocates as it fills).
    pub preallocated: bool,
    /// What the kernel charges for it (`memlock` of its fdinfo, what `bpftool map show` prints).
    pub bytes: u64,
}

pub(crate) fn memlock(fd: std::os::fd::BorrowedFd<'_>) -> Option<u64> {
    use std::os::fd::AsRawFd as _;
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Every pinned map with its capacity and what the kernel charges for it.
pub fn map_memory(layout: &PinLayout) -> Result<Vec<MapMemory>> {
    use std::os::fd::AsFd as _;
    let base = layout.maps_dir();
    let mut out = Vec::new();
    for path in files(&base)? {
        let data = aya::maps::MapData::from_pin(&path)
            .map_err(|e| DatapathError::map("opening pinned", "pinned", e))?;
        let info = data
            .info()
            .map_err(|e| DatapathError::map("inspecting", "pinned", e))?;
        let bytes = memlock(data.fd().as_fd()).unwrap_or(0);
        // Hashes are preallocated unless BPF_F_NO_PREALLOC (1); LPM tries never are.
        let preallocated = info.map_flags() & 1 == 0
            && !matches!(info.map_type(), Ok(aya::maps::MapType::LpmTrie));
        out.push(MapMemory {
            name: path
                .strip_prefix(&base)
                .unwrap_or(&path)
                .display()
                .to_string(),
            capacity: info.max_entries(),
            preallocated,
            bytes,
        });
    }
    Ok(out)
}

/// What [`cleanup`] removed.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CleanupReport {
    pub links: usize,
    /// Pod filters removed.
    pub filters: usize,
    pub programs: usize,
    pub maps: usize,
}

/// Removes every pin of the layout: links first (which detaches the programs) and the pod
/// filters of the calling thread's network namespace, then programs, then maps, then the empty
/// directories. The kernel frees each object when its last pin and
/// file descriptor are gone. Safe to run twice.
pub fn cleanup(layout: &PinLayout) -> Result<CleanupReport> {
    let mut report = CleanupReport::default();
    let mut tc = crate::tc_filter::TcSocket::open()
        .map_err(|e| DatapathError::filter("opening netlink for", "pods", e))?;
    for f in crate::attach::pod_filters(layout)? {
        if tc
            .delete_pod_filter(f.filter.ifindex, f.side.filter_hook())
            .map_err(|e| DatapathError::filter("removing the pod filter of", &f.interface, e))?
        {
            report.filters += 1;
        }
    }
    for (dir, count) in [
        (layout.links_dir(), &mut report.links),
        (layout.progs_dir(), &mut report.programs),
        (layout.maps_dir(), &mut report.maps),
    ] {
        for path in files(&dir)? {
            match std::fs::remove_file(&path) {
                Ok(()) => *count += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(DatapathError::io("unpinning", path, e)),
            }
        }
    }
    for dir in [
        layout.pod_links_dir(),
        layout.to_pod_links_dir(),
        layout.retired_links_dir(),
        layout.links_dir(),
        layout.progs_dir(),
        crate::resize::staging_dir(layout),
        layout.maps_dir(),
        layout.versioned(),
    ] {
        match std::fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(DatapathError::io("removing", dir, e)),
        }
    }
    // The root itself goes only when nothing else (another version) lives in it.
    if let Err(e) = std::fs::remove_dir(layout.root())
        && !matches!(
            e.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::DirectoryNotEmpty
        )
    {
        return Err(DatapathError::io("removing", layout.root(), e));
    }
    Ok(report)
}
