//! Metrics: the node's one registry, Istio's TCP metrics under their names and labels, and the
//! scrape endpoint's encoding.
//!
//! `app` creates the [`Metrics`] and hands each subsystem the part it writes. Every label value
//! comes from a closed set or from the cluster view (workload, namespace, identity), never from
//! a connection (no ports, no addresses), so the number of series grows with workload pairs,
//! not with traffic. No metric is global or static.

use std::fmt::Write as _;
use std::sync::Arc;

use prometheus_client::encoding::{
    EncodeLabel as _, EncodeLabelSet, EncodeLabelValue, LabelSetEncoder, LabelValueEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::identity::Id;
use crate::policy;
use crate::state::{CLUSTER_ID, Locality, ServicePort, Workload};
use crate::tls::HandshakeFailure;

/// The node's metrics and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    /// The data path's: Istio's TCP metrics, handshake failures, policy denials.
    pub tcp: Arc<Tcp>,
    /// The registrations': CNI requests, wired pods, restored rules.
    pub pods: Arc<Pods>,
    pub certificates: Arc<Certificates>,
    pub discovery: Arc<Discovery>,
    pub hbone: Hbone,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let culvert = registry.sub_registry_with_prefix("culvert");
        let pods = Arc::new(Pods::register(culvert));
        let certificates = Arc::new(Certificates::register(culvert));
        let discovery = Arc::new(Discovery::register(culvert));
        let hbone = Hbone::register(culvert);
        let (handshake_failures, denials) = (Family::default(), Family::default());
        culvert.register(
            "hbone_handshake_failures",
            "TLS handshakes with HBONE peers that failed, by side and cause",
            Family::clone(&handshake_failures),
        );
        culvert.register(
            "policy_denials",
            "Inbound connections refused by policy, by reason",
            Family::clone(&denials),
        );
        let istio = registry.sub_registry_with_prefix("istio");
        let tcp = Arc::new(Tcp::register(istio, handshake_failures, denials));
        let build = Family::<BuildLabels, Gauge>::default();
        istio.register("build", "Istio component build info", build.clone());
        build
            .get_or_create(&BuildLabels {
                component: "ztunnel",
                tag: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        Self {
            registry,
            tcp,
            pods,
            certificates,
            discovery,
            hbone,
        }
    }

    /// The Prometheus text exposition (version 0.0.4), which every scraper reads.
    pub fn encode_text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    /// The OpenMetrics text exposition, for scrapers that ask for it.
    pub fn encode_openmetrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    /// `ztunnel`, so that dashboards made for Istio's node proxy find Culvert's.
    component: &'static str,
    tag: &'static str,
}

/// Istio's standard TCP metrics, as its node proxy reports them: one series per workload pair,
/// reporter and outcome.
pub struct Tcp {
    opened: Family<TrafficLabels, Counter>,
    closed: Family<TrafficLabels, Counter>,
    failed: Family<TrafficLabels, Counter>,
    /// Bytes from the source to the destination (Istio's "received": the request side).
    received: Family<TrafficLabels, Counter>,
    /// Bytes from the destination back to the source (the response side).
    sent: Family<TrafficLabels, Counter>,
    sockets: Family<ReporterLabel, Gauge>,
    handshake_failures: Family<HandshakeLabels, Counter>,
    denials: Family<ReasonLabel, Counter>,
}

impl Tcp {
    fn register(
        registry: &mut Registry,
        handshake_failures: Family<HandshakeLabels, Counter>,
        denials: Family<ReasonLabel, Counter>,
    ) -> Self {
        let tcp = Self {
            handshake_failures,
            denials,
            opened: Family::default(),
            closed: Family::default(),
            failed: Family::default(),
            received: Family::default(),
            sent: Family::default(),
            sockets: Family::default(),
        };
        let traffic = [
            (
                &tcp.opened,
                "opened",
                "The total number of TCP connections opened",
            ),
            (
                &tcp.closed,
                "closed",
                "The total number of TCP connections closed",
            ),
            (
                &tcp.failed,
                "failed",
                "The total number of TCP connections that failed to establish",
            ),
        ];
        for (family, what, help) in traffic {
            registry.register(format!("tcp_connections_{what}"), help, family.clone());
        }
        registry.register(
            "tcp_received_bytes",
            "The size of the total bytes received during request in case of a TCP connection",
            tcp.received.clone(),
        );
        registry.register(
            "tcp_sent_bytes",
            "The size of the total bytes sent during response in case of a TCP connection",
            tcp.sent.clone(),
        );
        registry.register(
            "tcp_sockets_open",
            "The number of TCP sockets open",
            tcp.sockets.clone(),
        );
        tcp
    }

    /// Counts a TLS handshake with an HBONE peer that failed.
    pub fn handshake_failed(&self, side: Side, failure: HandshakeFailure) {
        let labels = HandshakeLabels {
            side,
            reason: failure.as_str(),
        };
        self.handshake_failures.get_or_create(&labels).inc();
    }

    /// Counts an inbound connection policy refused.
    pub fn denied(&self, reason: policy::Reason) {
        let labels = ReasonLabel {
            reason: reason.as_str(),
        };
        self.denials.get_or_create(&labels).inc();
    }

    /// Counts a connection opened; what it carries and how it ends go to the returned guard.
    pub fn open(self: &Arc<Self>, labels: TrafficLabels) -> Connection {
        self.opened.get_or_create(&labels).inc();
        let reporter = ReporterLabel {
            reporter: labels.reporter,
        };
        self.sockets.get_or_create(&reporter).inc();
        Connection {
            tcp: self.clone(),
            labels,
        }
    }
}

/// An open connection's share of the TCP metrics. Closing it (or dropping it, on any path)
/// counts the close.
pub struct Connection {
    tcp: Arc<Tcp>,
    labels: TrafficLabels,
}

impl Connection {
    /// The data path's metrics this connection counts in.
    pub fn tcp(&self) -> &Tcp {
        &self.tcp
    }

    /// Counts the bytes a connection carried each way and its close; a `flag` other than
    /// [`ResponseFlag::None`] counts it as failed too.
    pub fn close(mut self, request_bytes: u64, response_bytes: u64, flag: ResponseFlag) {
        self.labels.response_flags = flag;
        let tcp = &self.tcp;
        if request_bytes > 0 {
            tcp.received
                .get_or_create(&self.labels)
                .inc_by(request_bytes);
        }
        if response_bytes > 0 {
            tcp.sent.get_or_create(&self.labels).inc_by(response_bytes);
        }
        if flag != ResponseFlag::None {
            tcp.failed.get_or_create(&self.labels).inc();
        }
        // The close itself is counted on drop.
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.tcp.closed.get_or_create(&self.labels).inc();
        let reporter = ReporterLabel {
            reporter: self.labels.reporter,
        };
        self.tcp.sockets.get_or_create(&reporter).dec();
    }
}

/// Which end of an HBONE connection a handshake failed on.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Side {
    /// This node dialled the peer.
    Client,
    /// The peer dialled this node.
    Server,
}

impl EncodeLabelValue for Side {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(match self {
            Self::Client => "client",
            Self::Server => "server",
        })
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    side: Side,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CniLabels {
    command: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FetchLabels {
    /// `issue` (a first certificate for an identity) or `renew`.
    kind: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabel {
    identity: String,
}

/// The node's certificates: what the CA was asked for, and how long each held one has left.
pub struct Certificates {
    fetches: Family<FetchLabels, Counter>,
    expiry: Family<IdentityLabel, Gauge>,
}

impl Certificates {
    fn register(registry: &mut Registry) -> Self {
        let certificates = Self {
            fetches: Family::default(),
            expiry: Family::default(),
        };
        registry.register(
            "certificate_requests",
            "Certificates asked of the CA, by kind (issue, renew) and result",
            certificates.fetches.clone(),
        );
        registry.register(
            "certificate_expiry_seconds",
            "Seconds until each held certificate expires, by identity (negative once expired)",
            certificates.expiry.clone(),
        );
        certificates
    }

    /// Counts a certificate asked of the CA: a renewal or a first issue, and whether it came.
    pub fn fetched(&self, renewal: bool, ok: bool) {
        let kind = if renewal { "renew" } else { "issue" };
        let result = if ok { "ok" } else { "failed" };
        self.fetches
            .get_or_create(&FetchLabels { kind, result })
            .inc();
    }

    /// Replaces the expiry series with `held` (identity, expiry): one per identity held now
    /// (local pods' service accounts), so the series follow the pods.
    pub fn set_expiries(&self, held: &[(Id, std::time::SystemTime)]) {
        let now = std::time::SystemTime::now();
        self.expiry.clear();
        for (id, not_after) in held {
            let left = match not_after.duration_since(now) {
                Ok(left) => left.as_secs() as i64,
                Err(past) => -(past.duration().as_secs() as i64),
            };
            let labels = IdentityLabel {
                identity: id.as_str().to_owned(),
            };
            self.expiry.get_or_create(&labels).set(left);
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

/// HBONE connections and streams held now, each way.
pub struct Hbone {
    connections: Family<DirectionLabel, Gauge>,
    streams: Family<DirectionLabel, Gauge>,
}

impl Hbone {
    fn register(registry: &mut Registry) -> Self {
        let hbone = Self {
            connections: Family::default(),
            streams: Family::default(),
        };
        registry.register(
            "hbone_connections",
            "HBONE connections open now: outbound (pooled, to peers) and inbound (from peers)",
            hbone.connections.clone(),
        );
        registry.register(
            "hbone_streams",
            "HBONE streams (tunnels) open now, by direction",
            hbone.streams.clone(),
        );
        hbone
    }

    /// Sets the gauges from `[outbound, inbound]` `(connections, streams)`.
    pub fn set(&self, load: [(usize, usize); 2]) {
        for (direction, (connections, streams)) in ["outbound", "inbound"].into_iter().zip(load) {
            let labels = DirectionLabel { direction };
            let gauge = |n: usize| n.try_into().unwrap_or(i64::MAX);
            self.connections
                .get_or_create(&labels)
                .set(gauge(connections));
            self.streams.get_or_create(&labels).set(gauge(streams));
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

/// What the Kubernetes watches receive.
pub struct Discovery {
    events: Family<KindLabel, Counter>,
    relists: Family<KindLabel, Counter>,
    errors: Family<KindLabel, Counter>,
}

impl Discovery {
    fn register(registry: &mut Registry) -> Self {
        let discovery = Self {
            events: Family::default(),
            relists: Family::default(),
            errors: Family::default(),
        };
        let families = [
            (
                &discovery.events,
                "events",
                "Objects received from the API (listed or watched)",
            ),
            (
                &discovery.relists,
                "relists",
                "Full lists after the first (a watch expired)",
            ),
            (
                &discovery.errors,
                "watch_errors",
                "Watch and list failures, each retried",
            ),
        ];
        for (family, what, help) in families {
            let help = format!("{help}, by kind");
            registry.register(format!("discovery_{what}"), help, family.clone());
        }
        discovery
    }

    /// The counters of one watched kind (`Pod`, `Service`, ...).
    pub fn kind(&self, kind: &str) -> WatchedKind {
        let labels = KindLabel { kind: kind.into() };
        WatchedKind {
            events: self.events.get_or_create(&labels).clone(),
            relists: self.relists.get_or_create(&labels).clone(),
            errors: self.errors.get_or_create(&labels).clone(),
        }
    }
}

/// One watched kind's counters.
pub struct WatchedKind {
    events: Counter,
    relists: Counter,
    errors: Counter,
}

impl WatchedKind {
    pub fn event(&self) {
        self.events.inc();
    }

    pub fn relisted(&self) {
        self.relists.inc();
    }

    pub fn failed(&self) {
        self.errors.inc();
    }
}

/// What the registrations do: CNI requests, pods wired and not, rules put back.
pub struct Pods {
    requests: Family<CniLabels, Counter>,
    /// Pods wired now; set from the registry when scraped.
    pub wired: Gauge,
    failures: Family<ReasonLabel, Counter>,
    unwired: Counter,
    restored: Counter,
}

impl Pods {
    fn register(registry: &mut Registry) -> Self {
        let pods = Self {
            requests: Family::default(),
            wired: Gauge::default(),
            failures: Family::default(),
            unwired: Counter::default(),
            restored: Counter::default(),
        };
        registry.register(
            "cni_requests",
            "Requests on the registration socket, by command and result",
            pods.requests.clone(),
        );
        registry.register("pods_wired", "Pods wired on this node", pods.wired.clone());
        registry.register(
            "pod_wiring_failures",
            "Pods that could not be wired or failed a check, by reason",
            pods.failures.clone(),
        );
        registry.register(
            "pods_unwired",
            "Pods unwired (deleted, garbage-collected or no longer enrolled)",
            pods.unwired.clone(),
        );
        registry.register(
            "redirect_rules_restored",
            "Wired pods whose redirection rules were found gone and put back",
            pods.restored.clone(),
        );
        pods
    }

    /// Counts a request on the registration socket: `command` is the request's kind (or
    /// `invalid`, `busy`), `result` `ok` or `refused`.
    pub fn request(&self, command: &'static str, result: &'static str) {
        self.requests
            .get_or_create(&CniLabels { command, result })
            .inc();
    }

    pub fn failed(&self, reason: &'static str) {
        self.failures.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn unwired(&self) {
        self.unwired.inc();
    }

    pub fn restored(&self, pods: u64) {
        self.restored.inc_by(pods);
    }
}

/// Which end of a connection the series describes.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Reporter {
    /// The node of the pod that opened the connection.
    Source,
    /// The node of the pod it reached.
    Destination,
}

impl EncodeLabelValue for Reporter {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(match self {
            Self::Source => "source",
            Self::Destination => "destination",
        })
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReporterLabel {
    reporter: Reporter,
}

/// Why a connection failed, as Istio's `response_flags` names it.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum ResponseFlag {
    /// It did not fail: `-`.
    None,
    /// Policy refused it.
    Deny,
    /// The destination (or the tunnel to its node) could not be reached.
    Connect,
    /// The TLS handshake with the destination's node failed.
    TlsFailure,
    /// HTTP/2 could not be spoken over the TLS connection.
    H2HandshakeFailure,
}

impl EncodeLabelValue for ResponseFlag {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(match self {
            Self::None => "-",
            Self::Deny => "DENY",
            Self::Connect => "CONNECT",
            Self::TlsFailure => "TLS_FAILURE",
            Self::H2HandshakeFailure => "H2_HANDSHAKE_FAILURE",
        })
    }
}

/// Whether the connection crossed the network in mutual TLS.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum SecurityPolicy {
    MutualTls,
    /// Plain TCP (to or from outside the mesh), or not known.
    Unknown,
}

impl EncodeLabelValue for SecurityPolicy {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(match self {
            Self::MutualTls => "mutual_tls",
            Self::Unknown => "unknown",
        })
    }
}

/// A label value taken from the cluster view; absent values read `unknown`, as Istio's do.
#[derive(Debug, Clone, Default, Hash, PartialEq, Eq)]
pub struct Value(Option<Arc<str>>);

impl Value {
    fn of(s: &str) -> Self {
        Self(Some(s.into()))
    }
}

impl From<&Arc<str>> for Value {
    fn from(s: &Arc<str>) -> Self {
        Self(Some(s.clone()))
    }
}

impl EncodeLabelValue for Value {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(self.0.as_deref().unwrap_or("unknown"))
    }
}

/// Istio's traffic labels, in the order its node proxy writes them.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    pub reporter: Reporter,
    source_workload: Value,
    source_canonical_service: Value,
    source_canonical_revision: Value,
    source_workload_namespace: Value,
    source_principal: Value,
    source_app: Value,
    source_version: Value,
    source_cluster: Value,
    destination_service: Value,
    destination_service_namespace: Value,
    destination_service_name: Value,
    destination_workload: Value,
    destination_canonical_service: Value,
    destination_canonical_revision: Value,
    destination_workload_namespace: Value,
    destination_principal: Value,
    destination_app: Value,
    destination_version: Value,
    destination_cluster: Value,
    request_protocol: &'static str,
    response_flags: ResponseFlag,
    connection_security_policy: SecurityPolicy,
    #[prometheus(flatten)]
    locality: LocalityLabels,
}

/// `source_region`, `source_zone`, `destination_region`, `destination_zone`: each written only
/// when known, as Istio's node proxy writes them.
#[derive(Debug, Clone, Default, Hash, PartialEq, Eq)]
struct LocalityLabels([Option<Arc<str>>; 4]);

impl LocalityLabels {
    const NAMES: [&str; 4] = [
        "source_region",
        "source_zone",
        "destination_region",
        "destination_zone",
    ];

    fn new(source: Option<&Locality>, destination: Option<&Locality>) -> Self {
        let known = |s: &Arc<str>| (!s.is_empty()).then(|| s.clone());
        let region = |l: Option<&Locality>| l.and_then(|l| known(&l.region));
        let zone = |l: Option<&Locality>| l.and_then(|l| known(&l.zone));
        Self([
            region(source),
            zone(source),
            region(destination),
            zone(destination),
        ])
    }
}

impl EncodeLabelSet for LocalityLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> std::fmt::Result {
        for (name, value) in Self::NAMES.iter().zip(&self.0) {
            if let Some(value) = value {
                (*name, &**value).encode(encoder.encode_label())?;
            }
        }
        Ok(())
    }
}

/// One end of a connection, as the labels describe it.
#[derive(Debug, Default, Clone, Copy)]
pub struct Peer<'a> {
    /// The workload the cluster view finds there, if any.
    pub workload: Option<&'a Workload>,
    /// The identity the end proved in mutual TLS; only a proven one becomes a principal.
    pub principal: Option<&'a Id>,
    /// The locality of the workload's node, if known.
    pub locality: Option<&'a Locality>,
}

impl TrafficLabels {
    pub fn new(
        reporter: Reporter,
        source: Peer<'_>,
        destination: Peer<'_>,
        service: Option<&ServicePort>,
        security: SecurityPolicy,
    ) -> Self {
        let workload = |p: &Peer<'_>| p.workload.map(|w| Value::from(&w.workload_name));
        let namespace = |p: &Peer<'_>| p.workload.map(|w| Value::from(&w.namespace));
        let canonical = |p: &Peer<'_>| p.workload.map(|w| Value::of(w.canonical_service()));
        let revision = |p: &Peer<'_>| p.workload.map(|w| Value::of(w.canonical_revision()));
        let principal = |p: &Peer<'_>| p.principal.map(|id| Value::of(id.as_str()));
        let cluster = |p: &Peer<'_>| p.workload.map(|_| Value::of(CLUSTER_ID));
        let (canonical_source, revision_source) = (canonical(&source), revision(&source));
        let (canonical_destination, revision_destination) =
            (canonical(&destination), revision(&destination));
        Self {
            reporter,
            source_workload: workload(&source).unwrap_or_default(),
            source_canonical_service: canonical_source.clone().unwrap_or_default(),
            source_canonical_revision: revision_source.clone().unwrap_or_default(),
            source_workload_namespace: namespace(&source).unwrap_or_default(),
            source_principal: principal(&source).unwrap_or_default(),
            source_app: canonical_source.unwrap_or_default(),
            source_version: revision_source.unwrap_or_default(),
            source_cluster: cluster(&source).unwrap_or_default(),
            destination_service: service
                .map(|s| Value::of(&s.hostname()))
                .unwrap_or_default(),
            destination_service_namespace: service
                .map(|s| Value::from(&s.namespace))
                .unwrap_or_default(),
            destination_service_name: service.map(|s| Value::from(&s.service)).unwrap_or_default(),
            destination_workload: workload(&destination).unwrap_or_default(),
            destination_canonical_service: canonical_destination.clone().unwrap_or_default(),
            destination_canonical_revision: revision_destination.clone().unwrap_or_default(),
            destination_workload_namespace: namespace(&destination).unwrap_or_default(),
            destination_principal: principal(&destination).unwrap_or_default(),
            destination_app: canonical_destination.unwrap_or_default(),
            destination_version: revision_destination.unwrap_or_default(),
            destination_cluster: cluster(&destination).unwrap_or_default(),
            request_protocol: "tcp",
            response_flags: ResponseFlag::None,
            connection_security_policy: security,
            locality: LocalityLabels::new(source.locality, destination.locality),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Labels;

    fn workload(name: &str, owner: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            name: name.into(),
            namespace: "shop".into(),
            workload_name: owner.into(),
            workload_type: crate::state::WorkloadType::Pod,
            node: "n1".into(),
            ips: crate::state::Ips::One("10.244.1.2".parse().unwrap()),
            labels: labels.iter().copied().collect::<Labels>(),
            enrollment: None,
            peer_authentication: None,
            identity: Id::new("cluster.local", "shop", name).unwrap(),
        }
    }

    fn series<'a>(text: &'a str, metric: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with('{'))
            .collect()
    }

    #[test]
    fn a_closed_connection_reads_as_istio_names_it() {
        let metrics = Metrics::new();
        let client = workload(
            "cart-7d9f-x2",
            "cart",
            &[("app", "cart"), ("version", "v2")],
        );
        let server = workload(
            "db-0",
            "db",
            &[
                ("service.istio.io/canonical-name", "postgres"),
                ("app", "db"),
            ],
        );
        // The client's node has a region and a zone; the server's has no topology labels.
        let client_locality = Locality {
            region: "eu-west".into(),
            zone: "eu-west-1a".into(),
            subzone: "".into(),
        };
        let labels = TrafficLabels::new(
            Reporter::Source,
            Peer {
                workload: Some(&client),
                principal: Some(&client.identity),
                locality: Some(&client_locality),
            },
            Peer {
                workload: Some(&server),
                principal: Some(&server.identity),
                locality: None,
            },
            Some(&ServicePort {
                service: "db".into(),
                namespace: "shop".into(),
                endpoints: vec![],
            }),
            SecurityPolicy::MutualTls,
        );
        let conn = metrics.tcp.open(labels);
        assert!(
            metrics
                .encode_text()
                .contains("istio_tcp_sockets_open{reporter=\"source\"} 1")
        );
        conn.close(100, 2000, ResponseFlag::None);
        let text = metrics.encode_text();
        let sent = series(&text, "istio_tcp_sent_bytes_total");
        assert_eq!(sent.len(), 1, "{text}");
        let want = "istio_tcp_sent_bytes_total{reporter=\"source\",source_workload=\"cart\",\
            source_canonical_service=\"cart\",source_canonical_revision=\"v2\",\
            source_workload_namespace=\"shop\",\
            source_principal=\"spiffe://cluster.local/ns/shop/sa/cart-7d9f-x2\",\
            source_app=\"cart\",source_version=\"v2\",source_cluster=\"Kubernetes\",\
            destination_service=\"db.shop.svc.cluster.local\",\
            destination_service_namespace=\"shop\",destination_service_name=\"db\",\
            destination_workload=\"db\",destination_canonical_service=\"postgres\",\
            destination_canonical_revision=\"latest\",destination_workload_namespace=\"shop\",\
            destination_principal=\"spiffe://cluster.local/ns/shop/sa/db-0\",\
            destination_app=\"postgres\",destination_version=\"latest\",\
            destination_cluster=\"Kubernetes\",request_protocol=\"tcp\",response_flags=\"-\",\
            connection_security_policy=\"mutual_tls\",source_region=\"eu-west\",\
            source_zone=\"eu-west-1a\"} 2000";
        assert_eq!(sent[0], want);
        assert!(series(&text, "istio_tcp_received_bytes_total")[0].ends_with("} 100"));
        assert!(series(&text, "istio_tcp_connections_opened_total")[0].ends_with("} 1"));
        assert!(series(&text, "istio_tcp_connections_closed_total")[0].ends_with("} 1"));
        assert!(series(&text, "istio_tcp_connections_failed_total").is_empty());
        assert!(text.contains("istio_tcp_sockets_open{reporter=\"source\"} 0"));
        assert!(text.contains(&format!(
            "istio_build{{component=\"ztunnel\",tag=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
    }

    #[test]
    fn a_failure_carries_its_flag_and_unknown_ends_read_unknown() {
        let metrics = Metrics::new();
        let labels = TrafficLabels::new(
            Reporter::Destination,
            Peer::default(),
            Peer::default(),
            None,
            SecurityPolicy::Unknown,
        );
        metrics.tcp.open(labels).close(0, 0, ResponseFlag::Deny);
        let text = metrics.encode_text();
        let failed = series(&text, "istio_tcp_connections_failed_total");
        assert_eq!(failed.len(), 1, "{text}");
        assert!(failed[0].contains("source_principal=\"unknown\""));
        assert!(failed[0].contains("destination_workload=\"unknown\""));
        assert!(failed[0].contains("response_flags=\"DENY\""));
        assert!(failed[0].contains("connection_security_policy=\"unknown\""));
        // No locality known: none of its labels, not even `unknown`.
        assert!(!failed[0].contains("_region") && !failed[0].contains("_zone"));
        // Opened before the outcome was known; closed with it.
        assert!(
            series(&text, "istio_tcp_connections_opened_total")[0].contains("response_flags=\"-\"")
        );
        assert!(
            series(&text, "istio_tcp_connections_closed_total")[0]
                .contains("response_flags=\"DENY\"")
        );
        assert!(series(&text, "istio_tcp_sent_bytes_total").is_empty());
    }

    #[test]
    fn openmetrics_output_ends_with_eof() {
        assert!(Metrics::new().encode_openmetrics().ends_with("# EOF\n"));
    }
}

#[cfg(test)]
mod certificate_tests {
    use super::*;

    #[test]
    fn held_certificates_read_as_seconds_to_expiry_and_follow_the_held_set() {
        let metrics = Metrics::new();
        let id = |sa: &str| Id::new("cluster.local", "shop", sa).unwrap();
        let now = std::time::SystemTime::now();
        let hour = std::time::Duration::from_secs(3600);
        metrics
            .certificates
            .set_expiries(&[(id("a"), now + hour), (id("b"), now - hour)]);
        let text = metrics.encode_text();
        let line = |sa: &str| {
            let prefix = format!(
                "culvert_certificate_expiry_seconds{{identity=\"spiffe://cluster.local/ns/shop/sa/{sa}\"}} "
            );
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix)?.parse::<i64>().ok())
        };
        assert!(
            line("a").is_some_and(|s| (3590..=3600).contains(&s)),
            "{text}"
        );
        assert!(
            line("b").is_some_and(|s| (-3601..=-3599).contains(&s)),
            "{text}"
        );
        metrics.certificates.set_expiries(&[(id("a"), now + hour)]);
        assert!(
            !metrics.encode_text().contains("sa/b"),
            "a released identity stays"
        );
    }
}
