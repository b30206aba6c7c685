//! rustls configurations for HBONE, built from the identity cache.
//!
//! Owns the wire-level TLS policy of the protocol (TLS 1.3 only, AES-GCM suites, ALPN `h2`, no
//! SNI, no resumption) and the two verifiers: the client pins the server to one expected SPIFFE
//! id; the server requires a client certificate from the mesh trust domain and leaves
//! authorization to policy. Does not open sockets.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, aws_lc_rs};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};

use crate::identity::{self, Id};

/// ALPN protocol both sides insist on.
pub const ALPN_H2: &[u8] = b"h2";

/// Which key exchanges a node offers and accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum KeyExchange {
    /// X25519MLKEM768 first, so two Culvert nodes agree on a post-quantum hybrid; X25519 and
    /// P-256 for peers without it (ztunnel's default builds).
    #[default]
    PreferPostQuantum,
    /// X25519MLKEM768 only: a peer that cannot do it fails the handshake.
    RequirePostQuantum,
}

impl KeyExchange {
    fn groups(self) -> Vec<&'static dyn rustls::crypto::SupportedKxGroup> {
        use aws_lc_rs::kx_group::{SECP256R1, X25519, X25519MLKEM768};
        match self {
            Self::PreferPostQuantum => vec![X25519MLKEM768, X25519, SECP256R1],
            Self::RequirePostQuantum => vec![X25519MLKEM768],
        }
    }
}

/// The crypto provider HBONE uses: aws-lc-rs with TLS 1.3 AES-GCM suites only, in the order
/// ztunnel offers them, and the default key exchanges.
pub fn provider() -> Arc<CryptoProvider> {
    provider_for(KeyExchange::default())
}

/// [`provider`] with the key exchanges of `kx`.
pub fn provider_for(kx: KeyExchange) -> Arc<CryptoProvider> {
    let mut provider = aws_lc_rs::default_provider();
    provider.cipher_suites = vec![
        aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
        aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
    ];
    provider.kx_groups = kx.groups();
    Arc::new(provider)
}

/// Extracts the peer identity from a certificate: its first URI SAN that parses as an [`Id`].
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<Id> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => uri.parse().ok(),
        _ => None,
    })
}

/// The server side of a pod's HBONE listener: presents `id`, requires a mesh client.
pub fn server_config(
    certs: &Arc<identity::Cache>,
    id: &Id,
    kx: KeyExchange,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = provider_for(kx);
    let verifier = SameTrustDomain {
        certs: certs.clone(),
        provider: provider.clone(),
        current: std::sync::Mutex::new(None),
        trust_domain: id.trust_domain().to_owned(),
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(Resolver {
            certs: certs.clone(),
            id: id.clone(),
        }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// The client side of a tunnel: presents `src`, accepts only a server proving `dst`.
pub fn client_config(
    certs: &Arc<identity::Cache>,
    src: &Id,
    dst: &Id,
    kx: KeyExchange,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    client_config_with(certs, src, dst, provider_for(kx))
}

/// [`client_config`] on a provider of the caller's: tests and benches play peers with other
/// key exchanges (a classic-only one, as ztunnel's default builds are).
pub fn client_config_with(
    certs: &Arc<identity::Cache>,
    src: &Id,
    dst: &Id,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let verifier = ExpectIdentity {
        roots: certs.roots(),
        want: dst.clone(),
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(Resolver {
            certs: certs.clone(),
            id: src.clone(),
        }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Serves the current certificate of one identity, so renewals apply to new handshakes without
/// rebuilding configs.
struct Resolver {
    certs: Arc<identity::Cache>,
    id: Id,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver").field("id", &self.id).finish()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.certs.get(&self.id)
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.certs.get(&self.id)
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A certificate refused for a reason of ours, kept typed so callers can tell which.
fn reject(reason: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    CertificateError::Other(OtherError(Arc::new(reason))).into()
}

/// Why a TLS handshake with a peer failed: a closed set, for the log and a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeFailure {
    /// A certificate (the peer's, or ours as the peer said) does not chain to the mesh roots.
    UnknownCa,
    /// A valid certificate for another identity than the one expected, or of another trust
    /// domain.
    IdentityMismatch,
    /// A certificate is out of its validity period.
    Expired,
    /// A client offered no certificate.
    NoClientCertificate,
    /// A certificate that is malformed, revoked or not meant for this use.
    BadCertificate,
    /// Not TLS 1.3 as the mesh speaks it: bad messages, no common parameters.
    Protocol,
    /// The handshake did not finish in time.
    Timeout,
    /// The connection broke before the handshake finished.
    Io,
}

impl HandshakeFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownCa => "unknown_ca",
            Self::IdentityMismatch => "identity_mismatch",
            Self::Expired => "expired",
            Self::NoClientCertificate => "no_client_certificate",
            Self::BadCertificate => "bad_certificate",
            Self::Protocol => "protocol",
            Self::Timeout => "timeout",
            Self::Io => "io",
        }
    }

    /// Why the handshake that returned `error` failed (tokio-rustls wraps rustls' errors in
    /// `io::Error`s).
    pub fn of(error: &std::io::Error) -> Self {
        let tls = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        match tls {
            Some(e) => Self::of_tls(e),
            None if error.kind() == std::io::ErrorKind::TimedOut => Self::Timeout,
            None => Self::Io,
        }
    }

    fn of_tls(error: &rustls::Error) -> Self {
        use rustls::AlertDescription as Alert;
        match error {
            rustls::Error::InvalidCertificate(e) => match e {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => Self::UnknownCa,
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => Self::Expired,
                CertificateError::Other(OtherError(why))
                    if why.is::<IdentityMismatch>() || why.is::<ForeignTrustDomain>() =>
                {
                    Self::IdentityMismatch
                }
                _ => Self::BadCertificate,
            },
            rustls::Error::NoCertificatesPresented => Self::NoClientCertificate,
            // The peer refused what we presented and said why.
            rustls::Error::AlertReceived(alert) => match alert {
                Alert::UnknownCA => Self::UnknownCa,
                Alert::CertificateExpired => Self::Expired,
                Alert::CertificateRequired => Self::NoClientCertificate,
                Alert::BadCertificate
                | Alert::CertificateUnknown
                | Alert::CertificateRevoked
                | Alert::UnsupportedCertificate => Self::BadCertificate,
                _ => Self::Protocol,
            },
            _ => Self::Protocol,
        }
    }
}

/// The server presented a valid certificate for another identity than the one expected.
#[derive(Debug, thiserror::Error)]
#[error("server presented {got}, expected {want}")]
pub struct IdentityMismatch {
    pub got: String,
    pub want: Id,
}

/// Client-side verifier: chain to the mesh roots with the server-auth usage, then the URI SAN
/// must be exactly the expected identity. Server names are not checked: HBONE sends no SNI and
/// authenticates identities, not hostnames.
#[derive(Debug)]
struct ExpectIdentity {
    roots: Arc<rustls::RootCertStore>,
    want: Id,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ExpectIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        match identity_of(end_entity) {
            Some(got) if got == self.want => Ok(ServerCertVerified::assertion()),
            got => {
                let got = got.map_or_else(|| "no SPIFFE identity".to_owned(), |id| id.to_string());
                Err(reject(IdentityMismatch {
                    got,
                    want: self.want.clone(),
                }))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered; a TLS 1.2 signature means a broken peer.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Server-side verifier: the standard client-auth chain check against the trust bundle as it is
/// at each handshake (a pod's listener outlives root rotations), plus a URI SAN in our trust
/// domain. Which identities may connect is policy's decision, not the handshake's.
struct SameTrustDomain {
    certs: Arc<identity::Cache>,
    provider: Arc<CryptoProvider>,
    /// The webpki verifier for the roots it was built from, rebuilt when they change.
    current: std::sync::Mutex<Option<BuiltVerifier>>,
    trust_domain: String,
}

/// Whether `chain` (leaf first) is one a peer would accept now: it chains to `roots` and is
/// within its validity.
pub fn chains_to(
    roots: Arc<rustls::RootCertStore>,
    chain: &[CertificateDer<'_>],
) -> Result<(), rustls::Error> {
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| rustls::Error::General("an empty chain".into()))?;
    WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| rustls::Error::General(format!("client verifier: {e}")))?
        .verify_client_cert(leaf, intermediates, UnixTime::now())
        .map(|_| ())
}

/// A webpki client verifier and the roots it was built from.
type BuiltVerifier = (Arc<rustls::RootCertStore>, Arc<dyn ClientCertVerifier>);

impl fmt::Debug for SameTrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SameTrustDomain")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl SameTrustDomain {
    fn webpki(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let roots = self.certs.roots();
        let mut current = self.current.lock().expect("verifier lock poisoned");
        if let Some((built_from, verifier)) = &*current
            && Arc::ptr_eq(built_from, &roots)
        {
            return Ok(verifier.clone());
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(format!("client verifier: {e}")))?;
        *current = Some((roots, verifier.clone()));
        Ok(verifier)
    }
}

/// A client certificate that chains to the mesh roots but names no identity of this mesh.
#[derive(Debug, thiserror::Error)]
#[error("client identity {got} is not in trust domain {want}")]
struct ForeignTrustDomain {
    got: String,
    want: String,
}

impl ClientCertVerifier for SameTrustDomain {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a mesh client has exactly one certificate to offer, and the hints would
        // have to follow the bundle.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.webpki()?
            .verify_client_cert(end_entity, intermediates, now)?;
        match identity_of(end_entity) {
            Some(id) if id.trust_domain() == self.trust_domain => {
                Ok(ClientCertVerified::assertion())
            }
            got => {
                let got = got.map_or_else(|| "none".to_owned(), |id| id.to_string());
                Err(reject(ForeignTrustDomain {
                    got,
                    want: self.trust_domain.clone(),
                }))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn certs(test: &str) -> Arc<identity::Cache> {
        crate::test_util::Ca::new(test).certs()
    }

    /// Handshakes `client` (presenting `src`, expecting `want`) with a server presenting `dst`,
    /// and exchanges one byte. Returns the client's error, or the server's if only it failed.
    async fn handshake(
        certs: &Arc<identity::Cache>,
        src: &str,
        want: &str,
        dst: &str,
    ) -> Result<(), String> {
        let kx = KeyExchange::default();
        handshake_kx(certs, (src, want, provider_for(kx)), (dst, kx))
            .await
            .map(drop)
    }

    /// [`handshake`] with the client on `provider` and the server offering `kx`; returns the
    /// key exchange group both agreed on.
    async fn handshake_kx(
        certs: &Arc<identity::Cache>,
        (src, want, provider): (&str, &str, Arc<CryptoProvider>),
        (dst, kx): (&str, KeyExchange),
    ) -> Result<rustls::NamedGroup, String> {
        let (src, want, dst): (Id, Id, Id) = (
            src.parse().unwrap(),
            want.parse().unwrap(),
            dst.parse().unwrap(),
        );
        for id in [&src, &dst] {
            certs.ensure(id).await.unwrap();
        }
        let (a, b) = tokio::io::duplex(64 << 10);
        let server = tokio_rustls::TlsAcceptor::from(server_config(certs, &dst, kx).unwrap());
        let client = client_config_with(certs, &src, &want, provider).unwrap();
        let client = tokio_rustls::TlsConnector::from(client);
        let server = tokio::spawn(async move {
            let mut tls = server.accept(b).await.map_err(|e| e.to_string())?;
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(identity_of);
            tls.write_all(b"x").await.map_err(|e| e.to_string())?;
            Ok::<_, String>(peer)
        });
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let client_result = async {
            let mut tls = client.connect(name, a).await.map_err(|e| e.to_string())?;
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_H2));
            let group = tls.get_ref().1.negotiated_key_exchange_group();
            let mut byte = [0u8];
            tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(group.expect("a finished handshake has a group").name())
        }
        .await;
        let server_result = server.await.unwrap();
        let group = client_result?;
        assert_eq!(
            server_result?,
            Some(src),
            "server saw the wrong client identity"
        );
        Ok(group)
    }

    #[test]
    fn handshake_failures_name_their_cause() {
        use rustls::AlertDescription as Alert;
        let io = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let mismatch = reject(IdentityMismatch {
            got: "spiffe://cluster.local/ns/a/sa/b".into(),
            want: "spiffe://cluster.local/ns/a/sa/c".parse().unwrap(),
        });
        let cases = [
            (
                io(CertificateError::UnknownIssuer.into()),
                HandshakeFailure::UnknownCa,
            ),
            (
                io(CertificateError::Expired.into()),
                HandshakeFailure::Expired,
            ),
            (io(mismatch), HandshakeFailure::IdentityMismatch),
            (
                io(rustls::Error::NoCertificatesPresented),
                HandshakeFailure::NoClientCertificate,
            ),
            (
                io(CertificateError::BadEncoding.into()),
                HandshakeFailure::BadCertificate,
            ),
            (
                io(rustls::Error::AlertReceived(Alert::UnknownCA)),
                HandshakeFailure::UnknownCa,
            ),
            (
                io(rustls::Error::AlertReceived(Alert::BadCertificate)),
                HandshakeFailure::BadCertificate,
            ),
            (
                io(rustls::Error::AlertReceived(Alert::ProtocolVersion)),
                HandshakeFailure::Protocol,
            ),
            (
                io(rustls::Error::InappropriateMessage {
                    expect_types: vec![],
                    got_type: rustls::ContentType::Alert,
                }),
                HandshakeFailure::Protocol,
            ),
            (
                std::io::ErrorKind::ConnectionReset.into(),
                HandshakeFailure::Io,
            ),
            (
                std::io::ErrorKind::TimedOut.into(),
                HandshakeFailure::Timeout,
            ),
        ];
        for (error, want) in cases {
            assert_eq!(HandshakeFailure::of(&error), want, "{error}");
        }
    }

    #[tokio::test]
    async fn two_culvert_nodes_agree_on_post_quantum_and_a_classic_peer_still_connects() {
        use rustls::NamedGroup;
        let certs = certs("pq");
        let (a, b) = (
            "spiffe://cluster.local/ns/x/sa/a",
            "spiffe://cluster.local/ns/y/sa/b",
        );
        let ours = || provider_for(KeyExchange::PreferPostQuantum);
        let classic = || {
            let mut p = (*ours()).clone();
            p.kx_groups = vec![aws_lc_rs::kx_group::X25519];
            Arc::new(p)
        };
        let (prefer, require) = (
            KeyExchange::PreferPostQuantum,
            KeyExchange::RequirePostQuantum,
        );
        let group = |p, kx| handshake_kx(&certs, (a, b, p), (b, kx));
        assert_eq!(group(ours(), prefer).await, Ok(NamedGroup::X25519MLKEM768));
        assert_eq!(group(classic(), prefer).await, Ok(NamedGroup::X25519));
        assert_eq!(group(ours(), require).await, Ok(NamedGroup::X25519MLKEM768));
        let refused = group(classic(), require).await;
        assert!(
            refused.is_err(),
            "a classic peer passed a PQ-only server: {refused:?}"
        );
        // A node that requires it reaches one that prefers it.
        let pq_only = provider_for(require);
        assert_eq!(group(pq_only, prefer).await, Ok(NamedGroup::X25519MLKEM768));
    }

    #[tokio::test]
    async fn a_running_listener_trusts_a_root_added_after_it_was_built() {
        use crate::test_util::Ca;
        let (old, new) = (Ca::new("rotate-old"), Ca::new("rotate-new"));
        let pem = |ca: &Ca| {
            let text = std::fs::read(ca.cert()).unwrap();
            CertificateDer::from_pem_slice(&text).unwrap()
        };
        use rustls::pki_types::pem::PemObject as _;
        let ttl = std::time::Duration::from_secs(3600);
        // The server's node trusts only the old root when its pod's listener is built.
        let server_roots = identity::Roots::new();
        server_roots.set(&[pem(&old)]).unwrap();
        let server =
            identity::Cache::with_roots(Arc::new(old.local(ttl)), provider(), server_roots.clone());
        // The client's leaf is already under the new root; it trusts both.
        let client_roots = identity::Roots::new();
        client_roots.set(&[pem(&old), pem(&new)]).unwrap();
        let client =
            identity::Cache::with_roots(Arc::new(new.local(ttl)), provider(), client_roots);
        let (src, dst): (Id, Id) = (
            "spiffe://cluster.local/ns/x/sa/a".parse().unwrap(),
            "spiffe://cluster.local/ns/y/sa/b".parse().unwrap(),
        );
        server.ensure(&dst).await.unwrap();
        client.ensure(&src).await.unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(
            server_config(&server, &dst, KeyExchange::default()).unwrap(),
        );
        let connector = tokio_rustls::TlsConnector::from(
            client_config(&client, &src, &dst, KeyExchange::default()).unwrap(),
        );
        let attempt = || async {
            let (a, b) = tokio::io::duplex(64 << 10);
            let accept = acceptor.clone();
            let server = tokio::spawn(async move {
                let mut tls = accept.accept(b).await?;
                tls.write_all(b"x").await
            });
            let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
            if let Ok(mut tls) = connector.clone().connect(name, a).await {
                let mut byte = [0u8];
                let _ = tls.read_exact(&mut byte).await;
            }
            server.await.unwrap().is_ok()
        };
        assert!(
            !attempt().await,
            "a leaf under an untrusted root was accepted"
        );
        // The bundle changes; the listener built before it follows.
        server_roots.set(&[pem(&old), pem(&new)]).unwrap();
        assert!(attempt().await, "the listener did not pick up the new root");
        server_roots.set(&[pem(&old)]).unwrap();
        assert!(!attempt().await, "a removed root is still trusted");
    }

    #[tokio::test]
    async fn expected_identity_completes_and_server_learns_the_client() {
        let certs = certs("ok");
        let (a, b) = (
            "spiffe://cluster.local/ns/x/sa/a",
            "spiffe://cluster.local/ns/y/sa/b",
        );
        handshake(&certs, a, b, b).await.unwrap();
    }

    #[tokio::test]
    async fn client_refuses_a_server_proving_another_identity() {
        let certs = certs("mismatch");
        let err = handshake(
            &certs,
            "spiffe://cluster.local/ns/x/sa/a",
            "spiffe://cluster.local/ns/y/sa/expected",
            "spiffe://cluster.local/ns/y/sa/actual",
        )
        .await
        .unwrap_err();
        // rustls prints our error with Debug; hbone::Error re-renders it for logs.
        assert!(err.contains("IdentityMismatch"), "{err}");
        assert!(
            err.contains("ns/y/sa/actual") && err.contains("ns/y/sa/expected"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn server_refuses_a_client_from_another_trust_domain() {
        let certs = certs("foreign");
        let b = "spiffe://cluster.local/ns/y/sa/b";
        let err = handshake(&certs, "spiffe://other.example/ns/x/sa/a", b, b)
            .await
            .unwrap_err();
        assert!(!err.is_empty());
    }

    #[tokio::test]
    async fn server_refuses_a_client_without_a_certificate() {
        let certs = certs("anonymous");
        let dst: Id = "spiffe://cluster.local/ns/y/sa/b".parse().unwrap();
        certs.ensure(&dst).await.unwrap();
        let (a, b) = tokio::io::duplex(64 << 10);
        let server = tokio_rustls::TlsAcceptor::from(
            server_config(&certs, &dst, KeyExchange::default()).unwrap(),
        );
        let mut anonymous = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(certs.roots())
            .with_no_client_auth();
        anonymous.alpn_protocols = vec![ALPN_H2.to_vec()];
        let client = tokio_rustls::TlsConnector::from(Arc::new(anonymous));
        let server = tokio::spawn(async move { server.accept(b).await.map(|_| ()) });
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        // The client may finish its side of TLS 1.3 first; the server must refuse.
        let _ = client.connect(name, a).await;
        assert!(
            server.await.unwrap().is_err(),
            "server accepted a client without a certificate"
        );
    }
}
