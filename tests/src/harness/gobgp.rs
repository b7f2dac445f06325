//! GoBGP (Debian's `gobgpd`, daemon and `gobgp` client), a real router, in an external client's
//! namespace on the underlay: `gobgpd` with its own TOML configuration and its gRPC API on its
//! own port (`--api-hosts`), asked questions with `gobgp -p <port> ... -j`.
//!
//! GoBGP has no static routes in its configuration: the prefixes it originates are added
//! through its API. So that a (re)started instance never opens a session before they are in
//! (a restarting speaker would send End-of-RIB without them), its neighbours start
//! administratively down and are enabled once the prefixes are added.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr, path::PathBuf, time::Duration};

use super::{
    Cluster, ExternalClient, Proc,
    router::{Router, RouterSession, RouterSpec},
};

pub struct Gobgp {
    pub ext: ExternalClient,
    dir: PathBuf,
    spec: RouterSpec,
    port: u16,
    proc: Option<Proc>,
}

/// gobgpd's configuration for `spec` on `ip`, every neighbour administratively down.
fn config(ip: Ipv4Addr, spec: &RouterSpec) -> String {
    let mut c = String::new();
    let _ = writeln!(
        c,
        "[global.config]\n  as = {}\n  router-id = \"{ip}\"\n  port = 179\n  \
         local-address-list = [\"{ip}\"]\n",
        spec.asn
    );
    for n in &spec.neighbors {
        let _ = writeln!(
            c,
            "[[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{}\"\n    \
             peer-as = {}\n    admin-down = true",
            n.addr, n.asn
        );
        if let Some(p) = &n.password {
            let _ = writeln!(c, "    auth-password = \"{p}\"");
        }
        let _ = writeln!(
            c,
            "  [neighbors.timers.config]\n    hold-time = {}\n    keepalive-interval = {}\n    \
             connect-retry = 1\n    idle-hold-time-after-reset = 1",
            n.hold_time,
            n.hold_time / 3
        );
        let _ = writeln!(
            c,
            "  [neighbors.graceful-restart.config]\n    enabled = true\n    restart-time = {}",
            spec.restart_time
        );
        if let (Some(id), true) = (spec.cluster_id, n.rr_client) {
            let _ = writeln!(
                c,
                "  [neighbors.route-reflector.config]\n    route-reflector-client = true\n    \
                 route-reflector-cluster-id = \"{id}\""
            );
        }
        let _ = writeln!(
            c,
            "  [[neighbors.afi-safis]]\n    [neighbors.afi-safis.config]\n      \
             afi-safi-name = \"ipv4-unicast\"\n    \
             [neighbors.afi-safis.mp-graceful-restart.config]\n      enabled = true\n"
        );
    }
    c
}

impl Gobgp {
    /// `gobgp -p <port> <args>`; its standard output, or the error it printed.
    fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        let port = self.port.to_string();
        let mut full = vec!["-p", port.as_str()];
        full.extend_from_slice(args);
        let out = self.ext.command_output("gobgp", &full);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// `gobgp -p <port> <args>`; its standard output.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|e| panic!("gobgp {args:?} on GoBGP {}: {e}", self.ext.ip))
    }

    fn add(&self, prefix: &str) {
        let ip = self.ext.ip.to_string();
        self.cli(&[
            "global", "rib", "add", "-a", "ipv4", prefix, "nexthop", &ip, "origin", "igp",
        ]);
    }

    /// Starts gobgpd (`restarting`: with the restart flag of graceful restart), adds the
    /// prefixes it originates, then enables its neighbours.
    fn run(&mut self, restarting: bool) {
        let conf = self.dir.join("gobgpd.toml");
        std::fs::write(&conf, config(self.ext.ip, &self.spec)).expect("gobgpd.toml");
        let conf = conf.display().to_string();
        let api = format!("127.0.0.1:{}", self.port);
        let mut args = vec![
            "-f",
            conf.as_str(),
            "--api-hosts",
            api.as_str(),
            "--pprof-disable",
            "-p",
        ];
        if restarting {
            args.push("-r");
        }
        self.proc = Some(self.ext.command("gobgpd", &args));
        super::wait_for("gobgpd's API", Duration::from_secs(20), || {
            self.try_cli(&["global"])
        });
        for p in &self.spec.prefixes {
            self.add(p);
        }
        for n in &self.spec.neighbors {
            self.cli(&["neighbor", &n.addr.to_string(), "enable"]);
        }
    }

    /// Its log lines (gobgpd prints them plain, `-p`).
    pub fn log(&self) -> Vec<String> {
        self.proc.as_ref().map(Proc::lines).unwrap_or_default()
    }
}

impl Router for Gobgp {
    fn start(c: &Cluster, spec: RouterSpec) -> Self {
        let ext = c.external_client();
        let dir = std::env::temp_dir().join(format!("ferrox-gobgp-{}-{}", c.id(), ext.ip));
        std::fs::create_dir_all(&dir).expect("GoBGP's directory");
        // Its own API port (each instance also has its own namespace).
        let port = 50051 + u16::from(ext.ip.octets()[3]);
        let mut g = Self {
            ext,
            dir,
            spec,
            port,
            proc: None,
        };
        g.run(false);
        g
    }

    fn name(&self) -> &'static str {
        "GoBGP"
    }

    fn ip(&self) -> Ipv4Addr {
        self.ext.ip
    }

    fn log_tail(&self, n: usize) -> String {
        let lines = self.log();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn session(&self, neighbor: Ipv4Addr) -> RouterSession {
        let out = self.cli(&["neighbor", &neighbor.to_string(), "-j"]);
        let n: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("gobgp neighbor: {e}: {out}"));
        let state = &n["state"]["session_state"];
        let established = *state == 6 || *state == "ESTABLISHED" || *state == "established";
        let hold = n["timers"]["state"]["negotiated_hold_time"]
            .as_u64()
            .map(|h| h as u16);
        // gobgpd logs the NOTIFICATIONs it receives: "received notification" Code=6 Subcode=1.
        let key = format!("Key={neighbor} ");
        let notification_received = self
            .log()
            .iter()
            .rev()
            .filter(|l| l.contains("received notification") && l.contains(&key))
            .find_map(|l| {
                let field = |name: &str| -> Option<u8> {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix(name))?
                        .parse()
                        .ok()
                };
                Some((field("Code=")?, field("Subcode=")?))
            });
        RouterSession {
            established,
            hold_time: if established {
                Some(hold.unwrap_or(0))
            } else {
                None
            },
            drops: Some(n["state"]["flops"].as_u64().unwrap_or(0)),
            notification_received,
        }
    }

    fn received(&self) -> BTreeMap<String, String> {
        let out = self.cli(&["global", "rib", "-a", "ipv4", "-j"]);
        let rib: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("gobgp global rib: {e}: {out}"));
        let mut got = BTreeMap::new();
        for (prefix, paths) in rib.as_object().into_iter().flatten() {
            for p in paths.as_array().into_iter().flatten() {
                if p["best"] != true || p["source-id"].as_str() == Some("<nil>") {
                    continue;
                }
                let hop = p["attrs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find_map(|a| a["nexthop"].as_str())
                    .unwrap_or_default();
                if hop != self.ext.ip.to_string() {
                    got.insert(prefix.clone(), hop.to_owned());
                }
            }
        }
        got
    }

    fn announce(&mut self, prefixes: &[&str]) {
        for old in &self.spec.prefixes {
            if !prefixes.contains(&old.as_str()) {
                self.cli(&["global", "rib", "del", "-a", "ipv4", old]);
            }
        }
        for new in prefixes {
            if !self.spec.prefixes.iter().any(|p| p == new) {
                self.add(new);
            }
        }
        self.spec.prefixes = prefixes.iter().map(|p| (*p).to_owned()).collect();
    }

    fn kill(&mut self) {
        let mut p = self.proc.take().expect("gobgpd running");
        p.signal_and_wait(libc::SIGKILL);
    }

    fn restart(&mut self, prefixes: &[&str]) {
        self.spec.prefixes = prefixes.iter().map(|p| (*p).to_owned()).collect();
        self.run(true);
    }
}

impl Drop for Gobgp {
    fn drop(&mut self) {
        self.proc.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
