//! One record per proxied connection: the access log line, and how the connection ended.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::time::Instant;

use super::tally::{Arrival, Tally};
use super::{Pod, Proxy, carried};
use crate::hbone::{self, Transfer};
use crate::identity::Id;
use crate::metrics::{self, Peer, Reporter, ResponseFlag, SecurityPolicy, TrafficLabels};
use crate::policy;
use crate::state::{Locality, ServicePort, Snapshot, Workload};

/// How a proxied connection ended: a closed set, so a log field or metric label made from it
/// has bounded values. Built from the typed errors of the layer that decided
/// ([`hbone::Reason`], [`policy::Reason`], the inbound checks, the upstream dial).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Carried until both sides closed.
    Complete,
    /// The connection broke while bytes were being carried.
    Broken,
    /// The tunnel to the destination's node could not be opened.
    Tunnel(hbone::Reason),
    /// Refused by policy.
    Denied(policy::Reason),
    /// The destination is not an address of this pod, or is one of the proxy's own ports.
    BadTarget,
    /// The destination workload is unknown to this node.
    UnknownWorkload,
    /// The app, or the destination outside the mesh, could not be reached.
    UpstreamUnreachable,
    /// The node, or the peer, held its maximum of tunnels.
    Capacity,
}

impl Outcome {
    /// The access log's `reason` (absent for a complete connection).
    pub fn label(self) -> Option<&'static str> {
        Some(match self {
            Self::Complete => return None,
            Self::Broken => "broken",
            Self::Tunnel(reason) => reason.as_str(),
            Self::Denied(reason) => reason.as_str(),
            Self::BadTarget => "bad_target",
            Self::UnknownWorkload => "unknown_workload",
            Self::UpstreamUnreachable => "upstream_unreachable",
            Self::Capacity => "capacity",
        })
    }

    /// Istio's `response_flags` for a connection that ended this way.
    pub fn response_flag(self) -> ResponseFlag {
        use hbone::Reason;
        match self {
            Self::Complete | Self::Broken => ResponseFlag::None,
            Self::Denied(_) | Self::Tunnel(Reason::PolicyDenied) => ResponseFlag::Deny,
            Self::Tunnel(Reason::PeerIdentity) => ResponseFlag::TlsFailure,
            Self::Tunnel(Reason::PeerProtocol) => ResponseFlag::H2HandshakeFailure,
            Self::Tunnel(Reason::PeerUnreachable | Reason::UpstreamRefused | Reason::Internal)
            | Self::BadTarget
            | Self::UnknownWorkload
            | Self::UpstreamUnreachable
            | Self::Capacity => ResponseFlag::Connect,
        }
    }

    /// How an HBONE server answers a CONNECT that ended this way before it was accepted.
    pub fn refusal(self) -> Option<hbone::Refusal> {
        match self {
            Self::Complete | Self::Broken | Self::Tunnel(_) => None,
            Self::Denied(_) => Some(hbone::Refusal::Denied),
            Self::BadTarget => Some(hbone::Refusal::BadRequest),
            Self::UnknownWorkload | Self::UpstreamUnreachable | Self::Capacity => {
                Some(hbone::Refusal::Unavailable)
            }
        }
    }
}

/// A connection closed because a policy change denies it now.
#[derive(Debug, thiserror::Error)]
#[error("closed: a policy change denies it: {0}")]
struct Revoked(policy::Denial);

/// Which way the connection goes, from the pod's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

/// How the bytes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Inside an HBONE tunnel (mTLS).
    Hbone,
    /// Plain TCP to a destination outside the mesh.
    Passthrough,
    /// Plain TCP from outside the mesh into a PERMISSIVE pod.
    Plaintext,
    /// A probe from the pod's own node (source 169.254.7.127 after the host's SNAT): plain
    /// TCP, admitted whatever the pod's PeerAuthentication.
    Probe,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hbone => "hbone",
            Self::Passthrough => "passthrough",
            Self::Plaintext => "plaintext",
            Self::Probe => "probe",
        }
    }
}

pub(super) struct Record {
    pub(super) direction: Direction,
    pub(super) transport: Transport,
    pub(super) src: SocketAddr,
    pub(super) dst: SocketAddr,
    pub(super) src_id: Option<Id>,
    pub(super) dst_id: Option<Id>,
    /// The policy (`namespace/name`) that denied the connection, if one did.
    pub(super) policy: Option<Arc<str>>,
    pub(super) pod: Arc<str>,
    /// For a tunnel: the address of the destination's node it went to.
    pub(super) hbone_addr: Option<SocketAddr>,
    /// The workloads at both ends and the Service dialled, once known.
    ends: Ends,
    /// The connection's share of the TCP metrics, once it is counted.
    metrics: Option<metrics::Connection>,
    /// Its entry in the node's table of open connections, once it is counted.
    carried: Option<carried::Held>,
    /// Where an inbound connection's arrival is counted for `culvert check`, once it is
    /// counted (probes are not).
    tally: Option<Arc<Tally>>,
    start: Instant,
}

/// The workloads at a connection's two ends as the cluster view knows them, and the Service
/// the app dialled (on the destination's side, one the destination is an endpoint of).
#[derive(Debug, Default)]
pub(super) struct Ends {
    pub(super) source: Option<Arc<Workload>>,
    pub(super) destination: Option<Arc<Workload>>,
    pub(super) service: Option<Arc<ServicePort>>,
    /// The localities of the two workloads' nodes, where known.
    pub(super) localities: [Option<Arc<Locality>>; 2],
}

impl Ends {
    pub(super) fn new(
        snapshot: &Snapshot,
        source: Option<&Arc<Workload>>,
        destination: Option<&Arc<Workload>>,
        service: Option<&Arc<ServicePort>>,
    ) -> Self {
        let locality =
            |w: Option<&Arc<Workload>>| w.and_then(|w| snapshot.locality(&w.node)).cloned();
        Self {
            localities: [locality(source), locality(destination)],
            source: source.cloned(),
            destination: destination.cloned(),
            service: service.cloned(),
        }
    }
}

impl Record {
    pub(super) fn new(direction: Direction, pod: &Pod, src: SocketAddr, dst: SocketAddr) -> Self {
        Self {
            direction,
            transport: Transport::Passthrough,
            src,
            dst,
            src_id: None,
            dst_id: None,
            policy: None,
            pod: pod.label.clone(),
            hbone_addr: None,
            ends: Ends::default(),
            metrics: None,
            carried: None,
            tally: None,
            start: Instant::now(),
        }
    }

    /// Counts the connection in the TCP metrics, and lists it among the node's open
    /// connections, from now until it ends, between `ends`. Its transport and identities must
    /// be set: only over HBONE are they principals (the tunnel carries nothing unless each side
    /// proved its own).
    pub(super) fn count(&mut self, proxy: &Proxy, ends: Ends) {
        let mtls = self.transport == Transport::Hbone;
        let reporter = match self.direction {
            Direction::Outbound => Reporter::Source,
            Direction::Inbound => Reporter::Destination,
        };
        fn peer<'a>(
            workload: &'a Option<Arc<Workload>>,
            id: &'a Option<Id>,
            locality: &'a Option<Arc<Locality>>,
            mtls: bool,
        ) -> Peer<'a> {
            Peer {
                workload: workload.as_deref(),
                principal: id.as_ref().filter(|_| mtls),
                locality: locality.as_deref(),
            }
        }
        let security = match mtls {
            true => SecurityPolicy::MutualTls,
            false => SecurityPolicy::Unknown,
        };
        let labels = TrafficLabels::new(
            reporter,
            peer(&ends.source, &self.src_id, &ends.localities[0], mtls),
            peer(&ends.destination, &self.dst_id, &ends.localities[1], mtls),
            ends.service.as_deref(),
            security,
        );
        self.metrics = Some(proxy.tcp.open(labels));
        self.ends = ends;
        if self.direction == Direction::Inbound && self.transport != Transport::Probe {
            self.tally = Some(proxy.arrivals.clone());
        }
        let peer = match self.direction {
            Direction::Outbound => &self.dst_id,
            Direction::Inbound => &self.src_id,
        };
        self.carried = Some(proxy.carried.hold(carried::Connection {
            pod: self.pod.clone(),
            direction: self.direction,
            transport: self.transport,
            src: self.src,
            dst: self.dst,
            actual: self.hbone_addr.unwrap_or(self.dst),
            peer: peer.clone().filter(|_| mtls),
            opened: std::time::SystemTime::now(),
        }));
    }

    /// Writes the access-log line for a connection that carried `transfer`: INFO when it
    /// completed, WARN when it broke.
    pub(super) fn carried(self, transfer: &Transfer) {
        let outcome = match transfer.error {
            None => Outcome::Complete,
            Some(_) => Outcome::Broken,
        };
        let error = transfer
            .error
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static));
        self.finish(outcome, Some(transfer), error);
    }

    /// Writes the access-log line for a connection a policy change closed, at WARN (the bytes
    /// it carried are not counted).
    pub(super) fn revoked(mut self, denial: &policy::Denial) {
        self.policy = denial.policy.clone();
        let error = Revoked(denial.clone());
        self.finish(Outcome::Denied(denial.reason), None, Some(&error));
    }

    /// Writes the access-log line for a connection that never carried anything, at WARN.
    pub(super) fn failed(self, outcome: Outcome, error: &(dyn std::error::Error + 'static)) {
        self.finish(outcome, None, Some(error));
    }

    fn finish(
        mut self,
        outcome: Outcome,
        transfer: Option<&Transfer>,
        error: Option<&(dyn std::error::Error + 'static)>,
    ) {
        let (sent, received) = transfer.map_or((0, 0), |t| (t.sent, t.received));
        // `sent` is what the proxy read from its local socket: the app that opened the
        // connection, except on an inbound tunnel, whose local socket is the app it reached.
        let (request, response) = match (self.direction, self.transport) {
            (Direction::Inbound, Transport::Hbone) => (received, sent),
            _ => (sent, received),
        };
        if let Some(metrics) = self.metrics.take() {
            if let (Outcome::Denied(reason), Direction::Inbound) = (outcome, self.direction) {
                metrics.tcp().denied(reason);
            }
            metrics.close(request, response, outcome.response_flag());
        }
        if let Some(tally) = self.tally.take() {
            let arrival = match (self.transport, outcome) {
                (Transport::Hbone, _) => Arrival::Mtls,
                (_, Outcome::Denied(_)) => Arrival::Refused,
                _ => Arrival::Plaintext,
            };
            let (source, src) = (&self.ends.source, self.src);
            let from = || match source {
                Some(w) => format!("{}/{}", w.namespace, w.name).into(),
                None => src.ip().to_string().into(),
            };
            tally.note(arrival, from, &self.pod);
        }
        let duration = format!("{}ms", self.start.elapsed().as_millis());
        let (direction, transport) = (self.direction.as_str(), self.transport.as_str());
        // Only an identity proven in mutual TLS is the source's; the destination's is the one
        // the pod is served as (inbound) or was required of it (outbound).
        let src_id = self.src_id.as_ref().map(Id::as_str);
        let dst_id = self.dst_id.as_ref().map(Id::as_str);
        let (src, dst) = (&self.ends.source, &self.ends.destination);
        let src_workload = src.as_ref().map(|w| &*w.name);
        let src_namespace = src.as_ref().map(|w| &*w.namespace);
        let dst_workload = dst.as_ref().map(|w| &*w.name);
        let dst_namespace = dst.as_ref().map(|w| &*w.namespace);
        let dst_service = self.ends.service.as_ref().map(|p| p.hostname());
        let hbone_addr = self.hbone_addr.map(tracing::field::display);
        let policy = self.policy.as_deref();
        match error {
            None => tracing::info!(target: "access", parent: None,
                direction, transport, pod = &*self.pod, src.addr = %self.src,
                src.workload = src_workload, src.namespace = src_namespace, src.identity = src_id,
                dst.addr = %self.dst, dst.hbone_addr = hbone_addr, dst.service = dst_service,
                dst.workload = dst_workload, dst.namespace = dst_namespace,
                dst.identity = dst_id, bytes_sent = request, bytes_recv = response, duration,
                "connection complete"),
            Some(error) => tracing::warn!(target: "access", parent: None,
                direction, transport, pod = &*self.pod, src.addr = %self.src,
                src.workload = src_workload, src.namespace = src_namespace, src.identity = src_id,
                dst.addr = %self.dst, dst.hbone_addr = hbone_addr, dst.service = dst_service,
                dst.workload = dst_workload, dst.namespace = dst_namespace,
                dst.identity = dst_id, bytes_sent = request, bytes_recv = response, duration,
                reason = outcome.label(), policy, error, "connection failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_have_distinct_labels_and_the_wire_contracts_statuses() {
        let all = [
            Outcome::Complete,
            Outcome::Broken,
            Outcome::Tunnel(hbone::Reason::PeerIdentity),
            Outcome::Denied(policy::Reason::PlaintextToStrict),
            Outcome::BadTarget,
            Outcome::UnknownWorkload,
            Outcome::UpstreamUnreachable,
            Outcome::Capacity,
        ];
        let labels: std::collections::HashSet<_> = all.iter().map(|o| o.label()).collect();
        assert_eq!(labels.len(), all.len());
        assert_eq!(Outcome::Complete.label(), None);
        let status = |o: Outcome| o.refusal().map(|r| r.status().as_u16());
        assert_eq!(status(Outcome::BadTarget), Some(400));
        assert_eq!(
            status(Outcome::Denied(policy::Reason::PlaintextToStrict)),
            Some(401)
        );
        assert_eq!(status(Outcome::UnknownWorkload), Some(503));
        assert_eq!(status(Outcome::UpstreamUnreachable), Some(503));
        assert_eq!(status(Outcome::Complete), None);
        // What a client makes of a 401 is what the server meant by it.
        let refused = hbone::Error::Refused {
            target: hbone::TargetAddr("10.0.0.1:80".parse().unwrap()),
            status: hbone::Refusal::Denied.status(),
        };
        assert_eq!(refused.reason(), hbone::Reason::PolicyDenied);
    }
}
