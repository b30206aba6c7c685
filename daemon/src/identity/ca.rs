//! A certificate authority held in local key files: for demos, tests and hosts without a
//! cluster CA. Every node that uses it holds the CA key, so it is for evaluation only.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{Error, Id, IssueFuture, Issued, Source};

/// Certificates are back-dated this much so a peer whose clock runs slightly behind accepts them.
const BACKDATE: Duration = Duration::from_secs(60);

/// Signs workload certificates with a CA certificate and key read from PEM files.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's own certificate; sent after the leaf when the CA is an intermediate.
    ca_cert: CertificateDer<'static>,
    roots: Vec<CertificateDer<'static>>,
    ttl: Duration,
}

impl LocalCa {
    /// Loads the CA. `roots` is the trust bundle file; without one the CA certificate is the
    /// root. A CA that is itself an intermediate is sent in the chain after the leaf.
    pub fn load(
        cert: &Path,
        key: &Path,
        roots: Option<&Path>,
        ttl: Duration,
    ) -> Result<Self, Error> {
        let load_err = |path: &Path, e: Box<dyn std::error::Error + Send + Sync>| Error::LoadCa {
            path: path.display().to_string(),
            source: Arc::from(e),
        };
        let cert_pem = std::fs::read_to_string(cert).map_err(|e| load_err(cert, e.into()))?;
        let key_pem = std::fs::read_to_string(key).map_err(|e| load_err(key, e.into()))?;
        let key_pair = KeyPair::from_pem(&key_pem).map_err(|e| load_err(key, e.into()))?;
        let issuer =
            Issuer::from_ca_cert_pem(&cert_pem, key_pair).map_err(|e| load_err(cert, e.into()))?;
        let ca_cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| load_err(cert, e.into()))?;
        let roots = match roots {
            None => vec![ca_cert.clone()],
            Some(path) => {
                let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
                    .map_err(|e| load_err(path, e.into()))?
                    .collect();
                let certs = certs.map_err(|e| load_err(path, e.into()))?;
                if certs.is_empty() {
                    return Err(load_err(path, "no certificate in the trust bundle".into()));
                }
                certs
            }
        };
        Ok(Self {
            issuer,
            ca_cert,
            roots,
            ttl,
        })
    }

    fn sign(&self, id: &Id) -> Result<Issued, rcgen::Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let not_before = now - BACKDATE;
        let not_after = now + self.ttl;
        let leaf =
            leaf_params(id.as_str(), not_before, not_after)?.signed_by(&key, &self.issuer)?;
        let mut chain = vec![leaf.der().clone()];
        if !self.roots.contains(&self.ca_cert) {
            chain.push(self.ca_cert.clone());
        }
        Ok(Issued {
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            roots: self.roots.clone(),
            not_before,
            not_after,
        })
    }
}

/// A workload certificate's contents, as every Culvert CA issues them: no subject, one URI SAN
/// (critical, as the subject is empty), digital signature and key encipherment, server and client
/// auth, the issuer's key id.
pub fn leaf_params(
    uri: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

impl Source for LocalCa {
    fn issue<'a>(&'a self, id: &'a Id) -> IssueFuture<'a> {
        let result = self.sign(id).map_err(|e| Error::Sign {
            id: id.clone(),
            source: Arc::new(e),
        });
        Box::pin(std::future::ready(result))
    }
}

/// Creates a self-signed root CA and writes `ca.crt` and `ca.key` into `dir`.
///
/// For demos and tests; a production mesh gets its root from its own PKI.
pub fn write_root(dir: &Path, common_name: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + Duration::from_secs(10 * 365 * 86_400)).into();
    let cert = params.self_signed(&key)?;
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("ca.crt"), cert.pem())?;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dir.join("ca.key"))?
        .write_all(key.serialize_pem().as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn issues_a_leaf_with_one_uri_san_and_both_usages() {
        let dir = std::env::temp_dir().join(format!("culvert-ca-test-{}", std::process::id()));
        write_root(&dir, "test root").unwrap();
        let ttl = Duration::from_secs(24 * 3600);
        let ca = LocalCa::load(&dir.join("ca.crt"), &dir.join("ca.key"), None, ttl).unwrap();
        let id = Id::new("cluster.local", "demo", "client").unwrap();
        let issued = ca.issue(&id).await.unwrap();

        assert_eq!(
            issued.chain.len(),
            1,
            "a root CA is not repeated in the chain"
        );
        assert_eq!(issued.roots.len(), 1);
        let lifetime = issued.not_after.duration_since(issued.not_before).unwrap();
        assert_eq!(lifetime, ttl + BACKDATE);
        let (_, leaf) = x509_parser::parse_x509_certificate(&issued.chain[0]).unwrap();
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical, "an empty subject needs a critical SAN");
        let names: Vec<_> = san
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(names, ["URI(spiffe://cluster.local/ns/demo/sa/client)"]);
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_ca_file_is_named() {
        let err = LocalCa::load(
            Path::new("/nonexistent/ca.crt"),
            Path::new("/x"),
            None,
            BACKDATE,
        )
        .err()
        .unwrap();
        assert_eq!(err.to_string(), "loading the CA from /nonexistent/ca.crt");
    }
}
