//! Errors of the datapath crate: each says which object, path or interface was involved.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("{path} is not on a bpf filesystem and mounting one there failed")]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the embedded kernel object")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("parsing the embedded kernel object")]
    Parse(#[source] Box<aya_obj::ParseError>),
    #[error("map {name} is missing from the kernel object")]
    MapMissing { name: &'static str },
    #[error("program {name} is missing from the kernel object or has the wrong type")]
    ProgramMissing { name: &'static str },
    #[error("{op} program {name}")]
    Program {
        op: &'static str,
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("pinning {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("{op} map {name}")]
    Map {
        op: &'static str,
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error(
        "map {name} pinned at {path} has layout {found} but this binary expects {expected}; \
         a layout change needs a new map version, so run `ferrox agent --cleanup` to replace it"
    )]
    MapLayout {
        name: &'static str,
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("link {path}")]
    Link {
        path: PathBuf,
        #[source]
        source: Box<aya::programs::links::LinkError>,
    },
    #[error("bpf({cmd}) on {path}")]
    Syscall {
        cmd: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} the tc filters of interface {interface}")]
    Filter {
        op: &'static str,
        interface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("interface {name} does not exist in this network namespace")]
    NoInterface { name: String },
    #[error("opening cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = DatapathError> = std::result::Result<T, E>;

impl DatapathError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn program(
        op: &'static str,
        name: &'static str,
        source: aya::programs::ProgramError,
    ) -> Self {
        Self::Program {
            op,
            name,
            source: Box::new(source),
        }
    }

    pub(crate) fn map(op: &'static str, name: &'static str, source: aya::maps::MapError) -> Self {
        Self::Map {
            op,
            name,
            source: Box::new(source),
        }
    }

    pub(crate) fn filter(
        op: &'static str,
        interface: impl ToString,
        source: std::io::Error,
    ) -> Self {
        Self::Filter {
            op,
            interface: interface.to_string(),
            source,
        }
    }

    pub(crate) fn link(path: impl Into<PathBuf>, source: aya::programs::links::LinkError) -> Self {
        Self::Link {
            path: path.into(),
            source: Box::new(source),
        }
    }
}
