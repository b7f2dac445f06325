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
