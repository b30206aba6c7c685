//! SPIFFE ids, as peers present them in certificates and config names them.
#![no_main]

use culvert::identity::Id;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(id) = text.parse::<Id>() {
        // Parsing is exact: what parses prints back as itself and parses to the same id.
        assert_eq!(id.as_str(), text);
        let again: Id = id.as_str().parse().expect("a printed id parses");
        assert_eq!(again, id);
    }
});
