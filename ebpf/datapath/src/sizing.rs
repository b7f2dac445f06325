//! How many entries the maps the kernel programs write get on this node.
//!
//! Those maps (conntrack, socket reverse NAT, session affinity, NetworkPolicy's flows) are LRU
//! hashes, which the kernel preallocates at their full capacity: their size is memory the node
//! pays for whether or not it carries that many flows. So their capacity follows the node's
//! memory: the ceiling (the capacity in `ferrox_abi::capacity`, what the object declares) on a
//! node of [`REFERENCE_MEMORY`] or more, in proportion to the memory on smaller nodes (rounded
//! down to a multiple of 1,024), and never below a floor that still holds a busy small node's
//! flows.
//!
//! The maps only user space writes (services, backends, endpoints, nodes) are not preallocated
//! (`BPF_F_NO_PREALLOC`: the kernel allocates an entry when the agent writes it, which costs
//! nothing per packet), so they keep their ceiling everywhere and cost what they hold.
//!
//! With per-entry costs of 128 bytes (conntrack), 88 (reverse NAT), 96 (affinity) and 80
//! (policy flows), the four take about 0.5% of the node's memory:
//!
//! | node memory | conntrack | socket reverse NAT | affinity | policy flows | preallocated |
//! |---|---:|---:|---:|---:|---:|
//! | 2.5 GiB and less | 65,536 | 32,768 | 16,384 | 16,384 | 13.5 MiB |
//! | 4 GiB | 104,448 | 52,224 | 25,600 | 19,456 | 21.0 MiB |
//! | 8 GiB | 208,896 | 104,448 | 52,224 | 38,912 | 42.1 MiB |
//! | 16 GiB | 418,816 | 208,896 | 104,448 | 77,824 | 84.0 MiB |
//! | 20 GiB and more | 524,288 | 262,144 | 131,072 | 98,304 | 105.5 MiB |
//!
//! The rest of the maps take about 10 MiB whatever the node (the hash tables' buckets, the
//! Maglev outer table, the event ring, fragments, counters), plus what the maps user space
//! writes hold.

use ferrox_abi::{capacity, map_names};

use crate::{DatapathError, Result};

/// Node memory at and above which the flow maps get their full capacity.
pub const REFERENCE_MEMORY: u64 = 20 << 30;

/// Smallest capacities whatever the node's memory.
pub mod floor {
    pub const CONNTRACK: u32 = 65_536;
    pub const SOCK_REVNAT: u32 = 32_768;
    pub const AFFINITY: u32 = 16_384;
    pub const POLICY_CT: u32 = 16_384;
}

/// Capacities of the maps the kernel programs write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Sizing {
    /// The node memory the capacities were derived from (bytes).
    pub memory: u64,
    pub conntrack: u32,
    pub sock_revnat: u32,
    pub affinity: u32,
    /// Flows of pods NetworkPolicy isolates (`POLICY_CT_V1`).
    pub policy_ct: u32,
}

/// `ceiling × memory / REFERENCE_MEMORY`, rounded down to a multiple of 1,024, within
/// `[floor, ceiling]`.
fn scaled(ceiling: u32, floor: u32, memory: u64) -> u32 {
    let want = u128::from(ceiling) * u128::from(memory) / u128::from(REFERENCE_MEMORY);
    let want = u32::try_from(want).unwrap_or(u32::MAX).min(ceiling);
    (want & !1023).clamp(floor, ceiling)
}

impl Sizing {
    /// The capacities for a node with `memory` bytes.
    pub fn for_memory(memory: u64) -> Self {
        Self {
            memory,
            conntrack: scaled(capacity::CONNTRACK, floor::CONNTRACK, memory),
            sock_revnat: scaled(capacity::SOCK_REVNAT, floor::SOCK_REVNAT, memory),
            affinity: scaled(capacity::AFFINITY, floor::AFFINITY, memory),
            policy_ct: scaled(capacity::POLICY_CT, floor::POLICY_CT, memory),
        }
    }

    /// The capacities for this machine (`MemTotal` of `/proc/meminfo`).
    pub fn for_this_node() -> Result<Self> {
        Ok(Self::for_memory(node_memory()?))
    }

    /// The full capacities the object declares, whatever the node.
    pub fn ceiling() -> Self {
        Self {
            memory: REFERENCE_MEMORY,
            conntrack: capacity::CONNTRACK,
            sock_revnat: capacity::SOCK_REVNAT,
            affinity: capacity::AFFINITY,
            policy_ct: capacity::POLICY_CT,
        }
    }

    /// The capacity chosen for `map` (a name of `ferrox_abi::map_names`), if it is sized here.
    pub fn entries(&self, map: &str) -> Option<u32> {
        match map {
            map_names::CONNTRACK => Some(self.conntrack),
            map_names::SOCK_REVNAT => Some(self.sock_revnat),
            map_names::AFFINITY => Some(self.affinity),
            map_names::POLICY_CT => Some(self.policy_ct),
            _ => None,
        }
    }
}

/// Total memory of this machine, from `/proc/meminfo`.
pub fn node_memory() -> Result<u64> {
    let path = std::path::Path::new("/proc/meminfo");
    let text = std::fs::read_to_string(path).map_err(|e| DatapathError::io("reading", path, e))?;
    parse_mem_total(&text).ok_or_else(|| {
        DatapathError::io(
            "parsing MemTotal in",
            path,
            std::io::Error::from(std::io::ErrorKind::InvalidData),
        )
    })
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    (words.next()? == "kB").then_some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn capacities_follow_memory_between_floor_and_ceiling() {
        // (memory, conntrack, socket reverse NAT, affinity, policy flows)
        let table = [
            (512 << 20, 65_536, 32_768, 16_384, 16_384),
            (GIB, 65_536, 32_768, 16_384, 16_384),
            (2 * GIB, 65_536, 32_768, 16_384, 16_384),
            (3 * GIB, 77_824, 38_912, 19_456, 16_384),
            // What a 4 GiB VM reports (MemTotal is a little less than the nominal size).
            (3_900_000 * 1024, 97_280, 48_128, 23_552, 17_408),
            (4 * GIB, 104_448, 52_224, 25_600, 19_456),
            (8 * GIB, 208_896, 104_448, 52_224, 38_912),
            (16 * GIB, 418_816, 208_896, 104_448, 77_824),
            (20 * GIB, 524_288, 262_144, 131_072, 98_304),
            (24 * GIB, 524_288, 262_144, 131_072, 98_304),
            (1024 * GIB, 524_288, 262_144, 131_072, 98_304),
            (0, 65_536, 32_768, 16_384, 16_384),
            (u64::MAX, 524_288, 262_144, 131_072, 98_304),
        ];
        for (memory, ct, rnat, aff, pct) in table {
            let s = Sizing::for_memory(memory);
            assert_eq!(
                (s.conntrack, s.sock_revnat, s.affinity, s.policy_ct),
                (ct, rnat, aff, pct),
                "{memory} bytes"
            );
        }
        assert_eq!(Sizing::for_memory(64 * GIB), {
            let mut c = Sizing::ceiling();
            c.memory = 64 * GIB;
            c
        });
    }

    #[test]
    fn only_the_flow_maps_are_sized() {
        let s = Sizing::for_memory(4 * GIB);
        assert_eq!(s.entries(map_names::CONNTRACK), Some(104_448));
        assert_eq!(s.entries(map_names::SOCK_REVNAT), Some(52_224));
        assert_eq!(s.entries(map_names::AFFINITY), Some(25_600));
        assert_eq!(s.entries(map_names::POLICY_CT), Some(19_456));
        assert_eq!(s.entries(map_names::SERVICES), None);
        assert_eq!(s.entries(map_names::FRAGMENTS), None);
    }

    #[test]
    fn mem_total_is_read_in_kib() {
        let meminfo = "MemTotal:       24576000 kB\nMemFree:         1000 kB\n";
        assert_eq!(parse_mem_total(meminfo), Some(24_576_000 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: x kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: 12 MB\n"), None);
    }
}
