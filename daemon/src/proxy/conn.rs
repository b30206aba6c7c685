//! One record per proxied connection: the access log line.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::time::Instant;

use super::Pod;
use crate::hbone::Transfer;
use crate::identity::Id;

/// Which way the connection goes, from the pod's point of view.
#[derive(Debug, Clone, Copy)]
pub(super) enum Direction {
    Outbound,
    Inbound,
}

/// How the bytes travel.
#[derive(Debug, Clone, Copy)]
pub(super) enum Transport {
    /// Inside an HBONE tunnel (mTLS).
    Hbone,
    /// Plain TCP to a destination outside the mesh.
    Passthrough,
    /// Plain TCP from outside the mesh into a PERMISSIVE pod.
    Plaintext,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Self::Hbone => "hbone",
            Self::Passthrough => "passthrough",
            Self::Plaintext => "plaintext",
        }
    }
}

pub(super) struct Record {
    pub(super) direction: Direction,
    pub(super) transport: Transport,
    pub(super) src: SocketAddr,
    pub(super) dst: SocketAddr,
    /// Closed label for why a tunnel failed (`hbone::Reason`), when it did.
    pub(super) reason: Option<&'static str>,
    pub(super) src_id: Option<Id>,
    pub(super) dst_id: Option<Id>,
    pub(super) pod: Arc<str>,
    start: Instant,
}

impl Record {
    pub(super) fn new(direction: Direction, pod: &Pod, src: SocketAddr, dst: SocketAddr) -> Self {
        Self {
            direction,
            transport: Transport::Passthrough,
            src,
            dst,
            reason: None,
            src_id: None,
            dst_id: None,
            pod: pod.label.clone(),
            start: Instant::now(),
        }
    }

    /// Writes the access-log line: INFO when the connection completed, WARN when it failed.
    pub(super) fn finish(
        self,
        transfer: Option<&Transfer>,
        error: Option<&(dyn std::error::Error + 'static)>,
    ) {
        let error = error.or_else(|| {
            transfer
                .and_then(|t| t.error.as_ref())
                .map(|e| e as &(dyn std::error::Error + 'static))
        });
        let (sent, received) = transfer.map_or((0, 0), |t| (t.sent, t.received));
        let duration_ms = self.start.elapsed().as_millis() as u64;
        let (direction, transport) = (self.direction.as_str(), self.transport.as_str());
        let src_id = self.src_id.as_ref().map(Id::as_str);
        let dst_id = self.dst_id.as_ref().map(Id::as_str);
        match error {
            None => tracing::info!(target: "access", parent: None,
                direction, transport, pod = &*self.pod, src.addr = %self.src, dst.addr = %self.dst,
                src.id = src_id, dst.id = dst_id, bytes_sent = sent, bytes_received = received,
                duration_ms, "connection complete"),
            Some(error) => tracing::warn!(target: "access", parent: None,
                direction, transport, pod = &*self.pod, src.addr = %self.src, dst.addr = %self.dst,
                src.id = src_id, dst.id = dst_id, bytes_sent = sent, bytes_received = received,
                duration_ms, reason = self.reason, error, "connection failed"),
        }
    }
}
