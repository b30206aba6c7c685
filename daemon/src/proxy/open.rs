//! The inbound connections a pod holds open, so a policy change can decide each one again and
//! close those it now denies.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::Pod;
use crate::identity::Id;
use crate::policy::{self, Decision, Denial};
use crate::state::Snapshot;

/// What a connection was admitted as: enough to decide it again.
struct Admitted {
    pod: Arc<Pod>,
    peer: Option<Id>,
    src: SocketAddr,
    dst: SocketAddr,
    revoke: CancellationToken,
    /// Why it was revoked, once it is.
    denial: Arc<Mutex<Option<Denial>>>,
}

/// Every open inbound connection of this node.
#[derive(Default)]
pub(crate) struct Open {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Admitted>>,
}

/// One registered connection; unregisters on drop.
pub(crate) struct Held {
    open: Arc<Open>,
    id: u64,
    revoke: CancellationToken,
    denial: Arc<Mutex<Option<Denial>>>,
}

impl Held {
    /// Resolves with the denial once a policy change revokes the connection.
    pub(crate) async fn revoked(&self) -> Denial {
        self.revoke.cancelled().await;
        self.denial
            .lock()
            .expect("lock poisoned")
            .clone()
            .expect("revoked with a denial")
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.open
            .conns
            .lock()
            .expect("open connections lock poisoned")
            .remove(&self.id);
    }
}

impl Open {
    /// Registers a connection admitted to `pod`.
    pub(crate) fn hold(
        self: &Arc<Self>,
        pod: &Arc<Pod>,
        peer: Option<&Id>,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Held {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let revoke = CancellationToken::new();
        let denial = Arc::default();
        let admitted = Admitted {
            pod: pod.clone(),
            peer: peer.cloned(),
            src,
            dst,
            revoke: revoke.clone(),
            denial: Arc::clone(&denial),
        };
        self.conns
            .lock()
            .expect("open connections lock poisoned")
            .insert(id, admitted);
        Held {
            open: self.clone(),
            id,
            revoke,
            denial,
        }
    }

    /// Decides every open connection again under `snapshot` and revokes those it denies;
    /// returns how many. A connection whose pod the snapshot no longer knows is left to end on
    /// its own (the pod is going away; its release closes its listeners).
    pub(crate) fn recheck(&self, snapshot: &Snapshot) -> usize {
        let conns = self.conns.lock().expect("open connections lock poisoned");
        let mut revoked = 0;
        for c in conns.values() {
            if c.revoke.is_cancelled() {
                continue;
            }
            let Some(workload) = snapshot.workload(&c.pod.namespace, &c.pod.name) else {
                continue;
            };
            let conn = policy::Connection {
                peer: c.peer.as_ref(),
                src: c.src,
                dst: c.dst,
            };
            if let Decision::Deny(denial) = policy::inbound(snapshot, workload, &conn) {
                *c.denial.lock().expect("lock poisoned") = Some(denial);
                c.revoke.cancel();
                revoked += 1;
            }
        }
        revoked
    }

    pub(crate) fn len(&self) -> usize {
        self.conns
            .lock()
            .expect("open connections lock poisoned")
            .len()
    }
}
