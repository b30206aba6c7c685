//! The node's HTTP endpoints: the admin API (JSON, loopback), the kubelet's probes and the
//! Prometheus scrape.
//!
//! Admin (`--admin-addr`, 127.0.0.1:15000): `GET /workloads` (every workload the node knows,
//! with its enrollment), `GET /services` (VIPs and their ready endpoints), `GET /pods` (pods
//! wired on this node), `GET /policies`, `GET /config_dump` (the node's state in the schema
//! `istioctl ztunnel-config` reads), `GET /connections` (every connection carried now),
//! `GET /check` (what `culvert check` reports). Probes (`--readiness-addr`, :15021): `GET /healthz/ready` answers 200
//! once the daemon serves (discovery synced, running pods rewired) and 503 before that and while
//! draining; `GET /healthz/live` answers 200 while the runtime runs. Metrics
//! (`--metrics-addr`, :15020): `GET /metrics` and `/stats/prometheus`, in the Prometheus text
//! format, or OpenMetrics when the scraper asks for it. `/logging` on the admin address reads
//! and changes the log filter.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

mod check;
mod dump;

use crate::cni::Registry;
use crate::metrics::Metrics;
use crate::proxy::Peers;
use crate::state::Store;
use crate::telemetry::Filter;

/// What the endpoints read.
pub struct Admin {
    state: Arc<Store>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    ready: AtomicBool,
    /// The CNI configuration directory the daemon keeps culvert-cni in, if it does.
    cni_conf_dir: Option<std::path::PathBuf>,
}

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// The admin API and the probes: for the loopback address.
    Admin,
    /// Only `/healthz`: for the address the kubelet reaches.
    Probes,
    /// Only the scrape: for the address Prometheus reaches.
    Metrics,
}

impl Surface {
    fn name(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Probes => "probes",
            Self::Metrics => "metrics",
        }
    }
}

/// What an OpenMetrics scraper sends in `Accept`.
const OPENMETRICS: &str = "application/openmetrics-text";

impl Admin {
    /// Not ready until [`Self::set_ready`]. `cni_conf_dir`: where the daemon keeps
    /// culvert-cni in the CNI configuration, if it does (`--install-cni`).
    pub fn new(
        state: Arc<Store>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        cni_conf_dir: Option<std::path::PathBuf>,
    ) -> Self {
        Self {
            state,
            registry,
            metrics,
            ready: AtomicBool::new(false),
            cni_conf_dir,
        }
    }

    /// `GET /check` on the admin address is answered here (its checks wait on the pods'
    /// namespaces); everything else by [`Self::answer`].
    async fn respond(&self, req: Request<Incoming>, surface: Surface) -> Response<Full<Bytes>> {
        if surface == Surface::Admin && req.uri().path() == "/check" && req.method() == Method::GET
        {
            let ready = self.ready.load(Ordering::Relaxed);
            let checks = check::run(ready, &self.registry, self.cni_conf_dir.as_deref()).await;
            return json_response(&checks);
        }
        self.answer(&req, surface)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    fn answer(&self, req: &Request<Incoming>, surface: Surface) -> Response<Full<Bytes>> {
        if surface == Surface::Admin && req.uri().path() == "/logging" {
            return logging(req);
        }
        if req.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        }
        let admin = surface == Surface::Admin;
        match (req.uri().path(), surface) {
            ("/metrics" | "/stats/prometheus", Surface::Metrics) => self.scrape(req),
            ("/healthz/ready", Surface::Admin | Surface::Probes)
                if self.ready.load(Ordering::Relaxed) =>
            {
                text(StatusCode::OK, "ready\n")
            }
            ("/healthz/ready", Surface::Admin | Surface::Probes) => {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
            ("/healthz/live", Surface::Admin | Surface::Probes) => text(StatusCode::OK, "live\n"),
            ("/workloads", _) if admin => {
                let snapshot = self.state.snapshot();
                let workloads: Vec<Value> = snapshot
                    .workloads()
                    .map(|w| {
                        let mut workload = serde_json::to_value(&**w).expect("workloads serialize");
                        workload["enrolled"] = snapshot.enrolled(w).into();
                        workload
                    })
                    .collect();
                json_response(&workloads)
            }
            ("/services", _) if admin => {
                let snapshot = self.state.snapshot();
                let services: Vec<Value> = snapshot
                    .services()
                    .map(|(vip, port)| json!({ "vip": vip, "service": port }))
                    .collect();
                json_response(&services)
            }
            ("/pods", _) if admin => json_response(&self.registry.list()),
            ("/config_dump", _) if admin => {
                let snapshot = self.state.snapshot();
                json_response(&dump::build(&snapshot, &self.registry))
            }
            ("/connections", _) if admin => json_response(&dump::connections(&self.registry)),
            ("/policies", _) if admin => {
                // Selections among this node's wired pods.
                let snapshot = self.state.snapshot();
                let wired = self.registry.list();
                let local = wired
                    .iter()
                    .filter_map(|p| snapshot.workload(&p.pod.namespace, &p.pod.name))
                    .filter(|w| snapshot.enrolled(w))
                    .map(AsRef::as_ref);
                json_response(&snapshot.policies.describe(local))
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    /// The metrics, as OpenMetrics when the scraper accepts it, else the Prometheus text format.
    fn scrape(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let wired = self.registry.wired_count();
        self.metrics
            .pods
            .wired
            .set(wired.try_into().unwrap_or(i64::MAX));
        let held = self.registry.certificates().expiries();
        self.metrics.certificates.set_expiries(&held);
        self.metrics.hbone.set(self.registry.proxy().hbone_load());
        let openmetrics = req
            .headers()
            .get_all(http::header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains(OPENMETRICS));
        let (body, content_type) = if openmetrics {
            (
                self.metrics.encode_openmetrics(),
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
        } else {
            (
                self.metrics.encode_text(),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(content_type),
        );
        response
    }
}

/// Connections each listener serves at once, and from one address.
const MAX_CONNECTIONS: usize = 128;
const MAX_CONNECTIONS_PER_PEER: usize = 8;
/// A client that has not sent a request's headers by then is closed (slow-loris).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection is kept longer, requests or not: keep-alive cannot hold a place forever.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Binds `addr` and serves `surface`'s endpoints there until `stop`. Returns the bound address.
pub async fn serve(
    admin: Arc<Admin>,
    addr: SocketAddr,
    surface: Surface,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    // SO_REUSEPORT: during a DaemonSet surge the new daemon binds next to the old one, which
    // still answers until it exits.
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(64)?;
    let local = listener.local_addr()?;
    info!(addr = %local, what = surface.name(), "listening");
    let slots = Peers::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                () = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        debug!(error = %e, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Over a cap the connection is closed at once: one address (a pod reaching the
            // metrics port, say) cannot hold the places the kubelet's probes need.
            let Some(slot) = slots.admit(peer.ip()) else {
                debug!(%peer, what = surface.name(), "connection over the cap closed");
                continue;
            };
            let admin = admin.clone();
            let service = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.respond(req, surface).await) }
            });
            tokio::spawn(async move {
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                    Ok(Err(e)) => debug!(error = %e, "admin connection failed"),
                    Err(_) => debug!(%peer, "admin connection open too long; closed"),
                    Ok(Ok(())) => {}
                }
                drop(slot);
            });
        }
    });
    Ok(local)
}

/// `GET /logging`: the log filter in force. `POST /logging?level=<filter>` replaces it
/// (`RUST_LOG` syntax: `info,culvert::proxy=debug`); `POST /logging?reset` puts back the one
/// the daemon started with. Each answers with the filter then in force.
fn logging(req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(filter) = Filter::installed() else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "no log subscriber installed\n",
        );
    };
    let changed = match *req.method() {
        Method::GET => Ok(()),
        Method::POST => {
            let query = req.uri().query().unwrap_or_default();
            let mut pairs = form_urlencoded::parse(query.as_bytes());
            match pairs.next() {
                Some((key, level)) if key == "level" => filter.set(&level),
                Some((key, _)) if key == "reset" => filter.reset(),
                _ => Err(anyhow::anyhow!("POST /logging?level=<filter> or ?reset")),
            }
        }
        _ => Err(anyhow::anyhow!("GET or POST only")),
    };
    match changed {
        Ok(()) => {
            if *req.method() == Method::POST {
                info!(filter = filter.current(), "log filter changed");
            }
            json_response(&json!({ "filter": filter.current() }))
        }
        Err(e) => {
            let body = Bytes::from(format!("{e:#}\n"));
            let mut response = Response::new(Full::new(body));
            *response.status_mut() = StatusCode::BAD_REQUEST;
            response
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}

fn json_response<T: serde::Serialize + ?Sized>(value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(value).expect("admin JSON serializes");
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}
