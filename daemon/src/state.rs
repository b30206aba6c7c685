//! The node's view of the cluster: workloads, services and the mesh-wide settings policy reads.
//!
//! Owns [`Snapshot`] (immutable, indexed by IP and by name) and [`Store`] (swaps snapshots).
//! Does no IO: sources (the local file today, Kubernetes later) build snapshots and the data
//! path reads them without waiting on anything.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::identity::Id;
use crate::policy::Policies;

mod table;
use table::{Keyed, Table};

/// Whether a workload accepts plaintext from outside the mesh (Istio's PeerAuthentication).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PeerAuthentication {
    /// Plaintext and mTLS are both accepted: Istio's default.
    #[default]
    Permissive,
    /// Only mTLS (HBONE) is accepted.
    Strict,
}

/// The kind of workload a pod belongs to, as Istio's workload API types it (the config dump's
/// `workloadType`): a Deployment's (the pods of its ReplicaSets), a CronJob's (of its Jobs), a
/// Job's; every other pod, whatever owns it (a StatefulSet, a DaemonSet, nothing), is a `pod`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadType {
    Deployment,
    CronJob,
    Job,
    #[default]
    Pod,
}

/// A pod, as the node knows it. A large cluster holds one per pod, so the strings its pods
/// repeat (namespace, service account, node, labels) are shared, through an [`Interner`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Workload {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    /// What owns the pod, named as Istio's telemetry names it: a Deployment's name for the
    /// pods of its ReplicaSets, a CronJob's for its Jobs', else the controller's; the pod's
    /// own name when nothing controls it. Metrics label connections with it.
    pub workload_name: Arc<str>,
    /// What kind of owner [`Self::workload_name`] names, as Istio's workload API types it.
    pub workload_type: WorkloadType,
    pub node: Arc<str>,
    pub ips: Ips,
    /// The pod's labels, which policy selectors match.
    #[serde(skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    /// The workload's own enrollment setting (Kubernetes: the pod label), if any; without one
    /// it follows its namespace ([`Snapshot::enrolled`]).
    pub enrollment: Option<bool>,
    /// Overrides the mesh-wide mode for this workload.
    pub peer_authentication: Option<PeerAuthentication>,
    pub identity: Id,
}

/// A workload's addresses. A pod has one, or one per family: a single one is held inline, so
/// the million pods of a large cluster allocate nothing for it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Ips {
    One(IpAddr),
    Many(Box<[IpAddr]>),
}

impl Default for Ips {
    fn default() -> Self {
        Self::Many(Box::default())
    }
}

impl std::ops::Deref for Ips {
    type Target = [IpAddr];

    fn deref(&self) -> &[IpAddr] {
        match self {
            Self::One(ip) => std::slice::from_ref(ip),
            Self::Many(ips) => ips,
        }
    }
}

impl<'a> IntoIterator for &'a Ips {
    type Item = &'a IpAddr;
    type IntoIter = std::slice::Iter<'a, IpAddr>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl From<Vec<IpAddr>> for Ips {
    fn from(ips: Vec<IpAddr>) -> Self {
        match *ips {
            [ip] => Self::One(ip),
            _ => Self::Many(ips.into_boxed_slice()),
        }
    }
}

impl std::fmt::Debug for Ips {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Serialize for Ips {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

/// The labels that name a workload's service for telemetry, in order of precedence.
const CANONICAL_NAME_LABELS: [&str; 3] = [
    "service.istio.io/canonical-name",
    "app.kubernetes.io/name",
    "app",
];
/// The labels that name its revision.
const CANONICAL_REVISION_LABELS: [&str; 3] = [
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
];

impl Workload {
    /// The service account, from the identity (the one place it is kept).
    pub fn service_account(&self) -> &str {
        self.identity.service_account()
    }

    /// The canonical service, as Istio derives it: the first of its naming labels, else the
    /// workload's name.
    pub fn canonical_service(&self) -> &str {
        CANONICAL_NAME_LABELS
            .iter()
            .find_map(|key| self.labels.get(key))
            .unwrap_or(&self.workload_name)
    }

    /// The canonical revision: the first of its revision labels, else `latest`.
    pub fn canonical_revision(&self) -> &str {
        CANONICAL_REVISION_LABELS
            .iter()
            .find_map(|key| self.labels.get(key))
            .unwrap_or("latest")
    }
}

/// Where a node is, from its topology labels (Istio's locality): metrics label connections with
/// each end's, and the config dump shows each workload's. Empty where a label is absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Locality {
    pub region: Arc<str>,
    pub zone: Arc<str>,
    pub subzone: Arc<str>,
}

/// Nodes' localities by node name, for the nodes that have one. A cluster has a few thousand
/// nodes at most: a snapshot shares the map, and a change to one node copies it.
pub type Localities = Arc<HashMap<Arc<str>, Arc<Locality>>>;

/// A set of labels, sorted by key. Pods of one ReplicaSet carry the same set, and share it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Labels(Arc<[(Arc<str>, Arc<str>)]>);

impl Labels {
    /// The pairs as given; of repeated keys the last wins.
    pub fn new(pairs: impl IntoIterator<Item = (Arc<str>, Arc<str>)>) -> Self {
        let mut pairs: Vec<_> = pairs.into_iter().collect();
        // Stable, so repeated keys stay in the order given and the last one is kept.
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        pairs.reverse();
        pairs.dedup_by(|a, b| a.0 == b.0);
        pairs.reverse();
        Self(pairs.into())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        let i = self.0.binary_search_by(|(k, _)| (**k).cmp(key)).ok()?;
        Some(&self.0[i].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for Labels {
    /// Labels that share nothing with others' (tests, small sources).
    fn from_iter<I: IntoIterator<Item = (K, V)>>(pairs: I) -> Self {
        Self::new(
            pairs
                .into_iter()
                .map(|(k, v)| (k.as_ref().into(), v.as_ref().into())),
        )
    }
}

impl Serialize for Labels {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

/// Hands out one shared copy of each repeated string, label set and identity. Entries nobody
/// else holds any more are dropped once the interner has grown by a quarter since the last
/// purge, so churn (rollouts' new pod-template hashes) leaves it near its size after a fresh
/// list; a purge costs one pass, at most once per quarter grown.
#[derive(Debug, Default)]
pub struct Interner {
    strings: HashSet<Arc<str>>,
    labels: HashSet<Labels>,
    ids: HashMap<(Arc<str>, Arc<str>), Id>,
    purged_at: usize,
}

impl Interner {
    pub fn str(&mut self, s: &str) -> Arc<str> {
        if let Some(shared) = self.strings.get(s) {
            return shared.clone();
        }
        let shared: Arc<str> = s.into();
        self.strings.insert(shared.clone());
        shared
    }

    pub fn labels<'a>(&mut self, pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Labels {
        let pairs: Vec<_> = pairs
            .into_iter()
            .map(|(k, v)| (self.str(k), self.str(v)))
            .collect();
        if pairs.is_empty() {
            return Labels::default();
        }
        let labels = Labels::new(pairs);
        if let Some(shared) = self.labels.get(&labels) {
            return shared.clone();
        }
        self.labels.insert(labels.clone());
        labels
    }

    /// The identity of `service_account` in `namespace` (both interned).
    pub fn id(
        &mut self,
        trust_domain: &str,
        namespace: &Arc<str>,
        service_account: &Arc<str>,
    ) -> Result<Id, crate::identity::ParseError> {
        let key = (namespace.clone(), service_account.clone());
        if let Some(id) = self.ids.get(&key) {
            return Ok(id.clone());
        }
        let id = Id::new(trust_domain, namespace, service_account)?;
        self.ids.insert(key, id.clone());
        Ok(id)
    }

    /// Drops what only the interner still holds, if it has grown by a quarter since it last did.
    pub fn purge_if_grown(&mut self) {
        let len = self.len();
        if len < self.purged_at.max(1024) * 5 / 4 {
            return;
        }
        // Identities and label sets first: they hold strings.
        self.ids.retain(|_, id| id.is_shared());
        self.labels.retain(|l| Arc::strong_count(&l.0) > 1);
        self.strings.retain(|s| Arc::strong_count(s) > 1);
        self.purged_at = self.len();
    }

    fn len(&self) -> usize {
        self.strings.len() + self.labels.len() + self.ids.len()
    }
}

/// The name Istio gives a workload's cluster when the mesh has one.
pub const CLUSTER_ID: &str = "Kubernetes";

/// One port of a Service VIP and the endpoints behind it.
#[derive(Debug, Clone, Serialize)]
pub struct ServicePort {
    pub service: Arc<str>,
    pub namespace: Arc<str>,
    /// Ready endpoints only, each with its own target port: the pods behind one named port
    /// may number it differently (a rollout that changes the container port).
    pub endpoints: Vec<SocketAddr>,
}

impl ServicePort {
    /// The Service's name in the cluster's DNS, as Istio's telemetry names it.
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.service, self.namespace)
    }
}

/// A set of namespace names, shared by the snapshots that have the same one.
pub type Namespaces = Arc<std::collections::BTreeSet<Arc<str>>>;

/// An immutable picture of the cluster; the data path reads one per connection.
#[derive(Debug, Default, Serialize)]
pub struct Snapshot {
    pub trust_domain: String,
    /// Mesh-wide PeerAuthentication, for workloads that set none.
    pub peer_authentication: PeerAuthentication,
    /// Namespaces whose workloads are enrolled unless they opt out.
    pub enrolled_namespaces: Namespaces,
    /// Every namespace this node knows of, enrolled or not: the CNI plugin admits pods of
    /// unknown namespaces only through the daemon.
    pub known_namespaces: Namespaces,
    /// PeerAuthentication and AuthorizationPolicy objects, compiled.
    #[serde(skip)]
    pub policies: Arc<Policies>,
    #[serde(flatten)]
    index: Index,
}

/// A snapshot's workloads by name and by IP, and its Service ports by VIP. Cloning one shares
/// its tables (sharded, copy-on-write: `state::table::Table`), so a source can keep an index,
/// change it per event and hand each snapshot a clone, at a cost that grows with the change,
/// not with the cluster.
#[derive(Debug, Clone, Default)]
pub struct Index {
    workloads: Table<Arc<Workload>>,
    by_ip: Table<(IpAddr, Arc<Workload>)>,
    services: Table<(SocketAddr, Arc<ServicePort>)>,
    /// Endpoints on this node (address and target port) and the Service port each serves:
    /// what the destination's side names as the connection's Service, which the source's side
    /// knows by the VIP dialled. Only this node's endpoints, so it grows with the node, not
    /// the cluster.
    endpoints: Table<(SocketAddr, Arc<ServicePort>)>,
    localities: Localities,
}

impl Keyed for Arc<Workload> {
    type Key<'a> = (&'a str, &'a str);

    fn key(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
}

impl Index {
    pub fn workload(&self, namespace: &str, name: &str) -> Option<&Arc<Workload>> {
        let hash = self.workloads.hash(&(namespace, name));
        self.workloads
            .find(hash, |w| *w.namespace == *namespace && *w.name == *name)
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        let hash = self.by_ip.hash(&ip);
        Some(&self.by_ip.find(hash, |e| e.0 == ip)?.1)
    }

    pub fn service(&self, vip: SocketAddr) -> Option<&Arc<ServicePort>> {
        let hash = self.services.hash(&vip);
        Some(&self.services.find(hash, |e| e.0 == vip)?.1)
    }

    /// Adds or replaces a workload by name; its addresses are indexed apart ([`Self::put_ip`]).
    pub fn put_workload(&mut self, workload: Arc<Workload>) -> Option<Arc<Workload>> {
        let (namespace, name) = (workload.namespace.clone(), workload.name.clone());
        self.workloads
            .insert(workload, |w| w.namespace == namespace && w.name == name)
    }

    pub fn remove_workload(&mut self, namespace: &str, name: &str) -> Option<Arc<Workload>> {
        let hash = self.workloads.hash(&(namespace, name));
        self.workloads
            .remove(hash, |w| *w.namespace == *namespace && *w.name == *name)
    }

    pub fn put_ip(&mut self, ip: IpAddr, workload: Arc<Workload>) -> Option<Arc<Workload>> {
        Some(self.by_ip.insert((ip, workload), |e| e.0 == ip)?.1)
    }

    pub fn remove_ip(&mut self, ip: IpAddr) -> Option<Arc<Workload>> {
        let hash = self.by_ip.hash(&ip);
        Some(self.by_ip.remove(hash, |e| e.0 == ip)?.1)
    }

    pub fn put_service(
        &mut self,
        vip: SocketAddr,
        port: Arc<ServicePort>,
    ) -> Option<Arc<ServicePort>> {
        Some(self.services.insert((vip, port), |e| e.0 == vip)?.1)
    }

    pub fn remove_service(&mut self, vip: SocketAddr) -> Option<Arc<ServicePort>> {
        let hash = self.services.hash(&vip);
        Some(self.services.remove(hash, |e| e.0 == vip)?.1)
    }

    /// The Service port that endpoint `address` on this node serves. Should two Services
    /// select one pod on one target port, it is one of them (Istio's node proxy also picks
    /// one).
    pub fn endpoint_service(&self, address: SocketAddr) -> Option<&Arc<ServicePort>> {
        let hash = self.endpoints.hash(&address);
        Some(&self.endpoints.find(hash, |e| e.0 == address)?.1)
    }

    pub fn put_endpoint(&mut self, address: SocketAddr, port: Arc<ServicePort>) {
        self.endpoints.insert((address, port), |e| e.0 == address);
    }

    /// Removes endpoint `address` if it names a port of Service `namespace/name`, not when
    /// another Service's port has replaced it.
    pub fn remove_endpoint(&mut self, address: SocketAddr, namespace: &str, name: &str) {
        let hash = self.endpoints.hash(&address);
        self.endpoints.remove(hash, |e| {
            e.0 == address && *e.1.namespace == *namespace && *e.1.service == *name
        });
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.iter()
    }

    /// Node `node`'s locality, if its labels give one.
    pub fn locality(&self, node: &str) -> Option<&Arc<Locality>> {
        self.localities.get(node)
    }

    /// Sets node `node`'s locality, or removes it (`None`).
    pub fn set_locality(&mut self, node: Arc<str>, locality: Option<Arc<Locality>>) {
        let held = self.localities.get(&node);
        if held == locality.as_ref() {
            return;
        }
        let localities = Arc::make_mut(&mut self.localities);
        match locality {
            Some(locality) => localities.insert(node, locality),
            None => localities.remove(&node),
        };
    }

    pub fn workload_count(&self) -> usize {
        self.workloads.len()
    }
}

impl Serialize for Index {
    /// Workloads sorted by namespace and name, services by VIP: equal indexes, equal output.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut workloads: Vec<_> = self.workloads.iter().collect();
        workloads.sort_unstable_by(|a, b| a.key().cmp(&b.key()));
        let mut s = serializer.serialize_struct("Index", 1)?;
        s.serialize_field("workloads", &workloads)?;
        s.end()
    }
}

/// Why a set of workloads and services does not make a consistent snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path} = {value}: {reason}")]
pub struct Error {
    pub path: String,
    pub value: String,
    pub reason: String,
}

/// A service as a source describes it, before validation.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    pub vip: IpAddr,
    /// Each port with the ready endpoints (address and target port) behind it.
    pub ports: Vec<(u16, Vec<SocketAddr>)>,
}

impl Snapshot {
    /// Indexes workloads and services, refusing duplicates that would make lookups ambiguous.
    /// Errors name the offending entry by its position, as sources number them.
    pub fn build(
        trust_domain: &str,
        peer_authentication: PeerAuthentication,
        enrolled_namespaces: std::collections::BTreeSet<String>,
        workloads: Vec<Arc<Workload>>,
        services: Vec<ServiceSpec>,
    ) -> Result<Self, Error> {
        let err = |path: String, value: &dyn std::fmt::Display, reason: String| Error {
            path,
            value: value.to_string(),
            reason,
        };
        let mut snapshot = Self {
            trust_domain: trust_domain.to_owned(),
            peer_authentication,
            ..Self::default()
        };
        let mut known: std::collections::BTreeSet<Arc<str>> =
            enrolled_namespaces.into_iter().map(Into::into).collect();
        snapshot.enrolled_namespaces = Arc::new(known.clone());
        let index = &mut snapshot.index;
        for (i, w) in workloads.into_iter().enumerate() {
            if !known.contains(&*w.namespace) {
                known.insert(w.namespace.clone());
            }
            if index.put_workload(w.clone()).is_some() {
                let name = format!("{}/{}", w.namespace, w.name);
                return Err(err(
                    format!("workloads[{i}].name"),
                    &name,
                    "listed twice".into(),
                ));
            }
            for (j, ip) in w.ips.iter().enumerate() {
                if let Some(other) = index.put_ip(*ip, w.clone()) {
                    let reason = format!("already used by {}/{}", other.namespace, other.name);
                    return Err(err(format!("workloads[{i}].ips[{j}]"), ip, reason));
                }
            }
        }
        for (i, s) in services.into_iter().enumerate() {
            if index.workload_by_ip(s.vip).is_some() {
                let reason = "is also a workload address".to_owned();
                return Err(err(format!("services[{i}].vip"), &s.vip, reason));
            }
            for (j, (port, endpoints)) in s.ports.into_iter().enumerate() {
                let path = format!("services[{i}].ports[{j}]");
                if port == 0 {
                    return Err(err(path, &port, "port 0".into()));
                }
                if let Some(e) = endpoints.iter().find(|e| e.port() == 0) {
                    return Err(err(path, e, "target port 0".into()));
                }
                let entry = Arc::new(ServicePort {
                    service: s.name.clone(),
                    namespace: s.namespace.clone(),
                    endpoints,
                });
                // A node file is small: every endpoint is indexed, this node's among them.
                for &endpoint in &entry.endpoints {
                    index.put_endpoint(endpoint, entry.clone());
                }
                let vip = SocketAddr::new(s.vip, port);
                if index.put_service(vip, entry).is_some() {
                    let reason = "VIP and port used by another service".to_owned();
                    return Err(err(format!("services[{i}].ports[{j}]"), &vip, reason));
                }
            }
        }
        snapshot.known_namespaces = Arc::new(known);
        Ok(snapshot)
    }

    /// A snapshot of a source that keeps its own [`Index`] (a clone of it: cheap).
    pub fn from_index(
        trust_domain: &str,
        peer_authentication: PeerAuthentication,
        enrolled_namespaces: Namespaces,
        known_namespaces: Namespaces,
        index: Index,
    ) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            peer_authentication,
            enrolled_namespaces,
            known_namespaces,
            policies: Arc::default(),
            index,
        }
    }

    /// The same snapshot enforcing `policies`.
    #[must_use]
    pub fn with_policies(mut self, policies: Arc<Policies>) -> Self {
        self.policies = policies;
        self
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.index.workload_by_ip(ip)
    }

    pub fn workload(&self, namespace: &str, name: &str) -> Option<&Arc<Workload>> {
        self.index.workload(namespace, name)
    }

    /// Whether `workload`'s traffic is captured and carried over HBONE: its own setting if it
    /// has one, else its namespace's.
    pub fn enrolled(&self, workload: &Workload) -> bool {
        workload
            .enrollment
            .unwrap_or_else(|| self.enrolled_namespaces.contains(&*workload.namespace))
    }

    pub fn service(&self, vip: SocketAddr) -> Option<&Arc<ServicePort>> {
        self.index.service(vip)
    }

    pub fn endpoint_service(&self, address: SocketAddr) -> Option<&Arc<ServicePort>> {
        self.index.endpoint_service(address)
    }

    /// Sets node `node`'s locality (a source that builds whole snapshots: the node file).
    pub fn set_locality(&mut self, node: Arc<str>, locality: Locality) {
        self.index.set_locality(node, Some(Arc::new(locality)));
    }

    /// Node `node`'s locality, if known.
    pub fn locality(&self, node: &str) -> Option<&Arc<Locality>> {
        self.index.locality(node)
    }

    pub fn workload_count(&self) -> usize {
        self.index.workload_count()
    }

    /// Every workload, in no particular order.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.index.workloads()
    }

    /// Every Service VIP and port with what is behind it, in no particular order.
    pub fn services(&self) -> impl Iterator<Item = (&SocketAddr, &Arc<ServicePort>)> {
        self.index.services.iter().map(|(vip, port)| (vip, port))
    }

    /// What the CNI plugin needs to fail closed while the daemon is away.
    /// Sorted, so that two snapshots of one cluster give equal records.
    pub fn enrollment(&self) -> culvert_cni_proto::Enrollment {
        let name = |w: &Workload| format!("{}/{}", w.namespace, w.name);
        let in_ns = |w: &Workload| self.enrolled_namespaces.contains(&*w.namespace);
        let sorted = |mut names: Vec<String>| {
            names.sort_unstable();
            names
        };
        culvert_cni_proto::Enrollment {
            namespaces: self
                .enrolled_namespaces
                .iter()
                .map(|n| n.to_string())
                .collect(),
            outside: self
                .known_namespaces
                .difference(&self.enrolled_namespaces)
                .map(|n| n.to_string())
                .collect(),
            pods_in: sorted(
                self.workloads()
                    .filter(|w| self.enrolled(w) && !in_ns(w))
                    .map(|w| name(w))
                    .collect(),
            ),
            pods_out: sorted(
                self.workloads()
                    .filter(|w| !self.enrolled(w) && in_ns(w))
                    .map(|w| name(w))
                    .collect(),
            ),
        }
    }

    /// The PeerAuthentication mode in force for `workload`.
    pub fn peer_authentication_of(&self, workload: &Workload) -> PeerAuthentication {
        workload
            .peer_authentication
            .unwrap_or(self.peer_authentication)
    }
}

/// Holds the current snapshot; sources replace it whole, and readers may follow the changes.
#[derive(Debug)]
pub struct Store {
    current: tokio::sync::watch::Sender<Arc<Snapshot>>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new(Snapshot::default())
    }
}

impl Store {
    pub fn new(snapshot: Snapshot) -> Self {
        Self {
            current: tokio::sync::watch::Sender::new(Arc::new(snapshot)),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.borrow().clone()
    }

    pub fn replace(&self, snapshot: Snapshot) {
        self.current.send_replace(Arc::new(snapshot));
    }

    /// Every later replacement, as it happens (intermediate ones may be skipped).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<Snapshot>> {
        self.current.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_look_up_by_key_and_interned_sets_are_shared() {
        let labels: Labels = [("b", "2"), ("a", "1"), ("b", "3")].into_iter().collect();
        assert_eq!(labels.get("a"), Some("1"));
        assert_eq!(labels.get("b"), Some("3"), "the last of a repeated key");
        assert_eq!(labels.get("c"), None);
        assert_eq!(
            serde_json::to_string(&labels).unwrap(),
            r#"{"a":"1","b":"3"}"#
        );

        let mut interner = Interner::default();
        let one = interner.labels([("app", "web"), ("tier", "front")]);
        let two = interner.labels([("tier", "front"), ("app", "web")]);
        assert!(Arc::ptr_eq(&one.0, &two.0), "same set, one copy");
        let ns = interner.str("shop");
        assert!(Arc::ptr_eq(&ns, &interner.str("shop")));
        let sa = interner.str("cart");
        let id = interner.id("cluster.local", &ns, &sa).unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/shop/sa/cart");
    }

    fn workload(name: &str, ip: &str) -> Workload {
        Workload {
            name: name.into(),
            namespace: "demo".into(),
            workload_name: name.into(),
            workload_type: WorkloadType::Pod,
            node: "n1".into(),
            ips: Ips::One(ip.parse().unwrap()),
            labels: Labels::default(),
            enrollment: Some(true),
            peer_authentication: None,
            identity: Id::new("cluster.local", "demo", name).unwrap(),
        }
    }

    #[test]
    fn indexes_by_ip_name_and_vip() {
        let svc = ServiceSpec {
            name: "echo".into(),
            namespace: "demo".into(),
            vip: "10.96.0.10".parse().unwrap(),
            ports: vec![(80, vec!["10.0.0.2:8080".parse().unwrap()])],
        };
        let snap = Snapshot::build(
            "cluster.local",
            PeerAuthentication::Strict,
            Default::default(),
            vec![
                workload("a", "10.0.0.1").into(),
                workload("b", "10.0.0.2").into(),
            ],
            vec![svc],
        )
        .unwrap();
        assert_eq!(
            snap.workload_by_ip("10.0.0.2".parse().unwrap())
                .unwrap()
                .name,
            "b".into()
        );
        assert_eq!(
            snap.workload("demo", "a").unwrap().ips[0].to_string(),
            "10.0.0.1"
        );
        let port = snap.service("10.96.0.10:80".parse().unwrap()).unwrap();
        assert_eq!(port.endpoints, ["10.0.0.2:8080".parse().unwrap()]);
        assert!(snap.service("10.96.0.10:81".parse().unwrap()).is_none());
        assert_eq!(
            snap.peer_authentication_of(&workload("c", "10.0.0.3")),
            PeerAuthentication::Strict
        );
    }

    #[test]
    fn enrollment_follows_the_namespace_unless_the_workload_says_otherwise() {
        let mut opted_out = workload("legacy", "10.0.0.2");
        opted_out.enrollment = Some(false);
        let mut follows = workload("web", "10.0.0.3");
        follows.enrollment = None;
        let mut elsewhere = workload("probe", "10.0.0.4");
        elsewhere.namespace = "tools".into();
        let snap = Snapshot::build(
            "cluster.local",
            PeerAuthentication::Permissive,
            ["demo".to_owned()].into(),
            vec![opted_out.into(), follows.into(), elsewhere.into()],
            vec![],
        )
        .unwrap();
        let enrolled = |ns, name| snap.enrolled(snap.workload(ns, name).unwrap());
        assert!(!enrolled("demo", "legacy"));
        assert!(enrolled("demo", "web"));
        assert!(enrolled("tools", "probe"));
        let e = snap.enrollment();
        assert_eq!(
            (e.namespaces, e.pods_in, e.pods_out),
            (
                vec!["demo".to_owned()],
                vec!["tools/probe".to_owned()],
                vec!["demo/legacy".to_owned()],
            )
        );
    }

    #[test]
    fn duplicate_ip_names_both_workloads() {
        let err = Snapshot::build(
            "cluster.local",
            PeerAuthentication::Permissive,
            Default::default(),
            vec![
                workload("a", "10.0.0.1").into(),
                workload("b", "10.0.0.1").into(),
            ],
            vec![],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "workloads[1].ips[0] = 10.0.0.1: already used by demo/a"
        );
    }
}
