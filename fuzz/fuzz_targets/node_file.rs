//! The node file (YAML): node, CA, workloads, services, and Istio policies, which are then
//! compiled and asked for a decision.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let dir = std::path::Path::new("/etc/culvert");
    if let Ok(file) = culvert::config::NodeFile::from_yaml(text, dir, None) {
        // A valid file names its node, and every enrolled workload has an address.
        assert!(!file.node.is_empty());
        assert!(
            file.snapshot
                .workloads()
                .all(|w| !file.snapshot.enrolled(w) || !w.ips.is_empty())
        );
        // Whatever the policies say, a decision is made without a panic.
        let peer: culvert::identity::Id = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        for w in file.snapshot.workloads() {
            let Some(ip) = w.ips.first() else { continue };
            for peer in [None, Some(&peer)] {
                let conn = culvert::policy::Connection {
                    peer,
                    src: "10.9.9.9:4000".parse().unwrap(),
                    dst: std::net::SocketAddr::new(*ip, 8080),
                };
                let _ = culvert::policy::inbound(&file.snapshot, w, &conn);
            }
        }
        let _ = file.snapshot.policies.describe(file.snapshot.workloads().map(AsRef::as_ref));
    }
});
