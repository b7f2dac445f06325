//! Deleting a pod as Kubernetes does, step by step, so a test can look at each state: the API
//! marks the Pod terminating and keeps it; the EndpointSlice controller turns its endpoint into
//! `ready: false, serving: true, terminating: true` in every slice that holds it; the readiness
//! probe fails while the pod shuts down (`serving: false`); the containers stop, the runtime
//! runs CNI DEL, the kubelet deletes the Pod for good and the controller removes the endpoint.
//!
//! Owns only the order and the shapes of those writes; the slices are edited with
//! [`super::endpoint_slices`], whoever wrote them (the realistic generator or a test's own
//! `slice(...)` fixture), found by the pod's address.

use std::time::Duration;

use k8s_openapi::api::{core::v1::Pod as K8sPod, discovery::v1::EndpointSlice};

use super::{
    cluster::{Cluster, Pod},
    endpoint_slices::{self, Conditions},
};

/// A pod being deleted; see the module documentation. Dropping it leaves the pod terminating.
pub struct PodDeletion<'a> {
    cluster: &'a Cluster,
    pod: Pod,
}

impl Cluster {
    /// Starts deleting `pod` with `grace` as its grace period: the Pod object stays, with
    /// `deletionTimestamp` and `deletionGracePeriodSeconds`, and its endpoint in every slice
    /// becomes `ready: false, serving: true, terminating: true` (still passing its readiness
    /// probe). The pod's processes keep running: the test stops them when it wants.
    pub fn delete_pod(&self, pod: &Pod, grace: Duration) -> PodDeletion<'_> {
        let marked: K8sPod = self
            .api()
            .delete_gracefully(Some("default"), &pod.name, grace)
            .expect("the pod exists in the API");
        assert!(
            marked.metadata.deletion_timestamp.is_some(),
            "a pod on a node is deleted gracefully"
        );
        let deletion = PodDeletion {
            cluster: self,
            pod: pod.clone(),
        };
        deletion.set_conditions(Conditions::TERMINATING_SERVING);
        deletion
    }
}

impl PodDeletion<'_> {
    /// The pod fails its readiness probe as it shuts down: `serving: false` in its slices.
    pub fn stop_serving(&self) {
        self.set_conditions(Conditions::TERMINATING);
    }

    /// The pod's containers stopped: CNI DEL as the runtime runs it, the kubelet's final
    /// delete (grace period 0: the Pod object goes), and the endpoint leaves its slices.
    pub fn finish(self) {
        let out = self.cluster.cni_del(&self.pod);
        assert!(
            out.status.success(),
            "CNI DEL of {}: {}",
            self.pod.name,
            String::from_utf8_lossy(&out.stdout)
        );
        self.cluster
            .api()
            .delete::<K8sPod>(Some("default"), &self.pod.name)
            .expect("the terminating pod is still in the API");
        for slice in endpoint_slices::without(&self.slices(), self.pod.ip) {
            self.cluster
                .api()
                .replace(&slice)
                .expect("replacing a slice the harness just read");
        }
    }

    fn slices(&self) -> Vec<EndpointSlice> {
        self.cluster.api().list::<EndpointSlice>()
    }

    fn set_conditions(&self, conditions: Conditions) {
        let changed = endpoint_slices::with_conditions(&self.slices(), self.pod.ip, conditions);
        for slice in changed {
            self.cluster
                .api()
                .replace(&slice)
                .expect("replacing a slice the harness just read");
        }
    }
}
