//! Running code inside another network namespace, on the calling thread only.
//!
//! A network namespace is a per-thread property: `setns(2)` moves the calling
//! thread and nothing else. Everything here enters the target namespace, does
//! its work and moves the thread back to where it was, also when the work
//! fails or panics. That is why the original namespace is read from
//! `/proc/thread-self/ns/net` (the calling thread's), never `/proc/self/...`
//! (the main thread's, which can differ in a multi-threaded process).
//!
//! Never leaves a thread in a namespace it did not start in: if moving back
//! fails (only possible if the process lost `CAP_SYS_ADMIN` meanwhile), the
//! process aborts rather than carry on configuring the wrong namespace.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;

use nix::sched::{CloneFlags, setns};

use super::error::{Error, Result};

/// The calling thread's network namespace, as seen by the kernel.
pub const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// Opens the calling thread's current network namespace, e.g. to hand it to
/// [`crate::netlink::Netlink::create_veth`] as the peer's namespace.
pub fn current_netns() -> Result<File> {
    open_netns(Path::new(THREAD_NETNS))
}

/// Opens a network namespace file such as `/run/netns/<name>` or
/// `/proc/<pid>/ns/net`.
pub fn open_netns(path: &Path) -> Result<File> {
    File::open(path).map_err(|source| Error::Netns {
        action: "open",
        netns: path.display().to_string(),
        source,
    })
}

/// Runs `f` with the calling thread inside the network namespace at `netns`,
/// then moves the thread back, whatever `f` returns (or if it panics).
///
/// Use it for work that reads the thread's namespace implicitly: sysctl
/// writes under `/proc/sys/net`, `if_nametoindex`, sockets created by `f`.
pub fn with_netns<T>(netns: &Path, f: impl FnOnce() -> T) -> Result<T> {
    let target = open_netns(netns)?;
    run_in(target.as_fd(), &netns.display().to_string(), f)
}

/// Like [`with_netns`], for a namespace already open as a file descriptor.
pub fn with_netns_fd<T>(netns: BorrowedFd<'_>, f: impl FnOnce() -> T) -> Result<T> {
    run_in(netns, &format!("fd {}", netns.as_raw_fd()), f)
}

fn run_in<T>(target: BorrowedFd<'_>, name: &str, f: impl FnOnce() -> T) -> Result<T> {
    let _entered = Entered::enter(target, name)?;
    Ok(f())
}

/// The calling thread's original namespace while it is inside another one.
/// Dropping it, when the work returns or panics, moves the thread back.
struct Entered {
    original: File,
}

impl Entered {
    fn enter(target: BorrowedFd<'_>, name: &str) -> Result<Self> {
        let original = current_netns()?;
        setns(target, CloneFlags::CLONE_NEWNET).map_err(|errno| Error::Netns {
            action: "enter",
            netns: name.to_owned(),
            source: errno.into(),
        })?;
        Ok(Self { original })
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        if let Err(errno) = setns(self.original.as_fd(), CloneFlags::CLONE_NEWNET) {
            // Moving back to a namespace we hold open only fails if the
            // process lost CAP_SYS_ADMIN meanwhile. Carrying on would run the
            // rest of the program in the wrong namespace (e.g. put host routes
            // into a pod), so stop here and say why.
            eprintln!("ferrox: cannot return to the original network namespace: {errno}; aborting");
            std::process::abort();
        }
    }
}
