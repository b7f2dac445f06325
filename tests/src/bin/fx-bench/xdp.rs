//! Section 4b: how many packets per second a node forwards through a NodePort to a backend on
//! another node, with the translation at TC only, at generic XDP and at native XDP (issue #17,
//! item 5). A pktgen-style sender (raw frames from an `AF_PACKET` socket that bypasses the
//! qdisc, in batches of `sendmmsg`) in an external client's namespace sends 64-byte UDP
//! datagrams over [`FLOWS`] source ports to node-1's NodePort as fast as it can; the backend
//! is a pod on node-2 (no listener: the datagrams are counted as its interface receives them).
//! Figures: datagrams sent, datagrams node-1 translated (its counters), datagrams the backend's
//! interface received, and the machine's busy CPU per million packets. The underlay behaves as
//! NICs do for XDP (whole checksums, the fabric's end takes `XDP_TX` frames at once:
//! `ClusterBuilder::nic_like_uplinks`) in all three runs, so only the translation differs.
//! Everything shares this VM's CPUs (sender, both nodes, the backend), so the rates are those of
//! the whole chain; the XDP rows' gain is what one node's translation no longer costs it.

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use ferrox::services::{
    model::Scope,
    testing::{slice, svc},
};
use ferrox_abi::{Hook, Reason};
use ferrox_datapath::Maps;
use ferrox_tests::harness::Cluster;
use serde_json::{Value, json};

/// Source ports the sender cycles through: this many flows, established after their first.
const FLOWS: u16 = 64;
/// Frames per `sendmmsg` call.
const BATCH: usize = 64;
const NODE_PORT: u16 = 30090;

/// An interface's MAC address in the namespace at `netns` (`ip -j link show`).
fn mac_in(netns: &str, dev: &str) -> [u8; 6] {
    let out = std::process::Command::new("ip")
        .args(["-n", netns, "-j", "link", "show", dev])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = v[0]["address"].as_str().unwrap();
    let mut mac = [0u8; 6];
    for (i, p) in s.split(':').enumerate() {
        mac[i] = u8::from_str_radix(p, 16).unwrap();
    }
    mac
}

/// Ethernet + IPv4 + UDP with an 18-byte payload (a 60-byte frame, 64 on a wire with its FCS),
/// checksums complete.
fn udp_frame(macs: ([u8; 6], [u8; 6]), src: [u8; 4], sport: u16, dst: [u8; 4]) -> Vec<u8> {
    let mut p = vec![0u8; 60];
    p[0..6].copy_from_slice(&macs.0);
    p[6..12].copy_from_slice(&macs.1);
    p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    p[14] = 0x45;
    p[16..18].copy_from_slice(&46u16.to_be_bytes());
    p[22] = 64;
    p[23] = 17;
    p[26..30].copy_from_slice(&src);
    p[30..34].copy_from_slice(&dst);
    let sum = super::checksum(&p[14..34], 0);
    p[24..26].copy_from_slice(&sum.to_be_bytes());
    p[34..36].copy_from_slice(&sport.to_be_bytes());
    p[36..38].copy_from_slice(&NODE_PORT.to_be_bytes());
    p[38..40].copy_from_slice(&26u16.to_be_bytes());
    let mut pseudo = 0u32;
    for w in [src, dst] {
        pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]))
            + u32::from(u16::from_be_bytes([w[2], w[3]]));
    }
    pseudo += 17 + 26;
    let sum = match super::checksum(&p[34..60], pseudo) {
        0 => 0xffff,
        s => s,
    };
    p[40..42].copy_from_slice(&sum.to_be_bytes());
    p
}

/// Sends `frames` round-robin out of `dev` in the namespace at `netns` for `secs` seconds, as
/// fast as the socket takes them; returns how many were sent.
fn blast(netns: &std::path::Path, dev: &str, frames: &[Vec<u8>], secs: u64) -> u64 {
    let netns = netns.to_path_buf();
    let dev = dev.to_owned();
    let frames = frames.to_vec();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&netns).unwrap();
        // SAFETY: setns on this thread only.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        // SAFETY: plain socket(2); protocol 0: this socket only sends.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a descriptor we just opened.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let one: libc::c_int = 1;
        // SAFETY: an int option of the size passed.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&raw const one).cast(),
                size_of::<libc::c_int>() as u32,
            )
        };
        let name = std::ffi::CString::new(dev).unwrap();
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        sll.sll_halen = 6;
        // SAFETY: `sll` is a valid address of the size passed.
        let rc = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                (&raw const sll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let mut iovs: Vec<libc::iovec> = frames
            .iter()
            .map(|fr| libc::iovec {
                iov_base: fr.as_ptr() as *mut libc::c_void,
                iov_len: fr.len(),
            })
            .collect();
        let n = iovs.len();
        let mut sent = 0u64;
        let mut next = 0usize;
        let deadline = Instant::now() + Duration::from_secs(secs);
        // SAFETY: all-zero is a valid mmsghdr.
        let mut msgs: Vec<libc::mmsghdr> =
            (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
        while Instant::now() < deadline {
            for (i, m) in msgs.iter_mut().enumerate() {
                m.msg_hdr.msg_iov = &raw mut iovs[(next + i) % n];
                m.msg_hdr.msg_iovlen = 1;
            }
            // SAFETY: `msgs` points at valid iovecs of frames that outlive the call.
            let rc =
                unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
            if rc > 0 {
                sent += rc as u64;
                next = (next + rc as usize) % n;
            }
        }
        sent
    })
    .join()
    .unwrap()
}

/// Section 4b: one cluster per way of translating, `secs` seconds of sending, `repeats` times.
/// With `profiling`, where the machine's time goes during each way's last run.
pub fn node_port_rate(quick: bool, profiling: bool) -> Vec<Value> {
    let secs: u64 = if quick { 3 } else { 8 };
    let repeats = if quick { 1 } else { 3 };
    let mut rows = Vec::new();
    for (path, xdp) in [
        ("TC only (XDP off)", None),
        ("generic XDP", Some("generic")),
        ("native XDP", Some("native")),
    ] {
        let mut b = Cluster::builder().nodes(2).nic_like_uplinks(true);
        if let Some(mode) = xdp {
            b = b.xdp(mode);
        }
        let c = b.build();
        let backend = c.add_pod(2, "sink");
        let client = c.external_client();
        c.api().apply(
            &svc("sink")
                .node_port_type()
                .cluster_ip("10.96.9.9")
                .port_np("sink", 9, i32::from(NODE_PORT), "UDP")
                .build(),
        );
        c.api().apply(
            &slice("sink", "s")
                .port("sink", 9, "UDP")
                .ready_on(backend.ip, "node-2")
                .build(),
        );
        c.node(1)
            .wait_for_entry(&format!("198.18.0.11:{NODE_PORT}/UDP"), Scope::External, 1);
        let macs = (
            mac_in(c.node(1).netns().name(), "eth0"),
            mac_in(&client_netns_name(&client.place.netns_path), "eth0"),
        );
        let frames: Vec<Vec<u8>> = (0..FLOWS)
            .map(|i| udp_frame(macs, client.ip.octets(), 20_000 + i, [198, 18, 0, 11]))
            .collect();
        let maps = Maps::open(&c.node(1).layout()).unwrap();
        let translated = || {
            let hooks = [Hook::XdpUplink, Hook::TcUplinkIngress];
            let reasons = [Reason::NatNewFlow, Reason::NatEstablished];
            hooks
                .iter()
                .flat_map(|h| reasons.iter().map(move |r| (*h, *r)))
                .map(|(h, r)| maps.counters.get(h, r).unwrap().packets)
                .sum::<u64>()
        };
        let at_xdp = || {
            maps.counters
                .get(Hook::XdpUplink, Reason::NatEstablished)
                .unwrap()
                .packets
        };
        let (mut sent_mpps, mut fwd_mpps, mut rx_mpps, mut cpu_per_mpps) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut xdp_share = 0.0;
        let mut top = Vec::new();
        for run in 0..repeats {
            let (_, rx0) = c.delivery_counters(&backend);
            let (t0, x0) = (translated(), at_xdp());
            let cpu0 = super::cpu_busy_seconds();
            let start = Instant::now();
            let send = || blast(&client.place.netns_path, "eth0", &frames, secs);
            let sent = if profiling && run == repeats - 1 {
                let (sent, t) = super::system_profile(secs.saturating_sub(1).max(1), send);
                top = t;
                sent
            } else {
                send()
            };
            // Let what is still queued drain before the counters are read.
            std::thread::sleep(Duration::from_millis(200));
            let wall = start.elapsed().as_secs_f64() - 0.2;
            let cpu = super::cpu_busy_seconds() - cpu0;
            let (_, rx1) = c.delivery_counters(&backend);
            let fwd = translated() - t0;
            xdp_share = (at_xdp() - x0) as f64 / fwd.max(1) as f64;
            let mpps = |n: u64| n as f64 / wall / 1e6;
            sent_mpps.push(mpps(sent));
            fwd_mpps.push(mpps(fwd));
            rx_mpps.push(mpps(rx1 - rx0));
            cpu_per_mpps.push(cpu / wall / mpps(rx1 - rx0).max(1e-9));
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            (v[v.len() / 2], v[0], v[v.len() - 1])
        };
        let (s, _, _) = med(&mut sent_mpps);
        let (f, _, _) = med(&mut fwd_mpps);
        let (r, rmin, rmax) = med(&mut rx_mpps);
        let (cpu, _, _) = med(&mut cpu_per_mpps);
        eprintln!(
            "NodePort UDP, {path:<18} sent {s:.3} Mpps, translated {f:.3}, backend received {r:.3} (min {rmin:.3}, max {rmax:.3}); {cpu:.2} CPU cores per Mpps; {:.0}% translated at XDP",
            xdp_share * 100.0
        );
        rows.push(json!({
            "path": path, "sent_mpps": s, "translated_mpps": f, "received_mpps": r,
            "received_mpps_min": rmin, "received_mpps_max": rmax, "cores_per_mpps": cpu,
            "xdp_share": xdp_share, "seconds": secs, "repeats": repeats, "flows": FLOWS,
            "frame_bytes": 60,
            "profile": top.iter().map(|(p, s)| json!({"percent": p, "symbol": s})).collect::<Vec<_>>(),
        }));
        for (pct, sym) in &top {
            eprintln!("  {pct:>6.2}%  {sym}");
        }
    }
    rows
}

/// The name of the namespace mounted at `path` (`/run/netns/<name>`).
fn client_netns_name(path: &std::path::Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}
