//! Istio policy objects compiled for the node's L4 path: which apply to a workload, and whether
//! they match a connection.
//!
//! Translation follows ztunnel's L4 semantics except where ztunnel would silently allow:
//! - a value Culvert cannot enforce at L4 (an HTTP field, a `when` key outside the five L4
//!   ones, a port or address that does not parse) makes, in an ALLOW policy, its rule match
//!   nothing (as ztunnel does for HTTP fields); in a DENY policy, it is dropped from the match
//!   that holds it, and a match or condition left with nothing matches every connection, so
//!   the rule denies more than asked, never less ([`L7Deny::Broaden`], the default). With
//!   [`L7Deny::Ignore`] such a match or condition matches nothing instead, as in ztunnel.
//! - every such narrowing or broadening is kept as a note, for the log and the admin API.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::istio::{
    Action, AuthorizationPolicySpec, Condition, MtlsMode, Object, PeerAuthenticationSpec,
    WorkloadSelector,
};
use crate::identity::Id;
use crate::state::{Labels, PeerAuthentication};

/// What a DENY rule holding something unenforceable at L4 does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum L7Deny {
    /// Enforce the rest of the rule, so it denies more than asked (the safe default).
    #[default]
    Broaden,
    /// Drop what cannot be enforced, as ztunnel does: an L7-only DENY denies nothing.
    Ignore,
}

/// How policies are read: Istio's root namespace and the L7 choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Where mesh-wide policies live (Istio's `istio-system` by default).
    pub root_namespace: String,
    pub l7_deny: L7Deny,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            root_namespace: "istio-system".into(),
            l7_deny: L7Deny::Broaden,
        }
    }
}

/// One inbound connection, as policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// The peer's verified identity; `None` for plaintext.
    pub peer: Option<&'a Id>,
    /// The TCP source: over HBONE the client pod's address, as the tunnel carries it.
    pub src: SocketAddr,
    /// The workload's address and port the connection is for.
    pub dst: SocketAddr,
}

/// Every policy the node holds, compiled.
#[derive(Debug, Default)]
pub struct Policies {
    root_namespace: String,
    /// Oldest first, so the first match at a level is the one that wins.
    peer: Vec<Peer>,
    authz: Vec<Arc<Authz>>,
}

#[derive(Debug)]
struct Peer {
    key: String,
    namespace: String,
    selector: Option<WorkloadSelector>,
    /// `None`: UNSET, inherit.
    mode: Option<PeerAuthentication>,
    ports: BTreeMap<u16, PeerAuthentication>,
    notes: Vec<String>,
}

/// An AuthorizationPolicy as the L4 path enforces it.
#[derive(Debug)]
pub struct Authz {
    /// `namespace/name`.
    pub key: Arc<str>,
    namespace: String,
    selector: Option<WorkloadSelector>,
    pub action: Action,
    /// Each rule's clauses, all of which must match; no rules: matches nothing.
    rules: Vec<Vec<Clause>>,
    /// Set when the policy is not enforced here at all (targetRefs, AUDIT, CUSTOM).
    pub ignored: Option<String>,
    /// What translation narrowed, broadened or dropped.
    pub notes: Vec<String>,
}

/// Any of its matches.
type Clause = Vec<Match>;

/// Every field set must match; within a field any value (or, for a `not_` field, none).
///
/// Serializes as ztunnel's config dump spells a match (fields left empty are left out, so a
/// match of everything is `{}`).
#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Match {
    /// Matches every connection (a DENY match left with nothing enforceable, broadened).
    #[serde(skip)]
    all: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    principals: Vec<StrMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    not_principals: Vec<StrMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    namespaces: Vec<StrMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    not_namespaces: Vec<StrMatch>,
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "service_accounts"
    )]
    service_accounts: Vec<(String, String)>,
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "service_accounts"
    )]
    not_service_accounts: Vec<(String, String)>,
    #[serde(rename = "sourceIps", skip_serializing_if = "Vec::is_empty")]
    src_ips: Vec<IpNet>,
    #[serde(rename = "notSourceIps", skip_serializing_if = "Vec::is_empty")]
    not_src_ips: Vec<IpNet>,
    #[serde(rename = "destinationIps", skip_serializing_if = "Vec::is_empty")]
    dst_ips: Vec<IpNet>,
    #[serde(rename = "notDestinationIps", skip_serializing_if = "Vec::is_empty")]
    not_dst_ips: Vec<IpNet>,
    #[serde(rename = "destinationPorts", skip_serializing_if = "Vec::is_empty")]
    ports: Vec<u16>,
    #[serde(rename = "notDestinationPorts", skip_serializing_if = "Vec::is_empty")]
    not_ports: Vec<u16>,
}

/// `(namespace, service account)` pairs as the config dump's objects.
fn service_accounts<S: serde::Serializer>(
    pairs: &[(String, String)],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct ServiceAccount<'a> {
        namespace: &'a str,
        service_account: &'a str,
    }
    serializer.collect_seq(pairs.iter().map(|(namespace, sa)| ServiceAccount {
        namespace,
        service_account: sa,
    }))
}

/// Istio's string match: `*` (any non-empty value), `prefix*`, `*suffix`, or exact. Serializes
/// as ztunnel's config dump spells one: `{"Exact": "…"}`, `{"Presence": {}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
enum StrMatch {
    #[serde(serialize_with = "presence")]
    Presence,
    Prefix(String),
    Suffix(String),
    Exact(String),
}

impl StrMatch {
    fn parse(value: &str) -> Self {
        if value == "*" {
            Self::Presence
        } else if let Some(suffix) = value.strip_prefix('*') {
            Self::Suffix(suffix.to_owned())
        } else if let Some(prefix) = value.strip_suffix('*') {
            Self::Prefix(prefix.to_owned())
        } else {
            Self::Exact(value.to_owned())
        }
    }

    /// A principal as policies write it: without `spiffe://`.
    fn principal(value: &str) -> Self {
        Self::parse(value.strip_prefix("spiffe://").unwrap_or(value))
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Presence => !value.is_empty(),
            Self::Prefix(p) => value.starts_with(p.as_str()),
            Self::Suffix(s) => value.ends_with(s.as_str()),
            Self::Exact(e) => value == e,
        }
    }
}

fn presence<S: serde::Serializer>(serializer: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap as _;
    serializer.serialize_map(Some(0))?.end()
}

/// An enforced AuthorizationPolicy as ztunnel's config dump spells it.
#[derive(Debug, Serialize)]
pub struct Dumped<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    /// `Global` (the root namespace, no selector), `Namespace` or `WorkloadSelector`.
    pub scope: &'static str,
    /// `Allow` or `Deny`.
    pub action: &'static str,
    /// Each rule's clauses, all of which must match, each any of its matches.
    rules: &'a [Vec<Clause>],
}

/// Why a connection was refused by an AuthorizationPolicy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// A DENY policy matched.
    Denied(Arc<str>),
    /// ALLOW policies select the workload and none matched.
    NotAllowed,
}

/// What translation could not enforce, said in words for the note.
struct Unenforceable(String);

impl Match {
    fn is_empty(&self) -> bool {
        !self.all
            && self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
            && self.src_ips.is_empty()
            && self.not_src_ips.is_empty()
            && self.dst_ips.is_empty()
            && self.not_dst_ips.is_empty()
            && self.ports.is_empty()
            && self.not_ports.is_empty()
    }

    fn matches(&self, conn: &Connection<'_>) -> bool {
        if self.all {
            return true;
        }
        if self.is_empty() {
            return false;
        }
        let principal = conn.peer.map_or("", |id| {
            id.as_str().strip_prefix("spiffe://").unwrap_or(id.as_str())
        });
        let namespace = conn.peer.map_or("", Id::namespace);
        let account = |(ns, sa): &(String, String)| {
            conn.peer
                .is_some_and(|id| id.namespace() == ns && id.service_account() == sa)
        };
        let ip = |nets: &[IpNet], ip: IpAddr| nets.iter().any(|n| n.contains(&ip));
        let any = |set: bool, hit: bool| !set || hit;
        any(
            !self.principals.is_empty(),
            conn.peer.is_some() && self.principals.iter().any(|m| m.matches(principal)),
        ) && !(conn.peer.is_some() && self.not_principals.iter().any(|m| m.matches(principal)))
            && any(
                !self.namespaces.is_empty(),
                self.namespaces.iter().any(|m| m.matches(namespace)),
            )
            && !self.not_namespaces.iter().any(|m| m.matches(namespace))
            && any(
                !self.service_accounts.is_empty(),
                self.service_accounts.iter().any(account),
            )
            && !self.not_service_accounts.iter().any(account)
            && any(!self.src_ips.is_empty(), ip(&self.src_ips, conn.src.ip()))
            && !ip(&self.not_src_ips, conn.src.ip())
            && any(!self.dst_ips.is_empty(), ip(&self.dst_ips, conn.dst.ip()))
            && !ip(&self.not_dst_ips, conn.dst.ip())
            && any(
                !self.ports.is_empty(),
                self.ports.contains(&conn.dst.port()),
            )
            && !self.not_ports.contains(&conn.dst.port())
    }
}

fn ports(values: &[String], field: &str) -> Result<Vec<u16>, Unenforceable> {
    values
        .iter()
        .map(|v| match v.parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(Unenforceable(format!("{field} {v:?} is not a port"))),
        })
        .collect()
}

fn nets(values: &[String], field: &str) -> Result<Vec<IpNet>, Unenforceable> {
    values
        .iter()
        .map(|v| {
            v.parse::<IpNet>()
                .or_else(|_| v.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| Unenforceable(format!("{field} {v:?} is not an address or CIDR")))
        })
        .collect()
}

fn accounts(
    values: &[String],
    namespace: &str,
    field: &str,
) -> Result<Vec<(String, String)>, Unenforceable> {
    values
        .iter()
        .map(|v| match v.split_once('/') {
            None if !v.is_empty() => Ok((namespace.to_owned(), v.clone())),
            Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
                Ok((ns.to_owned(), sa.to_owned()))
            }
            _ => Err(Unenforceable(format!(
                "{field} {v:?} is not a service account"
            ))),
        })
        .collect()
}

/// Builds one rule's clauses, or says why the rule cannot be enforced as written.
struct RuleBuilder<'a> {
    deny: bool,
    l7: L7Deny,
    namespace: &'a str,
    notes: Vec<String>,
    /// Something unenforceable in an ALLOW rule: the rule matches nothing.
    void: bool,
}

impl RuleBuilder<'_> {
    /// Records what happened to `what`, which cannot be enforced here.
    fn unenforceable(&mut self, what: Unenforceable) {
        let Unenforceable(what) = what;
        if !self.deny {
            self.void = true;
            self.notes
                .push(format!("{what}: ALLOW rule matches nothing at L4"));
        } else if self.l7 == L7Deny::Broaden {
            self.notes
                .push(format!("{what}: not enforceable at L4, DENY rule widened"));
        } else {
            self.notes.push(format!(
                "{what}: not enforceable at L4, dropped (as ztunnel)"
            ));
        }
    }

    /// The parsed values, or none (noted, and `lost` set) when one cannot be enforced.
    fn take<T>(&mut self, parsed: Result<Vec<T>, Unenforceable>, lost: &mut bool) -> Vec<T> {
        parsed.unwrap_or_else(|e| {
            *lost = true;
            self.unenforceable(e);
            Vec::new()
        })
    }

    /// A match whose every set field was unenforceable: all in a broadened DENY, else none.
    fn finish(&self, mut m: Match, lost_fields: bool) -> Match {
        if m.is_empty() && lost_fields && self.deny && self.l7 == L7Deny::Broaden {
            m.all = true;
        }
        m
    }

    fn source(&mut self, s: &super::istio::Source) -> Match {
        let mut m = Match::default();
        let mut lost = false;
        for (field, values) in [
            ("requestPrincipals", &s.request_principals),
            ("notRequestPrincipals", &s.not_request_principals),
            ("remoteIpBlocks", &s.remote_ip_blocks),
            ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
        ] {
            if !values.is_empty() {
                lost = true;
                self.unenforceable(Unenforceable(format!("source.{field} is HTTP-level")));
            }
        }
        // Culvert's peers all share the node's trust domain (the handshake checks it).
        for (field, values) in [
            ("trustDomains", &s.trust_domains),
            ("notTrustDomains", &s.not_trust_domains),
        ] {
            if !values.is_empty() {
                lost = true;
                self.unenforceable(Unenforceable(format!("source.{field} is not supported")));
            }
        }
        m.principals = s
            .principals
            .iter()
            .map(|p| StrMatch::principal(p))
            .collect();
        m.not_principals = s
            .not_principals
            .iter()
            .map(|p| StrMatch::principal(p))
            .collect();
        m.namespaces = s.namespaces.iter().map(|n| StrMatch::parse(n)).collect();
        m.not_namespaces = s
            .not_namespaces
            .iter()
            .map(|n| StrMatch::parse(n))
            .collect();
        let ns = self.namespace;
        m.service_accounts = self.take(
            accounts(&s.service_accounts, ns, "source.serviceAccounts"),
            &mut lost,
        );
        m.not_service_accounts = self.take(
            accounts(&s.not_service_accounts, ns, "source.notServiceAccounts"),
            &mut lost,
        );
        m.src_ips = self.take(nets(&s.ip_blocks, "source.ipBlocks"), &mut lost);
        m.not_src_ips = self.take(nets(&s.not_ip_blocks, "source.notIpBlocks"), &mut lost);
        self.finish(m, lost)
    }

    fn operation(&mut self, o: &super::istio::Operation) -> Match {
        let mut m = Match::default();
        let mut lost = false;
        for (field, values) in [
            ("hosts", &o.hosts),
            ("notHosts", &o.not_hosts),
            ("methods", &o.methods),
            ("notMethods", &o.not_methods),
            ("paths", &o.paths),
            ("notPaths", &o.not_paths),
        ] {
            if !values.is_empty() {
                lost = true;
                self.unenforceable(Unenforceable(format!("operation.{field} is HTTP-level")));
            }
        }
        m.ports = self.take(ports(&o.ports, "operation.ports"), &mut lost);
        m.not_ports = self.take(ports(&o.not_ports, "operation.notPorts"), &mut lost);
        self.finish(m, lost)
    }

    fn condition(&mut self, c: &Condition) -> Match {
        let mut m = Match::default();
        let key = c.key.as_str();
        let values = (&c.values, &c.not_values);
        let parsed = match key {
            "source.principal" => {
                m.principals = values.0.iter().map(|p| StrMatch::principal(p)).collect();
                m.not_principals = values.1.iter().map(|p| StrMatch::principal(p)).collect();
                Ok(())
            }
            "source.namespace" => {
                m.namespaces = values.0.iter().map(|n| StrMatch::parse(n)).collect();
                m.not_namespaces = values.1.iter().map(|n| StrMatch::parse(n)).collect();
                Ok(())
            }
            "source.ip" => nets(values.0, "when source.ip").and_then(|v| {
                m.src_ips = v;
                m.not_src_ips = nets(values.1, "when source.ip")?;
                Ok(())
            }),
            "destination.ip" => nets(values.0, "when destination.ip").and_then(|v| {
                m.dst_ips = v;
                m.not_dst_ips = nets(values.1, "when destination.ip")?;
                Ok(())
            }),
            "destination.port" => ports(values.0, "when destination.port").and_then(|v| {
                m.ports = v;
                m.not_ports = ports(values.1, "when destination.port")?;
                Ok(())
            }),
            _ => Err(Unenforceable(format!("when {key:?} is not an L4 key"))),
        };
        match parsed {
            Ok(()) => self.finish(m, false),
            Err(e) => {
                self.unenforceable(e);
                self.finish(Match::default(), true)
            }
        }
    }
}

impl Authz {
    fn compile(object: &Object<AuthorizationPolicySpec>, l7: L7Deny) -> Self {
        let spec = &object.spec;
        let mut policy = Self {
            key: object.key().into(),
            namespace: object.namespace.clone(),
            selector: spec.selector.clone(),
            action: spec.action,
            rules: Vec::new(),
            ignored: None,
            notes: Vec::new(),
        };
        policy.ignored = if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
            Some("targetRefs attach it to a waypoint or gateway, not to the node".into())
        } else if matches!(spec.action, Action::Audit | Action::Custom) {
            Some(format!("action {:?} is not supported at L4", spec.action).to_uppercase())
        } else {
            None
        };
        if policy.ignored.is_some() {
            return policy;
        }
        let deny = spec.action == Action::Deny;
        for (i, rule) in spec.rules.iter().enumerate() {
            let mut b = RuleBuilder {
                deny,
                l7,
                namespace: &object.namespace,
                notes: Vec::new(),
                void: false,
            };
            let mut clauses = Vec::new();
            if !rule.from.is_empty() {
                clauses.push(rule.from.iter().map(|f| b.source(&f.source)).collect());
            }
            if !rule.to.is_empty() {
                clauses.push(rule.to.iter().map(|t| b.operation(&t.operation)).collect());
            }
            for condition in &rule.when {
                clauses.push(vec![b.condition(condition)]);
            }
            policy
                .notes
                .extend(b.notes.into_iter().map(|n| format!("rules[{i}]: {n}")));
            if !b.void {
                policy.rules.push(clauses);
            }
        }
        policy
    }

    fn selects(&self, root: &str, namespace: &str, labels: &Labels) -> bool {
        self.ignored.is_none()
            && (self.namespace == root || self.namespace == namespace)
            && self.selector.as_ref().is_none_or(|s| s.matches(labels))
    }

    fn matches(&self, conn: &Connection<'_>) -> bool {
        self.rules.iter().any(|clauses| {
            clauses
                .iter()
                .all(|clause| clause.iter().any(|m| m.matches(conn)))
        })
    }
}

fn mode(m: MtlsMode) -> Option<PeerAuthentication> {
    match m {
        MtlsMode::Unset => None,
        // Ambient keeps mTLS between meshed pods whatever DISABLE says: it is PERMISSIVE.
        MtlsMode::Disable | MtlsMode::Permissive => Some(PeerAuthentication::Permissive),
        MtlsMode::Strict => Some(PeerAuthentication::Strict),
    }
}

impl Peer {
    fn compile(object: &Object<PeerAuthenticationSpec>) -> Self {
        let spec = &object.spec;
        let mut notes = Vec::new();
        let mut ports = BTreeMap::new();
        for (port, mtls) in &spec.port_level_mtls {
            match (port.parse::<u16>(), mode(mtls.mode)) {
                (Ok(p), Some(m)) if p > 0 => {
                    ports.insert(p, m);
                }
                (Ok(p), None) if p > 0 => {}
                _ => notes.push(format!("portLevelMtls {port:?} is not a port: ignored")),
            }
        }
        if !ports.is_empty() && spec.selector.is_none() {
            notes.push("portLevelMtls without a selector: ignored".into());
            ports.clear();
        }
        Self {
            key: object.key(),
            namespace: object.namespace.clone(),
            selector: spec.selector.clone(),
            mode: spec.mtls.and_then(|m| mode(m.mode)),
            ports,
            notes,
        }
    }
}

/// The PeerAuthentication in force for one workload, by level.
#[derive(Debug, Default, Clone, Copy)]
struct PeerLevels<'a> {
    workload: Option<&'a Peer>,
    namespace: Option<&'a Peer>,
    mesh: Option<&'a Peer>,
}

impl Policies {
    /// Compiles `peer` and `authz` objects. Never fails: what cannot be enforced is noted.
    pub fn build(
        settings: &Settings,
        mut peer: Vec<Object<PeerAuthenticationSpec>>,
        authz: Vec<Object<AuthorizationPolicySpec>>,
    ) -> Self {
        peer.sort_by_key(|p| (p.created, p.order, p.key()));
        let root = &settings.root_namespace;
        let mut peers: Vec<Peer> = peer.iter().map(Peer::compile).collect();
        for p in &mut peers {
            if &p.namespace == root && p.selector.is_some() {
                p.notes
                    .push("a selector in the root namespace: ignored, as in Istio".into());
            }
        }
        Self {
            root_namespace: root.clone(),
            peer: peers,
            authz: authz
                .iter()
                .map(|a| Arc::new(Authz::compile(a, settings.l7_deny)))
                .collect(),
        }
    }

    fn peer_levels(&self, namespace: &str, labels: &Labels) -> PeerLevels<'_> {
        let root = self.root_namespace.as_str();
        let mut levels = PeerLevels::default();
        for p in &self.peer {
            let slot = match (&p.selector, p.namespace.as_str()) {
                (None, ns) if ns == root => &mut levels.mesh,
                (None, ns) if ns == namespace => &mut levels.namespace,
                (Some(s), ns) if ns == namespace && ns != root && s.matches(labels) => {
                    &mut levels.workload
                }
                _ => continue,
            };
            slot.get_or_insert(p);
        }
        levels
    }

    /// The PeerAuthentication mode for `port` of a workload in `namespace` with `labels`:
    /// the workload's port level, then its workload, namespace and mesh levels, then `default`
    /// (the node file's).
    pub fn peer_mode(
        &self,
        namespace: &str,
        labels: &Labels,
        port: u16,
        default: PeerAuthentication,
    ) -> PeerAuthentication {
        let levels = self.peer_levels(namespace, labels);
        levels
            .workload
            .and_then(|p| p.ports.get(&port).copied())
            .or_else(|| levels.workload.and_then(|p| p.mode))
            .or_else(|| levels.namespace.and_then(|p| p.mode))
            .or_else(|| levels.mesh.and_then(|p| p.mode))
            .unwrap_or(default)
    }

    /// The AuthorizationPolicies that select a workload.
    pub fn selecting<'a>(
        &'a self,
        namespace: &'a str,
        labels: &'a Labels,
    ) -> impl Iterator<Item = &'a Arc<Authz>> + 'a {
        self.authz
            .iter()
            .filter(move |a| a.selects(&self.root_namespace, namespace, labels))
    }

    /// AuthorizationPolicy's verdict on `conn` to a workload in `namespace` with `labels`:
    /// any matching DENY refuses; with no ALLOW selecting the workload, allow; otherwise an
    /// ALLOW must match.
    pub fn authorize(&self, namespace: &str, labels: &Labels, conn: &Connection<'_>) -> Verdict {
        let mut any_allow = false;
        let mut allowed = false;
        for policy in self.selecting(namespace, labels) {
            match policy.action {
                Action::Deny if policy.matches(conn) => {
                    return Verdict::Denied(policy.key.clone());
                }
                Action::Allow => {
                    any_allow = true;
                    allowed = allowed || policy.matches(conn);
                }
                _ => {}
            }
        }
        if !any_allow || allowed {
            Verdict::Allow
        } else {
            Verdict::NotAllowed
        }
    }

    /// Every compiled policy, for the admin API.
    pub fn authorization_policies(&self) -> &[Arc<Authz>] {
        &self.authz
    }

    /// What is not enforced as written, each with its policy's `namespace/name`.
    pub fn notes(&self) -> impl Iterator<Item = (&str, &str)> {
        let peer = self
            .peer
            .iter()
            .flat_map(|p| p.notes.iter().map(move |n| (p.key.as_str(), n.as_str())));
        let authz = self.authz.iter().flat_map(|a| {
            a.ignored
                .iter()
                .chain(&a.notes)
                .map(move |n| (&*a.key, n.as_str()))
        });
        peer.chain(authz)
    }

    /// The AuthorizationPolicies this node enforces, as the config dump lists them, oldest
    /// first.
    pub fn dump(&self) -> Vec<Dumped<'_>> {
        self.authz
            .iter()
            .filter(|a| a.ignored.is_none())
            .map(|a| Dumped {
                name: a.key.split_once('/').map_or(&*a.key, |(_, name)| name),
                namespace: &a.namespace,
                scope: match (&a.selector, a.namespace == self.root_namespace) {
                    (Some(_), _) => "WorkloadSelector",
                    (None, true) => "Global",
                    (None, false) => "Namespace",
                },
                action: match a.action {
                    Action::Deny => "Deny",
                    _ => "Allow",
                },
                rules: &a.rules,
            })
            .collect()
    }

    /// The admin API's `/policies`: every policy, the workloads among `workloads` (a node's
    /// wired pods) it selects, and what it does not enforce as written.
    pub fn describe<'a>(
        &self,
        workloads: impl Iterator<Item = &'a crate::state::Workload>,
    ) -> serde_json::Value {
        let enrolled: Vec<&crate::state::Workload> = workloads.collect();
        let name = |w: &crate::state::Workload| format!("{}/{}", w.namespace, w.name);
        let authz: Vec<serde_json::Value> = self
            .authz
            .iter()
            .map(|a| {
                let selects: Vec<String> = enrolled
                    .iter()
                    .filter(|w| a.selects(&self.root_namespace, &w.namespace, &w.labels))
                    .map(|w| name(w))
                    .collect();
                serde_json::json!({
                    "name": a.key, "action": a.action, "selects": selects,
                    "ignored": a.ignored, "notes": a.notes,
                })
            })
            .collect();
        let peer: Vec<serde_json::Value> = self
            .peer
            .iter()
            .map(|p| serde_json::json!({ "name": p.key, "notes": p.notes }))
            .collect();
        serde_json::json!({
            "rootNamespace": self.root_namespace,
            "authorizationPolicies": authz,
            "peerAuthentications": peer,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::istio::{Resource, split};
    use super::*;

    const SHOP: &str = "shop";

    fn labels() -> Labels {
        [("app", "cart")].into_iter().collect()
    }

    fn policies(yaml: &str, l7_deny: L7Deny) -> Policies {
        let yaml = if yaml.trim().is_empty() { "[]" } else { yaml };
        let resources: Vec<Resource> = serde_yaml::from_str(yaml).unwrap();
        let objects = split(resources).unwrap();
        let settings = Settings {
            l7_deny,
            ..Settings::default()
        };
        Policies::build(&settings, objects.peer, objects.authz)
    }

    /// A connection to the cart pod (10.0.0.5) on `port` from `peer` at `src`.
    fn conn<'a>(peer: Option<&'a Id>, src: &str, port: u16) -> Connection<'a> {
        Connection {
            peer,
            src: SocketAddr::new(src.parse().unwrap(), 40000),
            dst: SocketAddr::new("10.0.0.5".parse().unwrap(), port),
        }
    }

    fn allow(name: &str, rules: &str) -> String {
        policy(name, "ALLOW", rules)
    }

    fn deny(name: &str, rules: &str) -> String {
        policy(name, "DENY", rules)
    }

    fn policy(name: &str, action: &str, rules: &str) -> String {
        format!(
            "- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {{ name: {name}, namespace: shop }}
  spec:
    action: {action}
    rules: {rules}
"
        )
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Want {
        Allow,
        Denied,
        NotAllowed,
    }

    fn verdict(v: &Verdict) -> Want {
        match v {
            Verdict::Allow => Want::Allow,
            Verdict::Denied(_) => Want::Denied,
            Verdict::NotAllowed => Want::NotAllowed,
        }
    }

    #[test]
    fn the_dump_spells_matches_as_ztunnel_and_leaves_out_what_is_not_enforced() {
        let yaml = [
            deny(
                "d",
                "[{ from: [{ source: { principals: ['*', 'cluster.local/*', '*/sa/web'], \
                 notNamespaces: [ops] } }], to: [{ operation: { notPorts: ['22'] } }] }]",
            ),
            allow("everyone", "[{}]"),
            policy("audited", "AUDIT", "[{}]"),
        ]
        .concat();
        let p = policies(&yaml, L7Deny::Broaden);
        let dumped = serde_json::to_value(p.dump()).unwrap();
        assert_eq!(
            dumped,
            serde_json::json!([
                { "name": "d", "namespace": "shop", "scope": "Namespace", "action": "Deny",
                  "rules": [[
                      [{ "principals": [{ "Presence": {} }, { "Prefix": "cluster.local/" },
                                        { "Suffix": "/sa/web" }],
                         "notNamespaces": [{ "Exact": "ops" }] }],
                      [{ "notDestinationPorts": [22] }],
                  ]] },
                { "name": "everyone", "namespace": "shop", "scope": "Namespace",
                  "action": "Allow", "rules": [[]] },
            ])
        );
    }

    #[test]
    fn authorization_policy_cases() {
        use Want::{Allow, Denied, NotAllowed};
        let web: Id = "spiffe://cluster.local/ns/front/sa/web".parse().unwrap();
        let admin: Id = "spiffe://cluster.local/ns/ops/sa/admin".parse().unwrap();
        let local: Id = "spiffe://cluster.local/ns/shop/sa/checkout"
            .parse()
            .unwrap();
        let from_web = |port| conn(Some(&web), "10.1.0.7", port);
        let from_admin = |port| conn(Some(&admin), "10.2.0.9", port);
        let from_local = |port| conn(Some(&local), "10.0.0.8", port);
        let plaintext = |port| conn(None, "192.168.1.1", port);
        let principals = |p: &str| format!("[{{ from: [{{ source: {{ principals: [{p}] }} }}] }}]");

        let cases: Vec<(&str, String, Connection<'_>, Want)> = vec![
            ("no policy allows", String::new(), from_web(80), Allow),
            (
                "an ALLOW with no rules matches nothing",
                allow("a", "[]"),
                from_web(80),
                NotAllowed,
            ),
            (
                "rules: [{}] matches everything",
                allow("a", "[{}]"),
                plaintext(80),
                Allow,
            ),
            (
                "a DENY with rules: [{}] denies everything",
                deny("d", "[{}]"),
                from_web(80),
                Denied,
            ),
            (
                "a DENY with no rules denies nothing",
                deny("d", "[]"),
                from_web(80),
                Allow,
            ),
            (
                "exact principal",
                allow("a", &principals("cluster.local/ns/front/sa/web")),
                from_web(80),
                Allow,
            ),
            (
                "exact principal, another peer",
                allow("a", &principals("cluster.local/ns/front/sa/web")),
                from_admin(80),
                NotAllowed,
            ),
            (
                "principal *: any identity",
                allow("a", &principals("'*'")),
                from_admin(80),
                Allow,
            ),
            (
                "principal *: plaintext has none",
                allow("a", &principals("'*'")),
                plaintext(80),
                NotAllowed,
            ),
            (
                "principal prefix",
                allow("a", &principals("'cluster.local/ns/front/*'")),
                from_web(80),
                Allow,
            ),
            (
                "principal suffix",
                allow("a", &principals("'*/sa/admin'")),
                from_admin(80),
                Allow,
            ),
            (
                "principal suffix, no match",
                allow("a", &principals("'*/sa/admin'")),
                from_web(80),
                NotAllowed,
            ),
            (
                "notPrincipals: plaintext matches (it has no principal to exclude)",
                deny("d", "[{ from: [{ source: { notPrincipals: ['*'] } }] }]"),
                plaintext(80),
                Denied,
            ),
            (
                "notPrincipals: an identity is excluded",
                deny("d", "[{ from: [{ source: { notPrincipals: ['*'] } }] }]"),
                from_web(80),
                Allow,
            ),
            (
                "namespaces",
                allow("a", "[{ from: [{ source: { namespaces: [front] } }] }]"),
                from_web(80),
                Allow,
            ),
            (
                "namespaces: plaintext has none",
                allow("a", "[{ from: [{ source: { namespaces: ['*'] } }] }]"),
                plaintext(80),
                NotAllowed,
            ),
            (
                "notNamespaces",
                allow("a", "[{ from: [{ source: { notNamespaces: [front] } }] }]"),
                from_web(80),
                NotAllowed,
            ),
            (
                "serviceAccounts ns/sa",
                allow(
                    "a",
                    "[{ from: [{ source: { serviceAccounts: [ops/admin] } }] }]",
                ),
                from_admin(80),
                Allow,
            ),
            (
                "serviceAccounts short form is the policy's namespace",
                allow(
                    "a",
                    "[{ from: [{ source: { serviceAccounts: [checkout] } }] }]",
                ),
                from_local(80),
                Allow,
            ),
            (
                "serviceAccounts short form does not match another namespace",
                allow(
                    "a",
                    "[{ from: [{ source: { serviceAccounts: [admin] } }] }]",
                ),
                from_admin(80),
                NotAllowed,
            ),
            (
                "notServiceAccounts",
                deny(
                    "d",
                    "[{ from: [{ source: { notServiceAccounts: [ops/admin] } }] }]",
                ),
                from_admin(80),
                Allow,
            ),
            (
                "ipBlocks CIDR",
                allow("a", "[{ from: [{ source: { ipBlocks: [10.1.0.0/16] } }] }]"),
                from_web(80),
                Allow,
            ),
            (
                "ipBlocks single address",
                allow("a", "[{ from: [{ source: { ipBlocks: [10.2.0.9] } }] }]"),
                from_admin(80),
                Allow,
            ),
            (
                "notIpBlocks",
                deny(
                    "d",
                    "[{ from: [{ source: { notIpBlocks: [10.0.0.0/8] } }] }]",
                ),
                plaintext(80),
                Denied,
            ),
            (
                "ports",
                allow("a", "[{ to: [{ operation: { ports: ['8080'] } }] }]"),
                from_web(8080),
                Allow,
            ),
            (
                "ports, another port",
                allow("a", "[{ to: [{ operation: { ports: ['8080'] } }] }]"),
                from_web(80),
                NotAllowed,
            ),
            (
                "notPorts",
                deny("d", "[{ to: [{ operation: { notPorts: ['8080'] } }] }]"),
                from_web(80),
                Denied,
            ),
            (
                "values OR, fields AND",
                allow(
                    "a",
                    "[{ from: [{ source: { namespaces: [front, ops], ipBlocks: [10.2.0.0/16] } }] }]",
                ),
                from_web(80),
                NotAllowed,
            ),
            (
                "matches OR within from",
                allow(
                    "a",
                    "[{ from: [{ source: { namespaces: [front] } }, { source: { namespaces: [ops] } }] }]",
                ),
                from_admin(80),
                Allow,
            ),
            (
                "clauses AND: from and to",
                allow(
                    "a",
                    "[{ from: [{ source: { namespaces: [front] } }], to: [{ operation: { ports: ['80'] } }] }]",
                ),
                from_web(8080),
                NotAllowed,
            ),
            (
                "rules OR",
                allow(
                    "a",
                    "[{ from: [{ source: { namespaces: [ops] } }] }, { to: [{ operation: { ports: ['80'] } }] }]",
                ),
                from_web(80),
                Allow,
            ),
            (
                "when source.principal",
                allow(
                    "a",
                    "[{ when: [{ key: source.principal, values: ['cluster.local/ns/ops/sa/admin'] }] }]",
                ),
                from_admin(80),
                Allow,
            ),
            (
                "when source.namespace notValues",
                allow(
                    "a",
                    "[{ when: [{ key: source.namespace, notValues: [ops] }] }]",
                ),
                from_admin(80),
                NotAllowed,
            ),
            (
                "when source.ip",
                allow(
                    "a",
                    "[{ when: [{ key: source.ip, values: [192.168.0.0/16] }] }]",
                ),
                plaintext(80),
                Allow,
            ),
            (
                "when destination.ip",
                allow(
                    "a",
                    "[{ when: [{ key: destination.ip, values: [10.0.0.5] }] }]",
                ),
                from_web(80),
                Allow,
            ),
            (
                "when destination.port",
                deny(
                    "d",
                    "[{ when: [{ key: destination.port, values: ['22'] }] }]",
                ),
                from_web(22),
                Denied,
            ),
            (
                "ALLOW: an HTTP field makes the rule match nothing",
                allow("a", "[{ to: [{ operation: { methods: [GET] } }] }]"),
                from_web(80),
                NotAllowed,
            ),
            (
                "ALLOW: a sibling L4 rule still works",
                allow(
                    "a",
                    "[{ to: [{ operation: { methods: [GET] } }] }, { from: [{ source: { namespaces: [front] } }] }]",
                ),
                from_web(80),
                Allow,
            ),
            (
                "ALLOW: a when key outside L4 makes the rule match nothing",
                allow(
                    "a",
                    "[{ when: [{ key: connection.sni, values: [a.example] }] }]",
                ),
                from_web(80),
                NotAllowed,
            ),
            (
                "DENY: L4 part of an L4+L7 rule enforced (wider)",
                deny(
                    "d",
                    "[{ from: [{ source: { namespaces: [front] } }], to: [{ operation: { paths: [/admin] } }] }]",
                ),
                from_web(80),
                Denied,
            ),
            (
                "DENY: L4 part of an L4+L7 rule, another namespace is untouched",
                deny(
                    "d",
                    "[{ from: [{ source: { namespaces: [front] } }], to: [{ operation: { paths: [/admin] } }] }]",
                ),
                from_admin(80),
                Allow,
            ),
            (
                "DENY: L7 only denies the whole workload (safe default)",
                deny("d", "[{ to: [{ operation: { methods: [POST] } }] }]"),
                from_web(80),
                Denied,
            ),
            (
                "DENY: requestPrincipals only denies the whole workload",
                deny(
                    "d",
                    "[{ from: [{ source: { requestPrincipals: ['*'] } }] }]",
                ),
                from_web(80),
                Denied,
            ),
            (
                "DENY: garbage port widens",
                deny("d", "[{ to: [{ operation: { ports: [http] } }] }]"),
                from_web(80),
                Denied,
            ),
            (
                "ALLOW: garbage port matches nothing",
                allow("a", "[{ to: [{ operation: { ports: ['99999'] } }] }]"),
                from_web(80),
                NotAllowed,
            ),
            (
                "ALLOW: a bad CIDR matches nothing",
                allow("a", "[{ from: [{ source: { ipBlocks: [10.0.0.0/99] } }] }]"),
                from_web(80),
                NotAllowed,
            ),
            (
                "DENY beats ALLOW",
                format!("{}{}", allow("a", "[{}]"), deny("d", &principals("'*'"))),
                from_web(80),
                Denied,
            ),
            (
                "an empty source never matches",
                allow("a", "[{ from: [{ source: {} }] }]"),
                from_web(80),
                NotAllowed,
            ),
        ];
        for (name, yaml, c, want) in &cases {
            let set = policies(yaml, L7Deny::Broaden);
            let got = verdict(&set.authorize(SHOP, &labels(), c));
            assert_eq!(got, *want, "{name}\n{yaml}");
        }
    }

    #[test]
    fn l7_only_deny_follows_ztunnel_when_asked() {
        let web: Id = "spiffe://cluster.local/ns/front/sa/web".parse().unwrap();
        let c = conn(Some(&web), "10.1.0.7", 80);
        let yaml = deny("d", "[{ to: [{ operation: { methods: [POST] } }] }]");
        let broaden = policies(&yaml, L7Deny::Broaden);
        let ignore = policies(&yaml, L7Deny::Ignore);
        assert_eq!(
            verdict(&broaden.authorize(SHOP, &labels(), &c)),
            Want::Denied
        );
        assert_eq!(verdict(&ignore.authorize(SHOP, &labels(), &c)), Want::Allow);
        // Both say what they did with the HTTP field.
        let note = |p: &Policies| p.authorization_policies()[0].notes.join("; ");
        assert!(
            note(&broaden).contains("operation.methods is HTTP-level"),
            "{}",
            note(&broaden)
        );
        assert!(note(&broaden).contains("widened"));
        assert!(note(&ignore).contains("as ztunnel"));
    }

    #[test]
    fn selection_by_namespace_root_selector_and_ignored_kinds() {
        let yaml = "
- apiVersion: security.istio.io/v1beta1
  kind: AuthorizationPolicy
  metadata: { name: mesh-wide, namespace: istio-system }
  spec: { action: DENY, rules: [{}] , selector: { matchLabels: { app: cart } } }
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: { name: other-ns, namespace: front }
  spec: { action: DENY, rules: [{}] }
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: { name: other-app, namespace: shop }
  spec: { action: DENY, rules: [{}], selector: { matchLabels: { app: web } } }
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: { name: waypoint, namespace: shop }
  spec: { action: DENY, rules: [{}], targetRefs: [{ kind: Service, name: cart }] }
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: { name: audit, namespace: shop }
  spec: { action: AUDIT, rules: [{}] }
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: { name: custom, namespace: shop }
  spec: { action: CUSTOM, provider: { name: ext }, rules: [{}] }
";
        let set = policies(yaml, L7Deny::Broaden);
        let cart = labels();
        let selected: Vec<&str> = set.selecting(SHOP, &cart).map(|p| &*p.key).collect();
        // A root-namespace selector applies mesh-wide; the rest are elsewhere or ignored.
        assert_eq!(selected, ["istio-system/mesh-wide"]);
        let ignored: Vec<(&str, &str)> = set
            .authorization_policies()
            .iter()
            .filter_map(|p| Some((&*p.key, p.ignored.as_deref()?)))
            .collect();
        assert_eq!(ignored.len(), 3, "{ignored:?}");
        assert!(ignored[0].1.contains("targetRefs"));
        assert!(ignored[1].1.contains("AUDIT"));
        assert!(ignored[2].1.contains("CUSTOM"));
    }

    fn peer(name: &str, namespace: &str, spec: &str) -> String {
        format!(
            "- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata: {{ name: {name}, namespace: {namespace} }}
  spec: {spec}
"
        )
    }

    #[test]
    fn peer_authentication_levels() {
        use PeerAuthentication::{Permissive, Strict};
        let mesh_strict = peer("default", "istio-system", "{ mtls: { mode: STRICT } }");
        let ns_permissive = peer("ns", "shop", "{ mtls: { mode: PERMISSIVE } }");
        let ns_disable = peer("ns", "shop", "{ mtls: { mode: DISABLE } }");
        let ns_unset = peer("ns", "shop", "{ mtls: { mode: UNSET } }");
        let cart_strict = peer(
            "cart",
            "shop",
            "{ selector: { matchLabels: { app: cart } }, mtls: { mode: STRICT } }",
        );
        let cart_ports = peer(
            "cart-ports",
            "shop",
            "{ selector: { matchLabels: { app: cart } }, portLevelMtls: { '9000': { mode: STRICT }, '9001': { mode: DISABLE } } }",
        );
        let root_selector = peer(
            "root-sel",
            "istio-system",
            "{ selector: { matchLabels: { app: cart } }, mtls: { mode: STRICT } }",
        );
        let no_selector_ports = peer(
            "ports-no-sel",
            "shop",
            "{ portLevelMtls: { '9000': { mode: STRICT } } }",
        );
        let cases: Vec<(&str, String, u16, PeerAuthentication, PeerAuthentication)> = vec![
            (
                "nothing: the node's default",
                String::new(),
                80,
                Permissive,
                Permissive,
            ),
            (
                "nothing: the node's default (strict)",
                String::new(),
                80,
                Strict,
                Strict,
            ),
            (
                "mesh-wide strict",
                mesh_strict.clone(),
                80,
                Permissive,
                Strict,
            ),
            (
                "namespace over mesh",
                mesh_strict.clone() + &ns_permissive,
                80,
                Permissive,
                Permissive,
            ),
            (
                "DISABLE is PERMISSIVE",
                mesh_strict.clone() + &ns_disable,
                80,
                Strict,
                Permissive,
            ),
            (
                "UNSET inherits",
                mesh_strict.clone() + &ns_unset,
                80,
                Permissive,
                Strict,
            ),
            (
                "workload over namespace",
                ns_permissive.clone() + &cart_strict,
                80,
                Permissive,
                Strict,
            ),
            (
                "port level strict on its port",
                cart_ports.clone(),
                9000,
                Permissive,
                Strict,
            ),
            (
                "port level only on its port",
                cart_ports.clone(),
                80,
                Permissive,
                Permissive,
            ),
            (
                "port level DISABLE under strict",
                mesh_strict + &cart_ports,
                9001,
                Permissive,
                Permissive,
            ),
            (
                "a root-namespace selector is ignored",
                root_selector,
                80,
                Permissive,
                Permissive,
            ),
            (
                "portLevelMtls without a selector is ignored",
                no_selector_ports,
                9000,
                Permissive,
                Permissive,
            ),
        ];
        for (name, yaml, port, default, want) in cases {
            let set = policies(&yaml, L7Deny::Broaden);
            assert_eq!(
                set.peer_mode(SHOP, &labels(), port, default),
                want,
                "{name}\n{yaml}"
            );
        }
    }

    #[test]
    fn the_oldest_peer_authentication_wins_at_one_level() {
        use PeerAuthentication::{Permissive, Strict};
        let older = "
- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata: { name: b-strict, namespace: shop }
  spec: { mtls: { mode: STRICT } }
- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata: { name: a-permissive, namespace: shop }
  spec: { mtls: { mode: PERMISSIVE } }
";
        // In a node file, the first listed is the oldest.
        let set = policies(older, L7Deny::Broaden);
        assert_eq!(set.peer_mode(SHOP, &labels(), 80, Permissive), Strict);
        // From the API, creation time decides, whatever the order.
        let resources: Vec<Resource> = serde_yaml::from_str(older).unwrap();
        let mut objects = split(resources).unwrap();
        objects.peer[0].created = 2_000;
        objects.peer[1].created = 1_000;
        let set = Policies::build(&Settings::default(), objects.peer, objects.authz);
        assert_eq!(set.peer_mode(SHOP, &labels(), 80, Strict), Permissive);
    }

    #[test]
    fn a_foreign_api_version_is_refused_with_its_position() {
        let yaml = "
- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata: { name: ok, namespace: shop }
  spec: {}
- apiVersion: security.istio.io/v2
  kind: AuthorizationPolicy
  metadata: { name: bad, namespace: shop }
  spec: {}
";
        let resources: Vec<Resource> = serde_yaml::from_str(yaml).unwrap();
        let err = split(resources).unwrap_err().to_string();
        assert!(
            err.starts_with("policies[1].apiVersion = security.istio.io/v2"),
            "{err}"
        );
    }
}
