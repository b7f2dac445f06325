//! Facts about the node the agent runs on: where cgroup v2 is mounted, which interface carries
//! the default route, the uplink's MTU. Parsing is pure and tested; reading is a thin shell.

use std::path::PathBuf;

/// The mount point of the cgroup2 hierarchy, from `/proc/self/mountinfo` contents.
/// Prefers `/sys/fs/cgroup` (a pure v2 node); on hybrid nodes it is usually `/sys/fs/cgroup/unified`.
pub fn cgroup2_mount_from(mountinfo: &str) -> Option<PathBuf> {
    let mut found = Vec::new();
    for line in mountinfo.lines() {
        // "36 25 0:31 / /sys/fs/cgroup rw,... shared:9 - cgroup2 cgroup2 rw,..."
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        if let Some(mount_point) = left.split_whitespace().nth(4) {
            found.push(PathBuf::from(mount_point));
        }
    }
    found
        .iter()
        .find(|p| p.as_os_str() == "/sys/fs/cgroup")
        .or(found.first())
        .cloned()
}

pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    cgroup2_mount_from(&mountinfo)
        .ok_or_else(|| anyhow::anyhow!("no cgroup2 filesystem is mounted; pass --cgroup"))
}

/// The interface of the IPv4 default route, from `/proc/net/route` contents.
pub fn default_route_interface_from(route_table: &str) -> Option<String> {
    route_table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_owned())
    })
}

pub fn default_route_interface() -> anyhow::Result<String> {
    // /proc/net is per network namespace (of the reading thread), unlike /sys/class/net.
    let table = std::fs::read_to_string("/proc/net/route")?;
    default_route_interface_from(&table).ok_or_else(|| {
        anyhow::anyhow!("no IPv4 default route in this network namespace; pass --uplink")
    })
}

/// MTU of `ifname` in this network namespace.
pub fn interface_mtu(ifname: &str) -> anyhow::Result<u32> {
    let nl = ferrox_cni::netlink::Netlink::open()?;
    let link = nl
        .link(ifname)?
        .ok_or_else(|| anyhow::anyhow!("interface {ifname} not found"))?;
    link.mtu
        .ok_or_else(|| anyhow::anyhow!("interface {ifname} reports no MTU"))
}

/// The cookie of the network namespace this process runs in (`SO_NETNS_COOKIE`, Linux 5.14):
/// what the socket hooks compare against to know a socket is the host's.
pub fn netns_cookie() -> anyhow::Result<u64> {
    use std::os::fd::AsRawFd as _;
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    anyhow::ensure!(
        rc == 0,
        "reading the network namespace cookie: {}",
        std::io::Error::last_os_error()
    );
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_hybrid_and_unified_nodes() {
        let hybrid = "\
25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:28 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd";
        assert_eq!(
            cgroup2_mount_from(hybrid),
            Some("/sys/fs/cgroup/unified".into())
        );
        let unified = "35 25 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw";
        assert_eq!(cgroup2_mount_from(unified), Some("/sys/fs/cgroup".into()));
        assert_eq!(
            cgroup2_mount_from("1 2 3:4 / / rw - ext4 /dev/vda rw"),
            None
        );
    }

    #[test]
    fn finds_the_default_route_interface() {
        let table = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t0012A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth0\t00000000\t0112A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0";
        assert_eq!(default_route_interface_from(table), Some("eth0".into()));
        assert_eq!(default_route_interface_from("Iface\tDestination\n"), None);
    }
}
