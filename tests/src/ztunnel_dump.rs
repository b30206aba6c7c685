//! The contract `/config_dump` keeps: the JSON schema `istioctl ztunnel-config` parses
//! (istioctl's `ZtunnelDump`), written here as Rust types from that schema's field names and
//! types. Parsing a node's dump into them checks, where Go's parser would silently accept a
//! mistake, that every field Culvert writes is one istioctl knows (`deny_unknown_fields`:
//! a misspelt field would be dropped there), that each has the type istioctl decodes it as, and
//! that every field istioctl's tables print is present (those have no default here).

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ZtunnelDump {
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    pub policies: Vec<Policy>,
    pub certificates: Vec<CertsDump>,
    pub workload_state: BTreeMap<String, WorkloadState>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Workload {
    pub uid: String,
    pub workload_ips: Vec<String>,
    #[serde(default)]
    pub waypoint: Option<GatewayAddress>,
    #[serde(default)]
    pub network_gateway: Option<GatewayAddress>,
    pub protocol: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub workload_name: String,
    #[serde(default)]
    pub workload_type: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub cluster_id: String,
    #[serde(default)]
    pub trust_domain: String,
    #[serde(default)]
    pub locality: Option<Locality>,
    pub node: String,
    #[serde(default)]
    pub network: String,
    pub status: String,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub capacity: u32,
    #[serde(default)]
    pub application_tunnel: Option<ApplicationTunnel>,
    #[serde(default)]
    pub authorization_policies: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Locality {
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub subzone: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplicationTunnel {
    pub protocol: String,
    #[serde(default)]
    pub port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayAddress {
    pub destination: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<String>,
    #[serde(default)]
    pub ports: BTreeMap<String, i64>,
    #[serde(default)]
    pub load_balancer: Option<serde_json::Value>,
    #[serde(default)]
    pub waypoint: Option<GatewayAddress>,
    pub endpoints: BTreeMap<String, Endpoint>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    #[serde(default)]
    pub ip_families: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Endpoint {
    pub workload_uid: String,
    pub service: String,
    #[serde(default)]
    pub address: String,
    /// Go: `map[uint16]uint16`, its keys decimal strings.
    pub port: BTreeMap<u16, u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub scope: String,
    pub action: String,
    pub rules: Vec<Vec<Vec<PolicyMatch>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PolicyMatch {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub source_ips: Vec<String>,
    pub not_source_ips: Vec<String>,
    pub destination_ips: Vec<String>,
    pub not_destination_ips: Vec<String>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
    pub service_accounts: Vec<ServiceAccountMatch>,
    pub not_service_accounts: Vec<ServiceAccountMatch>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StringMatch {
    #[serde(rename = "Exact")]
    pub exact: String,
    #[serde(rename = "Suffix")]
    pub suffix: String,
    #[serde(rename = "Prefix")]
    pub prefix: String,
    #[serde(rename = "Presence")]
    pub presence: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CertsDump {
    pub identity: String,
    pub state: String,
    pub cert_chain: Vec<Cert>,
    #[serde(default)]
    pub root_certs: Vec<Cert>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Cert {
    pub pem: String,
    /// Decimal: istioctl reads it with `big.Int.SetString(…, 10)`.
    pub serial_number: String,
    /// RFC 3339: istioctl reads both with `time.Parse(time.RFC3339, …)`.
    pub valid_from: String,
    pub expiration_time: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadState {
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub connections: Connections,
    pub info: WorkloadInfo,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Connections {
    pub inbound: Vec<Connection>,
    pub outbound: Vec<Connection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadInfo {
    pub name: String,
    pub namespace: String,
    pub trust_domain: String,
    pub service_account: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Connection {
    pub src: String,
    pub original_dst: String,
    pub actual_dst: String,
    #[serde(default)]
    pub protocol: String,
}
