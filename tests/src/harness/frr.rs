//! FRR (Debian's `frr`: zebra + bgpd), a real router, in an external client's namespace on the
//! underlay. Each instance has its own directory for its configuration, vty sockets, zserv
//! socket and pid files (no systemd, no `/etc/frr`): zebra and bgpd run in the foreground with
//! `--vty_socket`, `-z` and `-i` pointing there, and `vtysh --vty_socket` asks them questions.
//! The daemons drop to the `frr` user as packaged, so the directory belongs to it.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{
    Cluster, ExternalClient, Proc,
    router::{Router, RouterSession, RouterSpec},
};

const ZEBRA: &str = "/usr/lib/frr/zebra";
const BGPD: &str = "/usr/lib/frr/bgpd";
/// Where FRR keeps a per-process directory (`<daemon>.<pid>`) it removes on a clean exit only.
const FRR_TMP: &str = "/var/tmp/frr";

pub struct Frr {
    pub ext: ExternalClient,
    dir: PathBuf,
    spec: RouterSpec,
    zebra: Option<Proc>,
    bgpd: Option<Proc>,
    /// Pids of the daemons killed with SIGKILL (their directories under [`FRR_TMP`] remain).
    killed: Vec<u32>,
}

/// bgpd's configuration for `spec` on `ip`.
fn bgpd_conf(ip: Ipv4Addr, spec: &RouterSpec) -> String {
    let mut c = String::new();
    let _ = writeln!(
        c,
        "frr defaults datacenter\nhostname frr-{ip}\nlog stdout informational\n!"
    );
    let _ = writeln!(c, "router bgp {}", spec.asn);
    let _ = writeln!(c, " bgp router-id {ip}");
    // Routes flow without route-maps, and `network` needs no route in zebra's table.
    let _ = writeln!(
        c,
        " no bgp ebgp-requires-policy\n no bgp network import-check"
    );
    let _ = writeln!(
        c,
        " bgp graceful-restart\n bgp graceful-restart restart-time {}",
        spec.restart_time
    );
    if let Some(id) = spec.cluster_id {
        let _ = writeln!(c, " bgp cluster-id {id}");
    }
    for n in &spec.neighbors {
        let a = n.addr;
        let _ = writeln!(c, " neighbor {a} remote-as {}", n.asn);
        let _ = writeln!(
            c,
            " neighbor {a} timers {} {}",
            n.hold_time / 3,
            n.hold_time
        );
        let _ = writeln!(c, " neighbor {a} timers connect 1");
        if let Some(p) = &n.password {
            let _ = writeln!(c, " neighbor {a} password {p}");
        }
    }
    let _ = writeln!(c, " address-family ipv4 unicast");
    for p in &spec.prefixes {
        let _ = writeln!(c, "  network {p}");
    }
    for n in &spec.neighbors {
        let _ = writeln!(c, "  neighbor {} activate", n.addr);
        if n.rr_client {
            let _ = writeln!(c, "  neighbor {} route-reflector-client", n.addr);
        }
    }
    let _ = writeln!(c, " exit-address-family\n!");
    c
}

impl Frr {
    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// The daemon `program` with this instance's paths, in its namespace.
    fn daemon(&self, program: &str, conf: &str, pid: &str) -> Proc {
        let (conf, vty, zserv, pid) = (
            self.path(conf),
            self.dir.display().to_string(),
            self.path("zserv.api"),
            self.path(pid),
        );
        self.ext.command(
            program,
            &["-f", &conf, "--vty_socket", &vty, "-z", &zserv, "-i", &pid],
        )
    }

    fn start_bgpd(&mut self) {
        std::fs::write(
            self.dir.join("bgpd.conf"),
            bgpd_conf(self.ext.ip, &self.spec),
        )
        .expect("bgpd.conf");
        chown_frr(&self.dir);
        self.bgpd = Some(self.daemon(BGPD, "bgpd.conf", "bgpd.pid"));
        super::wait_for("bgpd's vty", Duration::from_secs(20), || {
            let out = self.try_vtysh(&["show bgp summary json"])?;
            if out.contains("routerId") {
                Ok(())
            } else {
                Err(out)
            }
        });
    }

    fn try_vtysh(&self, commands: &[&str]) -> Result<String, String> {
        let vty = self.dir.display().to_string();
        let mut args = vec!["--vty_socket", vty.as_str()];
        for c in commands {
            args.extend(["-c", c]);
        }
        let out = self.ext.command_output("vtysh", &args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// `vtysh -c ...` on this instance; its standard output.
    pub fn vtysh(&self, commands: &[&str]) -> String {
        self.try_vtysh(commands)
            .unwrap_or_else(|e| panic!("vtysh {commands:?} on FRR {}: {e}", self.ext.ip))
    }

    fn json(&self, command: &str) -> serde_json::Value {
        let out = self.vtysh(&[command]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{command}: {e}: {out}"))
    }
}

/// The daemons run as `frr`: their directory must be theirs.
fn chown_frr(dir: &Path) {
    let out = std::process::Command::new("chown")
        .args(["-R", "frr:frr"])
        .arg(dir)
        .output()
        .expect("chown");
    assert!(
        out.status.success(),
        "chown frr {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Router for Frr {
    fn start(c: &Cluster, spec: RouterSpec) -> Self {
        let ext = c.external_client();
        let dir = std::env::temp_dir().join(format!("ferrox-frr-{}-{}", c.id(), ext.ip));
        std::fs::create_dir_all(&dir).expect("FRR's directory");
        std::fs::write(
            dir.join("zebra.conf"),
            format!("hostname frr-{}\nlog stdout informational\n", ext.ip),
        )
        .expect("zebra.conf");
        chown_frr(&dir);
        let mut frr = Self {
            ext,
            dir,
            spec,
            zebra: None,
            bgpd: None,
            killed: Vec::new(),
        };
        frr.zebra = Some(frr.daemon(ZEBRA, "zebra.conf", "zebra.pid"));
        let zserv = frr.dir.join("zserv.api");
        super::wait_for("zebra's socket", Duration::from_secs(20), || {
            zserv.exists().then_some(()).ok_or_else(String::new)
        });
        frr.start_bgpd();
        frr
    }

    fn name(&self) -> &'static str {
        "FRR"
    }

    fn ip(&self) -> Ipv4Addr {
        self.ext.ip
    }

    fn log_tail(&self, n: usize) -> String {
        let lines = self.bgpd.as_ref().map(Proc::lines).unwrap_or_default();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn session(&self, neighbor: Ipv4Addr) -> RouterSession {
        let all = self.json(&format!("show bgp neighbors {neighbor} json"));
        let n = &all[neighbor.to_string()];
        let established = n["bgpState"] == "Established";
        let hold = n["bgpTimerHoldTimeMsecs"]
            .as_u64()
            .map(|ms| (ms / 1000) as u16);
        let notification_received = (n["lastResetDueTo"] == "BGP Notification received")
            .then(|| n["lastErrorCodeSubcode"].as_str())
            .flatten()
            .and_then(|cs| {
                Some((
                    u8::from_str_radix(cs.get(..2)?, 16).ok()?,
                    u8::from_str_radix(cs.get(2..4)?, 16).ok()?,
                ))
            });
        RouterSession {
            established,
            hold_time: if established { hold } else { None },
            drops: n["connectionsDropped"].as_u64(),
            notification_received,
        }
    }

    fn received(&self) -> BTreeMap<String, String> {
        let rib = self.json("show ip bgp json");
        let mut out = BTreeMap::new();
        for (prefix, paths) in rib["routes"].as_object().into_iter().flatten() {
            for p in paths.as_array().into_iter().flatten() {
                if p["bestpath"] != true {
                    continue;
                }
                let hop = p["nexthops"][0]["ip"].as_str().unwrap_or_default();
                // Its own `network`s have next hop 0.0.0.0.
                if hop != "0.0.0.0" {
                    out.insert(prefix.clone(), hop.to_owned());
                }
            }
        }
        out
    }

    fn announce(&mut self, prefixes: &[&str]) {
        let mut cmds = vec![
            "configure terminal".to_owned(),
            format!("router bgp {}", self.spec.asn),
            "address-family ipv4 unicast".to_owned(),
        ];
        for old in &self.spec.prefixes {
            if !prefixes.contains(&old.as_str()) {
                cmds.push(format!("no network {old}"));
            }
        }
        for new in prefixes {
            if !self.spec.prefixes.iter().any(|p| p == new) {
                cmds.push(format!("network {new}"));
            }
        }
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        self.vtysh(&cmds);
        self.spec.prefixes = prefixes.iter().map(|p| (*p).to_owned()).collect();
        std::fs::write(
            self.dir.join("bgpd.conf"),
            bgpd_conf(self.ext.ip, &self.spec),
        )
        .expect("bgpd.conf");
    }

    fn kill(&mut self) {
        let mut bgpd = self.bgpd.take().expect("bgpd running");
        self.killed.push(bgpd.pid());
        bgpd.signal_and_wait(libc::SIGKILL);
    }

    fn restart(&mut self, prefixes: &[&str]) {
        self.spec.prefixes = prefixes.iter().map(|p| (*p).to_owned()).collect();
        self.start_bgpd();
    }
}

impl Drop for Frr {
    fn drop(&mut self) {
        // A clean exit removes FRR's per-process directory; a killed daemon leaves its own.
        for p in [self.bgpd.take(), self.zebra.take()].into_iter().flatten() {
            let mut p = p;
            if p.is_running() {
                p.signal_and_wait(libc::SIGTERM);
            }
        }
        for pid in &self.killed {
            for daemon in ["bgpd", "zebra"] {
                let _ = std::fs::remove_dir_all(Path::new(FRR_TMP).join(format!("{daemon}.{pid}")));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
