//! The gRPC service: `IstioCertificateService/CreateCertificate` over TLS, and the loop that
//! follows the CA Secret so every replica signs with the same, current material.

use std::io;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use culvert_ca_proto::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use culvert_ca_proto::{
    CLUSTER_ID_HEADER, IMPERSONATED_IDENTITY, IstioCertificateRequest, IstioCertificateResponse,
    string_field,
};
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::{WatchStreamExt as _, watcher};
use rcgen::{Issuer, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};
use tracing::{error, info, warn};

use crate::auth::{self, Caller, Denied, Policy};
use crate::authority::{self, Material};
use crate::csr;
use crate::store::{self, Store};

/// The CA's own serving certificate lives this long and is re-signed daily.
const SERVER_CERT_TTL: Duration = Duration::from_secs(7 * 86_400);
const SERVER_CERT_REFRESH: Duration = Duration::from_secs(86_400);
/// A TLS handshake must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections at once, handshaking or established; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 1024;
/// Streams one connection may have open (a node daemon sends at most 8).
const MAX_STREAMS_PER_CONNECTION: u32 = 16;
/// Requests being answered at once across all connections, which bounds the apiserver calls
/// (a TokenReview and two pod reads each) a flood can cause; the rest wait their turn.
const MAX_IN_FLIGHT: usize = 64;
/// A request larger than this is refused by the gRPC layer (a CSR is about 500 bytes).
const MAX_REQUEST_BYTES: usize = 64 << 10;

/// What one replica signs with, derived from the Secret.
struct Current {
    material: Material,
    issuer: Issuer<'static, KeyPair>,
    signer_not_after: SystemTime,
    /// PEM elements sent after the leaf: intermediates, then the root bundle as one element.
    tail: Vec<String>,
}

impl Current {
    fn new(material: Material) -> anyhow::Result<Self> {
        let issuer = material.current.issuer()?;
        let signer_not_after = authority::not_after(&material.current.cert_pem)?;
        let mut tail: Vec<String> = material
            .current
            .intermediates()?
            .iter()
            .map(authority::der_to_pem)
            .collect();
        tail.push(authority::to_pem(&material.roots()?));
        Ok(Self {
            material,
            issuer,
            signer_not_after,
            tail,
        })
    }
}

/// Settings of `culvert-ca serve`.
pub struct Settings {
    pub policy: Policy,
    /// DNS names the serving certificate carries.
    pub server_names: Vec<String>,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
}

/// The running CA.
pub struct Ca {
    client: kube::Client,
    settings: Settings,
    current: RwLock<Arc<Current>>,
    serving: RwLock<Arc<CertifiedKey>>,
    in_flight: Semaphore,
    pub ready: AtomicBool,
}

impl Ca {
    /// Loads (or creates) the material and publishes the bundle.
    pub async fn start(
        client: kube::Client,
        store: &Store,
        settings: Settings,
    ) -> anyhow::Result<Arc<Self>> {
        let material = store.load_or_create(&settings.policy.trust_domain).await?;
        store.publish(&material).await?;
        let current = Current::new(material)?;
        let serving = serving_cert(&current, &settings.server_names)?;
        info!(
            signer = current.material.current.fingerprint()?,
            roots = current.material.roots()?.len(),
            "CA material loaded"
        );
        Ok(Arc::new(Self {
            client,
            settings,
            current: RwLock::new(Arc::new(current)),
            serving: RwLock::new(serving),
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
            ready: AtomicBool::new(false),
        }))
    }

    fn install(&self, material: Material) -> anyhow::Result<()> {
        let current = Current::new(material)?;
        let serving = serving_cert(&current, &self.settings.server_names)?;
        *self.current.write().expect("lock poisoned") = Arc::new(current);
        *self.serving.write().expect("lock poisoned") = serving;
        Ok(())
    }

    fn current(&self) -> Arc<Current> {
        self.current.read().expect("lock poisoned").clone()
    }

    /// Follows the Secret (a rotation step from the CLI, an operator's new intermediate) and
    /// re-signs the serving certificate daily, until `stop`.
    pub async fn follow(self: Arc<Self>, store: Store, stop: CancellationToken) {
        let config = watcher::Config::default().fields(&format!("metadata.name={}", store.secret));
        let events = watcher(store.secrets.clone(), config)
            .default_backoff()
            .applied_objects();
        let mut events = std::pin::pin!(events);
        let mut refresh = tokio::time::interval(SERVER_CERT_REFRESH);
        refresh.tick().await;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = refresh.tick() => {
                    let current = self.current();
                    match serving_cert(&current, &self.settings.server_names) {
                        Ok(cert) => *self.serving.write().expect("lock poisoned") = cert,
                        Err(e) => error!(error = %format!("{e:#}"), "re-signing the serving certificate"),
                    }
                }
                event = events.next() => match event {
                    Some(Ok(secret)) => self.changed(&store, &secret).await,
                    Some(Err(e)) => warn!(error = %e, "watching the CA Secret"),
                    None => return,
                },
            }
        }
    }

    async fn changed(&self, store: &Store, secret: &Secret) {
        let material = match store::material_of(secret) {
            Ok(m) => m,
            Err(e) => {
                error!(error = %format!("{e:#}"), "the CA Secret changed and is unusable; signing with the previous material");
                return;
            }
        };
        let before = self.current();
        if before.material.to_data() == material.to_data() {
            return;
        }
        let result = self.install(material.clone());
        match result.and(store.publish(&material).await) {
            Ok(()) => info!(
                signer = material.current.fingerprint().unwrap_or_default(),
                roots = material.roots().map(|r| r.len()).unwrap_or(0),
                rotating = material.next.is_some(),
                "CA material changed"
            ),
            Err(e) => error!(error = %format!("{e:#}"), "applying the changed CA Secret"),
        }
    }

    async fn create(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Vec<String>, Refused> {
        let _permit = self.in_flight.acquire().await.expect("never closed");
        let header = |name: &str| {
            request
                .metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (authorization, cluster_id) = (header("authorization"), header(CLUSTER_ID_HEADER));
        let policy = &self.settings.policy;
        let caller = auth::authenticate(
            &self.client,
            policy,
            authorization.as_deref(),
            cluster_id.as_deref(),
        )
        .await
        .map_err(|denied| Refused::new(None, None, denied))?;
        let body = request.into_inner();
        let requested = string_field(body.metadata.as_ref(), IMPERSONATED_IDENTITY).map_err(
            |_: culvert_ca_proto::NotAString| {
                let why = format!("metadata {IMPERSONATED_IDENTITY} is not a string");
                Refused::new(Some(&caller), None, Denied::InvalidArgument(why))
            },
        )?;
        let id = auth::authorize(&self.client, policy, &caller, requested)
            .await
            .map_err(|denied| Refused::new(Some(&caller), requested, denied))?;
        let refuse = |why: String| {
            Refused::new(
                Some(&caller),
                Some(id.as_str()),
                Denied::InvalidArgument(why),
            )
        };
        let ttl = match u64::try_from(body.validity_duration) {
            Ok(0) | Err(_) => self.settings.default_ttl,
            Ok(secs) if Duration::from_secs(secs) > self.settings.max_ttl => {
                return Err(refuse(format!(
                    "requested validity {secs}s exceeds the maximum {}s",
                    self.settings.max_ttl.as_secs()
                )));
            }
            Ok(secs) => Duration::from_secs(secs),
        };
        let public_key = csr::check(&body.csr, id.as_str()).map_err(|e| refuse(e.to_string()))?;
        let current = self.current();
        let (leaf, not_after) = authority::sign_leaf(
            &current.issuer,
            current.signer_not_after,
            &public_key,
            id.as_str(),
            ttl,
        )
        .map_err(|e| refuse(format!("signing: {e:#}")))?;
        info!(caller = %caller, identity = %id, not_after = %humantime::format_rfc3339_seconds(not_after), "signed");
        let mut chain = vec![authority::der_to_pem(&leaf)];
        chain.extend(current.tail.iter().cloned());
        Ok(chain)
    }
}

/// A refusal with whom it concerned, logged once.
struct Refused(Status);

impl Refused {
    fn new(caller: Option<&Caller>, requested: Option<&str>, denied: Denied) -> Self {
        let caller = caller.map_or_else(|| "unauthenticated".to_owned(), ToString::to_string);
        let status = Status::from(denied);
        warn!(caller, requested = requested.unwrap_or("-"), code = ?status.code(),
            reason = status.message(), "refused");
        Self(status)
    }
}

/// The tonic service.
pub struct Service(pub Arc<Ca>);

#[tonic::async_trait]
impl IstioCertificateService for Service {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let cert_chain = self.0.create(request).await.map_err(|r| r.0)?;
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}

fn serving_cert(current: &Current, names: &[String]) -> anyhow::Result<Arc<CertifiedKey>> {
    let (leaf, key) = authority::sign_server(&current.issuer, names, SERVER_CERT_TTL)?;
    let mut chain = vec![leaf];
    chain.extend(current.material.current.intermediates()?);
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signer = culvert::tls::provider()
        .key_provider
        .load_private_key(key)?;
    Ok(Arc::new(CertifiedKey::new(chain, signer)))
}

#[derive(Debug)]
struct Serving(Arc<Ca>);

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Serving {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.serving.read().expect("lock poisoned").clone())
    }
}

/// Serves the CA API on `listener` until `stop`, then lets requests in flight finish.
pub async fn serve(
    ca: Arc<Ca>,
    listener: TcpListener,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut tls = rustls::ServerConfig::builder_with_provider(culvert::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Serving(ca.clone())));
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<io::Result<Tls>>(64);
    let queued = tx.clone();
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let handshakes = TaskTracker::new();
    let accepting = {
        let (stop, handshakes) = (stop.clone(), handshakes.clone());
        tokio::spawn(async move {
            loop {
                let permit = tokio::select! {
                    () = stop.cancelled() => return,
                    permit = connections.clone().acquire_owned() => permit.expect("never closed"),
                };
                let (tcp, peer) = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            warn!(error = %e, "accepting");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                handshakes.spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            // The permit goes with the connection; tonic drops it at the end.
                            let _ = tx.send(Ok(Tls(stream, permit))).await;
                        }
                        Ok(Err(e)) => info!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => info!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        })
    };
    // tonic stops taking connections when told to shut down, and one it has not taken would be
    // dropped with its request unanswered. So it is told only once no handshake is left and it
    // has taken every connection already made: then each is served and gracefully closed.
    let drained = async move {
        stop.cancelled().await;
        let _ = accepting.await;
        handshakes.close();
        handshakes.wait().await;
        while queued.capacity() < queued.max_capacity() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let incoming = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let service = IstioCertificateServiceServer::new(Service(ca))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    tonic::transport::Server::builder()
        .timeout(Duration::from_secs(30))
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .serve_with_incoming_shutdown(service, incoming, drained)
        .await
        .context("serving the CA API")
}

/// A TLS connection handed to tonic, holding its place among [`MAX_CONNECTIONS`].
struct Tls(
    tokio_rustls::server::TlsStream<TcpStream>,
    #[allow(dead_code, reason = "held, not read: dropping it frees the place")]
    tokio::sync::OwnedSemaphorePermit,
);

impl tonic::transport::server::Connected for Tls {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for Tls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
