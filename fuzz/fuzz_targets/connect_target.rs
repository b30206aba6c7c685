//! The method and `:authority` of an HBONE request.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == b' ').unwrap_or(data.len());
    let (method, uri) = data.split_at(split);
    let Ok(method) = http::Method::from_bytes(method) else {
        return;
    };
    let Ok(uri) = http::Uri::try_from(uri.get(1..).unwrap_or_default()) else {
        return;
    };
    if let Some(target) = culvert::hbone::connect_target(&method, &uri) {
        assert_eq!(method, http::Method::CONNECT);
        assert!(uri.authority().is_some());
        let _ = target.to_string();
    }
});
