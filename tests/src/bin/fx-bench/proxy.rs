//! Sections 2, 3 and the memory half of 6: ferrox next to kube-proxy's iptables and nftables
//! rulesets, at N Services with 10 endpoints each, the measured Service last.
//!
//! kube-proxy's rulesets (`ferrox_tests::bench::rulesets`, the shapes of its iptables and
//! nftables proxiers) run in a three-namespace topology with no ferrox in it: a client
//! namespace, a "node" namespace holding the rules and forwarding, and a server namespace with
//! the measured Service's 10 endpoint addresses. ferrox runs as itself: a one-node harness
//! cluster (release agent and CNI plugin) with the same N Services in its API, a client pod and
//! 10 server pods. Each side is compared with calling the endpoint's address directly over the
//! same topology, so the ratio is what the Service layer adds.
//!
//! Latency: `fx-echo rr`: a new TCP connection per exchange (connect, greeting, one echo,
//! close with a reset), one after the other; p50/p99 of the exchange times, and exchanges per
//! second over the whole run (= new connections per second, one client).
//! Programming: iptables-restore / nft -f of the full ruleset into an empty table, and of the
//! one-Service delta kube-proxy would write at N; for ferrox, an agent started onto empty maps
//! with every object already in the API (start, list, full sync, until every entry is in the
//! maps), its own measure of that full sync, and one Service added at N (API write to map
//! entry, polled every millisecond).

use std::{
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ferrox::services::testing::{slice, svc};
use ferrox_datapath::Maps;
use ferrox_tests::{
    bench::{
        realistic,
        rulesets::{self, Svc},
        stats::{self, Summary},
    },
    harness::{
        Cluster, NetNs, Place, bin_path, leaks, programmed_services, wait_for, wait_for_frontend,
    },
};
use serde_json::{Value, json};

pub const ENDPOINTS: usize = 10;
/// The measured Service (listed last, as kube-proxy's worst case).
const TARGET_IP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
/// Its endpoints in the kube-proxy topology: 10.250.0.1 to .10, one server listening on all.
fn server_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 250, 0, 1 + i as u8)
}
const CLIENT_IP: &str = "10.244.255.250";
const NODE_LINK_IP: &str = "169.254.1.1";

/// `services(n - 1)` fillers and the target, as the rulesets get them.
fn ruleset_services(n: usize, endpoints: &[(Ipv4Addr, u16)]) -> Vec<Svc> {
    let mut all = rulesets::services(n.saturating_sub(1), ENDPOINTS);
    all.push(Svc {
        namespace: "bench".into(),
        name: "target".into(),
        cluster_ip: TARGET_IP,
        port: 80,
        endpoints: endpoints.to_vec(),
    });
    all
}

/// Runs `f` with the calling thread in `ns` (children it spawns start there too).
fn in_netns<T: Send>(ns: &NetNs, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(ns.path()).unwrap();
            // SAFETY: setns on this scoped thread only.
            assert_eq!(
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) },
                0
            );
            f()
        })
        .join()
        .unwrap()
    })
}

/// Runs `program args` with `input` on stdin (in the calling thread's namespace); its wall time.
fn timed_stdin(program: &str, args: &[&str], input: &str) -> Duration {
    let started = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect(program);
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

fn run_in(ns: &NetNs, program: &str, args: &[&str]) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name(), program])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{program} {args:?}: {out:?}");
}

/// The kube-proxy topology: client, node (rules, forwarding) and server namespaces.
struct Topology {
    client: NetNs,
    node: NetNs,
    /// Kept for its lifetime (the server runs in it).
    _server: NetNs,
    _echo: std::process::Child,
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = self._echo.kill();
        let _ = self._echo.wait();
    }
}

impl Topology {
    fn new() -> Self {
        let id = std::process::id();
        let name = |what: &str| format!("{}bench{id}-{what}", leaks::NETNS_PREFIX);
        let client = NetNs::create(&name("cl"));
        let node = NetNs::create(&name("nd"));
        let server = NetNs::create(&name("sv"));
        for (ns, ifname, peer) in [(&client, "c0", "cl0"), (&server, "s0", "sv0")] {
            node.ip(&[
                "link",
                "add",
                ifname,
                "type",
                "veth",
                "peer",
                "name",
                peer,
                "netns",
                ns.name(),
            ]);
            node.ip(&["addr", "add", &format!("{NODE_LINK_IP}/32"), "dev", ifname]);
            node.ip(&["link", "set", ifname, "up"]);
            ns.ip(&["link", "set", "lo", "up"]);
            ns.ip(&["link", "set", peer, "up"]);
            ns.ip(&["route", "add", NODE_LINK_IP, "dev", peer, "scope", "link"]);
            ns.ip(&["route", "add", "default", "via", NODE_LINK_IP, "dev", peer]);
        }
        node.ip(&["link", "set", "lo", "up"]);
        client.ip(&["addr", "add", &format!("{CLIENT_IP}/32"), "dev", "cl0"]);
        node.ip(&["route", "add", &format!("{CLIENT_IP}/32"), "dev", "c0"]);
        for i in 0..ENDPOINTS {
            server.ip(&["addr", "add", &format!("{}/32", server_ip(i)), "dev", "sv0"]);
        }
        node.ip(&["route", "add", "10.250.0.0/24", "dev", "s0"]);
        node.sysctl(&["net.ipv4.ip_forward=1"]);
        let echo = Command::new("ip")
            .args(["netns", "exec", server.name()])
            .arg(bin_path("fx-echo"))
            .args(["serve", "--name", "target", "--tcp", "8080"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t = Self {
            client,
            node,
            _server: server,
            _echo: echo,
        };
        wait_for("the server", Duration::from_secs(10), || {
            t.rr(&format!("{}:8080", server_ip(0)), 1).map(|_| ())
        });
        t
    }

    /// `fx-echo rr` from the client namespace.
    fn rr(&self, target: &str, count: usize) -> Result<Value, String> {
        let out = Command::new("ip")
            .args(["netns", "exec", self.client.name()])
            .arg(bin_path("fx-echo"))
            .args(["rr", target, "--count", &count.to_string()])
            .args(["--warmup", &(count / 10).to_string()])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(v)
        } else {
            Err(v["failures"].to_string())
        }
    }

    fn clear_rules(&self) {
        run_in(&self.node, "nft", &["flush", "ruleset"]);
    }
}

/// p50/p99 (µs) and exchanges per second of one `fx-echo rr` run.
fn latency(result: &Value) -> (Summary, f64) {
    let samples: Vec<f64> = result["samples_us"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    let rate = samples.len() as f64 / result["elapsed_s"].as_f64().unwrap();
    (stats::summarize(&samples), rate)
}

fn latency_row(setup: &str, path: &str, n: usize, result: &Value) -> Value {
    let (s, rate) = latency(result);
    eprintln!(
        "{n:>6} services  {setup:<10} {path:<28} p50 {:>7.1} us  p99 {:>7.1} us  {rate:>7.0} conn/s",
        s.p50, s.p99
    );
    json!({ "services": n, "setup": setup, "path": path, "latency_us": s, "conn_per_s": rate })
}

/// Section 2 and 3 for kube-proxy's two rulesets at each size.
pub fn kube_proxy(sizes: &[usize], exchanges: usize, repeats: usize) -> (Vec<Value>, Vec<Value>) {
    let t = Topology::new();
    let endpoints: Vec<(Ipv4Addr, u16)> = (0..ENDPOINTS).map(|i| (server_ip(i), 8080)).collect();
    let target = format!("{TARGET_IP}:80");
    let direct = format!("{}:8080", server_ip(0));
    let mut lat = Vec::new();
    let mut prog = Vec::new();
    t.clear_rules();
    lat.push(latency_row(
        "kube-proxy",
        "endpoint address directly",
        0,
        &t.rr(&direct, exchanges).unwrap(),
    ));
    for &n in sizes {
        let all = ruleset_services(n, &endpoints);
        let (existing, new) = (&all[..all.len() - 1], all.last().unwrap());
        let ipt_full = rulesets::iptables_full(&all);
        let ipt_add = rulesets::iptables_add_one(existing, new);
        let ipt_before = rulesets::iptables_full(existing);
        let nft_full = rulesets::nft_full(&all);
        let nft_before = rulesets::nft_full(existing);
        let nft_add = rulesets::nft_add_one(new);
        for (setup, full, before, add) in [
            ("iptables", &ipt_full, &ipt_before, &ipt_add),
            ("nftables", &nft_full, &nft_before, &nft_add),
        ] {
            let (load, delta): (&str, (&str, Vec<&str>)) = match setup {
                "iptables" => ("iptables-restore", ("iptables-restore", vec!["--noflush"])),
                _ => ("nft", ("nft", vec!["-f", "-"])),
            };
            let load_args: Vec<&str> = if setup == "nftables" {
                vec!["-f", "-"]
            } else {
                vec![]
            };
            let mut full_s = Vec::new();
            let mut add_s = Vec::new();
            // One run at 10,000 (an nft -f of that ruleset alone takes minutes).
            let repeats = if n >= 10_000 { 1 } else { repeats };
            for _ in 0..repeats {
                t.clear_rules();
                full_s
                    .push(in_netns(&t.node, || timed_stdin(load, &load_args, full)).as_secs_f64());
                t.clear_rules();
                in_netns(&t.node, || timed_stdin(load, &load_args, before));
                add_s.push(in_netns(&t.node, || timed_stdin(delta.0, &delta.1, add)).as_secs_f64());
            }
            let (f, a) = (stats::summarize(&full_s), stats::summarize(&add_s));
            eprintln!(
                "{n:>6} services  {setup:<10} full load {:.3} s, add one {:.1} ms",
                f.p50,
                a.p50 * 1e3
            );
            prog.push(json!({
                "services": n, "setup": setup, "full_s": f, "add_one_ms": a.p50 * 1e3,
                "add_one_s": a, "rules_bytes": full.len(),
            }));
            // The rules of this size stay loaded for the latency run (the full ruleset, as the
            // add-one run left it).
            lat.push(latency_row(
                setup,
                "ClusterIP (Service last)",
                n,
                &t.rr(&target, exchanges).unwrap(),
            ));
        }
        t.clear_rules();
    }
    (lat, prog)
}

/// The agent's own measure of its last full sync (µs), from its log.
fn full_sync_us(log: &[String]) -> Option<u64> {
    log.iter()
        .rev()
        .filter(|l| l.contains("service maps synced") && l.contains(" full=true"))
        .find_map(|l| {
            let start = l.find(" took_us=")? + " took_us=".len();
            l[start..].split_whitespace().next()?.parse().ok()
        })
}

/// Seconds from `since` to the time stamp that starts an agent log line
/// (`2026-12-02T07:56:29.165101Z ...`, UTC, within a day of `since`).
fn seconds_since(line: &str, since: std::time::SystemTime) -> f64 {
    let stamp = line.split_whitespace().next().unwrap_or("");
    let time = stamp.split('T').nth(1).unwrap_or("").trim_end_matches('Z');
    let parts: Vec<f64> = time.split(':').filter_map(|p| p.parse().ok()).collect();
    assert_eq!(parts.len(), 3, "log time stamp {stamp:?}");
    let of_day = parts[0] * 3600.0 + parts[1] * 60.0 + parts[2];
    let since = since
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        % 86_400.0;
    (of_day - since).rem_euclid(86_400.0)
}

/// A field of a process's `/proc/<pid>/status` in kB (`VmRSS`, `RssAnon`, `RssFile`, ...).
fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Kernel memory of every map pinned under `root` (bytes, bpftool's `bytes_memlock`).
pub fn map_memory(root: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let out = Command::new("bpftool")
                .args(["-j", "map", "show", "pinned"])
                .arg(&path)
                .output()
                .unwrap();
            if let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) {
                total += v["bytes_memlock"].as_u64().unwrap_or(0);
            }
        }
    }
    total
}

fn create_services(c: &Cluster, n: usize, target_endpoints: &[Ipv4Addr]) {
    // Shaped as a real cluster stores them (managedFields, annotations, owner references, Pod
    // references): the agent's memory is measured with what it would really receive.
    let fillers = rulesets::services(n.saturating_sub(1), ENDPOINTS);
    for (k, s) in fillers.iter().enumerate() {
        c.api().apply(&realistic::service(
            svc(&s.name)
                .namespace(&s.namespace)
                .cluster_ip(&s.cluster_ip.to_string())
                .port("http", 80, "TCP")
                .build(),
            k,
        ));
        let mut sl = slice(&s.name, &format!("{}-x", s.name))
            .namespace(&s.namespace)
            .port("http", 8080, "TCP");
        for (ip, _) in &s.endpoints {
            sl = sl.ready_on(ip, "node-1");
        }
        c.api().apply(&realistic::slice(sl.build(), &s.name, k));
    }
    c.api().apply(&realistic::service(
        svc("target")
            .namespace("bench")
            .cluster_ip(&TARGET_IP.to_string())
            .port("http", 80, "TCP")
            .build(),
        n,
    ));
    let mut sl = slice("target", "target-x")
        .namespace("bench")
        .port("http", 8080, "TCP");
    for ip in target_endpoints {
        sl = sl.ready_on(ip, "node-1");
    }
    c.api().apply(&realistic::slice(sl.build(), "target", n));
}

fn rr_in(place: &Place, target: &str, count: usize) -> Value {
    let warmup = (count / 10).to_string();
    let (status, lines) = place.run(&[
        "rr",
        target,
        "--count",
        &count.to_string(),
        "--warmup",
        &warmup,
    ]);
    assert!(status.success(), "rr to {target}: {lines:?}");
    lines.into_iter().next().unwrap()
}

/// Sections 2, 3 and 6 (memory) for ferrox at each size: a fresh one-node cluster per size.
pub fn ferrox(sizes: &[usize], exchanges: usize) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
    let mut lat = Vec::new();
    let mut prog = Vec::new();
    let mut mem = Vec::new();
    for &n in sizes {
        let c = Cluster::builder().nodes(1).build();
        let node = c.node(1);
        let servers: Vec<_> = (0..ENDPOINTS)
            .map(|i| c.add_pod(1, &format!("target-{i}")))
            .collect();
        let _serving: Vec<_> = servers.iter().map(|p| p.serve(8080)).collect();
        let client = c.add_pod(1, "client");
        if n == sizes[0] {
            lat.push(latency_row(
                "ferrox",
                "endpoint address directly",
                0,
                &rr_in(&client, &format!("{}:8080", servers[0].ip), exchanges),
            ));
        }
        let ips: Vec<Ipv4Addr> = servers.iter().map(|p| p.ip).collect();
        create_services(&c, n, &ips);
        let maps = Maps::open(&node.layout()).unwrap();
        // Backends are shared by address: a filler endpoint may have a server pod's address.
        let distinct: std::collections::BTreeSet<Ipv4Addr> = rulesets::services(n - 1, ENDPOINTS)
            .iter()
            .flat_map(|s| s.endpoints.iter().map(|(ip, _)| *ip))
            .chain(ips.iter().copied())
            .collect();
        let mut want = (n, distinct.len());
        let converge = |what: &str, want: (usize, usize)| {
            wait_for(what, Duration::from_secs(300), || {
                let got = programmed_services(&maps);
                if got == want {
                    Ok(())
                } else {
                    Err(format!("{got:?} of {want:?}"))
                }
            })
        };
        converge("the Services in the maps", want);
        lat.push(latency_row(
            "ferrox",
            "ClusterIP (Service last)",
            n,
            &rr_in(&client, &format!("{TARGET_IP}:80"), exchanges),
        ));
        let pid = node.agent_pid();
        let (rss, anon, file) = (
            status_kb(pid, "VmRSS"),
            status_kb(pid, "RssAnon"),
            status_kb(pid, "RssFile"),
        );
        let map_bytes = map_memory(node.layout().root());
        eprintln!(
            "{n:>6} services  ferrox     agent RSS {:.1} MiB (heap and stacks {:.1}, binary {:.1}), maps {:.1} MiB",
            rss as f64 / 1024.0,
            anon as f64 / 1024.0,
            file as f64 / 1024.0,
            map_bytes as f64 / 1048576.0
        );
        mem.push(json!({
            "services": n, "endpoints": want.1, "agent_rss_kib": rss, "agent_rss_anon_kib": anon,
            "agent_rss_file_kib": file, "map_bytes": map_bytes,
        }));

        // One more Service at N, in the steady state (watches open).
        let added = Instant::now();
        c.api().apply(
            &svc("extra")
                .namespace("bench")
                .cluster_ip("10.100.0.2")
                .port("http", 80, "TCP")
                .build(),
        );
        c.api().apply(
            &slice("extra", "extra-x")
                .namespace("bench")
                .port("http", 8080, "TCP")
                .ready_on(servers[0].ip, "node-1")
                .build(),
        );
        // Polled on its one map entry (a whole-map count would cost more than the wait).
        wait_for_frontend(&maps, Ipv4Addr::new(10, 100, 0, 2), 80, 1);
        let add_one = added.elapsed();
        // Cold start onto empty maps, every object in the API.
        node.stop_agent();
        let mut m = Maps::open(&node.layout()).unwrap();
        for (k, _) in m.services.entries().unwrap() {
            m.services.remove(&k).unwrap();
        }
        for (id, _) in m.backends.entries().unwrap() {
            m.remove_backend(id).unwrap();
        }
        // Timed by the agent's own log: when its full sync ended (polling the maps would cost
        // the agent CPU at 10,000 Services).
        let wall0 = std::time::SystemTime::now();
        node.start_agent();
        let line = wait_for(
            "the restarted agent's full sync",
            Duration::from_secs(300),
            || {
                node.agent_log()
                    .into_iter()
                    .find(|l| l.contains("service maps synced") && l.contains(" full=true"))
                    .ok_or_else(|| "not yet".to_owned())
            },
        );
        let cold = seconds_since(&line, wall0);
        want.0 += 1;
        converge("the restarted agent to program everything", want);
        let sync_us = full_sync_us(&node.agent_log()).unwrap_or(0);

        eprintln!(
            "{n:>6} services  ferrox     cold start to programmed {:.3} s (full sync {:.1} ms), add one {:.1} ms",
            cold,
            sync_us as f64 / 1e3,
            add_one.as_secs_f64() * 1e3
        );
        prog.push(json!({
            "services": n, "setup": "ferrox", "cold_start_s": cold,
            "full_sync_ms": sync_us as f64 / 1e3, "add_one_ms": add_one.as_secs_f64() * 1e3,
        }));
    }
    (lat, prog, mem)
}
