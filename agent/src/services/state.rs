//! The API objects the agent sees and the desired service table derived from them, kept up to
//! date one Service at a time: an event about a Service or one of its EndpointSlices recomputes
//! that Service's frontends only (with [`desired`]), and [`ClusterState::update`] says which
//! entries of the table changed, so the reconciler looks at those and nothing else. A change of
//! the node (its addresses, its zone) or a relist of a kind recomputes everything.
//!
//! Two Services may claim the same frontend (an externalIP:port given to both): the Service
//! first in (namespace, name) order owns it, whatever order the events came in, so every node
//! and every restart decide the same way.
//!
//! Pure: no I/O, no clock; the watch shell in [`super::sync`] feeds it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::{
    desired::{SERVICE_NAME_LABEL, desired},
    model::{Desired, FrontendKey, FrontendSpec, HealthCheck, NodeInfo, ProxyOptions, Skipped},
};

/// A Service's namespace and name.
pub type ServiceId = (String, String);

/// What [`ClusterState::update`] changed in the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Everything may have changed: sync every entry.
    Full,
    /// Only these entries changed (possibly none).
    Entries(BTreeSet<FrontendKey>),
}

/// The frontend entries one Service produced.
type Part = Vec<FrontendKey>;

/// An API object kept as its (slimmed) JSON: a few hundred bytes where the decoded
/// k8s-openapi struct takes kilobytes (every optional field of a Service or an Endpoint is
/// inline). Decoded only when its Service is recomputed.
#[derive(Debug)]
struct Stored<K>(Box<[u8]>, std::marker::PhantomData<K>);

impl<K: serde::Serialize + serde::de::DeserializeOwned> Stored<K> {
    fn new(object: &K) -> Self {
        // Serializing a k8s-openapi object to a Vec cannot fail.
        Self(
            serde_json::to_vec(object)
                .unwrap_or_default()
                .into_boxed_slice(),
            std::marker::PhantomData,
        )
    }

    fn get(&self) -> Option<K> {
        serde_json::from_slice(&self.0)
            .inspect_err(|e| tracing::error!(error = %e, "a stored API object does not decode"))
            .ok()
    }
}

/// One Service's EndpointSlices by name, sorted (usually one or two: a map's node would be
/// mostly empty).
#[derive(Debug, Default)]
struct Slices(Vec<(String, Stored<EndpointSlice>)>);

impl Slices {
    fn insert(&mut self, name: String, slice: Stored<EndpointSlice>) {
        match self.0.binary_search_by(|(n, _)| n.cmp(&name)) {
            Ok(at) => self.0[at].1 = slice,
            Err(at) => {
                self.0.reserve_exact(1);
                self.0.insert(at, (name, slice));
            }
        }
    }

    fn remove(&mut self, name: &str) {
        self.0.retain(|(n, _)| n != name);
        self.0.shrink_to_fit();
    }
}

/// An object of a (re)list, stored as it arrives: the list of thousands of objects is never
/// held decoded.
#[derive(Debug)]
pub struct Listed<K> {
    id: (String, String),
    owner: Option<ServiceId>,
    stored: Stored<K>,
}

impl From<Service> for Listed<Service> {
    fn from(svc: Service) -> Self {
        Self {
            id: id_of(&svc.metadata),
            owner: None,
            stored: Stored::new(&svc),
        }
    }
}

impl From<EndpointSlice> for Listed<EndpointSlice> {
    fn from(slice: EndpointSlice) -> Self {
        Self {
            id: id_of(&slice.metadata),
            owner: owner_of(&slice),
            stored: Stored::new(&slice),
        }
    }
}

/// The Services claiming one frontend, ordered by Service (the first one owns it); almost
/// always one.
type Claims = Vec<(ServiceId, FrontendSpec)>;

/// The objects, and the table derived from them.
#[derive(Debug)]
pub struct ClusterState {
    services: HashMap<ServiceId, Stored<Service>>,
    /// Service -> its EndpointSlices by name.
    slices: HashMap<ServiceId, Slices>,
    /// EndpointSlice (namespace, name) -> the Service it belonged to when last seen.
    slice_owner: HashMap<(String, String), ServiceId>,
    node: NodeInfo,
    options: ProxyOptions,
    /// Services to recompute at the next update.
    dirty: BTreeSet<ServiceId>,
    /// Recompute everything at the next update.
    full: bool,
    parts: HashMap<ServiceId, Part>,
    /// Frontend entry -> every Service that produces it, with its spec.
    claims: BTreeMap<FrontendKey, Claims>,
    /// Services with skipped ports (most have none).
    skipped: BTreeMap<ServiceId, Vec<Skipped>>,
    /// healthCheckNodePort -> every Service that asks for it.
    health_claims: BTreeMap<u16, BTreeMap<ServiceId, HealthCheck>>,
    /// The table's reports (skipped, health checks) need rebuilding.
    reports_stale: bool,
    table: Desired,
}

fn id_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// The Service an EndpointSlice belongs to, from its label.
fn owner_of(slice: &EndpointSlice) -> Option<ServiceId> {
    let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((
        slice.metadata.namespace.clone().unwrap_or_default(),
        service.clone(),
    ))
}

impl ClusterState {
    /// An empty state for `node`; the first update is a full one.
    pub fn new(node: NodeInfo, options: ProxyOptions) -> Self {
        Self {
            services: HashMap::new(),
            slices: HashMap::new(),
            slice_owner: HashMap::new(),
            node,
            options,
            dirty: BTreeSet::new(),
            full: true,
            parts: HashMap::new(),
            claims: BTreeMap::new(),
            skipped: BTreeMap::new(),
            health_claims: BTreeMap::new(),
            reports_stale: false,
            table: Desired::default(),
        }
    }

    /// The desired table as of the last [`Self::update`].
    pub fn table(&self) -> &Desired {
        &self.table
    }

    /// How many Services and EndpointSlices are known.
    pub fn counts(&self) -> (usize, usize) {
        (
            self.services.len(),
            self.slices.values().map(|s| s.0.len()).sum(),
        )
    }

    pub fn apply_service(&mut self, svc: Service) {
        let id = id_of(&svc.metadata);
        self.services.insert(id.clone(), Stored::new(&svc));
        self.dirty.insert(id);
    }

    pub fn delete_service(&mut self, svc: &Service) {
        let id = id_of(&svc.metadata);
        self.services.remove(&id);
        self.dirty.insert(id);
    }

    /// Every Service, after a (re)list.
    pub fn replace_services(&mut self, all: impl IntoIterator<Item = impl Into<Listed<Service>>>) {
        self.services = all
            .into_iter()
            .map(|s| {
                let l = s.into();
                (l.id, l.stored)
            })
            .collect();
        self.full = true;
    }

    pub fn apply_slice(&mut self, slice: EndpointSlice) {
        let name = id_of(&slice.metadata);
        self.forget_slice(&name);
        if let Some(owner) = owner_of(&slice) {
            self.slices
                .entry(owner.clone())
                .or_default()
                .insert(name.1.clone(), Stored::new(&slice));
            self.slice_owner.insert(name, owner.clone());
            self.dirty.insert(owner);
        }
    }

    pub fn delete_slice(&mut self, slice: &EndpointSlice) {
        self.forget_slice(&id_of(&slice.metadata));
    }

    /// Every EndpointSlice, after a (re)list.
    pub fn replace_slices(
        &mut self,
        all: impl IntoIterator<Item = impl Into<Listed<EndpointSlice>>>,
    ) {
        self.slices.clear();
        self.slice_owner.clear();
        for slice in all {
            let Listed { id, owner, stored } = slice.into();
            if let Some(owner) = owner {
                self.slices
                    .entry(owner.clone())
                    .or_default()
                    .insert(id.1.clone(), stored);
                self.slice_owner.insert(id, owner);
            }
        }
        self.full = true;
    }

    fn forget_slice(&mut self, name: &(String, String)) {
        if let Some(owner) = self.slice_owner.remove(name) {
            if let Some(by_name) = self.slices.get_mut(&owner) {
                by_name.remove(&name.1);
                if by_name.0.is_empty() {
                    self.slices.remove(&owner);
                }
            }
            self.dirty.insert(owner);
        }
    }

    /// The node's facts; a change recomputes everything.
    pub fn set_node(&mut self, node: NodeInfo) {
        if node != self.node {
            self.node = node;
            self.full = true;
        }
    }

    /// Recomputes what changed since the last update; `None` when nothing did.
    pub fn update(&mut self) -> Option<Change> {
        if self.full {
            self.full = false;
            self.dirty.clear();
            self.parts.clear();
            self.claims.clear();
            self.skipped.clear();
            self.health_claims.clear();
            self.table.frontends.clear();
            let ids: Vec<ServiceId> = self.services.keys().cloned().collect();
            for id in ids {
                self.recompute(&id, &mut BTreeSet::new());
            }
            self.reports_stale = true;
            let frontends: Vec<(FrontendKey, FrontendSpec)> = self
                .claims
                .iter()
                .filter_map(|(k, c)| c.first().map(|(_, s)| (*k, s.clone())))
                .collect();
            self.table.frontends = frontends.into_iter().collect();
            self.rebuild_reports();
            return Some(Change::Full);
        }
        if self.dirty.is_empty() {
            return None;
        }
        let mut touched = BTreeSet::new();
        for id in std::mem::take(&mut self.dirty) {
            self.recompute(&id, &mut touched);
        }
        let mut changed = BTreeSet::new();
        for key in touched {
            let now = self
                .claims
                .get(&key)
                .and_then(|c| c.first())
                .map(|(_, s)| s);
            if self.table.frontends.get(&key) != now {
                match now {
                    Some(spec) => self.table.frontends.insert(key, spec.clone()),
                    None => self.table.frontends.remove(&key),
                };
                changed.insert(key);
            }
        }
        self.rebuild_reports();
        Some(Change::Entries(changed))
    }

    /// Recomputes one Service's part; adds the entries it produced before or produces now to
    /// `touched`.
    fn recompute(&mut self, id: &ServiceId, touched: &mut BTreeSet<FrontendKey>) {
        if self.skipped.remove(id).is_some() {
            self.reports_stale = true;
        }
        for claims in self.health_claims.values_mut() {
            if claims.remove(id).is_some() {
                self.reports_stale = true;
            }
        }
        self.health_claims.retain(|_, c| !c.is_empty());
        if let Some(old) = self.parts.remove(id) {
            for key in old {
                if let Some(c) = self.claims.get_mut(&key) {
                    c.retain(|(owner, _)| owner != id);
                    if c.is_empty() {
                        self.claims.remove(&key);
                    }
                }
                touched.insert(key);
            }
        }
        let Some(svc) = self.services.get(id).and_then(Stored::get) else {
            return;
        };
        let slices: Vec<EndpointSlice> = self
            .slices
            .get(id)
            .into_iter()
            .flat_map(|s| s.0.iter())
            .filter_map(|(_, s)| s.get())
            .collect();
        let d = desired([&svc], &slices, &self.node, &self.options);
        if !d.skipped.is_empty() {
            self.skipped.insert(id.clone(), d.skipped);
            self.reports_stale = true;
        }
        for (port, hc) in d.health_checks {
            self.health_claims
                .entry(port)
                .or_default()
                .insert(id.clone(), hc);
            self.reports_stale = true;
        }
        let mut part = Part::with_capacity(d.frontends.len());
        for (key, spec) in d.frontends {
            let claims = self.claims.entry(key).or_default();
            let at = claims.partition_point(|(owner, _)| owner < id);
            // Exactly: a frontend has one claim almost always (push would reserve four).
            claims.reserve_exact(1);
            claims.insert(at, (id.clone(), spec));
            part.push(key);
            touched.insert(key);
        }
        self.parts.insert(id.clone(), part);
    }

    /// The table's skipped Services and health checks (the first Service's, when several ask
    /// for one port), when a recomputed Service had or has some.
    fn rebuild_reports(&mut self) {
        if !std::mem::take(&mut self.reports_stale) {
            return;
        }
        self.table.skipped = self.skipped.values().flatten().cloned().collect();
        self.table.health_checks = self
            .health_claims
            .iter()
            .filter_map(|(port, c)| c.values().next().map(|hc| (*port, hc.clone())))
            .collect();
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "tests: a failure should stop the test with its context"
    )]

    use super::*;
    use crate::services::testing::{slice, svc};

    fn node() -> NodeInfo {
        NodeInfo {
            name: "node-1".into(),
            addresses: vec!["198.18.0.11".parse().unwrap()],
            zone: None,
        }
    }

    /// The table [`desired`] computes from scratch over the same objects.
    fn from_scratch(services: &[&Service], slices: &[&EndpointSlice]) -> Desired {
        desired(
            services.iter().copied(),
            slices.iter().copied(),
            &node(),
            &ProxyOptions::default(),
        )
    }

    fn keys(d: &Desired) -> BTreeSet<String> {
        d.frontends.keys().map(ToString::to_string).collect()
    }

    #[test]
    fn the_first_update_is_full_then_only_what_changed() {
        let mut st = ClusterState::new(node(), ProxyOptions::default());
        let a = svc("a").cluster_ip("10.96.0.1").port("", 80, "TCP").build();
        let b = svc("b")
            .node_port_type()
            .cluster_ip("10.96.0.2")
            .port_np("", 80, 30002, "TCP")
            .build();
        let sa = slice("a", "a-1")
            .port("", 8080, "TCP")
            .ready("10.244.1.5")
            .build();
        st.replace_services([a.clone(), b.clone()]);
        st.replace_slices([sa.clone()]);
        assert_eq!(st.update(), Some(Change::Full));
        assert_eq!(st.table(), &from_scratch(&[&a, &b], &[&sa]));
        assert_eq!(st.update(), None, "nothing happened since");

        // An endpoint of b appears: b's entries change, a's do not.
        let sb = slice("b", "b-1")
            .port("", 8080, "TCP")
            .ready("10.244.1.6")
            .build();
        st.apply_slice(sb.clone());
        let Some(Change::Entries(changed)) = st.update() else {
            panic!("an incremental change")
        };
        let names: BTreeSet<String> = changed.iter().map(ToString::to_string).collect();
        assert_eq!(
            names,
            BTreeSet::from([
                "10.96.0.2:80/TCP".to_owned(),
                "127.0.0.1:30002/TCP".to_owned(),
                "198.18.0.11:30002/TCP".to_owned(),
                "198.18.0.11:30002/TCP (external)".to_owned(),
            ])
        );
        assert_eq!(st.table(), &from_scratch(&[&a, &b], &[&sa, &sb]));

        // The same object again changes nothing.
        st.apply_slice(sb.clone());
        assert_eq!(st.update(), Some(Change::Entries(BTreeSet::new())));

        // a goes: its entry goes; its slice stays known but produces nothing.
        st.delete_service(&a);
        let Some(Change::Entries(changed)) = st.update() else {
            panic!("an incremental change")
        };
        assert_eq!(changed.len(), 1);
        assert_eq!(st.table(), &from_scratch(&[&b], &[&sa, &sb]));
        assert_eq!(st.counts(), (1, 2));
        // Its slice goes too.
        st.delete_slice(&sa);
        assert_eq!(st.update(), Some(Change::Entries(BTreeSet::new())));
        assert_eq!(st.counts(), (1, 1));
    }

    #[test]
    fn a_node_change_recomputes_everything() {
        let mut st = ClusterState::new(node(), ProxyOptions::default());
        let b = svc("b")
            .node_port_type()
            .cluster_ip("10.96.0.2")
            .port_np("", 80, 30002, "TCP")
            .build();
        st.replace_services([b]);
        st.replace_slices(Vec::<EndpointSlice>::new());
        st.update();
        st.set_node(node());
        assert_eq!(st.update(), None, "the same node");
        let mut moved = node();
        moved.addresses = vec!["198.18.0.99".parse().unwrap()];
        st.set_node(moved);
        assert_eq!(st.update(), Some(Change::Full));
        assert!(keys(st.table()).contains("198.18.0.99:30002/TCP (external)"));
        assert!(!keys(st.table()).iter().any(|k| k.contains("198.18.0.11")));
    }

    #[test]
    fn a_shared_frontend_belongs_to_the_first_service_and_passes_on_when_it_leaves() {
        let mut st = ClusterState::new(node(), ProxyOptions::default());
        st.replace_services(Vec::<Service>::new());
        st.replace_slices(Vec::<EndpointSlice>::new());
        st.update();
        let mk = |name: &str, ip: &str| {
            svc(name)
                .cluster_ip(ip)
                .external_ip("192.0.2.50")
                .port("", 80, "TCP")
                .build()
        };
        let (x, y) = (mk("x", "10.96.0.8"), mk("y", "10.96.0.9"));
        // y first, then x: x owns the shared address anyway.
        st.apply_service(y.clone());
        st.update();
        st.apply_service(x.clone());
        st.update();
        let shared = st
            .table()
            .frontends
            .iter()
            .find(|(k, _)| k.frontend.addr.to_string() == "192.0.2.50")
            .map(|(_, s)| s.service.name.clone());
        assert_eq!(shared.as_deref(), Some("x"));
        st.delete_service(&x);
        let Some(Change::Entries(changed)) = st.update() else {
            panic!("an incremental change")
        };
        // x's cluster IP went, the shared entries changed owner.
        assert!(
            changed
                .iter()
                .any(|k| k.frontend.addr.to_string() == "192.0.2.50")
        );
        let owner: BTreeSet<String> = st
            .table()
            .frontends
            .iter()
            .filter(|(k, _)| k.frontend.addr.to_string() == "192.0.2.50")
            .map(|(_, s)| s.service.name.clone())
            .collect();
        assert_eq!(owner, BTreeSet::from(["y".to_owned()]));
        assert_eq!(
            st.table().frontends.len(),
            3,
            "y's cluster IP and the shared address"
        );
    }

    #[test]
    fn a_slice_that_names_another_service_moves_with_it() {
        let mut st = ClusterState::new(node(), ProxyOptions::default());
        let a = svc("a").cluster_ip("10.96.0.1").port("", 80, "TCP").build();
        let b = svc("b").cluster_ip("10.96.0.2").port("", 80, "TCP").build();
        st.replace_services([a.clone(), b.clone()]);
        st.replace_slices(Vec::<EndpointSlice>::new());
        st.update();
        let s1 = slice("a", "s1")
            .port("", 8080, "TCP")
            .ready("10.244.1.5")
            .build();
        st.apply_slice(s1);
        st.update();
        // The same slice, now labelled for b.
        let s1b = slice("b", "s1")
            .port("", 8080, "TCP")
            .ready("10.244.1.5")
            .build();
        st.apply_slice(s1b.clone());
        st.update();
        assert_eq!(st.table(), &from_scratch(&[&a, &b], &[&s1b]));
    }
}
