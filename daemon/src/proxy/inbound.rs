//! Connections arriving at a pod: plaintext captured on the inbound port, and HBONE streams.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{Instrument, info_span};

use super::conn::{Direction, Outcome, Record, Transport};
use super::open::Held;
use super::{Pod, Proxy};
use crate::hbone::{self, CONNECT_TIMEOUT};
use crate::policy::{self, Decision};
use crate::redirect::{canonical, original_dst, rules};

/// Why an inbound connection was refused, for the access log.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("{0} is not an address of this pod")]
    NotLocal(SocketAddr),
    #[error("{0} is a proxy port")]
    ProxyPort(SocketAddr),
    #[error("workload unknown to this node")]
    UnknownWorkload,
    #[error("the node or this peer holds its maximum of HBONE streams")]
    Capacity,
    #[error("denied by policy: {0}")]
    Policy(policy::Denial),
    #[error("connecting to the app at {target}")]
    Upstream {
        target: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl Refused {
    /// The policy that refused, for the access log's `policy` field.
    fn policy(&self) -> Option<Arc<str>> {
        match self {
            Self::Policy(denial) => denial.policy.clone(),
            _ => None,
        }
    }

    fn outcome(&self) -> Outcome {
        match self {
            Self::NotLocal(_) | Self::ProxyPort(_) => Outcome::BadTarget,
            Self::UnknownWorkload => Outcome::UnknownWorkload,
            Self::Capacity => Outcome::Capacity,
            Self::Policy(denial) => Outcome::Denied(denial.reason),
            Self::Upstream { .. } => Outcome::UpstreamUnreachable,
        }
    }
}

/// Plaintext from outside the mesh, captured by the nat PREROUTING redirect.
pub(super) async fn plaintext(
    proxy: Arc<Proxy>,
    pod: Arc<Pod>,
    client: TcpStream,
    src: SocketAddr,
) {
    let dst = match original_dst(&client) {
        Ok(dst) => canonical(dst),
        Err(e) => {
            tracing::warn!(
                pod = pod.label(),
                error = &e as &dyn std::error::Error,
                "inbound connection without an original destination"
            );
            return;
        }
    };
    let span = info_span!("inbound", pod = pod.label(), src.addr = %src, dst.addr = %dst);
    async move {
        let mut record = Record::new(Direction::Inbound, &pod, src, dst);
        let probe = is_probe(src);
        record.transport = if probe {
            Transport::Probe
        } else {
            Transport::Plaintext
        };
        record.dst_id = Some(pod.identity.clone());
        record.count(&proxy, proxy.inbound_ends(&pod, src, dst, None));
        // Held before the decision, so a policy change from now on decides it again. Probes
        // pass whatever the policy, so they are not held.
        let held = (!probe).then(|| proxy.open.hold(&pod, None, src, dst));
        let upstream = match admit_plaintext(&proxy, &pod, src, dst, probe) {
            Ok(()) => pod
                .sockets
                .connect_as(src.ip(), dst)
                .await
                .map_err(|source| Refused::Upstream {
                    target: dst,
                    source,
                }),
            Err(refused) => Err(refused),
        };
        if let Err(refused) = &upstream {
            record.policy = refused.policy();
        }
        match (upstream, held) {
            (Ok(upstream), Some(held)) => carry_revocable(record, client, upstream, &held).await,
            (upstream, _) => {
                let upstream = upstream.map_err(|refused| (refused.outcome(), refused));
                super::carry_plain(record, client, upstream).await;
            }
        }
    }
    .instrument(span)
    .await;
}

/// Carries an admitted plaintext connection until it ends or a policy change revokes it;
/// then the client gets a reset, as a refusal would.
async fn carry_revocable(record: Record, client: TcpStream, upstream: TcpStream, held: &Held) {
    // A second handle on the client's socket: the splice owns the first.
    let handle = std::os::fd::AsFd::as_fd(&client).try_clone_to_owned();
    tokio::select! {
        transfer = hbone::splice_tcp(client, upstream) => record.carried(&transfer),
        denial = held.revoked() => {
            if let Ok(fd) = &handle {
                // Once both handles are closed, the socket goes with a reset.
                let _ = socket2::SockRef::from(fd).set_linger(Some(std::time::Duration::ZERO));
            }
            record.revoked(&denial);
        }
    }
}

/// Whether a plaintext connection comes from the pod's own node's probes: only the node's
/// own traffic is given this source (by its probe SNAT).
fn is_probe(src: SocketAddr) -> bool {
    src.ip() == std::net::IpAddr::V4(rules::PROBE_IP)
}

fn admit_plaintext(
    proxy: &Proxy,
    pod: &Pod,
    src: SocketAddr,
    dst: SocketAddr,
    probe: bool,
) -> Result<(), Refused> {
    if !pod.owns(dst.ip()) {
        return Err(Refused::NotLocal(dst));
    }
    if proxy.ports.is_proxy_port(dst.port()) {
        return Err(Refused::ProxyPort(dst));
    }
    let snapshot = proxy.state.snapshot();
    let workload = snapshot
        .workload(&pod.namespace, &pod.name)
        .ok_or(Refused::UnknownWorkload)?;
    if probe {
        // Health checks pass STRICT, as in Istio: the kubelet speaks no mTLS.
        return Ok(());
    }
    let conn = policy::Connection {
        peer: None,
        src,
        dst,
    };
    match policy::inbound(&snapshot, workload, &conn) {
        Decision::Allow => Ok(()),
        Decision::Deny(denial) => Err(Refused::Policy(denial)),
    }
}

/// HBONE streams arriving at one pod.
pub(super) struct Hbone {
    pub proxy: Arc<Proxy>,
    pub pod: Arc<Pod>,
}

impl hbone::Handler for Hbone {
    fn handshake_failed(
        &self,
        peer: SocketAddr,
        failure: crate::tls::HandshakeFailure,
        error: Option<&std::io::Error>,
    ) {
        let pod = self.pod.label();
        self.proxy
            .handshake_failed(crate::metrics::Side::Server, failure, || {
                tracing::warn!(pod, peer.addr = %peer, cause = failure.as_str(),
                    error = error.map(|e| e as &dyn std::error::Error),
                    "TLS handshake from an HBONE peer failed")
            });
    }

    async fn handle(&self, incoming: hbone::Incoming) {
        let (src, dst) = (incoming.peer_addr, canonical(incoming.target.0));
        let span = info_span!("inbound", pod = self.pod.label(), src.addr = %src, dst.addr = %dst,
            src.identity = %incoming.peer_id);
        async move {
            let mut record = Record::new(Direction::Inbound, &self.pod, src, dst);
            record.transport = Transport::Hbone;
            record.src_id = Some(incoming.peer_id.clone());
            record.dst_id = Some(self.pod.identity.clone());
            let ends = self
                .proxy
                .inbound_ends(&self.pod, src, dst, Some(&incoming.peer_id));
            record.count(&self.proxy, ends);
            // Held before the decision, so a policy change from now on decides it again.
            let held = self
                .proxy
                .open
                .hold(&self.pod, Some(&incoming.peer_id), src, dst);
            let Some(_slot) = self.proxy.streams.admit(src.ip()) else {
                refuse(incoming, record, Refused::Capacity);
                return;
            };
            if let Err(refused) = self.admit(src, dst, &incoming.peer_id) {
                refuse(incoming, record, refused);
                return;
            }
            // The tunnel's TCP source is the client pod's address: connect from it, so the app
            // sees its real peer.
            let connect = self.pod.sockets.connect_as(src.ip(), dst);
            let upstream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
                .await
                .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
            let upstream = match upstream {
                Ok(upstream) => upstream,
                Err(source) => {
                    let refused = Refused::Upstream {
                        target: dst,
                        source,
                    };
                    refuse(incoming, record, refused);
                    return;
                }
            };
            let _ = upstream.set_nodelay(true);
            match incoming.accept() {
                // A revoked stream is dropped: the peer sees it reset, its connection stays.
                Ok(stream) => tokio::select! {
                    transfer = stream.splice(upstream) => record.carried(&transfer),
                    denial = held.revoked() => record.revoked(&denial),
                },
                // The peer reset the stream while the app was being dialled.
                Err(e) => record.failed(Outcome::Broken, &e),
            }
        }
        .instrument(span)
        .await;
    }
}

/// Answers a CONNECT that will not be carried and logs why.
fn refuse(incoming: hbone::Incoming, mut record: Record, refused: Refused) {
    record.policy = refused.policy();
    let outcome = refused.outcome();
    let refusal = outcome
        .refusal()
        .expect("every inbound refusal has a status");
    incoming.refuse(refusal);
    record.failed(outcome, &refused);
}

impl Hbone {
    fn admit(
        &self,
        src: SocketAddr,
        dst: SocketAddr,
        src_id: &crate::identity::Id,
    ) -> Result<(), Refused> {
        if !self.pod.owns(dst.ip()) {
            return Err(Refused::NotLocal(dst));
        }
        if self.proxy.ports.is_proxy_port(dst.port()) {
            return Err(Refused::ProxyPort(dst));
        }
        let snapshot = self.proxy.state.snapshot();
        let workload = snapshot
            .workload(&self.pod.namespace, &self.pod.name)
            .ok_or(Refused::UnknownWorkload)?;
        let conn = policy::Connection {
            peer: Some(src_id),
            src,
            dst,
        };
        match policy::inbound(&snapshot, workload, &conn) {
            Decision::Allow => Ok(()),
            Decision::Deny(denial) => Err(Refused::Policy(denial)),
        }
    }
}
