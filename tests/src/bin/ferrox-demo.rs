//! `cargo xtask demo`: a two-node ferrox cluster on this machine. A Service (ClusterIP and
//! NodePort) with a backend pod on each node; a client pod calls its ClusterIP and a client
//! outside the cluster its NodePort, once a second, and show which backend answered and what
//! address it saw; Ctrl-C tears everything down.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use ferrox::services::testing::{slice, svc};
use ferrox_tests::harness::Cluster;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let swept = ferrox_tests::harness::leaks::sweep_stale();
    if !swept.is_empty() {
        println!(
            "Removed {} things a killed earlier demo, benchmark or test left behind.",
            swept.len()
        );
    }
    println!("Building a 2-node cluster (network namespaces, one ferrox agent per node)...");
    let cluster = Cluster::builder().nodes(2).build();
    let web1 = cluster.add_pod(1, "web-1");
    let web2 = cluster.add_pod(2, "web-2");
    let client = cluster.add_pod(1, "client");
    let _s1 = web1.serve(8080);
    let _s2 = web2.serve(8080);

    let cluster_ip = "10.96.0.10";
    cluster.api().apply(
        &svc("web")
            .node_port_type()
            .cluster_ip(cluster_ip)
            .port_np("", 80, 30080, "TCP")
            .build(),
    );
    cluster.api().apply(
        &slice("web", "web-1")
            .port("", 8080, "TCP")
            .ready_on(web1.ip, "node-1")
            .ready_on(web2.ip, "node-2")
            .build(),
    );
    cluster
        .node(1)
        .wait_for_backends(&format!("{cluster_ip}:80/TCP"), 2);

    let n1 = cluster.node(1);
    let outside = cluster.external_client();
    let node_port = format!("{}:30080", n1.addr);
    cluster.node(1).wait_for_entry(
        &format!("{node_port}/TCP"),
        ferrox::services::model::Scope::External,
        2,
    );
    println!();
    println!("Cluster {} is up:", cluster.id());
    for n in cluster.nodes() {
        println!(
            "  {}  underlay {}  pods {}  netns {}",
            n.name,
            n.addr,
            n.pod_cidr,
            n.netns().name()
        );
    }
    println!(
        "  pods: web-1 {} (node-1), web-2 {} (node-2), client {} (node-1)",
        web1.ip, web2.ip, client.ip
    );
    println!("  Service web: {cluster_ip}:80 and NodePort {node_port} -> 8080 on web-1 and web-2");
    println!("  a client outside the cluster: {}", outside.ip);
    println!();
    println!("Look around (in another terminal, as root):");
    let bpffs = n1.layout().root().display().to_string();
    let ferrox = ferrox_tests::harness::bin_path("ferrox")
        .display()
        .to_string();
    let env = format!(
        "FERROX_BPFFS_ROOT={bpffs} FERROX_NODE_CONFIG={}",
        n1.node_config().display()
    );
    let on_node = format!("nsenter --net=/run/netns/{}", n1.netns().name());
    println!("  {env} {on_node} {ferrox} status");
    println!("  {env} {ferrox} svc list");
    println!("  {env} {ferrox} ct list          # the outside client's flows");
    println!(
        "  {env} {ferrox} trace {}:40000 {node_port}/tcp",
        outside.ip
    );
    println!("  {env} {ferrox} counters");
    println!(
        "  nsenter --net=/run/netns/{} ip route          # node-1's routes",
        n1.netns().name()
    );
    println!(
        "  nsenter --net={} ip addr       # the client pod",
        client.netns_path.display()
    );
    println!();
    println!(
        "Every second the client pod calls {cluster_ip}:80 (socket hooks) and the outside client \
         {node_port} (per-packet NAT, Maglev; SNAT when the backend is on node-2). Ctrl-C stops:"
    );

    let target = format!("{cluster_ip}:80");
    while !STOP.load(Ordering::SeqCst) {
        for (who, place, to) in [
            ("client pod", &*client, &target),
            ("outside", &*outside, &node_port),
        ] {
            let (status, lines) = place.run(&["call", "tcp", to]);
            match lines.first() {
                Some(l) if status.success() => println!(
                    "  {who:<10} -> {to:<17} answered by {:<6} (it saw the client as {}, {} us)",
                    l["backend"].as_str().unwrap_or("?"),
                    l["seen_by_backend"].as_str().unwrap_or("?"),
                    l["micros"]
                ),
                other => println!("  {who} -> {to} failed: {other:?}"),
            }
        }
        for _ in 0..10 {
            if STOP.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    println!("Tearing down...");
    drop(cluster);
    let leaks = ferrox_tests::harness::leaks::find("");
    if leaks.is_empty() {
        println!("Done: nothing left behind.");
    } else {
        println!("Left behind: {leaks:?}");
    }
}
