//! Datapath tier: NetworkPolicy's compiled tables written into the kernel's maps (ipcache,
//! policy entries, isolated endpoints) give the reference model's verdict for every pod,
//! direction, peer, protocol and port of the sample worlds, looked up as the programs do
//! (longest-prefix matches in the kernel's tries); an update rewrites only what changed and
//! leaves nothing stale; and the programs themselves (BPF_PROG_TEST_RUN of the pod and uplink
//! hooks) drop exactly the flows the model denies, and let replies of allowed flows through.
//! Needs root (bpf).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use ferrox::policy::{
    compile::compile,
    model::{Direction, PodInfo, Protocol, Verdict, World},
    tables::{table_verdict, write},
    testing::{disagreements, pod, sample_worlds},
};
use ferrox_abi::{Hook, Reason};
use ferrox_datapath::{Datapath, TcProgram, bpffs::ScratchBpffs};

fn local(w: &World) -> BTreeMap<String, Ipv4Addr> {
    w.pods
        .iter()
        .map(|p| (format!("{}/{}", p.namespace, p.name), p.ip))
        .collect()
}

#[test]
fn the_kernel_tables_give_the_models_verdicts_and_updates_leave_nothing_stale() {
    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-policy-test").unwrap();
    let mut dp = Datapath::open(&bpffs.layout()).unwrap();
    let worlds = sample_worlds();
    let mut failures = Vec::new();
    // Each world written over the previous one: the diff must leave exactly its tables.
    for (what, w) in &worlds {
        let l = local(w);
        let names: Vec<String> = l.keys().cloned().collect();
        let c = compile(w, &names);
        let first = write(dp.maps_mut(), &c, &l).unwrap();
        failures.extend(disagreements(what, w, |pod, dir, peer, protocol, port| {
            table_verdict(dp.maps(), pod.ip, dir, peer, protocol, port).unwrap()
        }));
        let again = write(dp.maps_mut(), &c, &l).unwrap();
        if again != Default::default() {
            failures.push(format!(
                "{what}: a second write changed {again:?} (first {first:?})"
            ));
        }
        let entries: usize = c.endpoints.values().map(|e| e.entries.len()).sum();
        let in_kernel = dp.maps().policies.entries().unwrap().len();
        if in_kernel > entries {
            failures.push(format!(
                "{what}: {in_kernel} policy entries in the kernel for {entries} compiled"
            ));
        }
        let isolated = dp.maps().policy_endpoints.entries().unwrap().len();
        if isolated != c.endpoints.len() {
            failures.push(format!(
                "{what}: {isolated} isolated endpoints in the kernel, {} compiled",
                c.endpoints.len()
            ));
        }
    }
    // Back to no policy: the tables empty but for the world's identity.
    let none = World {
        pods: worlds[0].1.pods.clone(),
        namespaces: worlds[0].1.namespaces.clone(),
        policies: vec![],
    };
    let l = local(&none);
    let c = compile(&none, &l.keys().cloned().collect::<Vec<_>>());
    write(dp.maps_mut(), &c, &l).unwrap();
    assert!(dp.maps().policies.entries().unwrap().is_empty());
    assert!(dp.maps().policy_endpoints.entries().unwrap().is_empty());
    assert_eq!(dp.maps().ipcache.entries().unwrap().len(), c.ipcache.len());
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures[..failures.len().min(30)].join("\n")
    );
}

#[path = "../../ebpf/datapath/tests/packets/mod.rs"]
mod packets;

const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_SHOT: i32 = 2;

/// What the programs did with one packet: its action and the policy reason counted, if any.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Passed,
    Denied(Reason),
}

/// Runs `packet` through the pod hook (when `from_pod`) or the uplink's ingress, with the policy
/// conntrack emptied first unless `keep` (so each probe is a new flow).
fn run(dp: &mut Datapath, packet: &packets::Packet, from_pod: bool, keep: bool) -> Seen {
    let program = if from_pod {
        TcProgram::FromPod
    } else {
        TcProgram::UplinkIngress
    };
    run_at(dp, packet, program, keep)
}

/// Runs `packet` through the hook into a pod (its host veth's egress).
fn into_pod(dp: &mut Datapath, packet: &packets::Packet, keep: bool) -> Seen {
    run_at(dp, packet, TcProgram::ToPod, keep)
}

fn run_at(dp: &mut Datapath, packet: &packets::Packet, program: TcProgram, keep: bool) -> Seen {
    if !keep {
        let flows: Vec<_> = dp.maps().policy_ct.entries().unwrap();
        for (k, _) in flows {
            dp.maps_mut().policy_ct.remove(&k).unwrap();
        }
    }
    let hook = match program {
        TcProgram::FromPod => Hook::TcFromPod,
        TcProgram::ToPod => Hook::TcToPod,
        TcProgram::UplinkIngress => Hook::TcUplinkIngress,
        TcProgram::UplinkEgress => Hook::TcUplinkEgress,
    };
    let drops = |dp: &Datapath| {
        [Reason::DropPolicyEgress, Reason::DropPolicyIngress]
            .map(|r| dp.maps().counters.get(hook, r).unwrap().packets)
    };
    let before = drops(dp);
    let out = dp.test_run_tc(program, &packet.build(), 1).unwrap();
    let after = drops(dp);
    let reason = match (after[0] - before[0], after[1] - before[1]) {
        (0, 0) => None,
        (1, 0) => Some(Reason::DropPolicyEgress),
        (0, 1) => Some(Reason::DropPolicyIngress),
        moved => panic!("policy drop counters moved by {moved:?}"),
    };
    match (out.action, reason) {
        (TC_ACT_UNSPEC, None) => Seen::Passed,
        (TC_ACT_SHOT, Some(r)) => Seen::Denied(r),
        other => panic!("action and policy counters disagree: {other:?}"),
    }
}

fn packet(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: Protocol,
    sport: u16,
    dport: u16,
) -> packets::Packet {
    let p = packets::pkt().ipv4(src.octets(), dst.octets());
    match protocol {
        Protocol::Tcp => p.tcp(sport, dport),
        Protocol::Udp => p.udp(sport, dport),
        Protocol::Sctp => p.sctp(sport, dport),
    }
}

/// What the model says of a new flow from `src` to `dst`: the source's egress is judged first,
/// then the destination's ingress (only pods of `w` are isolated).
fn expected(w: &World, src: Ipv4Addr, dst: Ipv4Addr, protocol: Protocol, port: u16) -> Seen {
    let denied = |pod: Option<&PodInfo>, dir, peer| {
        pod.is_some_and(|pod| {
            w.verdict(pod, dir, peer, w.pod_by_ip(peer), protocol, port) == Verdict::Denied
        })
    };
    if denied(w.pod_by_ip(src), Direction::Egress, dst) {
        Seen::Denied(Reason::DropPolicyEgress)
    } else if denied(w.pod_by_ip(dst), Direction::Ingress, src) {
        Seen::Denied(Reason::DropPolicyIngress)
    } else {
        Seen::Passed
    }
}

/// The kernel's programs, fed a new flow between every two pods of each sample world (and
/// between pods and addresses outside), TCP, UDP and SCTP, on ports inside and outside the
/// policies' ranges, drop exactly what the model denies, with the reason of the side that denies
/// it (a pod's packets through its veth's hook, the others' through the uplink's); and the hook
/// into a pod, fed the same flows as the host would hand them over, drops exactly those the
/// receiving pod's ingress denies.
#[test]
fn the_programs_drop_exactly_the_flows_the_model_denies() {
    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-policy-kernel").unwrap();
    let mut dp = Datapath::open(&bpffs.layout()).unwrap();
    let outside = [
        Ipv4Addr::new(10, 0, 9, 9),
        Ipv4Addr::new(192, 0, 2, 1),
        Ipv4Addr::new(192, 0, 2, 200),
    ];
    let mut failures = Vec::new();
    let mut probes = 0;
    for (what, w) in &sample_worlds() {
        let l = local(w);
        let c = compile(w, &l.keys().cloned().collect::<Vec<_>>());
        write(dp.maps_mut(), &c, &l).unwrap();
        let mut addrs: Vec<Ipv4Addr> = w.pods.iter().map(|p| p.ip).collect();
        addrs.extend(outside);
        for &src in &addrs {
            for &dst in &addrs {
                let from_pod = w.pod_by_ip(src).is_some();
                if src == dst || (!from_pod && w.pod_by_ip(dst).is_none()) {
                    continue;
                }
                for protocol in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
                    for port in [79u16, 80, 81, 443] {
                        probes += 1;
                        let want = expected(w, src, dst, protocol, port);
                        let got = run(
                            &mut dp,
                            &packet(src, dst, protocol, 40000, port),
                            from_pod,
                            false,
                        );
                        if got != want {
                            failures.push(format!(
                                "{what}: {src} -> {dst} {protocol:?}/{port}: model {want:?}, kernel {got:?}"
                            ));
                        }
                        let Some(to) = w.pod_by_ip(dst) else {
                            continue;
                        };
                        probes += 1;
                        let want = if w.verdict(
                            to,
                            Direction::Ingress,
                            src,
                            w.pod_by_ip(src),
                            protocol,
                            port,
                        ) == Verdict::Denied
                        {
                            Seen::Denied(Reason::DropPolicyIngress)
                        } else {
                            Seen::Passed
                        };
                        let got =
                            into_pod(&mut dp, &packet(src, dst, protocol, 40000, port), false);
                        if got != want {
                            failures.push(format!(
                                "{what}: into {dst} from {src} {protocol:?}/{port}: model {want:?}, kernel {got:?}"
                            ));
                        }
                    }
                }
            }
        }
    }
    eprintln!("{probes} probes");
    assert!(probes > 10_000, "only {probes} probes");
    assert!(
        failures.is_empty(),
        "{} of {probes} probes disagree:\n{}",
        failures.len(),
        failures[..failures.len().min(30)].join("\n")
    );
}

/// Policy is stateful: the replies (and later packets) of an allowed flow pass where a new flow
/// would not, in both kinds of isolation; ICMP echo replies find their request; the node's own
/// address reaches its pods (the kubelet's probes); with no pod isolated nothing is judged.
#[test]
fn replies_of_allowed_flows_pass_where_new_flows_would_not() {
    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-policy-state").unwrap();
    let mut dp = Datapath::open(&bpffs.layout()).unwrap();
    let node = Ipv4Addr::new(192, 168, 50, 2);
    let mut cfg = dp.maps().config.get().unwrap();
    cfg.node_addr = u32::from_ne_bytes(node.octets());
    dp.maps_mut().config.set(&cfg).unwrap();
    let worlds = sample_worlds();
    let world = |name: &str| &worlds.iter().find(|(w, _)| *w == name).unwrap().1;
    let set = |dp: &mut Datapath, w: &World| {
        let l = local(w);
        let c = compile(w, &l.keys().cloned().collect::<Vec<_>>());
        write(dp.maps_mut(), &c, &l).unwrap();
    };
    let ip = |id: &str| pod(&worlds[0].1, id).ip;
    let (xa, xb, ya, yb) = (ip("x/a"), ip("x/b"), ip("y/a"), ip("y/b"));
    let tcp = |s: Ipv4Addr, d: Ipv4Addr, sp: u16, dp_: u16| packet(s, d, Protocol::Tcp, sp, dp_);
    let denied_in = Seen::Denied(Reason::DropPolicyIngress);
    let denied_out = Seen::Denied(Reason::DropPolicyEgress);

    // Ingress isolation: x's pods take nothing from y, but their own flows' replies.
    set(&mut dp, world("deny all ingress in x"));
    let reply = tcp(ya, xa, 80, 40000);
    assert_eq!(
        run(&mut dp, &reply, true, false),
        denied_in,
        "a reply with no flow"
    );
    assert_eq!(
        run(&mut dp, &tcp(xa, ya, 40000, 80), true, false),
        Seen::Passed
    );
    assert_eq!(
        run(&mut dp, &reply, true, true),
        Seen::Passed,
        "the reply of x/a's flow"
    );
    assert_eq!(
        run(&mut dp, &tcp(xa, ya, 40000, 80), true, true),
        Seen::Passed
    );
    assert_eq!(
        run(&mut dp, &tcp(ya, xa, 80, 40001), true, true),
        denied_in,
        "another port"
    );
    // The same where the host hands the reply to the pod.
    assert_eq!(
        into_pod(&mut dp, &reply, true),
        Seen::Passed,
        "the reply, into the pod"
    );
    assert_eq!(
        into_pod(&mut dp, &tcp(ya, xa, 80, 40001), true),
        denied_in,
        "another port, into the pod"
    );
    // The same over the uplink (the peer on another node).
    assert_eq!(
        run(&mut dp, &tcp(xb, ya, 40000, 80), true, false),
        Seen::Passed
    );
    assert_eq!(
        run(&mut dp, &tcp(ya, xb, 80, 40000), false, true),
        Seen::Passed
    );
    // ICMP: an echo reply passes after its request, not before.
    let echo_reply = packets::pkt()
        .ipv4(ya.octets(), xb.octets())
        .icmp_echo_id(0, 7);
    assert_eq!(run(&mut dp, &echo_reply, false, false), denied_in);
    let echo = packets::pkt()
        .ipv4(xb.octets(), ya.octets())
        .icmp_echo_id(8, 7);
    assert_eq!(run(&mut dp, &echo, true, false), Seen::Passed);
    assert_eq!(run(&mut dp, &echo_reply, false, true), Seen::Passed);
    assert_eq!(into_pod(&mut dp, &echo_reply, true), Seen::Passed);
    assert_eq!(into_pod(&mut dp, &echo_reply, false), denied_in);
    // The node's own address reaches its pods; another node's does not.
    assert_eq!(
        run(&mut dp, &tcp(node, xa, 40000, 80), false, false),
        Seen::Passed
    );
    let other_node = Ipv4Addr::new(192, 168, 50, 3);
    assert_eq!(
        run(&mut dp, &tcp(other_node, xa, 40000, 80), false, false),
        denied_in
    );
    // Likewise into the pod (the node's own processes, what the host forwards).
    assert_eq!(
        into_pod(&mut dp, &tcp(node, xa, 40000, 80), false),
        Seen::Passed
    );
    assert_eq!(
        into_pod(&mut dp, &tcp(other_node, xa, 40000, 80), false),
        denied_in
    );

    // Egress isolation: y's pods open nothing, but answer what they are sent.
    set(
        &mut dp,
        world("allow everything to a, deny egress everywhere in y"),
    );
    assert_eq!(
        run(&mut dp, &tcp(yb, xb, 40000, 80), true, false),
        denied_out
    );
    assert_eq!(
        run(&mut dp, &tcp(xb, yb, 40000, 80), true, false),
        Seen::Passed
    );
    assert_eq!(
        run(&mut dp, &tcp(yb, xb, 80, 40000), true, true),
        Seen::Passed,
        "the reply"
    );
    assert_eq!(
        run(&mut dp, &tcp(yb, xb, 80, 40001), true, true),
        denied_out,
        "not a reply"
    );
    // The kubelet's probe of a pod isolated for egress: the probe is remembered as it enters
    // the pod, so its reply passes the pod's isolated egress; the pod opening a flow to the
    // node does not.
    assert_eq!(
        into_pod(&mut dp, &tcp(node, yb, 40000, 80), false),
        Seen::Passed
    );
    assert_eq!(
        run(&mut dp, &tcp(yb, node, 80, 40000), true, true),
        Seen::Passed,
        "the probe's reply"
    );
    assert_eq!(
        run(&mut dp, &tcp(yb, node, 80, 40001), true, true),
        denied_out,
        "not the probe's reply"
    );
    // A new flow a policy allows is counted once (x/a takes anything: policy x/open).
    let allowed_new = |dp: &Datapath| {
        dp.maps()
            .counters
            .get(Hook::TcFromPod, Reason::PolicyAllowedNew)
            .unwrap()
            .packets
    };
    let before = allowed_new(&dp);
    assert_eq!(
        run(&mut dp, &tcp(xb, xa, 40000, 80), true, false),
        Seen::Passed
    );
    assert_eq!(
        run(&mut dp, &tcp(xb, xa, 40000, 80), true, true),
        Seen::Passed
    );
    assert_eq!(
        allowed_new(&dp) - before,
        1,
        "counted for the flow's first packet only"
    );

    // No pod isolated: nothing is judged, nothing remembered.
    set(&mut dp, world("none"));
    assert_eq!(dp.maps().policy_filter.marked().unwrap(), 0);
    assert_eq!(
        run(&mut dp, &tcp(yb, xb, 40000, 80), true, false),
        Seen::Passed
    );
    assert!(dp.maps().policy_ct.entries().unwrap().is_empty());
    let not_isolated = |dp: &Datapath| {
        dp.maps()
            .counters
            .get(Hook::TcToPod, Reason::PassPodNotIsolated)
            .unwrap()
            .packets
    };
    let before = not_isolated(&dp);
    assert_eq!(
        into_pod(&mut dp, &tcp(yb, xb, 40000, 80), false),
        Seen::Passed
    );
    assert_eq!(
        not_isolated(&dp) - before,
        1,
        "one filter read, nothing judged"
    );
    assert!(dp.maps().policy_ct.entries().unwrap().is_empty());
}
