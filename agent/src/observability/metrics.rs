//! Prometheus metrics (`/metrics`, default `0.0.0.0:10249`, kube-proxy's metrics port), in the
//! text exposition format 0.0.4.
//!
//! The agent's own figures (syncs, their duration, failures, with full maps counted apart,
//! programmed objects, conntrack collection) are recorded as they happen; the datapath's
//! per-hook, per-reason packet counters are read from the pinned map at scrape time, so a
//! scrape always shows what the kernel counted, including while the sync loop is busy.

use std::{
    fmt::Write as _,
    sync::{Arc, Mutex, PoisonError},
};

use ferrox_datapath::{CounterRow, PinLayout};

use super::status::{AgentStatus, RoutingStatus};

/// One service sync as the metrics count it (the service sync fills it from its report).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ServiceSync {
    /// A full sync (start, relist, node change), or an incremental one.
    pub full: bool,
    pub seconds: f64,
    /// Entries left in their previous state because a map was full.
    pub failures_map_full: usize,
    /// Entries left in their previous state for any other reason.
    pub failures_other: usize,
    pub frontends: usize,
    pub backends: usize,
    pub maglev_tables: usize,
    pub source_ranges: usize,
    /// Services the datapath cannot express.
    pub skipped: usize,
    pub writes: usize,
    pub deletes: usize,
    pub flows_purged: usize,
    pub sockets_closed: usize,
}

/// Upper bounds (seconds) of the sync duration histogram's buckets.
const SYNC_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

#[derive(Debug, Default)]
struct State {
    syncs_full: u64,
    syncs_incremental: u64,
    /// Observations per bucket (not cumulative), then the +Inf overflow.
    sync_buckets: [u64; SYNC_BUCKETS.len() + 1],
    sync_sum: f64,
    last_sync_seconds: f64,
    failures_map_full: u64,
    failures_other: u64,
    /// Entries the last sync could not program (retried until none fails).
    failing_entries: usize,
    frontends: usize,
    backends: usize,
    maglev_tables: usize,
    source_ranges: usize,
    skipped: usize,
    writes: u64,
    deletes: u64,
    flows_purged: u64,
    sockets_closed: u64,
    ct_gc_removed: u64,
    ct_entries: usize,
    /// Wall clock (unix seconds) of the last sync.
    last_sync_unix: Option<u64>,
    routing: Option<RoutingStatus>,
    routing_applies: u64,
    routing_failures: u64,
}

/// Appends one metric family: HELP, TYPE, then its samples (each: labels or suffix, value).
fn family(text: &mut String, name: &str, kind: &str, help: &str, samples: Vec<String>) {
    let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for sample in samples {
        let _ = writeln!(text, "{name}{sample}");
    }
}

/// The metrics the agent's tasks record into; cheap to clone.
#[derive(Clone, Default)]
pub struct Metrics {
    state: Arc<Mutex<State>>,
    bgp: Arc<Mutex<Option<crate::bgp::speaker::Speaker>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records one service sync.
    pub fn sync(&self, r: &ServiceSync) {
        let mut s = self.lock();
        if r.full {
            s.syncs_full += 1;
        } else {
            s.syncs_incremental += 1;
        }
        let bucket = SYNC_BUCKETS
            .iter()
            .position(|b| r.seconds <= *b)
            .unwrap_or(SYNC_BUCKETS.len());
        s.sync_buckets[bucket] += 1;
        s.sync_sum += r.seconds;
        s.last_sync_seconds = r.seconds;
        s.failures_map_full += r.failures_map_full as u64;
        s.failures_other += r.failures_other as u64;
        s.failing_entries = r.failures_map_full + r.failures_other;
        s.frontends = r.frontends;
        s.backends = r.backends;
        s.maglev_tables = r.maglev_tables;
        s.source_ranges = r.source_ranges;
        s.skipped = r.skipped;
        s.writes += r.writes as u64;
        s.deletes += r.deletes as u64;
        s.flows_purged += r.flows_purged as u64;
        s.last_sync_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs());
        s.sockets_closed += r.sockets_closed as u64;
    }

    /// The agent's own state, for `ferrox status`.
    pub fn status(&self) -> AgentStatus {
        let bgp = self
            .bgp
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let s = self.lock();
        AgentStatus {
            pid: std::process::id(),
            last_sync_unix: s.last_sync_unix,
            last_sync_seconds: s.last_sync_seconds,
            syncs_full: s.syncs_full,
            syncs_incremental: s.syncs_incremental,
            failures_map_full: s.failures_map_full,
            failures_other: s.failures_other,
            failing_entries: s.failing_entries,
            frontends: s.frontends,
            backends: s.backends,
            maglev_tables: s.maglev_tables,
            source_ranges: s.source_ranges,
            services_skipped: s.skipped,
            conntrack_expired: s.ct_gc_removed,
            flows_purged: s.flows_purged,
            sockets_closed: s.sockets_closed,
            routing: s.routing.clone(),
            bgp_peers: bgp.as_ref().map(crate::bgp::speaker::Speaker::peers),
            bgp_routes: bgp.as_ref().map(crate::bgp::speaker::Speaker::routes),
        }
    }

    /// The BGP speaker whose sessions and routes the status reports.
    pub fn set_bgp(&self, speaker: crate::bgp::speaker::Speaker) {
        *self.bgp.lock().unwrap_or_else(PoisonError::into_inner) = Some(speaker);
    }

    /// Records one routing apply (`ok` false: it failed; the status keeps the error).
    pub fn routing(&self, status: RoutingStatus, ok: bool) {
        let mut s = self.lock();
        s.routing_applies += 1;
        if !ok {
            s.routing_failures += 1;
        }
        s.routing = Some(status);
    }

    /// Records one conntrack collection.
    pub fn conntrack_gc(&self, removed: usize, remaining: usize) {
        let mut s = self.lock();
        s.ct_gc_removed += removed as u64;
        s.ct_entries = remaining;
    }

    /// The exposition text, with the datapath's `counters`.
    pub fn render(&self, counters: &[CounterRow]) -> String {
        let bgp = self
            .bgp
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let s = self.lock();
        let mut text = String::new();
        let mut section = |name: &str, kind: &str, help: &str, samples: Vec<String>| {
            family(&mut text, name, kind, help, samples);
        };
        section(
            "ferrox_sync_total",
            "counter",
            "Service syncs, by kind (full: every entry; incremental: the entries of the Services that changed).",
            vec![
                format!("{{kind=\"full\"}} {}", s.syncs_full),
                format!("{{kind=\"incremental\"}} {}", s.syncs_incremental),
            ],
        );
        let mut hist = Vec::new();
        let mut cumulative = 0;
        for (i, bound) in SYNC_BUCKETS.iter().enumerate() {
            cumulative += s.sync_buckets[i];
            hist.push(format!("_bucket{{le=\"{bound}\"}} {cumulative}"));
        }
        cumulative += s.sync_buckets[SYNC_BUCKETS.len()];
        hist.push(format!("_bucket{{le=\"+Inf\"}} {cumulative}"));
        hist.push(format!("_sum {}", s.sync_sum));
        hist.push(format!("_count {cumulative}"));
        section(
            "ferrox_sync_duration_seconds",
            "histogram",
            "Time a service sync took: table update and map writes (kube-proxy: sync_proxy_rules_duration_seconds).",
            hist,
        );
        section(
            "ferrox_sync_last_duration_seconds",
            "gauge",
            "Time the last service sync took.",
            vec![format!(" {}", s.last_sync_seconds)],
        );
        section(
            "ferrox_sync_failures_total",
            "counter",
            "Entries a sync could not program (they keep their previous state), by reason; map-full means a datapath map is at capacity.",
            vec![
                format!("{{reason=\"map-full\"}} {}", s.failures_map_full),
                format!("{{reason=\"other\"}} {}", s.failures_other),
            ],
        );
        section(
            "ferrox_sync_failing_entries",
            "gauge",
            "Entries the last sync could not program; the agent retries them (1 s, doubling to 60 s) until none fails.",
            vec![format!(" {}", s.failing_entries)],
        );
        section(
            "ferrox_map_operations_total",
            "counter",
            "Service map writes and deletes made by syncs.",
            vec![
                format!("{{op=\"write\"}} {}", s.writes),
                format!("{{op=\"delete\"}} {}", s.deletes),
            ],
        );
        section(
            "ferrox_programmed",
            "gauge",
            "Objects programmed in the datapath after the last sync.",
            vec![
                format!("{{object=\"frontend\"}} {}", s.frontends),
                format!("{{object=\"backend\"}} {}", s.backends),
                format!("{{object=\"maglev-table\"}} {}", s.maglev_tables),
                format!("{{object=\"source-range\"}} {}", s.source_ranges),
            ],
        );
        section(
            "ferrox_services_skipped",
            "gauge",
            "Service ports not programmed (another proxy, ExternalName, headless, SCTP, invalid), as of the last sync.",
            vec![format!(" {}", s.skipped)],
        );
        section(
            "ferrox_conntrack_entries",
            "gauge",
            "Conntrack entries after the last collection.",
            vec![format!(" {}", s.ct_entries)],
        );
        section(
            "ferrox_conntrack_removed_total",
            "counter",
            "Conntrack entries removed, by cause.",
            vec![
                format!("{{cause=\"expired\"}} {}", s.ct_gc_removed),
                format!("{{cause=\"backend-gone\"}} {}", s.flows_purged),
            ],
        );
        if let Some(speaker) = &bgp {
            let peers = speaker.peers();
            section(
                "ferrox_bgp_session_up",
                "gauge",
                "1 while the BGP session with the peer is established.",
                peers
                    .iter()
                    .map(|p| {
                        format!(
                            "{{peer=\"{}\",name=\"{}\"}} {}",
                            p.addr,
                            p.name,
                            u8::from(p.state == "established")
                        )
                    })
                    .collect(),
            );
            section(
                "ferrox_bgp_received_prefixes",
                "gauge",
                "Prefixes received from the peer (in the RIB).",
                peers
                    .iter()
                    .map(|p| format!("{{peer=\"{}\"}} {}", p.addr, p.received))
                    .collect(),
            );
            section(
                "ferrox_bgp_max_prefixes",
                "gauge",
                "The most prefixes the peer may announce (peers with a limit only).",
                peers
                    .iter()
                    .filter_map(|p| Some(format!("{{peer=\"{}\"}} {}", p.addr, p.max_prefixes?)))
                    .collect(),
            );
            section(
                "ferrox_bgp_max_prefixes_exceeded_total",
                "counter",
                "Sessions ended with a Cease because the peer announced more prefixes than its limit.",
                peers
                    .iter()
                    .map(|p| format!("{{peer=\"{}\"}} {}", p.addr, p.max_prefixes_exceeded))
                    .collect(),
            );
            section(
                "ferrox_bgp_hold_time_seconds",
                "gauge",
                "The session's hold time in force (the smaller of the configured and the peer's offer; 0: none).",
                peers
                    .iter()
                    .filter(|p| p.router_id.is_some())
                    .map(|p| format!("{{peer=\"{}\"}} {}", p.addr, p.hold_time))
                    .collect(),
            );
        }
        if let Some(r) = &s.routing {
            section(
                "ferrox_routes",
                "gauge",
                "Routes to other nodes' pod blocks, by how they are reached, as of the last apply.",
                vec![
                    format!("{{via=\"direct\"}} {}", r.routes - r.tunnels),
                    format!("{{via=\"ipip\"}} {}", r.tunnels),
                ],
            );
            section(
                "ferrox_routes_unroutable",
                "gauge",
                "Pod blocks that cannot be routed (no route to their node, overlap with this node's blocks).",
                vec![format!(" {}", r.unroutable.len())],
            );
            section(
                "ferrox_route_applies_total",
                "counter",
                "Times routing was programmed, by result.",
                vec![
                    format!(
                        "{{result=\"ok\"}} {}",
                        s.routing_applies - s.routing_failures
                    ),
                    format!("{{result=\"error\"}} {}", s.routing_failures),
                ],
            );
        }
        section(
            "ferrox_udp_sockets_closed_total",
            "counter",
            "Connected UDP sockets of this node's clients closed because their Service backend left.",
            vec![format!(" {}", s.sockets_closed)],
        );
        let mut packets = Vec::new();
        let mut bytes = Vec::new();
        for c in counters {
            let labels = format!(
                "{{hook=\"{}\",verdict=\"{}\",reason=\"{}\"}}",
                c.hook, c.verdict, c.reason
            );
            packets.push(format!("{labels} {}", c.packets));
            bytes.push(format!("{labels} {}", c.bytes));
        }
        section(
            "ferrox_datapath_packets_total",
            "counter",
            "Packets (or socket calls) each program handled, by hook, verdict and reason; every drop has its reason.",
            packets,
        );
        section(
            "ferrox_datapath_bytes_total",
            "counter",
            "Bytes each program handled, by hook, verdict and reason.",
            bytes,
        );
        text
    }

    /// Serves `/metrics` on `addr` until the task is dropped.
    /// The node's fill levels, IPAM use and CNI readiness (from what `ferrox status` reads).
    fn render_node(status: &super::status::Status, cni_ready: bool) -> String {
        let mut text = String::new();
        let mut section = |name: &str, kind: &str, help: &str, samples: Vec<String>| {
            family(&mut text, name, kind, help, samples);
        };
        section(
            "ferrox_map_entries",
            "gauge",
            "Entries in each pinned map.",
            status
                .maps
                .iter()
                .map(|m| format!("{{map=\"{}\"}} {}", m.name, m.entries))
                .collect(),
        );
        section(
            "ferrox_map_capacity",
            "gauge",
            "Capacity (max entries) of each pinned map.",
            status
                .maps
                .iter()
                .map(|m| format!("{{map=\"{}\"}} {}", m.name, m.capacity))
                .collect(),
        );
        if let Some(i) = &status.ipam {
            section(
                "ferrox_ipam_addresses",
                "gauge",
                "Pod addresses of this node's blocks, in use and in all.",
                vec![
                    format!("{{state=\"used\"}} {}", i.used),
                    format!("{{state=\"capacity\"}} {}", i.capacity),
                ],
            );
            section(
                "ferrox_ipam_blocks",
                "gauge",
                "Address blocks this node allocates pod addresses from.",
                vec![format!(" {}", i.blocks.len())],
            );
            section(
                "ferrox_ipam_unreadable_records",
                "gauge",
                "Files of the IPAM store that are not readable allocation records (set aside; their addresses stay out of use).",
                vec![format!(" {}", i.unreadable_records)],
            );
        }
        section(
            "ferrox_cni_ready",
            "gauge",
            "1 when the node configuration the CNI plugin reads is in place (pods can start).",
            vec![format!(" {}", u8::from(cni_ready))],
        );
        text
    }

    pub async fn serve(
        self,
        addr: std::net::SocketAddr,
        layout: PinLayout,
        node_config: std::path::PathBuf,
    ) {
        let counters = match ferrox_datapath::Maps::open(&layout) {
            Ok(m) => Some(m.counters),
            Err(e) => {
                tracing::warn!(error = %e, "/metrics without datapath counters");
                None
            }
        };
        let counters = Arc::new(counters);
        let me = self;
        super::http::serve_text(addr, "/metrics", move || {
            let rows = counters
                .as_ref()
                .as_ref()
                .and_then(|c| c.snapshot().ok())
                .unwrap_or_default();
            // Only the node's part (maps, IPAM) is rendered: no need to build the agent's own
            // status (with every BGP route) on each scrape.
            let status = super::status::collect_with(&layout, &node_config, None);
            let cni_ready = ferrox_cni::node_config::NodeConfig::read(&node_config).is_ok();
            me.render(&rows) + &Self::render_node(&status, cni_ready)
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "tests: a failure should stop the test with its context"
    )]

    use super::*;

    /// A minimal check of the exposition format: every sample line is `name{labels} value`
    /// with a number, every family has HELP and TYPE before its samples.
    fn parse(text: &str) -> Vec<(String, f64)> {
        let mut typed = std::collections::BTreeSet::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split_whitespace().next().unwrap().to_owned());
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            let name = series.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
                .unwrap_or(name);
            assert!(typed.contains(family), "{name} has no TYPE line before it");
            samples.push((series.to_owned(), value.parse::<f64>().unwrap()));
        }
        samples
    }

    fn value(samples: &[(String, f64)], series: &str) -> f64 {
        samples
            .iter()
            .find(|(s, _)| s == series)
            .unwrap_or_else(|| panic!("no {series}"))
            .1
    }

    #[test]
    fn syncs_failures_and_counters_render_as_prometheus_text() {
        let m = Metrics::default();
        let mut report = ServiceSync {
            full: true,
            seconds: 0.2,
            frontends: 4,
            backends: 7,
            writes: 10,
            skipped: 1,
            ..Default::default()
        };
        m.sync(&report);
        report.full = false;
        report.seconds = 0.003;
        report.failures_map_full = 1;
        m.sync(&report);
        m.conntrack_gc(5, 20);
        let text = m.render(&[CounterRow {
            hook: "tc-uplink-ingress",
            verdict: "drop",
            reason: "source-range-denied",
            packets: 3,
            bytes: 180,
        }]);
        let s = parse(&text);
        assert_eq!(value(&s, "ferrox_sync_total{kind=\"full\"}"), 1.0);
        assert_eq!(value(&s, "ferrox_sync_total{kind=\"incremental\"}"), 1.0);
        assert_eq!(
            value(&s, "ferrox_sync_duration_seconds_bucket{le=\"0.005\"}"),
            1.0
        );
        assert_eq!(
            value(&s, "ferrox_sync_duration_seconds_bucket{le=\"0.25\"}"),
            2.0
        );
        assert_eq!(
            value(&s, "ferrox_sync_duration_seconds_bucket{le=\"+Inf\"}"),
            2.0
        );
        assert_eq!(value(&s, "ferrox_sync_duration_seconds_count"), 2.0);
        assert_eq!(
            value(&s, "ferrox_sync_failures_total{reason=\"map-full\"}"),
            1.0
        );
        assert_eq!(value(&s, "ferrox_programmed{object=\"backend\"}"), 7.0);
        assert_eq!(value(&s, "ferrox_map_operations_total{op=\"write\"}"), 20.0);
        assert_eq!(value(&s, "ferrox_conntrack_entries"), 20.0);
        assert_eq!(
            value(
                &s,
                "ferrox_datapath_packets_total{hook=\"tc-uplink-ingress\",verdict=\"drop\",reason=\"source-range-denied\"}"
            ),
            3.0
        );
    }
}

#[cfg(test)]
mod status_tests {
    #[test]
    fn the_status_with_bgp_round_trips_through_json() {
        let st = super::AgentStatus {
            bgp_peers: Some(vec![crate::bgp::speaker::PeerStatus::default()]),
            bgp_routes: Some(vec![]),
            ..Default::default()
        };
        let text = serde_json::to_string(&st).unwrap();
        let back: super::AgentStatus = serde_json::from_str(&text).unwrap();
        assert_eq!(back, st);
    }
}
