//! `ferrox monitor`: a live stream of drops (with their reason) and translations (before and
//! after) from the datapath's ring buffer. While it runs it sets the `monitor` field of
//! `CONFIG_V1` (and sets it again every second, should an agent restart clear it); when it
//! stops it clears it, so an unwatched node writes no events at all.

use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use ferrox_abi::{Hook, MonitorEvent, Reason, event_kind, proto};
use ferrox_datapath::{Events, Maps, PinLayout};
use serde::Serialize;

use super::{ct::sock, output::Output};
use crate::policy::report::PolicyReport;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Which events to show.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Filter {
    /// drop or translate.
    #[arg(long = "type")]
    pub kind: Option<String>,
    /// An address anywhere in the event.
    #[arg(long)]
    pub addr: Option<Ipv4Addr>,
}

/// An event as printed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Line {
    pub kind: &'static str,
    pub hook: &'static str,
    pub reason: &'static str,
    pub proto: &'static str,
    /// Absent when the hook does not know it (a `connect()`).
    pub src: Option<String>,
    pub dst: String,
    /// Where it was sent (translations).
    pub to: Option<String>,
    /// A NetworkPolicy drop: the policies that isolate the pod in that direction (none allowed
    /// the flow), as the agent's report names them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub isolated_by: Option<String>,
}

/// The policies isolating the pod a policy drop concerns (its source for egress, its
/// destination for ingress), from `report`.
pub fn isolated_by(ev: &MonitorEvent, report: &PolicyReport) -> Option<String> {
    let (pod, egress) = match Reason::from_u32(u32::from(ev.reason))? {
        Reason::DropPolicyEgress => (ev.saddr, true),
        Reason::DropPolicyIngress => (ev.daddr, false),
        _ => return None,
    };
    let name = report.local_pods.get(&Ipv4Addr::from(pod.to_ne_bytes()))?;
    let ids: Vec<&str> = report
        .policies
        .iter()
        .filter(|p| (if egress { p.egress } else { p.ingress }) && p.selects.contains(name))
        .map(|p| p.id.as_str())
        .collect();
    Some(format!("{name}: {}", ids.join(", ")))
}

/// The printed form of an event, `None` when `filter` leaves it out.
pub fn line(ev: &MonitorEvent, filter: &Filter) -> Option<Line> {
    let kind = match ev.kind {
        event_kind::DROP => "drop",
        event_kind::TRANSLATE => "translate",
        _ => return None,
    };
    if filter.kind.as_deref().is_some_and(|k| k != kind) {
        return None;
    }
    if let Some(a) = filter.addr {
        let a = u32::from_ne_bytes(a.octets());
        if ![ev.saddr, ev.daddr, ev.nat_addr].contains(&a) {
            return None;
        }
    }
    Some(Line {
        kind,
        hook: Hook::ALL
            .get(usize::from(ev.hook))
            .map_or("?", |h| h.name()),
        reason: Reason::from_u32(u32::from(ev.reason)).map_or("?", |r| r.name()),
        proto: match ev.proto {
            proto::TCP => "tcp",
            proto::UDP => "udp",
            proto::ICMP => "icmp",
            proto::SCTP => "sctp",
            _ => "other",
        },
        src: (ev.saddr != 0).then(|| sock(ev.saddr, ev.sport).to_string()),
        dst: sock(ev.daddr, ev.dport).to_string(),
        to: (ev.kind == event_kind::TRANSLATE).then(|| sock(ev.nat_addr, ev.nat_port).to_string()),
        isolated_by: None,
    })
}

fn set_listening(maps: &mut Maps, on: bool) -> anyhow::Result<()> {
    let mut cfg = maps.config.get()?;
    cfg.monitor = u32::from(on);
    maps.config.set(&cfg)?;
    Ok(())
}

pub fn run(
    layout: &PinLayout,
    filter: &Filter,
    output: Output,
    node_config: &std::path::Path,
) -> anyhow::Result<()> {
    let report_path = PolicyReport::path(node_config);
    let read_report = || {
        PolicyReport::read(&report_path)
            .ok()
            .flatten()
            .unwrap_or_default()
    };
    let mut report = read_report();
    let mut maps = Maps::open(layout)?;
    let mut events = Events::open(layout)?;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    // Whatever was queued before this monitor started is not news.
    while events.next_event().is_some() {}
    set_listening(&mut maps, true)?;
    eprintln!("ferrox monitor: listening (Ctrl-C to stop)");
    let mut asserted = Instant::now();
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    while !STOP.load(Ordering::SeqCst) {
        let mut any = false;
        while let Some(ev) = events.next_event() {
            any = true;
            let Some(mut l) = line(&ev, filter) else {
                continue;
            };
            l.isolated_by = isolated_by(&ev, &report);
            let text = match output {
                Output::Json => serde_json::to_string(&l)?,
                // One YAML document per event.
                Output::Yaml => format!(
                    "---\n{}",
                    serde_yaml::to_string(&serde_json::to_value(&l)?)?.trim_end()
                ),
                Output::Table => {
                    format!(
                        "{:<9} {:<18} {:<22} {} {} -> {}{}",
                        l.kind.to_uppercase(),
                        l.hook,
                        l.reason,
                        l.proto,
                        l.src.as_deref().unwrap_or("(socket)"),
                        l.dst,
                        l.to.as_deref()
                            .map(|t| format!(" => {t}"))
                            .unwrap_or_default()
                    ) + &l
                        .isolated_by
                        .as_deref()
                        .map(|p| format!(" (isolated by {p})"))
                        .unwrap_or_default()
                }
            };
            writeln!(out, "{text}")?;
            out.flush()?;
        }
        if asserted.elapsed() >= Duration::from_secs(1) {
            set_listening(&mut maps, true)?;
            report = read_report();
            asserted = Instant::now();
        }
        if !any {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    set_listening(&mut maps, false)?;
    eprintln!("ferrox monitor: stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn be(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    #[test]
    fn a_policy_drop_names_the_policies_isolating_its_pod_in_its_direction() {
        use crate::policy::report::PolicyRow;
        let row = |id: &str, ingress: bool, egress: bool| PolicyRow {
            id: id.into(),
            ingress,
            egress,
            selects: vec!["x/a".into()],
            ..PolicyRow::default()
        };
        let report = PolicyReport {
            policies: vec![
                row("x/in", true, false),
                row("x/out", false, true),
                row("x/both", true, true),
            ],
            local_pods: [(Ipv4Addr::new(10, 244, 1, 5), "x/a".to_owned())].into(),
            ..PolicyReport::default()
        };
        let ev = |reason: Reason, saddr: [u8; 4], daddr: [u8; 4]| MonitorEvent {
            kind: event_kind::DROP,
            reason: reason as u8,
            saddr: be(saddr),
            daddr: be(daddr),
            ..MonitorEvent::default()
        };
        let pod = [10, 244, 1, 5];
        let other = [10, 244, 2, 9];
        assert_eq!(
            isolated_by(&ev(Reason::DropPolicyIngress, other, pod), &report).as_deref(),
            Some("x/a: x/in, x/both")
        );
        assert_eq!(
            isolated_by(&ev(Reason::DropPolicyEgress, pod, other), &report).as_deref(),
            Some("x/a: x/out, x/both")
        );
        // Another pod, or another drop: nothing to name.
        assert_eq!(
            isolated_by(&ev(Reason::DropPolicyIngress, pod, other), &report),
            None
        );
        assert_eq!(
            isolated_by(&ev(Reason::DropSourceRange, other, pod), &report),
            None
        );
    }

    #[test]
    fn events_print_with_names_and_filters_apply() {
        let drop = MonitorEvent {
            kind: event_kind::DROP,
            hook: Hook::TcUplinkIngress as u8,
            reason: Reason::DropSourceRange as u8,
            proto: proto::TCP,
            saddr: be([198, 18, 0, 201]),
            daddr: be([203, 0, 113, 30]),
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            ..MonitorEvent::default()
        };
        let l = line(&drop, &Filter::default()).unwrap_or_else(|| unreachable!());
        assert_eq!(l.kind, "drop");
        assert_eq!(l.hook, "tc-uplink-ingress");
        assert_eq!(l.reason, "source-range-denied");
        assert_eq!(l.src.as_deref(), Some("198.18.0.201:40000"));
        assert_eq!(l.dst, "203.0.113.30:80");
        assert_eq!(l.to, None);
        let translate = MonitorEvent {
            kind: event_kind::TRANSLATE,
            hook: Hook::SockConnect4 as u8,
            reason: Reason::NatNewFlow as u8,
            proto: proto::TCP,
            daddr: be([10, 96, 0, 10]),
            dport: 80u16.to_be(),
            nat_addr: be([10, 244, 1, 5]),
            nat_port: 8080u16.to_be(),
            ..MonitorEvent::default()
        };
        let l = line(&translate, &Filter::default()).unwrap_or_else(|| unreachable!());
        assert_eq!(l.src, None, "a connect() has no source yet");
        assert_eq!(l.to.as_deref(), Some("10.244.1.5:8080"));
        let only_drops = Filter {
            kind: Some("drop".into()),
            ..Filter::default()
        };
        assert!(line(&translate, &only_drops).is_none());
        let by_addr = Filter {
            addr: Some(Ipv4Addr::new(10, 244, 1, 5)),
            ..Filter::default()
        };
        assert!(line(&translate, &by_addr).is_some());
        assert!(line(&drop, &by_addr).is_none());
    }
}
