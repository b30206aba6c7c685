//! What a certificate signing request may hold: the checks istio-csr applies, and one more
//! (the key must be P-256, the only kind node daemons and ztunnel send).

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::der_parser::oid;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer as _;

/// A PEM CSR larger than this is refused before parsing (a P-256 one is about 500 bytes).
pub const MAX_PEM_BYTES: usize = 4096;

/// Why a CSR was refused; shown to the caller.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the CSR is {0} bytes; at most {MAX_PEM_BYTES} are accepted")]
    TooLarge(usize),
    #[error("the CSR is not one PEM CERTIFICATE REQUEST")]
    NotPem,
    #[error("the CSR does not parse: {0}")]
    Malformed(String),
    #[error("the CSR's key is not ECDSA P-256")]
    KeyType,
    #[error("the CSR's signature is not ecdsa-with-SHA256 or does not verify")]
    Signature,
    #[error("the CSR has a subject ({0}); it must be empty")]
    Subject(String),
    #[error("the CSR carries an attribute other than its extension request")]
    Attribute,
    #[error(
        "the CSR requests extension {0}; only subjectAltName, keyUsage and extendedKeyUsage are allowed"
    )]
    Extension(String),
    #[error("the CSR requests key usages beyond digitalSignature and keyEncipherment")]
    KeyUsage,
    #[error("the CSR names {0}; it must name exactly one URI, {1}")]
    Names(String, String),
}

/// Checks `pem` is a request for exactly `identity`; returns its public key (SPKI DER).
pub fn check(pem: &str, identity: &str) -> Result<Vec<u8>, Refusal> {
    if pem.len() > MAX_PEM_BYTES {
        return Err(Refusal::TooLarge(pem.len()));
    }
    let parsed = ::pem::parse(pem).map_err(|_| Refusal::NotPem)?;
    if parsed.tag() != "CERTIFICATE REQUEST" && parsed.tag() != "NEW CERTIFICATE REQUEST" {
        return Err(Refusal::NotPem);
    }
    let (rest, csr) = X509CertificationRequest::from_der(parsed.contents())
        .map_err(|e| Refusal::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(Refusal::Malformed("trailing bytes".into()));
    }
    let info = &csr.certification_request_info;

    let spki = &info.subject_pki;
    let p256 = oid!(1.2.840.10045.3.1.7);
    let ec = oid!(1.2.840.10045.2.1);
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != ec || curve != Some(p256) {
        return Err(Refusal::KeyType);
    }
    if csr.signature_algorithm.algorithm != oid!(1.2.840.10045.4.3.2) {
        return Err(Refusal::Signature);
    }
    let key = aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
        &spki.subject_public_key.data,
    );
    key.verify(info.raw, &csr.signature_value.data)
        .map_err(|_| Refusal::Signature)?;

    if info.subject.iter().count() > 0 {
        return Err(Refusal::Subject(info.subject.to_string()));
    }
    let ext_request = oid!(1.2.840.113549.1.9.14);
    if info.attributes().iter().any(|a| a.oid != ext_request) {
        return Err(Refusal::Attribute);
    }
    let mut names = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => {
                names.extend(san.general_names.iter().map(|n| match n {
                    GeneralName::URI(uri) => Ok((*uri).to_owned()),
                    other => Err(other.to_string()),
                }));
            }
            ParsedExtension::KeyUsage(ku) => {
                let allowed = ku.digital_signature() || ku.key_encipherment();
                let bits = ku.flags & !0b101;
                if bits != 0 || !allowed {
                    return Err(Refusal::KeyUsage);
                }
            }
            ParsedExtension::ExtendedKeyUsage(_) => {}
            other => return Err(Refusal::Extension(format!("{other:?}"))),
        }
    }
    // Extensions x509-parser does not know come back as UnsupportedExtension above; any other
    // attribute content (a second extension request) was refused with Attribute.
    match names.as_slice() {
        [Ok(uri)] if uri == identity => Ok(spki.raw.to_vec()),
        _ => {
            let shown: Vec<String> = names
                .into_iter()
                .map(|n| n.unwrap_or_else(|other| other))
                .collect();
            let shown = if shown.is_empty() {
                "no name".to_owned()
            } else {
                shown.join(", ")
            };
            Err(Refusal::Names(shown, identity.to_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, KeyPair, KeyUsagePurpose,
        PKCS_ECDSA_P256_SHA256, PKCS_ED25519, PublicKeyData as _, SanType,
    };

    use super::*;

    const ID: &str = "spiffe://cluster.local/ns/shop/sa/cart";

    fn request(edit: impl FnOnce(&mut CertificateParams)) -> (String, KeyPair) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(ID.try_into().unwrap())];
        edit(&mut params);
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        (pem, key)
    }

    #[test]
    fn an_agents_csr_passes_and_yields_its_key() {
        let (pem, key) = request(|_| {});
        assert_eq!(check(&pem, ID).unwrap(), key.subject_public_key_info());
    }

    #[test]
    fn a_csr_made_by_openssl_passes() {
        // `openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -subj / -addext
        // subjectAltName=critical,URI:<id>`: the fuzz seed.
        let pem = include_str!("../../fuzz/seeds/ca_csr/agent.pem");
        assert!(check(pem, ID).is_ok(), "{:?}", check(pem, ID));
    }

    #[test]
    fn every_deviation_is_refused_with_its_reason() {
        let uri = |s: &str| SanType::URI(s.try_into().unwrap());
        let other = "spiffe://cluster.local/ns/shop/sa/other";
        type Edit<'a> = Box<dyn FnOnce(&mut CertificateParams) + 'a>;
        let cases: Vec<(Edit<'_>, &str)> = vec![
            (Box::new(|p| p.subject_alt_names.push(uri(other))), "names"),
            (
                Box::new(|p| p.subject_alt_names = vec![uri(other)]),
                "names",
            ),
            (
                Box::new(|p| {
                    p.subject_alt_names
                        .push(SanType::DnsName("cart.shop".try_into().unwrap()))
                }),
                "DNSName",
            ),
            (Box::new(|p| p.subject_alt_names.clear()), "no name"),
            (
                Box::new(|p| p.distinguished_name.push(DnType::CommonName, "cart")),
                "subject",
            ),
            (
                Box::new(|p| p.key_usages = vec![KeyUsagePurpose::KeyCertSign]),
                "key usages",
            ),
            (
                Box::new(|p| p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained)),
                "extension",
            ),
        ];
        for (edit, want) in cases {
            let (pem, _) = request(edit);
            let err = check(&pem, ID).unwrap_err().to_string();
            assert!(
                err.to_lowercase().contains(&want.to_lowercase()),
                "{want}: {err}"
            );
        }
    }

    #[test]
    fn a_foreign_key_type_a_bad_signature_and_a_huge_request_are_refused() {
        let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(ID.try_into().unwrap())];
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        assert_eq!(check(&pem, ID), Err(Refusal::KeyType));

        let (pem, _) = request(|_| {});
        let mut der = ::pem::parse(&pem).unwrap().into_contents();
        let last = der.len() - 1;
        der[last] ^= 1;
        let tampered = ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", der));
        assert!(matches!(
            check(&tampered, ID),
            Err(Refusal::Signature | Refusal::Malformed(_))
        ));

        let huge = "A".repeat(MAX_PEM_BYTES + 1);
        assert_eq!(check(&huge, ID), Err(Refusal::TooLarge(MAX_PEM_BYTES + 1)));
        assert_eq!(check("garbage", ID), Err(Refusal::NotPem));
    }
}
