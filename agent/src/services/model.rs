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
    /// The endpoint runs on this node.
    pub local: bool,
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
    NodePort,
    ExternalIp,
    LoadBalancer,
}

/// Which traffic a frontend entry serves: traffic policies give one frontend different backends
/// for traffic from this node (pods, host) and traffic from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// From this node: socket hooks and the pod-facing TC program.
    Internal,
    /// From outside the node: the uplink's TC and XDP programs.
    External,
}

impl Scope {
    pub const fn number(self) -> u8 {
        match self {
            Self::Internal => ferrox_abi::scope::INTERNAL,
            Self::External => ferrox_abi::scope::EXTERNAL,
        }
    }

    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            ferrox_abi::scope::INTERNAL => Some(Self::Internal),
            ferrox_abi::scope::EXTERNAL => Some(Self::External),
            _ => None,
        }
    }
}

/// One entry of the service table: a frontend in one scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct FrontendKey {
    pub frontend: Frontend,
    pub scope: Scope,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scope {
            Scope::Internal => write!(f, "{}", self.frontend),
            Scope::External => write!(f, "{} (external)", self.frontend),
        }
    }
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

/// Everything the datapath needs to know about one frontend in one scope.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FrontendSpec {
    pub kind: FrontendKind,
    pub service: ServiceRef,
    /// Sorted and without duplicates, so equal sets compare equal.
    pub backends: Vec<BackendAddr>,
    /// sessionAffinity ClientIP: its timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// externalTrafficPolicy Local (external scope): only local backends, and the client's
    /// source address reaches them unchanged (no SNAT).
    pub external_local: bool,
    /// internalTrafficPolicy Local (ClusterIP): only local backends.
    pub internal_local: bool,
    /// loadBalancerSourceRanges, when the Service has them (LoadBalancer frontends).
    pub source_ranges: Vec<ipnet::Ipv4Net>,
}

/// A healthCheckNodePort server: load balancers probe it to learn whether this node has local
/// endpoints of an externalTrafficPolicy Local Service.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    pub local_endpoints: usize,
}

/// What the desired table depends on about this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// InternalIP and ExternalIP addresses of the Node.
    pub addresses: Vec<Ipv4Addr>,
    /// `topology.kubernetes.io/zone`.
    pub zone: Option<String>,
}

/// Proxy settings that shape the table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyOptions {
    /// Which node addresses serve NodePorts; empty means the Node's addresses and 127.0.0.1.
    pub nodeport_addresses: Vec<ipnet::Ipv4Net>,
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
    pub frontends: BTreeMap<FrontendKey, FrontendSpec>,
    pub skipped: Vec<Skipped>,
    /// healthCheckNodePort -> its Service, for externalTrafficPolicy Local load balancers.
    pub health_checks: BTreeMap<u16, HealthCheck>,
}
