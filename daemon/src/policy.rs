//! Who may talk to whom: pure, synchronous decisions over a state snapshot.
//!
//! Owns every allow/deny decision of the data path. Does no IO and keeps no state. Istio's
//! PeerAuthentication and AuthorizationPolicy (L4) are read by [`istio`], compiled by
//! [`Policies`] and applied here to each inbound connection.

mod compiled;
pub mod istio;

use std::sync::Arc;

pub use compiled::{Authz, Connection, Dumped, L7Deny, Policies, Settings, Verdict};

use crate::state::{PeerAuthentication, Snapshot, Workload};

/// The verdict on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(Denial),
}

/// Why a connection was denied, and by which policy when one named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub reason: Reason,
    /// `namespace/name` of the DENY policy that matched.
    pub policy: Option<Arc<str>>,
}

/// Why a connection was denied; a closed set, used as a log and metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No peer identity (plaintext) to a workload, or port, whose PeerAuthentication is STRICT.
    PlaintextToStrict,
    /// A DENY AuthorizationPolicy matched.
    PolicyDenied,
    /// ALLOW AuthorizationPolicies select the workload and none matched.
    NotAllowed,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PlaintextToStrict => "plaintext_to_strict",
            Self::PolicyDenied => "policy_denied",
            Self::NotAllowed => "not_allowed",
        }
    }
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.policy {
            Some(policy) => write!(f, "{} ({policy})", self.reason.as_str()),
            None => f.write_str(self.reason.as_str()),
        }
    }
}

fn deny(reason: Reason, policy: Option<Arc<str>>) -> Decision {
    Decision::Deny(Denial { reason, policy })
}

/// A connection arriving at `dst`, over HBONE (`conn.peer` is the verified identity) or in
/// plaintext (`conn.peer` is `None`): PeerAuthentication for its port first (STRICT refuses
/// plaintext), then AuthorizationPolicy.
pub fn inbound(snapshot: &Snapshot, dst: &Workload, conn: &Connection<'_>) -> Decision {
    let default = dst
        .peer_authentication
        .unwrap_or(snapshot.peer_authentication);
    let policies = &snapshot.policies;
    let mode = policies.peer_mode(&dst.namespace, &dst.labels, conn.dst.port(), default);
    if conn.peer.is_none() && mode == PeerAuthentication::Strict {
        return deny(Reason::PlaintextToStrict, None);
    }
    match policies.authorize(&dst.namespace, &dst.labels, conn) {
        Verdict::Allow => Decision::Allow,
        Verdict::Denied(policy) => deny(Reason::PolicyDenied, Some(policy)),
        Verdict::NotAllowed => deny(Reason::NotAllowed, None),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::identity::Id;

    fn snapshot(
        mesh: PeerAuthentication,
        own: Option<PeerAuthentication>,
        policies: &str,
    ) -> (Snapshot, Workload) {
        let w = Workload {
            name: "server".into(),
            namespace: "demo".into(),
            workload_name: "server".into(),
            workload_type: crate::state::WorkloadType::Pod,
            node: "n1".into(),
            ips: crate::state::Ips::One("10.0.0.1".parse().unwrap()),
            labels: [("app", "server")].into_iter().collect(),
            enrollment: Some(true),
            peer_authentication: own,
            identity: Id::new("cluster.local", "demo", "server").unwrap(),
        };
        let resources: Vec<istio::Resource> = serde_yaml::from_str(policies).unwrap();
        let objects = istio::split(resources).unwrap();
        let compiled = Policies::build(&Settings::default(), objects.peer, objects.authz);
        let snapshot = Snapshot::build(
            "cluster.local",
            mesh,
            Default::default(),
            vec![Arc::new(w.clone())],
            vec![],
        )
        .unwrap()
        .with_policies(Arc::new(compiled));
        (snapshot, w)
    }

    fn conn(peer: Option<&Id>, port: u16) -> Connection<'_> {
        Connection {
            peer,
            src: "10.0.0.9:40000".parse().unwrap(),
            dst: SocketAddr::new("10.0.0.1".parse().unwrap(), port),
        }
    }

    #[test]
    fn plaintext_follows_the_workload_then_the_mesh_mode() {
        use PeerAuthentication::{Permissive, Strict};
        let deny = deny(Reason::PlaintextToStrict, None);
        for (mesh, own, want) in [
            (Permissive, None, Decision::Allow),
            (Strict, None, deny.clone()),
            (Strict, Some(Permissive), Decision::Allow),
            (Permissive, Some(Strict), deny),
        ] {
            let (snap, w) = snapshot(mesh, own, "[]");
            assert_eq!(
                inbound(&snap, &w, &conn(None, 80)),
                want,
                "mesh {mesh:?}, workload {own:?}"
            );
        }
    }

    #[test]
    fn mesh_identities_are_allowed_over_hbone_without_authorization_policy() {
        let (snap, w) = snapshot(PeerAuthentication::Strict, None, "[]");
        let client = Id::new("cluster.local", "other", "client").unwrap();
        assert_eq!(
            inbound(&snap, &w, &conn(Some(&client), 80)),
            Decision::Allow
        );
    }

    #[test]
    fn api_policies_sit_above_the_node_files_defaults() {
        let strict_ns = "
- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata: { name: strict, namespace: demo }
  spec: { mtls: { mode: STRICT }, selector: { matchLabels: { app: server } }, portLevelMtls: { '9000': { mode: PERMISSIVE } } }
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: { name: no-other, namespace: demo }
  spec: { action: DENY, rules: [{ from: [{ source: { namespaces: [other] } }] }] }
";
        let (snap, w) = snapshot(PeerAuthentication::Permissive, None, strict_ns);
        let other = Id::new("cluster.local", "other", "client").unwrap();
        let mine = Id::new("cluster.local", "demo", "client").unwrap();
        assert_eq!(
            inbound(&snap, &w, &conn(None, 80)),
            deny(Reason::PlaintextToStrict, None)
        );
        // Port-level PERMISSIVE opens one port to plaintext.
        assert_eq!(inbound(&snap, &w, &conn(None, 9000)), Decision::Allow);
        assert_eq!(
            inbound(&snap, &w, &conn(Some(&other), 80)),
            deny(Reason::PolicyDenied, Some("demo/no-other".into()))
        );
        assert_eq!(inbound(&snap, &w, &conn(Some(&mine), 80)), Decision::Allow);
        let denial = Denial {
            reason: Reason::PolicyDenied,
            policy: Some("demo/no-other".into()),
        };
        assert_eq!(denial.to_string(), "policy_denied (demo/no-other)");
    }
}
