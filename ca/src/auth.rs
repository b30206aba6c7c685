//! Who is asking, and for what they may ask: the caller's token checked by the apiserver
//! (TokenReview), then istiod's node authorizer rules plus a trust-domain check.

use std::collections::BTreeSet;

use culvert::identity::Id;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, PostParams};

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// A refusal: the gRPC code it maps to and the reason, for the caller and the log.
#[derive(Debug, thiserror::Error)]
pub enum Denied {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    InvalidArgument(String),
    /// The apiserver could not answer: the client should retry.
    #[error("{0}")]
    Unavailable(String),
}

impl From<Denied> for tonic::Status {
    fn from(d: Denied) -> Self {
        match d {
            Denied::Unauthenticated(m) => Self::unauthenticated(m),
            Denied::PermissionDenied(m) => Self::permission_denied(m),
            Denied::InvalidArgument(m) => Self::invalid_argument(m),
            Denied::Unavailable(m) => Self::unavailable(m),
        }
    }
}

/// An authenticated caller: a service account, through a token bound to one of its pods.
#[derive(Debug, Clone)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: String,
    pub pod_uid: String,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} (pod {})",
            self.namespace, self.service_account, self.pod_name
        )
    }
}

/// The CA's rules.
pub struct Policy {
    pub trust_domain: String,
    pub audience: String,
    /// `clusterid` values taken as this cluster (its own id, and the empty one).
    pub cluster_id: String,
    /// `namespace/service-account` of the node agents that may impersonate.
    pub trusted_node_accounts: BTreeSet<String>,
}

/// Checks the bearer token with the apiserver.
pub async fn authenticate(
    client: &kube::Client,
    policy: &Policy,
    authorization: Option<&str>,
    cluster_id: Option<&str>,
) -> Result<Caller, Denied> {
    let unauthenticated = |m: &str| Denied::Unauthenticated(m.to_owned());
    match cluster_id {
        None | Some("") => {}
        Some(id) if id == policy.cluster_id => {}
        Some(id) => {
            return Err(Denied::Unauthenticated(format!(
                "client claims to be in cluster {id:?}; this CA serves {:?}",
                policy.cluster_id
            )));
        }
    }
    let token = authorization
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| unauthenticated("no bearer token"))?;
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: token.to_owned(),
            audiences: Some(vec![policy.audience.clone()]),
        },
        ..Default::default()
    };
    let review = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| Denied::Unavailable(format!("TokenReview failed: {e}")))?;
    let status = review.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        let why = status.error.unwrap_or_else(|| "not authenticated".into());
        return Err(Denied::Unauthenticated(format!("token refused: {why}")));
    }
    if let Some(audiences) = &status.audiences
        && !audiences.contains(&policy.audience)
    {
        return Err(Denied::Unauthenticated(format!(
            "token is not for audience {:?}",
            policy.audience
        )));
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let groups = user.groups.unwrap_or_default();
    let parts: Vec<&str> = username.split(':').collect();
    let (namespace, service_account) = match parts.as_slice() {
        ["system", "serviceaccount", ns, sa]
            if groups.iter().any(|g| g == "system:serviceaccounts") =>
        {
            ((*ns).to_owned(), (*sa).to_owned())
        }
        _ => {
            return Err(Denied::Unauthenticated(format!(
                "{username:?} is not a service account"
            )));
        }
    };
    let extra = user.extra.unwrap_or_default();
    let one = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
    let (Some(pod_name), Some(pod_uid)) = (one(POD_NAME), one(POD_UID)) else {
        return Err(Denied::Unauthenticated(format!(
            "the token of {namespace}/{service_account} is not bound to a pod (a legacy or \
             TokenRequest token without a pod): only projected pod tokens are accepted"
        )));
    };
    Ok(Caller {
        namespace,
        service_account,
        pod_name,
        pod_uid,
    })
}

/// Which identity `caller` may have signed: its own, or with `impersonate` one with a pod on the
/// caller's node.
pub async fn authorize(
    client: &kube::Client,
    policy: &Policy,
    caller: &Caller,
    impersonate: Option<&str>,
) -> Result<Id, Denied> {
    let invalid = |m: String| Denied::InvalidArgument(m);
    let Some(requested) = impersonate else {
        return Id::new(
            &policy.trust_domain,
            &caller.namespace,
            &caller.service_account,
        )
        .map_err(|e| invalid(e.to_string()));
    };
    let account = format!("{}/{}", caller.namespace, caller.service_account);
    if !policy.trusted_node_accounts.contains(&account) {
        return Err(Denied::Unauthenticated(format!(
            "{account} may not impersonate: it is not a trusted node account"
        )));
    }
    let id: Id = requested
        .parse()
        .map_err(|e: culvert::identity::ParseError| invalid(e.to_string()))?;
    if id.trust_domain() != policy.trust_domain {
        return Err(Denied::PermissionDenied(format!(
            "{id} is outside trust domain {}",
            policy.trust_domain
        )));
    }
    let unavailable = |e: kube::Error| Denied::Unavailable(format!("reading pods: {e}"));
    let pods = Api::<Pod>::namespaced(client.clone(), &caller.namespace);
    let pod = pods
        .get_opt(&caller.pod_name)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| {
            Denied::Unauthenticated(format!("{caller}: the token's pod no longer exists"))
        })?;
    if pod.metadata.uid.as_deref() != Some(&caller.pod_uid) {
        return Err(Denied::Unauthenticated(format!(
            "{caller}: the pod was recreated since the token was issued (UID mismatch)"
        )));
    }
    let spec = pod.spec.unwrap_or_default();
    if spec.service_account_name.as_deref().unwrap_or("default") != caller.service_account {
        return Err(Denied::Unauthenticated(format!(
            "{caller}: the pod runs as another service account"
        )));
    }
    let Some(node) = spec.node_name.filter(|n| !n.is_empty()) else {
        return Err(Denied::PermissionDenied(format!(
            "{caller}: the caller's pod is not on a node"
        )));
    };
    // Pending pods count (they need certificates before they start); Failed and Succeeded
    // ones do not.
    let fields = format!(
        "spec.nodeName={node},spec.serviceAccountName={},status.phase!=Failed,status.phase!=Succeeded",
        id.service_account()
    );
    let found = Api::<Pod>::namespaced(client.clone(), id.namespace())
        .list(&ListParams::default().fields(&fields))
        .await
        .map_err(unavailable)?;
    if found.items.is_empty() {
        return Err(Denied::PermissionDenied(format!(
            "no running or pending pod of {}/{} is on node {node}",
            id.namespace(),
            id.service_account()
        )));
    }
    Ok(id)
}
