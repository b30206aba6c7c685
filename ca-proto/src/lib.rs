//! Istio's certificate service (`istio.v1.auth.IstioCertificateService`), generated from
//! `proto/istio/v1/auth/ca.proto`, and the request metadata both ends agree on.
//!
//! Feature `client` builds the client half (node daemons), `server` the server half
//! (`culvert ca`); the node daemon never links the server.

#[allow(unreachable_pub, clippy::all, unused_qualifications)]
mod generated {
    tonic::include_proto!("istio.v1.auth");
}

pub use generated::*;
pub use prost_types::{Struct, Value, value::Kind};

/// The request metadata key a node agent names the identity it asks for under.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// The gRPC metadata (header) carrying the caller's cluster id.
pub const CLUSTER_ID_HEADER: &str = "clusterid";

/// The cluster id Istio's agents send by default.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// The token audience Istio's CA checks by default.
pub const DEFAULT_AUDIENCE: &str = "istio-ca";

/// The key Istio's root ConfigMaps (`istio-ca-root-cert`) and culvert ca's keep the PEM trust
/// bundle under.
pub const ROOT_CERT_KEY: &str = "root-cert.pem";

/// Port Istio's CA API is served on.
pub const DEFAULT_PORT: u16 = 15012;

/// `{"ImpersonatedIdentity": id}`, as a request's metadata.
pub fn impersonating(id: &str) -> Struct {
    let value = Value {
        kind: Some(Kind::StringValue(id.to_owned())),
    };
    Struct {
        fields: [(IMPERSONATED_IDENTITY.to_owned(), value)].into(),
    }
}

/// A metadata field that is present but not a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotAString;

/// The string under `key` in a request's metadata.
pub fn string_field<'a>(
    metadata: Option<&'a Struct>,
    key: &str,
) -> Result<Option<&'a str>, NotAString> {
    match metadata.and_then(|m| m.fields.get(key)) {
        None => Ok(None),
        Some(Value {
            kind: Some(Kind::StringValue(s)),
        }) => Ok(Some(s)),
        Some(_) => Err(NotAString),
    }
}
