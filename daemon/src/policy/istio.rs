//! Istio's `security.istio.io` PeerAuthentication and AuthorizationPolicy, as their YAML (or
//! the API's JSON) spells them: v1 and v1beta1 share one schema.
//!
//! Every field Istio defines is read, the L7 ones too, so that translation can say what it
//! narrowed or could not enforce; fields Istio does not define are ignored, as the API server
//! would prune them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A policy object: where it lives, when it was made (the oldest wins a conflict) and its spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Object<S> {
    pub namespace: String,
    pub name: String,
    /// `metadata.creationTimestamp` as seconds since the epoch (0 when unknown: a node file).
    #[serde(default)]
    pub created: i64,
    /// The position in its source, which breaks a tie between equal timestamps.
    #[serde(default)]
    pub order: usize,
    pub spec: S,
}

impl<S> Object<S> {
    /// `namespace/name`, as logs and the admin API name a policy.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    pub fn matches(&self, labels: &crate::state::Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v.as_str()))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the level above.
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MutualTls {
    #[serde(default)]
    pub mode: MtlsMode,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    pub selector: Option<WorkloadSelector>,
    pub mtls: Option<MutualTls>,
    /// Keyed by the workload's port, as a string in JSON (the API validates 1–65535).
    #[serde(default)]
    pub port_level_mtls: BTreeMap<String, MutualTls>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    pub selector: Option<WorkloadSelector>,
    /// Waypoint and gateway attachment: such a policy is not for the node's L4 path.
    pub target_ref: Option<serde_json::Value>,
    #[serde(default)]
    pub target_refs: Vec<serde_json::Value>,
    #[serde(default)]
    pub rules: Vec<Rule>,
    #[serde(default)]
    pub action: Action,
    pub provider: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct From {
    #[serde(default)]
    pub source: Source,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Source {
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub request_principals: Vec<String>,
    pub not_request_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    pub service_accounts: Vec<String>,
    pub not_service_accounts: Vec<String>,
    pub ip_blocks: Vec<String>,
    pub not_ip_blocks: Vec<String>,
    pub remote_ip_blocks: Vec<String>,
    pub not_remote_ip_blocks: Vec<String>,
    pub trust_domains: Vec<String>,
    pub not_trust_domains: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct To {
    #[serde(default)]
    pub operation: Operation,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Operation {
    pub hosts: Vec<String>,
    pub not_hosts: Vec<String>,
    pub ports: Vec<String>,
    pub not_ports: Vec<String>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    pub paths: Vec<String>,
    pub not_paths: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Condition {
    pub key: String,
    pub values: Vec<String>,
    pub not_values: Vec<String>,
}

/// Either kind, as a node file's `policies:` list holds them (`kind:` says which).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind")]
pub enum Resource {
    PeerAuthentication(Manifest<PeerAuthenticationSpec>),
    AuthorizationPolicy(Manifest<AuthorizationPolicySpec>),
}

/// A Kubernetes-style manifest: `apiVersion`, `metadata`, `spec`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest<S> {
    pub api_version: String,
    pub metadata: Metadata,
    pub spec: S,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Metadata {
    pub name: String,
    pub namespace: String,
}

/// The API versions both kinds are served at.
pub const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

/// Policy objects of both kinds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Objects {
    pub peer: Vec<Object<PeerAuthenticationSpec>>,
    pub authz: Vec<Object<AuthorizationPolicySpec>>,
}

/// Splits a node file's `policies:` list by kind, each keeping its position for oldest-wins;
/// refuses an API version Istio does not serve these kinds at, naming the entry.
pub fn split(resources: Vec<Resource>) -> Result<Objects, crate::state::Error> {
    let mut objects = Objects::default();
    for (order, resource) in resources.into_iter().enumerate() {
        let version = match &resource {
            Resource::PeerAuthentication(m) => &m.api_version,
            Resource::AuthorizationPolicy(m) => &m.api_version,
        };
        if !API_VERSIONS.contains(&version.as_str()) {
            return Err(crate::state::Error {
                path: format!("policies[{order}].apiVersion"),
                value: version.clone(),
                reason: format!("expected one of {}", API_VERSIONS.join(", ")),
            });
        }
        match resource {
            Resource::PeerAuthentication(m) => objects.peer.push(m.into_object(order)),
            Resource::AuthorizationPolicy(m) => objects.authz.push(m.into_object(order)),
        }
    }
    Ok(objects)
}

impl<S> Manifest<S> {
    fn into_object(self, order: usize) -> Object<S> {
        Object {
            namespace: self.metadata.namespace,
            name: self.metadata.name,
            created: 0,
            order,
            spec: self.spec,
        }
    }
}
