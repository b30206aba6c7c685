//! Istio's policy kinds as API objects (`security.istio.io/v1`): kube-rs resources for the
//! watches, and their conversion to [`Object`]s.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::core::NamespaceResourceScope;
use serde::{Deserialize, Serialize};

use crate::policy::istio::{AuthorizationPolicySpec, Object, PeerAuthenticationSpec};

/// A spec type and the kind it belongs to.
pub(super) trait Kind: Clone + Default + std::fmt::Debug + Send + Sync + 'static {
    const KIND: &'static str;
    const PLURAL: &'static str;
}

impl Kind for PeerAuthenticationSpec {
    const KIND: &'static str = "PeerAuthentication";
    const PLURAL: &'static str = "peerauthentications";
}

impl Kind for AuthorizationPolicySpec {
    const KIND: &'static str = "AuthorizationPolicy";
    const PLURAL: &'static str = "authorizationpolicies";
}

/// One PeerAuthentication or AuthorizationPolicy as the API serves it (status is not read).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Istio<S> {
    pub(super) metadata: ObjectMeta,
    #[serde(default)]
    pub(super) spec: S,
}

impl<S: Kind> Resource for Istio<S> {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        S::KIND.into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        "security.istio.io".into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        S::PLURAL.into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl<S: Kind> Istio<S> {
    /// The object policy compiles: its place, its age (oldest wins) and its spec.
    pub(super) fn to_object(&self) -> Option<Object<S>> {
        Some(Object {
            namespace: self.metadata.namespace.clone()?,
            name: self.metadata.name.clone()?,
            created: self
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(0, |t| t.0.as_second()),
            order: 0,
            spec: self.spec.clone(),
        })
    }
}

/// Keeps what policy reads: name, namespace, creation time, resource version, spec.
pub(super) fn trim<S>(object: &mut Istio<S>) {
    let meta = &mut object.metadata;
    meta.managed_fields = None;
    meta.annotations = None;
    meta.labels = None;
    meta.owner_references = None;
    meta.finalizers = None;
}
