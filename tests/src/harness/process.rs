//! Processes started inside a node or pod: in its network namespace and in the node's cgroup
//! (so the node's socket hooks apply to them), with their output captured line by line.

use std::{
    ffi::CString,
    io::{BufRead as _, BufReader},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Condvar, Mutex},
    time::Duration,
};

/// Makes `cmd` enter the network namespace at `netns` and join the cgroup at `cgroup` between
/// fork and exec. The namespace file stays open until the spawn is done (the caller keeps the
/// returned guard alive until then).
pub fn spawn_in(cmd: &mut Command, netns: &Path, cgroup: &Path) -> std::fs::File {
    let ns =
        std::fs::File::open(netns).unwrap_or_else(|e| panic!("opening {}: {e}", netns.display()));
    let ns_fd = ns.as_raw_fd();
    let procs = CString::new(
        cgroup
            .join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .expect("cgroup path");
    // SAFETY: between fork and exec the closure only makes async-signal-safe system calls on
    // memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
            libc::close(fd);
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    ns
}

#[derive(Default)]
struct Lines {
    lines: Vec<String>,
    closed: bool,
}

/// A background process whose stdout (and stderr) lines are collected; killed on drop.
pub struct Proc {
    name: String,
    child: Option<Child>,
    out: Arc<(Mutex<Lines>, Condvar)>,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, netns: &Path, cgroup: &Path) -> Self {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let _ns = spawn_in(&mut cmd, netns, cgroup);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({cmd:?}): {e}"));
        let out = Arc::new((Mutex::new(Lines::default()), Condvar::new()));
        let readers = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ];
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(2));
        for r in readers.into_iter().flatten() {
            let out = out.clone();
            let open = open.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    let (m, cv) = &*out;
                    m.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .lines
                        .push(line);
                    cv.notify_all();
                }
                if open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                    let (m, cv) = &*out;
                    m.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .closed = true;
                    cv.notify_all();
                }
            });
        }
        Self {
            name: name.to_owned(),
            child: Some(child),
            out,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn lines(&self) -> Vec<String> {
        self.out
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .lines
            .clone()
    }

    /// Waits until some output line satisfies `pred` and returns it. Panics (with the output so
    /// far) on timeout or when the process ends first.
    pub fn wait_for_line(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let (m, cv) = &*self.out;
        let deadline = std::time::Instant::now() + timeout;
        let mut g = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            if let Some(l) = g.lines.iter().rev().find(|l| pred(l)) {
                return l.clone();
            }
            let now = std::time::Instant::now();
            if g.closed || now >= deadline {
                let why = if g.closed {
                    "the process ended"
                } else {
                    "timed out"
                };
                let output = g.lines.join("\n");
                drop(g);
                panic!("{}: {why} waiting for {what}; output:\n{output}", self.name);
            }
            g = cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Sends `signal` and waits for the process to end; returns its exit status.
    pub fn signal_and_wait(&mut self, signal: i32) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("process already reaped");
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = child.wait().expect("waiting for the process");
        self.child = None;
        // Let the readers drain what the process wrote before it ended.
        let (m, cv) = &*self.out;
        let g = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _g = cv
            .wait_timeout_while(g, Duration::from_secs(5), |l| !l.closed)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        status
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
