//! Connections a pod's app makes, captured on the outbound port.

use std::net::SocketAddr;
use std::sync::Arc;

use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::net::TcpStream;
use tracing::{Instrument, info_span};

use super::conn::{Direction, Ends, Outcome, Record, Transport};
use super::{Pod, Proxy, Refusal};
use crate::config::Ports;
use crate::hbone;
use crate::metrics::Side;
use crate::redirect::{canonical, original_dst_at};
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
        Some(w) if snapshot.enrolled(w) => Route::Mesh {
            target,
            workload: w.clone(),
        },
        _ => Route::Passthrough { target },
    }
}

/// The workloads at both ends of `pod`'s connection to `dst`, routed as `route`.
fn ends(snapshot: &Snapshot, pod: &Pod, dst: SocketAddr, route: &Route) -> Ends {
    let destination = match route {
        Route::Mesh { workload, .. } => Some(workload),
        Route::Passthrough { target } => snapshot.workload_by_ip(target.ip()),
    };
    Ends::new(
        snapshot,
        snapshot.workload(&pod.namespace, &pod.name),
        destination,
        snapshot.service(dst),
    )
}

/// A connection accepted on the pod's outbound listener: where it was going is its original
/// destination. One that would come straight back to the proxy is refused at once: dialling
/// it would be accepted again, and again, until the node runs out of file descriptors.
pub(super) async fn accepted(proxy: Arc<Proxy>, pod: Arc<Pod>, app: TcpStream, src: SocketAddr) {
    // One getsockname for both: the listener's side and, from it, the original destination.
    let addrs = app
        .local_addr()
        .and_then(|local| Ok((local, original_dst_at(&app, local)?)));
    let (local, dst) = match addrs {
        Ok((local, dst)) => (canonical(local), canonical(dst)),
        Err(e) => {
            proxy.refusals.note(Refusal::NoOriginalDst, || {
                tracing::warn!(
                    pod = pod.label(),
                    error = &e as &dyn std::error::Error,
                    "outbound connection without an original destination; refused"
                )
            });
            let _ = super::reset(app);
            return;
        }
    };
    if loops_back(&proxy.ports, &pod, dst, local) {
        proxy.refusals.note(Refusal::Loop, || {
            tracing::warn!(pod = pod.label(), src.addr = %src, dst.addr = %dst,
                "connection to the proxy's own listener refused")
        });
        let _ = super::reset(app);
        return;
    }
    handle(proxy, pod, app, src, dst).await;
}

/// Whether a connection to `dst`, accepted on a listener at `local`, would come back to the
/// proxy: it was not redirected (its destination is the listener itself), or it names one of
/// the proxy ports on loopback, the unspecified address or the pod's own address.
fn loops_back(ports: &Ports, pod: &Pod, dst: SocketAddr, local: SocketAddr) -> bool {
    let ip = dst.ip();
    let own = ip.is_loopback() || ip.is_unspecified() || pod.owns(ip);
    dst == local || (own && ports.is_proxy_port(dst.port()))
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
        let snapshot = proxy.state.snapshot();
        let route = route(&snapshot, dst, &proxy.endpoint_turn);
        if let Route::Mesh { target, workload } = &route {
            record.transport = Transport::Hbone;
            record.src_id = Some(pod.identity.clone());
            record.dst_id = Some(workload.identity.clone());
            record.hbone_addr = Some(SocketAddr::new(target.ip(), proxy.ports.hbone));
        }
        record.count(&proxy, ends(&snapshot, &pod, dst, &route));
        drop(snapshot);
        match route {
            Route::Mesh { target, workload } => {
                let request = hbone::Request {
                    src: &pod.identity,
                    src_ip: src.ip(),
                    dst: &workload.identity,
                    peer: hbone::PeerAddr(SocketAddr::new(target.ip(), proxy.ports.hbone)),
                    target: hbone::TargetAddr(target),
                    dialer: &pod.sockets,
                };
                match proxy.hbone.connect(request).await {
                    Ok(stream) => record.carried(&stream.splice(app).await),
                    Err(e) => {
                        let _ = super::reset(app);
                        if let Some(failure) = e.handshake_failure() {
                            proxy.handshake_failed(Side::Client, failure, || {
                                tracing::warn!(pod = pod.label(), peer.addr = %target,
                                    cause = failure.as_str(), error = &e as &dyn std::error::Error,
                                    "TLS handshake with an HBONE peer failed")
                            });
                        }
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

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::identity::Id;
    use crate::state::{PeerAuthentication, ServiceSpec};

    fn workload(name: &str, ip: &str, enrolled: bool) -> Workload {
        Workload {
            name: name.into(),
            namespace: "shop".into(),
            workload_name: name.into(),
            workload_type: crate::state::WorkloadType::Pod,
            node: "n1".into(),
            ips: crate::state::Ips::One(ip.parse().unwrap()),
            labels: Default::default(),
            enrollment: Some(enrolled),
            peer_authentication: None,
            identity: Id::new("cluster.local", "shop", name).unwrap(),
        }
    }

    fn snapshot() -> Snapshot {
        let service = |vip: &str, endpoints: &[&str]| ServiceSpec {
            name: "svc".into(),
            namespace: "shop".into(),
            vip: vip.parse().unwrap(),
            ports: vec![(80, endpoints.iter().map(|e| e.parse().unwrap()).collect())],
        };
        Snapshot::build(
            "cluster.local",
            PeerAuthentication::Permissive,
            Default::default(),
            vec![
                workload("api", "10.244.2.2", true).into(),
                workload("api2", "10.244.2.3", true).into(),
                workload("legacy", "10.244.2.9", false).into(),
            ],
            vec![
                service("10.96.0.10", &["10.244.2.2:8080", "10.244.2.3:8080"]),
                service("10.96.0.11", &[]),
                service("10.96.0.12", &["10.244.2.9:8080"]),
            ],
        )
        .unwrap()
    }

    /// Where `dst` goes: `(mesh?, target)`.
    fn go(snap: &Snapshot, dst: &str, turn: &AtomicUsize) -> (bool, SocketAddr) {
        match route(snap, dst.parse().unwrap(), turn) {
            Route::Mesh { target, workload } => {
                assert!(workload.ips.contains(&target.ip()));
                (true, target)
            }
            Route::Passthrough { target } => (false, target),
        }
    }

    #[test]
    fn routes_pick_mesh_for_enrolled_pods_vip_endpoints_in_turn_and_passthrough_otherwise() {
        let (snap, turn) = (snapshot(), AtomicUsize::new(0));
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            go(&snap, "10.244.2.2:8080", &turn),
            (true, at("10.244.2.2:8080"))
        );
        assert_eq!(
            go(&snap, "10.244.2.9:8080", &turn),
            (false, at("10.244.2.9:8080"))
        );
        assert_eq!(
            go(&snap, "192.0.2.1:443", &turn),
            (false, at("192.0.2.1:443"))
        );
        // A VIP resolves to its ready endpoints in turn, each with its own target port.
        let picks: Vec<IpAddr> = (0..4)
            .map(|_| go(&snap, "10.96.0.10:80", &turn).1.ip())
            .collect();
        let (a, b): (IpAddr, IpAddr) =
            ("10.244.2.2".parse().unwrap(), "10.244.2.3".parse().unwrap());
        assert_eq!(picks, [a, b, a, b]);
        // A VIP with no ready endpoint is dialled as the app dialled it; one whose endpoint is
        // outside the mesh reaches it in plain TCP.
        assert_eq!(
            go(&snap, "10.96.0.11:80", &turn),
            (false, at("10.96.0.11:80"))
        );
        assert_eq!(
            go(&snap, "10.96.0.12:80", &turn),
            (false, at("10.244.2.9:8080"))
        );
        // A VIP port the Service does not have is not resolved.
        assert_eq!(
            go(&snap, "10.96.0.10:81", &turn),
            (false, at("10.96.0.10:81"))
        );
    }
}

#[cfg(test)]
mod loop_tests {
    use super::*;
    use crate::identity::Id;
    use crate::redirect::Sockets;

    #[test]
    fn connections_that_would_come_back_to_the_proxy_are_recognised() {
        let ports = Ports {
            outbound: 15001,
            inbound_plaintext: 15006,
            hbone: 15008,
        };
        let pod = Pod::new(
            "shop".into(),
            "cart".into(),
            Id::new("cluster.local", "shop", "cart").unwrap(),
            vec!["10.244.1.2".parse().unwrap()],
            Sockets::loopback(std::path::Path::new("/run/netns/cart"), vec![]),
        );
        let redirected: SocketAddr = "127.0.0.1:15001".parse().unwrap();
        for (dst, local, loops) in [
            ("127.0.0.1:15001", redirected, true),
            ("[::1]:15001", "[::1]:15001".parse().unwrap(), true),
            ("10.244.1.2:15006", redirected, true),
            ("0.0.0.0:15008", redirected, true),
            ("10.244.1.2:9000", "10.244.1.2:9000".parse().unwrap(), true),
            ("10.244.2.2:15001", redirected, false),
            ("10.244.2.2:8080", redirected, false),
            ("10.244.1.2:8080", redirected, false),
        ] {
            let dst: SocketAddr = dst.parse().unwrap();
            assert_eq!(
                loops_back(&ports, &pod, dst, local),
                loops,
                "{dst} on {local}"
            );
        }
    }
}
