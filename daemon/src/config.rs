//! Configuration: the node daemon's flags and the node file.
//!
//! Owns parsing and validation; everything downstream receives domain types and never
//! re-validates. The node file (YAML) names the node, its trust domain and CA, and describes the
//! workloads and services the node should know: the whole of Culvert's input on hosts without
//! Kubernetes, and the demo's and tests' input everywhere.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::identity::{self, BundleSource, Id};
use crate::policy;
use crate::state::{self, Interner, PeerAuthentication, ServiceSpec, Snapshot, Workload};

/// Default trust domain, as in Istio.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Where a host's CNI plugins and configuration live, by convention.
pub const DEFAULT_CNI_BIN_DIR: &str = "/opt/cni/bin";
pub const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";
/// Default workload certificate lifetime.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Flags and environment of `culvert node`.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct NodeArgs {
    /// The node file (YAML): node name, trust domain, CA, discovery, workloads, services.
    #[arg(long, env = "CULVERT_CONFIG")]
    pub config: PathBuf,
    /// This node's name; overrides the node file's `node` (a DaemonSet passes
    /// `spec.nodeName` here).
    #[arg(long, env = "CULVERT_NODE_NAME")]
    pub node_name: Option<String>,
    /// Kubeconfig for `discovery: kubernetes`; default: the in-cluster service account, then
    /// `$KUBECONFIG`, then `~/.kube/config`.
    #[arg(long, env = "CULVERT_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Admin API (JSON: workloads, services, wired pods). Keep it on loopback.
    #[arg(long, env = "CULVERT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Readiness (`/healthz/ready`) and liveness (`/healthz/live`) for the kubelet's probes.
    #[arg(long, env = "CULVERT_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    /// A file that exists while this daemon is ready and is removed when it drains, for an exec
    /// readiness probe (`culvert ready --file`). A DaemonSet on the host network needs it:
    /// during a surge update both daemons hold the probe port (`SO_REUSEPORT`), so the
    /// kubelet's HTTP probe of the new daemon can be answered by the old one.
    #[arg(long, env = "CULVERT_READY_FILE")]
    pub ready_file: Option<PathBuf>,
    /// Prometheus metrics (`/metrics`, and `/stats/prometheus` as Istio's node proxy serves
    /// them).
    #[arg(long, env = "CULVERT_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// Unix socket on which pods are registered (by culvert-cni).
    #[arg(long, env = "CULVERT_CNI_SOCKET", default_value = culvert_cni_proto::DEFAULT_SOCKET_PATH)]
    pub cni_socket: PathBuf,
    /// How redirection rules are installed in pods.
    #[arg(long, env = "CULVERT_REDIRECT", value_enum, default_value_t = RedirectChoice::Auto)]
    pub redirect: RedirectChoice,
    /// How long open connections may finish after SIGTERM.
    #[arg(long, env = "CULVERT_DRAIN_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    #[serde(with = "humantime_serde_secs")]
    pub drain_timeout: Duration,
    /// Make the node's own TCP to wired pods (kubelet probes) come from 169.254.7.127, which
    /// the pods' rules let through, so STRICT pods pass their probes. Off only where the daemon
    /// does not run in the node's network namespace.
    #[arg(long, env = "CULVERT_PROBE_SNAT", default_value_t = true, action = clap::ArgAction::Set)]
    pub probe_snat: bool,
    /// How often every wired pod's redirection rules are checked and, when gone (someone
    /// flushed them), restored. Each check lists one table inside the pod.
    #[arg(long, env = "CULVERT_HEAL_INTERVAL", value_parser = positive_duration, default_value = "3s")]
    #[serde(with = "humantime_serde_secs")]
    pub heal_interval: Duration,
    /// Where the daemon keeps what must survive restarts and reboots: the enrollment state the
    /// CNI plugin reads when the daemon is away, and the wired sandboxes.
    #[arg(long, env = "CULVERT_STATE_DIR", default_value = "/var/lib/culvert")]
    pub state_dir: PathBuf,
    /// Directories where the container runtime keeps pod network namespaces; searched (with
    /// every process's namespace) to find running pods when the daemon starts.
    #[arg(
        long = "netns-dir",
        env = "CULVERT_NETNS_DIRS",
        value_delimiter = ',',
        default_value = "/var/run/netns"
    )]
    pub netns_dirs: Vec<PathBuf>,
    #[command(flatten)]
    pub ports: PortFlags,
    /// Inbound HBONE connections this node holds at most, all pods together; one more is
    /// reset at accept.
    #[arg(long, env = "CULVERT_HBONE_MAX_CONNECTIONS", value_parser = at_least_one, default_value_t = 16384)]
    pub hbone_max_connections: usize,
    /// Inbound HBONE connections one peer address (one client pod) holds at most.
    #[arg(
        long,
        env = "CULVERT_HBONE_MAX_CONNECTIONS_PER_PEER",
        value_parser = at_least_one,
        default_value_t = 256
    )]
    pub hbone_max_connections_per_peer: usize,
    /// Inbound HBONE streams (tunnels, each with an upstream socket) this node holds at most;
    /// one more is answered 503.
    #[arg(long, env = "CULVERT_HBONE_MAX_STREAMS", value_parser = at_least_one, default_value_t = 65536)]
    pub hbone_max_streams: usize,
    /// Inbound HBONE streams one peer address holds at most.
    #[arg(
        long,
        env = "CULVERT_HBONE_MAX_STREAMS_PER_PEER",
        value_parser = at_least_one,
        default_value_t = 4096
    )]
    pub hbone_max_streams_per_peer: usize,
    #[command(flatten)]
    pub cni: CniInstall,
}

/// Where the node's CNI plugins and configuration live, for installing culvert-cni.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct CniInstall {
    /// Install culvert-cni into the host's CNI directories and keep it in the primary
    /// configuration while running. It stays installed when the daemon stops, so enrolled pods
    /// keep failing closed until the daemon returns; `culvert cni-uninstall` removes it.
    #[arg(long = "install-cni", env = "CULVERT_INSTALL_CNI")]
    pub install: bool,
    /// The host's CNI plugin directory.
    #[arg(long, env = "CULVERT_CNI_BIN_DIR", default_value = DEFAULT_CNI_BIN_DIR)]
    pub cni_bin_dir: PathBuf,
    /// The host's CNI configuration directory.
    #[arg(long, env = "CULVERT_CNI_CONF_DIR", default_value = DEFAULT_CNI_CONF_DIR)]
    pub cni_conf_dir: PathBuf,
    /// The culvert-cni binary to install; default: next to this executable.
    #[arg(long, env = "CULVERT_CNI_PLUGIN")]
    pub cni_plugin: Option<PathBuf>,
}

/// The per-pod ports, bound inside each enrolled pod's network namespace, as the data path and
/// the rules use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Ports {
    /// Outbound capture: the target of the nat OUTPUT redirect.
    pub outbound: u16,
    /// Inbound plaintext capture: the target of the nat PREROUTING redirect.
    pub inbound_plaintext: u16,
    /// Inbound HBONE: the only port that crosses the network.
    pub hbone: u16,
}

impl Ports {
    /// True for ports that must never be a tunnel's target: dialling them would loop.
    pub fn is_proxy_port(&self, port: u16) -> bool {
        [self.outbound, self.inbound_plaintext, self.hbone].contains(&port)
    }
}

/// The flags that set [`Ports`].
#[derive(Debug, Clone, Copy, clap::Args, Serialize)]
pub struct PortFlags {
    /// Outbound capture: the target of the nat OUTPUT redirect.
    #[arg(
        long = "outbound-port",
        env = "CULVERT_OUTBOUND_PORT",
        default_value_t = 15001
    )]
    pub outbound: u16,
    /// Inbound plaintext capture: the target of the nat PREROUTING redirect.
    #[arg(
        long = "inbound-plaintext-port",
        env = "CULVERT_INBOUND_PLAINTEXT_PORT",
        default_value_t = 15006
    )]
    pub inbound_plaintext: u16,
    /// Inbound HBONE: the only port that crosses the network.
    #[arg(
        long = "hbone-port",
        env = "CULVERT_HBONE_PORT",
        default_value_t = 15008
    )]
    pub hbone: u16,
}

impl From<PortFlags> for Ports {
    fn from(flags: PortFlags) -> Self {
        Self {
            outbound: flags.outbound,
            inbound_plaintext: flags.inbound_plaintext,
            hbone: flags.hbone,
        }
    }
}

/// Which rule backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RedirectChoice {
    /// nftables when the `nft` tool is present, iptables otherwise.
    Auto,
    Nftables,
    Iptables,
}

/// A duration above zero (a zero period would make a ticking loop spin, or panic).
fn positive_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d > Duration::ZERO => Ok(d),
        Ok(_) => Err("must be more than zero".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

/// A cap of at least one (zero would refuse every connection).
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

mod humantime_serde_secs {
    pub(super) fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

/// Where workloads, services and enrollment come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Discovery {
    /// The node file's `workloads`, `services` and `enrolledNamespaces`.
    #[default]
    File,
    /// The Kubernetes API: Pods, Namespaces, Services and EndpointSlices.
    Kubernetes,
}

/// The node file, validated.
#[derive(Debug)]
pub struct NodeFile {
    pub node: String,
    pub discovery: Discovery,
    pub trust_domain: String,
    /// With Kubernetes discovery, the label whose value `ambient` enrolls a namespace (or a
    /// pod) and `none` opts a pod out.
    pub enrollment_label: String,
    pub ca: CaConfig,
    pub cert_ttl: Duration,
    /// Post-quantum key exchange on HBONE: preferred (default) or required.
    pub key_exchange: crate::tls::KeyExchange,
    /// How policy objects are read (root namespace, L7 in DENY).
    pub policy: policy::Settings,
    /// Its `policies:`, as read (with Kubernetes discovery, compiled with the API's).
    pub policy_objects: Arc<policy::istio::Objects>,
    /// Its workloads, services and mesh settings; its policies compiled in.
    pub snapshot: Snapshot,
}

/// Where workload certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaConfig {
    /// A CA key on this host: demos, tests, hosts without a cluster CA.
    Local(CaFiles),
    /// An Istio CA API endpoint: culvert ca, istiod or istio-csr.
    Istio(identity::Endpoint),
}

/// Where the local CA's files are; relative paths in the file are relative to the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub roots: Option<PathBuf>,
}

/// Where ztunnel and Istio's charts mount the CA token.
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/tokens/istio-token";

/// Why the node file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("in {path}")]
    Invalid {
        path: PathBuf,
        #[source]
        source: state::Error,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    node: String,
    #[serde(default)]
    discovery: Discovery,
    #[serde(default)]
    trust_domain: Option<String>,
    #[serde(default)]
    enrollment_label: Option<String>,
    ca: RawCa,
    #[serde(default)]
    cert_ttl: Option<String>,
    #[serde(default)]
    key_exchange: crate::tls::KeyExchange,
    #[serde(default)]
    peer_authentication: PeerAuthentication,
    #[serde(default)]
    enrolled_namespaces: std::collections::BTreeSet<String>,
    #[serde(default)]
    workloads: Vec<RawWorkload>,
    #[serde(default)]
    services: Vec<RawService>,
    /// Nodes' localities (with Kubernetes discovery, from the Node objects' labels).
    #[serde(default)]
    nodes: Vec<RawNode>,
    #[serde(default)]
    policy: RawPolicy,
    /// PeerAuthentication and AuthorizationPolicy objects, as Istio's YAML writes them.
    #[serde(default)]
    policies: Vec<policy::istio::Resource>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    root_namespace: Option<String>,
    #[serde(default)]
    l7_deny: policy::L7Deny,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCa {
    #[serde(default)]
    cert: Option<PathBuf>,
    #[serde(default)]
    key: Option<PathBuf>,
    #[serde(default)]
    roots: Option<PathBuf>,
    #[serde(default)]
    istio: Option<RawIstioCa>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawIstioCa {
    address: String,
    #[serde(default)]
    server_name: Option<String>,
    roots: RawBundle,
    #[serde(default)]
    token_file: Option<PathBuf>,
    #[serde(default)]
    cluster_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawBundle {
    #[serde(default)]
    file: Option<PathBuf>,
    /// `namespace/name`.
    #[serde(default)]
    config_map: Option<String>,
    #[serde(default)]
    key: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawWorkload {
    name: String,
    namespace: String,
    #[serde(default)]
    service_account: Option<String>,
    /// What owns the workload, for telemetry (default: its name).
    #[serde(default)]
    workload_name: Option<String>,
    node: String,
    #[serde(default)]
    ips: Vec<IpAddr>,
    #[serde(default)]
    enrolled: Option<bool>,
    #[serde(default)]
    peer_authentication: Option<PeerAuthentication>,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    #[serde(default)]
    region: String,
    #[serde(default)]
    zone: String,
    #[serde(default)]
    subzone: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawService {
    name: String,
    namespace: String,
    vip: IpAddr,
    ports: Vec<RawPort>,
    #[serde(default)]
    endpoints: Vec<RawEndpoint>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPort {
    port: u16,
    #[serde(default)]
    target_port: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    ip: IpAddr,
    #[serde(default = "yes")]
    ready: bool,
}

fn yes() -> bool {
    true
}

impl NodeFile {
    /// Reads and validates the node file; `node`, when given, replaces the file's node name.
    pub fn load(path: &Path, node: Option<&str>) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        Self::parse(&text, dir, node).map_err(|e| match e {
            ParseError::Yaml(source) => Error::Parse {
                path: path.to_owned(),
                source,
            },
            ParseError::Invalid(source) => Error::Invalid {
                path: path.to_owned(),
                source,
            },
        })
    }

    /// Parses and validates node-file text as if it were a file in `dir` (fuzzing, tools).
    pub fn from_yaml(text: &str, dir: &Path, node: Option<&str>) -> Result<Self, Error> {
        let path = dir.join("<text>");
        Self::parse(text, dir, node).map_err(|e| match e {
            ParseError::Yaml(source) => Error::Parse { path, source },
            ParseError::Invalid(source) => Error::Invalid { path, source },
        })
    }

    fn parse(text: &str, dir: &Path, node: Option<&str>) -> Result<Self, ParseError> {
        let mut raw: RawFile = serde_yaml::from_str(text).map_err(ParseError::Yaml)?;
        if let Some(node) = node {
            node.clone_into(&mut raw.node);
        }
        let invalid = |path: &str, value: &dyn std::fmt::Display, reason: String| {
            ParseError::Invalid(state::Error {
                path: path.to_owned(),
                value: value.to_string(),
                reason,
            })
        };
        if raw.node.is_empty() {
            return Err(invalid(
                "node",
                &"\"\"",
                "a node name is required (here or --node-name)".into(),
            ));
        }
        if raw.discovery == Discovery::Kubernetes {
            let listed = [
                ("workloads", raw.workloads.is_empty()),
                ("services", raw.services.is_empty()),
                ("enrolledNamespaces", raw.enrolled_namespaces.is_empty()),
                ("nodes", raw.nodes.is_empty()),
            ];
            if let Some((field, _)) = listed.iter().find(|(_, empty)| !empty) {
                return Err(invalid(
                    field,
                    &"[...]",
                    "not allowed with discovery: kubernetes (the API supplies them)".into(),
                ));
            }
        }
        let trust_domain = raw
            .trust_domain
            .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_owned());
        Id::new(&trust_domain, "x", "x")
            .map_err(|e| invalid("trustDomain", &trust_domain, e.to_string()))?;
        let enrollment_label = raw
            .enrollment_label
            .unwrap_or_else(|| crate::discovery::MODE_LABEL.to_owned());
        label_key(&enrollment_label)
            .map_err(|reason| invalid("enrollmentLabel", &enrollment_label, reason.into()))?;
        let cert_ttl = match raw.cert_ttl {
            None => DEFAULT_CERT_TTL,
            Some(text) => match humantime::parse_duration(&text) {
                Ok(ttl) if ttl >= Duration::from_secs(60) => ttl,
                Ok(_) => return Err(invalid("certTtl", &text, "must be at least 1m".into())),
                Err(e) => return Err(invalid("certTtl", &text, e.to_string())),
            },
        };

        // Node files for large clusters repeat namespaces, service accounts, nodes and labels.
        let mut interner = Interner::default();
        let mut workloads = Vec::with_capacity(raw.workloads.len());
        for (i, w) in raw.workloads.into_iter().enumerate() {
            let namespace = interner.str(&w.namespace);
            let service_account = interner.str(w.service_account.as_deref().unwrap_or("default"));
            let identity = interner
                .id(&trust_domain, &namespace, &service_account)
                .map_err(|e| invalid(&format!("workloads[{i}]"), &w.name, e.to_string()))?;
            if w.name.is_empty() || w.node.is_empty() {
                return Err(invalid(
                    &format!("workloads[{i}]"),
                    &w.name,
                    "name and node are required".into(),
                ));
            }
            if w.ips.is_empty()
                && w.enrolled
                    .unwrap_or_else(|| raw.enrolled_namespaces.contains(&w.namespace))
            {
                let reason = "an enrolled workload needs an IP".to_owned();
                return Err(invalid(&format!("workloads[{i}].ips"), &"[]", reason));
            }
            let name: Arc<str> = w.name.into();
            workloads.push(Arc::new(Workload {
                workload_name: w
                    .workload_name
                    .as_deref()
                    .map_or_else(|| name.clone(), |owner| interner.str(owner)),
                workload_type: state::WorkloadType::Pod,
                name,
                namespace,
                node: interner.str(&w.node),
                ips: w.ips.into(),
                labels: interner.labels(w.labels.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
                enrollment: w.enrolled,
                peer_authentication: w.peer_authentication,
                identity,
            }));
        }
        let services = raw
            .services
            .into_iter()
            .map(|s| ServiceSpec {
                name: interner.str(&s.name),
                namespace: interner.str(&s.namespace),
                vip: s.vip,
                ports: s
                    .ports
                    .iter()
                    .map(|p| {
                        let target = p.target_port.unwrap_or(p.port);
                        let ready = s.endpoints.iter().filter(|e| e.ready);
                        (p.port, ready.map(|e| (e.ip, target).into()).collect())
                    })
                    .collect(),
            })
            .collect();
        let policy = policy::Settings {
            root_namespace: raw
                .policy
                .root_namespace
                .unwrap_or_else(|| policy::Settings::default().root_namespace),
            l7_deny: raw.policy.l7_deny,
        };
        let objects = policy::istio::split(raw.policies).map_err(ParseError::Invalid)?;
        let policies = Arc::new(policy::Policies::build(
            &policy,
            objects.peer.clone(),
            objects.authz.clone(),
        ));
        let mut snapshot = Snapshot::build(
            &trust_domain,
            raw.peer_authentication,
            raw.enrolled_namespaces,
            workloads,
            services,
        )
        .map_err(ParseError::Invalid)?
        .with_policies(policies);
        let mut named = std::collections::HashSet::new();
        for (i, node) in raw.nodes.into_iter().enumerate() {
            if node.name.is_empty() || !named.insert(node.name.clone()) {
                let reason = "a name is required, once per node".to_owned();
                return Err(invalid(&format!("nodes[{i}].name"), &node.name, reason));
            }
            let locality = state::Locality {
                region: interner.str(&node.region),
                zone: interner.str(&node.zone),
                subzone: interner.str(&node.subzone),
            };
            snapshot.set_locality(interner.str(&node.name), locality);
        }
        Ok(Self {
            node: raw.node,
            discovery: raw.discovery,
            trust_domain,
            enrollment_label,
            ca: ca_config(raw.ca, dir)
                .map_err(|(path, value, reason)| invalid(path, &value, reason))?,
            cert_ttl,
            key_exchange: raw.key_exchange,
            policy,
            policy_objects: Arc::new(objects),
            snapshot,
        })
    }
}

/// Checks the `ca:` block: local files or an Istio CA endpoint, exactly one.
fn ca_config(raw: RawCa, dir: &Path) -> Result<CaConfig, (&'static str, String, String)> {
    let RawCa {
        cert,
        key,
        roots,
        istio,
    } = raw;
    let istio = match (cert, key, istio) {
        (Some(cert), Some(key), None) => {
            return Ok(CaConfig::Local(CaFiles {
                cert: dir.join(cert),
                key: dir.join(key),
                roots: roots.map(|r| dir.join(r)),
            }));
        }
        (None, None, Some(istio)) if roots.is_none() => istio,
        _ => {
            let reason =
                "either cert and key (and optionally roots) of a local CA, or istio".into();
            return Err(("ca", "{...}".into(), reason));
        }
    };
    let address = istio
        .address
        .strip_prefix("https://")
        .unwrap_or(&istio.address)
        .trim_end_matches('/')
        .to_owned();
    let host = match address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        _ => {
            let reason = "expected host:port".into();
            return Err(("ca.istio.address", istio.address, reason));
        }
    };
    let roots = match (istio.roots.file, istio.roots.config_map) {
        (Some(file), None) => BundleSource::File(dir.join(file)),
        (None, Some(cm)) => match cm.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                BundleSource::ConfigMap {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                    key: istio
                        .roots
                        .key
                        .unwrap_or_else(|| culvert_ca_proto::ROOT_CERT_KEY.to_owned()),
                }
            }
            _ => {
                let reason = "expected namespace/name".into();
                return Err(("ca.istio.roots.configMap", cm, reason));
            }
        },
        _ => {
            let reason = "exactly one of file and configMap".into();
            return Err(("ca.istio.roots", "{...}".into(), reason));
        }
    };
    Ok(CaConfig::Istio(identity::Endpoint {
        server_name: istio.server_name.unwrap_or(host),
        address,
        roots,
        token_file: dir.join(
            istio
                .token_file
                .unwrap_or_else(|| DEFAULT_TOKEN_FILE.into()),
        ),
        cluster_id: istio
            .cluster_id
            .unwrap_or_else(|| culvert_ca_proto::DEFAULT_CLUSTER_ID.to_owned()),
    }))
}

enum ParseError {
    Yaml(serde_yaml::Error),
    Invalid(state::Error),
}

/// A Kubernetes label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63
/// characters, alphanumeric at both ends, with `-`, `_` and `.` inside.
fn label_key(key: &str) -> Result<(), &'static str> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let inner_ok = |s: &str, extra: &[u8]| {
        let bytes = s.as_bytes();
        !bytes.is_empty()
            && bytes[0].is_ascii_alphanumeric()
            && bytes[bytes.len() - 1].is_ascii_alphanumeric()
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || extra.contains(b))
    };
    if name.len() > 63 || !inner_ok(name, b"-_.") {
        return Err(
            "not a label key: the name (after any prefix/) is 1 to 63 characters, \
                    alphanumeric at both ends, with -, _ and . inside",
        );
    }
    if let Some(prefix) = prefix {
        let lowercase = prefix.bytes().all(|b| !b.is_ascii_uppercase());
        if prefix.len() > 253 || !lowercase || !prefix.split('.').all(|l| inner_ok(l, b"-")) {
            return Err("not a label key: the prefix before / is a lowercase DNS subdomain");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_enrollment_label_is_a_label_key_and_defaults_to_culverts() {
        for good in [
            "culvert.io/dataplane-mode",
            "istio.io/dataplane-mode",
            "mesh",
            "a.b-c/x_y.z",
        ] {
            assert_eq!(label_key(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "/mode",
            "Istio.io/mode",
            "io./mode",
            "-a/mode",
            "a/",
            "a/-x",
            "a/b/c",
            "m ode",
        ] {
            assert!(label_key(bad).is_err(), "{bad:?} accepted");
        }
        assert!(label_key(&"x".repeat(64)).is_err());
        assert!(label_key(&format!("{}/x", "a".repeat(254))).is_err());
        let ca = "ca: { cert: ca.crt, key: ca.key }";
        let file = parse(&format!(
            "node: a\n{ca}\nenrollmentLabel: istio.io/dataplane-mode\n"
        ))
        .unwrap();
        assert_eq!(file.enrollment_label, "istio.io/dataplane-mode");
        let err = parse(&format!("node: a\n{ca}\nenrollmentLabel: Istio/mode\n")).unwrap_err();
        assert!(err.starts_with("enrollmentLabel"), "{err}");
    }

    const GOOD: &str = r#"
node: node-a
ca: { cert: ca.crt, key: ca.key }
peerAuthentication: STRICT
workloads:
  - { name: client, namespace: demo, serviceAccount: client, node: node-a, ips: [10.244.1.2], enrolled: true }
  - { name: legacy, namespace: demo, node: node-b, ips: [10.244.2.9], peerAuthentication: PERMISSIVE }
services:
  - name: echo
    namespace: demo
    vip: 10.96.0.10
    ports: [{ port: 80, targetPort: 8080 }]
    endpoints: [{ ip: 10.244.2.9 }, { ip: 10.244.2.10, ready: false }]
nodes:
  - { name: node-b, region: eu-west, zone: eu-west-1b }
"#;

    fn parse(text: &str) -> Result<NodeFile, String> {
        NodeFile::parse(text, Path::new("/etc/culvert"), None).map_err(|e| match e {
            ParseError::Yaml(e) => e.to_string(),
            ParseError::Invalid(e) => e.to_string(),
        })
    }

    #[test]
    fn an_istio_ca_endpoint_is_read_with_istios_defaults() {
        let text = "node: a\nca:\n  istio:\n    address: https://culvert-ca.culvert-system.svc:15012\n    roots: { configMap: culvert-system/culvert-ca-root-cert }\n";
        let file = parse(text).unwrap();
        assert_eq!(
            file.ca,
            CaConfig::Istio(identity::Endpoint {
                address: "culvert-ca.culvert-system.svc:15012".into(),
                server_name: "culvert-ca.culvert-system.svc".into(),
                roots: BundleSource::ConfigMap {
                    namespace: "culvert-system".into(),
                    name: "culvert-ca-root-cert".into(),
                    key: culvert_ca_proto::ROOT_CERT_KEY.into(),
                },
                token_file: DEFAULT_TOKEN_FILE.into(),
                cluster_id: "Kubernetes".into(),
            })
        );
        let text = "node: a\nca:\n  istio:\n    address: 127.0.0.1:15012\n    serverName: ca.test\n    tokenFile: token\n    clusterId: east\n    roots: { file: roots.pem }\n";
        let CaConfig::Istio(ca) = parse(text).unwrap().ca else {
            panic!("not an Istio CA")
        };
        assert_eq!(ca.server_name, "ca.test");
        assert_eq!(
            ca.roots,
            BundleSource::File("/etc/culvert/roots.pem".into())
        );
        assert_eq!(ca.token_file, Path::new("/etc/culvert/token"));
        assert_eq!(ca.cluster_id, "east");
    }

    #[test]
    fn a_ca_block_that_is_neither_or_both_is_refused() {
        for (ca, field) in [
            ("{ cert: ca.crt }", "ca"),
            (
                "{ cert: ca.crt, key: ca.key, istio: { address: 'a:1', roots: { file: r } } }",
                "ca",
            ),
            (
                "{ istio: { address: nowhere, roots: { file: r } } }",
                "ca.istio.address",
            ),
            ("{ istio: { address: 'a:1', roots: {} } }", "ca.istio.roots"),
            (
                "{ istio: { address: 'a:1', roots: { configMap: lonely } } }",
                "ca.istio.roots.configMap",
            ),
        ] {
            let err = parse(&format!("node: a\nca: {ca}\n")).unwrap_err();
            assert!(err.starts_with(field), "{ca}: {err}");
        }
    }

    #[test]
    fn good_file_loads_with_defaults_filled_in() {
        let file = parse(GOOD).unwrap();
        assert_eq!(file.node, "node-a");
        assert_eq!(file.trust_domain, "cluster.local");
        assert_eq!(file.enrollment_label, "culvert.io/dataplane-mode");
        assert_eq!(file.cert_ttl, DEFAULT_CERT_TTL);
        let CaConfig::Local(ca) = &file.ca else {
            panic!("not a local CA: {:?}", file.ca)
        };
        assert_eq!(ca.cert, Path::new("/etc/culvert/ca.crt"));
        let legacy = file.snapshot.workload("demo", "legacy").unwrap();
        assert_eq!(
            legacy.identity.as_str(),
            "spiffe://cluster.local/ns/demo/sa/default"
        );
        assert!(!file.snapshot.enrolled(legacy));
        assert_eq!(
            file.snapshot.peer_authentication_of(legacy),
            PeerAuthentication::Permissive
        );
        let client = file.snapshot.workload("demo", "client").unwrap();
        assert_eq!(
            file.snapshot.peer_authentication_of(client),
            PeerAuthentication::Strict
        );
        let port = file
            .snapshot
            .service("10.96.0.10:80".parse().unwrap())
            .unwrap();
        assert_eq!(port.endpoints, ["10.244.2.9:8080".parse().unwrap()]);
        let locality = file.snapshot.locality(&legacy.node).unwrap();
        assert_eq!(
            (&*locality.region, &*locality.zone),
            ("eu-west", "eu-west-1b")
        );
        assert_eq!(&*locality.subzone, "");
        assert_eq!(file.snapshot.locality(&client.node), None);
    }

    #[test]
    fn policies_and_labels_in_the_file_reach_the_snapshot() {
        // The fuzz seed for node files with policies, so it stays a valid file.
        let file = parse(include_str!("../../fuzz/seeds/node_file/policies.yaml")).unwrap();
        assert_eq!(file.policy.root_namespace, "istio-system");
        let server = file.snapshot.workload("demo", "server").unwrap();
        assert_eq!(server.labels.get("app"), Some("server"));
        let plaintext = |port| policy::Connection {
            peer: None,
            src: "10.0.0.9:4000".parse().unwrap(),
            dst: SocketAddr::new(server.ips[0], port),
        };
        // STRICT from the file's PeerAuthentication, but DISABLE (PERMISSIVE) on 9000, where
        // the mesh-wide DENY's notServiceAccounts matches plaintext (it has no account).
        let decide = |port| policy::inbound(&file.snapshot, server, &plaintext(port));
        let denied = |d: policy::Decision| match d {
            policy::Decision::Deny(denial) => denial,
            policy::Decision::Allow => panic!("allowed"),
        };
        assert_eq!(
            denied(decide(8080)).reason,
            policy::Reason::PlaintextToStrict
        );
        let by_deny = denied(decide(9000));
        assert_eq!(by_deny.reason, policy::Reason::PolicyDenied);
        assert_eq!(by_deny.policy.as_deref(), Some("istio-system/deny"));
        assert!(file.snapshot.policies.notes().count() >= 2);
    }

    #[test]
    fn kubernetes_discovery_takes_the_node_name_from_the_flag() {
        let text = "discovery: kubernetes\nca: { cert: ca.crt, key: ca.key }\n";
        let file = NodeFile::parse(text, Path::new("/etc/culvert"), Some("node-7"))
            .map_err(|_| "refused")
            .unwrap();
        assert_eq!(
            (file.node.as_str(), file.discovery),
            ("node-7", Discovery::Kubernetes)
        );
        assert_eq!(file.snapshot.workloads().count(), 0);
    }

    #[test]
    fn flags_refuse_a_zero_heal_interval_and_zero_caps() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            node: NodeArgs,
        }
        let parse = |extra: &[&str]| {
            let args = ["culvert", "--config", "/etc/culvert/node.yaml"];
            Cli::try_parse_from(args.iter().chain(extra)).map(|c| c.node)
        };
        let node = parse(&[]).unwrap();
        assert_eq!(node.heal_interval, Duration::from_secs(3));
        assert_eq!(node.hbone_max_streams_per_peer, 4096);
        for bad in [
            ["--heal-interval", "0s"],
            ["--hbone-max-connections", "0"],
            ["--hbone-max-connections-per-peer", "0"],
            ["--hbone-max-streams", "0"],
            ["--hbone-max-streams-per-peer", "0"],
        ] {
            let err = parse(&bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(err.to_string().contains(bad[0]), "{err}");
        }
    }

    #[test]
    fn errors_name_the_field_and_value() {
        let cases = [
            (
                GOOD.replace("10.244.1.2", "10.244.1.x"),
                "workloads[0].ips[0]: invalid IP address syntax",
            ),
            (
                GOOD.replace("STRICT", "LOOSE"),
                "peerAuthentication: unknown variant `LOOSE`",
            ),
            (
                GOOD.replace("serviceAccount: client", "serviceAccount: Client"),
                r#"workloads[0] = client: service account "Client""#,
            ),
            (
                GOOD.replace("10.244.2.9]", "10.244.1.2]"),
                "workloads[1].ips[0] = 10.244.1.2: already used by demo/client",
            ),
            (
                GOOD.replace("node: node-a\n", "node: node-a\nnods: 2\n"),
                "unknown field `nods`",
            ),
            (
                format!("{GOOD}  - {{ name: node-b, zone: z }}\n"),
                "nodes[1].name = node-b: a name is required, once per node",
            ),
            (
                GOOD.replace("port: 80,", "port: 0,"),
                "services[0].ports[0] = 0: port 0",
            ),
            (
                format!("{GOOD}certTtl: 10s\n"),
                "certTtl = 10s: must be at least 1m",
            ),
            (
                GOOD.replace("node: node-a\n", "node: node-a\ndiscovery: kubernetes\n"),
                "workloads = [...]: not allowed with discovery: kubernetes",
            ),
            (
                GOOD.replace("node: node-a\n", ""),
                "node = \"\": a node name is required (here or --node-name)",
            ),
            (
                "node: [".to_owned(),
                "node: invalid type: sequence, expected a string at line 1",
            ),
        ];
        for (text, want) in cases {
            let err = parse(&text)
                .err()
                .unwrap_or_else(|| panic!("accepted; wanted {want}"));
            assert!(
                err.contains(want),
                "error {err:?} does not contain {want:?}"
            );
        }
    }
}
