//! `/healthz` (default `0.0.0.0:10256`, kube-proxy's port), which load balancers and
//! kubelet-style probes use: 200 while the service maps are in sync with the API, 503 before
//! the first sync or when a change from the API has waited longer than the staleness limit (as
//! kube-proxy: a quiet cluster with no changes stays healthy). The answer is a pure function of
//! the state; [`super::http`] serves it.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use tokio::net::TcpListener;
use tracing::{info, warn};

use super::http::{Answer, JSON, serve};

/// How old the last successful sync may be before `/healthz` reports unhealthy.
pub const STALE_AFTER: Duration = Duration::from_secs(120);

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

#[derive(Default)]
struct State {
    last_sync: Option<(Instant, SystemTime)>,
    /// When the oldest change not synced yet arrived.
    pending: Option<Instant>,
}

/// The sync state `/healthz` reports, shared by the sync loop and the server.
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
}
