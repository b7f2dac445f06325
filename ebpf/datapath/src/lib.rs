//! ferrox-datapath: the only user-space crate that touches aya.
//!
//! It loads the kernel object built from `ebpf/programs`, pins maps, programs and links under a
//! configurable bpffs root (`<root>/v1/...`), re-adopts what is already pinned so that an agent
//! restart never interrupts traffic, attaches programs to cgroups and interfaces, and hands out
//! typed handles to every map. It never decides *what* goes in the maps: that is the agent's job.

mod attach;
pub mod bpffs;
mod error;
mod inventory;
mod layout;
mod link_info;
mod maglev;
mod maps;
mod migrate;
mod programs;
mod testrun;

pub use attach::{
    AttachOutcome, Attachment, PodLinks, XdpAttachMode, attach_pod, detach_pod, ifindex,
};
pub use error::{DatapathError, Result};
pub use inventory::{CleanupReport, ObjectKind, PinnedObject, cleanup, inventory};
pub use layout::{DEFAULT_BPFFS_ROOT, PinLayout};
pub use link_info::{LinkTarget, PinnedLinkInfo, pinned_link_info};
pub use maglev::{MaglevTables, table_digest};
pub use maps::{
    Config, CounterRow, Counters, Events, MapFull, Maps, SourceRange, SourceRanges, Tunnel,
    Tunnels, TypedHash, WriteError,
};
pub use migrate::ConntrackCopy;
pub use programs::{OBJECT, Origin};
pub use testrun::{TcProgram, TestRunOutput};

/// The loaded (or re-adopted) datapath of one node.
pub struct Datapath {
    layout: PinLayout,
    origin: Origin,
    programs: programs::Programs,
    maps: Maps,
}

impl Datapath {
    /// Mounts bpffs if needed, then re-adopts the pinned datapath or loads and pins a new one.
    /// Maps that are pinned are always kept, with their contents.
    pub fn open(layout: &PinLayout) -> Result<Self> {
        bpffs::ensure(layout)?;
        let (programs, origin) = programs::load_or_adopt(layout)?;
        if let Some(c) = migrate::conntrack_v1(layout)? {
            tracing::info!(
                copied = c.copied,
                present = c.present,
                failed = c.failed,
                "flows of the version 1 conntrack map carried into the current one"
            );
        }
        let maps = Maps::open(layout)?;
        tracing::info!(root = %layout.root().display(), ?origin, "datapath ready");
        Ok(Self {
            layout: layout.clone(),
            origin,
            programs,
            maps,
        })
    }

    pub fn layout(&self) -> &PinLayout {
        &self.layout
    }

    /// Whether this start loaded, re-adopted or upgraded the programs.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut Maps {
        &mut self.maps
    }

    /// Ends an upgrade once every hook runs the current programs (the socket hooks, the uplink
    /// and every pod, see [`Datapath::update_pod_links`]): copies the flows the previous
    /// programs tracked since [`Datapath::open`] into the current conntrack map and unpins the
    /// previous map. `None` when there was nothing to carry over.
    pub fn finish_upgrade(&mut self) -> Result<Option<ConntrackCopy>> {
        migrate::finish_conntrack_v1(&self.layout)
    }

    /// Keeps only the map handles; programs stay loaded and attached through their pins.
    pub fn into_maps(self) -> Maps {
        self.maps
    }
}
