//! The one error type of the netlink layer.
//!
//! Every variant says which operation failed and on what (a link, a prefix, a
//! namespace path), so a CNI error result or an agent log line tells the
//! operator what to fix without a debugger. When the kernel refused a request,
//! its errno is kept as a [`std::io::Error`] (callers test
//! [`Error::raw_os_error`] / [`Error::kind`] or the helpers such as
//! [`Error::is_already_exists`]), together with the kernel's own explanation
//! when it sent one (netlink extended ACK).

use std::io;
use std::path::PathBuf;

/// Result alias of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, and where.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel answered the request with an errno.
    #[error("{op} {target}: {source}{}", kernel_says(.kernel_message))]
    Kernel {
        /// The operation, e.g. `"add route"`.
        op: &'static str,
        /// What it was applied to, e.g. `"10.0.0.0/24 dev 7"`.
        target: String,
        /// The kernel's extended-ACK text, when it sent one
        /// (e.g. "Nexthop has invalid gateway").
        kernel_message: Option<String>,
        /// The errno, as an OS error.
        #[source]
        source: io::Error,
    },

    /// Sending to or receiving from the netlink socket failed.
    #[error("{op} {target}: netlink socket I/O: {source}")]
    Socket {
        /// The operation.
        op: &'static str,
        /// What it was applied to.
        target: String,
        /// The failed syscall's error.
        #[source]
        source: io::Error,
    },

    /// The kernel's reply could not be decoded.
    #[error("{op} {target}: cannot decode the kernel's reply: {reason}")]
    Decode {
        /// The operation.
        op: &'static str,
        /// What it was applied to.
        target: String,
        /// What did not parse.
        reason: String,
    },

    /// A dump kept being interrupted by concurrent changes (`NLM_F_DUMP_INTR`)
    /// and never produced a consistent snapshot.
    #[error("{op} {target}: dump interrupted by concurrent changes {attempts} times in a row")]
    DumpInterrupted {
        /// The operation.
        op: &'static str,
        /// What it was applied to.
        target: String,
        /// How many dumps were tried.
        attempts: u32,
    },

    /// The caller passed something the kernel would refuse (checked before
    /// sending, so the message can say why).
    #[error("{op} {target}: {reason}")]
    InvalidArgument {
        /// The operation.
        op: &'static str,
        /// The offending value.
        target: String,
        /// Why it is invalid.
        reason: &'static str,
    },

    /// Creating the NETLINK_ROUTE socket failed.
    #[error("open NETLINK_ROUTE socket: {source}")]
    Open {
        /// The failed syscall's error.
        #[source]
        source: io::Error,
    },

    /// Opening, entering or leaving a network namespace failed.
    #[error("{action} network namespace {netns}: {source}")]
    Netns {
        /// `"open"` or `"enter"`.
        action: &'static str,
        /// The namespace path, or a description of the fd.
        netns: String,
        /// The failed syscall's error.
        #[source]
        source: io::Error,
    },

    /// Reading or writing a sysctl under `/proc/sys` failed.
    #[error("{action} sysctl {}: {source}", .path.display())]
    Sysctl {
        /// `"read"`, `"write"` or `"check"`.
        action: &'static str,
        /// The full `/proc/sys/...` path.
        path: PathBuf,
        /// The failed syscall's error.
        #[source]
        source: io::Error,
    },
}

fn kernel_says(message: &Option<String>) -> String {
    match message {
        Some(text) => format!(" (kernel: {text})"),
        None => String::new(),
    }
}

impl Error {
    /// The OS error behind this error, if there is one.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            Self::Kernel { source, .. }
            | Self::Socket { source, .. }
            | Self::Open { source }
            | Self::Netns { source, .. }
            | Self::Sysctl { source, .. } => Some(source),
            Self::Decode { .. } | Self::DumpInterrupted { .. } | Self::InvalidArgument { .. } => {
                None
            }
        }
    }

    /// The errno behind this error (`libc::EEXIST`, `libc::ENODEV`, ...).
    pub fn raw_os_error(&self) -> Option<i32> {
        self.io_error().and_then(io::Error::raw_os_error)
    }

    /// The [`io::ErrorKind`] of the OS error behind this error.
    pub fn kind(&self) -> Option<io::ErrorKind> {
        self.io_error().map(io::Error::kind)
    }

    /// True when the kernel refused because the object already exists
    /// (`EEXIST`): adding an address, route, link or neighbour twice.
    /// Idempotent callers treat this as success.
    pub fn is_already_exists(&self) -> bool {
        matches!(self, Self::Kernel { .. }) && self.raw_os_error() == Some(libc::EEXIST)
    }

    /// True when the kernel refused because a link it needed does not exist
    /// (`ENODEV`).
    pub fn is_no_such_device(&self) -> bool {
        matches!(self, Self::Kernel { .. }) && self.raw_os_error() == Some(libc::ENODEV)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(errno: i32, message: Option<&str>) -> Error {
        Error::Kernel {
            op: "add address",
            target: "10.0.0.1/32 dev 7".to_owned(),
            kernel_message: message.map(str::to_owned),
            source: io::Error::from_raw_os_error(errno),
        }
    }

    #[test]
    fn eexist_is_distinguishable() {
        let err = kernel(libc::EEXIST, None);
        assert!(err.is_already_exists());
        assert!(!err.is_no_such_device());
        assert_eq!(err.kind(), Some(io::ErrorKind::AlreadyExists));
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
    }

    #[test]
    fn message_names_operation_target_and_kernel_text() {
        let text = kernel(libc::EINVAL, Some("Invalid prefix for given prefix length")).to_string();
        assert!(
            text.starts_with("add address 10.0.0.1/32 dev 7: "),
            "{text}"
        );
        assert!(
            text.ends_with("(kernel: Invalid prefix for given prefix length)"),
            "{text}"
        );
        let plain = kernel(libc::ENODEV, None).to_string();
        assert!(!plain.contains("kernel:"), "{plain}");
    }

    #[test]
    fn socket_errors_are_not_mistaken_for_kernel_verdicts() {
        let err = Error::Socket {
            op: "add address",
            target: String::new(),
            source: io::Error::from_raw_os_error(libc::EEXIST),
        };
        assert!(!err.is_already_exists());
    }
}
