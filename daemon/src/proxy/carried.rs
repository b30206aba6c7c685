//! Every connection the node carries now, for the admin API: `/connections`, and each local
//! workload's connections in `/config_dump`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::conn::{Direction, Transport};
use crate::identity::Id;

/// One open connection, as a reader sees it.
#[derive(Debug, Clone)]
pub struct Connection {
    /// The local pod, `namespace/name`.
    pub pod: Arc<str>,
    pub direction: Direction,
    pub transport: Transport,
    /// Who opened it: the local app (outbound) or the peer pod (inbound).
    pub src: SocketAddr,
    /// The address the app asked for.
    pub dst: SocketAddr,
    /// Where the bytes went: the destination node's HBONE address for a tunnel, else `dst`.
    pub actual: SocketAddr,
    /// The other end's identity, proven in mutual TLS; `None` without a tunnel.
    pub peer: Option<Id>,
    pub opened: SystemTime,
}

impl Connection {
    /// This pod's end.
    pub fn local(&self) -> SocketAddr {
        match self.direction {
            Direction::Outbound => self.src,
            Direction::Inbound => self.dst,
        }
    }

    /// The other end, as this node reaches or was reached by it.
    pub fn remote(&self) -> SocketAddr {
        match self.direction {
            Direction::Outbound => self.actual,
            Direction::Inbound => self.src,
        }
    }
}

/// The table; each entry leaves it when the connection that holds it ends.
#[derive(Default)]
pub struct Carried {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Connection>>,
}

/// One registered connection; unregisters on drop.
pub(super) struct Held {
    carried: Arc<Carried>,
    id: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.carried.lock().remove(&self.id);
    }
}

impl Carried {
    pub(super) fn hold(self: &Arc<Self>, conn: Connection) -> Held {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, conn);
        Held {
            carried: self.clone(),
            id,
        }
    }

    /// Every connection open now, oldest first.
    pub fn list(&self) -> Vec<Connection> {
        let mut conns: Vec<(u64, Connection)> =
            self.lock().iter().map(|(id, c)| (*id, c.clone())).collect();
        conns.sort_unstable_by_key(|(id, _)| *id);
        conns.into_iter().map(|(_, c)| c).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Connection>> {
        self.conns
            .lock()
            .expect("carried connections lock poisoned")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(direction: Direction) -> Connection {
        Connection {
            pod: "shop/cart".into(),
            direction,
            transport: Transport::Hbone,
            src: "10.0.0.5:40000".parse().unwrap(),
            dst: "10.0.1.7:8080".parse().unwrap(),
            actual: "10.0.1.7:15008".parse().unwrap(),
            peer: None,
            opened: SystemTime::now(),
        }
    }

    #[test]
    fn a_connection_is_listed_while_held_and_ends_are_seen_from_the_pod() {
        let carried = Arc::new(Carried::default());
        let out = carried.hold(conn(Direction::Outbound));
        let inbound = carried.hold(conn(Direction::Inbound));
        let listed = carried.list();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].direction, Direction::Outbound);
        assert_eq!(listed[0].local(), listed[0].src);
        assert_eq!(listed[0].remote().port(), 15008);
        assert_eq!(listed[1].local(), listed[1].dst);
        assert_eq!(listed[1].remote(), listed[1].src);
        drop(out);
        assert_eq!(carried.list().len(), 1);
        drop(inbound);
        assert!(carried.list().is_empty());
    }
}
