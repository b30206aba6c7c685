//! A certificate authority reached over Istio's CA API (`IstioCertificateService`): culvert ca,
//! istiod or cert-manager's istio-csr, with the same code.
//!
//! The key pair is generated here and never leaves the process; the CA sees a CSR. The node asks
//! for each pod identity by impersonation, authenticated by its own projected service-account
//! token, which is re-read for every request (the kubelet rotates it).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use culvert_ca_proto::istio_certificate_service_client::IstioCertificateServiceClient;
use culvert_ca_proto::{CLUSTER_ID_HEADER, IstioCertificateRequest, impersonating};
use hyper_util::rt::TokioIo;
use rcgen::{
    CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData as _,
    SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::sync::Semaphore;
use tonic::transport::Channel;

use super::{Endpoint, Error, Id, IssueFuture, Issued, ReachFuture, Roots, Source, bundle};

/// Requests in flight to the CA at once, whatever the burst (ztunnel uses the same).
const MAX_IN_FLIGHT: usize = 8;
/// One request, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The node's client of an Istio CA.
pub struct IstioCa {
    address: String,
    /// How a connection to the CA is made, for `reach`; the client's channel dials the same.
    dialer: Dialer,
    client: IstioCertificateServiceClient<Channel>,
    token_file: PathBuf,
    cluster_id: tonic::metadata::AsciiMetadataValue,
    ttl: Duration,
    in_flight: Semaphore,
}

impl IstioCa {
    /// A client for `ca`, verifying the CA's certificate against `roots` as they are at each
    /// connection (so a root rotation reaches this channel too). Connects lazily.
    pub fn new(ca: &Endpoint, roots: Arc<Roots>, ttl: Duration) -> anyhow::Result<Self> {
        let cluster_id = ca.cluster_id.parse()?;
        let address = ca.address.clone();
        let dialer = Dialer {
            address: address.clone(),
            server_name: ServerName::try_from(ca.server_name.clone())?,
            roots,
        };
        let dial = dialer.clone();
        let connector = tower::service_fn(move |_: http::Uri| {
            let dial = dial.clone();
            async move { Ok::<_, BoxError>(TokioIo::new(dial.connect().await?)) }
        });
        // The URI only names the :authority; the connector above decides where to dial.
        let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", ca.address))?
            .connect_timeout(REQUEST_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .connect_with_connector_lazy(connector);
        Ok(Self {
            address,
            dialer,
            client: IstioCertificateServiceClient::new(channel),
            token_file: ca.token_file.clone(),
            cluster_id,
            ttl,
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
        })
    }

    async fn request(&self, id: &Id) -> Result<Issued, Error> {
        let ca_err = |source: Box<dyn std::error::Error + Send + Sync>| Error::Ca {
            ca: self.address.clone(),
            id: id.clone(),
            source: Arc::from(source),
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| ca_err(e.into()))?;
        let csr = csr(id, &key).map_err(|e| ca_err(e.into()))?;
        let token = std::fs::read_to_string(&self.token_file)
            .map_err(|e| ca_err(format!("reading {}: {e}", self.token_file.display()).into()))?;
        let token = token.trim();
        if token.is_empty() {
            return Err(ca_err(
                format!("{} is empty", self.token_file.display()).into(),
            ));
        }
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(impersonating(id.as_str())),
        });
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| ca_err("the token is not a valid header value".into()))?;
        request.metadata_mut().insert("authorization", bearer);
        request
            .metadata_mut()
            .insert(CLUSTER_ID_HEADER, self.cluster_id.clone());
        request.set_timeout(REQUEST_TIMEOUT);

        let _permit = self.in_flight.acquire().await.expect("never closed");
        let response = self
            .client
            .clone()
            .create_certificate(request)
            .await
            .map_err(|status| ca_err(Box::new(Status(status))))?;
        parse_chain(id, &response.into_inner().cert_chain, &key).map_err(|reason| Error::BadChain {
            ca: self.address.clone(),
            id: id.clone(),
            reason,
        })
    }
}

impl Source for IstioCa {
    fn issue<'a>(&'a self, id: &'a Id) -> IssueFuture<'a> {
        Box::pin(self.request(id))
    }

    /// A TLS handshake with the CA, its certificate checked against the mesh's roots.
    fn reach(&self) -> ReachFuture<'_> {
        Box::pin(async move {
            match tokio::time::timeout(REACH_TIMEOUT, self.dialer.connect()).await {
                Ok(Ok(_)) => Ok(format!(
                    "the CA at {} answers TLS with a certificate the mesh's roots accept",
                    self.address
                )),
                Ok(Err(e)) => Err(format!("the CA at {}: {e}", self.address)),
                Err(_) => Err(format!(
                    "the CA at {} did not finish a TLS handshake within {REACH_TIMEOUT:?}",
                    self.address
                )),
            }
        })
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long `reach` waits for the CA.
const REACH_TIMEOUT: Duration = Duration::from_secs(5);

/// Dials the CA: TCP, then TLS 1.3 offering HTTP/2, verified against the mesh's roots as they
/// are at that moment.
#[derive(Clone)]
struct Dialer {
    address: String,
    server_name: ServerName<'static>,
    roots: Arc<Roots>,
}

impl Dialer {
    async fn connect(
        &self,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, BoxError> {
        let mut tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots.get())
            .with_no_client_auth();
        tls.alpn_protocols = vec![crate::tls::ALPN_H2.to_vec()];
        let tcp = tokio::net::TcpStream::connect(&self.address).await?;
        tcp.set_nodelay(true)?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(self.server_name.clone(), tcp)
            .await?;
        Ok(tls)
    }
}

/// A gRPC status, shown as code and message (tonic's own Display adds metadata and details).
#[derive(Debug)]
struct Status(tonic::Status);

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.0.code(), self.0.message())
    }
}

impl std::error::Error for Status {}

/// The CSR Istio's agents send: P-256, empty subject, one URI SAN (critical, as the subject is
/// empty), no other extension.
fn csr(id: &Id, key: &KeyPair) -> Result<String, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
    params.serialize_request(key)?.pem()
}

/// Splits `cert_chain` (leaf, intermediates, root bundle last) and checks it is a certificate
/// for `id` on `key`, currently valid.
fn parse_chain(id: &Id, chain: &[String], key: &KeyPair) -> Result<Issued, String> {
    let (bundle, certs) = match chain {
        [] | [_] => return Err(format!("{} elements, want a leaf and roots", chain.len())),
        [certs @ .., bundle] => (bundle, certs),
    };
    let roots = bundle::parse_pem(bundle.as_bytes()).map_err(|e| format!("roots: {e:#}"))?;
    let mut parsed = Vec::new();
    for (i, pem) in certs.iter().enumerate() {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| format!("element {i}: {e}"))?;
            // A plugged-in chain may already end with the root: send it once, in the bundle.
            if !roots.contains(&cert) {
                parsed.push(cert);
            }
        }
    }
    let leaf = parsed.first().ok_or("no leaf certificate")?;
    let (_, x509) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| format!("the leaf: {e}"))?;
    match crate::tls::identity_of(leaf) {
        Some(got) if got == *id => {}
        got => return Err(format!("the leaf names {got:?}, not {id}")),
    }
    if x509.public_key().raw != key.subject_public_key_info() {
        return Err("the leaf is not for the key this node generated".into());
    }
    let time = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
    };
    let (not_before, not_after) = (
        time(x509.validity().not_before),
        time(x509.validity().not_after),
    );
    if not_after <= SystemTime::now() {
        return Err("the leaf has already expired".into());
    }
    Ok(Issued {
        chain: parsed,
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        roots,
        not_before,
        not_after,
    })
}

#[cfg(test)]
mod tests {
    use x509_parser::prelude::FromDer as _;

    use super::*;

    #[test]
    fn a_chain_is_split_deduplicated_and_checked_against_the_request() {
        let ca = crate::test_util::Ca::new("istio-chain");
        let id = Id::new("cluster.local", "demo", "a").unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let root = std::fs::read_to_string(ca.cert()).unwrap();
        let leaf = ca.sign_pem(&key, id.as_str());
        let other_root = crate::test_util::Ca::new("istio-chain-2");
        let bundle = format!(
            "{root}{}",
            std::fs::read_to_string(other_root.cert()).unwrap()
        );

        // Leaf, a chain repeating the root, then a two-root bundle.
        let issued = parse_chain(&id, &[leaf.clone(), root, bundle.clone()], &key).unwrap();
        assert_eq!(issued.chain.len(), 1, "the root was sent twice");
        assert_eq!(issued.roots.len(), 2);
        assert!(issued.not_after > SystemTime::now());

        let wrong = Id::new("cluster.local", "demo", "b").unwrap();
        let err = parse_chain(&wrong, &[leaf.clone(), bundle.clone()], &key)
            .err()
            .unwrap();
        assert!(
            err.contains("not spiffe://cluster.local/ns/demo/sa/b"),
            "{err}"
        );
        let other_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let err = parse_chain(&id, &[leaf.clone(), bundle], &other_key)
            .err()
            .unwrap();
        assert!(err.contains("not for the key"), "{err}");
        let err = parse_chain(&id, &[leaf], &key).err().unwrap();
        assert!(err.contains("1 elements"), "{err}");
    }

    #[test]
    fn the_csr_carries_only_the_identity() {
        let id = Id::new("cluster.local", "demo", "a").unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let pem = csr(&id, &key).unwrap();
        let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .unwrap();
        let (_, req) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&der).unwrap();
        assert_eq!(req.certification_request_info.subject.iter().count(), 0);
        let exts: Vec<_> = req.requested_extensions().into_iter().flatten().collect();
        assert_eq!(exts.len(), 1, "{exts:?}");
    }
}
