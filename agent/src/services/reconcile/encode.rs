//! How the desired table is written in the maps' terms: addresses in network order, master
//! keys, backend values and master flags, and back from a map key to the entry it belongs to
//! (which the CLI uses to read the maps).

use std::net::Ipv4Addr;

use ferrox_abi::{Backend, ServiceKey, backend_flags, svc_flags};

use crate::services::model::{
    BackendAddr, Frontend, FrontendKey, FrontendKind, FrontendSpec, Proto, Scope,
};

/// IP protocol number of UDP.
pub(super) const UDP: u8 = 17;

/// Network-order encodings used in map keys and values.
pub fn addr_be(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

pub fn addr_from_be(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v.to_ne_bytes())
}

/// The master key of an entry.
pub fn master_key(key: &FrontendKey) -> ServiceKey {
    let fe = &key.frontend;
    ServiceKey::master(addr_be(fe.addr), fe.port.to_be(), fe.proto.number())
        .with_scope(key.scope.number())
}

/// The entry a map key belongs to.
pub fn entry_of(key: &ServiceKey) -> Option<FrontendKey> {
    Some(FrontendKey {
        frontend: Frontend {
            addr: addr_from_be(key.addr),
            port: u16::from_be(key.port),
            proto: Proto::from_number(key.proto)?,
        },
        scope: Scope::from_number(key.scope)?,
    })
}

pub(super) fn backend_value(b: &BackendAddr) -> Backend {
    let mut flags = 0;
    if b.terminating {
        flags |= backend_flags::TERMINATING;
    }
    if b.local {
        flags |= backend_flags::LOCAL;
    }
    Backend {
        addr: addr_be(b.addr),
        port: b.port.to_be(),
        proto: b.proto.number(),
        flags,
    }
}

/// The master entry's flags for a spec.
pub fn flags_of(spec: &FrontendSpec) -> u16 {
    let mut flags = match spec.kind {
        FrontendKind::ClusterIp => svc_flags::CLUSTER_IP,
        FrontendKind::NodePort => svc_flags::NODE_PORT,
        FrontendKind::ExternalIp => svc_flags::EXTERNAL_IP,
        FrontendKind::LoadBalancer => svc_flags::LOAD_BALANCER,
    };
    if spec.affinity_timeout.is_some() {
        flags |= svc_flags::AFFINITY;
    }
    if spec.external_local {
        flags |= svc_flags::EXTERNAL_LOCAL;
    }
    if spec.internal_local {
        flags |= svc_flags::INTERNAL_LOCAL;
    }
    if !spec.source_ranges.is_empty() {
        flags |= svc_flags::SOURCE_RANGES;
    }
    flags
}
