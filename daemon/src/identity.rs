//! Workload identity: SPIFFE ids, the certificates that prove them, and where those come from.
//!
//! Owns the [`Id`] type, the [`Source`] trait for certificate authorities, and the per-node
//! [`Cache`] that keeps one certificate per local identity fresh. Knows nothing of TLS sessions
//! or pods: [`crate::tls`] turns cached certificates into rustls configs.

mod bundle;
mod ca;
mod cache;
mod istio;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Serialize, Serializer};

pub use bundle::{Bundle, Roots, follow as follow_bundle, load as load_bundle};
pub use ca::{LocalCa, leaf_params, write_root};
pub use cache::{Cache, Held, LastRequest};
pub use istio::IstioCa;

/// A SPIFFE identity of the form `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
///
/// Cheap to clone: the text is shared. Small (24 bytes): every pod's workload holds one.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id {
    uri: Arc<str>,
    /// Byte offsets of the three parts within `uri` (at most [`MAX_ID_LEN`]).
    td_end: u16,
    ns: (u16, u16),
    sa_start: u16,
}

/// The longest SPIFFE id there is, in bytes (the SPIFFE ID specification's limit).
pub const MAX_ID_LEN: usize = 2048;

/// Why a string is not a SPIFFE identity we accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{0:?} does not start with spiffe://")]
    Scheme(String),
    #[error("a SPIFFE id is at most {MAX_ID_LEN} bytes; this one has {0}")]
    TooLong(usize),
    #[error("{0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    Shape(String),
    #[error("{part} {value:?} in {uri:?} has characters outside [a-z0-9.-_]")]
    Chars {
        uri: String,
        part: &'static str,
        value: String,
    },
}

impl Id {
    /// Whether another copy of this identity is alive (an [`crate::state::Interner`] asks).
    pub fn is_shared(&self) -> bool {
        Arc::strong_count(&self.uri) > 1
    }

    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, ParseError> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    pub fn trust_domain(&self) -> &str {
        &self.uri["spiffe://".len()..usize::from(self.td_end)]
    }

    pub fn namespace(&self) -> &str {
        &self.uri[usize::from(self.ns.0)..usize::from(self.ns.1)]
    }

    pub fn service_account(&self) -> &str {
        &self.uri[usize::from(self.sa_start)..]
    }

    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

impl FromStr for Id {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_ID_LEN {
            return Err(ParseError::TooLong(s.len()));
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| ParseError::Scheme(s.to_owned()))?;
        let shape = || ParseError::Shape(s.to_owned());
        let mut parts = rest.split('/');
        let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(shape());
        };
        for (part, value) in [
            ("trust domain", td),
            ("namespace", ns),
            ("service account", sa),
        ] {
            if value.is_empty() {
                return Err(shape());
            }
            // Kubernetes names are lowercase DNS labels/subdomains; SPIFFE trust domains allow
            // the same set plus '_'. Anything else (upper case, '%', '@') is refused rather than
            // normalised, so two spellings never name one identity.
            let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c);
            if !value.chars().all(ok) {
                return Err(ParseError::Chars {
                    uri: s.to_owned(),
                    part,
                    value: value.to_owned(),
                });
            }
        }
        let offset = |n: usize| u16::try_from(n).map_err(|_| ParseError::TooLong(s.len()));
        let td_end = "spiffe://".len() + td.len();
        let ns_start = td_end + "/ns/".len();
        let ns_end = ns_start + ns.len();
        Ok(Self {
            uri: s.into(),
            td_end: offset(td_end)?,
            ns: (offset(ns_start)?, offset(ns_end)?),
            sa_start: offset(ns_end + "/sa/".len())?,
        })
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Id({})", self.uri)
    }
}

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.uri)
    }
}

/// How to reach an Istio CA API endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port` (an `https://` prefix is accepted).
    pub address: String,
    /// The name the CA's certificate must carry; the address's host by default.
    pub server_name: String,
    /// The mesh trust bundle, which also verifies the CA.
    pub roots: BundleSource,
    /// A projected service-account token, re-read for every request.
    pub token_file: PathBuf,
    pub cluster_id: String,
}

/// Where the mesh trust bundle is read, and watched, from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleSource {
    /// A PEM file (a mounted ConfigMap, say), re-read when it changes.
    File(PathBuf),
    /// A ConfigMap read through the API: `key` in `namespace/name`.
    ConfigMap {
        namespace: String,
        name: String,
        key: String,
    },
}

/// A certificate for one identity, as a certificate authority issued it.
pub struct Issued {
    /// Leaf first, then any intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// Roots the leaf chains to: the mesh trust bundle (several during a root rotation).
    pub roots: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Why a certificate could not be obtained.
///
/// `Clone` because one failed fetch answers every task waiting for that identity.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("signing a certificate for {id}")]
    Sign {
        id: Id,
        #[source]
        source: Arc<rcgen::Error>,
    },
    #[error("loading the CA from {path}")]
    LoadCa {
        path: String,
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    #[error("certificate issued for {id} is unusable")]
    Unusable {
        id: Id,
        #[source]
        source: Arc<rustls::Error>,
    },
    #[error("asking the CA at {ca} for {id}")]
    Ca {
        ca: String,
        id: Id,
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    #[error("the CA at {ca} answered for {id} with an unusable chain: {reason}")]
    BadChain { ca: String, id: Id, reason: String },
}

/// The future a [`Source`] returns.
pub type IssueFuture<'a> = Pin<Box<dyn Future<Output = Result<Issued, Error>> + Send + 'a>>;

/// What [`Source::reach`] found: what answered, or why nothing did.
pub type ReachFuture<'a> = Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>>;

/// A certificate authority that can issue a certificate for an identity.
///
/// The node generates the key pair and the authority signs it; keys never leave the node.
pub trait Source: Send + Sync + 'static {
    fn issue<'a>(&'a self, id: &'a Id) -> IssueFuture<'a>;

    /// Whether the authority answers now, without asking it for anything (`culvert check`).
    /// One in this process always does.
    fn reach(&self) -> ReachFuture<'_> {
        Box::pin(std::future::ready(Ok(
            "certificates are signed in this daemon, with its own CA key".to_owned(),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_exposes_parts() {
        let id: Id = "spiffe://cluster.local/ns/demo/sa/client-1"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "demo");
        assert_eq!(id.service_account(), "client-1");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/demo/sa/client-1");
        assert_eq!(Id::new("cluster.local", "demo", "client-1").unwrap(), id);
    }

    #[test]
    fn rejects_everything_that_is_not_exactly_one_shape() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://cluster.local/ns/a/sa/B",
            "spiffe://cluster.local/ns/a%2f/sa/b",
            "spiffe://cluster.local/ns/a/sa/b?x",
            "",
        ] {
            assert!(bad.parse::<Id>().is_err(), "{bad} was accepted");
        }
        let longest = format!("spiffe://{}/ns/a/sa/b", "t".repeat(MAX_ID_LEN - 19));
        assert_eq!(longest.len(), MAX_ID_LEN);
        assert_eq!(longest.parse::<Id>().unwrap().service_account(), "b");
        let over = format!("spiffe://{}/ns/a/sa/b", "t".repeat(MAX_ID_LEN - 18));
        assert_eq!(over.parse::<Id>(), Err(ParseError::TooLong(MAX_ID_LEN + 1)));
    }

    #[test]
    fn error_names_the_offending_part() {
        let err = "spiffe://cluster.local/ns/Demo/sa/b"
            .parse::<Id>()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"namespace "Demo" in "spiffe://cluster.local/ns/Demo/sa/b" has characters outside [a-z0-9.-_]"#
        );
    }
}
