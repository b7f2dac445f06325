//! Kernel parameters under `/proc/sys` that go with link setup (`proxy_arp`,
//! `forwarding`, `neigh/<if>/proxy_delay`, ...), as plain file reads and
//! writes.
//!
//! Namespaced parameters (everything under `net/`) belong to the network
//! namespace of the thread that *opens* the file, not of the process: to
//! change a pod's parameter, call these inside
//! [`with_netns`](super::with_netns). Must never accept a key that escapes
//! `/proc/sys` (absolute paths, `..`).

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};

use super::error::{Error, Result};

const PROC_SYS: &str = "/proc/sys";

/// Writes `value` to `/proc/sys/<key>`, e.g.
/// `set_sysctl("net/ipv4/conf/cali1234/proxy_arp", "1")`.
///
/// `key` uses slashes, not dots: interface names may contain dots.
pub fn set_sysctl(key: &str, value: &str) -> Result<()> {
    let path = sysctl_path(key)?;
    let written = OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut file| file.write_all(value.as_bytes()));
    written.map_err(|source| Error::Sysctl {
        action: "write",
        path,
        source,
    })
}

/// Reads `/proc/sys/<key>`, without the trailing newline.
pub fn get_sysctl(key: &str) -> Result<String> {
    let path = sysctl_path(key)?;
    match fs::read_to_string(&path) {
        Ok(text) => Ok(text.trim_end_matches('\n').to_owned()),
        Err(source) => Err(Error::Sysctl {
            action: "read",
            path,
            source,
        }),
    }
}

/// `/proc/sys/<key>`, refusing keys that would leave `/proc/sys`.
fn sysctl_path(key: &str) -> Result<PathBuf> {
    let relative = Path::new(key);
    let stays_inside = !key.is_empty()
        && relative
            .components()
            .all(|component| matches!(component, Component::Normal(_)));
    if !stays_inside {
        return Err(Error::Sysctl {
            action: "check",
            path: PathBuf::from(key),
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                "a sysctl key is a relative path under /proc/sys such as net/ipv4/conf/eth0/proxy_arp",
            ),
        });
    }
    Ok(Path::new(PROC_SYS).join(relative))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_under_proc_sys() {
        assert_eq!(
            sysctl_path("net/ipv4/conf/eth0.100/proxy_arp").unwrap(),
            Path::new("/proc/sys/net/ipv4/conf/eth0.100/proxy_arp")
        );
    }

    #[test]
    fn keys_cannot_escape() {
        for bad in [
            "",
            "/etc/passwd",
            "net/../../etc/passwd",
            "./net/ipv4/ip_forward",
        ] {
            let err = sysctl_path(bad).unwrap_err();
            assert_eq!(err.kind(), Some(io::ErrorKind::InvalidInput), "{bad:?}");
        }
    }

    #[test]
    fn reads_a_real_parameter() {
        let value = get_sysctl("net/ipv4/ip_forward").unwrap();
        assert!(value == "0" || value == "1", "{value:?}");
    }
}
