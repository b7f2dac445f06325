//! Health endpoints load balancers and kubelet-style probes use, as kube-proxy serves them:
//!
//! - `/healthz` (default `0.0.0.0:10256`): 200 while the service maps are in sync with the API,
//!   503 before the first sync or when a change from the API has waited longer than the
//!   staleness limit (as kube-proxy: a quiet cluster with no changes stays healthy).
//! - one server per `healthCheckNodePort` of an externalTrafficPolicy Local load balancer:
//!   200 with the count of this node's endpoints of that Service, 503 when it has none, so the
//!   load balancer sends traffic only to nodes that can serve it.
//!
//! The responses are pure functions of the state; the HTTP shell is a few lines on tokio that
//! answers one request per connection (all a probe needs).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    task::JoinHandle,
};
use tracing::{info, warn};

use crate::services::model::HealthCheck;

/// How old the last successful sync may be before `/healthz` reports unhealthy.
pub const STALE_AFTER: Duration = Duration::from_secs(120);

/// An HTTP answer: status code and JSON body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// `/healthz`: healthy once a sync finished and no change has waited longer than
/// [`STALE_AFTER`] for the next one (`pending`: when the oldest unsynced change arrived).
pub fn healthz(
    last_sync: Option<(Instant, SystemTime)>,
    pending: Option<Instant>,
    now: Instant,
) -> Answer {
    let fmt = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
    let waiting_too_long = pending.is_some_and(|p| now.saturating_duration_since(p) > STALE_AFTER);
    match last_sync {
        Some((_, wall)) if !waiting_too_long => Answer {
            status: 200,
            body: serde_json::json!({ "healthy": true, "lastUpdated": fmt(wall) }).to_string(),
        },
        Some((_, wall)) => Answer {
            status: 503,
            body: serde_json::json!({ "healthy": false, "lastUpdated": fmt(wall), "reason": "changes from the API have waited too long for a sync" }).to_string(),
        },
        None => Answer {
            status: 503,
            body: serde_json::json!({ "healthy": false, "reason": "the service maps have not been synced yet" }).to_string(),
        },
    }
}

/// A healthCheckNodePort answer, in kube-proxy's shape.
pub fn service_health(check: &HealthCheck) -> Answer {
    Answer {
        status: if check.local_endpoints > 0 { 200 } else { 503 },
        body: serde_json::json!({
            "service": { "namespace": check.namespace, "name": check.name },
            "localEndpoints": check.local_endpoints,
            "serviceProxyHealthy": true,
        })
        .to_string(),
    }
}

#[derive(Default)]
struct State {
    last_sync: Option<(Instant, SystemTime)>,
    /// When the oldest change not synced yet arrived.
    pending: Option<Instant>,
    checks: BTreeMap<u16, HealthCheck>,
    servers: BTreeMap<u16, JoinHandle<()>>,
}

/// The health state shared by the sync loop and the servers.
#[derive(Clone, Default)]
pub struct Health {
    state: Arc<Mutex<State>>,
}

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a completed sync.
    pub fn synced(&self) {
        let mut st = self.lock();
        st.last_sync = Some((Instant::now(), SystemTime::now()));
        st.pending = None;
    }

    /// Records that a change arrived from the API (the next sync takes it).
    pub fn queued(&self) {
        self.lock().pending.get_or_insert_with(Instant::now);
    }

    /// Makes the set of healthCheckNodePort servers equal to `checks`: starts servers for new
    /// ports, stops the ones no Service needs, and updates the counts the others report.
    pub fn set_checks(&self, checks: &BTreeMap<u16, HealthCheck>) {
        let mut st = self.lock();
        st.checks = checks.clone();
        let stale: Vec<u16> = st
            .servers
            .keys()
            .filter(|p| !checks.contains_key(p))
            .copied()
            .collect();
        for port in stale {
            if let Some(h) = st.servers.remove(&port) {
                h.abort();
                info!(port, "stopped healthCheckNodePort server");
            }
        }
        for port in checks.keys() {
            if st.servers.contains_key(port) {
                continue;
            }
            let me = self.clone();
            let port = *port;
            st.servers.insert(
                port,
                tokio::spawn(async move { me.serve_check(port).await }),
            );
        }
    }

    async fn serve_check(self, port: u16) {
        let addr = SocketAddr::from(([0, 0, 0, 0], port));
        let listener = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                warn!(port, error = %e, "cannot serve healthCheckNodePort; load balancers will see this node as down");
                return;
            }
        };
        info!(port, "serving healthCheckNodePort");
        let answer = move |_path: &str| {
            let st = self.lock();
            match st.checks.get(&port) {
                Some(c) => service_health(c),
                None => Answer {
                    status: 503,
                    body: "{}".into(),
                },
            }
        };
        serve(listener, JSON, answer).await;
    }

    /// Serves `/healthz` on `addr` until the task is dropped.
    pub async fn serve_healthz(self, addr: SocketAddr) {
        let listener = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                warn!(%addr, error = %e, "cannot serve /healthz");
                return;
            }
        };
        info!(%addr, "serving /healthz");
        let answer = move |path: &str| match path {
            "/healthz" | "/livez" => {
                let st = self.lock();
                healthz(st.last_sync, st.pending, Instant::now())
            }
            _ => Answer {
                status: 404,
                body: "{}".into(),
            },
        };
        serve(listener, JSON, answer).await;
    }
}

const JSON: &str = "application/json";

/// Serves `render()` as plain text (the Prometheus exposition format) at `path` on `addr`, until
/// the task is dropped.
pub async fn serve_text(
    addr: SocketAddr,
    path: &'static str,
    render: impl Fn() -> String + Clone + Send + 'static,
) {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            warn!(%addr, error = %e, "cannot serve {path}");
            return;
        }
    };
    info!(%addr, "serving {path}");
    let answer = move |p: &str| {
        if p.split('?').next() == Some(path) {
            Answer {
                status: 200,
                body: render(),
            }
        } else {
            Answer {
                status: 404,
                body: String::new(),
            }
        }
    };
    serve(listener, "text/plain; version=0.0.4; charset=utf-8", answer).await;
}

/// Answers each connection's request (first line only) with `answer(path)`.
async fn serve(
    listener: TcpListener,
    content_type: &'static str,
    answer: impl Fn(&str) -> Answer + Clone + Send + 'static,
) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let mut n = 0;
            // Read until the end of the request head (or a full buffer: a probe is small).
            while n < buf.len() {
                match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf[n..])).await {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                    Ok(Ok(m)) => n += m,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let a = answer(path);
            let reason = match a.status {
                200 => "OK",
                404 => "Not Found",
                _ => "Service Unavailable",
            };
            let resp = format!(
                "HTTP/1.1 {} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                a.status,
                a.body.len(),
                a.body
            );
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_is_unhealthy_before_the_first_sync_and_when_a_change_waits_too_long() {
        let now = Instant::now();
        let wall = SystemTime::now();
        assert_eq!(healthz(None, None, now).status, 503);
        assert_eq!(healthz(Some((now, wall)), None, now).status, 200);
        // A quiet cluster: the last sync is old, nothing is waiting.
        let old = now
            .checked_sub(STALE_AFTER + Duration::from_secs(1))
            .unwrap();
        assert_eq!(healthz(Some((old, wall)), None, now).status, 200);
        // A change arrived a while ago and no sync has taken it.
        let a = healthz(Some((old, wall)), Some(old), now);
        assert_eq!(a.status, 503);
        assert!(a.body.contains("waited too long"), "{}", a.body);
        // A fresh change is fine.
        assert_eq!(healthz(Some((old, wall)), Some(now), now).status, 200);
    }

    #[test]
    fn service_health_reports_local_endpoints_in_kube_proxy_shape() {
        let check = HealthCheck {
            namespace: "default".into(),
            name: "lb".into(),
            local_endpoints: 2,
        };
        let a = service_health(&check);
        assert_eq!(a.status, 200);
        let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!(v["service"]["name"], "lb");
        assert_eq!(v["localEndpoints"], 2);
        let none = service_health(&HealthCheck {
            local_endpoints: 0,
            ..check
        });
        assert_eq!(none.status, 503);
    }
}
