//! The CA's material (signing certificate and key, its chain, the trust bundle, a staged next
//! signer during a rotation), as kept in the CA's Secret, and the signing itself.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SubjectPublicKeyInfo,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Leaves are back-dated this much for peers whose clocks run slightly behind.
const BACKDATE: Duration = Duration::from_secs(60);
/// Lifetime of a root `culvert ca` generates itself.
pub const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);

/// Keys of the CA Secret.
pub mod keys {
    /// The certificate that signs workload certificates (a root, or an intermediate).
    pub const CERT: &str = "ca.crt";
    /// Its private key (PKCS#8 PEM). Only the CA reads it.
    pub const KEY: &str = "ca.key";
    /// Certificates between [`CERT`] and its root, if any (PEM, nearest first).
    pub const CHAIN: &str = "chain.crt";
    /// The root [`CERT`] chains to (itself when it is a root).
    pub const ROOT: &str = "root.crt";
    /// Every root peers are told to trust: [`ROOT`], plus another during a rotation.
    pub const ROOTS: &str = "roots.crt";
    /// The staged signer of a rotation: the same four, prefixed `next-`.
    pub const NEXT_PREFIX: &str = "next-";
}

/// One signer: what signs, and the certificates above it.
#[derive(Clone)]
pub struct Signer {
    pub cert_pem: String,
    pub key_pem: String,
    pub chain_pem: String,
    pub root_pem: String,
}

/// Everything in the CA Secret.
#[derive(Clone)]
pub struct Material {
    pub current: Signer,
    pub roots_pem: String,
    /// A rotation that has begun and not been activated.
    pub next: Option<Signer>,
}

impl Signer {
    /// A new self-signed root that signs workload certificates itself.
    pub fn generate(trust_domain: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        // Distinct names, so two roots side by side during a rotation are told apart.
        let now = SystemTime::now();
        let stamp = humantime::format_rfc3339_seconds(now);
        dn.push(DnType::CommonName, format!("culvert ca root {stamp}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + ROOT_LIFETIME).into();
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            chain_pem: String::new(),
            root_pem: cert.pem(),
        })
    }

    fn to_data(&self, prefix: &str, data: &mut BTreeMap<String, String>) {
        let mut put = |k: &str, v: &str| data.insert(format!("{prefix}{k}"), v.to_owned());
        put(keys::CERT, &self.cert_pem);
        put(keys::KEY, &self.key_pem);
        put(keys::CHAIN, &self.chain_pem);
        put(keys::ROOT, &self.root_pem);
    }

    fn from_data(prefix: &str, data: &BTreeMap<String, String>) -> anyhow::Result<Option<Self>> {
        let get = |k: &str| data.get(&format!("{prefix}{k}")).cloned();
        let (Some(cert_pem), Some(key_pem)) = (get(keys::CERT), get(keys::KEY)) else {
            return Ok(None);
        };
        let root_pem = get(keys::ROOT).unwrap_or_else(|| cert_pem.clone());
        let signer = Self {
            cert_pem,
            key_pem,
            chain_pem: get(keys::CHAIN).unwrap_or_default(),
            root_pem,
        };
        signer
            .issuer()
            .with_context(|| format!("{prefix}{} and {prefix}{}", keys::CERT, keys::KEY))?;
        Ok(Some(signer))
    }

    pub fn issuer(&self) -> anyhow::Result<Issuer<'static, KeyPair>> {
        let key = KeyPair::from_pem(&self.key_pem).context("the signing key")?;
        Issuer::from_ca_cert_pem(&self.cert_pem, key).context("the signing certificate")
    }

    /// The certificates a leaf is sent with, nearest first, without the root.
    pub fn intermediates(&self) -> anyhow::Result<Vec<CertificateDer<'static>>> {
        let root = pem_certs(&self.root_pem)?;
        let mut out = Vec::new();
        for cert in pem_certs(&self.cert_pem)?
            .into_iter()
            .chain(pem_certs(&self.chain_pem)?)
        {
            if !root.contains(&cert) {
                out.push(cert);
            }
        }
        Ok(out)
    }

    /// SHA-256 of the signing certificate, hex: which signer is current.
    pub fn fingerprint(&self) -> anyhow::Result<String> {
        let cert = pem_certs(&self.cert_pem)?
            .into_iter()
            .next()
            .context("no signing certificate")?;
        Ok(fingerprint(&cert))
    }
}

impl Material {
    /// A fresh CA with its own root.
    pub fn generate(trust_domain: &str) -> anyhow::Result<Self> {
        let current = Signer::generate(trust_domain)?;
        Ok(Self {
            roots_pem: current.root_pem.clone(),
            current,
            next: None,
        })
    }

    pub fn to_data(&self) -> BTreeMap<String, String> {
        let mut data = BTreeMap::new();
        self.current.to_data("", &mut data);
        data.insert(keys::ROOTS.into(), self.roots_pem.clone());
        if let Some(next) = &self.next {
            next.to_data(keys::NEXT_PREFIX, &mut data);
        }
        data
    }

    pub fn from_data(data: &BTreeMap<String, String>) -> anyhow::Result<Self> {
        let current = Signer::from_data("", data)?
            .with_context(|| format!("no {} and {}", keys::CERT, keys::KEY))?;
        let roots_pem = data
            .get(keys::ROOTS)
            .cloned()
            .unwrap_or_else(|| current.root_pem.clone());
        let roots = pem_certs(&roots_pem).context(keys::ROOTS)?;
        if roots.is_empty() {
            bail!("{} holds no certificate", keys::ROOTS);
        }
        for root in pem_certs(&current.root_pem).context(keys::ROOT)? {
            if !roots.contains(&root) {
                bail!("the signer's root is not in {}", keys::ROOTS);
            }
        }
        Ok(Self {
            current,
            roots_pem,
            next: Signer::from_data(keys::NEXT_PREFIX, data)?,
        })
    }

    pub fn roots(&self) -> anyhow::Result<Vec<CertificateDer<'static>>> {
        pem_certs(&self.roots_pem)
    }

    /// Rotation, step one: stage `next` and trust its root alongside the current one.
    pub fn begin_rotation(&mut self, next: Signer) -> anyhow::Result<()> {
        if self.next.is_some() {
            bail!("a rotation has already begun: activate it first");
        }
        let mut roots = self.roots()?;
        for root in pem_certs(&next.root_pem)? {
            if !roots.contains(&root) {
                roots.push(root);
            }
        }
        self.roots_pem = to_pem(&roots);
        self.next = Some(next);
        Ok(())
    }

    /// Step two: sign with the staged signer; both roots stay trusted.
    pub fn activate_rotation(&mut self) -> anyhow::Result<()> {
        let next = self.next.take().context("no rotation has begun")?;
        self.current = next;
        Ok(())
    }

    /// Step three: trust only the current signer's root.
    pub fn finish_rotation(&mut self) -> anyhow::Result<()> {
        if self.next.is_some() {
            bail!("the rotation has not been activated yet");
        }
        let keep = pem_certs(&self.current.root_pem)?;
        if self.roots()? == keep {
            bail!("only the current root is trusted: nothing to finish");
        }
        self.roots_pem = to_pem(&keep);
        Ok(())
    }
}

/// A workload certificate for `identity` on `public_key` (SPKI DER), valid for `ttl` but never
/// past the signer's own expiry.
pub fn sign_leaf(
    issuer: &Issuer<'_, KeyPair>,
    signer_not_after: SystemTime,
    public_key: &[u8],
    identity: &str,
    ttl: Duration,
) -> anyhow::Result<(CertificateDer<'static>, SystemTime)> {
    let public_key = SubjectPublicKeyInfo::from_der(public_key).context("the CSR's public key")?;
    let now = SystemTime::now();
    let not_after = (now + ttl).min(signer_not_after);
    let params = culvert::identity::leaf_params(identity, now - BACKDATE, not_after)?;
    let cert = params.signed_by(&public_key, issuer)?;
    Ok((cert.der().clone(), not_after))
}

/// A serving certificate for the CA itself, naming `dns_names`.
pub fn sign_server(
    issuer: &Issuer<'_, KeyPair>,
    dns_names: &[String],
    ttl: Duration,
) -> anyhow::Result<(CertificateDer<'static>, KeyPair)> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(dns_names.to_vec())?;
    params.distinguished_name = DistinguishedName::new();
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ttl).into();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.der().clone(), key))
}

pub fn pem_certs(pem: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .context("parsing PEM certificates")
}

pub fn to_pem(certs: &[CertificateDer<'_>]) -> String {
    certs.iter().map(|c| der_to_pem(c)).collect()
}

pub fn der_to_pem(cert: &CertificateDer<'_>) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", cert.to_vec()), config)
}

/// SHA-256 of a certificate, hex.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A certificate's subject and expiry, for people.
pub fn describe(cert: &CertificateDer<'_>) -> (String, SystemTime) {
    match x509_parser::parse_x509_certificate(cert) {
        Ok((_, x)) => {
            let secs = u64::try_from(x.validity().not_after.timestamp()).unwrap_or(0);
            (
                x.subject().to_string(),
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            )
        }
        Err(_) => ("<unparsable>".into(), SystemTime::UNIX_EPOCH),
    }
}

/// When `cert_pem`'s first certificate expires.
pub fn not_after(cert_pem: &str) -> anyhow::Result<SystemTime> {
    let cert = pem_certs(cert_pem)?
        .into_iter()
        .next()
        .context("no certificate")?;
    Ok(describe(&cert).1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotation_trusts_both_roots_then_signs_with_the_new_then_drops_the_old() {
        let mut m = Material::generate("cluster.local").unwrap();
        let old = m.roots().unwrap();
        assert_eq!(old.len(), 1);
        assert!(m.finish_rotation().is_err(), "nothing to finish");
        m.begin_rotation(Signer::generate("cluster.local").unwrap())
            .unwrap();
        assert_eq!(m.roots().unwrap().len(), 2);
        assert!(m.begin_rotation(Signer::generate("x").unwrap()).is_err());
        assert!(m.finish_rotation().is_err(), "finished before activation");
        let round_trip = Material::from_data(&m.to_data()).unwrap();
        assert!(round_trip.next.is_some());
        m.activate_rotation().unwrap();
        assert_ne!(pem_certs(&m.current.root_pem).unwrap(), old);
        assert_eq!(m.roots().unwrap().len(), 2);
        m.finish_rotation().unwrap();
        assert_eq!(m.roots().unwrap(), pem_certs(&m.current.root_pem).unwrap());
        Material::from_data(&m.to_data()).unwrap();
    }

    #[test]
    fn pem_round_trips() {
        let m = Material::generate("cluster.local").unwrap();
        let certs = pem_certs(&m.current.cert_pem).unwrap();
        assert_eq!(pem_certs(&to_pem(&certs)).unwrap(), certs);
    }
}
