//! Kubernetes discovery: watches Pods, Namespaces, Services, EndpointSlices, Nodes (their
//! metadata, for the locality) and Istio's PeerAuthentication and AuthorizationPolicy, and
//! turns them into state snapshots.
//!
//! Owns the watches and the node's lean view of the cluster ([`Cluster`]): each object is
//! decoded into a small record ([`objects`]) with its repeated strings interned, and no API
//! object is kept. Each event updates the records and the index snapshots share (`view`),
//! so its cost follows what it changes, not the cluster's size; the translation is pure and
//! unit-tested, the watches are tested against a real kube-apiserver (tests/kube). While the
//! API is unreachable the records keep their last contents and the watchers retry with
//! backoff; a watch that expires relists, and the new list replaces the old only once it is
//! complete.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::StreamExt as _;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, Resource};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

mod istio;
pub mod objects;
mod view;

use crate::metrics;
use crate::policy::{self, Policies};
use crate::state::{Interner, PeerAuthentication, Snapshot};
use istio::Istio;
use objects::{NamespaceRecord, NodeRecord, PodRecord, Record, ServiceRecord, SliceRecord};
use view::View;

/// The label that enrolls a namespace (value [`ENROLLED`]) or opts a pod out ([`NOT_ENROLLED`]),
/// unless the node file's `enrollmentLabel` names another (Istio ambient's, say).
pub const MODE_LABEL: &str = "culvert.io/dataplane-mode";
pub const ENROLLED: &str = "ambient";
pub const NOT_ENROLLED: &str = "none";
/// The label tying an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the snapshot takes from the node file rather than the API.
#[derive(Debug, Clone)]
pub struct Settings {
    pub trust_domain: String,
    pub peer_authentication: PeerAuthentication,
    pub policy: policy::Settings,
    /// The node file's own policy objects, compiled with the API's.
    pub file_policies: Arc<policy::istio::Objects>,
}

/// What a record being decoded may share strings with.
pub struct Known<'a> {
    collections: &'a Collections,
    view: &'a View,
    /// The enrollment label's key.
    pub mode_label: &'a str,
    /// This node's name, if known: endpoints on it are indexed by address.
    pub node: &'a str,
}

impl Known<'_> {
    /// Pod `namespace/name`'s name as held already, by its record or by an endpoint that
    /// names it (a slice may come before its pods), else a new copy.
    pub fn pod_name(&self, namespace: &Arc<str>, name: &str) -> Arc<str> {
        match self.collections.pods.held_name(namespace, name) {
            Some(held) => held,
            None => self.view.adopted_name(namespace, name.into()),
        }
    }
}

/// Records by namespace, then name (cluster-scoped kinds under `""`).
type ByName<R> = HashMap<Arc<str>, HashMap<Arc<str>, R>>;

/// One kind's records.
#[derive(Debug)]
pub struct Collection<R> {
    items: ByName<R>,
    len: usize,
    /// A relist in progress: it replaces `items` once complete.
    next: Option<(ByName<R>, usize)>,
}

impl<R> Default for Collection<R> {
    fn default() -> Self {
        Self {
            items: HashMap::new(),
            len: 0,
            next: None,
        }
    }
}

impl<R> Collection<R> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<&R> {
        self.items.get(namespace)?.get(name)
    }

    /// `name` as the key of the record it names, if there is one, so that others share it.
    fn shared_name(&self, namespace: &str, name: &str) -> Arc<str> {
        self.held_name(namespace, name)
            .unwrap_or_else(|| name.into())
    }

    /// The key of the record `name` names, held or being relisted.
    fn held_name(&self, namespace: &str, name: &str) -> Option<Arc<str>> {
        let held = |items: &ByName<R>| Some(items.get(namespace)?.get_key_value(name)?.0.clone());
        held(&self.items).or_else(|| held(&self.next.as_ref()?.0))
    }

    /// Every record with its namespace and name.
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Arc<str>, &R)> {
        self.items
            .iter()
            .flat_map(|(ns, items)| items.iter().map(move |(name, r)| (ns, name, r)))
    }

    /// Namespaces with records.
    fn namespaces(&self) -> impl Iterator<Item = &Arc<str>> {
        self.items.keys()
    }

    /// Sets or (`None`) removes a record. `Some` with the record it replaced if that changed
    /// anything; `None` if not (the old record is kept then: what shares it keeps sharing it).
    fn put(&mut self, namespace: Arc<str>, name: &str, record: Option<R>) -> Option<Option<R>>
    where
        R: Record,
    {
        match record {
            Some(record) => {
                let key = record.key(name);
                let in_namespace = self.items.entry(namespace).or_default();
                match in_namespace.get_mut(&key) {
                    Some(old) if *old == record => None,
                    Some(old) => Some(Some(std::mem::replace(old, record))),
                    None => {
                        in_namespace.insert(key, record);
                        self.len += 1;
                        Some(None)
                    }
                }
            }
            None => {
                let in_namespace = self.items.get_mut(&namespace)?;
                let old = in_namespace.remove(name)?;
                self.len -= 1;
                if in_namespace.is_empty() {
                    self.items.remove(&namespace);
                }
                Some(Some(old))
            }
        }
    }

    /// Adds a record to the relist in progress.
    fn put_next(&mut self, namespace: Arc<str>, name: &str, record: Option<R>)
    where
        R: Record,
    {
        let Some((items, len)) = &mut self.next else {
            return;
        };
        if let Some(record) = record {
            let key = record.key(name);
            if items
                .entry(namespace)
                .or_default()
                .insert(key, record)
                .is_none()
            {
                *len += 1;
            }
        }
    }

    /// Ends the relist in progress: its records replace the old ones, except where the two
    /// are equal (the old is kept). Returns every key whose record changed, with the old one.
    fn finish_relist(&mut self) -> Vec<(view::Key, Option<R>)>
    where
        R: Record,
    {
        let Some((items, len)) = self.next.take() else {
            return Vec::new();
        };
        let mut old = std::mem::take(&mut self.items);
        self.len = len;
        let mut changes = Vec::new();
        for (namespace, listed) in items {
            let mut before = old.remove(&namespace);
            let mut kept = HashMap::with_capacity(listed.len());
            for (name, record) in listed {
                match before.as_mut().and_then(|b| b.remove_entry(&name)) {
                    // The old name too: the workload and the endpoints naming it share it.
                    Some((old_name, old_record)) if old_record == record => {
                        kept.insert(old_name, old_record);
                    }
                    previous => {
                        changes.push(((namespace.clone(), name.clone()), previous.map(|p| p.1)));
                        kept.insert(name, record);
                    }
                }
            }
            let gone = before.into_iter().flatten();
            changes.extend(gone.map(|(name, r)| ((namespace.clone(), name), Some(r))));
            self.items.insert(namespace, kept);
        }
        for (namespace, gone) in old {
            changes.extend(
                gone.into_iter()
                    .map(|(name, r)| ((namespace.clone(), name), Some(r))),
            );
        }
        changes
    }
}

/// The collections of the four kinds snapshots are built from.
#[derive(Debug, Default)]
pub struct Collections {
    pub pods: Collection<PodRecord>,
    pub namespaces: Collection<NamespaceRecord>,
    pub services: Collection<ServiceRecord>,
    pub slices: Collection<SliceRecord>,
    pub nodes: Collection<NodeRecord>,
}

/// The node's view of the cluster: records of every watched object, the interner they share
/// and the index snapshots are cut from. Watch tasks apply events to it.
#[derive(Debug)]
pub struct Cluster {
    trust_domain: String,
    mode_label: String,
    node: String,
    inner: tokio::sync::Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    interner: Interner,
    collections: Collections,
    view: View,
}

impl Cluster {
    pub fn new(trust_domain: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            mode_label: MODE_LABEL.to_owned(),
            node: String::new(),
            inner: tokio::sync::Mutex::default(),
        }
    }

    /// This node is `node`: the Service ports its endpoints serve are indexed by endpoint
    /// ([`crate::state::Index::endpoint_service`]).
    #[must_use]
    pub fn on_node(mut self, node: &str) -> Self {
        node.clone_into(&mut self.node);
        self
    }

    /// Enrollment by `label` instead of [`MODE_LABEL`].
    #[must_use]
    pub fn enrolling_by(mut self, label: &str) -> Self {
        label.clone_into(&mut self.mode_label);
        self
    }

    /// Applies one watch event; whether it changed a record (a completed relist counts as a
    /// change). An update to a field no record keeps (a node's heartbeat, a pod's condition)
    /// changes nothing.
    pub async fn apply<R: Record>(&self, event: watcher::Event<R::Object>) -> bool {
        let mut inner = self.inner.lock().await;
        self.apply_to::<R>(&mut inner, event)
    }

    /// [`Self::apply`] outside the runtime (tests, benches).
    pub fn apply_blocking<R: Record>(&self, event: watcher::Event<R::Object>) -> bool {
        let mut inner = self.inner.blocking_lock();
        self.apply_to::<R>(&mut inner, event)
    }

    fn apply_to<R: Record>(&self, inner: &mut Inner, event: watcher::Event<R::Object>) -> bool {
        let Inner {
            interner,
            collections,
            view,
        } = inner;
        let (object, deleted, relisting) = match event {
            watcher::Event::Apply(object) => (object, false, false),
            watcher::Event::Delete(object) => (object, true, false),
            watcher::Event::InitApply(object) => (object, false, true),
            watcher::Event::Init => {
                R::collection(collections).next = Some(Default::default());
                return false;
            }
            watcher::Event::InitDone => {
                let changes = R::collection(collections).finish_relist();
                for (key, old) in changes {
                    R::changed(view, collections, key, old.as_ref());
                }
                interner.purge_if_grown();
                return true;
            }
        };
        let meta = object.meta();
        let Some(name) = meta.name.as_deref() else {
            return false;
        };
        let namespace = interner.str(meta.namespace.as_deref().unwrap_or_default());
        let record = if deleted {
            None
        } else {
            let known = Known {
                collections,
                view,
                mode_label: &self.mode_label,
                node: &self.node,
            };
            R::decode(&object, interner, &self.trust_domain, &known)
        };
        let collection = R::collection(collections);
        let mut changed = false;
        if relisting {
            collection.put_next(namespace, name, record);
        } else if let Some(old) = collection.put(namespace.clone(), name, record) {
            let key = (namespace.clone(), collection.shared_name(&namespace, name));
            R::changed(view, collections, key, old.as_ref());
            changed = true;
        }
        interner.purge_if_grown();
        changed
    }

    /// How many records of each kind: pods, namespaces, services, slices.
    pub fn counts(&self) -> [usize; 4] {
        let inner = self.inner.blocking_lock();
        let c = &inner.collections;
        [
            c.pods.len(),
            c.namespaces.len(),
            c.services.len(),
            c.slices.len(),
        ]
    }

    /// A snapshot (without the API's policies) of the current view. Blocks on the lock: for
    /// tests and benches; the daemon takes [`Self::snapshot_async`].
    pub fn snapshot(&self, settings: &Settings) -> Snapshot {
        Self::cut(settings, &mut self.inner.blocking_lock())
    }

    pub async fn snapshot_async(&self, settings: &Settings) -> Snapshot {
        Self::cut(settings, &mut *self.inner.lock().await)
    }

    /// A snapshot shares the view's index and namespace sets: it copies nothing per pod.
    fn cut(settings: &Settings, inner: &mut Inner) -> Snapshot {
        let (enrolled, known) = inner.view.namespaces(&inner.collections);
        Snapshot::from_index(
            &settings.trust_domain,
            settings.peer_authentication,
            enrolled,
            known,
            inner.view.index.clone(),
        )
    }
}

/// The watches; each kind is kept current by its own task.
pub struct Watches {
    cluster: Arc<Cluster>,
    /// Whether each kind has been listed once: pods, namespaces, Services, EndpointSlices,
    /// nodes.
    listed: [watch::Receiver<bool>; 5],
    peer: Store<Istio<policy::istio::PeerAuthenticationSpec>>,
    authz: Store<Istio<policy::istio::AuthorizationPolicySpec>>,
    /// The last compiled policies and what they were compiled from, so a rebuild for a pod
    /// event reuses them (and open connections are decided again only when policy changed).
    compiled: std::sync::Mutex<Option<(PolicySources, Arc<Policies>)>>,
    changed: Arc<Notify>,
}

/// What compiled policies depend on: every policy object's version, and the node file's part.
#[derive(PartialEq)]
struct PolicySources {
    versions: Vec<(Option<String>, Option<String>)>,
    settings: policy::Settings,
    /// Which node file's objects (a reload replaces the `Arc`).
    file: usize,
}

/// A client for the Kubernetes API: from `kubeconfig`, or the in-cluster service account,
/// `$KUBECONFIG` or `~/.kube/config`.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<Client> {
    use anyhow::Context as _;
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("finding the Kubernetes API (in-cluster, $KUBECONFIG or ~/.kube/config)")?,
    };
    info!(api = %config.cluster_url, "Kubernetes API");
    Client::try_from(config).context("building the Kubernetes client")
}

impl Watches {
    /// Starts one watch per kind, cluster-wide, until `stop`, for node `node`. Pods'
    /// identities are in `trust_domain`; `mode_label` enrolls.
    /// Events, relists and watch errors are counted in `metrics`.
    pub fn start(
        client: &Client,
        trust_domain: &str,
        mode_label: &str,
        node: &str,
        metrics: &Arc<metrics::Discovery>,
        stop: &CancellationToken,
    ) -> Self {
        let changed = Arc::new(Notify::new());
        let cluster = Arc::new(
            Cluster::new(trust_domain)
                .enrolling_by(mode_label)
                .on_node(node),
        );
        let records = |spawn: Spawn| spawn(client, &cluster, &changed, metrics, stop);
        let listed = [
            records(spawn_records::<PodRecord>),
            records(spawn_records::<NamespaceRecord>),
            records(spawn_records::<ServiceRecord>),
            records(spawn_records::<SliceRecord>),
            records(spawn_records::<NodeRecord>),
        ];
        Self {
            listed,
            peer: spawn_store(client, istio::trim, &changed, stop),
            authz: spawn_store(client, istio::trim, &changed, stop),
            cluster,
            compiled: std::sync::Mutex::default(),
            changed,
        }
    }

    /// Finds out whether the cluster serves the policy kinds. Without their CRDs there can be
    /// no such objects, so the first sync does not wait for them (their watches keep retrying
    /// and pick them up once installed).
    async fn policy_kinds_served(&self, client: &Client) -> bool {
        let api = Api::<Istio<policy::istio::AuthorizationPolicySpec>>::all(client.clone());
        let listed = api
            .list_metadata(&kube::api::ListParams::default().limit(1))
            .await;
        let served = !matches!(listed, Err(kube::Error::Api(status)) if status.code == 404);
        if !served {
            warn!(
                "security.istio.io is not served (no CRDs): no policies from the API until it is"
            );
        }
        served
    }

    /// Finds out whether nodes may be listed: a ClusterRole of an earlier release grants no
    /// access to them, and their locality only labels metrics, so the first sync does not
    /// wait for a list that cannot succeed (the watch keeps retrying).
    async fn nodes_listable(&self, client: &Client) -> bool {
        let api = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone());
        let listed = api
            .list_metadata(&kube::api::ListParams::default().limit(1))
            .await;
        let forbidden = matches!(listed, Err(kube::Error::Api(status)) if status.code == 403);
        if forbidden {
            warn!("nodes may not be listed (RBAC): connections are labelled with no locality");
        }
        !forbidden
    }

    /// Waits until every collection has been listed once (nodes only if they may be listed,
    /// the policy kinds only if the cluster serves them: a DENY must be known before the first
    /// connection is admitted).
    pub async fn synced(&self, client: &Client) {
        let [kinds @ .., nodes] = &self.listed;
        let mut waits: Vec<_> = kinds.iter().collect();
        if self.nodes_listable(client).await {
            waits.push(nodes);
        }
        // An error means the writer is gone, i.e. we are stopping: nothing left to wait for.
        for listed in waits {
            let _ = listed.clone().wait_for(|listed| *listed).await;
        }
        if self.policy_kinds_served(client).await {
            let _ = tokio::join!(self.peer.wait_until_ready(), self.authz.wait_until_ready());
        }
    }

    /// Resolves after the next change to any collection (at once if one happened since the
    /// last call).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// A snapshot of the collections' current contents.
    pub async fn snapshot(&self, settings: &Settings) -> Snapshot {
        let snapshot = self.cluster.snapshot_async(settings).await;
        snapshot.with_policies(self.policies(settings))
    }

    /// The node file's and the API's policies, compiled once per change of either.
    fn policies(&self, settings: &Settings) -> Arc<Policies> {
        let (peer, authz) = (self.peer.state(), self.authz.state());
        let version = |m: &kube::api::ObjectMeta| (m.uid.clone(), m.resource_version.clone());
        let sources = PolicySources {
            versions: peer
                .iter()
                .map(|p| version(&p.metadata))
                .chain(authz.iter().map(|a| version(&a.metadata)))
                .collect(),
            settings: settings.policy.clone(),
            file: Arc::as_ptr(&settings.file_policies) as usize,
        };
        let mut compiled = self.compiled.lock().expect("policy cache lock poisoned");
        if let Some((built, policies)) = compiled.as_ref()
            && *built == sources
        {
            return policies.clone();
        }
        let file = &settings.file_policies;
        let policies = Arc::new(Policies::build(
            &settings.policy,
            file.peer
                .iter()
                .cloned()
                .chain(peer.iter().filter_map(|p| p.to_object()))
                .collect(),
            file.authz
                .iter()
                .cloned()
                .chain(authz.iter().filter_map(|a| a.to_object()))
                .collect(),
        ));
        *compiled = Some((sources, policies.clone()));
        policies
    }
}

/// Logs a watch error; the backoff wrapper retries, and until it succeeds the records keep
/// what they had.
fn watch_failed(kind: &str, error: &watcher::Error) {
    match error {
        // etcd compacted past our resource version: the watcher relists.
        watcher::Error::WatchError(status) if status.code == 410 => {
            info!(%kind, "watch expired; relisting, serving the last state");
        }
        e => warn!(%kind, error = %e, "watch failed; retrying, serving the last state"),
    }
}

/// [`spawn_records`] for one kind.
type Spawn = fn(
    &Client,
    &Arc<Cluster>,
    &Arc<Notify>,
    &Arc<metrics::Discovery>,
    &CancellationToken,
) -> watch::Receiver<bool>;

/// Watches every `R::Object` in the cluster into `cluster`'s records; notifies `changed`
/// after every change (a relist's objects count once, when it is complete). The receiver
/// turns true once the first list is in.
fn spawn_records<R: Record>(
    client: &Client,
    cluster: &Arc<Cluster>,
    changed: &Arc<Notify>,
    metrics: &Arc<metrics::Discovery>,
    stop: &CancellationToken,
) -> watch::Receiver<bool> {
    let kind = R::Object::kind(&()).into_owned();
    let metrics = metrics.kind(&kind);
    debug!(%kind, "watching");
    let (listed, listed_rx) = watch::channel(false);
    let events = watcher(
        Api::<R::Object>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff();
    let (cluster, changed, stop) = (cluster.clone(), changed.clone(), stop.clone());
    tokio::spawn(async move {
        let mut events = std::pin::pin!(events);
        loop {
            let event = tokio::select! {
                () = stop.cancelled() => return,
                event = events.next() => event,
            };
            match event {
                Some(Ok(event)) => {
                    let (done, relist) = match &event {
                        watcher::Event::InitDone => (true, *listed.borrow()),
                        watcher::Event::Init | watcher::Event::InitApply(_) => (false, false),
                        _ => (true, false),
                    };
                    if !matches!(event, watcher::Event::Init | watcher::Event::InitDone) {
                        metrics.event();
                    }
                    let changed_records = cluster.apply::<R>(event).await;
                    if relist {
                        metrics.relisted();
                        info!(%kind, "relisted");
                    }
                    if done {
                        let first = listed.send_if_modified(|l| !std::mem::replace(l, true));
                        // A new snapshot only for a change to what the records keep.
                        if changed_records || first {
                            changed.notify_one();
                        }
                    }
                }
                Some(Err(e)) => {
                    metrics.failed();
                    watch_failed(&kind, &e);
                }
                None => return,
            }
        }
    });
    listed_rx
}

/// Watches every `K` in the cluster into a reflector store, trimming each object; notifies
/// `changed` after every event. For the policy kinds, whose objects are few and kept whole.
fn spawn_store<K>(
    client: &Client,
    trim: fn(&mut K),
    changed: &Arc<Notify>,
    stop: &CancellationToken,
) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&()).into_owned();
    debug!(%kind, "watching");
    let (changed, stop) = (changed.clone(), stop.clone());
    let events = watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(trim)
        .reflect(writer);
    tokio::spawn(async move {
        let mut events = std::pin::pin!(events);
        let mut listed = false;
        loop {
            let event = tokio::select! {
                () = stop.cancelled() => return,
                event = events.next() => event,
            };
            match event {
                // A relist (after 410 Gone) only replaces the store once it is complete.
                Some(Ok(watcher::Event::InitDone)) => {
                    if std::mem::replace(&mut listed, true) {
                        info!(%kind, "relisted");
                    }
                    changed.notify_one();
                }
                Some(Ok(_)) => changed.notify_one(),
                Some(Err(e)) => watch_failed(&kind, &e),
                None => return,
            }
        }
    });
    reader
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            trust_domain: "cluster.local".into(),
            peer_authentication: PeerAuthentication::Permissive,
            policy: policy::Settings::default(),
            file_policies: Arc::default(),
        }
    }

    fn object<O: serde::de::DeserializeOwned>(yaml: &str) -> O {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn apply<R: Record>(cluster: &Cluster, yaml: &str) {
        cluster.apply_blocking::<R>(watcher::Event::Apply(object(yaml)));
    }

    /// A running pod in `shop` on node-a; the last three add fields to its metadata, spec and
    /// status.
    fn pod(name: &str, created: &str, meta: &str, spec: &str, status: &str) -> String {
        format!(
            "metadata: {{ name: {name}, namespace: shop, creationTimestamp: '{created}'{meta} }}
spec: {{ nodeName: node-a, serviceAccountName: {name}, containers: [] {spec} }}
status: {{ phase: Running {status} }}"
        )
    }

    const T0: &str = "2026-11-22T10:00:00Z";

    fn namespace(name: &str, mode: Option<&str>) -> String {
        let labels = mode.map_or(String::new(), |m| {
            format!(", labels: {{ {MODE_LABEL}: {m} }}")
        });
        format!("metadata: {{ name: {name}{labels} }}")
    }

    fn snapshot(cluster: &Cluster) -> Snapshot {
        cluster.snapshot(&settings())
    }

    fn name_of(snap: &Snapshot, ip: &str) -> Option<String> {
        snap.workload_by_ip(ip.parse().unwrap())
            .map(|w| w.name.to_string())
    }

    #[test]
    fn another_enrollment_label_replaces_culverts() {
        let cluster = Cluster::new("cluster.local").enrolling_by("istio.io/dataplane-mode");
        apply::<NamespaceRecord>(
            &cluster,
            "metadata: { name: shop, labels: { istio.io/dataplane-mode: ambient } }",
        );
        apply::<NamespaceRecord>(&cluster, &namespace("other", Some(ENROLLED)));
        apply::<PodRecord>(&cluster, &pod("web", T0, "", "", ", podIP: 10.244.1.2"));
        apply::<PodRecord>(
            &cluster,
            &pod(
                "legacy",
                T0,
                ", labels: { istio.io/dataplane-mode: none }",
                "",
                ", podIP: 10.244.1.3",
            ),
        );
        let snap = snapshot(&cluster);
        let names: Vec<&str> = snap.enrolled_namespaces.iter().map(|n| &**n).collect();
        assert_eq!(names, ["shop"], "culvert's own label no longer enrolls");
        assert!(snap.enrolled(snap.workload("shop", "web").unwrap()));
        assert!(!snap.enrolled(snap.workload("shop", "legacy").unwrap()));
    }

    #[test]
    fn enrollment_comes_from_namespace_and_pod_labels() {
        let cluster = Cluster::new("cluster.local");
        apply::<PodRecord>(&cluster, &pod("web", T0, "", "", ", podIP: 10.244.1.2"));
        let opt_out = format!(", labels: {{ {MODE_LABEL}: {NOT_ENROLLED} }}");
        apply::<PodRecord>(
            &cluster,
            &pod("legacy", T0, &opt_out, "", ", podIP: 10.244.1.3"),
        );
        apply::<PodRecord>(
            &cluster,
            &pod(
                "nodeagent",
                T0,
                "",
                ", hostNetwork: true",
                ", podIP: 192.0.2.1",
            ),
        );
        apply::<NamespaceRecord>(&cluster, &namespace("shop", Some(ENROLLED)));
        apply::<NamespaceRecord>(&cluster, &namespace("other", None));
        let snap = snapshot(&cluster);
        let enrolled = |name| snap.enrolled(snap.workload("shop", name).unwrap());
        assert!(enrolled("web"));
        assert!(!enrolled("legacy"), "opted out by its label");
        assert!(!enrolled("nodeagent"), "host network");
        assert!(snap.workload("shop", "nodeagent").unwrap().ips.is_empty());
        assert_eq!(
            snap.workload_by_ip("10.244.1.2".parse().unwrap())
                .unwrap()
                .identity
                .as_str(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(
            snap.enrolled_namespaces
                .iter()
                .map(|n| &**n)
                .collect::<Vec<_>>(),
            ["shop"]
        );
        assert_eq!(
            snap.known_namespaces
                .iter()
                .map(|n| &**n)
                .collect::<Vec<_>>(),
            ["other", "shop"]
        );

        apply::<NamespaceRecord>(&cluster, &namespace("shop", Some("other")));
        let snap = snapshot(&cluster);
        assert!(!snap.enrolled(snap.workload("shop", "web").unwrap()));
    }

    #[test]
    fn finished_and_unscheduled_pods_are_left_out_and_the_newest_pod_keeps_a_reused_ip() {
        let cluster = Cluster::new("cluster.local");
        apply::<PodRecord>(&cluster, &pod("job", T0, "", "", ", podIP: 10.244.1.9"));
        apply::<PodRecord>(
            &cluster,
            "metadata: { name: queued, namespace: shop }\nspec: { containers: [] }",
        );
        apply::<PodRecord>(&cluster, &pod("old", T0, "", "", ", podIP: 10.244.1.7"));
        apply::<PodRecord>(
            &cluster,
            &pod("new", "2026-11-22T11:00:00Z", "", "", ", podIP: 10.244.1.7"),
        );
        assert!(snapshot(&cluster).workload("shop", "job").is_some());
        // The job finishes: an update to a state the snapshot leaves out removes the pod.
        apply::<PodRecord>(
            &cluster,
            &pod("job", T0, "", "", ", podIP: 10.244.1.9").replace("Running", "Succeeded"),
        );
        let snap = snapshot(&cluster);
        assert!(snap.workload("shop", "job").is_none());
        assert!(snap.workload("shop", "queued").is_none());
        assert!(snap.workload("shop", "old").unwrap().ips.is_empty());
        assert_eq!(name_of(&snap, "10.244.1.7").as_deref(), Some("new"));
        assert_eq!(cluster.counts(), [2, 0, 0, 0]);
    }

    #[test]
    fn a_relist_replaces_the_records_only_once_complete_and_deletes_remove_them() {
        let cluster = Cluster::new("cluster.local");
        apply::<PodRecord>(&cluster, &pod("a", T0, "", "", ", podIP: 10.244.1.2"));
        apply::<PodRecord>(&cluster, &pod("b", T0, "", "", ", podIP: 10.244.1.3"));
        cluster.apply_blocking::<PodRecord>(watcher::Event::Init);
        cluster.apply_blocking::<PodRecord>(watcher::Event::InitApply(object(&pod(
            "c",
            T0,
            "",
            "",
            ", podIP: 10.244.1.4",
        ))));
        let during = snapshot(&cluster);
        assert_eq!(
            name_of(&during, "10.244.1.2").as_deref(),
            Some("a"),
            "still the old list"
        );
        assert!(during.workload("shop", "c").is_none());
        cluster.apply_blocking::<PodRecord>(watcher::Event::InitDone);
        let after = snapshot(&cluster);
        assert!(after.workload("shop", "a").is_none(), "not in the new list");
        assert_eq!(name_of(&after, "10.244.1.4").as_deref(), Some("c"));
        cluster
            .apply_blocking::<PodRecord>(watcher::Event::Delete(object(&pod("c", T0, "", "", ""))));
        assert_eq!(snapshot(&cluster).workloads().count(), 0);
        assert_eq!(cluster.counts(), [0, 0, 0, 0]);
    }

    #[test]
    fn pods_share_their_namespace_identity_and_label_set() {
        let cluster = Cluster::new("cluster.local");
        let labels = ", labels: { app: web, pod-template-hash: 5d8f }, ownerReferences: [{ \
            apiVersion: apps/v1, kind: ReplicaSet, name: web-5d8f, uid: u1, controller: true }]";
        apply::<PodRecord>(&cluster, &pod("web", T0, labels, "", ", podIP: 10.244.1.2"));
        let second = pod("web", T0, labels, "", ", podIP: 10.244.1.3").replacen(
            "name: web",
            "name: web-2",
            1,
        );
        apply::<PodRecord>(&cluster, &second);
        let snap = snapshot(&cluster);
        let (a, b) = (
            snap.workload("shop", "web").unwrap(),
            snap.workload("shop", "web-2").unwrap(),
        );
        assert!(Arc::ptr_eq(&a.namespace, &b.namespace));
        assert_eq!(
            &*a.workload_name, "web",
            "the Deployment, from its ReplicaSet"
        );
        assert!(Arc::ptr_eq(&a.workload_name, &b.workload_name));
        assert_eq!(
            &*a.workload_name, "web",
            "the Deployment, from its ReplicaSet"
        );
        assert_eq!(a.identity, b.identity);
        assert_eq!(a.labels, b.labels);
        assert_eq!(b.labels.get("app"), Some("web"));
        assert!(
            a.labels
                .iter()
                .zip(b.labels.iter())
                .all(|(x, y)| std::ptr::eq(x.1, y.1))
        );
    }

    #[test]
    fn services_resolve_target_ports_per_slice_and_keep_ready_endpoints() {
        let cluster = Cluster::new("cluster.local");
        apply::<ServiceRecord>(
            &cluster,
            "metadata: { name: echo, namespace: shop }
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ports:
    - { name: http, port: 80, targetPort: web }
    - { name: raw, port: 81, targetPort: 9000 }
    - { name: dns, port: 53, protocol: UDP }
    - { name: named-without-slice-port, port: 82, targetPort: nope }",
        );
        apply::<SliceRecord>(
            &cluster,
            &format!(
                "metadata: {{ name: echo-x, namespace: shop, labels: {{ {SERVICE_NAME_LABEL}: echo }} }}
addressType: IPv4
ports: [{{ name: http, port: 8080 }}, {{ name: raw, port: 9001 }}]
endpoints:
  - {{ addresses: [10.244.1.2], conditions: {{ ready: true }} }}
  - {{ addresses: [10.244.2.2], conditions: {{ ready: false }} }}
  - {{ addresses: [10.244.2.3] }}"
            ),
        );
        // Mid-rollout, the new pods number the named port differently: their own slice.
        apply::<SliceRecord>(
            &cluster,
            &format!(
                "metadata: {{ name: echo-y, namespace: shop, labels: {{ {SERVICE_NAME_LABEL}: echo }} }}
addressType: IPv4
ports: [{{ name: http, port: 8443 }}]
endpoints: [{{ addresses: [10.244.1.9] }}]"
            ),
        );
        apply::<SliceRecord>(
            &cluster,
            &format!(
                "metadata: {{ name: x, namespace: elsewhere, labels: {{ {SERVICE_NAME_LABEL}: echo }} }}
addressType: IPv4
endpoints: [{{ addresses: [10.244.3.3] }}]"
            ),
        );
        apply::<ServiceRecord>(
            &cluster,
            "metadata: { name: db, namespace: shop }\nspec: { clusterIP: None, ports: [{ port: 5432 }] }",
        );
        let snap = snapshot(&cluster);
        let endpoints = |p: u16| -> Option<Vec<String>> {
            let port = snap.service(format!("10.96.0.10:{p}").parse().unwrap())?;
            Some(port.endpoints.iter().map(ToString::to_string).collect())
        };
        assert_eq!(
            endpoints(80).unwrap(),
            ["10.244.1.2:8080", "10.244.1.9:8443", "10.244.2.3:8080"],
            "each slice's number for the named port, ready endpoints only"
        );
        assert_eq!(
            endpoints(81).unwrap(),
            ["10.244.1.2:9001", "10.244.2.3:9001"],
            "the slice's port wins; a slice without the port name has no endpoint for it"
        );
        assert!(endpoints(53).is_none(), "UDP is not carried");
        assert_eq!(
            endpoints(82).unwrap(),
            Vec::<String>::new(),
            "a named target port that no slice resolves has no endpoint"
        );
        assert_eq!(snap.services().count(), 3);
        assert_eq!(
            cluster.counts(),
            [0, 0, 1, 3],
            "the headless Service is left out"
        );
    }

    #[test]
    fn a_nodes_topology_labels_are_its_pods_locality_until_they_go() {
        let cluster = Cluster::new("cluster.local");
        apply::<PodRecord>(&cluster, &pod("web", T0, "", "", ", podIP: 10.244.1.2"));
        let node = |name: &str, labels: &str| {
            format!(
                "apiVersion: meta.k8s.io/v1
kind: PartialObjectMetadata
metadata: {{ name: {name}, labels: {{ {labels} }} }}"
            )
        };
        let locality = |snap: &Snapshot| {
            let web = snap.workload("shop", "web").unwrap();
            let l = snap.locality(&web.node)?;
            Some(format!("{}/{}/{}", l.region, l.zone, l.subzone))
        };
        assert_eq!(locality(&snapshot(&cluster)), None);
        apply::<NodeRecord>(&cluster, &node("node-a", "kubernetes.io/hostname: node-a"));
        assert_eq!(locality(&snapshot(&cluster)), None, "no topology labels");
        assert_eq!(cluster.inner.blocking_lock().collections.nodes.len(), 0);
        apply::<NodeRecord>(
            &cluster,
            &node(
                "node-a",
                "topology.kubernetes.io/region: eu-west, topology.kubernetes.io/zone: eu-west-1a, \
                 topology.istio.io/subzone: rack-4",
            ),
        );
        apply::<NodeRecord>(
            &cluster,
            &node("node-b", "topology.kubernetes.io/zone: eu-west-1b"),
        );
        let before = snapshot(&cluster);
        assert_eq!(
            locality(&before).as_deref(),
            Some("eu-west/eu-west-1a/rack-4")
        );

        // Relabelled: later snapshots have the new zone, one cut before keeps the old.
        apply::<NodeRecord>(
            &cluster,
            &node("node-a", "topology.kubernetes.io/zone: eu-west-1c"),
        );
        assert_eq!(
            locality(&snapshot(&cluster)).as_deref(),
            Some("/eu-west-1c/")
        );
        assert_eq!(
            locality(&before).as_deref(),
            Some("eu-west/eu-west-1a/rack-4")
        );
        // The labels go, then come back and the node goes.
        apply::<NodeRecord>(&cluster, &node("node-a", ""));
        assert_eq!(locality(&snapshot(&cluster)), None);
        apply::<NodeRecord>(
            &cluster,
            &node("node-a", "topology.kubernetes.io/zone: eu-west-1c"),
        );
        cluster.apply_blocking::<NodeRecord>(watcher::Event::Delete(object(&node("node-a", ""))));
        assert_eq!(locality(&snapshot(&cluster)), None);
        let b = snapshot(&cluster);
        assert_eq!(&*b.locality("node-b").unwrap().zone, "eu-west-1b");
    }

    #[test]
    fn this_nodes_ready_endpoints_name_their_service_port_until_it_goes() {
        let cluster = Cluster::new("cluster.local").on_node("node-a");
        apply::<ServiceRecord>(
            &cluster,
            "metadata: { name: echo, namespace: shop }
spec:
  clusterIPs: [10.96.0.10, fd00::10]
  ports: [{ name: http, port: 80, targetPort: 8080 }, { name: raw, port: 81, targetPort: 9000 }]",
        );
        let slice = |endpoints: &str| {
            format!(
                "metadata: {{ name: echo-x, namespace: shop, labels: {{ {SERVICE_NAME_LABEL}: echo }} }}
addressType: IPv4
ports: [{{ name: http, port: 8080 }}, {{ name: raw, port: 9000 }}]
endpoints: {endpoints}"
            )
        };
        apply::<SliceRecord>(
            &cluster,
            &slice(
                "
  - { addresses: [10.244.1.2], nodeName: node-a }
  - { addresses: [10.244.1.3], nodeName: node-a, conditions: { ready: false } }
  - { addresses: [10.244.2.2], nodeName: node-b }
  - { addresses: [10.244.1.4] }",
            ),
        );
        let serves = |snap: &Snapshot, endpoint: &str| {
            snap.endpoint_service(endpoint.parse().unwrap())
                .map(|p| (p.hostname(), p.endpoints.len()))
        };
        let snap = snapshot(&cluster);
        let echo = Some(("echo.shop.svc.cluster.local".to_owned(), 3));
        assert_eq!(serves(&snap, "10.244.1.2:8080"), echo);
        assert_eq!(serves(&snap, "10.244.1.2:9000"), echo);
        assert_eq!(serves(&snap, "10.244.1.2:9999"), None, "not a target port");
        assert_eq!(serves(&snap, "10.244.1.3:8080"), None, "not ready");
        assert_eq!(serves(&snap, "10.244.2.2:8080"), None, "another node's");
        assert_eq!(serves(&snap, "10.244.1.4:8080"), None, "no node named");
        // Both VIPs and the endpoint share one entry per port.
        let v4 = snap.service("10.96.0.10:80".parse().unwrap()).unwrap();
        let v6 = snap.service("[fd00::10]:80".parse().unwrap()).unwrap();
        let local = snap
            .endpoint_service("10.244.1.2:8080".parse().unwrap())
            .unwrap();
        assert!(Arc::ptr_eq(v4, v6) && Arc::ptr_eq(v4, local));

        // The endpoint leaves the slice: it names no Service any more.
        apply::<SliceRecord>(
            &cluster,
            &slice("[{ addresses: [10.244.2.2], nodeName: node-b }]"),
        );
        assert_eq!(serves(&snapshot(&cluster), "10.244.1.2:8080"), None);
        apply::<SliceRecord>(
            &cluster,
            &slice("[{ addresses: [10.244.1.2], nodeName: node-a }]"),
        );
        assert!(serves(&snapshot(&cluster), "10.244.1.2:8080").is_some());
        // And the Service goes.
        cluster.apply_blocking::<ServiceRecord>(watcher::Event::Delete(object(
            "metadata: { name: echo, namespace: shop }\nspec: { clusterIP: 10.96.0.10 }",
        )));
        assert_eq!(serves(&snapshot(&cluster), "10.244.1.2:8080"), None);
    }

    #[test]
    fn an_endpoint_two_services_select_names_the_other_once_one_goes() {
        let cluster = Cluster::new("cluster.local").on_node("node-a");
        let service = |name: &str, vip: u8| {
            format!(
                "metadata: {{ name: {name}, namespace: shop }}
spec: {{ clusterIP: 10.96.0.{vip}, ports: [{{ name: http, port: 80, targetPort: 8080 }}] }}"
            )
        };
        for (name, vip) in [("api", 10), ("web", 11)] {
            apply::<ServiceRecord>(&cluster, &service(name, vip));
            apply::<SliceRecord>(
                &cluster,
                &format!(
                    "metadata: {{ name: {name}-x, namespace: shop, labels: {{ {SERVICE_NAME_LABEL}: {name} }} }}
addressType: IPv4
ports: [{{ name: http, port: 8080 }}]
endpoints: [{{ addresses: [10.244.1.2], nodeName: node-a }}]"
                ),
            );
        }
        let named = |cluster: &Cluster| {
            let snap = snapshot(cluster);
            let port = snap.endpoint_service("10.244.1.2:8080".parse().unwrap())?;
            Some(port.service.to_string())
        };
        let first = named(&cluster).unwrap();
        let (gone, other) = match &*first {
            "api" => (("api", 10), "web"),
            _ => (("web", 11), "api"),
        };
        let delete = |(name, vip): (&str, u8)| {
            cluster.apply_blocking::<ServiceRecord>(watcher::Event::Delete(object(&service(
                name, vip,
            ))));
        };
        delete(gone);
        assert_eq!(named(&cluster).as_deref(), Some(other));
        delete((other, if other == "api" { 10 } else { 11 }));
        assert_eq!(named(&cluster), None);
    }

    #[test]
    fn a_vip_that_collides_with_a_pod_or_another_service_is_left_out_not_the_whole_update() {
        let cluster = Cluster::new("cluster.local");
        apply::<PodRecord>(&cluster, &pod("web", T0, "", "", ", podIP: 10.244.1.2"));
        let svc = |name: &str, vip: &str| {
            format!(
                "metadata: {{ name: {name}, namespace: shop }}\nspec: {{ clusterIP: {vip}, ports: [{{ port: 80 }}] }}"
            )
        };
        apply::<ServiceRecord>(&cluster, &svc("squatter", "10.244.1.2"));
        apply::<ServiceRecord>(&cluster, &svc("a", "10.96.0.1"));
        apply::<ServiceRecord>(&cluster, &svc("b", "10.96.0.1"));
        apply::<ServiceRecord>(&cluster, &svc("c", "10.96.0.2"));
        let snap = snapshot(&cluster);
        assert_eq!(name_of(&snap, "10.244.1.2").as_deref(), Some("web"));
        let names: std::collections::BTreeSet<String> = snap
            .services()
            .map(|(_, p)| p.service.to_string())
            .collect();
        assert_eq!(
            snap.services().count(),
            2,
            "one of a and b, and c: {names:?}"
        );
        assert!(names.contains("c") && !names.contains("squatter"));
    }

    #[test]
    fn an_endpoint_names_its_pod_before_the_pod_status_does() {
        let cluster = Cluster::new("cluster.local");
        apply::<PodRecord>(&cluster, &pod("api", T0, "", "", ""));
        apply::<PodRecord>(&cluster, &pod("agent", T0, "", ", hostNetwork: true", ""));
        apply::<PodRecord>(&cluster, &pod("old", T0, "", "", ", podIP: 10.244.1.8"));
        apply::<NamespaceRecord>(&cluster, &namespace("shop", Some(ENROLLED)));
        apply::<SliceRecord>(
            &cluster,
            &format!(
                "metadata: {{ name: api-x, namespace: shop, labels: {{ {SERVICE_NAME_LABEL}: api }} }}
addressType: IPv4
endpoints:
  - {{ addresses: [10.244.1.7], targetRef: {{ kind: Pod, name: api }} }}
  - {{ addresses: [192.0.2.1], targetRef: {{ kind: Pod, name: agent, namespace: shop }} }}
  - {{ addresses: [10.244.1.8], targetRef: {{ kind: Pod, name: api }} }}
  - {{ addresses: [10.244.1.9], targetRef: {{ kind: Pod, name: gone }} }}"
            ),
        );
        // A slice can name only a pod of its own namespace: whoever may write slices in one
        // namespace cannot give an address to another namespace's pod.
        apply::<SliceRecord>(
            &cluster,
            &format!(
                "metadata: {{ name: lure, namespace: other, labels: {{ {SERVICE_NAME_LABEL}: lure }} }}
addressType: IPv4
endpoints:
  - {{ addresses: [10.244.1.10], targetRef: {{ kind: Pod, name: api, namespace: shop }} }}"
            ),
        );
        let snap = snapshot(&cluster);
        let by_ip = |ip| name_of(&snap, ip);
        assert_eq!(
            by_ip("10.244.1.7").as_deref(),
            Some("api"),
            "adopted from the slice"
        );
        assert_eq!(
            by_ip("10.244.1.8").as_deref(),
            Some("old"),
            "claimed by a pod's own status"
        );
        assert_eq!(
            by_ip("192.0.2.1"),
            None,
            "a host-network pod's node address"
        );
        assert_eq!(by_ip("10.244.1.9"), None, "no such pod");
        assert_eq!(by_ip("10.244.1.10"), None, "another namespace's pod");
    }

    /// A cluster's view, comparable across clusters: each workload's addresses (sorted), who
    /// holds each address, each Service port's endpoints.
    fn summary(snap: &Snapshot) -> String {
        let mut lines: Vec<String> = snap
            .workloads()
            .map(|w| {
                let mut ips = w.ips.to_vec();
                ips.sort();
                for ip in &ips {
                    let holder = snap.workload_by_ip(*ip).unwrap();
                    assert!(Arc::ptr_eq(holder, w), "{ip}: by-IP and by-name disagree");
                }
                format!("pod {} {ips:?}", w.name)
            })
            .chain(
                snap.services()
                    .map(|(vip, port)| format!("vip {vip} {} {:?}", port.service, port.endpoints)),
            )
            .collect();
        lines.sort();
        lines.join("\n")
    }

    /// The view is updated per event, so every order of the same events must end where a
    /// fresh list of the final objects starts: contested addresses, adoption by endpoints,
    /// finished and host-network pods, deletes, slices moving between Services, and a relist.
    #[test]
    fn events_in_any_order_end_where_a_fresh_list_of_the_same_objects_starts() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % n
        };
        for round in 0..300 {
            let cluster = Cluster::new("cluster.local");
            // The last object of each name, or none once deleted.
            let mut pods: Vec<Option<String>> = vec![None; 6];
            let mut slices: Vec<Option<String>> = vec![None; 3];
            for (i, name) in ["a", "b"].iter().enumerate() {
                apply::<ServiceRecord>(
                    &cluster,
                    &format!(
                        "metadata: {{ name: {name}, namespace: shop }}\nspec: {{ clusterIP: 10.96.0.{i}, ports: [{{ name: http, port: 80 }}] }}"
                    ),
                );
            }
            for _ in 0..40 {
                if next(3) > 0 {
                    let i = next(6) as usize;
                    if next(6) == 0 {
                        if let Some(yaml) = pods[i].take() {
                            cluster
                                .apply_blocking::<PodRecord>(watcher::Event::Delete(object(&yaml)));
                        }
                        continue;
                    }
                    // Statuses contest four addresses; endpoints name their pods by others.
                    let ips: Vec<String> = (1..=4)
                        .filter(|_| next(3) == 0)
                        .map(|k| format!("{{ ip: 10.244.0.{k} }}"))
                        .collect();
                    let created = format!("2026-11-22T1{}:00:00Z", next(3));
                    let host = if next(8) == 0 {
                        ", hostNetwork: true"
                    } else {
                        ""
                    };
                    let phase = if next(10) == 0 {
                        "Succeeded"
                    } else {
                        "Running"
                    };
                    let yaml = pod(
                        &format!("p{i}"),
                        &created,
                        "",
                        host,
                        &format!(", podIPs: [{}]", ips.join(", ")),
                    )
                    .replace("Running", phase);
                    apply::<PodRecord>(&cluster, &yaml);
                    pods[i] = Some(yaml);
                } else {
                    let j = next(3) as usize;
                    if next(5) == 0 {
                        if let Some(yaml) = slices[j].take() {
                            cluster.apply_blocking::<SliceRecord>(watcher::Event::Delete(object(
                                &yaml,
                            )));
                        }
                        continue;
                    }
                    let mut endpoints = Vec::new();
                    for k in 0..6 {
                        if next(2) == 0 {
                            let ready = next(4) > 0;
                            endpoints.push(format!("{{ addresses: [10.244.1.{k}], conditions: {{ ready: {ready} }}, targetRef: {{ kind: Pod, name: p{k} }} }}"));
                        }
                    }
                    let service = ["a", "b"][next(2) as usize];
                    let yaml = format!(
                        "metadata: {{ name: s{j}, namespace: shop, labels: {{ {SERVICE_NAME_LABEL}: {service} }} }}
addressType: IPv4
ports: [{{ name: http, port: 8080 }}]
endpoints: [{}]",
                        endpoints.join(", ")
                    );
                    apply::<SliceRecord>(&cluster, &yaml);
                    slices[j] = Some(yaml);
                }
            }
            let fresh = Cluster::new("cluster.local");
            let relisted_pods: Vec<&String> = pods.iter().flatten().collect();
            for yaml in slices.iter().flatten() {
                apply::<SliceRecord>(&fresh, yaml);
            }
            for yaml in &relisted_pods {
                apply::<PodRecord>(&fresh, yaml);
            }
            for (i, name) in ["a", "b"].iter().enumerate() {
                apply::<ServiceRecord>(
                    &fresh,
                    &format!(
                        "metadata: {{ name: {name}, namespace: shop }}\nspec: {{ clusterIP: 10.96.0.{i}, ports: [{{ name: http, port: 80 }}] }}"
                    ),
                );
            }
            let want = summary(&snapshot(&fresh));
            assert_eq!(summary(&snapshot(&cluster)), want, "round {round}");

            // A relist of the same pods changes nothing.
            cluster.apply_blocking::<PodRecord>(watcher::Event::Init);
            for yaml in &relisted_pods {
                cluster.apply_blocking::<PodRecord>(watcher::Event::InitApply(object(yaml)));
            }
            cluster.apply_blocking::<PodRecord>(watcher::Event::InitDone);
            assert_eq!(
                summary(&snapshot(&cluster)),
                want,
                "round {round}, relisted"
            );
        }
    }
}
