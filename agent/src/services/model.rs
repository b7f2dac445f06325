//! The service table as the agent thinks of it: frontends and their backends, in plain types.
//! [`super::desired`] computes it from API objects; [`super::reconcile`] writes it to the maps.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

use ferrox_abi::proto;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => proto::TCP,
            Self::Udp => proto::UDP,
        }
    }

    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            proto::TCP => Some(Self::Tcp),
            proto::UDP => Some(Self::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        })
    }
}

/// An address a client dials: IP, port, protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

/// Where a connection to a frontend may be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct BackendAddr {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
    /// Terminating but still serving (used only when no ready endpoint exists).
    pub terminating: bool,
}

impl BackendAddr {
    /// The identity of a backend in the backends map (its flags may change in place).
    pub fn identity(&self) -> (Ipv4Addr, u16, Proto) {
        (self.addr, self.port, self.proto)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FrontendKind {
    ClusterIp,
}

/// Which Service (and port of it) a frontend belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    /// The Service port's name ("" when unnamed).
    pub port_name: String,
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        Ok(())
    }
}

/// Everything the datapath needs to know about one frontend.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FrontendSpec {
    pub kind: FrontendKind,
    pub service: ServiceRef,
    /// Sorted and without duplicates, so equal sets compare equal.
    pub backends: Vec<BackendAddr>,
}

/// Why a Service (or one of its ports) is not programmed. Reported, never silently dropped.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "reason")]
pub enum SkipReason {
    /// `service.kubernetes.io/service-proxy-name` names another proxy.
    OtherProxy {
        proxy: String,
    },
    Headless,
    ExternalName,
    /// The protocol of this port (SCTP) is not supported by the datapath.
    UnsupportedProtocol {
        port: i32,
        protocol: String,
    },
    /// The Service has no IPv4 cluster IP (IPv6-only); ferrox is IPv4-only for now.
    NoIpv4ClusterIp,
    /// The cluster IP or a port in the object is not valid.
    Invalid {
        detail: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    pub namespace: String,
    pub name: String,
    #[serde(flatten)]
    pub reason: SkipReason,
}

/// The desired service table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<Frontend, FrontendSpec>,
    pub skipped: Vec<Skipped>,
}
