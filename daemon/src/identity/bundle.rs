//! The mesh trust bundle: the roots every peer's certificate (and the CA's own) must chain to,
//! read from a file or a ConfigMap and followed as it changes, so that a root rotation reaches
//! pods that are already wired.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::{WatchStreamExt as _, watcher};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{BundleSource, Cache};

/// How often a bundle file is re-read. A kubelet-projected ConfigMap changes within a minute or
/// so anyway; polling a small file costs nothing and sees every kind of replacement.
const FILE_POLL: Duration = Duration::from_secs(2);

/// The current roots, swapped whole when the bundle changes; readers keep the store they took.
pub struct Roots {
    store: RwLock<(Arc<RootCertStore>, Arc<[CertificateDer<'static>]>)>,
}

impl Roots {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            store: RwLock::new((Arc::new(RootCertStore::empty()), Arc::new([]))),
        })
    }

    pub fn get(&self) -> Arc<RootCertStore> {
        self.store.read().expect("roots lock poisoned").0.clone()
    }

    /// The roots as they were set, for the admin API to show.
    pub fn certificates(&self) -> Arc<[CertificateDer<'static>]> {
        self.store.read().expect("roots lock poisoned").1.clone()
    }

    /// Replaces the roots; refuses an empty set or a certificate rustls cannot use, keeping the
    /// old roots.
    pub fn set(&self, certs: &[CertificateDer<'static>]) -> Result<(), rustls::Error> {
        let mut store = RootCertStore::empty();
        for cert in certs {
            store.add(cert.clone())?;
        }
        if store.is_empty() {
            return Err(rustls::Error::General("an empty trust bundle".into()));
        }
        *self.store.write().expect("roots lock poisoned") = (Arc::new(store), certs.into());
        Ok(())
    }
}

/// A bundle as read from its source.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub roots: Vec<CertificateDer<'static>>,
    /// Digest of everything the source held: any change, even of the CA's note of which key it
    /// signs with, means certificates are re-issued.
    revision: u64,
}

/// Every certificate in PEM text; at least one.
pub(super) fn parse_pem(pem: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .context("parsing PEM certificates")?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in the trust bundle");
    Ok(certs)
}

fn from_file(path: &std::path::Path) -> anyhow::Result<Bundle> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    Ok(Bundle {
        roots: parse_pem(&bytes).with_context(|| format!("in {}", path.display()))?,
        revision: hasher.finish(),
    })
}

fn from_config_map(cm: &ConfigMap, key: &str) -> anyhow::Result<Bundle> {
    let data: BTreeMap<_, _> = cm.data.clone().unwrap_or_default();
    let pem = data
        .get(key)
        .with_context(|| format!("no key {key} in the ConfigMap"))?;
    let mut hasher = DefaultHasher::new();
    data.hash(&mut hasher);
    Ok(Bundle {
        roots: parse_pem(pem.as_bytes())?,
        revision: hasher.finish(),
    })
}

/// Reads the bundle for start-up. A ConfigMap that is not there yet (the CA creates it on its
/// first start) is waited for; a file must exist.
pub async fn load(source: &BundleSource, client: Option<&kube::Client>) -> anyhow::Result<Bundle> {
    match source {
        BundleSource::File(path) => from_file(path),
        BundleSource::ConfigMap {
            namespace,
            name,
            key,
        } => {
            let client = client.context("a ConfigMap trust bundle needs discovery: kubernetes")?;
            let api = kube::Api::<ConfigMap>::namespaced(client.clone(), namespace);
            loop {
                match api.get(name).await.map_err(anyhow::Error::from) {
                    Ok(cm) => match from_config_map(&cm, key) {
                        Ok(bundle) => return Ok(bundle),
                        Err(e) => warn!(configmap = %format!("{namespace}/{name}"),
                            error = %format!("{e:#}"), "trust bundle unusable; waiting"),
                    },
                    Err(e) => warn!(configmap = %format!("{namespace}/{name}"),
                        error = %format!("{e:#}"), "trust bundle not readable; waiting"),
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

/// Follows the bundle until `stop`. Each change is installed into `roots` at once (new
/// handshakes on every pod trust it) and then every held certificate is re-issued, so that
/// leaves move to whichever root the CA now signs with. An unusable change is logged and the
/// old roots stay.
pub async fn follow(
    source: BundleSource,
    client: Option<kube::Client>,
    roots: Arc<Roots>,
    certs: Arc<Cache>,
    first: Bundle,
    stop: CancellationToken,
) {
    let mut current = first.revision;
    let mut apply = |bundle: anyhow::Result<Bundle>| match bundle {
        Ok(bundle) if bundle.revision == current => {}
        Ok(bundle) => match roots.set(&bundle.roots) {
            Ok(()) => {
                current = bundle.revision;
                info!(
                    roots = bundle.roots.len(),
                    "trust bundle changed; re-issuing certificates"
                );
                certs.reissue_all();
            }
            Err(e) => warn!(error = %e, "trust bundle change refused; keeping the old roots"),
        },
        Err(e) => {
            warn!(error = %format!("{e:#}"), "trust bundle unreadable; keeping the old roots")
        }
    };
    match source {
        BundleSource::File(path) => loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(FILE_POLL) => apply(from_file(&path)),
            }
        },
        BundleSource::ConfigMap {
            namespace,
            name,
            key,
        } => {
            let Some(client) = client else { return };
            let api = kube::Api::<ConfigMap>::namespaced(client, &namespace);
            let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
            let stream = watcher(api, config).default_backoff().applied_objects();
            let mut stream = std::pin::pin!(stream);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    next = stream.next() => match next {
                        Some(Ok(cm)) => apply(from_config_map(&cm, &key)),
                        Some(Err(e)) => warn!(error = %e, "watching the trust bundle"),
                        None => return,
                    },
                }
            }
        }
    }
}
