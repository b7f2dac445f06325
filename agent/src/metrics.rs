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

use crate::services::reconcile::SyncReport;

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

/// Routing between nodes, as of the last time the agent programmed it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoutingStatus {
    /// never, always or cross-subnet.
    pub mode: String,
    /// Where the routes come from (kubernetes: Node podCIDRs and IPAM blocks).
    pub source: String,
    /// Kernel routes to other nodes' pod blocks.
    pub routes: usize,
    /// Of those, the ones reached in IP-in-IP.
    pub tunnels: usize,
    /// Other nodes, the only sources of IP-in-IP accepted.
    pub peers: usize,
    /// Blocks that cannot be routed, with the reason ("10.244.3.0/24 (node-3): no route to ...").
    pub unroutable: Vec<String>,
    /// Unix seconds of the last apply.
    pub applied_unix: Option<u64>,
    /// The last failure, if the last apply failed.
    pub error: Option<String>,
}

/// What only the agent knows about itself, as `ferrox status` gets it over the agent's socket.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AgentStatus {
    pub pid: u32,
    pub last_sync_unix: Option<u64>,
    pub last_sync_seconds: f64,
    pub syncs_full: u64,
    pub syncs_incremental: u64,
    pub failures_map_full: u64,
    pub failures_other: u64,
    pub frontends: usize,
    pub backends: usize,
    pub maglev_tables: usize,
    pub source_ranges: usize,
    pub services_skipped: usize,
    pub conntrack_expired: u64,
    pub flows_purged: u64,
    pub sockets_closed: u64,
    #[serde(default)]
    pub routing: Option<RoutingStatus>,
    /// BGP sessions, when the speaker runs.
    #[serde(default)]
    pub bgp_peers: Option<Vec<crate::bgp::speaker::PeerStatus>>,
    /// Best BGP routes, when the speaker runs.
    #[serde(default)]
    pub bgp_routes: Option<Vec<crate::bgp::speaker::LearnedRoute>>,
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
    pub fn sync(&self, report: &SyncReport, full: bool, skipped: usize, seconds: f64) {
        let mut s = self.lock();
        if full {
            s.syncs_full += 1;
        } else {
            s.syncs_incremental += 1;
        }
        let bucket = SYNC_BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(SYNC_BUCKETS.len());
        s.sync_buckets[bucket] += 1;
        s.sync_sum += seconds;
        s.last_sync_seconds = seconds;
        for f in &report.failures {
            if f.map_full {
                s.failures_map_full += 1;
            } else {
                s.failures_other += 1;
            }
        }
        s.frontends = report.frontends;
        s.backends = report.backends;
        s.maglev_tables = report.maglev_tables;
        s.source_ranges = report.source_ranges;
        s.skipped = skipped;
        s.writes += report.writes as u64;
        s.deletes += report.deletes as u64;
        s.flows_purged += report.flows_purged as u64;
        s.last_sync_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs());
        s.sockets_closed += report.sockets_closed as u64;
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

    /// Answers every connection on the unix socket `path` (owner-only) with the agent's status
    /// as one JSON document, until the task is dropped.
    pub async fn serve_status(self, path: std::path::PathBuf) {
        use std::os::unix::fs::PermissionsExt as _;
        use tokio::io::AsyncWriteExt as _;
        let _ = std::fs::remove_file(&path);
        let listener = match tokio::net::UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot serve the status socket");
                return;
            }
        };
        if let Err(e) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)) {
            tracing::warn!(path = %path.display(), error = %e, "cannot restrict the status socket");
        }
        tracing::info!(path = %path.display(), "serving the status socket");
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                continue;
            };
            let body = serde_json::to_vec(&self.status()).unwrap_or_default();
            tokio::spawn(async move {
                let _ = conn.write_all(&body).await;
                let _ = conn.shutdown().await;
            });
        }
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
    fn render_node(status: &crate::status::Status, cni_ready: bool) -> String {
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
        crate::health::serve_text(addr, "/metrics", move || {
            let rows = counters
                .as_ref()
                .as_ref()
                .and_then(|c| c.snapshot().ok())
                .unwrap_or_default();
            // Only the node's part (maps, IPAM) is rendered: no need to build the agent's own
            // status (with every BGP route) on each scrape.
            let status = crate::status::collect_with(&layout, &node_config, None);
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
    use crate::services::reconcile::Failure;

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
        let mut report = SyncReport {
            frontends: 4,
            backends: 7,
            writes: 10,
            ..Default::default()
        };
        m.sync(&report, true, 1, 0.2);
        report.failures.push(Failure {
            frontend: "10.96.0.1:80/TCP".into(),
            error: "SVC_V1 is full".into(),
            map_full: true,
        });
        m.sync(&report, false, 1, 0.003);
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
