//! Attaching programs through pinned links, and re-adopting links that are already pinned.
//!
//! A link is adopted when its pin exists, its target (cgroup, interface) is the one asked for
//! and still exists; if it runs an older copy of the program it is moved to the current one with
//! `bpf_link_update`, atomically. Only a link that points elsewhere or at nothing is replaced.
//! Pods' programs are netlink filters instead (`tc_filter` says why), changed in place.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::programs::{
    CgroupAttachMode, CgroupSockAddr, ProgramInfo, SchedClassifier, TcAttach, TcAttachType, Xdp,
    cgroup_sock_addr::CgroupSockAddrLink,
    links::{FdLink, LinkOrder, PinnedLink},
    tc::SchedClassifierLink,
    xdp::{XdpLink, XdpMode},
};
use ferrox_abi::program_names as names;

use crate::{
    Datapath, DatapathError, PinLayout, Result,
    link_info::{LinkTarget, PinnedLinkInfo, pinned_link_info},
    tc_filter::{BpfFilter, FilterHook, TcSocket},
};

/// What happened to one attachment.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttachOutcome {
    /// The pinned link already ran the current program on the right target.
    Adopted,
    /// The pinned link was moved to the current program (`bpf_link_update`).
    Updated,
    /// No usable link was pinned; a new one was created and pinned.
    Created,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Attachment {
    pub program: &'static str,
    pub pin: PathBuf,
    pub link_id: u32,
    pub outcome: AttachOutcome,
}

/// Identifies a cgroup v2 directory the way the kernel reports it in link info.
fn cgroup_id(path: &Path) -> Result<u64> {
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| DatapathError::Cgroup {
            path: path.into(),
            source,
        })
}

/// Index of `ifname` in the calling thread's network namespace.
pub fn ifindex(ifname: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(ifname).map_err(|_| DatapathError::NoInterface {
        name: ifname.to_owned(),
    })
}

/// What to do with a pinned link, from what it is attached to and which program it runs.
#[derive(Debug, PartialEq, Eq)]
enum LinkAction {
    Adopt,
    Update,
    Replace,
}

fn link_action(existing: &PinnedLinkInfo, wanted: &LinkTarget, prog_id: u32) -> LinkAction {
    let same_target = match (existing.target, *wanted) {
        (LinkTarget::Cgroup { cgroup_id: a, .. }, LinkTarget::Cgroup { cgroup_id: b, .. }) => {
            a == b
        }
        (LinkTarget::Tcx { ifindex: a, .. }, LinkTarget::Tcx { ifindex: b, .. }) => a == b,
        (LinkTarget::Xdp { ifindex: a }, LinkTarget::Xdp { ifindex: b }) => a == b,
        _ => false,
    };
    if !same_target || !existing.target.is_live() {
        LinkAction::Replace
    } else if existing.prog_id == prog_id {
        LinkAction::Adopt
    } else {
        LinkAction::Update
    }
}

/// What to do for one attachment, decided from its pin.
enum Plan {
    Adopt,
    /// Move this link to the current program.
    Update(FdLink),
    /// Attach anew and pin (any unusable pin has been removed).
    Create,
}

fn plan(pin: &Path, wanted: LinkTarget, prog_id: u32) -> Result<Plan> {
    if !pin.exists() {
        return Ok(Plan::Create);
    }
    let action = match pinned_link_info(pin) {
        Ok(info) => link_action(&info, &wanted, prog_id),
        Err(e) => {
            tracing::warn!(pin = %pin.display(), error = %e, "pinned link unreadable; replacing it");
            LinkAction::Replace
        }
    };
    match action {
        LinkAction::Adopt => Ok(Plan::Adopt),
        LinkAction::Update => {
            let link = PinnedLink::from_pin(pin).map_err(|e| DatapathError::link(pin, e))?;
            Ok(Plan::Update(FdLink::from(link)))
        }
        LinkAction::Replace => {
            std::fs::remove_file(pin).map_err(|e| DatapathError::io("unpinning", pin, e))?;
            Ok(Plan::Create)
        }
    }
}

fn pin_link(link: FdLink, pin: &Path) -> Result<()> {
    link.pin(pin)
        .map(drop)
        .map_err(|source| DatapathError::Pin {
            path: pin.into(),
            source,
        })
}

fn report(program: &'static str, pin: &Path, outcome: AttachOutcome) -> Result<Attachment> {
    let info = pinned_link_info(pin)?;
    tracing::debug!(program, pin = %pin.display(), link_id = info.id, ?outcome, "attached");
    Ok(Attachment {
        program,
        pin: pin.into(),
        link_id: info.id,
        outcome,
    })
}

/// Attaches (or adopts) one TC program at a TCX hook of `ifindex`, pinned at `pin`.
fn attach_tcx(
    prog: &mut SchedClassifier,
    name: &'static str,
    pin: &Path,
    ifindex: u32,
    direction: TcAttachType,
) -> Result<Attachment> {
    let op = |op| move |e| DatapathError::program(op, name, e);
    let id = prog.info().map_err(op("inspecting"))?.id();
    let outcome = match plan(
        pin,
        LinkTarget::Tcx {
            ifindex,
            attach_type: 0,
        },
        id,
    )? {
        Plan::Adopt => AttachOutcome::Adopted,
        Plan::Update(link) => {
            let link =
                SchedClassifierLink::try_from(link).map_err(|e| DatapathError::link(pin, e))?;
            let link_id = prog.attach_to_link(link).map_err(op("updating link of"))?;
            // Drop our handle only; the pin keeps the link.
            drop(prog.take_link(link_id).map_err(op("releasing link of"))?);
            AttachOutcome::Updated
        }
        Plan::Create => {
            let attach = TcAttach::Tcx {
                attach_type: direction,
                order: LinkOrder::default(),
            };
            let link_id = prog.attach(ifindex, attach).map_err(op("attaching"))?;
            let link = prog.take_link(link_id).map_err(op("taking link of"))?;
            pin_link(
                FdLink::try_from(link).map_err(|e| DatapathError::link(pin, e))?,
                pin,
            )?;
            AttachOutcome::Created
        }
    };
    report(name, pin, outcome)
}

/// Attaches (or adopts) one cgroup sock_addr program at `cgroup`, pinned at `pin`.
fn attach_sock(
    prog: &mut CgroupSockAddr,
    name: &'static str,
    pin: &Path,
    cgroup: &std::fs::File,
    cgroup_id: u64,
) -> Result<Attachment> {
    let op = |op| move |e| DatapathError::program(op, name, e);
    let id = prog.info().map_err(op("inspecting"))?.id();
    let outcome = match plan(
        pin,
        LinkTarget::Cgroup {
            cgroup_id,
            attach_type: 0,
        },
        id,
    )? {
        Plan::Adopt => AttachOutcome::Adopted,
        Plan::Update(link) => {
            let link =
                CgroupSockAddrLink::try_from(link).map_err(|e| DatapathError::link(pin, e))?;
            let link_id = prog.attach_to_link(link).map_err(op("updating link of"))?;
            drop(prog.take_link(link_id).map_err(op("releasing link of"))?);
            AttachOutcome::Updated
        }
        Plan::Create => {
            // A cgroup bpf_link takes no attach flags (EINVAL otherwise) and always coexists with
            // other programs on the same cgroup, so the mode is the default.
            let link_id = prog
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(op("attaching"))?;
            let link = prog.take_link(link_id).map_err(op("taking link of"))?;
            pin_link(
                FdLink::try_from(link).map_err(|e| DatapathError::link(pin, e))?,
                pin,
            )?;
            AttachOutcome::Created
        }
    };
    report(name, pin, outcome)
}

/// How the XDP program runs on the uplink.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum XdpAttachMode {
    /// In the driver, before an skb exists (veth, most physical NICs).
    Native,
    /// After the skb is built: works on every interface, slower.
    Generic,
}

/// Attaches (or adopts) the XDP program at `ifindex`, pinned at `pin`.
fn attach_xdp(prog: &mut Xdp, pin: &Path, ifindex: u32, mode: XdpAttachMode) -> Result<Attachment> {
    let name = crate::programs::XDP_PROGRAM;
    let op = |op| move |e| DatapathError::program(op, name, e);
    let id = prog.info().map_err(op("inspecting"))?.id();
    let outcome = match plan(pin, LinkTarget::Xdp { ifindex }, id)? {
        Plan::Adopt => AttachOutcome::Adopted,
        Plan::Update(link) => {
            let link = XdpLink::try_from(link).map_err(|e| DatapathError::link(pin, e))?;
            let link_id = prog.attach_to_link(link).map_err(op("updating link of"))?;
            drop(prog.take_link(link_id).map_err(op("releasing link of"))?);
            AttachOutcome::Updated
        }
        Plan::Create => {
            let xdp_mode = match mode {
                XdpAttachMode::Native => XdpMode::Driver,
                XdpAttachMode::Generic => XdpMode::Skb,
            };
            let link_id = prog.attach(ifindex, xdp_mode).map_err(op("attaching"))?;
            let link = prog.take_link(link_id).map_err(op("taking link of"))?;
            // Only a bpf_link can be pinned (and survive the agent); aya falls back to a
            // netlink attachment on kernels without XDP links, which this refuses.
            pin_link(
                FdLink::try_from(link).map_err(|e| DatapathError::link(pin, e))?,
                pin,
            )?;
            AttachOutcome::Created
        }
    };
    report(name, pin, outcome)
}

impl Datapath {
    /// Removes the uplink's XDP link, if one is pinned (XDP turned off). True when it removed one.
    pub fn detach_uplink_xdp(&mut self) -> Result<bool> {
        let pin = self.layout.link("uplink_xdp");
        match std::fs::remove_file(&pin) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(DatapathError::io("unpinning", pin, e)),
        }
    }

    /// Attaches the uplink's XDP program to `ifname` in `mode`.
    pub fn attach_uplink_xdp(&mut self, ifname: &str, mode: XdpAttachMode) -> Result<Attachment> {
        let ifindex = ifindex(ifname)?;
        let pin = self.layout.link("uplink_xdp");
        attach_xdp(&mut self.programs.xdp, &pin, ifindex, mode)
    }

    /// Attaches the socket-level service translation to the cgroup v2 at `cgroup` (its whole
    /// subtree). Tests and the demo pass a per-node cgroup; a real node passes the root cgroup.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<Vec<Attachment>> {
        let cg_id = cgroup_id(cgroup)?;
        let cg = std::fs::File::open(cgroup).map_err(|source| DatapathError::Cgroup {
            path: cgroup.into(),
            source,
        })?;
        let mut out = Vec::new();
        for (name, prog) in &mut self.programs.sock {
            let pin = self.layout.link(&format!("cgroup_{name}"));
            out.push(attach_sock(prog, name, &pin, &cg, cg_id)?);
        }
        Ok(out)
    }

    /// Attaches the uplink programs at TCX ingress and egress of `ifname`.
    pub fn attach_uplink(&mut self, ifname: &str) -> Result<Vec<Attachment>> {
        let ifindex = ifindex(ifname)?;
        let mut out = Vec::new();
        for (name, direction, pin) in [
            (
                names::TC_UPLINK_INGRESS,
                TcAttachType::Ingress,
                "uplink_ingress",
            ),
            (
                names::TC_UPLINK_EGRESS,
                TcAttachType::Egress,
                "uplink_egress",
            ),
        ] {
            let pin = self.layout.link(pin);
            let prog = self.programs.tc(name)?;
            out.push(attach_tcx(prog, name, &pin, ifindex, direction)?);
        }
        Ok(out)
    }
}

/// What [`Datapath::update_pod_links`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PodLinks {
    /// Pods (by host interface) with a hook (filter or link) that ran an earlier program and
    /// now runs the current one.
    pub updated: Vec<String>,
    /// Pods whose hooks all ran the current programs already.
    pub current: Vec<String>,
    /// Pods attached by a version without the program into the pod, which now have it.
    pub added: Vec<String>,
    /// Link pins whose interface is gone (a pod removed without its CNI DEL): left for DEL or
    /// `ferrox datapath cleanup`.
    pub defunct: Vec<String>,
}

/// The two hooks of a pod's host veth, each with its own program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PodSide {
    /// TC ingress of the host veth, packets leaving the pod: `tc_from_pod` (translation, the
    /// pod's egress policy and, for what it hands straight into a pod, that pod's ingress).
    FromPod,
    /// TC egress of the host veth, packets the host hands to the pod: `tc_to_pod` (the pod's
    /// ingress policy).
    ToPod,
}

impl PodSide {
    pub const BOTH: [Self; 2] = [Self::FromPod, Self::ToPod];

    pub const fn program(self) -> &'static str {
        match self {
            Self::FromPod => names::TC_FROM_POD,
            Self::ToPod => names::TC_TO_POD,
        }
    }

    pub const fn filter_hook(self) -> FilterHook {
        match self {
            Self::FromPod => FilterHook::Ingress,
            Self::ToPod => FilterHook::Egress,
        }
    }

    fn tcx(self) -> TcAttachType {
        match self {
            Self::FromPod => TcAttachType::Ingress,
            Self::ToPod => TcAttachType::Egress,
        }
    }

    /// Where the link of this side of the pod behind `host_ifname` is pinned (link mode).
    pub fn link_pin(self, layout: &PinLayout, host_ifname: &str) -> PathBuf {
        match self {
            Self::FromPod => layout.pod_link(host_ifname),
            Self::ToPod => layout.to_pod_link(host_ifname),
        }
    }

    fn links_dir(self, layout: &PinLayout) -> PathBuf {
        match self {
            Self::FromPod => layout.pod_links_dir(),
            Self::ToPod => layout.to_pod_links_dir(),
        }
    }

    fn retired_pin(self, layout: &PinLayout, ifindex: u32) -> PathBuf {
        match self {
            Self::FromPod => layout.retired_link(ifindex),
            Self::ToPod => layout.retired_to_pod_link(ifindex),
        }
    }
}

/// How one of a pod's programs is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PodHook {
    /// A `cls_bpf` filter at a clsact hook of its host veth (what the CNI plugin makes).
    Filter { ifindex: u32, prog_id: u32 },
    /// A pinned TCX link (pods whose veth cannot take clsact, and pods of versions before the
    /// filters); `target` says where it is.
    Link { prog_id: u32, target: LinkTarget },
}

impl PodHook {
    /// The program the pod's packets run through.
    pub fn prog_id(&self) -> u32 {
        match *self {
            Self::Filter { prog_id, .. } | Self::Link { prog_id, .. } => prog_id,
        }
    }
}

/// Both programs of a pod, as [`attach_pod`] left them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PodHooks {
    pub from_pod: PodHook,
    pub to_pod: PodHook,
}

/// A pod's filter found on an interface of this network namespace.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PodFilter {
    pub interface: String,
    pub side: PodSide,
    pub filter: BpfFilter,
}

/// The kernel id of a TC program and its file descriptor (what a filter is given).
fn id_and_fd<'a>(
    prog: &'a SchedClassifier,
    name: &'static str,
) -> Result<(u32, &'a aya::programs::ProgramFd)> {
    let id = prog
        .info()
        .map_err(|e| DatapathError::program("inspecting", name, e))?
        .id();
    let fd = prog
        .fd()
        .map_err(|e| DatapathError::program("opening", name, e))?;
    Ok((id, fd))
}

fn open_tc(interface: &str) -> Result<TcSocket> {
    TcSocket::open().map_err(|e| DatapathError::filter("opening netlink for", interface, e))
}

/// The name a pod filter of `layout` carries (`TCA_BPF_NAME`, shown by `tc filter show`): the
/// program and the bpffs root, so that each node's datapath (tests run several in one network
/// namespace) finds only its own filters.
fn pod_filter_name(layout: &PinLayout, side: PodSide) -> String {
    let mut name = format!("{}@{}", side.program(), layout.root().display());
    // CLS_BPF_NAME_LEN, with the terminating NUL.
    while name.len() > 255 {
        name.pop();
    }
    name
}

/// Every pod filter of `layout` (both sides) on the interfaces of the calling thread's network
/// namespace.
pub fn pod_filters(layout: &PinLayout) -> Result<Vec<PodFilter>> {
    let mut tc = open_tc("all")?;
    let interfaces = nix::net::if_::if_nameindex()
        .map_err(|e| DatapathError::filter("listing", "all", e.into()))?;
    let mut out = Vec::new();
    for i in interfaces.iter() {
        let interface = i.name().to_string_lossy().into_owned();
        for side in PodSide::BOTH {
            let own = pod_filter_name(layout, side);
            let filters = tc
                .filters(i.index(), side.filter_hook())
                .map_err(|e| DatapathError::filter("listing", &interface, e))?;
            out.extend(
                filters
                    .into_iter()
                    .filter(|f| f.is_pod_filter(&own))
                    .map(|filter| PodFilter {
                        interface: interface.clone(),
                        side,
                        filter,
                    }),
            );
        }
    }
    Ok(out)
}

/// How `side`'s program is attached to `host_ifname`, if it is: its filter, else its pinned
/// link.
pub fn pod_hook(layout: &PinLayout, host_ifname: &str, side: PodSide) -> Result<Option<PodHook>> {
    let index = ifindex(host_ifname)?;
    let filters = open_tc(host_ifname)?
        .filters(index, side.filter_hook())
        .map_err(|e| DatapathError::filter("listing", host_ifname, e))?;
    let own = pod_filter_name(layout, side);
    if let Some(f) = filters.iter().find(|f| f.is_pod_filter(&own)) {
        return Ok(Some(PodHook::Filter {
            ifindex: index,
            prog_id: f.prog_id,
        }));
    }
    let pin = side.link_pin(layout, host_ifname);
    if !pin.exists() {
        return Ok(None);
    }
    let info = pinned_link_info(&pin)?;
    Ok(Some(PodHook::Link {
        prog_id: info.prog_id,
        target: info.target,
    }))
}

impl Datapath {
    /// Moves every pod to the current pod-facing programs, atomically per pod and side: each
    /// pod filter's program is swapped in place, each link moved with `bpf_link_update`. A pod
    /// attached by a version without the program into the pod (`tc_to_pod`) gets it, the way
    /// its other side is attached. After an upgrade (or a resize) no pod keeps running a
    /// previous program.
    pub fn update_pod_links(&mut self) -> Result<PodLinks> {
        let mut out = PodLinks::default();
        let filters = pod_filters(&self.layout)?;
        let mut tc = open_tc("pods")?;
        for side in PodSide::BOTH {
            self.update_pod_filters(&mut tc, side, &filters, &mut out)?;
        }
        // Pods with a filter out of the pod and none into it.
        for f in filters.iter().filter(|f| f.side == PodSide::FromPod) {
            let missing = !filters
                .iter()
                .any(|g| g.side == PodSide::ToPod && g.filter.ifindex == f.filter.ifindex);
            if missing {
                match attach_side(
                    &self.layout,
                    &f.interface,
                    PodSide::ToPod,
                    PodAttach::Filter,
                ) {
                    Ok(_) => out.added.push(f.interface.clone()),
                    Err(DatapathError::NoInterface { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        for side in PodSide::BOTH {
            self.update_side_links(side, &mut out)?;
        }
        // Pods with a link out of the pod and none into it.
        let dir = self.layout.pod_links_dir();
        for host_ifname in pin_names(&dir)? {
            if out.defunct.contains(&host_ifname) || self.layout.to_pod_link(&host_ifname).exists()
            {
                continue;
            }
            match attach_side(&self.layout, &host_ifname, PodSide::ToPod, PodAttach::Link) {
                Ok(_) => out.added.push(host_ifname),
                Err(DatapathError::NoInterface { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        // A pod is current when all its hooks were.
        for list in [&mut out.updated, &mut out.added, &mut out.current] {
            list.sort();
            list.dedup();
        }
        let changed = |p: &String| out.updated.contains(p) || out.added.contains(p);
        let current = out
            .current
            .iter()
            .filter(|p| !changed(p))
            .cloned()
            .collect();
        out.current = current;
        Ok(out)
    }

    fn update_pod_filters(
        &mut self,
        tc: &mut TcSocket,
        side: PodSide,
        filters: &[PodFilter],
        out: &mut PodLinks,
    ) -> Result<()> {
        use std::os::fd::AsFd as _;
        let name = side.program();
        let prog = self.programs.tc(name)?;
        let (id, fd) = id_and_fd(prog, name)?;
        let filter_name = pod_filter_name(&self.layout, side);
        for PodFilter {
            interface, filter, ..
        } in filters.iter().filter(|f| f.side == side)
        {
            if filter.prog_id == id {
                out.current.push(interface.clone());
                continue;
            }
            match tc.set_pod_filter(
                filter.ifindex,
                side.filter_hook(),
                fd.as_fd(),
                &filter_name,
                false,
            ) {
                Ok(()) => out.updated.push(interface.clone()),
                // The pod went while this ran.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENODEV | libc::ENOENT)) => {}
                Err(e) => {
                    return Err(DatapathError::filter(
                        "replacing the pod filter of",
                        interface,
                        e,
                    ));
                }
            }
        }
        Ok(())
    }

    fn update_side_links(&mut self, side: PodSide, out: &mut PodLinks) -> Result<()> {
        let name = side.program();
        let prog = self.programs.tc(name)?;
        let (id, _) = id_and_fd(prog, name)?;
        let dir = side.links_dir(&self.layout);
        for host_ifname in pin_names(&dir)? {
            let pin = dir.join(&host_ifname);
            let info = pinned_link_info(&pin)?;
            if !info.target.is_live() {
                if !out.defunct.contains(&host_ifname) {
                    out.defunct.push(host_ifname);
                }
                continue;
            }
            if info.prog_id == id {
                out.current.push(host_ifname);
                continue;
            }
            let link = PinnedLink::from_pin(&pin).map_err(|e| DatapathError::link(&pin, e))?;
            let link = SchedClassifierLink::try_from(FdLink::from(link))
                .map_err(|e| DatapathError::link(&pin, e))?;
            let link_id = prog
                .attach_to_link(link)
                .map_err(|e| DatapathError::program("updating link of", name, e))?;
            drop(
                prog.take_link(link_id)
                    .map_err(|e| DatapathError::program("releasing link of", name, e))?,
            );
            out.updated.push(host_ifname);
        }
        Ok(())
    }
}

/// The names pinned in `dir` (none when it does not exist).
fn pin_names(dir: &Path) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(DatapathError::io("listing", dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| DatapathError::io("listing", dir, e))?;
        out.push(entry.file_name().to_string_lossy().into_owned());
    }
    out.sort();
    Ok(out)
}

/// How [`attach_pod`] attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodAttach {
    /// `cls_bpf` filters on a clsact qdisc (see `tc_filter`): no RCU grace period, nothing to
    /// detach.
    Filter,
    /// Pinned TCX links: for a veth whose ingress qdisc someone else must add (the `bandwidth`
    /// plugin shaping the pod's egress adds an `ingress` qdisc, which excludes clsact).
    /// Creating each waits for an RCU grace period.
    Link,
}

/// Attaches the pod-facing programs to a pod's host-side veth: `tc_from_pod` at its ingress
/// (packets leaving the pod), `tc_to_pod` at its egress (packets into the pod). Used by the
/// CNI plugin: it needs only the pins, not a loaded datapath. Attaching again swaps the
/// programs in place (filter) or adopts the links.
pub fn attach_pod(layout: &PinLayout, host_ifname: &str, how: PodAttach) -> Result<PodHooks> {
    Ok(PodHooks {
        from_pod: attach_side(layout, host_ifname, PodSide::FromPod, how)?,
        to_pod: attach_side(layout, host_ifname, PodSide::ToPod, how)?,
    })
}

/// Attaches one side's program (see [`attach_pod`]).
fn attach_side(
    layout: &PinLayout,
    host_ifname: &str,
    side: PodSide,
    how: PodAttach,
) -> Result<PodHook> {
    use std::os::fd::AsFd as _;
    let name = side.program();
    if how == PodAttach::Link {
        let mut prog = SchedClassifier::from_pin(layout.program(name))
            .map_err(|e| DatapathError::program("opening pinned", name, e))?;
        let pin = side.link_pin(layout, host_ifname);
        let index = ifindex(host_ifname)?;
        if let Some(dir) = pin.parent() {
            std::fs::create_dir_all(dir).map_err(|e| DatapathError::io("creating", dir, e))?;
        }
        attach_tcx(&mut prog, name, &pin, index, side.tcx())?;
        let info = pinned_link_info(&pin)?;
        return Ok(PodHook::Link {
            prog_id: info.prog_id,
            target: info.target,
        });
    }
    let filter_name = pod_filter_name(layout, side);
    let index = ifindex(host_ifname)?;
    let mut tc = open_tc(host_ifname)?;
    tc.ensure_clsact(index)
        .map_err(|e| DatapathError::filter("adding clsact to", host_ifname, e))?;
    let pinned_id = || -> Result<u32> {
        Ok(ProgramInfo::from_pin(layout.program(name))
            .map_err(|e| DatapathError::program("inspecting pinned", name, e))?
            .id())
    };
    // An agent upgrading the programs replaces the pin, then moves every pod it finds. A pod
    // attached with the previous program after that pass would keep it: attach what is pinned,
    // then check it still is.
    for _ in 0..3 {
        let prog = SchedClassifier::from_pin(layout.program(name))
            .map_err(|e| DatapathError::program("opening pinned", name, e))?;
        let (id, fd) = id_and_fd(&prog, name)?;
        tc.set_pod_filter(index, side.filter_hook(), fd.as_fd(), &filter_name, true)
            .map_err(|e| DatapathError::filter("attaching the pod program to", host_ifname, e))?;
        if pinned_id()? == id {
            tracing::debug!(
                host_ifname,
                prog_id = id,
                program = name,
                "pod program attached"
            );
            return Ok(PodHook::Filter {
                ifindex: index,
                prog_id: id,
            });
        }
    }
    Err(DatapathError::filter(
        "attaching the pod program to",
        host_ifname,
        std::io::Error::other("the pinned program kept changing (an agent upgrade loop?)"),
    ))
}

/// Moves the links of a pod whose veth was just retired (down, renamed, destroyed later) out
/// of the pods' links, to `links/retired/<ifindex>` (and `<ifindex>-to-pod`), without
/// detaching them: a detach holds RTNL for an RCU grace period, which every other link change
/// of the node would wait for. The links go with the veth; [`remove_retired_links`] then
/// unpins them. False when no link was pinned.
pub fn retire_pod_link(layout: &PinLayout, host_ifname: &str, ifindex: u32) -> Result<bool> {
    let dir = layout.retired_links_dir();
    std::fs::create_dir_all(&dir).map_err(|e| DatapathError::io("creating", &dir, e))?;
    let mut any = false;
    for side in PodSide::BOTH {
        let pin = side.link_pin(layout, host_ifname);
        match std::fs::rename(&pin, side.retired_pin(layout, ifindex)) {
            Ok(()) => any = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(DatapathError::io("moving", pin, e)),
        }
    }
    Ok(any)
}

/// Unpins the retired links (see [`retire_pod_link`]) whose interface `exists` no longer
/// says is there; returns how many.
pub fn remove_retired_links(layout: &PinLayout, exists: impl Fn(u32) -> bool) -> Result<usize> {
    let dir = layout.retired_links_dir();
    let mut removed = 0;
    for name in pin_names(&dir)? {
        let ifindex = name.split('-').next().and_then(|n| n.parse::<u32>().ok());
        if ifindex.is_some_and(&exists) {
            continue;
        }
        let path = dir.join(&name);
        match std::fs::remove_file(&path) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(DatapathError::io("unpinning", path, e)),
        }
    }
    Ok(removed)
}

/// Removes a pod's link pins (both sides). Returns false when there was none (idempotent DEL).
pub fn detach_pod(layout: &PinLayout, host_ifname: &str) -> Result<bool> {
    let mut any = false;
    for side in PodSide::BOTH {
        let pin = side.link_pin(layout, host_ifname);
        match std::fs::remove_file(&pin) {
            Ok(()) => any = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(DatapathError::io("unpinning", pin, e)),
        }
    }
    Ok(any)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcx(ifindex: u32, prog_id: u32) -> PinnedLinkInfo {
        PinnedLinkInfo {
            id: 1,
            prog_id,
            target: LinkTarget::Tcx {
                ifindex,
                attach_type: 46,
            },
        }
    }

    #[test]
    fn link_decisions() {
        let want = LinkTarget::Tcx {
            ifindex: 5,
            attach_type: 0,
        };
        assert_eq!(link_action(&tcx(5, 9), &want, 9), LinkAction::Adopt);
        assert_eq!(link_action(&tcx(5, 8), &want, 9), LinkAction::Update);
        assert_eq!(link_action(&tcx(6, 9), &want, 9), LinkAction::Replace);
        // A link whose interface is gone is defunct: replace it, even if the index matched.
        let gone = LinkTarget::Tcx {
            ifindex: 0,
            attach_type: 0,
        };
        assert_eq!(link_action(&tcx(0, 9), &gone, 9), LinkAction::Replace);
        let cg = PinnedLinkInfo {
            id: 1,
            prog_id: 9,
            target: LinkTarget::Cgroup {
                cgroup_id: 77,
                attach_type: 10,
            },
        };
        assert_eq!(
            link_action(
                &cg,
                &LinkTarget::Cgroup {
                    cgroup_id: 77,
                    attach_type: 0
                },
                9
            ),
            LinkAction::Adopt
        );
        assert_eq!(
            link_action(
                &cg,
                &LinkTarget::Cgroup {
                    cgroup_id: 78,
                    attach_type: 0
                },
                9
            ),
            LinkAction::Replace
        );
        assert_eq!(link_action(&cg, &want, 9), LinkAction::Replace);
    }
}
