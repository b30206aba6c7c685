//! Watch events from the Kubernetes API: Namespaces, Pods, Services, EndpointSlices and Nodes'
//! metadata as JSON, decoded lean into the node's view of the cluster, from which a snapshot is
//! then cut.
//! Input: events, one per line, each a kind byte, a change byte (list start, listed, list
//! done, applied, deleted) and the object.
#![no_main]

use culvert::discovery::{Cluster, Settings};
use culvert::test_util::cluster::Step;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The seeds' pods and endpoints are on n1: its endpoints are indexed too.
    let cluster = Cluster::new("cluster.local").on_node("n1");
    for line in data.split(|&b| b == b'\n').take(64) {
        let [kind, change, json @ ..] = line else { continue };
        Step::from_parts(*kind, *change, json).try_apply(&cluster);
    }
    let settings = Settings {
        trust_domain: "cluster.local".into(),
        peer_authentication: culvert::state::PeerAuthentication::Permissive,
        policy: culvert::policy::Settings::default(),
        file_policies: std::sync::Arc::default(),
    };
    // Whatever the API sent, a snapshot is cut without a panic, and every address a workload
    // holds is indexed to that workload (of pods claiming one address, one holds it).
    let snapshot = cluster.snapshot(&settings);
    for w in snapshot.workloads() {
        for ip in &w.ips {
            let owner = snapshot.workload_by_ip(*ip).expect("every address is indexed");
            assert!(std::sync::Arc::ptr_eq(owner, w), "{ip} names two workloads");
        }
    }
    // A locality is kept only for a node whose labels give one.
    for w in snapshot.workloads() {
        if let Some(l) = snapshot.locality(&w.node) {
            assert!(!(l.region.is_empty() && l.zone.is_empty() && l.subzone.is_empty()));
        }
    }
    // An endpoint names only a Service port that lists it.
    for service in snapshot.services() {
        for &endpoint in &service.1.endpoints {
            if let Some(port) = snapshot.endpoint_service(endpoint) {
                assert!(port.endpoints.contains(&endpoint), "{endpoint} misindexed");
            }
        }
    }
});
