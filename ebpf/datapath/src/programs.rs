//! The table of kernel programs, and loading them: either re-adopting what is pinned, or
//! loading the embedded object and pinning it. A pinned program whose code differs from the
//! embedded one (a new ferrox version) is replaced, and its links move to the new program
//! atomically when they are next attached (`bpf_link_update`), so traffic never stops.

use aya::{
    EbpfLoader,
    programs::{
        CgroupSockAddr, Program, ProgramInfo, SchedClassifier, Xdp,
        cgroup_sock_addr::CgroupSockAddrAttachType,
    },
};
use aya_obj::programs::XdpAttachType;
use ferrox_abi::program_names as names;

use crate::{DatapathError, PinLayout, Result};

/// The kernel object, built from `ebpf/programs` by this crate's build script.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferrox-ebpf"));

/// The cgroup sock_addr programs and their attach types.
pub const SOCK_PROGRAMS: [(&str, CgroupSockAddrAttachType); 4] = [
    (names::SOCK_CONNECT4, CgroupSockAddrAttachType::Connect4),
    (names::SOCK_SENDMSG4, CgroupSockAddrAttachType::UDPSendMsg4),
    (names::SOCK_RECVMSG4, CgroupSockAddrAttachType::UDPRecvMsg4),
    (
        names::SOCK_GETPEERNAME4,
        CgroupSockAddrAttachType::GetPeerName4,
    ),
];

/// The TC programs.
pub const TC_PROGRAMS: [&str; 4] = [
    names::TC_FROM_POD,
    names::TC_TO_POD,
    names::TC_UPLINK_INGRESS,
    names::TC_UPLINK_EGRESS,
];

/// The XDP program of the uplink.
pub const XDP_PROGRAM: &str = names::XDP_UPLINK;

/// How the programs came to be in the kernel on this start.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Origin {
    /// Nothing was pinned: every program was loaded and pinned now.
    Loaded,
    /// Every program was already pinned with the same code: nothing was loaded.
    Adopted,
    /// Some programs were pinned with other code (or missing) and were replaced.
    Upgraded {
        replaced: Vec<&'static str>,
        added: Vec<&'static str>,
    },
}

/// The programs, opened from their pins.
pub(crate) struct Programs {
    pub(crate) sock: Vec<(&'static str, CgroupSockAddr)>,
    pub(crate) tc: Vec<(&'static str, SchedClassifier)>,
    pub(crate) xdp: Xdp,
}

impl Programs {
    pub(crate) fn tc(&mut self, name: &'static str) -> Result<&mut SchedClassifier> {
        self.tc
            .iter_mut()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| p)
            .ok_or(DatapathError::ProgramMissing { name })
    }
}

/// What to do with one program, given the tag of the pinned copy (if any) and of the new one.
#[derive(Debug, PartialEq, Eq)]
enum PinAction {
    KeepPinned,
    Replace,
    Add,
}

/// `maps_changed`: some map the programs use was replaced, so a pinned program with the same
/// code still runs against the previous map.
fn pin_action(pinned_tag: Option<u64>, new_tag: u64, maps_changed: bool) -> PinAction {
    match pinned_tag {
        Some(t) if t == new_tag && !maps_changed => PinAction::KeepPinned,
        Some(_) => PinAction::Replace,
        None => PinAction::Add,
    }
}

/// Loads the embedded object against the pinned maps (creating the missing ones, and the
/// rebuilt ones of `plan` under `maps/resize/`), compares each program with its pinned copy,
/// pins what is new or changed (everything when `maps_changed`), and opens all programs from
/// pins.
pub(crate) fn load_or_adopt(
    layout: &PinLayout,
    plan: &crate::resize::Plan,
    maps_changed: bool,
) -> Result<(Programs, Origin)> {
    let maps_dir = layout.maps_dir();
    // Maps an earlier version pinned and no program uses any more: unpinning frees them once
    // the old programs are replaced below.
    for name in ferrox_abi::map_names::OBSOLETE {
        let pin = layout.map(name);
        if pin.exists() {
            std::fs::remove_file(&pin).map_err(|e| DatapathError::io("unpinning", &pin, e))?;
        }
    }
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(&maps_dir);
    for (name, entries) in &plan.max_entries {
        loader.map_max_entries(name, *entries);
    }
    let staged: Vec<(&'static str, std::path::PathBuf)> = plan
        .resized
        .iter()
        .map(|r| (r.map, crate::resize::staging(layout, r.map)))
        .collect();
    if !staged.is_empty() {
        let dir = crate::resize::staging_dir(layout);
        std::fs::create_dir_all(&dir).map_err(|e| DatapathError::io("creating", &dir, e))?;
    }
    for (name, path) in &staged {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader
        .load(OBJECT)
        .map_err(|e| DatapathError::Load(Box::new(e)))?;

    let mut replaced = Vec::new();
    let mut added = Vec::new();
    let all = SOCK_PROGRAMS
        .iter()
        .map(|(n, _)| *n)
        .chain(TC_PROGRAMS)
        .chain([XDP_PROGRAM]);
    for name in all {
        let program = ebpf
            .program_mut(name)
            .ok_or(DatapathError::ProgramMissing { name })?;
        let loaded = match program {
            Program::CgroupSockAddr(p) => p.load(),
            Program::SchedClassifier(p) => p.load(),
            Program::Xdp(p) => p.load(),
            _ => return Err(DatapathError::ProgramMissing { name }),
        };
        loaded.map_err(|e| DatapathError::program("loading", name, e))?;
        let new_tag = program
            .info()
            .map_err(|e| DatapathError::program("inspecting", name, e))?
            .tag();
        let pin = layout.program(name);
        let pinned_tag = ProgramInfo::from_pin(&pin).ok().map(|i| i.tag());
        let action = pin_action(pinned_tag, new_tag, maps_changed);
        if action == PinAction::KeepPinned {
            continue;
        }
        if pin.exists() {
            std::fs::remove_file(&pin).map_err(|e| DatapathError::io("unpinning", &pin, e))?;
        }
        program.pin(&pin).map_err(|source| DatapathError::Pin {
            path: pin.clone(),
            source,
        })?;
        match action {
            PinAction::Replace => replaced.push(name),
            PinAction::Add => added.push(name),
            PinAction::KeepPinned => {}
        }
    }
    // Unpinned fresh copies are unloaded here; the maps stay, pinned.
    drop(ebpf);

    let total = SOCK_PROGRAMS.len() + TC_PROGRAMS.len() + 1;
    let origin = if added.len() == total {
        Origin::Loaded
    } else if added.is_empty() && replaced.is_empty() {
        Origin::Adopted
    } else {
        Origin::Upgraded { replaced, added }
    };
    Ok((open_pinned(layout)?, origin))
}

/// Opens every program from its pin.
pub(crate) fn open_pinned(layout: &PinLayout) -> Result<Programs> {
    let mut sock = Vec::new();
    for (name, attach_type) in SOCK_PROGRAMS {
        let p = CgroupSockAddr::from_pin(layout.program(name), attach_type)
            .map_err(|e| DatapathError::program("opening pinned", name, e))?;
        sock.push((name, p));
    }
    let mut tc = Vec::new();
    for name in TC_PROGRAMS {
        let p = SchedClassifier::from_pin(layout.program(name))
            .map_err(|e| DatapathError::program("opening pinned", name, e))?;
        tc.push((name, p));
    }
    let xdp = Xdp::from_pin(layout.program(XDP_PROGRAM), XdpAttachType::Interface)
        .map_err(|e| DatapathError::program("opening pinned", XDP_PROGRAM, e))?;
    Ok(Programs { sock, tc, xdp })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_code_is_kept_changed_code_replaced_missing_added() {
        assert_eq!(pin_action(Some(7), 7, false), PinAction::KeepPinned);
        assert_eq!(pin_action(Some(7), 8, false), PinAction::Replace);
        assert_eq!(pin_action(None, 8, false), PinAction::Add);
        // Same code against other maps: replaced.
        assert_eq!(pin_action(Some(7), 7, true), PinAction::Replace);
        assert_eq!(pin_action(None, 8, true), PinAction::Add);
    }
}
