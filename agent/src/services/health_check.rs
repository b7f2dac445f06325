//! healthCheckNodePort servers: one per `healthCheckNodePort` of an externalTrafficPolicy Local
//! load balancer Service, answering 200 with the count of this node's endpoints of that Service
//! (503 when it has none, in kube-proxy's shape), so the load balancer sends traffic only to
//! nodes that can serve it. The sync keeps the set of servers equal to the desired table's.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{info, warn};

use super::model::HealthCheck;
use crate::observability::http::{Answer, JSON, serve};

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
    checks: BTreeMap<u16, HealthCheck>,
    servers: BTreeMap<u16, JoinHandle<()>>,
}

/// The healthCheckNodePort servers and the counts they report.
#[derive(Clone, Default)]
pub struct HealthChecks {
    state: Arc<Mutex<State>>,
}

impl HealthChecks {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
