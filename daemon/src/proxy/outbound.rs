//! Connections a pod's app makes, captured on the outbound port.

use std::net::SocketAddr;
use std::sync::Arc;

use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::net::TcpStream;
use tracing::{Instrument, info_span};

use super::conn::{Direction, Outcome, Record, Transport};
use super::{Pod, Proxy};
use crate::hbone;
use crate::redirect::{canonical, original_dst};
use crate::state::{Snapshot, Workload};

/// Where an outbound connection goes, once resolved.
enum Route {
    /// An enrolled workload: through an HBONE tunnel to `target`.
    Mesh {
        target: SocketAddr,
        workload: Arc<Workload>,
    },
    /// Anything else: plain TCP, straight to `target`.
    Passthrough { target: SocketAddr },
}

/// Resolves a Service VIP to one of its ready endpoints, round-robin (in-pod capture sees the
/// VIP before any kube-proxy would), then decides between the mesh and passthrough.
fn route(snapshot: &Snapshot, dst: SocketAddr, turn: &AtomicUsize) -> Route {
    let target = match snapshot.service(dst) {
        Some(port) if !port.endpoints.is_empty() => {
            let i = turn.fetch_add(1, Ordering::Relaxed) % port.endpoints.len();
            port.endpoints[i]
        }
        // Not a VIP, or no ready endpoint: dial what the app dialled, as it would without us.
        _ => dst,
    };
    match snapshot.workload_by_ip(target.ip()) {
        Some(w) if w.enrolled => Route::Mesh {
            target,
            workload: w.clone(),
        },
        _ => Route::Passthrough { target },
    }
}

/// A connection accepted on the pod's outbound listener: where it was going is its original
/// destination.
pub(super) async fn accepted(proxy: Arc<Proxy>, pod: Arc<Pod>, app: TcpStream, src: SocketAddr) {
    match original_dst(&app) {
        Ok(dst) => handle(proxy, pod, app, src, canonical(dst)).await,
        Err(e) => tracing::warn!(
            pod = pod.label(),
            error = &e as &dyn std::error::Error,
            "outbound connection without an original destination"
        ),
    }
}

/// Carries `app`'s connection from `src` to `dst`: over HBONE, or plain TCP.
pub(super) async fn handle(
    proxy: Arc<Proxy>,
    pod: Arc<Pod>,
    app: TcpStream,
    src: SocketAddr,
    dst: SocketAddr,
) {
    let span = info_span!("outbound", pod = pod.label(), src.addr = %src, dst.addr = %dst);
    async move {
        let _ = app.set_nodelay(true);
        let mut record = Record::new(Direction::Outbound, &pod, src, dst);
        match route(&proxy.state.snapshot(), dst, &proxy.endpoint_turn) {
            Route::Mesh { target, workload } => {
                record.transport = Transport::Hbone;
                record.src_id = Some(pod.identity.clone());
                record.dst_id = Some(workload.identity.clone());
                let request = hbone::Request {
                    src: &pod.identity,
                    src_ip: src.ip(),
                    dst: &workload.identity,
                    peer: SocketAddr::new(target.ip(), proxy.ports.hbone),
                    target,
                    dialer: &pod.sockets,
                };
                match proxy.hbone.connect(request).await {
                    Ok(stream) => record.carried(&stream.splice(app).await),
                    Err(e) => {
                        let _ = super::reset(app);
                        record.failed(Outcome::Tunnel(e.reason()), &e);
                    }
                }
            }
            Route::Passthrough { target } => {
                // Plain TCP proves no identity, so the record names none.
                let upstream = match pod.sockets.socket_for(target) {
                    Ok(socket) => socket.connect(target).await,
                    Err(e) => Err(e),
                };
                let upstream = upstream.map_err(|e| (Outcome::UpstreamUnreachable, e));
                super::carry_plain(record, app, upstream).await;
            }
        }
    }
    .instrument(span)
    .await;
}
