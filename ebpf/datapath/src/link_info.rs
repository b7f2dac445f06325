//! What a pinned link is attached to, read straight from the kernel (`BPF_OBJ_GET` and
//! `BPF_OBJ_GET_INFO_BY_FD`): aya reports a link's id and program but not its target, and
//! re-adopting a link safely needs to know the interface or cgroup it still holds.

use std::{
    ffi::CString,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use crate::{DatapathError, Result};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

const BPF_LINK_TYPE_CGROUP: u32 = 3;
const BPF_LINK_TYPE_XDP: u32 = 6;
const BPF_LINK_TYPE_TCX: u32 = 11;

/// The kernel object a link holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkTarget {
    /// A cgroup, by id (the inode number of its cgroup2 directory). 0 once the cgroup is gone.
    Cgroup {
        cgroup_id: u64,
        attach_type: u32,
    },
    /// A TCX hook. `ifindex` is 0 once the interface is gone.
    Tcx {
        ifindex: u32,
        attach_type: u32,
    },
    /// An XDP hook. `ifindex` is 0 once the interface is gone.
    Xdp {
        ifindex: u32,
    },
    /// A netlink `cls_bpf` filter at the clsact ingress of an interface (pods' programs; not a
    /// link, listed with them by `ferrox datapath`).
    TcFilter {
        ifindex: u32,
        priority: u16,
        handle: u32,
    },
    Other {
        link_type: u32,
    },
}

impl LinkTarget {
    /// False when the object the link was attached to no longer exists (a defunct link).
    pub fn is_live(&self) -> bool {
        match *self {
            Self::Cgroup { cgroup_id, .. } => cgroup_id != 0,
            Self::Tcx { ifindex, .. } | Self::Xdp { ifindex } | Self::TcFilter { ifindex, .. } => {
                ifindex != 0
            }
            Self::Other { .. } => true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PinnedLinkInfo {
    pub id: u32,
    pub prog_id: u32,
    pub target: LinkTarget,
}

/// `struct bpf_link_info`, the fixed head and the first bytes of its union.
#[repr(C)]
#[derive(Default)]
struct RawLinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    // The union starts 8-byte aligned at offset 16. cgroup: {u64 cgroup_id, u32 attach_type};
    // tcx: {u32 ifindex, u32 attach_type}; xdp: {u32 ifindex}.
    union_words: [u64; 8],
}

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-initialised buffer of 128 bytes, larger than every `bpf_attr`
    // variant used here, and the kernel only reads/writes within the size we pass.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens the pinned object at `path` (`BPF_OBJ_GET`).
pub(crate) fn obj_get(path: &Path) -> Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| DatapathError::Syscall {
        cmd: "BPF_OBJ_GET",
        path: path.into(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr).map_err(|source| DatapathError::Syscall {
        cmd: "BPF_OBJ_GET",
        path: path.into(),
        source,
    })?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Reads id, program and target of the link pinned at `path`.
pub fn pinned_link_info(path: &Path) -> Result<PinnedLinkInfo> {
    let fd = obj_get(path)?;
    let mut info = RawLinkInfo::default();
    let mut attr = [0u64; 16];
    attr[0] =
        u64::from(fd.as_raw_fd() as u32) | ((std::mem::size_of::<RawLinkInfo>() as u64) << 32);
    attr[1] = &raw mut info as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map_err(|source| DatapathError::Syscall {
        cmd: "BPF_OBJ_GET_INFO_BY_FD",
        path: path.into(),
        source,
    })?;
    let w = info.union_words;
    let lo = |x: u64| x as u32;
    let hi = |x: u64| (x >> 32) as u32;
    let target = match info.link_type {
        BPF_LINK_TYPE_CGROUP => LinkTarget::Cgroup {
            cgroup_id: w[0],
            attach_type: lo(w[1]),
        },
        BPF_LINK_TYPE_TCX => LinkTarget::Tcx {
            ifindex: lo(w[0]),
            attach_type: hi(w[0]),
        },
        BPF_LINK_TYPE_XDP => LinkTarget::Xdp { ifindex: lo(w[0]) },
        other => LinkTarget::Other { link_type: other },
    };
    Ok(PinnedLinkInfo {
        id: info.id,
        prog_id: info.prog_id,
        target,
    })
}
