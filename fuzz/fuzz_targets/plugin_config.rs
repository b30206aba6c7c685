//! The network configuration a runtime writes to the plugin's stdin, with `prevResult` in any
//! CNI version.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((result, _ips)) = culvert_cni::inspect(data) {
        // What the plugin passes on states the version it was asked for.
        if let Some(serde_json::Value::Object(result)) = result {
            let version = result.get("cniVersion").and_then(|v| v.as_str());
            assert!(version.is_some_and(|v| culvert_cni::SUPPORTED_VERSIONS.contains(&v)));
        }
    }
    let _ = culvert_cni::answer_version(data);
});
