//! The bpf filesystem the pins live on: detect it, mount it when missing.

use std::path::Path;

use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

use crate::{DatapathError, PinLayout, Result};

/// True when `path` exists and lies on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// Makes sure the layout's root is on bpffs and its directories exist. When the nearest existing
/// ancestor of the root is not on bpffs, a bpffs is mounted on the root's parent directory (for
/// the default root, `/sys/fs/bpf`). Returns true when it mounted one.
pub fn ensure(layout: &PinLayout) -> Result<bool> {
    let root = layout.root();
    let mut mounted = false;
    let mut probe = root;
    while !probe.exists() {
        match probe.parent() {
            Some(p) => probe = p,
            None => break,
        }
    }
    if !is_bpffs(probe) {
        let mount_point = root.parent().unwrap_or(root);
        std::fs::create_dir_all(mount_point)
            .map_err(|e| DatapathError::io("creating bpffs mount point", mount_point, e))?;
        mount(
            Some("bpf"),
            mount_point,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| DatapathError::MountBpffs {
            path: mount_point.into(),
            source,
        })?;
        tracing::info!(path = %mount_point.display(), "mounted bpffs");
        mounted = true;
    }
    for dir in [
        layout.maps_dir(),
        layout.progs_dir(),
        layout.pod_links_dir(),
    ] {
        std::fs::create_dir_all(&dir).map_err(|e| DatapathError::io("creating", &dir, e))?;
    }
    Ok(mounted)
}

/// A private bpffs mounted on a fresh directory, unmounted (freeing everything pinned in it) and
/// removed on drop, also when a test panics. For tests and benchmarks that must not touch the
/// node's own `/sys/fs/bpf`.
pub struct ScratchBpffs {
    dir: std::path::PathBuf,
}

impl ScratchBpffs {
    /// Mounts a new bpffs at `<parent>/<name>-<pid>-<n>`.
    pub fn new(parent: &Path, name: &str) -> Result<Self> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = parent.join(format!("{name}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| DatapathError::io("creating", &dir, e))?;
        mount(
            Some("bpf"),
            &dir,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| DatapathError::MountBpffs {
            path: dir.clone(),
            source,
        })?;
        Ok(Self { dir })
    }

    /// A pin layout rooted inside this bpffs.
    pub fn layout(&self) -> PinLayout {
        PinLayout::new(self.dir.join("ferrox"))
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for ScratchBpffs {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "unmounting scratch bpffs");
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
