//! The enrollment record the plugin reads when the daemon does not answer.
#![no_main]

use culvert_cni_proto::Enrollment;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(record) = serde_json::from_slice::<Enrollment>(data) else {
        return;
    };
    let exempt = ["kube-system".to_owned()];
    for ns in record.namespaces.iter().chain(&record.outside) {
        // A pod the record covers never starts unwired.
        if record.covers(ns, "pod") {
            assert!(!record.admits_unwired(ns, "pod", &exempt));
        }
    }
});
