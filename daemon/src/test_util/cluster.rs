//! A synthetic cluster for the scale bench and the memory test: Namespaces, Deployments' pods,
//! one Service per Deployment and its EndpointSlice, as JSON shaped like the API's (managed
//! fields, owner references, container specs and statuses included), fed through the
//! watchers' decode and apply path ([`Cluster::apply_blocking`]).

use std::net::Ipv4Addr;

use kube::runtime::watcher::Event;
use serde_json::{Value, json};

use crate::discovery::objects::{
    NamespaceRecord, NodeRecord, PodRecord, Record, ServiceRecord, SliceRecord,
};
use crate::discovery::{Cluster, ENROLLED, MODE_LABEL};

/// The shape of a synthetic cluster.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub pods: usize,
    /// Pods per Deployment, each Deployment with one Service (15 gives 66,667 Services for a
    /// million pods).
    pub per_service: usize,
    /// Deployments per namespace.
    pub per_namespace: usize,
    pub nodes: usize,
}

impl Shape {
    pub const fn new(pods: usize) -> Self {
        Self {
            pods,
            per_service: 15,
            per_namespace: 66,
            nodes: 5000,
        }
    }

    pub fn services(&self) -> usize {
        self.pods.div_ceil(self.per_service)
    }

    pub fn namespaces(&self) -> usize {
        self.services().div_ceil(self.per_namespace)
    }

    fn namespace_of(&self, service: usize) -> String {
        format!("team-{}", service / self.per_namespace)
    }

    /// Pod `i`'s name in `generation` (a rollout renames every pod of a Deployment).
    fn pod_name(&self, i: usize, generation: u32) -> String {
        let service = i / self.per_service;
        format!(
            "app-{service}-{:08x}-{:05x}",
            hash(service, generation),
            i % 0xfffff
        )
    }

    fn pod_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::from(0x0a00_0000 + 2 + u32::try_from(i).expect("fewer than 2^32 pods"))
    }

    fn timestamp(generation: u32) -> String {
        format!("2026-11-{:02}T10:00:00Z", 1 + generation % 28)
    }

    pub fn namespace(&self, n: usize) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {
                "name": format!("team-{n}"), "uid": uid(n, 0), "resourceVersion": "1",
                "creationTimestamp": Self::timestamp(0),
                "labels": { "kubernetes.io/metadata.name": format!("team-{n}"), MODE_LABEL: ENROLLED },
                "managedFields": [managed("kubectl")],
            },
            "spec": { "finalizers": ["kubernetes"] },
            "status": { "phase": "Active" },
        })
    }

    pub fn pod(&self, i: usize, generation: u32) -> Value {
        let service = i / self.per_service;
        let (name, ip) = (self.pod_name(i, generation), Self::pod_ip(i).to_string());
        let hash = format!("{:08x}", hash(service, generation));
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": name, "namespace": self.namespace_of(service),
                "generateName": format!("app-{service}-{hash}-"),
                "uid": uid(i, generation), "resourceVersion": "12345",
                "creationTimestamp": Self::timestamp(generation),
                "labels": { "app": format!("app-{service}"), "pod-template-hash": hash },
                "annotations": { "kubectl.kubernetes.io/restartedAt": Self::timestamp(generation) },
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("app-{service}-{hash}"),
                    "uid": uid(service, generation), "controller": true, "blockOwnerDeletion": true,
                }],
                "managedFields": [managed("kube-controller-manager"), managed("kubelet")],
            },
            "spec": {
                "nodeName": format!("node-{}", i % self.nodes),
                "serviceAccountName": format!("app-{service}"),
                "containers": [{
                    "name": "app", "image": "registry.example/app:1.2.3",
                    "ports": [{ "containerPort": 8080, "protocol": "TCP" }],
                    "resources": { "requests": { "cpu": "100m", "memory": "128Mi" } },
                    "volumeMounts": [{ "name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true }],
                }],
                "volumes": [{ "name": "kube-api-access", "projected": { "sources": [
                    { "serviceAccountToken": { "path": "token", "expirationSeconds": 3607 } },
                ] } }],
                "restartPolicy": "Always", "dnsPolicy": "ClusterFirst", "schedulerName": "default-scheduler",
                "tolerations": [{ "key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300 }],
            },
            "status": {
                "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }], "hostIP": "192.168.0.1",
                "qosClass": "Burstable", "startTime": Self::timestamp(generation),
                "conditions": [
                    { "type": "Ready", "status": "True", "lastTransitionTime": Self::timestamp(generation) },
                    { "type": "PodScheduled", "status": "True", "lastTransitionTime": Self::timestamp(generation) },
                ],
                "containerStatuses": [{
                    "name": "app", "ready": true, "restartCount": 0, "started": true,
                    "image": "registry.example/app:1.2.3", "imageID": "sha256:0123456789abcdef",
                    "containerID": format!("containerd://{:064x}", i),
                    "state": { "running": { "startedAt": Self::timestamp(generation) } },
                }],
            },
        })
    }

    pub fn service(&self, s: usize) -> Value {
        let vip = Ipv4Addr::from(0x0a60_0000 + 10 + u32::try_from(s).expect("few services"));
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {
                "name": format!("app-{s}"), "namespace": self.namespace_of(s), "uid": uid(s, 7),
                "resourceVersion": "1", "creationTimestamp": Self::timestamp(0),
                "labels": { "app": format!("app-{s}") },
                "managedFields": [managed("kubectl")],
            },
            "spec": {
                "type": "ClusterIP", "clusterIP": vip.to_string(), "clusterIPs": [vip.to_string()],
                "selector": { "app": format!("app-{s}") }, "sessionAffinity": "None",
                "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                "ports": [{ "name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP" }],
            },
            "status": { "loadBalancer": {} },
        })
    }

    pub fn slice(&self, s: usize, generation: u32) -> Value {
        let pods = (s * self.per_service)..((s + 1) * self.per_service).min(self.pods);
        let endpoints: Vec<Value> = pods
            .map(|i| {
                json!({
                    "addresses": [Self::pod_ip(i).to_string()],
                    "conditions": { "ready": true, "serving": true, "terminating": false },
                    "nodeName": format!("node-{}", i % self.nodes),
                    "targetRef": { "kind": "Pod", "name": self.pod_name(i, generation),
                        "namespace": self.namespace_of(s), "uid": uid(i, generation) },
                })
            })
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {
                "name": format!("app-{s}-abcde"), "namespace": self.namespace_of(s), "uid": uid(s, 9),
                "resourceVersion": "1", "creationTimestamp": Self::timestamp(0),
                "labels": { "kubernetes.io/service-name": format!("app-{s}"),
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io" },
                "managedFields": [managed("kube-controller-manager")],
            },
            "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
            "endpoints": endpoints,
        })
    }

    /// Lists the whole cluster into `cluster` as the watchers do at start or after a 410:
    /// each kind's objects between `Init` and `InitDone`.
    pub fn list(&self, cluster: &Cluster, generation: u32) {
        self.list_into(&mut |step| step.apply(cluster), generation);
    }

    /// Rolls Deployment `s` out as watch events: the new pods are added, the slice moves to
    /// them, then the old pods are deleted.
    pub fn roll_out(&self, cluster: &Cluster, s: usize, from: u32, to: u32) {
        self.roll_out_into(&mut |step| step.apply(cluster), s, from, to);
    }

    /// Pod `i` of `generation` is added or updated (a generation other than the listed one
    /// is a newer pod claiming the same IP, as in a rollout).
    pub fn apply_pod(&self, cluster: &Cluster, i: usize, generation: u32) {
        Step::new(Kind::Pod, Change::Apply, &self.pod(i, generation)).apply(cluster);
    }

    pub fn delete_pod(&self, cluster: &Cluster, i: usize, generation: u32) {
        Step::new(Kind::Pod, Change::Delete, &self.pod(i, generation)).apply(cluster);
    }

    /// [`Self::list`]'s events, encoded, to apply later (so that making them is not counted).
    pub fn list_steps(&self, generation: u32) -> Vec<Step> {
        let mut steps = Vec::new();
        self.list_into(&mut |step| steps.push(step), generation);
        steps
    }

    /// [`Self::list_steps`] with the EndpointSlices listed before the pods, as watchers that
    /// list concurrently may deliver them: every endpoint names a pod not seen yet.
    pub fn list_steps_slices_first(&self, generation: u32) -> Vec<Step> {
        let mut steps = self.list_steps(generation);
        let first_pod = steps.iter().position(|s| matches!(s.kind, Kind::Pod));
        let first_slice = steps.iter().position(|s| matches!(s.kind, Kind::Slice));
        if let (Some(pods), Some(slices)) = (first_pod, first_slice) {
            let tail = steps.split_off(slices);
            steps.splice(pods..pods, tail);
        }
        steps
    }

    /// [`Self::roll_out`]'s events for every Deployment, encoded.
    pub fn roll_out_steps(&self, from: u32, to: u32) -> Vec<Step> {
        let mut steps = Vec::new();
        for s in 0..self.services() {
            self.roll_out_into(&mut |step| steps.push(step), s, from, to);
        }
        steps
    }

    fn list_into(&self, sink: &mut dyn FnMut(Step), generation: u32) {
        let mut relist = |kind: Kind, objects: &mut dyn Iterator<Item = Value>| {
            sink(Step::marker(kind, Change::Init));
            for object in objects {
                sink(Step::new(kind, Change::InitApply, &object));
            }
            sink(Step::marker(kind, Change::InitDone));
        };
        relist(
            Kind::Namespace,
            &mut (0..self.namespaces()).map(|n| self.namespace(n)),
        );
        relist(
            Kind::Pod,
            &mut (0..self.pods).map(|i| self.pod(i, generation)),
        );
        relist(
            Kind::Service,
            &mut (0..self.services()).map(|s| self.service(s)),
        );
        relist(
            Kind::Slice,
            &mut (0..self.services()).map(|s| self.slice(s, generation)),
        );
    }

    fn roll_out_into(&self, sink: &mut dyn FnMut(Step), s: usize, from: u32, to: u32) {
        let pods = (s * self.per_service)..((s + 1) * self.per_service).min(self.pods);
        for i in pods.clone() {
            sink(Step::new(Kind::Pod, Change::Apply, &self.pod(i, to)));
        }
        sink(Step::new(Kind::Slice, Change::Apply, &self.slice(s, to)));
        for i in pods {
            sink(Step::new(Kind::Pod, Change::Delete, &self.pod(i, from)));
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Namespace,
    Pod,
    Service,
    Slice,
    Node,
}

#[derive(Debug, Clone, Copy)]
enum Change {
    Init,
    InitApply,
    InitDone,
    Apply,
    Delete,
}

/// One watch event of a synthetic cluster: its kind, what happened, and the object as the API
/// sends it (JSON), which applying decodes as the watcher does.
#[derive(Debug)]
pub struct Step {
    kind: Kind,
    change: Change,
    json: Vec<u8>,
}

impl Step {
    fn new(kind: Kind, change: Change, object: &Value) -> Self {
        let json = serde_json::to_vec(object).expect("synthetic objects serialize");
        Self { kind, change, json }
    }

    fn marker(kind: Kind, change: Change) -> Self {
        Self {
            kind,
            change,
            json: Vec::new(),
        }
    }

    /// Any event, for the fuzz target: `kind` picks the kind (by its value modulo 5:
    /// Namespace, Pod, Service, EndpointSlice, Node's metadata) and `change` what happened
    /// (modulo 5), `json` is the object.
    pub fn from_parts(kind: u8, change: u8, json: &[u8]) -> Self {
        let kinds = [
            Kind::Namespace,
            Kind::Pod,
            Kind::Service,
            Kind::Slice,
            Kind::Node,
        ];
        let changes = [
            Change::Init,
            Change::InitApply,
            Change::InitDone,
            Change::Apply,
            Change::Delete,
        ];
        Self {
            kind: kinds[usize::from(kind) % kinds.len()],
            change: changes[usize::from(change) % changes.len()],
            json: json.to_vec(),
        }
    }

    pub fn apply(&self, cluster: &Cluster) {
        assert!(self.try_apply(cluster), "synthetic objects decode");
    }

    /// Decodes and applies the event; `false` if its JSON is not an object of its kind.
    pub fn try_apply(&self, cluster: &Cluster) -> bool {
        match self.kind {
            Kind::Namespace => self.apply_as::<NamespaceRecord>(cluster),
            Kind::Pod => self.apply_as::<PodRecord>(cluster),
            Kind::Service => self.apply_as::<ServiceRecord>(cluster),
            Kind::Slice => self.apply_as::<SliceRecord>(cluster),
            Kind::Node => self.apply_as::<NodeRecord>(cluster),
        }
    }

    fn apply_as<R: Record>(&self, cluster: &Cluster) -> bool {
        let object = || serde_json::from_slice(&self.json).ok();
        let event = match self.change {
            Change::Init => Some(Event::Init),
            Change::InitDone => Some(Event::InitDone),
            Change::InitApply => object().map(Event::InitApply),
            Change::Apply => object().map(Event::Apply),
            Change::Delete => object().map(Event::Delete),
        };
        event
            .map(|event| cluster.apply_blocking::<R>(event))
            .is_some()
    }
}

fn hash(service: usize, generation: u32) -> u32 {
    // Distinct per Deployment and generation, like a pod-template hash.
    let x = (service as u64).wrapping_mul(0x9e37_79b9)
        ^ u64::from(generation).wrapping_mul(0x85eb_ca6b);
    (x ^ (x >> 29)) as u32
}

fn uid(i: usize, generation: u32) -> String {
    format!("{:08x}-0000-4000-8000-{:012x}", generation, i)
}

fn managed(manager: &str) -> Value {
    json!({
        "manager": manager, "operation": "Update", "apiVersion": "v1",
        "time": "2026-11-01T10:00:00Z", "fieldsType": "FieldsV1",
        "fieldsV1": { "f:metadata": { "f:labels": { ".": {}, "f:app": {} } },
            "f:status": { "f:conditions": { ".": {} }, "f:phase": {}, "f:podIP": {} } },
    })
}
