//! Kubernetes discovery: watches Pods, Namespaces, Services, EndpointSlices and Istio's
//! PeerAuthentication and AuthorizationPolicy, and turns them into state snapshots.
//!
//! Owns the watches (kube-rs watchers feeding reflector stores, objects trimmed to the fields
//! used here before they are cached) and the translation from API objects to
//! [`crate::state`] types. The translation is pure and unit-tested; the watches are
//! tested against a real kube-apiserver (tests/kube). While the API is unreachable the stores
//! keep their last contents and the watchers retry with backoff; a watch that expires relists,
//! and the store swaps in the new list only once it is complete.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

mod istio;

use crate::identity::Id;
use crate::policy::{self, Policies};
use crate::state::{self, PeerAuthentication, ServiceSpec, Snapshot, Workload};
use istio::Istio;

/// The label that enrolls a namespace (value [`ENROLLED`]) or opts a pod out ([`NOT_ENROLLED`]).
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

/// The watched collections; each is kept current by its own task.
pub struct Watches {
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
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
    /// Starts one watch per kind, cluster-wide, until `stop`.
    pub fn start(client: &Client, stop: &CancellationToken) -> Self {
        let changed = Arc::new(Notify::new());
        Self {
            pods: spawn_watch(client, trim_pod, &changed, stop),
            namespaces: spawn_watch(client, trim_namespace, &changed, stop),
            services: spawn_watch(client, trim_service, &changed, stop),
            slices: spawn_watch(client, trim_slice, &changed, stop),
            peer: spawn_watch(client, istio::trim, &changed, stop),
            authz: spawn_watch(client, istio::trim, &changed, stop),
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

    /// Waits until every collection has been listed once (the policy kinds only if the
    /// cluster serves them: a DENY must be known before the first connection is admitted).
    pub async fn synced(&self, client: &Client) {
        // An error means the writer is gone, i.e. we are stopping: nothing left to wait for.
        let _ = tokio::join!(
            self.pods.wait_until_ready(),
            self.namespaces.wait_until_ready(),
            self.services.wait_until_ready(),
            self.slices.wait_until_ready(),
        );
        if self.policy_kinds_served(client).await {
            let _ = tokio::join!(self.peer.wait_until_ready(), self.authz.wait_until_ready());
        }
    }

    /// Resolves after the next change to any collection (at once if one happened since the
    /// last call).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Builds a snapshot from the collections' current contents.
    pub fn snapshot(&self, settings: &Settings) -> Result<Snapshot, state::Error> {
        let snapshot = build(
            settings,
            &self.pods.state(),
            &self.namespaces.state(),
            &self.services.state(),
            &self.slices.state(),
        )?;
        Ok(snapshot.with_policies(self.policies(settings)))
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

/// Watches every `K` in the cluster into a store, trimming each object; notifies `changed`
/// after every event.
fn spawn_watch<K>(
    client: &Client,
    trim: fn(&mut K),
    changed: &Arc<Notify>,
    stop: &CancellationToken,
) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&()).into_owned();
    debug!(%kind, "watching");
    let (changed, stop) = (changed.clone(), stop.clone());
    let events = watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(trim)
        .reflect(writer);
    let store = reader.clone();
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
                    if listed {
                        info!(%kind, objects = store.state().len(), "relisted");
                    }
                    listed = true;
                    changed.notify_one();
                }
                Some(Ok(_)) => changed.notify_one(),
                // etcd compacted past our resource version: the watcher relists.
                Some(Err(watcher::Error::WatchError(status))) if status.code == 410 => {
                    info!(%kind, "watch expired; relisting, serving the last state");
                }
                // The backoff wrapper retries; until it succeeds the store keeps what it had.
                Some(Err(e)) => {
                    warn!(%kind, error = %e, "watch failed; retrying, serving the last state");
                }
                None => return,
            }
        }
    });
    reader
}

// Trimming: keep only what `build` reads, so a large cluster costs little memory.

fn trim_meta(meta: &mut kube::api::ObjectMeta, keep_labels: bool) {
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
    if !keep_labels {
        meta.labels = None;
    }
}

fn trim_pod(pod: &mut Pod) {
    trim_meta(&mut pod.metadata, true);
    if let Some(spec) = pod.spec.take() {
        pod.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            node_name: spec.node_name,
            service_account_name: spec.service_account_name,
            host_network: spec.host_network,
            ..Default::default()
        });
    }
    if let Some(status) = pod.status.take() {
        pod.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            ..Default::default()
        });
    }
}

fn trim_namespace(ns: &mut Namespace) {
    trim_meta(&mut ns.metadata, true);
    ns.spec = None;
    ns.status = None;
}

fn trim_service(svc: &mut Service) {
    trim_meta(&mut svc.metadata, false);
    svc.status = None;
    if let Some(spec) = svc.spec.take() {
        svc.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
            cluster_ip: spec.cluster_ip,
            cluster_ips: spec.cluster_ips,
            // `build` reads each port's name, number and protocol; target ports come from the
            // EndpointSlices.
            ports: spec.ports.map(|ports| {
                ports
                    .into_iter()
                    .map(|p| k8s_openapi::api::core::v1::ServicePort {
                        name: p.name,
                        port: p.port,
                        protocol: p.protocol,
                        ..Default::default()
                    })
                    .collect()
            }),
            type_: spec.type_,
            ..Default::default()
        });
    }
}

fn trim_slice(slice: &mut EndpointSlice) {
    trim_meta(&mut slice.metadata, true);
    for endpoint in slice.endpoints.iter_mut().flatten() {
        endpoint.hints = None;
        endpoint.deprecated_topology = None;
        if let Some(target) = endpoint.target_ref.take() {
            endpoint.target_ref = Some(k8s_openapi::api::core::v1::ObjectReference {
                kind: target.kind,
                name: target.name,
                namespace: target.namespace,
                ..Default::default()
            });
        }
        endpoint.hostname = None;
        endpoint.zone = None;
    }
}

/// Translates the API's objects into a snapshot. Pods that have finished are left out; when
/// two running pods claim one IP (a stale status), the newer keeps it.
pub fn build(
    settings: &Settings,
    pods: &[Arc<Pod>],
    namespaces: &[Arc<Namespace>],
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
) -> Result<Snapshot, state::Error> {
    let enrolled_namespaces: BTreeSet<String> = namespaces
        .iter()
        .filter(|ns| label(&ns.metadata, MODE_LABEL) == Some(ENROLLED))
        .filter_map(|ns| ns.metadata.name.clone())
        .collect();

    let mut pods: Vec<&Pod> = pods.iter().map(AsRef::as_ref).collect();
    // Newest first, so the newest pod claims a contested IP.
    pods.sort_by(|a, b| {
        b.metadata
            .creation_timestamp
            .cmp(&a.metadata.creation_timestamp)
    });
    let mut claimed = std::collections::HashSet::new();
    let mut workloads = Vec::with_capacity(pods.len());
    // Pods an EndpointSlice may give an address to: all but host-network ones, whose endpoint
    // is their node's address.
    let mut adoptable: HashMap<(&str, &str), usize> = HashMap::new();
    for &pod in &pods {
        let Some(mut workload) = workload(&settings.trust_domain, pod) else {
            continue;
        };
        let host_network = pod.spec.as_ref().and_then(|s| s.host_network) == Some(true);
        if let (false, Some(namespace), Some(name)) = (
            host_network,
            pod.metadata.namespace.as_deref(),
            pod.metadata.name.as_deref(),
        ) {
            adoptable.insert((namespace, name), workloads.len());
        }
        workload.ips.retain(|ip| {
            let fresh = claimed.insert(*ip);
            if !fresh {
                // Debug: every rebuild would repeat it while the stale status lasts.
                debug!(pod = %format!("{}/{}", workload.namespace, workload.name), %ip,
                    "IP also claimed by a newer pod; ignoring it for this one");
            }
            fresh
        });
        workloads.push(workload);
    }

    adopt_endpoint_ips(&mut workloads, &adoptable, &mut claimed, slices);

    let mut by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        let (Some(namespace), Some(service)) = (
            slice.metadata.namespace.as_deref(),
            label(&slice.metadata, SERVICE_NAME_LABEL),
        ) else {
            continue;
        };
        by_service
            .entry((namespace, service))
            .or_default()
            .push(slice);
    }
    let services = services
        .iter()
        .flat_map(|svc| {
            let key = (
                svc.metadata.namespace.as_deref().unwrap_or_default(),
                svc.metadata.name.as_deref().unwrap_or_default(),
            );
            let slices = by_service.get(&key).map_or(&[][..], Vec::as_slice);
            service(svc, slices)
        })
        .collect();

    let mut snapshot = Snapshot::build(
        &settings.trust_domain,
        settings.peer_authentication,
        enrolled_namespaces,
        workloads,
        services,
    )?;
    snapshot.know_namespaces(namespaces.iter().filter_map(|ns| ns.metadata.name.clone()));
    Ok(snapshot)
}

/// Gives a pod the endpoint addresses its EndpointSlices list for it (`targetRef`) before its
/// own status does: the two objects arrive separately, and until the pod's IP is known a
/// connection to that endpoint would leave the node unencrypted. Addresses another pod claims
/// are left alone.
fn adopt_endpoint_ips(
    workloads: &mut [Workload],
    adoptable: &HashMap<(&str, &str), usize>,
    claimed: &mut std::collections::HashSet<IpAddr>,
    slices: &[Arc<EndpointSlice>],
) {
    for slice in slices {
        for endpoint in slice.endpoints.iter().flatten() {
            let Some(target) = &endpoint.target_ref else {
                continue;
            };
            let namespace = target
                .namespace
                .as_deref()
                .or(slice.metadata.namespace.as_deref());
            let (Some("Pod"), Some(name), Some(namespace)) =
                (target.kind.as_deref(), target.name.as_deref(), namespace)
            else {
                continue;
            };
            let Some(&i) = adoptable.get(&(namespace, name)) else {
                continue;
            };
            for ip in endpoint.addresses.iter().filter_map(|a| a.parse().ok()) {
                if claimed.insert(ip) {
                    workloads[i].ips.push(ip);
                }
            }
        }
    }
}

fn label<'a>(meta: &'a kube::api::ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

/// A pod as a workload; `None` for pods that are not scheduled, have finished, or have names
/// that make no SPIFFE id.
fn workload(trust_domain: &str, pod: &Pod) -> Option<Workload> {
    let (name, namespace) = (pod.metadata.name.clone()?, pod.metadata.namespace.clone()?);
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.clone()?;
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return None;
    }
    let service_account = spec
        .service_account_name
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let identity = match Id::new(trust_domain, &namespace, &service_account) {
        Ok(id) => id,
        Err(e) => {
            warn!(pod = %format!("{namespace}/{name}"), error = %e, "pod left out");
            return None;
        }
    };
    let host_network = spec.host_network == Some(true);
    // A host-network pod shares the node's addresses: it can neither be enrolled nor be told
    // apart by IP.
    let ips = if host_network {
        Vec::new()
    } else {
        pod_ips(status)
    };
    let enrollment = if host_network {
        Some(false)
    } else {
        match label(&pod.metadata, MODE_LABEL) {
            Some(NOT_ENROLLED) => Some(false),
            Some(ENROLLED) => Some(true),
            _ => None,
        }
    };
    Some(Workload {
        name,
        namespace,
        service_account,
        node,
        ips,
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        enrolled: false,
        enrollment,
        peer_authentication: None,
        identity,
    })
}

fn pod_ips(status: Option<&k8s_openapi::api::core::v1::PodStatus>) -> Vec<IpAddr> {
    let Some(status) = status else {
        return Vec::new();
    };
    let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
    let mut ips: Vec<IpAddr> = listed
        .chain(status.pod_ip.as_deref())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    ips.sort_unstable();
    ips.dedup();
    ips
}

/// A Service's VIPs, one spec per cluster IP. Each EndpointSlice's port of the same name gives
/// the target port of that slice's endpoints (the endpoint controller groups endpoints by the
/// number a named port resolves to); a slice without that port adds no endpoint to it, as
/// with kube-proxy. Endpoints count as ready unless their `ready` condition is false, as the
/// API advises.
fn service(svc: &Service, slices: &[&EndpointSlice]) -> Vec<ServiceSpec> {
    let (Some(name), Some(namespace), Some(spec)) = (
        svc.metadata.name.as_ref(),
        svc.metadata.namespace.as_ref(),
        svc.spec.as_ref(),
    ) else {
        return Vec::new();
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Vec::new();
    }
    let vips: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.as_ref())
        .filter_map(|ip| ip.parse().ok())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let ports: Vec<(u16, Vec<SocketAddr>)> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok().filter(|&port| port != 0)?;
            let port_name = p.name.as_deref().unwrap_or_default();
            let endpoints = slices
                .iter()
                .filter_map(|s| {
                    let target = s
                        .ports
                        .iter()
                        .flatten()
                        .find(|sp| sp.name.as_deref().unwrap_or_default() == port_name)
                        .and_then(|sp| u16::try_from(sp.port?).ok())
                        .filter(|&t| t != 0)?;
                    Some((s, target))
                })
                .flat_map(|(s, target)| {
                    ready_addresses(s).map(move |ip| SocketAddr::new(ip, target))
                })
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            Some((port, endpoints))
        })
        .collect();
    if ports.is_empty() {
        return Vec::new();
    }
    vips.into_iter()
        .map(|vip| ServiceSpec {
            name: name.clone(),
            namespace: namespace.clone(),
            vip,
            ports: ports.clone(),
        })
        .collect()
}

/// The addresses of a slice's endpoints that are not known to be unready.
fn ready_addresses(slice: &EndpointSlice) -> impl Iterator<Item = IpAddr> + '_ {
    slice
        .endpoints
        .iter()
        .flatten()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .flat_map(|e| e.addresses.iter().filter_map(|a| a.parse().ok()))
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

    fn from_yaml<K: DeserializeOwned>(yaml: &str) -> Arc<K> {
        Arc::new(serde_yaml::from_str(yaml).unwrap())
    }

    fn pod(name: &str, extra: &str) -> Arc<Pod> {
        from_yaml(&format!(
            "metadata: {{ name: {name}, namespace: shop, creationTimestamp: '2026-11-22T10:00:00Z' }}
spec: {{ nodeName: node-a, serviceAccountName: {name}, containers: [] }}
status: {{ phase: Running }}
{extra}"
        ))
    }

    fn with_ip(pod: &Arc<Pod>, ip: &str) -> Arc<Pod> {
        let mut pod = (**pod).clone();
        pod.status.get_or_insert_default().pod_ip = Some(ip.into());
        Arc::new(pod)
    }

    fn namespace(name: &str, mode: Option<&str>) -> Arc<Namespace> {
        let labels = mode.map_or(String::new(), |m| {
            format!(", labels: {{ {MODE_LABEL}: {m} }}")
        });
        from_yaml(&format!("metadata: {{ name: {name}{labels} }}"))
    }

    #[test]
    fn enrollment_comes_from_namespace_and_pod_labels() {
        let pods = [
            with_ip(&pod("web", ""), "10.244.1.2"),
            with_ip(&pod("legacy", ""), "10.244.1.3"),
            pod("nodeagent", ""),
            with_ip(&pod("pending", ""), "10.244.1.5"),
        ];
        let mut legacy = (*pods[1]).clone();
        legacy
            .metadata
            .labels
            .get_or_insert_default()
            .insert(MODE_LABEL.into(), NOT_ENROLLED.into());
        let mut host = (*pods[2]).clone();
        host.spec.as_mut().unwrap().host_network = Some(true);
        host.status.as_mut().unwrap().pod_ip = Some("192.0.2.1".into());
        let pods = [
            pods[0].clone(),
            Arc::new(legacy),
            Arc::new(host),
            pods[3].clone(),
        ];
        let snap = build(
            &settings(),
            &pods,
            &[namespace("shop", Some(ENROLLED)), namespace("other", None)],
            &[],
            &[],
        )
        .unwrap();
        let enrolled = |name| snap.workload("shop", name).unwrap().enrolled;
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
            snap.enrolled_namespaces.iter().collect::<Vec<_>>(),
            ["shop"]
        );

        let snap = build(
            &settings(),
            &pods,
            &[namespace("shop", Some("other"))],
            &[],
            &[],
        )
        .unwrap();
        assert!(!snap.workload("shop", "web").unwrap().enrolled);
    }

    #[test]
    fn finished_and_unscheduled_pods_are_left_out_and_the_newest_pod_keeps_a_reused_ip() {
        let done = with_ip(&pod("job", "status: { phase: Succeeded }"), "10.244.1.9");
        let unscheduled: Arc<Pod> =
            from_yaml("metadata: { name: queued, namespace: shop }\nspec: { containers: [] }");
        let old = with_ip(&pod("old", ""), "10.244.1.7");
        let mut new = (*with_ip(&pod("new", ""), "10.244.1.7")).clone();
        new.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-11-22T11:00:00Z".parse().unwrap(),
            ));
        let new = Arc::new(new);
        let snap = build(&settings(), &[done, unscheduled, old, new], &[], &[], &[]).unwrap();
        assert!(snap.workload("shop", "job").is_none());
        assert!(snap.workload("shop", "queued").is_none());
        assert!(snap.workload("shop", "old").unwrap().ips.is_empty());
        assert_eq!(
            snap.workload_by_ip("10.244.1.7".parse().unwrap())
                .unwrap()
                .name,
            "new"
        );
    }

    #[test]
    fn services_resolve_target_ports_per_slice_and_keep_ready_endpoints() {
        let svc: Arc<Service> = from_yaml(
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
        let slice: Arc<EndpointSlice> = from_yaml(&format!(
            "metadata: {{ name: echo-x, namespace: shop, labels: {{ {SERVICE_NAME_LABEL}: echo }} }}
addressType: IPv4
ports: [{{ name: http, port: 8080 }}, {{ name: raw, port: 9001 }}]
endpoints:
  - {{ addresses: [10.244.1.2], conditions: {{ ready: true }} }}
  - {{ addresses: [10.244.2.2], conditions: {{ ready: false }} }}
  - {{ addresses: [10.244.2.3] }}"
        ));
        // Mid-rollout, the new pods number the named port differently: their own slice.
        let rolled: Arc<EndpointSlice> = from_yaml(&format!(
            "metadata: {{ name: echo-y, namespace: shop, labels: {{ {SERVICE_NAME_LABEL}: echo }} }}
addressType: IPv4
ports: [{{ name: http, port: 8443 }}]
endpoints: [{{ addresses: [10.244.1.9] }}]"
        ));
        let other: Arc<EndpointSlice> = from_yaml(&format!(
            "metadata: {{ name: x, namespace: elsewhere, labels: {{ {SERVICE_NAME_LABEL}: echo }} }}
addressType: IPv4
endpoints: [{{ addresses: [10.244.3.3] }}]"
        ));
        let headless: Arc<Service> = from_yaml(
            "metadata: { name: db, namespace: shop }\nspec: { clusterIP: None, ports: [{ port: 5432 }] }",
        );
        let slices = [slice, rolled, other];
        let snap = build(&settings(), &[], &[], &[svc, headless], &slices).unwrap();
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
    }

    #[test]
    fn an_endpoint_names_its_pod_before_the_pod_status_does() {
        let fresh = pod("api", "");
        let agent = pod("agent", "");
        let mut agent = (*agent).clone();
        agent.spec.as_mut().unwrap().host_network = Some(true);
        let old = with_ip(&pod("old", ""), "10.244.1.8");
        let slice: Arc<EndpointSlice> = from_yaml(&format!(
            "metadata: {{ name: api-x, namespace: shop, labels: {{ {SERVICE_NAME_LABEL}: api }} }}
addressType: IPv4
endpoints:
  - {{ addresses: [10.244.1.7], targetRef: {{ kind: Pod, name: api }} }}
  - {{ addresses: [192.0.2.1], targetRef: {{ kind: Pod, name: agent, namespace: shop }} }}
  - {{ addresses: [10.244.1.8], targetRef: {{ kind: Pod, name: api }} }}
  - {{ addresses: [10.244.1.9], targetRef: {{ kind: Pod, name: gone }} }}"
        ));
        let snap = build(
            &settings(),
            &[fresh, Arc::new(agent), old],
            &[namespace("shop", Some(ENROLLED))],
            &[],
            &[slice],
        )
        .unwrap();
        let by_ip = |ip: &str| {
            snap.workload_by_ip(ip.parse().unwrap())
                .map(|w| w.name.as_str())
        };
        assert_eq!(by_ip("10.244.1.7"), Some("api"), "adopted from the slice");
        assert_eq!(
            by_ip("10.244.1.8"),
            Some("old"),
            "claimed by a pod's own status"
        );
        assert_eq!(
            by_ip("192.0.2.1"),
            None,
            "a host-network pod's node address"
        );
        assert_eq!(by_ip("10.244.1.9"), None, "no such pod");
    }
}
