//! One certificate per local identity, fetched once, renewed at half life.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::{Error, Id, Issued, Roots, Source};

/// Renewal retries start at this delay and double up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// The node's certificates, keyed by identity.
///
/// Reads are synchronous (rustls resolves certificates inside the handshake); fetches are
/// async and single-flight per identity, so a burst of new pods of one service account costs one
/// signature.
pub struct Cache {
    source: Arc<dyn Source>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    certs: RwLock<HashMap<Id, Cert>>,
    roots: Arc<Roots>,
    /// Whether each issuance's roots replace the bundle (a local CA), or a followed bundle
    /// source owns it ([`Cache::with_roots`]).
    roots_from_issuance: bool,
    fetching: Mutex<HashMap<Id, Arc<Mutex<()>>>>,
    /// Wakes the renewal loops after [`Cache::reissue_all`].
    reissued: tokio::sync::Notify,
    /// Where issuances are counted, once the node's metrics exist.
    metrics: std::sync::OnceLock<Arc<crate::metrics::Certificates>>,
    /// How the last request to the source went.
    last: std::sync::Mutex<Option<LastRequest>>,
}

/// A request to the certificate source, as `culvert check` reports it.
#[derive(Debug, Clone)]
pub struct LastRequest {
    pub id: Id,
    pub at: SystemTime,
    /// Why it failed (the whole chain of causes); `None` when a certificate was installed.
    pub error: Option<String>,
}

/// A held certificate, as the admin API shows it.
pub struct Held {
    pub id: Id,
    /// The chain, leaf first, and its key.
    pub key: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Whether a fetched certificate replaces a held one only, or may be the first.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Install {
    Always,
    IfHeld,
}

#[derive(Clone)]
struct Cert {
    key: Arc<CertifiedKey>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Cert {
    fn renew_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + lifetime / 2
    }
}

/// How long a failed renewal waits before the next try: the backoff, but never so long that a
/// certificate with `left` to live expires first (a quarter of that at most, and no less than
/// [`MIN_BACKOFF`]).
fn retry_wait(backoff: Duration, left: Duration) -> Duration {
    backoff.min((left / 4).max(MIN_BACKOFF))
}

impl Cache {
    /// A cache whose trust bundle is whatever the source last issued with.
    pub fn new(
        source: Arc<dyn Source>,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Arc<Self> {
        Self::build(source, provider, Roots::new(), true)
    }

    /// A cache whose trust bundle is `roots`, kept by a followed bundle source: what the
    /// source sends with each certificate does not change it.
    pub fn with_roots(
        source: Arc<dyn Source>,
        provider: Arc<rustls::crypto::CryptoProvider>,
        roots: Arc<Roots>,
    ) -> Arc<Self> {
        Self::build(source, provider, roots, false)
    }

    fn build(
        source: Arc<dyn Source>,
        provider: Arc<rustls::crypto::CryptoProvider>,
        roots: Arc<Roots>,
        roots_from_issuance: bool,
    ) -> Arc<Self> {
        Arc::new(Self {
            source,
            provider,
            certs: RwLock::default(),
            roots,
            roots_from_issuance,
            fetching: Mutex::default(),
            reissued: tokio::sync::Notify::new(),
            metrics: std::sync::OnceLock::new(),
            last: std::sync::Mutex::default(),
        })
    }

    /// How the last request to the certificate source went, if one was made.
    pub fn last_request(&self) -> Option<LastRequest> {
        self.last.lock().expect("last request poisoned").clone()
    }

    /// Whether the certificate source answers now ([`Source::reach`]).
    pub async fn reach(&self) -> Result<String, String> {
        self.source.reach().await
    }

    /// Counts issuances and renewals in `metrics` from now on (once).
    pub fn count_into(&self, metrics: Arc<crate::metrics::Certificates>) {
        let _ = self.metrics.set(metrics);
    }

    /// Every held identity with its certificate's expiry.
    pub fn expiries(&self) -> Vec<(Id, SystemTime)> {
        let certs = self.certs.read().expect("cert cache lock poisoned");
        certs
            .iter()
            .map(|(id, c)| (id.clone(), c.not_after))
            .collect()
    }

    /// Every held certificate, expired or not, sorted by identity.
    pub fn chains(&self) -> Vec<Held> {
        let certs = self.certs.read().expect("cert cache lock poisoned");
        let mut held: Vec<Held> = certs
            .iter()
            .map(|(id, c)| Held {
                id: id.clone(),
                key: c.key.clone(),
                not_before: c.not_before,
                not_after: c.not_after,
            })
            .collect();
        held.sort_by(|a, b| a.id.cmp(&b.id));
        held
    }

    /// The trust bundle's certificates.
    pub fn root_certificates(&self) -> Arc<[CertificateDer<'static>]> {
        self.roots.certificates()
    }

    /// The current certificate for `id`, if one has been fetched and has not expired.
    pub fn get(&self, id: &Id) -> Option<Arc<CertifiedKey>> {
        let certs = self.certs.read().expect("cert cache lock poisoned");
        let cert = certs.get(id)?;
        (cert.not_after > SystemTime::now()).then(|| cert.key.clone())
    }

    /// The mesh trust bundle, as the authority last sent it.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.get()
    }

    /// Fetches a fresh certificate for every held identity now (the trust bundle changed, so
    /// the CA may sign under another root). Failures are logged; the renewal loops retry.
    pub fn reissue_all(self: &Arc<Self>) {
        let ids: Vec<Id> = {
            let certs = self.certs.read().expect("cert cache lock poisoned");
            certs.keys().cloned().collect()
        };
        for id in ids {
            let cache = self.clone();
            tokio::spawn(async move {
                match cache.refresh(&id).await {
                    Ok(()) => cache.reissued.notify_waiters(),
                    Err(e) => warn!(id = %id, error = &e as &dyn std::error::Error,
                        "re-issuing after a trust bundle change failed; renewal will retry"),
                }
            });
        }
    }

    /// The per-identity lock that makes fetches single-flight.
    async fn slot(&self, id: &Id) -> Arc<Mutex<()>> {
        let mut fetching = self.fetching.lock().await;
        fetching.entry(id.clone()).or_default().clone()
    }

    /// Makes sure a valid certificate for `id` is held, fetching it if needed, and keeps it
    /// renewed from then on until [`Cache::release`].
    pub async fn ensure(self: &Arc<Self>, id: &Id) -> Result<(), Error> {
        if self.get(id).is_some() {
            return Ok(());
        }
        let slot = self.slot(id).await;
        let _guard = slot.lock().await;
        // Another task may have fetched it while this one waited.
        if self.get(id).is_some() {
            return Ok(());
        }
        let first = !self
            .certs
            .read()
            .expect("cert cache lock poisoned")
            .contains_key(id);
        self.fetch(id, Install::Always).await?;
        if first {
            tokio::spawn(self.clone().renew(id.clone()));
        }
        Ok(())
    }

    /// Stops renewing `id` and forgets its certificate.
    pub fn release(&self, id: &Id) {
        self.certs
            .write()
            .expect("cert cache lock poisoned")
            .remove(id);
    }

    /// A new certificate for a held identity (renewal, re-issue), single-flight with every
    /// other fetch of it; dropped if the identity is released meanwhile.
    async fn refresh(&self, id: &Id) -> Result<(), Error> {
        let slot = self.slot(id).await;
        let _guard = slot.lock().await;
        self.fetch(id, Install::IfHeld).await
    }

    async fn fetch(&self, id: &Id, when: Install) -> Result<(), Error> {
        let installed = match self.source.issue(id).await {
            Ok(issued) => self.install(id, issued, when),
            Err(e) => Err(e),
        };
        if let Some(metrics) = self.metrics.get() {
            metrics.fetched(when == Install::IfHeld, installed.is_ok());
        }
        *self.last.lock().expect("last request poisoned") = Some(LastRequest {
            id: id.clone(),
            at: SystemTime::now(),
            error: installed
                .as_ref()
                .err()
                .map(|e| format!("{:#}", anyhow::Error::new(e.clone()))),
        });
        if let Some(cert) = installed? {
            info!(id = %id, not_after = ?cert.not_after, "certificate issued");
        }
        Ok(())
    }

    fn install(&self, id: &Id, issued: Issued, when: Install) -> Result<Option<Cert>, Error> {
        let unusable = |e| Error::Unusable {
            id: id.clone(),
            source: Arc::new(e),
        };
        let signer = self
            .provider
            .key_provider
            .load_private_key(issued.key)
            .map_err(unusable)?;
        if self.roots_from_issuance {
            self.roots.set(&issued.roots).map_err(unusable)?;
        }
        let cert = Cert {
            key: Arc::new(CertifiedKey::new(issued.chain, signer)),
            not_before: issued.not_before,
            not_after: issued.not_after,
        };
        let mut certs = self.certs.write().expect("cert cache lock poisoned");
        if when == Install::IfHeld && !certs.contains_key(id) {
            // Released while the CA answered: holding it again would leave it unrenewed.
            return Ok(None);
        }
        certs.insert(id.clone(), cert.clone());
        Ok(Some(cert))
    }

    /// Renews `id` at half life for as long as it is held; on failure retries with backoff
    /// while the old certificate keeps serving.
    async fn renew(self: Arc<Self>, id: Id) {
        while let Some(cert) = self.held(&id) {
            let wait = cert
                .renew_at()
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            if !wait.is_zero() {
                // A certificate re-issued meanwhile (the bundle changed) moves the deadline.
                let reissued = self.reissued.notified();
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = reissued => continue,
                }
            }
            let mut backoff = MIN_BACKOFF;
            loop {
                if self.held(&id).is_none() {
                    return;
                }
                match self.refresh(&id).await {
                    Ok(()) => break,
                    Err(e) => {
                        let left = cert
                            .not_after
                            .duration_since(SystemTime::now())
                            .unwrap_or_default();
                        let wait = retry_wait(backoff, left);
                        warn!(id = %id, retry_in = ?wait, error = &e as &dyn std::error::Error,
                            "certificate renewal failed");
                        tokio::time::sleep(wait).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
    }

    fn held(&self, id: &Id) -> Option<Cert> {
        self.certs
            .read()
            .expect("cert cache lock poisoned")
            .get(id)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::identity::{IssueFuture, LocalCa};

    /// Counts issuances and can be told to fail, around a real local CA.
    struct Counting {
        ca: LocalCa,
        issued: AtomicUsize,
        fail: std::sync::atomic::AtomicBool,
    }

    impl Source for Counting {
        fn issue<'a>(&'a self, id: &'a Id) -> IssueFuture<'a> {
            Box::pin(async move {
                if self.fail.load(Ordering::SeqCst) {
                    let source: Box<dyn std::error::Error + Send + Sync> = "CA unreachable".into();
                    return Err(Error::LoadCa {
                        path: "test".into(),
                        source: source.into(),
                    });
                }
                self.issued.fetch_add(1, Ordering::SeqCst);
                self.ca.issue(id).await
            })
        }
    }

    fn cache(test: &str) -> (Arc<Cache>, Arc<Counting>) {
        let ca = crate::test_util::Ca::new(test).local(Duration::from_secs(24 * 3600));
        let source = Arc::new(Counting {
            ca,
            issued: AtomicUsize::new(0),
            fail: false.into(),
        });
        (Cache::new(source.clone(), crate::tls::provider()), source)
    }

    /// Issues from a local CA once the test lets each request through.
    struct Gated {
        ca: LocalCa,
        gate: tokio::sync::Semaphore,
        asked: AtomicUsize,
    }

    impl Source for Gated {
        fn issue<'a>(&'a self, id: &'a Id) -> IssueFuture<'a> {
            Box::pin(async move {
                self.asked.fetch_add(1, Ordering::SeqCst);
                self.gate.acquire().await.expect("open").forget();
                self.ca.issue(id).await
            })
        }
    }

    #[tokio::test]
    async fn a_certificate_released_while_it_is_reissued_is_not_held_again() {
        let ca = crate::test_util::Ca::new("reissue-release").local(Duration::from_secs(3600));
        let source = Arc::new(Gated {
            ca,
            gate: tokio::sync::Semaphore::new(1),
            asked: AtomicUsize::new(0),
        });
        let cache = Cache::new(source.clone(), crate::tls::provider());
        let id = Id::new("cluster.local", "demo", "a").unwrap();
        cache.ensure(&id).await.unwrap();

        cache.reissue_all();
        while source.asked.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        cache.release(&id);
        source.gate.add_permits(1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            cache.get(&id).is_none(),
            "a released identity was held again by its re-issue"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_for_one_identity_sign_once() {
        let (cache, source) = cache("single-flight");
        let id = Id::new("cluster.local", "demo", "a").unwrap();
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (cache, id) = (cache.clone(), id.clone());
                tokio::spawn(async move { cache.ensure(&id).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(source.issued.load(Ordering::SeqCst), 1);
        assert!(cache.get(&id).is_some());
        assert_eq!(cache.roots().len(), 1);
    }

    #[test]
    fn a_failed_renewal_is_retried_before_the_certificate_expires() {
        let secs = Duration::from_secs;
        assert_eq!(retry_wait(MAX_BACKOFF, secs(12 * 3600)), MAX_BACKOFF);
        // A one-minute certificate 30 s from expiry: the 16 s backoff would leave 14 s.
        assert_eq!(retry_wait(secs(16), secs(30)), Duration::from_millis(7500));
        assert_eq!(retry_wait(secs(16), Duration::ZERO), MIN_BACKOFF);
        assert_eq!(retry_wait(MIN_BACKOFF, secs(60)), MIN_BACKOFF);
    }

    #[tokio::test(start_paused = true)]
    async fn renews_at_half_life_and_keeps_serving_while_renewal_fails() {
        let (cache, source) = cache("renewal");
        let id = Id::new("cluster.local", "demo", "a").unwrap();
        cache.ensure(&id).await.unwrap();
        let first = cache.get(&id).unwrap();

        tokio::time::sleep(Duration::from_secs(11 * 3600)).await;
        assert_eq!(
            source.issued.load(Ordering::SeqCst),
            1,
            "renewed before half life"
        );

        source.fail.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(3600 + 10)).await;
        assert!(
            Arc::ptr_eq(&cache.get(&id).unwrap(), &first),
            "old cert must keep serving"
        );

        source.fail.store(false, Ordering::SeqCst);
        tokio::time::sleep(MAX_BACKOFF).await;
        assert_eq!(source.issued.load(Ordering::SeqCst), 2);
        assert!(
            !Arc::ptr_eq(&cache.get(&id).unwrap(), &first),
            "renewed cert not installed"
        );
    }
}
