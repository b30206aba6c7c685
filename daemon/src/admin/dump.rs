//! `GET /config_dump`: the node's state in the schema ztunnel's admin API serves and
//! `istioctl ztunnel-config` reads, so `istioctl zc workloads -f dump.json` (and the other
//! views) render a Culvert node unchanged. docs/observability.md maps each field.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use serde::Serialize;

use crate::cni::Registry;
use crate::identity::Id;
use crate::policy::Dumped;
use crate::proxy::carried::Connection;
use crate::proxy::{Direction, Transport};
use crate::state::{CLUSTER_ID, Locality, Snapshot, Workload, WorkloadType};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ConfigDump<'a> {
    workloads: Vec<DumpedWorkload<'a>>,
    services: Vec<Service<'a>>,
    policies: Vec<Dumped<'a>>,
    certificates: Vec<Certificates>,
    /// This node's wired pods, by `namespace/name`.
    workload_state: BTreeMap<String, WorkloadState>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DumpedWorkload<'a> {
    uid: String,
    workload_ips: &'a [IpAddr],
    /// `HBONE` for an enrolled workload, `TCP` otherwise.
    protocol: &'static str,
    name: &'a str,
    namespace: &'a str,
    service_account: &'a str,
    workload_name: &'a str,
    workload_type: WorkloadType,
    canonical_name: &'a str,
    canonical_revision: &'a str,
    cluster_id: &'static str,
    trust_domain: &'a str,
    /// The locality of the workload's node, when its labels give one.
    #[serde(skip_serializing_if = "Option::is_none")]
    locality: Option<&'a Locality>,
    node: &'a str,
    status: &'static str,
    hostname: &'static str,
    capacity: u32,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Service<'a> {
    name: &'a str,
    namespace: &'a str,
    hostname: String,
    /// `network/ip`, with the network empty.
    vips: Vec<String>,
    /// Service port → target port, 0 where the ready endpoints number it differently.
    ports: BTreeMap<String, u16>,
    /// By workload uid, or by `/ip` for an address no known workload holds.
    endpoints: BTreeMap<String, Endpoint>,
    ip_families: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Endpoint {
    workload_uid: String,
    service: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    address: String,
    /// Service port → this endpoint's port.
    port: BTreeMap<u16, u16>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Certificates {
    identity: String,
    /// `Available`, or `Unavailable: expired`.
    state: &'static str,
    /// Leaf first, then the intermediates the CA sent.
    cert_chain: Vec<Cert>,
    root_certs: Vec<Cert>,
}

#[derive(Serialize, Clone)]
#[serde(rename_all = "camelCase")]
struct Cert {
    pem: String,
    /// Decimal, as istioctl parses it.
    serial_number: String,
    /// RFC 3339.
    valid_from: String,
    expiration_time: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WorkloadState {
    /// `Wired`: listeners bound and rules installed.
    state: &'static str,
    connections: Connections,
    info: Info,
}

#[derive(Serialize, Default)]
struct Connections {
    inbound: Vec<DumpedConnection>,
    outbound: Vec<DumpedConnection>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DumpedConnection {
    src: String,
    original_dst: String,
    actual_dst: String,
    /// `HBONE` or `TCP`.
    protocol: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Info {
    name: String,
    namespace: String,
    trust_domain: String,
    service_account: String,
}

/// The uid ztunnel gives a pod: `<cluster>//Pod/<namespace>/<name>`.
fn uid(w: &Workload) -> String {
    format!("{CLUSTER_ID}//Pod/{}/{}", w.namespace, w.name)
}

/// Istio's name for how a connection's bytes travel.
fn protocol(transport: Transport) -> &'static str {
    match transport {
        Transport::Hbone => "HBONE",
        Transport::Passthrough | Transport::Plaintext | Transport::Probe => "TCP",
    }
}

pub(super) fn build<'a>(snapshot: &'a Snapshot, registry: &Registry) -> ConfigDump<'a> {
    let mut workloads: Vec<DumpedWorkload<'_>> = snapshot
        .workloads()
        .map(|w| DumpedWorkload {
            uid: uid(w),
            workload_ips: &w.ips,
            protocol: if snapshot.enrolled(w) { "HBONE" } else { "TCP" },
            name: &w.name,
            namespace: &w.namespace,
            service_account: w.service_account(),
            workload_name: &w.workload_name,
            workload_type: w.workload_type,
            canonical_name: w.canonical_service(),
            canonical_revision: w.canonical_revision(),
            cluster_id: CLUSTER_ID,
            trust_domain: w.identity.trust_domain(),
            locality: snapshot.locality(&w.node).map(|l| &**l),
            node: &w.node,
            status: "Healthy",
            hostname: "",
            capacity: 1,
        })
        .collect();
    workloads.sort_by(|a, b| (a.namespace, a.name).cmp(&(b.namespace, b.name)));
    ConfigDump {
        workloads,
        services: services(snapshot),
        policies: snapshot.policies.dump(),
        certificates: certificates(registry),
        workload_state: workload_state(registry),
    }
}

/// The snapshot keeps one entry per VIP and port; the dump, one per Service.
fn services(snapshot: &Snapshot) -> Vec<Service<'_>> {
    let mut by_name: BTreeMap<(&str, &str), Service<'_>> = BTreeMap::new();
    for (vip, port) in snapshot.services() {
        let service = by_name
            .entry((&port.namespace, &port.service))
            .or_insert_with(|| Service {
                name: &port.service,
                namespace: &port.namespace,
                hostname: port.hostname(),
                vips: Vec::new(),
                ports: BTreeMap::new(),
                endpoints: BTreeMap::new(),
                ip_families: "",
            });
        let net_vip = format!("/{}", vip.ip());
        if !service.vips.contains(&net_vip) {
            service.vips.push(net_vip);
        }
        let mut targets = port.endpoints.iter().map(SocketAddr::port);
        let target = targets.next().filter(|t| targets.all(|o| o == *t));
        service
            .ports
            .insert(vip.port().to_string(), target.unwrap_or(0));
        for endpoint in &port.endpoints {
            let (key, workload_uid, address) = match snapshot.workload_by_ip(endpoint.ip()) {
                Some(w) => (uid(w), uid(w), String::new()),
                None => (
                    format!("/{}", endpoint.ip()),
                    String::new(),
                    endpoint.ip().to_string(),
                ),
            };
            service
                .endpoints
                .entry(key)
                .or_insert_with(|| Endpoint {
                    workload_uid,
                    service: String::new(),
                    address,
                    port: BTreeMap::new(),
                })
                .port
                .insert(vip.port(), endpoint.port());
        }
    }
    by_name
        .into_values()
        .map(|mut s| {
            s.vips.sort();
            let v4 = s.vips.iter().any(|v| !v.contains(':'));
            let v6 = s.vips.iter().any(|v| v.contains(':'));
            s.ip_families = match (v4, v6) {
                (true, true) => "Dual",
                (false, true) => "IPv6",
                _ => "IPv4",
            };
            let name = format!("{}/{}", s.namespace, s.hostname);
            for endpoint in s.endpoints.values_mut() {
                endpoint.service.clone_from(&name);
            }
            s
        })
        .collect()
}

fn certificates(registry: &Registry) -> Vec<Certificates> {
    let cache = registry.certificates();
    let roots: Vec<Cert> = cache.root_certificates().iter().map(cert).collect();
    let now = SystemTime::now();
    cache
        .chains()
        .into_iter()
        .map(|held| Certificates {
            identity: held.id.to_string(),
            state: if held.not_after <= now {
                "Unavailable: expired"
            } else {
                "Available"
            },
            cert_chain: held.key.cert.iter().map(cert).collect(),
            root_certs: roots.clone(),
        })
        .collect()
}

fn system_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
}

/// A certificate the node holds; one it cannot parse (it could not have been installed) shows
/// with empty fields rather than failing the dump.
fn cert(der: &CertificateDer<'_>) -> Cert {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    let pem = pem::encode_config(&pem::Pem::new("CERTIFICATE", der.to_vec()), config);
    let rfc3339 = |t| humantime::format_rfc3339_seconds(system_time(t)).to_string();
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, x509)) => Cert {
            pem,
            serial_number: x509.tbs_certificate.serial.to_string(),
            valid_from: rfc3339(x509.validity().not_before),
            expiration_time: rfc3339(x509.validity().not_after),
        },
        Err(_) => Cert {
            pem,
            serial_number: String::new(),
            valid_from: String::new(),
            expiration_time: String::new(),
        },
    }
}

fn workload_state(registry: &Registry) -> BTreeMap<String, WorkloadState> {
    let mut states: BTreeMap<String, WorkloadState> = registry
        .list()
        .into_iter()
        .filter_map(|p| registry.pod(&p.pod.namespace, &p.pod.name))
        .map(|pod| {
            let id: &Id = &pod.identity;
            let state = WorkloadState {
                state: "Wired",
                connections: Connections::default(),
                info: Info {
                    name: pod.name.clone(),
                    namespace: pod.namespace.clone(),
                    trust_domain: id.trust_domain().to_owned(),
                    service_account: id.service_account().to_owned(),
                },
            };
            (format!("{}/{}", pod.namespace, pod.name), state)
        })
        .collect();
    for conn in registry.proxy().connections() {
        let Some(state) = states.get_mut(&*conn.pod) else {
            continue;
        };
        let dumped = dumped(&conn);
        match conn.direction {
            Direction::Inbound => state.connections.inbound.push(dumped),
            Direction::Outbound => state.connections.outbound.push(dumped),
        }
    }
    states
}

fn dumped(conn: &Connection) -> DumpedConnection {
    DumpedConnection {
        src: conn.src.to_string(),
        original_dst: conn.dst.to_string(),
        actual_dst: conn.actual.to_string(),
        protocol: protocol(conn.transport),
    }
}

/// `GET /connections`: every connection the node carries now, oldest first.
#[derive(Serialize)]
pub(super) struct Listed {
    workload: Arc<str>,
    direction: &'static str,
    local: SocketAddr,
    remote: SocketAddr,
    target: SocketAddr,
    protocol: &'static str,
    /// How the bytes travel: `hbone`, `passthrough`, `plaintext` or `probe`.
    transport: &'static str,
    /// The other end's SPIFFE identity, proven in mutual TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    identity: Option<Id>,
    /// RFC 3339.
    opened: String,
}

pub(super) fn connections(registry: &Registry) -> Vec<Listed> {
    registry
        .proxy()
        .connections()
        .into_iter()
        .map(|c| Listed {
            workload: c.pod.clone(),
            direction: c.direction.as_str(),
            local: c.local(),
            remote: c.remote(),
            target: c.dst,
            protocol: protocol(c.transport),
            transport: c.transport.as_str(),
            opened: humantime::format_rfc3339_seconds(c.opened).to_string(),
            identity: c.peer,
        })
        .collect()
}
