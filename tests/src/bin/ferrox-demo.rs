//! `cargo xtask demo`: a two-node ferrox cluster on this machine. A Service with a backend pod
//! on each node; a client pod calls it once a second and shows which backend answered; Ctrl-C
//! tears everything down.

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
            .cluster_ip(cluster_ip)
            .port("", 80, "TCP")
            .build(),
    );
    cluster.api().apply(
        &slice("web", "web-1")
            .port("", 8080, "TCP")
            .ready(web1.ip)
            .ready(web2.ip)
            .build(),
    );
    cluster
        .node(1)
        .wait_for_backends(&format!("{cluster_ip}:80/TCP"), 2);

    let n1 = cluster.node(1);
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
    println!("  Service web: {cluster_ip}:80 -> 8080 on web-1 and web-2");
    println!();
    println!("Look around (in another terminal, as root):");
    let bpffs = n1.layout().root().display().to_string();
    let ferrox = ferrox_tests::harness::bin_path("ferrox")
        .display()
        .to_string();
    println!("  FERROX_BPFFS_ROOT={bpffs} {ferrox} svc list");
    println!("  FERROX_BPFFS_ROOT={bpffs} {ferrox} counters");
    println!("  FERROX_BPFFS_ROOT={bpffs} {ferrox} datapath");
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
        "The client pod calls http://{cluster_ip}:80 every second (Ctrl-C to stop and tear down):"
    );

    let target = format!("{cluster_ip}:80");
    while !STOP.load(Ordering::SeqCst) {
        let (status, lines) = client.run(&["call", "tcp", &target]);
        match lines.first() {
            Some(l) if status.success() => println!(
                "  client -> {} answered by {:<6} (peer seen by the app: {}, {} us)",
                target,
                l["backend"].as_str().unwrap_or("?"),
                l["peer"].as_str().unwrap_or("?"),
                l["micros"]
            ),
            other => println!("  client -> {target} failed: {other:?}"),
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
