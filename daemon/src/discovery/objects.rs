//! The API objects discovery watches, decoded lean, and the records kept of them.
//!
//! Each watched kind has an object type that deserializes only the fields the daemon reads
//! (serde skips the rest without allocating: managed fields, annotations, container specs,
//! conditions) and a record that keeps only what building a snapshot needs, with repeated
//! strings interned. A million-pod cluster is held as records, never as API objects.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::Resource;
use kube::core::PartialObjectMeta;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use tracing::warn;

use super::view::{Key, View};
use super::{Collection, Collections, ENROLLED, Known, NOT_ENROLLED, SERVICE_NAME_LABEL};
use crate::state::{Interner, Ips, Locality, Workload, WorkloadType};

/// A watched kind: its lean object and how it becomes a record.
pub trait Record: Sized + PartialEq + Send + 'static {
    type Object: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + 'static;

    /// The record to keep of `object`, or `None` for an object the snapshot leaves out (a
    /// finished pod, an ExternalName Service): an update to such a state removes the record.
    /// `known` is what is held already, for sharing with it.
    fn decode(
        object: &Self::Object,
        interner: &mut Interner,
        trust_domain: &str,
        known: &Known<'_>,
    ) -> Option<Self>;

    /// The collection of this kind.
    fn collection(collections: &mut Collections) -> &mut Collection<Self>;

    /// The name to key the record by (a pod's is shared with its workload).
    fn key(&self, name: &str) -> Arc<str> {
        name.into()
    }

    /// Brings `view` up to date after the record `key` names changed from `old` to what `c`
    /// holds now.
    fn changed(_view: &mut View, _c: &Collections, _key: Key, _old: Option<&Self>) {}
}

/// Implements [`Resource`] for a lean object type of a core or discovery kind.
macro_rules! resource {
    ($ty:ty, $kind:literal, $group:literal, $version:literal, $plural:literal, $scope:ty) => {
        impl Resource for $ty {
            type DynamicType = ();
            type Scope = $scope;

            fn kind(_: &()) -> Cow<'_, str> {
                $kind.into()
            }

            fn group(_: &()) -> Cow<'_, str> {
                $group.into()
            }

            fn version(_: &()) -> Cow<'_, str> {
                $version.into()
            }

            fn plural(_: &()) -> Cow<'_, str> {
                $plural.into()
            }

            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

resource!(
    PodObject,
    "Pod",
    "",
    "v1",
    "pods",
    kube::core::NamespaceResourceScope
);
resource!(
    NamespaceObject,
    "Namespace",
    "",
    "v1",
    "namespaces",
    kube::core::ClusterResourceScope
);
resource!(
    ServiceObject,
    "Service",
    "",
    "v1",
    "services",
    kube::core::NamespaceResourceScope
);
resource!(
    SliceObject,
    "EndpointSlice",
    "discovery.k8s.io",
    "v1",
    "endpointslices",
    kube::core::NamespaceResourceScope
);

/// Object metadata with only what discovery and the watcher read: name, namespace, resource
/// version (the watcher resumes from it), creation time, labels, and the controller among the
/// owners (its kind and name).
fn lean_meta<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Lean {
        name: Option<String>,
        namespace: Option<String>,
        resource_version: Option<String>,
        creation_timestamp: Option<Time>,
        labels: Option<BTreeMap<String, String>>,
        #[serde(default)]
        owner_references: Vec<Owner>,
    }
    #[derive(Deserialize)]
    struct Owner {
        kind: String,
        name: String,
        #[serde(default)]
        controller: bool,
    }
    let lean = Lean::deserialize(deserializer)?;
    let controller = lean.owner_references.into_iter().find(|o| o.controller);
    Ok(ObjectMeta {
        name: lean.name,
        namespace: lean.namespace,
        resource_version: lean.resource_version,
        creation_timestamp: lean.creation_timestamp,
        labels: lean.labels,
        owner_references: controller.map(|o| {
            vec![OwnerReference {
                kind: o.kind,
                name: o.name,
                controller: Some(true),
                ..OwnerReference::default()
            }]
        }),
        ..ObjectMeta::default()
    })
}

/// The name Istio's telemetry gives the workload of a pod, if a controller owns it, and its
/// type: the controller's name, with a ReplicaSet read as the Deployment (or Argo Rollout) that
/// made it, a ReplicationController as its DeploymentConfig and a Job as the CronJob that named
/// it.
fn workload_of(meta: &ObjectMeta) -> Option<(&str, WorkloadType)> {
    let owner = meta.owner_references.iter().flatten().next()?;
    let strip = |label_key: &str| {
        let hash = label(meta, label_key)?;
        owner.name.strip_suffix(hash)?.strip_suffix('-')
    };
    let derived = match owner.kind.as_str() {
        "ReplicaSet" => strip("pod-template-hash")
            .map(|d| (d, WorkloadType::Deployment))
            .or_else(|| strip("rollouts-pod-template-hash").map(|r| (r, WorkloadType::Pod))),
        "ReplicationController" => label(meta, "deploymentconfig").map(|d| (d, WorkloadType::Pod)),
        "Job" => Some(
            cron_job_of(&owner.name).map_or((&*owner.name, WorkloadType::Job), |c| {
                (c, WorkloadType::CronJob)
            }),
        ),
        _ => None,
    };
    Some(derived.unwrap_or((&owner.name, WorkloadType::Pod)))
}

/// The CronJob that made Job `job`, which it names `<cronjob>-<scheduled minute>` (8 to 10
/// digits).
fn cron_job_of(job: &str) -> Option<&str> {
    let (cron_job, minute) = job.rsplit_once('-')?;
    let digits = (8..=10).contains(&minute.len()) && minute.bytes().all(|b| b.is_ascii_digit());
    (digits && !cron_job.is_empty()).then_some(cron_job)
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

fn parse_ips<'a>(ips: impl Iterator<Item = &'a str>) -> Box<[IpAddr]> {
    let mut ips: Vec<IpAddr> = ips.filter_map(|ip| ip.parse().ok()).collect();
    ips.sort_unstable();
    ips.dedup();
    ips.into()
}

// Pods.

#[derive(Debug, Clone, Deserialize)]
pub struct PodObject {
    #[serde(default, deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<PodSpec>,
    #[serde(default)]
    pub status: Option<PodStatus>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    pub node_name: Option<String>,
    pub service_account_name: Option<String>,
    pub host_network: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    pub phase: Option<String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIp>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PodIp {
    pub ip: String,
}

/// A pod that is scheduled and not finished, as its workload.
#[derive(Debug, PartialEq)]
pub struct PodRecord {
    pub workload: Arc<Workload>,
    /// Creation time (seconds): the newest pod keeps a contested IP.
    pub created: i64,
    /// A host-network pod's endpoints are its node's addresses: it adopts none.
    pub host_network: bool,
}

impl Record for PodRecord {
    type Object = PodObject;

    /// `None` for pods that are not scheduled, have finished, or have names that make no
    /// SPIFFE id.
    fn decode(
        pod: &PodObject,
        interner: &mut Interner,
        trust_domain: &str,
        known: &Known<'_>,
    ) -> Option<Self> {
        let meta = &pod.metadata;
        let (name, namespace) = (meta.name.as_deref()?, meta.namespace.as_deref()?);
        let spec = pod.spec.as_ref()?;
        let node = spec.node_name.as_deref()?;
        let status = pod.status.as_ref();
        if matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        ) {
            return None;
        }
        let namespace = interner.str(namespace);
        let service_account =
            interner.str(spec.service_account_name.as_deref().unwrap_or("default"));
        let identity = match interner.id(trust_domain, &namespace, &service_account) {
            Ok(id) => id,
            Err(e) => {
                warn!(pod = %format!("{namespace}/{name}"), error = %e, "pod left out");
                return None;
            }
        };
        let host_network = spec.host_network == Some(true);
        // A host-network pod shares the node's addresses: it can neither be enrolled nor be
        // told apart by IP.
        let ips = match status {
            Some(status) if !host_network => {
                let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
                parse_ips(listed.chain(status.pod_ip.as_deref()))
                    .into_vec()
                    .into()
            }
            _ => Ips::default(),
        };
        let enrollment = if host_network {
            Some(false)
        } else {
            match label(meta, known.mode_label) {
                Some(NOT_ENROLLED) => Some(false),
                Some(ENROLLED) => Some(true),
                _ => None,
            }
        };
        let labels = meta.labels.iter().flatten();
        let name = known.pod_name(&namespace, name);
        let (workload_name, workload_type) = match workload_of(meta) {
            Some((owner, kind)) => (interner.str(owner), kind),
            None => (name.clone(), WorkloadType::Pod),
        };
        Some(Self {
            workload: Arc::new(Workload {
                name,
                workload_name,
                workload_type,
                node: interner.str(node),
                labels: interner.labels(labels.map(|(k, v)| (k.as_str(), v.as_str()))),
                namespace,
                ips,
                enrollment,
                peer_authentication: None,
                identity,
            }),
            created: meta
                .creation_timestamp
                .as_ref()
                .map_or(0, |t| t.0.as_second()),
            host_network,
        })
    }

    fn collection(collections: &mut Collections) -> &mut Collection<Self> {
        &mut collections.pods
    }

    fn key(&self, _: &str) -> Arc<str> {
        self.workload.name.clone()
    }

    fn changed(view: &mut View, c: &Collections, key: Key, old: Option<&Self>) {
        view.pod_changed(c, key, old);
    }
}

// Namespaces.

#[derive(Debug, Clone, Deserialize)]
pub struct NamespaceObject {
    #[serde(default, deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
}

/// A namespace: whether it is enrolled.
#[derive(Debug, PartialEq)]
pub struct NamespaceRecord {
    pub enrolled: bool,
}

impl Record for NamespaceRecord {
    type Object = NamespaceObject;

    fn decode(ns: &NamespaceObject, _: &mut Interner, _: &str, known: &Known<'_>) -> Option<Self> {
        Some(Self {
            enrolled: label(&ns.metadata, known.mode_label) == Some(ENROLLED),
        })
    }

    fn collection(collections: &mut Collections) -> &mut Collection<Self> {
        &mut collections.namespaces
    }

    fn changed(view: &mut View, _: &Collections, _: Key, _: Option<&Self>) {
        view.namespace_changed();
    }
}

// Nodes.

/// The labels a node's locality is read from, as Istio reads them.
const REGION_LABEL: &str = "topology.kubernetes.io/region";
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
const SUBZONE_LABEL: &str = "topology.istio.io/subzone";

/// A node, watched as metadata only (kube-rs asks for `PartialObjectMetadata` for this type):
/// the API sends no status (images, conditions), and the record keeps only where the node is.
pub type NodeObject = PartialObjectMeta<k8s_openapi::api::core::v1::Node>;

/// A node with a locality (a node without topology labels has no record).
#[derive(Debug, PartialEq)]
pub struct NodeRecord {
    pub locality: Arc<Locality>,
}

impl Record for NodeRecord {
    type Object = NodeObject;

    fn decode(node: &NodeObject, interner: &mut Interner, _: &str, _: &Known<'_>) -> Option<Self> {
        let meta = &node.metadata;
        let [region, zone, subzone] = [REGION_LABEL, ZONE_LABEL, SUBZONE_LABEL]
            .map(|key| label(meta, key).filter(|value| !value.is_empty()));
        if [region, zone, subzone].iter().all(Option::is_none) {
            return None;
        }
        let mut read = |value: Option<&str>| interner.str(value.unwrap_or_default());
        Some(Self {
            locality: Arc::new(Locality {
                region: read(region),
                zone: read(zone),
                subzone: read(subzone),
            }),
        })
    }

    fn collection(collections: &mut Collections) -> &mut Collection<Self> {
        &mut collections.nodes
    }

    fn changed(view: &mut View, c: &Collections, key: Key, _: Option<&Self>) {
        let locality = c.nodes.get(&key.0, &key.1).map(|n| n.locality.clone());
        view.index.set_locality(key.1, locality);
    }
}

// Services.

#[derive(Debug, Clone, Deserialize)]
pub struct ServiceObject {
    #[serde(default, deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<ServiceObjectSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceObjectSpec {
    #[serde(rename = "type")]
    pub type_: Option<String>,
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    pub ports: Option<Vec<NamedPort>>,
}

/// A Service's or an EndpointSlice's port.
#[derive(Debug, Clone, Deserialize)]
pub struct NamedPort {
    pub name: Option<String>,
    pub port: Option<i32>,
    pub protocol: Option<String>,
}

impl NamedPort {
    /// A TCP port's name (empty if it has none) and number; `None` for other protocols and
    /// numbers outside 1..=65535.
    fn tcp(&self, interner: &mut Interner) -> Option<(Arc<str>, u16)> {
        if self.protocol.as_deref().unwrap_or("TCP") != "TCP" {
            return None;
        }
        let port = u16::try_from(self.port?).ok().filter(|&p| p != 0)?;
        Some((interner.str(self.name.as_deref().unwrap_or_default()), port))
    }
}

/// A Service with a cluster IP and TCP ports.
#[derive(Debug, PartialEq)]
pub struct ServiceRecord {
    pub vips: Box<[IpAddr]>,
    /// Each TCP port's name and number.
    pub ports: Box<[(Arc<str>, u16)]>,
}

impl Record for ServiceRecord {
    type Object = ServiceObject;

    /// `None` for ExternalName and headless Services and those without TCP ports.
    fn decode(
        svc: &ServiceObject,
        interner: &mut Interner,
        _: &str,
        _: &Known<'_>,
    ) -> Option<Self> {
        let spec = svc.spec.as_ref()?;
        if spec.type_.as_deref() == Some("ExternalName") {
            return None;
        }
        let listed = spec.cluster_ips.iter().flatten().map(String::as_str);
        let vips = parse_ips(listed.chain(spec.cluster_ip.as_deref()));
        let ports: Box<[_]> = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.tcp(interner))
            .collect();
        (!vips.is_empty() && !ports.is_empty()).then_some(Self { vips, ports })
    }

    fn collection(collections: &mut Collections) -> &mut Collection<Self> {
        &mut collections.services
    }

    fn changed(view: &mut View, c: &Collections, key: Key, _: Option<&Self>) {
        view.service_changed(c, &key);
    }
}

// EndpointSlices.

#[derive(Debug, Clone, Deserialize)]
pub struct SliceObject {
    #[serde(default, deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
    pub ports: Option<Vec<NamedPort>>,
    pub endpoints: Option<Vec<SliceEndpoint>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceEndpoint {
    #[serde(default)]
    pub addresses: Vec<String>,
    pub conditions: Option<Conditions>,
    pub target_ref: Option<TargetRef>,
    pub node_name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Conditions {
    pub ready: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TargetRef {
    pub kind: Option<String>,
    pub name: Option<String>,
    pub namespace: Option<String>,
}

/// An EndpointSlice of a Service.
#[derive(Debug, PartialEq)]
pub struct SliceRecord {
    pub service: Arc<str>,
    /// Each TCP port's name and the target port it resolves to for this slice's endpoints.
    pub ports: Box<[(Arc<str>, u16)]>,
    pub endpoints: Box<[EndpointRecord]>,
}

#[derive(Debug, PartialEq)]
pub struct EndpointRecord {
    /// The first address: the only one the EndpointSlice controller writes and the only one
    /// kube-proxy reads (the API gives the others no meaning).
    pub address: IpAddr,
    /// Endpoints count as ready unless their `ready` condition is false, as the API advises.
    pub ready: bool,
    /// Whether its `nodeName` is this node.
    pub local: bool,
    /// The pod of the slice's namespace it names (`targetRef`), by name (shared with the
    /// pod's record when the pod is known first). A pod of another namespace is not named: a
    /// slice may not give an address to another namespace's pod.
    pub pod: Option<Arc<str>>,
}

impl Record for SliceRecord {
    type Object = SliceObject;

    /// `None` for slices that name no Service.
    fn decode(
        slice: &SliceObject,
        interner: &mut Interner,
        _: &str,
        known: &Known<'_>,
    ) -> Option<Self> {
        let service = interner.str(label(&slice.metadata, SERVICE_NAME_LABEL)?);
        let namespace = interner.str(slice.metadata.namespace.as_deref()?);
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.tcp(interner))
            .collect();
        let endpoints = slice
            .endpoints
            .iter()
            .flatten()
            .filter_map(|e| {
                Some(EndpointRecord {
                    address: e.addresses.first()?.parse().ok()?,
                    ready: e.conditions.as_ref().and_then(|c| c.ready) != Some(false),
                    local: !known.node.is_empty() && e.node_name.as_deref() == Some(known.node),
                    pod: e.target_ref.as_ref().and_then(|t| {
                        let same_namespace =
                            t.namespace.as_deref().is_none_or(|n| *n == *namespace);
                        let pod = t.kind.as_deref() == Some("Pod") && same_namespace;
                        let name = t.name.as_deref().filter(|_| pod)?;
                        Some(known.pod_name(&namespace, name))
                    }),
                })
            })
            .collect();
        Some(Self {
            service,
            ports,
            endpoints,
        })
    }

    fn collection(collections: &mut Collections) -> &mut Collection<Self> {
        &mut collections.slices
    }

    fn changed(view: &mut View, c: &Collections, key: Key, old: Option<&Self>) {
        view.slice_changed(c, key, old);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(owner: Option<(&str, &str)>, labels: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            labels: Some(
                labels
                    .iter()
                    .map(|&(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
            ),
            owner_references: owner.map(|(kind, name)| {
                vec![OwnerReference {
                    kind: kind.into(),
                    name: name.into(),
                    controller: Some(true),
                    ..OwnerReference::default()
                }]
            }),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn workloads_are_named_and_typed_by_the_controller_that_made_their_owner() {
        use WorkloadType::{CronJob, Deployment, Job, Pod};
        let hash = [("pod-template-hash", "5d8f9c")];
        for (owner, labels, want) in [
            (
                Some(("ReplicaSet", "web-5d8f9c")),
                &hash[..],
                Some(("web", Deployment)),
            ),
            // A ReplicaSet of its own, or one whose hash is not its suffix, is the workload.
            (
                Some(("ReplicaSet", "web-5d8f9c")),
                &[][..],
                Some(("web-5d8f9c", Pod)),
            ),
            (
                Some(("ReplicaSet", "web5d8f9c")),
                &hash[..],
                Some(("web5d8f9c", Pod)),
            ),
            (
                Some(("ReplicaSet", "canary-77b4")),
                &[("rollouts-pod-template-hash", "77b4")][..],
                Some(("canary", Pod)),
            ),
            (
                Some(("ReplicationController", "legacy-3")),
                &[("deploymentconfig", "legacy")][..],
                Some(("legacy", Pod)),
            ),
            (
                Some(("Job", "backup-29001234")),
                &[][..],
                Some(("backup", CronJob)),
            ),
            (
                Some(("Job", "backup-1234")),
                &[][..],
                Some(("backup-1234", Job)),
            ),
            (
                Some(("Job", "backup-29001234x")),
                &[][..],
                Some(("backup-29001234x", Job)),
            ),
            (
                Some(("Job", "-29001234")),
                &[][..],
                Some(("-29001234", Job)),
            ),
            (Some(("StatefulSet", "db")), &[][..], Some(("db", Pod))),
            (None, &hash[..], None),
        ] {
            assert_eq!(
                workload_of(&meta(owner, labels)),
                want,
                "{owner:?} {labels:?}"
            );
        }
    }

    #[test]
    fn only_the_controlling_owner_is_kept() {
        let json = r#"{ "metadata": { "name": "web-1", "ownerReferences": [
            { "apiVersion": "v1", "kind": "ConfigMap", "name": "cfg", "uid": "1" },
            { "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d8f", "uid": "2",
              "controller": true, "blockOwnerDeletion": true } ] } }"#;
        let pod: PodObject = serde_json::from_str(json).unwrap();
        let owners = pod.metadata.owner_references.unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(
            (&*owners[0].kind, &*owners[0].name),
            ("ReplicaSet", "web-5d8f")
        );
        assert!(owners[0].uid.is_empty(), "nothing else is kept");
    }
}
