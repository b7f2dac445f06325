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
mod resize;
pub mod sizing;
mod tc_filter;
mod testrun;

pub use attach::{
    AttachOutcome, Attachment, PodAttach, PodFilter, PodHook, PodHooks, PodLinks, PodSide,
    XdpAttachMode, attach_pod, detach_pod, ifindex, pod_filters, pod_hook, remove_retired_links,
    retire_pod_link,
};
pub use error::{DatapathError, Result};
pub use inventory::{
    CleanupReport, MapMemory, ObjectKind, PinnedObject, cleanup, inventory, map_memory,
};
pub use layout::{DEFAULT_BPFFS_ROOT, PinLayout};
pub use link_info::{LinkTarget, PinnedLinkInfo, pinned_link_info};
pub use maglev::{MaglevTables, MaglevUsage, table_digest};
pub use maps::{
    Config, CounterRow, Counters, Events, MapFull, Maps, SourceRange, SourceRanges, Tunnel,
    Tunnels, TypedHash, WriteError,
};
pub use migrate::ConntrackCopy;
pub use programs::{OBJECT, Origin};
pub use resize::{KeptLarger, Leftover, MapCopy, RESIZABLE, Resize};
pub use sizing::Sizing;
pub use tc_filter::{BpfFilter, POD_FILTER_HANDLE, POD_FILTER_PRIORITY};
pub use testrun::{RunStats, TcProgram, TestRunOutput};

/// The loaded (or re-adopted) datapath of one node.
pub struct Datapath {
    layout: PinLayout,
    origin: Origin,
    programs: programs::Programs,
    maps: Maps,
    sizing: Sizing,
    resized: Vec<Resize>,
    kept: Vec<KeptLarger>,
}

/// What [`Datapath::finish_upgrade`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Finished {
    /// Flows of a version 1 conntrack map carried into the current one (then unpinned).
    pub conntrack_v1: Option<ConntrackCopy>,
    /// Maps replaced on this start (resized): their flows merged, then unpinned.
    pub leftovers: Vec<Leftover>,
}

impl Datapath {
    /// [`Datapath::open_with`] the capacities for this machine's memory.
    pub fn open(layout: &PinLayout) -> Result<Self> {
        Self::open_with(layout, &Sizing::for_this_node()?)
    }

    /// Mounts bpffs if needed, then re-adopts the pinned datapath or loads and pins a new one.
    /// What pinned maps hold is always kept. A pinned map whose capacity differs from
    /// `sizing`'s (or whose flags differ from the object's) is replaced by one of the right size
    /// holding the same entries, see [`resize`]; the hooks move to it when they are attached
    /// again, and [`Datapath::finish_upgrade`] ends it.
    pub fn open_with(layout: &PinLayout, sizing: &Sizing) -> Result<Self> {
        bpffs::ensure(layout)?;
        // An earlier start that died while resizing left maps under `maps/resize/`: their flows
        // go into the current maps, and every program is loaded again against the current maps.
        let recovered = resize::merge_leftovers(layout)?;
        for l in &recovered {
            tracing::warn!(map = %l.map, merged = ?l.merged, "an interrupted resize was finished: its flows merged into the current map");
        }
        let mut plan = resize::plan(layout, sizing, programs::OBJECT)?;
        for k in &plan.kept {
            tracing::warn!(
                map = k.map,
                capacity = k.capacity,
                wanted = k.wanted,
                entries = k.entries,
                "map kept at its capacity: its entries do not fit in half the smaller one"
            );
        }
        let maps_changed = !recovered.is_empty() || !plan.resized.is_empty();
        let (programs, origin) = programs::load_or_adopt(layout, &plan, maps_changed)?;
        resize::carry_over(layout, &mut plan.resized)?;
        for r in &plan.resized {
            tracing::info!(
                map = r.map,
                from_entries = r.from_entries,
                to_entries = r.to_entries,
                from_flags = r.from_flags,
                to_flags = r.to_flags,
                copied = r.copy.copied,
                "map replaced by one of the configured size, its entries carried over"
            );
        }
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
            sizing: *sizing,
            resized: plan.resized,
            kept: plan.kept,
        })
    }

    pub fn layout(&self) -> &PinLayout {
        &self.layout
    }

    /// Whether this start loaded, re-adopted or upgraded the programs.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// The capacities asked for on this start.
    pub fn sizing(&self) -> &Sizing {
        &self.sizing
    }

    /// Maps replaced on this start by ones of another size (or other flags).
    pub fn resized(&self) -> &[Resize] {
        &self.resized
    }

    /// Maps left larger than asked because their entries would not fit.
    pub fn kept_larger(&self) -> &[KeptLarger] {
        &self.kept
    }

    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut Maps {
        &mut self.maps
    }

    /// Ends an upgrade or a resize once every hook runs the current programs (the socket
    /// hooks, the uplink and every pod, see [`Datapath::update_pod_links`]): copies the flows
    /// the previous programs tracked since [`Datapath::open`] into the current maps and unpins
    /// the previous ones.
    pub fn finish_upgrade(&mut self) -> Result<Finished> {
        Ok(Finished {
            conntrack_v1: migrate::finish_conntrack_v1(&self.layout)?,
            leftovers: resize::merge_leftovers(&self.layout)?,
        })
    }

    /// Keeps only the map handles; programs stay loaded and attached through their pins.
    pub fn into_maps(self) -> Maps {
        self.maps
    }
}
