//! A named network namespace (`/run/netns/<name>`) that is deleted on drop.

use std::{path::PathBuf, process::Command};

pub struct NetNs {
    name: String,
}

/// Runs a command to completion and panics with its output if it fails.
pub(crate) fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip <args>` (tests may use iproute2; the products never do).
pub(crate) fn ip(args: &[&str]) -> String {
    run(Command::new("ip").args(args))
}

impl NetNs {
    pub fn create(name: &str) -> Self {
        ip(&["netns", "add", name]);
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// `ethtool -K <dev> <features...>` inside the namespace.
    pub fn ethtool_features(&self, dev: &str, features: &[&str]) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, "ethtool", "-K", dev])
            .args(features);
        run(&mut cmd);
    }

    /// Attaches, natively, an XDP program that passes every frame to `dev` in this namespace,
    /// through a BPF link that lives as long as the returned descriptor. The receiving end of
    /// a veth whose peer sends frames with `XDP_TX` needs one: the kernel wakes a veth's
    /// receive queue for such frames only when it runs an XDP program (else they wait for the
    /// next ordinary packet). Two instructions, loaded with the `bpf` syscall.
    pub fn attach_xdp_pass(&self, dev: &str) -> std::os::fd::OwnedFd {
        use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
        const BPF_PROG_LOAD: libc::c_long = 5;
        const BPF_LINK_CREATE: libc::c_long = 28;
        const BPF_PROG_TYPE_XDP: u32 = 6;
        const BPF_XDP: u32 = 37;
        const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
        const XDP_PASS: i32 = 2;
        fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<OwnedFd> {
            // SAFETY: `attr` is a zero-padded `union bpf_attr` of the size passed.
            let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: the kernel returned a new descriptor we now own.
            Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
        }
        // r0 = XDP_PASS; exit.
        let mut insns = [0u8; 16];
        insns[0] = 0xb7;
        insns[4..8].copy_from_slice(&XDP_PASS.to_ne_bytes());
        insns[8] = 0x95;
        let license = b"GPL\0";
        let mut load = [0u8; 128];
        load[0..4].copy_from_slice(&BPF_PROG_TYPE_XDP.to_ne_bytes());
        load[4..8].copy_from_slice(&2u32.to_ne_bytes());
        load[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        load[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        let prog = bpf(BPF_PROG_LOAD, &mut load).expect("loading the XDP pass program");
        let netns = self.path();
        let dev = dev.to_owned();
        std::thread::spawn(move || {
            let f = std::fs::File::open(&netns).expect("opening netns");
            // SAFETY: setns on this short-lived thread only; the fd is valid for the call.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let name = std::ffi::CString::new(dev.as_str()).unwrap();
            // SAFETY: a valid NUL-terminated interface name.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert!(ifindex != 0, "no interface {dev}");
            let mut link = [0u8; 128];
            link[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
            link[4..8].copy_from_slice(&ifindex.to_ne_bytes());
            link[8..12].copy_from_slice(&BPF_XDP.to_ne_bytes());
            link[12..16].copy_from_slice(&XDP_FLAGS_DRV_MODE.to_ne_bytes());
            bpf(BPF_LINK_CREATE, &mut link)
                .unwrap_or_else(|e| panic!("attaching the XDP pass program to {dev}: {e}"))
        })
        .join()
        .expect("XDP attach thread")
    }

    /// Sets sysctls (`key=value`) inside the namespace.
    pub fn sysctl(&self, settings: &[&str]) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, "sysctl", "-qw"])
            .args(settings);
        run(&mut cmd);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        if let Ok(o) = out
            && !o.status.success()
            && self.path().exists()
        {
            eprintln!(
                "harness: deleting netns {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}
