//! Who may talk to whom: pure, synchronous decisions over a state snapshot.
//!
//! Owns every allow/deny decision of the data path. Does no IO and keeps no state.
//! Today: PeerAuthentication (STRICT refuses plaintext). AuthorizationPolicy comes next and
//! lands here too.

use crate::identity::Id;
use crate::state::{PeerAuthentication, Snapshot, Workload};

/// The verdict on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(Reason),
}

/// Why a connection was denied; a closed set, used as a log and metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Plaintext to a workload whose PeerAuthentication is STRICT.
    PlaintextToStrict,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PlaintextToStrict => "plaintext_to_strict",
        }
    }
}

/// Plaintext (not HBONE) arriving at `dst`: allowed unless `dst` is STRICT.
pub fn plaintext_inbound(snapshot: &Snapshot, dst: &Workload) -> Decision {
    match snapshot.peer_authentication_of(dst) {
        PeerAuthentication::Permissive => Decision::Allow,
        PeerAuthentication::Strict => Decision::Deny(Reason::PlaintextToStrict),
    }
}

/// An mTLS client proven as `_src` arriving at `_dst` over HBONE. With no authorization
/// policies yet, every mesh identity is allowed (Istio's behaviour without AuthorizationPolicy).
pub fn hbone_inbound(_snapshot: &Snapshot, _dst: &Workload, _src: &Id) -> Decision {
    Decision::Allow
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(mesh: PeerAuthentication, own: Option<PeerAuthentication>) -> (Snapshot, Workload) {
        let w = Workload {
            name: "server".into(),
            namespace: "demo".into(),
            service_account: "server".into(),
            node: "n1".into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
            enrolled: true,
            enrollment: Some(true),
            peer_authentication: own,
            identity: Id::new("cluster.local", "demo", "server").unwrap(),
        };
        (
            Snapshot::build(
                "cluster.local",
                mesh,
                Default::default(),
                vec![w.clone()],
                vec![],
            )
            .unwrap(),
            w,
        )
    }

    #[test]
    fn plaintext_follows_the_workload_then_the_mesh_mode() {
        use PeerAuthentication::{Permissive, Strict};
        let deny = Decision::Deny(Reason::PlaintextToStrict);
        for (mesh, own, want) in [
            (Permissive, None, Decision::Allow),
            (Strict, None, deny),
            (Strict, Some(Permissive), Decision::Allow),
            (Permissive, Some(Strict), deny),
        ] {
            let (snap, w) = snapshot(mesh, own);
            assert_eq!(
                plaintext_inbound(&snap, &w),
                want,
                "mesh {mesh:?}, workload {own:?}"
            );
        }
    }

    #[test]
    fn mesh_identities_are_allowed_over_hbone_without_authorization_policy() {
        let (snap, w) = snapshot(PeerAuthentication::Strict, None);
        let client = Id::new("cluster.local", "other", "client").unwrap();
        assert_eq!(hbone_inbound(&snap, &w, &client), Decision::Allow);
    }
}
