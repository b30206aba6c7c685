//! CSRs as any authenticated caller sends them to culvert ca.
#![no_main]

use culvert_ca::csr;
use libfuzzer_sys::fuzz_target;

const ID: &str = "spiffe://cluster.local/ns/shop/sa/cart";

fuzz_target!(|text: &str| {
    if let Ok(public_key) = csr::check(text, ID) {
        // Only a P-256 key is ever signed: what passed is a key rcgen can put in a certificate.
        assert!(rcgen::SubjectPublicKeyInfo::from_der(&public_key).is_ok());
    }
});
