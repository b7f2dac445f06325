//! BIRD 2, a real router, in an external client's namespace on the underlay: the peer the BGP
//! tests (and the BGP benchmark) talk to, with a configuration of the test's own, or as one of
//! the interop routers ([`Router`]) configured from a [`RouterSpec`].

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr, path::PathBuf};

use super::{
    Cluster, ExternalClient, Proc,
    router::{Router, RouterSession, RouterSpec},
};

pub struct Bird {
    proc: Option<Proc>,
    dir: PathBuf,
    pub ext: ExternalClient,
    /// What it was configured with, when started as a [`Router`].
    spec: Option<RouterSpec>,
}

impl Bird {
    /// BIRD in the next external client's namespace, with the configuration `config` makes for
    /// its address.
    pub fn start(c: &Cluster, config: impl FnOnce(&str) -> String) -> Self {
        let ext = c.external_client();
        let dir = std::env::temp_dir().join(format!("ferrox-bird-{}-{}", c.id(), ext.ip));
        std::fs::create_dir_all(&dir).expect("BIRD's directory");
        std::fs::write(dir.join("bird.conf"), config(&ext.ip.to_string())).expect("bird.conf");
        let conf = dir.join("bird.conf").display().to_string();
        let sock = dir.join("bird.ctl").display().to_string();
        let proc = ext.command("bird", &["-f", "-c", &conf, "-s", &sock]);
        Self {
            proc: Some(proc),
            dir,
            ext,
            spec: None,
        }
    }

    /// `birdc` on BIRD's control socket; its standard output.
    pub fn birdc(&self, args: &[&str]) -> String {
        let sock = self.dir.join("bird.ctl").display().to_string();
        let mut full = vec!["-s", sock.as_str()];
        full.extend_from_slice(args);
        let out = self.ext.command_output("birdc", &full);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Replaces the configuration and has BIRD load it; panics unless BIRD says it did.
    pub fn reconfigure(&self, config: &str) {
        std::fs::write(self.dir.join("bird.conf"), config).expect("bird.conf");
        let out = self.birdc(&["configure"]);
        assert!(out.contains("Reconfigured"), "birdc configure: {out}");
    }

    /// The next hops BIRD holds for `prefix` (every path, best or not), sorted.
    pub fn paths(&self, prefix: &str) -> Vec<String> {
        let out = self.birdc(&["show", "route", prefix]);
        let mut hops: Vec<String> = out
            .lines()
            .filter_map(|l| l.trim().strip_prefix("via "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect();
        hops.sort();
        hops
    }

    /// The route BIRD put in its namespace's kernel table for `prefix`.
    pub fn kernel_route(&self, prefix: &str) -> String {
        let out = self
            .ext
            .command_output("ip", &["route", "show", prefix, "proto", "bird"]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        self.proc.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// BIRD's configuration for `spec` on `ip`: one protocol `n<i>` per neighbour (from 1), the
/// originated prefixes as blackhole statics. eBGP neighbours are sent those only; a reflector
/// passes on everything.
fn spec_config(ip: Ipv4Addr, spec: &RouterSpec) -> String {
    let mut c = format!(
        "log stderr all;\nrouter id {ip};\nprotocol device {{ scan time 1; }}\nprotocol static {{ ipv4;\n"
    );
    for p in &spec.prefixes {
        let _ = writeln!(c, "  route {p} blackhole;");
    }
    c += "}\n";
    for (i, n) in spec.neighbors.iter().enumerate() {
        let ibgp = n.asn == spec.asn;
        let _ = writeln!(
            c,
            "protocol bgp n{} {{\n  local {ip} as {};\n  neighbor {} as {};\n  hold time {};\n  \
             connect delay time 1; connect retry time 1;\n  \
             graceful restart on; graceful restart time {};",
            i + 1,
            spec.asn,
            n.addr,
            n.asn,
            n.hold_time,
            spec.restart_time,
        );
        if let Some(p) = &n.password {
            let _ = writeln!(c, "  password \"{p}\";");
        }
        if ibgp {
            c += "  direct;\n";
        }
        if let (Some(id), true) = (spec.cluster_id, n.rr_client) {
            let _ = writeln!(c, "  rr client;\n  rr cluster id {id};");
        }
        let export = if spec.cluster_id.is_some() {
            "all"
        } else {
            "where source = RTS_STATIC"
        };
        let _ = writeln!(c, "  ipv4 {{ import all; export {export}; }};\n}}");
    }
    c
}

impl Bird {
    fn spec(&self) -> &RouterSpec {
        self.spec.as_ref().expect("BIRD started as a Router")
    }

    fn run(&mut self, restarting: bool) {
        let conf = self.dir.join("bird.conf");
        std::fs::write(&conf, spec_config(self.ext.ip, self.spec())).expect("bird.conf");
        let conf = conf.display().to_string();
        let sock = self.dir.join("bird.ctl").display().to_string();
        let mut args = vec!["-f", "-c", conf.as_str(), "-s", sock.as_str()];
        if restarting {
            // Graceful restart recovery: the restart flag, routes kept until peers are back.
            args.push("-R");
        }
        self.proc = Some(self.ext.command("bird", &args));
        super::wait_for(
            "BIRD's control socket",
            std::time::Duration::from_secs(20),
            || {
                let out = self.birdc(&["show", "status"]);
                if out.contains("Daemon is up") {
                    Ok(())
                } else {
                    Err(out)
                }
            },
        );
    }
}

/// A NOTIFICATION as BIRD names it in "Last error: Received: ...".
fn bird_notification(text: &str) -> Option<(u8, u8)> {
    let known: [(&str, (u8, u8)); 7] = [
        ("Maximum number of prefixes reached", (6, 1)),
        ("Administrative shutdown", (6, 2)),
        ("Peer de-configured", (6, 3)),
        ("Administrative reset", (6, 4)),
        ("Connection collision resolution", (6, 7)),
        ("Hold timer expired", (4, 0)),
        ("Finite state machine error", (5, 0)),
    ];
    known
        .iter()
        .find(|(name, _)| text.contains(name))
        .map(|(_, cs)| *cs)
}

impl Router for Bird {
    fn start(c: &Cluster, spec: RouterSpec) -> Self {
        let ext = c.external_client();
        let dir = std::env::temp_dir().join(format!("ferrox-bird-{}-{}", c.id(), ext.ip));
        std::fs::create_dir_all(&dir).expect("BIRD's directory");
        let mut b = Self {
            proc: None,
            dir,
            ext,
            spec: Some(spec),
        };
        b.run(false);
        b
    }

    fn name(&self) -> &'static str {
        "BIRD"
    }

    fn ip(&self) -> Ipv4Addr {
        self.ext.ip
    }

    fn log_tail(&self, n: usize) -> String {
        let lines = self.proc.as_ref().map(Proc::lines).unwrap_or_default();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn session(&self, neighbor: Ipv4Addr) -> RouterSession {
        let i = self
            .spec()
            .neighbors
            .iter()
            .position(|n| n.addr == neighbor)
            .unwrap_or_else(|| panic!("{neighbor} is not a neighbour of BIRD {}", self.ext.ip));
        let out = self.birdc(&["show", "protocols", "all", &format!("n{}", i + 1)]);
        let field = |name: &str| {
            out.lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .map(str::trim)
        };
        let established = field("BGP state:") == Some("Established");
        // "Hold timer: 6.215/9"; no such line when the hold time is 0.
        let hold = field("Hold timer:")
            .and_then(|v| v.rsplit('/').next()?.parse().ok())
            .unwrap_or(0);
        let notification_received = field("Last error:")
            .filter(|e| e.starts_with("Received:"))
            .and_then(bird_notification);
        RouterSession {
            established,
            hold_time: established.then_some(hold),
            drops: None,
            notification_received,
        }
    }

    fn received(&self) -> BTreeMap<String, String> {
        let out = self.birdc(&["show", "route"]);
        let mut got = BTreeMap::new();
        let mut current: Option<String> = None;
        for l in out.lines() {
            if !l.starts_with(char::is_whitespace) {
                current = l
                    .split_whitespace()
                    .next()
                    .filter(|p| p.contains('/') && l.contains(" unicast "))
                    .map(str::to_owned);
            } else if let (Some(prefix), Some(via)) = (&current, l.trim().strip_prefix("via ")) {
                let hop = via.split_whitespace().next().unwrap_or_default().to_owned();
                // The best path comes first; the others follow, each with its own "via".
                got.entry(prefix.clone()).or_insert(hop);
            }
        }
        got
    }

    fn announce(&mut self, prefixes: &[&str]) {
        let spec = self.spec.as_mut().expect("BIRD started as a Router");
        spec.prefixes = prefixes.iter().map(|p| (*p).to_owned()).collect();
        let conf = spec_config(self.ext.ip, self.spec());
        self.reconfigure(&conf);
    }

    fn kill(&mut self) {
        let mut p = self.proc.take().expect("BIRD running");
        p.signal_and_wait(libc::SIGKILL);
    }

    fn restart(&mut self, prefixes: &[&str]) {
        if let Some(spec) = self.spec.as_mut() {
            spec.prefixes = prefixes.iter().map(|p| (*p).to_owned()).collect();
        }
        self.run(true);
    }
}

/// `n` distinct /24 prefixes from 20.0.0.0 up (20.0.0.0/24, 20.0.1.0/24, ...), for scale runs.
pub fn scale_prefixes(n: u32) -> impl Iterator<Item = String> {
    (0..n).map(|i| {
        let a = (20u32 << 24) + (i << 8);
        format!("{}/24", std::net::Ipv4Addr::from(a))
    })
}

/// BIRD (AS 65001) peering with each of `nodes` (addresses; AS 64512), taking everything they
/// announce, into its namespace's kernel table (ECMP across nodes) and announcing nothing.
pub fn listening_config(ext_ip: &str, nodes: &[String]) -> String {
    let mut conf = format!(
        "router id {ext_ip};\nprotocol device {{ scan time 1; }}\n\
         protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths on; scan time 1; }}\n\
         template bgp nodes {{ local {ext_ip} as 65001; hold time 9; connect retry time 1;\n  \
           ipv4 {{ import all; export none; }}; }}\n"
    );
    for (i, n) in nodes.iter().enumerate() {
        conf += &format!(
            "protocol bgp node{} from nodes {{ neighbor {n} as 64512; }}\n",
            i + 1
        );
    }
    conf
}

/// BIRD as an external peer of the node at `node_ip` (AS 65001 to the node's 64512),
/// announcing `prefixes` (static routes) and taking nothing from the node.
pub fn announcing_config(ext_ip: &str, node_ip: &str, prefixes: &[String]) -> String {
    let mut conf = format!(
        "router id {ext_ip};\nprotocol device {{ scan time 1; }}\nprotocol static {{ ipv4;\n"
    );
    for p in prefixes {
        conf += "  route ";
        conf += p;
        conf += " blackhole;\n";
    }
    conf += &format!(
        "}}\nprotocol bgp node1 {{\n  local {ext_ip} as 65001;\n  neighbor {node_ip} as 64512;\n  \
         hold time 90; connect retry time 1;\n  ipv4 {{ import none; export all; next hop self; }};\n}}\n"
    );
    conf
}

/// The kernel routes to other nodes' and peers' prefixes `node`'s agent reports on its
/// `/metrics` as programmed (`ferrox_routes`, all kinds), and how many applies failed; `None`
/// when the agent did not answer.
fn programmed(node: &super::Node) -> Option<(u64, u64)> {
    let (status, lines) = node
        .host()
        .run(&["http-get", "127.0.0.1:10249", "/metrics"]);
    let body = match (status.success(), lines.first()) {
        (true, Some(l)) if l["status"] == 200 => l["body"].as_str().unwrap_or("").to_owned(),
        _ => return None,
    };
    let sum = |prefix: &str| -> u64 {
        body.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    };
    Some((
        sum("ferrox_routes{"),
        sum("ferrox_route_applies_total{result=\"error\"}"),
    ))
}

/// Polls (every 5 ms, no back-off: this times things) until `node` reports `n` routes
/// programmed; panics after `limit`.
fn until_programmed(node: &super::Node, n: u64, limit: std::time::Duration) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let (routes, errors) = programmed(node).unwrap_or((u64::MAX, 0));
        assert_eq!(errors, 0, "route programming failed on {}", node.name);
        if routes == n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} programmed {routes} routes of {n} after {limit:?}",
            node.name
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A one-node cluster whose agent peers with the first external client (where
/// [`learn_and_forget`] starts BIRD).
pub fn learning_cluster() -> Cluster {
    Cluster::builder()
        .nodes(1)
        .agent_env("FERROX_BGP", "true")
        .agent_env("FERROX_BGP_PEERS", "bird=198.18.0.200:65001")
        .agent_env("FERROX_BGP_CONNECT_RETRY", "1")
        .build()
}

/// Scale run against a one-node cluster whose agent peers with the first external client
/// (`FERROX_BGP_PEERS=bird=198.18.0.200:65001`): BIRD comes up announcing nothing; once the
/// session is up it is told to announce `n` /24s, then none. Checks the kernel table holds
/// exactly `n` routes of ours via BIRD in between, and none at the end.
pub fn learn_and_forget(c: &Cluster, node: &super::Node, n: u32) -> Learning {
    let node_ip = node.addr.to_string();
    let bird = Bird::start(c, |ext| announcing_config(ext, &node_ip, &[]));
    super::wait_for(
        "the BGP session with BIRD",
        std::time::Duration::from_secs(30),
        || {
            let out = node.ferrox_output(&["bgp", "peers", "-o", "json"]);
            let v: serde_json::Value =
                serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
            if v[0]["state"] == "established" {
                Ok(())
            } else {
                Err(v.to_string())
            }
        },
    );
    let ext = bird.ext.ip.to_string();
    let prefixes: Vec<String> = scale_prefixes(n).collect();
    let limit = std::time::Duration::from_secs(120);
    let started = std::time::Instant::now();
    bird.reconfigure(&announcing_config(&ext, &node_ip, &prefixes));
    let configured = started.elapsed();
    until_programmed(node, u64::from(n), limit);
    let learned = started.elapsed();
    let in_kernel = node
        .netns()
        .ip(&["route", "show", "proto", "243"])
        .lines()
        .filter(|l| l.contains(&format!("via {ext} ")))
        .count();
    assert_eq!(in_kernel, n as usize, "kernel routes of ours via BIRD");
    let started = std::time::Instant::now();
    bird.reconfigure(&announcing_config(&ext, &node_ip, &[]));
    until_programmed(node, 0, limit);
    let withdrawn = started.elapsed();
    let left = node.netns().ip(&["route", "show", "proto", "243"]);
    assert!(
        left.trim().is_empty(),
        "routes left: {}",
        &left[..left.len().min(500)]
    );
    Learning {
        bird_configure: configured,
        learned,
        withdrawn,
    }
}

/// What [`learn_and_forget`] measured.
#[derive(Clone, Copy, Debug)]
pub struct Learning {
    /// `birdc configure` with the routes: BIRD reading its configuration (it announces after).
    pub bird_configure: std::time::Duration,
    /// From `birdc configure` to every route programmed on the node (includes `bird_configure`).
    pub learned: std::time::Duration,
    /// From `birdc configure` without them to none left.
    pub withdrawn: std::time::Duration,
}
