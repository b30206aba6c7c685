//! The node file (YAML): node, CA, workloads, services.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let dir = std::path::Path::new("/etc/culvert");
    if let Ok(file) = culvert::config::NodeFile::from_yaml(text, dir, None) {
        // A valid file names its node, and every enrolled workload has an address.
        assert!(!file.node.is_empty());
        assert!(file.snapshot.workloads().all(|w| !w.enrolled || !w.ips.is_empty()));
    }
});
